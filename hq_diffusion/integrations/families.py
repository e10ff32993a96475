"""The model-family registry: everything the package knows about each DiT family, in one torch-free place.

One frozen :class:`Family` record per family (LTX-Video, LTX-2, PixArt, Flux, SD3, Wan, CogVideoX,
HunyuanVideo, Sana) names its tiny model(s), its diffusers pipeline and transformer classes, its skip rules
(the small, sensitive edges kept in their original dtype), the diffusers attention processors its K/V
quantization handles, its tiny builder, its fast generation defaults and its released checkpoint's config.
:data:`GENERIC_SKIP` is the rule for transformers of no registered family.

This module imports nothing heavy (no torch, no diffusers): the app builds its UI from it without torch.
Builders are ``"module:function"`` strings, imported lazily by :func:`hq_diffusion.models.tiny_pipeline`.

Adding a family = one :class:`Family` entry in :data:`FAMILIES` plus its tiny builder
(see docs/ARCHITECTURE.md, "How to add a model family").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

__all__ = [
    "Family", "UnknownFamilyError", "FAMILIES", "GENERIC_SKIP", "TUNED_KEYS", "REQUEST_KEYS",
    "PATCH_IN", "PATCH_OUT", "TIMESTEP", "CAPTION",
    "get", "keys", "by_alias", "by_pipeline_class", "by_transformer_class", "skip_rules",
    "tiny_models", "tiny_aliases", "pipeline_classes", "video_keys", "pipeline_keys", "tiny_tuned_keys",
    "TrainedModel", "TRAINED", "trained", "is_trained",
]

# Skip reasons.
PATCH_IN = "patch embedding (input projection)"
PATCH_OUT = "output projection (to latent patches)"
TIMESTEP = "timestep / adaLN embedder"
CAPTION = "caption / context projection"

# HQ K/V processor kinds (hq_diffusion.nn.kv): "ltx" HQKVLTXAttnProcessor, "ltx2" HQKVLTX2AttnProcessor,
# "flux" HQKVFluxAttnProcessor, "sdpa" HQKVSDPAProcessor (intercepts torch scaled_dot_product_attention).
KV_KINDS: tuple[str, ...] = ("ltx", "ltx2", "flux", "sdpa")

#: ``__call__`` kwargs whose tiny-pipeline values (:attr:`Family.call_defaults`) are tuned for speed; a
#: pipeline loaded from a directory uses its own ``__call__`` defaults for them instead.
TUNED_KEYS: tuple[str, ...] = (
    "num_inference_steps", "height", "width", "num_frames", "frame_rate", "guidance_scale",
    "audio_guidance_scale", "stg_scale", "audio_stg_scale", "modality_scale", "audio_modality_scale",
    "spatio_temporal_guidance_blocks", "max_sequence_length", "use_resolution_binning",
    "complex_human_instruction", "prompt_template",
)
#: Tuned keys that the app always takes from the request (steps, size, frames).
REQUEST_KEYS: tuple[str, ...] = ("num_inference_steps", "height", "width", "num_frames")

_AP = "diffusers.models.attention_processor."
_TR = "diffusers.models.transformers."


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Family:
    """What the package knows about one DiT family.

    Attributes:
        key: the pipeline name used across the package (``"ltx"``), also ``hq_diffusion.models``' name.
        label: the tiny model's label shown in the app.
        tiny_models: ``--model`` / app keys of the tiny model (``("tiny-ltx",)``); the first is the canonical.
        pipeline_classes: diffusers pipeline class names a local checkpoint of this family may hold.
        transformer_classes: diffusers transformer class names of this family.
        skip: ``(pattern, reason)`` skip rules (see :mod:`hq_diffusion.integrations.presets`).
        kv_processors: ``(diffusers processor class path, HQ processor kind in KV_KINDS)`` pairs that K/V
            quantization replaces.
        kv_unsupported: ``(diffusers processor class path, why)`` of processors it leaves alone.
        tiny_builder: ``"module:function"`` of the tiny builder; it returns the pipeline's components (a dict)
            when ``tiny_pipeline`` is True, else the tiny transformer.
        tiny_pipeline: whether a full tiny pipeline exists (else only the tiny transformer; see ``note``).
        call_defaults: ``pipe(prompt, **call_defaults)`` makes a fast, valid tiny generation.
        video: makes videos (else one image). ``audio``: also makes audio.
        real_config: constructor kwargs of the released checkpoint's transformer.
        depth_keys: the ``real_config`` keys that :func:`hq_diffusion.models.real_linear_shapes` cuts.
        note: anything a user should know (e.g. why no tiny pipeline).
    """

    key: str
    label: str
    tiny_models: tuple[str, ...]
    pipeline_classes: tuple[str, ...]
    transformer_classes: tuple[str, ...]
    skip: tuple[tuple[str, str], ...]
    kv_processors: tuple[tuple[str, str], ...]
    tiny_builder: str
    call_defaults: Mapping[str, Any]
    real_config: Mapping[str, Any]
    tiny_pipeline: bool = True
    video: bool = False
    audio: bool = False
    depth_keys: tuple[str, ...] = ("num_layers",)
    kv_unsupported: tuple[tuple[str, str], ...] = ()
    note: str = ""

    def __post_init__(self):
        for path, kind in self.kv_processors:
            if kind not in KV_KINDS:
                raise ValueError(f"Family {self.key!r}: K/V processor kind {kind!r} of {path} is not one of "
                                 f"{', '.join(KV_KINDS)}")
        if ":" not in self.tiny_builder:
            raise ValueError(f"Family {self.key!r}: tiny_builder {self.tiny_builder!r} must be 'module:function'")
        object.__setattr__(self, "call_defaults", _frozen(self.call_defaults))
        object.__setattr__(self, "real_config", _frozen(self.real_config))

    @property
    def tuned_keys(self) -> tuple[str, ...]:
        """The :data:`TUNED_KEYS` set by this family's ``call_defaults``."""
        return tuple(k for k in TUNED_KEYS if k in self.call_defaults)


