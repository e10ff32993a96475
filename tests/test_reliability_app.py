"""Reliability of the app (issue 10, findings 11-14): per-request K/V state, the work budget, cancellation,
a bounded queue, clear messages for malformed input, a clean stop on SIGTERM, and the soak benchmark's code
path on a small count."""
import signal
import threading
import time

import pytest

from test_app import _api_args  # the /generate arguments of a small request (tests/ is on sys.path)

from hq_diffusion.app.config import COST_MAX, AppSettings, GenerationRequest, InputError, Limits, QuantSettings

FAST = dict(frames=5, height=32, width=32, steps=1)
KV = QuantSettings(kv_enabled=True, kv_bps=4.0, kv_correction="haar+dither")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from hq_diffusion.app.engine import Engine

    e = Engine(AppSettings(), workdir=str(tmp_path_factory.mktemp("engine")))
    yield e
    e.close()


# ---- 11: K/V dither state is per request ------------------------------------------------------------------

def test_identical_kv_requests_give_identical_frames_and_kv_bytes(engine):
    req = GenerationRequest(model="tiny-ltx", prompt="a red cat", quant=KV, **FAST)
    runs = [engine.run(req).metrics() for _ in range(3)]
    assert runs[1]["timings"]["quantized_pipeline_cached"] and runs[2]["timings"]["quantized_pipeline_cached"]
    assert len({r["digests"]["quantized_sha256"] for r in runs}) == 1, [r["means"]["psnr"] for r in runs]
    assert len({r["means"]["psnr"] for r in runs}) == 1
    kv_bytes = [r["compression"]["kv"]["bytes_quantized"] for r in runs]
    assert kv_bytes[0] > 0 and len(set(kv_bytes)) == 1, kv_bytes


# ---- 12: the work budget and cancellation ------------------------------------------------------------------

def test_budget_rejects_an_expensive_request_before_any_work(engine):
    lim = Limits()
    assert lim.cost(33, 512, 512, 50) > COST_MAX == lim.cost_max
    assert lim.cost(9, 64, 64, 4) <= COST_MAX  # the UI's defaults fit
    before = dict(engine.stats)
    with pytest.raises(InputError) as ei:
        engine.run(GenerationRequest(model="tiny-ltx", prompt="a cat", frames=33, height=512, width=512, steps=50))
    (msg,) = ei.value.problems
    assert "frame-pixel-steps" in msg and "the limit is" in msg and "Lower the frames" in msg
    assert engine.stats == before


def test_cancel_stops_between_steps_and_frees_the_model_lock(engine):
    from hq_diffusion.app.engine import GenerationCancelled

    cancel = threading.Event()
    seen = []

    def progress(f, desc):
        seen.append(desc)
        if desc.startswith("bf16: step 1/"):
            cancel.set()  # as the UI does when the client cancels

    req = GenerationRequest(model="tiny-ltx", prompt="a cancelled cat", frames=5, height=32, width=32, steps=6)
    with pytest.raises(GenerationCancelled, match="cancelled"):
        engine.run(req, progress=progress, cancel=cancel)
    assert not any(d.startswith("bf16: step 2/") for d in seen), seen  # stopped at the next step
    assert not engine._model_lock.locked()
    assert not any(k[1] == "a cancelled cat" for k in engine._bf16)  # nothing half-done is cached
    assert engine.run(req).request.prompt == "a cancelled cat"  # the engine still works


def test_shutdown_refuses_new_runs(tmp_path):
    from hq_diffusion.app.engine import Engine, GenerationCancelled
    from hq_diffusion.app.server import stop_handler

    e = Engine(AppSettings(), workdir=str(tmp_path))
    stop = threading.Event()
    stop_handler(e, stop)(signal.SIGTERM, None)
    assert stop.is_set() and e.shutdown(timeout=0)
    with pytest.raises(GenerationCancelled, match="shutting down"):
        e.run(GenerationRequest(model="tiny-ltx", prompt="a cat", **FAST))
    e.close()


# ---- 13: clear messages ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, needle", [
    ("\ud800", "not valid text"),
    ("a cat \udfff", "lone surrogate, at position 6"),
    (7, "must be text; got int 7"),
    (["a", "cat"], "must be text; got list"),
    (None, "must be text; got NoneType"),
])
def test_malformed_prompts_get_specific_messages(prompt, needle):
    with pytest.raises(InputError) as ei:
        GenerationRequest(model="tiny-ltx", prompt=prompt).validate(AppSettings(), "ltx")
    (msg,) = ei.value.problems
    assert needle in msg and "empty" not in msg, msg
    with pytest.raises(InputError, match="negative prompt contains a character"):
        GenerationRequest(model="tiny-ltx", prompt="a", negative_prompt="\ud800").validate(AppSettings(), "ltx")


