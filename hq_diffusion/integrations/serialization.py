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

The checkpoint form itself (``quantization_config``, its checks, CRC32-verified reads) lives in :mod:`.state`;
the public ``hq_diffusion.load_quantized`` (:mod:`.api`) also attaches the diffusers quantizer to the loaded
diffusers models.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from ..codec import HQFormatError
from .config import QuantMethod
from .state import FORMAT_VERSION  # noqa: F401  (re-exported: the checkpoint format version this build writes)
from .state import (METADATA_KEY, STATE_ATTR, HQState, apply_kv, check_quantization_config, quantization_config,
                    read_checkpoint_metadata, read_verified_tensors, swap_in_empty_hqlinears, tensor_crc32)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PIPELINE_INDEX = "model_index.json"


# ---- helpers ----------------------------------------------------------------------------------------------

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
    with init_empty_weights():
        return cls.from_config(init_cfg)
