"""Any row width without padding: a main part that codes unpadded plus a transposed tail.

A weight ``W`` (N, K) whose row length ``K`` the tile plan (:func:`~.rht.plan_tiles`) must pad — e.g. 777 → 784
— is coded as two tensors instead:

- the **main** part ``W[:, :K_main]`` (N, K_main), ``K_main`` a multiple of 8 that the plan codes without
  padding and with a tile no smaller than the padded plan's (768, tile 256, for 777), coded as any weight;
- the **tail** ``W[:, K_main:]ᵀ`` (r, N), ``r = K − K_main`` columns coded as ``r`` rows of ``N`` coordinates
  (with its own key, :func:`tail_key`), so the r leftover columns cost ``r · N`` coordinates instead of the
  ``N · (K_pad − K_main)`` a padded row pays.

Rate: the tail is coded first at the target rate, then the main part gets the rest of the total budget
(``bps · N · K`` minus every stored bit of the tail), so the combined rate (:func:`split_bits` over ``N · K``,
both blobs' headers and scales included) lands in ``(bps − 0.001, bps]`` through the codec's own exact-rate
search (a tail too small for its own share, e.g. one row of 400 with rANS tables, is coded anyway without a
:class:`~.core.RateBudgetWarning`: the main part absorbs the difference). With an SNR target (``snr_db=``)
both parts are coded at that target (the same α).

When to split (:func:`split_columns`): only when the plan pads, the remainder is at most
:data:`MAX_TAIL_COLUMNS`, and the padding the split saves (``N · (K_pad − K)`` coordinates) pays for the tail's
own fixed cost (its header and ``r`` row scales, :data:`TAIL_FIXED_BITS` per tail plus ``r · 16``) at least
twice over at 1 bit per coordinate. Widths the plan does not pad (multiples
of 8 that fill their tiles: 64, 784, 1000, 4096, ...) are never split and code exactly as before.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from .config import CodecConfig
from .core import RateBudgetWarning, decode, encode, to_weight_dtype
from .format import EncodedTensor
from .rht import plan_tiles

#: Most columns a tail may hold (a tail of r columns has r rows: each row adds a scale and its coded length).
MAX_TAIL_COLUMNS = 64
#: The main part's RHT tile is at least the padded plan's, up to this (a longer search would leave a long tail).
MIN_MAIN_TILE = 32
#: Stored bits a tail adds besides its payload and its r row scales, for the rule of :func:`split_columns`: a Rice
#: tail's header, stream and block headers and checksum (about 60–70 bytes) rounded up. A rANS tail also stores
#: its frequency tables (up to 2 × 256 × 2 bytes), so the rule is optimistic for rANS on the smallest layers it
#: splits; the rate stays exact either way (the main part absorbs the difference).
TAIL_FIXED_BITS = 8 * 96


def split_columns(k: int, n: int, tile: int) -> tuple[int, int]:
    """``(K_main, r)`` for a weight of ``n`` rows of ``k`` columns at maximum tile ``tile``; ``r = 0``: no split.

    ``K_main`` is the largest multiple of 8 below ``k`` that the plan codes without padding
    (``plan_tiles(K_main, tile)[1] == K_main``) with an RHT tile at least ``min(H, 32)``, ``H`` the tile of the
    padded plan of ``k`` (so the split never rotates with a smaller tile than padding would: 777 → 768 with tile
    256, not 776 with tile 8) — or, when no such width lies within :data:`MAX_TAIL_COLUMNS` of ``k``, with any
    tile (9 → 8); ``r = k − K_main``. No split when the plan of ``k`` pads nothing, when ``r``
    exceeds :data:`MAX_TAIL_COLUMNS`, or when the saved padding ``n · (K_pad − k)`` coordinates is below twice
    the tail's fixed cost in bits (:data:`TAIL_FIXED_BITS` + 16 per tail row).
    """
    if k <= 0 or n <= 0:
        raise ValueError(f"cannot split a weight of shape ({n}, {k})")
    h, k_pad = plan_tiles(k, tile)
    if k_pad == k:
        return k, 0
    k_main = _unpadded_below(k, tile, min(h, MIN_MAIN_TILE))
    if k_main <= 0 or k - k_main > MAX_TAIL_COLUMNS:  # none near k (9 pads to 16 with tile 16): any tile
        k_main = _unpadded_below(k, tile, 8)
    r = k - k_main
    if k_main <= 0 or r > MAX_TAIL_COLUMNS or n * (k_pad - k) < 2 * (TAIL_FIXED_BITS + 16 * r):
        return k, 0
    return k_main, r


def _unpadded_below(k: int, tile: int, min_tile: int) -> int:
    """The largest multiple of 8 below ``k`` whose plan pads nothing with a tile ≥ ``min_tile`` (0 if none)."""
    k_main = (k - 1) // 8 * 8
    while k_main > 0:
        h, k_pad = plan_tiles(k_main, tile)
        if k_pad == k_main and h >= min_tile:
            break
        k_main -= 8
    return k_main


def tail_key(key: int | str) -> str:
    """The RHT key of a tail: the layer key with ``".tail"`` appended (a name; an int key as its decimal)."""
    return f"{key}.tail"


def split_bits(main: EncodedTensor, tail: EncodedTensor | None) -> int:
    """Every stored bit of a split weight: both blobs (headers, scales, checksums included)."""
    return main.total_bits + (tail.total_bits if tail is not None else 0)


def split_bps(main: EncodedTensor, tail: EncodedTensor | None) -> float:
    """The combined rate: :func:`split_bits` over the weight's ``N · K`` scalars."""
    numel = main.numel + (tail.numel if tail is not None else 0)
    return split_bits(main, tail) / numel


