"""What ``torch.compile`` sees of a quantized linear layer: opaque ``torch.library`` custom ops, so that a whole
quantized transformer is captured in a single graph.

The forward of a quantized layer reads the host (the Rice and rANS decoders walk their bitstreams, checks are
made on values, the RHT signs are cached per key): traced by Dynamo it would break the graph, and each layer's
metadata (its RHT key, α, stream lengths: Python values) would become guards, so that every layer compiled (and
recompiled) its own frame. Two granularities:

- :func:`compiled_layer`: the whole forward of an ``HQLinear`` as one op, whose arguments are the activations, an
  int64 handle tensor naming the layer (:data:`LAYERS`) and ``out_features``; at run time it calls the
  layer's eager forward. Nothing of the layer's metadata is a constant of the graph, so one graph serves every
  layer of the same shape: with diffusers' regional compilation (``compile_repeated_blocks``) one block graph
  serves every block. ``HQLinear.forward`` uses it while ``torch.compiler.is_compiling()``.
- :func:`compiled_opset`: each operation of an :class:`OpSet` as one op whose arguments are the tensors and the
  layer's metadata (ints, floats and strings, constant in the graph), for :func:`~.linear.hq_linear` called on
  any module that provides ``encoded()``.

Their fake implementations give the output shapes and dtypes without running anything. Eager forwards never go
through here.
"""
from __future__ import annotations

import itertools
import weakref

import torch

from ..codec.format import EncodedTensor
from ..codec.ops_ref import REFERENCE, OpSet
from ..codec.rans import RansStream
from ..codec.rice import RiceStream
from ..kernels import DISPATCHED

_SETS = {"torch": REFERENCE, "dispatch": DISPATCHED}

# ---- the whole layer --------------------------------------------------------------------------------------

