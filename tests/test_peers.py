"""Honest baselines: the real NF4 codebook, the converged HIGGS grid asset, and the real peer libraries'
bit counts (tests/ of ``hq-diffusion bench peers``)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from hq_diffusion.bench import baselines, peers

# QLoRA appendix E / bitsandbytes' "nf4" table, typed in from the publication.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def test_nf4_levels_are_the_published_ones():
    assert torch.allclose(baselines.nf_levels(4), torch.tensor(PUBLISHED_NF4), atol=2e-7, rtol=0)
    assert list(baselines.NF4_LEVELS) == PUBLISHED_NF4


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_nf4_levels_equal_bitsandbytes_codebook():
    import bitsandbytes.functional as F

    _, st = F.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type="nf4")
    assert torch.allclose(baselines.nf_levels(4), st.code.float().cpu(), atol=2e-7, rtol=0)


#: a converged grid: one more Lloyd step on the recipe's quadrature (1024², the builder's default) lowers the MSE
#: by less than this (relative). The builder stops when one step gains < 1e-5; Lloyd's gain per step is not
#: monotone, so the step after it gains up to ~1.1e-5 (asset: 5.3e-6 / 1.1e-5 / 1.1e-5 at 3 / 4 / 5 bits);
#: 15 iterations from the start gain far more (checked below).
CONVERGED = 2e-5


def _one_step_gain(cb: torch.Tensor) -> float:
    pts, wts = baselines.gaussian_quadrature_2d(1024)
    axis = baselines.quadrature_axis(1024)
    new, mse0 = baselines.lloyd_step(cb, pts, wts, axis)
    return (mse0 - baselines.lloyd_step(new, pts, wts, axis)[1]) / mse0


@pytest.mark.parametrize("n,p,scale", [(64, 1024, 1.4), (96, 7, 3.0), (200, 256, 0.5), (40, 1, 1.0)])
def test_binned_nearest_equals_brute_force(n, p, scale):
    """The builder's binned search finds the exact nearest codeword (same distance as the dense search) for
    every quadrature point, codebooks dense or sparse, inside or far outside the grid."""
    g = torch.Generator().manual_seed(n + p)
    cb = torch.randn(p, 2, generator=g, dtype=torch.float64) * scale
    axis = baselines.quadrature_axis(n)
    pts = torch.cartesian_prod(axis, axis)
    got, want = baselines._nearest_on_grid(axis, cb), baselines._nearest_rows(pts, cb)
    dist = lambda i: (pts - cb[i]).square().sum(1)  # noqa: E731
    assert got.shape == want.shape and torch.equal(dist(got), dist(want))


@pytest.mark.parametrize("bits", [3, 4, pytest.param(5, marks=pytest.mark.slow)])
def test_higgs_grid_asset_is_converged(bits):
    cb = baselines.gaussian_grid_2d(bits)
    assert cb.shape == (4**bits, 2)
    assert _one_step_gain(cb) < CONVERGED, bits


@pytest.mark.slow
def test_convergence_check_rejects_an_under_trained_grid():
    cb, iters, _ = baselines.train_gaussian_grid_2d(3, max_iters=15)
    assert iters == 15 and _one_step_gain(cb) > CONVERGED


def test_stored_bits_flattens_subclasses_and_counts_dtypes():
    assert peers.stored_bits(torch.zeros(3, 5, dtype=torch.float16)) == 240
    assert peers.stored_bits(torch.zeros(7, dtype=torch.uint8)) == 56
    with pytest.raises(TypeError, match="not a tensor"):
        peers.stored_bits([1, 2])


def _real_storage_bits(lib: str, label: str, w: torch.Tensor) -> int:
    """Independent count: what the library serializes, in bytes × 8."""
    if lib == "gguf-py":
        import os
        import tempfile

        import gguf
        from gguf import GGMLQuantizationType, quants

        t = GGMLQuantizationType[label]
        with tempfile.TemporaryDirectory() as d:
            sizes = []
            for with_tensor in (False, True):
                path = os.path.join(d, f"{with_tensor}.gguf")
                wr = gguf.GGUFWriter(path, "test")
                if with_tensor:
                    blocks = quants.quantize(w.numpy(), t)
                    wr.add_tensor("weight", blocks, raw_dtype=t)
                wr.write_header_to_file()
                wr.write_kv_data_to_file()
                wr.write_tensors_to_file()
                wr.close()
                sizes.append(os.path.getsize(path))
        return 8 * (sizes[1] - sizes[0])
    if lib == "bitsandbytes":
        import bitsandbytes.functional as F

        q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics="double" in label)
        n = w.numel()
        expect = 4 * n + (32 * n // 64 if "double" not in label else 8 * n // 64 + 32 * (n // 64 // 256 + 1) + 32 * 256)
        return expect + 32 * 16 + 8 * st.as_dict(packed=True)[f"quant_state.bitsandbytes__nf4"].numel()
    raise KeyError(lib)


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "NF4 block 64, fp32 absmax"])
def test_peer_bits_match_real_storage(name):
    entry = next((p for p in peers.PEERS if p[2] == name), None)
    assert entry is not None
    lib, mod, label, fn = entry
    if importlib.util.find_spec(mod) is None:
        pytest.skip(f"{lib} not installed")
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    _, bits = fn(w)
    real = _real_storage_bits(lib, label, w)
    if lib == "gguf-py":
        # the file grows by the block data plus the tensor-info entry, minus/plus the header's 32-byte
        # alignment padding that entry shifts: equal up to that padding, never below the block data
        assert abs(bits - real) < 8 * 32 and real >= bits - 8 * peers.gguf_tensor_info_bytes("weight", 2)
    else:
        assert bits == real


def test_bench_peers_runs_and_reports_every_peer(capsys):
    w = peers.weights("trained-like", 64, 256)  # torchao NF4 needs a multiple of 256 blocks of 64
    rows = peers.run_peers(w, ours=True)
    assert [r["format"] for r in rows] == [p[2] for p in peers.PEERS]
    for r in rows:
        # an installed peer either runs or says why it cannot (no encoder, unbuilt extension): never "failed"
        assert r["status"] == "ok" or r["status"].startswith(("not installed", "could not run:")), r
        if r["status"] == "ok":
            assert r["bps"] > 0 and {"rice", "rans"} <= set(r["ours"])
            for bps, snr in r["ours"].values():
                assert bps <= r["bps"] + 1e-9 and snr > 0
    assert peers.main(["--rows", "8", "--cols", "256", "--weights", "gaussian", "--coders", "rans"]) == 0
    out = capsys.readouterr().out
    assert "Real peer libraries" in out and "E8 rans SNR dB" in out and "E8 rice" not in out


def _sleeper(w):
    import time

    time.sleep(3)
    return w * 1.01, 16 * w.numel()


def test_bench_peers_time_limit_reports_instead_of_stalling(monkeypatch):
    monkeypatch.setattr(peers, "PEERS", [("slow-lib", "torch", "sleeps 3 s", _sleeper)])
    (row,) = peers.run_peers(torch.randn(8, 64), ours=False, time_limit_s=0.2)
    assert row["status"] == "could not run: over the 0.2 s per-peer time limit" and row["bps"] is None
    (row,) = peers.run_peers(torch.randn(8, 64), ours=False, time_limit_s=None)
    assert row["status"] == "ok" and row["bps"] == 16


def test_bench_peers_skips_quanto_while_its_extension_is_unbuilt(monkeypatch):
    ran = []
    monkeypatch.setattr(peers, "PEERS", [("optimum-quanto", "optimum.quanto", "qint4", lambda w: ran.append(1))])
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: object())  # "installed"
    monkeypatch.setattr(peers, "quanto_extension_built", lambda: False)
    (row,) = peers.run_peers(torch.randn(8, 64), ours=False)
    assert row["status"].startswith("could not run: optimum-quanto's C++ extension is not built") and not ran
    assert "--build-extensions" in row["status"]


def test_bench_peers_rejects_unknown_coder():
    with pytest.raises(SystemExit):
        peers.main(["--rows", "8", "--cols", "256", "--coders", "huffman"])


def test_bench_rd_baselines_have_a_column_per_coder(capsys):
    from hq_diffusion.bench import rd

    assert rd.main(["--rows", "8", "--cols", "1024", "--rates", "4", "--lattices", "e8", "--coders", "rice,rans"]) == 0
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if line.startswith("| baseline"))
    assert "E8 rice SNR dB" in head and "E8 rans SNR dB" in head and "rans gain dB" in head
    nf4 = next(line for line in out.splitlines() if line.startswith("| NF4 block-64"))
    assert len(nf4.split("|")) == len(head.split("|"))
