"""``hq-diffusion bench convert``: real-size conversion in bounded memory, on a real-width LTX-2 slice.

Builds the LTX-2 transformer at its released width with ``--blocks N`` of its 48 blocks on disk (random
trained-like bf16 weights: Gaussian rows with log-normal column scales, written one tensor at a time into
safetensors shards), then measures, each in a fresh process (wall time of the work, imports excluded):

- ``hq-diffusion quantize`` with 1 and ``--workers`` processes (MB/s = bf16 bytes of the slice / wall; encode
  MB/s = the float bytes encoded / the encoding's own time, as the command's last line reports it, and the
  N-worker / 1-worker ratio of it), and with 1 worker on one torch thread, like each of the N workers (a lone
  process spreads its torch operations over the cores; the ratio against it is the pool's own scaling);
- ``from_pretrained(d, quantization_config=HQConfig(bps))`` (quantize-on-load);
- ``quantize(from_pretrained(d))`` + ``save_quantized``;
- ``load_quantized`` of the converted directory.

Memory, and the bounds of issue 11 (:func:`bounds`). Every measured process first imports torch, diffusers and
hq_diffusion (with the model class and diffusers' quantizer machinery, see :data:`IMPORTS`), then reads its own memory (:func:`proc_memory`: RSS, PSS, USS) -- the *base* -- and only then
works; its peak RSS is ``getrusage``'s high-water mark. Base and peak are read in the same process, so they
count the same shared-library pages (an imports-only process measured separately does not: the page cache it
maps is shared with, and evicted by, other jobs, which moved that base from 1.55 to 0.72 GB between two runs).
One process: peak RSS <= base RSS + quantized output + 2 x the largest float tensor + 0.4 GB (conversion,
quantize-on-load); ``load_quantized`` <= base RSS + 1.15 x quantized + 0.3 GB; ``quantize()`` of a loaded
model (the issue: "the loaded model + one layer") is read as base RSS + the bf16 model + 2 x largest + 0.4 GB.

N > 1 workers (forked processes, each encoding one layer at a time): the measure is the peak over time of the
process tree's summed PSS, sampled every 0.2 s (a page the workers share with the parent counts once in the
sum, split between them), against the parent's base PSS + quantized output + N x (2 x the largest float tensor
+ 0.4 GB): each worker holds at most one float tensor and that layer's encode work space plus a process's own
overhead (CPython's reference counts copy the shared pages they touch), which is what 2 x largest + 0.4 GB
budgets for one process; the parent assembles the pieces the workers wrote to disk. This bound is looser than
the issue's, which has no N: the table also says whether the tree stays within that one (2 x largest + 0.4 GB
once). Each worker's
own base (its RSS, PSS, USS after the pool's initializer, logged by the worker) and its own peak RSS
(``VmHWM``) are listed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ._common import emit, header, table

GB = 1e9
# Every measured process runs the same imports first; its base is its own memory right after them.
# The base is "the process after importing torch, diffusers and hq_diffusion"; importing diffusers
# includes the model class the user loads (resolving ``diffusers.LTX2VideoTransformer3DModel`` lazily imports
# accelerate, transformers, bitsandbytes, scipy, ...) and diffusers' quantizer machinery (``diffusers.quantizers
# .auto``: torchao and the other backends), which ``from_pretrained`` imports anyway: both come before the base.
IMPORTS = ("import torch, diffusers, hq_diffusion; from hq_diffusion.integrations import convert, api; "
           "import diffusers.quantizers.auto; diffusers.LTX2VideoTransformer3DModel")
SNIPPETS = {
    "imports": "pass",
    "convert": "from hq_diffusion.integrations.convert_cli import main; "
               "assert main([{src!r}, '--out', {out!r}, '--bps', '{bps}', '--workers', '{workers}', "
               "'--no-progress', '--overwrite']) == 0",
    "convert-1t": "torch.set_num_threads(1); from hq_diffusion.integrations.convert_cli import main; "
                  "assert main([{src!r}, '--out', {out!r}, '--bps', '{bps}', '--workers', '1', "
                  "'--no-progress', '--overwrite']) == 0",
    "on-load": "import torch, diffusers; from hq_diffusion import HQConfig; from hq_diffusion.integrations import "
               "diffusers_backend; m = diffusers.LTX2VideoTransformer3DModel.from_pretrained({src!r}, torch_dtype=torch.bfloat16, "
               "quantization_config=HQConfig(bps={bps}))",
    "quantize": "import torch, diffusers, hq_diffusion as hq; m = diffusers.LTX2VideoTransformer3DModel."
                "from_pretrained({src!r}, torch_dtype=torch.bfloat16); hq.quantize(m, bps={bps}, progress=False); "
                "hq.save_quantized(m, {out!r})",
    "load": "import hq_diffusion as hq; m = hq.load_quantized({out!r})",
}
# In the conversion, each forked encoding worker writes its own base (right after the pool's initializer, before
# its first layer) as one JSON line to the file named by HQ_BENCH_WORKER_LOG.
WORKER_HOOK = ("import hq_diffusion.integrations.convert as _c\n_init = _c._worker_init\n"
               "def _logged_init():\n    _init()\n"
               "    with open(os.environ['HQ_BENCH_WORKER_LOG'], 'a') as f:\n"
               "        f.write(json.dumps({'pid': os.getpid(), **proc_memory()}) + '\\n')\n"
               "_c._worker_init = _logged_init\n")

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


def proc_memory(pid: int | str = "self") -> dict:
    """Memory of one process now, in bytes: {"rss": resident set (``VmRSS``), "hwm": its peak so far (``VmHWM``),
    "pss": proportional set size (a page shared by k processes counts 1/k), "uss": pages of this process alone
    (``Private_Clean + Private_Dirty``)}, from ``/proc/PID/status`` and ``/proc/PID/smaps_rollup``.
    OSError where the process is gone."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss" if line.startswith("VmRSS") else "hwm"] = int(line.split()[1]) * 1024
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Private_Clean", "Private_Dirty"):
                fields[key] = int(rest.split()[0]) * 1024
    out["pss"] = fields.get("Pss", 0)
    out["uss"] = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return out


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


