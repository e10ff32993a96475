"""Issue 10, findings 1–7: loading never yields wrong or missing weights, saves are byte-reproducible and
crash-proof. Each test tampers with a saved checkpoint (or interrupts a save) and expects one HQFormatError
naming the file (and tensor), or the old/new checkpoint intact."""
from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

from hq_diffusion.codec import HQFormatError
from hq_diffusion.integrations import manifest as man
from hq_diffusion.integrations import serialization as ser
from hq_diffusion.integrations.api import quantize
from hq_diffusion.models import tiny_pipeline

TR = "transformer"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LTX pipeline quantized at 4 bps and saved by save_quantized (with its manifest)."""
    pipe = tiny_pipeline("ltx", 0)
    quantize(pipe, bps=4.0, progress=False)
    d = tmp_path_factory.mktemp("rel") / "ltx"
    ser.save_quantized(pipe, d)
    return pipe, d


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _st(d, comp=TR):
    return d / comp / ser.WEIGHTS_NAME


def _rewrite(path, edit_meta=None, edit_tensors=None):
    """Rewrite a safetensors file: ``edit_meta(qc dict)`` on its hq-diffusion JSON (None: leave the raw
    metadata), ``edit_tensors(dict)`` on its tensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    if edit_tensors is not None:
        edit_tensors(tensors)
    if edit_meta is not None:
        qc = json.loads(meta["hq_diffusion"])
        edit_meta(qc)
        meta["hq_diffusion"] = json.dumps(qc)
    save_file(tensors, str(path), metadata=meta)


def _old_style(d, comp=TR):
    """Make ``d`` look saved before manifests existed: no hq_manifest.json, no dtype record, no manifest flag."""
    if (d / man.MANIFEST_NAME).exists():
        os.remove(d / man.MANIFEST_NAME)

    def strip(qc):
        qc.pop("dtypes", None), qc.pop("manifest", None)

    _rewrite(_st(d, comp), strip)
    return d


def _edit_json(path, edit):
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def _load_tr_with_diffusers(path):
    import diffusers

    import hq_diffusion.integrations.diffusers_backend  # noqa: F401  (registers the backend)

    return diffusers.LTXVideoTransformer3DModel.from_pretrained(path)


# ---- 1. quantization_config stripped from config.json ---------------------------------------------------------

def _strip_config_and_expect_refusal(d):
    """Remove the transformer's quantization_config; every load path must refuse it, naming config.json."""
    _edit_json(d / TR / "config.json", lambda c: c.pop("quantization_config"))
    msg = r"transformer.config\.json: no hq_diffusion quantization_config, but .*hq-diffusion checkpoint"
    with pytest.raises(HQFormatError, match=msg):
        ser.load_quantized(d)
    with pytest.raises(HQFormatError, match=msg):
        ser.load_quantized(d / TR)
    with pytest.raises(HQFormatError, match=msg):
        _load_tr_with_diffusers(d / TR)


@pytest.mark.parametrize("old", [False, True], ids=["with-manifest", "pre-manifest"])
def test_stripped_quantization_config_is_refused(saved, tmp_path, old):
    d = _copy(saved[1], tmp_path)
    if old:
        _old_style(d)
    _strip_config_and_expect_refusal(d)


def test_stripped_config_and_metadata_is_refused_by_buffer_names(saved, tmp_path):
    d = _old_style(_copy(saved[1], tmp_path))
    _edit_json(d / TR / "config.json", lambda c: c.pop("quantization_config"))
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(_st(d)), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(_st(d)), metadata={"format": "pt"})
    with pytest.raises(HQFormatError, match=r"config\.json.*HQLinear buffers"):
        ser.load_quantized(d)
    with pytest.raises(HQFormatError, match=r"config\.json.*HQLinear buffers"):
        _load_tr_with_diffusers(d / TR)


# ---- 2. a tensor removed together with its checksum ---------------------------------------------------------

def _drop_proj_out_bias(d):
    def meta(qc):
        for key in ("checksums", "dtypes"):
            qc.get(key, {}).pop("proj_out.bias", None)

    _rewrite(_st(d), meta, lambda t: t.pop("proj_out.bias"))