@pytest.fixture(scope="module")
def served():
    """The app with one generation at a time and one waiting place, and a gradio_client on it."""
    Client = pytest.importorskip("gradio_client").Client
    from hq_diffusion.app.server import start

    with start(AppSettings(port=0, max_concurrency=1, queue_size=1), preload=False) as app:
        app.client = Client(app.url, verbose=False)
        yield app


def test_api_too_few_arguments_and_bad_prompts(served):
    from gradio_client.exceptions import AppError

    from hq_diffusion.bench.app_load import raw_generate

    out = raw_generate(served.url, ["tiny-ltx", "a cat"])
    assert "event: error" in out and '"error": null' not in out, out
    assert "takes 14 arguments" in out and "got 2" in out and "Missing: negative_prompt, seed" in out, out
    # JSON's "\ud800" escape decodes to a lone surrogate on the server (gradio_client cannot even send one)
    out = raw_generate(served.url, list(_api_args(prompt="a cat \ud800").values()))
    assert "not valid text" in out and "TypeError" not in out, out
    for bad, needle in ((12, "must be text; got int"), (["a"], "must be text; got list")):
        with pytest.raises(AppError) as ei:
            served.client.predict(**_api_args(prompt=bad), api_name="/generate")
        assert needle in str(ei.value) and "TypeError" not in str(ei.value), str(ei.value)


def test_client_cancel_stops_the_generation(served):
    """gradio_client's Job.cancel(): Gradio cancels the handler's task and the engine stops at its next step."""
    engine = served.engine
    job = served.client.submit(**_api_args(steps=20, frames=5, height=64, width=64, seed=5), api_name="/generate")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "step" not in str(job.status().progress_data or ""):
        time.sleep(0.1)
    assert engine.inflight == 1
    job.cancel()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and engine.inflight:
        time.sleep(0.1)
    assert engine.inflight == 0 and not engine._model_lock.locked()
    assert not any(k[3] == 5 for k in engine._bf16), "the cancelled generation ran to the end"


def test_queue_is_bounded_with_a_clear_message(served):
    """One generation running, one waiting (queue_size=1): the next is turned away with Gradio's message."""
    gate = threading.Event()
    engine = served.engine
    real = engine._check

    def slow_check(cancel):  # hold the first generation at its first step until the test is done
        gate.wait(60)
        real(cancel)

    engine._check = slow_check
    try:
        from gradio_client import Client

        jobs = [Client(served.url, verbose=False).submit(**_api_args(seed=i), api_name="/generate")
                for i in range(2)]
        time.sleep(2.0)
        with pytest.raises(Exception) as ei:
            served.client.predict(**_api_args(seed=9), api_name="/generate")
        assert "Queue is full" in str(ei.value), str(ei.value)
    finally:
        gate.set()
        engine._check = real
    for j in jobs:
        j.result(timeout=120)


def test_sigterm_during_a_generation_ends_cleanly():
    """`hq-diffusion app` with a generation in flight: SIGTERM cancels it and the process exits 0, with no
    failed video write and no C++ 'terminate called'."""
    import tempfile

    from gradio_client import Client

    from hq_diffusion.bench import app_load

    port = app_load._free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryFile() as log:
        # the server as the benchmark starts it: `python -m hq_diffusion.app.server --model tiny-ltx ...`
        proc = app_load._start_server(app_load._parser().parse_args([]), port, log)
        try:
            app_load._wait_ready(proc, log, url, timeout=120)
            job = Client(url, verbose=False).submit(**_api_args(steps=20, frames=5, height=64, width=64),
                                                    api_name="/generate")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and "step" not in str(job.status().progress_data or ""):
                time.sleep(0.2)
            assert "step" in str(job.status().progress_data or ""), "the generation never started"
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        out = app_load._read_log(log)
    assert proc.returncode == 0, out
    assert "stopping; cancelling 1 generation(s) in flight" in out, out
    assert "terminate called" not in out and ".part.mp4" not in out, out
    assert "Traceback" not in out, out


# ---- 14: the soak benchmark's code path, small -------------------------------------------------------------

def test_soak_code_path_small(capsys):
    from hq_diffusion.bench.app_load import main

    rc = main(["--soak", "--soak-sequential", "4", "--soak-rounds", "2", "--soak-concurrent", "2",
               "--frames", "5", "--size", "32", "--steps", "1", "--timeout", "300"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    assert "RSS" in out.out and "invalid requests" in out.out
