"""Any width without padding loss: a main part that codes unpadded plus a transposed tail (codec/split.py), in
the codec, in ``HQLinear`` (every matmul path, state dict, metadata checks, torch.compile) and in checkpoints."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from hq_diffusion.codec import CodecConfig, HQFormatError, decode, encode
from hq_diffusion.codec.rht import plan_tiles
from hq_diffusion.codec.split import (MAX_TAIL_COLUMNS, decode_split, encode_split, split_bits, split_bps,
                                      split_columns, tail_key)
from hq_diffusion.integrations import serialization as ser
from hq_diffusion.nn.linear import MMA_CHOICES, HQLinear, validate_meta


def _snr(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w = w.double()
    return 10 * math.log10(float(w.square().sum() / (w_hat.double() - w).square().sum()))


# ---- the split rule --------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, n, want", [
    (777, 1000, (768, 9)),  # not 776 + 1: 776 would rotate with tile 8, 768 does with 256
    (333, 1000, (320, 13)), (1001, 1000, (992, 9)), (3000, 1000, (2976, 24)), (4097, 64, (4096, 1)),
    (37, 1000, (32, 5)), (9, 1000, (8, 1)),  # no unpadded width with the padded plan's tile 16: any tile
    (784, 1000, (784, 0)), (1000, 1000, (1000, 0)), (4096, 4096, (4096, 0)), (64, 64, (64, 0)),
    (777, 64, (777, 0)),   # 64 rows × 7 padded coordinates do not pay a tail's header and scales
])
def test_split_rule_examples(k, n, want):
    assert split_columns(k, n, 256) == want


def test_split_rule_properties():
    for k in range(1, 2100, 7):
        for n in (16, 300, 1000, 4096):
            k_main, r = split_columns(k, n, 256)
            k_pad = plan_tiles(k, 256)[1]
            assert k_main + r == k
            if k_pad == k:
                assert r == 0, (k, n)
            if r:
                assert k_main % 8 == 0 and plan_tiles(k_main, 256)[1] == k_main, (k, n)
                assert r <= MAX_TAIL_COLUMNS, (k, n)
    with pytest.raises(ValueError):
        split_columns(0, 4, 256)


def test_unsplit_widths_encode_exactly_as_before():
    g = torch.Generator().manual_seed(3)
    for shape in ((64, 64), (1000, 1000), (200, 777)):  # 200 × 777 pads but is too small to split
        w = torch.randn(*shape, generator=g)
        cfg = CodecConfig(bps=4.0, coder="rans")
        main, tail = encode_split(w, cfg, key="L")
        assert tail is None
        assert main.to_bytes() == encode(w, cfg, key="L").to_bytes()
        assert split_bits(main, None) == main.total_bits


# ---- the codec -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("coder", ["rice", "rans"])
@pytest.mark.parametrize("bps", [3.0, 4.0, 5.0])
def test_combined_rate_is_exact(coder, bps):
    w = torch.randn(400, 777, generator=torch.Generator().manual_seed(int(bps)))
    main, tail = encode_split(w, CodecConfig(bps=bps, coder=coder), key="blk.fc")
    assert tail is not None and tuple(tail.shape) == (9, 400) and tuple(main.shape) == (400, 768)
    assert main.coder == tail.coder == coder
    assert split_bits(main, tail) == 8 * (len(main.to_bytes()) + len(tail.to_bytes()))
    assert bps - 0.001 < split_bps(main, tail) <= bps
    w_hat = decode_split(main, tail)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    assert torch.equal(w_hat[:, 768:], decode(tail).T) and torch.equal(w_hat[:, :768], decode(main))


def test_snr_target_codes_both_parts_at_the_target():
    w = torch.randn(1000, 333, generator=torch.Generator().manual_seed(0))
    main, tail = encode_split(w, CodecConfig(snr_db=20.0), key=5)
    assert tail is not None and main.alpha == tail.alpha
    assert abs(_snr(w, decode_split(main, tail)) - 20.0) < 0.5
    # the tail's key is derived from the layer key (an int key too)
    assert encode_split(w, CodecConfig(snr_db=20.0), key=5)[1].key == tail.key != main.key
    assert tail_key(5) == "5.tail"


def test_decode_split_rejects_a_tail_of_another_weight():
    w = torch.randn(400, 777)
    main, tail = encode_split(w, CodecConfig(bps=4.0), key=0)
    other = encode(torch.randn(1, 300), CodecConfig(bps=4.0))
    with pytest.raises(ValueError, match="does not fit"):
        decode_split(main, other)
    with pytest.raises(ValueError, match="2-D"):
        encode_split(torch.randn(2, 3, 777))


def _gap(coder: str, bps: float, rows: int, big: tuple[int, int], scale_dtype: str = "float16") -> float:
    g = torch.Generator().manual_seed(0)
    wb, wo = torch.randn(*big, generator=g), torch.randn(rows, 777, generator=g)
    cfg = CodecConfig(bps=bps, coder=coder, scale_dtype=scale_dtype)
    main, tail = encode_split(wo, cfg)
    assert tail is not None
    return _snr(wb, decode(encode(wb, cfg))) - _snr(wo, decode_split(main, tail))


@pytest.mark.parametrize("coder", ["rice", "rans"])
def test_odd_width_gap_small(coder):
    """1000×777 against 1024×4096 at 5 bps (where padding cost most): within 0.3 dB (about 0.11 Rice / 0.16 rANS;
    padded, 4096² against 1000×777 was 0.35 / 0.37 dB, BENCHMARKS.md §14)."""
    assert _gap(coder, 5.0, 1000, (1024, 4096)) <= 0.2


@pytest.mark.slow
@pytest.mark.parametrize("coder", ["rice", "rans"])
@pytest.mark.parametrize("bps", [3.0, 4.0, 5.0])
def test_odd_width_gap_against_4096_squared(coder, bps):
    """The issue's check: 1000×777 within 0.3 dB of 4096×4096 at the same total rate (BENCHMARKS.md §25)."""
    assert _gap(coder, bps, 1000, (4096, 4096)) <= 0.3


