"""hq-diffusion as a diffusers quantization backend (``quant_method="hq_diffusion"``).

Importing this module registers :class:`HQDiffusersQuantizer` and :class:`HQCheckpointConfig` in
``diffusers.quantizers.auto.AUTO_QUANTIZER_MAPPING`` / ``AUTO_QUANTIZATION_CONFIG_MAPPING`` (diffusers 0.42
has no public registry; those module-level dicts are what ``ModelMixin.from_pretrained`` consults). Then:

- ``SomeTransformer.from_pretrained(saved_dir)`` loads a directory written by
  :func:`~hq_diffusion.integrations.serialization.save_quantized` (its ``config.json`` carries
  ``quantization_config``): the model is built on ``meta``, the quantized ``nn.Linear`` are swapped for empty
  :class:`~hq_diffusion.nn.linear.HQLinear` at their packed shapes before the weights load, and every tensor
  of the file is checked against the CRC32 table of its metadata first. ``DiffusionPipeline.from_pretrained``
  of a saved pipeline goes through the same path for its quantized components.
- ``SomeTransformer.from_pretrained(bf16_dir, quantization_config=HQConfig(...))`` loads the float weights
  as usual and quantizes after loading (:func:`~hq_diffusion.integrations.quantize.quantize`).
- A model loaded either way, or quantized by ``hq_diffusion.quantize`` / loaded by ``hq_diffusion.load_quantized``
  (both call :func:`attach_quantizer` through :func:`hq_diffusion.integrations.api.attach_to_diffusers`), can
  be written back with diffusers' ``save_pretrained`` — also inside ``pipe.save_pretrained`` — as an
  hq-diffusion checkpoint (same config.json and safetensors metadata as ``save_quantized``, but not written
  atomically).

:func:`hq_diffusion.load_quantized` remains the primary path (it also rebuilds pipelines and repairs an
interrupted save). Registering also wraps ``ModelMixin.from_pretrained`` (:func:`guarded_from_pretrained`): for a
local hq-diffusion component directory every failure is an :class:`~hq_diffusion.codec.HQFormatError` naming the
file (config.json nested too deeply or with a bad field, a weights file that is an hq-diffusion checkpoint under a
config.json that lost its ``quantization_config``, a tensor missing from the file), no parameter or buffer may
be left on ``meta``, and the manifest of the saved directory (:mod:`.manifest`) is verified — for a component of
a saved pipeline, the whole pipeline's files, so that ``DiffusionPipeline.from_pretrained`` refuses a flipped
byte in the VAE or text encoder too. Other loads pass through unchanged, except that a non-quantized component
of a directory with a manifest is checked against it.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import sys

import torch
from diffusers.quantizers import auto as _auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from ..codec import HQFormatError

from . import load_quantize
from . import autoregister
from .config import HQConfig, QuantMethod, resolve_config
from .quantize import quantize
from .manifest import check_directory, find_manifest, verify_manifest
from .shards import weights_file
from .state import (METADATA_KEY, STATE_ATTR, HQState, apply_kv, check_no_meta, kv_api, check_quantization_config,
                    file_metadata, looks_quantized, manifest_flag, quantization_config, read_checkpoint_metadata,
                    read_json_file, read_verified_tensors, refuse_stripped_config, strip_file_keys,
                    swap_in_empty_hqlinears)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class HQCheckpointConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a saved hq-diffusion component, as diffusers handles it.

    Attributes:
        quant_method: ``"hq_diffusion"``.
        hq_config: the :class:`HQConfig` the component was quantized with.
        checkpoint: the full JSON ``quantization_config`` (layers' metadata, skipped layers, K/V config).
    """

    def __init__(self, checkpoint: dict):
        self.quant_method = QuantMethod.HQ_DIFFUSION
        self.hq_config = check_quantization_config(checkpoint, "quantization_config", with_checksums=False)
        self.checkpoint = copy.deepcopy(checkpoint)

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        cfg = cls(config_dict)
        return (cfg, kwargs) if return_unused_kwargs else cfg

    def to_dict(self) -> dict:
        return copy.deepcopy(self.checkpoint)

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


class _AcceptsHQConfig(type):
    """Metaclass of :class:`HQQuantizationConfig`: an :class:`HQConfig` is an instance too, so that diffusers'
    ``PipelineQuantizationConfig(quant_mapping={"transformer": HQConfig(...)})`` accepts it (diffusers checks
    ``isinstance`` against the registered config classes)."""

    def __instancecheck__(cls, obj):
        return isinstance(obj, HQConfig) or type.__instancecheck__(cls, obj)


