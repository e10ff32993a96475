"""Memory bounds of issue 11 on a generated LTX-2-class checkpoint of about 200 MB (slow: fresh processes).

Bounds (peak RSS of a fresh process, from ``getrusage``; for 2 workers the peak summed PSS of the process tree):
the streaming conversion (1 and 2 workers) and quantize-on-load ≤
imports + quantized output + 2 × the largest float tensor + 0.4 GB; ``load_quantized`` ≤ imports + 1.15 ×
the quantized model + 0.3 GB."""
from __future__ import annotations

from pathlib import Path

import pytest

from hq_diffusion.bench.convert import build_slice, measure

GB = 1e9
NARROW = dict(num_attention_heads=8, attention_head_dim=128, cross_attention_dim=1024, caption_channels=1024,
              audio_num_attention_heads=8, audio_attention_head_dim=64, audio_cross_attention_dim=512)


@pytest.mark.slow
def test_conversion_and_load_within_bounds(tmp_path):
    src, out = tmp_path / "slice", tmp_path / "slice-hq"
    info = build_slice(src, blocks=2, overrides=NARROW, max_shard_size=60 * 10**6)
    assert 0.1 * GB < info["bytes"] < 0.5 * GB
    assert len(list(src.glob("*.safetensors"))) > 1  # sharded source, read through its index
    fmt = {"src": str(src), "out": str(out), "bps": 4.0}
    base = measure("imports", 600)["rss"]
    conv = measure("convert", 1200, workers=1, **fmt)
    qbytes = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    bound = base + qbytes + 2 * info["largest"] + 0.4 * GB
    assert conv["rss"] <= bound, (conv["rss"] / GB, bound / GB)
    conv2 = measure("convert", 1200, workers=2, **fmt)  # parent + 2 forked workers: the tree's summed PSS
    assert 0 < conv2["tree"] <= bound, (conv2["tree"] / GB, bound / GB)
    onload = measure("on-load", 1200, **fmt)
    assert onload["rss"] <= bound, (onload["rss"] / GB, bound / GB)
    load = measure("load", 600, **fmt)
    assert load["rss"] <= base + 1.15 * qbytes + 0.3 * GB, (load["rss"] / GB, base / GB, qbytes / GB)
