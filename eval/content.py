"""The content check: does a generated clip show what its prompt asks for? (No reference video, no PSNR.)

For prompts of the procedural dataset (:mod:`hq_diffusion.tiny.data`: ``"a small red square moving left on a
black background"``) the check finds the object and its motion in the frames alone:

1. the background colour is the per-channel median of the frame borders (all frames);
2. the object is every pixel farther than ``threshold`` (RGB distance, frames in ``[0, 1]``) from it;
3. its colour is the dataset colour nearest to the mean colour of those pixels;
4. its motion is the least-squares slope of the per-frame centroid (frames where at least ``min_pixels``
   pixels were found); a displacement over the clip below ``min_travel`` of the frame side is "still",
   otherwise the direction is the dominant axis and its sign.

The clip agrees on colour and on direction when they equal the prompt's; its agreement score is the mean of
the two (0, 0.5 or 1).

Public API: :func:`check` -> :class:`ContentResult`; :func:`checkable` says whether a prompt can be checked.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hq_diffusion.tiny.data import COLOURS, DIRECTIONS, CaptionError, parse_caption

__all__ = ["ContentResult", "check", "checkable", "check_pair", "summarize", "vae_agreement", "ContentError"]


class ContentError(ValueError):
    """Frames the content check cannot read (wrong shape, non-finite values)."""


@dataclass(frozen=True)
class ContentResult:
    """What the check found in one clip and how it compares with the prompt.

    Attributes:
        colour / direction: what was found (``None``: no object found / no motion found, ``"still"``: the
            object moved less than ``min_travel``).
        expected_colour / expected_direction: what the prompt asks for.
        colour_ok / direction_ok: equality of the two.
        agreement: ``(colour_ok + direction_ok) / 2``.
        found_frames: frames in which the object was found.
        displacement: ``(dx, dy)`` of the centroid over the clip, in frame sides (x right, y down).
    """

    colour: str | None
    direction: str | None
    expected_colour: str
    expected_direction: str
    colour_ok: bool
    direction_ok: bool
    agreement: float
    found_frames: int
    displacement: tuple[float, float]

    def as_dict(self) -> dict:
        return asdict(self)


def checkable(prompt: str) -> bool:
    """Whether ``prompt`` is a sentence of the procedural dataset (so :func:`check` applies)."""
    try:
        parse_caption(prompt)
    except CaptionError:
        return False
    return True


def _frames(frames) -> np.ndarray:
    arr = np.asarray(frames, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[1] < 4 or arr.shape[2] < 4:
        raise ContentError(f"content check: frames must be (F, H, W, 3) with H, W >= 4, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ContentError("content check: frames contain non-finite values")
    return arr


def check(frames, prompt: str, threshold: float = 0.25, min_pixels: int = 3, min_travel: float = 0.15
          ) -> ContentResult:
    """Score one clip against its prompt.

    Args:
        frames: float array ``(F, H, W, 3)`` in ``[0, 1]`` (a single image ``(H, W, 3)`` is one frame).
        prompt: a dataset caption (:func:`checkable`).
        threshold: RGB distance from the background above which a pixel belongs to the object.
        min_pixels: object pixels a frame needs for its centroid to count.
        min_travel: displacement over the clip, in frame sides, below which the object is "still".

    Raises:
        hq_diffusion.tiny.data.CaptionError: ``prompt`` is not a dataset caption.
        ContentError: malformed frames.
    """
    want = parse_caption(prompt)
    arr = _frames(frames)
    f, h, w, _ = arr.shape
    border = np.concatenate([arr[:, 0], arr[:, -1], arr[:, :, 0], arr[:, :, -1]], axis=1).reshape(-1, 3)
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(arr - bg, axis=-1)
    mask = dist > threshold
    counts = mask.sum(axis=(1, 2))
    colour = direction = None
    disp = (0.0, 0.0)
    if mask.any():
        mean = arr[mask].mean(axis=0)
        colour = min(COLOURS, key=lambda c: float(np.linalg.norm(mean - np.asarray(COLOURS[c]))))
    good = np.nonzero(counts >= min_pixels)[0]
    if len(good) >= max(2, f // 2):
        yy, xx = np.mgrid[0:h, 0:w]
        cx = np.array([(xx * mask[i]).sum() / counts[i] for i in good])
        cy = np.array([(yy * mask[i]).sum() / counts[i] for i in good])
        span = f - 1
        dx = float(np.polyfit(good, cx, 1)[0] * span / w)
        dy = float(np.polyfit(good, cy, 1)[0] * span / h)
        disp = (dx, dy)
        if max(abs(dx), abs(dy)) < min_travel:
            direction = "still"
        else:
            unit = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
            direction = next(d for d, v in DIRECTIONS.items() if v == unit)
    colour_ok, direction_ok = colour == want.colour, direction == want.direction
    return ContentResult(colour, direction, want.colour, want.direction, colour_ok, direction_ok,
                         (colour_ok + direction_ok) / 2.0, int(len(good)), disp)


def check_pair(ref, quant, prompt: str) -> dict | None:
    """The eval runner's per-item record: ``{"ref": ..., "quant": ...}`` (each :meth:`ContentResult.as_dict`)
    for uint8 or float frames ``(F, H, W, 3)`` of the reference and the quantized pipeline, or ``None`` when
    ``prompt`` is not a dataset caption (the check does not apply)."""
    if not checkable(prompt):
        return None
    out = {}
    for name, frames in (("ref", ref), ("quant", quant)):
        arr = np.asarray(frames)
        arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr
        out[name] = check(arr, prompt).as_dict()
    return out


def summarize(entries: list[dict]) -> dict:
    """Suite-level content agreement per bps from the report's per-prompt entries (their ``"content"``).

    Returns:
        ``{bps_key: {"n", "ref", "quant", "ref_both", "quant_both", "quant_colour", "quant_direction"}}``:
        ``ref`` / ``quant`` the mean agreement in ``[0, 1]`` (reference and quantized pipelines; ``ref`` and
        ``ref_both`` None in a run without a float reference, whose records carry ``"ref": None``), ``*_both``
        the fraction of clips right on colour and direction, ``quant_colour`` / ``quant_direction`` the
        fraction right on each; only entries that carry a content record count (``n``). Bps with none are
        left out.
    """
    from .report import bps_key

    groups: dict[str, list[dict]] = {}
    for e in entries:
        c = e.get("content")
        if c:
            groups.setdefault(bps_key(e.get("bps")), []).append(c)
    out = {}
    for k, cs in groups.items():
        def mean(side, key):
            vals = [float(c[side][key]) for c in cs if c.get(side)]
            return float(np.mean(vals)) if vals else None
        refs = [c["ref"] for c in cs if c.get("ref")]  # none in a run without a float reference
        out[k] = {"n": len(cs), "ref": mean("ref", "agreement"), "quant": mean("quant", "agreement"),
                  "ref_both": float(np.mean([r["colour_ok"] and r["direction_ok"] for r in refs])) if refs else None,
                  "quant_both": float(np.mean([c["quant"]["colour_ok"] and c["quant"]["direction_ok"] for c in cs])),
                  "quant_colour": mean("quant", "colour_ok"), "quant_direction": mean("quant", "direction_ok")}
    return out


def vae_agreement(vae, size: int = 32, frames: int = 9, seed: int = 5) -> tuple[float, float]:
    """Upper bound of what a pipeline with this VAE can reach: the content agreement of the VAE's own
    reconstructions (encode, posterior mean, decode) of one clip per held-out caption.

    Args:
        vae: an ``AutoencoderKLLTXVideo`` (float32, eval mode).
    Returns:
        ``(ground-truth agreement, reconstruction agreement)`` over the 16 held-out captions.
    """
    import torch

    from hq_diffusion.tiny.data import heldout_captions, render_clip

    rng = np.random.default_rng(seed)
    truth, recon = [], []
    with torch.no_grad():
        for cap in heldout_captions():
            clip, _ = render_clip(cap, rng, frames, size)
            x = torch.from_numpy(clip[None]).permute(0, 4, 1, 2, 3).mul(2.0).sub(1.0)
            out = vae.decode(vae.encode(x).latent_dist.mode(), return_dict=False)[0]
            rec = ((out[0].permute(1, 2, 3, 0).float().numpy() + 1.0) / 2.0).clip(0.0, 1.0)
            truth.append(check(clip, str(cap)).agreement)
            recon.append(check(rec, str(cap)).agreement)
    return float(np.mean(truth)), float(np.mean(recon))


def main(argv: list[str] | None = None) -> int:
    """``python -m hq_diffusion.eval.content VAE_DIR``: print :func:`vae_agreement` of a saved VAE."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m hq_diffusion.eval.content",
                                description="content agreement of a VAE's reconstructions of held-out clips")
    p.add_argument("vae", help="directory of a saved AutoencoderKLLTXVideo (e.g. a pipeline's vae/)")
    args = p.parse_args(argv)
    from diffusers import AutoencoderKLLTXVideo

    gt, rec = vae_agreement(AutoencoderKLLTXVideo.from_pretrained(args.vae, local_files_only=True).eval())
    print(f"held-out clips: ground truth {100 * gt:.1f}% agreement, VAE reconstructions {100 * rec:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
