"""Settings of the Gradio app and validation of one generation request. No Gradio, no torch.

Everything a user (or an API client) can send is checked here by :meth:`GenerationRequest.validate`, which
raises :class:`InputError` listing every problem at once in plain words; the UI turns it into a
``gr.Error`` popup and API clients get the same text.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field

from hq_diffusion.integrations import families, genrules

__all__ = [
    "TINY_MODELS",
    "TINY_KINDS",
    "VIDEO_KINDS",
    "LATTICE_CHOICES",
    "MMA_CHOICES",
    "KV_CORRECTION_CHOICES",
    "InputError",
    "Limits",
    "AppSettings",
    "QuantSettings",
    "GenerationRequest",
    "is_tiny",
]

#: Embedded tiny pipelines (random weights, built in code): model key -> label shown in the UI.
#: The keys are the ``--model`` names of ``hq-diffusion eval`` too. From the family registry
#: (:mod:`hq_diffusion.integrations.families`, torch-free): the families with a full tiny pipeline.
TINY_MODELS: dict[str, str] = families.tiny_models()
#: tiny model key -> ``hq_diffusion.models`` pipeline name (the family key).
TINY_KINDS: dict[str, str] = families.tiny_aliases()
#: Pipeline kinds (``hq_diffusion.models.PIPELINE_NAMES``) that make videos; the others make one image.
VIDEO_KINDS = frozenset(families.video_keys())

# The quantizer's own choices (hq_diffusion.integrations.config); repeated here so that building the UI does
# not import torch. tests/test_app.py checks that the two lists agree.
LATTICE_CHOICES: tuple[str, ...] = ("e8", "d4", "a2", "z")
MMA_CHOICES: tuple[str, ...] = ("auto", "bf16", "int8", "fp8", "nvfp4", "mxfp4")
KV_CORRECTION_CHOICES: tuple[str, ...] = (
    "haar+dither", "signs+dither", "none+dither", "haar", "signs", "none",
)


#: Measured rate of one bf16 generation of the tiny LTX pipeline on the development CPU (2 cores shared with
#: other jobs, load average ~4.9), in frame-pixel-steps (frames x height x width x steps) per second. Measured
#: once (2026-11-27) with::
#:
#:     python -c "import time, torch; from hq_diffusion.models import tiny_pipeline, generate
#:     pipe = tiny_pipeline('ltx', seed=0, dtype=torch.bfloat16)
#:     for f, s, st in ((9, 128, 2), (17, 256, 2)):
#:         t = time.perf_counter(); generate(pipe, 'ltx', 'a cat', 0, num_inference_steps=st, height=s,
#:                                           width=s, num_frames=f); print(f * s * s * st / (time.perf_counter() - t))"
#:
#: which gave 24,540 (9x128x128, 2 steps: 12.0 s) and 21,481 (17x256x256, 2 steps: 103.7 s); the slower is
#: taken. (The issue's 512x512, 33 frames at 54 s per step is ~160,000 per second of a lighter-loaded CPU.)
COST_RATE = 21_481
#: Seconds of model time one request may take (a request runs the bf16 and the quantized pipeline, so twice
#: the generation time); the budget :attr:`Limits.cost_max` follows from it and :data:`COST_RATE`.
COST_SECONDS = 120
COST_MAX = COST_RATE * COST_SECONDS // 2


class InputError(ValueError):
    """A request outside the app's limits; ``problems`` lists each problem as one sentence."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(" ".join(self.problems))


def is_tiny(model: str) -> bool:
    return model in TINY_MODELS


