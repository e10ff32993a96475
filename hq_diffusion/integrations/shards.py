"""Write safetensors files one tensor at a time, byte-identical to ``safetensors.torch.save_file`` followed by
:func:`~.state.canonicalize_safetensors_header`, and split a component into diffusers-style shards.

A safetensors file is ``u64 header length n`` + ``n`` bytes of JSON (``__metadata__`` first, then each tensor's
``dtype``, ``shape`` and ``data_offsets`` in data order, padded with spaces to a multiple of 8) + the raw tensor
bytes. The data order is the library's (by dtype, widest first, then by name); :func:`data_order` asks the
installed ``safetensors`` for it on empty tensors, so that the streamed file follows whatever order the library
that wrote ``save_quantized``'s file uses. Only the header needs every tensor's shape, dtype and checksum in
advance; the tensors themselves are fetched one at a time (``fetch(name) -> torch.Tensor``) while writing.

Sharding follows diffusers' names: one shard is ``diffusion_pytorch_model.safetensors``; several are
``diffusion_pytorch_model-0000i-of-0000N.safetensors`` with ``diffusion_pytorch_model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}``).
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Callable

import torch

from .state import ST_DTYPES, ST_NAMES

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
    """Bytes of a size such as ``"5GB"``, ``"500MiB"``, ``"1e9"`` or an int (ValueError naming the value)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"max shard size {text!r}: expected a number with an optional unit "
                             f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
        try:
            value = int(float(m.group(1)) * _UNITS[unit])
        except ValueError:
            raise ValueError(f"max shard size {text!r}: {m.group(1)!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"max shard size must be positive, got {text!r}")
    return value


def nbytes(dtype: str, shape) -> int:
    """Bytes of a tensor of safetensors dtype ``dtype`` (e.g. ``"BF16"``) and ``shape``."""
    return math.prod(shape) * torch.empty((), dtype=ST_DTYPES[dtype]).element_size()


def data_order(specs: dict[str, tuple[str, tuple]]) -> list[str]:
    """The names of ``specs`` ({name: (safetensors dtype, shape)}) in the data order ``safetensors`` uses."""
    from safetensors.torch import save

    blob = save({k: torch.empty((0,), dtype=ST_DTYPES[dt]) for k, (dt, _) in specs.items()})
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    return list(header)


def header_bytes(specs: dict[str, tuple[str, tuple]], metadata: dict[str, str] | None) -> tuple[bytes, list]:
    """(the canonical header with its length prefix, [(name, begin, end)] in data order)."""
    out: dict = {}
    if metadata is not None:
        out["__metadata__"] = dict(sorted(metadata.items()))
    layout, offset = [], 0
    for name in data_order(specs):
        dt, shape = specs[name]
        size = nbytes(dt, shape)
        out[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + size]}
        layout.append((name, offset, offset + size))
        offset += size
    text = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text, layout


def tensor_bytes(t: torch.Tensor):
    """The raw C-order bytes of ``t`` as a numpy uint8 array (no copy for a contiguous CPU tensor)."""
    t = t.detach().contiguous().cpu().reshape(-1)
    return t.view(torch.uint8).numpy()


def write_safetensors(path, specs: dict[str, tuple[str, tuple]], metadata: dict[str, str] | None,
                      fetch: Callable[[str], torch.Tensor], on_tensor: Callable[[str, int], None] | None = None) -> int:
    """Write ``path`` holding the tensors of ``specs`` ({name: (safetensors dtype, shape)}), each obtained by
    ``fetch(name)`` at the moment it is written (so one tensor is held at a time); ``on_tensor(name, nbytes)``
    after each. A fetched tensor whose dtype or shape differs from its spec raises ValueError naming it.
    Returns the file size in bytes."""
    head, layout = header_bytes(specs, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for name, begin, end in layout:
            t = fetch(name)
            dt, shape = specs[name]
            if ST_NAMES.get(t.dtype) != dt or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {name!r} is {t.dtype} {list(t.shape)}, its header says "
                                 f"{dt} {list(shape)}")
            f.write(tensor_bytes(t).tobytes() if end > begin else b"")
            del t
            if on_tensor is not None:
                on_tensor(name, end - begin)
        size = f.tell()
    return size


