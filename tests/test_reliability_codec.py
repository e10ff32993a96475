"""Reliability of the codec (issue 10, findings 8–10): hostile blobs, extreme magnitudes, named errors.

Finding 8: ``EncodedTensor.from_bytes`` checks every header field before allocating; crafted headers carry a
recomputed CRC so that the range checks, not the checksum, must catch them. Every case is an HQFormatError
or a correct decode, never another exception, a hang or an allocation out of proportion to the output.
Finding 9: float16 weights near the format's maximum never decode or multiply into Inf.
Finding 10: huge and tiny magnitudes raise one named error (HQRangeError) naming the layer; rows of exact
zeros encode exactly with scale 0.
"""
from __future__ import annotations

import math
import random
import struct
import time
import tracemalloc
import warnings
import zlib

import pytest
import torch
from torch import nn

import hq_diffusion
from hq_diffusion.codec import CodecConfig, EncodedTensor, HQFormatError, HQRangeError, decode, encode
from hq_diffusion.codec.format import _FIXED, _STREAM, _TAIL

# ---- crafting headers with a valid CRC -------------------------------------------------------------------


def _parse(blob: bytes) -> dict:
    """The header fields of a blob and its payload (everything between the headers and the CRC)."""
    magic, version, lat, dt, sdt, ndim, ltile, lblock, flags = _FIXED.unpack_from(blob, 0)
    off = _FIXED.size
    shape = list(struct.unpack_from(f"<{ndim}I", blob, off))
    off += 4 * ndim
    seed, key, alpha = _TAIL.unpack_from(blob, off)
    off += _TAIL.size
    nstreams = 2 if lat in (1, 2) else 1
    streams = []
    for _ in range(nstreams):
        streams.append(list(_STREAM.unpack_from(blob, off)))
        off += _STREAM.size
    return dict(version=version, lat=lat, dt=dt, sdt=sdt, ltile=ltile, lblock=lblock, flags=flags, shape=shape,
                seed=seed, key=key, alpha=alpha, streams=streams, payload=bytes(blob[off:-4]))


def _build(f: dict) -> bytes:
    """Inverse of :func:`_parse`, with the CRC recomputed (a crafted header always passes the checksum)."""
    body = _FIXED.pack(b"HQCT", f["version"], f["lat"], f["dt"], f["sdt"], len(f["shape"]), f["ltile"],
                       f["lblock"], f["flags"])
    body += struct.pack(f"<{len(f['shape'])}I", *f["shape"]) + _TAIL.pack(f["seed"], f["key"], f["alpha"])
    body += b"".join(_STREAM.pack(*s) for s in f["streams"]) + f["payload"]
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def _craft(blob: bytes, **changes) -> bytes:
    f = _parse(blob)
    f.update(changes)
    return _build(f)