class _Sampler:
    """Samples the memory of a process tree every ``every`` s in a thread: the peaks of the summed PSS and USS
    over the tree, and each descendant's last seen ``VmHWM`` (its own peak RSS)."""

    def __init__(self, pid: int, every: float = 0.2):
        import threading

        self.pid, self.tree_pss, self.tree_uss, self.hwm = pid, 0, 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every):
        while not self._stop.wait(every):
            pss = uss = 0
            for p in _tree(self.pid):
                try:
                    m = proc_memory(p)
                except (OSError, ValueError):
                    continue
                pss, uss = pss + m["pss"], uss + m["uss"]
                if p != self.pid:
                    self.hwm[p] = m.get("hwm", 0)
            self.tree_pss, self.tree_uss = max(self.tree_pss, pss), max(self.tree_uss, uss)

    def stop(self):
        self._stop.set()
        self._thread.join()


def measure(kind: str, timeout: float, **fmt) -> dict:
    """:func:`_measure`, reported on stderr as soon as it is done."""
    r = _measure(kind, timeout, **fmt)
    msg = (f"bench convert: {kind} {fmt.get('workers', '')}: base RSS {r['base']['rss'] / GB:.2f} GB, peak RSS "
           f"{r['rss'] / GB:.2f} GB (+{(r['rss'] - r['base']['rss']) / GB:.2f}); base PSS "
           f"{r['base']['pss'] / GB:.2f} GB, tree PSS peak {r['tree_pss'] / GB:.2f} GB; {r['wall']:.0f} s")
    if r["workers"]:
        msg += "; workers (base → peak RSS): " + ", ".join(
            f"{w['rss'] / GB:.2f} → {w['hwm'] / GB:.2f} GB" for w in r["workers"])
    print(msg, file=sys.stderr, flush=True)
    return r


def _measure(kind: str, timeout: float, **fmt) -> dict:
    """Run one snippet in a fresh interpreter. The process imports torch, diffusers and hq_diffusion, reads its
    own memory (the base of its bounds: both base and peak count the same shared-library pages), then works.
    Returns {"base": :func:`proc_memory` right after the imports, "rss": its peak RSS (``VmHWM``, whole life;
    not ``getrusage``, whose maximum survives ``exec`` and so starts at the launching process's peak),
    "child": the largest peak RSS of its child processes, "tree_pss" / "tree_uss": peaks of the summed PSS /
    USS of it and its descendants (sampled every 0.2 s), "workers": per forked encoding worker {"pid", "rss",
    "pss", "uss" at its start, "hwm": its peak RSS}, "wall": seconds of the work (imports excluded),
    "imports_s": seconds of the imports, "encode": :func:`encode_figures` of its output} (RuntimeError on
    failure)."""
    work = SNIPPETS[kind].format(**fmt)
    code = ("import os, resource, time, json, warnings; warnings.simplefilter('ignore'); t0 = time.perf_counter()\n"
            f"{IMPORTS}\nfrom hq_diffusion.bench.convert import proc_memory\n"
            "base = proc_memory(); t = time.perf_counter()\n"
            + (WORKER_HOOK if kind == "convert" else "") + work + "\n"
            "print('HQRESULT', json.dumps({'base': base, "
            "'rss': proc_memory()['hwm'], "
            "'child': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
            "'wall': time.perf_counter() - t, 'imports_s': t - t0}))")
    with tempfile.TemporaryDirectory(prefix="hq-bench-mem-") as tmp:
        log = Path(tmp) / "workers.jsonl"
        env = dict(os.environ, HQ_BENCH_WORKER_LOG=str(log))
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
        sampler = _Sampler(p.pid)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise RuntimeError(f"bench convert: {kind} did not finish in {timeout:.0f} s") from None
        finally:
            sampler.stop()
        starts = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    line = [x for x in out.splitlines() if x.startswith("HQRESULT")]
    if p.returncode != 0 or not line:
        raise RuntimeError(f"bench convert: {kind} failed (exit {p.returncode}): {err.strip()[-800:]}")
    r = json.loads(line[0].split(" ", 1)[1])
    workers = [{**w, "hwm": max(w["hwm"], sampler.hwm.get(w["pid"], 0))} for w in starts]
    return {**r, "tree_pss": sampler.tree_pss, "tree_uss": sampler.tree_uss, "workers": workers,
            "encode": encode_figures(out)}


