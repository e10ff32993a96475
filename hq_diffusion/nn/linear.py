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
- storage ``"int8"``: ``codes`` int8 (N, K_pad), the lattice integers (int16 when some exceed ±127).
- ``bias``: an ``nn.Parameter`` (N,) in the original dtype, when the linear had one.

Scalar metadata (shapes, α, tile, seed, key, lattice, block, stream lengths, mma, rate, SNR) are Python
attributes and the JSON-safe :attr:`HQLinear.hq_meta` dict, from which :meth:`HQLinear.from_meta` rebuilds an
empty module at its final packed shapes (for ``load_state_dict(..., assign=True)`` on the ``meta`` device).

Matmul paths (``mma``; DESIGN §2), dispatched through :data:`MMA_PATHS`:

- ``"bf16"``: ``F.linear(rht(x), decode(rotated))`` in the activation dtype.
- ``"int8"``: :func:`~hq_diffusion.codec.ops_ref.rht_quant_int8_ref` then
  :func:`~hq_diffusion.codec.ops_ref.int8_gemm_dequant_ref` against ``Y`` with ``ws = scale / α`` (float32);
  on CUDA the int32 accumulation runs in ``torch._int_mm`` (exact, hence bit-identical to the reference).
- ``"fp8"``, ``"nvfp4"``, ``"mxfp4"``: both operands rounded to the format (:mod:`hq_diffusion.nn.lowp`),
  simulated with torch casts (a :class:`SimulatedFormatWarning` says so at each forward; Python's default
  warning filter shows it once per format and calling line).
- ``"auto"``: ``"int8"`` on CUDA when ``torch._int_mm`` exists and ``Y`` fits int8, else ``"bf16"``.

Kernel seam: :meth:`HQLinear.forward_kernel` calls ``hq_diffusion.kernels.hq_linear(x, module)`` when that
package exposes it, ``x`` is on CUDA and the layer's resolved path is ``"int8"`` or ``"bf16"`` (storage
``"int8"``: ``"int8"`` only), else :meth:`HQLinear.forward_native`. Expected signature::

    hq_linear(x: Tensor (..., K) bf16/fp16/fp32 on CUDA, module: HQLinear) -> Tensor (..., N) in x.dtype

computing what ``module.forward_native(x)`` computes for ``module.resolved_mma(x.device)``, from
``module.encoded()`` (the Rice streams wrapped without copying; for storage ``"int8"`` the metadata and scales
only), ``module.codes`` (storage ``"int8"`` only: int8 (N, K_pad)), ``module.bias`` and ``module.mma``.
"""
from __future__ import annotations

import copy
import importlib
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..codec import EncodedTensor, HQFormatError, decode, encode
from ..codec.config import SCALE_DTYPES, CodecConfig
from ..codec.lattice import LATTICES, axis_gain, to_physical
from ..codec.ops_ref import int8_gemm_dequant_ref, rht_quant_int8_ref
from ..codec.rht import ALLOWED_TILES, inverse_rht, pad_last, plan_tiles, rht
from ..codec.rice import RiceStream, _num_blocks
from ..codec.strip import NUM_STREAMS, stream_lengths
from .lowp import FAKE_QUANT

META_VERSION = 1
MMA_CHOICES = ("auto", "bf16", "int8", "fp8", "nvfp4", "mxfp4")
STORAGE_CHOICES = ("rice", "int8")
BACKENDS = ("native", "kernel")
STREAM_PARTS = ("ks", "offsets", "unary", "rem", "escapes")
_PART_DTYPES = {"ks": torch.uint8, "offsets": torch.int32, "unary": torch.uint8, "rem": torch.uint8,
                "escapes": torch.int32}
_RAW_SCALE = {"float16": torch.int16, "bfloat16": torch.int16, "float32": torch.int32}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
_CODE_DTYPES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32}


class SimulatedFormatWarning(UserWarning):
    """A low-precision matmul format is simulated with torch casts (quality is right, speed is not)."""


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# ---- matmul paths (registry) ---------------------------------------------------------------------------

#: ``mma`` name → ``fn(module, x2d) -> out2d``; x2d: (M, K) activations, out2d: (M, N) in x2d.dtype.
MMA_PATHS: dict[str, Callable[["HQLinear", torch.Tensor], torch.Tensor]] = {}


def register_mma(name: str):
    def deco(fn):
        MMA_PATHS[name] = fn
        return fn
    return deco


def _rotate(m: "HQLinear", x: torch.Tensor) -> torch.Tensor:
    """x: (M, K) float → float32 (M, K_pad), the activations in the weight's rotated basis."""
    return rht(pad_last(x.to(torch.float32), m.n_pad), m.seed, m.key, m.tile)


