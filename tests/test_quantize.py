"""quantize / summary / HQConfig / presets, end to end on the tiny pipelines and at real layer widths."""
from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import hq_diffusion
from hq_diffusion.integrations import presets
from hq_diffusion.integrations.api import quantize, summary
from hq_diffusion.integrations.config import HQConfig
from hq_diffusion.integrations.quantize import NONFINITE
from hq_diffusion.models import DEFAULT_CALL_KWARGS, REAL_CONFIGS, generate, real_linear_shapes, tiny_pipeline
from hq_diffusion.nn.linear import HQLinear, SimulatedFormatWarning

MMAS = ("bf16", "int8", "fp8", "nvfp4", "mxfp4")  # "auto" is "bf16" on CPU (test_tiny_ltx_psnr_rises_with_bps)
TRANSFORMER_CLASSES = {"ltx": "LTXVideoTransformer3DModel", "ltx2": "LTX2VideoTransformer3DModel",
                       "pixart": "PixArtTransformer2DModel", "flux": "FluxTransformer2DModel"}


def _frames(out):
    return out["frames"] if isinstance(out, dict) else out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _hq_layers(module):
    return [m for m in module.modules() if isinstance(m, HQLinear)]


# ---- HQConfig ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    HQConfig(),
    HQConfig(bps=3.0, lattice="a2", mma="int8", storage="int8", seed=7, tile=128, block=512),
    HQConfig(kv_bps=4.0, kv_correction="signs", skip=("proj_in", "re:.*norm.*"), scale_dtype="float32"),
    HQConfig(bps=5.5, lattice="d4", mma="nvfp4", kv_bps=2.5, kv_correction="none+dither", skip=()),
])
def test_hqconfig_round_trip(cfg):
    d = cfg.to_dict()
    assert set(d) == {"_type", "_version", "_data"} and d["_type"] == "HQConfig"
    assert HQConfig.from_dict(json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize("field,value", [
    ("mma", "int4"), ("lattice", "e9"), ("storage", "zip"), ("bps", 0.5), ("bps", 17), ("kv_bps", 0.1),
    ("kv_correction", "qjl"), ("tile", 100), ("block", 1000), ("seed", -1), ("scale_dtype", "int8"),
    ("skip", "proj_in"), ("skip", ["re:("]), ("version", 3), ("version", 1), ("coder", "zip"),
])
def test_hqconfig_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"HQConfig.{field}"):
        HQConfig(**{field: value})


def test_hqconfig_from_dict_rejects_unknown_type_version_and_fields():
    d = HQConfig().to_dict()
    with pytest.raises(ValueError, match="unknown config type"):
        HQConfig.from_dict({**d, "_type": "OtherConfig"})
    with pytest.raises(ValueError, match="version"):
        HQConfig.from_dict({**d, "_version": 99})
    with pytest.raises(ValueError, match="unknown HQConfig fields"):
        HQConfig.from_dict({**d, "_data": {**d["_data"], "group_size": 64}})
    with pytest.raises(ValueError, match="_type, _version, _data"):
        HQConfig.from_dict({"_type": "HQConfig", "_data": d["_data"]})