@dataclass(frozen=True)
class Limits:
    """Input limits of one request (inclusive). Frames: ``4k+1`` for video models. Besides each field's range,
    the work of a request (frames x height x width x steps) must not exceed ``cost_max``; a request over it is
    refused with a message before any work is done."""

    prompt_max_chars: int = 500
    frames_max: int = 33
    size_min: int = 32
    size_max: int = 512
    size_multiple: int = 32
    steps_min: int = 1
    steps_max: int = 50
    bps_min: float = 2.0
    bps_max: float = 8.0
    seed_max: int = 2**32 - 1
    #: The most work one request may ask for, in frames x height x width x steps (see :data:`COST_MAX`).
    cost_max: int = COST_MAX

    def cost(self, frames: int, height: int, width: int, steps: int) -> int:
        """Work of one request in frame-pixel-steps (frames x height x width x steps)."""
        return int(frames) * int(height) * int(width) * int(steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AppSettings:
    """How the app is served.

    Args:
        host: interface to bind; loopback (127.0.0.1) by default. The app never opens a share link.
        port: TCP port.
        models: model keys offered in the UI, the first being the default: the tiny embedded pipelines
            (any key of ``TINY_MODELS``; by default ``"tiny-ltx-trained"`` (trained weights), ``"tiny-ltx"``,
            ``"tiny-ltx2"``, ``"tiny-pixart"``, ``"tiny-flux"`` (random weights)) and/or local diffusers
            pipeline directories: float ones (quantized by the app with the settings of each request) or ones
            saved quantized by hq-diffusion (served as stored; see ``reference``).
        reference: the float reference of the models saved quantized: a tiny model key or a float pipeline
            directory of the same pipeline class, ``"none"`` (the quantized output alone, no PSNR/SSIM), or
            None (the default: the origin each directory records, else none). Checked by the engine.
        max_concurrency: generations that may be in flight at once (the model itself runs one at a time).
        queue_size: requests that may wait in the queue before new ones are turned away.
        quant_cache_size: quantized pipelines kept (LRU), keyed by model and quantization settings.
        result_cache_size: bf16 generations kept (LRU), keyed by model, prompts, seed, size, frames, steps.
        tiny_seed: seed of the tiny pipelines' random weights.
        device: torch device for local checkpoints (None: CUDA when available, else CPU). Tiny models run on
            CPU.
        fps: playback frame rate of the videos (None: 8 for tiny models, the pipeline's rate otherwise).
        limits: input limits.
    """

    host: str = "127.0.0.1"
    port: int = 7860
    # The default offer; every key of TINY_MODELS (one per registered family) may be named.
    models: tuple[str, ...] = ("tiny-ltx-trained", "tiny-ltx", "tiny-ltx2", "tiny-pixart", "tiny-flux")
    max_concurrency: int = 2
    queue_size: int = 16
    quant_cache_size: int = 2
    result_cache_size: int = 16
    tiny_seed: int = 0
    device: str | None = None
    fps: float | None = None
    reference: str | None = None
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        models = tuple(self.models)
        if not models:
            raise ValueError("AppSettings.models must name at least one model")
        for m in models:
            if not is_tiny(m) and not os.path.isdir(m):
                raise ValueError(
                    f"AppSettings.models: {m!r} is neither a tiny model ({', '.join(TINY_MODELS)}) nor a "
                    f"local diffusers pipeline directory")
        if self.reference is not None and not any(genrules.quantized_components(m) for m in models
                                                   if not is_tiny(m)):
            raise ValueError(f"--reference applies to a --model saved quantized by hq-diffusion; none of "
                             f"{', '.join(models)} is")
        # the default first, no duplicates
        object.__setattr__(self, "models", tuple(dict.fromkeys(models)))
        if not (0 <= int(self.port) <= 65535):
            raise ValueError(f"AppSettings.port must be in 0..65535, got {self.port}")
        for name in ("max_concurrency", "queue_size", "quant_cache_size", "result_cache_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AppSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.fps is not None and not (0 < float(self.fps) <= 120):
            raise ValueError(f"AppSettings.fps must be in (0, 120], got {self.fps}")

    @property
    def default_model(self) -> str:
        return self.models[0]

    @property
    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


@dataclass(frozen=True)
class QuantSettings:
    """Quantization settings chosen in the UI (a cache key: equal settings reuse the quantized pipeline)."""

    bps: float = 4.0
    lattice: str = "e8"
    mma: str = "auto"
    kv_enabled: bool = False
    kv_bps: float = 4.0
    kv_correction: str = "haar+dither"

    def quantize_kwargs(self) -> dict:
        """Keyword arguments of ``hq_diffusion.quantize``."""
        return dict(bps=float(self.bps), lattice=self.lattice, mma=self.mma,
                    kv_bps=float(self.kv_bps) if self.kv_enabled else None, kv_correction=self.kv_correction)

    def key(self) -> tuple:
        kv = (float(self.kv_bps), self.kv_correction) if self.kv_enabled else None
        return (float(self.bps), self.lattice, self.mma, kv)


def _text_problem(label: str, text, required: bool, max_chars: int) -> str | None:
    """The problem with one prompt field (None when it is fine): not text, empty, too long, or not encodable
    as UTF-8 (a lone surrogate such as ``"\\ud800"``)."""
    if not isinstance(text, str):
        return f"The {label} must be text; got {type(text).__name__} {_short_repr(text)}."
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"The {label} contains a character that is not valid text ({text[e.start]!r}, a lone surrogate, "
                f"at position {e.start}); send it as UTF-8.")
    if required and not text.strip():
        return f"The {label} is empty: describe what to generate."
    if len(text) > max_chars:
        return f"The {label} has {len(text)} characters; the limit is {max_chars}."
    return None


def _short_repr(v, n: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _is_int(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, float) and v.is_integer()


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


@dataclass(frozen=True)
class GenerationRequest:
    """One Generate click (or ``/generate`` API call)."""

    model: str
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    frames: int = 9
    height: int = 64
    width: int = 64
    steps: int = 4
    quant: QuantSettings = field(default_factory=QuantSettings)

    def validate(self, settings: AppSettings, kind: str | None) -> "GenerationRequest":
        """Check every field against ``settings.limits``; return a normalized copy (ints as int, prompts
        stripped, frames forced to 1 for image models).

        Args:
            settings: the app settings (limits, offered models).
            kind: the pipeline kind of ``model`` (``"ltx"``, ``"ltx2"``, ``"pixart"``, ``"flux"``), or None
                when the model is not one of ``settings.models`` (reported as a problem).

        Raises:
            InputError: listing every problem found.
        """
        lim = settings.limits
        problems: list[str] = []
        if self.model not in settings.models:
            problems.append(f"Unknown model {self.model!r}; choose one of: {', '.join(settings.models)}.")
        prompt = self.prompt if isinstance(self.prompt, str) else None
        negative = self.negative_prompt if self.negative_prompt is not None else ""
        for label, text, required in (("prompt", self.prompt, True), ("negative prompt", negative, False)):
            problem = _text_problem(label, text, required, lim.prompt_max_chars)
            if problem:
                problems.append(problem)
        if not _is_int(self.seed) or not (0 <= self.seed <= lim.seed_max):
            problems.append(f"Seed must be a whole number from 0 to {lim.seed_max}; got {self.seed!r}.")
        video = kind in VIDEO_KINDS
        frames = self.frames
        if video:
            if (problem := genrules.frames_problem(frames, lim.frames_max)) is not None:
                problems.append(problem)
        else:
            frames = 1  # image models: one frame, whatever was sent
        for name, v in (("Height", self.height), ("Width", self.width)):
            if (problem := genrules.size_problem(name, v, lim.size_min, lim.size_max, lim.size_multiple)):
                problems.append(problem)
        if (problem := genrules.steps_problem(self.steps, lim.steps_min, lim.steps_max)) is not None:
            problems.append(problem)
        q = self.quant
        if not _is_number(q.bps) or not (lim.bps_min <= q.bps <= lim.bps_max):
            problems.append(f"Weight bits per weight must be from {lim.bps_min:g} to {lim.bps_max:g}; "
                            f"got {q.bps!r}.")
        if q.lattice not in LATTICE_CHOICES:
            problems.append(f"Lattice must be one of {', '.join(LATTICE_CHOICES)}; got {q.lattice!r}.")
        if q.mma not in MMA_CHOICES:
            problems.append(f"Matmul path must be one of {', '.join(MMA_CHOICES)}; got {q.mma!r}.")
        if not isinstance(q.kv_enabled, bool):
            problems.append(f"K/V quantization must be on or off (true/false); got {q.kv_enabled!r}.")
        elif q.kv_enabled:
            if not _is_number(q.kv_bps) or not (lim.bps_min <= q.kv_bps <= lim.bps_max):
                problems.append(f"K/V bits per scalar must be from {lim.bps_min:g} to {lim.bps_max:g}; "
                                f"got {q.kv_bps!r}.")
            if q.kv_correction not in KV_CORRECTION_CHOICES:
                problems.append(f"K/V correction must be one of {', '.join(KV_CORRECTION_CHOICES)}; "
                                f"got {q.kv_correction!r}.")
        if not problems:  # every field valid: the work asked for must fit the budget
            cost = lim.cost(frames, self.height, self.width, self.steps)
            if cost > lim.cost_max:
                problems.append(
                    f"This request asks for {cost:,} frame-pixel-steps (frames {int(frames)} x height "
                    f"{int(self.height)} x width {int(self.width)} x steps {int(self.steps)}); the limit is "
                    f"{lim.cost_max:,} (about {COST_SECONDS} s of model time on this server). Lower the frames, "
                    f"the size or the steps.")
        if problems:
            raise InputError(problems)
        kv_on = bool(q.kv_enabled)
        quant = QuantSettings(bps=float(q.bps), lattice=q.lattice, mma=q.mma, kv_enabled=kv_on,
                              # K/V settings are irrelevant when K/V is off: normalize them (one cache key)
                              kv_bps=float(q.kv_bps) if kv_on else QuantSettings.kv_bps,
                              kv_correction=q.kv_correction if kv_on else QuantSettings.kv_correction)
        return dataclasses.replace(self, prompt=prompt.strip(), negative_prompt=negative.strip(),
                                   seed=int(self.seed), frames=int(frames), height=int(self.height),
                                   width=int(self.width), steps=int(self.steps), quant=quant)
