"""hq-diffusion behaves as a diffusers quantization backend, in the shape of diffusers' own quantization test
mixins (``tests/quantization/*``: ``test_quantization_config``, ``test_num_parameters``/memory footprint,
``test_keep_modules_in_fp32``/dtype, ``test_dequantize``, ``test_serialization``, pipeline-level configs).

One row of issue 12's table per test: pipeline-level ``PipelineQuantizationConfig`` (``quant_backend`` and
``quant_mapping``), an ``HQConfig`` given to a concrete pipeline class, ``import hq_diffusion`` alone loading a
saved quantized pipeline (fresh interpreter), the quantized-model contract, reproducible K/V with the pipeline
generator, and dtypes restored on load.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import hq_diffusion
from hq_diffusion import HQConfig
from hq_diffusion.models import generate, tiny_pipeline
from hq_diffusion.nn.linear import HQLinear

diffusers = pytest.importorskip("diffusers")
from diffusers import DiffusionPipeline, LTXPipeline, PipelineQuantizationConfig  # noqa: E402

PROMPT = "a red cat"


def _n_hq(model) -> int:
    return sum(isinstance(m, HQLinear) for m in model.modules())


def _n_linear(model) -> int:
    return sum(type(m) is torch.nn.Linear for m in model.modules())


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    """A tiny float32 LTX pipeline saved with diffusers' save_pretrained, and its reference quantized in memory."""
    d = tmp_path_factory.mktemp("native") / "ltx-float"
    tiny_pipeline("ltx", 0).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    """A tiny bf16 LTX pipeline quantized at 4 bps, its frames before saving, and its saved directory."""
    pipe = tiny_pipeline("ltx", 0, dtype=torch.bfloat16)
    hq_diffusion.quantize(pipe, bps=4.0, progress=False)
    frames = generate(pipe, "ltx", PROMPT, 0)
    d = tmp_path_factory.mktemp("native") / "ltx-hq4"
    hq_diffusion.save_quantized(pipe, d)
    return pipe, frames, d


def _check_quantized(model, bps=4.0):
    assert _n_hq(model) > 0
    assert model.is_quantized is True
    assert model.quantization_method == "hq_diffusion"
    assert model.hf_quantizer.quantization_config.quant_method == "hq_diffusion"
    qc = model.config.quantization_config
    assert (qc["quant_method"] if isinstance(qc, dict) else qc.quant_method) == "hq_diffusion"
    assert model.hf_quantizer.hq_config.bps == bps


# ---- pipeline-level configs -------------------------------------------------------------------------------

def test_pipeline_quant_backend(float_dir):
    cfg = PipelineQuantizationConfig(quant_backend="hq_diffusion", quant_kwargs={"bps": 3.0},
                                     components_to_quantize=["transformer"])
    pipe = DiffusionPipeline.from_pretrained(float_dir, quantization_config=cfg)
    assert type(pipe).__name__ == "LTXPipeline"
    _check_quantized(pipe.transformer, bps=3.0)
    assert _n_hq(pipe.text_encoder) == 0 and _n_hq(pipe.vae) == 0
    assert np.isfinite(generate(pipe, "ltx", PROMPT, 0)).all()


def test_pipeline_quant_backend_refuses_a_transformers_component_by_name(float_dir):
    cfg = PipelineQuantizationConfig(quant_backend="hq_diffusion", quant_kwargs={"bps": 4.0},
                                     components_to_quantize=["transformer", "text_encoder"])
    with pytest.raises(ValueError, match="not transformers models such as the text encoder"):
        DiffusionPipeline.from_pretrained(float_dir, quantization_config=cfg)


def test_pipeline_quant_backend_bad_kwarg_is_named():
    with pytest.raises(TypeError, match="bits"):
        PipelineQuantizationConfig(quant_backend="hq_diffusion", quant_kwargs={"bits": 4},
                                   components_to_quantize=["transformer"])._resolve_quant_config(True, "transformer")