def _encode(w, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return encode(w, CodecConfig(**kw))


# ---- finding 8: targeted crafted headers ---------------------------------------------------------------------

def test_tile_must_be_one_the_encoder_uses_for_the_row_length():
    # the payload of rows of 2048 relabelled as rows of 1: consistent sizes, 2048x the work of the output
    q = _encode(torch.randn(4, 2048), tile=2048)
    blob = _craft(q.to_bytes(), shape=[4, 1])
    with pytest.raises(HQFormatError, match="tile 2048"):
        EncodedTensor.from_bytes(blob)
    # the same relabelling to a length the encoder pads to 2048 (tile 2048 is its choice) decodes correctly
    ok = EncodedTensor.from_bytes(_craft(q.to_bytes(), shape=[4, 2047]))
    assert torch.equal(decode(ok), decode(q)[:, :2047])


@pytest.mark.parametrize("alpha", [1e-45, 1e-30, 1e-9, 1e30, float("inf"), float("nan"), -1.0, 0.0])
def test_alpha_out_of_range_is_refused(alpha):
    blob = _craft(_encode(torch.randn(8, 64)).to_bytes(), alpha=alpha)
    with pytest.raises(HQFormatError, match="alpha"):
        EncodedTensor.from_bytes(blob)


def test_fields_in_range_that_overflow_together_are_refused_by_decode():
    # float32 scales near the float32 maximum with the smallest α: each field passes, the product is Inf
    q = _encode(torch.randn(8, 64), scale_dtype="float32")
    f = _parse(q.to_bytes())
    f["alpha"] = 2.0**-24
    f["payload"] = struct.pack("<8f", *[3e38] * 8) + f["payload"][32:]
    got = EncodedTensor.from_bytes(_build(f))
    for out in ("weight", "rotated"):
        with pytest.raises(HQFormatError, match="not finite"):
            decode(got, out)


@pytest.mark.parametrize("field,value", [
    ("lat", 7), ("dt", 9), ("sdt", 5), ("ltile", 12), ("ltile", 2), ("lblock", 21), ("lblock", 2), ("flags", 2),
    ("shape", [0, 64]), ("shape", [10**6, 10**6 // 8]), ("shape", [2**32 - 1] * 8),
])
def test_header_fields_out_of_range(field, value):
    blob = _craft(_encode(torch.randn(8, 64)).to_bytes(), **{field: value})
    with pytest.raises(HQFormatError):
        EncodedTensor.from_bytes(blob)


@pytest.mark.parametrize("part,value", [(1, 2**32 - 1), (2, 2**32 - 1), (3, 2**32 - 1), (1, 1), (3, 10**6)])
def test_stream_sizes_claiming_huge_or_impossible_counts_allocate_nothing(part, value):
    """Stream sizes (unary bytes, remainder bytes, escapes) of 4 GB or impossible for the symbol count are
    refused from the header alone: the parse allocates a few kB at most."""
    q = _encode(torch.randn(8, 64))
    f = _parse(q.to_bytes())
    f["streams"][0][part] = value
    blob = _build(f)
    tracemalloc.start()
    try:
        with pytest.raises(HQFormatError):
            EncodedTensor.from_bytes(blob)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * len(blob) + 2**16


def test_claimed_size_must_match_the_blob_length_exactly():
    q = _encode(torch.randn(8, 64))
    f = _parse(q.to_bytes())
    f["payload"] += b"\0" * 8
    f["streams"][0][3] += 2  # two more escapes: 8 bytes, exactly what was appended
    with pytest.raises(HQFormatError):
        decode(EncodedTensor.from_bytes(_build(f)))


def test_all_zero_tensor_round_trips_through_bytes():
    # its α has no rate to follow; it must stay in the format's range so that the blob reads back
    q = _encode(torch.zeros(4, 64))
    got = decode(EncodedTensor.from_bytes(q.to_bytes()))
    assert torch.equal(got, torch.zeros(4, 64))


# ---- finding 8: the fuzz -------------------------------------------------------------------------------------

_SOURCES = [  # (shape, config): small tensors of every lattice, a float16 one, a relabelling source
    ((12, 200), dict(lattice="d4")), ((16, 64), dict(lattice="e8")), ((6, 96), dict(lattice="a2", bps=3.0)),
    ((8, 40), dict(lattice="z", scale_dtype="float32")), ((4, 2048), dict(tile=2048)),
]


def _sources():
    out = []
    g = torch.Generator().manual_seed(7)
    for shape, kw in _SOURCES:
        w = torch.randn(*shape, generator=g)
        q = _encode(w, **kw)
        out.append((q.to_bytes(), decode(q)))
    h = _encode(torch.randn(8, 64, generator=g).half())
    out.append((h.to_bytes(), decode(h)))
    return out


def _mutate(rng: random.Random, blob: bytes, expect: torch.Tensor) -> tuple[bytes, torch.Tensor | None]:
    """A mutated blob and, where known, what a decode of it must give (None: it must be an HQFormatError or a
    decode consistent with its header — checked by the caller)."""
    b = bytearray(blob)
    kind = rng.randrange(6)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 4)):
            j = rng.randrange(len(b))
            b[j] ^= 1 << rng.randrange(8)
        return bytes(b), expect
    if kind == 1:  # truncation
        return bytes(b[: rng.randrange(len(b))]), expect
    f = _parse(blob)
    if kind == 2:  # one header field set to a random or extreme value, CRC recomputed
        name = rng.choice(["lat", "dt", "sdt", "ltile", "lblock", "flags", "alpha", "version"])
        f[name] = rng.choice([0, 1, 2, 3, 11, 20, 255]) if name != "alpha" else rng.choice(
            [1e-45, 2.0**-25, 2.0**-24, 1.0, 2.0**24, 3e38, float("nan"), -0.0])
    elif kind == 3:  # shape dims: random, extreme, or a relabelling of the row length
        dims = f["shape"]
        i = rng.randrange(len(dims))
        dims[i] = max(rng.choice([0, 1, dims[i] - 1, dims[i] + 1, 2**31, 2**32 - 1, rng.randrange(1, 5000)]), 0)
    elif kind == 4:  # stream sizes
        s = rng.choice(f["streams"])
        j = rng.randrange(4)
        s[j] = min(max(rng.choice([0, 1, s[j] - 1, s[j] + 1, 2 * s[j], 2**31, 2**32 - 1]), 0), 2**32 - 1)
    else:  # payload bytes flipped under a recomputed CRC: the stream checks must catch it or decode as written
        p = bytearray(f["payload"])
        for _ in range(rng.randint(1, 3)):
            p[rng.randrange(len(p))] = rng.randrange(256)
        f["payload"] = bytes(p)
    return _build(f), None


def _run_fuzz(cases: int, seed: int, max_seconds: float) -> dict:
    rng = random.Random(seed)
    sources = _sources()
    counts = {"HQFormatError": 0, "decoded": 0}
    for i in range(cases):
        blob, expect = sources[i % len(sources)]
        b, want = _mutate(rng, blob, expect)
        t0 = time.perf_counter()
        tracemalloc.start()
        try:
            q = EncodedTensor.from_bytes(b)
            # a blob holds at least one unary bit per symbol; the padded row is at most 3n + 8 long
            assert q.rows * q.n_pad <= 8 * len(b) * 8 and q.n_pad <= 3 * q.n + 8, f"case {i}: {q.shape}"
            got = decode(q)
            counts["decoded"] += 1
        except HQFormatError:
            counts["HQFormatError"] += 1
            got = None
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        took = time.perf_counter() - t0
        assert took < max_seconds, f"case {i} took {took:.2f} s"
        out_bytes = 0 if got is None else got.numel() * 4
        # O(output) plus one Rice block of int32 (block ≤ 2**20 symbols, as the encoder may write for any size)
        assert peak < 64 * (len(b) + out_bytes) + 16 * 2**20, f"case {i}: peak {peak} B for a {len(b)} B blob"
        if got is not None:
            assert torch.isfinite(got).all(), f"case {i} decoded to non-finite values"
            if want is not None:
                assert torch.equal(got, want), f"case {i}: a damaged blob decoded to different values"
            assert got.shape == q.shape and got.dtype == q.dtype
    return counts


def test_fuzz_blobs_fast():
    counts = _run_fuzz(400, seed=2026, max_seconds=2.0)
    assert sum(counts.values()) == 400
    assert counts["HQFormatError"] > 300  # almost every mutation is caught


@pytest.mark.slow
def test_fuzz_blobs_slow():
    counts = _run_fuzz(6000, seed=10, max_seconds=5.0)
    assert sum(counts.values()) == 6000


# ---- finding 9: float16 near the maximum -----------------------------------------------------------------

def test_float16_weights_near_the_maximum_never_give_inf_through_quantize():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8).half()
    with torch.no_grad():
        lin.weight.fill_(60000)
        lin.bias.zero_()
    x = torch.full((2, 64), 1e-3, dtype=torch.float16)
    ref = lin(x).float()
    assert torch.isfinite(ref).all()  # 3842: the float layer is fine
    model = nn.Sequential(lin)
    hq_diffusion.quantize(model, progress=False)
    out = model(x).float()
    assert torch.isfinite(out).all(), out
    assert ((out - ref).abs() / ref.abs()).max() < 0.05
    w = model[0].dequantize()
    assert w.dtype == torch.float16 and torch.isfinite(w).all()


