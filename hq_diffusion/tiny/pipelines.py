"""Tiny builders of the LTX-Video, LTX-2, PixArt-Sigma, Flux, SD3, Wan, CogVideoX,
Sana and HunyuanVideo pipelines (registered in
:mod:`hq_diffusion.integrations.families`): each returns the pipeline's components, randomly initialised.

Called through :func:`hq_diffusion.models.tiny_pipeline`, which seeds the RNG, casts and assembles them.
"""
from __future__ import annotations

from typing import Any

from .sizes import TINY_HEAD_DIM, TINY_HEADS, TINY_HIDDEN, TINY_TEXT
from .text import (
    clip_text_encoder, clip_tokenizer, gemma2_encoder, gemma3_encoder, gemma_tokenizer, t5_encoder, t5_tokenizer,
    vocab_size,
)

__all__ = ["build_ltx", "build_ltx2", "build_pixart", "build_flux", "build_sd3", "build_wan",
           "build_cogvideox", "build_sana", "build_hunyuanvideo"]

# ----------------------------------------------------------------------------------------------------------
# Tiny pipelines.
# ----------------------------------------------------------------------------------------------------------

def build_ltx() -> dict[str, Any]:
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel

    tokenizer = t5_tokenizer()
    text_encoder = t5_encoder(vocab_size(tokenizer), TINY_TEXT)
    latent = 32
    transformer = LTXVideoTransformer3DModel(
        in_channels=latent, out_channels=latent, patch_size=1, patch_size_t=1,
        num_attention_heads=TINY_HEADS, attention_head_dim=TINY_HEAD_DIM, cross_attention_dim=TINY_HIDDEN,
        num_layers=2, caption_channels=TINY_TEXT,
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


def build_ltx2() -> dict[str, Any]:
    from diffusers import (
        AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    tokenizer = gemma_tokenizer()
    text_encoder = gemma3_encoder(tokenizer, hidden=TINY_TEXT, num_layers=2)
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
        num_attention_heads=TINY_HEADS, attention_head_dim=TINY_HEAD_DIM, cross_attention_dim=TINY_HIDDEN,
        vae_scale_factors=(vae.temporal_compression_ratio, vae.spatial_compression_ratio,
                           vae.spatial_compression_ratio),
        audio_in_channels=audio_in, audio_out_channels=audio_in,
        audio_num_attention_heads=TINY_HEADS, audio_attention_head_dim=16, audio_cross_attention_dim=32,
        num_layers=2, caption_channels=text_hidden, rope_double_precision=False, rope_type="split",
    )
    scheduler = FlowMatchEulerDiscreteScheduler()
    return dict(scheduler=scheduler, vae=vae, audio_vae=audio_vae, text_encoder=text_encoder,
                tokenizer=tokenizer, connectors=connectors, transformer=transformer, vocoder=vocoder)


def build_pixart() -> dict[str, Any]:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel

    tokenizer = t5_tokenizer()
    text_encoder = t5_encoder(vocab_size(tokenizer), TINY_TEXT)
    # VAE x2 (two blocks): 32x32 px -> 16x16x4 latents -> 8x8 = 64 tokens after the 2x2 patch embedding.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
        scaling_factor=0.13025, mid_block_add_attention=False,
    )
    transformer = PixArtTransformer2DModel(
        num_attention_heads=TINY_HEADS, attention_head_dim=TINY_HEAD_DIM, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=TINY_HIDDEN, caption_channels=TINY_TEXT, sample_size=16,
        patch_size=2, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False, interpolation_scale=1,
    )
    scheduler = DPMSolverMultistepScheduler()
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                scheduler=scheduler)


