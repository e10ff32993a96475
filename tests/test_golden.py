"""Golden fixtures: blobs and a checkpoint written once (``scripts/make_golden.py``) must decode bit-exactly.

A consistent change of the format (a hash constant, the stripping order, the Rice escape, the header layout,
changed everywhere at once) passes every round-trip test but makes every saved checkpoint decode to other
weights; these tests compare against bytes and tensors committed in ``tests/data/``.  Never regenerate the
fixtures to make this file pass: a deliberate format change bumps the version and keeps reading the old
fixtures.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hq_diffusion.codec import CodecConfig, EncodedTensor, decode, encode
from hq_diffusion.codec.rht import legacy_plan_tiles, plan_tiles
from hq_diffusion.nn import cpu_forward

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import make_golden  # noqa: E402  (the case list and the tiny model's definition)

CASE_NAMES = [c[0] for c in make_golden.CASES]


@pytest.fixture(scope="module")
def codec_data():
    with np.load(DATA / "golden_codec.npz") as z:
        return {k: z[k] for k in z.files}


def _case(data, name):
    cfg = json.loads(data[f"{name}/config"].tobytes())
    return cfg, data[f"{name}/blob"].tobytes()


def test_every_lattice_and_an_odd_width_are_covered():
    cfgs = [c[2] for c in make_golden.CASES]
    assert {c["lattice"] for c in cfgs} == {"e8", "d4", "a2", "z"}
    assert any(shape[-1] % 8 for _, shape, _ in make_golden.CASES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_golden_blob_decodes_bit_exactly(codec_data, name):
    cfg, blob = _case(codec_data, name)
    et = EncodedTensor.from_bytes(blob)
    assert et.lattice == cfg["lattice"] and tuple(et.shape) == tuple(cfg["shape"])
    w = decode(et)
    assert w.dtype == torch.float32
    assert torch.equal(w, torch.from_numpy(codec_data[f"{name}/weight"]))
    codes = decode(et, out="codes")
    assert torch.equal(codes, torch.from_numpy(codec_data[f"{name}/codes"]))
    assert et.to_bytes() == blob  # parse → serialize is the identity


@pytest.mark.parametrize("name", CASE_NAMES)
def test_golden_input_encodes_to_the_same_bytes(codec_data, name):
    """The encoder is deterministic and unchanged: same α search, same rate accounting, same bitstream."""
    cfg, blob = _case(codec_data, name)
    kw = {k: v for k, v in cfg.items() if k != "shape"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the odd-width cases are below their fixed overhead
        et = encode(torch.from_numpy(codec_data[f"{name}/input"]), CodecConfig(**kw), key=f"golden/{name}")
    n, golden_tile = cfg["shape"][-1], EncodedTensor.from_bytes(blob).tile
    if plan_tiles(n, CodecConfig().tile) != legacy_plan_tiles(n, CodecConfig().tile):
        # written with the first tile plan (37 → tile 64, 64 columns); today's plan pads less (tile 8, 40)
        assert golden_tile == legacy_plan_tiles(n, CodecConfig().tile)[0] != et.tile
        return
    assert et.to_bytes() == blob
    if "bps" in kw and cfg["shape"][-1] % 8 == 0:
        assert et.total_bits / et.numel <= kw["bps"]


@pytest.fixture
def generic_cpu_path(monkeypatch):
    """The golden output was recorded with the generic bf16 path (weights rounded to bf16); the CPU codes
    path (nn/cpu_forward.py) rescales the output instead, so it is compared with tolerance in
    tests/test_linear_speed_paths.py, and these bit-exact checks run the generic path."""
    monkeypatch.setattr(cpu_forward, "ENABLED", False)


# The recorded output came from one CPU; torch's float kernels pick their summation order by the CPU's vector
# width (AVX2 and AVX-512 differ by up to one bf16 ulp on a few % of the outputs, measured 2026-11-29). So the
# forward is compared within two bf16 ulps of the output's scale, and what must be bit-exact on every machine
# is checked exactly: the checkpoint's stored tensors against a fresh quantization, and the forwards of the
# two on the same machine.
FORWARD_TOL = {"rtol": 2.0 ** -7, "atol": 2.0 ** -6}


def test_golden_checkpoint_forward_matches_the_recording(generic_cpu_path):
    import hq_diffusion as H

    io = torch.load(DATA / "golden_ltx_io.pt", weights_only=True)
    model = H.load_quantized(DATA / "golden_ltx")
    y = make_golden.run_forward(model, io["inputs"])
    assert y.dtype == io["output"].dtype and y.shape == io["output"].shape
    torch.testing.assert_close(y.float(), io["output"].float(), **FORWARD_TOL)


def test_golden_checkpoint_matches_a_fresh_quantization(generic_cpu_path):
    """Quantizing the same seeded model today stores the same tensors, bit for bit, as the committed
    checkpoint, and runs the same forward."""
    import hq_diffusion as H

    io = torch.load(DATA / "golden_ltx_io.pt", weights_only=True)
    model = make_golden.tiny_transformer()
    H.quantize(model, bps=4.0, progress=False)
    stored = H.load_quantized(DATA / "golden_ltx")
    fresh, committed = model.state_dict(), stored.state_dict()
    assert fresh.keys() == committed.keys()
    for k, t in committed.items():
        assert t.dtype == fresh[k].dtype and torch.equal(t, fresh[k]), k
    y = make_golden.run_forward(model, io["inputs"])
    assert torch.equal(y, make_golden.run_forward(stored, io["inputs"]))
    torch.testing.assert_close(y.float(), io["output"].float(), **FORWARD_TOL)


def test_golden_v1_checkpoint_reads_as_rice():
    """The committed checkpoint predates ``coder`` (HQConfig version 1): it reads as Rice, every layer Rice."""
    import hq_diffusion as H
    from hq_diffusion.nn.linear import HQLinear

    model = H.load_quantized(DATA / "golden_ltx")
    assert model.hq_state.config.coder == "rice"
    layers = [m for m in model.modules() if isinstance(m, HQLinear)]
    assert layers and {m.storage for m in layers} == {"rice"} and {m.hq_meta["version"] for m in layers} == {1}