class HQQuantizationConfig(QuantizationConfigMixin, metaclass=_AcceptsHQConfig):
    """The config class registered under ``"hq_diffusion"`` (in diffusers' and transformers' mappings).

    ``HQQuantizationConfig(**fields)`` takes the :class:`HQConfig` fields as keywords — what
    ``PipelineQuantizationConfig(quant_backend="hq_diffusion", quant_kwargs={...})`` calls — and
    :meth:`from_dict` reads the ``quantization_config`` of a saved component (an :class:`HQCheckpointConfig`).

    Attributes:
        quant_method: ``"hq_diffusion"``.
        hq_config: the :class:`HQConfig` built from the keywords.
    """

    def __init__(self, **kwargs):
        self.quant_method = QuantMethod.HQ_DIFFUSION
        self.hq_config = resolve_config(None, kwargs, caller="HQQuantizationConfig")

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        cfg = HQCheckpointConfig(config_dict)
        return (cfg, kwargs) if return_unused_kwargs else cfg

    def to_dict(self) -> dict:
        return {"quant_method": QuantMethod.HQ_DIFFUSION.value, **self.hq_config.to_dict()}

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self):
        return f"HQQuantizationConfig({self.hq_config!r})"


class HQDiffusersQuantizer(DiffusersQuantizer):
    """diffusers quantizer for ``quant_method="hq_diffusion"`` (see the module docstring)."""

    requires_calibration = False
    required_packages = None

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if isinstance(quantization_config, HQConfig):
            if self.pre_quantized:
                raise ValueError("an HQConfig asks to quantize float weights, but this checkpoint is already "
                                 "quantized")
            self.hq_config = quantization_config
            self.checkpoint = None
        elif type.__instancecheck__(HQQuantizationConfig, quantization_config):
            if self.pre_quantized:
                raise ValueError("an HQ quantization config asks to quantize float weights, but this checkpoint is "
                                 "already quantized")
            self.hq_config = quantization_config.hq_config
            self.checkpoint = None
        elif isinstance(quantization_config, HQCheckpointConfig):
            self.hq_config = quantization_config.hq_config
            self.checkpoint = quantization_config.checkpoint
            self.pre_quantized = True
        else:
            raise TypeError(f"expected an HQConfig or HQCheckpointConfig, got {type(quantization_config).__name__}")

    # ---- environment ------------------------------------------------------------------------------------
    def update_torch_dtype(self, torch_dtype: torch.dtype | None = None) -> torch.dtype | None:
        """The dtype diffusers loads the float tensors in: the caller's ``torch_dtype``; when None, for a saved
        checkpoint the dtype its quantized layers were saved in (so that a bf16 model comes back bf16), else
        float32 (as diffusers' quanto and GGUF backends default)."""
        if torch_dtype is not None:
            return torch_dtype
        if self.pre_quantized and self.checkpoint is not None:
            names = {m.get("dtype") for m in self.checkpoint["layers"].values()}
            if len(names) == 1 and isinstance(dt := getattr(torch, str(next(iter(names))), None), torch.dtype):
                return dt
        return torch.float32

    def adjust_target_dtype(self, torch_dtype: torch.dtype) -> torch.dtype:
        """The dtype accelerate sizes a quantized layer's weight with when computing a ``device_map``: the
        nearest storage at or above the configured rate (int2 / int4 / int8 through accelerate's ``CustomDtype``,
        ``torch_dtype`` above 8 bits per weight)."""
        from accelerate.utils import CustomDtype

        bps = self.hq_config.bps
        if bps <= 2:
            return CustomDtype.INT2
        if bps <= 4:
            return CustomDtype.INT4
        return torch.int8 if bps <= 8 else torch_dtype

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("hq_diffusion does not support offloading quantized layers to disk "
                             "(device_map values 'disk')")

    @property
    def supports_parallel_loading(self) -> bool:
        return False

    # ---- loading ------------------------------------------------------------------------------------------
    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        """Verify each checkpoint file (metadata equal to config.json, every tensor's CRC32) before loading."""
        if not self.pre_quantized:
            load_quantize.note_files(self, checkpoint_files)
            return loaded_keys
        want = self.checkpoint
        self.checkpoint_files = list(checkpoint_files or [])
        seen = set()
        for f in checkpoint_files or []:
            if not str(f).endswith(".safetensors"):
                raise HQFormatError(f"{f}: hq_diffusion checkpoints are safetensors files")
            qc, _ = read_checkpoint_metadata(f)
            if strip_file_keys(qc) != want:
                raise HQFormatError(f"{f}: metadata disagrees with the quantization_config of config.json")
            tensors = read_verified_tensors(f, qc["checksums"], require_all=False)
            seen |= set(tensors)
            del tensors
        if checkpoint_files and seen != set(qc["checksums"]):
            missing = sorted(set(qc["checksums"]) - seen)[:5]
            raise HQFormatError(f"{checkpoint_files[0]}: tensors listed in the checksum table are missing: {missing}")
        return loaded_keys

    def maybe_update_state_dict(self, state_dict):
        """Quantize-on-load: each tensor read from its file only when loaded (``load_quantize.lazy_shard``)."""
        return state_dict if self.pre_quantized else load_quantize.lazy_shard(self, state_dict)

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            files = getattr(self, "checkpoint_files", None)
            where = f"{Path(files[0]).parent / CONFIG_NAME}: quantization_config" if files else "quantization_config"
            swap_in_empty_hqlinears(model, self.checkpoint["layers"], where)
        else:  # quantize each planned layer as its weight loads (integrations/load_quantize.py)
            load_quantize.prepare(self, model, self.hq_config)
        return model

    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        return not self.pre_quantized and load_quantize.is_target(self, param_name)

    def create_quantized_param(self, model, param_value, param_name, target_device, state_dict,
                               unexpected_keys=None, **kwargs):
        load_quantize.create(self, model, param_value, param_name, target_device, state_dict, kwargs.get("dtype"))

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            files = getattr(self, "checkpoint_files", None) or ["the checkpoint"]
            check_no_meta(model, files[0])  # a tensor the file lacks (its checksum removed with it)
            state = HQState(config=self.hq_config, skipped=dict(self.checkpoint["skipped"]))
            setattr(model, STATE_ATTR, state)
            if self.checkpoint["kv"] is not None:
                apply_kv(model, state, kv_dict=self.checkpoint["kv"])
        else:
            if not load_quantize.finish(self, model):
                quantize(model, config=self.hq_config, progress=False)
            self.checkpoint = quantization_config(model)
            self.pre_quantized = True
        # what diffusers' save_pretrained will write to config.json
        self.quantization_config = HQCheckpointConfig(self.checkpoint)
        model.register_to_config(quantization_config=self.quantization_config)
        return model

    # ---- saving -------------------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        if not safe_serialization:
            raise ValueError("hq_diffusion checkpoints are saved with safetensors only (safe_serialization=True)")
        meta = file_metadata(self.checkpoint, state_dict, manifest=False)  # no manifest: diffusers writes the files
        return state_dict, {METADATA_KEY: meta[METADATA_KEY]}

    @property
    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self) -> bool:
        """``torch.compile`` captures a quantized model in one graph (the weight decode is a custom op)."""
        return True

    def _dequantize(self, model):
        """Replace every :class:`~hq_diffusion.nn.linear.HQLinear` by an ``nn.Linear`` holding its decoded weight
        (original dtype and device), restore the original attention processors, and drop the quantization state
        and ``config.quantization_config``: ``model.dequantize()`` returns a float model."""
        from ..nn.linear import HQLinear
        from .state import set_module

        for name, mod in list(model.named_modules()):
            if isinstance(mod, HQLinear):
                w = mod.dequantize()
                lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                      device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    if mod.bias is not None:
                        lin.bias.copy_(mod.bias.to(w.dtype))
                set_module(model, name, lin)
        if self.checkpoint is not None and self.checkpoint.get("kv") is not None:
            kv_api().remove_kv_quantization(model)
        if hasattr(model, STATE_ATTR):
            delattr(model, STATE_ATTR)
        model.register_to_config(quantization_config=None)
        for attr in ("quantization_method",):
            model.__dict__.pop(attr, None)
        return model


