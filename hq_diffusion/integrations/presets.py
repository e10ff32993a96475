"""Default skip patterns per DiT architecture: the small, sensitive edges kept in their original dtype.

DESIGN §4: quantize every ``nn.Linear`` inside the transformer blocks — the per-block adaLN modulation
layers included (in FLUX.1 they hold about a quarter of the linear weights) — and keep the top-level patch
embedding in/out projections, the timestep / adaLN embedders and the caption projection. The architecture is detected from the
transformer's class name (:data:`PRESETS`); unknown classes get :data:`GENERIC`.

A pattern is a glob over the full module name (``fnmatch``; ``*`` also crosses dots) or, with the prefix
``"re:"``, a regular expression that must match the whole name. Top-level names are written without wildcards
so that a block's own layer of the same name (Flux ``single_transformer_blocks.N.proj_out``) is not caught.
Module names were read off the real checkpoints' configs (:func:`hq_diffusion.models.real_linear_shapes`).
"""
from __future__ import annotations

import fnmatch
import re

from torch import nn

# reasons
PATCH_IN = "patch embedding (input projection)"
PATCH_OUT = "output projection (to latent patches)"
TIMESTEP = "timestep / adaLN embedder"
CAPTION = "caption / context projection"

_LTX = (
    ("proj_in", PATCH_IN),
    ("proj_out", PATCH_OUT),
    ("time_embed.*", TIMESTEP),
    ("caption_projection.*", CAPTION),
)

#: transformer class name → ((pattern, reason), ...)
PRESETS: dict[str, tuple[tuple[str, str], ...]] = {
    "LTXVideoTransformer3DModel": _LTX,
    "LTX2VideoTransformer3DModel": _LTX + (
        ("audio_proj_in", PATCH_IN),
        ("audio_proj_out", PATCH_OUT),
        ("audio_time_embed.*", TIMESTEP),
        ("audio_caption_projection.*", CAPTION),
        ("av_cross_attn_*", TIMESTEP),  # a/v cross-attention scale/shift/gate timestep embedders
    ),
    "PixArtTransformer2DModel": (
        ("pos_embed.*", PATCH_IN),
        ("proj_out", PATCH_OUT),
        ("adaln_single.*", TIMESTEP),
        ("caption_projection.*", CAPTION),
    ),
    "FluxTransformer2DModel": (
        ("x_embedder", PATCH_IN),
        ("proj_out", PATCH_OUT),
        ("time_text_embed.*", TIMESTEP),
        ("norm_out.*", TIMESTEP),
        ("context_embedder", CAPTION),
    ),
}

#: Fallback for other DiTs (SD3, Sana, Wan, ...): the usual diffusers names of the same edges.
GENERIC: tuple[tuple[str, str], ...] = (
    ("proj_in", PATCH_IN), ("x_embedder", PATCH_IN), ("patch_embed*", PATCH_IN), ("pos_embed*", PATCH_IN),
    ("patch_embedding*", PATCH_IN),
    ("proj_out", PATCH_OUT), ("norm_out.*", TIMESTEP),
    ("time_embed*", TIMESTEP), ("time_text_embed.*", TIMESTEP), ("adaln_single.*", TIMESTEP),
    ("condition_embedder.time*", TIMESTEP), ("time_proj*", TIMESTEP),
    ("caption_projection.*", CAPTION), ("context_embedder", CAPTION), ("condition_embedder.text*", CAPTION),
)


def _class_name(model: nn.Module | str) -> str:
    return model if isinstance(model, str) else type(model).__name__


def architecture(model: nn.Module | str) -> str:
    """The preset key of ``model`` (a module or its class name), or ``"generic"``."""
    name = _class_name(model)
    return name if name in PRESETS else "generic"


def default_skip(model: nn.Module | str) -> list[tuple[str, str]]:
    """The preset ``(pattern, reason)`` pairs for ``model`` (a module or its class name)."""
    return list(PRESETS.get(_class_name(model), GENERIC))


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