class Handles:
    """Objects named to custom ops by handles: int64 0-d CPU tensors, so that Dynamo takes a handle as a graph
    input rather than as a constant to guard on (one graph then serves every object of the same kind and shape).
    Objects are held weakly; a copy registers itself again (its ``__setstate__``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._objects: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._ids = itertools.count(1)

    def register(self, obj) -> torch.Tensor:
        """A new handle naming ``obj``."""
        uid = next(self._ids)
        self._objects[uid] = obj
        return torch.tensor(uid, dtype=torch.int64, device="cpu")

    def get(self, handle: torch.Tensor):
        """The object ``handle`` names (RuntimeError when it is gone)."""
        obj = self._objects.get(int(handle))
        if obj is None:
            raise RuntimeError(f"no {self.kind} has handle {int(handle)}")
        return obj


#: The quantized layers, named to :func:`compiled_layer`.
LAYERS = Handles("quantized layer")


@torch.library.custom_op("hq_diffusion::layer_forward", mutates_args=())
def compiled_layer(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    """The eager forward of the layer ``handle`` names: x (..., K) → (..., ``out_features``) in x.dtype (its
    ``forward`` itself: the module's hooks already ran where the graph called the layer)."""
    return LAYERS.get(handle).forward(x)


@compiled_layer.register_fake
def _(x, handle, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


_PARTS = 5  # tensors per stream: Rice ks, offsets, unary, rem, escapes; rANS freqs, states, offsets, words, escapes
_INTS = {"rice": 1, "rans": 3}  # ints per stream: Rice n; rANS n, block, prec


def _stream_parts(q: EncodedTensor) -> tuple[list[torch.Tensor], list[int]]:
    """The tensors and ints that describe ``q``'s streams (see :data:`_PARTS`, :data:`_INTS`)."""
    if q.coder == "rans":
        tensors = [t for st in q.streams for t in st.tensors().values()]
        return tensors, [v for st in q.streams for v in (st.n, st.block, st.prec)]
    tensors = [t for st in q.streams for t in (st.ks, st.offsets, st.unary, st.rem, st.escapes)]
    return tensors, [st.n for st in q.streams]


def _unpack(scales, tensors, ns, shape, weight_dtype, lattice, tile, block, seed, key, alpha, scale_dtype,
            fits_int8, coder) -> EncodedTensor:
    k = _INTS[coder]
    parts = [tensors[i * _PARTS:(i + 1) * _PARTS] for i in range(len(ns) // k)]
    if coder == "rans":
        streams = [RansStream(ns[i * k], ns[i * k + 1], ns[i * k + 2], *p) for i, p in enumerate(parts)]
    else:
        streams = [RiceStream(n, block, *p) for n, p in zip(ns, parts)]
    return EncodedTensor(tuple(shape), weight_dtype, lattice, tile, block, seed, key, alpha, scale_dtype, scales,
                         streams, fits_int8, coder=coder)


@torch.library.custom_op("hq_diffusion::compiled_decode", mutates_args=())
def compiled_decode(scales: torch.Tensor, tensors: list[torch.Tensor], ns: list[int], shape: list[int],
                    weight_dtype: torch.dtype, lattice: str, tile: int, block: int, seed: int, key: int, alpha: float,
                    scale_dtype: str, fits_int8: bool, out: str, out_dtype: torch.dtype, opset: str,
                    coder: str = "rice") -> torch.Tensor:
    """``opset.decode`` of the encoded weight given by its parts (``tensors``: :data:`_PARTS` tensors of each
    stream; ``ns``: :data:`_INTS` ints of each stream, by ``coder``): ``"rotated"`` → (rows, n_pad)
    ``out_dtype``; ``"codes"`` → (rows, n_pad) int8 when the integers fit int8, else int32."""
    q = _unpack(scales, tensors, ns, shape, weight_dtype, lattice, tile, block, seed, key, alpha, scale_dtype,
                fits_int8, coder)
    y = _SETS[opset].decode(q, out, out_dtype).reshape(q.rows, q.n_pad)
    if out == "codes" and y.dtype != torch.int8:
        y = y.to(torch.int32)
    return y.contiguous()


@compiled_decode.register_fake
def _(scales, tensors, ns, shape, weight_dtype, lattice, tile, block, seed, key, alpha, scale_dtype, fits_int8, out,
      out_dtype, opset, coder="rice"):
    rows = 1
    for d in shape[:-1]:
        rows *= d
    dt = out_dtype if out == "rotated" else (torch.int8 if fits_int8 else torch.int32)
    return scales.new_empty((rows, -(-shape[-1] // tile) * tile), dtype=dt)


@torch.library.custom_op("hq_diffusion::compiled_rht", mutates_args=())
def compiled_rht(x: torch.Tensor, seed: int, key: int, tile: int, opset: str) -> torch.Tensor:
    """``opset.rht`` (same shape and dtype as ``x``)."""
    return _SETS[opset].rht(x, seed, key, tile).contiguous()


@compiled_rht.register_fake
def _(x, seed, key, tile, opset):
    return torch.empty_like(x)


@torch.library.custom_op("hq_diffusion::compiled_rht_quant_int8", mutates_args=())
def compiled_rht_quant_int8(x: torch.Tensor, seed: int, key: int, tile: int, n_pad: int,
                            gain: torch.Tensor | None, opset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``opset.rht_quant_int8``: int8 (M, n_pad), float32 (M,)."""
    xq, xs = _SETS[opset].rht_quant_int8(x, seed, key, tile, n_pad, gain)
    return xq.contiguous(), xs.contiguous()


@compiled_rht_quant_int8.register_fake
def _(x, seed, key, tile, n_pad, gain, opset):
    return x.new_empty((x.shape[0], n_pad), dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


def weight_of(q: EncodedTensor, codes: torch.Tensor | None = None, ops: OpSet = REFERENCE) -> torch.Tensor:
    """float32 (rows, n) weight of ``q`` in the original basis: ``p(Y) / α · scale`` (from ``codes`` when given,
    else ``ops.decode(q, "rotated")`` of the streams), inverse-rotated and cropped to ``n`` columns (the
    decoder's arithmetic)."""
    from ..codec.lattice import to_physical
    from ..codec.ops_ref import row_dequant_scale
    from ..codec.rht import inverse_rht

    if codes is None:
        rot = ops.decode(q, "rotated", torch.float32).reshape(q.rows, q.n_pad)
    else:
        rot = to_physical(q.lattice, codes.reshape(q.rows, q.n_pad)) * row_dequant_scale(q).unsqueeze(1)
    return inverse_rht(rot, q.seed, q.key, q.tile)[:, :q.n].contiguous()


@torch.library.custom_op("hq_diffusion::compiled_weight", mutates_args=())
def compiled_weight(scales: torch.Tensor, tensors: list[torch.Tensor], ns: list[int], shape: list[int],
                    weight_dtype: torch.dtype, lattice: str, tile: int, block: int, seed: int, key: int, alpha: float,
                    scale_dtype: str, fits_int8: bool, coder: str, codes: torch.Tensor | None) -> torch.Tensor:
    """:func:`weight_of` of the encoded tensor given by its parts (as :func:`compiled_decode`): float32
    (rows, shape[-1])."""
    q = _unpack(scales, tensors, ns, shape, weight_dtype, lattice, tile, block, seed, key, alpha, scale_dtype,
                fits_int8, coder)
    return weight_of(q, codes)


@compiled_weight.register_fake
def _(scales, tensors, ns, shape, weight_dtype, lattice, tile, block, seed, key, alpha, scale_dtype, fits_int8, coder,
      codes):
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return scales.new_empty((rows, shape[-1]), dtype=torch.float32)


def traced_weight_of(q: EncodedTensor, codes: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`weight_of` as the opaque custom op (for use while ``torch.compile`` traces)."""
    tensors, ints = _stream_parts(q)
    return compiled_weight(q.scales, tensors, ints, list(q.shape), q.dtype, q.lattice, q.tile, q.block, q.seed,
                           q.key, float(q.alpha), q.scale_dtype, bool(q.fits_int8), q.coder, codes)


_COMPILED: dict[str, OpSet] = {}


def compiled_opset(ops: OpSet) -> OpSet:
    """``ops`` with ``rht``, ``rht_quant_int8`` and ``decode`` as the custom ops above, and
    ``fused_decode_gemm`` as the custom decode followed by ``ops.int8_gemm_dequant`` (already a custom op on
    the Triton side; the torch reference traces without a break)."""
    name = ops.name
    _SETS.setdefault(name, ops)

    def rht(x, seed, key, tile):
        return compiled_rht(x, int(seed), int(key), int(tile), name)

    def rht_quant_int8(x, seed, key, tile, n_pad, gain=None):
        return compiled_rht_quant_int8(x, int(seed), int(key), int(tile), int(n_pad), gain, name)

    def decode(q, out="codes", out_dtype=torch.bfloat16):
        tensors, ints = _stream_parts(q)
        return compiled_decode(q.scales, tensors, ints, list(q.shape), q.dtype, q.lattice, q.tile, q.block, q.seed,
                               q.key, float(q.alpha), q.scale_dtype, bool(q.fits_int8), out, out_dtype, name,
                               q.coder)

    def fused_decode_gemm(xq, xs, q, bias=None, out_dtype=torch.bfloat16):
        from ..codec.ops_ref import row_dequant_scale

        return ops.int8_gemm_dequant(xq, xs, decode(q, "codes"), row_dequant_scale(q), bias, out_dtype)

    if name not in _COMPILED:
        _COMPILED[name] = OpSet(f"compiled-{name}", rht, rht_quant_int8, ops.int8_gemm_dequant, decode,
                                fused_decode_gemm)
    return _COMPILED[name]


# Built now rather than at the first trace: a set added while Dynamo traces changes ``_COMPILED`` under the guard
# that the trace installed on it, and the first compiled call of a per-operation path would be followed by a
# recompile.
for _ops in (REFERENCE, DISPATCHED):
    compiled_opset(_ops)
