"""The app's back end: load pipelines, quantize copies, generate bf16 and quantized outputs, measure them.

No Gradio here; :class:`Engine` is driven by the UI (``app/ui.py``), by tests and by the load benchmark.

Concurrency: every pipeline call and every quantization runs under one lock (a DiT saturates the device;
diffusers pipelines keep per-call state on the pipeline and scheduler objects), while metrics and video
encoding of finished generations run outside it, so several requests overlap. The caches live under the
same lock. A run can be cancelled (``run(..., cancel=event)``, or :meth:`Engine.shutdown` for all of them):
it stops at the next denoising step or stage with :class:`GenerationCancelled` and releases the lock. The
quantized pipeline's K/V state is reset before each of its generations, so identical requests give identical
frames and K/V byte counts.

Caches:
    * bf16 results, LRU of ``settings.result_cache_size``, keyed by (model, prompt, negative prompt, seed,
      frames, height, width, steps);
    * a model saved quantized by hq-diffusion (:class:`SavedModel`) is loaded once with ``load_quantized`` and
      kept as its fixed quantized pipeline (never re-quantized); its float reference, if any, takes the place
      of the bf16 pipeline below;
    * quantized pipelines, LRU of ``settings.quant_cache_size``, keyed by (model, quantization settings).
      Each is a fresh copy of the bf16 pipeline: the transformer and the scheduler are deep-copied, the other
      components (VAE, text encoders, tokenizers) are shared, so the bf16 pipeline is never modified.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

# to_uint8: the evaluator's float [0, 1] -> uint8 frame conversion (raises on NaN / inf frames).
from hq_diffusion.eval.files import release_memory as _release_memory
from hq_diffusion.eval.files import EvalInputError, to_uint8
from hq_diffusion.eval.saved import SavedQuantized, choose_reference, inspect_quantized, is_quantized_dir
from hq_diffusion.integrations import families

from .config import TINY_KINDS, VIDEO_KINDS, AppSettings, GenerationRequest, QuantSettings, is_tiny

__all__ = ["Engine", "GenerationCancelled", "GenerationResult", "PIPELINE_CLASSES", "SavedModel", "resolve_kind",
           "resolve_saved", "to_uint8", "write_video", "error_gain", "frames_digest"]

log = logging.getLogger(__name__)


#: diffusers pipeline class name -> pipeline kind, from the family registry.
PIPELINE_CLASSES: dict[str, str] = families.pipeline_classes()
# ``DEFAULT_CALL_KWARGS`` keys tuned for the tiny pipelines; a local checkpoint uses its own ``__call__``
# defaults for them (steps, size and frames always come from the request).
_TINY_TUNED_KEYS = families.tiny_tuned_keys(request=False)
_TINY_FPS = 8.0  # playback rate of the tiny models' few frames
_DISPLAY_MIN_HEIGHT = 256  # small frames are nearest-upscaled to at least this height for display
_ERROR_GAINS = (64, 32, 16, 8, 4)  # error-map amplification, the largest that keeps the 99th percentile visible
_KEEP_RESULT_DIRS = 32


class GenerationCancelled(RuntimeError):
    """A generation stopped before it finished: the client cancelled it or the server is shutting down. Raised
    between denoising steps (and between the stages of a request), so the model lock is released at once."""


def resolve_kind(model: str) -> str:
    """Pipeline kind (``"ltx"``, ``"ltx2"``, ``"pixart"``, ``"flux"``) of a tiny model key or a local
    diffusers pipeline directory. Raises ValueError naming what is wrong with the directory."""
    if is_tiny(model):
        return TINY_KINDS[model]
    index = os.path.join(model, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{model} is not a diffusers pipeline directory (no model_index.json)")
    try:
        with open(index, encoding="utf-8") as fh:
            cls = json.load(fh).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{model}: cannot read model_index.json: {e}") from None
    if cls not in PIPELINE_CLASSES:
        raise ValueError(f"{model}: pipeline class {cls!r} is not supported; supported: "
                         f"{', '.join(PIPELINE_CLASSES)}")
    if is_quantized_dir(model):
        inspect_quantized(model)  # EvalInputError (a ValueError) naming what is wrong with the directory
    return PIPELINE_CLASSES[cls]


@dataclass(frozen=True)
class SavedModel:
    """A ``--model`` directory saved quantized by hq-diffusion, as the app serves it: the directory is the
    quantized side (loaded once with ``load_quantized``, never re-quantized, so the request's quantization
    settings are ignored); the float reference is ``reference`` (a tiny model key or a float pipeline
    directory), or None when the app shows the quantized column alone.

    Attributes:
        info: what the directory says about itself (pipeline class, ``HQConfig`` fields, saved dtype, origin).
        reference: the float reference, or None.
        note: how ``reference`` was chosen, or why there is none (starts with "no float reference").
    """

    info: SavedQuantized
    reference: str | None
    note: str

    @property
    def quant(self) -> QuantSettings:
        """The directory's quantization as :class:`QuantSettings` (what the results report as used)."""
        c = self.info.config
        kv = c.get("kv_bps")
        return QuantSettings(bps=self.info.bps, lattice=str(c.get("lattice", "e8")), mma=str(c.get("mma", "auto")),
                             kv_enabled=kv is not None, kv_bps=float(kv) if kv is not None else QuantSettings.kv_bps,
                             kv_correction=str(c.get("kv_correction") or QuantSettings.kv_correction))

    @property
    def origin(self) -> str | None:
        """Whose generation defaults apply: the reference, else the recorded origin (may be None)."""
        return self.reference if self.reference is not None else self.info.source


