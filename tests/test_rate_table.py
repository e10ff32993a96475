"""The shipped calibration table is exactly what the generator script produces."""
import json
import math
from pathlib import Path

from hq_diffusion.codec.rate import build_rate_table, load_rate_table

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_table_matches_generator():
    shipped = json.loads((ROOT / "assets" / "rate_table.json").read_text())
    assert shipped == load_rate_table()
    fresh = build_rate_table()
    assert fresh.keys() == shipped.keys()
    for name, rows in fresh["lattices"].items():
        for a, b in zip(rows, shipped["lattices"][name], strict=True):
            assert all(math.isclose(x, y, rel_tol=0, abs_tol=2e-4) for x, y in zip(a, b)), (name, a, b)


def test_table_reproduces_design_operating_points():
    rows = load_rate_table()["lattices"]["e8"]
    # interpolate SNR at 4.0 payload bps: DESIGN.md §1.6 gives 22.70 dB
    for (a0, r0, s0), (a1, r1, s1) in zip(rows, rows[1:]):
        if r0 <= 4.0 <= r1:
            snr = s0 + (4.0 - r0) / (r1 - r0) * (s1 - s0)
            assert abs(snr - 22.70) < 0.1
            break
    else:
        raise AssertionError("4.0 bps not covered")
