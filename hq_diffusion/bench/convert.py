"""``hq-diffusion bench convert``: real-size conversion in bounded memory, on a real-width LTX-2 slice.

Builds the LTX-2 transformer at its released width with ``--blocks N`` of its 48 blocks on disk (random
trained-like bf16 weights: Gaussian rows with log-normal column scales, written one tensor at a time into
safetensors shards), then measures in fresh processes (peak RSS from ``getrusage``; for the N-worker
conversion the peak of the process tree's summed PSS, sampled every 0.2 s, so that the pages forked workers
share count once; wall time):

- the imports alone (torch, diffusers, hq_diffusion) — the base of every bound;
- ``hq-diffusion quantize`` with 1 and ``--workers`` processes (encode MB/s = bf16 bytes of the slice / wall);
- ``from_pretrained(d, quantization_config=HQConfig(bps))`` (quantize-on-load);
- ``quantize(from_pretrained(d))`` + ``save_quantized``;
- ``load_quantized`` of the converted directory;

and checks the bounds of issue 11: conversion and quantize-on-load ≤ imports + quantized output + 2 × the
largest float tensor + 0.4 GB; ``load_quantized`` ≤ imports + 1.15 × quantized + 0.3 GB. The table's last
column scales each figure to the 48 blocks of the full model (per-block part × 48 + the non-block part).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ._common import emit, header, table

GB = 1e9
SNIPPETS = {
    "imports": "import torch, diffusers, hq_diffusion; from hq_diffusion.integrations import convert, api",
    "convert": "from hq_diffusion.integrations.convert_cli import main; "
               "assert main([{src!r}, '--out', {out!r}, '--bps', '{bps}', '--workers', '{workers}', "
               "'--no-progress', '--overwrite']) == 0",
    "on-load": "import torch, diffusers; from hq_diffusion import HQConfig; from hq_diffusion.integrations import "
               "diffusers_backend; m = diffusers.LTX2VideoTransformer3DModel.from_pretrained({src!r}, torch_dtype=torch.bfloat16, "
               "quantization_config=HQConfig(bps={bps}))",
    "quantize": "import torch, diffusers, hq_diffusion as hq; m = diffusers.LTX2VideoTransformer3DModel."
                "from_pretrained({src!r}, torch_dtype=torch.bfloat16); hq.quantize(m, bps={bps}, progress=False); "
                "hq.save_quantized(m, {out!r})",
    "load": "import hq_diffusion as hq; m = hq.load_quantized({out!r})",
}


def build_slice(path: Path, blocks: int, seed: int = 0, max_shard_size: int = 2 * 10**9,
                overrides: dict | None = None) -> dict:
    """Write the real-width LTX-2 transformer with ``blocks`` blocks to ``path`` (config.json + bf16 shards),
    one tensor at a time; ``overrides``: config keys to change (a narrower model for tests).
    Returns {"params", "bytes", "largest", "block_params"} (bytes of bf16)."""
    import diffusers
    from accelerate import init_empty_weights

    from ..integrations import families
    from ..integrations.shards import (INDEX_NAME, plan_shards, shard_names, write_index,
                                       write_safetensors)
    from ..integrations.state import ST_NAMES

    config = dict(families.get("ltx2").real_config)
    for key in families.get("ltx2").depth_keys:
        config[key] = int(blocks)
    config.update(overrides or {})
    cls = getattr(diffusers, families.get("ltx2").transformer_classes[0])
    with init_empty_weights():
        model = cls(**config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_config(str(path))
    sd = model.state_dict(keep_vars=True)
    specs = {k: (ST_NAMES[torch.bfloat16] if v.is_floating_point() else ST_NAMES[v.dtype], tuple(v.shape))
             for k, v in sd.items()}

    def fetch(name):
        t = sd[name]
        if t.device.type != "meta":
            return t.detach().to(torch.bfloat16) if t.is_floating_point() else t.detach()
        g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
        if t.ndim >= 2:  # trained-like: per-column log-normal scales on Gaussian entries
            cols = torch.exp(0.5 * torch.randn(t.shape[-1], generator=g))
            w = torch.randn(t.shape, generator=g).mul_(cols).mul_(0.02)
        elif name.endswith("weight"):
            w = 1.0 + 0.05 * torch.randn(t.shape, generator=g)
        else:
            w = 0.02 * torch.randn(t.shape, generator=g)
        return w.to(torch.bfloat16)

    groups = plan_shards(specs, list(specs), max_shard_size)
    files = shard_names(len(groups))
    wm, total = {}, 0
    for fname, group in zip(files, groups):
        total += write_safetensors(path / fname, {k: specs[k] for k in group}, {"format": "pt"}, fetch)
        wm.update({k: fname for k in group})
    if len(files) > 1:
        write_index(path / INDEX_NAME, wm, total)
    numel = {k: v.numel() for k, v in sd.items()}
    block = sum(n for k, n in numel.items() if k.startswith("transformer_blocks.0."))
    return {"params": sum(numel.values()), "bytes": sum(2 * numel[k] for k in numel),
            "largest": 2 * max(numel.values()), "block_params": block}


def measure(kind: str, timeout: float, **fmt) -> dict:
    """:func:`_measure` ({"rss", "child", "tree", "wall"}), reported on stderr as soon as it is done."""
    r = _measure(kind, timeout, **fmt)
    print(f"bench convert: {kind} {fmt.get('workers', '')}: peak RSS {r['rss'] / GB:.2f} GB (process tree PSS "
          f"{r['tree'] / GB:.2f} GB), {r['wall']:.0f} s",
          file=sys.stderr, flush=True)
    return r


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from ``/proc/*/stat``)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


def tree_pss(pid: int) -> int:
    """Bytes of memory of ``pid`` and its descendants: the sum of their proportional set sizes (``Pss`` of
    ``/proc/PID/smaps_rollup``: a page shared by k processes counts 1/k in each, so forked workers sharing the
    parent's pages are counted once). 0 where ``/proc`` lacks it."""
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(x.split()[1]) * 1024 for x in f if x.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total


def _measure(kind: str, timeout: float, **fmt) -> dict:
    """Run one snippet in a fresh interpreter: {"rss": its peak RSS, "child": the largest peak RSS of its
    child processes, "tree": the peak of :func:`tree_pss` over the process and its children, sampled every
    0.2 s, "wall": seconds} (RuntimeError on failure)."""
    import threading

    code = ("import resource, time, json, warnings; warnings.simplefilter('ignore'); t = time.perf_counter()\n"
            + SNIPPETS[kind].format(**fmt) + "\n"
            "print('HQRESULT', json.dumps({'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "
            "'child': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
            "'wall': time.perf_counter() - t}))")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.wait(0.2):
            peak[0] = max(peak[0], tree_pss(p.pid))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise RuntimeError(f"bench convert: {kind} did not finish in {timeout:.0f} s") from None
    finally:
        stop.set()
        th.join()
    line = [x for x in out.splitlines() if x.startswith("HQRESULT")]
    if p.returncode != 0 or not line:
        raise RuntimeError(f"bench convert: {kind} failed (exit {p.returncode}): {err.strip()[-800:]}")
    return {**json.loads(line[0].split(" ", 1)[1]), "tree": peak[0]}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def block_bytes(path: Path, prefix: str = "transformer_blocks.") -> int:
    """Bytes of tensor data under ``prefix`` in the ``*.safetensors`` files of ``path`` (read from their headers:
    an 8-byte little-endian length, then the JSON table of ``data_offsets``)."""
    total = 0
    for f in sorted(Path(path).rglob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                     if k != "__metadata__" and k.startswith(prefix))
    return total


def scale_to_full(total: int, in_blocks: int, blocks: int, full_blocks: int = 48) -> float:
    """Bytes of the full model from a slice of ``blocks`` blocks: the non-block part (``total - in_blocks``,
    kept as it is) plus ``full_blocks`` times one block's share of ``in_blocks``."""
    return total - in_blocks + full_blocks * in_blocks / blocks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="hq-diffusion bench convert", description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=4, help="LTX-2 blocks in the slice (of 48)")
    ap.add_argument("--bps", type=float, default=4.0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N for the parallel conversion")
    ap.add_argument("--skip", default="", help="comma-separated runs to skip: on-load, quantize, workers")
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per measured run")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--keep", default=None, help="build the slice here and keep it (default: a temp dir)")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hq-bench-convert-"))
    try:
        src, out = root / "slice", root / "slice-hq"
        t = time.perf_counter()
        saved = src / "bench_slice.json"
        if saved.is_file() and json.loads(saved.read_text()).get("blocks") == args.blocks:
            info = json.loads(saved.read_text())  # a slice kept by an earlier --keep run
        else:
            info = build_slice(src, args.blocks)
            saved.write_text(json.dumps({**info, "blocks": args.blocks}))
        print(f"slice: {args.blocks} blocks, {info['params'] / 1e9:.3f}B params, {info['bytes'] / GB:.2f} GB bf16 "
              f"(built in {time.perf_counter() - t:.0f} s)", file=sys.stderr)
        fmt = {"src": str(src), "out": str(out), "bps": args.bps}
        runs = {"imports": measure("imports", args.timeout)}
        runs["convert, 1 worker"] = measure("convert", args.timeout, workers=1, **fmt)
        qbytes = _dir_bytes(out)
        qblocks = block_bytes(out)
        runs["load_quantized"] = measure("load", args.timeout, **fmt)
        if "workers" not in skip and args.workers > 1:
            runs[f"convert, {args.workers} workers"] = measure("convert", args.timeout, workers=args.workers, **fmt)
        if "on-load" not in skip:
            runs["from_pretrained(quantization_config=HQConfig)"] = measure("on-load", args.timeout, **fmt)
        if "quantize" not in skip:
            fmt2 = dict(fmt, out=str(root / "ref"))
            runs["quantize(from_pretrained) + save_quantized"] = measure("quantize", args.timeout, **fmt2)
        base = runs["imports"]["rss"]
        conv_bound = base + qbytes + 2 * info["largest"] + 0.4 * GB
        load_bound = base + 1.15 * qbytes + 0.3 * GB
        bounds = {"load_quantized": load_bound}
        rows = []
        for name, r in runs.items():
            if name.startswith("convert") and name != "convert, 1 worker":
                r["rss"] = r["tree"]  # parent + concurrent workers, shared pages counted once (PSS)
            bound = bounds.get(name, conv_bound if name != "imports" else None)
            mbs = info["bytes"] / r["wall"] / 1e6 if name.startswith("convert") else None
            rows.append([name, f"{r['rss'] / GB:.2f}", "-" if bound is None else f"{bound / GB:.2f}",
                         "-" if bound is None else ("yes" if r["rss"] <= bound else "**no**"), f"{r['wall']:.0f}",
                         "-" if mbs is None else f"{mbs:.1f}"])
        nb = info["params"] - args.blocks * info["block_params"]
        full_params = nb + 48 * info["block_params"]
        scale = full_params / info["params"]
        q_full = scale_to_full(qbytes, qblocks, args.blocks)  # the non-block part does not grow with depth
        lines = [header(f"LTX-2 slice, {args.blocks} of 48 blocks, {args.bps} bps",
                        f"hq-diffusion bench convert --blocks {args.blocks} --bps {args.bps} "
                        f"--workers {args.workers}"),
                 f"slice: {info['params'] / 1e9:.3f}B parameters ({info['block_params'] / 1e9:.3f}B per block), "
                 f"{info['bytes'] / GB:.2f} GB bf16 → {qbytes / GB:.3f} GB quantized; largest float tensor "
                 f"{info['largest'] / GB:.3f} GB; imports {base / GB:.2f} GB.\n",
                 table(["run", "peak RSS GB", "bound GB", "within", "wall s", "MB/s (bf16 in)"], rows), "",
                 f"Scaled to 48 blocks ({full_params / 1e9:.2f}B parameters, ×{scale:.1f} of this slice): bf16 "
                 f"{info['bytes'] * scale / GB:.1f} GB → about {q_full / GB:.1f} GB quantized; conversion "
                 f"bound {(base + q_full + 2 * info['largest'] + 0.4 * GB) / GB:.1f} GB; "
                 f"1-worker conversion about {runs['convert, 1 worker']['wall'] * scale / 60:.0f} min."]
        emit("\n".join(lines), args.out)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
