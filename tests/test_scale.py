"""Memory bounds of issue 11 on a generated LTX-2-class checkpoint of about 200 MB (slow: fresh processes).

Same measurement as ``hq-diffusion bench convert`` (:func:`hq_diffusion.bench.convert.bounds`): each run's base
is its own memory right after importing torch, diffusers (with the model class and its quantizer machinery:
``hq_diffusion.bench.convert.IMPORTS``) and hq_diffusion, read inside the measured process, so
base and peak count the same shared-library pages. One process (conversion with 1 worker, quantize-on-load):
peak RSS ≤ base RSS + quantized output + 2 × the largest float tensor + 0.4 GB; ``load_quantized``: peak RSS ≤
base RSS + 1.15 × the quantized model + 0.3 GB; 2 forked workers: the peak of the process tree's summed PSS ≤
the parent's base PSS + quantized output + 2 × the largest float tensor + 0.4 GB (the issue's bound, with no
per-worker allowance: BENCHMARKS.md §20, §20b)."""
from __future__ import annotations

from pathlib import Path

import pytest

from hq_diffusion.bench.convert import GB, bounds, build_slice, load_bound, measure, proc_memory

NARROW = dict(num_attention_heads=8, attention_head_dim=128, cross_attention_dim=1024, caption_channels=1024,
              audio_num_attention_heads=8, audio_attention_head_dim=64, audio_cross_attention_dim=512)


def _within(b):
    assert 0 < b["measured"] <= b["bound"], {k: round(v / GB, 3) for k, v in b.items()}


def test_bounds_use_the_runs_own_base():
    """The bound moves with the run's own base (fast: no process is started)."""
    r = {"base": {"rss": 1.0 * GB, "pss": 0.5 * GB}, "rss": 2.0 * GB, "tree_pss": 2.5 * GB}
    one = bounds(r, qbytes=int(0.2 * GB), largest=int(0.1 * GB))
    assert one["measured"] == 2.0 * GB and one["bound"] == pytest.approx(1.0 * GB + 0.2 * GB + 0.2 * GB + 0.4 * GB)
    two = bounds(r, qbytes=int(0.2 * GB), largest=int(0.1 * GB), workers=2)
    assert two["measured"] == 2.5 * GB and two["bound"] == pytest.approx(0.5 * GB + 0.2 * GB + 2 * (0.2 * GB + 0.4 * GB))
    assert two["issue"] == pytest.approx(0.5 * GB + 0.2 * GB + 0.2 * GB + 0.4 * GB)
    assert load_bound(r, int(0.2 * GB))["bound"] == pytest.approx(1.0 * GB + 0.23 * GB + 0.3 * GB)
    m = proc_memory()
    assert 0 < m["uss"] <= m["pss"] <= m["rss"] <= m["hwm"]


@pytest.mark.slow
def test_conversion_and_load_within_bounds(tmp_path):
    src, out = tmp_path / "slice", tmp_path / "slice-hq"
    info = build_slice(src, blocks=2, overrides=NARROW, max_shard_size=60 * 10**6)
    assert 0.1 * GB < info["bytes"] < 0.5 * GB
    assert len(list(src.glob("*.safetensors"))) > 1  # sharded source, read through its index
    fmt = {"src": str(src), "out": str(out), "bps": 4.0}
    conv = measure("convert", 1200, workers=1, **fmt)
    assert conv["base"]["rss"] > 0.3 * GB  # read after the imports, inside the run
    qbytes = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    _within(bounds(conv, qbytes, info["largest"]))
    conv2 = measure("convert", 1200, workers=2, **fmt)  # parent + 2 forked workers: the tree's summed PSS
    assert len(conv2["workers"]) == 2 and all(w["hwm"] >= w["rss"] > 0 for w in conv2["workers"])
    two = bounds(conv2, qbytes, info["largest"], workers=2)
    _within({"measured": two["measured"], "bound": two["issue"]})  # the form: no per-worker allowance
    _within(bounds(measure("on-load", 1200, **fmt), qbytes, info["largest"]))
    _within(load_bound(measure("load", 600, **fmt), qbytes))
