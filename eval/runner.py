"""Batch evaluation, ``hq-diffusion eval``: the unquantized pipeline vs the quantized one over a prompt
suite, same prompt and same seed, at one or more bit rates.

For every (prompt, seed) the reference output is generated once (and cached on disk); for every bit rate a
fresh copy of the pipeline is loaded and quantized (the reference is never quantized in place) and every
(prompt, seed) is generated again with identical seeds.  Metrics per frame: PSNR, SSIM, LPIPS (when its
weights are available), flicker PSNR; LTX-2 also the audio SNR.

Output directory layout (``--out DIR``)
---------------------------------------
::

    DIR/run.json                          configuration of the run (item set + what the outputs depend on)
    DIR/ref/p0003-s0.npz                  cached reference output of prompt 3, seed 0: ``frames`` uint8
                                          (F, H, W, 3) [+ ``audio`` float32 (C, T), ``audio_sample_rate``]
    DIR/items/<bps>/summary.json          hq_diffusion.summary(pipe).to_dict() at <bps>, taken right after
                                          generating prompt 0 with the first seed (K/V rates are measured)
    DIR/items/<bps>/p0003-s0/frames.npz   uint8 ``ref`` and ``quant`` (F, H, W, 3): what the metrics used
    DIR/items/<bps>/p0003-s0/video.mp4    reference | quantized | amplified error map (LTX-2: + audio)
    DIR/items/<bps>/p0003-s0/audio.npz    LTX-2 only: float32 ``ref`` / ``quant`` (C, T), ``sample_rate``
    DIR/items/<bps>/p0003-s0/metrics.json per-frame metrics; written last: its presence marks the item done
    DIR/report.json, report.csv, report.html

``<bps>`` is ``report.bps_key(bps)`` ("4", "2.5").  Every file is written atomically, so an interrupted
run continues where it stopped, and re-running a complete run generates nothing.  Each cached file records
a fingerprint of what it depends on (model, dtype, generation settings, quantization options, prompt); a
file whose fingerprint does not match is redone.  A DIR that holds a run with different settings is
refused rather than mixed.

Sharding: under ``accelerate launch`` / ``torchrun`` (env ``RANK`` / ``WORLD_SIZE``) prompt ``i`` goes to
rank ``i % WORLD_SIZE``; each rank writes its own items, then rank 0 merges after a barrier.  With
``--no-barrier`` no rank merges; run ``hq-diffusion eval --merge-only --out DIR`` afterwards (it merges
whatever items exist and says which are missing).

Before every quantized generation the pipeline's K/V quantization state (dither step counters, rate
statistics) is reset, so an item's output does not depend on what the same pipeline generated before it:
resumed and sharded runs reproduce a clean run's report exactly.  Image pipelines (PixArt, Flux) give
one-frame videos.  Frames are converted from ``generate``'s float [0, 1] to uint8 by :func:`to_uint8` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib.resources
import inspect
import json
import math
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import metrics as M
from . import report as R

__all__ = [
    "EvalConfig",
    "EvalInputError",
    "MODEL_ALIASES",
    "to_uint8",
    "read_prompts",
    "default_prompts_file",
    "build_config",
    "run_eval",
    "merge",
    "build_parser",
    "quiet_library_logs",
    "main",
]

#: ``--model`` names of the embedded tiny pipelines -> ``hq_diffusion.models`` pipeline names.
MODEL_ALIASES = {"tiny-ltx": "ltx", "tiny-ltx2": "ltx2", "tiny-pixart": "pixart", "tiny-flux": "flux"}

#: diffusers pipeline classes a ``--model PATH`` may hold -> ``hq_diffusion.models`` pipeline names.
PIPELINE_CLASSES = {
    "LTXPipeline": "ltx",
    "LTX2Pipeline": "ltx2",
    "PixArtSigmaPipeline": "pixart",
    "PixArtAlphaPipeline": "pixart",
    "FluxPipeline": "flux",
}

VIDEO_PIPELINES = ("ltx", "ltx2")
DTYPES = ("bfloat16", "float16", "float32")

# Keys of models.DEFAULT_CALL_KWARGS that are tuned for the tiny pipelines; for a pipeline loaded from a
# PATH they are reset to the pipeline's own __call__ defaults (unless given on the command line).
_TINY_TUNED_KEYS = (
    "num_inference_steps", "height", "width", "num_frames", "frame_rate", "guidance_scale",
    "audio_guidance_scale", "stg_scale", "audio_stg_scale", "modality_scale", "audio_modality_scale",
    "spatio_temporal_guidance_blocks", "max_sequence_length", "use_resolution_binning",
)

_RUN_FILE = "run.json"
_RUN_FORMAT = 1


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


# --------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EvalConfig:
    """A validated evaluation run (build it with :func:`build_config`).

    Args:
        model: ``tiny-ltx`` / ``tiny-ltx2`` / ``tiny-pixart`` / ``tiny-flux`` or a diffusers pipeline dir.
        pipeline: ``hq_diffusion.models`` pipeline name (``ltx``, ``ltx2``, ``pixart``, ``flux``).
        prompts: the prompts evaluated (after ``--num-prompts``).
        seeds: generation seeds; each prompt is run with each seed.
        bps_list: weight bit rates, in sweep order.
        quantize: keyword arguments of ``hq_diffusion.quantize`` other than ``bps``.
        call_overrides: ``generate`` overrides (on top of ``models.DEFAULT_CALL_KWARGS[pipeline]``).
        dtype: dtype of both the reference and the pipeline that is quantized.
        model_seed: seed of the tiny pipelines' random initialisation (ignored for a PATH).
        lpips_weights: optional full LPIPS state dict file.
        out: output directory.
        device: torch device for generation (None: CUDA if available, else CPU).
        quantizer: name of the quantize function (part of the fingerprints; set by :func:`run_eval`).
    """

    model: str
    pipeline: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    bps_list: tuple[float, ...]
    out: str
    quantize: dict = dataclasses.field(default_factory=dict)
    call_overrides: dict = dataclasses.field(default_factory=dict)
    dtype: str = "bfloat16"
    model_seed: int = 0
    lpips_weights: str | None = None
    prompts_file: str | None = None
    device: str | None = None
    quantizer: str = "hq_diffusion.quantize"

    @property
    def is_tiny(self) -> bool:
        return self.model in MODEL_ALIASES

    def call_kwargs(self) -> dict:
        """The effective pipeline ``__call__`` kwargs (``DEFAULT_CALL_KWARGS`` + overrides)."""
        from hq_diffusion.models import DEFAULT_CALL_KWARGS

        kw = dict(DEFAULT_CALL_KWARGS[self.pipeline])
        kw.update(self.call_overrides)
        return kw

    def model_id(self) -> str:
        return self.model if self.is_tiny else os.path.realpath(self.model)

    def gen_fingerprint_data(self) -> dict:
        """What the reference output depends on."""
        return {"model": self.model_id(), "model_seed": self.model_seed if self.is_tiny else None,
                "pipeline": self.pipeline, "dtype": self.dtype, "call_kwargs": self.call_kwargs()}

    def run_fingerprint_data(self) -> dict:
        """What every quantized output depends on, apart from its bps, prompt and seed."""
        return {**self.gen_fingerprint_data(), "quantizer": self.quantizer, "quantize": self.quantize}

    def quant_fingerprint(self, bps: float) -> str:
        return _fingerprint({**self.run_fingerprint_data(), "bps": float(bps)})

    def gen_fingerprint(self) -> str:
        return _fingerprint(self.gen_fingerprint_data())


def _fingerprint(obj: Any) -> str:
    text = json.dumps(R.to_jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _parse_list(text: str, conv: Callable, what: str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise EvalInputError(f"{what}: empty list")
    out = []
    for t in items:
        try:
            out.append(conv(t))
        except ValueError:
            raise EvalInputError(f"{what}: {t!r} is not a valid number") from None
    return out


def _check_quantize_options(bps_list: list[float], options: dict) -> None:
    """Validate every bps of the sweep with the quantizer's own config (``HQConfig``) up front, so a bad
    value fails before any generation.  Raises EvalInputError naming the flag."""
    from hq_diffusion.integrations.config import HQConfig

    flags = {"kv_bps": "--kv-bps", "kv_correction": "--kv-correction", "bps": "--bps", "lattice": "--lattice",
             "mma": "--mma", "storage": "--storage", "skip": "--skip"}
    for b in bps_list:
        if not math.isfinite(b):
            raise EvalInputError(f"--bps must be finite, got {b}")
        try:
            HQConfig(bps=b, **options)
        except ValueError as e:
            msg = str(e)
            flag = next((f for k, f in flags.items() if f"HQConfig.{k}" in msg), "--bps")
            raise EvalInputError(f"{flag}: {msg}") from None


def resolve_model(model: str) -> str:
    """``--model`` -> pipeline name; validates a PATH (``model_index.json`` naming a supported pipeline
    class, with a transformer).  Raises EvalInputError."""
    if model in MODEL_ALIASES:
        return MODEL_ALIASES[model]
    names = ", ".join(MODEL_ALIASES)
    if not os.path.exists(model):
        raise EvalInputError(f"--model {model!r} is neither one of {names} nor an existing directory")
    if not os.path.isdir(model):
        raise EvalInputError(f"--model {model} is not a directory (expected a diffusers pipeline directory "
                             f"or one of {names})")
    index = os.path.join(model, "model_index.json")
    if not os.path.isfile(index):
        raise EvalInputError(f"--model {model} is not a diffusers pipeline directory: no model_index.json")
    try:
        with open(index, encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError) as e:
        raise EvalInputError(f"--model {model}: cannot parse model_index.json: {e}") from None
    cls = info.get("_class_name") if isinstance(info, dict) else None
    if cls not in PIPELINE_CLASSES:
        raise EvalInputError(f"--model {model}: pipeline class {cls!r} is not supported; supported: "
                             f"{', '.join(PIPELINE_CLASSES)}")
    if "transformer" not in info or not os.path.isfile(os.path.join(model, "transformer", "config.json")):
        raise EvalInputError(f"--model {model}: the pipeline has no transformer (model_index.json entry "
                             f"and transformer/config.json are required)")
    return PIPELINE_CLASSES[cls]


def _native_call_defaults(model: str, pipeline: str) -> dict:
    """For a PATH pipeline: its own ``__call__`` defaults for the keys tuned for the tiny pipelines."""
    import diffusers

    from hq_diffusion.models import DEFAULT_CALL_KWARGS

    with open(os.path.join(model, "model_index.json"), encoding="utf-8") as fh:
        cls = getattr(diffusers, json.load(fh)["_class_name"])
    params = inspect.signature(cls.__call__).parameters
    out = {}
    for k in _TINY_TUNED_KEYS:
        if k in DEFAULT_CALL_KWARGS[pipeline] and k in params and \
                params[k].default is not inspect.Parameter.empty:
            out[k] = params[k].default
    return out


def _check_out_dir(out: str) -> str:
    """Create ``out`` if needed and prove it writable.  Raises EvalInputError."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise EvalInputError(f"--out {out} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-probe.")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise EvalInputError(f"output directory {out} is not writable: {e.strerror or e}") from None
    return out


