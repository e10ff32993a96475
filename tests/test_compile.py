"""``torch.compile`` of quantized models: one graph for a whole quantized transformer (``fullgraph=True``), at
most one recompile when the input shape changes, compiled output equal to eager within float tolerance.

The whole-transformer checks run Dynamo with the ``eager`` backend (capture and guards are what is tested, and
the capture is the same for every backend); inductor on CPU compiles a small stack of quantized layers (every
storage and matmul path that runs on CPU); the whole tiny transformer through inductor is ``slow``.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hq_diffusion
from hq_diffusion.models import tiny_transformer
from hq_diffusion.nn.linear import HQLinear
from hq_diffusion.tiny.transformers import example_inputs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def sana():
    t = tiny_transformer("sana")
    hq_diffusion.quantize(t, bps=4.0, progress=False)
    assert sum(isinstance(m, HQLinear) for m in t.modules()) >= 10
    return t


def _run(model, **kw):
    with torch.no_grad():
        return model(**kw)[0]


@pytest.mark.parametrize("mma", ["bf16", pytest.param("int8", marks=pytest.mark.slow)])
def test_whole_transformer_is_one_graph_and_recompiles_once_on_a_new_shape(sana, mma):
    for m in sana.modules():
        if isinstance(m, HQLinear):
            m.mma = mma
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(sana, backend=counter, fullgraph=True)
    try:
        for batch in (2, 3, 5):  # a new shape: one recompile (dynamic from then on), then none
            kw = example_inputs("sana", sana, batch=batch, seed=batch)
            torch.testing.assert_close(_run(compiled, **kw), _run(sana, **kw), rtol=1e-5, atol=1e-5)
        assert counter.frame_count <= 2, f"{counter.frame_count} graphs for 3 shapes"
        assert counter.op_count > 100  # the whole transformer, not a fragment
    finally:
        for m in sana.modules():
            if isinstance(m, HQLinear):
                m.mma = "auto"


def test_second_call_reuses_the_first_graph(sana):
    """Calls of the same shape run the first graph: the whole model (whole-layer ops), and a layer traced per
    operation, whose op sets exist before the first trace (built while tracing, they changed what the trace's own
    guards read, and the second call recompiled)."""
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(sana, backend=counter, fullgraph=True)
    kw = example_inputs("sana", sana, batch=2, seed=1)
    for _ in range(3):
        _run(compiled, **kw)
    assert counter.frame_count == 1
    layer = _stack("rice")[0]
    counter = CompileCounterWithBackend("eager")
    per_op = torch.compile(layer.forward_native, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            per_op(torch.randn(4, layer.in_features))
    assert counter.frame_count == 1


def test_rans_layers_are_one_graph_too():
    """Layers that store rANS streams (the default coder, ``auto``, picks rANS for weights of 32768 scalars and
    more) compile into one graph with the eager backend and match eager."""
    net = _stack("rans")
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(net, backend=counter, fullgraph=True)
    x = torch.randn(3, 48)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_without_the_custom_ops_the_graph_breaks(sana, monkeypatch):
    """The check above can fail: with the host-reading operations traced (the layer's forward traced instead of
    its whole-layer op, and the reference op set instead of the per-operation ops), ``fullgraph=True`` refuses
    the model."""
    import hq_diffusion.nn.linear as linear

    monkeypatch.setattr(linear, "_compiled_forward",
                        lambda m, x: linear._apply(m, x, m.resolved_mma(x.device), linear.OP_SETS[m.backend]))
    monkeypatch.setattr(linear, "compiled_opset", lambda ops: ops)
    compiled = torch.compile(sana, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="(?i)graph break|unsupported|data.dependent"):
        _run(compiled, **example_inputs("sana", sana, batch=2))


def _stack(storage: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 40, bias=False))
    if storage == "rans":  # rANS streams in the layer (forced: `auto` keeps Rice below 32768 weights)
        hq_diffusion.quantize(net, bps=4.0, coder="rans", skip=[], progress=False)
    else:
        hq_diffusion.quantize(net, bps=4.0, storage=storage, skip=[], progress=False)
    assert all(isinstance(net[i], HQLinear) and net[i].storage == storage for i in (0, 2))
    return net


@pytest.mark.parametrize("storage", ["rice", "rans", "int8"])
def test_inductor_on_cpu_matches_eager(storage):
    net = _stack(storage)
    compiled = torch.compile(net, fullgraph=True)  # inductor
    for shape in ((5, 48), (2, 7, 48)):  # odd sizes, a new rank
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)


def test_quantizer_says_compileable(sana):
    from hq_diffusion.integrations.diffusers_backend import attach_quantizer

    diffusers = pytest.importorskip("diffusers")
    assert isinstance(sana, diffusers.ModelMixin)
    attach_quantizer(sana)
    assert sana.hf_quantizer.is_compileable


@pytest.mark.slow
def test_whole_tiny_transformer_through_inductor(sana):
    compiled = torch.compile(sana, fullgraph=True)
    kw = example_inputs("sana", sana, batch=2)
    torch.testing.assert_close(_run(compiled, **kw), _run(sana, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_bps", [None, 4.0])
def test_regional_compilation_is_one_graph_for_every_block(kv_bps):
    """diffusers' ``compile_repeated_blocks(fullgraph=True)`` on a 12-block tiny LTX (more blocks than Dynamo's
    recompile limit of 8): one graph serves every block, since no layer's or processor's metadata is a constant
    of the graph (each is named by a handle tensor); the output and the K/V accounting equal eager."""
    diffusers = pytest.importorskip("diffusers")
    from hq_diffusion.bench.compile_step import capture_step
    from hq_diffusion.integrations.kv_processors import kv_summary, reset_kv_state
    from hq_diffusion.models import tiny_pipeline

    pipe = tiny_pipeline("ltx", 0)
    config = dict(pipe.transformer.config, num_layers=12)
    pipe.transformer = t = diffusers.LTXVideoTransformer3DModel.from_config(config)
    hq_diffusion.quantize(pipe, bps=4.0, kv_bps=kv_bps, progress=False)
    kw = capture_step(pipe, "ltx")
    with torch.no_grad():
        reset_kv_state(t)
        ref, ref_kv = t(**kw)[0], kv_summary(t)
        counter = CompileCounterWithBackend("eager")
        t.compile_repeated_blocks(backend=counter, fullgraph=True)
        reset_kv_state(t)
        out, kv = t(**kw)[0], kv_summary(t)
    assert counter.frame_count == 1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert kv == ref_kv


@pytest.mark.parametrize("storage", ["rice", "rans", "int8"])
def test_per_operation_ops_of_hq_linear(storage):
    """``hq_linear`` / ``forward_native`` traced directly (not through ``HQLinear.forward``'s whole-layer op)
    compose the per-operation custom ops: one graph, the eager output."""
    net = _stack(storage)
    for layer in (net[0], net[2]):
        counter = CompileCounterWithBackend("eager")
        compiled = torch.compile(layer.forward_native, backend=counter, fullgraph=True)
        x = torch.randn(5, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer.forward_native(x), rtol=1e-5, atol=1e-5)
        assert counter.frame_count == 1
