"""LoRA adapters on quantized layers: a peft LoRA layer for :class:`~hq_diffusion.nn.linear.HQLinear`.

diffusers' ``load_lora_weights`` builds a peft ``LoraConfig`` itself and lets peft replace every targeted module by
a LoRA layer chosen by peft's dispatchers; an ``HQLinear`` (not an ``nn.Linear``) matches none of them. peft's
extension point for such layers is ``LoraConfig._register_custom_module({base_cls: lora_cls})``, which its first
dispatcher consults; since diffusers gives no way to pass it through ``load_lora_weights``, :func:`register`
makes every ``LoraConfig`` carry ``{HQLinear: HQLoraLinear}`` (peft's own mapping entries, or a user's, are
kept). :mod:`~hq_diffusion.integrations.autoregister` calls it when peft's LoRA config module is imported.

The adapter runs in float beside the compressed base weight: ``y = HQLinear(x) + B(A(dropout(x))) · scaling``;
the base weight is never decoded into a parameter. Fusing (``fuse_lora`` / ``merge``) is refused with
:class:`LoraFuseError` before any layer changes (the model-level ``fuse_lora`` is checked first too), because
fusing would either keep a float weight (not a quantized model) or re-quantize (a second quantization error).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from peft.tuners.lora.config import LoraConfig
from peft.tuners.lora.layer import LoraLayer

from ..nn.linear import HQLinear


class LoraFuseError(ValueError):
    """``fuse_lora`` on a LoRA adapter whose base layer is a compressed :class:`HQLinear`."""

    def __init__(self, layer: str):
        super().__init__(
            f"fuse_lora is not supported on the quantized layer {layer!r} (HQLinear keeps its weight compressed); "
            "keep the adapter unfused (it runs in float beside the compressed weight; scale it with "
            "set_adapters), or call transformer.dequantize(), fuse, and quantize again with hq_diffusion.quantize")


class HQLoraLinear(nn.Module, LoraLayer):
    """peft LoRA layer over an :class:`HQLinear` base.

    Forward: x (..., K) float → (..., N) in the base output's dtype; each active adapter adds
    ``lora_B(lora_A(dropout(x))) · scaling`` computed in the adapter's dtype (``lora_A.weight``: (r, K),
    ``lora_B.weight``: (N, r), the base layer's weight dtype by default). Plain LoRA only (no DoRA, no LoRA bias,
    no other variants: refused at construction with a ``ValueError`` naming the layer).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, LoraLayer) else base_layer
        name = getattr(base, "name", "") or kwargs.get("target_name", "") or "HQLinear"
        for flag in ("use_dora", "lora_bias"):
            if getattr(config, flag, False):
                raise ValueError(f"LoRA on the quantized layer {name!r}: {flag}=True is not supported "
                                 "(plain LoRA only)")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        return None  # plain LoRA (variants are refused in __init__)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        # the compressed buffers give the device, the layer's original weight dtype the adapter dtype
        base = base_layer if isinstance(base_layer, HQLinear) else self.get_base_layer()
        return base.scales.device, base.weight_dtype

    def _layer_name(self) -> str:
        return getattr(self.get_base_layer(), "name", "") or "HQLinear"

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise LoraFuseError(self._layer_name())

    def unmerge(self) -> None:
        """Nothing is ever merged (see :meth:`merge`)."""

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """(N, K) ``B @ A · scaling`` of ``adapter``, in the adapter's dtype (for inspection)."""
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        out_dtype = result.dtype
        if adapter_names is not None:  # a different adapter per batch element
            for adapter in set(adapter_names):
                if adapter not in self.lora_A:
                    continue
                rows = [i for i, a in enumerate(adapter_names) if a == adapter]
                result[rows] = result[rows] + self._delta(adapter, x[rows]).to(out_dtype)
            return result
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                result = result + self._delta(adapter, x).to(out_dtype)
        return result

    def _delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        lora_a = self.lora_A[adapter]
        if not torch.is_autocast_enabled():
            x = self._cast_input_dtype(x, lora_a.weight.dtype)
        return self.lora_B[adapter](lora_a(self.lora_dropout[adapter](x))) * self.scaling[adapter]

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def check_fusable(model: nn.Module) -> None:
    """Raise :class:`LoraFuseError` naming the first LoRA layer of ``model`` whose base is an :class:`HQLinear`
    (called before diffusers' ``fuse_lora`` changes any layer)."""
    for module in model.modules():
        if isinstance(module, HQLoraLinear):
            raise LoraFuseError(module._layer_name())


_MAPPING = {HQLinear: HQLoraLinear}


def _post_init_with_hq(original):
    def __post_init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        custom = getattr(self, "_custom_modules", None) or {}
        self._register_custom_module({k: v for k, v in _MAPPING.items() if k not in custom})
    __post_init__._hq_wrapped = True
    __post_init__.__wrapped__ = original
    return __post_init__


def _fuse_checked(original):
    def fuse_lora(self, *args, **kwargs):
        check_fusable(self)
        return original(self, *args, **kwargs)
    fuse_lora._hq_wrapped = True
    fuse_lora.__wrapped__ = original
    return fuse_lora


def register() -> None:
    """Make peft's ``LoraConfig`` dispatch :class:`HQLinear` to :class:`HQLoraLinear`, and diffusers' model-level
    ``fuse_lora`` refuse before changing anything when a quantized layer carries an adapter (idempotent)."""
    if not getattr(LoraConfig.__post_init__, "_hq_wrapped", False):
        LoraConfig.__post_init__ = _post_init_with_hq(LoraConfig.__post_init__)
    peft_mixin = sys.modules.get("diffusers.loaders.peft")
    cls = getattr(peft_mixin, "PeftAdapterMixin", None)
    if cls is not None and not getattr(cls.fuse_lora, "_hq_wrapped", False):
        cls.fuse_lora = _fuse_checked(cls.fuse_lora)