def plan_shards(specs: dict[str, tuple[str, tuple]], order: list[str], max_bytes: int) -> list[list[str]]:
    """Split ``order`` (tensor names) into consecutive groups of at most ``max_bytes`` each (a tensor larger
    than that gets a shard of its own), as diffusers' sharding does."""
    shards, cur, size = [], [], 0
    for name in order:
        b = nbytes(*specs[name])
        if cur and size + b > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += b
    if cur or not shards:
        shards.append(cur)
    return shards


def shard_names(count: int) -> list[str]:
    """File names of ``count`` shards (diffusers' convention)."""
    if count == 1:
        return [WEIGHTS_NAME]
    stem, ext = WEIGHTS_NAME.rsplit(".", 1)
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.{ext}" for i in range(count)]


def write_index(path, weight_map: dict[str, str], total_size: int) -> None:
    """Write diffusers' ``*.safetensors.index.json`` for a sharded component."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))},
                  f, indent=2, sort_keys=True)
        f.write("\n")


def component_files(path: Path) -> list[Path]:
    """The weight files of a diffusers component directory: the single file, or the shards its index names
    (in index order, each once). Raises FileNotFoundError when neither exists."""
    path = Path(path)
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if single.is_file() or not index.is_file():
        return [single]
    from .state import read_json_file

    wm = read_json_file(index).get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        from ..codec import HQFormatError
        raise HQFormatError(f"{index}: no valid weight_map")
    return [path / f for f in dict.fromkeys(wm.values())]


def weights_file(path) -> Path:
    """The component directory's weights file that identifies it: the single file, else the first shard its
    index names that exists (a sharded hq-diffusion component has no single file), else the single file's
    path. HQFormatError for an index without a valid weight_map."""
    files = component_files(Path(path))
    return next((f for f in files if f.is_file()), Path(path) / WEIGHTS_NAME)


def read_header(path) -> tuple[dict[str, tuple[str, tuple, int, int]], int]:
    """The tensor table of the safetensors file ``path``: ({name: (dtype, shape, begin, end)}, byte offset of
    the data section). Raises :class:`~hq_diffusion.codec.HQFormatError` naming the file for a header that is
    truncated, not JSON, or names offsets outside the file."""
    from ..codec import HQFormatError

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n < 0 or 8 + n > size:
            raise HQFormatError(f"{path}: truncated safetensors header")
        try:
            table = json.loads(f.read(n))
        except ValueError:
            raise HQFormatError(f"{path}: safetensors header is not valid JSON") from None
    table.pop("__metadata__", None)
    out = {}
    for name, e in table.items():
        try:
            begin, end = (int(x) for x in e["data_offsets"])
            entry = (str(e["dtype"]), tuple(int(x) for x in e["shape"]), begin, end)
        except (KeyError, TypeError, ValueError):
            raise HQFormatError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if entry[0] not in ST_DTYPES or not 0 <= begin <= end or 8 + n + end > size \
                or end - begin != nbytes(entry[0], entry[1]):
            raise HQFormatError(f"{path}: tensor {name!r}: dtype {entry[0]!r}, shape {list(entry[1])} and "
                                f"offsets [{begin}, {end}] do not fit a file of {size} bytes")
        out[name] = entry
    return out, 8 + n


def read_tensor(path, name: str, entry: tuple[str, tuple, int, int], data_start: int) -> torch.Tensor:
    """Read tensor ``name`` (its :func:`read_header` ``entry``) of ``path`` into a fresh CPU tensor with plain
    file reads: no memory map, so its memory is the process's own and goes back when the tensor is freed."""
    dtype, shape, begin, end = entry
    buf = torch.empty(end - begin, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        got = f.readinto(buf.numpy()) if end > begin else 0
    if got != end - begin:
        from ..codec import HQFormatError
        raise HQFormatError(f"{path}: tensor {name!r}: read {got} of {end - begin} bytes, the file is truncated")
    return buf.view(ST_DTYPES[dtype]).reshape(shape)


__all__ = ["WEIGHTS_NAME", "INDEX_NAME", "parse_size", "nbytes", "data_order", "header_bytes", "tensor_bytes",
           "write_safetensors", "plan_shards", "shard_names", "write_index", "component_files", "weights_file", "read_header",
           "read_tensor"]