def resolve_saved(model: str, reference: str | None = None) -> SavedModel | None:
    """:class:`SavedModel` of a ``--model`` directory saved quantized by hq-diffusion (None for a tiny model
    key or a float pipeline directory). ``reference``: ``--reference`` (a tiny model key, a float pipeline
    directory, ``"none"``, or None for the origin the directory records). The directory's manifest is verified
    here, so a damaged one fails at start-up.

    Raises:
        EvalInputError (a ValueError): one line naming the directory, the file or the ``--reference`` at fault.
    """
    if is_tiny(model) or not is_quantized_dir(model):
        return None
    sq = inspect_quantized(model)
    from hq_diffusion.codec import HQFormatError
    from hq_diffusion.integrations.manifest import MANIFEST_NAME, verify_manifest

    if os.path.isfile(os.path.join(sq.path, MANIFEST_NAME)):
        try:
            verify_manifest(sq.path)
        except (HQFormatError, OSError) as e:
            raise EvalInputError(f"--model {model}: {e}") from None
    return SavedModel(sq, *choose_reference(sq, reference))


def write_video(path: str, frames: np.ndarray, fps: float, min_height: int = _DISPLAY_MIN_HEIGHT) -> str:
    """Write uint8 ``frames`` (F, H, W, 3) as a browser-playable H.264 mp4 (yuv420p, faststart).

    Frames lower than ``min_height`` are upscaled by an integer nearest-neighbour factor (pixels stay
    sharp instead of being blurred by the browser); odd sizes are padded by one edge pixel."""
    import imageio.v2 as iio

    f, h, w, _ = frames.shape
    s = max(1, math.ceil(min_height / h))
    if s > 1:
        frames = np.repeat(np.repeat(frames, s, axis=1), s, axis=2)
    ph, pw = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
    if (ph, pw) != frames.shape[1:3]:
        frames = np.pad(frames, ((0, 0), (0, ph - frames.shape[1]), (0, pw - frames.shape[2]), (0, 0)),
                        mode="edge")
    tmp = path + ".part.mp4"
    writer = iio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                            macro_block_size=1, quality=8, ffmpeg_log_level="error",
                            ffmpeg_params=["-movflags", "+faststart"])
    try:
        for frame in frames:
            writer.append_data(np.ascontiguousarray(frame))
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def error_gain(ref: np.ndarray, quant: np.ndarray) -> int:
    """Amplification of the error-map video: the largest of 64, 32, 16, 8, 4 that maps the 99th percentile of
    the per-pixel error (mean |ref - quant| over RGB) to at most 192 of 255 (4 for very different frames, so a
    4-bit real checkpoint and a near-lossless tiny model both show where the error is)."""
    err = np.abs(ref.astype(np.int16) - quant.astype(np.int16)).mean(axis=-1)
    p99 = float(np.percentile(err, 99))
    for g in _ERROR_GAINS:
        if p99 * g <= 192:
            return g
    return _ERROR_GAINS[-1]


