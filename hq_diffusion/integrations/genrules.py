"""The one rule set (and wording) for what a user types into a CLI or the app: frames, height/width, steps, and
a ``--model`` directory that holds a pipeline saved quantized by hq-diffusion.

Used by the app's request validation and by every CLI (``hq-diffusion eval``), so that a value refused by one
is refused by the other with the same words. Each check returns the problem as one sentence, or None. The
limits (upper bounds) are the caller's: the app passes its server limits, a CLI passes None for "no upper
bound". Torch-free.
"""
from __future__ import annotations

import json
import os

#: video frame counts are 4k+1 (the tiny and the real VAEs map 4k+1 frames to k+1 latent frames exactly)
FRAMES_STEP = 4
#: height and width are multiples of this many pixels
SIZE_MULTIPLE = 32


def _is_int(v) -> bool:
    """A whole number: an int (not a bool) or an integral float (a JSON client may send 33.0)."""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and v.is_integer())


def frames_problem(frames, frames_max: int | None = None) -> str | None:
    """Frames of a video model must be ``4k+1`` from 1 to ``frames_max`` (None: no upper bound)."""
    if _is_int(frames) and frames >= 1 and (frames - 1) % FRAMES_STEP == 0 and (frames_max is None or
                                                                                  frames <= frames_max):
        return None
    if frames_max is None:
        return f"Frames must be of the form 4k+1 (1, 5, 9, ...); got {frames!r}."
    return f"Frames must be of the form 4k+1 between 1 and {frames_max} (1, 5, 9, ..., {frames_max}); got {frames!r}."


def size_problem(name: str, v, size_min: int = SIZE_MULTIPLE, size_max: int | None = None,
                 multiple: int = SIZE_MULTIPLE) -> str | None:
    """``name`` (``"Height"`` / ``"Width"``) must be a multiple of ``multiple`` from ``size_min`` to ``size_max``."""
    if _is_int(v) and v >= size_min and (size_max is None or v <= size_max) and v % multiple == 0:
        return None
    if size_max is None:
        return f"{name} must be a multiple of {multiple}, at least {size_min} px; got {v!r}."
    return f"{name} must be a multiple of {multiple} from {size_min} to {size_max} px; got {v!r}."


def steps_problem(steps, steps_min: int = 1, steps_max: int | None = None) -> str | None:
    """Steps must be a whole number from ``steps_min`` to ``steps_max``."""
    if _is_int(steps) and steps >= steps_min and (steps_max is None or steps <= steps_max):
        return None
    if steps_max is None:
        return f"Steps must be a whole number, at least {steps_min}; got {steps!r}."
    return f"Steps must be a whole number from {steps_min} to {steps_max}; got {steps!r}."


def quantized_components(model_dir: str) -> list[str]:
    """The components of the pipeline directory ``model_dir`` whose config.json names the ``hq_diffusion``
    quantization (empty for a float pipeline or an unreadable directory)."""
    try:
        with open(os.path.join(model_dir, "model_index.json"), encoding="utf-8") as fh:
            names = [k for k in json.load(fh) if not k.startswith("_")]
    except (OSError, ValueError, AttributeError):
        return []
    found = []
    for name in sorted(names):
        try:
            with open(os.path.join(model_dir, name, "config.json"), encoding="utf-8") as fh:
                qc = json.load(fh).get("quantization_config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(qc, dict) and qc.get("quant_method") == "hq_diffusion":
            found.append(name)
    return found

