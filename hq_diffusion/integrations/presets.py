"""Default skip patterns per DiT architecture: the small, sensitive edges kept in their original dtype.

See docs/ARCHITECTURE.md: quantize every ``nn.Linear`` inside the transformer blocks — the per-block adaLN
modulation layers included (in FLUX.1 they hold about a quarter of the linear weights) — and keep the
top-level patch embedding in/out projections, the timestep / adaLN embedders and the caption projection. The
architecture is detected from the transformer's class name; the rules of each model family live in the
registry (:mod:`.families`, ``Family.skip``); unknown classes get :data:`GENERIC`.

A pattern is a glob over the full module name (``fnmatch``; ``*`` also crosses dots) or, with the prefix
``"re:"``, a regular expression that must match the whole name. Top-level names are written without wildcards
so that a block's own layer of the same name (Flux ``single_transformer_blocks.N.proj_out``) is not caught.
Module names were read off the real checkpoints' configs (:func:`hq_diffusion.models.real_linear_shapes`).
"""
from __future__ import annotations

import fnmatch
import re

from torch import nn

from . import families
from .families import CAPTION, PATCH_IN, PATCH_OUT, TIMESTEP  # noqa: F401  (the reasons, re-exported)

#: transformer class name → ((pattern, reason), ...), one entry per registered family's transformer class.
PRESETS: dict[str, tuple[tuple[str, str], ...]] = {
    cls: f.skip for f in families.FAMILIES for cls in f.transformer_classes
}

#: Fallback for other DiTs: the usual diffusers names of the same edges.
GENERIC: tuple[tuple[str, str], ...] = families.GENERIC_SKIP


def _class_name(model: nn.Module | str) -> str:
    return model if isinstance(model, str) else type(model).__name__


def architecture(model: nn.Module | str) -> str:
    """The preset key of ``model`` (a module or its class name), or ``"generic"``."""
    name = _class_name(model)
    return name if name in PRESETS else "generic"


def default_skip(model: nn.Module | str) -> list[tuple[str, str]]:
    """The preset ``(pattern, reason)`` pairs for ``model`` (a module or its class name)."""
    return list(families.skip_rules(_class_name(model)))


def resolve_skip(model: nn.Module | str, skip) -> list[tuple[str, str]]:
    """``skip=None`` → the preset; a list of patterns → exactly those (reason: "skip pattern ...")."""
    if skip is None:
        return default_skip(model)
    return [(p, f"skip pattern {p!r}") for p in skip]


def matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def skip_reason(name: str, rules: list[tuple[str, str]]) -> str | None:
    """The reason of the first rule whose pattern matches module name ``name``, else None."""
    for pattern, reason in rules:
        if matches(pattern, name):
            return reason
    return None
