"""``save_quantized`` / ``load_quantized``: safetensors checkpoints of quantized models and pipelines.

Layout of a quantized component directory (a diffusers model directory, loadable offline)::

    config.json                          the model's diffusers config + "quantization_config" (below)
    diffusion_pytorch_model.safetensors  its full state dict: HQLinear buffers (int tensors) and every other
                                         parameter/buffer in its original dtype; metadata {"format": "pt",
                                         "hq_diffusion": JSON of quantization_config + "checksums", "dtypes",
                                         "manifest"}
    hq_manifest.json                     SHA-256 of every other file (:mod:`.manifest`), at the root of what
                                         was saved (the pipeline directory, or the component saved alone)

``quantization_config`` = ``{"quant_method": "hq_diffusion", "format_version": 1, "config": HQConfig.to_dict(),
"layers": {module name: HQLinear.hq_meta}, "skipped": {module name: reason}, "kv": KVConfig dict or None,
"kv_modules": [...]}``; the safetensors copy adds ``"checksums": {tensor name: CRC32 of its bytes}``,
``"dtypes": {tensor name: safetensors dtype}`` and ``"manifest": true`` (the last two since the manifest exists;
optional on load, so that older checkpoints keep loading). A pipeline directory holds ``model_index.json``, the
quantized components in that layout and the other components as diffusers/transformers' own
``save_pretrained`` writes them. Saves are byte-reproducible: sorted JSON keys everywhere, the safetensors header
rewritten with sorted metadata keys (:func:`~.state.canonicalize_safetensors_header`), no timestamps.

Loading builds the model from its config on the ``meta`` device, swaps the quantized ``nn.Linear`` for empty
:class:`~hq_diffusion.nn.linear.HQLinear` at their final packed shapes, checks every tensor of the file
against the metadata (names, shapes, dtypes against the record, CRC32), then ``load_state_dict(...,
assign=True)``: no float weight of a quantized layer is ever materialized, and nothing may be left on ``meta``.
The other files are then checked against the manifest before any of them is read (a directory saved without a
manifest loads with a warning, see :mod:`.manifest` for why). Any problem raises one :class:`HQFormatError` (a
``ValueError``) naming the file, and the tensor where one is at fault.

Writes go to a temporary directory next to the target (``.<name>.hq-tmp-*``), manifest written last, then
exchanged with the target in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), or — where the exchange
is missing — moved in by two renames whose crash window the next load or save repairs (:func:`_atomic_dir`).
At every instant the target loads as the old or the new checkpoint; leftovers of interrupted saves are removed
by the next save.

The checkpoint form itself (``quantization_config``, its checks, CRC32-verified reads) lives in :mod:`.state`;
the public ``hq_diffusion.load_quantized`` (:mod:`.api`) also attaches the diffusers quantizer to the loaded
diffusers models.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import inspect
import json
import math
import os
import shutil
import struct
import sys
import uuid
import warnings
from pathlib import Path

import torch
from torch import nn

from ..codec import HQFormatError
from ..nn.linear import HQLinear
from .config import QuantMethod
from .manifest import check_directory, verified, write_manifest
from .shards import component_files, weights_file
from .state import FORMAT_VERSION  # noqa: F401  (re-exported: the checkpoint format version this build writes)
from .state import (METADATA_KEY, ST_DTYPES, STATE_ATTR, HQState, apply_kv, canonicalize_safetensors_header,
                    parse_json,
                    check_no_meta, check_quantization_config, file_metadata, manifest_flag, refuse_stripped_config,
                    quantization_config, read_checkpoint_metadata, read_json_file,
                    read_verified_tensors, strip_file_keys, swap_in_empty_hqlinears)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PIPELINE_INDEX = "model_index.json"


# ---- helpers ----------------------------------------------------------------------------------------------

_read_json = read_json_file  # every failure (missing, unreadable, malformed, nested too deeply) an HQFormatError
AT_FDCWD, RENAME_EXCHANGE = -100, 2
_TMP, _OLD = ".hq-tmp-", ".hq-old-"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(dirpath)


def _fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory fds (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the renames below are still ordered
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the two existing paths ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform, libc or filesystem lacks it (the caller then falls back to two renames
    and the recovery of :func:`_recover`); raises OSError for any other failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # musl or glibc < 2.28
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), str(b))


def _rename(src: Path, dst: Path) -> None:
    """One rename step of a save (``os.rename``, looked up at each call so that tests can make it fail)."""
    os.rename(src, dst)


def _leftovers(target: Path, kind: str) -> list[Path]:
    prefix = f".{target.name}{kind}"
    if not target.parent.is_dir():
        return []
    return sorted(target.parent / n for n in os.listdir(target.parent) if n.startswith(prefix))


def _recover(target: Path) -> None:
    """Undo a save interrupted between its two renames (the fallback without an atomic exchange): when
    ``target`` is absent but an ``.hq-old-*`` copy of it exists, that copy (the last complete checkpoint)
    is renamed back to ``target``, with a warning."""
    if os.path.lexists(target):
        return
    olds = _leftovers(target, _OLD)
    if olds:
        newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
        _rename(newest, target)
        _fsync_dir(target.parent)
        warnings.warn(f"{target}: restored the previous checkpoint from {newest.name} (a save was interrupted)",
                      UserWarning, stacklevel=3)


def _atomic_dir(target: Path, write) -> None:
    """Call ``write(tmp)`` on a fresh temporary directory next to ``target``, add the manifest, then put it in
    place of ``target`` so that ``target`` holds the old or the new checkpoint at every instant.

    Steps: recover an interrupted earlier save (:func:`_recover`) and remove the leftovers of earlier saves
    (``.<name>.hq-tmp-*``, ``.<name>.hq-old-*``; two processes saving to one target at once are not
    supported); write and fsync ``tmp`` (manifest last); then either exchange ``tmp`` and ``target`` atomically
    (:func:`_exchange`) and delete ``tmp`` (now the old one), or — without an exchange — rename ``target`` to
    ``.hq-old-*``, ``tmp`` to ``target`` and delete the old copy. A crash between those two renames leaves
    ``target`` absent and the old copy complete: the next :func:`load_quantized` or :func:`save_quantized` of
    ``target`` renames it back. A crash while deleting leaves a leftover that the next save removes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(target) and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    _recover(target)
    for stale in _leftovers(target, _TMP) + _leftovers(target, _OLD):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}{_TMP}{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    old = None
    try:
        write(tmp)
        write_manifest(tmp)
        _fsync_tree(tmp)
        if not target.exists():
            _rename(tmp, target)
        elif _exchange(tmp, target):
            _fsync_dir(target.parent)
        else:
            old = target.with_name(f".{target.name}{_OLD}{uuid.uuid4().hex[:8]}")
            _rename(target, old)
            _rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        if old is not None and old.exists() and not os.path.lexists(target):
            _rename(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old if old is not None else tmp, ignore_errors=True)


# ---- save -------------------------------------------------------------------------------------------------

def save_quantized(obj, directory) -> None:
    """Save a quantized pipeline or model to ``directory`` (replaced atomically if it exists).

    Args:
        obj: a pipeline with at least one component quantized by :func:`~.quantize.quantize`, or such a
            model (a diffusers ``ModelMixin``; a plain ``nn.Module`` is saved too, but loading it needs a
            skeleton: ``load_quantized(directory, model=...)``).
        directory: the target directory.
    """
    if isinstance(obj, nn.Module):
        _atomic_dir(Path(directory), lambda tmp: _write_component(obj, tmp))
        return
    if not hasattr(obj, "components") or not hasattr(obj, "save_config"):
        raise TypeError(f"expected a diffusers pipeline or an nn.Module, got {type(obj).__name__}")
    comps = obj.components
    if not any(isinstance(c, nn.Module) and getattr(c, STATE_ATTR, None) is not None for c in comps.values()):
        raise ValueError("no component of this pipeline is quantized: run hq_diffusion.quantize first")

    def write(tmp: Path):
        for name, comp in comps.items():
            if comp is None:
                continue
            if isinstance(comp, nn.Module) and getattr(comp, STATE_ATTR, None) is not None:
                _write_component(comp, tmp / name)
            else:
                _save_other(comp, tmp / name, name)
        obj.save_config(tmp)

    _atomic_dir(Path(directory), write)


def _save_other(comp, path: Path, name: str) -> None:
    save = getattr(comp, "save_pretrained", None)
    if save is None:
        raise TypeError(f"pipeline component {name!r} ({type(comp).__name__}) has no save_pretrained")
    kwargs = {}
    if "safe_serialization" in inspect.signature(save).parameters:
        kwargs["safe_serialization"] = True
    save(str(path), **kwargs)


def _write_component(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    qc = quantization_config(model)
    path.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict()
    meta_tensors = [k for k, v in state_dict.items() if v.device.type == "meta"]
    if meta_tensors:  # checked before the copy below, which would fail on them with a generic error
        raise ValueError(f"cannot save tensors on the meta device: {meta_tensors[:5]}")
    state_dict = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(state_dict, str(path / WEIGHTS_NAME), metadata=file_metadata(qc, state_dict, manifest=True))
    canonicalize_safetensors_header(path / WEIGHTS_NAME)
    if hasattr(model, "save_config") and hasattr(model, "config"):
        model.save_config(str(path))
        config = _read_json(path / CONFIG_NAME)
    else:
        config = {"_class_name": type(model).__name__, "_module": type(model).__module__, "_hq_bare_module": True}
    config["quantization_config"] = qc
    with open(path / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


# ---- load -------------------------------------------------------------------------------------------------

def load_quantized(directory, *, model: nn.Module | None = None, device=None, torch_dtype=None,
                   backend: str = "kernel"):
    """Load what :func:`save_quantized` wrote, without re-quantizing.

    Args:
        directory: a pipeline directory (``model_index.json``) or a component directory (``config.json``).
        model: for a component saved from a plain ``nn.Module``: a skeleton of the same architecture (on any
            device, e.g. ``meta``); its tensors are replaced. Not needed for diffusers models.
        device: move the result there.
        torch_dtype: cast the floating-point parameters (not the quantized weights) to this dtype.
        backend: ``"kernel"`` or ``"native"`` forward of the HQLinear layers.

    Returns:
        The pipeline (its class from ``model_index.json``) or the model, with no parameter or buffer left on
        ``meta``. Every problem — a corrupt, truncated, re-typed, missing or unlisted file or tensor, a
        config.json edited by hand (caught by the manifest, :mod:`.manifest`), a quantized component whose
        config.json lost its ``quantization_config``, JSON nested too deeply, a version mismatch — raises one
        :class:`HQFormatError` naming the file (and the tensor, where one is at fault). A directory saved before
        manifests existed loads with a ``UserWarning``. A save interrupted between its renames is recovered
        first (see :func:`_atomic_dir`).
    """
    d = Path(directory)
    _recover(d)
    if (d / PIPELINE_INDEX).is_file():
        return _load_pipeline(d, device=device, torch_dtype=torch_dtype, backend=backend)
    if (d / CONFIG_NAME).is_file():
        m = load_component(d, model=model, device=device, torch_dtype=torch_dtype, backend=backend)
        check_directory(d, flagged=manifest_flag(weights_file(d)))
        return m
    raise FileNotFoundError(f"{d}: neither {PIPELINE_INDEX} nor {CONFIG_NAME} found")


def _is_hq_component(path: Path) -> bool:
    """Whether ``path`` is a quantized component directory; a file that is one (metadata, HQLinear buffer
    names) under a config.json without hq-diffusion ``quantization_config`` is an :class:`HQFormatError`."""
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        return False
    qc = _read_json(cfg).get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == QuantMethod.HQ_DIFFUSION.value:
        return True
    refuse_stripped_config(cfg, weights_file(path))
    return False


def _load_pipeline(d: Path, *, device, torch_dtype, backend):
    import diffusers

    index = _read_json(d / PIPELINE_INDEX)
    cls_name = index.get("_class_name")
    cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) else None
    if cls is None:
        raise HQFormatError(f"{d / PIPELINE_INDEX}: unknown pipeline class {cls_name!r}")
    names = [n for n, e in index.items() if not n.startswith("_") and isinstance(e, list) and e and e[0] is not None]
    hq = [n for n in names if _is_hq_component(d / n)]
    loaded = {n: load_component(d / n, torch_dtype=torch_dtype, backend=backend) for n in hq}
    # the quantized tensors are verified (with messages naming the tensor); now every other file, before any of
    # them is read
    checked = check_directory(d, flagged=any(manifest_flag(weights_file(d / n)) for n in hq))
    if torch_dtype is None:  # each other component in the dtype it was saved in (diffusers would make it float32)
        saved = {n: _saved_dtype(d / n) for n in names if n not in loaded}
        kwargs = {"torch_dtype": {n: dt for n, dt in saved.items() if dt is not None}}
    else:
        kwargs = {"torch_dtype": torch_dtype}
    try:
        with verified(d) if checked else contextlib.nullcontext():
            pipe = cls.from_pretrained(str(d), **loaded, **kwargs)
    except HQFormatError:
        raise
    except (ValueError, OSError, TypeError, KeyError, RuntimeError, RecursionError) as e:
        raise HQFormatError(f"{d}: cannot load the non-quantized components ({type(e).__name__}: {e})") from None
    for name, comp in pipe.components.items():
        if isinstance(comp, nn.Module):
            check_no_meta(comp, d / name)
    if device is not None:
        pipe.to(device)
    return pipe


def _saved_dtype(path: Path) -> torch.dtype | None:
    """The floating dtype that holds most of the elements of the safetensors files in component directory
    ``path`` (read from their headers only), or None when it has none (a tokenizer, a scheduler)."""
    counts: dict[torch.dtype, int] = {}
    for f in sorted(path.glob("*.safetensors")) if path.is_dir() else ():
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = parse_json(fh.read(n), f)
        for k, v in header.items():
            dt = ST_DTYPES.get(v.get("dtype")) if k != "__metadata__" and isinstance(v, dict) else None
            if dt is not None and dt.is_floating_point:
                counts[dt] = counts.get(dt, 0) + math.prod(v.get("shape") or [1])
    return max(counts, key=counts.get) if counts else None


def check_tensors_against_model(model: nn.Module, header: dict, st_path, dtypes: dict | None = None) -> None:
    """Names, shapes and dtypes in the file must match the skeleton's state dict exactly: the dtype of an
    HQLinear tensor (its metadata fixes it) and of any non-float tensor always; of the other float tensors, the
    record ``dtypes`` of the file's metadata where it exists (older checkpoints have none)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise HQFormatError(f"{st_path}: tensors do not match the model: missing {missing[:5]}"
                            f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                            f"{'...' if len(extra) > 5 else ''}")
    exact = {f"{n}.{k}" if n else k for n, m in model.named_modules() if isinstance(m, HQLinear)
             for k, _ in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))}
    for k, (dt, shape) in sorted(header.items()):
        want = expected[k]
        if tuple(want.shape) != shape:
            raise HQFormatError(f"{st_path}: tensor {k!r} has shape {list(shape)}, the metadata says "
                                f"{list(want.shape)}")
        if dtypes is not None and dtypes.get(k) != dt:
            raise HQFormatError(f"{st_path}: tensor {k!r} is stored as {dt} but was saved as {dtypes.get(k)}")
        got = ST_DTYPES.get(dt)
        loose = got is not None and got.is_floating_point and want.dtype.is_floating_point and k not in exact
        if got is None or (got != want.dtype and not loose):
            raise HQFormatError(f"{st_path}: tensor {k!r} has dtype {dt}, expected {want.dtype}")


def load_component(path, *, model: nn.Module | None = None, device=None, torch_dtype=None,
                   backend: str = "kernel") -> nn.Module:
    """Load one quantized component directory (see the module docstring); the manifest is checked by the
    caller (:func:`load_quantized`)."""
    path = Path(path)
    cfg_path, st_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    config = _read_json(cfg_path)
    qc_cfg = config.get("quantization_config")
    if not isinstance(qc_cfg, dict) or qc_cfg.get("quant_method") != QuantMethod.HQ_DIFFUSION.value:
        refuse_stripped_config(cfg_path, weights_file(path))
        raise HQFormatError(f"{cfg_path}: no hq_diffusion quantization_config: not an hq-diffusion checkpoint")
    hq_config = check_quantization_config(qc_cfg, cfg_path, with_checksums=False)
    files = component_files(path)  # the single file, or the shards of a streamed conversion
    qc, header, dtypes = None, {}, {}
    for f in files:
        fqc, fheader = read_checkpoint_metadata(f)
        if strip_file_keys(fqc) != qc_cfg:
            raise HQFormatError(f"{cfg_path}: quantization_config disagrees with the metadata of {f.name}")
        if qc is not None and fqc["checksums"] != qc["checksums"]:
            raise HQFormatError(f"{f}: its checksum table differs from that of {files[0].name}")
        qc = qc or fqc
        header.update(fheader)
        dtypes.update(fqc.get("dtypes") or {})
    if set(header) != set(qc["checksums"]):
        missing = sorted(set(qc["checksums"]) - set(header))[:5]
        raise HQFormatError(f"{files[0]}: the checksum table does not list exactly the stored tensors "
                            f"(missing from the files: {missing})")
    if model is None:
        model = _skeleton(config, cfg_path)
    swap_in_empty_hqlinears(model, qc["layers"], st_path, backend=backend)
    check_tensors_against_model(model, header, st_path if len(files) == 1 else path,
                                dtypes if "dtypes" in qc else None)
    dev = None if device is None or torch_dtype is not None else device
    for f in files:  # one tensor at a time onto ``device``; assigned per shard, so no shard is held twice
        model.load_state_dict(read_verified_tensors(f, qc["checksums"], require_all=len(files) == 1, device=dev),
                              strict=False, assign=True)
    check_no_meta(model, st_path)
    state = HQState(config=hq_config, skipped=dict(qc["skipped"]))
    setattr(model, STATE_ATTR, state)
    if qc["kv"] is not None:
        try:
            apply_kv(model, state, kv_dict=qc["kv"])
        except (ValueError, TypeError, KeyError) as e:
            raise HQFormatError(f"{cfg_path}: invalid K/V quantization config ({type(e).__name__}: {e})") from None
    if torch_dtype is not None:
        model.to(torch_dtype)  # floats only: HQLinear buffers are integers
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _skeleton(config: dict, cfg_path: Path) -> nn.Module:
    if config.get("_hq_bare_module"):
        raise ValueError(f"{cfg_path}: saved from a plain {config.get('_class_name')}; pass a skeleton: "
                         f"load_quantized(directory, model=...)")
    import diffusers
    from accelerate import init_empty_weights

    cls_name = config.get("_class_name")
    cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) else None
    if cls is None or not issubclass(cls, diffusers.ModelMixin):
        raise HQFormatError(f"{cfg_path}: unknown diffusers model class {cls_name!r}")
    init_cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        with init_empty_weights():
            return cls.from_config(init_cfg)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, AssertionError, RecursionError) as e:
        raise HQFormatError(f"{cfg_path}: cannot build {cls_name} from this config ({type(e).__name__}: {e})") from None
