"""Attention K/V quantization with bias correction (DESIGN.md §3).

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

Attention processors (installed by :func:`apply_kv_quantization`, removed by :func:`remove_kv_quantization`):

- :class:`HQKVLTXAttnProcessor` replaces ``LTXVideoAttnProcessor``: LTX-Video ``LTXAttention`` (attn1, attn2).
- :class:`HQKVLTX2AttnProcessor` replaces ``LTX2AudioVideoAttnProcessor``: LTX-2 ``LTX2Attention``, all six
  modules of a block (attn1, attn2, audio_attn1, audio_attn2, audio_to_video_attn, video_to_audio_attn).
- :class:`HQKVFluxAttnProcessor` replaces ``FluxAttnProcessor``: Flux double- and single-stream blocks.
- :class:`HQKVSDPAProcessor` wraps ``AttnProcessor2_0``, ``FusedAttnProcessor2_0``, ``JointAttnProcessor2_0``,
  ``FusedJointAttnProcessor2_0``, ``WanAttnProcessor`` and ``LTX2PerturbedAttnProcessor``: PixArt, SD3, Wan,
  Sana's cross-attention, LTX-2 STG blocks (more through :func:`register_kv_processor`).

The first three reproduce the diffusers 0.42 processor math step by step and quantize K/V just before
``dispatch_attention_fn`` (any attention backend). :class:`HQKVSDPAProcessor` runs the original processor
unchanged inside a scoped :class:`torch.overrides.TorchFunctionMode` that intercepts its
``F.scaled_dot_product_attention`` calls (nothing global is patched); it needs a torch-SDPA backend.
``apply_kv_quantization(transformer, None)`` installs the same processors with quantization off, to check
on a given diffusers version that they reproduce the originals.

What is saved: DiTs do not cache K/V across denoising steps, so the gain is attention bandwidth (bytes of K/V
read per step: 16 bits per scalar in fp16/bf16 vs the measured rate) — realized by a kernel that reads the
quantized K/V; this module is the torch reference and dequantizes before the kernel.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hq_diffusion.codec.hashing import MASK32, mix32_int, rht_signs, stream_base
from hq_diffusion.codec.lattice import LATTICES, SQRT3, nearest, to_physical
from hq_diffusion.codec.rate import alpha_for_rate, load_rate_table
from hq_diffusion.codec.rice import _num_blocks, stream_bits
from hq_diffusion.codec.strip import strip

__all__ = [
    "KVConfig", "KVStats", "quantize_kv", "haar_matrix", "voronoi_dither", "kv_alpha",
    "apply_kv_quantization", "remove_kv_quantization", "kv_summary", "reset_kv_state", "register_kv_processor",
    "HQKVProcessor", "HQKVLTXAttnProcessor", "HQKVLTX2AttnProcessor", "HQKVFluxAttnProcessor", "HQKVSDPAProcessor",
]

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
        if isinstance(self.bps, bool) or not isinstance(self.bps, (int, float)) or not math.isfinite(self.bps):
            raise ValueError(f"KVConfig.bps must be a finite number, got {self.bps!r}")
        if not 1.25 <= float(self.bps) <= 16.0:
            raise ValueError(f"KVConfig.bps must be in [1.25, 16] (Rice spends ≥ 1 bit per scalar), got {self.bps}")
        object.__setattr__(self, "bps", float(self.bps))
        if self.lattice not in LATTICES:
            raise ValueError(f"KVConfig.lattice must be one of {sorted(LATTICES)}, got {self.lattice!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"KVConfig.rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if not isinstance(self.dither, bool):
            raise ValueError(f"KVConfig.dither must be a bool, got {self.dither!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"KVConfig.seed must be an int in [0, 2**32), got {self.seed!r}")
        b = self.block
        if isinstance(b, bool) or not isinstance(b, int) or b < 8 or b % 8 or b > 2**20 or b & (b - 1):
            raise ValueError(f"KVConfig.block must be a power of two, a multiple of 8 and ≤ 2**20, got {b!r}")
        if self.version != KV_CONFIG_VERSION:
            raise ValueError(f"KVConfig.version must be {KV_CONFIG_VERSION} in this build, got {self.version!r}")

    @property
    def correction(self) -> str:
        """The bias-correction variant as a string: ``"haar+dither"``, ``"none"``, ..."""
        return self.rotation + ("+dither" if self.dither else "")

    @classmethod
    def from_options(cls, kv_bps: float, kv_correction: str = "haar+dither", lattice: str = "e8",
                     seed: int = 0) -> "KVConfig":
        """Build from command-line style options; ``kv_correction`` is ``ROTATION[+dither]`` with ROTATION in
        ``none``, ``signs``, ``haar`` (e.g. ``"none"``, ``"signs+dither"``, ``"haar+dither"``)."""
        if not isinstance(kv_correction, str):
            raise ValueError(f"kv_correction must be a string such as 'haar+dither', got {kv_correction!r}")
        parts = [p.strip().lower() for p in kv_correction.split("+")]
        rotation, rest = parts[0], parts[1:]
        if rotation not in ROTATIONS or rest not in ([], ["dither"]):
            valid = ", ".join(r + d for r in ROTATIONS for d in ("", "+dither"))
            raise ValueError(f"kv_correction must be one of {valid}; got {kv_correction!r}")
        return cls(bps=kv_bps, lattice=lattice, rotation=rotation, dither=bool(rest), seed=seed)

    def to_dict(self) -> dict:
        """``{"_type": "KVConfig", "_version": 1, "_data": {...}}``."""
        return {"_type": "KVConfig", "_version": self.version, "_data": dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "KVConfig":
        """Inverse of :meth:`to_dict`; rejects other types, other versions, unknown and missing fields."""
        if not isinstance(d, dict) or d.get("_type") != "KVConfig" or not isinstance(d.get("_data"), dict):
            raise ValueError(f"not a serialized KVConfig: {d!r}")
        if d.get("_version") != KV_CONFIG_VERSION:
            raise ValueError(f"KVConfig version {d.get('_version')!r} is not supported (expected {KV_CONFIG_VERSION})")
        data = dict(d["_data"])
        fields = {f.name for f in dataclasses.fields(cls)}
        if set(data) != fields:
            raise ValueError(f"KVConfig fields: unknown {sorted(set(data) - fields)}, "
                             f"missing {sorted(fields - set(data))}")
        return cls(**data)


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


# ----------------------------------------------------------------------------------------------------------
# Attention processors
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _ModuleStats(KVStats):
    calls: int = 0  # processor calls
    tensors: int = 0  # K/V tensors quantized
    calls_without_kernel: int = 0  # generic path: calls in which no torch SDPA call was seen


class HQKVProcessor:
    """Base of the K/V-quantizing processors.

    Attributes:
        original: the diffusers processor this one replaced (restored by :func:`remove_kv_quantization`).
        name: qualified name of the attention module (the rotation/dither key prefix).
        cfg: the :class:`KVConfig`, or ``None`` to run the processor math with K/V untouched.
        stats: per-module bit accounting and call counts.
        step: K/V quantizations done so far (the dither step).
    """

    def __init__(self, original: Any, name: str, cfg: KVConfig | None):
        self.original = original
        self.name = name
        self.cfg = cfg
        self.stats = _ModuleStats()
        self.step = 0

    @classmethod
    def unsupported_reason(cls, original: Any) -> str | None:
        """Why ``original`` cannot be wrapped by this class (``None`` if it can)."""
        return None

    def quantize(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize K and V (..., D) per vector of the last axis; identity when ``cfg`` is None."""
        if self.cfg is None:
            return key, value
        step, self.step = self.step, self.step + 1
        k_hat, sk = quantize_kv(key, self.cfg, f"{self.name}/k", step)
        v_hat, sv = quantize_kv(value, self.cfg, f"{self.name}/v", step)
        self.stats.add(sk)
        self.stats.add(sv)
        self.stats.tensors += 2
        return k_hat, v_hat

    def reset(self) -> None:
        self.stats = _ModuleStats()
        self.step = 0