def _bias(m: "HQLinear", dtype: torch.dtype) -> torch.Tensor | None:
    return None if m.bias is None else m.bias.to(dtype)


@register_mma("bf16")
def _mma_float(m: "HQLinear", x: torch.Tensor) -> torch.Tensor:
    dt = x.dtype
    return F.linear(_rotate(m, x).to(dt), m.rotated_weight().to(dt), _bias(m, dt))


@register_mma("int8")
def _mma_int8(m: "HQLinear", x: torch.Tensor) -> torch.Tensor:
    gain = axis_gain(m.lattice, m.n_pad, x.device)
    xq, xs = rht_quant_int8_ref(x, m.seed, m.key, m.tile, m.n_pad, gain=gain)  # int8 (M, K_pad), f32 (M,)
    wq = m.lattice_codes()
    if wq.dtype != torch.int8:
        raise HQFormatError(f"{m.name or 'HQLinear'}: lattice integers exceed int8; the int8 path cannot run")
    ws = m.scales_f32() / m.alpha  # float32 (N,): the arithmetic of codec.decode (scale / α)
    if x.is_cuda and hasattr(torch, "_int_mm") and xq.shape[0] > 16 and m.n_pad % 8 == 0 and m.out_features % 8 == 0:
        acc = torch._int_mm(xq, wq.t())  # int32 (M, N), exact
        out = acc.to(torch.float32) * xs.unsqueeze(1) * ws.unsqueeze(0)
        if m.bias is not None:
            out = out + m.bias.to(torch.float32)
        return out.to(x.dtype)
    return int8_gemm_dequant_ref(xq, xs, wq, ws, m.bias, out_dtype=x.dtype)