def test_missing_tensor_is_a_named_error(saved, tmp_path):
    d = _old_style(_copy(saved[1], tmp_path))
    _drop_proj_out_bias(d)
    with pytest.raises(HQFormatError, match=r"diffusion_pytorch_model\.safetensors.*missing.*proj_out\.bias"):
        ser.load_quantized(d)
    with pytest.raises(HQFormatError, match=r"diffusion_pytorch_model\.safetensors.*missing.*proj_out\.bias"):
        _load_tr_with_diffusers(d / TR)


def test_no_meta_tensor_after_any_load(saved):
    _, d = saved
    tr = _load_tr_with_diffusers(d / TR)
    pipe = ser.load_quantized(d)
    for m in (tr, *[c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]):
        assert not [n for n, t in (*m.named_parameters(), *m.named_buffers()) if t.device.type == "meta"]


# ---- 3. manifest: non-quantized components and hand-edited configs --------------------------------------------

def _flip(path, frac=0.5):
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * frac)] ^= 0x01
    path.write_bytes(bytes(raw))


def _files(d):
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


def test_every_file_is_in_the_manifest(saved):
    _, d = saved
    listed = json.loads((d / man.MANIFEST_NAME).read_text())["files"]
    assert sorted(listed) == [f for f in _files(d) if f != man.MANIFEST_NAME]
    assert {"vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "model_index.json",
            "transformer/config.json"} <= set(listed)


@pytest.mark.parametrize("rel", ["vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                                 "vae/config.json", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"])
def test_flipped_byte_in_a_non_quantized_file_is_caught(saved, tmp_path, rel):
    d = _copy(saved[1], tmp_path)
    _flip(d / rel)
    with pytest.raises(HQFormatError, match=rf"{rel.replace('.', '[.]')}: SHA-256 differs"):
        ser.load_quantized(d)


def test_flipped_vae_byte_is_caught_through_diffusers(saved, tmp_path):
    import diffusers

    import hq_diffusion.integrations.diffusers_backend  # noqa: F401

    d = _copy(saved[1], tmp_path)
    _flip(d / "vae" / ser.WEIGHTS_NAME)
    with pytest.raises(HQFormatError, match=r"vae.diffusion_pytorch_model\.safetensors: SHA-256 differs"):
        diffusers.LTXPipeline.from_pretrained(d)
    d2 = _copy(saved[1], tmp_path, "b")
    _flip(d2 / "text_encoder" / "model.safetensors")  # a transformers model: checked when the transformer loads
    with pytest.raises(HQFormatError, match=r"text_encoder.model\.safetensors: SHA-256 differs"):
        diffusers.LTXPipeline.from_pretrained(d2)


@pytest.mark.parametrize("field,value", [("num_attention_heads", 4), ("norm_eps", 1e-3), ("activation_fn", "gelu"),
                                         ("attention_head_dim", 16)])
def test_hand_edited_architecture_field_is_caught(saved, tmp_path, field, value):
    d = _copy(saved[1], tmp_path)
    _edit_json(d / TR / "config.json", lambda c: c.update({field: value}))
    with pytest.raises(HQFormatError, match=r"transformer.(config\.json|diffusion_pytorch_model\.safetensors)"):
        ser.load_quantized(d)
    with pytest.raises(HQFormatError, match=r"transformer.(config\.json|diffusion_pytorch_model\.safetensors)"):
        _load_tr_with_diffusers(d / TR)


