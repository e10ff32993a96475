"""The Gradio app (hq_diffusion.app): request validation, the engine's caches, and the served app through
gradio_client (/generate, /limits, over-limit requests). The browser test is tests/test_app_browser.py."""
import math
import os
import subprocess
import sys

import pytest

from hq_diffusion.app.config import (
    KV_CORRECTION_CHOICES,
    LATTICE_CHOICES,
    MMA_CHOICES,
    AppSettings,
    GenerationRequest,
    InputError,
    QuantSettings,
)

# Small, fast generations (a few seconds each on 2 CPU cores).
FAST = dict(frames=5, height=32, width=32, steps=1)


def _api_args(**over):
    args = dict(model="tiny-ltx", prompt="a red robot walking in the city", negative_prompt="", seed=0,
                frames=5, height=32, width=32, steps=1, bps=4.0, lattice="e8", mma="auto", kv_enabled=False,
                kv_bps=4.0, kv_correction="haar+dither")
    args.update(over)
    return args


# ---- validation (no model) ---------------------------------------------------------------------------------

def test_over_limit_request_lists_every_problem():
    req = GenerationRequest(model="tiny-ltx", prompt="x" * 1000, frames=100, steps=500, height=33, width=1024,
                            seed=-1, quant=QuantSettings(bps=9.0, lattice="q", mma="tpu"))
    with pytest.raises(InputError) as ei:
        req.validate(AppSettings(), "ltx")
    text = str(ei.value)
    for needle in ("1000 characters; the limit is 500", "Frames must be of the form 4k+1", "got 100",
                   "Steps must be a whole number from 1 to 50; got 500", "Height must be a multiple of 32",
                   "Width must be a multiple of 32", "Seed must be", "bits per weight must be from 2 to 8",
                   "Lattice must be one of", "Matmul path must be one of"):
        assert needle in text, (needle, text)
    assert len(ei.value.problems) == 9


@pytest.mark.parametrize("frames", [0, 2, 8, 35, 9.5, "9"])
def test_bad_frame_counts(frames):
    with pytest.raises(InputError, match="4k\\+1"):
        GenerationRequest(model="tiny-ltx", prompt="a cat", frames=frames).validate(AppSettings(), "ltx")


def test_valid_request_is_normalized():
    s = AppSettings()
    r = GenerationRequest(model="tiny-ltx", prompt="  a cat  ", seed=3.0, frames=33.0, height=512, width=32,
                          steps=1, quant=QuantSettings(bps=2, kv_enabled=False, kv_bps=7.0, kv_correction="none"))
    v = r.validate(s, "ltx")
    assert (v.prompt, v.seed, v.frames, v.height, v.steps) == ("a cat", 3, 33, 512, 1)
    assert isinstance(v.seed, int) and isinstance(v.frames, int)
    # K/V settings do not matter when K/V is off: one cache key
    assert v.quant.key() == QuantSettings(bps=2.0).key()
    assert v.quant.quantize_kwargs()["kv_bps"] is None
    # image models: one frame whatever was sent
    assert GenerationRequest(model="tiny-flux", prompt="a cat", frames=100).validate(s, "flux").frames == 1
    with pytest.raises(InputError, match="prompt is empty"):
        GenerationRequest(model="tiny-ltx", prompt="   ").validate(s, "ltx")
    with pytest.raises(InputError, match="Unknown model"):
        GenerationRequest(model="/etc", prompt="a cat").validate(s, None)
    with pytest.raises(InputError, match="K/V bits per scalar"):
        GenerationRequest(model="tiny-ltx", prompt="a", quant=QuantSettings(kv_enabled=True, kv_bps=1.0)
                          ).validate(s, "ltx")


def test_choices_match_the_quantizer():
    from hq_diffusion.codec.lattice import LATTICES
    from hq_diffusion.integrations import config as qc

    assert set(LATTICE_CHOICES) == set(LATTICES)
    assert tuple(MMA_CHOICES) == tuple(qc.MMA_CHOICES)
    assert set(KV_CORRECTION_CHOICES) == set(qc.KV_CORRECTIONS)


def test_settings_reject_unknown_models_and_bad_numbers(tmp_path):
    with pytest.raises(ValueError, match="neither a tiny model"):
        AppSettings(models=("ltx-13b",))
    with pytest.raises(ValueError, match="max_concurrency"):
        AppSettings(max_concurrency=0)
    assert AppSettings().host == "127.0.0.1" and AppSettings().is_loopback
    assert not AppSettings(host="0.0.0.0").is_loopback
    from hq_diffusion.app.engine import resolve_kind

    with pytest.raises(ValueError, match="no model_index.json"):
        resolve_kind(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ValueError, match="not supported"):
        resolve_kind(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "LTXPipeline"}')
    assert resolve_kind(str(tmp_path)) == "ltx"


