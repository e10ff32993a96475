"""Codec configuration."""
from __future__ import annotations

from dataclasses import dataclass

from .configdict import (ConfigFieldError, check_block, check_bps, check_choice, check_seed, config_from_dict,
                         config_to_dict)
from .lattice import LATTICES
from .rht import ALLOWED_TILES
from .scales import SCALE_DTYPES  # noqa: F401 — re-exported: the scale formats and their stored dtypes

FORMAT_VERSION = 1
CODERS = ("rice", "rans", "auto")
#: ``coder="auto"`` codes with rANS up to this total rate (bits per scalar, per lattice) and with Rice above it.
#: rANS's tables hold at most 256 entries, so at high rates more and more symbols are escaped at 32 bits each and
#: Rice wins. Measured at the same total rate on 512×1024 (E8) and 256×1024 (D4, A2, Z) iid N(0,1), rANS − Rice in
#: dB (``bench rd``; docs/ARCHITECTURE.md "The rANS coder"): E8 +0.47 (7.5 bps), −0.24 (7.75), −1.24 (8);
#: D4 +0.39 (7), −0.13 (7.5); A2 +0.40 (6), −0.44 (7); Z +0.49 (7.5), −1.22 (8).
AUTO_RANS_MAX_BPS = {"e8": 7.5, "d4": 7.0, "a2": 6.0, "z": 7.5}
#: With an SNR target instead of a rate, ``"auto"`` codes with rANS up to this SNR (just below what rANS reached
#: at the last rate where it wins above; an SNR target fixes α, so the coder only changes the size).
AUTO_RANS_MAX_SNR_DB = {"e8": 43.0, "d4": 40.0, "a2": 34.0, "z": 42.5}
#: ... and only for tensors of at least this many scalars: rANS's side information (8 final states and an offset
#: per block, the tables) is fixed per tensor, so it loses on small ones. Measured E8, rANS − Rice in dB at 3 / 4 /
#: 5 bps (``bench rd``): 64×64 +0.03 / −0.38 / −1.29, 64×128 +0.18 / −0.11 / −0.54, 128×128 +0.35 / +0.18 / −0.06,
#: 128×256 +0.40 / +0.28 / +0.16.
AUTO_RANS_MIN_NUMEL = 1 << 15


@dataclass(frozen=True)
class CodecConfig:
    """How a tensor is encoded.

    Args:
        bps: target *total* rate in bits per scalar (payload, side information, scales and header all
            counted). Mutually exclusive with ``snr_db``; when neither is given, ``bps=4.0``.
        lattice: ``"e8"`` (best), ``"d4"``, ``"a2"`` or ``"z"``.
        snr_db: target SNR on unit-variance rows instead of a rate (α from the high-resolution formula).
        tile: largest RHT tile, a power of two in 8..2048 (smaller tiles are used when the row length asks).
        block: symbols per Rice block (one k and one offset each), a power of two in 8..2**20; with
            ``coder="rans"`` the steps per lane of a rANS block (a block codes ``8 · block`` symbols).
        seed: seed of the RHT sign hash.
        scale_dtype: format of the per-row scales: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"log8"``
            (one uint8 code per row on a per-tensor log2 grid plus 64 bits for the grid; :mod:`.scales`).
        coder: entropy coder: ``"rice"`` (format version 1), ``"rans"`` (interleaved rANS with static
            per-tensor tables, format version 2; about 0.08 bit per scalar less at the same distortion, so
            about +0.45 dB at the same total rate — docs/ARCHITECTURE.md) or ``"auto"`` (rANS up to
            :data:`AUTO_RANS_MAX_BPS` total bps or :data:`AUTO_RANS_MAX_SNR_DB` dB for the lattice and from
            :data:`AUTO_RANS_MIN_NUMEL` scalars, where it wins; Rice otherwise;
            :meth:`resolved_coder`). The codec's own default stays ``"rice"``, so that a bare ``encode`` keeps
            writing the version-1 blobs that the golden fixtures, the kernel AOT set and the kernel benches
            expect; the model-level default (``HQConfig.coder``, ``quantize``, ``hq-diffusion quantize``) is
            ``"auto"`` since the compiled CPU coder (docs/ARCHITECTURE.md "The rANS coder").
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
            raise ValueError("CodecConfig: give either bps or snr_db, not both")
        if self.bps is not None:
            check_bps("CodecConfig", "bps", self.bps)
        if self.snr_db is not None and not (-10.0 <= float(self.snr_db) <= 90.0):
            raise ConfigFieldError("CodecConfig", "snr_db", self.snr_db, "must be in [-10, 90] dB")
        check_choice("CodecConfig", "lattice", self.lattice, sorted(LATTICES))
        check_choice("CodecConfig", "tile", self.tile, ALLOWED_TILES)
        check_block("CodecConfig", "block", self.block)
        check_seed("CodecConfig", "seed", self.seed)
        check_choice("CodecConfig", "scale_dtype", self.scale_dtype, sorted(SCALE_DTYPES))
        check_choice("CodecConfig", "coder", self.coder, CODERS)
        if self.version != FORMAT_VERSION:
            raise ConfigFieldError("CodecConfig", "version", self.version,
                                   f"must be {FORMAT_VERSION} (the codec format version this build writes)")

    def resolved_coder(self, numel: int | None = None) -> str:
        """The coder :func:`~hq_diffusion.codec.encode` uses for a tensor of ``numel`` scalars: ``coder``, with
        ``"auto"`` resolved by the rate (or the SNR target) and the size — rANS up to :data:`AUTO_RANS_MAX_BPS`
        for tensors of at least :data:`AUTO_RANS_MIN_NUMEL` scalars (``numel=None``: a large tensor)."""
        if self.coder != "auto":
            return self.coder
        if numel is not None and numel < AUTO_RANS_MIN_NUMEL:
            return "rice"
        if self.bps is not None:
            return "rans" if float(self.bps) <= AUTO_RANS_MAX_BPS[self.lattice] else "rice"
        return "rans" if float(self.snr_db) <= AUTO_RANS_MAX_SNR_DB[self.lattice] else "rice"

    def to_dict(self) -> dict:
        """``{"_type": "CodecConfig", "_version", "_data"}`` form for metadata and quantization configs
        (:func:`~hq_diffusion.codec.configdict.config_to_dict`)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CodecConfig":
        """Inverse of :meth:`to_dict`; ValueError for another type or version, unknown or missing fields."""
        return config_from_dict(cls, d, version=FORMAT_VERSION)