def test_quantize_rejects_bad_arguments():
    lin = nn.Sequential(nn.Linear(64, 64))
    for kw, field in [({"mma": "int4"}, "mma"), ({"lattice": "leech"}, "lattice"), ({"storage": "gz"}, "storage"),
                      ({"bps": 1.0}, "bps"), ({"bps": 40.0}, "bps")]:
        with pytest.raises(ValueError, match=f"HQConfig.{field}"):
            quantize(lin, progress=False, **kw)
    with pytest.raises(ValueError, match="on_invalid"):
        quantize(lin, progress=False, on_invalid="ignore")
    with pytest.raises(ValueError, match="either config"):
        quantize(lin, bps=3.0, config=HQConfig(), progress=False)
    with pytest.raises(TypeError):
        quantize(object())
    assert not _hq_layers(lin)  # nothing was touched
    quantize(lin, progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(lin, progress=False)


def test_public_api_is_lazy_and_complete():
    assert sorted(hq_diffusion.__all__) == sorted(
        ["quantize", "summary", "save_quantized", "load_quantized", "HQConfig", "__version__"])
    assert hq_diffusion.quantize is quantize and hq_diffusion.HQConfig is HQConfig
    import subprocess
    import sys

    code = "import sys, hq_diffusion, hq_diffusion.codec; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- presets -------------------------------------------------------------------------------------------

EXPECTED_SKIPS = {
    "ltx": {"proj_in", "proj_out", "time_embed.*", "caption_projection.*"},
    "ltx2": {"proj_in", "proj_out", "audio_proj_in", "audio_proj_out", "time_embed.*", "audio_time_embed.*",
             "caption_projection.*", "audio_caption_projection.*", "av_cross_attn_*"},
    "pixart": {"proj_out", "adaln_single.*", "caption_projection.*"},
    "flux": {"x_embedder", "proj_out", "time_text_embed.*", "norm_out.*", "context_embedder"},
}


@pytest.mark.parametrize("name", list(TRANSFORMER_CLASSES))
def test_presets_on_the_real_module_names(name):
    import fnmatch

    rules = presets.default_skip(TRANSFORMER_CLASSES[name])
    for mod, _, _ in real_linear_shapes(name, 2):
        expect = any(fnmatch.fnmatchcase(mod, p) for p in EXPECTED_SKIPS[name])
        assert (presets.skip_reason(mod, rules) is not None) == expect, mod
        if "blocks." in mod:
            assert presets.skip_reason(mod, rules) is None, mod  # every Linear inside a block: quantized
    flux = presets.default_skip("FluxTransformer2DModel")
    assert presets.skip_reason("single_transformer_blocks.3.proj_out", flux) is None
    assert presets.architecture("SomethingNew") == "generic"


def test_skip_patterns_override_preset_with_globs_and_regexes():
    pipe = tiny_pipeline("ltx", 0)
    quantize(pipe, skip=["re:transformer_blocks\\.\\d+\\.attn1\\..*", "*.ff.net.2"], progress=False)
    s = summary(pipe)
    skipped = {r.name: r.reason for r in s.skipped}
    assert len(skipped) == 2 * 4 + 2
    assert all("skip pattern" in r for r in skipped.values())
    assert "transformer.proj_in" in {r.name for r in s.layers}  # the preset no longer applies


# ---- end to end on the tiny pipelines ------------------------------------------------------------------

# PSNR (dB) of each mma path's frames against the unquantized pipeline's, 1 step, measured when this check was
# added; the floors are 2.5 dB below. ltx re-measured on 2026-11-27 when the K/V dither became keyed by the
# call's timestep (its first call used to draw dither step 0): the 4-bit K/V dither alone moves this 1-step
# PSNR between 40.3 and 45.2 dB across dither steps 0-3, so the figure is that of the one realization the test
# now always draws.
_MMA_PSNR = {"ltx": (41.7, 41.9, 40.9, 39.8, 39.0), "ltx2": (33.6, 32.2, 32.5, 28.8, 30.1),
             "pixart": (47.7, 45.1, 41.0, 38.7, 35.7), "flux": (60.8, 61.0, 60.3, 55.0, 55.8)}


@pytest.mark.parametrize("name", ["ltx", "ltx2", "pixart", "flux"])
def test_tiny_pipeline_every_mma(name):
    float_frames = _frames(generate(tiny_pipeline(name, 0), name, "a red cat", 0, num_inference_steps=1))
    pipe = tiny_pipeline(name, 0)
    quantize(pipe, bps=4.0, mma="bf16", kv_bps=4.0, progress=False)  # weights and attention K/V
    layers = _hq_layers(pipe.transformer)
    # every Linear inside the transformer blocks is quantized (per-block adaLN modulation included)
    assert layers and not any(type(m) is nn.Linear for n, m in pipe.transformer.named_modules() if "blocks." in n)
    kw = DEFAULT_CALL_KWARGS[name]
    shape = (kw.get("num_frames", 1), kw["height"], kw["width"], 3)
    for mma in MMAS:
        for m in layers:
            m.mma = mma  # the path is a per-layer runtime choice: no need to quantize again
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulatedFormatWarning)
            out = generate(pipe, name, "a red cat", 0, num_inference_steps=1)
        frames = _frames(out)
        assert frames.shape == shape and np.isfinite(frames).all(), mma
        # close to the unquantized pipeline, not just finite (floors well below the measured PSNRs)
        psnr = _psnr(float_frames, frames)
        assert psnr > _MMA_PSNR[name][MMAS.index(mma)] - 2.5, (name, mma, psnr)
        if name == "ltx2":
            assert out["audio"] is None or np.isfinite(out["audio"]).all()


