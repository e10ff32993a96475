"""A procedural video dataset for the trained tiny LTX model: coloured shapes moving over plain backgrounds.

Every clip is drawn in code from a seed (nothing is stored): one object (a square or a circle, small or large,
red / green / blue / yellow) moves in a straight line (left / right / up / down) over a plain black or gray
background, and its caption says so: ``"a small red square moving left on a black background"``.

The 4 colours x 4 directions x 2 shapes x 2 sizes x 2 backgrounds = 128 captions are split once, by a fixed
rule, into 112 training captions and 16 held-out ones: for every (colour, direction) pair exactly one of its
8 (shape, size, background) combinations is held out, so each held-out caption combines words that all
appear in training, but never together.

Public API
----------
- :data:`COLOURS`, :data:`DIRECTIONS`, :data:`SHAPES`, :data:`SIZES`, :data:`BACKGROUNDS` -- the vocabulary
  (name -> RGB in ``[0, 1]`` for colours and backgrounds; name -> unit motion ``(dx, dy)`` for directions).
- :class:`Caption` -- one caption's attributes; ``str(caption)`` is its text; :func:`parse_caption` inverts it.
- :func:`all_captions`, :func:`train_captions`, :func:`heldout_captions` -- the split.
- :func:`render_clip` -- one clip ``(F, H, W, 3)`` float32 in ``[0, 1]`` and its object mask ``(F, H, W)``.
- :func:`sample_batch` -- a seeded batch of training clips and captions.
- :data:`EXTRA_WORDS` -- the caption words the tiny tokenizer needs on top of its default vocabulary.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = ["COLOURS", "DIRECTIONS", "SHAPES", "SIZES", "BACKGROUNDS", "EXTRA_WORDS", "Caption", "parse_caption",
           "all_captions", "train_captions", "heldout_captions", "render_clip", "sample_batch", "CaptionError"]

#: Object colours, RGB in [0, 1]: saturated hues far from each other and from the backgrounds.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.12), "green": (0.15, 0.80, 0.20), "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
#: Direction -> unit motion (dx, dy) in image coordinates (x to the right, y downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SHAPES: tuple[str, ...] = ("square", "circle")
#: Size -> object diameter as a fraction of the frame side.
SIZES: dict[str, float] = {"small": 0.22, "large": 0.32}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {"black": (0.04, 0.04, 0.05), "gray": (0.38, 0.38, 0.40)}
#: Caption words missing from the tiny tokenizer's default vocabulary (hq_diffusion.tiny.text).
EXTRA_WORDS: tuple[str, ...] = ("square", "circle", "moving", "left", "right", "down", "gray", "background")

#: Distance travelled over a clip, as a fraction of the frame side.
TRAVEL = 0.45


class CaptionError(ValueError):
    """A caption that is not one of this dataset's sentences."""


@dataclass(frozen=True, order=True)
class Caption:
    """One caption's attributes (each a key of the matching vocabulary table)."""

    size: str
    colour: str
    shape: str
    direction: str
    background: str

    def __post_init__(self):
        for value, table, what in ((self.size, SIZES, "size"), (self.colour, COLOURS, "colour"),
                                   (self.shape, SHAPES, "shape"), (self.direction, DIRECTIONS, "direction"),
                                   (self.background, BACKGROUNDS, "background")):
            if value not in table:
                raise CaptionError(f"unknown {what} {value!r}; valid: {', '.join(table)}")

    def __str__(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} moving {self.direction} on a {self.background} background"


_PATTERN = re.compile(r"^a (\w+) (\w+) (\w+) moving (\w+) on a (\w+) background$")


def parse_caption(text: str) -> Caption:
    """The :class:`Caption` of ``text`` (whitespace and case are normalised).

    Raises:
        CaptionError: ``text`` is not a sentence of this dataset (named in the message).
    """
    norm = " ".join(str(text).lower().split()).rstrip(".")
    m = _PATTERN.match(norm)
    if m is None:
        raise CaptionError(f"not a caption of the procedural dataset: {text!r} (expected e.g. "
                           f"{str(all_captions()[0])!r})")
    size, colour, shape, direction, background = m.groups()
    return Caption(size, colour, shape, direction, background)