class UnknownFamilyError(ValueError):
    """A name that is no registered family key, tiny model, pipeline class or transformer class."""


_LTX_SKIP = (
    ("proj_in", PATCH_IN),
    ("proj_out", PATCH_OUT),
    ("time_embed.*", TIMESTEP),
    ("caption_projection.*", CAPTION),
)
_FAST = dict(num_inference_steps=2, height=32, width=32)
_B = "hq_diffusion.tiny."

# Top-level names are written without wildcards so that a block's own layer of the same name (Flux
# ``single_transformer_blocks.N.proj_out``) is not caught. Names were read off the diffusers 0.42 classes.
FAMILIES: tuple[Family, ...] = (
    Family(
        key="ltx", label="Tiny LTX-Video (random weights)", tiny_models=("tiny-ltx",),
        pipeline_classes=("LTXPipeline",), transformer_classes=("LTXVideoTransformer3DModel",),
        skip=_LTX_SKIP,
        kv_processors=((_TR + "transformer_ltx.LTXVideoAttnProcessor", "ltx"),),
        tiny_builder=_B + "pipelines:build_ltx", video=True,
        call_defaults=dict(_FAST, num_frames=9, frame_rate=25, guidance_scale=3.0, max_sequence_length=16,
                           output_type="np"),
        # Lightricks/LTX-Video 0.9.x, 2B: 28 blocks, 32 heads x 64 = 2048, T5-XXL captions (4096), 128 latent
        # channels. Equal to the LTXVideoTransformer3DModel defaults.
        real_config=dict(
            in_channels=128, out_channels=128, patch_size=1, patch_size_t=1,
            num_attention_heads=32, attention_head_dim=64, cross_attention_dim=2048, num_layers=28,
            activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads", norm_elementwise_affine=False,
            norm_eps=1e-6, caption_channels=4096, attention_bias=True, attention_out_bias=True,
        ),
    ),
    Family(
        key="ltx2", label="Tiny LTX-2 audio+video (random weights)", tiny_models=("tiny-ltx2",),
        pipeline_classes=("LTX2Pipeline",), transformer_classes=("LTX2VideoTransformer3DModel",),
        skip=_LTX_SKIP + (
            ("audio_proj_in", PATCH_IN),
            ("audio_proj_out", PATCH_OUT),
            ("audio_time_embed.*", TIMESTEP),
            ("audio_caption_projection.*", CAPTION),
            ("av_cross_attn_*", TIMESTEP),  # a/v cross-attention scale/shift/gate timestep embedders
        ),
        kv_processors=((_TR + "transformer_ltx2.LTX2AudioVideoAttnProcessor", "ltx2"),
                       (_TR + "transformer_ltx2.LTX2PerturbedAttnProcessor", "sdpa")),
        tiny_builder=_B + "pipelines:build_ltx2", video=True, audio=True,
        # STG needs `spatio_temporal_guidance_blocks` (the default [28] is past the tiny depth) and modality
        # isolation costs an extra transformer pass per step: both off for speed.
        call_defaults=dict(_FAST, num_frames=9, frame_rate=24.0, guidance_scale=3.0, audio_guidance_scale=3.0,
                           stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0, audio_modality_scale=1.0,
                           spatio_temporal_guidance_blocks=None, max_sequence_length=16, output_type="np"),
        # Lightricks/LTX-2 (19B audio-video DiT): 48 blocks; video 32 heads x 128 = 4096, audio 32 x 64 = 2048;
        # Gemma-3-12B captions (3840) through the text connectors. The diffusers 0.42 defaults.
        real_config=dict(
            in_channels=128, out_channels=128, patch_size=1, patch_size_t=1,
            num_attention_heads=32, attention_head_dim=128, cross_attention_dim=4096,
            audio_in_channels=128, audio_out_channels=128, audio_patch_size=1, audio_patch_size_t=1,
            audio_num_attention_heads=32, audio_attention_head_dim=64, audio_cross_attention_dim=2048,
            num_layers=48, activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads",
            norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=3840,
            attention_bias=True, attention_out_bias=True,
        ),
    ),
    Family(
        key="pixart", label="Tiny PixArt-Sigma image (random weights)", tiny_models=("tiny-pixart",),
        pipeline_classes=("PixArtSigmaPipeline", "PixArtAlphaPipeline"),
        transformer_classes=("PixArtTransformer2DModel",),
        skip=(("pos_embed.*", PATCH_IN), ("proj_out", PATCH_OUT), ("adaln_single.*", TIMESTEP),
              ("caption_projection.*", CAPTION)),
        kv_processors=((_AP + "AttnProcessor2_0", "sdpa"), (_AP + "FusedAttnProcessor2_0", "sdpa")),
        tiny_builder=_B + "pipelines:build_pixart",
        call_defaults=dict(_FAST, guidance_scale=4.5, max_sequence_length=16, use_resolution_binning=False,
                           clean_caption=False,  # needs bs4/ftfy, irrelevant for an in-memory vocabulary
                           output_type="np"),
        # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS: 28 blocks, 16 heads x 72 = 1152, T5-XXL captions (4096),
        # 4 latent channels (8 out: learned sigma), 2x2 patches, no resolution/aspect micro-conditions.
        real_config=dict(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            dropout=0.0, norm_num_groups=32, cross_attention_dim=1152, attention_bias=True, sample_size=128,
            patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, upcast_attention=False,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2,
            use_additional_conditions=False, caption_channels=4096, attention_type="default",
        ),
    ),
    Family(
        key="flux", label="Tiny Flux image (random weights)", tiny_models=("tiny-flux",),
        pipeline_classes=("FluxPipeline",), transformer_classes=("FluxTransformer2DModel",),
        skip=(("x_embedder", PATCH_IN), ("proj_out", PATCH_OUT), ("time_text_embed.*", TIMESTEP),
              ("norm_out.*", TIMESTEP), ("context_embedder", CAPTION)),
        kv_processors=((_TR + "transformer_flux.FluxAttnProcessor", "flux"),),
        tiny_builder=_B + "pipelines:build_flux",
        call_defaults=dict(_FAST, guidance_scale=3.5, max_sequence_length=16, output_type="np"),
        # black-forest-labs/FLUX.1-dev: 19 double-stream + 38 single-stream blocks, 24 heads x 128 = 3072,
        # T5-XXL context (4096), CLIP-L pooled (768), 64 packed latent channels, guidance embedding (dev).
        real_config=dict(
            patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        ),
        depth_keys=("num_layers", "num_single_layers"),
    ),
    Family(
        key="sd3", label="Tiny SD3 image (random weights)", tiny_models=("tiny-sd3",),
        pipeline_classes=("StableDiffusion3Pipeline",), transformer_classes=("SD3Transformer2DModel",),
        skip=(("pos_embed.*", PATCH_IN), ("proj_out", PATCH_OUT), ("time_text_embed.*", TIMESTEP),
              ("norm_out.*", TIMESTEP), ("context_embedder", CAPTION)),
        kv_processors=((_AP + "JointAttnProcessor2_0", "sdpa"), (_AP + "FusedJointAttnProcessor2_0", "sdpa"),
                       (_AP + "AttnProcessor2_0", "sdpa")),  # SD3.5's dual-attention blocks (attn2)
        tiny_builder=_B + "pipelines:build_sd3",
        call_defaults=dict(_FAST, guidance_scale=7.0, max_sequence_length=16, output_type="np"),
        # stabilityai/stable-diffusion-3-medium: 24 blocks, 24 heads x 64 = 1536, T5-XXL context (4096),
        # CLIP-L+G pooled (2048), 16 latent channels, 2x2 patches.
        real_config=dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
        ),
    ),
    Family(
        key="wan", label="Tiny Wan video (random weights)", tiny_models=("tiny-wan",),
        pipeline_classes=("WanPipeline",), transformer_classes=("WanTransformer3DModel",),
        skip=(("patch_embedding*", PATCH_IN), ("proj_out", PATCH_OUT),
              ("condition_embedder.time_*", TIMESTEP), ("condition_embedder.text_embedder.*", CAPTION),
              ("condition_embedder.image_embedder.*", CAPTION)),
        kv_processors=((_TR + "transformer_wan.WanAttnProcessor", "sdpa"),),
        tiny_builder=_B + "pipelines:build_wan", video=True,
        call_defaults=dict(_FAST, num_frames=9, guidance_scale=5.0, max_sequence_length=16, output_type="np"),
        # Wan-AI/Wan2.1-T2V-14B: 40 blocks, 40 heads x 128 = 5120, UMT5-XXL text (4096), FFN 13824.
        # Equal to the WanTransformer3DModel defaults.
        real_config=dict(
            patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6,
        ),
    ),
    Family(
        key="cogvideox", label="Tiny CogVideoX video (random weights)", tiny_models=("tiny-cogvideox",),
        pipeline_classes=("CogVideoXPipeline",), transformer_classes=("CogVideoXTransformer3DModel",),
        # patch_embed.text_proj is the caption projection (listed before the patch embedding's own rule).
        skip=(("patch_embed.text_proj", CAPTION), ("patch_embed.*", PATCH_IN), ("proj_out", PATCH_OUT),
              ("time_embedding.*", TIMESTEP), ("ofs_embedding.*", TIMESTEP), ("norm_out.*", TIMESTEP)),
        kv_processors=((_AP + "CogVideoXAttnProcessor2_0", "sdpa"),
                       (_AP + "FusedCogVideoXAttnProcessor2_0", "sdpa")),
        tiny_builder=_B + "pipelines:build_cogvideox", video=True,
        call_defaults=dict(_FAST, num_frames=9, guidance_scale=6.0, max_sequence_length=16, output_type="np"),
        # THUDM/CogVideoX-5b: 42 blocks, 48 heads x 64 = 3072, T5-XXL text (4096), rotary embeddings.
        real_config=dict(
            num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
            text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49,
            patch_size=2, use_rotary_positional_embeddings=True,
        ),
    ),
    Family(
        key="hunyuanvideo", label="Tiny HunyuanVideo video (random weights)",
        tiny_models=("tiny-hunyuanvideo",), pipeline_classes=("HunyuanVideoPipeline",),
        transformer_classes=("HunyuanVideoTransformer3DModel",),
        # The token refiner's blocks (context_embedder.token_refiner.refiner_blocks.*) are transformer blocks:
        # quantized. Its input projection and timestep/pooled-text embedder are not.
        skip=(("x_embedder.*", PATCH_IN), ("proj_out", PATCH_OUT), ("time_text_embed.*", TIMESTEP),
              ("norm_out.*", TIMESTEP), ("context_embedder.time_text_embed.*", TIMESTEP),
              ("context_embedder.proj_in", CAPTION), ("image_projection.*", CAPTION)),
        kv_processors=((_TR + "transformer_hunyuan_video.HunyuanVideoAttnProcessor2_0", "sdpa"),
                       (_AP + "AttnProcessor2_0", "sdpa")),  # the token refiner's self-attention
        tiny_builder=_B + "pipelines:build_hunyuanvideo", video=True,
        # The real chat template's crop_start counts the real Llama tokenizer's tokens: a bare one here.
        call_defaults=dict(_FAST, num_frames=9, guidance_scale=6.0, max_sequence_length=16,
                           prompt_template=dict(template="{}", crop_start=0), output_type="np"),
        # hunyuanvideo-community/HunyuanVideo: 20 double + 40 single blocks, 24 heads x 128 = 3072, Llama
        # text (4096), CLIP-L pooled (768), 2 refiner blocks. Equal to the class defaults.
        real_config=dict(
            in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
            num_single_layers=40, num_refiner_layers=2, patch_size=2, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=4096, pooled_projection_dim=768,
        ),
        depth_keys=("num_layers", "num_single_layers"),
    ),
    Family(
        key="sana", label="Tiny Sana image (random weights)", tiny_models=("tiny-sana",),
        pipeline_classes=("SanaPipeline",), transformer_classes=("SanaTransformer2DModel",),
        skip=(("patch_embed.*", PATCH_IN), ("proj_out", PATCH_OUT), ("time_embed.*", TIMESTEP),
              ("caption_projection.*", CAPTION)),
        kv_processors=((_TR + "sana_transformer.SanaAttnProcessor2_0", "sdpa"),),  # cross-attention
        kv_unsupported=((_AP + "SanaLinearAttnProcessor2_0",
                         "linear (ReLU-kernel) self-attention: no softmax attention, no K/V to quantize there"),),
        tiny_builder=_B + "pipelines:build_sana",
        # No clean_caption (needs bs4/ftfy) and no complex human instruction (a long preamble to every prompt).
        call_defaults=dict(_FAST, guidance_scale=4.5, max_sequence_length=16, use_resolution_binning=False,
                           clean_caption=False, complex_human_instruction=None, output_type="np"),
        # Efficient-Large-Model/Sana_1600M_1024px: 20 blocks, 70 heads x 32 = 2240, cross-attention 20 x 112,
        # Gemma-2-2B captions (2304), DC-AE 32 latent channels. Equal to the class defaults.
        real_config=dict(
            in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
            num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
            caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1,
        ),
    ),
)

