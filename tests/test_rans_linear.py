"""``HQLinear`` holding rANS streams (storage ``"rans"``, metadata version 2) and ``coder="auto"``: forward against
the dequantized reference, checkpoints (bit-exact round trip, CRC, crafted tables and metadata), the tiny
pipeline, the rate rule of ``"auto"`` and the rANS gain over Rice at the same total rate."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hq_diffusion.codec import CodecConfig, HQFormatError
from hq_diffusion.codec.config import AUTO_RANS_MAX_BPS, AUTO_RANS_MIN_NUMEL
from hq_diffusion.integrations import serialization as ser
from hq_diffusion.integrations.api import quantize, summary
from hq_diffusion.integrations.config import HQConfig
from hq_diffusion.models import generate, tiny_pipeline
from hq_diffusion.nn import cpu_forward
from hq_diffusion.nn.linear import HQLinear, validate_meta

RANS = CodecConfig(bps=4.0, coder="rans", block=64)  # small blocks: several per layer, a partial last one


def _linear(n_out, n_in, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=g))
    return lin


def _reference(m: HQLinear, x: torch.Tensor) -> torch.Tensor:
    """x Wᵀ + b with W the layer's own dequantized weight (float64 math)."""
    b = None if m.bias is None else m.bias.double()
    return F.linear(x.double(), m.dequantize().double(), b)


@pytest.mark.parametrize("lattice,shape", [("e8", (48, 200)), ("d4", (33, 77)), ("a2", (16, 130)), ("z", (40, 64))])
def test_rans_layer_stores_streams_and_matches_its_dequantized_weight(lattice, shape):
    m = HQLinear.from_linear(_linear(*shape), CodecConfig(bps=4.0, coder="rans", lattice=lattice, block=64),
                             key="layer")
    assert m.storage == "rans" and m.hq_meta["version"] == 2 and not hasattr(m, "codes")
    assert not any(t.is_floating_point() for n, t in m.named_buffers())  # no float copy of the weight
    q = m.encoded()
    assert q.coder == "rans" and m.hq_meta["bps"] == pytest.approx(q.bps) and q.bps <= 4.0
    x = torch.randn(5, shape[1])
    ref = _reference(m, x)
    for fwd in (m.forward, m.forward_native):
        assert torch.allclose(fwd(x).double(), ref, atol=1e-4, rtol=1e-4)
    cpu_forward.ENABLED = False  # the generic bf16 path (decode to the rotated weight) too
    try:
        assert torch.allclose(m(x).double(), ref, atol=1e-4, rtol=1e-4)
    finally:
        cpu_forward.ENABLED = True
    if m.fits_int8:  # int8 activations against the decoded integers: within the activation rounding
        m.mma = "int8"
        assert (m(x).double() - ref).abs().max() < 0.05 * ref.abs().max()


def test_rans_layer_decodes_to_the_codec_and_rice_layer_unchanged():
    lin = _linear(64, 96, seed=1)
    m = HQLinear.from_linear(lin, RANS, key="k")
    from hq_diffusion.codec import decode, encode

    q = encode(lin.weight.detach(), RANS, key="k")
    assert torch.equal(m.lattice_codes(), decode(q, out="codes"))
    r = HQLinear.from_linear(lin, CodecConfig(bps=4.0), key="k")  # the codec default stays Rice, version 1
    assert r.storage == "rice" and r.hq_meta["version"] == 1 and hasattr(r, "s0_unary")


def test_cached_codes_covers_rans_layers():
    m = HQLinear.from_linear(_linear(32, 64), RANS, key="c")
    x = torch.randn(2, 64)
    y = m(x)
    with cpu_forward.cached_codes(m) as n:
        assert n == 1
        assert torch.equal(m(x), y) and torch.equal(m(x), y)
        assert getattr(m, "_hq_cached_codes").dtype == torch.int8
    assert not hasattr(m, "_hq_cached_codes")


def test_auto_coder_follows_the_measured_crossover():
    for lat, top in AUTO_RANS_MAX_BPS.items():
        assert CodecConfig(bps=4.0, lattice=lat, coder="auto").resolved_coder() == "rans"
        assert CodecConfig(bps=top, lattice=lat, coder="auto").resolved_coder() == "rans"
        assert CodecConfig(bps=top + 0.25, lattice=lat, coder="auto").resolved_coder() == "rice"
    assert CodecConfig(snr_db=20.0, coder="auto").resolved_coder() == "rans"
    assert CodecConfig(snr_db=50.0, coder="auto").resolved_coder() == "rice"
    assert CodecConfig(bps=4.0, coder="auto").resolved_coder(AUTO_RANS_MIN_NUMEL - 1) == "rice"  # small: Rice
    assert CodecConfig(bps=4.0, coder="auto").resolved_coder(AUTO_RANS_MIN_NUMEL) == "rans"
    assert HQLinear.from_linear(_linear(128, 256), CodecConfig(bps=4.0, coder="auto"), key="a").storage == "rans"
    assert HQLinear.from_linear(_linear(64, 128), CodecConfig(bps=4.0, coder="auto"), key="a").storage == "rice"
    assert CodecConfig().coder == "rice" and HQConfig().coder == "auto"  # model-level default since the compiled coder
    m = HQLinear.from_linear(_linear(256, 256), CodecConfig(bps=8.0, coder="auto"), key="hi")
    assert m.storage == "rice"