def _rel_err(got: torch.Tensor, w: torch.Tensor) -> float:
    return float((got.double() - w.double()).norm() / w.double().norm())


@pytest.mark.parametrize("value", [60000.0, -65504.0])
def test_float16_codec_near_the_maximum_decodes_finite(value):
    g = torch.Generator().manual_seed(3)
    shape = 0.75 + 0.25 * torch.rand(32, 256, generator=g)  # every |w| in [0.75, 1]·value
    w = (value * shape).half()
    small = (w.float() / 1024).half()  # the same tensor far from the maximum: the codec is scale-invariant
    err_small = _rel_err(decode(_encode(small)), small)
    q = _encode(w)
    for got in (decode(q), decode(EncodedTensor.from_bytes(q.to_bytes()))):
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        assert _rel_err(got, w) <= err_small * 1.01 + 1e-3  # clamping to 65504 only moves toward w
    assert torch.isfinite(decode(q, "rotated")).all()  # float32


# ---- finding 10: one named behaviour for huge and tiny magnitudes --------------------------------------------

def _model(value: float, dtype=torch.float32) -> nn.Module:
    m = nn.Sequential()
    m.add_module("ff_in", nn.Linear(64, 8).to(dtype))
    with torch.no_grad():
        m.ff_in.weight.fill_(value)
        m.ff_in.weight[::2] *= -1
    return m