def test_no_work_at_import():
    """Importing the app modules loads neither Gradio nor torch/diffusers and starts nothing."""
    code = ("import sys; import hq_diffusion.app.server, hq_diffusion.app.ui, hq_diffusion.app.engine, "
            "hq_diffusion.app.config, hq_diffusion.app.screenshot, hq_diffusion.bench.app_load; "
            "bad = [m for m in ('gradio', 'torch', 'diffusers', 'selenium') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_server_cli_rejects_a_bad_model(capsys):
    from hq_diffusion.app.server import main

    assert main(["--model", "no-such-model-dir"]) == 2
    assert "neither a tiny model" in capsys.readouterr().err


# ---- the engine (tiny models, real quantizer) ------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from hq_diffusion.app.engine import Engine

    e = Engine(AppSettings(quant_cache_size=1), workdir=str(tmp_path_factory.mktemp("engine")))
    yield e
    e.close()


def test_engine_caches_and_never_touches_the_bf16_pipeline(engine):
    from hq_diffusion.nn.linear import HQLinear

    steps = []
    r1 = engine.run(GenerationRequest(model="tiny-ltx", prompt="a red cat", **FAST),
                    progress=lambda f, d: steps.append((f, d)))
    assert steps[-1] == (1.0, "done") and any("bf16: step" in d for _, d in steps)
    assert all(0 <= f <= 1 for f, _ in steps)
    m1 = r1.metrics()
    assert not m1["timings"]["bf16_cached"] and not m1["timings"]["quantized_pipeline_cached"]
    assert m1["output"] == {"frames": 5, "height": 32, "width": 32}
    assert len(m1["per_frame"]["psnr"]) == 5 and all(math.isfinite(p) for p in m1["per_frame"]["psnr"])
    assert 0.0 < m1["means"]["ssim"] <= 1.0
    w = m1["compression"]["weights"]
    assert w["ratio"] > 3.0 and abs(w["bits_per_weight"] - 4.0) < 0.1 and w["layers_quantized"] > 0
    assert m1["compression"]["kv"] == {"enabled": False}
    for p in (r1.bf16_video, r1.quant_video, r1.error_video):
        assert os.path.getsize(p) > 0
    # the bf16 pipeline is untouched; the quantized one is a separate copy
    bf16_pipe = engine._loaded["tiny-ltx"].pipe
    assert not any(isinstance(m, HQLinear) for m in bf16_pipe.transformer.modules())
    (qpipe,) = [q.pipe for q in engine._quant.values()]
    assert qpipe.transformer is not bf16_pipe.transformer and qpipe.scheduler is not bf16_pipe.scheduler
    assert any(isinstance(m, HQLinear) for m in qpipe.transformer.modules())

    # same request: bf16 from the cache, same quantized pipeline, same outputs
    r2 = engine.run(GenerationRequest(model="tiny-ltx", prompt="a red cat", **FAST))
    m2 = r2.metrics()
    assert m2["timings"]["bf16_cached"] and m2["timings"]["quantized_pipeline_cached"]
    assert m2["digests"] == m1["digests"]

    # new quantization settings (K/V on): re-quantized (LRU of 1 drops the old one), bf16 still cached
    q = QuantSettings(bps=3.0, lattice="d4", kv_enabled=True, kv_bps=4.0, kv_correction="signs+dither")
    r3 = engine.run(GenerationRequest(model="tiny-ltx", prompt="a red cat", quant=q, **FAST))
    m3 = r3.metrics()
    assert m3["timings"]["bf16_cached"] and not m3["timings"]["quantized_pipeline_cached"]
    assert m3["digests"]["bf16_sha256"] == m1["digests"]["bf16_sha256"]
    assert m3["digests"]["quantized_sha256"] != m1["digests"]["quantized_sha256"]
    assert abs(m3["compression"]["weights"]["bits_per_weight"] - 3.0) < 0.1
    kv = m3["compression"]["kv"]
    assert kv["enabled"] and 3.5 < kv["bits_per_scalar"] < 5.0 and kv["attention_modules"] > 0
    assert len(engine._quant) == 1
    assert engine.stats["quantizations"] == 2 and engine.stats["bf16_generations"] == 1

    # back to the first settings: evicted, so quantized again, and deterministic
    r4 = engine.run(GenerationRequest(model="tiny-ltx", prompt="a red cat", **FAST))
    assert not r4.timings["quantized_pipeline_cached"]
    assert r4.digests == r1.digests


def test_engine_image_model_and_failures(engine):
    r = engine.run(GenerationRequest(model="tiny-pixart", prompt="a small boat", frames=9, height=32, width=32,
                                     steps=1))
    m = r.metrics()
    assert m["output"]["frames"] == 1 and m["request"]["frames"] == 1 and m["pipeline"] == "pixart"
    with pytest.raises(InputError):
        engine.run(GenerationRequest(model="tiny-ltx", prompt="x" * 501, **FAST))


def test_quantizer_failure_is_reported(tmp_path):
    from hq_diffusion.app.engine import Engine

    def broken_quantize(pipe, **kwargs):
        raise RuntimeError("codec exploded")

    e = Engine(AppSettings(), quantize_fn=broken_quantize, workdir=str(tmp_path))
    try:
        with pytest.raises(RuntimeError, match="codec exploded"):
            e.run(GenerationRequest(model="tiny-ltx", prompt="a cat", **FAST))
        assert not e._quant  # nothing half-quantized is cached
    finally:
        e.close()


# ---- the served app through gradio_client ------------------------------------------------------------------

@pytest.fixture(scope="module")
def served():
    pytest.importorskip("gradio_client")
    from hq_diffusion.app.server import start

    app = start(AppSettings(port=0, max_concurrency=2), preload=False)
    try:
        yield app
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served.url, verbose=False)


