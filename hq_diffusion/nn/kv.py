"""Attention K/V quantization with bias correction (docs/ARCHITECTURE.md).

K and V are quantized per (token, head) vector after QK-norm and RoPE, right before the attention kernel:

    x (D,) → fp16 norm ν → x' = x·√D'/ν (zero-padded to D') → rotate → v = α·x' + δ → y = Q(v)
           → x̂' = (p(y) − δ)/α → unrotate → x̂ = x̂'[:D]·ν/√D'

Legend: D = head_dim (any size ≥ 1), D' = D rounded up to a multiple of the lattice dimension (8 for e8, 4 for
d4, 2 for a2, 1 for z), N = number of vectors (product of the leading axes), p = integer form → physical
lattice point (``lattice.to_physical``).

- **Norm**: one fp16 norm per vector (16/D bits per scalar, counted in the rate). The encoder scales by the
  *stored* fp16 norm, so the rounding of the norm introduces no bias.
- **Rotation** (``KVConfig.rotation``): ``"none"``; ``"signs"``, a ±1 diagonal from :func:`rht_signs`;
  ``"haar"``, a uniformly random orthogonal D'×D' matrix (QR of a Gaussian with the sign fix), drawn from
  ``(seed, key)`` and cached. Rotations spread the error direction so that inner-product bias averages out.
- **Subtractive dither** (``KVConfig.dither``): δ uniform on the lattice's Voronoi cell, added before the
  nearest-point search and subtracted after. The error ``p(y) − v`` is then uniform on the cell and
  independent of the input (Schuchman), so ``E⟨q, k̂⟩ = ⟨q, k⟩`` exactly. δ is drawn from a generator seeded by
  ``(seed, key, step)``: runs are reproducible.
- **Rate**: ``α`` is set from the shipped Gaussian calibration table so that payload + Rice side information
  + norms hit ``KVConfig.bps``; the dithered quantizer sees ``α·x' + δ`` (variance α² + σ_δ²) and uses the
  smaller α with the same symbol variance. The rate reported is *measured*: exact Rice-coded length of the
  stripped symbols (per-block optimal k), plus 40 bits of side information per Rice block (8-bit k, 32-bit
  offset), plus the norms, divided by the number of real scalars (padding costs bits).

The attention processors that apply this to diffusers models live in
:mod:`hq_diffusion.integrations.kv_processors`.

What is saved: DiTs do not cache K/V across denoising steps, so the gain is attention bandwidth (bytes of K/V
read per step: 16 bits per scalar in fp16/bf16 vs the measured rate) — realized by a kernel that reads the
quantized K/V; this module is the torch reference and dequantizes before the kernel.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hq_diffusion.codec.configdict import (ConfigFieldError, check_block, check_bps, check_choice, check_seed,
                                           config_from_dict, config_to_dict)
from hq_diffusion.codec.hashing import MASK32, mix32_int, rht_signs, stream_base
from hq_diffusion.codec.lattice import LATTICES, SQRT3, nearest, to_physical
from hq_diffusion.codec.rate import alpha_for_rate, load_rate_table
from hq_diffusion.codec.rice import _num_blocks, stream_bits
from hq_diffusion.codec.strip import strip

__all__ = ["KVConfig", "KVStats", "quantize_kv", "haar_matrix", "voronoi_dither", "kv_alpha"]

KV_CONFIG_VERSION = 1
ROTATIONS = ("none", "signs", "haar")
NORM_BITS = 16  # fp16 norm per (token, head) vector
SIDE_BITS_PER_BLOCK = 8 + 32  # Rice parameter k + bit offset of each block
_GOLDEN = 0x9E3779B9
_SALT_HAAR = 0x48414152  # "HAAR"
_SALT_DITHER = 0x44495448  # "DITH"
_FP16_MAX = 65504.0


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KVConfig:
    """How attention K/V are quantized.

    Args:
        bps: target *total* bits per K/V scalar: Rice payload + Rice side information + the fp16 norm
            (16/head_dim) + padding. In [1.25, 16]; a head_dim too small for the norm to fit raises at use.
        lattice: ``"e8"`` (best), ``"d4"``, ``"a2"`` or ``"z"``.
        rotation: ``"none"``, ``"signs"`` (random ±1 diagonal) or ``"haar"`` (random orthogonal matrix).
        dither: subtractive dither uniform on the Voronoi cell (makes ⟨q, k̂⟩ unbiased).
        seed: seed of the rotations and of the dither, in [0, 2**32).
        block: symbols per Rice block (one k and one 32-bit offset each), a power of two, multiple of 8.
        version: config format version.
    """

    bps: float = 4.0
    lattice: str = "e8"
    rotation: str = "haar"
    dither: bool = True
    seed: int = 0
    block: int = 1024
    version: int = KV_CONFIG_VERSION

    def __post_init__(self):
        object.__setattr__(self, "bps", check_bps("KVConfig", "bps", self.bps))
        check_choice("KVConfig", "lattice", self.lattice, sorted(LATTICES))
        check_choice("KVConfig", "rotation", self.rotation, ROTATIONS)
        if not isinstance(self.dither, bool):
            raise ConfigFieldError("KVConfig", "dither", self.dither, "must be a bool")
        check_seed("KVConfig", "seed", self.seed)
        check_block("KVConfig", "block", self.block)
        if self.version != KV_CONFIG_VERSION:
            raise ConfigFieldError("KVConfig", "version", self.version, f"must be {KV_CONFIG_VERSION} in this build")

    @property
    def correction(self) -> str:
        """The bias-correction variant as a string: ``"haar+dither"``, ``"none"``, ..."""
        return self.rotation + ("+dither" if self.dither else "")

    @classmethod
    def from_options(cls, kv_bps: float, kv_correction: str = "haar+dither", lattice: str = "e8",
                     seed: int = 0) -> "KVConfig":
        """Build from command-line style options; ``kv_correction`` is ``ROTATION[+dither]`` with ROTATION in
        ``none``, ``signs``, ``haar`` (e.g. ``"none"``, ``"signs+dither"``, ``"haar+dither"``)."""
        parts = [p.strip().lower() for p in kv_correction.split("+")] if isinstance(kv_correction, str) else [None]
        rotation, rest = parts[0], parts[1:]
        if rotation not in ROTATIONS or rest not in ([], ["dither"]):
            valid = [r + d for r in ROTATIONS for d in ("", "+dither")]
            raise ConfigFieldError("KVConfig", "kv_correction", kv_correction, f"must be one of {valid}")
        return cls(bps=kv_bps, lattice=lattice, rotation=rotation, dither=bool(rest), seed=seed)

    def to_dict(self) -> dict:
        """``{"_type": "KVConfig", "_version": 1, "_data": {...}}`` (see :mod:`hq_diffusion.codec.configdict`)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KVConfig":
        """Inverse of :meth:`to_dict`; rejects other types, other versions, unknown and missing fields."""
        return config_from_dict(cls, d, version=KV_CONFIG_VERSION)


