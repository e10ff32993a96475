"""Tests for hq_diffusion.models: tiny offline pipelines, generate(), and real checkpoint Linear shapes."""

from __future__ import annotations

import inspect
import socket

import numpy as np
import pytest
import torch
from torch import nn

from hq_diffusion import models as M

# diffusers' DPMSolver scheduler (PixArt) trips a NumPy-2 deprecation inside diffusers itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NAMES = ["ltx", "ltx2", "pixart", "flux"]  # the other families' tiny models: tests/test_families.py
PROMPT = "a red robot dancing in the rain"


@pytest.fixture(scope="module")
def no_network():
    """Fail loudly if anything tries to open a network connection."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def pipes(no_network):
    """One seed-0 float32 pipeline per name, built once for the module (with the network blocked)."""
    return {name: M.tiny_pipeline(name, seed=0) for name in NAMES}


def _frames(out):
    return out["frames"] if isinstance(out, dict) else out


def _state(pipe) -> dict[str, torch.Tensor]:
    """State dict of every nn.Module component of a pipeline, keys prefixed by component name."""
    state = {}
    for comp_name, comp in pipe.components.items():
        if isinstance(comp, nn.Module):
            state.update({f"{comp_name}.{k}": v for k, v in comp.state_dict().items()})
    return state


# ---------------------------------------------------------------------------------------------------------
# tiny_pipeline
# ---------------------------------------------------------------------------------------------------------

EXPECTED_CLASS = {"ltx": "LTXPipeline", "ltx2": "LTX2Pipeline", "pixart": "PixArtSigmaPipeline",
                  "flux": "FluxPipeline"}


@pytest.mark.parametrize("name", NAMES)
def test_tiny_pipeline_builds_with_real_components(pipes, name):
    pipe = pipes[name]
    assert type(pipe).__name__ == EXPECTED_CLASS[name]
    # every component registered by the pipeline's __init__ is present (optional ones may be None)
    optional = set(getattr(type(pipe), "_optional_components", []))
    for comp_name, comp in pipe.components.items():
        if comp_name not in optional:
            assert comp is not None, f"{name}: component {comp_name} missing"
    # tokenizers work on an arbitrary prompt (words + characters fallback)
    ids = pipe.tokenizer("A Blue cat, flying over 3 mountains!").input_ids
    assert len(ids) > 3


@pytest.mark.parametrize("name", NAMES)
def test_tiny_transformer_is_small_with_linear_in_features_at_least_32(pipes, name):
    tr = pipes[name].transformer
    linears = [m for m in tr.modules() if isinstance(m, nn.Linear)]
    assert linears
    assert min(m.in_features for m in linears) >= 32
    assert sum(p.numel() for p in tr.parameters()) < 1_000_000
    heads, head_dim = tr.config.num_attention_heads, tr.config.attention_head_dim
    assert 32 <= heads * head_dim <= 64


@pytest.mark.parametrize("name", NAMES)
def test_tiny_pipeline_same_seed_identical_state(pipes, name, no_network):
    a = _state(pipes[name])
    b = _state(M.tiny_pipeline(name, seed=0))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{name}: {k} differs between two seed-0 builds"


@pytest.mark.parametrize("name", NAMES)
def test_tiny_pipeline_different_seed_different_transformer(pipes, name, no_network):
    a = pipes[name].transformer.state_dict()
    b = M.tiny_pipeline(name, seed=1).transformer.state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_tiny_pipeline_leaves_global_rng_alone():
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    M.tiny_pipeline("pixart", seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_tiny_pipeline_dtype_bf16():
    pipe = M.tiny_pipeline("ltx", seed=0, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in pipe.transformer.parameters())
    assert all(p.dtype == torch.bfloat16 for p in pipe.vae.parameters())
    frames = M.generate(pipe, "ltx", PROMPT, seed=0)
    assert frames.dtype == np.float32 and np.isfinite(frames).all()


# ---------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_generate_shape_range_and_reproducibility(pipes, name):
    kw = M.DEFAULT_CALL_KWARGS[name]
    out = M.generate(pipes[name], name, PROMPT, seed=0)
    frames = _frames(out)
    n_frames = kw.get("num_frames", 1)
    assert frames.shape == (n_frames, kw["height"], kw["width"], 3)
    assert frames.dtype == np.float32
    assert np.isfinite(frames).all()
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    assert frames.std() > 1e-3  # not a constant image

    again = _frames(M.generate(pipes[name], name, PROMPT, seed=0))
    np.testing.assert_array_equal(frames, again)
    other = _frames(M.generate(pipes[name], name, PROMPT, seed=1))
    assert not np.array_equal(frames, other)


def test_generate_ltx2_returns_audio(pipes):
    out = M.generate(pipes["ltx2"], "ltx2", PROMPT, seed=0)
    assert set(out) == {"frames", "audio", "audio_sample_rate"}
    audio = out["audio"]
    assert isinstance(audio, np.ndarray) and audio.dtype == np.float32
    assert audio.ndim == 2 and audio.shape[0] == pipes["ltx2"].vocoder.config.out_channels
    assert audio.shape[1] > 0 and np.isfinite(audio).all()
    assert out["audio_sample_rate"] == pipes["ltx2"].vocoder.config.output_sampling_rate


@pytest.mark.parametrize("name", ["ltx", "flux"])
def test_generate_output_type_pt_matches_np(pipes, name):
    a = _frames(M.generate(pipes[name], name, PROMPT, seed=3))
    b = _frames(M.generate(pipes[name], name, PROMPT, seed=3, output_type="pt"))
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_generate_overrides_size(pipes):
    frames = M.generate(pipes["pixart"], "pixart", PROMPT, seed=0, height=64, width=32)
    assert frames.shape == (1, 64, 32, 3)


def test_default_call_kwargs_are_fast_and_valid():
    assert set(M.DEFAULT_CALL_KWARGS) == set(M.PIPELINE_NAMES)
    for name, kw in M.DEFAULT_CALL_KWARGS.items():
        assert kw["height"] % 32 == 0 and kw["width"] % 32 == 0
        assert kw["num_inference_steps"] <= 4
        assert kw["max_sequence_length"] <= 32
        if "num_frames" in kw:
            assert (kw["num_frames"] - 1) % 4 == 0
    assert M.DEFAULT_CALL_KWARGS["pixart"]["use_resolution_binning"] is False


# ---------------------------------------------------------------------------------------------------------
# Unknown names
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "call",
    [
        lambda: M.tiny_pipeline("sdxl"),
        lambda: M.real_linear_shapes("sdxl"),
        lambda: M.generate(None, "sdxl", PROMPT, 0),
    ],
)
def test_unknown_name_raises_listing_valid_names(call):
    with pytest.raises(ValueError) as err:
        call()
    for name in NAMES:
        assert name in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# real_linear_shapes / REAL_CONFIGS
# ---------------------------------------------------------------------------------------------------------

def _by_name(shapes):
    return {n: (i, o) for n, i, o in shapes}


def test_real_ltx_video_shapes():
    s = _by_name(M.real_linear_shapes("ltx"))
    ins = {i for i, _ in s.values()}
    assert 2048 in ins and 4096 in ins  # hidden (32 x 64) and T5-XXL caption projection
    assert s["proj_in"] == (128, 2048)
    assert s["caption_projection.linear_1"] == (4096, 2048)
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        assert s[f"transformer_blocks.0.attn1.{proj}"] == (2048, 2048)
        assert s[f"transformer_blocks.0.attn2.{proj}"] == (2048, 2048)
    assert s["transformer_blocks.0.ff.net.0.proj"] == (2048, 8192)


def test_real_ltx2_shapes():
    s = _by_name(M.real_linear_shapes("ltx2"))
    assert s["proj_in"] == (128, 4096)  # video 32 x 128
    assert s["audio_proj_in"] == (128, 2048)  # audio 32 x 64
    assert s["caption_projection.linear_1"] == (3840, 4096)  # Gemma-3-12B width
    assert s["transformer_blocks.0.attn1.to_k"] == (4096, 4096)
    assert s["transformer_blocks.0.attn2.to_k"] == (4096, 4096)
    assert s["transformer_blocks.0.audio_attn1.to_k"] == (2048, 2048)
    assert s["transformer_blocks.0.audio_to_video_attn.to_k"] == (2048, 2048)  # K/V from audio
    assert s["transformer_blocks.0.audio_to_video_attn.to_q"] == (4096, 2048)
    assert s["transformer_blocks.0.video_to_audio_attn.to_k"] == (4096, 2048)  # K/V from video
    assert s["transformer_blocks.0.audio_ff.net.2"] == (8192, 2048)


def test_real_pixart_sigma_shapes():
    s = _by_name(M.real_linear_shapes("pixart"))
    assert s["transformer_blocks.0.attn1.to_q"] == (1152, 1152)  # 16 x 72
    assert s["transformer_blocks.0.attn2.to_k"] == (1152, 1152)
    assert s["caption_projection.linear_1"] == (4096, 1152)
    assert s["proj_out"] == (1152, 2 * 2 * 8)


def test_real_flux_dev_shapes():
    s = _by_name(M.real_linear_shapes("flux"))
    assert s["x_embedder"] == (64, 3072)  # 24 x 128
    assert s["context_embedder"] == (4096, 3072)
    assert s["time_text_embed.text_embedder.linear_1"] == (768, 3072)
    assert "time_text_embed.guidance_embedder.linear_1" in s  # FLUX.1-dev is guidance-distilled
    assert s["transformer_blocks.0.attn.add_k_proj"] == (3072, 3072)
    assert s["single_transformer_blocks.0.proj_out"] == (3072 + 4 * 3072, 3072)


@pytest.mark.parametrize("name", NAMES)
def test_real_linear_shapes_scale_with_depth(name):
    one = M.real_linear_shapes(name, num_layers=1)
    two = M.real_linear_shapes(name, num_layers=2)
    per_block = [n for n, _, _ in one if "transformer_blocks.0." in n]
    assert per_block
    assert len(two) - len(one) == len(per_block)
    assert all(isinstance(i, int) and isinstance(o, int) for _, i, o in two)
    with pytest.raises(ValueError):
        M.real_linear_shapes(name, num_layers=0)


# Keys where the released checkpoint differs from the class's constructor default, and why.
_EXPECTED_DIFFS = {
    "ltx": set(),
    "ltx2": set(),
    "pixart": {"caption_channels", "interpolation_scale", "use_additional_conditions"},  # defaults: None
    "flux": {"guidance_embeds"},  # FLUX.1-dev has the guidance embedder; the default (schnell-like) does not
}


@pytest.mark.parametrize("name", NAMES)
def test_real_configs_match_class_defaults(name):
    cls = M._real_class(name)
    params = inspect.signature(cls.__init__).parameters
    diffs = set()
    for key, value in M.REAL_CONFIGS[name].items():
        assert key in params, f"{name}: {key} is not a constructor argument of {cls.__name__}"
        default = params[key].default
        if isinstance(default, (list, tuple)):
            default, value = tuple(default), tuple(value)
        if default != value:
            diffs.add(key)
    assert diffs == _EXPECTED_DIFFS[name]
