"""Diffusers attention processors that quantize K/V with :func:`hq_diffusion.nn.kv.quantize_kv`.

Attention processors (installed by :func:`apply_kv_quantization`, removed by :func:`remove_kv_quantization`):

- :class:`HQKVLTXAttnProcessor` replaces ``LTXVideoAttnProcessor``: LTX-Video ``LTXAttention`` (attn1, attn2).
- :class:`HQKVLTX2AttnProcessor` replaces ``LTX2AudioVideoAttnProcessor``: LTX-2 ``LTX2Attention``, all six
  modules of a block (attn1, attn2, audio_attn1, audio_attn2, audio_to_video_attn, video_to_audio_attn).
- :class:`HQKVFluxAttnProcessor` replaces ``FluxAttnProcessor``: Flux double- and single-stream blocks.
- :class:`HQKVSDPAProcessor` wraps every other processor a family of :mod:`.families` lists with kind
  ``"sdpa"`` (``AttnProcessor2_0``, ``JointAttnProcessor2_0``, ``WanAttnProcessor``, CogVideoX, HunyuanVideo,
  Sana's cross-attention, LTX-2 STG blocks, …; more through :func:`register_kv_processor`).

Which processor replaces which is read from the family registry (``Family.kv_processors``), the one list.

The first three reproduce the diffusers 0.42 processor math step by step and quantize K/V just before
``dispatch_attention_fn`` (any attention backend). :class:`HQKVSDPAProcessor` runs the original processor
unchanged inside a scoped :class:`torch.overrides.TorchFunctionMode` that intercepts its
``F.scaled_dot_product_attention`` calls (nothing global is patched); it needs a torch-SDPA backend.
``apply_kv_quantization(transformer, None)`` installs the same processors with quantization off, to check
on a given diffusers version that they reproduce the originals.

The K/V mathematics (configuration, rotations, dither, rate) is in :mod:`hq_diffusion.nn.kv`; the layers
are described in docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import functools
import inspect
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hq_diffusion.nn.compile_ops import Handles
from hq_diffusion.nn.kv import KVConfig, KVStats, quantize_kv

from . import families

__all__ = [
    "apply_kv_quantization", "remove_kv_quantization", "kv_summary", "reset_kv_state", "register_kv_processor",
    "HQKVProcessor", "HQKVLTXAttnProcessor", "HQKVLTX2AttnProcessor", "HQKVFluxAttnProcessor", "HQKVSDPAProcessor",
]


# ----------------------------------------------------------------------------------------------------------
# torch.compile: the stateful steps as opaque custom ops
# ----------------------------------------------------------------------------------------------------------
# K/V quantization keeps state on the host: the dither step of each processor (from the transformer call's
# timestep, read on the host), the call and bit counters, the coded size of every K/V tensor. Traced by Dynamo
# those would break the graph, or be baked into it as constants and recompile it at every call. While
# ``torch.compile`` traces, the clock's tick and each processor's quantization run instead as two custom ops
# whose implementations are the eager code: the graph holds them as opaque calls and they do their host work
# when the graph runs. A clock and a processor are named to their ops by handle tensors (graph inputs, so that
# one graph serves the processors of every block of a regionally compiled model: ``nn.compile_ops.Handles``);
# the clock's int64 tick counter (``token``) is mutated by the tick and read by every quantization, so
# that the compiled graph runs the tick first, as the eager forward pre-hook does. Eager forwards never go
# through here.

_PROCS = Handles("K/V processor")
_CLOCKS = Handles("dither clock")
_NO_CLOCK = torch.zeros(1, dtype=torch.int64, device="cpu")  # the token of a processor outside a transformer


@torch.library.custom_op("hq_diffusion::kv_clock", mutates_args=("token",))
def _kv_clock_op(token: torch.Tensor, t: Optional[torch.Tensor], t_float: Optional[float],
                 clock: torch.Tensor) -> None:
    """The tick of the clock whose handle is ``clock`` for a transformer call with timestep ``t`` (a tensor) or
    ``t_float`` (a number; both None: no timestep); ``token`` (int64 (1,)) counts the ticks."""
    _CLOCKS.get(clock).tick(t if t is not None else t_float)
    token.add_(1)


@_kv_clock_op.register_fake
def _(token, t, t_float, clock):
    return None


@torch.library.custom_op("hq_diffusion::kv_quantize", mutates_args=())
def _kv_quantize_op(key: torch.Tensor, value: torch.Tensor, token: torch.Tensor, proc: torch.Tensor,
                    counts_call: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``HQKVProcessor.quantize(key, value)`` of the processor whose handle is ``proc`` (int64 0-d; K, V (..., D)
    float; new contiguous tensors of the same shapes and dtypes), its call counted when ``counts_call``;
    ``token``: its clock's tick counter, read so that the tick runs first."""
    p = _PROCS.get(proc)
    if counts_call:
        p.stats.calls += 1
    k, v = p.quantize(key, value)  # the inputs themselves when the processor's cfg is None
    return (k.clone() if k is key else k).contiguous(), (v.clone() if v is value else v).contiguous()


