"""The quantized-model state and its checkpoint form, shared by quantize, serialization and the diffusers backend.

- :class:`HQState` (attribute :data:`STATE_ATTR` of a quantized module): what ``quantize`` did; :func:`apply_kv`
  installs the K/V quantization it records.
- :func:`quantization_config`: the JSON-safe ``quantization_config`` of a quantized module (layout in
  :mod:`hq_diffusion.integrations.serialization`); :func:`check_quantization_config` validates one.
- Reading a checkpoint: :func:`read_checkpoint_metadata`, :func:`read_verified_tensors` (CRC32 per tensor,
  :func:`tensor_crc32`) and :func:`swap_in_empty_hqlinears` (empty HQLinear at their packed shapes).

This module imports no other module of :mod:`hq_diffusion.integrations` but :mod:`.config`: quantize,
serialization and diffusers_backend all import it, and :mod:`.api` attaches the diffusers quantizer on top.
See docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import importlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..codec import HQFormatError
from ..nn.linear import HQLinear, validate_meta
from .config import HQConfig, QuantMethod

STATE_ATTR = "hq_state"
FORMAT_VERSION = 1
METADATA_KEY = "hq_diffusion"
QC_KEYS = ("quant_method", "format_version", "config", "layers", "skipped", "kv", "kv_modules")


@dataclass
class HQState:
    """What :func:`~hq_diffusion.integrations.quantize.quantize` did to one module (stored as ``module.hq_state``).

    Attributes:
        config: the :class:`HQConfig` used.
        skipped: module name → reason, for every ``nn.Linear`` left unquantized.
        kv: the serialized ``KVConfig`` (``KVConfig.to_dict()``) when K/V quantization is on, else None.
        kv_modules: names of the attention modules whose processors quantize K/V.
    """

    config: HQConfig
    skipped: dict[str, str] = field(default_factory=dict)
    kv: dict | None = None
    kv_modules: list[str] = field(default_factory=list)


def kv_api():
    """The :mod:`hq_diffusion.integrations.kv_processors` module, or NotImplementedError when this build lacks it."""
    try:
        return importlib.import_module("hq_diffusion.integrations.kv_processors")
    except ModuleNotFoundError as e:
        if e.name == "hq_diffusion.integrations.kv_processors":
            raise NotImplementedError(
                "K/V quantization (kv_bps=...) needs hq_diffusion.integrations.kv_processors, which this build "
                "does not include; quantize with kv_bps=None") from None
        raise


def apply_kv(model: nn.Module, state: HQState, kv_dict: dict | None = None) -> None:
    """Install the K/V quantization on ``model`` from ``state.config`` (or from a saved ``kv_dict``)."""
    kv = kv_api()
    kv_cfg = state.config.kv_config() if kv_dict is None else kv.KVConfig.from_dict(kv_dict)
    state.kv_modules = list(kv.apply_kv_quantization(model, kv_cfg))
    state.kv = kv_cfg.to_dict()


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted path) of ``root`` by ``new``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)



# ---- checkpoint form -----------------------------------------------------------------------------------------

def tensor_crc32(t: torch.Tensor) -> int:
    """CRC32 of a tensor's raw bytes (C order)."""
    t = t.detach().contiguous().cpu().reshape(-1)
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.view(torch.uint8).numpy()) & 0xFFFFFFFF


def quantization_config(model: nn.Module) -> dict:
    """The JSON-safe ``quantization_config`` of a model quantized by
    :func:`~hq_diffusion.integrations.quantize.quantize`."""
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, HQState):
        raise ValueError(f"{type(model).__name__} was not quantized by hq_diffusion (no {STATE_ATTR})")
    layers = {n: dict(m.hq_meta) for n, m in model.named_modules() if isinstance(m, HQLinear)}
    return {"quant_method": QuantMethod.HQ_DIFFUSION.value, "format_version": FORMAT_VERSION,
            "config": state.config.to_dict(), "layers": layers, "skipped": dict(state.skipped),
            "kv": state.kv, "kv_modules": list(state.kv_modules)}


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
        set_module(model, name, HQLinear.from_meta(meta, device="meta", backend=backend, name=name))


__all__ = ["STATE_ATTR", "FORMAT_VERSION", "METADATA_KEY", "QC_KEYS", "HQState", "kv_api", "apply_kv", "set_module",
           "tensor_crc32", "quantization_config", "check_quantization_config", "read_checkpoint_metadata",
           "read_verified_tensors", "swap_in_empty_hqlinears"]
