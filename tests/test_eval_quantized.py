"""``hq-diffusion eval --model QUANTIZED_DIR``: a pipeline saved quantized by hq-diffusion is evaluated as stored —
against ``--reference`` or the origin the directory records, or alone (a quant-only run whose report says that
PSNR/SSIM are not computed); the quantization options are refused; a broken directory is one line.

All on the trained tiny LTX saved quantized to a tmp dir, one prompt, 32x32, 9 frames, 2 steps.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

import hq_diffusion
from hq_diffusion.eval import cli
from hq_diffusion.eval import config as eval_config
from hq_diffusion.eval.files import EvalInputError, shapes_prompts_file
from hq_diffusion.eval.report import NO_REFERENCE
from hq_diffusion.eval.saved import inspect_quantized

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The trained tiny LTX (float32) quantized at 4 bps and saved; and a copy that records no origin."""
    from hq_diffusion.models import tiny_pipeline

    root = tmp_path_factory.mktemp("quantized")
    pipe = tiny_pipeline("tiny-ltx-trained", dtype=torch.float32)
    hq_diffusion.quantize(pipe, bps=4.0, progress=False)
    hq_diffusion.save_quantized(pipe, root / "recorded")
    pipe.register_to_config(_name_or_path="")  # what a pipeline built in code records: nothing
    hq_diffusion.save_quantized(pipe, root / "anonymous")
    return root


def _cfg(*argv):
    return eval_config.build_config(cli.build_parser().parse_args(list(argv)))