def test_deleted_manifest_is_refused_but_pre_manifest_directories_load_with_a_warning(saved, tmp_path):
    pipe, src = saved
    d = _copy(src, tmp_path)
    os.remove(d / man.MANIFEST_NAME)
    with pytest.raises(HQFormatError, match=r"hq_manifest\.json: file is missing.*saved with a manifest"):
        ser.load_quantized(d)
    d = _old_style(_copy(src, tmp_path, "old"))  # what the code before the manifest wrote
    with pytest.warns(UserWarning, match="no hq_manifest.json"):
        back = ser.load_quantized(d)
    sa, sb = pipe.transformer.state_dict(), back.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_added_or_removed_file_is_caught(saved, tmp_path):
    d = _copy(saved[1], tmp_path)
    (d / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(HQFormatError, match=r"vae.diffusion_pytorch_model\.bin: file is not part"):
        ser.load_quantized(d)
    d = _copy(saved[1], tmp_path, "b")
    os.remove(d / "tokenizer" / "tokenizer_config.json")
    with pytest.raises(HQFormatError, match=r"tokenizer_config\.json: file is missing"):
        ser.load_quantized(d)


def test_every_single_byte_flip_sweep_is_refused(saved, tmp_path):
    """One flipped byte in the middle of each file of the saved pipeline: every load refuses, naming the file."""
    _, src = saved
    results = {}
    for rel in _files(src):
        d = _copy(src, tmp_path, rel.replace("/", "_"))
        _flip(d / rel)
        with pytest.raises(HQFormatError) as e:
            ser.load_quantized(d)
        results[rel] = str(e.value)
        shutil.rmtree(d)
    assert len(results) == 11  # 10 files and the manifest
    for rel, msg in results.items():
        assert rel.split("/")[-1] in msg, (rel, msg)


# ---- 4. a float tensor re-typed (checksum updated) ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_retyped_float_tensor_is_refused(saved, tmp_path, dtype):
    from hq_diffusion.integrations.state import tensor_crc32

    d = _copy(saved[1], tmp_path)
    new = {}

    def tensors(t):
        t["proj_out.bias"] = new["t"] = t["proj_out.bias"].to(dtype)

    def meta(qc):
        qc["checksums"]["proj_out.bias"] = tensor_crc32(new["t"])

    _rewrite(_st(d), None, tensors)
    _rewrite(_st(d), meta)
    msg = r"diffusion_pytorch_model\.safetensors: tensor 'proj_out\.bias' is stored as F(16|64) but was saved as F32"
    with pytest.raises(HQFormatError, match=msg):
        ser.load_quantized(d)
    with pytest.raises(HQFormatError, match=msg):
        _load_tr_with_diffusers(d / TR)


def test_retyped_hqlinear_float_buffer_is_refused_without_a_record(saved, tmp_path):
    """Older checkpoints have no dtype record; the HQLinear tensors' dtypes are still fixed by their metadata."""
    from hq_diffusion.integrations.state import tensor_crc32

    d = _old_style(_copy(saved[1], tmp_path))
    name = "transformer_blocks.0.attn1.to_q.bias"
    new = {}

    def tensors(t):
        t[name] = new["t"] = t[name].to(torch.float64)

    _rewrite(_st(d), None, tensors)
    _rewrite(_st(d), lambda qc: qc["checksums"].update({name: tensor_crc32(new["t"])}))
    with pytest.raises(HQFormatError, match=rf"tensor '{name}' has dtype F64"):
        ser.load_quantized(d)


# ---- 5. deeply nested JSON; every error an HQFormatError naming the file -------------------------------------------

DEEP = "[" * 200_000 + "]" * 200_000


def test_deeply_nested_config_json_names_the_file(saved, tmp_path):
    d = _copy(saved[1], tmp_path)
    p = d / TR / "config.json"
    p.write_text(p.read_text()[:-2] + f', "deep": {DEEP}}}\n')
    with pytest.raises(HQFormatError, match=r"transformer.config\.json: JSON nested too deeply"):
        ser.load_quantized(d)
    with pytest.raises(HQFormatError, match=r"transformer.config\.json: JSON nested too deeply"):
        _load_tr_with_diffusers(d / TR)
    (d / "model_index.json").write_text(DEEP)
    with pytest.raises(HQFormatError, match=r"model_index\.json: JSON nested too deeply"):
        ser.load_quantized(d)


def test_deeply_nested_safetensors_metadata_names_the_file(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = _copy(saved[1], tmp_path)
    with safe_open(str(_st(d)), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(_st(d)), metadata={"format": "pt", "hq_diffusion": DEEP})
    with pytest.raises(HQFormatError, match=r"diffusion_pytorch_model\.safetensors.*nested too deeply"):
        ser.load_quantized(d)
    with pytest.raises(HQFormatError, match=r"diffusion_pytorch_model\.safetensors.*nested too deeply"):
        _load_tr_with_diffusers(d / TR)


def test_bad_config_value_on_the_diffusers_path_names_the_file(saved, tmp_path):
    d = _old_style(_copy(saved[1], tmp_path))
    _edit_json(d / TR / "config.json", lambda c: c.update(num_layers="two"))
    with pytest.raises(HQFormatError, match=r"transformer.config\.json"):
        _load_tr_with_diffusers(d / TR)
    with pytest.raises(HQFormatError, match=r"transformer.config\.json"):
        ser.load_quantized(d)


@pytest.mark.parametrize("kv", [{"bogus": 1}, "x", {"_type": "KVConfig", "_version": 1, "_data": {"bps": "many"}}])
def test_bad_kv_config_is_a_named_error(saved, tmp_path, kv):
    d = _old_style(_copy(saved[1], tmp_path))
    _edit_json(d / TR / "config.json", lambda c: c["quantization_config"].update(kv=kv))
    _rewrite(_st(d), lambda qc: qc.update(kv=kv))
    with pytest.raises(HQFormatError, match=r"transformer.config\.json"):
        ser.load_quantized(d)
    with pytest.raises(HQFormatError, match=r"transformer.config\.json"):
        _load_tr_with_diffusers(d / TR)


# ---- 6. byte-reproducible saves ----------------------------------------------------------------------------------

def _tiny_net(bps=4.0):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
    return quantize(net, bps=bps, progress=False)


def _skeleton():
    with torch.device("meta"):
        return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))


