"""``hq_manifest.json``: the SHA-256 of every file of a directory written by ``save_quantized``.

The quantized tensors carry a CRC32 each (:mod:`.state`), but the rest of a saved directory — the config.json
files (architecture fields such as heads, ``norm_eps``, ``activation_fn``), the VAE, the text encoders, the
tokenizer, the scheduler, ``model_index.json`` — carried nothing, and a flipped byte there loaded silently.
``save_quantized`` therefore writes, last and atomically (a temporary file renamed into place), a manifest at the
root of what it saved::

    {"hq_manifest": 1, "algorithm": "sha256", "files": {relative POSIX path: hex digest}}

with sorted keys (the bytes of a save are reproducible). Loading verifies it before anything is read: a file
missing, added or whose digest differs is an :class:`~hq_diffusion.codec.HQFormatError` naming it. A component
directory inside a saved pipeline is verified against the pipeline's manifest (the entries under its folder).

Directories without a manifest. Directories saved before the manifest existed must keep loading (they are the
checkpoints users have), so a missing manifest is not by itself an error: the load goes on with a
``UserWarning`` saying that only the quantized tensors are verified, and re-saving adds a manifest. Deleting
the manifest must not be a way around it, though: every component written by ``save_quantized`` since then
records ``"manifest": true`` in the metadata of its safetensors file (itself CRC-checked only per tensor, but
a hand edit of that JSON is deliberate tampering, not an accident), and such a component without its manifest
is refused. Checkpoints written by diffusers' own ``save_pretrained`` (not atomic, no manifest) carry no flag and
load with the warning.

Cost: hashing reads every byte once (about 1–2 GB/s per core), paid on each load of a large pipeline.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import warnings
from pathlib import Path

from ..codec import HQFormatError
from .state import read_json_file

MANIFEST_NAME = "hq_manifest.json"
MANIFEST_VERSION = 1
# manifest roots already verified by the load in progress (so that the nested from_pretrained calls of one
# load_quantized do not hash the same files twice)
_VERIFIED: contextvars.ContextVar[frozenset] = contextvars.ContextVar("hq_manifest_verified", default=frozenset())


@contextlib.contextmanager
def verified(root):
    """Within this context, :func:`verify_manifest` of ``root`` (already verified by the caller) is a no-op."""
    token = _VERIFIED.set(_VERIFIED.get() | {Path(root).resolve()})
    try:
        yield
    finally:
        _VERIFIED.reset(token)


def sha256_file(path) -> str:
    """Hex SHA-256 of a file's bytes (read in 16 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path, prefix: str = "") -> list[str]:
    """Relative POSIX paths of every file under ``root / prefix``, the manifest (and its temporary) excluded."""
    base = root / prefix if prefix else root
    out = []
    for dirpath, dirnames, names in os.walk(base):
        dirnames.sort()
        for n in sorted(names):
            rel = Path(dirpath, n).relative_to(root).as_posix()
            if rel not in (MANIFEST_NAME, f".{MANIFEST_NAME}.tmp"):
                out.append(rel)
    return out


def write_manifest(root) -> None:
    """Hash every file under ``root`` into ``root/hq_manifest.json`` (written to a temporary, fsynced, renamed)."""
    root = Path(root)
    body = {"hq_manifest": MANIFEST_VERSION, "algorithm": "sha256",
            "files": {rel: sha256_file(root / rel) for rel in _files(root)}}
    tmp = root / f".{MANIFEST_NAME}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST_NAME)


def find_manifest(path) -> tuple[Path, str] | None:
    """``(manifest root, prefix)`` covering the directory ``path``: its own manifest (prefix ``""``) or, for a
    component of a saved pipeline, the parent's (prefix ``"name/"``); None when there is none."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return path, ""
    if (path.parent / MANIFEST_NAME).is_file():
        return path.parent, path.name + "/"
    return None


def _read_manifest(root: Path) -> dict:
    where = root / MANIFEST_NAME
    m = read_json_file(where)
    files = m.get("files")
    if (m.get("hq_manifest") != MANIFEST_VERSION or m.get("algorithm") != "sha256" or not isinstance(files, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
        raise HQFormatError(f"{where}: not an hq-diffusion manifest of version {MANIFEST_VERSION} "
                            f"(keys {sorted(m)})")
    return files


def verify_manifest(root, prefix: str = "") -> None:
    """Check the files under ``root / prefix`` against ``root/hq_manifest.json``: same set of files, same
    SHA-256. Raises :class:`HQFormatError` naming the first file at fault."""
    root = Path(root)
    if root.resolve() in _VERIFIED.get():
        return
    listed = {k: v for k, v in _read_manifest(root).items() if k.startswith(prefix)}
    if prefix and not listed:
        raise HQFormatError(f"{root / MANIFEST_NAME}: lists no file under {prefix!r}")
    present = _files(root, prefix)
    extra = sorted(set(present) - set(listed))
    missing = sorted(set(listed) - set(present))
    if missing:
        raise HQFormatError(f"{root / missing[0]}: file is missing (listed in {MANIFEST_NAME}; "
                            f"{len(missing)} missing in all)")
    if extra:
        raise HQFormatError(f"{root / extra[0]}: file is not part of the saved checkpoint (absent from "
                            f"{MANIFEST_NAME}; {len(extra)} such file(s))")
    for rel in present:
        if sha256_file(root / rel) != listed[rel]:
            raise HQFormatError(f"{root / rel}: SHA-256 differs from {root / MANIFEST_NAME}: the file was "
                                f"modified or is corrupt")


def check_directory(path, *, flagged: bool) -> bool:
    """Verify the manifest that covers the directory ``path`` (see the module docstring for the policy).

    Args:
        path: a saved pipeline or component directory.
        flagged: some component under ``path`` records ``"manifest": true`` (saved with a manifest).

    Returns:
        True when a manifest was verified; False (after a ``UserWarning``) for a directory saved without one."""
    found = find_manifest(path)
    if found is not None:
        verify_manifest(*found)
        return True
    if flagged:
        raise HQFormatError(f"{Path(path) / MANIFEST_NAME}: file is missing: this checkpoint was saved with a "
                            f"manifest (its safetensors metadata says so), which was deleted or not copied along; "
                            f"copy the whole saved directory, or save the component on its own")
    warnings.warn(f"{path}: no {MANIFEST_NAME} (saved before manifests, or by diffusers' save_pretrained): only the "
                  f"quantized tensors' CRC32 are verified; re-save with hq_diffusion.save_quantized to add one",
                  UserWarning, stacklevel=3)
    return False


__all__ = ["MANIFEST_NAME", "MANIFEST_VERSION", "sha256_file", "write_manifest", "find_manifest", "verify_manifest",
           "check_directory", "verified"]