def test_served_on_loopback_without_share_or_analytics(served):
    assert served.url.startswith("http://127.0.0.1:")
    assert served.demo.share is False
    assert served.demo.analytics_enabled is False
    assert served.demo.server_name == "127.0.0.1"


def test_generate_api(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert "/generate" in api and "/limits" in api
    bf16, quant, err, plot, text, card, metrics = client.predict(**_api_args(), api_name="/generate")
    for v in (bf16, quant, err):
        path = v["video"] if isinstance(v, dict) else v
        assert path.endswith(".mp4") and os.path.getsize(path) > 0
    assert metrics["model"] == "tiny-ltx" and metrics["output"]["frames"] == 5
    assert all(math.isfinite(p) for p in metrics["per_frame"]["psnr"])
    assert metrics["means"]["psnr"] > 10 and 0 < metrics["means"]["ssim"] <= 1
    assert metrics["lpips"]["available"] or metrics["lpips"]["reason"]
    assert "Mean PSNR" in text and ("LPIPS" in text)
    assert "bits/weight" in card and "MB" in card and "×" in card
    assert [row[0] for row in plot["data"]] == list(range(5))


def test_over_limit_api_request_gets_a_clear_message(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as ei:
        client.predict(**_api_args(prompt="x" * 1000, frames=100, steps=500), api_name="/generate")
    msg = str(ei.value)
    assert "The prompt has 1000 characters; the limit is 500." in msg
    assert "Frames must be of the form 4k+1 between 1 and 33" in msg and "got 100" in msg
    assert "Steps must be a whole number from 1 to 50; got 500." in msg
    assert "Traceback" not in msg and "File \"" not in msg
    with pytest.raises(AppError, match="Unknown model 'nope'"):
        client.predict(**_api_args(model="nope"), api_name="/generate")


def test_limits_api(client):
    out = client.predict(api_name="/limits")
    assert out["limits"]["prompt_max_chars"] == 500 and out["limits"]["frames_max"] == 33
    assert out["models"][0] == "tiny-ltx-trained" and "tiny-ltx" in out["models"]  # trained default, random kept


def test_ltx2_through_the_api(client):
    *_, metrics = client.predict(**_api_args(model="tiny-ltx2", kv_enabled=True), api_name="/generate")
    assert metrics["pipeline"] == "ltx2" and metrics["output"]["frames"] == 5
    assert metrics["compression"]["kv"]["enabled"]
    assert 3.5 < metrics["compression"]["kv"]["bits_per_scalar"] < 5.0
    snr = metrics["audio_snr_db"]  # LTX-2 makes audio too: compared as well (not muxed into the videos)
    assert snr == "inf" or (isinstance(snr, float) and math.isfinite(snr))


def test_cli_serves_on_loopback_and_stops_on_sigterm():
    """`hq-diffusion app` (through the package's command line) binds 127.0.0.1 and exits cleanly on SIGTERM."""
    import time
    import urllib.request

    from hq_diffusion.app.server import free_port

    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "-m", "hq_diffusion.cli", "app", "--port", str(port), "--model",
                             "tiny-flux"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        page = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    page = r.read().decode("utf-8", "replace")
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None and "hq-diffusion" in page, "the app did not serve its page"
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert f"serving on http://127.0.0.1:{port}/" in out and "stopping" in out
    assert "Traceback" not in out


# ---- defaults for the trained model; --model QUANTIZED_DIR ---------------------------------------------------

def test_ui_defaults_suit_the_trained_default_model():
    from hq_diffusion.app.ui import EXAMPLES, RANDOM_EXAMPLES, ui_defaults
    from hq_diffusion.eval.files import read_prompts, shapes_prompts_file
    from hq_diffusion.integrations import families

    assert AppSettings().default_model == "tiny-ltx-trained"
    d = ui_defaults("tiny-ltx-trained")
    want = families.trained("tiny-ltx-trained").call_defaults["num_inference_steps"]
    assert (d["height"], d["width"], d["frames"], d["steps"]) == (32, 32, 9, want)
    assert d["examples"] == EXAMPLES == read_prompts(shapes_prompts_file()) and len(EXAMPLES) == 16
    # the random-weight models stay selectable, with their own examples
    assert "tiny-ltx" in AppSettings().models and ui_defaults("tiny-ltx")["examples"] == RANDOM_EXAMPLES
    # the defaults are a valid request under the app's limits
    GenerationRequest(model="tiny-ltx-trained", prompt=EXAMPLES[0], frames=d["frames"], height=d["height"],
                      width=d["width"], steps=d["steps"]).validate(AppSettings(), "ltx")
