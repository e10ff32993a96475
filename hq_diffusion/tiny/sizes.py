"""Sizes shared by the tiny models."""

# Transformer sizes shared by the tiny models: 2 heads x 32 = 64 hidden (LTX-2 audio: 2 x 16 = 32), text
# width 32, latent/packed channels 32, so every transformer nn.Linear has in_features >= 32.
TINY_HEADS, TINY_HEAD_DIM, TINY_TEXT = 2, 32, 32
TINY_HIDDEN = TINY_HEADS * TINY_HEAD_DIM
