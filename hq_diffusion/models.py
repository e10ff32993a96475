"""Tiny offline diffusers pipelines and the Linear shapes of the real DiT checkpoints.

Everything here is built from configs in code with random weights: no model hub, no network, no files.

Public API
----------
- :func:`tiny_pipeline` -- a tiny, seeded, randomly initialised ``LTXPipeline`` / ``LTX2Pipeline`` /
  ``PixArtSigmaPipeline`` / ``FluxPipeline`` whose every component is real (transformer, VAE, scheduler,
  text encoder(s), tokenizer(s) built from an in-memory vocabulary; LTX-2 also its audio VAE, vocoder and
  text connectors).
- :data:`DEFAULT_CALL_KWARGS` -- per pipeline, the ``__call__`` kwargs of a fast, valid generation.
- :func:`generate` -- run a pipeline reproducibly and return float32 frames in ``[0, 1]``.
- :data:`REAL_CONFIGS` / :func:`real_linear_shapes` -- transformer configs of the released checkpoints and the
  ``(name, in_features, out_features)`` of every ``nn.Linear`` they contain, built on the ``meta`` device.

Nothing is configured at import time (no environment variables, no logging levels, no global seeds).
"""

from __future__ import annotations

import copy
import string
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "PIPELINE_NAMES",
    "DEFAULT_CALL_KWARGS",
    "REAL_CONFIGS",
    "tiny_pipeline",
    "generate",
    "real_linear_shapes",
]

#: The pipeline names understood by :func:`tiny_pipeline`, :func:`generate` and :func:`real_linear_shapes`.
PIPELINE_NAMES: tuple[str, ...] = ("ltx", "ltx2", "pixart", "flux")


def _check_name(name: str) -> str:
    if name not in PIPELINE_NAMES:
        raise ValueError(f"Unknown pipeline name {name!r}; valid names are: {', '.join(PIPELINE_NAMES)}.")
    return name


# ----------------------------------------------------------------------------------------------------------
# Call kwargs for a fast generation (2 steps, 32x32 px, 9 frames for video, 1 image/video, short prompts).
# ----------------------------------------------------------------------------------------------------------

