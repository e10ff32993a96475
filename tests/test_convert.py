"""Streaming conversion (``hq-diffusion quantize``): bit-identity with ``save_quantized(quantize(model))``,
workers, shards, resume, the two-process split, bad input, ``load_quantized`` streaming, and ``quantize``
freeing each float weight as its layer is encoded."""
from __future__ import annotations

import filecmp
import json
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import hq_diffusion as hq
from hq_diffusion.bench.convert import encode_figures
from hq_diffusion.codec import HQFormatError
from hq_diffusion.integrations import convert as conv
from hq_diffusion.integrations.convert_cli import main as cli_main
from hq_diffusion.integrations.shards import INDEX_NAME, WEIGHTS_NAME, parse_size


def _same_tree(a: Path, b: Path) -> list[str]:
    """Relative paths that differ between the two directory trees (missing on one side, or other bytes)."""
    fa = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    diff = sorted(str(p) for p in fa ^ fb)
    diff += [str(p) for p in fa & fb if not filecmp.cmp(a / p, b / p, shallow=False)]
    return sorted(diff)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from hq_diffusion.models import tiny_pipeline

    root = tmp_path_factory.mktemp("convert")
    pipe = tiny_pipeline("ltx", dtype=torch.bfloat16)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    """save_quantized(quantize(from_pretrained(SRC))) of the transformer directory, loaded in its stored dtype."""
    from diffusers import LTXVideoTransformer3DModel

    out = tmp_path_factory.mktemp("ref") / "ref"
    m = LTXVideoTransformer3DModel.from_pretrained(str(src / "transformer"), torch_dtype=torch.bfloat16)
    hq.quantize(m, bps=4.0, progress=False)
    hq.save_quantized(m, out)
    return out


def _no_leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_model_dir_bit_identical_one_and_two_workers(src, reference, tmp_path):
    header = conv.open_component(src / "transformer", "").header
    for workers in (1, 2):
        out, stats = tmp_path / f"w{workers}", {}
        assert conv.convert(src / "transformer", out, bps=4.0, workers=workers, progress=False,
                            stats=stats) == out
        assert _same_tree(reference, out) == [], workers
        assert _no_leftovers(tmp_path, out.name) == []
        layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
        assert stats["workers"] == workers and stats["encode_s"] > 0
        assert stats["encoded_bytes"] == sum(conv.nbytes(*header[f"{n}.weight"]) for n in layers)
        assert stats["encode_mb_s"] == pytest.approx(stats["encoded_bytes"] / 1e6 / stats["encode_s"])


def test_next_job_admits_by_float_bytes_in_flight():
    """Largest first; a layer starts only while the bytes in flight stay ≤ IN_FLIGHT × the largest layer, at
    most one per worker; with nothing in flight the largest pending one always starts."""
    big = 100
    room = int(conv.IN_FLIGHT * big)
    assert conv._next_job([big, 60, 10], [], big, 2) == 0
    assert conv._next_job([big, 60, 10], [big], big, 2) == (1 if big + 60 <= room else 2)
    assert conv._next_job([big, big], [big], big, 2) is None       # two of the largest would exceed the cap
    assert conv._next_job([10], [big, 10], big, 2) is None          # every worker is busy
    assert conv._next_job([10], [big, 10], big, 3) == 0
    assert conv._next_job([], [], big, 2) is None
    assert conv._next_job([room - 30, 30], [30], big, 2) == 0       # exactly at the cap is admitted
    assert conv._next_job([room - 29, 30], [30], big, 2) == 1


