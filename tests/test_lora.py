"""LoRA on a quantized transformer through diffusers' own API (issue 12): ``load_lora_weights``, ``set_adapters``,
``fuse_lora`` / ``unfuse_lora``, ``unload_lora_weights``.

A LoRA is trained for a few steps with peft on the tiny float LTX transformer and saved with
``LTXPipeline.save_lora_weights``; the same file is loaded into the float pipeline and into the quantized one. The
adapter runs in float beside the compressed weight (no float weight parameter on any quantized layer), changes the
output as it does on the float model (within the quantization error), is scaled by ``set_adapters``, and is removed
bit for bit by ``unload_lora_weights``; ``fuse_lora`` refuses, naming the layer, and changes nothing.
"""
from __future__ import annotations

import pytest
import torch

import hq_diffusion
from hq_diffusion.models import tiny_pipeline
from hq_diffusion.nn.linear import HQLinear

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers import LTXPipeline  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from hq_diffusion.integrations.lora import HQLoraLinear, LoraFuseError  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def _inputs(transformer, seed=0):
    """Fixed transformer inputs: 2x4x4 latent tokens (B=1), 6 caption tokens."""
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    return dict(hidden_states=torch.randn(1, 32, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 6, c.caption_channels, generator=g),
                timestep=torch.tensor([500.0]), encoder_attention_mask=torch.ones(1, 6),
                num_frames=2, height=4, width=4, return_dict=False)


def _out(pipe, seed=0):
    with torch.no_grad():
        return pipe.transformer(**_inputs(pipe.transformer, seed))[0].clone()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A rank-4 LoRA trained for 8 Adam steps on the float tiny LTX transformer, saved with diffusers."""
    pipe = tiny_pipeline("ltx", 0)
    tr = pipe.transformer
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for n, p in tr.named_parameters() if "lora_" in n]
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.Adam(params, lr=5e-3)
    kw = _inputs(tr, seed=1)
    target = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(2))
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(tr(**kw)[0], target)
        loss.backward()
        opt.step()
    d = tmp_path_factory.mktemp("lora")
    LTXPipeline.save_lora_weights(d, transformer_lora_layers=get_peft_model_state_dict(tr))
    return d


@pytest.fixture(scope="module")
def float_outputs(lora_dir):
    pipe = tiny_pipeline("ltx", 0)
    base = _out(pipe)
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    full = _out(pipe)
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    return base, full, _out(pipe)


@pytest.fixture()
def qpipe():
    pipe = tiny_pipeline("ltx", 0)
    hq_diffusion.quantize(pipe, bps=4.0, progress=False)
    return pipe


def _no_float_weight(transformer):
    for name, module in transformer.named_modules():
        if isinstance(module, HQLoraLinear):
            assert isinstance(module.get_base_layer(), HQLinear), name
    names = [n for n, _ in transformer.named_parameters()]
    hq_paths = {n for n, m in transformer.named_modules() if isinstance(m, HQLinear)}
    assert hq_paths
    assert not [n for n in names if n.rsplit(".", 1)[0] in hq_paths and not n.endswith(".bias")]


def test_lora_runs_beside_compressed_weight(lora_dir, float_outputs, qpipe):
    f_base, f_lora, _ = float_outputs
    q_base = _out(qpipe)
    buffers = {n: b.clone() for n, b in qpipe.transformer.named_buffers()}
    qpipe.load_lora_weights(lora_dir, adapter_name="style")
    wrapped = [m for m in qpipe.transformer.modules() if isinstance(m, HQLoraLinear)]
    from safetensors.torch import load_file
    n_adapted = sum(k.endswith("lora_A.weight") for k in load_file(lora_dir / "pytorch_lora_weights.safetensors"))
    assert len(wrapped) == n_adapted == 20  # 2 blocks x (2 attentions x 4 + 2 ff): every adapted layer quantized
    _no_float_weight(qpipe.transformer)
    q_lora = _out(qpipe)
    f_delta, q_delta = f_lora - f_base, q_lora - q_base
    assert _rel(f_lora, f_base) > 0.05  # the LoRA matters
    assert _rel(q_delta, f_delta) < 0.25  # and changes the quantized output as it changes the float one
    assert _rel(q_lora, f_lora) < 2.0 * _rel(q_base, f_base)  # float+LoRA within the quantization error
    # the compressed buffers are untouched (same names, same bits; LoRA adds no buffer)
    after = {n.replace(".base_layer", ""): b for n, b in qpipe.transformer.named_buffers()}
    assert after.keys() == buffers.keys()
    assert all(torch.equal(after[n], b) for n, b in buffers.items())


def test_set_adapters_scales_and_unload_is_exact(lora_dir, float_outputs, qpipe):
    f_base, f_full, f_half = float_outputs
    q_base = _out(qpipe)
    qpipe.load_lora_weights(lora_dir, adapter_name="style")
    q_full = _out(qpipe)
    qpipe.set_adapters(["style"], adapter_weights=[0.5])
    q_half = _out(qpipe)
    assert 0.3 < _rel(q_half, q_base) / _rel(q_full, q_base) < 0.7
    assert _rel(q_half - q_base, f_half - f_base) < 0.25  # scaled as the float model's adapter is
    qpipe.set_adapters(["style"], adapter_weights=[0.0])
    assert torch.equal(_out(qpipe), q_base)
    qpipe.set_adapters(["style"], adapter_weights=[1.0])
    assert torch.equal(_out(qpipe), q_full)
    qpipe.unload_lora_weights()
    assert not any(isinstance(m, HQLoraLinear) for m in qpipe.transformer.modules())
    assert torch.equal(_out(qpipe), q_base)


def test_fuse_refuses_and_changes_nothing(lora_dir, qpipe):
    qpipe.load_lora_weights(lora_dir, adapter_name="style")
    before = _out(qpipe)
    with pytest.raises(LoraFuseError, match=r"quantized layer 'transformer_blocks\.0\.attn1\.to_q'.*dequantize"):
        qpipe.fuse_lora(lora_scale=0.5)
    with pytest.raises(LoraFuseError):
        qpipe.transformer.fuse_lora()
    qpipe.unfuse_lora()  # nothing was fused: a no-op
    assert torch.equal(_out(qpipe), before)
    assert all(not m.merged for m in qpipe.transformer.modules() if isinstance(m, HQLoraLinear))


def test_every_lora_config_dispatches_hqlinear():
    assert LoraConfig(r=2)._custom_modules == {HQLinear: HQLoraLinear}
    layer = HQLinear.from_linear(torch.nn.Linear(64, 32), name="blk.proj")
    with pytest.raises(ValueError, match="'blk.proj': use_dora=True is not supported"):
        HQLoraLinear(layer, "a", LoraConfig(r=2, use_dora=True), r=2, lora_alpha=2)


def test_registration_when_peft_is_imported_before_hq_diffusion():
    """A fresh interpreter that imports peft first: ``import hq_diffusion`` still puts the HQLinear mapping in
    every LoraConfig (the in-process tests cover hq_diffusion first)."""
    import subprocess
    import sys

    code = "\n".join(["import peft", "import hq_diffusion", "from peft import LoraConfig",
                      "from hq_diffusion.nn.linear import HQLinear",
                      "print(HQLinear in (LoraConfig(r=1)._custom_modules or {}))"])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "True"
