"""``hq-diffusion bench kernels``: Triton kernel throughput on the linear shapes of LTX-Video and LTX-2 (GPU).

For every unique (in_features, out_features) of the real transformers (``models.real_linear_shapes``) and
tokens T ∈ {256, 4096, 16384}: Rice decode (GB/s of the bf16-equivalent weight, and the bytes the kernel
really moves as a fraction of a measured device-to-device copy), RHT + int8 quantization of the
activations, the int8 GEMM (Triton and ``torch._int_mm``) against ``torch.matmul`` in bf16 in TFLOP/s, and
one quantized linear layer end to end against ``nn.Linear`` in bf16; at ≤ 16 tokens the fused decode + GEMM
against decode-then-GEMM. Every kernel is first checked against its torch reference on the same GPU.
Times are ``triton.testing.do_bench`` medians (20th/80th percentiles in the raw rows of ``--out``).
On a machine without CUDA it says so and exits 0; ``--dry-run`` lists the work and exits.

``--compile-only`` needs no GPU: it compiles every kernel launch the package makes for ``--arch`` (sm_90 =
H100/H200 by default) with Triton's real compiler and ``ptxas`` (:mod:`hq_diffusion.kernels.aot`) and
tabulates registers, spills, shared memory and the tensor-core instructions; exit status 1 when a launch
does not fit the architecture's limits.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hq_diffusion.integrations import families

from ._common import emit, header, table

MODELS = ("ltx", "ltx2")  # default --models: registered family keys (hq_diffusion.integrations.families)
TOKENS = (256, 4096, 16384)
SMALL_TOKENS = (1, 16)


def linear_shapes(models=MODELS) -> list[tuple[int, int]]:
    """Unique (in_features, out_features) of the real transformers, sorted."""
    from hq_diffusion.models import real_linear_shapes

    return sorted({(i, o) for m in models for _, i, o in real_linear_shapes(m)})


@dataclass
class _Layer:
    """The interface ``nn.linear.hq_linear`` reads (what HQLinear exposes)."""

    q: object
    bias: torch.Tensor | None
    mma: str = "int8"
    codes: torch.Tensor | None = None

    def encoded(self):
        return self.q


def _bench(fn) -> tuple[float, float, float]:
    import triton.testing

    return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))  # ms


def _copy_bandwidth(dev) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), 1 GiB buffer."""
    src = torch.empty(2**30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))[0]
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _check(q, K, dev, gen) -> str:
    """Kernels against their torch references on this GPU; returns "ok" or what failed."""
    from hq_diffusion.codec import ops_ref
    from hq_diffusion.kernels.loader import kernel_module

    rd, rh, gm, fu = (kernel_module(n) for n in ("rice_decode", "rotate", "int8_gemm", "fused"))
    bad = []
    codes = rd.decode_launch(q, "codes")
    if not torch.equal(codes, ops_ref.decode_ref(q, "codes")):
        bad.append("decode codes")
    if _relerr(rd.decode_launch(q, "rotated"), ops_ref.decode_ref(q, "rotated", torch.float32)) > 1e-2:
        bad.append("decode rotated")
    x = torch.randn(64, K, device=dev, generator=gen).to(torch.bfloat16)
    xq, xs = rh.rht_quant_int8_launch(x, q.seed, q.key, q.tile, q.n_pad, ops_ref.int8_operand_gain(q))
    rq, rs = ops_ref.rht_quant_int8_ref(x, q.seed, q.key, q.tile, q.n_pad, ops_ref.int8_operand_gain(q))
    diff = (xq.int() - rq.int()).abs()
    if int(diff.max()) > 1 or float((diff > 0).float().mean()) > 1e-3 or _relerr(xs, rs) > 1e-6:
        bad.append("rht_quant_int8")
    if _relerr(rh.rht_launch(F.pad(x, (0, q.n_pad - K)), q.seed, q.key, q.tile),
               ops_ref.rht_ref(F.pad(x, (0, q.n_pad - K)).float(), q.seed, q.key, q.tile)) > 1e-2:
        bad.append("rht")
    ws = ops_ref.row_dequant_scale(q)
    wq = codes.reshape(q.rows, q.n_pad)
    if wq.dtype == torch.int8:
        bias = torch.randn(q.rows, device=dev, generator=gen).to(torch.bfloat16)
        if not torch.equal(gm.int8_gemm_dequant_launch(rq, rs, wq, ws, bias),
                           ops_ref.int8_gemm_dequant_ref(rq, rs, wq, ws, bias)):
            bad.append("int8 gemm")
        if fu.fused_supported(q, 16):
            if _relerr(fu.fused_decode_gemm_launch(rq[:16], rs[:16], q, bias),
                       ops_ref.fused_decode_gemm_ref(rq[:16], rs[:16], q, bias)) > 1e-2:
                bad.append("fused")
    return "ok" if not bad else "FAIL: " + ", ".join(bad)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hq-diffusion bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated family keys: " + ", ".join(families.keys()))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--bps", type=float, default=4.0)
    p.add_argument("--lattice", default="e8")
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--max-shapes", type=int, default=0, help="only the first N shapes (0: all)")
    p.add_argument("--dry-run", action="store_true", help="list shapes and measurements, then exit")
    p.add_argument("--out", help="also write the markdown here")
    p.add_argument("--compile-only", action="store_true",
                   help="no GPU needed: compile every kernel launch for --arch and report its resources")
    p.add_argument("--arch", default="90", help="with --compile-only: comma-separated sm versions (80, 86, 89, 90)")
    p.add_argument("--quick", action="store_true", help="with --compile-only: one launch per kernel")
    a = p.parse_args(argv)
    if a.compile_only:
        return _compile_only(a)
    models = [m for m in a.models.split(",") if m]
    tokens = [int(t) for t in a.tokens.split(",") if t]
    shapes = linear_shapes(models)
    if a.max_shapes:
        shapes = shapes[:a.max_shapes]
    cmd = (f"hq-diffusion bench kernels --models {a.models} --tokens {a.tokens} --bps {a.bps} "
           f"--lattice {a.lattice} --block {a.block}")
    if a.dry_run or not torch.cuda.is_available():
        lines = [f"{len(shapes)} unique linear shapes (in → out) of {', '.join(models)}: "
                 + ", ".join(f"{i}→{o}" for i, o in shapes),
                 f"tokens {tokens} (fused path at {list(SMALL_TOKENS)})"]
        if not torch.cuda.is_available():
            lines.insert(0, "hq-diffusion bench kernels: no CUDA device here, nothing to measure "
                            "(the Triton kernels need a GPU; their CPU tests run in the interpreter). "
                            "`--compile-only` compiles them for a GPU without one.")
        print("\n".join(lines))
        return 0
    return _run(a, shapes, tokens, cmd)