def _run(capsys, *argv):
    rc = cli.main([*argv, "--num-prompts", "1", "--steps", "2", "--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip()


def test_inspect_reads_rate_dtype_and_the_recorded_origin(saved):
    sq = inspect_quantized(str(saved / "recorded"))
    assert sq.components == ("transformer",) and sq.bps == 4.0 and sq.config["lattice"] == "e8"
    assert sq.dtype == "float32" and sq.pipeline_class == "LTXPipeline"
    assert sq.source == "tiny-ltx-trained"
    anon = inspect_quantized(str(saved / "anonymous"))
    assert anon.source is None and "does not record" in anon.source_note


def test_config_of_a_quantized_dir(saved, tmp_path):
    cfg = _cfg("--model", str(saved / "recorded"), "--out", str(tmp_path / "a"))
    assert cfg.quantized and cfg.reference == "tiny-ltx-trained" and cfg.bps_list == (4.0,)
    assert cfg.dtype == "float32"  # the saved dtype, also for the reference
    # the trained model's generation defaults and held-out captions, from the recorded origin
    kw = cfg.call_kwargs()
    assert (kw["height"], kw["width"], kw["num_frames"], kw["num_inference_steps"]) == (32, 32, 9, 12)
    assert cfg.prompts_file.endswith("prompts_shapes.txt")
    none = _cfg("--model", str(saved / "recorded"), "--reference", "none", "--out", str(tmp_path / "b"))
    assert none.reference is None and none.ref_model is None and none.call_kwargs() == kw
    anon = _cfg("--model", str(saved / "anonymous"), "--out", str(tmp_path / "c"))
    assert anon.reference is None and "no float reference" in anon.reference_note
    given = _cfg("--model", str(saved / "anonymous"), "--reference", "tiny-ltx-trained", "--out", str(tmp_path / "d"))
    assert given.reference == "tiny-ltx-trained" and given.reference_note == "given by --reference"
    # a float run is unchanged: no reference field, the model is its own reference
    plain = _cfg("--model", "tiny-ltx", "--out", str(tmp_path / "e"))
    assert plain.quantized is None and plain.ref_model == "tiny-ltx"


@pytest.mark.parametrize("extra, words", [
    (["--bps", "3"], "--bps: --model"),
    (["--lattice", "d4", "--kv-bps", "4"], "--lattice, --kv-bps: --model"),
    (["--reference", "tiny-pixart"], "--reference tiny-pixart is a pixart model"),
    (["--reference", "/no/such/dir"], "neither a tiny model key"),
])
def test_quantized_dir_refuses_what_it_fixes_in_one_line(saved, tmp_path, capsys, extra, words):
    rc, _, err = _run(capsys, "--model", str(saved / "recorded"), "--out", str(tmp_path / "r"), *extra)
    assert rc == 2 and "\n" not in err and words in err, err


def test_reference_must_be_float_and_only_for_a_quantized_model(saved, tmp_path, capsys):
    rc, _, err = _run(capsys, "--model", str(saved / "anonymous"), "--reference", str(saved / "recorded"),
                      "--out", str(tmp_path / "r"))
    assert rc == 2 and "\n" not in err and "itself saved quantized" in err, err
    rc, _, err = _run(capsys, "--model", "tiny-ltx", "--reference", "tiny-ltx", "--out", str(tmp_path / "s"))
    assert rc == 2 and "\n" not in err and "--reference applies to a --model saved quantized" in err, err


def test_a_broken_quantized_dir_is_one_line(saved, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(saved / "recorded", bad)
    st = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    st.write_bytes(st.read_bytes()[:-64])  # truncated
    rc, _, err = _run(capsys, "--model", str(bad), "--out", str(tmp_path / "r"))
    assert rc == 2 and "\n" not in err and "diffusion_pytorch_model.safetensors" in err, err
    assert not (tmp_path / "r" / "report.json").exists()
    # a quantization_config without an HQConfig rate
    bad2 = tmp_path / "bad2"
    shutil.copytree(saved / "recorded", bad2)
    cfg_file = bad2 / "transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["config"] = {}
    cfg_file.write_text(json.dumps(cfg))
    rc, _, err = _run(capsys, "--model", str(bad2), "--out", str(tmp_path / "r2"))
    assert rc == 2 and "\n" not in err and "carries no HQConfig bps" in err, err


def test_eval_of_a_quantized_dir_against_the_recorded_reference(saved, tmp_path, capsys):
    out = tmp_path / "run"
    rc, text, err = _run(capsys, "--model", str(saved / "recorded"), "--out", str(out))
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert not rep["no_reference"]
    assert rep["config"]["reference"].startswith("tiny-ltx-trained, unquantized, float32")
    assert rep["config"]["quantized"].startswith("saved quantized in")
    e = rep["prompts"][0]
    assert 30.0 < e["means"]["psnr"] < 99.0 and e["content"]["ref"] is not None
    assert e["seconds"] > 0
    with np.load(out / e["frames"]) as z:
        assert z["ref"].shape == z["quant"].shape == (9, 32, 32, 3)
        # the quantized side is the saved pipeline as stored: its frames equal a fresh load's
        from hq_diffusion.models import generate
        from hq_diffusion.eval.files import to_uint8

        cfg = _cfg("--model", str(saved / "recorded"), "--num-prompts", "1", "--steps", "2",
                   "--out", str(tmp_path / "x"))
        pipe = hq_diffusion.load_quantized(str(saved / "recorded"))
        pipe.set_progress_bar_config(disable=True)
        again = to_uint8(generate(pipe, "ltx", e["prompt"], 0, **cfg.call_overrides))
        np.testing.assert_array_equal(z["quant"], again)
    q = rep["quantization"]["4"]
    assert abs(q["weighted_bps"] - 4.0) < 0.05  # every stored bit, measured on the loaded pipeline
    assert NO_REFERENCE not in text and "reference: tiny-ltx-trained" in text


def test_quant_only_run_says_so_in_report_table_and_page(saved, tmp_path, capsys):
    out = tmp_path / "run"
    # no recorded origin: the pipeline class's own defaults apply, so the test names the tiny size
    rc, text, err = _run(capsys, "--model", str(saved / "anonymous"), "--out", str(out), "--frames", "9",
                         "--height", "32", "--width", "32", "--prompts", shapes_prompts_file())
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["no_reference"] and rep["config"]["reference"].startswith("none (no float reference")
    e = rep["prompts"][0]
    assert e["means"]["psnr"] is None and e["content"]["ref"] is None and e["content"]["quant"] is not None
    assert rep["content"]["4"]["ref"] is None and rep["content"]["4"]["quant"] is not None
    assert rep["suite"]["4"]["psnr"] is None and rep["suite"]["4"]["worst_prompt"] is None
    summary = json.loads((out / "items" / "4" / "summary.json").read_text())
    assert summary["run"]["generate_seconds"] > 0 and summary["run"]["peak_memory_bytes"] > 0
    assert abs(summary["summary"]["weighted_bps"] - 4.0) < 0.05
    with np.load(out / e["frames"]) as z:
        assert z.files == ["quant"] and z["quant"].shape == (9, 32, 32, 3)
    assert os.path.getsize(out / e["video"]) > 0
    page = (out / "report.html").read_text()
    assert "id='no-reference'" in page and "PSNR/SSIM not computed" in page
    assert "plot-per-frame" not in page and "still-" not in page  # no empty comparison charts
    assert f"NOTE    {NO_REFERENCE}" in text
    # merge-only of the same run gives the same report
    assert cli.main(["--merge-only", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["no_reference"]


def test_build_config_error_type(saved, tmp_path):
    with pytest.raises(EvalInputError, match="--bps"):
        _cfg("--model", str(saved / "recorded"), "--bps", "4", "--out", str(tmp_path / "z"))
