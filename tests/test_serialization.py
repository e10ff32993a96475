"""save_quantized / load_quantized: exact round trips (also in a fresh process), corruption, versions, atomicity,
and the diffusers backend (plain ``from_pretrained``)."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from hq_diffusion.codec import HQFormatError
from hq_diffusion.integrations import serialization as ser
from hq_diffusion.integrations.api import quantize, summary
from hq_diffusion.integrations.config import HQConfig
from hq_diffusion.models import generate, tiny_pipeline
from hq_diffusion.nn.linear import HQLinear

PROMPT = "a red cat"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LTX pipeline quantized (int8 matmul, Rice storage), its output, and its saved directory (rANS
    checkpoints: tests/test_rans_linear.py)."""
    pipe = tiny_pipeline("ltx", 0)
    quantize(pipe, bps=4.0, mma="int8", coder="rice", progress=False)
    frames = generate(pipe, "ltx", PROMPT, 0)
    d = tmp_path_factory.mktemp("hq") / "ltx-hq4"
    ser.save_quantized(pipe, d)
    return pipe, frames, d


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _weights(d):
    return d / "transformer" / ser.WEIGHTS_NAME


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_layout_and_metadata(saved):
    pipe, _, d = saved
    assert (d / "model_index.json").is_file()
    assert {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(os.listdir(d))
    cfg = json.loads((d / "transformer" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "hq_diffusion" and qc["format_version"] == ser.FORMAT_VERSION
    assert HQConfig.from_dict(qc["config"]) == pipe.transformer.hq_state.config
    assert set(qc["layers"]) == {r.name.removeprefix("transformer.") for r in summary(pipe).layers}
    from safetensors import safe_open

    with safe_open(str(_weights(d)), "pt") as f:
        meta = json.loads(f.metadata()["hq_diffusion"])
        assert set(meta["checksums"]) == set(f.keys())
        # no float weight for any quantized layer
        for name in qc["layers"]:
            assert f"{name}.weight" not in f.keys()
            assert not f.get_tensor(f"{name}.s0_unary").is_floating_point()
    assert {k: v for k, v in meta.items() if k not in ("checksums", "dtypes", "manifest")} == qc
    assert meta["manifest"] is True and set(meta["dtypes"]) == set(meta["checksums"])


def test_load_in_process_is_exact(saved):
    pipe, frames, d = saved
    loaded = ser.load_quantized(d)
    assert type(loaded) is type(pipe)
    _assert_same_state(loaded.transformer, pipe.transformer)
    assert all(isinstance(loaded.transformer.get_submodule(r.name.removeprefix("transformer.")), HQLinear)
               for r in summary(pipe).layers)
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(generate(loaded, "ltx", PROMPT, 0), frames)
    s0, s1 = summary(pipe), summary(loaded)
    assert s0.to_dict() == s1.to_dict()


def test_fresh_process_reproduces_outputs_exactly(saved, tmp_path):
    _, frames, d = saved
    out = tmp_path / "frames.npy"
    code = ("import sys, numpy as np, hq_diffusion\n"
            "from hq_diffusion.models import generate\n"
            "pipe = hq_diffusion.load_quantized(sys.argv[1])\n"
            "pipe.set_progress_bar_config(disable=True)\n"
            f"np.save(sys.argv[2], generate(pipe, 'ltx', {PROMPT!r}, 0))\n")
    subprocess.run([sys.executable, "-c", code, str(d), str(out)], check=True, capture_output=True, timeout=300)
    assert torch.equal(torch.from_numpy(np.load(out)), torch.from_numpy(frames))


def test_loading_never_encodes(saved, monkeypatch):
    import hq_diffusion.nn.linear as linear

    def boom(*a, **k):
        raise AssertionError("load_quantized must not re-quantize")

    monkeypatch.setattr(linear, "encode", boom)
    monkeypatch.setattr(linear.HQLinear, "from_linear", classmethod(boom))
    ser.load_quantized(saved[2] / "transformer")


@pytest.mark.parametrize("storage", ["int8", "rice", "rans"])
def test_bare_model_round_trip(tmp_path, storage):
    tr = tiny_pipeline("flux", 0).transformer
    quantize(tr, bps=3.0, lattice="a2", mma="bf16", storage="int8" if storage == "int8" else "rice",
             coder="rans" if storage == "rans" else "rice", progress=False)
    ser.save_quantized(tr, tmp_path / "flux-tr")
    back = ser.load_quantized(tmp_path / "flux-tr")
    _assert_same_state(back, tr)
    layers = [(n, m) for n, m in tr.named_modules() if isinstance(m, HQLinear)]
    assert layers and all(m.storage == storage for _, m in layers)
    for n, m in layers:
        x = torch.randn(3, m.in_features)
        assert torch.equal(back.get_submodule(n)(x), m(x)), n


def test_plain_module_needs_a_skeleton(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
    quantize(net, progress=False)
    ser.save_quantized(net, tmp_path / "mlp")
    with pytest.raises(ValueError, match="skeleton"):
        ser.load_quantized(tmp_path / "mlp")
    with torch.device("meta"):
        skel = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
    back = ser.load_quantized(tmp_path / "mlp", model=skel)
    x = torch.randn(5, 64)
    assert torch.equal(back(x), net(x))



def test_meta_tensors_are_refused_by_name(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
    quantize(net, progress=False)
    net.register_buffer("not_loaded", torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match="meta device.*not_loaded"):
        ser.save_quantized(net, tmp_path / "mlp")
    assert not (tmp_path / "mlp").exists()

# ---- broken checkpoints -----------------------------------------------------------------------------------

def _tensor_span(path, name):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    a, b = header[name]["data_offsets"]
    return 8 + n + a, 8 + n + b


@pytest.mark.parametrize("tensor", ["transformer_blocks.0.attn1.to_q.s0_unary", "transformer_blocks.1.ff.net.2.scales",
                                    "proj_in.weight", "transformer_blocks.0.ff.net.0.proj.bias"])
def test_flipped_byte_is_caught_naming_the_file(saved, tmp_path, tensor):
    d = _copy(saved[2], tmp_path)
    path = _weights(d)
    lo, hi = _tensor_span(path, tensor)
    raw = bytearray(path.read_bytes())
    raw[(lo + hi) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(HQFormatError, match=rf"diffusion_pytorch_model\.safetensors.*{tensor}.*CRC32"):
        ser.load_quantized(d)


@pytest.mark.parametrize("keep", [0.5, 0.999, 10 / 1e9])
def test_truncated_file_is_caught(saved, tmp_path, keep):
    d = _copy(saved[2], tmp_path)
    path = _weights(d)
    raw = path.read_bytes()
    path.write_bytes(raw[: max(4, int(len(raw) * keep))])
    with pytest.raises(HQFormatError, match=r"diffusion_pytorch_model\.safetensors.*(truncated|corrupt)"):
        ser.load_quantized(d)


def _rewrite_metadata(path, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    qc = json.loads(meta["hq_diffusion"])
    edit(qc)
    meta["hq_diffusion"] = json.dumps(qc)
    save_file(tensors, str(path), metadata=meta)


def _edit_config(d, edit):
    p = d / "transformer" / "config.json"
    cfg = json.loads(p.read_text())
    edit(cfg["quantization_config"])
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit,match", [
    (lambda qc: qc.update(format_version=2), "format version 2"),
    (lambda qc: qc["config"].update(_version=7), "HQConfig version 7"),
    (lambda qc: qc["layers"]["transformer_blocks.0.attn1.to_q"].update(version=3), "metadata version 3"),
])
def test_version_mismatch_is_caught(saved, tmp_path, edit, match):
    d = _copy(saved[2], tmp_path)
    _edit_config(d, edit)
    _rewrite_metadata(_weights(d), edit)
    with pytest.raises(HQFormatError, match=rf"transformer.config\.json.*{match}"):
        ser.load_quantized(d)
    # the safetensors copy is checked on its own too
    d2 = _copy(saved[2], tmp_path / "b")
    _rewrite_metadata(_weights(d2), edit)
    with pytest.raises(HQFormatError, match=rf"diffusion_pytorch_model\.safetensors.*{match}"):
        ser.load_quantized(d2 / "transformer")


def test_metadata_inconsistencies_are_caught(saved, tmp_path):
    d = _copy(saved[2], tmp_path)
    _edit_config(d, lambda qc: qc["layers"]["transformer_blocks.0.attn1.to_k"].update(alpha=1.5))
    with pytest.raises(HQFormatError, match="config.json.*disagrees"):
        ser.load_quantized(d)
    # consistent but wrong sizes: the buffers no longer match what the metadata describes
    d = _copy(saved[2], tmp_path / "b")

    def grow(qc):
        st = qc["layers"]["transformer_blocks.0.attn1.to_k"]["streams"][0]
        st["unary"] += 1

    _edit_config(d, grow)
    _rewrite_metadata(_weights(d), grow)
    with pytest.raises(HQFormatError, match="s0_unary.*shape"):
        ser.load_quantized(d)
    os.remove(_weights(d))
    with pytest.raises(HQFormatError, match="safetensors: file is missing"):
        ser.load_quantized(d)


def test_failed_save_keeps_the_previous_one(saved, tmp_path, monkeypatch):
    pipe, frames, src = saved
    d = _copy(src, tmp_path)
    before = sorted(os.listdir(tmp_path))

    def fail(model, path):
        path.mkdir(parents=True)
        (path / "partial").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(ser, "_write_component", fail)
    with pytest.raises(OSError, match="disk full"):
        ser.save_quantized(pipe, d)
    assert sorted(os.listdir(tmp_path)) == before  # no temporary directory left behind
    monkeypatch.undo()
    loaded = ser.load_quantized(d)
    _assert_same_state(loaded.transformer, pipe.transformer)
    ser.save_quantized(pipe, d)  # overwriting a good save with a good save works
    assert sorted(os.listdir(tmp_path)) == before


# ---- diffusers backend ------------------------------------------------------------------------------------

def test_diffusers_from_pretrained_loads_through_the_backend(saved, tmp_path):
    import diffusers

    import hq_diffusion.integrations.diffusers_backend  # noqa: F401  (registers quant_method="hq_diffusion")

    pipe, frames, d = saved
    tr = diffusers.LTXVideoTransformer3DModel.from_pretrained(d / "transformer")
    _assert_same_state(tr, pipe.transformer)
    assert tr.hq_state.config == pipe.transformer.hq_state.config
    # a whole pipeline through diffusers alone
    p2 = diffusers.LTXPipeline.from_pretrained(d)
    p2.set_progress_bar_config(disable=True)
    assert np.array_equal(generate(p2, "ltx", PROMPT, 0), frames)
    # diffusers' own save_pretrained writes an hq-diffusion checkpoint
    tr.save_pretrained(tmp_path / "resaved")
    _assert_same_state(ser.load_quantized(tmp_path / "resaved"), pipe.transformer)
    # and a corrupt file is refused before loading
    path = tmp_path / "resaved" / ser.WEIGHTS_NAME
    lo, hi = _tensor_span(path, "transformer_blocks.1.attn2.to_v.s0_rem")
    raw = bytearray(path.read_bytes())
    raw[lo] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(HQFormatError, match="CRC32"):
        diffusers.LTXVideoTransformer3DModel.from_pretrained(tmp_path / "resaved")


def test_diffusers_from_pretrained_quantizes_float_checkpoints(tmp_path):
    import diffusers

    import hq_diffusion.integrations.diffusers_backend  # noqa: F401

    tr = tiny_pipeline("pixart", 0).transformer
    tr.save_pretrained(tmp_path / "float")
    cfg = HQConfig(bps=4.0, mma="int8")
    q = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "float", quantization_config=cfg)
    ref = quantize(tiny_pipeline("pixart", 0).transformer, config=cfg, progress=False)
    _assert_same_state(q, ref)
    q.save_pretrained(tmp_path / "q")
    _assert_same_state(ser.load_quantized(tmp_path / "q"), ref)
    # a model quantized by hq_diffusion.quantize can be saved by diffusers too
    ref.save_pretrained(tmp_path / "ref")
    _assert_same_state(diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "ref"), ref)


def test_kv_config_is_persisted_and_reapplied(tmp_path):
    kv = pytest.importorskip("hq_diffusion.integrations.kv_processors")
    pipe = tiny_pipeline("ltx", 0)
    quantize(pipe, bps=4.0, kv_bps=3.0, kv_correction="haar", progress=False)
    ref = generate(pipe, "ltx", PROMPT, 0)
    ser.save_quantized(pipe, tmp_path / "kv")
    back = ser.load_quantized(tmp_path / "kv")
    back.set_progress_bar_config(disable=True)
    st0, st1 = pipe.transformer.hq_state, back.transformer.hq_state
    assert st1.kv == st0.kv and st1.kv_modules == st0.kv_modules
    assert kv.kv_summary(back.transformer) is not None
    kv.reset_kv_state(back.transformer)
    assert np.array_equal(generate(back, "ltx", PROMPT, 0), ref)
