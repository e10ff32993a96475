"""Frame and file helpers of the evaluators, also used by the app and the benchmarks: the one float -> uint8
frame conversion, the prompt suite, JSON / npz file helpers, library log levels and memory release.

Nothing here loads a model; importing it costs numpy only.
"""

from __future__ import annotations

import gc
import importlib.resources
import json
import os
import sys
from typing import Any

import numpy as np

from .report import _write_bytes_atomic

__all__ = ["EvalInputError", "to_uint8", "default_prompts_file", "read_prompts", "read_json", "write_npz", "warn",
           "quiet_library_logs", "release_memory"]


class EvalInputError(ValueError):
    """Bad input (arguments, files, output directory) or a failure the user must act on.

    ``main`` prints it as one line (``hq-diffusion eval: error: ...``) and exits with status 2."""


# --------------------------------------------------------------------------------------------- frames
def to_uint8(x: np.ndarray) -> np.ndarray:
    """``generate``'s float frames in [0, 1] -> uint8: ``clip(round(x * 255), 0, 255)``.

    The one conversion used for everything the metrics see (and frames.npz stores).

    Args:
        x: float array (F, H, W, 3) (any shape works).
    Returns:
        uint8 array of the same shape.
    Raises:
        ValueError: ``x`` contains NaN / inf (a broken generation: there is nothing to measure).
    """
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if not np.all(np.isfinite(x)):
        raise ValueError(f"generated frames contain {int(np.sum(~np.isfinite(x)))} NaN/inf values")
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- prompts
def default_prompts_file() -> str:
    """Path of the packaged 32-prompt suite (``hq_diffusion/assets/prompts.txt``)."""
    return str(importlib.resources.files("hq_diffusion.assets").joinpath("prompts.txt"))


def shapes_prompts_file() -> str:
    """Path of the packaged held-out captions of the trained tiny model (``hq_diffusion/assets/prompts_shapes.txt``:
    the 16 captions of :func:`hq_diffusion.tiny.data.heldout_captions`, never seen in training)."""
    return str(importlib.resources.files("hq_diffusion.assets").joinpath("prompts_shapes.txt"))


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file: one per line; blank lines and lines starting with ``#`` are ignored.

    Raises:
        EvalInputError: missing / unreadable file, or no prompt in it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EvalInputError(f"prompts file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalInputError(f"cannot read prompts file {path}: {e}") from None
    prompts = [ln.strip() for ln in lines]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise EvalInputError(f"prompts file {path} has no prompts (one per line; blank lines and "
                             f"'#' comments are ignored)")
    return prompts


# --------------------------------------------------------------------------------------------- files
def read_json(path: str) -> Any:
    """Parsed JSON, or None when missing / unreadable (a partial or foreign file counts as absent)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def write_npz(path: str, **arrays: Any) -> None:
    """Write ``arrays`` (name -> numpy array of any shape / dtype) as an uncompressed npz, atomically."""
    _write_bytes_atomic(path, lambda fh: np.savez(fh, **arrays))


def warn(msg: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(f"hq-diffusion eval: {msg}", file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(f"hq-diffusion eval: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------------------- process
def quiet_library_logs() -> None:
    """Command-line entry points only: keep diffusers / transformers to errors (every tiny-pipeline prompt
    triggers a "truncated to max_sequence_length" warning, which would bury the progress bar)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


def release_memory() -> None:
    """Collect a dropped pipeline (call after the last reference to it is gone)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