def test_pipeline_quant_mapping_with_hqconfig(float_dir):
    cfg = PipelineQuantizationConfig(quant_mapping={"transformer": HQConfig(bps=4.0, storage="int8")})
    pipe = LTXPipeline.from_pretrained(float_dir, quantization_config=cfg)
    _check_quantized(pipe.transformer)
    assert all(m.storage == "int8" for m in pipe.transformer.modules() if isinstance(m, HQLinear))


def test_concrete_pipeline_accepts_hqconfig(float_dir):
    pipe = LTXPipeline.from_pretrained(float_dir, quantization_config=HQConfig(bps=4.0))
    _check_quantized(pipe.transformer)
    ref = tiny_pipeline("ltx", 0)
    hq_diffusion.quantize(ref, bps=4.0, progress=False)
    # quantizing while loading = quantizing after loading: same compressed buffers
    sd, ref_sd = pipe.transformer.state_dict(), ref.transformer.state_dict()
    assert sd.keys() == ref_sd.keys()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)


# ---- registration -------------------------------------------------------------------------------------

def test_import_hq_diffusion_alone_loads_a_saved_pipeline(quantized_dir):
    """A fresh interpreter: ``import hq_diffusion`` (which imports neither torch nor diffusers), then diffusers'
    own ``from_pretrained`` of the saved directory."""
    _, frames, d = quantized_dir
    code = (
        "import sys, numpy as np\n"
        "import hq_diffusion\n"
        "assert 'diffusers' not in sys.modules and 'torch' not in sys.modules\n"
        "import torch\n"
        "from diffusers import LTXPipeline\n"
        "from hq_diffusion.models import generate\n"
        f"pipe = LTXPipeline.from_pretrained({str(d)!r}, torch_dtype=torch.bfloat16)\n"
        "assert pipe.transformer.is_quantized and pipe.transformer.quantization_method == 'hq_diffusion'\n"
        f"np.save({str(d.parent / 'fresh.npy')!r}, generate(pipe, 'ltx', {PROMPT!r}, 0))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HQ_")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_array_equal(np.load(d.parent / "fresh.npy"), frames)


def test_diffusers_version_outside_the_range_fails_in_one_line():
    from hq_diffusion.integrations.autoregister import check_diffusers_version

    check_diffusers_version(diffusers.__version__)
    for bad in ("0.41.0", "0.43.0", "1.0.0"):
        with pytest.raises(ImportError) as e:
            check_diffusers_version(bad)
        assert "\n" not in str(e.value) and bad in str(e.value)


# ---- the quantized-model contract ----------------------------------------------------------------------

def test_quantized_model_contract(quantized_dir):
    pipe, _, d = quantized_dir
    for model in (pipe.transformer, diffusers.LTXVideoTransformer3DModel.from_pretrained(d / "transformer")):
        _check_quantized(model)
        assert model.hf_quantizer.is_compileable is True
        assert model.hf_quantizer.is_serializable is True
        # memory footprint: the compressed buffers (+ float params), far below the float model
        footprint = model.get_memory_footprint()
        nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        assert footprint == nbytes
    float_bytes = sum(p.numel() * p.element_size() for p in tiny_pipeline("ltx", 0, torch.bfloat16).transformer.parameters())
    assert pipe.transformer.get_memory_footprint() < 0.6 * float_bytes


def test_update_torch_dtype_and_adjust_target_dtype(quantized_dir):
    from accelerate.utils import CustomDtype

    model = quantized_dir[0].transformer
    q = model.hf_quantizer
    assert q.update_torch_dtype(torch.float16) == torch.float16
    assert q.update_torch_dtype(None) == torch.bfloat16  # the dtype the checkpoint was quantized from
    assert q.adjust_target_dtype(torch.bfloat16) == CustomDtype.INT4
    from hq_diffusion.integrations.diffusers_backend import HQDiffusersQuantizer

    fresh = HQDiffusersQuantizer(HQConfig(bps=2.0), pre_quantized=False)
    assert fresh.update_torch_dtype(None) == torch.float32
    assert fresh.adjust_target_dtype(torch.bfloat16) == CustomDtype.INT2
    assert HQDiffusersQuantizer(HQConfig(bps=6.0), pre_quantized=False).adjust_target_dtype(torch.bfloat16) == torch.int8