@_kv_quantize_op.register_fake
def _(key, value, token, proc, counts_call):
    return key.new_empty(key.shape), value.new_empty(value.shape)


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
        step: the dither step of the next K/V quantization: set before every forward of the transformer from
            its ``timestep`` (:class:`_DitherClock`), so that the same pipeline call with the same generator
            draws the same dither whatever ran before, and each denoising step draws a fresh one.
    """

    def __init__(self, original: Any, name: str, cfg: KVConfig | None):
        self.original = original
        self.name = name
        self.cfg = cfg
        self.stats = _ModuleStats()
        self.step = 0
        self._token = _NO_CLOCK  # its dither clock's tick counter (set by the clock's installation)
        self._handle = _PROCS.register(self)  # names this processor to the compiled path's op

    def __setstate__(self, state: dict) -> None:  # a copy (deepcopy, pickle) gets a handle of its own
        self.__dict__.update(state)
        self._handle = _PROCS.register(self)

    def _count_call(self) -> None:
        """One processor call, in the statistics (under ``torch.compile`` the custom op counts it when it runs)."""
        if not torch.compiler.is_compiling():
            self.stats.calls += 1

    def _quantize_call(self, key: torch.Tensor, value: torch.Tensor, counts_call: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`quantize`, or under ``torch.compile`` the opaque op that runs it (and counts the call when
        ``counts_call``) when the graph runs, after this forward's clock tick."""
        if torch.compiler.is_compiling():
            return torch.ops.hq_diffusion.kv_quantize(key, value, self._token, self._handle, counts_call)
        return self.quantize(key, value)

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

        key, value = self._quantize_call(key, value)
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

        self._count_call()
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

        self._count_call()
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

        self._count_call()
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
        # (B, H, S, D): vectors along the last axis; compiled, the first kernel call counts the processor call
        k, v = self.proc._quantize_call(k, v, counts_call=self.kernel_calls == 1)
        return func(q, k, v, **params)


