"""Offloading a quantized pipeline on CPU (issue 12): diffusers' group offload (block and leaf level, onload device
cpu), ``enable_model_cpu_offload`` and ``enable_sequential_cpu_offload`` with ``device="cpu"``. The compressed
buffers travel with the hooks, no quantized layer ever holds a float weight parameter, and the frames equal the
non-offloaded ones bit for bit. (The GPU issue measures the accelerator side.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hq_diffusion
from hq_diffusion.models import generate, tiny_pipeline
from hq_diffusion.nn.linear import HQLinear

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

PROMPT = "a red cat"


def _qpipe():
    pipe = tiny_pipeline("ltx", 0)
    hq_diffusion.quantize(pipe, bps=4.0, progress=False)
    return pipe


@pytest.fixture(scope="module")
def reference():
    return generate(_qpipe(), "ltx", PROMPT, 0)


def _hq_layers(pipe):
    return [m for m in pipe.transformer.modules() if isinstance(m, HQLinear)]


def _no_float_weight(pipe):
    for m in _hq_layers(pipe):
        assert [n for n, _ in m.named_parameters()] in ([], ["bias"]), m.name
        assert not hasattr(m, "weight"), m.name


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload(reference, offload_type):
    pipe = _qpipe()
    kw = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type=offload_type, **kw)
    # every compressed buffer belongs to a module that carries a group-offload hook (itself or an ancestor)
    hooked = {id(m) for m in pipe.transformer.modules()
              if getattr(m, "_diffusers_hook", None) is not None
              and m._diffusers_hook.get_hook("group_offloading") is not None}
    assert hooked
    names = dict(pipe.transformer.named_modules())
    for path, m in names.items():
        if isinstance(m, HQLinear):
            chain = [names[".".join(path.split(".")[:i])] for i in range(path.count(".") + 1, -1, -1)]
            assert any(id(a) in hooked for a in chain), path
    out = generate(pipe, "ltx", PROMPT, 0)
    np.testing.assert_array_equal(out, reference)
    _no_float_weight(pipe)


def test_model_cpu_offload(reference):
    pipe = _qpipe()
    pipe.enable_model_cpu_offload(device="cpu")
    np.testing.assert_array_equal(generate(pipe, "ltx", PROMPT, 0), reference)
    _no_float_weight(pipe)
    assert all(b.device.type == "cpu" for m in _hq_layers(pipe) for b in m.buffers())


def test_sequential_offload_of_quantized_transformer():
    """accelerate's ``cpu_offload`` (what ``enable_sequential_cpu_offload`` applies per component), buffers
    included: between forwards the compressed buffers sit on the meta device, each forward loads them, and the
    output equals the non-offloaded one bit for bit."""
    from accelerate import cpu_offload

    pipe = _qpipe()
    tr = pipe.transformer
    c = tr.config
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 32, c.in_channels, generator=g),
              encoder_hidden_states=torch.randn(1, 6, c.caption_channels, generator=g),
              timestep=torch.tensor([500.0]), encoder_attention_mask=torch.ones(1, 6), num_frames=2, height=4,
              width=4, return_dict=False)
    with torch.no_grad():
        ref = tr(**kw)[0]
    cpu_offload(tr, execution_device=torch.device("cpu"), offload_buffers=True)
    assert all(b.device.type == "meta" for m in _hq_layers(pipe) for b in m.buffers())
    for _ in range(2):
        with torch.no_grad():
            assert torch.equal(tr(**kw)[0], ref)
        assert all(b.device.type == "meta" for m in _hq_layers(pipe) for b in m.buffers())
    _no_float_weight(pipe)


@pytest.mark.xfail(strict=True, raises=TypeError, reason=(
    "upstream, not ours: on CPU, accelerate's post-forward hook raises the same TypeError (re-creating an "
    "nn.Parameter) on the float tiny pipeline: in its T5 text encoder, and with that excluded, in its other components"))
def test_sequential_cpu_offload(reference):
    """The pipeline-level call; kept as a strict xfail so that it is noticed when the upstream failure is fixed."""
    pipe = _qpipe()
    pipe._exclude_from_cpu_offload.append("text_encoder")
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert all(b.device.type == "meta" for m in _hq_layers(pipe) for b in m.buffers())  # offloaded
    _no_float_weight(pipe)
    np.testing.assert_array_equal(generate(pipe, "ltx", PROMPT, 0), reference)
    assert all(b.device.type == "meta" for m in _hq_layers(pipe) for b in m.buffers())  # and back after use