class _DispatchProcessor(HQKVProcessor):
    """Explicit processors: carry the attention backend / parallel config that ``dispatch_attention_fn`` uses."""

    def __init__(self, original: Any, name: str, cfg: KVConfig | None):
        super().__init__(original, name, cfg)
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def _attend(self, query, key, value, attention_mask, **kwargs):
        """(B, S, H, D) query/key/value → (B, S, H, D) through diffusers' dispatcher, after quantizing K/V."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        key, value = self.quantize(key, value)
        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                     parallel_config=self._parallel_config, **kwargs)


def _prepare_mask(attn, attention_mask, context):
    if attention_mask is None:
        return None
    batch, seq, _ = context.shape
    mask = attn.prepare_attention_mask(attention_mask, seq, batch)
    return mask.view(batch, attn.heads, -1, mask.shape[-1])


class HQKVLTXAttnProcessor(_DispatchProcessor):
    """LTX-Video ``LTXAttention`` (diffusers ``LTXVideoAttnProcessor``): to_q/to_k/to_v → RMSNorm over all heads
    (norm_q, norm_k) → RoPE → split heads → **quantize K, V** (B, S, H, D) → attention → to_out."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        self.stats.calls += 1
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = _prepare_mask(attn, attention_mask, context)
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(context))
        value = attn.to_v(context)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        out = self._attend(query, key, value, attention_mask, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class HQKVLTX2AttnProcessor(_DispatchProcessor):
    """LTX-2 ``LTX2Attention`` (diffusers ``LTX2AudioVideoAttnProcessor``), used by all six attention modules of a
    block (attn1, attn2, audio_attn1, audio_attn2, audio_to_video_attn, video_to_audio_attn): projections →
    RMSNorm over all heads → RoPE (interleaved or split; separate query/key RoPE for the cross-modal
    modules) → split heads → **quantize K, V** (B, S, H, D) → attention → optional per-head gates → to_out."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, query_rotary_emb=None,
                 key_rotary_emb=None) -> torch.Tensor:
        from diffusers.models.transformers.transformer_ltx2 import (
            apply_interleaved_rotary_emb,
            apply_split_rotary_emb,
        )

        self.stats.calls += 1
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = _prepare_mask(attn, attention_mask, context)
        gate_proj = getattr(attn, "to_gate_logits", None)
        gate_logits = gate_proj(hidden_states) if gate_proj is not None else None
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(context))
        value = attn.to_v(context)
        if query_rotary_emb is not None:
            rope = {"interleaved": apply_interleaved_rotary_emb, "split": apply_split_rotary_emb}.get(
                getattr(attn, "rope_type", "interleaved"))
            if rope is not None:
                query = rope(query, query_rotary_emb)
                key = rope(key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        out = self._attend(query, key, value, attention_mask, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).to(query.dtype)
        if gate_logits is not None:
            gates = 2.0 * torch.sigmoid(gate_logits)  # (B, T, H); zero logits give gates of 1
            out = (out.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))


class HQKVFluxAttnProcessor(_DispatchProcessor):
    """Flux ``FluxAttention`` (diffusers ``FluxAttnProcessor``): image (and, in double-stream blocks, text)
    projections → per-head RMSNorm → text tokens first → RoPE → **quantize K, V** (B, S, H, D) → attention →
    split back; double-stream blocks return ``(image, text)`` after to_out / to_add_out, single-stream blocks
    return the attention output unprojected."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        self.stats.calls += 1
        context = None
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
                context = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
                context = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                           attn.add_v_proj(encoder_hidden_states))
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in context)
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((eq, query), (ek, key), (ev, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self._attend(query, key, value, attention_mask)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        n_text = encoder_hidden_states.shape[1]
        text, image = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


_TORCH_SDPA_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _SDPAInterceptor(TorchFunctionMode):
    """Scoped to one processor call: quantizes K and V of every ``F.scaled_dot_product_attention`` call."""

    def __init__(self, proc: "HQKVSDPAProcessor"):
        super().__init__()
        self.proc = proc
        self.kernel_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.kernel_calls += 1
        params = dict(zip(_SDPA_PARAMS, args), **kwargs)
        q, k, v = params.pop("query"), params.pop("key"), params.pop("value")
        k, v = self.proc.quantize(k, v)  # (B, H, S, D): vectors along the last axis
        return func(q, k, v, **params)


class HQKVSDPAProcessor(HQKVProcessor):
    """Generic path: runs the original processor unchanged and quantizes K/V (B, H, S, D) inside each of its
    ``F.scaled_dot_product_attention`` calls, i.e. after whatever QK-norm/RoPE the processor applies. Works for
    processors that call torch SDPA directly (``AttnProcessor2_0``, ``JointAttnProcessor2_0``, ...) or through
    ``dispatch_attention_fn`` with a torch-SDPA backend (``WanAttnProcessor``, ``LTX2PerturbedAttnProcessor``).
    """

    def __init__(self, original: Any, name: str, cfg: KVConfig | None):
        super().__init__(original, name, cfg)

        def call(*args, **kwargs):
            return self._call(*args, **kwargs)

        # diffusers drops attention kwargs that are not parameters of ``processor.__call__``: present the
        # original processor's signature (inspect.signature follows __wrapped__).
        self.__call__ = functools.wraps(original.__call__)(call)

    # The attention backend lives on the wrapped processor (``set_attention_backend`` reaches it through here).
    @property
    def _attention_backend(self):
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.original._attention_backend = value

    @classmethod
    def unsupported_reason(cls, original: Any) -> str | None:
        backend = getattr(original, "_attention_backend", None)
        name = getattr(backend, "value", backend)
        if name is not None and name not in _TORCH_SDPA_BACKENDS:
            return f"attention backend {name!r} does not go through torch scaled_dot_product_attention"
        return None

    def _call(self, attn, *args, **kwargs):
        self.stats.calls += 1
        mode = _SDPAInterceptor(self)
        with mode:
            out = self.original(attn, *args, **kwargs)
        if mode.kernel_calls == 0:
            self.stats.calls_without_kernel += 1
        return out

    def __call__(self, attn, *args, **kwargs):  # the instance attribute set in __init__ carries the signature
        return self._call(attn, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Registry and installation
# ----------------------------------------------------------------------------------------------------------

_KV_PROCESSORS: dict[str, type[HQKVProcessor]] = {}


def register_kv_processor(*class_paths: str) -> Callable[[type[HQKVProcessor]], type[HQKVProcessor]]:
    """Class decorator / function: make ``apply_kv_quantization`` replace processors whose class is one of
    ``class_paths`` (``"module.QualName"`` of the diffusers processor class) by the decorated class."""

    def deco(cls: type[HQKVProcessor]) -> type[HQKVProcessor]:
        for path in class_paths:
            _KV_PROCESSORS[path] = cls
        return cls

    return deco


register_kv_processor("diffusers.models.transformers.transformer_ltx.LTXVideoAttnProcessor")(HQKVLTXAttnProcessor)
register_kv_processor("diffusers.models.transformers.transformer_ltx2.LTX2AudioVideoAttnProcessor")(
    HQKVLTX2AttnProcessor)
register_kv_processor("diffusers.models.transformers.transformer_flux.FluxAttnProcessor")(HQKVFluxAttnProcessor)
register_kv_processor(
    "diffusers.models.attention_processor.AttnProcessor2_0",
    "diffusers.models.attention_processor.FusedAttnProcessor2_0",
    "diffusers.models.attention_processor.JointAttnProcessor2_0",
    "diffusers.models.attention_processor.FusedJointAttnProcessor2_0",
    "diffusers.models.transformers.transformer_wan.WanAttnProcessor",
    "diffusers.models.transformers.transformer_ltx2.LTX2PerturbedAttnProcessor",
    "diffusers.models.attention_processor.CogVideoXAttnProcessor2_0",
    "diffusers.models.attention_processor.FusedCogVideoXAttnProcessor2_0",
    "diffusers.models.transformers.transformer_hunyuan_video.HunyuanVideoAttnProcessor2_0",
    "diffusers.models.transformers.sana_transformer.SanaAttnProcessor2_0",
)(HQKVSDPAProcessor)


def _class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _attention_modules(transformer: torch.nn.Module):
    for name, module in transformer.named_modules():
        if hasattr(module, "processor") and callable(getattr(module, "set_processor", None)):
            yield name, module


def apply_kv_quantization(transformer: torch.nn.Module, cfg: KVConfig | None) -> list[str]:
    """Install K/V-quantizing processors on every supported attention module of ``transformer``.

    Args:
        transformer: a diffusers transformer (or any module tree containing diffusers attention modules).
        cfg: the :class:`KVConfig`; ``None`` installs the same processors with quantization off (to verify
            that they reproduce the originals). Applying again replaces the previous configuration.

    Returns:
        Names of the modules now quantizing K/V. Modules with unsupported processors are left as they are and
        named in a single ``UserWarning``.
    """
    if cfg is not None and not isinstance(cfg, KVConfig):
        raise TypeError(f"cfg must be a KVConfig or None, got {type(cfg).__name__}")
    installed, skipped = [], []
    for name, module in _attention_modules(transformer):
        proc = module.processor
        if isinstance(proc, HQKVProcessor):
            proc = proc.original
        cls = _KV_PROCESSORS.get(_class_path(proc))
        reason = f"processor {type(proc).__name__} is not supported" if cls is None else cls.unsupported_reason(proc)
        if reason is not None:
            skipped.append(f"{name or '<root>'} ({reason})")
            if module.processor is not proc:  # a previous installation: put the original back
                module.set_processor(proc)
            continue
        module.set_processor(cls(proc, name, cfg))
        installed.append(name)
    if skipped:
        warnings.warn(f"K/V quantization skipped {len(skipped)} attention module(s): " + "; ".join(skipped),
                      UserWarning, stacklevel=2)
    return installed


def _installed(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module, HQKVProcessor]]:
    return [(n, m, m.processor) for n, m in _attention_modules(transformer) if isinstance(m.processor, HQKVProcessor)]


def remove_kv_quantization(transformer: torch.nn.Module) -> list[str]:
    """Restore the original processors; returns the names of the modules restored."""
    names = []
    for name, module, proc in _installed(transformer):
        module.set_processor(proc.original)
        names.append(name)
    return names


def reset_kv_state(transformer: torch.nn.Module) -> None:
    """Zero the statistics and the dither step counters, so that the next generation repeats the first."""
    for _, _, proc in _installed(transformer):
        proc.reset()


def kv_summary(transformer: torch.nn.Module) -> dict | None:
    """What K/V quantization did so far on ``transformer``; ``None`` if it is not installed.

    Returns:
        ``{"config", "modules", "calls", "scalars", "bits_per_scalar", "breakdown": {"payload", "side",
        "norms"}, "bytes_fp16", "bytes_quantized", "compression", "calls_without_kernel", "not_quantized",
        "per_module": {name: {"calls", "bits_per_scalar"}}, "note"}``. Rates are measured (bits per real K/V
        scalar, norms and Rice side information included) and weighted by the number of scalars; they are
        ``None`` before the first forward pass.
    """
    procs = _installed(transformer)
    if not procs:
        return None
    total = KVStats()
    per_module, configs = {}, []
    for name, _, proc in procs:
        total.add(proc.stats)
        per_module[name] = {"calls": proc.stats.calls,
                            "bits_per_scalar": proc.stats.bits_per_scalar if proc.stats.scalars else None}
        d = proc.cfg.to_dict() if proc.cfg is not None else None
        if d not in configs:
            configs.append(d)
    n = total.scalars

    def per(bits):
        return bits / n if n else None

    return {
        "config": configs[0] if len(configs) == 1 else configs,
        "modules": len(procs),
        "calls": sum(p.stats.calls for _, _, p in procs),
        "scalars": n,
        "bits_per_scalar": per(total.bits),
        "breakdown": {"payload": per(total.payload_bits), "side": per(total.side_bits), "norms": per(total.norm_bits)},
        "bytes_fp16": 2 * n,
        "bytes_quantized": total.bits / 8,
        "compression": (16 * n / total.bits) if total.bits else None,
        "calls_without_kernel": sum(p.stats.calls_without_kernel for _, _, p in procs),
        "not_quantized": [f"{name or '<root>'} ({type(m.processor).__name__})"
                          for name, m in _attention_modules(transformer) if not isinstance(m.processor, HQKVProcessor)],
        "per_module": per_module,
        "note": ("DiTs do not cache K/V across denoising steps: the saving is attention bandwidth, i.e. bytes of K/V "
                 "read per step (bytes_fp16 at 16 bits per scalar vs bytes_quantized), realized by a kernel that "
                 "reads the quantized K/V; this torch reference dequantizes before the attention kernel."),
    }
