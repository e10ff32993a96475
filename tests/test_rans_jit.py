"""The compiled rANS coder (codec/rans_jit.py): byte-identical to the numpy reference coder of codec/rans.py on
random streams and through ``encode`` for every lattice, the same verdict on corrupt streams and tables (an
HQFormatError, never a crash), bounds checks inside the compiled loops, and the dispatch (the codec and the CPU
forward run the compiled coder, never silently the numpy one)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from hq_diffusion.codec import CodecConfig, _np, decode, encode, rans, rans_jit
from hq_diffusion.codec.errors import HQFormatError


def _both(monkeypatch, fn):
    """``fn()`` with the numpy reference coder, then with the compiled one."""
    out = []
    for impl in ("numpy", "compiled"):
        monkeypatch.setattr(_np, "CPU_IMPL", impl)
        out.append(fn())
    return out


def _same_stream(a: rans.RansStream, b: rans.RansStream) -> bool:
    return (a.n, a.block, a.prec) == (b.n, b.block, b.prec) and all(
        x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values()))


def _symbols(n: int, seed: int, scale: float, escapes: bool) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    z = (np.abs(rng.standard_normal(n)) * scale).astype(np.int32)
    if escapes and n:
        z[:: 53] = 400 + np.arange(len(z[:: 53]), dtype=np.int32)  # beyond the 256-entry table
        z[-1] = 2**30
    return torch.from_numpy(z)


# n: one symbol, fewer than a lane row, a tail block only, full blocks + tail, exact blocks; blocks of 1..4096 steps
@pytest.mark.parametrize("n,block", [(1, 8), (7, 1), (8, 1), (13, 4), (8 * 16 * 3, 16), (8 * 16 * 3 + 5, 16),
                                     (1001, 32), (8 * 4096 + 9, 4096), (20000, 64)])
@pytest.mark.parametrize("ctx", [1, 2])
@pytest.mark.parametrize("escapes", [False, True])
def test_compiled_stream_is_byte_identical_to_numpy(monkeypatch, n, block, ctx, escapes):
    for prec, scale in ((rans.DEFAULT_PREC, 7.0), (12, 0.3), (15, 90.0)):
        z = _symbols(n, n + block + prec, scale, escapes)
        ref, got = _both(monkeypatch, lambda: rans.encode_stream(z, block, ctx, prec))
        assert _same_stream(ref, got), (n, block, ctx, prec)
        dec_ref, dec_got = _both(monkeypatch, lambda: rans.decode_stream(got, ctx))
        assert torch.equal(dec_ref, z) and torch.equal(dec_got, z)


def test_single_symbol_value_and_constant_streams(monkeypatch):
    """One distinct symbol (a table of one used entry plus the escape) and an all-escape stream."""
    for z in (torch.zeros(777, dtype=torch.int32), torch.full((100,), 5000, dtype=torch.int32)):
        ref, got = _both(monkeypatch, lambda: rans.encode_stream(z, 8, 2))
        assert _same_stream(ref, got)
        assert torch.equal(rans.decode_stream(got, 2), z)


@pytest.mark.parametrize("lattice", ["e8", "d4", "a2", "z"])
def test_encode_blob_is_byte_identical_for_every_lattice(monkeypatch, lattice):
    """The whole codec (rate loop, every trial encode, the blob) gives the same bytes with either CPU coder;
    an odd width (a tail block) and a decode to weights and to codes."""
    w = torch.randn(48, 777, generator=torch.Generator().manual_seed(3))
    cfg = CodecConfig(bps=4.0, lattice=lattice, coder="rans", block=64)
    ref, got = _both(monkeypatch, lambda: encode(w, cfg, key="jit").to_bytes())
    assert ref == got
    q = encode(w, cfg, key="jit")
    for out in ("weight", "codes"):
        a, b = _both(monkeypatch, lambda: decode(q, out=out))
        assert torch.equal(a, b)


def _corrupt(st: rans.RansStream, rng: np.random.Generator) -> rans.RansStream:
    """A copy of ``st`` with one random corruption of its states, words, offsets, escapes or tables."""
    parts = {k: v.clone() for k, v in st.tensors().items()}
    kind = rng.integers(6)
    if kind == 0:  # a state bit
        s = parts["states"].view(torch.int32).reshape(-1)
        s[rng.integers(s.numel())] ^= int(1 << rng.integers(31))
    elif kind == 1 and parts["words"].numel():  # a word bit
        w = parts["words"].view(torch.int16)
        w[rng.integers(w.numel())] ^= int(1 << rng.integers(15))
    elif kind == 2:  # a truncated or extended word array
        w = parts["words"]
        parts["words"] = w[: max(0, w.numel() - int(rng.integers(1, 4)))] if rng.integers(2) else torch.cat(
            [w, w[:3]])
    elif kind == 3 and parts["offsets"].numel() > 1:  # an offset moved (inside or past the words)
        o = parts["offsets"].view(torch.int32)
        o[rng.integers(1, o.numel())] += int(rng.integers(-3, 4)) or 1
    elif kind == 4:  # escapes: one value changed, one dropped, one added
        e = parts["escapes"]
        choice = rng.integers(3)
        if choice == 0 and e.numel():
            e[rng.integers(e.numel())] = int(rng.integers(0, 300))
        elif choice == 1 and e.numel():
            parts["escapes"] = e[1:]
        else:
            parts["escapes"] = torch.cat([e, torch.tensor([999], dtype=torch.int32)])
    else:  # a table: two entries swapped (sums stay valid) or one entry changed (sums break)
        f = parts["freqs"].view(torch.int16)
        i, j = rng.integers(f.shape[1], size=2)
        if rng.integers(2):
            f[:, [i, j]] = f[:, [j, i]]
        else:
            f[0, i] += 1
    return rans.RansStream(st.n, st.block, st.prec, *parts.values())


def _verdict(fn):
    try:
        return fn()
    except HQFormatError:
        return "HQFormatError"


def test_fuzzed_corruptions_same_verdict_as_numpy(monkeypatch):
    """300 random corruptions of small streams (tail blocks, two contexts, escapes): the compiled decoder
    raises HQFormatError exactly when the numpy reference does and otherwise returns the same symbols; it
    never crashes. Nearly every corruption must be detected (the end-state / word-count check)."""
    rng = np.random.default_rng(11)
    streams = []
    for n, block, ctx in ((8 * 32 * 3 + 21, 32, 2), (501, 16, 1), (8 * 8 + 3, 8, 2)):
        z = _symbols(n, n, 9.0, True)
        streams.append((rans.encode_stream(z, block, ctx), ctx))
    detected = 0
    for trial in range(300):
        st, ctx = streams[trial % len(streams)]
        bad = _corrupt(st, rng)
        ref, got = _both(monkeypatch, lambda: _verdict(lambda: rans.decode_stream(bad, ctx)))
        if isinstance(ref, str) or isinstance(got, str):
            assert ref == got, trial
            detected += 1
        else:
            assert torch.equal(ref, got), trial
    assert detected >= 270, detected


def test_compiled_loop_bounds_checks_return_errors():
    """The compiled decoder checks every index stored data can steer, also when called directly with a layout
    the Python checks would have refused: word ranges past the array, too few words, escapes missing."""
    z = _symbols(8 * 16 * 2 + 3, 1, 9.0, True)
    st = rans.encode_stream(z, 16, 1)
    freqs = st.freqs.numpy().astype(np.int64)
    lut, fq, dq = rans._decode_tables(freqs, 1 << st.prec)
    states, offsets, words = st.states.numpy(), st.offsets.numpy().astype(np.int64), st.words.numpy()
    esc = st.escapes.numpy()
    ends = np.append(offsets[1:], len(words))
    t = freqs.shape[1]

    def run(offsets=offsets, ends=ends, words=words, esc=esc):
        return rans_jit.decode_symbols(st.n, st.block, states, offsets, ends, words, lut, fq, dq, 1, st.prec,
                                       rans.STATE_LOW, t, esc)[1]

    assert run() == rans_jit.OK
    assert run(ends=ends + 10**6) == rans_jit.ERR_LAYOUT  # a word range past the array: refused before any read
    assert run(offsets=offsets - 5) == rans_jit.ERR_LAYOUT
    assert run(words=words[: len(words) // 2], ends=np.minimum(ends, len(words) // 2)) in (
        rans_jit.ERR_WORDS, rans_jit.ERR_END, rans_jit.ERR_LAYOUT)
    assert run(esc=esc[:-1]) == rans_jit.ERR_ESCAPE_COUNT
    assert run(esc=np.append(esc, np.int32(999))) == rans_jit.ERR_ESCAPE_COUNT
    low = esc.copy()
    low[0] = 0
    assert run(esc=low) == rans_jit.ERR_ESCAPE_VALUE
    with pytest.raises(ValueError, match="lut"):
        rans_jit.decode_symbols(st.n, st.block, states, offsets, ends, words, lut[:-1], fq, dq, 1, st.prec,
                                rans.STATE_LOW, t, esc)


def test_dispatch_runs_the_compiled_coder(monkeypatch):
    """The codec's encode and decode and the CPU forward of a rANS HQLinear run the compiled loops: with the
    numpy coder made to fail, they still work, and the compiled entry points are called."""
    from hq_diffusion.nn.linear import HQLinear

    def boom(*a, **k):
        raise AssertionError("the numpy rANS coder ran")

    monkeypatch.setattr(rans, "_encode_blocks", boom)
    monkeypatch.setattr(rans, "decode_stream_numpy", boom)
    calls = {"encode": 0, "decode": 0}
    enc, dec = rans_jit.encode_blocks, rans_jit.decode_symbols

    def count_enc(*a, **k):
        calls["encode"] += 1
        return enc(*a, **k)

    def count_dec(*a, **k):
        calls["decode"] += 1
        return dec(*a, **k)

    monkeypatch.setattr(rans_jit, "encode_blocks", count_enc)
    monkeypatch.setattr(rans_jit, "decode_symbols", count_dec)
    lin = torch.nn.Linear(256, 64).to(torch.bfloat16)
    m = HQLinear.from_linear(lin, CodecConfig(bps=4.0, coder="rans", block=64), name="jit")
    assert m.storage == "rans" and calls["encode"] > 0
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    y = m(x)
    assert calls["decode"] > 0 and y.shape == (3, 64) and bool(torch.isfinite(y).all())
    q = encode(torch.randn(32, 512), CodecConfig(coder="rans", block=32), key="d")
    n = calls["decode"]
    decode(q)
    assert calls["decode"] == n + len(q.streams)


def test_missing_numba_is_a_clear_error(monkeypatch):
    """Without numba the compiled coder raises ImportError naming the fix (no silent numpy fallback)."""
    import hq_diffusion.codec as codec_pkg

    monkeypatch.delitem(sys.modules, "hq_diffusion.codec.rans_jit")  # imported again at the coder's first use
    monkeypatch.delattr(codec_pkg, "rans_jit")
    monkeypatch.setitem(sys.modules, "numba", None)
    with pytest.raises(ImportError, match="numba"):
        rans.encode_stream(torch.arange(100, dtype=torch.int32), 8, 1)


def test_cpu_impl_switch_is_checked(monkeypatch):
    monkeypatch.setattr(_np, "CPU_IMPL", "fast")
    with pytest.raises(ValueError, match="CPU_IMPL"):
        rans.encode_stream(torch.arange(100, dtype=torch.int32), 8, 1)
