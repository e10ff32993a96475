"""``save_quantized`` / ``load_quantized``: safetensors checkpoints of quantized models and pipelines.

Layout of a quantized component directory (a diffusers model directory, loadable offline)::

    config.json                          the model's diffusers config + "quantization_config" (below)
    diffusion_pytorch_model.safetensors  its full state dict: HQLinear buffers (int tensors) and every other
                                         parameter/buffer in its original dtype; metadata {"format": "pt",
                                         "hq_diffusion": JSON of quantization_config + "checksums"}

``quantization_config`` = ``{"quant_method": "hq_diffusion", "format_version": 1, "config": HQConfig.to_dict(),
"layers": {module name: HQLinear.hq_meta}, "skipped": {module name: reason}, "kv": KVConfig dict or None,
"kv_modules": [...]}``; the safetensors copy adds ``"checksums": {tensor name: CRC32 of its bytes}``.
A pipeline directory holds ``model_index.json``, the quantized components in that layout and the other
components as diffusers/transformers' own ``save_pretrained`` writes them.

Loading builds the model from its config on the ``meta`` device, swaps the quantized ``nn.Linear`` for empty
:class:`~hq_diffusion.nn.linear.HQLinear` at their final packed shapes, checks every tensor of the file
against the metadata (names, shapes, integer dtypes, CRC32), then ``load_state_dict(..., assign=True)``: no
float weight of a quantized layer is ever materialized. Any problem raises :class:`HQFormatError` (a
``ValueError``) naming the file. Writes go to a temporary directory next to the target, renamed into place
only when complete, so a failed save never destroys an existing one.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import uuid
import zlib
from pathlib import Path

import torch
from torch import nn

from ..codec import HQFormatError
from ..nn.linear import HQLinear, validate_meta
from .config import HQConfig, QuantMethod
from .quantize import STATE_ATTR, HQState, _set_module, apply_kv, attach_to_diffusers

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PIPELINE_INDEX = "model_index.json"
METADATA_KEY = "hq_diffusion"
QC_KEYS = ("quant_method", "format_version", "config", "layers", "skipped", "kv", "kv_modules")


# ---- helpers ----------------------------------------------------------------------------------------------

def tensor_crc32(t: torch.Tensor) -> int:
    """CRC32 of a tensor's raw bytes (C order)."""
    t = t.detach().contiguous().cpu().reshape(-1)
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.view(torch.uint8).numpy()) & 0xFFFFFFFF


def quantization_config(model: nn.Module) -> dict:
    """The JSON-safe ``quantization_config`` of a model quantized by :func:`~.quantize.quantize`."""
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, HQState):
        raise ValueError(f"{type(model).__name__} was not quantized by hq_diffusion (no {STATE_ATTR})")
    layers = {n: dict(m.hq_meta) for n, m in model.named_modules() if isinstance(m, HQLinear)}
    return {"quant_method": QuantMethod.HQ_DIFFUSION.value, "format_version": FORMAT_VERSION,
            "config": state.config.to_dict(), "layers": layers, "skipped": dict(state.skipped),
            "kv": state.kv, "kv_modules": list(state.kv_modules)}


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise HQFormatError(f"{path}: file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HQFormatError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(d, dict):
        raise HQFormatError(f"{path}: expected a JSON object")
    return d


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def _atomic_dir(target: Path, write) -> None:
    """Call ``write(tmp)`` on a fresh temporary directory next to ``target``, then move it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    tmp = target.with_name(f".{target.name}.hq-tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.hq-old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    checksums = {k: tensor_crc32(v) for k, v in state_dict.items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({**qc, "checksums": checksums}, sort_keys=True)}
    save_file(state_dict, str(path / WEIGHTS_NAME), metadata=metadata)
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
        The pipeline (its class from ``model_index.json``) or the model. Raises :class:`HQFormatError` naming
        the file for a corrupt, truncated or version-mismatched checkpoint.
    """
    d = Path(directory)
    if (d / PIPELINE_INDEX).is_file():
        return _load_pipeline(d, device=device, torch_dtype=torch_dtype, backend=backend)
    if (d / CONFIG_NAME).is_file():
        return load_component(d, model=model, device=device, torch_dtype=torch_dtype, backend=backend)
    raise FileNotFoundError(f"{d}: neither {PIPELINE_INDEX} nor {CONFIG_NAME} found")


def _is_hq_component(path: Path) -> bool:
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        return False
    qc = _read_json(cfg).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QuantMethod.HQ_DIFFUSION.value


def _load_pipeline(d: Path, *, device, torch_dtype, backend):
    import diffusers

    ensure_diffusers_backend()
    index = _read_json(d / PIPELINE_INDEX)
    cls_name = index.get("_class_name")
    cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) else None
    if cls is None:
        raise HQFormatError(f"{d / PIPELINE_INDEX}: unknown pipeline class {cls_name!r}")
    loaded = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        if _is_hq_component(d / name):
            loaded[name] = load_component(d / name, torch_dtype=torch_dtype, backend=backend)
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    pipe = cls.from_pretrained(str(d), **loaded, **kwargs)
    if device is not None:
        pipe.to(device)
    return pipe