class HQKVSDPAProcessor(HQKVProcessor):
    """Generic path: runs the original processor unchanged and quantizes K/V (B, H, S, D) inside each of its
    ``F.scaled_dot_product_attention`` calls, i.e. after whatever QK-norm/RoPE the processor applies. Works for
    processors that call torch SDPA directly (``AttnProcessor2_0``, ``JointAttnProcessor2_0``, ...) or through
    ``dispatch_attention_fn`` with a torch-SDPA backend (``WanAttnProcessor``, ``LTX2PerturbedAttnProcessor``).
    """

    def __new__(cls, *args, **kwargs):
        # diffusers drops attention kwargs that are not parameters of ``processor.__call__``: an instance is of a
        # subclass per wrapped processor class whose ``__call__`` presents the original's signature (a class
        # attribute, which torch.compile traces; an instance attribute would stop it). A copy (no arguments) is
        # already of its subclass.
        if cls is HQKVSDPAProcessor:
            original = args[0] if args else kwargs["original"]
            cls = _sdpa_class(type(original))
        return super().__new__(cls)

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
        self._count_call()
        mode = _SDPAInterceptor(self)
        with mode:
            out = self.original(attn, *args, **kwargs)
        if mode.kernel_calls == 0 and not torch.compiler.is_compiling():
            self.stats.calls_without_kernel += 1
        return out

    def __call__(self, attn, *args, **kwargs):
        return self._call(attn, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def _sdpa_class(original_cls: type) -> type:
    """The :class:`HQKVSDPAProcessor` subclass for processors of class ``original_cls``: its ``__call__`` has the
    original's signature (``inspect.signature`` follows ``__wrapped__``)."""

    def __call__(self, attn, *args, **kwargs):
        return self._call(attn, *args, **kwargs)

    __call__.__wrapped__ = original_cls.__call__
    name = f"HQKVSDPAProcessor[{original_cls.__name__}]"
    return type(name, (HQKVSDPAProcessor,), {"__call__": __call__, "__module__": __name__, "__qualname__": name})


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


#: HQ processor kind (``Family.kv_processors`` of :mod:`.families`) -> processor class.
KV_KIND_CLASSES: dict[str, type[HQKVProcessor]] = {
    "ltx": HQKVLTXAttnProcessor, "ltx2": HQKVLTX2AttnProcessor, "flux": HQKVFluxAttnProcessor,
    "sdpa": HQKVSDPAProcessor,
}
# The diffusers processors each registered family names, with the HQ processor of their kind.
for _family in families.FAMILIES:
    for _path, _kind in _family.kv_processors:
        register_kv_processor(_path)(KV_KIND_CLASSES[_kind])


def _class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself, or the module a ``torch.compile`` wrapper (``OptimizedModule``) holds."""
    return getattr(module, "_orig_mod", module)


def _attention_modules(transformer: torch.nn.Module):
    for name, module in _unwrapped(transformer).named_modules():
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
    _install_clock(transformer)
    if skipped:
        warnings.warn(f"K/V quantization skipped {len(skipped)} attention module(s): " + "; ".join(skipped),
                      UserWarning, stacklevel=2)
    return installed


_CLOCK_ATTR = "_hq_kv_clock"


class _DitherClock:
    """Forward pre-hook of a transformer with K/V processors: sets every processor's dither ``step`` from the
    call's ``timestep`` (a CRC32 of its float64 values) and how many consecutive calls had that same timestep
    (a pipeline that runs the conditional and unconditional passes separately), mixed in a 32-bit counter.

    So the dither depends only on (seed, layer, K or V, timestep, repeat): the same pipeline call repeats it
    exactly, successive denoising steps draw independent streams, and nothing depends on what ran before. A
    transformer called without a ``timestep`` counts its calls since the last :func:`reset_kv_state`."""

    def __init__(self, transformer: torch.nn.Module):
        self.procs: list[HQKVProcessor] = []
        self.last: int | None = None
        self.repeat = 0
        self.op_handle = _CLOCKS.register(self)  # names this clock to the compiled path's op
        self.token = torch.zeros(1, dtype=torch.int64, device="cpu")  # ticks so far (orders the compiled ops)
        try:
            self.params = list(inspect.signature(transformer.forward).parameters)
        except (TypeError, ValueError):
            self.params = []
        self.handle = transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __setstate__(self, state: dict) -> None:  # a copy gets a handle of its own
        self.__dict__.update(state)
        self.op_handle = _CLOCKS.register(self)

    def _timestep(self, args, kwargs):
        t = kwargs.get("timestep")
        if t is None and "timestep" in self.params and self.params.index("timestep") < len(args):
            t = args[self.params.index("timestep")]
        return t

    def __call__(self, module, args, kwargs):
        t = self._timestep(args, kwargs)
        if torch.compiler.is_compiling():  # the tick runs when the compiled graph runs
            if isinstance(t, torch.Tensor):
                torch.ops.hq_diffusion.kv_clock(self.token, t, None, self.op_handle)
            else:
                torch.ops.hq_diffusion.kv_clock(self.token, None, None if t is None else float(t), self.op_handle)
            return
        self.tick(t)
        self.token.add_(1)

    def tick(self, t) -> None:
        """Set every processor's dither step for a transformer call with timestep ``t`` (tensor, number or None)."""
        if t is None:
            fp = 0
        elif isinstance(t, torch.Tensor):
            fp = zlib.crc32(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        else:
            fp = zlib.crc32(repr(float(t)).encode())
        self.repeat = self.repeat + 1 if fp == self.last else 0
        self.last = fp
        step = (fp * 0x9E3779B1 + self.repeat) & 0xFFFFFFFF
        for proc in self.procs:
            proc.step = step

    def reset(self) -> None:
        self.last, self.repeat = None, 0


def _install_clock(transformer: torch.nn.Module) -> None:
    transformer = _unwrapped(transformer)
    old = transformer.__dict__.pop(_CLOCK_ATTR, None)
    if old is not None:
        old.handle.remove()
    procs = [p for _, _, p in _installed(transformer)]
    if procs:
        clock = _DitherClock(transformer)
        clock.procs = procs
        for proc in procs:
            proc._token = clock.token
        transformer.__dict__[_CLOCK_ATTR] = clock


def _installed(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module, HQKVProcessor]]:
    return [(n, m, m.processor) for n, m in _attention_modules(transformer) if isinstance(m.processor, HQKVProcessor)]


def remove_kv_quantization(transformer: torch.nn.Module) -> list[str]:
    """Restore the original processors; returns the names of the modules restored."""
    names = []
    for name, module, proc in _installed(transformer):
        module.set_processor(proc.original)
        names.append(name)
    _install_clock(transformer)
    return names


def reset_kv_state(obj) -> None:
    """Zero the statistics and the dither step counters of a module, or of every module component of a
    pipeline, so that the next generation repeats the first whatever ran before it (the eval runner and the
    app call it before each quantized generation)."""
    if isinstance(obj, torch.nn.Module):
        modules = [obj]
    else:
        modules = [m for m in (getattr(obj, "components", None) or {}).values() if isinstance(m, torch.nn.Module)]
    for module in map(_unwrapped, modules):
        for _, _, proc in _installed(module):
            proc.reset()
        clock = module.__dict__.get(_CLOCK_ATTR)
        if clock is not None:
            clock.reset()


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
