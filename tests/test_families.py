"""The model-family registry (hq_diffusion.integrations.families) and its five new families (SD3, Wan,
CogVideoX, HunyuanVideo, Sana): tiny transformers quantized like the first four's, tiny pipelines generating."""
from __future__ import annotations

import fnmatch
import inspect
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from hq_diffusion import models as M
from hq_diffusion.integrations import families, presets
from hq_diffusion.integrations.quantize import quantize
from hq_diffusion.integrations.serialization import load_quantized, save_quantized
from hq_diffusion.nn.linear import HQLinear
from hq_diffusion.tiny.transformers import example_inputs

# diffusers' DPMSolver scheduler (Sana) trips a NumPy-2 deprecation inside diffusers itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NEW = ("sd3", "wan", "cogvideox", "hunyuanvideo", "sana")
# Attention modules whose K/V the tiny transformer quantizes (Sana: only the cross-attention; its linear
# self-attention has no softmax attention).
KV_MODULES = {"sd3": 2, "wan": 4, "cogvideox": 2, "hunyuanvideo": 3, "sana": 2}


# ---- the registry ---------------------------------------------------------------------------------------

def test_registry_imports_without_torch():
    code = "import sys, hq_diffusion.integrations.families; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_lookups_and_errors_naming_the_valid_choices():
    assert families.keys() == ("ltx", "ltx2", "pixart", "flux", *NEW)
    assert families.get("flux").transformer_classes == ("FluxTransformer2DModel",)
    assert families.by_alias("tiny-ltx2").key == "ltx2"
    assert families.by_pipeline_class("PixArtAlphaPipeline").key == "pixart"
    assert families.by_transformer_class("WanTransformer3DModel").key == "wan"
    for call, valid in [(lambda: families.get("sdxl"), "hunyuanvideo"),
                        (lambda: families.by_alias("tiny-sdxl"), "tiny-pixart"),
                        (lambda: families.by_pipeline_class("StableDiffusionXLPipeline"), "FluxPipeline"),
                        (lambda: families.by_transformer_class("UNet2DConditionModel"), "SanaTransformer2DModel")]:
        with pytest.raises(families.UnknownFamilyError, match=valid):
            call()
    assert families.skip_rules("SomethingNew") == families.GENERIC_SKIP
    assert presets.architecture("SD3Transformer2DModel") == "SD3Transformer2DModel"


def test_registry_gives_the_eval_and_app_tables():
    """What eval/runner.py and app/ held as their own tables before the registry (the values must not move)."""
    # ... plus the five new families.
    # (new: the trained tiny LTX, listed first: it is the default model)
    assert families.tiny_aliases() == {"tiny-ltx-trained": "ltx", "tiny-ltx": "ltx", "tiny-ltx2": "ltx2", "tiny-pixart": "pixart",
                                       "tiny-flux": "flux", "tiny-sd3": "sd3", "tiny-wan": "wan",
                                       "tiny-cogvideox": "cogvideox", "tiny-hunyuanvideo": "hunyuanvideo",
                                       "tiny-sana": "sana"}
    assert families.pipeline_classes() == {"LTXPipeline": "ltx", "LTX2Pipeline": "ltx2",
                                           "PixArtSigmaPipeline": "pixart", "PixArtAlphaPipeline": "pixart",
                                           "FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3",
                                           "WanPipeline": "wan", "CogVideoXPipeline": "cogvideox",
                                           "HunyuanVideoPipeline": "hunyuanvideo", "SanaPipeline": "sana"}
    assert families.video_keys() == ("ltx", "ltx2", "wan", "cogvideox", "hunyuanvideo")
    assert families.tiny_tuned_keys() == (
        "num_inference_steps", "height", "width", "num_frames", "frame_rate", "guidance_scale",
        "audio_guidance_scale", "stg_scale", "audio_stg_scale", "modality_scale", "audio_modality_scale",
        "spatio_temporal_guidance_blocks", "max_sequence_length", "use_resolution_binning",
        "complex_human_instruction", "prompt_template")  # (new: Sana, HunyuanVideo)
    assert families.tiny_tuned_keys(request=False) == families.tiny_tuned_keys()[4:]
    from hq_diffusion.app import config, engine

    assert config.TINY_KINDS == families.tiny_aliases() and list(config.TINY_MODELS) == list(config.TINY_KINDS)
    assert config.VIDEO_KINDS == {"ltx", "ltx2", "wan", "cogvideox", "hunyuanvideo"} and engine.PIPELINE_CLASSES == families.pipeline_classes()
    assert M.PIPELINE_NAMES == families.keys()


def test_kv_processor_paths_are_registered_with_their_kind():
    from hq_diffusion.integrations import kv_processors as kv

    kinds = {"ltx": kv.HQKVLTXAttnProcessor, "ltx2": kv.HQKVLTX2AttnProcessor, "flux": kv.HQKVFluxAttnProcessor,
             "sdpa": kv.HQKVSDPAProcessor}
    for f in families.FAMILIES:
        for path, kind in f.kv_processors:
            assert kv._KV_PROCESSORS.get(path) is kinds[kind], (f.key, path)
            module, _, name = path.rpartition(".")
            assert hasattr(__import__(module, fromlist=[name]), name), path  # the diffusers class exists
        for path, _ in f.kv_unsupported:
            assert path not in kv._KV_PROCESSORS


# ---- real checkpoints: configs and skip rules on their module names --------------------------------------