def _vae_x2(latent: int, scaling_factor: float, shift_factor: float):
    """2D ``AutoencoderKL``, spatial x2 (two blocks), no quant convs (Flux- and SD3-style latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def build_flux() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tokenizer = clip_tokenizer()
    text_encoder = clip_text_encoder(vocab_size(tokenizer), TINY_TEXT)
    tokenizer_2 = t5_tokenizer()
    text_encoder_2 = t5_encoder(vocab_size(tokenizer_2), TINY_TEXT)
    # VAE x2 with 8 latent channels: 32x32 px -> 16x16x8 latents -> 2x2-packed 8x8 = 64 tokens of 32 channels.
    latent = 8
    vae = _vae_x2(latent, scaling_factor=0.3611, shift_factor=0.1159)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=latent * 4, num_layers=1, num_single_layers=1,
        attention_head_dim=TINY_HEAD_DIM, num_attention_heads=TINY_HEADS, joint_attention_dim=TINY_TEXT,
        pooled_projection_dim=TINY_TEXT, guidance_embeds=True, axes_dims_rope=(8, 12, 12),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def build_sd3() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    # Two CLIPs with projections (pooled: 32 + 32 = 64) and a T5 as wide as the two CLIPs' concatenated token
    # embeddings (64), which the pipeline pads to the T5 width: joint attention dim 64.
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    text_encoder = clip_text_encoder(vocab_size(tokenizer), TINY_TEXT, with_projection=True)
    text_encoder_2 = clip_text_encoder(vocab_size(tokenizer_2), TINY_TEXT, with_projection=True)
    text_encoder_3 = t5_encoder(vocab_size(tokenizer_3), 2 * TINY_TEXT)
    # VAE x2 with 8 latent channels: 32x32 px -> 16x16x8 latents -> 2x2 patches = 64 tokens.
    latent = 8
    vae = _vae_x2(latent, scaling_factor=1.5305, shift_factor=0.0609)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=latent, out_channels=latent, num_layers=2,
        attention_head_dim=TINY_HEAD_DIM, num_attention_heads=TINY_HEADS, joint_attention_dim=2 * TINY_TEXT,
        caption_projection_dim=TINY_HIDDEN, pooled_projection_dim=2 * TINY_TEXT, pos_embed_max_size=16,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return dict(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def build_wan() -> dict[str, Any]:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from .transformers import wan_transformer

    tokenizer = t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size(tokenizer), d_model=TINY_TEXT, d_kv=16, d_ff=2 * TINY_TEXT, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    # Spatial x4 (two 2x stages), temporal x2 (the second stage): 9x32x32 px -> 5x8x8 latents -> (1, 2, 2)
    # patches = 80 tokens. Identity latent normalisation.
    latent = 8
    vae = AutoencoderKLWan(
        base_dim=16, z_dim=latent, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True], latents_mean=[0.0] * latent, latents_std=[1.0] * latent,
        scale_factor_temporal=2, scale_factor_spatial=4,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                transformer=wan_transformer())


def build_cogvideox() -> dict[str, Any]:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler

    from .transformers import cogvideox_transformer

    tokenizer = t5_tokenizer()
    text_encoder = t5_encoder(vocab_size(tokenizer), TINY_TEXT)
    # Spatial x4 (three blocks), temporal x4: 9x32x32 px -> 3x8x8 latents -> 2x2 patches = 48 tokens, the
    # transformer's sample size.
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(16, 16, 16), latent_channels=8,
        layers_per_block=1, norm_num_groups=8, temporal_compression_ratio=4, sample_height=32, sample_width=32,
    )
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=cogvideox_transformer(),
                scheduler=CogVideoXDDIMScheduler())


def build_sana() -> dict[str, Any]:
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler

    from .transformers import sana_transformer

    tokenizer = gemma_tokenizer()
    text_encoder = gemma2_encoder(tokenizer, hidden=TINY_TEXT)
    # DC-AE x4 (three stages, no attention): 32x32 px -> 8x8x8 latents = 64 tokens.
    vae = AutoencoderDC(
        in_channels=3, latent_channels=8, attention_head_dim=8, encoder_block_types="ResBlock",
        decoder_block_types="ResBlock", encoder_block_out_channels=(16, 16, 16),
        decoder_block_out_channels=(16, 16, 16), encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), ()),
        decoder_qkv_multiscales=((), (), ()), scaling_factor=0.41407,
    )
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=sana_transformer(),
                scheduler=DPMSolverMultistepScheduler())


def build_hunyuanvideo() -> dict[str, Any]:
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler
    from transformers import LlamaConfig, LlamaModel

    from .transformers import hunyuanvideo_transformer

    # Llama text tower (its third-to-last hidden state is used: 3 layers) on a T5-style tokenizer; CLIP pooled.
    tokenizer, tokenizer_2 = t5_tokenizer(), clip_tokenizer()
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=vocab_size(tokenizer), hidden_size=TINY_TEXT, intermediate_size=2 * TINY_TEXT,
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=1024, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )).eval()
    text_encoder_2 = clip_text_encoder(vocab_size(tokenizer_2), TINY_TEXT)
    # Spatial x8, temporal x4: 9x32x32 px -> 3x4x4 latents = 48 tokens.
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=8, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(16, 16, 16), layers_per_block=1,
        norm_num_groups=8, temporal_compression_ratio=4, spatial_compression_ratio=8, mid_block_add_attention=False,
    )
    return dict(text_encoder=text_encoder, tokenizer=tokenizer, transformer=hunyuanvideo_transformer(), vae=vae,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer_2)