# ----------------------------------------------------------------------------------------------------------
# Randomness: rotations and dither, all derived from (seed, key[, step])
# ----------------------------------------------------------------------------------------------------------

def _seed64(seed: int, key: int | str, salt: int, step: int = 0) -> int:
    """A 64-bit generator seed from ``(seed, key, salt, step)`` through the codec's counter hash."""
    hi = mix32_int(stream_base(seed, key) ^ salt)
    lo = mix32_int((hi + (step & MASK32) * _GOLDEN) & MASK32)
    return (hi << 32) | lo


@functools.lru_cache(maxsize=4096)
def _haar_cpu(n: int, seed: int, key: int | str) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed64(seed, key, _SALT_HAAR))
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    # Sign fix: with diag(R) > 0 the factorization is unique and Q is Haar-distributed.
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(torch.float32)


@functools.lru_cache(maxsize=4096)
def _haar_on(n: int, seed: int, key: int | str, device: str) -> torch.Tensor:
    return _haar_cpu(n, seed, key).to(device)


def haar_matrix(n: int, seed: int, key: int | str, device=None) -> torch.Tensor:
    """Uniformly random orthogonal matrix drawn from ``(seed, key)``: float32 (n, n), cached.

    Drawn on CPU in float64 (QR of a Gaussian with the sign fix), so CPU and GPU runs use the same matrix."""
    return _haar_on(int(n), int(seed), key, str(torch.device(device or "cpu")))