# ---- HQLinear --------------------------------------------------------------------------------------------

def _layer(k=777, n=400, storage="rice", coder="rice", bias=True, scale_dtype="float16", seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    m = HQLinear.from_linear(lin, CodecConfig(bps=4.0, coder=coder, scale_dtype=scale_dtype), key="blocks.0.ff",
                             storage=storage, backend="native")
    return lin, m


#: relative error of the path's output against ``x @ dequantize().T + b`` (the path's own rounding)
_PATH_TOL = {"bf16": 1e-5, "int8": 0.03, "fp8": 0.1, "nvfp4": 0.3, "mxfp4": 0.3}


@pytest.mark.parametrize("storage, coder", [("rice", "rice"), ("rice", "rans"), ("int8", "rice")])
@pytest.mark.parametrize("k, n", [(777, 400), (333, 1000), (1001, 400)])
def test_forward_matches_dequantized_weight_on_every_path(storage, coder, k, n):
    lin, m = _layer(k, n, storage, coder)
    assert m.tail_encoded() is not None and m.cols_main < k
    x = torch.randn(7, k)
    w_hat = m.dequantize()
    assert w_hat.shape == (n, k)
    ref = x @ w_hat.T + m.bias
    dropped = x[:, :m.cols_main] @ w_hat[:, :m.cols_main].T + m.bias  # what a forward without the tail gives
    for mma in MMA_CHOICES[1:]:
        if mma == "int8" and not m.fits_int8:
            continue
        m.mma = mma
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = m(x)
        err = float((y - ref).norm() / ref.norm())
        assert y.shape == (7, n) and err < _PATH_TOL[mma], (mma, err)
        if mma == "bf16":
            assert float((dropped - ref).norm() / ref.norm()) > 100 * _PATH_TOL[mma]
    m.mma = "bf16"
    yb = m(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and float((yb.float() - ref).norm() / ref.norm()) < 0.02


def test_metadata_rate_and_snr_count_both_parts():
    lin, m = _layer(777, 400, "rice", "rans")
    meta = m.hq_meta
    q, tq = m.encoded(), m.tail_encoded()
    assert meta["cols_main"] == 768 and meta["tail"]["out_features"] == 9 and meta["tail"]["in_features"] == 400
    assert meta["bps"] == pytest.approx(split_bps(q, tq), abs=1e-12) and 3.999 < meta["bps"] <= 4.0
    assert meta["snr_db"] == pytest.approx(_snr(lin.weight.detach(), m.dequantize()), abs=1e-3)
    assert "tail=(9, 400)" in repr(m)
    assert m.nbytes == sum(t.numel() * t.element_size() for t in (*m.buffers(), *m.parameters()))
    assert any(k.startswith("tail_") for k, _ in m.named_buffers())
    # rotated_weight / lattice_codes describe the main part
    assert m.rotated_weight().shape == (400, m.n_pad) == m.lattice_codes().shape and m.n_pad == 768


def test_unsplit_layer_has_no_tail():
    _, m = _layer(64, 64)
    assert "tail" not in m.hq_meta and "cols_main" not in m.hq_meta and m.tail_encoded() is None
    assert not any(k.startswith("tail_") for k in m.state_dict())
    w = nn.Linear(64, 64).weight.detach()
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    q = encode(lin.weight.detach(), CodecConfig(bps=4.0), key="blocks.0.ff")
    assert m.encoded().to_bytes() == q.to_bytes() and w.shape == (64, 64)


@pytest.mark.parametrize("storage, coder, sd", [("rice", "rice", "float16"), ("rice", "rans", "log8"),
                                                 ("int8", "rans", "float16")])
def test_state_dict_into_meta_skeleton(storage, coder, sd):
    _, m = _layer(333, 1000, storage, coder, scale_dtype=sd)
    empty = HQLinear.from_meta(m.hq_meta, name="blocks.0.ff")
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    empty.load_state_dict(m.state_dict(), assign=True)
    x = torch.randn(3, 333)
    assert torch.equal(empty(x), m(x)) and torch.equal(empty.dequantize(), m.dequantize())


def _corrupt(meta: dict, how: str) -> dict:
    meta = copy.deepcopy(meta)
    if how == "cols_main_odd":
        meta["cols_main"] = 767
    elif how == "cols_main_too_big":
        meta["cols_main"] = meta["in_features"]
    elif how == "no_tail":
        del meta["tail"]
    elif how == "tail_not_dict":
        meta["tail"] = [1, 2]
    elif how == "tail_rows":
        meta["tail"]["out_features"] = 2
    elif how == "tail_storage":
        meta["tail"]["storage"], meta["tail"]["version"] = "int8", 1
    elif how == "tail_stream":
        meta["tail"]["streams"][0]["n"] += 8
    elif how == "tail_bias":
        meta["tail"]["bias"] = "float32"
    elif how == "tail_nested":
        meta["tail"]["tail"] = copy.deepcopy(meta["tail"])
    return meta


@pytest.mark.parametrize("how", ["cols_main_odd", "cols_main_too_big", "no_tail", "tail_not_dict", "tail_rows",
                                 "tail_storage", "tail_stream", "tail_bias", "tail_nested"])
def test_corrupt_tail_metadata_is_refused(how):
    _, m = _layer(777, 400)
    validate_meta(m.hq_meta, "blocks.0.ff")
    with pytest.raises(HQFormatError, match="blocks.0.ff"):
        HQLinear.from_meta(_corrupt(m.hq_meta, how), name="blocks.0.ff")


def test_compiled_split_layer_is_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    _, m = _layer(777, 400, "rice", "rans")
    m.mma = "bf16"
    x = torch.randn(5, 777)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(m, backend=counter, fullgraph=True)
    assert torch.allclose(compiled(x), m(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


# ---- checkpoints -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("storage, coder", [("rice", "rice"), ("rice", "rans"), ("int8", "rans")])
def test_save_load_round_trip_is_bit_exact(tmp_path, storage, coder):
    from hq_diffusion import quantize

    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(777, 400), nn.GELU(), nn.Linear(400, 1001), nn.Linear(1001, 400))
    skeleton = copy.deepcopy(net)
    quantize(net, bps=4.0, mma="bf16", storage=storage, coder=coder, progress=False)
    split = {n for n, m in net.named_modules() if isinstance(m, HQLinear) and m.tail_encoded() is not None}
    assert split == {"0", "3"}
    ser.save_quantized(net, tmp_path / "net")
    back = ser.load_quantized(tmp_path / "net", model=skeleton)
    sd, sd_back = net.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys() and all(torch.equal(sd[k], sd_back[k]) for k in sd)
    for n in split:
        assert back.get_submodule(n).hq_meta == net.get_submodule(n).hq_meta
    x = torch.randn(3, 777)
    assert torch.equal(back(x), net(x))


@pytest.mark.parametrize("storage", ["rice", "int8"])
def test_streaming_convert_piece_carries_the_tail(tmp_path, storage):
    """``hq-diffusion quantize`` writes each layer as a piece file: a split layer's piece holds its tail buffers
    and metadata, the same bytes as an in-memory quantization."""
    from safetensors.torch import save_file

    from hq_diffusion.integrations import convert as conv
    from hq_diffusion.integrations.config import HQConfig

    torch.manual_seed(2)
    lin = nn.Linear(777, 400)
    save_file({"fc.weight": lin.weight.detach(), "fc.bias": lin.bias.detach()}, str(tmp_path / "w.safetensors"))
    src = str(tmp_path / "w.safetensors")
    cfg = HQConfig(bps=4.0, coder="rans", storage=storage, mma="bf16")
    job = conv.Job(0, "fc", (src, "fc.weight"), (src, "fc.bias"), str(tmp_path / "fc.piece"))
    conv.encode_job(job, cfg, None, "cpu", "raise")
    tensors, meta = conv.read_piece(tmp_path / "fc.piece")
    ref = HQLinear.from_linear(lin, cfg.codec_config(), key="fc", mma="bf16", storage=storage, name="fc")
    assert meta["hq_meta"] == ref.hq_meta and "tail" in meta["hq_meta"]
    sd = ref.state_dict()
    assert tensors.keys() == sd.keys() and any(k.startswith("tail_") for k in tensors)
    assert all(torch.equal(tensors[k], sd[k]) for k in sd)
    back = HQLinear.from_meta(meta["hq_meta"], name="fc")
    back.load_state_dict(tensors, assign=True)
    x = torch.randn(2, 777)
    assert torch.equal(back(x), ref(x))


def test_diffusers_from_pretrained_quantizes_split_layers_like_quantize(tmp_path):
    """``from_pretrained(quantization_config=HQConfig(...))`` on a model with padded widths (774 and 3096 columns:
    the feed-forward layers split) gives the same buffers as ``quantize`` in memory, and saves / loads exactly."""
    diffusers = pytest.importorskip("diffusers")
    import hq_diffusion
    from hq_diffusion import HQConfig

    torch.manual_seed(0)
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=3, attention_head_dim=258,
        cross_attention_dim=774, num_layers=1, caption_channels=16)
    model.save_pretrained(tmp_path / "float")
    loaded = diffusers.LTXVideoTransformer3DModel.from_pretrained(tmp_path / "float",
                                                                 quantization_config=HQConfig(bps=4.0))
    ref = diffusers.LTXVideoTransformer3DModel.from_pretrained(tmp_path / "float")
    hq_diffusion.quantize(ref, bps=4.0, progress=False)
    split = {n for n, m in loaded.named_modules() if isinstance(m, HQLinear) and m.tail_encoded() is not None}
    assert split == {"transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"}
    a, b = loaded.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hq_diffusion.save_quantized(ref, tmp_path / "hq")
    back = hq_diffusion.load_quantized(tmp_path / "hq")
    c = back.state_dict()
    assert c.keys() == b.keys() and all(torch.equal(c[k], b[k]) for k in b)
    for n in split:
        x = torch.randn(2, back.get_submodule(n).in_features)
        assert torch.equal(back.get_submodule(n)(x), ref.get_submodule(n)(x))
