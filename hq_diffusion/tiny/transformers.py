"""Tiny transformers of the Wan, CogVideoX, HunyuanVideo and Sana pipelines (:mod:`.pipelines`), and example
inputs of those and of SD3's.

Each builder returns a randomly initialised diffusers transformer, 2 heads x 32 = 64 wide, 2 blocks (HunyuanVideo:
1 double-stream + 1 single-stream + 1 token-refiner block), every ``nn.Linear`` with ``in_features >= 32``, under
400k parameters. :func:`example_inputs` gives one valid denoising-step forward pass of a tiny transformer
(e.g. :func:`hq_diffusion.models.tiny_transformer`) without its pipeline.
"""
from __future__ import annotations

from typing import Any

import torch

from .sizes import TINY_HEAD_DIM, TINY_HEADS, TINY_HIDDEN, TINY_TEXT

__all__ = ["wan_transformer", "cogvideox_transformer", "hunyuanvideo_transformer", "sana_transformer", "example_inputs"]

_LATENT = 8  # latent channels of every tiny transformer here
_TEXT_TOKENS = 16


def wan_transformer():
    from diffusers import WanTransformer3DModel

    # 3x8x8 latents, (1, 2, 2) patches: 48 tokens.
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=TINY_HEADS, attention_head_dim=TINY_HEAD_DIM,
        in_channels=_LATENT, out_channels=_LATENT, text_dim=TINY_TEXT, freq_dim=32, ffn_dim=2 * TINY_HIDDEN,
        num_layers=2, rope_max_seq_len=64,
    )


def cogvideox_transformer():
    from diffusers import CogVideoXTransformer3DModel

    # 3x8x8 latents (9 frames / 4 + 1), 2x2 patches: 48 tokens; sin-cos positions sized for exactly that.
    return CogVideoXTransformer3DModel(
        num_attention_heads=TINY_HEADS, attention_head_dim=TINY_HEAD_DIM, in_channels=_LATENT,
        out_channels=_LATENT, time_embed_dim=TINY_TEXT, text_embed_dim=TINY_TEXT, num_layers=2,
        sample_width=8, sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=_TEXT_TOKENS,
    )


def hunyuanvideo_transformer():
    from diffusers import HunyuanVideoTransformer3DModel

    # 3x4x4 latents, 1x1x1 patches: 48 tokens; rotary axes 8 + 12 + 12 = the head dim.
    return HunyuanVideoTransformer3DModel(
        in_channels=_LATENT, out_channels=_LATENT, num_attention_heads=TINY_HEADS, attention_head_dim=TINY_HEAD_DIM,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1,
        text_embed_dim=TINY_TEXT, pooled_projection_dim=TINY_TEXT, rope_axes_dim=(8, 12, 12),
    )


def sana_transformer():
    from diffusers import SanaTransformer2DModel

    # 8x8 latents, 1x1 patches: 64 tokens.
    return SanaTransformer2DModel(
        in_channels=_LATENT, out_channels=_LATENT, num_attention_heads=TINY_HEADS, attention_head_dim=TINY_HEAD_DIM,
        num_layers=2, num_cross_attention_heads=TINY_HEADS, cross_attention_head_dim=TINY_HEAD_DIM,
        cross_attention_dim=TINY_HIDDEN, caption_channels=TINY_TEXT, sample_size=8, patch_size=1,
    )


def example_inputs(key: str, transformer: torch.nn.Module, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """Forward kwargs of one denoising step of the tiny transformer of family ``key`` (seeded, on its device
    and in its dtype): latents ``hidden_states`` (shape per family, see the builders), text
    ``encoder_hidden_states`` (batch, 16, text width), ``timestep`` (batch,) float32 in [0, 1000), pooled text
    (batch, pooled width) where the family takes one, and ``return_dict=False``.

    Raises:
        ValueError: for a key without a tiny transformer here.
    """
    p = next(transformer.parameters())
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(p.device, p.dtype)

    b, c = batch, _LATENT
    latents = {"sd3": (b, c, 16, 16), "wan": (b, c, 3, 8, 8), "cogvideox": (b, 3, c, 8, 8),
               "hunyuanvideo": (b, c, 3, 4, 4), "sana": (b, c, 8, 8)}
    if key not in latents:
        raise ValueError(f"No tiny transformer inputs for {key!r}; valid keys are: {', '.join(latents)}.")
    cfg = transformer.config
    text = {"sd3": "joint_attention_dim", "wan": "text_dim", "cogvideox": "text_embed_dim",
            "hunyuanvideo": "text_embed_dim", "sana": "caption_channels"}[key]
    kw: dict[str, Any] = dict(hidden_states=rand(*latents[key]), encoder_hidden_states=rand(b, _TEXT_TOKENS, cfg[text]),
                              timestep=(torch.rand(b, generator=g) * 1000).to(p.device), return_dict=False)
    if key in ("sd3", "hunyuanvideo"):
        kw["pooled_projections"] = rand(b, cfg["pooled_projection_dim"])
    if key == "hunyuanvideo":
        kw["encoder_attention_mask"] = torch.ones(b, _TEXT_TOKENS, dtype=torch.bool, device=p.device)
        kw["guidance"] = torch.full((b,), 6000.0, device=p.device)
    return kw