def _box(lattice: str, n: int, device) -> torch.Tensor:
    """Side lengths (physical units) of a box that tiles space by vectors of the lattice: float32 (n,)."""
    if lattice == "a2":  # (2√3, 0) and (0, 2) are points of 2·A2
        return torch.tensor([2.0 * SQRT3, 2.0], device=device).repeat(n // 2)
    side = {"z": 1.0, "d4": 4.0, "e8": 4.0}[lattice]  # Z ⊃ Z; 4·Z^n ⊂ 2·D4, 2·E8
    return torch.full((n,), side, device=device)


def voronoi_dither(lattice: str, shape: tuple[int, ...], generator: torch.Generator, device=None) -> torch.Tensor:
    """Exact samples uniform on the Voronoi cell of the lattice (physical coordinates). float32 ``shape``,
    last axis a multiple of the lattice dimension.

    ``u`` uniform on a box spanned by lattice vectors covers the torus R^n/Λ uniformly, so ``u − Q(u)`` is
    uniform on the Voronoi cell (for Z this is uniform on [−½, ½))."""
    u = torch.rand(shape, generator=generator, device=device) * _box(lattice, shape[-1], device)
    return u - to_physical(lattice, nearest(lattice, u))


# ----------------------------------------------------------------------------------------------------------
# quantize_kv
# ----------------------------------------------------------------------------------------------------------

@dataclass
class KVStats:
    """Bit accounting of quantized K/V (sums, so several calls add up).

    Attributes: scalars (real K/V scalars), vectors, payload_bits (Rice-coded symbols, padding included),
    side_bits (k and offset per Rice block), norm_bits (16 per vector)."""

    scalars: int = 0
    vectors: int = 0
    payload_bits: int = 0
    side_bits: int = 0
    norm_bits: int = 0

    @property
    def bits(self) -> int:
        return self.payload_bits + self.side_bits + self.norm_bits

    @property
    def bits_per_scalar(self) -> float:
        return self.bits / self.scalars if self.scalars else float("nan")

    def add(self, other: "KVStats") -> None:
        for f in dataclasses.fields(KVStats):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _padded(lattice: str, d: int) -> int:
    n = LATTICES[lattice].dim
    return -(-d // n) * n


@functools.lru_cache(maxsize=1024)
def kv_alpha(cfg: KVConfig, head_dim: int) -> float:
    """Lattice scale α for vectors of ``head_dim`` scalars at ``cfg.bps`` total bits per scalar.

    The payload budget per coded coordinate is ``(bps − 16/D)·D/D' − 40/block``; α comes from the Gaussian
    calibration table (``alpha_for_rate``). With dither the quantizer input ``α·x' + δ`` has per-coordinate
    variance α² + σ_δ², so α is lowered to keep that equal to the table's α² (same symbol statistics).

    Raises:
        ValueError: when the norms and side information alone exceed the budget for this head_dim.
    """
    d = int(head_dim)
    dp = _padded(cfg.lattice, d)
    payload = (cfg.bps - NORM_BITS / d) * d / dp - SIDE_BITS_PER_BLOCK / cfg.block
    rmin = load_rate_table()["lattices"][cfg.lattice][0][1]
    if payload < rmin:
        raise ValueError(
            f"KVConfig.bps={cfg.bps} is too low for head_dim={d} with lattice {cfg.lattice!r}: the fp16 norm costs "
            f"{NORM_BITS / d:.3f} bits per scalar, leaving {payload:.3f} for the payload (minimum {rmin:.3f})"
        )
    alpha = alpha_for_rate(cfg.lattice, payload)
    if cfg.dither:
        info = LATTICES[cfg.lattice]
        alpha = math.sqrt(max(alpha * alpha - info.voronoi_mse / info.dim, 0.25 * alpha * alpha))
    return alpha


def quantize_kv(x: torch.Tensor, cfg: KVConfig, key: int | str, step: int | None = None
                ) -> tuple[torch.Tensor, KVStats]:
    """Quantize and dequantize K or V per vector along the last axis (see the module docstring).

    Args:
        x: float tensor (..., D), any float dtype and layout ((B, S, H, D) or (B, H, S, D)); every vector of the
            last axis is one (token, head) K or V vector. D ≥ 1; D' > D is handled by zero padding.
        cfg: the :class:`KVConfig`.
        key: names the tensor (e.g. ``"transformer_blocks.0.attn1/k"``): selects the rotation and, with
            ``step``, the dither stream.
        step: call counter mixed into the dither seed (``None`` = 0), so successive calls draw fresh dither.

    Returns:
        ``(x_hat, stats)``: x_hat has the shape, dtype and device of ``x``; stats is a :class:`KVStats` with the
        measured coded size of this tensor. No gradient flows through the quantizer.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize_kv expects a floating-point tensor, got {x.dtype}")
    d = x.shape[-1]
    if d < 1:
        raise ValueError("quantize_kv: the last axis (head_dim) is empty")
    lat = cfg.lattice
    dp = _padded(lat, d)
    alpha = kv_alpha(cfg, d)
    dev = x.device
    with torch.no_grad():
        xf = x.reshape(-1, d).to(torch.float32)  # (N, D)
        nvec = xf.shape[0]
        norm = xf.norm(dim=-1, keepdim=True).clamp_max(_FP16_MAX).to(torch.float16).to(torch.float32)  # (N, 1)
        root = math.sqrt(dp)
        inv = torch.where(norm > 0, root / norm, torch.zeros_like(norm))
        u = F.pad(xf, (0, dp - d)) * inv  # (N, D'), norm ≈ √D'
        if cfg.rotation == "signs":
            signs = rht_signs(dp, cfg.seed, key, device=dev)
            u = u * signs
        elif cfg.rotation == "haar":
            rot = haar_matrix(dp, cfg.seed, key, dev)  # (D', D'), orthogonal
            u = u @ rot.T
        v = u * alpha
        if cfg.dither:
            g = torch.Generator(device=dev).manual_seed(_seed64(cfg.seed, key, _SALT_DITHER, step or 0))
            delta = voronoi_dither(lat, (nvec, dp), g, dev)
            v = v + delta
        y = nearest(lat, v)  # int32 (N, D')
        p = to_physical(lat, y)
        if cfg.dither:
            p = p - delta
        u_hat = p * (1.0 / alpha)
        if cfg.rotation == "signs":
            u_hat = u_hat * signs
        elif cfg.rotation == "haar":
            u_hat = u_hat @ rot
        x_hat = u_hat[:, :d] * (norm / root)
        streams = strip(lat, y)
        payload = sum(stream_bits(z, cfg.block) for z in streams)
        blocks = sum(_num_blocks(z.numel(), cfg.block) for z in streams)
    stats = KVStats(scalars=nvec * d, vectors=nvec, payload_bits=payload,
                    side_bits=blocks * SIDE_BITS_PER_BLOCK, norm_bits=nvec * NORM_BITS)
    return x_hat.reshape(x.shape).to(x.dtype), stats