def test_tiny_ltx_psnr_rises_with_bps():
    ref = generate(tiny_pipeline("ltx", 0), "ltx", "a red cat", 0)
    psnrs = []
    for bps in (3.0, 4.0, 5.0, 6.0):
        pipe = tiny_pipeline("ltx", 0)
        quantize(pipe, bps=bps, progress=False)  # mma="auto": "bf16" on CPU
        assert all(m.resolved_mma(torch.device("cpu")) == "bf16" for m in _hq_layers(pipe.transformer))
        psnrs.append(_psnr(generate(pipe, "ltx", "a red cat", 0), ref))
    assert all(b > a + 2 for a, b in zip(psnrs, psnrs[1:])), psnrs
    assert psnrs[1] > 35, psnrs


@pytest.mark.parametrize("storage", ["int8"])
def test_tiny_pixart_int8_storage_runs(storage):
    pipe = tiny_pipeline("pixart", 0)
    ref = generate(pipe, "pixart", "a red cat", 0)
    quantize(pipe, storage=storage, mma="int8", progress=False)
    assert all(m.storage == "int8" and m.codes.dtype == torch.int8 for m in _hq_layers(pipe.transformer))
    assert _psnr(generate(pipe, "pixart", "a red cat", 0), ref) > 30


def test_kv_quantization_hook():
    pytest.importorskip("hq_diffusion.integrations.kv_processors")
    pipe = tiny_pipeline("ltx", 0)
    quantize(pipe, bps=4.0, kv_bps=4.0, kv_correction="signs+dither", progress=False)
    state = pipe.transformer.hq_state
    assert state.kv["_type"] == "KVConfig" and state.kv_modules
    frames = generate(pipe, "ltx", "a red cat", 0)
    assert np.isfinite(frames).all()
    s = summary(pipe)
    assert s.kv["transformer"]["modules"] == state.kv_modules
    assert s.kv["transformer"]["summary"] is not None
    json.dumps(s.to_dict())