def attach_quantizer(model) -> None:
    """Give a diffusers model quantized by ``quantize`` or loaded by ``load_quantized`` diffusers' quantized-model
    attributes: ``hf_quantizer``, ``config.quantization_config`` (what ``save_pretrained`` writes),
    ``is_quantized = True`` and ``quantization_method = "hq_diffusion"`` — as ``from_pretrained`` sets them.

    Unlike diffusers' other backends, a dtype cast of an hq-diffusion model is allowed (:func:`register` lets
    ``.to(dtype)`` / ``.half()`` / ``.float()`` through): the compressed weights are integer buffers that no cast
    touches; only the float parameters (biases, skipped layers, norms) change dtype."""
    q = HQDiffusersQuantizer(HQCheckpointConfig(quantization_config(model)), pre_quantized=True)
    model.register_to_config(quantization_config=q.quantization_config)
    model.hf_quantizer = q
    model.is_quantized = True
    model.quantization_method = q.quantization_config.quant_method


def _local_dir(name_or_path, subfolder) -> Path | None:
    if name_or_path is None:
        return None
    path = Path(os.fspath(name_or_path))
    if subfolder:
        path = path / subfolder
    return path if path.is_dir() else None


def _is_hq_dir(path: Path) -> bool:
    """Whether the component directory ``path`` is (or claims to be) an hq-diffusion checkpoint: its weights
    file is one (:func:`~.state.looks_quantized`) or its config.json names ``hq_diffusion``."""
    cfg = path / CONFIG_NAME
    try:
        claims = cfg.is_file() and b'"hq_diffusion"' in cfg.read_bytes()
    except OSError:
        claims = False
    if claims:
        return True
    try:
        return looks_quantized(weights_file(path)) is not None
    except HQFormatError:  # an unreadable file under a config that does not claim hq-diffusion: diffusers reports it
        return False