def test_dtype_cast_of_a_quantized_model_keeps_the_compressed_buffers(quantized_dir):
    _, _, d = quantized_dir
    model = diffusers.LTXVideoTransformer3DModel.from_pretrained(d / "transformer")
    before = {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point()}
    model.to(torch.float32)
    assert model.is_quantized
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_dequantize_returns_a_float_model(quantized_dir):
    _, _, d = quantized_dir
    model = diffusers.LTXVideoTransformer3DModel.from_pretrained(d / "transformer")
    hq = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, HQLinear)}
    out = model.dequantize()
    assert out is model and _n_hq(model) == 0 and not model.is_quantized
    assert not hasattr(model, "hf_quantizer") and model.config.quantization_config is None
    for name, w in hq.items():
        assert torch.equal(model.get_submodule(name).weight, w)
    with pytest.raises(ValueError, match="quantize your model"):
        model.dequantize()


# ---- reproducible K/V --------------------------------------------------------------------------------------

def test_kv_dither_is_reproducible_with_the_pipeline_generator():
    """Same call, same generator: same frames, with dither and without any reset in between; the dither stream
    of each layer changes from one denoising step to the next and differs between layers."""
    from hq_diffusion.integrations.kv_processors import HQKVProcessor

    pipe = tiny_pipeline("ltx", 0)
    hq_diffusion.quantize(pipe, bps=4.0, kv_bps=4.0, kv_correction="haar+dither", progress=False)
    procs = [m.processor for m in pipe.transformer.modules() if isinstance(getattr(m, "processor", None), HQKVProcessor)]
    assert procs and all(p.cfg.dither for p in procs)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda *a: seen.append(procs[0].step))
    a = generate(pipe, "ltx", PROMPT, 0, num_inference_steps=3)
    b = generate(pipe, "ltx", PROMPT, 0, num_inference_steps=3)
    hook.remove()
    np.testing.assert_array_equal(a, b)
    assert len(set(seen[:3])) == 3 and seen[:3] == seen[3:]  # a fresh stream per step, the same per call
    c = generate(pipe, "ltx", PROMPT, 1, num_inference_steps=3)
    assert not np.array_equal(a, c)


# ---- dtypes --------------------------------------------------------------------------------------------------

def test_load_quantized_restores_every_dtype_and_the_frames(quantized_dir, recwarn):
    pipe, frames, d = quantized_dir
    loaded = hq_diffusion.load_quantized(d)
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            want = {p.dtype for p in comp.parameters()}
            assert {p.dtype for p in loaded.components[name].parameters()} == want, name
    assert not [w for w in recwarn if "float32" in str(w.message)]
    np.testing.assert_array_equal(generate(loaded, "ltx", PROMPT, 0), frames)


# ---- CLI and app ---------------------------------------------------------------------------------------------

# ``--model QUANTIZED_DIR`` for eval and the app: tests/test_eval_quantized.py and tests/test_app.py


@pytest.mark.parametrize("flag, value, words", [
    ("--frames", "8", "Frames must be of the form 4k+1"),
    ("--height", "48", "Height must be a multiple of 32"),
    ("--steps", "0", "Steps must be a whole number"),
])
def test_eval_checks_frames_sizes_steps_with_the_app_rules_and_words(flag, value, words, tmp_path, capsys):
    from hq_diffusion.app.config import AppSettings, GenerationRequest
    from hq_diffusion.eval import cli

    rc = cli.main([flag, value, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and words in err and f"got {value}." in err, err
    field = {"--frames": "frames", "--height": "height", "--steps": "steps"}[flag]
    req = GenerationRequest(model="tiny-ltx", prompt="a cat", **{field: int(value)})
    with pytest.raises(Exception, match=re.escape(words)):
        req.validate(AppSettings(), "ltx")
