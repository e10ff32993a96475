"""Codec configuration."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .lattice import LATTICES
from .rht import ALLOWED_TILES

FORMAT_VERSION = 1
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CODERS = ("rice",)


@dataclass(frozen=True)
class CodecConfig:
    """How a tensor is encoded.

    Args:
        bps: target *total* rate in bits per scalar (payload, side information, scales and header all
            counted). Mutually exclusive with ``snr_db``; when neither is given, ``bps=4.0``.
        lattice: ``"e8"`` (best), ``"d4"``, ``"a2"`` or ``"z"``.
        snr_db: target SNR on unit-variance rows instead of a rate (α from the high-resolution formula).
        tile: largest RHT tile, a power of two in 8..2048 (smaller tiles are used when the row length asks).
        block: symbols per Rice block (one k and one offset each), a multiple of 8.
        seed: seed of the RHT sign hash.
        scale_dtype: dtype of the per-row scales: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        coder: entropy coder; only ``"rice"``.
        version: format version this config writes.
    """

    bps: float | None = None
    lattice: str = "e8"
    snr_db: float | None = None
    tile: int = 256
    block: int = 4096
    seed: int = 0
    scale_dtype: str = "float16"
    coder: str = "rice"
    version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.bps is None and self.snr_db is None:
            object.__setattr__(self, "bps", 4.0)
        elif self.bps is not None and self.snr_db is not None:
            raise ValueError("give either bps or snr_db, not both")
        if self.bps is not None and not (1.25 <= float(self.bps) <= 16.0):
            raise ValueError(f"bps must be in [1.25, 16] (a Rice code spends ≥ 1 bit per scalar), got {self.bps}")
        if self.snr_db is not None and not (-10.0 <= float(self.snr_db) <= 90.0):
            raise ValueError(f"snr_db must be in [-10, 90], got {self.snr_db}")
        if self.lattice not in LATTICES:
            raise ValueError(f"unknown lattice {self.lattice!r}; choose one of {sorted(LATTICES)}")
        if self.tile not in ALLOWED_TILES:
            raise ValueError(f"tile must be a power of two in {ALLOWED_TILES}, got {self.tile}")
        if self.block <= 0 or self.block % 8 or self.block > 2**20 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two, a multiple of 8 and ≤ 2**20, got {self.block}")
        if not (0 <= int(self.seed) < 2**32):
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.coder not in CODERS:
            raise ValueError(f"coder must be one of {CODERS}, got {self.coder!r}")
        if self.version != FORMAT_VERSION:
            raise ValueError(f"this build writes codec format version {FORMAT_VERSION}, not {self.version}")

    def to_dict(self) -> dict:
        """``{"_type", "_version", "_data"}`` form for metadata and quantization configs."""
        return {"_type": "CodecConfig", "_version": self.version, "_data": dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "CodecConfig":
        if not isinstance(d, dict) or d.get("_type") != "CodecConfig":
            raise ValueError(f"not a serialized CodecConfig: {d!r}")
        if d.get("_version") != FORMAT_VERSION:
            raise ValueError(f"CodecConfig version {d.get('_version')} is not supported (expected {FORMAT_VERSION})")
        data = dict(d["_data"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown CodecConfig fields: {sorted(unknown)}")
        return cls(**data)
