"""Mutation audit: apply small semantic bugs one at a time to a scratch copy and check the tests catch them.

    .venv/bin/python scripts/mutation.py              # every mutation (``make mutation``)
    .venv/bin/python scripts/mutation.py -k kv -k rate  # those whose name contains "kv" or "rate"
    .venv/bin/python scripts/mutation.py --list

Each mutation names a file, an exact snippet of its source (found by text, not by line number, so the list
survives refactors) and its replacement, and the tests to run.  The repository's tracked and untracked
(not ignored) files are copied to a temporary directory; the copy is imported (``PYTHONPATH`` points at it,
and links ``hq_diffusion/{kernels,eval,app,assets}`` reproduce the package mapping of ``pyproject.toml``), and
the import location is checked before anything runs.  Per mutation:

- ``caught``: the tests fail with the mutation applied (they pass on the unmutated copy: checked first);
- ``survived``: the tests still pass — a hole in the suite;
- ``stale``: the snippet is not found exactly once (the code moved or changed): update the list;
- ``timeout`` / ``error``: the tests ran past ``--timeout`` or did not run (not scored).

The score is caught / (caught + survived).  Exit status: 0 when nothing survived and nothing is stale.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    kind: str  # rate, kv, validation, resume, format, kernels, memory
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]  # pytest arguments (files, node ids, -k expressions)


REG = "tests/test_regressions.py"
GOLD = "tests/test_golden.py"

MUTATIONS = [
    # --- the six of issue 15
    Mutation("rate: side information dropped from the budget", "rate", "hq_diffusion/codec/core.py",
             "_num_blocks(sn, block) * 5 for sn in lens", "_num_blocks(sn, block) for sn in lens",
             (REG, "tests/test_codec.py")),
    Mutation("kv: dither not subtracted after dequantization", "kv", "hq_diffusion/nn/kv.py",
             "            p = p - delta\n", "            p = p\n", (REG, "tests/test_kv.py")),
    Mutation("kv: side bits reported as 0", "kv", "hq_diffusion/nn/kv.py",
             "side_bits=blocks * SIDE_BITS_PER_BLOCK", "side_bits=0", (REG, "tests/test_kv.py")),
    Mutation("kernels: reference used silently under the interpreter", "kernels", "kernels/dispatch.py",
             "if triton_installed() and (on_cuda or interpreter_usable()):", "if triton_installed() and on_cuda:",
             ("tests/test_kernels.py",)),
    Mutation("kernels: torch reference used silently when Triton is requested", "kernels", "kernels/dispatch.py",
             '    if mode == "torch":\n        return "torch"', '    if mode in ("torch", "triton"):\n        return "torch"',
             ("tests/test_kernels.py",)),
    Mutation("validation: frames 4k+1 -> 2k+1", "validation", "hq_diffusion/integrations/genrules.py",
             "(frames - 1) % FRAMES_STEP == 0", "(frames - 1) % 2 == 0", (REG, "tests/test_app.py")),
    Mutation("resume: metrics from other LPIPS weights counted as done", "resume", "eval/cache.py",
             '(m.get("lpips") or {}).get("source") == lpips_source and ', "",
             (REG, "tests/test_eval_runner.py::test_interrupted_run_resumes_without_regenerating")),
    # --- new ones of the same kinds
    Mutation("rate: row scales dropped from the fixed bits", "rate", "hq_diffusion/codec/core.py",
             "header_bytes(len(shape), len(lens)) + scale_bytes", "header_bytes(len(shape), len(lens))",
             (REG, GOLD)),
    Mutation("rate: sampled-α safety margin dropped", "rate", "hq_diffusion/codec/core.py",
             "target = rate - (0.004 if sampled else 0.0)", "target = rate",
             (REG, GOLD, "tests/test_exact_rate.py::test_too_small_sampled_tensor_keeps_its_payload_under_the_rate")),
    Mutation("kv: side information left out of the payload budget", "kv", "hq_diffusion/nn/kv.py",
             "* d / dp - SIDE_BITS_PER_BLOCK / cfg.block", "* d / dp", (REG,)),
    Mutation("kv: norm bits counted as 8 per vector", "kv", "hq_diffusion/nn/kv.py",
             "norm_bits=nvec * NORM_BITS", "norm_bits=nvec * 8", (REG, "tests/test_kv.py")),
    Mutation("kv: dither α correction dropped", "kv", "hq_diffusion/nn/kv.py",
             "alpha = math.sqrt(max(alpha * alpha - info.voronoi_mse / info.dim, 0.25 * alpha * alpha))",
             "alpha = alpha", (REG, "tests/test_kv.py")),
    Mutation("validation: frames upper limit off by one", "validation", "hq_diffusion/integrations/genrules.py",
             "frames <= frames_max):", "frames <= frames_max + 4):", (REG, "tests/test_app.py")),
    Mutation("validation: codec bps lower bound 1.25 -> 1.0", "validation", "hq_diffusion/codec/configdict.py",
             "BPS_RANGE = (1.25, 16.0)", "BPS_RANGE = (1.0, 16.0)",
             (REG, "tests/test_codec.py")),
    Mutation("resume: seed not compared", "resume", "eval/cache.py",
             ' and m.get("seed") == it.seed)', ")",
             (REG, "tests/test_eval_runner.py::test_interrupted_run_resumes_without_regenerating")),
    Mutation("resume: missing video still counted as done", "resume", "eval/cache.py",
             ' and os.path.isfile(os.path.join(d, "video.mp4")):', ":",
             (REG, "tests/test_eval_runner.py::test_interrupted_run_resumes_without_regenerating")),
    Mutation("format: hash multiplier changed everywhere", "format", "hq_diffusion/codec/hashing.py",
             "_M1 = 0x7FEB352D", "_M1 = 0x7FEB352B", (GOLD, "tests/test_codec_hashing_rht.py")),
    Mutation("format: stored α rounded to float16", "format", "hq_diffusion/codec/core.py",
             "return float(torch.tensor(a, dtype=torch.float32))",
             "return float(torch.tensor(a, dtype=torch.float16))", (GOLD, "tests/test_codec.py")),
    Mutation("resume: conversion workers keep the CLI's SIGTERM handler", "resume", "hq_diffusion/integrations/convert.py",
             "signal.signal(signal.SIGTERM, signal.SIG_DFL)", "pass",
             ("tests/test_convert.py::test_pool_workers_die_on_sigterm_and_leave_ctrl_c_to_the_parent",)),
    Mutation("memory: conversion trims after every layer, small ones too", "memory", "hq_diffusion/integrations/memory.py",
             "if nbytes >= TRIM_MIN_BYTES else False", "if nbytes >= 0 else False",
             ("tests/test_on_load_memory.py::test_release_after_layer_trims_only_after_large_layers",)),
    Mutation("kv: compiled forward skips the dither clock's tick", "kv", "hq_diffusion/integrations/kv_processors.py",
             "                torch.ops.hq_diffusion.kv_clock(self.token, t, None, self.op_handle)\n",
             "                pass\n", ("tests/test_compile_kv.py",)),
    Mutation("kv: compiled processor calls not counted", "kv", "hq_diffusion/integrations/kv_processors.py",
             "    if counts_call:\n        p.stats.calls += 1\n", "    if counts_call:\n        pass\n",
             ("tests/test_compile_kv.py",)),
    Mutation("compile: layers traced per operation (their metadata constants of the graph)", "kernels",
             "hq_diffusion/nn/linear.py", "    return compiled_layer(x, m._hq_handle, m.out_features)\n",
             "    return _apply(m, x, m.resolved_mma(x.device), OP_SETS[m.backend])\n",
             ("tests/test_compile.py",)),
]


def _files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                         capture_output=True).stdout.decode()
    return [p for p in out.split("\0") if p]


def make_copy(dest: Path) -> None:
    """Tracked and untracked (not ignored) files of the repository, plus the package links."""
    for rel in _files(ROOT):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for name in ("kernels", "eval", "app", "assets"):  # the package-dir mapping of pyproject.toml
        link = dest / "hq_diffusion" / name
        if not link.exists():
            link.symlink_to(Path("..") / name, target_is_directory=True)


def _env(copy: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def check_imports(copy: Path) -> None:
    code = ("import hq_diffusion, hq_diffusion.codec.core, hq_diffusion.eval.cache, hq_diffusion.app.config, "
            "hq_diffusion.kernels.dispatch as d, hq_diffusion.nn.kv as k\n"
            "print('\\n'.join(m.__file__ for m in (hq_diffusion.codec.core, hq_diffusion.eval.cache, "
            "hq_diffusion.app.config, d, k)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the scratch copy does not import:\n{out.stderr[-2000:]}")
    bad = [f for f in out.stdout.split() if not Path(f).resolve().is_relative_to(copy.resolve())]
    if bad:
        raise SystemExit(f"the scratch copy is not what is imported: {bad}")


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float]:
    """``"pass"``, ``"fail"``, ``"timeout"`` or ``"error"`` (nothing collected) and the seconds taken."""
    t0 = time.time()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        r = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0
    verdict = {0: "pass", 1: "fail"}.get(r.returncode, "error")
    if verdict == "error":
        print(r.stdout[-1500:], r.stderr[-1500:], sep="\n", file=sys.stderr)
    return verdict, time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", action="append", default=[], help="run only mutations whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per test run (default 600)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test set")
    args = ap.parse_args(argv)
    muts = [m for m in MUTATIONS if not args.k or any(k.lower() in m.name.lower() for k in args.k)]
    if args.list:
        for m in muts:
            print(f"[{m.kind}] {m.name}: {m.file} -> {' '.join(m.tests)}")
        return 0
    results: list[tuple[Mutation, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="hq-mutation-") as tmp:
        copy = Path(tmp)
        make_copy(copy)
        check_imports(copy)
        if not args.no_baseline:
            for tests in dict.fromkeys(m.tests for m in muts):
                verdict, secs = run_tests(copy, tests, args.timeout)
                print(f"baseline {' '.join(tests)}: {verdict} ({secs:.0f} s)", flush=True)
                if verdict != "pass":
                    raise SystemExit(f"the unmutated tests do not pass ({verdict}): {' '.join(tests)}")
        for m in muts:
            path = copy / m.file
            text = path.read_text() if path.is_file() else ""
            if text.count(m.find) != 1:
                results.append((m, "stale", 0.0))
                print(f"STALE     {m.name} ({m.file}: snippet found {text.count(m.find)} times)", flush=True)
                continue
            path.write_text(text.replace(m.find, m.replace))
            try:
                verdict, secs = run_tests(copy, m.tests, args.timeout)
            finally:
                path.write_text(text)
            state = {"pass": "survived", "fail": "caught"}.get(verdict, verdict)  # timeout/error: not scored
            results.append((m, state, secs))
            print(f"{state.upper():9} {m.name} ({verdict}, {secs:.0f} s)", flush=True)
    caught = sum(s == "caught" for _, s, _ in results)
    survived = [m.name for m, s, _ in results if s == "survived"]
    stale = [m.name for m, s, _ in results if s == "stale"]
    unscored = [f"{m.name} ({s})" for m, s, _ in results if s in ("timeout", "error")]
    scored = caught + len(survived)
    print(f"\nmutation score: {caught}/{scored} caught" + (f" ({100 * caught / scored:.0f}%)" if scored else ""))
    if survived:
        print("survived: " + "; ".join(survived))
    if stale:
        print("stale (update scripts/mutation.py): " + "; ".join(stale))
    if unscored:
        print("not scored (the tests timed out or did not run): " + "; ".join(unscored))
    return 0 if not survived and not stale and not unscored else 1


if __name__ == "__main__":
    sys.exit(main())
