"""Tiny offline diffusers pipelines and the Linear shapes of the real DiT checkpoints.

Everything here is built from configs in code with random weights: no model hub, no network, no files.

Public API
----------
- :func:`tiny_pipeline` -- a tiny, seeded, randomly initialised ``LTXPipeline`` / ``LTX2Pipeline`` /
  ``PixArtSigmaPipeline`` / ``FluxPipeline`` / ``StableDiffusion3Pipeline`` / ``WanPipeline`` /
  ``CogVideoXPipeline`` / ``HunyuanVideoPipeline`` / ``SanaPipeline`` whose every component is real (transformer, VAE, scheduler,
  text encoder(s), tokenizer(s) built from an in-memory vocabulary; LTX-2 also its audio VAE, vocoder and
  text connectors).
- :func:`tiny_transformer` -- the tiny transformer of any registered family.
- :data:`DEFAULT_CALL_KWARGS` -- per pipeline, the ``__call__`` kwargs of a fast, valid generation.
- :func:`generate` -- run a pipeline reproducibly and return float32 frames in ``[0, 1]``.
- :data:`REAL_CONFIGS` / :func:`real_linear_shapes` -- transformer configs of the released checkpoints and the
  ``(name, in_features, out_features)`` of every ``nn.Linear`` they contain, built on the ``meta`` device.

What is known about each family (pipeline/transformer classes, generation defaults, real configs, tiny
builders) lives in :mod:`hq_diffusion.integrations.families`; the tiny builders in :mod:`hq_diffusion.tiny`.
Nothing is configured at import time (no environment variables, no logging levels, no global seeds).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from typing import Any

import numpy as np
import torch
from torch import nn

from hq_diffusion.integrations import families

__all__ = [
    "PIPELINE_NAMES",
    "DEFAULT_CALL_KWARGS",
    "REAL_CONFIGS",
    "tiny_pipeline",
    "trained_pipeline",
    "trained_call_kwargs",
    "tiny_transformer",
    "generate",
    "native_call_defaults",
    "real_linear_shapes",
]

#: The pipeline names understood by :func:`tiny_pipeline` and :func:`generate`: the registered families
#: with a full tiny pipeline (:func:`hq_diffusion.integrations.families.pipeline_keys`).
PIPELINE_NAMES: tuple[str, ...] = families.pipeline_keys()

#: ``DEFAULT_CALL_KWARGS[name]``: kwargs for ``pipe(prompt, **kwargs)`` that make a fast (about a second on
#: CPU) but valid generation with the matching :func:`tiny_pipeline` (each family's ``call_defaults``).
#: Height/width are multiples of 32 and video frame counts are 8k+1 (valid for both the tiny and the real
#: VAEs). Classifier-free guidance is on (batch 2 through the transformer, as in real use); LTX-2's extra
#: STG / modality-isolation passes are off.
DEFAULT_CALL_KWARGS: dict[str, dict[str, Any]] = {k: dict(families.get(k).call_defaults) for k in PIPELINE_NAMES}

#: ``REAL_CONFIGS[name]``: the transformer config of the released checkpoint of every registered family, as
#: constructor kwargs of its diffusers transformer class. Depth keys are overridden by :func:`real_linear_shapes`.
REAL_CONFIGS: dict[str, dict[str, Any]] = {f.key: dict(f.real_config) for f in families.FAMILIES}


def _check_name(name: str, names: tuple[str, ...] = PIPELINE_NAMES) -> str:
    if name not in names:
        extra = ""
        if name in families.keys():
            extra = f" ({name!r} has no tiny pipeline: {families.get(name).note}; use tiny_transformer)"
        raise ValueError(f"Unknown pipeline name {name!r}{extra}; valid names are: {', '.join(names)}.")
    return name


def _builder(family: families.Family):
    module, _, function = family.tiny_builder.partition(":")
    return getattr(importlib.import_module(module), function)


def _seeded(build, seed: int, dtype: torch.dtype):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = build()
    for module in (built.values() if isinstance(built, dict) else [built]):
        if isinstance(module, nn.Module):
            _cast(module, dtype)
            module.eval()
    return built


def trained_pipeline(alias: str = "tiny-ltx-trained", dtype: torch.dtype = torch.float32):
    """Load a trained tiny pipeline shipped with the package (:data:`families.TRAINED`), offline.

    Args:
        alias: a trained model key (``"tiny-ltx-trained"``).
        dtype: dtype of every module (the weights are stored in float32).

    Returns:
        The pipeline (e.g. ``LTXPipeline``), on CPU, modules in eval mode, progress bar disabled.

    Raises:
        hq_diffusion.integrations.families.UnknownFamilyError: ``alias`` is no trained model.
        FileNotFoundError: the weights directory is missing from this installation (named).
    """
    from importlib import resources

    import diffusers

    model = families.trained(alias)
    path = resources.files("hq_diffusion.assets").joinpath(model.asset)
    if not path.joinpath("model_index.json").is_file():
        raise FileNotFoundError(f"the weights of {alias} are missing: {path} has no model_index.json")
    cls = getattr(diffusers, families.get(model.family).pipeline_classes[0])
    pipe = cls.from_pretrained(str(path), local_files_only=True)
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            _cast(module, dtype)
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained_call_kwargs(alias: str) -> dict[str, Any]:
    """``generate`` kwargs of a trained model: its family's ``DEFAULT_CALL_KWARGS`` updated by its own."""
    model = families.trained(alias)
    return {**DEFAULT_CALL_KWARGS[model.family], **model.call_defaults}


