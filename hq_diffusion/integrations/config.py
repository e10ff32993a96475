"""``HQConfig``: how :func:`hq_diffusion.quantize` quantizes a model.

Serialized by the package's one config serializer (:mod:`hq_diffusion.codec.configdict`) as
``{"_type": "HQConfig", "_version": 2, "_data": {...}}`` into the safetensors metadata and the
``quantization_config`` of a saved component; :meth:`HQConfig.from_dict` rejects other types, unknown
versions and unknown or missing fields. Version 2 added ``coder``; a version-1 config (written before rANS
existed, every layer Rice-coded) reads as ``coder="rice"``.

``HQConfig`` validates its codec fields (``bps``, ``lattice``, ``tile``, ``block``, ``seed``, ``scale_dtype``)
by building its :class:`~hq_diffusion.codec.CodecConfig`, and its K/V fields (``kv_bps``, ``kv_correction``)
by building its ``KVConfig``: each range is checked once, where it belongs; errors name the ``HQConfig`` field.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from ..codec import CodecConfig
from ..codec.configdict import ConfigFieldError, check_choice, config_from_dict, config_to_dict
from ..nn.kv import ROTATIONS, KVConfig
from ..nn.linear import MMA_CHOICES, STORAGE_CHOICES

HQCONFIG_VERSION = 2
_HQCONFIG_V1 = 1  # read only: no "coder" field (every layer Rice-coded)
KV_CORRECTIONS = ROTATIONS + tuple(f"{r}+dither" for r in ROTATIONS)
# HQConfig field that sets each field of the configs it builds (errors are relabelled with it)
_CODEC_FIELDS = {"bps": "bps", "lattice": "lattice", "tile": "tile", "block": "block", "seed": "seed",
                 "scale_dtype": "scale_dtype", "coder": "coder"}
_KV_FIELDS = {"bps": "kv_bps", "kv_correction": "kv_correction", "rotation": "kv_correction",
              "dither": "kv_correction", "lattice": "lattice", "seed": "seed"}


class QuantMethod(str, Enum):
    """The ``quant_method`` under which hq-diffusion registers with diffusers (a str, with ``.value``)."""

    HQ_DIFFUSION = "hq_diffusion"


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
        storage: ``"rice"`` (the entropy-coded bitstream of ``coder``, decoded at each forward; the historical
            name) or ``"int8"`` (the lattice integers as an int8 matrix: ≈ 8 bits per weight in memory, no
            entropy decoding).
        coder: entropy coder of the bitstream: ``"auto"`` (default: rANS where it beats Rice at the same total
            rate — up to 7.5 bps for E8, for weights of at least 32768 scalars — Rice otherwise; :meth:`~hq_diffusion.codec.CodecConfig.resolved_coder`),
            ``"rice"`` or ``"rans"`` (docs/ARCHITECTURE.md "The rANS coder"). Each layer records the coder it got
            (``hq_meta["storage"]``); a saved config keeps its coder, so checkpoints written before load unchanged.
        seed: seed of the RHT sign hash (the layer name is the per-layer key).
        tile: largest RHT tile, a power of two in 8..2048.
        block: symbols per Rice block, a power of two in 8..2**20.
        scale_dtype: format of the per-row scales: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"log8"``
            (8-bit log-domain codes; :mod:`hq_diffusion.codec.scales`).
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
    coder: str = "auto"
    version: int = HQCONFIG_VERSION

    def __post_init__(self):
        if self.bps is None:  # CodecConfig would read None as "the default rate"
            raise ConfigFieldError("HQConfig", "bps", None, "must be a number (HQConfig has no snr_db target)")
        codec = self._build(self.codec_config, _CODEC_FIELDS)
        object.__setattr__(self, "bps", float(codec.bps))
        # kv_correction is validated even when K/V quantization is off (with the default K/V rate)
        kv = self._build(lambda: self.kv_config(KVConfig.bps if self.kv_bps is None else self.kv_bps), _KV_FIELDS)
        if kv.correction != self.kv_correction:  # from_options also reads "HAAR + dither"; keep one spelling
            raise ConfigFieldError("HQConfig", "kv_correction", self.kv_correction,
                                   f"must be one of {list(KV_CORRECTIONS)}")
        if self.kv_bps is not None:
            object.__setattr__(self, "kv_bps", kv.bps)
        check_choice("HQConfig", "mma", self.mma, MMA_CHOICES)
        check_choice("HQConfig", "storage", self.storage, STORAGE_CHOICES)
        if self.skip is not None:
            if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
                raise ConfigFieldError("HQConfig", "skip", self.skip, "must be a list of pattern strings or None")
            object.__setattr__(self, "skip", tuple(self.skip))
            for p in self.skip:
                if p.startswith("re:"):
                    try:
                        re.compile(p[3:])
                    except re.error as e:
                        raise ConfigFieldError("HQConfig", "skip", p, f"must hold valid regular expressions ({e})"
                                               ) from None
        if self.version != HQCONFIG_VERSION:
            raise ConfigFieldError("HQConfig", "version", self.version, f"must be {HQCONFIG_VERSION} (this build)")

    @staticmethod
    def _build(make, fields: dict[str, str]):
        """``make()``, with a :class:`ConfigFieldError` re-labelled with the HQConfig field that caused it."""
        try:
            return make()
        except ConfigFieldError as e:
            raise e.relabel("HQConfig", fields) from None

    def codec_config(self) -> CodecConfig:
        """The codec configuration of the weights."""
        return CodecConfig(bps=self.bps, lattice=self.lattice, tile=self.tile, block=self.block, seed=self.seed,
                           scale_dtype=self.scale_dtype, coder=self.coder)

    def kv_config(self, kv_bps: float | None = None) -> KVConfig:
        """The K/V configuration (rate ``kv_bps``, default ``self.kv_bps``; ValueError when K/V is off)."""
        kv_bps = self.kv_bps if kv_bps is None else kv_bps
        if kv_bps is None:
            raise ValueError("HQConfig.kv_bps is None: K/V quantization is off, there is no K/V config")
        return KVConfig.from_options(kv_bps=kv_bps, kv_correction=self.kv_correction, lattice=self.lattice,
                                     seed=self.seed)

    def to_dict(self) -> dict:
        """JSON-safe ``{"_type", "_version", "_data"}`` (:func:`~hq_diffusion.codec.configdict.config_to_dict`)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HQConfig":
        """Inverse of :meth:`to_dict`. Raises ValueError for another type, an unknown version, unknown or missing
        fields. A version-1 config (no ``coder`` field) reads as ``coder="rice"``, the only coder then."""
        if isinstance(d, dict) and d.get("_version") == _HQCONFIG_V1 and not isinstance(d.get("_version"), bool) \
                and isinstance(d.get("_data"), dict) and "coder" not in d["_data"]:
            d = {**d, "_version": HQCONFIG_VERSION, "_data": {**d["_data"], "coder": "rice"}}
        return config_from_dict(cls, d, version=HQCONFIG_VERSION)