@pytest.mark.parametrize("value", [3e38, 1e36, 1e6])
def test_huge_weights_raise_a_named_range_error_naming_the_layer(value):
    with pytest.raises(HQRangeError) as e:
        hq_diffusion.quantize(_model(value), progress=False)
    msg = str(e.value)
    assert "ff_in" in msg and "CodecConfig" not in msg and "math domain" not in msg


@pytest.mark.parametrize("value", [1e-8, 1e-30, 1e-40])
def test_tiny_weights_raise_the_same_named_error_with_float16_scales(value):
    with pytest.raises(HQRangeError, match=r"too small for float16 row scales.*scale_dtype='float32'") as e:
        hq_diffusion.quantize(_model(value), progress=False)
    assert "ff_in" in str(e.value) and "CodecConfig" not in str(e.value)


@pytest.mark.parametrize("value", [1e-8, 1e-30, 1e6, 1e30])
def test_scale_dtype_float32_through_quantize_holds_tiny_and_large_rows(value):
    errs = []
    for v in (value, 1.0):  # the codec is scale-invariant: tiny and large rows as accurate as unit ones
        m = _model(v)
        w = m.ff_in.weight.detach().clone()
        hq_diffusion.quantize(m, progress=False, scale_dtype="float32")
        got = m.ff_in.dequantize()
        assert torch.isfinite(got).all()
        errs.append(_rel_err(got, w))
    assert errs[0] <= errs[1] * 1.01 + 1e-6, errs


def test_rows_of_exact_zeros_encode_exactly_with_scale_zero():
    w = torch.randn(6, 64)
    w[1] = 0
    w[4] = 0
    q = _encode(w)
    assert q.scales[1] == 0 and q.scales[4] == 0 and bool((q.scales[[0, 2, 3, 5]] > 0).all())
    got = decode(EncodedTensor.from_bytes(q.to_bytes()))
    assert torch.equal(got[1], torch.zeros(64)) and torch.equal(got[4], torch.zeros(64))


def test_tiny_row_next_to_normal_rows_is_refused_not_zeroed():
    w = torch.randn(4, 64)
    w[2] = 1e-30  # used to be zeroed silently (its float32 RMS underflowed to 0)
    with pytest.raises(HQRangeError, match="row 2"):
        encode(w, CodecConfig(), key="blocks.0.ff")
    q = _encode(w, scale_dtype="float32")
    assert math.isclose(float(q.scales[2]), 1e-30, rel_tol=1e-3)


def test_float16_layers_of_ordinary_weights_keep_the_float16_matmul():
    from hq_diffusion.nn.linear import _matmul_dtype

    lin = nn.Linear(256, 32).half()
    m = nn.Sequential(lin)
    hq_diffusion.quantize(m, progress=False)
    assert _matmul_dtype(m[0], m[0].encoded(), torch.float16) == torch.float16
    with torch.no_grad():  # new scales (as a load would copy in): the decision follows them
        m[0].scales.copy_(torch.full((32,), 60000.0, dtype=torch.float16).view(torch.int16))
    assert _matmul_dtype(m[0], m[0].encoded(), torch.float16) == torch.float32