def frames_digest(a: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and bytes (identical frames <=> identical digest)."""
    h = hashlib.sha256()
    h.update(repr((a.shape, str(a.dtype))).encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    from hq_diffusion.eval.report import to_jsonable

    return to_jsonable(obj)


def _mean(values) -> float | None:
    from hq_diffusion.eval.metrics import summarize

    return None if values is None else summarize(values)["mean"]


@dataclass
class _Loaded:
    pipe: Any  # the bf16 pipeline; for a model saved quantized, its float reference (None without one)
    kind: str
    fps: float
    call_defaults: dict
    fixed: "_Quantized | None" = None  # a model saved quantized: its pipeline, loaded once as stored
    saved: "SavedModel | None" = None


@dataclass
class _Bf16:
    frames: np.ndarray  # uint8 (F, H, W, 3)
    audio: np.ndarray | None
    audio_rate: int | None
    seconds: float


@dataclass
class _Quantized:
    pipe: Any
    seconds: float  # time spent quantizing


@dataclass
class GenerationResult:
    """What one request produced. Videos are mp4 paths (H.264) inside the engine's work directory.

    For a model saved quantized without a float reference, the reference video, the error map and every
    comparison metric (PSNR, SSIM, LPIPS, audio SNR, error gain) are None; ``reference`` says why."""

    request: GenerationRequest
    kind: str
    bf16_video: str | None
    quant_video: str
    error_video: str | None
    psnr: np.ndarray | None  # (F,) dB, +inf for identical frames
    ssim: np.ndarray | None  # (F,)
    lpips: np.ndarray | None  # (F,), None when unavailable
    lpips_reason: str | None
    audio_snr_db: float | None
    error_gain: int | None  # the error-map video shows mean |bf16 - quantized| over RGB times this, inferno colours
    compression: dict
    timings: dict
    digests: dict
    shape: tuple[int, int, int]  # (frames, height, width) of the outputs
    #: ``{"model": the float reference or None, "note": how it was chosen, "quantized_dir": the directory
    #: saved quantized or None (quantized by the app)}``
    reference: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        """JSON-safe metrics (what the ``/generate`` API returns as JSON): +inf is written ``"inf"``."""
        req = asdict(self.request)
        return _jsonable({
            "model": self.request.model,
            "pipeline": self.kind,
            "request": req,
            "output": {"frames": self.shape[0], "height": self.shape[1], "width": self.shape[2]},
            "per_frame": {
                "psnr": self.psnr,
                "ssim": self.ssim,
                "lpips": self.lpips,
            },
            "means": {
                "psnr": _mean(self.psnr),
                "ssim": _mean(self.ssim),
                "lpips": None if self.lpips is None else _mean(self.lpips),
            },
            "psnr_all_frames_identical": None if self.psnr is None else bool(np.all(np.isposinf(self.psnr))),
            "reference": self.reference,
            "no_reference": self.psnr is None,
            "lpips": {"available": self.lpips is not None, "reason": self.lpips_reason},
            "audio_snr_db": self.audio_snr_db,
            "error_map_gain": self.error_gain,
            "compression": self.compression,
            "timings": self.timings,
            "digests": self.digests,
        })


def _compression(summary: dict, kv_enabled: bool) -> dict:
    """The compression card's numbers from ``QuantSummary.to_dict()``."""
    out = {
        "weights": {
            "bytes_bf16": summary.get("bytes_bf16"),
            "bytes_quantized": summary.get("bytes_quantized"),
            "ratio": summary.get("ratio"),
            "bits_per_weight": summary.get("weighted_bps"),
            "layers_quantized": len(summary.get("layers") or []),
            "layers_kept": len(summary.get("skipped") or []),
            "bytes_kept": summary.get("bytes_skipped"),
        },
        "kv": {"enabled": kv_enabled},
    }
    kv = summary.get("kv") or {}
    infos = [v.get("summary") for v in kv.values() if isinstance(v, dict) and v.get("summary")]
    if kv_enabled and infos:
        # one quantized component (the transformer) in practice; weight several by their scalars
        scalars = sum(i.get("scalars") or 0 for i in infos)
        bits = sum((i.get("bits_per_scalar") or 0) * (i.get("scalars") or 0) for i in infos)
        out["kv"].update({
            "bits_per_scalar": bits / scalars if scalars else None,
            "bytes_fp16": sum(i.get("bytes_fp16") or 0 for i in infos),
            "bytes_quantized": sum(i.get("bytes_quantized") or 0 for i in infos),
            "compression": (16.0 * scalars / bits) if bits else None,
            "attention_modules": sum(i.get("modules") or 0 for i in infos),
            "note": infos[0].get("note"),
        })
    return out


def _default_quantize(pipe, **kwargs):
    import hq_diffusion

    return hq_diffusion.quantize(pipe, **kwargs)


def _default_summary(pipe) -> dict:
    import hq_diffusion

    return hq_diffusion.summary(pipe).to_dict()


class Engine:
    """Pipelines, caches and one generation at a time.

    Args:
        settings: the app settings.
        quantize_fn: ``fn(pipe, **QuantSettings.quantize_kwargs(), progress=False) -> pipe`` that quantizes
            ``pipe`` in place; defaults to :func:`hq_diffusion.quantize`.
        summary_fn: ``fn(pipe) -> dict`` like ``hq_diffusion.summary(pipe).to_dict()`` (the default).
        workdir: where result videos are written (default: a new temporary directory, removed by
            :meth:`close`).
        lpips: an ``hq_diffusion.eval.metrics.LPIPSMetric`` (default: built on first use; when its backbone
            weights are missing, results say why LPIPS is unavailable).
    """

    def __init__(self, settings: AppSettings, *, quantize_fn: Callable | None = None,
                 summary_fn: Callable | None = None, workdir: str | None = None, lpips=None):
        self.settings = settings
        self._quantize_fn = quantize_fn or _default_quantize
        self._summary_fn = summary_fn or _default_summary
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="hq-diffusion-app-")
        os.makedirs(self.workdir, exist_ok=True)
        self._lpips = lpips
        self._lpips_lock = threading.Lock()
        self._model_lock = threading.Lock()  # one pipeline call / quantization at a time
        self._loaded: dict[str, _Loaded] = {}
        self._bf16: OrderedDict[tuple, _Bf16] = OrderedDict()
        self._quant: OrderedDict[tuple, _Quantized] = OrderedDict()
        self._dirs_lock = threading.Lock()
        self._result_dirs: list[str] = []
        self._counter = 0
        self.stats = {"bf16_generations": 0, "bf16_cache_hits": 0, "quantizations": 0,
                      "quant_cache_hits": 0, "quant_generations": 0}
        self._kinds: dict[str, str] = {}
        self._saved: dict[str, SavedModel | None] = {}
        self._shutdown = threading.Event()  # set by shutdown(): new runs are refused, running ones cancelled
        self._idle = threading.Condition()
        self._inflight = 0

    # ---- models -------------------------------------------------------------------------------------------

    def kind(self, model: str) -> str | None:
        """Pipeline kind of one of ``settings.models`` (None for anything else). Reads model_index.json once."""
        if model not in self.settings.models:
            return None
        if model not in self._kinds:
            kind = resolve_kind(model)
            self.saved(model)  # a damaged directory or an unfit --reference fails here too
            self._kinds[model] = kind
        return self._kinds[model]

    def saved(self, model: str) -> SavedModel | None:
        """:class:`SavedModel` of one of ``settings.models`` saved quantized by hq-diffusion (its reference from
        ``settings.reference``); None for any other model. Raises ValueError (one line) for a bad directory or
        an unfit reference."""
        if model not in self.settings.models:
            return None
        if model not in self._saved:
            self._saved[model] = resolve_saved(model, self.settings.reference)
        return self._saved[model]

    def _device(self, model: str) -> str:
        if is_tiny(model):
            return "cpu"
        if self.settings.device:
            return self.settings.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def _load(self, model: str) -> _Loaded:
        """The bf16 pipeline of ``model`` (loaded once; caller holds the model lock)."""
        if model in self._loaded:
            return self._loaded[model]
        import torch

        kind = self.kind(model)
        saved = self.saved(model)
        fixed = None
        if saved is None:
            pipe = self._float_pipeline(model, torch.bfloat16, self._device(model))
            origin = model
        else:  # the directory is the quantized side, as stored; the float side is its reference, if any
            import hq_diffusion

            t0 = time.perf_counter()
            device = self._device(saved.reference or model)
            qpipe = hq_diffusion.load_quantized(model, device=device)
            qpipe.set_progress_bar_config(disable=True)
            fixed = _Quantized(pipe=qpipe, seconds=time.perf_counter() - t0)
            dtype = getattr(torch, saved.info.dtype or "bfloat16")  # compare in the dtype it was saved in
            pipe = None if saved.reference is None else self._float_pipeline(saved.reference, dtype, device)
            origin = saved.origin
        if origin is not None and is_tiny(origin):
            defaults: dict = {}
            fps = _TINY_FPS
        else:
            params = inspect.signature(type(pipe if fixed is None else fixed.pipe).__call__).parameters
            defaults = {k: params[k].default for k in _TINY_TUNED_KEYS
                        if k in params and params[k].default is not inspect.Parameter.empty}
            fps = float(defaults.get("frame_rate") or 24.0)
        if self.settings.fps is not None:
            fps = float(self.settings.fps)
        self._loaded[model] = _Loaded(pipe=pipe, kind=kind, fps=fps, call_defaults=defaults, fixed=fixed,
                                      saved=saved)
        return self._loaded[model]

    def _float_pipeline(self, model: str, dtype, device: str):
        """A float pipeline: a tiny model key (built in code, on CPU) or a float pipeline directory."""
        if is_tiny(model):
            from hq_diffusion.models import tiny_pipeline

            return tiny_pipeline(model, seed=self.settings.tiny_seed, dtype=dtype)
        import warnings

        import diffusers

        with warnings.catch_warnings():  # newer diffusers prefer dtype= over torch_dtype=
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipe = diffusers.DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def preload(self, model: str | None = None) -> None:
        """Load ``model`` (default: the default model) now, e.g. in a background thread at start-up."""
        model = model or self.settings.default_model
        with self._model_lock:
            self._load(model)

    @staticmethod
    def _fresh_copy(pipe):
        """A new pipeline object sharing ``pipe``'s components except a deep copy of the transformer and
        the scheduler, so quantizing (and running) the copy never touches ``pipe``."""
        components = dict(pipe.components)
        components["transformer"] = copy.deepcopy(pipe.transformer)
        components["scheduler"] = copy.deepcopy(pipe.scheduler)
        new = type(pipe)(**components)
        new.set_progress_bar_config(disable=True)
        return new

    def _quantized(self, model: str, loaded: _Loaded, q: QuantSettings) -> tuple[_Quantized, bool]:
        """(quantized pipeline for these settings, whether it came from the cache). Caller holds the lock."""
        key = (model, q.key())
        if key in self._quant:
            self._quant.move_to_end(key)
            self.stats["quant_cache_hits"] += 1
            return self._quant[key], True
        while len(self._quant) >= self.settings.quant_cache_size:
            self._quant.popitem(last=False)
            _release_memory()
        t0 = time.perf_counter()
        pipe = self._fresh_copy(loaded.pipe)
        out = self._quantize_fn(pipe, **q.quantize_kwargs(), progress=False)
        pipe = pipe if out is None else out
        entry = _Quantized(pipe=pipe, seconds=time.perf_counter() - t0)
        self._quant[key] = entry
        self.stats["quantizations"] += 1
        return entry, False

    # ---- generation ---------------------------------------------------------------------------------------

    def _check(self, cancel: threading.Event | None) -> None:
        """Raise :class:`GenerationCancelled` when ``cancel`` is set or the engine is shutting down."""
        if self._shutdown.is_set():
            raise GenerationCancelled("The generation was stopped: the server is shutting down.")
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("The generation was cancelled.")

    def _call(self, loaded: _Loaded, req: GenerationRequest, pipe, report: Callable[[int], None]) -> dict:
        """Run one pipeline; ``{"frames": uint8, "audio", "audio_rate"}``. ``report(step)`` is called after
        every denoising step and may raise (a cancellation) to stop the pipeline there."""
        from hq_diffusion.models import generate

        kw: dict[str, Any] = dict(loaded.call_defaults)
        kw.update(num_inference_steps=req.steps, height=req.height, width=req.width)
        if loaded.kind in VIDEO_KINDS:
            kw["num_frames"] = req.frames
        if req.negative_prompt:
            kw["negative_prompt"] = req.negative_prompt
        params = inspect.signature(type(pipe).__call__).parameters
        if "callback_on_step_end" in params:
            def on_step_end(_pipe, i, _t, tensors):
                report(i + 1)
                return tensors

            kw["callback_on_step_end"] = on_step_end
            kw["callback_on_step_end_tensor_inputs"] = ["latents"]
        elif "callback" in params:  # PixArt: the older per-step callback
            kw["callback"] = lambda i, _t, _latents: report(i + 1)
            kw["callback_steps"] = 1
        out = generate(pipe, loaded.kind, req.prompt, req.seed, **kw)
        if isinstance(out, dict):
            return {"frames": to_uint8(out["frames"]), "audio": out.get("audio"),
                    "audio_rate": out.get("audio_sample_rate")}
        return {"frames": to_uint8(out), "audio": None, "audio_rate": None}

    def run(self, request: GenerationRequest, progress: Callable[[float, str], None] | None = None,
            cancel: threading.Event | None = None) -> GenerationResult:
        """Validate ``request``, generate bf16 (or take it from the cache) and quantized outputs, measure.

        Args:
            request: the request (validated here, before any work; an :class:`InputError` lists every
                problem, the work budget ``Limits.cost_max`` included).
            progress: ``fn(fraction in [0, 1], description)``, called from this thread.
            cancel: when set (from any thread), the run stops at the next denoising step or stage with
                :class:`GenerationCancelled`, releasing the model lock; nothing half-done is cached.
        """
        req = request.validate(self.settings, self.kind(request.model))
        if (sv := self.saved(req.model)) is not None:  # the directory fixes the quantization
            req = dataclasses.replace(req, quant=sv.quant)
        self._check(cancel)
        with self._idle:
            self._inflight += 1
        try:
            return self._run(req, progress, cancel)
        except Exception as e:
            if self._shutdown.is_set() and not isinstance(e, GenerationCancelled):
                # e.g. the video encoder was stopped by the same signal: report the shutdown, not its effect
                raise GenerationCancelled("The generation was stopped: the server is shutting down.") from e
            raise
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    @property
    def inflight(self) -> int:
        """Runs in progress (validated, not yet returned or raised)."""
        return self._inflight

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Refuse new runs, cancel the running ones at their next step, and wait up to ``timeout`` seconds
        until none is in flight. Returns whether the engine became idle in time."""
        self._shutdown.set()
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout=timeout)

    def _run(self, req: GenerationRequest, progress, cancel) -> GenerationResult:
        t_start = time.perf_counter()
        report = progress or (lambda _f, _d: None)

        def step(lo: float, span: float, label: str) -> Callable[[int], None]:
            def on_step(i: int) -> None:
                self._check(cancel)  # between denoising steps: a cancelled request stops here
                report(lo + span * i / steps, f"{label}: step {i}/{steps}")
            return on_step

        steps = req.steps
        report(0.0, "waiting for the model" if self._model_lock.locked() else "starting")
        with self._model_lock:
            t_wait = time.perf_counter() - t_start
            self._check(cancel)
            if req.model not in self._loaded:
                report(0.01, "loading the model")
            loaded = self._load(req.model)
            bf16, bf16_cached = None, False
            if loaded.pipe is not None:
                bf16, bf16_cached = self._bf16_result(loaded, req, report, step(0.02, 0.38, "bf16"))
            self._check(cancel)
            if loaded.fixed is not None:  # saved quantized: the pipeline as stored, the request's settings unused
                qentry, q_cached = loaded.fixed, True
            else:
                report(0.4, "quantizing the transformer")
                qentry, q_cached = self._quantized(req.model, loaded, req.quant)
            self._check(cancel)
            report(0.45, "quantized: generating")
            t0 = time.perf_counter()
            # per-request K/V state (dither step counters, rate statistics) starts from zero: identical
            # requests give identical frames and K/V byte counts, and the summary measures this generation
            from hq_diffusion.integrations.kv_processors import reset_kv_state

            reset_kv_state(qentry.pipe)  # identical requests give identical results
            qout = self._call(loaded, req, qentry.pipe, step(0.45, 0.4, "quantized"))
            quant_seconds = time.perf_counter() - t0
            self.stats["quant_generations"] += 1
            summary = self._summary_fn(qentry.pipe)  # after the call: K/V rates are measured
        report(0.86, "measuring")
        quant = qout["frames"]
        cmp = self._compare(bf16, qout) if bf16 is not None else {}
        self._check(cancel)
        report(0.92, "writing videos")
        d = self._new_result_dir()
        fps = loaded.fps
        videos = {"quant_video": write_video(os.path.join(d, "quantized.mp4"), quant, fps)}
        if bf16 is not None:
            from hq_diffusion.eval.report import error_maps

            ref = bf16.frames
            videos["bf16_video"] = write_video(os.path.join(d, "bf16.mp4"), ref, fps)
            videos["error_video"] = write_video(
                os.path.join(d, "error.mp4"), error_maps(ref, quant, gain=float(cmp["error_gain"])), fps)
        timings = {
            "bf16_seconds": None if bf16 is None else bf16.seconds,
            "bf16_cached": bf16_cached,
            "quantize_seconds": qentry.seconds,
            "quantized_pipeline_cached": q_cached,
            "quantized_seconds": quant_seconds,
            "queue_wait_seconds": t_wait,
            "total_seconds": time.perf_counter() - t_start,
        }
        report(1.0, "done")
        digests = {"bf16_sha256": None if bf16 is None else frames_digest(bf16.frames),
                   "quantized_sha256": frames_digest(quant)}
        sv = loaded.saved
        reference = ({"model": req.model, "note": "the bf16 pipeline the app quantized", "quantized_dir": None}
                     if sv is None else {"model": sv.reference, "note": sv.note, "quantized_dir": sv.info.path})
        compression = _compression(summary, req.quant.kv_enabled)
        if sv is not None:
            compression["saved"] = {"requested_bps": sv.info.bps, "lattice": sv.quant.lattice,
                                    "storage": sv.info.config.get("storage"), "dtype": sv.info.dtype}
        return GenerationResult(
            request=req, kind=loaded.kind, bf16_video=videos.get("bf16_video"), quant_video=videos["quant_video"],
            error_video=videos.get("error_video"), psnr=cmp.get("psnr"), ssim=cmp.get("ssim"),
            lpips=cmp.get("lpips"), lpips_reason=cmp.get("lpips_reason", sv.note if sv else None),
            audio_snr_db=cmp.get("audio_snr"), error_gain=cmp.get("error_gain"), compression=compression,
            timings=timings, digests=digests, shape=tuple(int(x) for x in quant.shape[:3]), reference=reference)

    def _bf16_result(self, loaded: _Loaded, req: GenerationRequest, report, on_step) -> tuple[_Bf16, bool]:
        """(the float pipeline's output for ``req``, whether it came from the cache). Caller holds the lock."""
        bkey = (req.model, req.prompt, req.negative_prompt, req.seed, req.frames, req.height, req.width, req.steps)
        bf16 = self._bf16.get(bkey)
        if bf16 is not None:
            self._bf16.move_to_end(bkey)
            self.stats["bf16_cache_hits"] += 1
            return bf16, True
        report(0.02, "bf16: generating")
        t0 = time.perf_counter()
        out = self._call(loaded, req, loaded.pipe, on_step)
        bf16 = _Bf16(out["frames"], out["audio"], out["audio_rate"], time.perf_counter() - t0)
        self._bf16[bkey] = bf16
        while len(self._bf16) > self.settings.result_cache_size:
            self._bf16.popitem(last=False)
        self.stats["bf16_generations"] += 1
        return bf16, False

    def _compare(self, bf16: _Bf16, qout: dict) -> dict:
        """PSNR, SSIM, LPIPS (and its reason), audio SNR and error-map gain of the quantized output vs bf16."""
        ref, quant = bf16.frames, qout["frames"]
        if ref.shape != quant.shape:
            raise RuntimeError(f"bf16 and quantized outputs differ in shape: {ref.shape} vs {quant.shape}")
        from hq_diffusion.eval import metrics as M

        lp, lp_reason = self._lpips_values(ref, quant)
        audio_snr = None
        if bf16.audio is not None and qout["audio"] is not None:
            try:
                audio_snr = M.audio_snr_db(bf16.audio, qout["audio"])
            except ValueError as e:
                log.warning("audio SNR not computed: %s", e)
        return {"psnr": M.psnr_per_frame(ref, quant), "ssim": M.ssim_per_frame(ref, quant), "lpips": lp,
                "lpips_reason": lp_reason, "audio_snr": audio_snr, "error_gain": error_gain(ref, quant)}

    def _lpips_values(self, ref: np.ndarray, quant: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        from hq_diffusion.eval.metrics import LPIPS_MIN_SIDE, LPIPSMetric

        with self._lpips_lock:
            if self._lpips is None:
                self._lpips = LPIPSMetric()
            metric = self._lpips
            if not metric.available:
                return None, metric.reason
            side = LPIPS_MIN_SIDE[metric.net]
            if min(ref.shape[1:3]) < side:
                return None, f"frames are smaller than the {side} px the {metric.net} backbone needs"
            return metric(ref, quant), ("plumbing weights: not a perceptual number" if metric.plumbing
                                        else None)

    def _new_result_dir(self) -> str:
        """A fresh directory for one result's videos; the oldest ones beyond a bound are removed (Gradio
        has copied them into its own cache by then)."""
        with self._dirs_lock:
            self._counter += 1
            d = os.path.join(self.workdir, f"r{self._counter:06d}")
            os.makedirs(d)
            self._result_dirs.append(d)
            old = self._result_dirs[:-_KEEP_RESULT_DIRS]
            del self._result_dirs[:-_KEEP_RESULT_DIRS]
        for o in old:
            shutil.rmtree(o, ignore_errors=True)
        return d

    def close(self) -> None:
        """Drop the pipelines and remove the work directory (when the engine created it)."""
        with self._model_lock:
            self._quant.clear()
            self._bf16.clear()
            self._loaded.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        _release_memory()