def _run(a, shapes, tokens, cmd, dev: torch.device | None = None) -> int:
    """Measure ``shapes`` × ``tokens`` on ``dev`` (default: the CUDA device) and print the tables.

    ``dev`` is the CPU only in the test that runs this harness in the Triton interpreter."""
    from hq_diffusion.codec import CodecConfig, encode, ops_ref
    from hq_diffusion.kernels.loader import kernel_module
    from hq_diffusion.nn.linear import hq_linear

    rd, rh, gm, fu = (kernel_module(n) for n in ("rice_decode", "rotate", "int8_gemm", "fused"))
    dev = dev or torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    copy_bw = _copy_bandwidth(dev)
    dec_rows, rht_rows, mm_rows, lin_rows, small_rows = [], [], [], [], []
    for K, N in shapes:
        w = torch.randn(N, K, generator=torch.Generator().manual_seed(K * 7 + N)).to(torch.bfloat16)
        q = encode(w, CodecConfig(bps=a.bps, lattice=a.lattice, block=a.block)).to(dev)
        status = _check(q, K, dev, gen)
        bias = torch.randn(N, device=dev, generator=gen).to(torch.bfloat16)
        w_dev = w.to(dev)
        moved = sum(s.nbytes for s in q.streams) + q.rows * q.n_pad  # compressed in + int8 codes out
        ms = _bench(lambda: rd.decode_launch(q, "codes"))[0]
        ms_rot = _bench(lambda: rd.decode_launch(q, "rotated"))[0]
        dec_rows.append([f"{K}→{N}", f"{q.bps:.2f}", f"{ms * 1e3:.0f}", N * K * 2 / ms / 1e6,
                         f"{moved / (ms * 1e-3) / 1e9 / copy_bw * 100:.1f}%", N * K * 2 / ms_rot / 1e6, status])
        codes = rd.decode_launch(q, "codes").reshape(N, q.n_pad)
        ws = ops_ref.row_dequant_scale(q)
        gain = ops_ref.int8_operand_gain(q)
        for T in tokens:
            x = torch.randn(T, K, device=dev, generator=gen).to(torch.bfloat16)
            t_rq = _bench(lambda: rh.rht_quant_int8_launch(x, q.seed, q.key, q.tile, q.n_pad, gain))[0]
            xp = F.pad(x, (0, q.n_pad - K))
            t_r = _bench(lambda: rh.rht_launch(xp, q.seed, q.key, q.tile))[0]
            rht_rows.append([f"{K}→{N}", T, T * K * 2 / t_r / 1e6, T * K * 2 / t_rq / 1e6])
            xq, xs = rh.rht_quant_int8_launch(x, q.seed, q.key, q.tile, q.n_pad, gain)
            flops = 2 * T * N * q.n_pad
            t_tr = _bench(lambda: gm.int8_gemm_dequant_launch(xq, xs, codes, ws, bias))[0]
            t_im = (_bench(lambda: gm.int8_gemm_dequant_int_mm(xq, xs, codes, ws, bias))[0]
                    if gm.int_mm_supported(T, N, q.n_pad, dev) else float("nan"))
            t_bf = _bench(lambda: torch.matmul(x, w_dev.t()))[0]
            mm_rows.append([f"{K}→{N}", T, flops / t_tr / 1e9, flops / t_im / 1e9, 2 * T * N * K / t_bf / 1e9,
                            "Triton" if not t_im < t_tr else "_int_mm"])
            rice, stored = _Layer(q, bias), _Layer(q, bias, codes=codes)
            t_lr = _bench(lambda: hq_linear(x, rice))[0]
            t_lc = _bench(lambda: hq_linear(x, stored))[0]
            t_lb = _bench(lambda: F.linear(x, w_dev, bias))[0]
            lin_rows.append([f"{K}→{N}", T, f"{t_lr * 1e3:.0f}", f"{t_lc * 1e3:.0f}", f"{t_lb * 1e3:.0f}",
                             f"{t_lb / t_lr:.2f}×", f"{t_lb / t_lc:.2f}×"])
        for T in SMALL_TOKENS:
            x = torch.randn(T, K, device=dev, generator=gen).to(torch.bfloat16)
            xq, xs = rh.rht_quant_int8_launch(x, q.seed, q.key, q.tile, q.n_pad, gain)
            if fu.fused_supported(q, T):
                t_f = _bench(lambda: fu.fused_decode_gemm_launch(xq, xs, q, bias))[0]
            else:
                t_f = float("nan")
            t_dg = _bench(lambda: gm.int8_gemm_dequant_launch(xq, xs, rd.decode_launch(q, "codes").reshape(N, -1),
                                                              ws, bias))[0]
            t_b = _bench(lambda: F.linear(x, w_dev, bias))[0]
            small_rows.append([f"{K}→{N}", T, f"{t_f * 1e3:.0f}", f"{t_dg * 1e3:.0f}", f"{t_b * 1e3:.0f}",
                               f"{t_dg / t_f:.2f}×"])
        del w_dev, codes
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    text = header(f"Triton kernels, {a.lattice.upper()} at {a.bps} bps, Rice block {a.block}", cmd)
    text += f"\nDevice-to-device copy: {copy_bw:.0f} GB/s. Times are do_bench medians.\n\n"
    text += "**Decode** (GB/s of the bf16-equivalent weight; '% copy' = bytes really moved / time / copy BW)\n\n"
    text += table(["shape", "total bps", "codes µs", "codes GB/s", "% copy", "bf16 GB/s", "GPU check"], dec_rows)
    text += "\n\n**RHT of activations** (GB/s of bf16 input)\n\n"
    text += table(["shape", "tokens", "rht GB/s", "rht+int8 GB/s"], rht_rows)
    text += "\n\n**int8 GEMM + dequant epilogue** (TFLOP/s)\n\n"
    text += table(["shape", "tokens", "Triton int8", "_int_mm int8", "bf16 matmul", "faster int8"], mm_rows)
    text += "\n\n**One linear layer end to end** (rotate + quantize + [decode] + GEMM, µs)\n\n"
    text += table(["shape", "tokens", "HQ rice", "HQ int8 codes", "nn.Linear bf16", "speed-up rice",
                   "speed-up codes"], lin_rows)
    text += "\n\n**Small-token regime** (µs): fused decode+GEMM vs decode then int8 GEMM\n\n"
    text += table(["shape", "tokens", "fused", "decode+GEMM", "nn.Linear bf16", "fused speed-up"], small_rows)
    emit(text, a.out)
    return 0


