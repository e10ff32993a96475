"""Configuration of ``hq-diffusion eval``: the model families it knows (``--model`` aliases, pipeline classes
of a PATH, read from the family registry :mod:`hq_diffusion.integrations.families`), :class:`EvalConfig` and :func:`build_config`, which validates the parsed arguments before any
long work.  The parser itself is :func:`hq_diffusion.eval.cli.build_parser`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

from hq_diffusion.integrations import families, genrules

from . import report as R
from .files import EvalInputError, default_prompts_file, read_prompts, shapes_prompts_file
from .saved import SavedQuantized, choose_reference, inspect_quantized, is_quantized_dir

__all__ = ["EvalConfig", "MODEL_ALIASES", "PIPELINE_CLASSES", "VIDEO_PIPELINES", "DTYPES", "resolve_model",
           "build_config", "fingerprint"]

#: ``--model`` names of the embedded tiny pipelines -> family keys (``hq_diffusion.models`` pipeline names).
MODEL_ALIASES: dict[str, str] = families.tiny_aliases()
#: diffusers pipeline classes a ``--model PATH`` may hold -> family keys.
PIPELINE_CLASSES: dict[str, str] = families.pipeline_classes()
VIDEO_PIPELINES: tuple[str, ...] = families.video_keys()
DTYPES = ("bfloat16", "float16", "float32")


# --------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EvalConfig:
    """A validated evaluation run (build it with :func:`build_config`).

    Args:
        model: ``tiny-ltx-trained`` (trained weights) / ``tiny-ltx`` / ``tiny-ltx2`` / ``tiny-pixart`` /
            ``tiny-flux`` / ... (random weights) or a diffusers pipeline dir.
        pipeline: ``hq_diffusion.models`` pipeline name (``ltx``, ``ltx2``, ``pixart``, ``flux``).
        prompts: the prompts evaluated (after ``--num-prompts``).
        seeds: generation seeds; each prompt is run with each seed.
        bps_list: weight bit rates, in sweep order.
        quantize: keyword arguments of ``hq_diffusion.quantize`` other than ``bps``.
        call_overrides: ``generate`` overrides (on top of ``models.DEFAULT_CALL_KWARGS[pipeline]``).
        dtype: dtype of both the reference and the pipeline that is quantized.
        model_seed: seed of the tiny pipelines' random initialisation (ignored for a PATH).
        quantized: for a ``--model`` saved quantized by hq-diffusion, the digest of its files (its
            ``hq_manifest.json``, else its transformer config); None when ``model`` is quantized by the run.
        reference: with ``quantized``: the float reference (tiny key or pipeline dir), None for a quant-only run.
        reference_note: with ``quantized``: where ``reference`` came from, or why there is none.
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
    quantized: str | None = None
    reference: str | None = None
    reference_note: str | None = None

    @property
    def is_tiny(self) -> bool:
        return self.model in MODEL_ALIASES

    @property
    def ref_model(self) -> str | None:
        """What the reference is generated from: ``model`` itself, or for a saved quantized ``model`` the
        ``reference`` (a tiny key or a float directory; None: a quant-only run)."""
        return self.reference if self.quantized else self.model

    @property
    def ref_is_tiny(self) -> bool:
        return self.ref_model in MODEL_ALIASES

    @property
    def is_trained(self) -> bool:
        """A tiny model with shipped trained weights (``tiny-ltx-trained``; ``model_seed`` does not apply)."""
        return families.is_trained(self.model)

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
        ref = self.ref_model
        ref_id = ref if ref is None or self.ref_is_tiny else os.path.realpath(ref)
        return {"model": ref_id, "model_seed": self.model_seed if self.ref_is_tiny else None,
                "pipeline": self.pipeline, "dtype": self.dtype, "call_kwargs": self.call_kwargs()}

    def run_fingerprint_data(self) -> dict:
        """What every quantized output depends on, apart from its bps, prompt and seed."""
        extra = {} if self.quantized is None else {"quantized_model": [self.model_id(), self.quantized]}
        return {**self.gen_fingerprint_data(), "quantizer": self.quantizer, "quantize": self.quantize, **extra}

    def quant_fingerprint(self, bps: float) -> str:
        return fingerprint({**self.run_fingerprint_data(), "bps": float(bps)})

    def gen_fingerprint(self) -> str:
        return fingerprint(self.gen_fingerprint_data())


def fingerprint(obj: Any) -> str:
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
    from hq_diffusion.models import native_call_defaults

    with open(os.path.join(model, "model_index.json"), encoding="utf-8") as fh:
        return native_call_defaults(json.load(fh)["_class_name"], pipeline)


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


_FIXED_BY_DIR = (("bps", "--bps"), ("lattice", "--lattice"), ("schemes", "--schemes"), ("kv_bps", "--kv-bps"),
                 ("kv_correction", "--kv-correction"), ("storage", "--storage"), ("skip", "--skip"),
                 ("mma", "--mma"))
#: parser defaults of the quantization options (None in the parser, so that a given flag can be told apart)
_QUANT_DEFAULTS = {"bps": "4", "lattice": "e8", "mma": "auto", "kv_correction": "haar+dither", "storage": "rice"}


