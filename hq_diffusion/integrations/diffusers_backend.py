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

from diffusers.quantizers import auto as _auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from ..codec import HQFormatError
from .config import HQConfig, QuantMethod
from . import load_quantize
from .quantize import quantize
from .manifest import check_directory, find_manifest, verify_manifest
from .state import (METADATA_KEY, STATE_ATTR, HQState, apply_kv, check_no_meta, check_quantization_config,
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
        elif isinstance(quantization_config, HQCheckpointConfig):
            self.hq_config = quantization_config.hq_config
            self.checkpoint = quantization_config.checkpoint
            self.pre_quantized = True
        else:
            raise TypeError(f"expected an HQConfig or HQCheckpointConfig, got {type(quantization_config).__name__}")

    # ---- environment ------------------------------------------------------------------------------------
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
        return False


def attach_quantizer(model) -> None:
    """Give a diffusers model quantized by ``quantize`` or loaded by ``load_quantized`` the ``hf_quantizer`` and
    ``config.quantization_config`` that diffusers' ``save_pretrained`` needs to write an hq-diffusion checkpoint.

    (``model.is_quantized`` is left unset: unlike diffusers' other backends, a dtype cast of the model is safe,
    since the quantized weights are integer buffers.)"""
    q = HQDiffusersQuantizer(HQCheckpointConfig(quantization_config(model)), pre_quantized=True)
    model.register_to_config(quantization_config=q.quantization_config)
    model.hf_quantizer = q


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
        return looks_quantized(path / WEIGHTS_NAME) is not None
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
    cfg_path, st_path = path / CONFIG_NAME, path / WEIGHTS_NAME
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


def register() -> None:
    """(Re-)register the backend under ``quant_method="hq_diffusion"``, and guard ``ModelMixin.from_pretrained``
    of local hq-diffusion directories (:func:`guarded_from_pretrained`; other loads pass through unchanged but
    for a manifest check of a saved pipeline's non-quantized components)."""
    from diffusers import ModelMixin

    key = QuantMethod.HQ_DIFFUSION.value
    _auto.AUTO_QUANTIZER_MAPPING[key] = HQDiffusersQuantizer
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[key] = HQCheckpointConfig
    current = ModelMixin.__dict__["from_pretrained"].__func__
    if not getattr(current, "__hq_guarded__", False):
        ModelMixin.from_pretrained = classmethod(_guarded(current))


register()
