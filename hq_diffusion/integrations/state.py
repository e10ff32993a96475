"""The quantized-model state and its checkpoint form, shared by quantize, serialization and the diffusers backend.

- :class:`HQState` (attribute :data:`STATE_ATTR` of a quantized module): what ``quantize`` did; :func:`apply_kv`
  installs the K/V quantization it records.
- :func:`quantization_config`: the JSON-safe ``quantization_config`` of a quantized module (layout in
  :mod:`hq_diffusion.integrations.serialization`); :func:`check_quantization_config` validates one.
- Reading a checkpoint: :func:`read_json_file` (every JSON error, deep nesting included, an
  :class:`HQFormatError` naming the file), :func:`read_checkpoint_metadata`, :func:`read_verified_tensors` (CRC32
  and recorded dtype per tensor, :func:`tensor_crc32`), :func:`swap_in_empty_hqlinears` (empty HQLinear at their
  packed shapes), :func:`looks_quantized` (a weights file that is an hq-diffusion checkpoint whatever its
  config.json says) and :func:`check_no_meta` (nothing left on ``meta`` after a load).
- Writing one: :func:`file_metadata` (the safetensors metadata: ``quantization_config`` + the file-only keys
  :data:`FILE_ONLY_KEYS`) and :func:`canonicalize_safetensors_header` (byte-reproducible files).
  The directory manifest (``hq_manifest.json``) lives in :mod:`.manifest`.

This module imports no other module of :mod:`hq_diffusion.integrations` but :mod:`.config`: quantize,
serialization and diffusers_backend all import it, and :mod:`.api` attaches the diffusers quantizer on top.
See docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import importlib
import json
import re
import struct
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
# keys of the safetensors copy of quantization_config that config.json does not carry: "checksums" (tensor name →
# CRC32, always), "dtypes" (tensor name → safetensors dtype string, written since the manifest exists; optional so
# that older checkpoints load) and "manifest" (True when save_quantized wrote hq_manifest.json next to the file:
# its absence on load is then an error, see .manifest)
FILE_ONLY_KEYS = ("checksums", "dtypes", "manifest")
# the names of HQLinear buffers: a file holding them is an hq-diffusion checkpoint whatever config.json says
_HQ_BUFFER = re.compile(r"(^|\.)s\d+_(ks|offsets|unary|rem|escapes)$")
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


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


def parse_json(text, where):
    """``json.loads`` whose every failure (bad syntax, bad UTF-8, nesting too deep for the parser) is an
    :class:`HQFormatError` naming ``where``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise HQFormatError(f"{where}: JSON nested too deeply to parse") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HQFormatError(f"{where}: not valid JSON ({e})") from None