#: The HQConfig fields a caller may set by keyword (``quantize(m, bps=4.0)``): every field but ``version``.
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(HQConfig) if f.name != "version")


def resolve_config(config: HQConfig | None, overrides: dict, *, caller: str, other_keywords=()) -> HQConfig:
    """The :class:`HQConfig` of a call taking ``config=None, **overrides`` (e.g. :func:`~.quantize.quantize`).

    Args:
        config: an HQConfig, or None for ``HQConfig(**overrides)``.
        overrides: HQConfig fields given as keyword arguments (see :data:`CONFIG_FIELDS`).
        caller: the function's name, for the messages.
        other_keywords: the caller's own keyword arguments, listed in the TypeError of an unknown keyword.

    Raises:
        TypeError: a keyword that is no HQConfig field (the message lists the valid ones), or a ``config``
            that is not an HQConfig.
        ValueError: a field given both through ``config`` and as a keyword, or a bad field value.
    """
    unknown = sorted(set(overrides) - set(CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {unknown}; valid: the HQConfig fields "
                        f"{list(CONFIG_FIELDS)} and {list(other_keywords)}")
    if config is None:
        return HQConfig(**overrides)
    if not isinstance(config, HQConfig):
        raise TypeError(f"{caller}(): config must be an HQConfig, got {type(config).__name__} {config!r} "
                        f"(set the rate with bps=..., e.g. {caller}(obj, bps=4.0))")
    if overrides:
        both = sorted(overrides)
        raise ValueError(f"{caller}(): give either config= or the settings {both} as keywords, not both: {both} "
                         f"given both ways (pass config=dataclasses.replace(config, {both[0]}=...) instead)")
    return config