def _compile_only(a) -> int:
    from hq_diffusion.kernels import aot

    try:
        archs = [int(v) for v in a.arch.split(",") if v]
    except ValueError:
        raise SystemExit(f"--arch takes sm versions such as 90 or 80,90; got {a.arch!r}")
    unknown = [v for v in archs if v not in aot.LIMITS]
    if unknown or not archs:
        raise SystemExit(f"--arch: supported sm versions are {sorted(aot.LIMITS)}; got {a.arch!r}")
    cmd = f"hq-diffusion bench kernels --compile-only --arch {a.arch}" + (" --quick" if a.quick else "")
    try:
        results = {arch: aot.compile_all(arch, full=not a.quick, progress=True) for arch in archs}
    except aot.AOTUnavailable as e:
        print(f"hq-diffusion bench kernels --compile-only: {e}")
        return 2
    parts = [header("Triton kernels compiled ahead of time (no GPU used)", cmd)]
    cols = ["kernel", "variant", "config", "warps", "regs", "spill B", "shared KiB", "tensor-core instruction",
            "fits"]
    bad = 0
    for arch, res in results.items():
        bad += sum(not c.ok for c in res)
        rows = [[c.kernel, c.variant, c.config, c.num_warps, c.regs, c.local, f"{c.shared / 1024:.1f}",
                 " ".join(c.mma) or "—", "yes" if c.ok else f"**no**: {c.problem}"] for c in res]
        spills = sum(c.local > 0 for c in res)
        parts.append(f"**sm_{arch}** ({aot.ARCH_NAMES.get(arch, '')}): {len(res)} compiled, "
                     f"{sum(c.ok for c in res)} within the limits, {spills} with spills\n\n" + table(cols, rows))
    emit("\n\n".join(parts) + "\n", a.out)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