#: Skip rules for transformers of no registered family: the usual diffusers names of the same edges.
GENERIC_SKIP: tuple[tuple[str, str], ...] = (
    ("proj_in", PATCH_IN), ("x_embedder", PATCH_IN), ("patch_embed*", PATCH_IN), ("pos_embed*", PATCH_IN),
    ("patch_embedding*", PATCH_IN),
    ("proj_out", PATCH_OUT), ("norm_out.*", TIMESTEP),
    ("time_embed*", TIMESTEP), ("time_text_embed.*", TIMESTEP), ("adaln_single.*", TIMESTEP),
    ("condition_embedder.time*", TIMESTEP), ("time_proj*", TIMESTEP),
    ("caption_projection.*", CAPTION), ("context_embedder", CAPTION), ("condition_embedder.text*", CAPTION),
)

@dataclass(frozen=True)
class TrainedModel:
    """A tiny model of a registered family whose trained weights ship with the package.

    Attributes:
        alias: its ``--model`` / app key (``"tiny-ltx-trained"``), listed first by :func:`tiny_aliases`.
        family: the family key (its pipeline name, ``"ltx"``).
        label: display label.
        asset: the pipeline directory under ``hq_diffusion/assets`` (a diffusers ``save_pretrained`` layout).
        call_defaults: ``__call__`` kwargs that replace the family's ``call_defaults`` for this model.
        note: what it was trained on.
    """

    alias: str
    family: str
    label: str
    asset: str
    call_defaults: Mapping[str, Any]
    note: str = ""

    def __post_init__(self):
        object.__setattr__(self, "call_defaults", _frozen(self.call_defaults))