@pytest.mark.parametrize("key", NEW)
def test_real_configs_and_skip_rules_on_the_real_module_names(key):
    family = families.get(key)
    params = inspect.signature(M._real_class(key).__init__).parameters
    assert set(family.real_config) <= set(params)
    # (SD3's last block has no context branch: compare 2 and 3 blocks.)
    two, three = M.real_linear_shapes(key, 2), M.real_linear_shapes(key, 3)
    per_block = [n for n, _, _ in two if "blocks.0." in n and "refiner_blocks" not in n]
    assert per_block and len(three) - len(two) == len(per_block)
    rules = presets.default_skip(family.transformer_classes[0])
    for name, _, _ in two:
        skipped = presets.skip_reason(name, rules) is not None
        assert skipped == ("blocks." not in name), name  # every block Linear quantized, every edge kept


# ---- tiny transformers: quantized, SNR, save/load, K/V ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return {key: M.tiny_transformer(key, seed=0) for key in NEW}


def _out(tr, key):
    with torch.no_grad():
        return tr(**example_inputs(key, tr))[0]


def _snr_db(ref, out):
    return float(10 * torch.log10(ref.square().sum() / (out - ref).square().sum()))


@pytest.mark.parametrize("key", NEW)
def test_tiny_transformer_small_seeded_and_fully_quantized(tiny, key, tmp_path):
    import copy

    tr = tiny[key]
    assert type(tr).__name__ in families.get(key).transformer_classes
    assert sum(p.numel() for p in tr.parameters()) < 400_000
    assert min(m.in_features for m in tr.modules() if isinstance(m, nn.Linear)) >= 32
    assert torch.equal(next(iter(M.tiny_transformer(key, seed=0).state_dict().values())),
                       next(iter(tr.state_dict().values())))
    ref = _out(tr, key)
    q = quantize(copy.deepcopy(tr), bps=4.0, progress=False)
    for name, module in q.named_modules():
        if isinstance(module, (nn.Linear, HQLinear)):
            assert isinstance(module, HQLinear) == ("blocks." in name), name
    out = _out(q, key)
    assert _snr_db(ref, out) > 15, _snr_db(ref, out)
    save_quantized(q, tmp_path / key)
    back = load_quantized(tmp_path / key)
    assert torch.equal(_out(back, key), out)


@pytest.mark.parametrize("key", NEW)
def test_tiny_transformer_kv_quantization(tiny, key):
    import copy

    from hq_diffusion.integrations.kv_processors import kv_summary

    tr = copy.deepcopy(tiny[key])
    ref = _out(tr, key)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize(tr, bps=8.0, kv_bps=4.0, progress=False)
    kv_warnings = [str(w.message) for w in caught if "K/V quantization skipped" in str(w.message)]
    assert bool(kv_warnings) == (key == "sana"), kv_warnings  # Sana: linear self-attention left alone
    out = _out(tr, key)
    summary = kv_summary(tr)
    assert summary["modules"] == KV_MODULES[key] and summary["calls"] == KV_MODULES[key]
    assert summary["calls_without_kernel"] == 0 and abs(summary["bits_per_scalar"] - 4.0) < 0.1
    assert _snr_db(ref, out) > 20, _snr_db(ref, out)


@pytest.mark.parametrize("key", NEW)
def test_skip_rules_match_the_tiny_top_level_linears(tiny, key):
    rules = presets.default_skip(tiny[key])
    for name, module in tiny[key].named_modules():
        if isinstance(module, nn.Linear) and "blocks." not in name:
            assert presets.skip_reason(name, rules) is not None, name
            assert any(fnmatch.fnmatchcase(name, p) for p, _ in families.get(key).skip)


# ---- the new families' full tiny pipelines-----------------------------------------------------------------

@pytest.mark.parametrize("key,cls,n_frames", [("sd3", "StableDiffusion3Pipeline", 1), ("wan", "WanPipeline", 9),
                                                      ("cogvideox", "CogVideoXPipeline", 9),
                                                      ("hunyuanvideo", "HunyuanVideoPipeline", 9),
                                                      ("sana", "SanaPipeline", 1)])
def test_tiny_pipeline_generates_reproducibly_and_quantized(key, cls, n_frames):
    import numpy as np

    pipe = M.tiny_pipeline(key, seed=0)
    assert type(pipe).__name__ == cls
    first = next(iter(pipe.transformer.state_dict().values()))
    assert torch.equal(first, next(iter(M.tiny_pipeline(key, 0).transformer.state_dict().values())))
    frames = M.generate(pipe, key, "a red robot dancing in the rain", seed=0)
    assert frames.shape == (n_frames, 32, 32, 3) and frames.dtype == np.float32 and frames.std() > 1e-3
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    np.testing.assert_array_equal(frames, M.generate(pipe, key, "a red robot dancing in the rain", seed=0))
    quantize(pipe, bps=6.0, progress=False)
    q = M.generate(pipe, key, "a red robot dancing in the rain", seed=0)
    psnr = 10 * np.log10(1.0 / float(np.mean((q.astype(np.float64) - frames) ** 2)))
    assert psnr > 30, psnr


def test_native_call_defaults_cover_the_tuned_keys():
    flux = M.native_call_defaults("FluxPipeline", "flux")
    assert flux["num_inference_steps"] == 28 and flux["guidance_scale"] == 3.5 and flux["height"] is None
    assert set(flux) <= set(families.get("flux").tuned_keys)
    sana = M.native_call_defaults("SanaPipeline", "sana")
    assert "complex_human_instruction" in sana and sana["complex_human_instruction"]