_ENCODE_LINE = re.compile(r"encoded (\d+) MB of float weights in ([\d.]+) s \(([\d.]+) MB/s, (\d+) workers?\)")


def encode_figures(stdout: str) -> dict | None:
    """{"mb", "s", "mb_s", "workers"} of the encode line ``hq-diffusion quantize`` prints last (the encoding
    alone: no start-up, planning or assembly), None when ``stdout`` has none."""
    m = _ENCODE_LINE.search(stdout)
    if m is None:
        return None
    return {"mb": float(m[1]), "s": float(m[2]), "mb_s": float(m[3]), "workers": int(m[4])}


def bounds(r: dict, qbytes: int, largest: int, workers: int = 1) -> dict:
    """The bounds of issue 11 for one measured run ``r`` (from :func:`measure`), in bytes, base = the run's own
    memory right after its imports:

    - one process (conversion with 1 worker, quantize-on-load, ``quantize()``): peak RSS ≤ base RSS + ``qbytes``
      (the quantized output) + 2 × ``largest`` (the largest float tensor, bytes) + 0.4 GB;
    - ``load_quantized`` (``kind="load"``): peak RSS ≤ base RSS + 1.15 × ``qbytes`` + 0.3 GB;
    - conversion with N > 1 forked workers: the peak over time of the process tree's summed PSS ≤ the parent's
      base PSS + ``qbytes`` + N × (2 × ``largest`` + 0.4 GB): the one-process budget of a layer in flight
      (its float tensor, its encode work space, the 0.4 GB slack of a process) once per worker, which holds one
      layer at a time; the imports are shared with the parent and count once. This is looser than the issue's
      bound, which has no N: that one is also returned (``"issue"``, 2 × ``largest`` + 0.4 GB once).

    Returns {"measured", "bound", "issue"} (``issue``: the literal one-process bound on the same measure)."""
    if workers > 1:
        measured, base = r["tree_pss"], r["base"]["pss"]
        return {"measured": measured, "bound": base + qbytes + workers * (2 * largest + 0.4 * GB),
                "issue": base + qbytes + 2 * largest + 0.4 * GB}
    b = r["base"]["rss"] + qbytes + 2 * largest + 0.4 * GB
    return {"measured": r["rss"], "bound": b, "issue": b}


def load_bound(r: dict, qbytes: int) -> dict:
    """:func:`bounds` of a ``load_quantized`` run: peak RSS ≤ base RSS + 1.15 × ``qbytes`` + 0.3 GB."""
    b = r["base"]["rss"] + 1.15 * qbytes + 0.3 * GB
    return {"measured": r["rss"], "bound": b, "issue": b}


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


ONE_THREAD = "convert, 1 worker, 1 thread"


