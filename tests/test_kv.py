"""Tests for hq_diffusion.nn.kv (K/V quantization, bias correction) and the attention processors of
hq_diffusion.integrations.kv_processors."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from hq_diffusion import models as M
from hq_diffusion.codec.lattice import LATTICES, nearest
from hq_diffusion.integrations.kv_processors import (
    HQKVFluxAttnProcessor,
    HQKVLTX2AttnProcessor,
    HQKVLTXAttnProcessor,
    HQKVSDPAProcessor,
    apply_kv_quantization,
    kv_summary,
    remove_kv_quantization,
    reset_kv_state,
)
from hq_diffusion.nn.kv import (
    KVConfig,
    haar_matrix,
    kv_alpha,
    quantize_kv,
    voronoi_dither,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

LATS = ["e8", "d4", "a2", "z"]
VARIANTS = ["none", "signs", "haar", "none+dither", "signs+dither", "haar+dither"]


def _snr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    return 10 * math.log10(float(ref.square().sum() / (approx - ref).square().sum()))


# ---------------------------------------------------------------------------------------------------------
# KVConfig
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_from_options_and_round_trip(variant):
    cfg = KVConfig.from_options(3.0, variant, lattice="d4", seed=7)
    assert cfg.correction == variant
    assert (cfg.rotation, cfg.dither) == (variant.split("+")[0], variant.endswith("+dither"))
    d = cfg.to_dict()
    assert d["_type"] == "KVConfig" and d["_version"] == 1
    assert KVConfig.from_dict(d) == cfg


@pytest.mark.parametrize("bad", ["", "dither", "haar+", "qjl", "haar+dither+dither", "dither+haar", None])
def test_from_options_rejects(bad):
    with pytest.raises(ValueError, match="kv_correction"):
        KVConfig.from_options(4.0, bad)


@pytest.mark.parametrize("field,value", [("bps", 1.0), ("bps", float("nan")), ("bps", True), ("lattice", "e7"),
                                         ("rotation", "qjl"), ("dither", 1), ("seed", -1), ("seed", 2**32),
                                         ("block", 100), ("block", 4), ("version", 2)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"KVConfig.{field}"):
        KVConfig(**{field: value})


def test_from_dict_is_strict():
    d = KVConfig().to_dict()
    for broken in ({**d, "_type": "CodecConfig"}, {**d, "_version": 2}, {**d, "_data": {**d["_data"], "extra": 1}},
                   {**d, "_data": {k: v for k, v in d["_data"].items() if k != "seed"}}, "KVConfig"):
        with pytest.raises(ValueError):
            KVConfig.from_dict(broken)


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lattice", LATS)
def test_voronoi_dither_is_uniform_on_the_cell(lattice):
    info = LATTICES[lattice]
    g = torch.Generator().manual_seed(0)
    d = voronoi_dither(lattice, (50000, 8), g)
    assert (nearest(lattice, d) == 0).all()  # inside the Voronoi cell of the origin
    assert d.mean().abs() < 0.01
    second = float(d.square().sum(-1).mean()) * info.dim / 8  # per lattice vector
    assert second == pytest.approx(info.voronoi_mse, rel=0.02)


def test_haar_matrix_orthogonal_deterministic_and_keyed():
    a = haar_matrix(64, 0, "blocks.0.attn1/k")
    assert torch.allclose(a @ a.T, torch.eye(64), atol=1e-5)
    assert torch.equal(a, haar_matrix(64, 0, "blocks.0.attn1/k"))
    assert not torch.allclose(a, haar_matrix(64, 0, "blocks.0.attn1/v"))
    assert not torch.allclose(a, haar_matrix(64, 1, "blocks.0.attn1/k"))


def test_quantize_kv_shapes_dtypes_and_reproducibility():
    x = torch.randn(2, 16, 3, 64, dtype=torch.bfloat16)
    cfg = KVConfig(bps=4.0)
    a, sa = quantize_kv(x, cfg, "k", step=3)
    b, _ = quantize_kv(x, cfg, "k", step=3)
    c, _ = quantize_kv(x, cfg, "k", step=4)
    assert a.shape == x.shape and a.dtype == torch.bfloat16
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sa.scalars == x.numel() and sa.vectors == 2 * 16 * 3 and sa.norm_bits == 16 * sa.vectors
    z, sz = quantize_kv(torch.zeros(4, 64), cfg, "k")
    assert torch.equal(z, torch.zeros(4, 64))


# ---------------------------------------------------------------------------------------------------------
# Bias: unbiased with subtractive dither, measurably biased without (so the first test can fail)
# ---------------------------------------------------------------------------------------------------------

def _inner_product_errors(cfg: KVConfig, draws: int = 4, rows: int = 4000, seed: int = 0) -> torch.Tensor:
    """(⟨q, k̂⟩ − ⟨q, k⟩)/(‖q‖‖k‖) for an adversarial key (all coordinates ≈ 1: every coordinate sits at the same
    spot of the lattice grid) and a fixed query, over draws × rows independent quantizations (rows within a
    call get independent dither; calls differ in the dither step)."""
    g = torch.Generator().manual_seed(seed)
    d = 64
    q = torch.ones(d) + 0.5 * torch.randn(d, generator=g)
    errs = []
    for step in range(draws):
        k = torch.ones(rows, d) + 0.02 * torch.randn(rows, d, generator=g)
        k_hat, _ = quantize_kv(k, cfg, "adversarial/k", step=step)
        errs.append(((k_hat - k).double() @ q.double()) / (q.norm() * k.norm(dim=-1)).double())
    return torch.cat(errs)


@pytest.mark.parametrize("rotation", ["none", "haar"])
@pytest.mark.parametrize("lattice", LATS)
def test_dither_makes_inner_products_unbiased(lattice, rotation):
    e = _inner_product_errors(KVConfig(bps=2.0, lattice=lattice, rotation=rotation, dither=True))
    se = float(e.std()) / math.sqrt(e.numel())
    assert abs(float(e.mean())) < 3 * se, (float(e.mean()), se)


@pytest.mark.parametrize("lattice", LATS)
def test_without_dither_the_bias_is_measurable(lattice):
    e = _inner_product_errors(KVConfig(bps=2.0, lattice=lattice, rotation="none", dither=False))
    se = float(e.std()) / math.sqrt(e.numel())
    assert abs(float(e.mean())) > max(10 * se, 0.01), (float(e.mean()), se)


# ---------------------------------------------------------------------------------------------------------
# Rate and quality
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lattice", LATS)
def test_measured_rate_hits_target_for_head_dim_64(lattice):
    x = torch.randn(2, 8, 256, 64, generator=torch.Generator().manual_seed(1))
    for variant in ("none", "haar+dither"):
        for bps in (2.0, 3.0, 4.0):
            _, st = quantize_kv(x, KVConfig.from_options(bps, variant, lattice=lattice), "k")
            assert abs(st.bits_per_scalar - bps) <= 0.15, (variant, bps, st.bits_per_scalar)
            assert st.norm_bits / st.scalars == pytest.approx(16 / 64)


def _attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


@pytest.mark.parametrize("variant", ["haar+dither", "none"])
def test_attention_snr_rises_with_rate(variant):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(4, 128, 64, generator=g) for _ in range(3))
    exact = _attention(q, k, v)
    snrs = []
    for bps in (2.0, 3.0, 4.0, 5.0):
        cfg = KVConfig.from_options(bps, variant)
        k_hat, _ = quantize_kv(k, cfg, "k")
        v_hat, _ = quantize_kv(v, cfg, "v")
        snrs.append(_snr_db(exact, _attention(q, k_hat, v_hat)))
    assert all(b > a + 3.0 for a, b in zip(snrs, snrs[1:])), snrs


@pytest.mark.parametrize("head_dim", [8, 12, 20, 100, 256])
def test_head_dim_not_a_multiple_of_the_lattice_dimension(head_dim):
    x = torch.randn(64, 3, head_dim, generator=torch.Generator().manual_seed(3))
    for lattice in ("e8", "d4"):
        cfg = KVConfig(bps=6.0, lattice=lattice)
        x_hat, st = quantize_kv(x, cfg, "k")
        assert x_hat.shape == x.shape and torch.isfinite(x_hat).all()
        assert _snr_db(x, x_hat) > 15
        assert st.scalars == x.numel() and st.bits_per_scalar < 6.0 + 1.0  # padding is paid for, within reason


def test_rate_too_low_for_the_norm_raises():
    with pytest.raises(ValueError, match="head_dim=8"):
        kv_alpha(KVConfig(bps=2.0), 8)  # the fp16 norm alone costs 2 bits per scalar


# ---------------------------------------------------------------------------------------------------------
# Processors on the tiny pipelines
# ---------------------------------------------------------------------------------------------------------

EXPECTED = {  # name → (processor class, attention modules in the tiny transformer)
    "ltx": (HQKVLTXAttnProcessor, 4),
    "ltx2": (HQKVLTX2AttnProcessor, 12),
    "pixart": (HQKVSDPAProcessor, 4),
    "flux": (HQKVFluxAttnProcessor, 2),
}
PROMPT = "a red robot dancing in the rain"


@pytest.fixture(scope="module")
def pipes():
    return {name: M.tiny_pipeline(name, seed=0) for name in EXPECTED}


def _frames(out):
    return out["frames"] if isinstance(out, dict) else out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_processors_reproduce_diffusers_and_quantize(pipes, name):
    pipe = pipes[name]
    transformer = pipe.transformer
    originals = {n: m.processor for n, m in transformer.named_modules() if hasattr(m, "set_processor")}
    ref = M.generate(pipe, name, PROMPT, seed=0, num_inference_steps=1)

    # Quantization off: same processor math, bit-identical generation (audio included for LTX-2).
    names = apply_kv_quantization(transformer, None)
    cls, count = EXPECTED[name]
    assert len(names) == count
    assert all(isinstance(transformer.get_submodule(n).processor, cls) for n in names)
    off = M.generate(pipe, name, PROMPT, seed=0, num_inference_steps=1)
    np.testing.assert_array_equal(_frames(off), _frames(ref))
    if name == "ltx2":
        np.testing.assert_array_equal(off["audio"], ref["audio"])
        kinds = {n.rsplit(".", 1)[-1] for n in names}
        assert kinds == {"attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn"}

    # Quantization on: runs, finite, close to the reference, measured rate near the target.
    cfg = KVConfig(bps=4.0)
    apply_kv_quantization(transformer, cfg)
    on = M.generate(pipe, name, PROMPT, seed=0, num_inference_steps=1)
    assert np.isfinite(_frames(on)).all()
    summary = kv_summary(transformer)
    assert summary["modules"] == count and summary["config"] == cfg.to_dict()
    assert summary["calls"] >= count and summary["calls_without_kernel"] == 0
    assert 3.8 < summary["bits_per_scalar"] < 4.4  # tiny head dims (16, 32): 0.5–1 bit of it is the norm
    b = summary["breakdown"]
    assert summary["bits_per_scalar"] == pytest.approx(b["payload"] + b["side"] + b["norms"])
    assert all(m["calls"] > 0 for m in summary["per_module"].values())

    remove_kv_quantization(transformer)
    assert kv_summary(transformer) is None
    assert all(m.processor is originals[n] for n, m in transformer.named_modules() if hasattr(m, "set_processor"))


def test_generic_path_keeps_the_processor_signature(pipes):
    transformer = pipes["pixart"].transformer
    apply_kv_quantization(transformer, KVConfig())
    try:
        proc = transformer.transformer_blocks[0].attn1.processor
        assert inspect.signature(proc.__call__) == inspect.signature(proc.original.__call__)
    finally:
        remove_kv_quantization(transformer)


def test_unknown_processor_is_skipped_with_a_warning(pipes):
    from diffusers.models.attention_processor import AttnProcessor

    transformer = pipes["pixart"].transformer
    module = transformer.transformer_blocks[1].attn2
    original = module.processor
    module.set_processor(AttnProcessor())  # math path: no scaled_dot_product_attention to quantize
    try:
        with pytest.warns(UserWarning, match=r"transformer_blocks\.1\.attn2 \(processor AttnProcessor "):
            names = apply_kv_quantization(transformer, KVConfig())
        assert len(names) == 3 and "transformer_blocks.1.attn2" not in names
        assert any("transformer_blocks.1.attn2" in s for s in kv_summary(transformer)["not_quantized"])
    finally:
        remove_kv_quantization(transformer)
        module.set_processor(original)


@pytest.mark.parametrize("model", ["sd3", "wan"])
def test_generic_path_on_sd3_and_wan_transformers(model):
    from diffusers import SD3Transformer2DModel, WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if model == "sd3":
            t = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                      num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                      pooled_projection_dim=16, out_channels=4).eval()
            inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 32),
                          pooled_projections=torch.randn(2, 16), timestep=torch.tensor([500.0, 300.0]))
        else:
            t = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                      in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                      num_layers=1, rope_max_seq_len=32).eval()
            inputs = dict(hidden_states=torch.randn(1, 4, 3, 8, 8), encoder_hidden_states=torch.randn(1, 5, 32),
                          timestep=torch.tensor([500.0]))
    with torch.no_grad():
        ref = t(**inputs).sample
        assert len(apply_kv_quantization(t, None)) == 2
        assert torch.equal(t(**inputs).sample, ref)
        apply_kv_quantization(t, KVConfig(bps=5.0))
        out = t(**inputs).sample
        assert not torch.equal(t(**inputs).sample, out)  # the next call draws fresh dither
        reset_kv_state(t)
        assert torch.equal(t(**inputs).sample, out)  # ... and restarts from step 0 after a reset
        reset_kv_state(t)
        t(**inputs)
    summary = kv_summary(t)
    assert summary["calls_without_kernel"] == 0 and summary["scalars"] > 0
    assert torch.isfinite(out).all() and _snr_db(ref, out) > 10
