"""Streaming conversion of a float diffusers checkpoint into an hq-diffusion checkpoint (``hq-diffusion quantize``).

:func:`convert` reads the source one tensor at a time (``safetensors.safe_open``), encodes every ``nn.Linear``
weight that :func:`~.quantize.quantize` would encode (the same plan: skip rules, non-finite policy), copies the
other tensors, and writes the component as :func:`~.serialization.save_quantized` writes it — with one shard,
the same bytes as ``save_quantized(quantize(model))`` of the model loaded from the source in its stored dtypes;
with several (``max_shard_size``), diffusers' sharded layout (each shard's metadata carries the
``quantization_config``, the CRC32 of every tensor of the component and the dtypes of its own tensors).

Memory: at any time one float weight (and its encoder's work space) per worker, plus one output tensor being
written; nothing else of the model is held. Each encoded layer is written to a *piece* file in a hidden
resume directory next to the target (``.<DST>.hq-convert-<fingerprint>/``) as soon as it is done, so that an
interrupted run (Ctrl-C, kill) resumes from the finished layers when the same command runs again; the final
directory is assembled from the pieces and the source into a temporary directory and put in place atomically
(:func:`~.serialization._atomic_dir`). Any error but an interruption removes the resume directory and the
temporary output: nothing partial is left.

Parallelism: ``workers`` processes encode layers concurrently (each a layer at a time, one torch thread); the
bytes do not depend on the number of workers. Across processes/machines sharing the target's file system
(``accelerate launch``, or any launcher that sets ``RANK`` and ``WORLD_SIZE``), rank ``r`` encodes the layers
``i ≡ r (mod WORLD_SIZE)`` and rank 0, once every piece is present, assembles the output. On machines without
GPUs, ``accelerate launch --multi_gpu --num_processes N -m hq_diffusion.cli quantize ...`` starts N processes
(accelerate's ``--cpu`` starts one).

Not supported: hub ids (SRC is a local directory), pickle checkpoints (``.bin``/``.pt``: refused, never
unpickled), single-file checkpoints in the original (non-diffusers) key layout.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from ..codec import HQFormatError, warm_compiled
from ..nn.linear import HQLinear
from .config import HQConfig, QuantMethod, resolve_config
from .memory import release_after_layer
from .quantize import NONFINITE, ON_INVALID, _plan, check_finite
from .serialization import CONFIG_NAME, PIPELINE_INDEX, _atomic_dir, _skeleton
from .shards import (INDEX_NAME, WEIGHTS_NAME, nbytes, plan_shards, shard_names, write_index,
                     write_safetensors)
from .state import (METADATA_KEY, ST_DTYPES, ST_NAMES, STATE_ATTR, HQState, apply_kv, quantization_config,
                    read_json_file, read_safetensors_header, tensor_crc32)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_RESUME = ".hq-convert-"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ConvertError(ValueError):
    """A conversion refused on its input (one line naming the file and tensor; nothing is written)."""


# ---- the source ----------------------------------------------------------------------------------------------

@dataclass
class Component:
    """One model directory of the source: its config, and for every stored tensor its file, dtype and shape."""

    name: str
    path: Path
    config: dict
    files: dict[str, Path] = field(default_factory=dict)
    header: dict[str, tuple[str, tuple]] = field(default_factory=dict)


def _refuse_pickles(path: Path) -> None:
    bad = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES) if path.is_dir() else []
    if bad:
        raise ConvertError(f"{path / bad[0]}: pickle checkpoints are refused (never unpickled); convert it to "
                           f"safetensors first")


def open_component(path: Path, name: str) -> Component:
    """Read the config and every tensor header of the model directory ``path`` (nothing else is read).

    Raises ConvertError / HQFormatError naming the file (and tensor) for: a missing config, a quantized source,
    no safetensors weights (pickles refused), a shard the index names that is missing, an index naming a tensor
    its shard lacks, a truncated or corrupt file."""
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise ConvertError(f"{cfg_path}: file is missing (not a diffusers model directory)")
    config = read_json_file(cfg_path)
    qc = config.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        what = "hq-diffusion" if method == QuantMethod.HQ_DIFFUSION.value else repr(method)
        raise ConvertError(f"{cfg_path}: the source is already quantized ({what} quantization_config); "
                           f"convert a float checkpoint")
    comp = Component(name, path, config)
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if index.is_file() and not single.is_file():
        wm = read_json_file(index).get("weight_map")
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise ConvertError(f"{index}: no valid weight_map")
        by_file: dict[str, list[str]] = {}
        for k, f in wm.items():
            by_file.setdefault(f, []).append(k)
        for fname, keys in by_file.items():
            fpath = path / fname
            if Path(fname).suffix in PICKLE_SUFFIXES:
                raise ConvertError(f"{fpath}: pickle checkpoints are refused (never unpickled)")
            if not fpath.is_file():
                raise ConvertError(f"{fpath}: shard named by {index.name} is missing (tensor {keys[0]!r})")
            _, header = read_safetensors_header(fpath)
            for k in keys:
                if k not in header:
                    raise ConvertError(f"{fpath}: tensor {k!r} named by {index.name} is not in this file")
                comp.files[k], comp.header[k] = fpath, header[k]
    elif single.is_file():
        _, header = read_safetensors_header(single)
        comp.header = dict(header)
        comp.files = {k: single for k in header}
    else:
        _refuse_pickles(path)
        raise ConvertError(f"{path}: no {WEIGHTS_NAME} nor {INDEX_NAME} (safetensors weights are required)")
    for k, (dt, _) in comp.header.items():
        if dt not in ST_DTYPES:
            raise ConvertError(f"{comp.files[k]}: tensor {k!r} has dtype {dt}, which hq-diffusion does not handle")
    meta = read_safetensors_header(next(iter(comp.files.values())))[0] if comp.files else {}
    if METADATA_KEY in meta:
        raise ConvertError(f"{next(iter(comp.files.values()))}: the source is already an hq-diffusion checkpoint")
    return comp


def resolve_model_class(name: str):
    """The diffusers ``ModelMixin`` subclass called ``name`` (ConvertError naming it when there is none)."""
    import diffusers

    cls = getattr(diffusers, str(name), None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ConvertError(f"--model-class {name!r}: not a diffusers model class (e.g. LTX2VideoTransformer3DModel, "
                           f"FluxTransformer2DModel)")
    return cls


def open_single_file(file: Path, class_name: str | None, config_src=None) -> Component:
    """A single-file safetensors checkpoint as a component of class ``class_name``, configured by
    ``config_src`` (a model directory with config.json, or a JSON file; None: the class's defaults)."""
    if class_name is None:
        raise ConvertError(f"{file}: a single-file checkpoint needs --model-class (the diffusers class of its "
                           f"model, e.g. LTX2VideoTransformer3DModel) and, unless the class's defaults fit, --config")
    cls = resolve_model_class(class_name)
    if config_src is None:
        from accelerate import init_empty_weights

        with init_empty_weights():
            config = dict(cls().config)
        where = file.parent
    else:
        cfg_path = Path(config_src)
        cfg_path = cfg_path / CONFIG_NAME if cfg_path.is_dir() else cfg_path
        if not cfg_path.is_file():
            raise ConvertError(f"{cfg_path}: --config file is missing")
        config = dict(read_json_file(cfg_path))
        where = cfg_path.parent
    config["_class_name"] = cls.__name__
    if config.get("quantization_config") is not None:
        raise ConvertError(f"{config_src}: the config carries a quantization_config; convert a float checkpoint")
    _, header = read_safetensors_header(file)
    comp = Component("", where, config, {k: file for k in header}, dict(header))
    for k, (dt, _) in comp.header.items():
        if dt not in ST_DTYPES:
            raise ConvertError(f"{file}: tensor {k!r} has dtype {dt}, which hq-diffusion does not handle")
    if METADATA_KEY in read_safetensors_header(file)[0]:
        raise ConvertError(f"{file}: the source is already an hq-diffusion checkpoint")
    return comp


def _sources(src: Path, components, class_name: str | None = None,
             config_src=None) -> tuple[dict[str, Component], bool]:
    """({component name: Component} to quantize, whether ``src`` is a pipeline directory)."""
    if src.is_file():
        if src.suffix in PICKLE_SUFFIXES:
            raise ConvertError(f"{src}: pickle checkpoints are refused (never unpickled); use safetensors")
        if src.suffix != ".safetensors":
            raise ConvertError(f"{src}: not a safetensors file nor a diffusers model or pipeline directory")
        return {"": open_single_file(src, class_name, config_src)}, False
    if class_name is not None or config_src is not None:
        raise ConvertError(f"{src}: --model-class and --config are for a single-file SRC; a directory has its "
                           f"own config.json")
    if not src.is_dir():
        raise ConvertError(f"{src}: no such directory (SRC must be a local diffusers model or pipeline directory)")
    if (src / PIPELINE_INDEX).is_file():
        index = read_json_file(src / PIPELINE_INDEX)
        out = {}
        for name in components:
            if not isinstance(index.get(name), list) or not (src / name).is_dir():
                have = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list))
                raise ConvertError(f"{src / PIPELINE_INDEX}: no component {name!r} (components: {have})")
            out[name] = open_component(src / name, name)
        return out, True
    return {"": open_component(src, "")}, False