def speedup_note(runs: dict) -> str:
    """One line: the encode MB/s of the 1-worker and N-worker conversions and their ratio ("" without both), and
    the ratio against the 1-worker, 1-thread conversion where it ran."""
    one = (runs.get("convert, 1 worker") or {}).get("encode")
    many = [r["encode"] for k, r in runs.items() if k.startswith("convert, ") and k.endswith(" workers")
            and r.get("encode")]
    if not one or not many:
        return ""
    n = many[0]
    note = (f"Encode throughput (the encoding alone, from the CLI's last line): 1 worker {one['mb_s']:.1f} MB/s, "
            f"{n['workers']} workers {n['mb_s']:.1f} MB/s: {n['mb_s'] / one['mb_s']:.2f}×.")
    single = (runs.get(ONE_THREAD) or {}).get("encode")
    if single:
        note += (f" 1 worker on one torch thread (as each of the {n['workers']} workers runs) {single['mb_s']:.1f} "
                 f"MB/s: {n['workers']} workers {n['mb_s'] / single['mb_s']:.2f}× that.")
    return note


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="hq-diffusion bench convert", description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=4, help="LTX-2 blocks in the slice (of 48)")
    ap.add_argument("--bps", type=float, default=4.0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N for the parallel conversion")
    ap.add_argument("--skip", default="", help="comma-separated runs to skip: on-load, quantize, workers, 1thread")
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
        runs = {"convert, 1 worker": measure("convert", args.timeout, workers=1, **fmt)}
        qbytes = _dir_bytes(out)
        qblocks = block_bytes(out)
        runs["load_quantized"] = measure("load", args.timeout, **fmt)
        if "workers" not in skip and args.workers > 1:
            runs[f"convert, {args.workers} workers"] = measure("convert", args.timeout, workers=args.workers, **fmt)
        if "1thread" not in skip:
            runs[ONE_THREAD] = measure("convert-1t", args.timeout, workers=1, **fmt)
        if "on-load" not in skip:
            runs["from_pretrained(quantization_config=HQConfig)"] = measure("on-load", args.timeout, **fmt)
        if "quantize" not in skip:
            fmt2 = dict(fmt, out=str(root / "ref"))
            runs["quantize(from_pretrained) + save_quantized"] = measure("quantize", args.timeout, **fmt2)
        print("bench convert: raw", json.dumps({"info": info, "qbytes": qbytes, "runs": runs}), file=sys.stderr,
              flush=True)
        rows, notes = [], []
        for name, r in runs.items():
            n = args.workers if name.startswith("convert") and name.endswith(" workers") else 1
            if name == "load_quantized":
                b = load_bound(r, qbytes)
            elif name.startswith("quantize("):  # the issue: loaded model + one layer (read: + 2 × largest + 0.4 GB)
                b = bounds(r, info["bytes"], info["largest"])
            else:
                b = bounds(r, qbytes, info["largest"], n)
            base = r["base"]["pss" if n > 1 else "rss"]
            ok = "yes" if b["measured"] <= b["bound"] else "**no**"
            if n > 1:
                ok += "; issue's form (no N): " + ("yes" if b["measured"] <= b["issue"] else "**no**")
                notes.append(f"{name}: each worker's own RSS at its start → its peak: " + ", ".join(
                    f"{w['rss'] / GB:.2f} → {w['hwm'] / GB:.2f} GB" for w in r["workers"])
                    + f" (largest child peak from getrusage {r['child'] / GB:.2f} GB).")
            mbs = info["bytes"] / r["wall"] / 1e6 if name.startswith("convert") else None
            enc = r.get("encode")
            rows.append([name, "tree PSS" if n > 1 else "RSS", f"{base / GB:.2f}", f"{b['measured'] / GB:.2f}",
                         f"{r['base']['pss'] / GB:.2f} → {r['tree_pss'] / GB:.2f}", f"{b['bound'] / GB:.2f}", ok,
                         f"{r['wall']:.0f}", "-" if mbs is None else f"{mbs:.1f}",
                         "-" if enc is None else f"{enc['mb_s']:.1f}"])
        nb = info["params"] - args.blocks * info["block_params"]
        full_params = nb + 48 * info["block_params"]
        scale = full_params / info["params"]
        q_full = scale_to_full(qbytes, qblocks, args.blocks)  # the non-block part does not grow with depth
        one = runs["convert, 1 worker"]
        lines = [header(f"LTX-2 slice, {args.blocks} of 48 blocks, {args.bps} bps",
                        f"hq-diffusion bench convert --blocks {args.blocks} --bps {args.bps} "
                        f"--workers {args.workers}"),
                 f"slice: {info['params'] / 1e9:.3f}B parameters ({info['block_params'] / 1e9:.3f}B per block), "
                 f"{info['bytes'] / GB:.2f} GB bf16 → {qbytes / GB:.3f} GB quantized; largest float tensor "
                 f"{info['largest'] / GB:.3f} GB. Base = each run's own memory right after its imports.\n",
                 table(["run", "measure", "base GB", "peak GB", "PSS base → tree peak GB", "bound GB", "within",
                        "wall s", "MB/s (bf16 in)", "encode MB/s"], rows), "", *notes, speedup_note(runs), "",
                 f"Scaled to 48 blocks ({full_params / 1e9:.2f}B parameters, ×{scale:.1f} of this slice): bf16 "
                 f"{info['bytes'] * scale / GB:.1f} GB → about {q_full / GB:.1f} GB quantized; 1-worker conversion "
                 f"bound {(one['base']['rss'] + q_full + 2 * info['largest'] + 0.4 * GB) / GB:.1f} GB; "
                 f"1-worker conversion about {one['wall'] * scale / 60:.0f} min."]
        emit("\n".join(lines), args.out)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
