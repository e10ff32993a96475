"""The one serializer of the package's config dataclasses, and the field checks they share.

Every config class (:class:`~hq_diffusion.codec.config.CodecConfig`, ``KVConfig`` of :mod:`hq_diffusion.nn.kv`,
``HQConfig`` of :mod:`hq_diffusion.integrations.config`) is a frozen dataclass with a ``version`` field and
serializes through :func:`config_to_dict` / :func:`config_from_dict` as::

    {"_type": <class name>, "_version": <int>, "_data": {<every field but version>: <JSON value>}}

Reading is strict: the three keys exactly, the type of the class asked for, the version this build writes,
and exactly its fields in ``_data`` (an unknown or a missing field raises ``ValueError`` naming it). Older
checkpoints wrote ``version`` inside ``_data`` too (CodecConfig, KVConfig); it is accepted there when it equals
``_version``. Tuples are written as JSON lists; the class's ``__post_init__`` normalizes them back.

The field checks (:func:`check_bps`, :func:`check_block`, :func:`check_seed`, :func:`check_choice`) raise
:class:`ConfigFieldError`, a ``ValueError`` that names ``<Owner>.<field>``; a config built from another one
(``HQConfig`` builds its codec and K/V configs) re-labels it with :meth:`ConfigFieldError.relabel`, so that
each range is checked in one place. See docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, TypeVar

BPS_RANGE = (1.25, 16.0)  # a Rice code spends at least one bit per scalar; 16 is the float16 rate
BLOCK_RANGE = (8, 2**20)  # symbols per Rice block: a power of two in this range
SEED_LIMIT = 2**32
KEYS = ("_type", "_version", "_data")
VERSION_FIELD = "version"

C = TypeVar("C")


class ConfigFieldError(ValueError):
    """A config field has a bad value: the message reads ``"<owner>.<field> <requirement>, got <value>"``.

    Attributes: ``owner`` (class name), ``field``, ``value``, ``requirement`` (what the value must be)."""

    def __init__(self, owner: str, field: str, value: Any, requirement: str):
        self.owner, self.field, self.value, self.requirement = owner, field, value, requirement
        super().__init__(f"{owner}.{field} {requirement}, got {value!r}")

    def relabel(self, owner: str, fields: dict[str, str]) -> "ConfigFieldError":
        """The same error for the config ``owner`` whose field ``fields[self.field]`` produced this value."""
        return ConfigFieldError(owner, fields.get(self.field, self.field), self.value, self.requirement)


def check_choice(owner: str, field: str, value, allowed) -> None:
    """``value`` must be one of ``allowed``."""
    if isinstance(value, bool) or value not in allowed:
        raise ConfigFieldError(owner, field, value, f"must be one of {list(allowed)}")


def check_bps(owner: str, field: str, value) -> float:
    """A rate in bits per scalar: a finite number in :data:`BPS_RANGE`. Returns it as a float."""
    lo, hi = BPS_RANGE
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not lo <= float(value) <= hi:
        raise ConfigFieldError(owner, field, value, f"must be a number in [{lo:g}, {hi:g}] bits per scalar "
                                                    f"(a Rice code spends at least 1 bit per scalar)")
    return float(value)


def check_block(owner: str, field: str, value) -> int:
    """Symbols per Rice block: an int, a power of two in :data:`BLOCK_RANGE` (so a multiple of 8)."""
    lo, hi = BLOCK_RANGE
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi
            or value & (value - 1)):
        raise ConfigFieldError(owner, field, value, f"must be a power of two in [{lo}, 2**20]")
    return int(value)


def check_seed(owner: str, field: str, value) -> int:
    """A hash seed: an int in [0, 2**32)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < SEED_LIMIT:
        raise ConfigFieldError(owner, field, value, "must be an int in [0, 2**32)")
    return int(value)


def _json_value(v):
    return list(v) if isinstance(v, tuple) else v


def config_to_dict(cfg) -> dict:
    """``{"_type": class name, "_version": cfg.version, "_data": {field: value}}`` of a config dataclass
    (JSON-safe when its fields are: tuples become lists)."""
    data = {f.name: _json_value(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != VERSION_FIELD}
    return {"_type": type(cfg).__name__, "_version": getattr(cfg, VERSION_FIELD), "_data": data}


def config_from_dict(cls: type[C], d, *, version: int) -> C:
    """Inverse of :func:`config_to_dict` for the config class ``cls`` whose build writes ``version``.

    Raises ValueError naming the problem: not a ``{_type, _version, _data}`` dict, another type, another
    version, or unknown / missing fields (see the module docstring for the accepted legacy layout)."""
    name = cls.__name__
    if not isinstance(d, dict) or set(d) != set(KEYS):
        raise ValueError(f"not a serialized {name} (expected keys _type, _version, _data): {d!r}")
    if d["_type"] != name:
        raise ValueError(f"unknown config type {d['_type']!r}: expected a serialized {name}")
    if d["_version"] != version or isinstance(d["_version"], bool):
        raise ValueError(f"{name} version {d['_version']!r} is not supported by this build "
                         f"(it reads version {version})")
    data = d["_data"]
    if not isinstance(data, dict):
        raise ValueError(f"{name}._data must be a dict, got {type(data).__name__}")
    data = dict(data)
    if VERSION_FIELD in data:  # legacy layout: the version repeated inside _data
        if data.pop(VERSION_FIELD) != d["_version"]:
            raise ValueError(f"{name}: _data.version {d['_data'][VERSION_FIELD]!r} disagrees with _version "
                             f"{d['_version']!r}")
    fields = {f.name for f in dataclasses.fields(cls)} - {VERSION_FIELD}
    unknown, missing = sorted(set(data) - fields), sorted(fields - set(data))
    if unknown:
        raise ValueError(f"unknown {name} fields: {unknown} (known: {sorted(fields)})")
    if missing:
        raise ValueError(f"missing {name} fields: {missing}")
    return cls(**data, **{VERSION_FIELD: d["_version"]})


__all__ = ["ConfigFieldError", "config_to_dict", "config_from_dict", "check_bps", "check_block", "check_seed",
           "check_choice", "BPS_RANGE", "BLOCK_RANGE"]
