"""Batch evaluation, ``hq-diffusion eval``: the unquantized pipeline vs the quantized one over a prompt
suite, same prompt and same seed, at one or more bit rates.

For every (prompt, seed) the reference output is generated once (and cached on disk); for every bit rate a
fresh copy of the pipeline is loaded and quantized (the reference is never quantized in place) and every
(prompt, seed) is generated again with identical seeds.  Metrics per frame: PSNR, SSIM, LPIPS (when its
weights are available), flicker PSNR; LTX-2 also the audio SNR.

The output directory layout and the resume rules are described in :mod:`hq_diffusion.eval.cache`.

Sharding: under ``accelerate launch`` / ``torchrun`` (env ``RANK`` / ``WORLD_SIZE``) prompt ``i`` goes to
rank ``i % WORLD_SIZE``; each rank writes its own items, then rank 0 merges after a barrier.  With
``--no-barrier`` no rank merges; run ``hq-diffusion eval --merge-only --out DIR`` afterwards (it merges
whatever items exist and says which are missing).

Before every quantized generation the pipeline's K/V quantization state (dither step counters, rate
statistics) is reset, so an item's output does not depend on what the same pipeline generated before it:
resumed and sharded runs reproduce a clean run's report exactly.  Image pipelines (PixArt, Flux) give
one-frame videos.  Frames are converted from ``generate``'s float [0, 1] to uint8 by
:func:`hq_diffusion.eval.files.to_uint8` only.

The command line is :mod:`hq_diffusion.eval.cli`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable

import numpy as np

from . import content as C
from . import metrics as M
from . import report as R
from .cache import Item, bps_dir, check_and_write_run, item_dir, item_status, load_ref, ref_path, save_ref
from .config import VIDEO_PIPELINES, EvalConfig
from .files import EvalInputError, read_json, release_memory, to_uint8, warn, write_npz
from .merge import merge

__all__ = ["run_eval", "compute_metrics"]


# --------------------------------------------------------------------------------------------- models
def _torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _device(cfg: EvalConfig) -> str:
    if cfg.device:
        return cfg.device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def _load_pipeline(cfg: EvalConfig):
    """A fresh float pipeline of the reference (``cfg.ref_model``; new modules every call: quantizing it
    never touches another copy)."""
    dtype = _torch_dtype(cfg.dtype)
    if cfg.ref_is_tiny:
        from hq_diffusion.models import tiny_pipeline

        pipe = tiny_pipeline(cfg.ref_model, seed=cfg.model_seed, dtype=dtype)
    else:
        import warnings

        import diffusers

        with warnings.catch_warnings():  # recent diffusers prefer dtype=, which older supported ones lack
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipe = diffusers.DiffusionPipeline.from_pretrained(cfg.ref_model, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(_device(cfg))


def _load_saved_quantized(cfg: EvalConfig):
    """The pipeline saved quantized in ``cfg.model``, as stored (each component in its saved dtype).
    Raises EvalInputError naming the directory and the file at fault."""
    import hq_diffusion
    from hq_diffusion.codec import HQFormatError

    try:
        pipe = hq_diffusion.load_quantized(cfg.model, device=_device(cfg))
    except (HQFormatError, OSError, ValueError) as e:
        raise EvalInputError(f"--model {cfg.model}: cannot load the quantized pipeline: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _peak_memory(device: str) -> dict:
    """Peak memory of this process: CUDA allocations on ``device``, else the CPU resident set (bytes)."""
    import torch

    if device.startswith("cuda"):
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "memory_kind": "cuda allocated"}
    return {"peak_memory_bytes": int(_peak_rss()), "memory_kind": "process max resident set (cpu)"}


def _peak_rss() -> int:
    """This process's peak resident set in bytes: ``VmHWM`` where ``/proc`` has it (Linux; it starts afresh at
    ``exec``), else ``getrusage`` (whose maximum on Linux survives ``exec``: a process launched by a large one
    would report the launcher's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _default_quantize(pipe, **kwargs):
    import hq_diffusion

    return hq_diffusion.quantize(pipe, **kwargs)


def _default_summary(pipe) -> dict:
    import hq_diffusion

    s = hq_diffusion.summary(pipe)
    return {"summary": s.to_dict(), "text": str(s)}


def _generate(pipe, cfg: EvalConfig, prompt: str, seed: int) -> dict:
    """``models.generate`` normalised to ``{"frames": uint8 (F, H, W, 3), "audio": float (C, T) | None,
    "audio_sample_rate": int | None}``."""
    from hq_diffusion.models import generate

    out = generate(pipe, cfg.pipeline, prompt, seed, **cfg.call_overrides)
    if isinstance(out, dict):
        return {"frames": to_uint8(out["frames"]), "audio": out.get("audio"),
                "audio_sample_rate": out.get("audio_sample_rate")}
    return {"frames": to_uint8(out), "audio": None, "audio_sample_rate": None}


# --------------------------------------------------------------------------------------------- metrics
class _Lpips:
    """LPIPS per frame, or the reason it is not computed."""

    def __init__(self, weights: str | None):
        self.metric = M.LPIPSMetric(weights_path=weights)
        if weights and not self.metric.available:
            raise EvalInputError(self.metric.reason)
        self.info = {"available": self.metric.available, "reason": self.metric.reason,
                     "plumbing": self.metric.plumbing, "source": self.metric.source}

    def __call__(self, ref: np.ndarray, quant: np.ndarray) -> tuple[np.ndarray | None, dict]:
        if not self.metric.available:
            return None, self.info
        h, w = ref.shape[1:3]
        need = M.LPIPS_MIN_SIDE[self.metric.net]
        if min(h, w) < need:
            return None, {**self.info, "available": False,
                          "reason": f"frames of {h}x{w} are below the LPIPS {self.metric.net} minimum ({need} px)"}
        return self.metric(ref, quant), self.info


def compute_metrics(ref: np.ndarray, quant: np.ndarray, lpips: _Lpips | None,
                    ref_audio: np.ndarray | None = None, quant_audio: np.ndarray | None = None,
                    prompt: str | None = None) -> dict:
    """Per-frame metrics of one item.

    Args:
        ref, quant: uint8 (F, H, W, 3).
        lpips: LPIPS callable or None (not computed).
        ref_audio, quant_audio: float (C, T) or None.
        prompt: the item's prompt; when it is a caption of the procedural dataset, the content check
            (:mod:`hq_diffusion.eval.content`) scores both outputs against it.
    Returns:
        ``{"per_frame": {"psnr", "ssim", "lpips", "flicker_psnr"}, "means", "audio_snr_db", "lpips_info",
        "content"}`` (``content``: :func:`hq_diffusion.eval.content.check_pair`, None when it does not apply)
    Raises:
        ValueError: mismatched / malformed frames (from the metric layer).
    """
    per_frame = {"psnr": M.psnr_per_frame(ref, quant), "ssim": M.ssim_per_frame(ref, quant)}
    lp, info = lpips(ref, quant) if lpips is not None else (None, {"available": False, "reason": "not requested"})
    per_frame["lpips"] = lp
    per_frame["flicker_psnr"] = M.flicker_psnr(ref, quant)
    audio_snr = None
    if ref_audio is not None and quant_audio is not None:
        audio_snr = M.audio_snr_db(ref_audio, quant_audio)
    per_frame = R.to_jsonable(per_frame)
    return {"per_frame": per_frame, "means": R.prompt_means(per_frame), "audio_snr_db": audio_snr,
            "lpips_info": info, "content": None if prompt is None else C.check_pair(ref, quant, prompt)}


# --------------------------------------------------------------------------------------------- running
def _rank_world() -> tuple[int, int]:
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise EvalInputError(f"RANK / WORLD_SIZE must be integers, got {os.environ.get('RANK')!r} / "
                             f"{os.environ.get('WORLD_SIZE')!r}") from None
    if world < 1 or not (0 <= rank < world):
        raise EvalInputError(f"invalid RANK={rank} / WORLD_SIZE={world}")
    return rank, world


def quant_only_metrics(quant: np.ndarray, prompt: str | None) -> dict:
    """An item's record without a float reference: no per-frame comparison (None), the content check of the
    quantized output alone (``{"ref": None, "quant": ...}``, None when the prompt is no dataset caption)."""
    per_frame = {m: None for m in R.METRICS}
    content = None
    if prompt is not None and C.checkable(prompt):
        content = {"ref": None, "quant": C.check(quant.astype(np.float32) / 255.0, prompt).as_dict()}
    return {"per_frame": per_frame, "means": R.prompt_means(per_frame), "audio_snr_db": None,
            "lpips_info": {"available": False, "reason": "no float reference"}, "content": content}


def _write_item(cfg: EvalConfig, it: Item, ref: dict | None, quant: dict, lpips: _Lpips, fps: float) -> None:
    d = item_dir(cfg.out, it.bps, it.idx, it.seed)
    where = f"prompt {it.idx} (seed {it.seed}) at {R.bps_key(it.bps)} bps"
    if ref is None:  # quant-only run
        try:
            res = quant_only_metrics(quant["frames"], it.prompt)
        except ValueError as e:
            raise EvalInputError(f"{where}: {e}") from None
        write_npz(os.path.join(d, "frames.npz"), quant=quant["frames"])
        R.write_side_by_side_mp4(os.path.join(d, "video.mp4"), quant["frames"], quant["frames"], fps=fps,
                                 audio=quant.get("audio"), audio_sample_rate=quant.get("audio_sample_rate"),
                                 quant_only=True)
        _write_metrics(cfg, it, res, False, quant.get("seconds"))
        return
    try:
        res = compute_metrics(ref["frames"], quant["frames"], lpips, ref.get("audio"), quant.get("audio"),
                              prompt=it.prompt)
    except ValueError as e:
        raise EvalInputError(f"{where}: {e}") from None
    R.write_frames_npz(os.path.join(d, "frames.npz"), ref["frames"], quant["frames"])
    has_audio = ref.get("audio") is not None and quant.get("audio") is not None
    if has_audio:
        write_npz(os.path.join(d, "audio.npz"), ref=np.asarray(ref["audio"], np.float32),
                  quant=np.asarray(quant["audio"], np.float32),
                  sample_rate=np.array(int(quant["audio_sample_rate"])))
    # The mp4 carries the quantized pipeline's audio (the track under test).
    R.write_side_by_side_mp4(os.path.join(d, "video.mp4"), ref["frames"], quant["frames"], fps=fps,
                             audio=quant.get("audio"), audio_sample_rate=quant.get("audio_sample_rate"))
    _write_metrics(cfg, it, res, has_audio, quant.get("seconds"))


def _write_metrics(cfg: EvalConfig, it: Item, res: dict, has_audio: bool, seconds: float | None = None) -> None:
    d = item_dir(cfg.out, it.bps, it.idx, it.seed)
    rel = lambda name: os.path.relpath(os.path.join(d, name), cfg.out).replace(os.sep, "/")  # noqa: E731
    entry = {
        "prompt": it.prompt, "index": it.idx, "seed": it.seed, "bps": float(it.bps),
        "per_frame": res["per_frame"], "means": res["means"], "audio_snr_db": res["audio_snr_db"],
        "video": rel("video.mp4"), "frames": rel("frames.npz"),
        "audio": rel("audio.npz") if has_audio else None,
        "lpips": res["lpips_info"], "fingerprint": cfg.quant_fingerprint(it.bps),
        "content": res.get("content"), "seconds": seconds,
    }
    R.write_json_atomic(os.path.join(d, "metrics.json"), entry)


def _recompute_metrics(cfg: EvalConfig, it: Item, lpips: _Lpips) -> None:
    """Metrics only, from the stored frames (e.g. LPIPS weights became available)."""
    d = item_dir(cfg.out, it.bps, it.idx, it.seed)
    old = read_json(os.path.join(d, "metrics.json")) or {}
    with np.load(os.path.join(d, "frames.npz")) as z:
        ref, quant = (z["ref"] if "ref" in z.files else None), z["quant"]
    if ref is None:
        _write_metrics(cfg, it, quant_only_metrics(quant, it.prompt), False, old.get("seconds"))
        return
    ra = qa = rate = None
    has_audio = os.path.isfile(os.path.join(d, "audio.npz"))
    if has_audio:
        with np.load(os.path.join(d, "audio.npz")) as z:
            ra, qa, rate = z["ref"], z["quant"], int(z["sample_rate"])
    try:
        res = compute_metrics(ref, quant, lpips, ra, qa, prompt=it.prompt)
    except ValueError as e:
        raise EvalInputError(f"prompt {it.idx} (seed {it.seed}) at {R.bps_key(it.bps)} bps: {e}") from None
    if not os.path.isfile(os.path.join(d, "video.mp4")):
        R.write_side_by_side_mp4(os.path.join(d, "video.mp4"), ref, quant, fps=_fps(cfg), audio=qa,
                                 audio_sample_rate=rate)
    _write_metrics(cfg, it, res, has_audio, old.get("seconds"))


def _fps(cfg: EvalConfig) -> float:
    if cfg.pipeline not in VIDEO_PIPELINES:
        return 1.0
    return float(cfg.call_kwargs().get("frame_rate") or 8)


def _checked_generate(generate_fn: Callable, pipe, cfg: EvalConfig, idx: int, seed: int, bps: float) -> dict:
    from hq_diffusion.integrations.kv_processors import reset_kv_state

    # each generation of the quantized pipeline is the same whatever ran before it: resumed and sharded
    # runs reproduce a clean run exactly, and summary.json measures one generation
    reset_kv_state(pipe)
    try:
        t0 = time.perf_counter()
        out = generate_fn(pipe, cfg, cfg.prompts[idx], seed)
        return {**out, "seconds": time.perf_counter() - t0}
    except ValueError as e:
        raise EvalInputError(f"quantized generation of prompt {idx} (seed {seed}) at {R.bps_key(bps)} bps: "
                             f"{e}") from None


def _write_summary(cfg: EvalConfig, bps: float, summary: dict, seconds: float | None) -> None:
    run = {"generate_seconds": seconds, **_peak_memory(_device(cfg))}
    R.write_json_atomic(os.path.join(bps_dir(cfg.out, bps), "summary.json"),
                        {"fingerprint": cfg.quant_fingerprint(bps), "bps": float(bps),
                         "measured_on": {"prompt_index": 0, "seed": cfg.seeds[0]}, "run": run, **summary})


class _Stop(Exception):
    """--max-items reached."""


def run_eval(cfg: EvalConfig, *, quantize_fn: Callable | None = None, summary_fn: Callable | None = None,
             generate_fn: Callable | None = None, rank: int | None = None, world_size: int | None = None,
             barrier: bool = True, max_items: int | None = None, progress: bool = True) -> dict | None:
    """Run (or resume) the evaluation of ``cfg``; return the merged report dict, or None on ranks that do
    not merge (rank > 0, ``barrier=False`` with several ranks, or when ``max_items`` stopped the run).

    Args:
        quantize_fn: ``f(pipe, bps=..., **cfg.quantize, progress=...) -> pipe``; default
            ``hq_diffusion.quantize``.
        summary_fn: ``f(pipe) -> {"summary": dict, "text": str}``; default from ``hq_diffusion.summary``.
        generate_fn: ``f(pipe, cfg, prompt, seed) -> {"frames" uint8, "audio", "audio_sample_rate"}``;
            default ``models.generate`` + :func:`to_uint8`.
        rank, world_size: shard of this process (default: env ``RANK`` / ``WORLD_SIZE``).
        barrier: with several ranks, wait for all and merge on rank 0.
        max_items: stop after generating this many quantized items (debugging; no merge).
        progress: show a tqdm progress bar on stderr.
    """
    if quantize_fn is not None:
        cfg = dataclasses.replace(cfg, quantizer=f"{quantize_fn.__module__}.{quantize_fn.__qualname__}")
    quantize_fn = quantize_fn or _default_quantize
    summary_fn = summary_fn or _default_summary
    generate_fn = generate_fn or _generate
    if rank is None or world_size is None:
        rank, world_size = _rank_world()
    check_and_write_run(cfg, rank)
    lpips = _Lpips(cfg.lpips_weights)

    mine = [i for i in range(len(cfg.prompts)) if i % world_size == rank]
    items = [Item(i, cfg.prompts[i], s, b) for b in cfg.bps_list for i in mine for s in cfg.seeds]
    for it in items:
        it.state = item_status(cfg, it, lpips.info["source"])
    todo = [it for it in items if it.state == "todo"]
    stale_summary = [b for b in cfg.bps_list
                     if (read_json(os.path.join(bps_dir(cfg.out, b), "summary.json")) or {}).get("fingerprint")
                     != cfg.quant_fingerprint(b)]
    gen_meta = {"fingerprint": cfg.gen_fingerprint()}
    refs_needed = sorted({(it.idx, it.seed) for it in todo})
    refs_missing = [] if cfg.ref_model is None else [(i, s) for i, s in refs_needed
                                                      if load_ref(ref_path(cfg.out, i, s), {**gen_meta, "prompt": cfg.prompts[i]}) is None]

    from tqdm import tqdm

    total = len(refs_missing) + len(todo) + sum(it.state == "metrics" for it in items)
    desc = "eval" + (f" [rank {rank}/{world_size}]" if world_size > 1 else "")
    bar = tqdm(total=total, desc=desc, unit="item", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    done_new = 0
    fps = _fps(cfg)
    try:
        # 1. references (one pipeline, unquantized)
        if refs_missing:
            bar.set_postfix_str(f"reference {cfg.dtype}")
            pipe = _load_pipeline(cfg)
            for i, s in refs_missing:
                try:
                    out = generate_fn(pipe, cfg, cfg.prompts[i], s)
                except ValueError as e:
                    raise EvalInputError(f"reference generation of prompt {i} (seed {s}): {e}") from None
                save_ref(ref_path(cfg.out, i, s), {**gen_meta, "prompt": cfg.prompts[i]}, out["frames"],
                         out.get("audio"), out.get("audio_sample_rate"))
                bar.update(1)
            pipe = None
            release_memory()
        # 2. per bps: a fresh pipeline, quantized, then every pending item.  Rank 0 also writes
        #    summary.json, taken right after generating (prompt 0, first seed): K/V rates are measured
        #    during forward passes, so the summary always covers the same, single generation.
        for b in cfg.bps_list:
            pending = [it for it in todo if it.bps == b]
            need_summary = rank == 0 and b in stale_summary
            if not pending and not need_summary:
                continue
            bar.set_postfix_str(f"quantizing {R.bps_key(b)} bps")
            if cfg.quantized is not None:
                pipe = _load_saved_quantized(cfg)
            else:
                pipe = _load_pipeline(cfg)
                pipe = quantize_fn(pipe, bps=float(b), **cfg.quantize, progress=False) or pipe
            bar.set_postfix_str(f"{R.bps_key(b)} bps")
            first = (0, cfg.seeds[0])
            if need_summary and not (pending and (pending[0].idx, pending[0].seed) == first):
                out = _checked_generate(generate_fn, pipe, cfg, *first, b)  # measurement only
                _write_summary(cfg, b, summary_fn(pipe), out["seconds"])
                need_summary = False
            for it in pending:
                if max_items is not None and done_new >= max_items:
                    raise _Stop
                ref = None if cfg.ref_model is None else load_ref(ref_path(cfg.out, it.idx, it.seed),
                                                                  {**gen_meta, "prompt": it.prompt})
                if ref is None and cfg.ref_model is not None:
                    raise EvalInputError(f"reference output of prompt {it.idx} (seed {it.seed}) vanished from "
                                         f"{cfg.out}/ref during the run")
                quant = _checked_generate(generate_fn, pipe, cfg, it.idx, it.seed, b)
                if need_summary:
                    _write_summary(cfg, b, summary_fn(pipe), quant["seconds"])
                    need_summary = False
                _write_item(cfg, it, ref, quant, lpips, fps)
                done_new += 1
                bar.update(1)
            pipe = None
            release_memory()
        # 3. metrics-only items
        for it in items:
            if it.state == "metrics":
                _recompute_metrics(cfg, it, lpips)
                bar.update(1)
    except _Stop:
        warn(f"stopped after {max_items} new items (--max-items); rerun without it to finish")
        return None
    finally:
        bar.close()

    if world_size > 1:
        if not barrier:
            return None
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        if rank != 0:
            return None
    return merge(cfg.out)