def read_checkpoint_metadata(st_path: Path) -> tuple[dict, dict]:
    """Parse the hq-diffusion metadata of a safetensors file.

    Returns ``(quantization_config with "checksums", {tensor name: (dtype str, shape tuple)})``."""
    from safetensors import safe_open

    try:
        with safe_open(str(st_path), framework="pt") as f:
            raw = f.metadata() or {}
            header = {}
            for k in f.keys():
                sl = f.get_slice(k)
                header[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    except FileNotFoundError:
        raise HQFormatError(f"{st_path}: file is missing") from None
    except Exception as e:  # safetensors raises SafetensorError (an Exception) for a bad/truncated file
        raise HQFormatError(f"{st_path}: not a valid safetensors file, it may be truncated or corrupt ({e})") from None
    if METADATA_KEY not in raw:
        raise HQFormatError(f"{st_path}: no {METADATA_KEY!r} metadata: not an hq-diffusion checkpoint")
    try:
        qc = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise HQFormatError(f"{st_path}: {METADATA_KEY!r} metadata is not valid JSON ({e})") from None
    check_quantization_config(qc, st_path, with_checksums=True)
    return qc, header


def check_quantization_config(qc, where, *, with_checksums: bool) -> HQConfig:
    """Validate the structure and versions of a ``quantization_config``; return its :class:`HQConfig`."""
    if not isinstance(qc, dict):
        raise HQFormatError(f"{where}: quantization_config must be a JSON object")
    if qc.get("quant_method") != QuantMethod.HQ_DIFFUSION.value:
        raise HQFormatError(f"{where}: quant_method is {qc.get('quant_method')!r}, not 'hq_diffusion'")
    if qc.get("format_version") != FORMAT_VERSION:
        raise HQFormatError(f"{where}: checkpoint format version {qc.get('format_version')!r} is not supported "
                            f"(this build reads version {FORMAT_VERSION})")
    expected = set(QC_KEYS) | ({"checksums"} if with_checksums else set())
    if set(qc) != expected:
        raise HQFormatError(f"{where}: quantization_config keys {sorted(qc)} differ from {sorted(expected)}")
    try:
        cfg = HQConfig.from_dict(qc["config"])
    except (ValueError, TypeError) as e:
        raise HQFormatError(f"{where}: invalid HQConfig ({e})") from None
    if not isinstance(qc["layers"], dict) or not isinstance(qc["skipped"], dict):
        raise HQFormatError(f"{where}: layers/skipped must be JSON objects")
    for name, meta in qc["layers"].items():
        try:
            validate_meta(meta, name)
        except HQFormatError as e:
            raise HQFormatError(f"{where}: {e}") from None
    if with_checksums and not isinstance(qc["checksums"], dict):
        raise HQFormatError(f"{where}: checksums must be a JSON object")
    return cfg


def swap_in_empty_hqlinears(model: nn.Module, layers: dict, where, *, backend: str = "kernel") -> None:
    """Replace the named ``nn.Linear`` of ``model`` by empty (meta) HQLinear at their packed shapes."""
    for name, meta in layers.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise HQFormatError(f"{where}: quantized layer {name!r} does not exist in {type(model).__name__}") from None
        if not isinstance(lin, (nn.Linear, HQLinear)):
            raise HQFormatError(f"{where}: {name!r} is a {type(lin).__name__}, not a Linear")
        if (lin.in_features, lin.out_features) != (meta["in_features"], meta["out_features"]):
            raise HQFormatError(f"{where}: layer {name!r} is ({lin.in_features} → {lin.out_features}) in the model "
                                f"but ({meta['in_features']} → {meta['out_features']}) in the checkpoint")
        _set_module(model, name, HQLinear.from_meta(meta, device="meta", backend=backend, name=name))


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def check_tensors_against_model(model: nn.Module, header: dict, st_path) -> None:
    """Names, shapes and (non-float) dtypes in the file must match the skeleton's state dict exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise HQFormatError(f"{st_path}: tensors do not match the model: missing {missing[:5]}"
                            f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                            f"{'...' if len(extra) > 5 else ''}")
    for k, (dt, shape) in header.items():
        want = expected[k]
        if tuple(want.shape) != shape:
            raise HQFormatError(f"{st_path}: tensor {k!r} has shape {list(shape)}, the metadata says "
                                f"{list(want.shape)}")
        got = _ST_DTYPES.get(dt)
        if got is None or (got != want.dtype and not (got.is_floating_point and want.dtype.is_floating_point)):
            raise HQFormatError(f"{st_path}: tensor {k!r} has dtype {dt}, expected {want.dtype}")


def read_verified_tensors(st_path, checksums: dict, *, require_all: bool = True) -> dict[str, torch.Tensor]:
    """Read every tensor of ``st_path`` and check it against its CRC32.

    ``require_all``: the checksum table must list exactly the stored tensors (False for one shard of many)."""
    from safetensors import safe_open

    if not all(isinstance(v, int) and not isinstance(v, bool) for v in checksums.values()):
        raise HQFormatError(f"{st_path}: checksums must be integers")
    out = {}
    try:
        with safe_open(str(st_path), framework="pt") as f:
            keys = list(f.keys())
            if (set(keys) != set(checksums)) if require_all else not set(keys) <= set(checksums):
                raise HQFormatError(f"{st_path}: the checksum table does not list exactly the stored tensors")
            for k in keys:
                t = f.get_tensor(k)
                crc = tensor_crc32(t)
                if crc != checksums[k]:
                    raise HQFormatError(f"{st_path}: tensor {k!r} fails its CRC32 check (stored "
                                        f"{checksums[k]:#010x}, computed {crc:#010x}): the file is corrupt")
                out[k] = t
    except HQFormatError:
        raise
    except Exception as e:
        raise HQFormatError(f"{st_path}: cannot read tensors, the file may be truncated or corrupt ({e})") from None
    return out


def load_component(path, *, model: nn.Module | None = None, device=None, torch_dtype=None,
                   backend: str = "kernel") -> nn.Module:
    """Load one quantized component directory (see the module docstring)."""
    path = Path(path)
    cfg_path, st_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    config = _read_json(cfg_path)
    qc_cfg = config.get("quantization_config")
    if not isinstance(qc_cfg, dict) or qc_cfg.get("quant_method") != QuantMethod.HQ_DIFFUSION.value:
        raise HQFormatError(f"{cfg_path}: no hq_diffusion quantization_config: not an hq-diffusion checkpoint")
    hq_config = check_quantization_config(qc_cfg, cfg_path, with_checksums=False)
    qc, header = read_checkpoint_metadata(st_path)
    if {k: v for k, v in qc.items() if k != "checksums"} != qc_cfg:
        raise HQFormatError(f"{cfg_path}: quantization_config disagrees with the metadata of {st_path.name}")
    if model is None:
        model = _skeleton(config, cfg_path)
    swap_in_empty_hqlinears(model, qc["layers"], st_path, backend=backend)
    check_tensors_against_model(model, header, st_path)
    tensors = read_verified_tensors(st_path, qc["checksums"])
    model.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise HQFormatError(f"{st_path}: tensors left uninitialized after loading: {left[:5]}")
    state = HQState(config=hq_config, skipped=dict(qc["skipped"]))
    setattr(model, STATE_ATTR, state)
    if qc["kv"] is not None:
        apply_kv(model, state, kv_dict=qc["kv"])
    attach_to_diffusers(model)
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

    ensure_diffusers_backend()
    cls_name = config.get("_class_name")
    cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) else None
    if cls is None or not issubclass(cls, diffusers.ModelMixin):
        raise HQFormatError(f"{cfg_path}: unknown diffusers model class {cls_name!r}")
    init_cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    with init_empty_weights():
        return cls.from_config(init_cfg)


def ensure_diffusers_backend() -> None:
    """Register the diffusers quantization backend (idempotent)."""
    importlib.import_module("hq_diffusion.integrations.diffusers_backend")