def _tree_bytes(d):
    return {rel: (d / rel).read_bytes() for rel in _files(d)}


def test_saves_are_byte_reproducible(saved, tmp_path):
    net = _tiny_net()
    trees = []
    for i in range(6):  # the safetensors writer orders metadata keys at random: 6 saves all equal by chance: 1/32
        ser.save_quantized(net, tmp_path / f"n{i}")
        trees.append(_tree_bytes(tmp_path / f"n{i}"))
    assert all(t == trees[0] for t in trees)
    pipe, src = saved
    ser.save_quantized(pipe, tmp_path / "p")
    assert _tree_bytes(tmp_path / "p") == _tree_bytes(src)


# ---- 7. crash-proof saves ----------------------------------------------------------------------------------------

def _assert_is(d, net):
    back = ser.load_quantized(d, model=_skeleton())
    x = torch.randn(4, 64)
    assert torch.equal(back(x), net(x))


def _siblings(d):
    return sorted(n for n in os.listdir(d.parent) if n != d.name)


class Killed(BaseException):
    """Stands for the process dying: raised by every rename after the first, the rollback's included."""


def test_exchange_failure_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    old, new = _tiny_net(4.0), _tiny_net(3.0)
    d = tmp_path / "ck"
    ser.save_quantized(old, d)

    def boom(a, b):
        raise OSError("exchange failed")

    monkeypatch.setattr(ser, "_exchange", boom, raising=False)
    with pytest.raises(OSError, match="exchange failed"):
        ser.save_quantized(new, d)
    _assert_is(d, old)
    assert _siblings(d) == []


def test_save_over_an_existing_checkpoint_uses_one_atomic_step(tmp_path, monkeypatch):
    """With the exchange available, no rename ever leaves the target absent: forbid renames onto it."""
    old, new = _tiny_net(4.0), _tiny_net(3.0)
    d = tmp_path / "ck"
    ser.save_quantized(old, d)
    real = os.rename

    def guarded(a, b):
        if os.fspath(a) == os.fspath(d):
            raise AssertionError("the target was renamed away: a window where it is absent")
        real(a, b)

    monkeypatch.setattr(os, "rename", guarded)
    ser.save_quantized(new, d)
    _assert_is(d, new)
    assert _siblings(d) == []


@pytest.mark.parametrize("die_at", [1, 2])
def test_crash_between_the_fallback_renames_is_recovered(tmp_path, monkeypatch, die_at):
    """Without the exchange (other OS or filesystem), a death after ``die_at`` renames: the target loads as the
    old checkpoint (recovered from .hq-old-*), and the next save cleans up and succeeds."""
    old, new = _tiny_net(4.0), _tiny_net(3.0)
    d = tmp_path / "ck"
    ser.save_quantized(old, d)
    real, calls = os.rename, []

    def dying(a, b):
        calls.append((a, b))
        if len(calls) >= die_at:
            raise Killed()
        real(a, b)

    monkeypatch.setattr(ser, "_exchange", lambda a, b: False, raising=False)
    monkeypatch.setattr(os, "rename", dying)
    with pytest.raises(Killed):
        ser.save_quantized(new, d)
    monkeypatch.undo()
    if die_at == 2:
        assert not d.exists() and any(".hq-old-" in n for n in _siblings(d))  # the window the issue found
    if die_at == 2:
        with pytest.warns(UserWarning, match="restored the previous checkpoint"):
            _assert_is(d, old)
    else:
        _assert_is(d, old)
    ser.save_quantized(new, d)
    _assert_is(d, new)
    assert _siblings(d) == []