def main_rate(bps: float, numel: int, tail_bits: int, main_numel: int) -> float:
    """The rate that leaves the main part ``bps · numel − tail_bits`` bits, rounded down to 1e-9 bps so that
    float rounding can never push the combined total above ``bps · numel``."""
    return math.floor((bps * numel - tail_bits) / main_numel * 1e9) / 1e9


def encode_split(w: torch.Tensor, cfg: CodecConfig | None = None, key: int | str = 0, observe=None,
                 tail_observe=None) -> tuple[EncodedTensor, EncodedTensor | None]:
    """Encode a 2-D weight ``w`` (N, K) as ``(main, tail)``; ``tail`` is None when :func:`split_columns` does
    not split (``main`` is then exactly ``encode(w, cfg, key)``).

    ``main`` codes ``w[:, :K_main]`` (N, K_main) with ``key``; ``tail`` codes ``w[:, K_main:].T`` (r, N) with
    :func:`tail_key`. With a rate target the combined rate (:func:`split_bps`) is at most ``cfg.bps``;
    with ``snr_db`` both parts use the target. ``observe`` / ``tail_observe``: the codec's ``observe``
    callback for the main part / the tail (see :func:`~.core.encode`).
    """
    cfg = cfg or CodecConfig()
    if w.dim() != 2:
        raise ValueError(f"encode_split takes a 2-D weight (N, K), got shape {tuple(w.shape)}")
    n, k = w.shape
    k_main, r = split_columns(k, n, cfg.tile)
    if r == 0:
        return encode(w, cfg, key=key, observe=observe), None
    with warnings.catch_warnings():  # a tail's own overhead may exceed its share: the combined rate is what counts
        warnings.simplefilter("ignore", RateBudgetWarning)
        tail = encode(w[:, k_main:].T.contiguous(), _tail_cfg(cfg, n * k), key=tail_key(key), observe=tail_observe)
    main_cfg = cfg
    if cfg.bps is not None:
        main_cfg = dataclasses.replace(cfg, bps=main_rate(cfg.bps, n * k, tail.total_bits, n * k_main),
                               coder=cfg.resolved_coder(n * k))
    main = encode(w[:, :k_main].contiguous(), main_cfg, key=key, observe=observe)
    return main, tail


def _tail_cfg(cfg: CodecConfig, numel: int) -> CodecConfig:
    """The tail's config: ``cfg`` with ``"auto"`` resolved for the whole weight (both parts use one coder)."""
    return dataclasses.replace(cfg, coder=cfg.resolved_coder(numel))


def decode_split(main: EncodedTensor, tail: EncodedTensor | None) -> torch.Tensor:
    """The weight (N, K) in the main part's dtype: ``[decode(main) | decode(tail)ᵀ]`` (float32 math)."""
    if tail is None:
        return decode(main)
    n = main.shape[0]
    if len(main.shape) != 2 or len(tail.shape) != 2 or tail.shape[1] != n:
        raise ValueError(f"tail of shape {tuple(tail.shape)} does not fit a main part of shape {tuple(main.shape)}")
    w = torch.cat([decode(main).to(torch.float32), decode(tail).to(torch.float32).T], dim=1)
    return to_weight_dtype(w, main.dtype)
