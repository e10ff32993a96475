"""``torch.compile`` of a transformer whose attention K/V are quantized (``kv_bps``): the dither clock's tick and
each processor's quantization run as opaque custom ops, so that ``fullgraph=True`` captures the forward, a new
timestep does not recompile, and the compiled pipeline gives the eager frames and the same K/V bit accounting.

Dynamo runs with the ``eager`` backend (capture, guards and the ops' run-time side effects are what is tested);
one family also runs through inductor.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hq_diffusion
from hq_diffusion.integrations.kv_processors import HQKVProcessor, kv_summary, reset_kv_state
from hq_diffusion.models import generate, tiny_pipeline, tiny_transformer
from hq_diffusion.tiny.transformers import example_inputs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _frames(out) -> np.ndarray:
    return np.asarray(out["frames"] if isinstance(out, dict) else out, dtype=np.float32)


def _pipeline_runs(pipe, name: str, steps: int = 2):
    """Frames and K/V summary of one generation from a fresh K/V state."""
    reset_kv_state(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = generate(pipe, name, "a red cat", 0, num_inference_steps=steps)
    return _frames(out), kv_summary(pipe.transformer)


@pytest.mark.parametrize("name", ["ltx", "ltx2", "flux", "pixart"])
def test_compiled_pipeline_with_kv_quantization_matches_eager(name):
    """Each explicit processor (LTX, LTX-2, Flux) and the generic SDPA path (PixArt): a two-step generation with
    the transformer compiled (``fullgraph=True``) gives the eager frames, without a recompile for the second
    step's timestep, and counts the same calls and bits."""
    pipe = tiny_pipeline(name, 0)
    hq_diffusion.quantize(pipe, bps=4.0, kv_bps=4.0, progress=False)
    procs = [m.processor for m in pipe.transformer.modules()
             if isinstance(getattr(m, "processor", None), HQKVProcessor)]
    assert procs
    eager_frames, eager_kv = _pipeline_runs(pipe, name)
    transformer = pipe.transformer
    counter = CompileCounterWithBackend("eager")
    pipe.transformer = torch.compile(transformer, backend=counter, fullgraph=True)
    try:
        frames, kv = _pipeline_runs(pipe, name)
        frames_again, kv_again = _pipeline_runs(pipe, name)
    finally:
        pipe.transformer = transformer
    # a forward graph and the clock's pre-hook graph, both captured on the first step and never again
    assert counter.frame_count <= 2, counter.frame_count
    np.testing.assert_allclose(frames, eager_frames, atol=2e-5, rtol=0)
    np.testing.assert_array_equal(frames_again, frames)  # the same call repeats its dither exactly
    assert kv == kv_again and kv["calls"] >= 2 * len(procs)  # every processor, both steps
    # the same accounting as eager; the rate within a few bits (the compiled graph may round K/V differently in
    # the last float bit before they reach the op, which can move a lattice point at a Voronoi boundary)
    assert {k: v["calls"] for k, v in kv["per_module"].items()} == \
        {k: v["calls"] for k, v in eager_kv["per_module"].items()}
    assert (kv["calls"], kv["scalars"], kv["config"]) == (eager_kv["calls"], eager_kv["scalars"], eager_kv["config"])
    assert kv["bits_per_scalar"] == pytest.approx(eager_kv["bits_per_scalar"], abs=1e-4)


def test_without_the_clock_op_the_compiled_dither_goes_stale(monkeypatch):
    """The check above can fail: if the compiled forward skips the clock's tick, both denoising steps draw the
    dither of the eager run's last state, and the frames differ from eager."""
    from hq_diffusion.integrations import kv_processors

    pipe = tiny_pipeline("ltx", 0)
    hq_diffusion.quantize(pipe, bps=4.0, kv_bps=4.0, progress=False)
    eager_frames, _ = _pipeline_runs(pipe, "ltx", steps=3)
    real = kv_processors._DitherClock.__call__

    def no_tick_when_compiled(self, module, args, kwargs):
        if not torch.compiler.is_compiling():
            return real(self, module, args, kwargs)

    monkeypatch.setattr(kv_processors._DitherClock, "__call__", no_tick_when_compiled)
    transformer = pipe.transformer
    pipe.transformer = torch.compile(transformer, backend="eager", fullgraph=True)
    try:
        frames, _ = _pipeline_runs(pipe, "ltx", steps=3)
    finally:
        pipe.transformer = transformer
    assert np.abs(frames - eager_frames).max() > 1e-3


def test_sdpa_processor_keeps_the_original_signature():
    """diffusers passes a processor only the keyword arguments its ``__call__`` names: the generic processor's
    class (one per wrapped processor class) presents the original's signature."""
    import inspect

    t = tiny_transformer("sana")
    hq_diffusion.quantize(t, bps=4.0, kv_bps=4.0, progress=False)
    for m in t.modules():
        p = getattr(m, "processor", None)
        if isinstance(p, HQKVProcessor):
            assert inspect.signature(p.__call__).parameters.keys() == \
                inspect.signature(p.original.__call__).parameters.keys()
            assert type(p).__name__ == f"HQKVSDPAProcessor[{type(p.original).__name__}]"


def test_inductor_on_cpu_with_kv_quantization():
    """The whole tiny Sana transformer with K/V quantization through inductor: the eager output, the same K/V
    calls and scalars, the rate within a few bits."""
    t = tiny_transformer("sana")
    hq_diffusion.quantize(t, bps=4.0, kv_bps=4.0, progress=False)
    kw = example_inputs("sana", t, batch=2, seed=3)
    with torch.no_grad():
        reset_kv_state(t)
        ref = t(**kw)[0]
        ref_kv = kv_summary(t)
        compiled = torch.compile(t, fullgraph=True)
        reset_kv_state(t)
        out = compiled(**kw)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    kv = kv_summary(t)
    assert (kv["calls"], kv["scalars"]) == (ref_kv["calls"], ref_kv["scalars"])
    assert kv["bits_per_scalar"] == pytest.approx(ref_kv["bits_per_scalar"], abs=1e-4)


def test_a_copy_counts_for_itself_when_compiled():
    """A deep copy of a transformer with K/V quantization has its own processors and clock for the compiled
    path's ops: compiling and running the copy counts its calls, not the original's."""
    import copy

    t = tiny_transformer("sana")
    hq_diffusion.quantize(t, bps=4.0, kv_bps=4.0, progress=False)
    twin = copy.deepcopy(t)
    reset_kv_state(t)
    reset_kv_state(twin)
    with torch.no_grad():
        torch.compile(twin, backend="eager", fullgraph=True)(**example_inputs("sana", twin, batch=2))
    assert kv_summary(twin)["calls"] > 0 and kv_summary(t)["calls"] == 0