def _guarded(orig):
    """Wrap ``ModelMixin.from_pretrained`` (the function under its classmethod) with the checks an hq-diffusion
    directory needs and diffusers does not make (see :func:`guarded_from_pretrained`)."""

    @functools.wraps(orig)
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        path = _local_dir(pretrained_model_name_or_path, kwargs.get("subfolder"))
        if path is None:
            return orig(cls, pretrained_model_name_or_path, *args, **kwargs)
        if not _is_hq_dir(path):
            found = find_manifest(path)  # a non-quantized component of a saved pipeline (VAE, ...): its files
            if found is not None:
                verify_manifest(*found)
            return orig(cls, pretrained_model_name_or_path, *args, **kwargs)
        return guarded_from_pretrained(orig, cls, path, pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained.__hq_guarded__ = True
    return from_pretrained


def guarded_from_pretrained(orig, cls, path: Path, *args, **kwargs):
    """``cls.from_pretrained`` of the local hq-diffusion component directory ``path``, with every failure an
    :class:`HQFormatError` naming the file:

    - config.json is read by :func:`~.state.read_json_file` first (malformed or deeply nested JSON);
    - a weights file that is an hq-diffusion checkpoint under a config.json without its ``quantization_config``
      (diffusers would load the quantized layers' weights on ``meta``) is refused, unless the caller passes a
      ``quantization_config``;
    - diffusers' own errors (config fields, shapes) are re-raised naming config.json;
    - afterwards no parameter or buffer may be on ``meta``, and the manifest covering ``path`` (the whole saved
      pipeline when ``path`` is one of its components) is verified (:func:`~.manifest.check_directory`)."""
    cfg_path, st_path = path / CONFIG_NAME, weights_file(path)
    config = read_json_file(cfg_path)
    qc = config.get("quantization_config")
    has_qc = isinstance(qc, dict) and qc.get("quant_method") == QuantMethod.HQ_DIFFUSION.value
    if not has_qc and kwargs.get("quantization_config") is None:
        refuse_stripped_config(cfg_path, st_path)
    try:
        out = orig(cls, *args, **kwargs)
    except HQFormatError as e:
        if str(path) in str(e):
            raise
        raise HQFormatError(f"{cfg_path}: {e}") from None
    except (ValueError, OSError, TypeError, KeyError, AttributeError, RuntimeError, RecursionError) as e:
        raise HQFormatError(f"{cfg_path}: cannot load this hq-diffusion component ({type(e).__name__}: {e})") from None
    model = out[0] if isinstance(out, tuple) else out
    check_no_meta(model, st_path)
    found = find_manifest(path)
    if found is not None:
        verify_manifest(found[0])  # the whole saved directory: text encoders and tokenizers too
    else:
        check_directory(path, flagged=manifest_flag(st_path))
    return out


class _TransformersRefusal:
    """Registered as transformers' quantizer for ``"hq_diffusion"``: hq-diffusion quantizes diffusers models
    only, so a transformers component named in a ``PipelineQuantizationConfig`` is refused by name."""

    def __init__(self, quantization_config, **kwargs):
        raise ValueError("quant_backend='hq_diffusion' quantizes diffusers models (the transformer), not transformers "
                         "models such as the text encoder: name only diffusers components in components_to_quantize "
                         "(e.g. components_to_quantize=['transformer'])")


def _pipeline_config(config, name_or_path):
    """An :class:`HQConfig` / :class:`HQQuantizationConfig` given to a pipeline's ``from_pretrained`` as the
    ``PipelineQuantizationConfig`` that quantizes the pipeline's transformer(s) (the components
    ``hq_diffusion.quantize(pipe)`` quantizes: ``transformer``, and ``transformer_2`` where the pipeline has one)."""
    from diffusers import PipelineQuantizationConfig

    names = ["transformer"]
    index = _local_dir(name_or_path, None)
    if index is not None and (index / "model_index.json").is_file():
        listed = read_json_file(index / "model_index.json")
        names = sorted(k for k in listed if k.startswith("transformer") and isinstance(listed[k], list)) or names
    return PipelineQuantizationConfig(quant_mapping={n: config for n in names})


def _pipeline_guarded(orig):
    @functools.wraps(orig)
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        qc = kwargs.get("quantization_config")
        if qc is not None and isinstance(qc, HQQuantizationConfig):  # an HQConfig too (see _AcceptsHQConfig)
            kwargs["quantization_config"] = _pipeline_config(qc, pretrained_model_name_or_path)
        return orig(cls, pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained.__hq_guarded__ = True
    return from_pretrained


def _castable(orig):
    """``ModelMixin.to`` / ``half`` / ``float`` that let a dtype cast through for an hq-diffusion model (diffusers
    refuses it for every quantized model; here only float parameters change dtype, see :func:`attach_quantizer`)."""

    @functools.wraps(orig)
    def method(self, *args, **kwargs):
        if isinstance(getattr(self, "hf_quantizer", None), HQDiffusersQuantizer) and self.__dict__.get("is_quantized"):
            self.__dict__["is_quantized"] = False
            try:
                return orig(self, *args, **kwargs)
            finally:
                self.__dict__["is_quantized"] = True
        return orig(self, *args, **kwargs)

    method.__hq_guarded__ = True
    return method


def _wrap_classmethod(cls, name: str, wrap) -> None:
    current = cls.__dict__[name].__func__
    if not getattr(current, "__hq_guarded__", False):
        setattr(cls, name, classmethod(wrap(current)))


def register() -> None:
    """(Re-)register the backend (idempotent; :mod:`.autoregister` calls it when diffusers or transformers load):

    - ``quant_method="hq_diffusion"`` in diffusers' quantizer and config mappings (:class:`HQDiffusersQuantizer`,
      :class:`HQQuantizationConfig`), and in transformers' once it is imported (the same config class, so that
      ``PipelineQuantizationConfig(quant_backend="hq_diffusion")`` validates; a quantizer that refuses
      transformers models by name);
    - ``ModelMixin.from_pretrained`` guarded for local hq-diffusion directories (:func:`guarded_from_pretrained`;
      other loads pass through unchanged but for a manifest check of a saved pipeline's non-quantized
      components), ``ModelMixin.to/half/float`` accept dtype casts of hq-diffusion models;
    - ``DiffusionPipeline.from_pretrained`` accepts an :class:`HQConfig` as ``quantization_config`` (it quantizes
      the transformer, see :func:`_pipeline_config`).

    Raises:
        ImportError: a diffusers version outside :data:`~.autoregister.DIFFUSERS_RANGE` (one line).
    """
    import importlib.metadata

    autoregister.check_diffusers_version(importlib.metadata.version("diffusers"))
    key = QuantMethod.HQ_DIFFUSION.value
    _auto.AUTO_QUANTIZER_MAPPING[key] = HQDiffusersQuantizer
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[key] = HQQuantizationConfig
    tq = sys.modules.get("transformers.quantizers.auto")
    if tq is not None and hasattr(tq, "AUTO_QUANTIZER_MAPPING"):
        tq.AUTO_QUANTIZATION_CONFIG_MAPPING[key] = HQQuantizationConfig
        tq.AUTO_QUANTIZER_MAPPING[key] = _TransformersRefusal
    mu = sys.modules.get("diffusers.models.modeling_utils")
    model_cls = getattr(mu, "ModelMixin", None)
    if model_cls is not None:
        _wrap_classmethod(model_cls, "from_pretrained", _guarded)
        for name in ("to", "half", "float"):
            if not getattr(model_cls.__dict__[name], "__hq_guarded__", False):
                setattr(model_cls, name, _castable(model_cls.__dict__[name]))
    pu = sys.modules.get("diffusers.pipelines.pipeline_utils")
    pipe_cls = getattr(pu, "DiffusionPipeline", None)
    if pipe_cls is not None:
        _wrap_classmethod(pipe_cls, "from_pretrained", _pipeline_guarded)


register()