#: The trained tiny models (the package's default model is the first).
TRAINED: tuple[TrainedModel, ...] = (
    TrainedModel(
        alias="tiny-ltx-trained", family="ltx", label="Tiny LTX-Video, trained (moving coloured shapes)",
        asset="tiny_ltx_trained", call_defaults=dict(num_inference_steps=12),
        note="trained on procedural clips of coloured shapes moving over plain backgrounds "
             "(hq_diffusion.tiny.data); prompts like 'a small red square moving left on a black background'",
    ),
)
_BY_TRAINED: dict[str, TrainedModel] = {t.alias: t for t in TRAINED}


def trained(alias: str) -> TrainedModel:
    """The :class:`TrainedModel` of ``alias``. Raises UnknownFamilyError listing the trained models."""
    try:
        return _BY_TRAINED[alias]
    except (KeyError, TypeError):
        raise UnknownFamilyError(f"Unknown trained model {alias!r}; trained models are: "
                                 f"{', '.join(_BY_TRAINED)}.") from None


def is_trained(alias: str) -> bool:
    """Whether ``alias`` names a trained tiny model (:data:`TRAINED`)."""
    return alias in _BY_TRAINED


_BY_KEY: dict[str, Family] = {f.key: f for f in FAMILIES}
_BY_ALIAS: dict[str, Family] = {**{t.alias: _BY_KEY[t.family] for t in TRAINED},
                                 **{a: f for f in FAMILIES for a in f.tiny_models}}