def all_captions() -> list[Caption]:
    """All 128 captions, sorted."""
    return sorted(Caption(z, c, s, d, b) for z in SIZES for c in COLOURS for s in SHAPES for d in DIRECTIONS
                  for b in BACKGROUNDS)


def _heldout(c: Caption) -> bool:
    ci, di = list(COLOURS).index(c.colour), list(DIRECTIONS).index(c.direction)
    si, zi, bi = SHAPES.index(c.shape), list(SIZES).index(c.size), list(BACKGROUNDS).index(c.background)
    return si * 4 + zi * 2 + bi == (ci * 4 + di * 3) % 8


def train_captions() -> list[Caption]:
    """The 112 training captions (every (colour, direction) pair with 7 of its 8 other combinations)."""
    return [c for c in all_captions() if not _heldout(c)]


def heldout_captions() -> list[Caption]:
    """The 16 held-out captions (one per (colour, direction) pair), never used in training."""
    return [c for c in all_captions() if _heldout(c)]


def render_clip(caption: Caption | str, rng: np.random.Generator, frames: int = 9, size: int = 64
                ) -> tuple[np.ndarray, np.ndarray]:
    """Draw one clip of ``caption`` (start position drawn from ``rng``).

    The object is anti-aliased (coverage from the signed distance to its edge) and moves
    ``TRAVEL * size`` pixels in a straight line over the clip, fully inside the frame throughout.

    Args:
        caption: a :class:`Caption` or its text.
        rng: the random generator drawing the start position.
        frames: number of frames ``F`` (>= 2).
        size: frame side ``H == W`` in pixels (>= 16).

    Returns:
        ``(clip, mask)``: clip float32 ``(F, H, W, 3)`` in ``[0, 1]``; mask float32 ``(F, H, W)`` in
        ``[0, 1]``, the object's coverage of each pixel.
    """
    if isinstance(caption, str):
        caption = parse_caption(caption)
    if frames < 2 or size < 16:
        raise ValueError(f"render_clip needs frames >= 2 and size >= 16, got frames={frames}, size={size}")
    radius = SIZES[caption.size] * size / 2
    dx, dy = DIRECTIONS[caption.direction]
    travel = TRAVEL * size
    lo, hi = radius + 1.0, size - radius - 1.0
    # Along the motion the whole travel must fit; across it any position inside the frame.
    along_lo, along_hi = lo + travel / 2, hi - travel / 2
    c_along = rng.uniform(along_lo, along_hi)
    c_across = rng.uniform(lo, hi)
    t = np.linspace(-0.5, 0.5, frames) * travel
    if dx != 0:
        cx, cy = c_along + dx * t, np.full(frames, c_across)
    else:
        cx, cy = np.full(frames, c_across), c_along + dy * t
    yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    ddx = xx[None] - cx[:, None, None]
    ddy = yy[None] - cy[:, None, None]
    if caption.shape == "circle":
        dist = np.sqrt(ddx ** 2 + ddy ** 2) - radius
    else:
        dist = np.maximum(np.abs(ddx), np.abs(ddy)) - radius
    mask = np.clip(0.5 - dist, 0.0, 1.0).astype(np.float32)
    bg = np.asarray(BACKGROUNDS[caption.background], np.float32)
    fg = np.asarray(COLOURS[caption.colour], np.float32)
    clip = bg + mask[..., None] * (fg - bg)
    return clip.astype(np.float32), mask


def sample_batch(rng: np.random.Generator, batch: int, frames: int = 9, size: int = 64,
                 captions: list[Caption] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A batch of clips with captions drawn uniformly from ``captions`` (default: :func:`train_captions`).

    Returns:
        ``(clips, masks, texts)``: clips float32 ``(B, F, H, W, 3)`` in ``[0, 1]``, masks float32
        ``(B, F, H, W)``, texts the ``B`` caption strings.
    """
    pool = train_captions() if captions is None else list(captions)
    picks = rng.integers(0, len(pool), size=batch)
    clips, masks, texts = [], [], []
    for i in picks:
        clip, mask = render_clip(pool[int(i)], rng, frames, size)
        clips.append(clip)
        masks.append(mask)
        texts.append(str(pool[int(i)]))
    return np.stack(clips), np.stack(masks), texts
