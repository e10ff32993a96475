"""``HQLinear``: a drop-in ``nn.Linear`` whose weight stays HyperQuant-encoded in memory.

Legend: M tokens (all leading dimensions of the input flattened), K = ``in_features``, K_pad = K padded to
the RHT tile, N = ``out_features``, NB Rice blocks of a stream, U / Q / E unary / remainder / escape sizes.

The weight ``W`` (N, K) is stored rotated (``W R``, RHT per tile along K) as lattice integers ``Y`` (N, K_pad)
with one scale per row, ``W R ≈ p(Y) / α · scale`` (``p``: √3 on the first coordinate of every A2 pair).
Because the RHT is orthonormal, ``x Wᵀ = (x R)(W R)ᵀ``: the forward rotates the activations with the same
``(seed, key, tile)`` and multiplies in the rotated basis. No float copy of the weight is kept: it is decoded
transiently inside every forward.

Buffers (registered, so ``.to()``, ``state_dict`` and accelerate/diffusers offload hooks move them):

- ``scales``: (N,) the row scales as raw bits — int16 for float16/bfloat16 scales, int32 for float32 —
  so a dtype cast of the model (``.to(torch.bfloat16)``, ``torch_dtype=`` at load) can never round them.
- storage ``"rice"``, per stream ``i``: ``s{i}_ks`` uint8 (NB,), ``s{i}_offsets`` int32 (NB,), ``s{i}_unary``
  uint8 (U,), ``s{i}_rem`` uint8 (Q,), ``s{i}_escapes`` int32 (E,) (:class:`~hq_diffusion.codec.rice.RiceStream`).
- storage ``"rans"``, per stream ``i`` (:class:`~hq_diffusion.codec.rans.RansStream`, C contexts, T table
  entries, NB rANS blocks, W words, E escapes; unsigned fields kept as same-width signed bit views so that every
  checkpoint dtype is a plain safetensors one): ``s{i}_freqs`` int16 (C, T) (uint16 bits), ``s{i}_states`` int32
  (NB, 8) (uint32 bits), ``s{i}_offsets`` int32 (NB,) (uint32 bits), ``s{i}_words`` int16 (W,) (uint16 bits),
  ``s{i}_escapes`` int32 (E,). The precision of each stream is in ``hq_meta`` (metadata version 2).
- storage ``"int8"``: ``codes`` int8 (N, K_pad), the lattice integers (int16 when some exceed ±127).
- ``bias``: an ``nn.Parameter`` (N,) in the original dtype, when the linear had one.
- a **split layer** (a width the tile plan would pad, :mod:`hq_diffusion.codec.split`): the buffers above hold the
  main part, the first ``cols_main`` = K_main columns (K_pad = K_main then), and the transposed tail
  ``W[:, K_main:]ᵀ`` (r, N), r = K − K_main, is stored in the same form with the prefix ``tail_``
  (``tail_scales`` (r,), ``tail_s{i}_*`` or ``tail_codes`` (r, N_pad)); ``hq_meta`` has ``cols_main`` and a
  ``"tail"`` dict (the tail's own layer metadata), and its ``bps`` / ``snr_db`` count both parts. Every path
  runs on ``x[..., :K_main]`` and adds ``x[..., K_main:] @ T`` in float32, T (r, N) the tail decoded at every
  call (also on the int8 and simulated low-precision paths: the tail is not rounded to their formats).

Scalar metadata (shapes, α, tile, seed, key, lattice, block, stream lengths, mma, rate, SNR) are Python
attributes and the JSON-safe :attr:`HQLinear.hq_meta` dict, from which :meth:`HQLinear.from_meta` rebuilds an
empty module at its final packed shapes (for ``load_state_dict(..., assign=True)`` on the ``meta`` device).

Matmul paths (``mma``; docs/ARCHITECTURE.md), registered in :data:`MMA_PATHS`. Every path is composed of
the tensor-level operations of an :class:`~hq_diffusion.codec.ops_ref.OpSet` — ``rht``, ``rht_quant_int8``,
``int8_gemm_dequant``, ``decode``, ``fused_decode_gemm`` — the same way whichever set it is given:
``backend="native"`` gives the torch references (:data:`~hq_diffusion.codec.ops_ref.REFERENCE`),
``backend="kernel"`` the dispatched set (:data:`hq_diffusion.kernels.DISPATCHED`: Triton on CUDA, the
references elsewhere, ``HQ_KERNELS`` overrides; see ``kernels/dispatch.py``). Which path, which weight source
(stored ``codes`` or decoding the streams) and whether to fuse decode + GEMM is decided here and nowhere else.

- ``"bf16"``: ``F.linear(rht(x), W_rot)`` in the activation dtype, ``W_rot = p(Y)/α·scale`` decoded
  (``decode(q, "rotated")``: Rice or rANS streams, whichever the layer stores) or computed from the stored
  ``codes``.
- ``"int8"``: ``rht_quant_int8`` of the activations, then the int8 GEMM with the dequantization epilogue
  (``ws = scale / α``, float32) against ``Y``: the stored ``codes``; for Rice storage at ≤
  :data:`FUSED_MAX_TOKENS` tokens ``fused_decode_gemm``, above it ``decode(q, "codes")`` + ``int8_gemm_dequant``
  (for rANS storage the dispatcher's ``fused_decode_gemm`` decodes, then runs the int8 GEMM: the fused kernel is
  Rice-only, docs/ARCHITECTURE.md "The rANS coder").
  The exact int32 accumulation uses ``torch._int_mm`` where torch accepts it (inside the ops).
- ``"fp8"``, ``"nvfp4"``, ``"mxfp4"``: both operands rounded to the format (:mod:`hq_diffusion.nn.lowp`),
  simulated with torch casts (a :class:`SimulatedFormatWarning` says so at each forward; Python's default
  warning filter shows it once per format and calling line). There is no kernel for them: they compose the
  reference set whichever backend.
- ``"auto"``: ``"int8"`` on CUDA when ``torch._int_mm`` exists and ``Y`` fits int8, else ``"bf16"``.

:func:`hq_linear` runs the ``"int8"`` and ``"bf16"`` paths for any object with the layer interface
(``encoded()``, ``bias``, optional ``codes``, ``mma`` or ``resolved_mma(device)``), e.g. in the benchmarks.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..codec import EncodedTensor, HQFormatError, decode, encode
from ..codec.core import code_blocks, to_weight_dtype
from ..codec.config import SCALE_DTYPES, CodecConfig
from ..codec.lattice import LATTICES, to_physical
from ..codec.ops_ref import REFERENCE, OpSet, int8_operand_gain, row_dequant_scale
from ..codec.scales import LOG8_GRID_BYTES, check_log8_grid, log8_grid, scale_count, scale_values
from ..codec.rht import ALLOWED_TILES, inverse_rht, legacy_plan_tiles, pad_last, plan_tiles
from ..codec.split import encode_split, split_columns, tail_key
from ..codec import rans
from ..codec.format import _SYMBOLS_PER_WORD, rans_contexts
from ..codec.rice import RiceStream, _num_blocks
from ..codec.strip import NUM_STREAMS, stream_lengths
from ..kernels import DISPATCHED
from .cpu_forward import codes_path_applies, mma_codes_cpu
from .compile_ops import LAYERS, compiled_layer, compiled_opset, traced_weight_of, weight_of
from .lowp import FAKE_QUANT

META_VERSION = 1  # layers that store Rice streams or int8 codes (unchanged since the first checkpoints)
RANS_META_VERSION = 2  # layers that store rANS streams (per-stream precision and table size in the metadata)
META_VERSIONS = {"rice": META_VERSION, "int8": META_VERSION, "rans": RANS_META_VERSION}
MMA_CHOICES = ("auto", "bf16", "int8", "fp8", "nvfp4", "mxfp4")
#: What ``storage=`` of :meth:`HQLinear.from_linear` and ``HQConfig.storage`` accept: ``"rice"`` (historical
#: name: the entropy-coded bitstream, Rice or rANS as the codec config's ``coder`` resolves) or ``"int8"``.
STORAGE_CHOICES = ("rice", "int8")
#: What a layer stores (``HQLinear.storage``, ``hq_meta["storage"]``): the coder's streams or the int8 codes.
LAYER_STORAGES = ("rice", "rans", "int8")
RANS_PARTS = ("freqs", "states", "offsets", "words", "escapes")
#: rANS buffer dtype in the module and checkpoint → the dtype the codec reads (same width, a bit view)
_RANS_DTYPES = {"freqs": (torch.int16, torch.uint16), "states": (torch.int32, torch.uint32),
                "offsets": (torch.int32, torch.uint32), "words": (torch.int16, torch.uint16),
                "escapes": (torch.int32, torch.int32)}
BACKENDS = ("native", "kernel")
STREAM_PARTS = ("ks", "offsets", "unary", "rem", "escapes")
_PART_DTYPES = {"ks": torch.uint8, "offsets": torch.int32, "unary": torch.uint8, "rem": torch.uint8,
                "escapes": torch.int32}
#: scale format → the buffer dtype of its stored section (log8: uint8 grid bytes and codes, as stored)
_RAW_SCALE = {"float16": torch.int16, "bfloat16": torch.int16, "float32": torch.int32, "log8": torch.uint8}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
_CODE_DTYPES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32}


class SimulatedFormatWarning(UserWarning):
    """A low-precision matmul format is simulated with torch casts (quality is right, speed is not)."""


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# ---- matmul paths (registry) ---------------------------------------------------------------------------

#: Token count up to which the int8 path of a Rice-stored layer uses ``fused_decode_gemm``.
FUSED_MAX_TOKENS = 16
#: ``backend`` → the op set its forward composes.
OP_SETS: dict[str, OpSet] = {"native": REFERENCE, "kernel": DISPATCHED}
#: ``mma`` name → ``fn(module, x2d, ops=REFERENCE) -> out2d``; x2d: (M, K) activations, out2d: (M, N) in
#: x2d.dtype. ``module`` provides ``encoded()``, ``bias`` and optionally ``codes`` and ``name``.
MMA_PATHS: dict[str, Callable[..., torch.Tensor]] = {}
#: The paths that only exist as torch simulations (they always compose :data:`REFERENCE`).
SIMULATED: set[str] = set()


def register_mma(name: str, *, simulated: bool = False):
    def deco(fn):
        MMA_PATHS[name] = fn
        if simulated:
            SIMULATED.add(name)
        return fn
    return deco


def _label(m) -> str:
    return getattr(m, "name", "") or "HQLinear"


def _stored_codes(m) -> torch.Tensor | None:
    """The stored lattice integers (storage ``"int8"``), or None when the weight is Rice-coded."""
    return getattr(m, "codes", None)


def _bias(m, dtype: torch.dtype) -> torch.Tensor | None:
    return None if m.bias is None else m.bias.to(dtype)


def _rotated_weight(m, q: EncodedTensor, ops: OpSet, dtype: torch.dtype) -> torch.Tensor:
    """``p(Y) / α · scale`` (N, K_pad) in ``dtype`` (float32 math): from the stored codes, else ``ops.decode``."""
    codes = _stored_codes(m)
    if codes is not None:
        w = to_physical(q.lattice, codes.reshape(q.rows, q.n_pad)) * row_dequant_scale(q).unsqueeze(1)
        return w.to(dtype)
    return ops.decode(q, "rotated", dtype).reshape(q.rows, q.n_pad)


def _matmul_dtype(m, q: EncodedTensor, dt: torch.dtype) -> torch.dtype:
    """``dt``, or float32 when ``dt`` is float16 and the rotated weight may exceed float16's range.

    A rotated row is its unit-RMS coordinates (each at most ``√K_pad``) times its scale, so
    ``max(scale) · (√K_pad + 4/α)`` bounds it (the lattice error is below 4/α); weights near float16's
    maximum (e.g. all 60000) rotate to values above it and would turn the output into Inf. The bound is
    computed once per state of the scales (cached on the module by the buffer's version)."""
    if dt != torch.float16:
        return dt
    cached = getattr(m, "_hq_fp16_ok", None)
    if torch.compiler.is_compiling():  # no host reads while tracing: the eager decision, else the safe one
        return dt if cached is not None and cached[1] else torch.float32
    ver = (q.scales.data_ptr(), q.scales._version)
    if cached is None or cached[0] != ver:
        bound = float(scale_values(q.scales, q.scale_dtype).abs().max()) * (math.sqrt(q.n_pad) + 4.0 / q.alpha)
        cached = (ver, bound < torch.finfo(torch.float16).max / 2)
        m._hq_fp16_ok = cached
    return dt if cached[1] else torch.float32


@register_mma("bf16")
def _mma_float(m, x: torch.Tensor, ops: OpSet = REFERENCE) -> torch.Tensor:
    if codes_path_applies(m, x, ops):  # CPU: integers in the matmul, scale in the epilogue (nn/cpu_forward.py)
        return mma_codes_cpu(m, x, ops)
    q, dt = m.encoded(), x.dtype
    ct = _matmul_dtype(m, q, dt)
    xr = ops.rht(pad_last(x.to(ct), q.n_pad), q.seed, q.key, q.tile)  # (M, K_pad) in ct, float32 math
    return F.linear(xr, _rotated_weight(m, q, ops, ct), _bias(m, ct)).to(dt)


@register_mma("int8")
def _mma_int8(m, x: torch.Tensor, ops: OpSet = REFERENCE) -> torch.Tensor:
    q = m.encoded()
    codes = _stored_codes(m)
    if (codes.dtype != torch.int8) if codes is not None else not q.fits_int8:
        raise HQFormatError(f"{_label(m)}: lattice integers exceed int8; the int8 path cannot run (use mma='bf16')")
    xq, xs = ops.rht_quant_int8(x, q.seed, q.key, q.tile, q.n_pad, int8_operand_gain(q))  # int8 (M, K_pad), f32 (M,)
    if codes is None and x.shape[0] <= FUSED_MAX_TOKENS:
        return ops.fused_decode_gemm(xq, xs, q, m.bias, x.dtype)
    wq = codes if codes is not None else ops.decode(q, "codes")
    return ops.int8_gemm_dequant(xq, xs, wq.reshape(q.rows, q.n_pad), row_dequant_scale(q), m.bias, x.dtype)


def _fake_quant_path(fmt: str):
    quant, blk = FAKE_QUANT[fmt]

    def path(m, x: torch.Tensor, ops: OpSet = REFERENCE) -> torch.Tensor:
        warnings.warn(f"mma={fmt!r} is simulated with torch casts on this build (no native {fmt} matmul): "
                      f"outputs have the format's accuracy, not its speed", SimulatedFormatWarning, stacklevel=4)
        q = m.encoded()
        k = -(-q.n_pad // blk) * blk
        xr = ops.rht(pad_last(x.to(torch.float32), q.n_pad), q.seed, q.key, q.tile)  # float32 (M, K_pad)
        out = F.linear(quant(pad_last(xr, k)), quant(pad_last(_rotated_weight(m, q, ops, torch.float32), k)))
        if m.bias is not None:
            out = out + m.bias.to(torch.float32)
        return out.to(x.dtype)

    path.__name__ = f"_mma_{fmt}"
    return path


for _fmt in FAKE_QUANT:
    register_mma(_fmt, simulated=True)(_fake_quant_path(_fmt))


def auto_mma(device: torch.device, fits_int8: bool) -> str:
    """What ``mma="auto"`` means on ``device``."""
    if device.type == "cuda" and hasattr(torch, "_int_mm") and fits_int8:
        return "int8"
    return "bf16"


def _apply(module, x: torch.Tensor, mma: str, ops: OpSet) -> torch.Tensor:
    """Run path ``mma`` of ``module`` on x (..., K) → (..., N) in x.dtype, composing ``ops`` (the reference set
    for a simulated path)."""
    q = module.encoded()
    k = getattr(module, "in_features", q.shape[-1])
    if len(q.shape) != 2 or x.shape[-1] != k:
        raise ValueError(f"{_label(module)}: expected input (..., {k}) for the weight of shape "
                         f"({q.shape[0]}, {k}), got {tuple(x.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    ops = REFERENCE if mma in SIMULATED else ops
    if torch.compiler.is_compiling():  # one opaque custom op per host-reading operation: no graph break
        ops = compiled_opset(ops)
    tq = module.tail_encoded() if hasattr(module, "tail_encoded") else None
    if tq is None:
        out = MMA_PATHS[mma](module, x2, ops)
    else:  # split layer: the main part's path on the first K_main columns, plus the tail in float32
        k_main = q.shape[1]
        out = MMA_PATHS[mma](module, x2[:, :k_main].contiguous(), ops)
        out = (out.to(torch.float32) + x2[:, k_main:].to(torch.float32) @ _tail_weight(module, tq, ops)).to(x.dtype)
    return out.reshape(*x.shape[:-1], q.shape[0])


def _compiled_forward(m, x: torch.Tensor) -> torch.Tensor:
    """``HQLinear.forward`` while Dynamo traces: :func:`~.compile_ops.compiled_layer` of the layer's handle (its
    metadata stays out of the graph, so one graph serves every layer of a shape)."""
    return compiled_layer(x, m._hq_handle, m.out_features)


def _tail_weight(m, tq: EncodedTensor, ops: OpSet) -> torch.Tensor:
    """The decoded tail ``T`` (r, N) float32 of a split layer (``W[:, K_main:] ≈ Tᵀ``), decoded at every call:
    from the tail's streams (``ops.decode``), or from ``tail_codes`` for storage ``"int8"`` (one opaque custom op
    with the reference decode while ``torch.compile`` traces)."""
    codes = getattr(m, "tail_codes", None)
    return traced_weight_of(tq, codes) if torch.compiler.is_compiling() else weight_of(tq, codes, ops)


def hq_linear(x: torch.Tensor, module, ops: OpSet = DISPATCHED) -> torch.Tensor:
    """``y = x Wᵀ + b`` for a quantized linear layer with the ``"int8"`` or ``"bf16"`` path composed of ``ops``
    (default: the dispatched kernels). x (..., in_features) bf16/fp16/fp32 → (..., out_features) in x.dtype.

    ``module`` provides ``encoded()`` (the :class:`~hq_diffusion.codec.EncodedTensor` of the 2-D weight, on x's
    device; its ``streams`` may be empty when ``codes`` is given), ``bias`` (Tensor (N,) or None), optionally
    ``codes`` (int8 (N, K_pad) lattice integers, int16/int32 beyond ±127) and ``resolved_mma(device)`` or
    ``mma`` (``"auto"`` resolved by :func:`auto_mma`). Raises NotImplementedError for any other path (the
    simulated formats run through :class:`HQLinear`), ValueError for a mismatched input and
    :class:`~hq_diffusion.codec.HQFormatError` when the int8 path meets integers beyond int8.
    """
    if hasattr(module, "resolved_mma"):
        mma = module.resolved_mma(x.device)
    else:
        mma = getattr(module, "mma", None) or "int8"
        mma = auto_mma(x.device, module.encoded().fits_int8) if mma == "auto" else mma
    if mma not in ("int8", "bf16"):
        raise NotImplementedError(f"hq_linear implements mma 'int8' and 'bf16', not {mma!r}: use HQLinear's forward")
    return _apply(module, x, mma, ops)


# ---- the module -----------------------------------------------------------------------------------------

#: Buffer-name prefix of a split layer's tail (``tail_scales``, ``tail_s0_unary``, ..., ``tail_codes``).
TAIL_PREFIX = "tail_"


def _register_weight_buffers(mod: nn.Module, meta: dict, prefix: str, device) -> None:
    """Register the empty stored-weight buffers a (validated) layer metadata ``meta`` describes, names prefixed by
    ``prefix``: ``scales`` (the stored section: (rows,) raw bits, or log8 uint8 (8 + rows,)), then the streams
    (``s{i}_{part}``) or ``codes`` (rows, n_pad)."""
    rows, sdt = meta["out_features"], meta["scale_dtype"]
    mod.register_buffer(f"{prefix}scales", torch.empty(scale_count(sdt, rows), dtype=_RAW_SCALE[sdt], device=device))
    if meta["storage"] == "rice":
        for i, st in enumerate(meta["streams"]):
            for part in STREAM_PARTS:
                mod.register_buffer(f"{prefix}s{i}_{part}",
                                    torch.empty(st[part], dtype=_PART_DTYPES[part], device=device))
    elif meta["storage"] == "rans":
        for i, st in enumerate(meta["streams"]):
            for part, shape in _rans_shapes(meta["lattice"], i, st, meta["block"]).items():
                mod.register_buffer(f"{prefix}s{i}_{part}",
                                    torch.empty(shape, dtype=_RANS_DTYPES[part][0], device=device))
    else:
        mod.register_buffer(f"{prefix}codes", torch.empty(rows, meta["n_pad"], dtype=_CODE_DTYPES[meta["codes_dtype"]],
                                                          device=device))


def _copy_weight_buffers(mod: nn.Module, q: EncodedTensor, codes: torch.Tensor | None, prefix: str) -> None:
    """Fill the buffers of :func:`_register_weight_buffers` from the encoded ``q`` (or ``codes`` for int8)."""
    scales = getattr(mod, f"{prefix}scales")
    scales.copy_(q.scales.view(scales.dtype))
    if codes is not None:
        getattr(mod, f"{prefix}codes").copy_(codes)
    elif q.coder == "rans":
        for i, st in enumerate(q.streams):
            for part, t in st.tensors().items():
                getattr(mod, f"{prefix}s{i}_{part}").copy_(t.reshape(-1).view(_RANS_DTYPES[part][0]).reshape(t.shape))
    else:
        for i, st in enumerate(q.streams):
            for part, t in st.tensors().items():
                getattr(mod, f"{prefix}s{i}_{part}").copy_(t)


def _encoded_from(mod: nn.Module, meta: dict, prefix: str, cols: int) -> EncodedTensor:
    """The :class:`EncodedTensor` (``meta["out_features"]``, ``cols``) over the buffers of ``prefix`` (no copy;
    empty ``streams`` for storage ``"int8"``)."""
    storage, block = meta["storage"], meta["block"]
    if storage == "rice":
        streams = [RiceStream(st["n"], block, *(getattr(mod, f"{prefix}s{i}_{p}") for p in STREAM_PARTS))
                   for i, st in enumerate(meta["streams"])]
    elif storage == "rans":
        streams = [rans.RansStream(st["n"], block, st["prec"],
                                   *(_bits_view(getattr(mod, f"{prefix}s{i}_{p}"), _RANS_DTYPES[p][1])
                                     for p in RANS_PARTS))
                   for i, st in enumerate(meta["streams"])]
    else:
        streams = []
    sdt = meta["scale_dtype"]
    return EncodedTensor((meta["out_features"], cols), _DTYPES[meta["dtype"]], meta["lattice"], meta["tile"], block,
                         meta["seed"], meta["key"], meta["alpha"], sdt,
                         getattr(mod, f"{prefix}scales").view(SCALE_DTYPES[sdt]), streams, meta["fits_int8"],
                         coder="rans" if storage == "rans" else "rice")


class HQLinear(nn.Module):
    """``nn.Linear`` replacement holding a HyperQuant-encoded weight (see the module docstring).

    Build it with :meth:`from_linear` (quantize) or :meth:`from_meta` (empty, for loading). Attributes:
    ``in_features`` K, ``out_features`` N, ``n_pad`` K_pad, ``lattice``, ``tile`` (the RHT tile used),
    ``block``, ``seed``, ``key`` (uint32), ``alpha`` (float32 value), ``scale_dtype``, ``fits_int8``, ``storage``,
    ``mma`` (requested; see :meth:`resolved_mma`), ``backend`` (``"kernel"`` or ``"native"``: which forward
    runs), ``name`` (the module path it was quantized under, for messages), ``hq_meta`` (JSON-safe dict).
    """

    def __init__(self, meta: dict, *, device=None, backend: str = "kernel", name: str = ""):
        super().__init__()
        meta = copy.deepcopy(validate_meta(meta, name))
        self.hq_meta = meta
        self.name = name
        self.in_features = meta["in_features"]
        self.out_features = meta["out_features"]
        self.lattice = meta["lattice"]
        self.tile = meta["tile"]
        self.n_pad = meta["n_pad"]
        self.block = meta["block"]
        self.seed = meta["seed"]
        self.key = meta["key"]
        self.alpha = meta["alpha"]
        self.scale_dtype = meta["scale_dtype"]
        self.fits_int8 = meta["fits_int8"]
        self.storage = meta["storage"]
        self.weight_dtype = _DTYPES[meta["dtype"]]
        self.backend = backend
        #: columns of the main part (``in_features`` unless the layer is split; codec/split.py)
        self.cols_main = meta.get("cols_main", self.in_features)
        _register_weight_buffers(self, meta, "", device)
        if "tail" in meta:  # the transposed tail: (r, N) coded as its own tensor, buffers prefixed "tail_"
            _register_weight_buffers(self, meta["tail"], TAIL_PREFIX, device)
        if meta["bias"] is not None:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=_DTYPES[meta["bias"]], device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._hq_handle = LAYERS.register(self)  # names the layer to its compiled forward (compile_ops)

    def __setstate__(self, state: dict) -> None:  # a copy (deepcopy, pickle) gets a handle of its own
        super().__setstate__(state)
        self._hq_handle = LAYERS.register(self)

    @property
    def mma(self) -> str:
        """Requested matmul path (kept in ``hq_meta``); assign to switch this layer's path."""
        return self.hq_meta["mma"]

    @mma.setter
    def mma(self, value: str) -> None:
        if value not in MMA_CHOICES:
            raise ValueError(f"mma must be one of {list(MMA_CHOICES)}, got {value!r}")
        if value == "int8" and not self.fits_int8:
            raise ValueError(f"{self.name or 'HQLinear'}: lattice integers exceed int8; mma='int8' is impossible")
        self.hq_meta["mma"] = value

    @property
    def backend(self) -> str:
        """``"kernel"`` (compose :data:`hq_diffusion.kernels.DISPATCHED`) or ``"native"`` (compose
        :data:`~hq_diffusion.codec.ops_ref.REFERENCE`)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {value!r}")
        self._backend = value

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_meta(cls, meta: dict, *, device="meta", backend: str = "kernel", name: str = "") -> "HQLinear":
        """An empty module at its final packed shapes (buffers uninitialized, on ``device``)."""
        return cls(meta, device=device, backend=backend, name=name)

    @classmethod
    def from_linear(cls, linear: nn.Linear, codec_cfg: CodecConfig | None = None, key: int | str = 0, *,
                    mma: str = "auto", storage: str = "rice", backend: str = "kernel",
                    name: str | None = None) -> "HQLinear":
        """Quantize ``linear``.

        Args:
            linear: an ``nn.Linear`` with a finite float weight (N, K) (ValueError naming ``name`` otherwise).
            codec_cfg: codec settings (rate or SNR, lattice, tile, block, seed, scale dtype).
            key: the layer key mixed into the RHT signs — use the module name.
            mma: matmul path (see the module docstring). ``"int8"`` on a layer whose lattice integers exceed
                ±127 falls back to ``"bf16"`` with a warning (recorded in ``hq_meta["mma"]``).
            storage: ``"rice"`` — the entropy-coded streams of ``codec_cfg.coder`` (``"rice"``, ``"rans"``, or
                ``"auto"`` resolved by rate; the layer's :attr:`storage` then names the coder used) — or ``"int8"``.
            backend: ``"kernel"`` (the dispatched kernels: Triton on CUDA) or ``"native"`` (torch references).
            name: the module path, for messages (defaults to ``key`` when it is a str).
        """
        if mma not in MMA_CHOICES:
            raise ValueError(f"mma must be one of {list(MMA_CHOICES)}, got {mma!r}")
        if storage not in STORAGE_CHOICES:
            raise ValueError(f"storage must be one of {list(STORAGE_CHOICES)}, got {storage!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        name = name if name is not None else (key if isinstance(key, str) else "")
        w = linear.weight.detach()
        if w.device.type == "meta":
            raise ValueError(f"layer {name!r}: weight is on the meta device; load the weights before quantizing")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"layer {name!r}: weight has {int(torch.isnan(w).sum())} NaN and "
                             f"{int(torch.isinf(w).sum())} Inf values; refusing to quantize it")
        cfg = codec_cfg or CodecConfig()
        w2 = w.reshape(-1, w.shape[-1])
        k_main, r = split_columns(w2.shape[1], w2.shape[0], cfg.tile) if w.dim() == 2 else (w.shape[-1], 0)
        meter = _SnrMeter(w2[:, :k_main], cfg.lattice, cfg.seed, key, plan_tiles(k_main, cfg.tile)[0])
        tail_meter = (_SnrMeter(w2[:, k_main:].T, cfg.lattice, cfg.seed, tail_key(key),
                                plan_tiles(w2.shape[0], cfg.tile)[0]) if r else None)
        q, tq = encode_split(w, cfg, key=key, observe=meter, tail_observe=tail_meter)
        if mma == "int8" and not q.fits_int8:
            warnings.warn(f"layer {name!r}: lattice integers reach {q.meta.get('max_abs_code')} > 127 at "
                          f"{cfg.bps} bps, so the int8 matmul cannot use them; this layer uses mma='bf16'",
                          stacklevel=2)
            mma = "bf16"
        if storage == "rice":
            storage = q.coder  # the streams of the coder the codec used ("auto" resolved)
        codes = _int8_codes(q, storage, name)
        meta = _meta_from_encoded(q, storage=storage, mma=mma, bias=linear.bias, codes=codes)
        tail_codes = None
        if tq is not None:
            tail_codes = _int8_codes(tq, storage, name)
            meta = _split_meta(meta, _meta_from_encoded(tq, storage=storage, mma="bf16", bias=None, codes=tail_codes),
                               w2.shape[1])
        mod = cls(meta, device=w.device, backend=backend, name=name)
        _copy_weight_buffers(mod, q, codes, "")
        if tq is not None:
            _copy_weight_buffers(mod, tq, tail_codes, TAIL_PREFIX)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        # measured while the encoder held the kept attempt's integers (both parts of a split layer together)
        sums = [meter.sums(q.alpha)] + ([tail_meter.sums(tq.alpha)] if tq is not None else [])
        snr = _snr_of(sum(s[0] for s in sums), sum(s[1] for s in sums))
        mod.hq_meta["snr_db"] = snr if math.isfinite(snr) else None
        return mod

    # ---- views of the stored weight ---------------------------------------------------------------
    def scales_f32(self) -> torch.Tensor:
        """float32 (N,) row scales (converted from the stored section on every call; cheap)."""
        return scale_values(self.scales.view(SCALE_DTYPES[self.scale_dtype]), self.scale_dtype)

    def encoded(self) -> EncodedTensor:
        """The stored weight as an :class:`EncodedTensor` sharing this module's buffers (no copy).

        For storage ``"int8"`` there is no bitstream: the result carries the metadata and the scales with an
        empty ``streams`` list (``decode`` of it raises :class:`HQFormatError`); the integers are ``self.codes``.
        The shape is (N, ``cols_main``): for a split layer the main part only (:meth:`tail_encoded`).
        """
        own = {"lattice": self.lattice, "tile": self.tile, "block": self.block, "seed": self.seed, "key": self.key,
               "alpha": self.alpha, "scale_dtype": self.scale_dtype, "fits_int8": self.fits_int8}
        return _encoded_from(self, {**self.hq_meta, **own}, "", self.cols_main)  # the attributes as they are now

    def tail_encoded(self) -> EncodedTensor | None:
        """The transposed tail of a split layer as an :class:`EncodedTensor` (r, N) over the ``tail_*`` buffers
        (``W[:, K_main:] ≈ decode(tail)ᵀ``), or None for a layer that is not split."""
        tail = self.hq_meta.get("tail")
        return None if tail is None else _encoded_from(self, tail, TAIL_PREFIX, self.out_features)

    def lattice_codes(self) -> torch.Tensor:
        """Lattice integers ``Y`` (N, K_pad): int8 when they fit, else int16/int32 (the ``codes`` buffer for
        storage ``"int8"``, decoded from the streams for ``"rice"``). For a split layer: the main part's, (N,
        K_pad) with K_pad the padded ``cols_main`` (the tail's are ``decode(tail_encoded(), out="codes")``)."""
        if self.storage == "int8":
            return self.codes
        return decode(self.encoded(), out="codes")

    def rotated_weight(self) -> torch.Tensor:
        """float32 (N, K_pad): ``p(Y) / α · scale``, the weight in the rotated basis (a split layer: its main part,
        the first ``cols_main`` columns rotated; the tail is rotated along N, see :meth:`tail_encoded`)."""
        return _rotated_weight(self, self.encoded(), REFERENCE, torch.float32)

    def dequantize(self) -> torch.Tensor:
        """The reconstructed weight (N, K) in the original basis and dtype (for inspection and tests); a split
        layer's main part and transposed tail side by side."""
        w = inverse_rht(self.rotated_weight(), self.seed, self.key, self.tile)[:, : self.cols_main]
        tq = self.tail_encoded()
        if tq is not None:
            w = torch.cat([w, weight_of(tq, getattr(self, "tail_codes", None)).T], dim=1)
        return to_weight_dtype(w, self.weight_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this module owns (buffers and bias)."""
        return sum(t.numel() * t.element_size() for t in (*self.buffers(), *self.parameters()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """``nn.Module`` loading, then a log8 scale grid is checked as a blob's is (HQFormatError naming the layer)."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        name = self.name or prefix.rstrip('.')
        for pre, meta in (("", self.hq_meta), (TAIL_PREFIX, self.hq_meta.get("tail"))):
            scales = getattr(self, f"{pre}scales") if meta is not None else None
            if (meta is not None and meta["scale_dtype"] == "log8" and scales.device.type != "meta"
                    and scales.numel() >= LOG8_GRID_BYTES):
                check_log8_grid(*log8_grid(scales), f"layer {name!r}: log8 {pre}row scales")

    # ---- forward ------------------------------------------------------------------------------------
    def resolved_mma(self, device: torch.device) -> str:
        """The matmul path a forward on ``device`` runs (``"auto"`` resolved)."""
        return auto_mma(device, self.fits_int8) if self.mma == "auto" else self.mma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., K) bf16/fp16/fp32 → (..., N) in x.dtype: the resolved path composed of this layer's
        backend's op set (:data:`OP_SETS`). While ``torch.compile`` traces: one opaque op that runs this forward
        when the graph runs (:func:`_compiled_forward`)."""
        if torch.compiler.is_compiling():
            return _compiled_forward(self, x)
        return _apply(self, x, self.resolved_mma(x.device), OP_SETS[self.backend])

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the torch references (``backend="native"``)."""
        return _apply(self, x, self.resolved_mma(x.device), REFERENCE)

    def forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the dispatched kernels (``backend="kernel"``; the references where
        ``kernels/dispatch.py`` does not choose Triton, and for the simulated paths)."""
        return _apply(self, x, self.resolved_mma(x.device), DISPATCHED)

    def extra_repr(self) -> str:
        m = self.hq_meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bps={m['bps']:.3f}, lattice={self.lattice}, mma={self.mma}, storage={self.storage}, "
                f"codes=({self.out_features}, {self.n_pad}), tile={self.tile}" + (
                    f", tail=({self.in_features - self.cols_main}, {self.out_features})" if "tail" in m else ""))


# ---- metadata -------------------------------------------------------------------------------------------

SNR_BLOCK_ELEMS = 1 << 19  # coordinates per row block of :func:`_snr_db` (2 MiB of float32, cache-sized)
SNR_DECIMALS = 6  # hq_meta["snr_db"] is rounded: the same value for any row blocking or worker split


class _SnrMeter:
    """The SNR of :func:`_snr_db`, measured during the encode from the lattice integers the encoder observes
    (``encode(..., observe=meter)``), so that the streams are not decoded again: for each coding attempt
    (keyed by its α) float64 sums of the squared signal and of the squared error of its reconstruction
    (``p(Y) · scale / α`` in float32 -- the decoder's arithmetic --, inverse-rotated, cropped to K), over
    sub-blocks of :data:`SNR_BLOCK_ELEMS` coordinates so that the work space stays one sub-block.

    ``w``: the weight being encoded, (N, K) any float dtype; ``lattice``, ``seed``, ``key``, ``tile``: the
    codec's (``tile`` as used, from :func:`~hq_diffusion.codec.rht.plan_tiles`)."""

    def __init__(self, w: torch.Tensor, lattice: str, seed: int, key, tile: int):
        self._ref = w.reshape(-1, w.shape[-1])
        self._lattice, self._seed, self._key, self._tile = lattice, seed, key, tile
        self._sums: dict[float, list[float]] = {}

    def __call__(self, alpha: float, rows: slice, y: torch.Tensor, scales: torch.Tensor) -> None:
        acc = self._sums.setdefault(alpha, [0.0, 0.0])
        if rows.start == 0:  # a new attempt at an α seen before starts over
            acc[0] = acc[1] = 0.0
        n, n_pad = self._ref.shape[1], y.shape[1]
        step = max(1, SNR_BLOCK_ELEMS // n_pad)
        for s in range(0, y.shape[0], step):
            r0, r1 = rows.start + s, min(rows.start + s + step, rows.stop)
            scale = scales[r0:r1].to(torch.float32) / alpha  # row_dequant_scale's arithmetic, these rows
            rot = to_physical(self._lattice, y[s:s + r1 - r0]).mul_(scale.unsqueeze(1))
            rec = inverse_rht(rot, self._seed, self._key, self._tile)[:, :n].double()
            ref = self._ref[r0:r1].to(torch.float32).double()
            acc[0] += float(ref.square().sum())
            acc[1] += float(rec.sub_(ref).square_().sum())
            del rot, rec, ref

    def sums(self, alpha: float) -> tuple[float, float]:
        """float64 sums (squared signal, squared error) of the attempt at ``alpha`` (the kept one)."""
        sig, err = self._sums[alpha]
        return sig, err

    def snr_db(self, alpha: float) -> float:
        """SNR in dB of the attempt at ``alpha`` (the kept one), rounded to :data:`SNR_DECIMALS` decimals."""
        return _snr_of(*self.sums(alpha))


def _snr_of(sig: float, err: float) -> float:
    if err == 0.0:
        return math.inf
    return round(10.0 * math.log10(sig / err), SNR_DECIMALS) if sig > 0 else -math.inf


def _snr_db(w: torch.Tensor, m: HQLinear) -> float:
    """SNR in dB of the stored weight of ``m`` against ``w`` (any float dtype, ``numel = N·K``), in the
    original basis, rounded to :data:`SNR_DECIMALS` decimals.

    Row-blocked so that it adds one block's work space to the decoded symbols (int32, 4 bytes per coordinate;
    storage ``"int8"`` reads its stored integers): each block of rows is unstripped to its lattice integers,
    made float32
    ``p(Y) / α · scale`` (the decoder's arithmetic), inverse-rotated and compared with the same rows of ``w``;
    float64 accumulators of the squared error and the squared signal are divided once at the end. A split
    layer adds its tail's (decoded whole: r · N coordinates) to the same sums."""
    n, rows = m.cols_main, m.out_features
    ref_rows = w.reshape(-1, m.in_features)[:, :n]
    scale = row_dequant_scale(m.encoded())
    step = max(1, SNR_BLOCK_ELEMS // m.n_pad)
    if m.storage == "int8":
        codes = m.codes.reshape(rows, m.n_pad)
        blocks = ((slice(s, s + step), codes[s:s + step]) for s in range(0, rows, step))
    else:  # the streams decoded once, unstripped block by block (no full-size integer tensor)
        blocks = code_blocks(m.encoded(), SNR_BLOCK_ELEMS)
    sig = err = 0.0
    for sl, y in blocks:
        rot = to_physical(m.lattice, y).mul_(scale[sl].unsqueeze(1))
        rec = inverse_rht(rot, m.seed, m.key, m.tile)[:, :n].double()
        ref = ref_rows[sl].to(torch.float32).double()
        sig += float(ref.square().sum())
        err += float(rec.sub_(ref).square_().sum())
        del rot, rec, ref, y
    tq = m.tail_encoded()
    if tq is not None:
        ref = w.reshape(-1, m.in_features)[:, n:].T.double()
        rec = weight_of(tq, getattr(m, "tail_codes", None)).double()
        sig += float(ref.square().sum())
        err += float(rec.sub_(ref).square_().sum())
    return _snr_of(sig, err)


def _meta_from_encoded(q: EncodedTensor, *, storage: str, mma: str, bias: torch.Tensor | None,
                       codes: torch.Tensor | None) -> dict:
    """Every ``hq_meta`` field but ``snr_db`` (which :meth:`HQLinear.from_linear` measures on the built module)."""
    n_out, n_in = q.shape
    meta = {
        "version": META_VERSIONS[storage],
        "in_features": int(n_in), "out_features": int(n_out), "dtype": dtype_name(q.dtype),
        "lattice": q.lattice, "tile": int(q.tile), "n_pad": int(q.n_pad), "block": int(q.block),
        "seed": int(q.seed), "key": int(q.key), "alpha": float(q.alpha), "scale_dtype": q.scale_dtype,
        "fits_int8": bool(q.fits_int8), "max_abs_code": int(q.meta.get("max_abs_code", -1)),
        "storage": storage, "mma": mma, "bias": None if bias is None else dtype_name(bias.dtype),
        "snr_db": None,
    }
    if storage == "rice":
        meta["streams"] = [{"n": int(s.n), **{p: int(t.numel()) for p, t in s.tensors().items()}} for s in q.streams]
        meta["bps"] = float(q.bps)  # codec rate: every stored bit incl. header and checksum
    elif storage == "rans":
        meta["streams"] = [{"n": int(s.n), "prec": int(s.prec), "t": int(s.freqs.shape[1]),
                            "words": int(s.words.numel()), "escapes": int(s.escapes.numel())} for s in q.streams]
        meta["bps"] = float(q.bps)
    else:
        meta["codes_dtype"] = dtype_name(codes.dtype)
        stored = codes.numel() * codes.element_size() + q.scales.numel() * q.scales.element_size()
        meta["bps"] = 8.0 * stored / q.numel
    return meta


def _int8_codes(q: EncodedTensor, storage: str, name: str) -> torch.Tensor | None:
    """The lattice integers of ``q`` for storage ``"int8"`` (a warning when they need more than int8), else None."""
    if storage != "int8":
        return None
    codes = decode(q, out="codes")
    if codes.dtype != torch.int8:
        warnings.warn(f"layer {name!r}: lattice integers exceed ±127; storage='int8' keeps them as "
                      f"{dtype_name(codes.dtype)}", stacklevel=3)
    return codes


def _split_meta(meta: dict, tail: dict, k: int) -> dict:
    """The ``hq_meta`` of a split layer of ``k`` columns from its main part's (``in_features`` = K_main) and its
    tail's: ``in_features`` K, ``cols_main`` K_main, the ``"tail"`` sub-dict (its ``snr_db`` left None) and
    ``bps`` the combined rate (every stored bit of both parts over N · K)."""
    k_main, n = meta["in_features"], meta["out_features"]
    bits = meta["bps"] * n * k_main + tail["bps"] * tail["in_features"] * tail["out_features"]
    return {**meta, "in_features": int(k), "cols_main": int(k_main), "tail": tail, "bps": float(bits / (n * k))}


_REQUIRED = {"version": int, "in_features": int, "out_features": int, "dtype": str, "lattice": str, "tile": int,
             "n_pad": int, "block": int, "seed": int, "key": int, "alpha": float, "scale_dtype": str,
             "fits_int8": bool, "storage": str, "mma": str, "bps": float}


def validate_meta(meta: dict, name: str = "") -> dict:
    """Check a layer's ``hq_meta`` (types, ranges, internal consistency); raise :class:`HQFormatError`.

    Returns the dict unchanged. Loading never trusts the metadata to size a buffer without this check."""
    where = f"layer {name!r}" if name else "HQLinear metadata"

    def bad(msg):
        raise HQFormatError(f"{where}: {msg}")

    if not isinstance(meta, dict):
        bad(f"expected a dict, got {type(meta).__name__}")
    for k, typ in _REQUIRED.items():
        if k not in meta:
            bad(f"missing field {k!r}")
        v = meta[k]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) if typ is float else isinstance(v, typ)
        if typ is int and isinstance(v, bool):
            ok = False
        if not ok:
            bad(f"field {k!r} must be {typ.__name__}, got {v!r}")
    if meta["version"] not in set(META_VERSIONS.values()):
        bad(f"metadata version {meta['version']} is not supported (this build reads "
            f"{sorted(set(META_VERSIONS.values()))})")
    if meta["lattice"] not in LATTICES or meta["storage"] not in LAYER_STORAGES or meta["mma"] not in MMA_CHOICES:
        bad(f"unknown lattice/storage/mma {meta['lattice']!r}/{meta['storage']!r}/{meta['mma']!r}")
    if meta["version"] != META_VERSIONS[meta["storage"]]:
        bad(f"storage {meta['storage']!r} needs metadata version {META_VERSIONS[meta['storage']]}, "
            f"got {meta['version']}")
    if meta["mma"] == "int8" and not meta["fits_int8"]:
        bad("mma 'int8' needs lattice integers that fit int8, but fits_int8 is false")
    if meta["dtype"] not in _DTYPES or meta["scale_dtype"] not in _RAW_SCALE:
        bad(f"unknown dtype {meta['dtype']!r} or scale dtype {meta['scale_dtype']!r}")
    if meta.get("bias") is not None and meta["bias"] not in _DTYPES:
        bad(f"unknown bias dtype {meta['bias']!r}")
    n_in, n_out = meta["in_features"], meta["out_features"]
    if not (0 < n_in < 2**31 and 0 < n_out < 2**31):
        bad(f"bad shape ({n_out}, {n_in})")
    if "cols_main" in meta or "tail" in meta:
        n_in = _validate_split(meta, name, bad)
    # the stored tile is the one actually used, so planning with it as the maximum reproduces it (with the
    # current plan, or the legacy one of checkpoints written before it)
    if meta["tile"] not in ALLOWED_TILES or (meta["tile"], meta["n_pad"]) not in (
            plan_tiles(n_in, meta["tile"]), legacy_plan_tiles(n_in, meta["tile"])):
        bad(f"tile {meta['tile']} / padded length {meta['n_pad']} inconsistent with in_features {n_in}")
    if not (math.isfinite(meta["alpha"]) and meta["alpha"] > 0):
        bad(f"invalid alpha {meta['alpha']!r}")
    blk = meta["block"]
    if blk < 8 or blk > 2**20 or blk & (blk - 1):
        bad(f"invalid block {blk}")
    if meta["storage"] == "rice":
        streams = meta.get("streams")
        expect = stream_lengths(meta["lattice"], n_out * meta["n_pad"])
        if not isinstance(streams, list) or len(streams) != NUM_STREAMS[meta["lattice"]]:
            bad(f"expected {NUM_STREAMS[meta['lattice']]} stream descriptions, got {streams!r}")
        for i, st in enumerate(streams):
            if not isinstance(st, dict) or set(st) != {"n", *STREAM_PARTS}:
                bad(f"stream {i} description malformed: {st!r}")
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 2**40 for v in st.values()):
                bad(f"stream {i} sizes out of range: {st!r}")
            if st["n"] != expect[i]:
                bad(f"stream {i} has {st['n']} symbols, expected {expect[i]}")
            nb = _num_blocks(st["n"], blk)
            if st["ks"] != nb or st["offsets"] != nb:
                bad(f"stream {i} needs {nb} block headers, metadata says {st['ks']}/{st['offsets']}")
    elif meta["storage"] == "rans":
        _validate_rans_streams(meta, bad)
    else:
        if meta.get("codes_dtype") not in _CODE_DTYPES:
            bad(f"invalid codes_dtype {meta.get('codes_dtype')!r}")
    return meta


def _validate_split(meta: dict, name: str, bad) -> int:
    """The split fields of a layer's metadata (``bad(msg)`` raises): ``cols_main`` a multiple of 8 in (0, K)
    and a ``"tail"`` layer metadata (validated as one) of shape (K − cols_main, N) with the layer's storage,
    lattice and dtype. Returns ``cols_main`` (the columns the main part's tile plan is checked against)."""
    k_main, tail = meta.get("cols_main"), meta.get("tail")
    n_in, n_out = meta["in_features"], meta["out_features"]
    if isinstance(k_main, bool) or not isinstance(k_main, int) or not (0 < k_main < n_in) or k_main % 8:
        bad(f"cols_main {k_main!r} must be a multiple of 8 in (0, in_features={n_in})")
    if not isinstance(tail, dict):
        bad(f"a split layer (cols_main {k_main}) needs a 'tail' metadata dict, got {tail!r}")
    if "tail" in tail or "cols_main" in tail:
        bad("a tail cannot be split again")
    try:
        validate_meta(tail, f"{name} (tail)" if name else "tail")
    except HQFormatError as e:
        bad(f"bad tail metadata: {e}")
    if (tail["out_features"], tail["in_features"]) != (n_in - k_main, n_out):
        bad(f"tail of shape ({tail['out_features']}, {tail['in_features']}) does not fit ({n_in - k_main}, {n_out})")
    for f in ("storage", "lattice", "dtype", "seed", "block"):
        if tail[f] != meta[f]:
            bad(f"tail {f} {tail[f]!r} differs from the layer's {meta[f]!r}")
    if tail.get("bias") is not None:
        bad("a tail has no bias")
    return k_main


def _bits_view(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` reinterpreted as the same-width ``dtype`` (no copy; an empty tensor becomes an empty one)."""
    if t.dtype == dtype:
        return t
    if t.numel() == 0:
        return torch.empty(t.shape, dtype=dtype, device=t.device)
    return t.view(dtype)


def _rans_shapes(lattice: str, i: int, st: dict, block: int) -> dict[str, tuple[int, ...]]:
    """Buffer shapes of rANS stream ``i`` of a layer from its metadata ``st`` (n, prec, t, words, escapes)."""
    nb = rans.num_blocks(st["n"], block)
    return {"freqs": (rans_contexts(lattice, i), st["t"]), "states": (nb, rans.LANES), "offsets": (nb,),
            "words": (st["words"],), "escapes": (st["escapes"],)}


def _validate_rans_streams(meta: dict, bad) -> None:
    """The rANS stream descriptions of a layer's metadata (``bad(msg)`` raises). Bounds every buffer by the
    stream's symbol count (a stored word or escape per symbol at most, one word per 256 symbols at least, as
    :meth:`~hq_diffusion.codec.format.EncodedTensor.from_bytes` checks for a blob), so a crafted checkpoint
    cannot size a buffer beyond what its weight shape allows."""
    streams = meta.get("streams")
    expect = stream_lengths(meta["lattice"], meta["out_features"] * meta["n_pad"])
    if not isinstance(streams, list) or len(streams) != NUM_STREAMS[meta["lattice"]]:
        bad(f"expected {NUM_STREAMS[meta['lattice']]} rANS stream descriptions, got {streams!r}")
    for i, st in enumerate(streams):
        if not isinstance(st, dict) or set(st) != {"n", "prec", "t", "words", "escapes"}:
            bad(f"rANS stream {i} description malformed: {st!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in st.values()):
            bad(f"rANS stream {i} fields must be non-negative ints: {st!r}")
        if st["n"] != expect[i]:
            bad(f"rANS stream {i} has {st['n']} symbols, expected {expect[i]}")
        if not rans.PREC_RANGE[0] <= st["prec"] <= rans.PREC_RANGE[1] or not 2 <= st["t"] <= rans.MAX_TABLE:
            bad(f"rANS stream {i}: precision {st['prec']} or table size {st['t']} out of range")
        nb = rans.num_blocks(st["n"], meta["block"])
        if st["words"] > st["n"] or st["escapes"] > st["n"] or st["n"] > _SYMBOLS_PER_WORD * (st["words"] + 2 * rans.LANES * nb + 1):
            bad(f"rANS stream {i}: {st['words']} words / {st['escapes']} escapes inconsistent with {st['n']} symbols")