def read_json_file(path) -> dict:
    """Read a JSON object from ``path``; a missing, unreadable, malformed or non-object file is an
    :class:`HQFormatError` naming it."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise HQFormatError(f"{path}: file is missing") from None
    except OSError as e:
        raise HQFormatError(f"{path}: not a readable JSON file ({e})") from None
    d = parse_json(raw, path)
    if not isinstance(d, dict):
        raise HQFormatError(f"{path}: expected a JSON object")
    return d


def strip_file_keys(qc: dict) -> dict:
    """``qc`` without the keys only the safetensors copy carries (:data:`FILE_ONLY_KEYS`)."""
    return {k: v for k, v in qc.items() if k not in FILE_ONLY_KEYS}


def file_metadata(qc: dict, state_dict: dict[str, torch.Tensor], *, manifest: bool) -> dict[str, str]:
    """The safetensors metadata of a component: ``qc`` plus the CRC32 and dtype of every tensor (and the
    ``manifest`` flag when a manifest is written next to the file)."""
    extra = {"checksums": {k: tensor_crc32(v) for k, v in state_dict.items()},
             "dtypes": {k: ST_NAMES[v.dtype] for k, v in state_dict.items()}}
    if manifest:
        extra["manifest"] = True
    return {"format": "pt", METADATA_KEY: json.dumps({**qc, **extra}, sort_keys=True)}


def read_safetensors_header(st_path) -> tuple[dict, dict]:
    """``(raw metadata {str: str}, {tensor name: (dtype str, shape tuple)})`` of a safetensors file, without
    reading any tensor; every failure an :class:`HQFormatError` naming the file."""
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
    except RecursionError:
        raise HQFormatError(f"{st_path}: safetensors header nested too deeply to parse") from None
    except Exception as e:  # safetensors raises SafetensorError (an Exception) for a bad/truncated file
        raise HQFormatError(f"{st_path}: not a valid safetensors file, it may be truncated or corrupt ({e})") from None
    return raw, header


def looks_quantized(st_path) -> str | None:
    """Why the safetensors file ``st_path`` is an hq-diffusion checkpoint (its metadata key, or HQLinear buffer
    names), or None when it is not one (or is absent)."""
    if not Path(st_path).is_file():
        return None
    raw, header = read_safetensors_header(st_path)
    if METADATA_KEY in raw:
        return f"its metadata carries {METADATA_KEY!r}"
    hq = sorted(k for k in header if _HQ_BUFFER.search(k))
    return f"it holds HQLinear buffers ({hq[:3]})" if hq else None


def refuse_stripped_config(cfg_path, st_path) -> None:
    """Raise :class:`HQFormatError` when ``st_path`` is an hq-diffusion checkpoint (:func:`looks_quantized`)
    although ``cfg_path`` (its config.json) carries no hq-diffusion ``quantization_config``."""
    why = looks_quantized(st_path)
    if why is not None:
        raise HQFormatError(f"{cfg_path}: no hq_diffusion quantization_config, but {st_path} is an hq-diffusion "
                            f"checkpoint ({why}): config.json was edited or replaced")


def manifest_flag(st_path) -> bool:
    """Whether the component file ``st_path`` was saved together with a manifest (its metadata records
    ``"manifest": true``, see :mod:`.manifest`); False for an absent file or one without hq-diffusion metadata."""
    if not Path(st_path).is_file():
        return False
    raw, _ = read_safetensors_header(st_path)
    if METADATA_KEY not in raw:
        return False
    qc = parse_json(raw[METADATA_KEY], f"{st_path}: {METADATA_KEY!r} metadata")
    return isinstance(qc, dict) and qc.get("manifest") is True


def read_checkpoint_metadata(st_path: Path) -> tuple[dict, dict]:
    """Parse the hq-diffusion metadata of a safetensors file.

    Returns ``(quantization_config with the file-only keys, {tensor name: (dtype str, shape tuple)})``; when
    the metadata records dtypes (``"dtypes"``), each stored tensor's dtype is checked against it here."""
    raw, header = read_safetensors_header(st_path)
    if METADATA_KEY not in raw:
        raise HQFormatError(f"{st_path}: no {METADATA_KEY!r} metadata: not an hq-diffusion checkpoint")
    qc = parse_json(raw[METADATA_KEY], f"{st_path}: {METADATA_KEY!r} metadata")
    check_quantization_config(qc, st_path, with_checksums=True)
    dtypes = qc.get("dtypes")
    if dtypes is not None:
        if set(dtypes) != set(header):
            raise HQFormatError(f"{st_path}: the dtype record does not list exactly the stored tensors")
        for k, (dt, _) in sorted(header.items()):
            if dtypes[k] != dt:
                raise HQFormatError(f"{st_path}: tensor {k!r} is stored as {dt} but was saved as {dtypes[k]}")
    return qc, header


def check_quantization_config(qc, where, *, with_checksums: bool) -> HQConfig:
    """Validate the structure and versions of a ``quantization_config``; return its :class:`HQConfig`.

    ``with_checksums``: the safetensors copy (``"checksums"`` required, ``"dtypes"`` and ``"manifest"``
    optional) rather than config.json's."""
    if not isinstance(qc, dict):
        raise HQFormatError(f"{where}: quantization_config must be a JSON object")
    if qc.get("quant_method") != QuantMethod.HQ_DIFFUSION.value:
        raise HQFormatError(f"{where}: quant_method is {qc.get('quant_method')!r}, not 'hq_diffusion'")
    if qc.get("format_version") != FORMAT_VERSION:
        raise HQFormatError(f"{where}: checkpoint format version {qc.get('format_version')!r} is not supported "
                            f"(this build reads version {FORMAT_VERSION})")
    required = set(QC_KEYS) | ({"checksums"} if with_checksums else set())
    allowed = required | (set(FILE_ONLY_KEYS) if with_checksums else set())
    if not required <= set(qc) <= allowed:
        raise HQFormatError(f"{where}: quantization_config keys {sorted(qc)} differ from {sorted(required)}")
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
    dtypes = qc.get("dtypes")
    if dtypes is not None and not (isinstance(dtypes, dict) and all(v in ST_DTYPES for v in dtypes.values())):
        raise HQFormatError(f"{where}: dtypes must map tensor names to {sorted(ST_DTYPES)}")
    if qc.get("manifest", True) is not True:
        raise HQFormatError(f"{where}: 'manifest' must be true when present")
    return cfg