def test_next_save_removes_leftovers_of_interrupted_saves(tmp_path):
    net = _tiny_net()
    d = tmp_path / "ck"
    ser.save_quantized(net, d)
    for stale in (".ck.hq-tmp-deadbeef", ".ck.hq-old-0badf00d"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "partial").write_text("x")
    (tmp_path / "other").mkdir()  # not ours: kept
    ser.save_quantized(net, d)
    assert _siblings(d) == ["other"]
    _assert_is(d, net)


# ---- longer sweeps (make test-slow) ---------------------------------------------------------------------------

FRACS = (0.0, 0.05, 0.25, 0.5, 0.75, 0.999)


@pytest.mark.slow
def test_byte_flip_sweep_at_many_offsets(saved, tmp_path):
    """Six flipped bytes (header to tail) per file of the saved pipeline, one per load: all refused, naming the
    file (11 files × 6 offsets = 66 loads)."""
    _, src = saved
    n = 0
    for rel in _files(src):
        for frac in FRACS:
            d = _copy(src, tmp_path, "t")
            _flip(d / rel, frac)
            with pytest.raises(HQFormatError) as e:
                ser.load_quantized(d)
            assert rel.split("/")[-1] in str(e.value), (rel, frac, str(e.value))
            shutil.rmtree(d)
            n += 1
    assert n == 66


_KILL = """
import os, sys, torch
from hq_diffusion.integrations import serialization as ser
from hq_diffusion.integrations.api import quantize
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
quantize(net, bps=3.0, progress=False)
die_at, exchange = int(sys.argv[2]), sys.argv[3] == "1"
if not exchange:
    ser._exchange = lambda a, b: False
calls, real_rename, real_rmtree = [], os.rename, ser.shutil.rmtree
def rename(a, b):
    calls.append(1)
    if len(calls) == die_at:
        os._exit(17)
    real_rename(a, b)
def rmtree(p, *a, **k):  # dying while deleting the old copy
    if die_at == 0:
        os._exit(17)
    real_rmtree(p, *a, **k)
os.rename, ser.shutil.rmtree = rename, rmtree
ser.save_quantized(net, sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("die_at", [0, 1, 2])
def test_killed_save_leaves_old_or_new(tmp_path, exchange, die_at):
    """A save killed (``os._exit``) at each rename step or while deleting: the target loads as the old or the
    new checkpoint, and the next save leaves no leftovers."""
    import subprocess
    import sys

    old, new = _tiny_net(4.0), _tiny_net(3.0)
    d = tmp_path / "ck"
    ser.save_quantized(old, d)
    r = subprocess.run([sys.executable, "-c", _KILL, str(d), str(die_at), "1" if exchange else "0"],
                       capture_output=True, timeout=300)
    assert r.returncode in (0, 17), r.stderr.decode()[-2000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the restore warning of the two-renames window
        back = ser.load_quantized(d, model=_skeleton())
    x = torch.randn(4, 64)
    assert torch.equal(back(x), old(x)) or torch.equal(back(x), new(x))
    ser.save_quantized(new, d)
    _assert_is(d, new)
    assert _siblings(d) == []


# ---- sharded components (hq-diffusion quantize --max-shard-size) --------------------------------------------

@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The tiny LTX pipeline converted by ``hq-diffusion quantize`` into a transformer of several shards."""
    from hq_diffusion.integrations.convert_cli import main

    root = tmp_path_factory.mktemp("sharded")
    tiny_pipeline("ltx", 0).save_pretrained(root / "float")
    assert main([str(root / "float"), "--out", str(root / "q"), "--max-shard-size", "100KB", "--workers", "1",
                 "--no-progress"]) == 0
    assert len(list((root / "q" / TR).glob("*.safetensors"))) > 1 and not _st(root / "q").exists()
    return root / "q"


def test_stripped_config_of_a_sharded_component_is_refused(sharded, tmp_path):
    d = _copy(sharded, tmp_path)
    _strip_config_and_expect_refusal(d)


def test_sharded_component_without_its_manifest_is_refused(sharded, tmp_path):
    d = _copy(sharded, tmp_path)
    ser.load_quantized(d)  # intact: loads
    os.remove(d / man.MANIFEST_NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, not a warning
        with pytest.raises(HQFormatError, match=r"hq_manifest\.json: file is missing.*saved with a manifest"):
            ser.load_quantized(d)