def tiny_pipeline(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build a tiny, randomly initialised, fully offline diffusers pipeline (or load a trained one).

    Args:
        name: a trained model key (``"tiny-ltx-trained"``: :func:`trained_pipeline`, ``seed`` unused), a
            random-weight tiny model key (``"tiny-ltx"``, same as its family key) or one of
            :data:`PIPELINE_NAMES`: ``"ltx"`` (``LTXPipeline``), ``"ltx2"`` (``LTX2Pipeline``),
            ``"pixart"`` (``PixArtSigmaPipeline``), ``"flux"`` (``FluxPipeline``), ``"sd3"``, ``"wan"``,
            ``"cogvideox"``, ``"hunyuanvideo"``, ``"sana"`` (each family's first ``pipeline_classes``).
        seed: seeds every random initialisation. Same seed -> bit-identical state dicts; the global torch RNG
            state is saved and restored, so calling this does not disturb the caller's random stream.
        dtype: dtype of every module (e.g. ``torch.bfloat16``); weights are initialised in float32 first, so
            the same seed gives the same (rounded) weights in every dtype.

    Returns:
        The pipeline, on CPU, modules in eval mode, progress bar disabled. The transformers are 2 heads x 32
        (64 wide; LTX-2's audio stream 2 x 16 = 32), 2 blocks (Flux, HunyuanVideo: 1 double + 1 single), and every
        ``nn.Linear`` in the transformer has ``in_features >= 32``. Text encoders are 32 wide, tokenizers are
        built from a ~80-word in-memory vocabulary plus single characters. Generate with
        ``DEFAULT_CALL_KWARGS[name]`` (see :func:`generate`).

    Raises:
        ValueError: for an unknown ``name`` (or a family with only a tiny transformer).
    """
    if families.is_trained(name):
        return trained_pipeline(name, dtype)
    name = families.tiny_aliases().get(name, name)
    _check_name(name)
    family = families.get(name)
    import diffusers

    cls = getattr(diffusers, family.pipeline_classes[0])
    pipe = cls(**_seeded(_builder(family), seed, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_transformer(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The tiny transformer of any registered family (``families.keys()``), seeded as in :func:`tiny_pipeline`.

    For families with a tiny pipeline it is that pipeline's transformer (the other components are built and
    dropped); for a family registered with ``tiny_pipeline=False`` the builder makes the transformer alone.
    :func:`hq_diffusion.tiny.transformers.example_inputs` gives a forward pass of the SD3, Wan, CogVideoX,
    HunyuanVideo and Sana ones.

    Raises:
        ValueError: for an unknown ``name``.
    """
    _check_name(name, families.keys())
    family = families.get(name)
    if family.tiny_pipeline:
        return tiny_pipeline(name, seed, dtype).transformer
    return _seeded(_builder(family), seed, dtype)


def _cast(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``module`` to ``dtype`` in place.

    Goes through ``nn.Module.to`` rather than diffusers' ``ModelMixin.to``, which in diffusers 0.42 logs a
    "modules that should be kept in float32: []" warning on every dtype cast (even to float32, even with an
    empty list). Parameters named by a transformers model's ``_keep_in_fp32_modules`` (T5: ``wo``) stay in
    float32 for float16, as ``from_pretrained(torch_dtype=torch.float16)`` would keep them.
    """
    if dtype == torch.float32:
        return
    nn.Module.to(module, dtype=dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if dtype == torch.float16 and keep:
        for sub_name, sub in module.named_modules():
            if any(k in sub_name.split(".") for k in keep):
                nn.Module.to(sub, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Generation.
# ----------------------------------------------------------------------------------------------------------

def _frames_to_numpy(frames: Any, video: bool) -> np.ndarray:
    """First batch item of a pipeline's frames/images output -> float32 (F, H, W, 3)."""
    if isinstance(frames, list):  # PIL output: list (images) or list of lists (videos)
        item = frames[0]
        if not video:
            item = [item]
        return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in item])
    if isinstance(frames, torch.Tensor):
        arr = frames[0].detach().float().cpu()
        # "pt" output: images (B, C, H, W), videos (B, F, C, H, W) -> channels last.
        arr = arr.unsqueeze(0) if not video else arr
        arr = arr.permute(0, 2, 3, 1).numpy()
    else:
        arr = np.asarray(frames[0], dtype=np.float32)
        if not video:  # "np" images: (B, H, W, C); videos: (B, F, H, W, C)
            arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"Unexpected frames shape {arr.shape}; expected (frames, H, W, 3).")
    return np.ascontiguousarray(arr, dtype=np.float32)


def generate(pipe, name: str, prompt: str, seed: int = 0, **overrides: Any):
    """Run ``pipe`` on ``prompt`` with ``DEFAULT_CALL_KWARGS[name]`` (updated by ``overrides``), reproducibly.

    Args:
        pipe: a pipeline of the kind named by ``name`` (tiny or real).
        name: ``"ltx"``, ``"ltx2"``, ``"pixart"`` or ``"flux"``.
        prompt: the text prompt (a single string; one video/image is returned).
        seed: seeds a fresh CPU ``torch.Generator`` that draws all the pipeline's noise, so the same
            ``(pipe, prompt, seed, overrides)`` gives the same output. The global RNG is not touched.
        **overrides: any ``__call__`` kwargs, e.g. ``num_inference_steps=4``, ``height=64``,
            ``output_type="pt"``. ``output_type`` may be ``"np"``, ``"pt"`` or ``"pil"``, not ``"latent"``.

    Returns:
        For ``"ltx"``, ``"pixart"`` and ``"flux"``: a float32 numpy array ``(frames, H, W, 3)`` in ``[0, 1]``
        (``frames == 1`` for the image models). For ``"ltx2"``: a dict ``{"frames": that array, "audio":
        float32 array (channels, samples) or None, "audio_sample_rate": int or None}``.

    Raises:
        ValueError: for an unknown ``name`` or ``output_type="latent"``.
    """
    _check_name(name)
    kwargs = copy.deepcopy(DEFAULT_CALL_KWARGS[name])
    kwargs.update(overrides)
    if kwargs.get("output_type") == "latent":
        raise ValueError("generate() returns decoded frames; call the pipeline directly for latents.")
    kwargs["generator"] = torch.Generator(device="cpu").manual_seed(int(seed))
    kwargs["return_dict"] = True
    out = pipe(prompt=prompt, **kwargs)
    family = families.get(name)
    frames = _frames_to_numpy(out.frames if family.video else out.images, video=family.video)
    if not family.audio:
        return frames
    audio = getattr(out, "audio", None)
    audio_np = None
    sample_rate = None
    if audio is not None:
        a = audio[0] if isinstance(audio, (torch.Tensor, np.ndarray, list)) else audio
        a = a.detach().float().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float32)
        audio_np = np.ascontiguousarray(a, dtype=np.float32)
        vocoder = getattr(pipe, "vocoder", None)
        if vocoder is not None:
            sample_rate = int(vocoder.config.output_sampling_rate)
    return {"frames": frames, "audio": audio_np, "audio_sample_rate": sample_rate}


