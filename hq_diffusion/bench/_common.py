"""Shared helpers of the benchmarks: machine description, markdown tables, output files."""
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


def emit(text: str, out: str | None) -> None:
    print(text)
    if out:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, out)