#: ``DEFAULT_CALL_KWARGS[name]``: kwargs for ``pipe(prompt, **kwargs)`` that make a fast (about a second on
#: CPU) but valid generation with the matching :func:`tiny_pipeline`. Height/width are multiples of 32 and
#: video frame counts are 8k+1 (valid for both the tiny and the real VAEs). Classifier-free guidance is on
#: (batch 2 through the transformer, as in real use); LTX-2's extra STG / modality-isolation passes are off.
DEFAULT_CALL_KWARGS: dict[str, dict[str, Any]] = {
    "ltx": dict(
        num_inference_steps=2,
        height=32,
        width=32,
        num_frames=9,
        frame_rate=25,
        guidance_scale=3.0,
        max_sequence_length=16,
        output_type="np",
    ),
    "ltx2": dict(
        num_inference_steps=2,
        height=32,
        width=32,
        num_frames=9,
        frame_rate=24.0,
        guidance_scale=3.0,
        audio_guidance_scale=3.0,
        # STG needs `spatio_temporal_guidance_blocks` (the default [28] is past the tiny depth) and modality
        # isolation costs an extra transformer pass per step: both off for speed.
        stg_scale=0.0,
        audio_stg_scale=0.0,
        modality_scale=1.0,
        audio_modality_scale=1.0,
        spatio_temporal_guidance_blocks=None,
        max_sequence_length=16,
        output_type="np",
    ),
    "pixart": dict(
        num_inference_steps=2,
        height=32,
        width=32,
        guidance_scale=4.5,
        max_sequence_length=16,
        use_resolution_binning=False,
        clean_caption=False,  # needs bs4/ftfy, irrelevant for an in-memory vocabulary
        output_type="np",
    ),
    "flux": dict(
        num_inference_steps=2,
        height=32,
        width=32,
        guidance_scale=3.5,
        max_sequence_length=16,
        output_type="np",
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Tokenizers from an in-memory vocabulary.
# ----------------------------------------------------------------------------------------------------------

# Whole-word tokens; anything else falls back to single characters (all tokenizers below cover a-z, 0-9).
_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "to", "is", "by", "under", "over",
    "cat", "dog", "robot", "horse", "bird", "fish", "man", "woman", "child", "car", "boat", "tree",
    "house", "city", "forest", "beach", "mountain", "river", "ocean", "sky", "sun", "moon", "rain",
    "snow", "street", "garden", "room", "red", "blue", "green", "yellow", "white", "black", "small",
    "large", "bright", "dark", "slow", "fast", "walking", "running", "dancing", "flying", "swimming",
    "sitting", "video", "photo", "painting", "close", "up", "shot", "camera", "light", "night", "day",
    "sunset", "cinematic", "realistic", "quality", "worst", "blurry", "jittery", "distorted",
)
_CHARS: str = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?'-"


def _bpe_vocab_and_merges(
    specials: list[str], words: list[list[str]], chars: list[str]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tiny, deterministic byte-pair-encoding "training" run over ``words`` (each a list of symbols).

    Repeatedly merges the most frequent adjacent pair (ties broken by the pair itself) until every word is a
    single symbol, so each word of the list encodes to exactly one token; anything else falls back to
    ``chars``. Returns ``(vocab, merges)`` with ``specials`` first, then ``chars``, then the merged symbols.
    """
    vocab: dict[str, int] = {}
    for tok in [*specials, *chars]:
        vocab.setdefault(tok, len(vocab))
    seqs = [list(w) for w in words]
    for seq in seqs:
        for sym in seq:
            vocab.setdefault(sym, len(vocab))
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        merged = best[0] + best[1]
        vocab.setdefault(merged, len(vocab))
        for k, seq in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = out
    return vocab, merges


def _t5_tokenizer(model_max_length: int = 512):
    """SentencePiece-style (Unigram) ``T5Tokenizer``: ``<pad>``=0, ``</s>``=1, ``<unk>``=2 first."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS]
    vocab += [(c, -5.0) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _clip_tokenizer(model_max_length: int = 77):
    """Byte-pair ``CLIPTokenizer`` (``<|startoftext|>``=0, ``<|endoftext|>``=1 is also the pad token)."""
    from transformers import CLIPTokenizer

    chars = list(_CHARS) + [c + "</w>" for c in _CHARS]
    words = [[*w[:-1], w[-1] + "</w>"] for w in _WORDS]  # CLIP marks the last symbol of a word
    vocab, merges = _bpe_vocab_and_merges(["<|startoftext|>", "<|endoftext|>"], words, chars)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


# Gemma-3 multimodal special tokens (needed for a valid Gemma3Config; never produced from plain text).
_GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_image>", "<end_of_image>",
                   "<image_soft_token>"]


def _gemma_tokenizer(model_max_length: int = 1024):
    """Byte-pair ``GemmaTokenizer`` (``<pad>``=0, ``<eos>``=1, ``<bos>``=2, adds ``<bos>``, pads on the left)."""
    from transformers import GemmaTokenizer

    words = [list(w) for w in _WORDS] + [["\u2581", *w] for w in _WORDS]  # "a red" -> "a", "\u2581red"
    vocab, merges = _bpe_vocab_and_merges(_GEMMA_SPECIALS, words, list(_CHARS) + ["\u2581"])
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=model_max_length)
    tok.padding_side = "left"
    return tok


def _vocab_size(tokenizer, multiple: int = 8) -> int:
    n = len(tokenizer)
    return (n + multiple - 1) // multiple * multiple


# ----------------------------------------------------------------------------------------------------------
# Text encoders.
# ----------------------------------------------------------------------------------------------------------

def _t5_encoder(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def _clip_text_encoder(vocab_size: int, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
        attention_dropout=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return CLIPTextModel(cfg).eval()


def _gemma3_encoder(tokenizer, hidden: int = 32, num_layers: int = 2):
    """Tiny ``Gemma3ForConditionalGeneration`` (text tower ``hidden`` wide; 1-layer SigLIP vision tower)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text_cfg = Gemma3TextConfig(
        vocab_size=_vocab_size(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        query_pre_attn_scalar=16, sliding_window=64, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision_cfg = SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
        image_size=28, patch_size=14, vision_use_head=False,
    )
    ids = tokenizer.convert_tokens_to_ids
    cfg = Gemma3Config(
        text_config=text_cfg, vision_config=vision_cfg, mm_tokens_per_image=4,
        boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    return Gemma3ForConditionalGeneration(cfg).eval()


# ----------------------------------------------------------------------------------------------------------
# Tiny pipelines.
# ----------------------------------------------------------------------------------------------------------

# Transformer sizes shared by the tiny models: 2 heads x 32 = 64 hidden (LTX-2 audio: 2 x 16 = 32), text
# width 32, latent/packed channels 32, so every transformer nn.Linear has in_features >= 32.
_TINY_HEADS, _TINY_HEAD_DIM, _TINY_TEXT = 2, 32, 32
_TINY_HIDDEN = _TINY_HEADS * _TINY_HEAD_DIM


def _build_ltx() -> dict[str, Any]:
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel

    tokenizer = _t5_tokenizer()
    text_encoder = _t5_encoder(_vocab_size(tokenizer), _TINY_TEXT)
    latent = 32
    transformer = LTXVideoTransformer3DModel(
        in_channels=latent, out_channels=latent, patch_size=1, patch_size_t=1,
        num_attention_heads=_TINY_HEADS, attention_head_dim=_TINY_HEAD_DIM, cross_attention_dim=_TINY_HIDDEN,
        num_layers=2, caption_channels=_TINY_TEXT,
    )
    # Spatial x8 (patch 2 x two 2x stages), temporal x4: 9x32x32 px -> 3x4x4 latents = 48 tokens.
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=latent,
        block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        timestep_conditioning=False, patch_size=2, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    scheduler = FlowMatchEulerDiscreteScheduler()
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                transformer=transformer)


def _build_ltx2() -> dict[str, Any]:
    from diffusers import (
        AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    tokenizer = _gemma_tokenizer()
    text_encoder = _gemma3_encoder(tokenizer, hidden=_TINY_TEXT, num_layers=2)
    text_hidden = text_encoder.config.text_config.hidden_size
    # The connectors' width (heads x head_dim) must equal the Gemma hidden size.
    connectors = LTX2TextConnectors(
        caption_channels=text_hidden, text_proj_in_factor=text_encoder.config.text_config.num_hidden_layers + 1,
        video_connector_num_attention_heads=2, video_connector_attention_head_dim=text_hidden // 2,
        video_connector_num_layers=1, video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=text_hidden // 2,
        audio_connector_num_layers=1, audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32, rope_theta=10000.0, rope_double_precision=False, rope_type="split",
    )
    latent = 32
    # Video VAE: spatial x8 (patch 4 x one 2x stage), temporal x2: 9x32x32 px -> 5x4x4 latents = 80 tokens.
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=latent,
        block_out_channels=(16,), decoder_block_out_channels=(16,),
        layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        down_block_types=("LTX2VideoDownBlock3D",), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False),
        downsample_type=("spatiotemporal",), upsample_type=("spatiotemporal",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False,
        patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    # Audio VAE: 8 latent channels x (16 mel bins / 4) = 32 packed audio channels (== base_channels, which
    # sizes the audio latents_mean/std buffers applied to the packed latents).
    audio_latent, mel_bins = 8, 16
    audio_in = audio_latent * mel_bins // 4
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=audio_in, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None,
        in_channels=2, resolution=32, latent_channels=audio_latent, norm_type="pixel", causality_axis="height",
        dropout=0.0, mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True,
        mel_bins=mel_bins,
    )
    # Vocoder: 100 mel frames/s x (4*5*8 = 160) = 16 kHz output.
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * mel_bins, hidden_channels=32, out_channels=2,
        upsample_kernel_sizes=[8, 10, 16], upsample_factors=[4, 5, 8], resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1, output_sampling_rate=16000,
    )
    transformer = LTX2VideoTransformer3DModel(
        in_channels=latent, out_channels=latent, patch_size=1, patch_size_t=1,
        num_attention_heads=_TINY_HEADS, attention_head_dim=_TINY_HEAD_DIM, cross_attention_dim=_TINY_HIDDEN,
        vae_scale_factors=(vae.temporal_compression_ratio, vae.spatial_compression_ratio,
                           vae.spatial_compression_ratio),
        audio_in_channels=audio_in, audio_out_channels=audio_in,
        audio_num_attention_heads=_TINY_HEADS, audio_attention_head_dim=16, audio_cross_attention_dim=32,
        num_layers=2, caption_channels=text_hidden, rope_double_precision=False, rope_type="split",
    )
    scheduler = FlowMatchEulerDiscreteScheduler()
    return dict(scheduler=scheduler, vae=vae, audio_vae=audio_vae, text_encoder=text_encoder,
                tokenizer=tokenizer, connectors=connectors, transformer=transformer, vocoder=vocoder)


def _build_pixart() -> dict[str, Any]:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel

    tokenizer = _t5_tokenizer()
    text_encoder = _t5_encoder(_vocab_size(tokenizer), _TINY_TEXT)
    # VAE x2 (two blocks): 32x32 px -> 16x16x4 latents -> 8x8 = 64 tokens after the 2x2 patch embedding.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
        scaling_factor=0.13025, mid_block_add_attention=False,
    )
    transformer = PixArtTransformer2DModel(
        num_attention_heads=_TINY_HEADS, attention_head_dim=_TINY_HEAD_DIM, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=_TINY_HIDDEN, caption_channels=_TINY_TEXT, sample_size=16,
        patch_size=2, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False, interpolation_scale=1,
    )
    scheduler = DPMSolverMultistepScheduler()
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                scheduler=scheduler)


def _build_flux() -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tokenizer = _clip_tokenizer()
    text_encoder = _clip_text_encoder(_vocab_size(tokenizer), _TINY_TEXT)
    tokenizer_2 = _t5_tokenizer()
    text_encoder_2 = _t5_encoder(_vocab_size(tokenizer_2), _TINY_TEXT)
    # VAE x2 with 8 latent channels: 32x32 px -> 16x16x8 latents -> 2x2-packed 8x8 = 64 tokens of 32 channels.
    latent = 8
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=latent * 4, num_layers=1, num_single_layers=1,
        attention_head_dim=_TINY_HEAD_DIM, num_attention_heads=_TINY_HEADS, joint_attention_dim=_TINY_TEXT,
        pooled_projection_dim=_TINY_TEXT, guidance_embeds=True, axes_dims_rope=(8, 12, 12),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


_BUILDERS = {"ltx": _build_ltx, "ltx2": _build_ltx2, "pixart": _build_pixart, "flux": _build_flux}


def _pipeline_class(name: str):
    import diffusers

    return {
        "ltx": diffusers.LTXPipeline,
        "ltx2": diffusers.LTX2Pipeline,
        "pixart": diffusers.PixArtSigmaPipeline,
        "flux": diffusers.FluxPipeline,
    }[name]


def tiny_pipeline(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build a tiny, randomly initialised, fully offline diffusers pipeline.

    Args:
        name: one of ``"ltx"`` (``LTXPipeline``), ``"ltx2"`` (``LTX2Pipeline``), ``"pixart"``
            (``PixArtSigmaPipeline``) or ``"flux"`` (``FluxPipeline``).
        seed: seeds every random initialisation. Same seed -> bit-identical state dicts; the global torch RNG
            state is saved and restored, so calling this does not disturb the caller's random stream.
        dtype: dtype of every module (e.g. ``torch.bfloat16``); weights are initialised in float32 first, so
            the same seed gives the same (rounded) weights in every dtype.

    Returns:
        The pipeline, on CPU, modules in eval mode, progress bar disabled. The transformers are 2 heads x 32
        (64 wide; LTX-2's audio stream 2 x 16 = 32), 2 blocks (Flux: 1 double + 1 single), and every
        ``nn.Linear`` in the transformer has ``in_features >= 32``. Text encoders are 32 wide, tokenizers are
        built from a ~80-word in-memory vocabulary plus single characters. Generate with
        ``DEFAULT_CALL_KWARGS[name]`` (see :func:`generate`).

    Raises:
        ValueError: for an unknown ``name``.
    """
    _check_name(name)
    cls = _pipeline_class(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = _BUILDERS[name]()
    for module in components.values():
        if isinstance(module, nn.Module):
            _cast(module, dtype)
            module.eval()
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
    video = name in ("ltx", "ltx2")
    frames = _frames_to_numpy(out.frames if video else out.images, video=video)
    if name != "ltx2":
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


# ----------------------------------------------------------------------------------------------------------
# Real checkpoint configurations (transformer only) and their Linear shapes.
# ----------------------------------------------------------------------------------------------------------

#: ``REAL_CONFIGS[name]``: the transformer config of the released checkpoint, as constructor kwargs of the
#: diffusers transformer class (``_REAL_CLASSES[name]``). Depth keys are overridden by
#: :func:`real_linear_shapes`.
REAL_CONFIGS: dict[str, dict[str, Any]] = {
    # Lightricks/LTX-Video 0.9.x, 2B (ltx-video-2b-v0.9*): 28 blocks, 32 heads x 64 = 2048, T5-XXL captions
    # (4096), 128 latent channels. Equal to the LTXVideoTransformer3DModel defaults.
    "ltx": dict(
        in_channels=128, out_channels=128, patch_size=1, patch_size_t=1,
        num_attention_heads=32, attention_head_dim=64, cross_attention_dim=2048, num_layers=28,
        activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads", norm_elementwise_affine=False,
        norm_eps=1e-6, caption_channels=4096, attention_bias=True, attention_out_bias=True,
    ),
    # Lightricks/LTX-2 (19B audio-video DiT): 48 blocks; video 32 heads x 128 = 4096, audio 32 heads x 64 =
    # 2048; Gemma-3-12B captions (3840) through the text connectors. These are the
    # LTX2VideoTransformer3DModel defaults in diffusers 0.42.
    "ltx2": dict(
        in_channels=128, out_channels=128, patch_size=1, patch_size_t=1,
        num_attention_heads=32, attention_head_dim=128, cross_attention_dim=4096,
        audio_in_channels=128, audio_out_channels=128, audio_patch_size=1, audio_patch_size_t=1,
        audio_num_attention_heads=32, audio_attention_head_dim=64, audio_cross_attention_dim=2048,
        num_layers=48, activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=3840,
        attention_bias=True, attention_out_bias=True,
    ),
    # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS: 28 blocks, 16 heads x 72 = 1152, T5-XXL captions (4096),
    # 4 latent channels (8 out: learned sigma), 2x2 patches, no resolution/aspect micro-conditions.
    "pixart": dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        dropout=0.0, norm_num_groups=32, cross_attention_dim=1152, attention_bias=True, sample_size=128,
        patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, upcast_attention=False,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2,
        use_additional_conditions=False, caption_channels=4096, attention_type="default",
    ),
    # black-forest-labs/FLUX.1-dev: 19 double-stream + 38 single-stream blocks, 24 heads x 128 = 3072,
    # T5-XXL context (4096), CLIP-L pooled (768), 64 packed latent channels, guidance embedding (dev).
    "flux": dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    ),
}


def _real_class(name: str):
    import diffusers

    return {
        "ltx": diffusers.LTXVideoTransformer3DModel,
        "ltx2": diffusers.LTX2VideoTransformer3DModel,
        "pixart": diffusers.PixArtTransformer2DModel,
        "flux": diffusers.FluxTransformer2DModel,
    }[name]


def real_linear_shapes(name: str, num_layers: int = 1) -> list[tuple[str, int, int]]:
    """``(module name, in_features, out_features)`` of every ``nn.Linear`` in the real transformer.

    The transformer is instantiated from ``REAL_CONFIGS[name]`` with its depth cut to ``num_layers`` blocks
    (Flux: ``num_layers`` double-stream and ``num_layers`` single-stream blocks) on the ``meta`` device, so
    no memory is allocated and nothing is downloaded. Every block of a model has the same shapes, so one
    block tells the per-block story; the non-block layers (patch/caption projections, timestep embedders,
    output projection) are included too.

    Args:
        name: ``"ltx"``, ``"ltx2"``, ``"pixart"`` or ``"flux"``.
        num_layers: number of transformer blocks to instantiate (>= 1).

    Returns:
        list of ``(qualified module name, in_features, out_features)`` in ``named_modules()`` order, e.g.
        ``("transformer_blocks.0.attn1.to_k", 2048, 2048)`` for LTX-Video.

    Raises:
        ValueError: for an unknown ``name`` or ``num_layers < 1``.
    """
    _check_name(name)
    if int(num_layers) < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
    config = dict(REAL_CONFIGS[name])
    config["num_layers"] = int(num_layers)
    if name == "flux":
        config["num_single_layers"] = int(num_layers)
    cls = _real_class(name)
    with torch.device("meta"):
        model = cls(**config)
    return [
        (mod_name, module.in_features, module.out_features)
        for mod_name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
