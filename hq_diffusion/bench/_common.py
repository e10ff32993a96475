"""Shared helpers of the benchmarks: machine description, markdown tables, heavy-tailed weights, output files."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__}"


def header(title: str, command: str) -> str:
    today = datetime.date.today().isoformat()
    return f"### {title}\n\n`{command}` — {machine()}, {today}\n"


def table(cols: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def median_time(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def student_t_columns(rows: int, cols: int, nu: int, col_scale: float, g: torch.Generator) -> torch.Tensor:
    """Student-t (ν = ``nu``) entries as z / sqrt(χ²_ν / ν), with 1% of the columns (at least one) scaled
    by ``col_scale``. float32 (rows, cols), drawn from ``g``."""
    z = torch.randn(rows, cols, generator=g)
    chi2 = torch.randn(nu, rows, cols, generator=g).square().sum(0)
    t = z / (chi2 / nu).sqrt()
    t[:, torch.randperm(cols, generator=g)[: max(1, cols // 100)]] *= col_scale
    return t


def emit(text: str, out: str | None) -> None:
    """Print ``text`` and, with ``out``, also write it there (atomically, UTF-8)."""
    print(text)
    if out:
        from hq_diffusion.eval.report import write_bytes_atomic

        write_bytes_atomic(out, (text + "\n").encode("utf-8"))