def _data_layout(f, st_path) -> tuple[int, dict]:
    """(start of the data section, {tensor name: (dtype str, shape, begin, end)}) from an open safetensors file."""
    (n,) = struct.unpack("<Q", f.read(8))
    header = parse_json(f.read(n), f"{st_path}: safetensors header")
    header.pop("__metadata__", None)
    return 8 + n, {k: (v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()}


def read_verified_tensors(st_path, checksums: dict, *, require_all: bool = True,
                          device=None) -> dict[str, torch.Tensor]:
    """Read every tensor of ``st_path`` and check it against its CRC32.

    The tensors are read one at a time with plain reads into their own buffers (no memory map: the file is
    never held twice, once as mapped pages and once as tensors), each verified as it arrives; with ``device``
    (e.g. ``"cuda"``) each is moved there right after its check, so that at most one tensor is on the CPU.
    ``require_all``: the checksum table must list exactly the stored tensors (False for one shard of many)."""
    from safetensors import safe_open

    if not all(isinstance(v, int) and not isinstance(v, bool) for v in checksums.values()):
        raise HQFormatError(f"{st_path}: checksums must be integers")
    out = {}
    try:
        with safe_open(str(st_path), framework="pt") as f:  # validates the header and the file's length
            keys = list(f.keys())
        if (set(keys) != set(checksums)) if require_all else not set(keys) <= set(checksums):
            raise HQFormatError(f"{st_path}: the checksum table does not list exactly the stored tensors")
        with open(st_path, "rb") as f:
            start, layout = _data_layout(f, st_path)
            for k in sorted(layout, key=lambda k: layout[k][2]):
                dt, shape, begin, end = layout[k]
                buf = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(start + begin)
                if end > begin and f.readinto(memoryview(buf.numpy())) != end - begin:
                    raise HQFormatError(f"{st_path}: tensor {k!r} is truncated")
                t = buf.view(ST_DTYPES[dt]).reshape(shape)
                crc = tensor_crc32(t)
                if crc != checksums[k]:
                    raise HQFormatError(f"{st_path}: tensor {k!r} fails its CRC32 check (stored "
                                        f"{checksums[k]:#010x}, computed {crc:#010x}): the file is corrupt")
                out[k] = t if device is None else t.to(device)
                del buf, t
    except HQFormatError:
        raise
    except Exception as e:
        raise HQFormatError(f"{st_path}: cannot read tensors, the file may be truncated or corrupt ({e})") from None
    return out


def _offloaded(hook) -> bool:
    """Whether an accelerate hook keeps its module's weights elsewhere (``offload=True``: parameters on meta)."""
    hooks = getattr(hook, "hooks", None)  # accelerate's SequentialHook
    return any(_offloaded(h) for h in hooks) if hooks else bool(getattr(hook, "offload", False))


def check_no_meta(model: nn.Module, where) -> None:
    """Raise :class:`HQFormatError` naming ``where`` and the tensors when a parameter or buffer of ``model`` is
    still on the ``meta`` device after a load (a tensor the file lacks). Modules that accelerate offloads
    (``device_map`` with CPU offload: their weights live in the hook, the parameters on meta) are exempt."""
    offloaded = [n for n, m in model.named_modules() if _offloaded(getattr(m, "_hf_hook", None))]
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"
            and not any(o == "" or n.startswith(o + ".") for o in offloaded)]
    if left:
        raise HQFormatError(f"{where}: {len(left)} tensor(s) missing from the file, left uninitialized after "
                            f"loading: {left[:5]}{'...' if len(left) > 5 else ''}")


def canonicalize_safetensors_header(st_path) -> None:
    """Rewrite the JSON header of a safetensors file in place with its ``__metadata__`` keys sorted (the
    writer's order is random), so that saving the same tensors twice gives the same bytes. The header keeps
    its length (the same keys and values, reordered), so no tensor offset moves."""
    with open(st_path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        text = f.read(n)
        header = json.loads(text)
        meta = header.pop("__metadata__", None)
        out = {} if meta is None else {"__metadata__": dict(sorted(meta.items()))}
        out.update(header)
        new = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) > n:
            raise ValueError(f"{st_path}: canonical safetensors header is longer than the written one "
                             f"({len(new)} > {n} bytes)")
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


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
           "read_verified_tensors", "swap_in_empty_hqlinears", "FILE_ONLY_KEYS", "ST_DTYPES", "ST_NAMES", "parse_json",
           "read_json_file", "strip_file_keys", "file_metadata", "read_safetensors_header", "looks_quantized",
           "check_no_meta", "canonicalize_safetensors_header", "manifest_flag", "refuse_stripped_config"]