def test_warmed_parent_leaves_workers_nothing_to_compile():
    """After ``codec.warm_compiled`` (what the parent runs before it forks), encoding real-shaped layers, a tall
    one (its α search samples strided rows) and an odd-width one, adds no numba specialization: the workers
    run the machine code the parent loaded and share its pages. Run in a fresh process: this one may have
    compiled them already."""
    script = """
import importlib, warnings
from types import SimpleNamespace
import numba, torch
from hq_diffusion.codec import warm_compiled
from hq_diffusion.integrations.config import HQConfig
from hq_diffusion.nn.linear import HQLinear

def signatures():
    out = {}
    for name in ("lattice_jit", "rans_jit"):
        mod = importlib.import_module("hq_diffusion.codec." + name)
        for k, v in vars(mod).items():
            if isinstance(v, numba.core.registry.CPUDispatcher):
                out[name + "." + k] = set(map(str, v.signatures))
    return out

cfg = HQConfig(bps=4.0)
torch.set_num_threads(1)
warm_compiled(cfg.codec_config())
before = signatures()
assert sum(map(len, before.values())) >= 2, before
for shape in [(1032, 1024), (1032, 1000), (64, 1000)]:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        HQLinear.from_linear(SimpleNamespace(weight=w, bias=None), cfg.codec_config(), key="x", name="x")
new = {k: v - before.get(k, set()) for k, v in signatures().items()}
print({k: sorted(v) for k, v in new.items() if v})
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "{}", r.stdout


def test_pool_workers_die_on_sigterm_and_leave_ctrl_c_to_the_parent():
    """The CLI's SIGTERM → KeyboardInterrupt handler is inherited by forked workers; Pool.terminate's SIGTERM
    could then leave an idle worker blocked on the queue lock forever (a hang at the end of 1 run in 12).
    The worker initializer restores the default action; checked in a fresh process with the CLI's handler."""
    code = ("import signal\n"
            "from hq_diffusion.integrations.convert_cli import _sigterm\n"
            "from hq_diffusion.integrations.convert import _worker_init\n"
            "signal.signal(signal.SIGTERM, _sigterm)\n"
            "_worker_init()\n"
            "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["True", "True"]


def test_pipeline_converted_and_loadable(src, reference, tmp_path):
    out = tmp_path / "pipe-hq"
    assert cli_main([str(src), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    # the transformer's weights are the in-process result (config.json differs only in _name_or_path, the
    # pipeline directory); every other component is a byte copy of the source
    assert _same_tree(reference, out / "transformer") == ["config.json", "hq_manifest.json"]
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert _same_tree(src / name, out / name) == []
    pipe = hq.load_quantized(out)
    assert len(hq.summary(pipe).layers) == len(json.loads((reference / "config.json").read_text())
                                               ["quantization_config"]["layers"])
    from diffusers import DiffusionPipeline

    p2 = DiffusionPipeline.from_pretrained(str(out))
    a, b = pipe.transformer.state_dict(), p2.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_output_loads_like_the_single_file(src, reference, tmp_path):
    out = tmp_path / "sharded"
    conv.convert(src / "transformer", out, bps=4.0, workers=1, progress=False, max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 2 and (out / INDEX_NAME).is_file() and not (out / WEIGHTS_NAME).exists()
    ref = hq.load_quantized(reference).state_dict()
    for loaded in (hq.load_quantized(out), type(hq.load_quantized(reference)).from_pretrained(str(out))):
        sd = loaded.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    # a shard's bytes flipped: refused naming the shard
    victim = out / shards[1]
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(HQFormatError, match=shards[1]):
        hq.load_quantized(out)


def test_resume_after_interrupt_encodes_only_the_rest(src, reference, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real, calls = conv.encode_job, []

    def interrupted(job, *a, **k):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(job.name)
        return real(job, *a, **k)

    monkeypatch.setattr(conv, "encode_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(src / "transformer", out, bps=4.0, workers=1, progress=False)
    assert not out.exists()
    (work,) = [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.hq-convert-")]
    assert len(list(work.rglob("*.safetensors"))) == 5
    calls.clear()
    monkeypatch.setattr(conv, "encode_job", lambda job, *a, **k: (calls.append(job.name), real(job, *a, **k))[1])
    conv.convert(src / "transformer", out, bps=4.0, workers=1, progress=False)
    total = len(json.loads((reference / "config.json").read_text())["quantization_config"]["layers"])
    assert len(calls) == total - 5
    assert _same_tree(reference, out) == [] and not work.exists()


@pytest.mark.slow  # two fresh interpreters importing torch + diffusers: about two minutes on a shared 2-core CPU
def test_two_process_split_identical(src, reference, tmp_path):
    """Two processes as ``accelerate launch`` starts them (RANK / WORLD_SIZE): each encodes its share, rank 0
    writes the output."""
    out = tmp_path / "split"
    cmd = [sys.executable, "-m", "hq_diffusion.cli", "quantize", str(src / "transformer"), "--out", str(out),
           "--workers", "1", "--no-progress"]
    procs = [subprocess.Popen(cmd, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    assert "wrote" in results[0][0] and "wrote" not in results[1][0]
    assert _same_tree(reference, out) == [] and _no_leftovers(tmp_path, out.name) == []


@pytest.mark.slow  # accelerate's launcher plus two interpreters importing torch + diffusers
def test_accelerate_launch_two_cpu_processes_identical(src, reference, tmp_path):
    """``accelerate launch`` itself, two processes on the CPU: one ``wrote`` line (rank 0), output identical to
    the in-process path. On a machine without GPUs accelerate's ``--multi_gpu`` starts the processes (its
    ``--cpu`` flag starts a single one)."""
    pytest.importorskip("accelerate")
    out = tmp_path / "launched"
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hq_diffusion.cli", "quantize",
           str(src / "transformer"), "--out", str(out), "--workers", "1", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run(cmd, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("hq-diffusion quantize: wrote") == 1, r.stdout
    assert r.stdout.count("hq-diffusion quantize: encoded") == 2, r.stdout  # both ranks encoded a share
    assert _same_tree(reference, out) == [] and _no_leftovers(tmp_path, out.name) == []


# ---- bad input: exit 2, one line naming the file and tensor, nothing left --------------------------------------

def _run_bad(argv, capsys, out: Path):
    code = cli_main([*argv, "--out", str(out), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert not out.exists() and _no_leftovers(out.parent, out.name) == []
    return err[0]


def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src / "transformer", dst)
    return dst


def _sharded_copy(src: Path, dst: Path) -> Path:
    """The source transformer re-saved as two float shards with an index."""
    from diffusers import LTXVideoTransformer3DModel

    m = LTXVideoTransformer3DModel.from_pretrained(str(src / "transformer"), torch_dtype=torch.bfloat16)
    m.save_pretrained(str(dst), max_shard_size="40KB")
    assert (dst / INDEX_NAME).is_file()
    return dst


def test_bad_inputs_refused(src, tmp_path, capsys):
    out = tmp_path / "out"
    sharded = _sharded_copy(src, tmp_path / "sharded")
    index = json.loads((sharded / INDEX_NAME).read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    # an index naming a tensor its shard lacks
    bad_index = _copy_model_dir(sharded, tmp_path / "badindex")
    idx = json.loads((bad_index / INDEX_NAME).read_text())
    idx["weight_map"]["ghost.weight"] = shard
    (bad_index / INDEX_NAME).write_text(json.dumps(idx))
    assert "ghost.weight" in _run_bad([str(bad_index)], capsys, out)
    # a missing shard
    missing = _copy_model_dir(sharded, tmp_path / "missing")
    (missing / shard).unlink()
    assert shard in _run_bad([str(missing)], capsys, out)
    # a truncated file
    trunc = _copy_model(src, tmp_path / "trunc")
    raw = (trunc / WEIGHTS_NAME).read_bytes()
    (trunc / WEIGHTS_NAME).write_bytes(raw[: len(raw) - 1000])
    assert WEIGHTS_NAME in _run_bad([str(trunc)], capsys, out)
    # a pickle checkpoint is refused, never unpickled
    pick = _copy_model(src, tmp_path / "pickle")
    (pick / WEIGHTS_NAME).unlink()
    (pick / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert "pickle" in _run_bad([str(pick)], capsys, out)
    # an already quantized source
    done = tmp_path / "done"
    conv.convert(src / "transformer", done, bps=4.0, workers=1, progress=False)
    assert "already quantized" in _run_bad([str(done)], capsys, out)
    # an existing DST without --overwrite (left untouched), and with it (replaced)
    out.mkdir()
    (out / "keep").write_text("x")
    assert cli_main([str(src / "transformer"), "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep").read_text() == "x"
    assert cli_main([str(src / "transformer"), "--out", str(out), "--no-progress", "--overwrite",
                     "--workers", "1"]) == 0
    assert not (out / "keep").exists() and (out / WEIGHTS_NAME).is_file()


@pytest.mark.parametrize("where", ["piece", "output shard"])
def test_disk_full_leaves_nothing_behind(src, tmp_path, capsys, monkeypatch, where):
    """A full disk while a layer's piece or an output shard is written: exit 2, one line naming the error,
    no DST, no temporary output and no resume directory."""
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(conv, "_write_piece" if where == "piece" else "_write_component", full)
    line = _run_bad([str(src / "transformer")], capsys, tmp_path / "out")
    assert "No space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _copy_model_dir(a: Path, b: Path) -> Path:
    import shutil

    shutil.copytree(a, b)
    return b


def test_nonfinite_weight_named_or_kept(src, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = _copy_model(src, tmp_path / "nan")
    sd = load_file(str(bad / WEIGHTS_NAME))
    victim = "transformer_blocks.0.ff.net.2.weight"
    sd[victim][0, 0] = float("nan")
    save_file(sd, str(bad / WEIGHTS_NAME), metadata={"format": "pt"})
    line = _run_bad([str(bad)], capsys, tmp_path / "out")
    assert victim in line and WEIGHTS_NAME in line
    out = tmp_path / "kept"
    with pytest.warns(UserWarning, match="transformer_blocks.0.ff.net.2"):
        conv.convert(bad, out, bps=4.0, workers=1, progress=False, on_invalid="skip")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "transformer_blocks.0.ff.net.2" in qc["skipped"]
    assert "transformer_blocks.0.ff.net.2" not in qc["layers"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(1000) == 1000
    for bad in ("", "5XB", "-1", 0):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


# ---- quantize() frees each float weight, load_quantized places tensors on the device --------------------------

def test_quantize_frees_each_weight_as_its_layer_is_encoded(monkeypatch):
    from hq_diffusion.models import tiny_transformer
    from hq_diffusion.nn.linear import HQLinear

    model = tiny_transformer("ltx")
    refs, alive_at_call = [], []
    real = HQLinear.from_linear.__func__

    def spy(cls, linear, *a, **k):
        alive_at_call.append(sum(r() is not None for r in refs))
        refs.append(weakref.ref(linear.weight))
        return real(cls, linear, *a, **k)

    monkeypatch.setattr(HQLinear, "from_linear", classmethod(spy))
    hq.quantize(model, bps=4.0, progress=False)
    assert len(alive_at_call) > 5
    # when layer i is encoded, the float weights of the layers before it are gone already
    assert alive_at_call == [0] * len(alive_at_call)


def test_load_quantized_streams_onto_the_device(reference):
    from hq_diffusion.integrations.state import read_verified_tensors

    raw = json.loads(__import__("safetensors").safe_open(str(reference / WEIGHTS_NAME), "pt").metadata()
                     ["hq_diffusion"])
    tensors = read_verified_tensors(reference / WEIGHTS_NAME, raw["checksums"], device="meta")
    assert tensors and all(t.device.type == "meta" for t in tensors.values())
    m = hq.load_quantized(reference, device="cpu")
    assert all(t.device.type == "cpu" for t in m.state_dict().values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_encode_bit_identical_to_cpu(src, reference, tmp_path):
    out = tmp_path / "cuda"
    conv.convert(src / "transformer", out, bps=4.0, device="cuda", progress=False)
    assert _same_tree(reference, out) == []
    m = hq.load_quantized(reference, device="cuda")
    assert all(t.device.type == "cuda" for t in m.state_dict().values())


def test_quantize_on_load_per_parameter(src, reference, monkeypatch):
    """from_pretrained(d, quantization_config=HQConfig(...)) encodes each layer as its weight loads (the
    "load everything, then quantize" path is never taken) and gives the in-process result."""
    from diffusers import LTXVideoTransformer3DModel

    from hq_diffusion.integrations import diffusers_backend
    from hq_diffusion.integrations.config import HQConfig

    def refuse(*a, **k):
        raise AssertionError("quantize() after loading: the per-parameter path was not used")

    monkeypatch.setattr(diffusers_backend, "quantize", refuse)
    m = LTXVideoTransformer3DModel.from_pretrained(str(src / "transformer"), torch_dtype=torch.bfloat16,
                                                   quantization_config=HQConfig(bps=4.0))
    ref = hq.load_quantized(reference).state_dict()
    sd = m.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert hq.summary(m).layers


def test_bench_convert_scales_only_the_blocks_to_the_full_depth(tmp_path):
    """The 48-block estimate of `bench convert` grows the per-block bytes, not the non-block part."""
    from safetensors.torch import save_file

    from hq_diffusion.bench.convert import block_bytes, scale_to_full

    save_file({"transformer_blocks.0.w": torch.zeros(10, dtype=torch.uint8),
               "transformer_blocks.1.w": torch.zeros(3, 2, dtype=torch.int32),
               "proj_out.weight": torch.zeros(100, dtype=torch.bfloat16)}, str(tmp_path / "a.safetensors"))
    save_file({"transformer_blocks.1.b": torch.zeros(6, dtype=torch.uint8)}, str(tmp_path / "b.safetensors"))
    assert block_bytes(tmp_path) == 10 + 24 + 6
    # 2 blocks of 20 bytes each + 200 bytes outside the blocks -> 48 blocks: 200 + 48 * 20
    assert scale_to_full(240, 40, 2) == 200 + 48 * 20


def test_bench_convert_reports_the_encode_speedup():
    """`bench convert` reads each conversion's encode line and states the N-worker / 1-worker ratios."""
    from hq_diffusion.bench.convert import encode_figures, speedup_note

    one = encode_figures("x\nhq-diffusion quantize: encoded 432 MB of float weights in 36.0 s (12.0 MB/s, 1 worker)")
    two = encode_figures("hq-diffusion quantize: encoded 432 MB of float weights in 20.0 s (21.6 MB/s, 2 workers)")
    assert one == {"mb": 432.0, "s": 36.0, "mb_s": 12.0, "workers": 1} and two["workers"] == 2
    note = speedup_note({"convert, 1 worker": {"encode": one}, "load_quantized": {"encode": None},
                         "convert, 2 workers": {"encode": two}})
    assert "1 worker 12.0 MB/s, 2 workers 21.6 MB/s: 1.80×" in note and "thread" not in note
    single = encode_figures("hq-diffusion quantize: encoded 432 MB of float weights in 40.0 s (10.8 MB/s, 1 worker)")
    note = speedup_note({"convert, 1 worker": {"encode": one}, "convert, 2 workers": {"encode": two},
                         "convert, 1 worker, 1 thread": {"encode": single}})
    assert "1.80×" in note
    assert "one torch thread (as each of the 2 workers runs) 10.8 MB/s: 2 workers 2.00× that" in note
    assert speedup_note({"convert, 1 worker": {"encode": one}}) == ""
    assert encode_figures("hq-diffusion quantize: wrote out") is None


@pytest.mark.parametrize("shard", [None, "200KB"])
def test_quantize_on_load_reads_each_tensor_only_when_loaded(src, reference, tmp_path, monkeypatch, shard):
    """Quantize-on-load replaces the shard diffusers read (views of one memory map of the whole file, kept
    resident by any parameter that survives) by a LazyShard: every tensor of the file is read on its own, when
    the loader reaches it; the result is the in-process one, single file or sharded."""
    from diffusers import LTXVideoTransformer3DModel

    from hq_diffusion.integrations import load_quantize
    from hq_diffusion.integrations.config import HQConfig

    d = src / "transformer"
    if shard is not None:
        d = tmp_path / "sharded"
        LTXVideoTransformer3DModel.from_pretrained(str(src / "transformer")).save_pretrained(
            d, max_shard_size=shard)
        assert (d / INDEX_NAME).is_file()
    read, orig = [], load_quantize.read_tensor
    monkeypatch.setattr(load_quantize, "read_tensor", lambda f, k, *a: read.append(k) or orig(f, k, *a))
    m = LTXVideoTransformer3DModel.from_pretrained(str(d), torch_dtype=torch.bfloat16,
                                                   quantization_config=HQConfig(bps=4.0))
    ref = hq.load_quantized(reference).state_dict()
    sd = m.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    planned = [r.name for r in hq.summary(m).layers]
    assert planned and all(f"{k}.weight" in read for k in planned)
    assert len(read) >= len(LTXVideoTransformer3DModel.from_pretrained(str(d)).state_dict())


def test_single_file_with_model_class(src, reference, tmp_path, capsys):
    """A single-file safetensors SRC converts with --model-class (+ --config) to the in-process result; without
    the class, or with an unknown one, it is a one-line error (exit 2) and nothing is written."""
    file = src / "transformer" / WEIGHTS_NAME
    out = tmp_path / "single"
    assert cli_main([str(file), "--out", str(out), "--no-progress"]) == 2
    assert "needs --model-class" in capsys.readouterr().err and not out.exists()
    assert cli_main([str(file), "--out", str(out), "--model-class", "NoSuchModel", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'NoSuchModel': not a diffusers model class" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert cli_main([str(file), "--out", str(out), "--model-class", "LTXVideoTransformer3DModel", "--config",
                     str(src / "transformer" / "config.json"), "--workers", "1", "--no-progress"]) == 0
    got, ref = hq.load_quantized(out).state_dict(), hq.load_quantized(reference).state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_snr_db_is_row_blocked_and_independent_of_the_blocking(monkeypatch):
    """HQLinear.from_linear's SNR works on row blocks (bounded memory on real-size weights); the stored value is
    the whole-weight float64 SNR, and the same for any block size (rounded to SNR_DECIMALS)."""
    from hq_diffusion.codec.config import CodecConfig
    from hq_diffusion.nn import linear as L

    torch.manual_seed(3)
    lin = torch.nn.Linear(300, 77).to(torch.bfloat16)  # odd shapes: padded rows, a short last block
    m = L.HQLinear.from_linear(lin, CodecConfig(bps=4.0), key="blk")
    w = lin.weight.detach().double()
    ref = 10 * torch.log10(w.square().sum() / (m.dequantize().double() - w).square().sum()).item()
    seen = set()
    for elems in (1, 300, 1000, 1 << 22):
        monkeypatch.setattr(L, "SNR_BLOCK_ELEMS", elems)
        seen.add(L._snr_db(lin.weight.detach(), m))
    assert len(seen) == 1 and m.hq_meta["snr_db"] in seen
    assert abs(m.hq_meta["snr_db"] - ref) < 2e-3  # dequantize() rounds to bf16; the SNR uses float32


def test_cli_scale_dtype_log8(src, tmp_path, capsys):
    """`hq-diffusion quantize --scale-dtype log8` reaches every layer (uint8 scale sections) and loads."""
    from hq_diffusion.nn.linear import HQLinear

    out = tmp_path / "log8"
    assert cli_main([str(src / "transformer"), "--out", str(out), "--workers", "1", "--no-progress",
                     "--scale-dtype", "log8"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"hq-diffusion quantize: encoded \d+ MB of float weights in [\d.]+ s "
                        r"\([\d.]+ MB/s, 1 worker\)", last), last
    enc = encode_figures(last)  # what `bench convert` reads from it
    assert enc["workers"] == 1 and enc["s"] > 0 and enc["mb_s"] > 0
    model = hq.load_quantized(out)
    layers = [m for m in model.modules() if isinstance(m, HQLinear)]
    assert layers and all(m.scale_dtype == "log8" and m.scales.dtype == torch.uint8 for m in layers)
