"""What a ``--model`` directory saved quantized by hq-diffusion says about itself, for ``hq-diffusion eval`` and
the app: the quantized components, the stored rate and codec settings, the dtype it was saved in, and where the
model came from (the default float reference).

A directory written by ``hq_diffusion.save_quantized``, ``pipe.save_pretrained`` of a quantized pipeline or
``hq-diffusion quantize`` holds ``model_index.json`` and, per quantized component, a ``config.json`` whose
``quantization_config`` names ``quant_method: "hq_diffusion"`` and carries the ``HQConfig`` it was made with.

Where it came from. diffusers records the directory a pipeline was loaded from as ``_name_or_path`` in
``model_index.json``. For the shipped trained tiny model that is its package asset directory
(``.../assets/tiny_ltx_trained``), which :func:`inspect_quantized` maps back to the model key
(``tiny-ltx-trained``) by the asset's name, so the record survives moving the checkout. Any other recorded
path is the default reference only if it still is a float pipeline directory of the same pipeline class;
otherwise there is no default (a quant-only run, or ``--reference``). Random-weight tiny pipelines are built
from code and record nothing: their reference must be given. Torch-free.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import PurePath

from hq_diffusion.integrations import families, genrules

from .files import EvalInputError

__all__ = ["SavedQuantized", "inspect_quantized", "is_quantized_dir", "resolve_reference", "choose_reference"]

_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class SavedQuantized:
    """What :func:`inspect_quantized` read from a saved quantized pipeline directory.

    Attributes:
        path: the directory (absolute).
        pipeline_class: ``model_index.json``'s ``_class_name`` (e.g. ``"LTXPipeline"``).
        components: the quantized component names (e.g. ``("transformer",)``).
        bps: the requested weight rate of the transformer's ``HQConfig`` (the stored rate, every bit counted,
            is measured by ``hq_diffusion.summary`` after loading).
        config: the transformer's ``HQConfig`` fields (``bps``, ``lattice``, ``storage``, ``kv_bps``, ...).
        dtype: the dtype of the saved float tensors (``"bfloat16"`` / ``"float16"`` / ``"float32"``), read from
            the VAE's safetensors header; None when it cannot be read.
        source: where the model came from: a tiny model key, a float pipeline directory, or None.
        source_note: how ``source`` was found, or why there is none (one sentence).
    """

    path: str
    pipeline_class: str
    components: tuple[str, ...]
    bps: float
    config: dict
    dtype: str | None
    source: str | None
    source_note: str


def is_quantized_dir(path: str) -> bool:
    """Whether ``path`` is a pipeline directory with at least one component saved quantized by hq-diffusion."""
    return bool(path) and os.path.isdir(path) and bool(genrules.quantized_components(path))


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as e:
        raise EvalInputError(f"{what}: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise EvalInputError(f"{what}: {path} is not a JSON object")
    return data


def _saved_dtype(path: str) -> str | None:
    """The dtype of the first float tensor in ``path/vae``'s safetensors header (None if unreadable)."""
    vae = os.path.join(path, "vae")
    try:
        names = sorted(n for n in os.listdir(vae) if n.endswith(".safetensors"))
        with open(os.path.join(vae, names[0]), "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(min(n, 1 << 26)))
    except (OSError, IndexError, ValueError, struct.error):
        return None
    for k in sorted(header):
        if k != "__metadata__" and isinstance(header[k], dict) and header[k].get("dtype") in _ST_DTYPES:
            return _ST_DTYPES[header[k]["dtype"]]
    return None


def _source(name_or_path, pipeline_class: str) -> tuple[str | None, str]:
    if not isinstance(name_or_path, str) or not name_or_path:
        return None, "the saved pipeline does not record where it came from"
    tail = PurePath(name_or_path.replace("\\", "/")).name
    for t in families.TRAINED:
        if tail == PurePath(t.asset).name:
            return t.alias, f"recorded in the saved model_index.json (the package's {t.alias} weights)"
    if os.path.isdir(name_or_path) and not genrules.quantized_components(name_or_path):
        try:
            with open(os.path.join(name_or_path, "model_index.json"), encoding="utf-8") as fh:
                cls = json.load(fh).get("_class_name")
        except (OSError, ValueError, AttributeError):
            cls = None
        if cls == pipeline_class:
            return os.path.abspath(name_or_path), "recorded in the saved model_index.json"
    return None, f"the recorded origin {name_or_path} is not a float {pipeline_class} directory here"


def inspect_quantized(path: str) -> SavedQuantized:
    """Read a saved quantized pipeline directory (no tensor is loaded; the manifest is verified when it loads).

    Raises:
        EvalInputError: ``path`` is no pipeline directory saved quantized by hq-diffusion, or its transformer
            config carries no readable ``HQConfig`` (one line naming the file).
    """
    what = f"--model {path}"
    if not os.path.isdir(path):
        raise EvalInputError(f"{what} is not a directory")
    index = _read_json(os.path.join(path, "model_index.json"), what)
    comps = genrules.quantized_components(path)
    if not comps:
        raise EvalInputError(f"{what} holds no component saved quantized by hq-diffusion")
    cls = index.get("_class_name")
    if cls not in families.pipeline_classes():
        raise EvalInputError(f"{what}: pipeline class {cls!r} is not supported; supported: "
                             f"{', '.join(families.pipeline_classes())}")
    if "transformer" not in comps:
        raise EvalInputError(f"{what}: the transformer is not quantized (quantized: {', '.join(comps)})")
    cfg_file = os.path.join(path, "transformer", "config.json")
    qc = _read_json(cfg_file, what).get("quantization_config") or {}
    data = (qc.get("config") or {}).get("_data") if isinstance(qc.get("config"), dict) else None
    bps = (data or {}).get("bps")
    if not isinstance(bps, (int, float)) or isinstance(bps, bool):
        raise EvalInputError(f"{what}: {cfg_file} carries no HQConfig bps in its quantization_config")
    source, note = _source(index.get("_name_or_path"), cls)
    return SavedQuantized(os.path.abspath(path), cls, tuple(comps), float(bps), dict(data), _saved_dtype(path),
                          source, note)


def resolve_reference(reference: str, pipeline_class: str, flag: str = "--reference") -> str:
    """Check a float reference for a quantized pipeline of ``pipeline_class``: a tiny model key of the same
    family, or a float pipeline directory of the same class. Returns it (a directory made absolute).

    Raises:
        EvalInputError: one line naming ``flag`` and what is wrong.
    """
    fam = families.pipeline_classes()[pipeline_class]
    aliases = families.tiny_aliases()
    if reference in aliases:
        if aliases[reference] != fam:
            raise EvalInputError(f"{flag} {reference} is a {aliases[reference]} model; the quantized pipeline is "
                                 f"a {pipeline_class}")
        return reference
    if not os.path.isdir(reference):
        raise EvalInputError(f"{flag} {reference!r} is neither a tiny model key ({', '.join(aliases)}) nor a "
                             f"directory")
    if genrules.quantized_components(reference):
        raise EvalInputError(f"{flag} {reference} is itself saved quantized; the reference must be float")
    index = _read_json(os.path.join(reference, "model_index.json"), flag)
    if index.get("_class_name") != pipeline_class:
        raise EvalInputError(f"{flag} {reference} holds a {index.get('_class_name')!r}; the quantized pipeline is "
                             f"a {pipeline_class}")
    return os.path.abspath(reference)


def choose_reference(sq: SavedQuantized, reference: str | None, flag: str = "--reference") -> tuple[str | None, str]:
    """The float reference of the saved quantized pipeline ``sq`` and how it was chosen: ``reference`` when
    given (``"none"`` forces none; else checked by :func:`resolve_reference`), else the origin the directory
    records, else none. Returns ``(reference or None, one-sentence note)``; a note of a run without reference
    starts with "no float reference".

    Raises:
        EvalInputError: a given ``reference`` that does not fit (one line naming ``flag``).
    """
    if reference == "none":
        return None, f"no float reference: {flag} none"
    if reference is not None:
        return resolve_reference(reference, sq.pipeline_class, flag), f"given by {flag}"
    if sq.source is not None:
        return sq.source, sq.source_note
    return None, f"no float reference: {sq.source_note} and no {flag} was given"