def native_call_defaults(pipeline_class: str, name: str) -> dict[str, Any]:
    """For a pipeline loaded from a directory: its own ``__call__`` defaults for the keys that
    ``DEFAULT_CALL_KWARGS[name]`` tunes for the tiny pipelines (the family's ``tuned_keys``).

    Args:
        pipeline_class: the diffusers pipeline class name (``model_index.json``'s ``_class_name``).
        name: the family key (``"ltx"``, ...).

    Returns:
        ``{key: default}`` for each tuned key that ``pipeline_class.__call__`` takes with a default.
    """
    import diffusers

    params = inspect.signature(getattr(diffusers, pipeline_class).__call__).parameters
    return {k: params[k].default for k in families.get(name).tuned_keys
            if k in params and params[k].default is not inspect.Parameter.empty}


# ----------------------------------------------------------------------------------------------------------
# Real checkpoint configurations (transformer only) and their Linear shapes.
# ----------------------------------------------------------------------------------------------------------

def _real_class(name: str):
    import diffusers

    return getattr(diffusers, families.get(name).transformer_classes[0])


def real_linear_shapes(name: str, num_layers: int = 1) -> list[tuple[str, int, int]]:
    """``(module name, in_features, out_features)`` of every ``nn.Linear`` in the real transformer.

    The transformer is instantiated from ``REAL_CONFIGS[name]`` with its depth cut to ``num_layers`` blocks
    (Flux, HunyuanVideo: ``num_layers`` double-stream and ``num_layers`` single-stream blocks; the family's
    ``depth_keys``) on the ``meta`` device, so
    no memory is allocated and nothing is downloaded. Every block of a model has the same shapes, so one
    block tells the per-block story; the non-block layers (patch/caption projections, timestep embedders,
    output projection) are included too.

    Args:
        name: any registered family key (``families.keys()``: ``"ltx"``, ``"ltx2"``, ``"pixart"``, ``"flux"``,
            ``"sd3"``, ``"wan"``, ``"cogvideox"``, ``"hunyuanvideo"``, ``"sana"``).
        num_layers: number of transformer blocks to instantiate (>= 1).

    Returns:
        list of ``(qualified module name, in_features, out_features)`` in ``named_modules()`` order, e.g.
        ``("transformer_blocks.0.attn1.to_k", 2048, 2048)`` for LTX-Video.

    Raises:
        ValueError: for an unknown ``name`` or ``num_layers < 1``.
    """
    _check_name(name, families.keys())
    if int(num_layers) < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
    config = dict(REAL_CONFIGS[name])
    for key in families.get(name).depth_keys:
        config[key] = int(num_layers)
    cls = _real_class(name)
    with torch.device("meta"):
        model = cls(**config)
    return [
        (mod_name, module.in_features, module.out_features)
        for mod_name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
