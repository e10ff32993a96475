"""``hq-diffusion bench peers``: the real peer libraries next to hq-diffusion, every stored bit counted.

Runs whichever of bitsandbytes, HQQ, optimum-quanto, torchao, gguf-py and SDNQ are installed (the ``[peers]``
extra) on two weight matrices and prints, for each peer format, its total rate and SNR next to E8 + Rice
encoded at the same total rate. A peer that is not installed, or that fails on this machine, is listed
with the reason; nothing is silently skipped.

Counting, the same way as ours (``EncodedTensor.total_bits``: payload, side information, header, CRC): every
tensor the library itself stores for the weight (packed codes, scales, zero points, nested scales, code
tables, serialized metadata), at its stored dtype, read from the library's own objects
(``__tensor_flatten__`` of a tensor subclass, ``QuantState.as_dict(packed=True)``, the ``meta`` of HQQ, the
block bytes of gguf-py plus the GGUF tensor-info entry). Module-based libraries quantize a float16
``nn.Linear``, so their scales are stored at 16 bits as they would be in a float16 model.

Weights: ``gaussian`` is iid N(0, 1); ``trained-like`` is the most realistic matrix available offline (no
pretrained checkpoint can be fetched here): Student-t (ν = 5) entries with 1% of the input channels ×4, the
statistics :func:`hq_diffusion.bench.e2e.trained_like_` gives the tiny pipeline — synthetic, not a trained
model's weights.
"""
from __future__ import annotations

import argparse
import warnings
from typing import Callable

import torch
from tqdm import tqdm

from hq_diffusion.codec import CodecConfig, decode, encode

from ._common import emit, header, student_t_columns, table
from .baselines import snr_db

#: a peer format: w float32 (R, C) → (w_hat float32 (R, C), total stored bits)
PeerFn = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def stored_bits(t) -> int:
    """Bits of every plain tensor inside ``t`` (tensor subclasses are flattened recursively)."""
    if isinstance(t, torch.Tensor) and type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bits(getattr(t, n)) for n in names)
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size() * 8
    raise TypeError(f"stored_bits: not a tensor: {type(t).__name__}")


def state_dict_bits(module: torch.nn.Module) -> int:
    """Bits of everything in ``module.state_dict()`` (the library's own serialization of the layer)."""
    return sum(stored_bits(v) for v in module.state_dict().values())


def _fp16_linear(w: torch.Tensor) -> torch.nn.Sequential:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float16)
    lin.weight.data = w.to(torch.float16)
    return torch.nn.Sequential(lin)


# ---- the peers --------------------------------------------------------------------------------------------

def bnb_nf4(double_quant: bool) -> PeerFn:
    def run(w):
        import bitsandbytes.functional as F

        q, st = F.quantize_4bit(w.float().contiguous(), blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        bits = stored_bits(q) + sum(stored_bits(v) for v in st.as_dict(packed=True).values())
        return F.dequantize_4bit(q, st).float(), bits
    return run


def hqq(nbits: int, group: int) -> PeerFn:
    def run(w):
        from hqq.core.quantize import Quantizer

        wq, meta = Quantizer.quantize(w.float(), nbits=nbits, group_size=group, optimize=True, axis=1, device="cpu",
                                      compute_dtype=torch.float16)
        meta["scale"], meta["zero"] = meta["scale"].half(), meta["zero"].half()  # HQQLinear keeps them in fp16
        bits = stored_bits(wq) + stored_bits(meta["scale"]) + stored_bits(meta["zero"])
        return Quantizer.dequantize(wq, meta).float().reshape(w.shape), bits
    return run


def quanto(bits: int) -> PeerFn:
    def run(w):
        from optimum.quanto import freeze, qint4, qint8, quantize

        m = _fp16_linear(w)
        quantize(m, weights={4: qint4, 8: qint8}[bits])
        freeze(m)
        return m[0].weight.dequantize().float(), state_dict_bits(m)
    return run


def torchao_intx(group: int) -> PeerFn:
    def run(w):
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        m = _fp16_linear(w)
        quantize_(m, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group)))
        return m[0].weight.dequantize().float(), state_dict_bits(m)
    return run


def torchao_nf4(w):
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    n = to_nf4(w.to(torch.float16), block_size=64, scaler_block_size=256)
    return n.get_original_weight().float(), stored_bits(n)


def gguf_tensor_info_bytes(name: str, ndim: int) -> int:
    """Bytes of one GGUF tensor-info entry: name (u64 length + bytes), n_dims (u32), dims (u64 each), type
    (u32), data offset (u64)."""
    return 8 + len(name.encode()) + 4 + 8 * ndim + 4 + 8