def test_hqconfig_v1_reads_as_rice_and_v2_round_trips():
    assert HQConfig(bps=3.0).to_dict()["_data"]["coder"] == "auto"  # the default, recorded
    d = HQConfig(bps=3.0, coder="auto").to_dict()
    assert d["_version"] == 2 and d["_data"]["coder"] == "auto"
    assert HQConfig.from_dict(d) == HQConfig(bps=3.0, coder="auto")
    v1 = {**d, "_version": 1, "_data": {k: v for k, v in d["_data"].items() if k != "coder"}}
    assert HQConfig.from_dict(v1).coder == "rice"
    with pytest.raises(ValueError, match="version 1"):  # v1 never had a coder field
        HQConfig.from_dict({**d, "_version": 1, "_data": {**d["_data"], "coder": "rans"}})
    with pytest.raises(ValueError, match="coder"):
        HQConfig(coder="huffman")


def test_rans_beats_rice_at_the_same_total_rate_1024():
    """The 4096² figure (E8 ≥ 23.0 dB at 4.00 bps) is bench-only (BENCHMARKS.md §17); on 1024² the gain holds."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(1024, 1024, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1024, 1024, generator=g))
    snr = {}
    for coder in ("rice", "rans"):
        m = HQLinear.from_linear(lin, CodecConfig(bps=4.0, coder=coder), key="big")
        assert m.hq_meta["bps"] <= 4.0 and m.storage == coder
        snr[coder] = m.hq_meta["snr_db"]
    assert snr["rans"] >= 22.9 and snr["rans"] - snr["rice"] >= 0.35, snr


# ---- checkpoints -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny LTX pipeline quantized with rANS at 4 bps, its frames and its saved directory."""
    pipe = tiny_pipeline("ltx", 0)
    quantize(pipe, bps=4.0, coder="rans", block=256, progress=False)
    frames = generate(pipe, "ltx", "a red cat", 0)
    d = tmp_path_factory.mktemp("hq") / "ltx-rans"
    ser.save_quantized(pipe, d)
    return pipe, frames, d


def _weights(d):
    return d / "transformer" / ser.WEIGHTS_NAME


def test_pipeline_quantizes_with_rans_and_reports_it(saved):
    pipe, frames, _ = saved
    layers = [m for m in pipe.transformer.modules() if isinstance(m, HQLinear)]
    assert layers and all(m.storage == "rans" for m in layers)
    s = summary(pipe)
    assert {r.storage for r in s.layers} == {"rans"} and all(r.bps <= 4.0 for r in s.layers)
    assert torch.isfinite(torch.as_tensor(frames)).all() if isinstance(frames, torch.Tensor) else frames is not None


def test_rans_checkpoint_round_trip_is_bit_exact(saved):
    pipe, frames, d = saved
    qc = json.loads((d / "transformer" / "config.json").read_text())["quantization_config"]
    assert qc["config"]["_data"]["coder"] == "rans"
    assert {m["storage"] for m in qc["layers"].values()} == {"rans"}
    back = ser.load_quantized(d)
    sa, sb = pipe.transformer.state_dict(), back.transformer.state_dict()
    assert sa.keys() == sb.keys() and any(k.endswith("s0_words") for k in sa)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    f2 = generate(back, "ltx", "a red cat", 0)
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(frames, f2))


def _tensors_and_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _rewrite(path, tensors, meta):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)