# ---- encoding one layer (in the main process or a worker) -----------------------------------------------------

@dataclass
class Job:
    """One linear layer to encode: where its tensors are and where its piece goes."""

    index: int
    name: str
    weight: tuple[str, str]          # (file, tensor name)
    bias: tuple[str, str] | None
    piece: str
    size: int = 0                    # bytes of the stored float weight (for the progress bar)


def _read(file: str, key: str, dtype) -> torch.Tensor:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            t = f.get_tensor(key)
    except Exception as e:  # SafetensorError for a truncated or corrupt file
        raise HQFormatError(f"{file}: cannot read tensor {key!r}, the file may be truncated or corrupt ({e})") from None
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


def _write_piece(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    meta = {**meta, "crc": {k: tensor_crc32(v) for k, v in tensors.items()}}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"piece": json.dumps(meta, sort_keys=True)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def encode_job(job: Job, cfg: HQConfig, dtype, device: str, on_invalid: str) -> int:
    """Encode ``job``'s layer and write its piece; returns the bytes of float weight read. A non-finite weight
    raises ConvertError naming the file and tensor (``on_invalid="raise"``) or is recorded as such."""
    w = _read(*job.weight, dtype)
    read = w.numel() * w.element_size()
    b = _read(*job.bias, dtype) if job.bias is not None else None
    with warnings.catch_warnings():  # a kept layer is reported once, when the pieces are assembled
        warnings.simplefilter("ignore")
        finite = check_finite(w, f"{job.weight[0]}: tensor {job.weight[1]!r}", job.name, on_invalid=on_invalid,
                              hint="--on-invalid skip keeps such layers unquantized", error=ConvertError)
    if not finite:
        _write_piece(Path(job.piece), {}, {"name": job.name, "invalid": True})
        return read
    if device != "cpu":
        w = w.to(device)
        b = b.to(device) if b is not None else None
    with torch.no_grad():
        hq = HQLinear.from_linear(SimpleNamespace(weight=w, bias=b), cfg.codec_config(), key=job.name,
                                  mma=cfg.mma, storage=cfg.storage, name=job.name)
    del w, b
    _write_piece(Path(job.piece), hq.state_dict(), {"name": job.name, "hq_meta": hq.hq_meta})
    return read


def _worker_init():
    """A forked worker: one torch thread; SIGTERM back to its default action and SIGINT ignored.

    The CLI turns SIGTERM into KeyboardInterrupt in the parent (to report an interrupted run), and a forked
    worker inherits that handler. ``Pool.terminate`` takes the task queue's lock and sends SIGTERM; an idle
    worker whose signal arrived just before it blocked on that lock only runs a Python handler once the wait
    returns, which it never does, and the parent waited for it forever (1 run in 12 of a 2-worker conversion
    hung at its end; none in 24 since). With the default action the kernel ends the worker wherever it is.
    Ctrl-C is the parent's to handle: it terminates the pool."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _worker_run(args):
    job, cfg_dict, dtype_name, device, on_invalid = args
    try:
        return job.index, encode_job(job, HQConfig.from_dict(cfg_dict), DTYPES.get(dtype_name), device,
                                     on_invalid), None
    except (ConvertError, HQFormatError) as e:
        return job.index, 0, str(e)
    finally:
        release_after_layer(job.size)  # a large layer's freed work space, else kept mapped until the next one


def read_piece(path: Path, key: str | None = None):
    """(tensors, meta) of a piece file (only tensor ``key`` when given); HQFormatError naming it when it is
    unreadable or a tensor fails its CRC32."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["piece"])
            tensors = {k: f.get_tensor(k) for k in (f.keys() if key is None else [key])}
    except Exception as e:
        raise HQFormatError(f"{path}: unreadable piece ({e})") from None
    for k, t in tensors.items():
        if tensor_crc32(t) != meta["crc"].get(k):
            raise HQFormatError(f"{path}: tensor {k!r} fails its CRC32 check")
    return tensors, meta


def _piece_ok(path: Path) -> bool:
    try:
        read_piece(path)
    except HQFormatError:
        return False
    return True


# ---- the conversion ------------------------------------------------------------------------------------------

def _fingerprint(src: Path, comps: dict[str, Component], cfg: HQConfig, dtype, on_invalid: str) -> str:
    files = sorted({str(f) for c in comps.values() for f in c.files.values()})
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    blob = json.dumps({"src": str(src.resolve()), "comps": sorted(comps), "cfg": cfg.to_dict(), "dtype": str(dtype),
                       "on_invalid": on_invalid, "files": stats}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _jobs(comp: Component, todo, work: Path) -> list[Job]:
    jobs = []
    for i, (name, lin) in enumerate(todo):
        wk, bk = f"{name}.weight", f"{name}.bias"
        if wk not in comp.header:
            raise ConvertError(f"{comp.path}: tensor {wk!r} is missing from the checkpoint")
        bias = None
        if lin.bias is not None:
            if bk not in comp.header:
                raise ConvertError(f"{comp.path}: tensor {bk!r} is missing from the checkpoint")
            bias = (str(comp.files[bk]), bk)
        jobs.append(Job(i, name, (str(comp.files[wk]), wk), bias, str(work / f"{i:05d}.safetensors"),
                        nbytes(*comp.header[wk])))
    return jobs


#: admission control of the parallel encoding: float bytes of the layers being encoded at once, in units of the
#: largest layer's (a worker's peak is its layer's float weight plus the encoder's work space, about 3 × its bf16
#: bytes, so 1.5 keeps the workers' sum near two layers' worth whatever the mix of sizes)
IN_FLIGHT = 1.5


def _next_job(pending: list[int], in_flight: list[int], largest: int, workers: int) -> int | None:
    """Which pending layer to start now, by float bytes: the position in ``pending`` (sizes, largest first) of
    the first one that keeps the bytes in flight ≤ ``IN_FLIGHT × largest``; None to wait for a running one
    (all ``workers`` are busy, nothing fits, or nothing is pending). With nothing in flight the first pending
    layer always starts, so every layer is encoded eventually."""
    if not pending or len(in_flight) >= workers:
        return None
    if not in_flight:
        return 0
    room = IN_FLIGHT * largest - sum(in_flight)
    return next((i for i, size in enumerate(pending) if size <= room), None)


def _encode_pool(todo: list[Job], cfg: HQConfig, dtype, device: str, on_invalid: str, workers: int, bar) -> int:
    """Encode ``todo`` in ``workers`` forked processes, largest layers first, admitted by :func:`_next_job`;
    returns the float bytes read. The first error terminates the pool and is raised (ConvertError)."""
    import gc
    import multiprocessing as mp
    import queue

    dname = next((k for k, v in DTYPES.items() if v == dtype), None)
    pending = sorted(todo, key=lambda j: (-j.size, j.index))
    largest = pending[0].size
    running: dict[int, int] = {}                     # job index → float bytes
    total = 0
    done: queue.SimpleQueue = queue.SimpleQueue()    # (index, bytes read, error) or an exception
    warm_compiled(cfg.codec_config())  # the workers share the parent's compiled code pages
    gc.freeze()  # the parent's collections would otherwise touch (and so copy) the pages its workers share
    try:
        with mp.get_context("fork").Pool(workers, initializer=_worker_init) as pool:
            while pending or running:
                while (i := _next_job([j.size for j in pending], list(running.values()), largest,
                                      workers)) is not None:
                    job = pending.pop(i)
                    running[job.index] = job.size
                    pool.apply_async(_worker_run, ((job, cfg.to_dict(), dname, device, on_invalid),),
                                     callback=done.put, error_callback=done.put)
                result = done.get()
                if isinstance(result, BaseException):
                    pool.terminate()
                    raise result
                index, read, err = result
                if err is not None:
                    pool.terminate()
                    raise ConvertError(err)
                del running[index]
                bar.update(read)
                total += read
    finally:
        gc.unfreeze()
    return total


def _encode_all(jobs, cfg, dtype, device, on_invalid, workers, bar) -> int:
    """Encode the jobs whose piece is missing (or unreadable), ``workers`` at a time; returns the float bytes
    encoded (0 for the layers a previous run finished)."""
    todo = []
    for job in jobs:
        if Path(job.piece).is_file() and _piece_ok(Path(job.piece)):
            bar.update(job.size)
            continue
        todo.append(job)
    if workers <= 1 or len(todo) <= 1:
        total = 0
        for job in todo:
            read = encode_job(job, cfg, dtype, device, on_invalid)
            release_after_layer(job.size)  # as each worker does
            bar.update(read)
            total += read
        return total
    return _encode_pool(todo, cfg, dtype, device, on_invalid, workers, bar)


def _encode_stats(read: int, seconds: float, workers: int) -> dict:
    """The encoding figures of a run: ``read`` float bytes (as encoded, after any ``dtype``) in ``seconds``."""
    return {"encoded_bytes": read, "encode_s": seconds, "encode_mb_s": read / 1e6 / seconds if seconds > 0 else 0.0,
            "workers": workers}


def _wait_for(jobs, work: Path, timeout: float) -> None:
    """Rank 0: wait until the other ranks wrote every piece (or one of them reports a failure)."""
    start = time.monotonic()
    while True:
        failed = sorted(work.glob("failed-rank*"))
        if failed:
            raise ConvertError(f"{failed[0].name}: {failed[0].read_text().strip()}")
        if all(Path(j.piece).is_file() for j in jobs):
            return
        if time.monotonic() - start > timeout:
            missing = [j.name for j in jobs if not Path(j.piece).is_file()][:3]
            raise ConvertError(f"{work}: timed out waiting for the other ranks' layers {missing}")
        time.sleep(0.5)


@dataclass
class _Plan:
    """What the assembled component holds: tensor specs, where each comes from, and its metadata."""

    comp: Component
    model: object
    specs: dict[str, tuple[str, tuple]]
    sources: dict[str, tuple]        # name → ("piece", path, key) | ("src", file, key) | ("init", tensor)
    checksums: dict[str, int]
    qc: dict


def _assemble_plan(comp: Component, model, cfg: HQConfig, jobs, skipped, dtype, bar) -> _Plan:
    """Swap the encoded layers into the skeleton, and list, size and checksum every output tensor."""
    from .state import set_module

    state = HQState(config=cfg, skipped=dict(skipped))
    sources, specs, checksums, invalid = {}, {}, {}, []
    for job in jobs:
        tensors, meta = read_piece(Path(job.piece))
        if meta.get("invalid"):
            invalid.append(job.name)
            continue
        set_module(model, job.name, HQLinear.from_meta(meta["hq_meta"], device="meta", name=job.name))
        for k, t in tensors.items():
            full = f"{job.name}.{k}"
            specs[full] = (ST_NAMES[t.dtype], tuple(t.shape))
            sources[full] = ("piece", job.piece, k)
            checksums[full] = meta["crc"][k]
    for name in invalid:
        warnings.warn(f"layer {name!r} has non-finite weights; kept in its float dtype (on_invalid='skip')",
                      stacklevel=3)
        state.skipped[name] = NONFINITE
    setattr(model, STATE_ATTR, state)
    if cfg.kv_bps is not None:
        apply_kv(model, state)
    qc = quantization_config(model)
    for k, t in model.state_dict(keep_vars=True).items():
        if k in specs:
            continue
        if k in comp.header:
            dt, shape = comp.header[k]
            if dtype is not None and ST_DTYPES[dt].is_floating_point:
                dt = ST_NAMES[dtype]
            if tuple(shape) != tuple(t.shape):
                raise ConvertError(f"{comp.files[k]}: tensor {k!r} has shape {list(shape)}, the model "
                                   f"expects {list(t.shape)}")
            specs[k], sources[k] = (dt, tuple(shape)), ("src", str(comp.files[k]), k)
        elif t.device.type != "meta":  # a buffer the checkpoint does not store: the model's own value
            specs[k], sources[k] = (ST_NAMES[t.dtype], tuple(t.shape)), ("init", t.detach())
        else:
            raise ConvertError(f"{comp.path}: tensor {k!r} is missing from the checkpoint")
        t = _fetch(sources[k], dtype)
        checksums[k] = tensor_crc32(t)
        bar.update(t.numel() * t.element_size())
    order = {k: i for i, k in enumerate(model.state_dict(keep_vars=True))}
    specs = dict(sorted(specs.items(), key=lambda kv: order[kv[0]]))
    return _Plan(comp, model, specs, sources, checksums, qc)


def _fetch(source: tuple, dtype) -> torch.Tensor:
    kind = source[0]
    if kind == "piece":
        tensors, _ = read_piece(Path(source[1]), source[2])
        return tensors[source[2]]
    if kind == "src":
        return _read(source[1], source[2], dtype)
    return source[1]


def _write_component(plan: _Plan, out: Path, max_shard: int, dtype, bar) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = list(plan.specs)
    groups = plan_shards(plan.specs, names, max_shard)
    files = shard_names(len(groups))
    weight_map, total = {}, 0
    for fname, group in zip(files, groups):
        specs = {k: plan.specs[k] for k in group}
        extra = {"checksums": plan.checksums, "dtypes": {k: dt for k, (dt, _) in specs.items()}, "manifest": True}
        meta = {"format": "pt", METADATA_KEY: json.dumps({**plan.qc, **extra}, sort_keys=True)}

        def fetch(k):
            t = _fetch(plan.sources[k], dtype)
            if tensor_crc32(t) != plan.checksums[k]:
                raise HQFormatError(f"{plan.sources[k][1]}: tensor {k!r} changed during the conversion")
            return t

        write_safetensors(out / fname, specs, meta, fetch, on_tensor=lambda k, n: bar.update(n))
        weight_map.update({k: fname for k in group})
        total += sum(nbytes(*specs[k]) for k in group)
    if len(files) > 1:
        write_index(out / INDEX_NAME, weight_map, total)
    plan.model.save_config(str(out))
    config = read_json_file(out / CONFIG_NAME)
    config["quantization_config"] = plan.qc
    with open(out / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst``, hard-linking files where the file system allows it (same device)."""
    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link_or_copy)


def convert(src, dst, config: HQConfig | None = None, *, components=("transformer",), dtype=None,
            device: str = "cpu", workers: int | None = None, max_shard_size="10GB", overwrite: bool = False,
            on_invalid: str = "raise", progress: bool = True, rank: int | None = None,
            world_size: int | None = None, wait_timeout: float = 86400.0, model_class: str | None = None,
            model_config=None, stats: dict | None = None, **overrides) -> Path | None:
    """Quantize the float diffusers checkpoint ``src`` into ``dst`` one tensor at a time (module docstring).

    Args:
        src: a diffusers pipeline directory (``model_index.json``; its ``components`` are quantized, the other
            components copied unchanged) or a model directory (``config.json`` with a single or sharded
            safetensors file), or a single-file safetensors checkpoint with ``model_class``.
        model_class, model_config: for a single-file ``src``: the diffusers class name of its model, and a model
            directory or JSON file with its config (None: the class's defaults).
        dst: the output directory; refused when it exists unless ``overwrite`` (then replaced atomically).
        config / **overrides: the :class:`HQConfig`, as for :func:`~.quantize.quantize`.
        components: pipeline components to quantize.
        dtype: None (keep each stored float dtype) or ``torch.bfloat16`` / ``float16`` / ``float32``: the dtype
            of the float tensors, as ``from_pretrained(..., torch_dtype=dtype)`` would give them.
        device: where layers are encoded (``"cpu"``, ``"cuda"``, ``"cuda:N"``).
        workers: encoding processes (None: every core for ``cpu``, 1 for CUDA).
        max_shard_size: bytes (or ``"5GB"``-style) per output shard.
        on_invalid: ``"raise"`` or ``"skip"`` for weights with NaN/Inf (as in ``quantize``).
        rank, world_size: this process's share (None: from the ``RANK`` / ``WORLD_SIZE`` environment, else 0/1).
        stats: a dict to fill with this process's encoding figures (:func:`_encode_stats`: float bytes encoded,
            seconds of the encoding — warm-up, pool start and every layer; no planning or assembly —, MB/s,
            workers).

    Returns:
        ``dst`` as a Path on the rank that wrote it (rank 0), None on the other ranks.

    Raises:
        ConvertError / HQFormatError (ValueErrors) naming the file and tensor for bad input; nothing is left.
    """
    from tqdm.auto import tqdm

    from .shards import parse_size

    cfg = resolve_config(config, overrides, caller="convert", other_keywords=(
        "components", "dtype", "device", "workers", "max_shard_size", "overwrite", "on_invalid", "progress",
        "rank", "world_size", "model_class", "model_config", "stats"))
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {list(ON_INVALID)}, got {on_invalid!r}")
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"dtype must be None or one of {list(DTYPES)}, got {dtype!r}")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    if workers is None:
        workers = (os.cpu_count() or 1) if dev.type == "cpu" else 1
    if workers < 1 or (dev.type == "cuda" and workers > 1):
        raise ValueError(f"workers must be ≥ 1 (and 1 with a CUDA device), got {workers}")
    max_shard = parse_size(max_shard_size)
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    src, dst = Path(src), Path(dst)
    if isinstance(components, str):
        components = tuple(c for c in components.split(",") if c)
    if os.path.lexists(dst) and not overwrite:
        raise ConvertError(f"{dst}: exists; pass --overwrite to replace it (atomically)")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ConvertError(f"{dst}: the output may not be the source or lie inside it")
    if cfg.kv_bps is not None:
        from .state import kv_api
        kv_api()
    comps, is_pipeline = _sources(src, components, model_class, model_config)
    work = dst.with_name(f".{dst.name}{_RESUME}{_fingerprint(src, comps, cfg, dtype, on_invalid)}")
    keep = False
    try:
        models, all_jobs, skips = {}, {}, {}
        for cname, comp in comps.items():
            model = _skeleton(comp.config, comp.path / CONFIG_NAME)
            # what from_pretrained(SRC) records (a pipeline's components: the pipeline directory)
            model.register_to_config(_name_or_path=str(src))
            todo, skipped = _plan(model, cfg)
            (work / (cname or "model")).mkdir(parents=True, exist_ok=True)
            models[cname], skips[cname] = model, skipped
            all_jobs[cname] = _jobs(comp, todo, work / (cname or "model"))
        mine = [j for js in all_jobs.values() for j in js if j.index % world_size == rank]
        total = sum(j.size for j in mine)
        with tqdm(total=total, desc="hq_diffusion: encoding", unit="B", unit_scale=True,
                  disable=not progress) as bar:
            t0 = time.perf_counter()
            read = _encode_all(mine, cfg, dtype, str(dev), on_invalid, workers, bar)
        if stats is not None:
            stats.update(_encode_stats(read, time.perf_counter() - t0, workers))
        if rank != 0:
            keep = True
            return None
        _wait_for([j for js in all_jobs.values() for j in js], work, wait_timeout)
        with tqdm(total=0, desc="hq_diffusion: writing", unit="B", unit_scale=True, disable=not progress) as bar:
            plans = {c: _assemble_plan(comps[c], models[c], cfg, all_jobs[c], skips[c], dtype, bar)
                     for c in comps}
            bar.reset(total=sum(nbytes(*s) for p in plans.values() for s in p.specs.values()))

            def write(tmp: Path):
                if is_pipeline:
                    for entry in sorted(src.iterdir()):
                        if entry.name in comps:
                            continue
                        if entry.is_dir():
                            _copy_tree(entry, tmp / entry.name)
                        else:
                            shutil.copy2(entry, tmp / entry.name)
                for c, plan in plans.items():
                    _write_component(plan, tmp / c if c else tmp, max_shard, dtype, bar)

            _atomic_dir(dst, write)
        keep = False
        return dst
    except KeyboardInterrupt:
        keep = True
        raise
    except BaseException as e:
        if world_size > 1 and rank != 0:
            keep = True
            work.mkdir(parents=True, exist_ok=True)
            (work / f"failed-rank{rank}").write_text(f"{type(e).__name__}: {e}")
        raise
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        for stale in dst.parent.glob(f".{dst.name}{_RESUME}*") if rank == 0 and not keep else ():
            shutil.rmtree(stale, ignore_errors=True)


__all__ = ["convert", "ConvertError", "open_component", "open_single_file", "resolve_model_class", "encode_job",
           "read_piece", "PICKLE_SUFFIXES"]