_BY_PIPELINE: dict[str, Family] = {c: f for f in FAMILIES for c in f.pipeline_classes}
_BY_TRANSFORMER: dict[str, Family] = {c: f for f in FAMILIES for c in f.transformer_classes}
for _table, _names in ((_BY_KEY, [f.key for f in FAMILIES]),
                       (_BY_ALIAS, [t.alias for t in TRAINED] + [a for f in FAMILIES for a in f.tiny_models]),
                       (_BY_PIPELINE, [c for f in FAMILIES for c in f.pipeline_classes]),
                       (_BY_TRANSFORMER, [c for f in FAMILIES for c in f.transformer_classes])):
    if len(_table) != len(_names):
        raise ValueError(f"the family registry names one of {sorted(_names)} twice")


def _lookup(table: dict[str, Family], name: str, what: str) -> Family:
    try:
        return table[name]
    except (KeyError, TypeError):
        raise UnknownFamilyError(f"Unknown {what} {name!r}; valid {what}s are: {', '.join(table)}.") from None


def keys() -> tuple[str, ...]:
    """Every family key, in registry order."""
    return tuple(_BY_KEY)


def pipeline_keys() -> tuple[str, ...]:
    """The keys of the families with a full tiny pipeline."""
    return tuple(f.key for f in FAMILIES if f.tiny_pipeline)


