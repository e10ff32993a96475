"""The one config serializer (hq_diffusion.codec.configdict) and ``quantize(obj, config=None, **overrides)``."""
from __future__ import annotations

import json

import pytest
from torch import nn

from hq_diffusion.codec import CodecConfig
from hq_diffusion.codec.configdict import ConfigFieldError
from hq_diffusion.integrations.api import quantize
from hq_diffusion.integrations.config import CONFIG_FIELDS, HQConfig
from hq_diffusion.nn.kv import KVConfig

CONFIGS = [CodecConfig(bps=3.5, lattice="d4", tile=128), KVConfig(bps=3.0, rotation="signs", seed=5),
           HQConfig(bps=3.0, kv_bps=2.5, skip=("proj_in",))]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_one_layout_for_every_config(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert set(d) == {"_type", "_version", "_data"} and d["_type"] == type(cfg).__name__
    assert "version" not in d["_data"] and d["_version"] == cfg.version
    assert type(cfg).from_dict(d) == cfg


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_strict_reading(cfg):
    cls, d = type(cfg), cfg.to_dict()
    name = cls.__name__
    field = next(iter(d["_data"]))
    for broken, match in [
        ({**d, "_data": {**d["_data"], "extra": 1}}, rf"unknown {name} fields: \['extra'\]"),
        ({**d, "_data": {k: v for k, v in d["_data"].items() if k != field}}, rf"missing {name} fields: \['{field}'\]"),
        ({**d, "_version": 99}, rf"{name} version 99 is not supported"),
        ({**d, "_type": "Other"}, "unknown config type 'Other'"),
        ({k: v for k, v in d.items() if k != "_version"}, "_type, _version, _data"),
        ({**d, "_data": [1]}, rf"{name}._data must be a dict"),
    ]:
        with pytest.raises(ValueError, match=match):
            cls.from_dict(broken)


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=lambda c: type(c).__name__)
def test_legacy_layout_with_version_inside_data_still_loads(cfg):
    d = cfg.to_dict()
    old = {**d, "_data": {**d["_data"], "version": d["_version"]}}  # how CodecConfig/KVConfig were written
    assert type(cfg).from_dict(old) == cfg
    with pytest.raises(ValueError, match="disagrees"):
        type(cfg).from_dict({**old, "_data": {**old["_data"], "version": 2}})


@pytest.mark.parametrize("kw,field", [({"bps": 0.5}, "bps"), ({"block": 12}, "block"), ({"seed": -1}, "seed"),
                                      ({"kv_bps": 20.0}, "kv_bps"), ({"kv_correction": "HAAR"}, "kv_correction"),
                                      ({"tile": 3}, "tile"), ({"lattice": "e9"}, "lattice"),
                                      ({"bps": None}, "bps")])
def test_hqconfig_errors_come_from_the_codec_and_kv_checks_relabelled(kw, field):
    with pytest.raises(ConfigFieldError, match=rf"^HQConfig\.{field} ") as e:
        HQConfig(**kw)
    assert (e.value.owner, e.value.field) == ("HQConfig", field)


def test_quantize_overrides():
    lin = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"either config= or .*\['bps'\]"):
        quantize(lin, config=HQConfig(), bps=4.0, progress=False)  # even when equal to the default
    with pytest.raises(TypeError, match=r"\['bpw'\].*'bps'.*'progress'"):
        quantize(lin, bpw=4.0, progress=False)
    with pytest.raises(TypeError, match="config must be an HQConfig.*bps="):
        quantize(lin, 4.0, progress=False)
    assert "version" not in CONFIG_FIELDS and "bps" in CONFIG_FIELDS
    quantize(lin, bps=3.0, lattice="d4", progress=False)
    assert lin.hq_state.config == HQConfig(bps=3.0, lattice="d4")