def _copy(src, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    for p in dst.rglob("hq_manifest.json"):  # the edited file would fail its SHA-256 first
        p.unlink()
    return dst


def _no_manifest(meta):
    qc = json.loads(meta["hq_diffusion"])
    qc.pop("manifest", None)
    meta["hq_diffusion"] = json.dumps(qc)
    return meta


def _layer(tensors):
    return sorted(k[: -len(".s0_freqs")] for k in tensors if k.endswith(".s0_freqs"))[0]


def test_flipped_rans_table_fails_its_crc(saved, tmp_path):
    d = _copy(saved[2], tmp_path)
    tensors, meta = _tensors_and_meta(_weights(d))
    name = _layer(tensors) + ".s0_freqs"
    t = tensors[name].clone()
    t.view(-1)[0] += 1
    tensors[name] = t
    _rewrite(_weights(d), tensors, _no_manifest(meta))
    with pytest.raises(HQFormatError, match=rf"{name}.*CRC32"):
        ser.load_quantized(d / "transformer")


def _crafted(saved, tmp_path, part, edit):
    """A checkpoint whose ``part`` of one layer is edited by ``edit`` with its CRC32 recomputed (so only the rANS
    checks can catch it); returns (the loaded transformer, the layer name)."""
    from hq_diffusion.integrations.state import tensor_crc32

    d = _copy(saved[2], tmp_path)
    tensors, meta = _tensors_and_meta(_weights(d))
    layer = _layer(tensors)
    name = f"{layer}.s0_{part}"
    tensors[name] = edit(tensors[name].clone())
    qc = json.loads(meta["hq_diffusion"])
    qc["checksums"][name] = tensor_crc32(tensors[name])
    qc.pop("manifest", None)
    meta["hq_diffusion"] = json.dumps(qc)
    _rewrite(_weights(d), tensors, meta)
    return ser.load_quantized(d / "transformer"), layer


def _bump_first(t):
    t.view(-1)[0] += 1
    return t


def _zero_table(t):
    return torch.zeros_like(t)


def _huge_freq(t):
    t.view(-1)[0] = 32767
    return t


def _flip_word(t):
    t.view(-1)[t.numel() // 2] ^= 0x1234
    return t


def _bad_state(t):
    t.view(-1)[0] = 5
    return t


@pytest.mark.parametrize("part,edit", [("freqs", _bump_first), ("freqs", _zero_table), ("freqs", _huge_freq),
                                       ("words", _flip_word), ("states", _bad_state)])
def test_crafted_rans_stream_is_a_typed_error_at_forward(saved, tmp_path, part, edit):
    """Fuzz: a table that does not sum to M, an empty table, a frequency above the cap, a flipped word, a
    state below L — each with a valid CRC — raise HQFormatError when the layer decodes (no crash, no hang)."""
    tr, layer = _crafted(saved, tmp_path, part, edit)
    m = tr.get_submodule(layer)
    with pytest.raises(HQFormatError):
        m(torch.randn(2, m.in_features))


@pytest.mark.parametrize("field,value", [("words", 2**40), ("escapes", 10**12), ("t", 257), ("prec", 30),
                                         ("n", 7), ("t", 1)])
def test_crafted_rans_metadata_is_refused_before_any_allocation(saved, field, value):
    layers = json.loads((saved[2] / "transformer" / "config.json").read_text())["quantization_config"]["layers"]
    meta = json.loads(json.dumps(next(iter(layers.values()))))
    meta["streams"][0][field] = value
    with pytest.raises(HQFormatError, match="rANS stream 0"):
        validate_meta(meta, "x")
    meta2 = json.loads(json.dumps(next(iter(layers.values()))))
    meta2["version"] = 1
    with pytest.raises(HQFormatError, match="version 2"):
        validate_meta(meta2, "x")


def test_kernel_backend_forward_in_triton_interpreter():
    """The forward of a rANS layer through ``kernels/rans_decode.py`` (the GPU when there is one, else Triton's
    interpreter in a child process): the decoded integers equal the layer's bit for bit, the output the
    torch-reference forward up to the float32 rounding of the Triton RHT."""
    pytest.importorskip("triton")
    code = r'''
import torch, warnings
warnings.simplefilter("ignore")
from torch import nn
from hq_diffusion.codec import CodecConfig
from hq_diffusion.nn.linear import HQLinear
from hq_diffusion.kernels import dispatch
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
lin = nn.Linear(40, 24)
m = HQLinear.from_linear(lin, CodecConfig(bps=4.0, coder="rans", block=16), key="t", mma="bf16").to(dev)
q = m.encoded()
assert dispatch.backend(q.scales) == "triton"
assert torch.equal(dispatch.decode(q, "codes"), m.lattice_codes().to(dev))
x = torch.randn(3, 40, device=dev)
torch.testing.assert_close(m.forward_kernel(x), m.forward_native(x), rtol=1e-5, atol=1e-5)  # the Triton RHT
print("rans layer ok")
'''
    env = dict(os.environ, HQ_KERNELS="triton")
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "rans layer ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_torch_compile_of_a_rans_layer_matches_eager():
    m = HQLinear.from_linear(_linear(16, 32), RANS, key="comp", mma="bf16")
    cpu_forward.ENABLED = False
    try:
        x = torch.randn(2, 32)
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(m, backend="eager", fullgraph=True)(x), m(x))
    finally:
        cpu_forward.ENABLED = True
    assert math.isfinite(m.hq_meta["snr_db"])
