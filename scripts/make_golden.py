"""Regenerate the golden fixtures of ``tests/test_golden.py`` in ``tests/data/``.

    .venv/bin/python scripts/make_golden.py            # everything
    .venv/bin/python scripts/make_golden.py --v2-only  # only the format-v2 (rANS) codec fixtures

ONLY run this for a deliberate, version-bumped format change (a new ``FORMAT_VERSION`` of the codec or of the
checkpoint layout), and then keep the old fixtures next to the new ones: they are the guard that every saved
blob and checkpoint still decodes to the same weights bit for bit.  Regenerating them to make a failing
``test_golden.py`` pass hides exactly the bug the fixtures are there to catch.

Writes:
    tests/data/golden_codec.npz: for every case (lattice × shape × rate, odd width included) ``<case>/input``
        (float32 (R, n)), ``<case>/blob`` (uint8: ``EncodedTensor.to_bytes()``), ``<case>/weight`` (the exact
        decoded tensor, float32 (R, n)) and ``<case>/codes`` (int lattice codes, ``(R, n_pad)``); the case list
        is ``CASES`` below, in ``<case>/config`` as JSON (uint8 bytes).
    tests/data/golden_codec_v2.npz: the same layout for ``V2_CASES`` (``coder="rans"``, format version 2).
    tests/data/golden_ltx/: a one-layer LTX-Video transformer quantized at 4 bps, saved by ``save_quantized``.
    tests/data/golden_ltx_io.pt: its forward inputs and exact output (bfloat16).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"

# (name, shape, CodecConfig kwargs): every lattice at two rates, an odd width, an SNR target, fp32 scales
CASES = [
    *[(f"{lat}_16x64_{tag}", (16, 64), {"lattice": lat, "bps": bps})
      for lat in ("e8", "d4", "a2", "z") for tag, bps in (("2p5", 2.5), ("4p0", 4.0))],
    # odd width: too small for its fixed overhead at 3 bps (the RateBudgetWarning path)
    *[(f"{lat}_12x37_3p0", (12, 37), {"lattice": lat, "bps": 3.0}) for lat in ("e8", "d4", "a2", "z")],
    ("e8_16x96_snr20", (16, 96), {"lattice": "e8", "snr_db": 20.0}),
    ("d4_16x64_f32scales", (16, 64), {"lattice": "d4", "bps": 5.0, "scale_dtype": "float32"}),
]

# format version 2 (rANS): every lattice, an odd width and the tail-block path (fewer symbols than a block)
V2_CASES = [
    *[(f"rans_{lat}_64x128_4p0", (64, 128), {"lattice": lat, "bps": 4.0, "coder": "rans", "block": 64})
      for lat in ("e8", "d4", "a2", "z")],
    ("rans_e8_40x77_5p0", (40, 77), {"lattice": "e8", "bps": 5.0, "coder": "rans", "block": 128}),
    ("rans_e8_16x96_snr20", (16, 96), {"lattice": "e8", "snr_db": 20.0, "coder": "rans"}),
]


def codec_input(name: str, shape: tuple[int, int]) -> torch.Tensor:
    """The input of case ``name``: float32 Gaussian rows with varied row scales (the scales are coded too)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    x = torch.randn(*shape, generator=g)
    return x * torch.exp(torch.randn(shape[0], 1, generator=g))


def make_codec(cases=CASES, filename: str = "golden_codec.npz") -> None:
    from hq_diffusion.codec import CodecConfig, decode, encode

    arrays = {}
    for name, shape, kw in cases:
        x = codec_input(name, shape)
        et = encode(x, CodecConfig(**kw), key=f"golden/{name}")
        blob = et.to_bytes()
        arrays[f"{name}/input"] = x.numpy()
        arrays[f"{name}/blob"] = np.frombuffer(blob, dtype=np.uint8)
        arrays[f"{name}/weight"] = decode(et).numpy()
        arrays[f"{name}/codes"] = decode(et, out="codes").numpy()
        arrays[f"{name}/config"] = np.frombuffer(json.dumps({"shape": shape, **kw}).encode(), dtype=np.uint8)
    np.savez_compressed(DATA / filename, **arrays)


def tiny_transformer() -> torch.nn.Module:
    """A one-layer LTX-Video transformer (hidden 64 = 2 heads × 32), seeded weights, bfloat16 (the layers
    that stay unquantized then take half the space)."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(1234)
    return LTXVideoTransformer3DModel(in_channels=16, out_channels=16, patch_size=1, patch_size_t=1,
                                      num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64,
                                      num_layers=1, caption_channels=32).to(torch.bfloat16)


def forward_inputs() -> dict:
    """Inputs of the golden forward: 2×2×2 latent tokens, 5 caption tokens, batch 1, bfloat16."""
    g = torch.Generator().manual_seed(99)
    return {"hidden_states": torch.randn(1, 8, 16, generator=g).to(torch.bfloat16),
            "encoder_hidden_states": torch.randn(1, 5, 32, generator=g).to(torch.bfloat16),
            "timestep": torch.tensor([500]), "encoder_attention_mask": torch.ones(1, 5),
            "num_frames": 2, "height": 2, "width": 2}


def run_forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def make_model() -> None:
    import hq_diffusion as H

    model = tiny_transformer()
    H.quantize(model, bps=4.0, progress=False)
    out_dir = DATA / "golden_ltx"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    H.save_quantized(model, out_dir)
    loaded = H.load_quantized(out_dir)
    inputs = forward_inputs()
    y = run_forward(loaded, inputs)
    assert torch.equal(y, run_forward(model, inputs)), "the saved model does not reproduce the in-memory one"
    torch.save({"inputs": inputs, "output": y}, DATA / "golden_ltx_io.pt")


def main() -> int:
    DATA.mkdir(parents=True, exist_ok=True)
    make_codec(V2_CASES, "golden_codec_v2.npz")
    if "--v2-only" not in sys.argv[1:]:
        make_codec()
        make_model()
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    print(f"wrote {DATA} ({total / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