def test_kv_missing_module_is_a_clear_error(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "hq_diffusion.integrations.kv_processors":
            raise ModuleNotFoundError("No module named 'hq_diffusion.integrations.kv_processors'", name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(NotImplementedError, match="hq_diffusion.integrations.kv_processors"):
        quantize(nn.Sequential(nn.Linear(64, 64)), kv_bps=4.0, progress=False)


# ---- invalid weights, progress, summary ----------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 32, bias=False))


def test_nonfinite_layer_is_refused_with_its_name():
    m = _mlp()
    with torch.no_grad():
        m[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'2'.*Inf"):
        quantize(m, progress=False)
    assert not _hq_layers(m)  # checked before anything is swapped


def test_nonfinite_layer_skipped_with_warning():
    m = _mlp()
    with torch.no_grad():
        m[2].weight[1, 3] = float("nan")
    with pytest.warns(UserWarning, match="'2'.*non-finite"):
        quantize(m, on_invalid="skip", progress=False)
    assert isinstance(m[2], nn.Linear) and not isinstance(m[2], HQLinear)
    assert isinstance(m[0], HQLinear) and isinstance(m[3], HQLinear)
    s = summary(m)
    assert [(r.name, r.reason) for r in s.skipped] == [("2", NONFINITE)]
    assert "non-finite" in str(s)


def test_progress_bar(capsys):
    quantize(_mlp(), progress=True)
    assert "hq_diffusion: quantizing" in capsys.readouterr().err
    quantize(_mlp(), progress=False)
    assert capsys.readouterr().err == ""


def test_summary_table_and_dict():
    m = _mlp()
    quantize(m, bps=4.0, skip=["3"], progress=False)
    s = summary(m)
    assert [r.name for r in s.layers] == ["0", "2"] and [r.name for r in s.skipped] == ["3"]
    for r in s.layers:
        mod = m.get_submodule(r.name)
        assert r.bytes_quantized == sum(t.nbytes for t in (*mod.buffers(), *mod.parameters()))
        assert r.bytes_bf16 == 2 * r.in_features * r.out_features + 2 * r.out_features
        assert r.snr_db > 15 and r.bps <= 4.0 + 1e-9
    assert s.bytes_quantized == sum(r.bytes_quantized for r in s.layers)
    assert s.ratio == pytest.approx(s.bytes_bf16 / s.bytes_quantized)
    text = str(s)
    assert "SNR dB" in text and "skipped layer" in text and "ratio" in text
    d = json.loads(json.dumps(s.to_dict()))
    assert d["layers"][0]["name"] == "0" and d["config"]["_type"] == "HQConfig"
    with pytest.raises(ValueError, match="quantize first"):
        summary(_mlp())


# ---- every real Linear shape, and real memory ----------------------------------------------------------

def test_every_real_linear_shape_quantizes():
    shapes = sorted({(i, min(o, 32)) for name in TRANSFORMER_CLASSES for _, i, o in real_linear_shapes(name, 1)})
    torch.manual_seed(0)
    for k, n in shapes:
        lin = nn.Linear(k, n).requires_grad_(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = HQLinear.from_linear(lin, key=f"{k}x{n}", mma="int8")
        x = torch.randn(2, k)
        out = m(x)
        ref = lin(x)
        snr = 10 * torch.log10(ref.square().sum() / (out - ref).square().sum())
        assert out.shape == (2, n) and snr > 15, (k, n, float(snr))


def _ltx_transformer(hidden_heads: int, num_layers: int, caption: int = 4096):
    import diffusers

    cfg = dict(REAL_CONFIGS["ltx"], num_layers=num_layers, num_attention_heads=hidden_heads,
               cross_attention_dim=hidden_heads * 64, caption_channels=caption)
    torch.manual_seed(0)
    model = diffusers.LTXVideoTransformer3DModel(**cfg)
    nn.Module.to(model, torch.bfloat16)
    return model


def _owned_bytes(model) -> tuple[int, int]:
    """(bf16 bytes, held bytes) of every quantized layer, counted independently of summary()."""
    b16 = held = 0
    for m in _hq_layers(model):
        b16 += 2 * m.in_features * m.out_features + 2 * m.out_features * (m.bias is not None)
        held += sum(t.numel() * t.element_size() for t in m.buffers())
        held += sum(t.numel() * t.element_size() for t in m.parameters())
    return b16, held


def _check_memory(model, storage, min_ratio):
    t = time.time()
    quantize(model, bps=4.0, storage=storage, progress=False)
    seconds = time.time() - t
    b16, held = _owned_bytes(model)
    s = summary(model)
    assert (s.bytes_bf16, s.bytes_quantized) == (b16, held)
    assert b16 / held >= min_ratio, (storage, b16 / held)
    assert not any(isinstance(m, nn.Linear) and m.weight.is_floating_point()
                   for n, m in model.named_modules() if "transformer_blocks" in n)
    return b16 / held, seconds


@pytest.mark.parametrize("storage,min_ratio", [("rice", 3.9), ("int8", 1.95)])
def test_memory_ltx_hidden_512(storage, min_ratio):
    _check_memory(_ltx_transformer(8, 1, caption=512), storage, min_ratio)


@pytest.mark.parametrize("storage,min_ratio", [("rice", 3.9), ("int8", 1.95)])
def test_memory_ltx_real_width(storage, min_ratio):
    """REAL_CONFIGS["ltx"] (2048 wide, 28 → 2 blocks): ≈ 134M quantized weights, ≈ 15 s each on 2 CPU cores."""
    ratio, seconds = _check_memory(_ltx_transformer(32, 2), storage, min_ratio)
    print(f"real-width LTX, 2 blocks, storage={storage}: ratio {ratio:.3f}x, quantized in {seconds:.0f} s")