def _fake_quant_path(fmt: str):
    quant, blk = FAKE_QUANT[fmt]

    def path(m: "HQLinear", x: torch.Tensor) -> torch.Tensor:
        warnings.warn(f"mma={fmt!r} is simulated with torch casts on this build (no native {fmt} matmul): "
                      f"outputs have the format's accuracy, not its speed", SimulatedFormatWarning, stacklevel=4)
        k = -(-m.n_pad // blk) * blk
        xr = quant(pad_last(_rotate(m, x), k))
        wr = quant(pad_last(m.rotated_weight(), k))
        out = F.linear(xr, wr)
        if m.bias is not None:
            out = out + m.bias.to(torch.float32)
        return out.to(x.dtype)

    path.__name__ = f"_mma_{fmt}"
    return path


for _fmt in FAKE_QUANT:
    register_mma(_fmt)(_fake_quant_path(_fmt))


def auto_mma(device: torch.device, fits_int8: bool) -> str:
    """What ``mma="auto"`` means on ``device``."""
    if device.type == "cuda" and hasattr(torch, "_int_mm") and fits_int8:
        return "int8"
    return "bf16"


def _kernel_op():
    """``hq_diffusion.kernels.hq_linear`` when the kernels package provides it, else None."""
    try:
        mod = importlib.import_module("hq_diffusion.kernels")
    except ModuleNotFoundError as e:
        if e.name in ("hq_diffusion.kernels", "triton"):
            return None
        raise
    return getattr(mod, "hq_linear", None)


# ---- the module -----------------------------------------------------------------------------------------

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
        n, kp = self.out_features, self.n_pad
        self.register_buffer("scales", torch.empty(n, dtype=_RAW_SCALE[self.scale_dtype], device=device))
        if self.storage == "rice":
            for i, st in enumerate(meta["streams"]):
                for part in STREAM_PARTS:
                    self.register_buffer(f"s{i}_{part}", torch.empty(st[part], dtype=_PART_DTYPES[part], device=device))
        else:
            self.register_buffer("codes", torch.empty(n, kp, dtype=_CODE_DTYPES[meta["codes_dtype"]], device=device))
        if meta["bias"] is not None:
            self.bias = nn.Parameter(torch.empty(n, dtype=_DTYPES[meta["bias"]], device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

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
        """``"kernel"`` (``hq_diffusion.kernels`` on CUDA when available, else native) or ``"native"``."""
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
            storage: ``"rice"`` or ``"int8"``.
            backend: ``"kernel"`` (use ``hq_diffusion.kernels`` on CUDA when present) or ``"native"``.
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
        bad = ~torch.isfinite(w)
        if bool(bad.any()):
            raise ValueError(f"layer {name!r}: weight has {int(torch.isnan(w).sum())} NaN and "
                             f"{int(torch.isinf(w).sum())} Inf values; refusing to quantize it")
        cfg = codec_cfg or CodecConfig()
        q = encode(w, cfg, key=key)
        if mma == "int8" and not q.fits_int8:
            warnings.warn(f"layer {name!r}: lattice integers reach {q.meta.get('max_abs_code')} > 127 at "
                          f"{cfg.bps} bps, so the int8 matmul cannot use them; this layer uses mma='bf16'",
                          stacklevel=2)
            mma = "bf16"
        codes = None
        if storage == "int8":
            codes = decode(q, out="codes")
            if codes.dtype != torch.int8:
                warnings.warn(f"layer {name!r}: lattice integers exceed ±127; storage='int8' keeps them as "
                              f"{dtype_name(codes.dtype)}", stacklevel=2)
        meta = _meta_from_encoded(q, storage=storage, mma=mma, bias=linear.bias, codes=codes)
        mod = cls(meta, device=w.device, backend=backend, name=name)
        mod.scales.copy_(q.scales.view(mod.scales.dtype))
        if storage == "rice":
            for i, st in enumerate(q.streams):
                for part, t in st.tensors().items():
                    getattr(mod, f"s{i}_{part}").copy_(t)
        else:
            mod.codes.copy_(codes)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        snr = _snr_db(w, mod)  # from the stored weight: storage "int8" decodes the streams only once
        mod.hq_meta["snr_db"] = snr if math.isfinite(snr) else None
        return mod

    # ---- views of the stored weight ---------------------------------------------------------------
    def scales_f32(self) -> torch.Tensor:
        """float32 (N,) row scales."""
        return self.scales.view(SCALE_DTYPES[self.scale_dtype]).to(torch.float32)

    def encoded(self) -> EncodedTensor:
        """The stored weight as an :class:`EncodedTensor` sharing this module's buffers (no copy).

        For storage ``"int8"`` there is no bitstream: the result carries the metadata and the scales with an
        empty ``streams`` list (``decode`` of it raises :class:`HQFormatError`); the integers are ``self.codes``.
        """
        if self.storage == "rice":
            streams = [RiceStream(st["n"], self.block, *(getattr(self, f"s{i}_{p}") for p in STREAM_PARTS))
                       for i, st in enumerate(self.hq_meta["streams"])]
        else:
            streams = []
        return EncodedTensor((self.out_features, self.in_features), self.weight_dtype, self.lattice, self.tile,
                             self.block, self.seed, self.key, self.alpha, self.scale_dtype,
                             self.scales.view(SCALE_DTYPES[self.scale_dtype]), streams, self.fits_int8)

    def lattice_codes(self) -> torch.Tensor:
        """Lattice integers ``Y`` (N, K_pad): int8 when they fit, else int16/int32 (the ``codes`` buffer for
        storage ``"int8"``, decoded from the streams for ``"rice"``)."""
        if self.storage == "int8":
            return self.codes
        return decode(self.encoded(), out="codes")

    def rotated_weight(self) -> torch.Tensor:
        """float32 (N, K_pad): ``p(Y) / α · scale``, the weight in the rotated basis."""
        if self.storage == "rice":
            return decode(self.encoded(), out="rotated")
        return to_physical(self.lattice, self.codes) * (self.scales_f32().unsqueeze(1) / self.alpha)

    def dequantize(self) -> torch.Tensor:
        """The reconstructed weight (N, K) in the original basis and dtype (for inspection and tests)."""
        w = inverse_rht(self.rotated_weight(), self.seed, self.key, self.tile)[:, : self.in_features]
        return w.to(self.weight_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this module owns (buffers and bias)."""
        return sum(t.numel() * t.element_size() for t in (*self.buffers(), *self.parameters()))

    # ---- forward ------------------------------------------------------------------------------------
    def resolved_mma(self, device: torch.device) -> str:
        """The matmul path a forward on ``device`` runs (``"auto"`` resolved)."""
        return auto_mma(device, self.fits_int8) if self.mma == "auto" else self.mma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_kernel(x) if self.backend == "kernel" else self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., K) bf16/fp16/fp32 → (..., N) in x.dtype, with the torch implementation of the mma path."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'HQLinear'}: expected input (..., {self.in_features}), "
                             f"got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        out = MMA_PATHS[self.resolved_mma(x.device)](self, x2)
        return out.reshape(*lead, self.out_features)

    def forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """``hq_diffusion.kernels.hq_linear(x, self)`` on CUDA when the kernels provide it and implement this
        layer's path (``"int8"`` or ``"bf16"``; storage ``"int8"``: ``"int8"`` only), else :meth:`forward_native`."""
        op = _kernel_op() if x.is_cuda else None
        mma = self.resolved_mma(x.device)
        if op is None or mma not in ("int8", "bf16") or (self.storage == "int8" and mma != "int8"):
            return self.forward_native(x)
        return op(x, self)

    def extra_repr(self) -> str:
        m = self.hq_meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bps={m['bps']:.3f}, lattice={self.lattice}, mma={self.mma}, storage={self.storage}, "
                f"codes=({self.out_features}, {self.n_pad}), tile={self.tile}")


# ---- metadata -------------------------------------------------------------------------------------------

def _snr_db(w: torch.Tensor, m: HQLinear) -> float:
    """SNR in dB of the stored weight of ``m`` (decoded in float32, original basis) against ``w``."""
    n = m.in_features
    rec = inverse_rht(m.rotated_weight(), m.seed, m.key, m.tile)[:, :n]
    ref = w.reshape(-1, n).to(torch.float32)
    sig = float(ref.double().square().sum())
    err = float((rec.double() - ref.double()).square().sum())
    if err == 0.0:
        return math.inf
    return 10.0 * math.log10(sig / err) if sig > 0 else -math.inf


def _meta_from_encoded(q: EncodedTensor, *, storage: str, mma: str, bias: torch.Tensor | None,
                       codes: torch.Tensor | None) -> dict:
    """Every ``hq_meta`` field but ``snr_db`` (which :meth:`HQLinear.from_linear` measures on the built module)."""
    n_out, n_in = q.shape
    meta = {
        "version": META_VERSION,
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
    else:
        meta["codes_dtype"] = dtype_name(codes.dtype)
        stored = codes.numel() * codes.element_size() + q.scales.numel() * q.scales.element_size()
        meta["bps"] = 8.0 * stored / q.numel
    return meta


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
    if meta["version"] != META_VERSION:
        bad(f"metadata version {meta['version']} is not supported (this build reads {META_VERSION})")
    if meta["lattice"] not in LATTICES or meta["storage"] not in STORAGE_CHOICES or meta["mma"] not in MMA_CHOICES:
        bad(f"unknown lattice/storage/mma {meta['lattice']!r}/{meta['storage']!r}/{meta['mma']!r}")
    if meta["mma"] == "int8" and not meta["fits_int8"]:
        bad("mma 'int8' needs lattice integers that fit int8, but fits_int8 is false")
    if meta["dtype"] not in _DTYPES or meta["scale_dtype"] not in _RAW_SCALE:
        bad(f"unknown dtype {meta['dtype']!r} or scale dtype {meta['scale_dtype']!r}")
    if meta.get("bias") is not None and meta["bias"] not in _DTYPES:
        bad(f"unknown bias dtype {meta['bias']!r}")
    n_in, n_out = meta["in_features"], meta["out_features"]
    if not (0 < n_in < 2**31 and 0 < n_out < 2**31):
        bad(f"bad shape ({n_out}, {n_in})")
    # the stored tile is the one actually used, so planning with it as the maximum reproduces it
    if meta["tile"] not in ALLOWED_TILES or plan_tiles(n_in, meta["tile"]) != (meta["tile"], meta["n_pad"]):
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
    else:
        if meta.get("codes_dtype") not in _CODE_DTYPES:
            bad(f"invalid codes_dtype {meta.get('codes_dtype')!r}")
    return meta