def _quantized_model(args: argparse.Namespace) -> tuple[SavedQuantized, str, str | None, str]:
    """For a ``--model`` saved quantized: (what it says, its digest, the reference or None, the note).  The
    quantization options are refused (the directory fixes them), the manifest is verified up front."""
    sq = inspect_quantized(args.model)
    given = [flag for key, flag in _FIXED_BY_DIR if getattr(args, key, None) is not None]
    if given:
        raise EvalInputError(f"{', '.join(given)}: --model {args.model} is saved quantized "
                             f"({sq.config.get('lattice', '?').upper()} at {sq.bps:g} bps), which fixes the "
                             f"quantization; drop {'these options' if len(given) > 1 else 'this option'}")
    from hq_diffusion.codec import HQFormatError
    from hq_diffusion.integrations.manifest import MANIFEST_NAME, sha256_file, verify_manifest

    manifest = os.path.join(sq.path, MANIFEST_NAME)
    try:
        if os.path.isfile(manifest):
            verify_manifest(sq.path)
        digest = sha256_file(manifest if os.path.isfile(manifest)
                             else os.path.join(sq.path, "transformer", "config.json"))
    except (HQFormatError, OSError) as e:
        raise EvalInputError(f"--model {args.model}: {e}") from None
    return (sq, digest, *choose_reference(sq, args.reference))


def build_config(args: argparse.Namespace) -> EvalConfig:
    """Validate parsed ``hq-diffusion eval`` arguments into an :class:`EvalConfig`.

    Everything that can be checked without loading a model is checked here, before any long work.  A
    ``--model`` saved quantized by hq-diffusion is the quantized side as it is (see :mod:`.saved`); the
    reference is ``--reference``, else the origin the directory records, else none (a quant-only run).
    Raises:
        EvalInputError: with a one-line message naming the bad value.
    """
    quantized = reference = note = None
    if is_quantized_dir(args.model):
        sq, quantized, reference, note = _quantized_model(args)
        pipeline = PIPELINE_CLASSES[sq.pipeline_class]
        origin = reference if reference is not None else sq.source  # its generation defaults apply
        tiny_ref = origin in MODEL_ALIASES
        dtype = args.dtype or sq.dtype or "bfloat16"
    else:
        pipeline = resolve_model(args.model)
        if getattr(args, "reference", None) is not None:
            raise EvalInputError(f"--reference applies to a --model saved quantized by hq-diffusion; "
                                 f"{args.model} is quantized by the run and is its own reference")
        tiny_ref = args.model in MODEL_ALIASES
        origin = args.model
        dtype = args.dtype or "bfloat16"
    trained = origin is not None and families.is_trained(origin)
    prompts_file = args.prompts or (shapes_prompts_file() if trained else default_prompts_file())
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
    if quantized is not None:
        bps_list = [sq.bps]
        quantize = {k: sq.config.get(k) for k in ("lattice", "mma", "kv_bps", "kv_correction", "skip", "storage")}
    else:
        opt = {k: getattr(args, k, None) or d for k, d in _QUANT_DEFAULTS.items()}
        bps_list = _parse_list(opt["bps"], float, "--bps")
        if len({R.bps_key(b) for b in bps_list}) != len(bps_list):
            raise EvalInputError(f"--bps has duplicates: {opt['bps']}")
        skip = None
        if args.skip is not None:
            skip = [s.strip() for s in args.skip.split(",") if s.strip()]
        quantize = {"lattice": opt["lattice"], "mma": opt["mma"],
                    "kv_bps": None if args.kv_bps is None else float(args.kv_bps),
                    "kv_correction": opt["kv_correction"], "skip": skip, "storage": opt["storage"]}
        _check_quantize_options(bps_list, quantize)

    overrides: dict[str, Any] = {}
    if trained:
        overrides.update(families.trained(origin).call_defaults)
    if not tiny_ref:
        overrides.update(_native_call_defaults(args.model, pipeline))
    # the app's rules and words (hq_diffusion.integrations.genrules), without the server's upper limits
    for flag, key in (("steps", "num_inference_steps"), ("frames", "num_frames"), ("height", "height"),
                      ("width", "width")):
        v = getattr(args, flag)
        if v is None:
            continue
        if flag == "frames" and pipeline not in VIDEO_PIPELINES:
            raise EvalInputError(f"--frames applies to video pipelines only; {args.model} makes images")
        problem = (genrules.steps_problem(v) if flag == "steps" else genrules.frames_problem(v) if flag == "frames"
                   else genrules.size_problem(flag.capitalize(), v))
        if problem is not None:
            raise EvalInputError(f"--{flag}: {problem}")
        overrides[key] = int(v)
    if args.lpips_weights is not None and not os.path.isfile(args.lpips_weights):
        raise EvalInputError(f"--lpips-weights {args.lpips_weights} does not exist")
    out = _check_out_dir(args.out)
    return EvalConfig(
        model=args.model, pipeline=pipeline, prompts=tuple(prompts), seeds=tuple(seeds),
        bps_list=tuple(bps_list), out=out, quantize=quantize, call_overrides=overrides, dtype=dtype,
        model_seed=args.model_seed,
        lpips_weights=os.path.abspath(args.lpips_weights) if args.lpips_weights else None,
        prompts_file=os.path.abspath(prompts_file), device=args.device,
        quantized=quantized, reference=reference if quantized is not None else None, reference_note=note,
    )
