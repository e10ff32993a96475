"""``HQConfig``: how :func:`hq_diffusion.quantize` quantizes a model.

Serialized as ``{"_type": "HQConfig", "_version": 1, "_data": {...}}`` into the safetensors metadata and the
``quantization_config`` of a saved component; :meth:`HQConfig.from_dict` resolves the type from an allowlist
and rejects unknown versions and fields.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from ..codec import CodecConfig
from ..codec.config import SCALE_DTYPES
from ..codec.lattice import LATTICES
from ..codec.rht import ALLOWED_TILES
from ..nn.kv import ROTATIONS as KV_ROTATIONS
from ..nn.linear import MMA_CHOICES, STORAGE_CHOICES

HQCONFIG_VERSION = 1
KV_CORRECTIONS = KV_ROTATIONS + tuple(f"{r}+dither" for r in KV_ROTATIONS)
BPS_RANGE = (1.25, 16.0)  # the codec's range: a Rice code spends at least one bit per scalar


class QuantMethod(str, Enum):
    """The ``quant_method`` under which hq-diffusion registers with diffusers (a str, with ``.value``)."""

    HQ_DIFFUSION = "hq_diffusion"


def _check_choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"HQConfig.{field} must be one of {list(allowed)}, got {value!r}")


def _check_bps(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"HQConfig.{field} must be a number in [{BPS_RANGE[0]}, {BPS_RANGE[1]}], got {value!r}")
    if not (BPS_RANGE[0] <= float(value) <= BPS_RANGE[1]):
        raise ValueError(f"HQConfig.{field} must be in [{BPS_RANGE[0]}, {BPS_RANGE[1]}] bits per weight, got {value}")


@dataclass(frozen=True)
class HQConfig:
    """Quantization settings of a model.

    Args:
        bps: target total rate of every quantized weight in bits per weight (payload, side information, row
            scales and header all counted), in [1.25, 16].
        lattice: ``"e8"`` (best), ``"d4"``, ``"a2"`` or ``"z"``; also used for K/V.
        mma: matmul path of the quantized linears: ``"bf16"`` (decode, then a float matmul in the activation
            dtype), ``"int8"`` (int8 activations × lattice integers), ``"fp8"``, ``"nvfp4"``, ``"mxfp4"``
            (simulated where the hardware lacks them) or ``"auto"`` (``"int8"`` on CUDA with ``torch._int_mm``,
            else ``"bf16"``; resolved at every forward from the activation's device).
        kv_bps: rate of the attention K/V quantization, or None (off).
        kv_correction: K/V bias correction: rotation ``"none"``, ``"signs"`` or ``"haar"``, optionally with
            ``"+dither"`` (subtractive dither).
        skip: module-name patterns kept in their original dtype, or None for the architecture preset
            (:mod:`hq_diffusion.integrations.presets`). A pattern is a glob over the full module name
            (``*`` crosses dots), or a regular expression (full match) when prefixed with ``"re:"``.
        storage: ``"rice"`` (the entropy-coded bitstream, decoded at each forward) or ``"int8"`` (the lattice
            integers as an int8 matrix: ≈ 8 bits per weight in memory, no entropy decoding).
        seed: seed of the RHT sign hash (the layer name is the per-layer key).
        tile: largest RHT tile, a power of two in 8..2048.
        block: symbols per Rice block.
        scale_dtype: dtype of the per-row scales: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        version: serialization version of this config.
    """

    quant_method: ClassVar[QuantMethod] = QuantMethod.HQ_DIFFUSION

    bps: float = 4.0
    lattice: str = "e8"
    mma: str = "auto"
    kv_bps: float | None = None
    kv_correction: str = "haar+dither"
    skip: tuple[str, ...] | None = None
    storage: str = "rice"
    seed: int = 0
    tile: int = 256
    block: int = 4096
    scale_dtype: str = "float16"
    version: int = HQCONFIG_VERSION

    def __post_init__(self):
        _check_bps("bps", self.bps)
        object.__setattr__(self, "bps", float(self.bps))
        _check_choice("lattice", self.lattice, sorted(LATTICES))
        _check_choice("mma", self.mma, MMA_CHOICES)
        if self.kv_bps is not None:
            _check_bps("kv_bps", self.kv_bps)
            object.__setattr__(self, "kv_bps", float(self.kv_bps))
        _check_choice("kv_correction", self.kv_correction, KV_CORRECTIONS)
        if self.skip is not None:
            if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
                raise ValueError(f"HQConfig.skip must be a list of pattern strings or None, got {self.skip!r}")
            object.__setattr__(self, "skip", tuple(self.skip))
            for p in self.skip:
                if p.startswith("re:"):
                    try:
                        re.compile(p[3:])
                    except re.error as e:
                        raise ValueError(f"HQConfig.skip: invalid regular expression {p!r}: {e}") from None
        _check_choice("storage", self.storage, STORAGE_CHOICES)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (0 <= self.seed < 2**32):
            raise ValueError(f"HQConfig.seed must be an int in [0, 2**32), got {self.seed!r}")
        _check_choice("tile", self.tile, ALLOWED_TILES)
        if (isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 8
                or self.block > 2**20 or self.block & (self.block - 1)):
            raise ValueError(f"HQConfig.block must be a power of two in [8, 2**20], got {self.block!r}")
        _check_choice("scale_dtype", self.scale_dtype, sorted(SCALE_DTYPES))
        if self.version != HQCONFIG_VERSION:
            raise ValueError(f"HQConfig.version must be {HQCONFIG_VERSION} (this build), got {self.version!r}")

    def codec_config(self) -> CodecConfig:
        """The codec configuration of the weights."""
        return CodecConfig(bps=self.bps, lattice=self.lattice, tile=self.tile, block=self.block, seed=self.seed,
                           scale_dtype=self.scale_dtype)

    def to_dict(self) -> dict:
        """JSON-safe ``{"_type", "_version", "_data"}``."""
        data = dataclasses.asdict(self)
        data["skip"] = None if self.skip is None else list(self.skip)
        data.pop("version")
        return {"_type": "HQConfig", "_version": self.version, "_data": data}

    @classmethod
    def from_dict(cls, d: dict) -> "HQConfig":
        """Inverse of :meth:`to_dict`. Raises ValueError for an unknown type, version or field."""
        if not isinstance(d, dict) or set(d) != {"_type", "_version", "_data"}:
            raise ValueError(f"not a serialized config (expected keys _type, _version, _data): {d!r}")
        target = CONFIG_TYPES.get(d["_type"])
        if target is None:
            raise ValueError(f"unknown config type {d['_type']!r}; known: {sorted(CONFIG_TYPES)}")
        if target is not cls and not issubclass(target, cls):
            raise ValueError(f"expected a serialized {cls.__name__}, got {d['_type']!r}")
        if d["_version"] != HQCONFIG_VERSION:
            raise ValueError(f"{d['_type']} version {d['_version']!r} is not supported by this build "
                             f"(it reads version {HQCONFIG_VERSION})")
        data = d["_data"]
        if not isinstance(data, dict):
            raise ValueError(f"{d['_type']}._data must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(target)} - {"version"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {d['_type']} fields: {sorted(unknown)}")
        return target(**data, version=d["_version"])


#: Allowlist of the config classes :meth:`HQConfig.from_dict` may build.
CONFIG_TYPES: dict[str, type] = {"HQConfig": HQConfig}