def gguf_q(qtype: str) -> PeerFn:
    def run(w):
        import numpy as np
        from gguf import GGMLQuantizationType, quants

        t = GGMLQuantizationType[qtype]
        blocks = quants.quantize(w.float().numpy(), t)
        w_hat = torch.from_numpy(np.asarray(quants.dequantize(blocks, t), dtype=np.float32)).reshape(w.shape)
        pad = -blocks.nbytes % 32  # tensor data is aligned to 32 bytes in the file
        return w_hat, 8 * (blocks.nbytes + pad + gguf_tensor_info_bytes("weight", w.dim()))
    return run


def sdnq(dtype: str, group: int) -> PeerFn:
    def run(w):
        from sdnq import sdnq_post_load_quant

        m = sdnq_post_load_quant(_fp16_linear(w), weights_dtype=dtype, group_size=group, torch_dtype=torch.float16)
        eye = torch.eye(w.shape[1], dtype=torch.float16)
        with torch.no_grad():
            w_hat = m(eye).float().T.contiguous()
        return w_hat, state_dict_bits(m)
    return run


#: (library, import name, format label, function)
PEERS: list[tuple[str, str, str, PeerFn]] = [
    ("bitsandbytes", "bitsandbytes", "NF4 block 64, fp32 absmax", bnb_nf4(False)),
    ("bitsandbytes", "bitsandbytes", "NF4 block 64, double-quant absmax", bnb_nf4(True)),
    ("HQQ", "hqq", "4-bit group 64, fp16 scale + zero", hqq(4, 64)),
    ("HQQ", "hqq", "3-bit group 64, fp16 scale + zero", hqq(3, 64)),
    ("optimum-quanto", "optimum.quanto", "qint4 (group 128)", quanto(4)),
    ("torchao", "torchao", "int4 weight-only group 64 (IntxWeightOnlyConfig)", torchao_intx(64)),
    ("torchao", "torchao", "NF4 (to_nf4, block 64, scaler block 256)", torchao_nf4),
    ("gguf-py", "gguf", "Q4_0", gguf_q("Q4_0")),
    ("gguf-py", "gguf", "Q4_1", gguf_q("Q4_1")),
    ("gguf-py", "gguf", "Q5_0", gguf_q("Q5_0")),
    ("gguf-py", "gguf", "Q4_K", gguf_q("Q4_K")),
    ("SDNQ", "sdnq", "int4 group 64", sdnq("int4", 64)),
]


def weights(kind: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """The benchmark matrices. float32 (rows, cols); see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=g)
    if kind == "trained-like":
        return student_t_columns(rows, cols, 5, 4, g)
    raise ValueError(f"weights: unknown kind {kind!r} (gaussian, trained-like)")


def run_peers(w: torch.Tensor, ours: bool = True, progress: bool = False) -> list[dict]:
    """Every peer of :data:`PEERS` on ``w`` float32 (R, C). One dict per format: library, format, status
    ("ok", "not installed", "failed: …"), bps, snr, and with ``ours`` E8 + Rice at the same total rate."""
    import importlib.util

    out = []
    for lib, mod, label, fn in tqdm(PEERS, desc="peers", disable=not progress, leave=False):
        row = {"library": lib, "format": label, "status": "ok", "bps": None, "snr": None}
        try:
            installed = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            installed = False
        if not installed:
            row["status"] = f"not installed (pip install {lib if lib != 'gguf-py' else 'gguf'})"
            out.append(row)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w_hat, bits = fn(w)
        except Exception as e:  # reported in the table, never hidden
            row["status"] = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
            out.append(row)
            continue
        row["bps"], row["bits"], row["snr"] = bits / w.numel(), bits, snr_db(w, w_hat)
        if ours:
            q = encode(w, CodecConfig(bps=int(row["bps"] * 1000) / 1000, lattice="e8"))
            row["ours_bps"], row["ours_snr"] = q.bps, snr_db(w, decode(q))
        out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hq-diffusion bench peers", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--weights", default="gaussian,trained-like")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the markdown here")
    a = p.parse_args(argv)
    text = [header(f"Real peer libraries, {a.rows}×{a.cols}",
                   f"hq-diffusion bench peers --rows {a.rows} --cols {a.cols} --weights {a.weights}")]
    for kind in a.weights.split(","):
        w = weights(kind, a.rows, a.cols, a.seed)
        rows = []
        for r in run_peers(w, progress=True):
            if r["status"] != "ok":
                rows.append([r["library"], r["format"], r["status"], "", "", "", "", ""])
            else:
                rows.append([r["library"], r["format"], "ok", f"{r['bps']:.3f}", r["snr"], f"{r['ours_bps']:.3f}",
                             r["ours_snr"], f"{r['ours_snr'] - r['snr']:+.2f}"])
        text += ["", f"**{kind}**", "",
                 table(["library", "format", "status", "its total bps", "its SNR dB", "E8 total bps", "E8 SNR dB",
                        "E8 gain dB"], rows)]
    emit("\n".join(text), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
