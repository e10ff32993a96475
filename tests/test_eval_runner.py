"""Tests for hq_diffusion.eval (``hq-diffusion eval``: runner, cli, config, files): bad input, the LTX-2 bps
sweep and its files, numbers recomputable from frames.npz, resumability, sharding and merging, PATH pipelines.

Resumability / sharding mechanics use ``_mechanics_quantize``, a TEST DOUBLE that perturbs the transformer's
Linear weights (cheap and deterministic); no quality number is ever taken from it.  Everything that checks
the report's numbers runs the real ``hq_diffusion.quantize``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from hq_diffusion.eval import metrics as M
from hq_diffusion.eval import report as R
from hq_diffusion.eval import cli, runner
from hq_diffusion.eval import config as eval_config
from hq_diffusion.eval import files as eval_files

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PROMPTS = ["a red robot dancing in the rain", "a small boat on a dark ocean at night",
           "# a comment line", "", "a cat walking in a green garden"]


# --------------------------------------------------------------------------------------------- helpers
def _mechanics_quantize(pipe, bps=4.0, **kwargs):
    """TEST DOUBLE for resume / shard mechanics only: adds seeded noise of relative size 2**-bps to every
    transformer nn.Linear weight, in place (like the real quantizer), and returns the pipeline."""
    g = torch.Generator().manual_seed(int(round(bps * 100)))
    with torch.no_grad():
        for m in pipe.transformer.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight
                w.add_((torch.randn(w.shape, generator=g) * w.float().std() * 2.0 ** -bps).to(w.dtype))
    pipe._mechanics_bps = bps
    return pipe


def _mechanics_summary(pipe):
    return {"summary": {"ratio": 16.0 / pipe._mechanics_bps, "weighted_bps": pipe._mechanics_bps},
            "text": "test double"}


def _prompts_file(tmp_path, lines=PROMPTS):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def _args(out, prompts, *extra):
    return ["--model", "tiny-ltx", "--prompts", prompts, "--out", str(out), "--no-progress", *extra]


def _cfg(argv):
    return eval_config.build_config(cli.build_parser().parse_args(argv))


class _Counter:
    """generate_fn wrapper: counts calls, records pipelines, can raise on the n-th call."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[int, str, int]] = []
        self.fail_at = fail_at

    def __call__(self, pipe, cfg, prompt, seed):
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise RuntimeError("injected failure")
        self.calls.append((id(pipe), prompt, seed))
        return runner._generate(pipe, cfg, prompt, seed)


def _load(path):
    with open(path) as fh:
        return json.load(fh)


def _f(v):
    return float(v) if v is not None else math.nan


def _no_tmp_files(root):
    return [os.path.join(d, n) for d, _, files in os.walk(root) for n in files if ".tmp" in n]


# --------------------------------------------------------------------------------------------- units
def test_to_uint8_is_round_and_clip():
    x = np.array([-0.2, 0.0, 0.5 / 255, 1.5 / 255, 0.4999, 1.0, 1.7], dtype=np.float32)
    np.testing.assert_array_equal(eval_files.to_uint8(x), np.clip(np.round(x * 255), 0, 255).astype(np.uint8))
    assert eval_files.to_uint8(x).dtype == np.uint8
    with pytest.raises(ValueError, match="NaN"):
        eval_files.to_uint8(np.array([0.1, np.nan], np.float32))


def test_read_prompts_and_packaged_suite(tmp_path):
    assert eval_files.read_prompts(_prompts_file(tmp_path)) == [PROMPTS[0], PROMPTS[1], PROMPTS[4]]
    suite = eval_files.read_prompts(eval_files.default_prompts_file())
    assert len(suite) == 32 and len(set(suite)) == 32
    assert all(len(p) > 20 and not p.startswith("#") for p in suite)