def build_config(args: argparse.Namespace) -> EvalConfig:
    """Validate parsed ``hq-diffusion eval`` arguments into an :class:`EvalConfig`.

    Everything that can be checked without loading a model is checked here, before any long work.
    Raises:
        EvalInputError: with a one-line message naming the bad value.
    """
    pipeline = resolve_model(args.model)
    prompts_file = args.prompts or default_prompts_file()
    prompts = read_prompts(prompts_file)
    if args.num_prompts is not None:
        if args.num_prompts < 1:
            raise EvalInputError(f"--num-prompts must be >= 1, got {args.num_prompts}")
        if args.num_prompts > len(prompts):
            raise EvalInputError(f"--num-prompts {args.num_prompts}, but {prompts_file} has only "
                                 f"{len(prompts)} prompts")
        prompts = prompts[: args.num_prompts]
    seeds = _parse_list(args.seeds, int, "--seeds")
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise EvalInputError(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    bps_list = _parse_list(args.bps, float, "--bps")
    if len({R.bps_key(b) for b in bps_list}) != len(bps_list):
        raise EvalInputError(f"--bps has duplicates: {args.bps}")
    skip = None
    if args.skip is not None:
        skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    quantize = {"lattice": args.lattice, "mma": args.mma,
                "kv_bps": None if args.kv_bps is None else float(args.kv_bps),
                "kv_correction": args.kv_correction, "skip": skip, "storage": args.storage}
    _check_quantize_options(bps_list, quantize)

    overrides: dict[str, Any] = {}
    if args.model not in MODEL_ALIASES:
        overrides.update(_native_call_defaults(args.model, pipeline))
    for flag, key, minimum in (("steps", "num_inference_steps", 1), ("frames", "num_frames", 1),
                               ("height", "height", 1), ("width", "width", 1)):
        v = getattr(args, flag)
        if v is None:
            continue
        if v < minimum:
            raise EvalInputError(f"--{flag} must be >= {minimum}, got {v}")
        if flag == "frames" and pipeline not in VIDEO_PIPELINES:
            raise EvalInputError(f"--frames applies to video pipelines only; {args.model} makes images")
        multiple = 32 if pipeline in VIDEO_PIPELINES else 16
        if flag in ("height", "width") and v % multiple:
            raise EvalInputError(f"--{flag} must be a multiple of {multiple} for {pipeline} pipelines, got {v}")
        overrides[key] = int(v)
    if args.lpips_weights is not None and not os.path.isfile(args.lpips_weights):
        raise EvalInputError(f"--lpips-weights {args.lpips_weights} does not exist")
    out = _check_out_dir(args.out)
    return EvalConfig(
        model=args.model, pipeline=pipeline, prompts=tuple(prompts), seeds=tuple(seeds),
        bps_list=tuple(bps_list), out=out, quantize=quantize, call_overrides=overrides, dtype=args.dtype,
        model_seed=args.model_seed,
        lpips_weights=os.path.abspath(args.lpips_weights) if args.lpips_weights else None,
        prompts_file=os.path.abspath(prompts_file), device=args.device,
    )


# --------------------------------------------------------------------------------------------- files
def _item_name(idx: int, seed: int) -> str:
    return f"p{idx:04d}-s{seed}"


def _ref_path(out: str, idx: int, seed: int) -> str:
    return os.path.join(out, "ref", _item_name(idx, seed) + ".npz")


def _bps_dir(out: str, bps: float) -> str:
    return os.path.join(out, "items", R.bps_key(bps))


def _item_dir(out: str, bps: float, idx: int, seed: int) -> str:
    return os.path.join(_bps_dir(out, bps), _item_name(idx, seed))


def _read_json(path: str) -> Any:
    """Parsed JSON, or None when missing / unreadable (a partial or foreign file counts as absent)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _write_npz(path: str, **arrays: Any) -> None:
    R._write_bytes_atomic(path, lambda fh: np.savez(fh, **arrays))


def _save_ref(path: str, meta: dict, frames: np.ndarray, audio: np.ndarray | None,
              sample_rate: int | None) -> None:
    arrays = {"frames": frames, "meta": np.array(json.dumps(meta))}
    if audio is not None:
        arrays["audio"] = np.asarray(audio, dtype=np.float32)
        arrays["audio_sample_rate"] = np.array(int(sample_rate))
    _write_npz(path, **arrays)


def _load_ref(path: str, meta: dict) -> dict | None:
    """The cached reference if it exists and its metadata matches ``meta``; else None."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["meta"])) != meta:
                return None
            out = {"frames": z["frames"], "audio": z["audio"] if "audio" in z.files else None,
                   "audio_sample_rate": int(z["audio_sample_rate"]) if "audio_sample_rate" in z.files else None}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        _warn(f"ignoring unreadable reference cache {path} ({type(e).__name__}: {e}); regenerating")
        return None
    return out


def _warn(msg: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(f"hq-diffusion eval: {msg}", file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(f"hq-diffusion eval: {msg}", file=sys.stderr)


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
    """A fresh pipeline (new modules every call: quantizing it never touches another copy)."""
    dtype = _torch_dtype(cfg.dtype)
    if cfg.is_tiny:
        from hq_diffusion.models import tiny_pipeline

        pipe = tiny_pipeline(cfg.pipeline, seed=cfg.model_seed, dtype=dtype)
    else:
        import warnings

        import diffusers

        with warnings.catch_warnings():  # recent diffusers prefer dtype=, which older supported ones lack
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipe = diffusers.DiffusionPipeline.from_pretrained(cfg.model, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(_device(cfg))


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


def _release_memory() -> None:
    """Collect a dropped pipeline (call after the last reference to it is gone)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


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
                    ref_audio: np.ndarray | None = None, quant_audio: np.ndarray | None = None) -> dict:
    """Per-frame metrics of one item.

    Args:
        ref, quant: uint8 (F, H, W, 3).
        lpips: LPIPS callable or None (not computed).
        ref_audio, quant_audio: float (C, T) or None.
    Returns:
        ``{"per_frame": {"psnr", "ssim", "lpips", "flicker_psnr"}, "means", "audio_snr_db", "lpips_info"}``
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
            "lpips_info": info}


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


def _run_record(cfg: EvalConfig) -> dict:
    return {
        "format": _RUN_FORMAT,
        "model": cfg.model, "pipeline": cfg.pipeline, "dtype": cfg.dtype,
        "model_seed": cfg.model_seed if cfg.is_tiny else None,
        "prompts_file": cfg.prompts_file, "prompts": list(cfg.prompts), "seeds": list(cfg.seeds),
        "bps_list": list(cfg.bps_list), "quantizer": cfg.quantizer, "quantize": cfg.quantize,
        "call_kwargs": cfg.call_kwargs(),
        "lpips_weights": cfg.lpips_weights,
        "run_fingerprint": _fingerprint(cfg.run_fingerprint_data()),
        "fingerprints": {R.bps_key(b): cfg.quant_fingerprint(b) for b in cfg.bps_list},
        "gen_fingerprint": cfg.gen_fingerprint(),
    }


def _check_and_write_run(cfg: EvalConfig, rank: int) -> None:
    path = os.path.join(cfg.out, _RUN_FILE)
    new = _run_record(cfg)
    old = _read_json(path)
    if isinstance(old, dict) and old.get("run_fingerprint") not in (None, new["run_fingerprint"]):
        keys = [k for k in ("model", "pipeline", "dtype", "model_seed", "quantizer", "quantize", "call_kwargs")
                if R.to_jsonable(old.get(k)) != R.to_jsonable(new.get(k))]
        raise EvalInputError(f"{cfg.out} holds a run with different settings ({', '.join(keys) or 'settings'} "
                             f"differ); use another --out or delete it")
    if rank == 0 or old is None:
        R.write_json_atomic(path, new)


@dataclass
class _Item:
    idx: int
    prompt: str
    seed: int
    bps: float
    state: str = "todo"  # "done", "metrics" (frames exist, metrics stale), "todo"


def _item_status(cfg: EvalConfig, it: _Item, lpips_source: Any) -> str:
    d = _item_dir(cfg.out, it.bps, it.idx, it.seed)
    m = _read_json(os.path.join(d, "metrics.json"))
    ok = (isinstance(m, dict) and m.get("fingerprint") == cfg.quant_fingerprint(it.bps)
          and m.get("prompt") == it.prompt and m.get("seed") == it.seed)
    if not ok:
        return "todo"
    if (m.get("lpips") or {}).get("source") == lpips_source and os.path.isfile(os.path.join(d, "video.mp4")):
        return "done"
    return "metrics" if os.path.isfile(os.path.join(d, "frames.npz")) else "todo"


def _write_item(cfg: EvalConfig, it: _Item, ref: dict, quant: dict, lpips: _Lpips, fps: float) -> None:
    d = _item_dir(cfg.out, it.bps, it.idx, it.seed)
    where = f"prompt {it.idx} (seed {it.seed}) at {R.bps_key(it.bps)} bps"
    try:
        res = compute_metrics(ref["frames"], quant["frames"], lpips, ref.get("audio"), quant.get("audio"))
    except ValueError as e:
        raise EvalInputError(f"{where}: {e}") from None
    R.write_frames_npz(os.path.join(d, "frames.npz"), ref["frames"], quant["frames"])
    has_audio = ref.get("audio") is not None and quant.get("audio") is not None
    if has_audio:
        _write_npz(os.path.join(d, "audio.npz"), ref=np.asarray(ref["audio"], np.float32),
                   quant=np.asarray(quant["audio"], np.float32),
                   sample_rate=np.array(int(quant["audio_sample_rate"])))
    # The mp4 carries the quantized pipeline's audio (the track under test).
    R.write_side_by_side_mp4(os.path.join(d, "video.mp4"), ref["frames"], quant["frames"], fps=fps,
                             audio=quant.get("audio"), audio_sample_rate=quant.get("audio_sample_rate"))
    _write_metrics(cfg, it, res, has_audio)


def _write_metrics(cfg: EvalConfig, it: _Item, res: dict, has_audio: bool) -> None:
    d = _item_dir(cfg.out, it.bps, it.idx, it.seed)
    rel = lambda name: os.path.relpath(os.path.join(d, name), cfg.out).replace(os.sep, "/")  # noqa: E731
    entry = {
        "prompt": it.prompt, "index": it.idx, "seed": it.seed, "bps": float(it.bps),
        "per_frame": res["per_frame"], "means": res["means"], "audio_snr_db": res["audio_snr_db"],
        "video": rel("video.mp4"), "frames": rel("frames.npz"),
        "audio": rel("audio.npz") if has_audio else None,
        "lpips": res["lpips_info"], "fingerprint": cfg.quant_fingerprint(it.bps),
    }
    R.write_json_atomic(os.path.join(d, "metrics.json"), entry)


def _recompute_metrics(cfg: EvalConfig, it: _Item, lpips: _Lpips) -> None:
    """Metrics only, from the stored frames (e.g. LPIPS weights became available)."""
    d = _item_dir(cfg.out, it.bps, it.idx, it.seed)
    with np.load(os.path.join(d, "frames.npz")) as z:
        ref, quant = z["ref"], z["quant"]
    ra = qa = rate = None
    has_audio = os.path.isfile(os.path.join(d, "audio.npz"))
    if has_audio:
        with np.load(os.path.join(d, "audio.npz")) as z:
            ra, qa, rate = z["ref"], z["quant"], int(z["sample_rate"])
    try:
        res = compute_metrics(ref, quant, lpips, ra, qa)
    except ValueError as e:
        raise EvalInputError(f"prompt {it.idx} (seed {it.seed}) at {R.bps_key(it.bps)} bps: {e}") from None
    if not os.path.isfile(os.path.join(d, "video.mp4")):
        R.write_side_by_side_mp4(os.path.join(d, "video.mp4"), ref, quant, fps=_fps(cfg), audio=qa,
                                 audio_sample_rate=rate)
    _write_metrics(cfg, it, res, has_audio)


def _fps(cfg: EvalConfig) -> float:
    if cfg.pipeline not in VIDEO_PIPELINES:
        return 1.0
    return float(cfg.call_kwargs().get("frame_rate") or 8)


def _reset_quantized_state(pipe) -> None:
    """Zero the K/V dither step counters and rate statistics of every component, so that each generation
    of the quantized pipeline is the same whatever ran before it (resumed and sharded runs then reproduce a
    clean run exactly, and summary.json measures one generation)."""
    import torch

    from hq_diffusion.integrations.kv_processors import reset_kv_state

    for module in getattr(pipe, "components", {}).values():
        if isinstance(module, torch.nn.Module):
            reset_kv_state(module)


def _checked_generate(generate_fn: Callable, pipe, cfg: EvalConfig, idx: int, seed: int, bps: float) -> dict:
    _reset_quantized_state(pipe)
    try:
        return generate_fn(pipe, cfg, cfg.prompts[idx], seed)
    except ValueError as e:
        raise EvalInputError(f"quantized generation of prompt {idx} (seed {seed}) at {R.bps_key(bps)} bps: "
                             f"{e}") from None


def _write_summary(cfg: EvalConfig, bps: float, summary: dict) -> None:
    R.write_json_atomic(os.path.join(_bps_dir(cfg.out, bps), "summary.json"),
                        {"fingerprint": cfg.quant_fingerprint(bps), "bps": float(bps),
                         "measured_on": {"prompt_index": 0, "seed": cfg.seeds[0]}, **summary})


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
    _check_and_write_run(cfg, rank)
    lpips = _Lpips(cfg.lpips_weights)

    mine = [i for i in range(len(cfg.prompts)) if i % world_size == rank]
    items = [_Item(i, cfg.prompts[i], s, b) for b in cfg.bps_list for i in mine for s in cfg.seeds]
    for it in items:
        it.state = _item_status(cfg, it, lpips.info["source"])
    todo = [it for it in items if it.state == "todo"]
    stale_summary = [b for b in cfg.bps_list
                     if (_read_json(os.path.join(_bps_dir(cfg.out, b), "summary.json")) or {}).get("fingerprint")
                     != cfg.quant_fingerprint(b)]
    gen_meta = {"fingerprint": cfg.gen_fingerprint()}
    refs_needed = sorted({(it.idx, it.seed) for it in todo})
    refs_missing = [(i, s) for i, s in refs_needed
                    if _load_ref(_ref_path(cfg.out, i, s), {**gen_meta, "prompt": cfg.prompts[i]}) is None]

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
                _save_ref(_ref_path(cfg.out, i, s), {**gen_meta, "prompt": cfg.prompts[i]}, out["frames"],
                          out.get("audio"), out.get("audio_sample_rate"))
                bar.update(1)
            pipe = None
            _release_memory()
        # 2. per bps: a fresh pipeline, quantized, then every pending item.  Rank 0 also writes
        #    summary.json, taken right after generating (prompt 0, first seed): K/V rates are measured
        #    during forward passes, so the summary always covers the same, single generation.
        for b in cfg.bps_list:
            pending = [it for it in todo if it.bps == b]
            need_summary = rank == 0 and b in stale_summary
            if not pending and not need_summary:
                continue
            bar.set_postfix_str(f"quantizing {R.bps_key(b)} bps")
            pipe = _load_pipeline(cfg)
            pipe = quantize_fn(pipe, bps=float(b), **cfg.quantize, progress=False) or pipe
            bar.set_postfix_str(f"{R.bps_key(b)} bps")
            first = (0, cfg.seeds[0])
            if need_summary and not (pending and (pending[0].idx, pending[0].seed) == first):
                _checked_generate(generate_fn, pipe, cfg, *first, b)  # measurement only
                _write_summary(cfg, b, summary_fn(pipe))
                need_summary = False
            for it in pending:
                if max_items is not None and done_new >= max_items:
                    raise _Stop
                ref = _load_ref(_ref_path(cfg.out, it.idx, it.seed), {**gen_meta, "prompt": it.prompt})
                if ref is None:
                    raise EvalInputError(f"reference output of prompt {it.idx} (seed {it.seed}) vanished from "
                                         f"{cfg.out}/ref during the run")
                quant = _checked_generate(generate_fn, pipe, cfg, it.idx, it.seed, b)
                if need_summary:
                    _write_summary(cfg, b, summary_fn(pipe))
                    need_summary = False
                _write_item(cfg, it, ref, quant, lpips, fps)
                done_new += 1
                bar.update(1)
            pipe = None
            _release_memory()
        # 3. metrics-only items
        for it in items:
            if it.state == "metrics":
                _recompute_metrics(cfg, it, lpips)
                bar.update(1)
    except _Stop:
        _warn(f"stopped after {max_items} new items (--max-items); rerun without it to finish")
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


# --------------------------------------------------------------------------------------------- merging
# (key of QuantSummary.to_dict(), label) shown first in the HTML "Compression" table
_COMPRESSION_KEYS = (
    ("ratio", "compression \u00d7 (bf16 bytes / quantized bytes)"),
    ("weighted_bps", "bits per weight (all stored bits / weights)"),
    ("mean_bps", "bits per weight, mean over layers"),
    ("bytes_bf16", "quantized layers: bf16 bytes"),
    ("bytes_quantized", "quantized layers: stored bytes"),
    ("bytes_skipped", "layers kept unquantized: bytes"),
)


def _compression_display(summaries: dict[str, dict]) -> dict:
    """The HTML "Compression" table: per bps, the headline numbers of ``hq_diffusion.summary(pipe).to_dict()``
    (labelled), layer counts, measured K/V rates, and any other scalar it reports.  The full dicts are in
    ``report["quantization"]``."""
    out: dict[str, Any] = {}
    for k, s in summaries.items():
        body = (s or {}).get("summary") or {}
        pre = f"{k} bps: "
        for key, label in _COMPRESSION_KEYS:
            if key in body:
                out[pre + label] = body[key]
        for key in ("layers", "skipped"):
            if isinstance(body.get(key), list):
                out[pre + ("layers quantized" if key == "layers" else "layers kept unquantized")] = len(body[key])
        kv = body.get("kv")
        if isinstance(kv, dict):
            for comp, info in kv.items():
                ks = (info or {}).get("summary") or {}
                out[pre + f"K/V ({comp}): bits per scalar, measured"] = ks.get("bits_per_scalar")
                out[pre + f"K/V ({comp}): compression \u00d7 vs fp16"] = ks.get("compression")
        elif "kv" in body:
            out[pre + "K/V"] = "not quantized"
        known = {key for key, _ in _COMPRESSION_KEYS} | {"layers", "skipped", "kv", "config"}
        for key, v in body.items():
            if key not in known and (isinstance(v, (int, float, str, bool)) or v is None):
                out[pre + key] = v
    return out


def merge(out: str) -> dict:
    """Build report.json / report.csv / report.html in ``out`` from the items that exist.

    Returns the report dict; ``report["missing"]`` lists the items not (yet) there.
    Raises:
        EvalInputError: ``out`` holds no run.json.
    """
    out = os.path.abspath(out)
    run = _read_json(os.path.join(out, _RUN_FILE))
    if not isinstance(run, dict) or run.get("format") != _RUN_FORMAT:
        raise EvalInputError(f"{out} holds no evaluation run ({_RUN_FILE} missing or unreadable)")
    prompts, seeds, bps_list = run["prompts"], run["seeds"], [float(b) for b in run["bps_list"]]
    entries: list[dict] = []
    missing: list[dict] = []
    lpips_infos: list[dict] = []
    summaries: dict[str, dict] = {}
    for b in bps_list:
        k = R.bps_key(b)
        fp = run["fingerprints"][k]
        s = _read_json(os.path.join(_bps_dir(out, b), "summary.json"))
        if isinstance(s, dict) and s.get("fingerprint") == fp:
            summaries[k] = s
        for i, p in enumerate(prompts):
            for seed in seeds:
                m = _read_json(os.path.join(_item_dir(out, b, i, seed), "metrics.json"))
                if not (isinstance(m, dict) and m.get("fingerprint") == fp and m.get("prompt") == p
                        and m.get("seed") == seed):
                    missing.append({"index": i, "prompt": p, "seed": seed, "bps": b})
                    continue
                lpips_infos.append(m.get("lpips") or {})
                entries.append({key: m.get(key) for key in
                                ("prompt", "index", "seed", "bps", "per_frame", "means", "audio_snr_db",
                                 "video", "frames", "audio")})
    lp = lpips_infos[0] if lpips_infos else {"available": False, "reason": "no items"}
    if any(x.get("available") != lp.get("available") for x in lpips_infos):
        lp = {"available": False, "reason": "LPIPS was computed for some items only"}
    lp = {"available": bool(lp.get("available")), "reason": lp.get("reason"), "plumbing": bool(lp.get("plumbing"))}

    config = {
        "model": run["model"], "pipeline": run["pipeline"], "reference": f"unquantized, {run['dtype']}",
        "dtype": run["dtype"], "num_prompts": len(prompts), "seeds": seeds, "bps": bps_list,
        **run["quantize"],
        "generation": run["call_kwargs"],
    }
    if run.get("model_seed") is not None:
        config["model_seed"] = run["model_seed"]
    report = {
        "model": run["model"],
        "config": config,
        "compression": _compression_display(summaries),
        "quantization": {k: s.get("summary") for k, s in summaries.items()},
        "bps_list": bps_list,
        "prompts": entries,
        "lpips": lp,
        "missing": missing,
    }
    report["suite"] = R.suite_aggregates(entries)
    R.write_json_atomic(os.path.join(out, "report.json"), report)
    R.write_csv_atomic(os.path.join(out, "report.csv"), [_csv_row(e) for e in entries])
    R.write_html_report(os.path.join(out, "report.html"), report)
    return report


def _csv_row(e: dict) -> dict:
    pf = e.get("per_frame") or {}
    means = e.get("means") or {}
    row = {"prompt_index": e["index"], "prompt": e["prompt"], "seed": e["seed"], "bps": e["bps"]}
    for m in R.METRICS:
        row[f"{m}_mean"] = means.get(m)
    row["psnr_min"] = M.summarize(pf.get("psnr"))["min"]
    row["ssim_min"] = M.summarize(pf.get("ssim"))["min"]
    row["audio_snr_db"] = e.get("audio_snr_db")
    row["frames"] = len(pf.get("psnr") or [])
    row["video"] = e.get("video")
    row["frames_npz"] = e.get("frames")
    return row


# --------------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    """Reports a usage error as EvalInputError (one line, exit status 2 from ``main``)."""

    def error(self, message: str):
        raise EvalInputError(f"{message} (see {self.prog} --help)")


def build_parser(prog: str = "hq-diffusion eval") -> argparse.ArgumentParser:
    """The ``hq-diffusion eval`` argument parser (usage errors raise :class:`EvalInputError`)."""
    p = _Parser(
        prog=prog, description="Evaluate a quantized diffusers pipeline against the unquantized one over "
                               "a prompt suite (same prompts, same seeds); writes report.json/csv/html.")
    p.add_argument("--model", default="tiny-ltx",
                   help=f"{' | '.join(MODEL_ALIASES)} | PATH to a diffusers pipeline directory "
                        f"(default: tiny-ltx)")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line, '#' comments (default: the "
                                                     "packaged 32-prompt suite)")
    p.add_argument("--num-prompts", type=int, metavar="N", help="use the first N prompts")
    p.add_argument("--seeds", default="0", help="comma-separated generation seeds (default: 0)")
    p.add_argument("--bps", default="4", help="weight bits per weight, or a comma-separated sweep (3,4,5)")
    q = p.add_argument_group("quantization (hq_diffusion.quantize)")
    q.add_argument("--lattice", default="e8", help="e8 | d4 | a2 | z (default: e8)")
    q.add_argument("--mma", default="auto",
                   help="matmul path: auto | bf16 | int8 | fp8 | nvfp4 | mxfp4 (default: auto)")
    q.add_argument("--kv-bps", type=float, default=None, help="also quantize attention K/V at this rate (default: off)")
    q.add_argument("--kv-correction", default="haar+dither",
                   help="K/V bias correction: none | signs | haar, optionally +dither (default: haar+dither)")
    q.add_argument("--storage", default="rice", help="weight storage: rice | int8 (default: rice)")
    q.add_argument("--skip", help="comma-separated module-name patterns kept unquantized (default: the "
                                   "architecture preset)")
    g = p.add_argument_group("generation")
    g.add_argument("--steps", type=int, help="inference steps")
    g.add_argument("--frames", type=int, help="video frames")
    g.add_argument("--height", type=int, help="frame height in pixels")
    g.add_argument("--width", type=int, help="frame width in pixels")
    g.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                   help="dtype of the reference and of the pipeline before quantization (default: bfloat16)")
    g.add_argument("--model-seed", type=int, default=0, help="random-init seed of the tiny pipelines")
    g.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--lpips-weights", metavar="PATH", help="full LPIPS state dict (default: the torchvision "
                                                           "backbone in the torch hub cache, if present)")
    p.add_argument("--out", default=os.path.join("runs", "eval"), help="output directory (default: runs/eval)")
    p.add_argument("--merge-only", action="store_true", help="only merge the items in --out into the report")
    p.add_argument("--no-barrier", action="store_true",
                   help="with several ranks: write items and exit without merging (merge with --merge-only)")
    p.add_argument("--max-items", type=int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def quiet_library_logs() -> None:
    """Command-line entry points only: keep diffusers / transformers to errors (every tiny-pipeline prompt
    triggers a "truncated to max_sequence_length" warning, which would bury the progress bar)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


def _error(msg: str) -> int:
    print(f"hq-diffusion eval: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None, **hooks: Any) -> int:
    """``hq-diffusion eval``.  ``hooks`` (``quantize_fn``, ``summary_fn``, ``generate_fn``) are for tests."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        if args.merge_only:
            rep = merge(args.out)
            return _finish(rep, args.out)
        cfg = build_config(args)
        quiet_library_logs()
        t0 = time.perf_counter()
        rep = run_eval(cfg, barrier=not args.no_barrier, max_items=args.max_items,
                       progress=not args.no_progress, **hooks)
        if rep is None:
            return 0
        return _finish(rep, cfg.out, time.perf_counter() - t0)
    except EvalInputError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        print("hq-diffusion eval: interrupted; finished items are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130


def _finish(rep: dict, out: str, seconds: float | None = None) -> int:
    n = len(rep["prompts"])
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    print(f"hq-diffusion eval: {n} results{took}; report: {os.path.join(os.path.abspath(out), 'report.html')}")
    if rep["missing"]:
        print(f"hq-diffusion eval: error: the report is partial: {len(rep['missing'])} of "
              f"{len(rep['missing']) + n} results are missing (run the remaining ranks or rerun the command)",
              file=sys.stderr)
        return 1
    return 0
