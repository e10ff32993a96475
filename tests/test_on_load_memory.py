"""Quantize-on-load holds about one layer's float weights at a time (the memory test: slow, about 45 s, Linux,
one fresh process; the load-order test: fast).

A small LTX-Video transformer whose blocks are most of its weights (4 blocks, 1024 wide, 0.15 GB bf16) is loaded
with ``from_pretrained(d, quantization_config=HQConfig(bps=4.0))`` in a fresh interpreter. The process first
imports everything and encodes one layer of the largest planned layer's shape alone (its peak: one layer's
encode work space; lazily created thread pools and kernels are then in the base), reads its RSS (the base), resets its high-water mark (``/proc/self/clear_refs``) and loads. The peak
growth over the base must stay within the quantized model + the float tensors of the skipped layers (what the
finished model holds) + the largest quantized layer's float weight + the peak of encoding one layer of that
shape alone (measured in the same process before the load: its encode work space) + 64 MB. Holding the float
weights of the layers already encoded, or their left-over encode work space, exceeds it: before the fix of
BENCHMARKS.md §20b (glibc kept every layer's freed work space; the large layers were encoded last, on top of
the loaded float tensors) the growth was 526 MB against a bound of about 290 MB."""
from __future__ import annotations

import json
import subprocess
import sys
import pytest
import torch

MB = 2**20
CHILD = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import torch, diffusers, hq_diffusion
from diffusers import LTXVideoTransformer3DModel
from hq_diffusion import HQConfig
from hq_diffusion.integrations import diffusers_backend, load_quantize
from hq_diffusion.nn.linear import HQLinear

def status():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line[:5]] = int(line.split()[1]) * 1024
    return out

import ctypes
trim = getattr(ctypes.CDLL(None), "malloc_trim", lambda pad: 0)
out_f, in_f = int(sys.argv[2]), int(sys.argv[3])
warm = torch.nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)  # the largest planned layer's shape
trim(0)
start = status()["VmRSS"]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
HQLinear.from_linear(warm, HQConfig(bps=4.0).codec_config(), key="warm", name="warm")
one = status()["VmHWM"] - start  # one layer: its encode work space, with its float weight already resident
del warm
trim(0)
base = status()["VmRSS"]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
m = LTXVideoTransformer3DModel.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16,
                                               quantization_config=HQConfig(bps=4.0))
peak = status()["VmHWM"]
held = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
print("HQMEM", json.dumps({"growth": peak - base, "held": held, "one": one}))
"""


def _writable_clear_refs() -> bool:
    try:
        with open("/proc/self/clear_refs", "w"):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """(directory of a saved bf16 LTX-Video transformer, its float bytes, its largest planned ``nn.Linear``)."""
    from diffusers import LTXVideoTransformer3DModel

    from hq_diffusion.integrations.config import HQConfig
    from hq_diffusion.integrations.quantize import _plan

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("onload") / "transformer"
    m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=8, attention_head_dim=128,
                                   cross_attention_dim=1024, num_layers=4, caption_channels=64).to(torch.bfloat16)
    m.save_pretrained(d)
    total = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    todo, _ = _plan(m, HQConfig(bps=4.0))
    quantized = sum(lin.weight.numel() * lin.weight.element_size() for _, lin in todo)
    big = max((lin for _, lin in todo), key=lambda lin: lin.weight.numel())
    assert quantized > 0.8 * total and big.weight.numel() * 2 < total / 10  # many layers, most of the model
    return d, total, (big.out_features, big.in_features)


@pytest.mark.slow  # about 45 s on a shared 2-core CPU, mostly the fresh interpreter's imports
@pytest.mark.skipif(not _writable_clear_refs(), reason="needs Linux /proc/self/clear_refs")
def test_on_load_holds_about_one_layer_of_float_weights(model_dir):
    d, total, (out_f, in_f) = model_dir
    largest = 2 * out_f * in_f
    p = subprocess.run([sys.executable, "-c", CHILD, str(d), str(out_f), str(in_f)], capture_output=True,
                       text=True, timeout=600)
    line = [x for x in p.stdout.splitlines() if x.startswith("HQMEM")]
    assert p.returncode == 0 and line, p.stderr[-2000:]
    r = json.loads(line[0].split(" ", 1)[1])
    bound = r["held"] + largest + r["one"] + 64 * MB
    print(f"on-load: float {total / MB:.0f} MB, largest {largest / MB:.0f} MB, one layer's encode {r['one'] / MB:.0f} "
          f"MB, model held {r['held'] / MB:.0f} MB, peak growth {r['growth'] / MB:.0f} MB, bound {bound / MB:.0f} MB")
    assert r["growth"] <= bound, (r["growth"] / MB, bound / MB)


def test_lazy_shard_yields_planned_weights_largest_first(tmp_path):
    """Fast: diffusers loads a shard in its iteration order; the LazyShard puts the planned layers' weights
    first, largest first, then the rest in the shard's order, and still serves every tensor from the file."""
    from safetensors.torch import save_file

    from hq_diffusion.integrations.config import HQConfig
    from hq_diffusion.integrations.load_quantize import OnLoad, encode_order, lazy_shard, release_freed_memory
    from hq_diffusion.integrations.shards import read_header

    tensors = {"a.norm.weight": torch.ones(4), "b.weight": torch.randn(2, 4), "b.bias": torch.randn(2),
               "c.weight": torch.randn(8, 4), "d.weight": torch.randn(16, 4), "e.weight": torch.randn(3, 3)}
    f = tmp_path / "m.safetensors"
    save_file(tensors, str(f))
    plan = OnLoad(HQConfig(bps=4.0), {"b": True, "c": False, "d": False}, {}, files=[str(f)])
    assert encode_order(plan, read_header(f)[0]) == ["d.weight", "c.weight", "b.weight"]

    class Quantizer:
        _hq_on_load = plan

    shard = lazy_shard(Quantizer(), dict(tensors))
    assert list(shard) == ["d.weight", "c.weight", "b.weight", "a.norm.weight", "b.bias", "e.weight"]
    assert all(torch.equal(v, tensors[k]) for k, v in shard.items())
    assert isinstance(release_freed_memory(), bool)


def test_release_after_layer_trims_only_after_large_layers():
    """Fast: the conversion trims the heap after a layer of at least TRIM_MIN_BYTES float bytes, never after a
    smaller one (trimming there costs page faults and gives back little)."""
    from hq_diffusion.integrations import memory

    assert memory.release_after_layer(memory.TRIM_MIN_BYTES - 1) is False
    assert memory.release_after_layer(memory.TRIM_MIN_BYTES) is (memory._MALLOC_TRIM is not None)