# --------------------------------------------------------------------------------------------- bad input
def _bad_cases(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n   \n")
    notpipe = tmp_path / "notpipe"
    notpipe.mkdir()
    (notpipe / "config.json").write_text("{}")
    nontrans = tmp_path / "nontransformer"
    nontrans.mkdir()
    (nontrans / "model_index.json").write_text(json.dumps({"_class_name": "LTXPipeline", "vae": ["x", "y"]}))
    afile = tmp_path / "afile"
    afile.write_text("x")
    good = _prompts_file(tmp_path)
    out = str(tmp_path / "out")
    return {
        "missing prompts": (["--prompts", str(tmp_path / "nope.txt"), "--out", out], "does not exist"),
        "empty prompts": (["--prompts", str(empty), "--out", out], "has no prompts"),
        "not a pipeline": (["--model", str(notpipe), "--prompts", good, "--out", out], "no model_index.json"),
        "no transformer": (["--model", str(nontrans), "--prompts", good, "--out", out], "no transformer"),
        "unknown model": (["--model", "tiny-nope", "--prompts", good, "--out", out], "neither"),
        "unwritable out": (["--prompts", good, "--out", str(afile / "sub")], "not writable"),
        "out is a file": (["--prompts", good, "--out", str(afile)], "not a directory"),
        "bps too high": (["--prompts", good, "--out", out, "--bps", "3,40"], "--bps"),
        "bps too low": (["--prompts", good, "--out", out, "--bps", "0.5"], "--bps"),
        "bps not a number": (["--prompts", good, "--out", out, "--bps", "four"], "not a valid number"),
        "kv bps": (["--prompts", good, "--out", out, "--kv-bps", "99"], "--kv-bps"),
        "lattice": (["--prompts", good, "--out", out, "--lattice", "e9"], "--lattice"),
        "too many prompts": (["--prompts", good, "--out", out, "--num-prompts", "9"], "has only 3"),
        "frames for images": (["--model", "tiny-flux", "--prompts", good, "--out", out, "--frames", "9"],
                              "video pipelines only"),
        "height": (["--prompts", good, "--out", out, "--height", "33"], "multiple of 32"),
        "lpips weights": (["--prompts", good, "--out", out, "--lpips-weights", str(tmp_path / "no.pt")],
                          "does not exist"),
        "usage error": (["--prompts", good, "--out", out, "--num-prompts", "two"], "invalid int value"),
        "merge-only nothing": (["--merge-only", "--out", str(tmp_path / "empty-run")], "holds no evaluation run"),
    }


def test_bad_input_fails_fast_with_one_line(tmp_path, monkeypatch, capsys):
    def no_work(*a, **k):
        raise AssertionError("a pipeline was loaded before the input was validated")

    monkeypatch.setattr(runner, "_load_pipeline", no_work)
    for name, (argv, needle) in _bad_cases(tmp_path).items():
        rc = cli.main([*argv, "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, name
        assert len(err.splitlines()) == 1 and err.startswith("hq-diffusion eval: error: "), (name, err)
        assert needle in err, (name, err)
        assert "Traceback" not in err


def test_mismatched_frame_shapes_are_reported(tmp_path, capsys):
    out = tmp_path / "run"
    argv = _args(out, _prompts_file(tmp_path), "--num-prompts", "1", "--dtype", "float32")
    hooks = dict(quantize_fn=_mechanics_quantize, summary_fn=_mechanics_summary)
    assert runner.run_eval(_cfg(argv), max_items=0, progress=False, **hooks) is None  # refs only
    ref = out / "ref" / "p0000-s0.npz"
    with np.load(ref) as z:
        arrays = dict(z)
    arrays["frames"] = arrays["frames"][:, :16]  # corrupt the cached reference, metadata intact
    np.savez(ref, **arrays)
    capsys.readouterr()
    rc = cli.main(argv, **hooks)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "prompt 0 (seed 0) at 4 bps" in err[0] and "shape mismatch" in err[0]


# --------------------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def mechanics(tmp_path_factory):
    """A clean two-prompt x two-bps tiny-LTX run with the test-double quantizer (report + call log)."""
    tmp = tmp_path_factory.mktemp("mechanics")
    prompts = _prompts_file(tmp)
    quantized: list[int] = []

    def q(pipe, **kw):
        quantized.append(id(pipe))
        return _mechanics_quantize(pipe, **kw)

    q.__qualname__ = _mechanics_quantize.__qualname__  # same fingerprint as the other runs
    counter = _Counter()
    argv = _args(tmp / "clean", prompts, "--num-prompts", "2", "--bps", "3,4", "--dtype", "float32")
    rep = runner.run_eval(_cfg(argv), quantize_fn=q, summary_fn=_mechanics_summary, generate_fn=counter,
                          progress=False)
    return {"tmp": tmp, "prompts": prompts, "report": rep, "calls": counter.calls, "quantized": quantized,
            "argv": lambda out, *x: _args(out, prompts, "--num-prompts", "2", "--bps", "3,4", "--dtype",
                                          "float32", *x)}


def test_clean_run_uses_a_fresh_pipeline_per_bps(mechanics):
    calls, quantized = mechanics["calls"], mechanics["quantized"]
    assert len(calls) == 2 + 2 * 2  # references once per (prompt, seed), then each bps
    ref_pipes = {c[0] for c in calls[:2]}
    assert len(ref_pipes) == 1 and not ref_pipes & set(quantized)  # the reference is never quantized
    assert len(set(quantized)) == 2
    assert {c[0] for c in calls[2:]} == set(quantized)
    rep = mechanics["report"]
    assert rep["missing"] == [] and len(rep["prompts"]) == 4
    assert [(e["bps"], e["index"]) for e in rep["prompts"]] == [(3.0, 0), (3.0, 1), (4.0, 0), (4.0, 1)]


def test_interrupted_run_resumes_without_regenerating(mechanics):
    out = mechanics["tmp"] / "resumed"
    cfg = _cfg(mechanics["argv"](out))
    hooks = dict(quantize_fn=_mechanics_quantize, summary_fn=_mechanics_summary)
    # 1. debug stop after one quantized item
    c1 = _Counter()
    assert runner.run_eval(cfg, generate_fn=c1, max_items=1, progress=False, **hooks) is None
    assert len(c1.calls) == 2 + 1
    first = out / "items" / "3" / "p0000-s0"
    stamp = {n: os.stat(first / n).st_mtime_ns for n in ("frames.npz", "video.mp4", "metrics.json")}
    # 2. a crash on the second new generation (the first one completes)
    c2 = _Counter(fail_at=2)
    with pytest.raises(RuntimeError, match="injected"):
        runner.run_eval(cfg, generate_fn=c2, progress=False, **hooks)
    assert len(c2.calls) == 1 and [c[1:] for c in c2.calls] == [(PROMPTS[1], 0)]  # refs were cached
    assert not (out / "report.json").exists() and _no_tmp_files(out) == []
    # 3. resume: only the two remaining items are generated, nothing finished is touched
    c3 = _Counter()
    rep = runner.run_eval(cfg, generate_fn=c3, progress=False, **hooks)
    assert len(c3.calls) == 2
    assert {n: os.stat(first / n).st_mtime_ns for n in stamp} == stamp
    assert _untimed(rep) == _untimed(mechanics["report"])
    assert _untimed(_load(out / "report.json")) == _untimed(_load(mechanics["tmp"] / "clean" / "report.json"))
    # 4. a complete run: no generation, no quantization
    c4 = _Counter()

    def q(*a, **k):
        raise AssertionError("quantized again")

    q.__qualname__ = _mechanics_quantize.__qualname__
    assert runner.run_eval(cfg, generate_fn=c4, quantize_fn=q, summary_fn=_mechanics_summary,
                           progress=False) == rep
    assert c4.calls == []


def test_run_dir_with_other_settings_is_refused(mechanics, capsys):
    rc = cli.main(mechanics["argv"](mechanics["tmp"] / "clean", "--steps", "3"),
                     quantize_fn=_mechanics_quantize, summary_fn=_mechanics_summary)
    err = capsys.readouterr().err
    assert rc == 2 and "different settings" in err and "call_kwargs" in err


@pytest.fixture(scope="module")
def kv_run(tmp_path_factory):
    """The real quantizer, 4-bit weights and 4-bit K/V with dither (stateful per generation): a clean
    single-process run of two prompts."""
    tmp = tmp_path_factory.mktemp("kv")
    prompts = _prompts_file(tmp)
    argv = lambda out: _args(out, prompts, "--num-prompts", "2", "--bps", "4", "--kv-bps", "4")  # noqa: E731
    assert cli.main(argv(tmp / "clean")) == 0
    return {"tmp": tmp, "argv": argv}


def test_two_ranks_then_merge_only_equals_clean_run(kv_run, capsys):
    """Ranks run out of order (rank 1 first, so prompt 1 is the first generation of its quantized pipeline):
    the merged report still equals the clean run's, K/V rates included."""
    out = kv_run["tmp"] / "sharded"
    cfg = _cfg(kv_run["argv"](out))
    assert runner.run_eval(cfg, rank=1, world_size=2, barrier=False, progress=False) is None
    items = sorted(os.path.relpath(d, out) for d, _, f in os.walk(out / "items") if "metrics.json" in f)
    assert items == [os.path.join("items", "4", "p0001-s0")]
    assert not (out / "items" / "4" / "summary.json").exists()  # rank 0 writes it
    # merging now gives a partial report and says so
    assert cli.main(["--merge-only", "--out", str(out)]) == 1
    assert "partial: 1 of 2" in capsys.readouterr().err
    part = _load(out / "report.json")
    assert [e["index"] for e in part["prompts"]] == [1] and [m["index"] for m in part["missing"]] == [0]
    assert runner.run_eval(cfg, rank=0, world_size=2, barrier=False, progress=False) is None
    assert cli.main(["--merge-only", "--out", str(out)]) == 0
    rep = _load(out / "report.json")
    assert _untimed(rep) == _untimed(_load(kv_run["tmp"] / "clean" / "report.json"))
    kv = rep["quantization"]["4"]["kv"]["transformer"]["summary"]
    assert 3.5 < kv["bits_per_scalar"] < 5 and rep["config"]["kv_bps"] == 4.0


# --------------------------------------------------------------------------------------------- PATH + LPIPS
def test_model_path_and_lpips_plumbing(tmp_path):
    from hq_diffusion.models import tiny_pipeline

    model = tmp_path / "tiny-ltx-dir"
    tiny_pipeline("ltx", seed=0).save_pretrained(model)
    weights = M.make_plumbing_weights(tmp_path / "lpips.pt")
    out = tmp_path / "run"
    argv = ["--model", str(model), "--prompts", _prompts_file(tmp_path), "--num-prompts", "1", "--steps", "2",
            "--height", "32", "--width", "32", "--frames", "9", "--dtype", "float32", "--lpips-weights",
            str(weights), "--out", str(out), "--no-progress"]
    cfg = _cfg(argv)
    assert cfg.pipeline == "ltx"
    # the tiny-tuned settings the flags do not set come from LTXPipeline.__call__'s own defaults
    assert cfg.call_kwargs()["max_sequence_length"] == 128 and cfg.call_kwargs()["num_inference_steps"] == 2
    assert cli.main(argv) == 0
    rep = _load(out / "report.json")
    assert rep["config"]["model"] == str(model) and rep["quantization"]["4"]["ratio"] > 1
    assert rep["lpips"] == {"available": True, "reason": None, "plumbing": True}
    lp = rep["prompts"][0]["per_frame"]["lpips"]
    assert len(lp) == 9 and all(np.isfinite(lp))
    with np.load(out / rep["prompts"][0]["frames"]) as z:
        np.testing.assert_allclose(lp, M.LPIPSMetric(weights_path=weights)(z["ref"], z["quant"]), atol=1e-6)
    assert "PLUMBING" in (out / "report.html").read_text()


# --------------------------------------------------------------------------------------------- LTX-2 sweep
def ltx2_sweep(tmp_path_factory) -> str:
    """tiny-ltx2, 2 prompts, bps 3,4,5, real quantizer; shared on disk by test_report_browser (the runner
    resumes, so whichever module comes second only re-merges)."""
    out = tmp_path_factory.getbasetemp() / "ltx2-sweep"
    rc = cli.main(["--model", "tiny-ltx2", "--num-prompts", "2", "--bps", "3,4,5", "--out", str(out),
                      "--no-progress"])
    assert rc == 0
    return str(out)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return ltx2_sweep(tmp_path_factory)


def test_ltx2_sweep_writes_every_file(sweep):
    rep = _load(os.path.join(sweep, "report.json"))
    assert rep["bps_list"] == [3.0, 4.0, 5.0] and rep["missing"] == []
    assert len(rep["prompts"]) == 6 and set(rep["suite"]) == {"3", "4", "5"}
    for k in ("3", "4", "5"):
        q = rep["quantization"][k]
        assert q["ratio"] > 1 and abs(q["weighted_bps"] - float(k)) < 0.05, q
        assert rep["compression"][f"{k} bps: compression \u00d7 (bf16 bytes / quantized bytes)"] == q["ratio"]
        assert rep["compression"][f"{k} bps: layers quantized"] == len(q["layers"]) > 0
    with open(os.path.join(sweep, "report.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {r["bps"] for r in rows} == {"3.0", "4.0", "5.0"}
    html = open(os.path.join(sweep, "report.html")).read()
    for pid in ("plot-rate-quality", "plot-per-frame-3", "plot-per-frame-4", "plot-per-frame-5", "plot-per-prompt"):
        assert f'id="{pid}"' in html
    import imageio_ffmpeg

    for e in rep["prompts"]:
        video = os.path.join(sweep, e["video"])
        assert os.path.getsize(video) > 0
        probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", video],
                               capture_output=True, text=True).stderr
        assert "Video: h264" in probe and "Audio: aac" in probe, probe
        assert e["video"] in html
    assert _no_tmp_files(sweep) == []


def test_report_numbers_recompute_from_frames_npz(sweep):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rep = _load(os.path.join(sweep, "report.json"))
    for e in rep["prompts"]:
        with np.load(os.path.join(sweep, e["frames"])) as z:
            ref, quant = z["ref"], z["quant"]
        assert ref.dtype == quant.dtype == np.uint8 and ref.shape == (9, 32, 32, 3)
        assert not np.array_equal(ref, quant)
        pf = e["per_frame"]
        win = M.ssim_win_size(32, 32)
        for i in range(ref.shape[0]):
            psnr = peak_signal_noise_ratio(ref[i], quant[i], data_range=255)
            assert _f(pf["psnr"][i]) == pytest.approx(psnr, abs=1e-6)
            ssim = structural_similarity(ref[i], quant[i], channel_axis=-1, data_range=255, win_size=win)
            assert pf["ssim"][i] == pytest.approx(ssim, abs=1e-6)
        d_ref = np.diff(ref.astype(np.float64), axis=0)
        d_q = np.diff(quant.astype(np.float64), axis=0)
        for i in range(ref.shape[0] - 1):
            mse = np.mean((d_ref[i] - d_q[i]) ** 2)
            want = math.inf if mse == 0 else 10 * math.log10(510.0 ** 2 / mse)
            assert _f(pf["flicker_psnr"][i]) == pytest.approx(want, abs=1e-6)
        for m in ("psnr", "ssim", "flicker_psnr"):
            vals = np.array([_f(v) for v in pf[m]])
            assert e["means"][m] == pytest.approx(float(np.mean(vals[np.isfinite(vals)])), abs=1e-6)
        assert pf["lpips"] is None and e["means"]["lpips"] is None  # no LPIPS weights here
        with np.load(os.path.join(sweep, e["audio"])) as z:
            ra, qa = z["ref"].astype(np.float64), z["quant"].astype(np.float64)
        n = min(ra.shape[-1], qa.shape[-1])
        snr = 10 * math.log10(np.sum(ra[..., :n] ** 2) / np.sum((ra[..., :n] - qa[..., :n]) ** 2))
        assert e["audio_snr_db"] == pytest.approx(snr, abs=1e-6)
    for k, s in rep["suite"].items():
        means = [e["means"]["psnr"] for e in rep["prompts"] if R.bps_key(e["bps"]) == k]
        assert s["psnr"]["mean"] == pytest.approx(float(np.mean(means)), abs=1e-6)
        worst = min(range(len(rep["prompts"])), key=lambda i: (rep["prompts"][i]["means"]["psnr"]
                                                               if R.bps_key(rep["prompts"][i]["bps"]) == k
                                                               else math.inf))
        assert s["worst_prompt"]["index"] == worst


# --------------------------------------------------------------------------------------------- multi-process
def _cli(args, env_extra, cwd):
    env = {**os.environ, **env_extra}
    return subprocess.Popen([sys.executable, "-m", "hq_diffusion.cli", "eval", *args, "--no-progress"],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_cli_ranks_as_processes_then_merge_only(tmp_path):
    out = tmp_path / "run"
    args = ["--model", "tiny-ltx", "--prompts", _prompts_file(tmp_path), "--bps", "4", "--out", str(out),
            "--no-barrier"]
    procs = [_cli(args, {"RANK": str(r), "WORLD_SIZE": "2"}, tmp_path) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert not (out / "report.json").exists()
    assert cli.main(["--merge-only", "--out", str(out)]) == 0
    rep = _load(out / "report.json")
    assert [e["index"] for e in rep["prompts"]] == [0, 1, 2] and rep["missing"] == []


@pytest.mark.slow
def test_accelerate_barrier_rank0_merges(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    args = ["--model", "tiny-ltx", "--prompts", _prompts_file(tmp_path), "--bps", "4", "--out", str(out)]
    common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LOCAL_WORLD_SIZE": "2",
              "CUDA_VISIBLE_DEVICES": ""}
    procs = [_cli(args, {**common, "RANK": str(r), "LOCAL_RANK": str(r)}, tmp_path) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # rank 0 waits for rank 1, merges and prints the summary of all three prompts; rank 1 prints nothing
    assert re.search(r"3 prompt\(s\)", outs[0][0]) and re.search(r"^  report ", outs[0][0], re.M), outs[0][0]
    assert outs[1][0] == ""
    rep = _load(out / "report.json")
    assert [e["index"] for e in rep["prompts"]] == [0, 1, 2] and rep["missing"] == []


def _untimed(obj):
    """A report without its wall-clock and memory measurements (they differ between any two runs)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items()
                if not any(w in str(k) for w in ("seconds", "peak memory", "memory kind"))}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_peak_rss_of_a_launched_process_is_its_own():
    """getrusage's maximum survives exec, so a process launched by a large one would report the launcher's peak;
    the eval report and bench convert read VmHWM, which starts afresh."""
    ballast = b"\x01" * (1536 * 2**20)  # 1.5 GB resident in this process when it launches the child
    code = ("import resource; from hq_diffusion.eval.runner import _peak_rss; "
            "print(_peak_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    del ballast
    own, rusage = int(out[0]), int(out[1])
    assert 0 < own < 1024 * 2**20 and own <= rusage