def get(key: str) -> Family:
    """The family of ``key`` (``"ltx"``). Raises UnknownFamilyError listing the valid keys."""
    return _lookup(_BY_KEY, key, "model family")


def by_alias(alias: str) -> Family:
    """The family of a tiny model key (``"tiny-ltx"``). Raises UnknownFamilyError listing the valid ones."""
    return _lookup(_BY_ALIAS, alias, "tiny model")


def by_pipeline_class(name: str) -> Family:
    """The family of a diffusers pipeline class name (``"LTXPipeline"``)."""
    return _lookup(_BY_PIPELINE, name, "pipeline class")


def by_transformer_class(name: str) -> Family:
    """The family of a diffusers transformer class name (``"LTXVideoTransformer3DModel"``)."""
    return _lookup(_BY_TRANSFORMER, name, "transformer class")


def skip_rules(transformer_class: str) -> tuple[tuple[str, str], ...]:
    """The skip rules of ``transformer_class``'s family, or :data:`GENERIC_SKIP` for an unknown class."""
    family = _BY_TRANSFORMER.get(transformer_class)
    return family.skip if family is not None else GENERIC_SKIP


def tiny_models(pipelines_only: bool = True) -> dict[str, str]:
    """Tiny model key -> display label: the trained models first, then the random-weight ones (by default only
    the families with a full tiny pipeline)."""
    return {**{t.alias: t.label for t in TRAINED},
            **{a: f.label for f in FAMILIES if f.tiny_pipeline or not pipelines_only for a in f.tiny_models}}


def tiny_aliases(pipelines_only: bool = True) -> dict[str, str]:
    """Tiny model key -> family key (eval's ``MODEL_ALIASES``, the app's ``TINY_KINDS``), trained models first."""
    return {**{t.alias: t.family for t in TRAINED},
            **{a: f.key for f in FAMILIES if f.tiny_pipeline or not pipelines_only for a in f.tiny_models}}


def pipeline_classes(pipelines_only: bool = True) -> dict[str, str]:
    """diffusers pipeline class name -> family key (eval's ``PIPELINE_CLASSES``): by default the families
    whose pipelines :func:`hq_diffusion.models.generate` has been checked on (those with a tiny pipeline)."""
    return {c: f.key for f in FAMILIES if f.tiny_pipeline or not pipelines_only for c in f.pipeline_classes}


def video_keys(pipelines_only: bool = True) -> tuple[str, ...]:
    """Keys of the families that make videos (eval's ``VIDEO_PIPELINES``, the app's ``VIDEO_KINDS``)."""
    return tuple(f.key for f in FAMILIES if f.video and (f.tiny_pipeline or not pipelines_only))


def tiny_tuned_keys(request: bool = True) -> tuple[str, ...]:
    """:data:`TUNED_KEYS` (eval's ``_TINY_TUNED_KEYS``); ``request=False`` leaves out :data:`REQUEST_KEYS`
    (the app's tuned keys: steps, size and frames come from the request)."""
    return tuple(k for k in TUNED_KEYS if request or k not in REQUEST_KEYS)
