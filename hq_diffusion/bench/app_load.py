"""Load check of the Gradio app: concurrent ``/generate`` calls while a trivial request measures responsiveness.

Starts ``hq-diffusion app`` as a subprocess on 127.0.0.1 (a free port), makes one warm-up call (model load and
the first quantization), then fires ``--requests`` concurrent ``/generate`` calls through ``gradio_client``
(identical inputs in pairs) while a probe thread times the ``/limits`` API endpoint and a plain page load.
Checks that every call completes with correct results: identical bf16 and quantized outputs (SHA-256 of the
frames) for identical inputs, the bf16 output equal to an independent in-process generation, finite metrics.
Prints a markdown table and stops the server. Everything is bounded (request count, per-call timeout, probe
count, server start and stop timeouts).

    hq-diffusion bench app-load [--requests 8] [--concurrency 2]

With ``--soak``: ``--soak-sequential`` (200) requests one after another, then ``--soak-rounds`` (3) rounds of
``--soak-concurrent`` (16) concurrent requests, every fourth one invalid (a lone surrogate, an int prompt,
missing arguments, an over-budget request, a bad frame count). Checks that every valid request is correct
(as above), every invalid one gets its specific message, and the server's resident memory stays flat: RSS at
the end <= RSS after the first 16 requests + 10%.

    hq-diffusion bench app-load --soak [--soak-sequential 200] [--soak-rounds 3] [--soak-concurrent 16]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

__all__ = ["main"]

_PROMPTS = (
    "a red robot walking in the city at night",
    "a small boat on the ocean at sunset",
    "a white horse running on the beach",
    "a dark forest in the rain",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hq-diffusion bench app-load", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=8, help="concurrent /generate calls (1..32, default 8)")
    p.add_argument("--concurrency", type=int, default=2, help="the server's --max-concurrency (default 2)")
    p.add_argument("--model", default="tiny-ltx", help="model key (default tiny-ltx)")
    p.add_argument("--size", type=int, default=64, help="height = width in px (default 64)")
    p.add_argument("--frames", type=int, default=9, help="frames (default 9)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4, as in the app)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for the whole load (default 600)")
    p.add_argument("--probe-interval", type=float, default=0.25, help="seconds between probes (default 0.25)")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--soak", action="store_true", help="the soak run instead of the load check (see above)")
    p.add_argument("--soak-sequential", type=int, default=200, help="sequential soak requests (default 200)")
    p.add_argument("--soak-rounds", type=int, default=3, help="rounds of concurrent soak requests (default 3)")
    p.add_argument("--soak-concurrent", type=int, default=16, help="requests per concurrent round (default 16)")
    return p


def _free_port() -> int:
    from hq_diffusion.app.server import free_port

    return free_port("127.0.0.1")


def _get(url: str, timeout: float = 10.0) -> float:
    """Seconds to GET ``url`` completely (raises on an HTTP error)."""
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback URL built here
        r.read()
    return time.perf_counter() - t


def _start_server(args, port: int, log) -> subprocess.Popen:
    """The app as a subprocess; its stdout and stderr go to the file ``log`` (a pipe that nobody reads while
    the load runs could fill up and block the server)."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "hq_diffusion.app.server", "--host", "127.0.0.1", "--port", str(port),
           "--model", args.model, "--max-concurrency", str(args.concurrency),
           "--queue-size", str(max(16, args.requests + 4, args.soak_concurrent + 4))]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def _read_log(log) -> str:
    log.seek(0)
    return log.read().decode("utf-8", "replace")


def _wait_ready(proc: subprocess.Popen, log, url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = _read_log(log)
            raise RuntimeError(f"the app exited with {proc.returncode} before serving:\n{out[-3000:]}")
        try:
            _get(url, timeout=2.0)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the app did not answer on {url} within {timeout:.0f} s")


def _stop_server(proc: subprocess.Popen, log) -> str:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: the app closes the server and its engine
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return _read_log(log)


@contextlib.contextmanager
def _server(args):
    """``(process, url)`` of the app started as a subprocess on a free loopback port and ready to serve;
    stopped with SIGTERM on exit (its log printed when it did not exit cleanly)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    server_log = tempfile.TemporaryFile()
    proc = _start_server(args, port, server_log)
    try:
        _wait_ready(proc, server_log, url)
        yield proc, url
    finally:
        log = _stop_server(proc, server_log)
        server_log.close()
        if proc.returncode != 0 and log:
            print(f"app_load: server log (exit {proc.returncode}):\n{log[-3000:]}", file=sys.stderr)


def _server_line(args) -> str:
    return (f"Server: `hq-diffusion app --model {args.model} --max-concurrency {args.concurrency}` on 127.0.0.1 "
            f"(subprocess)")


def _request(args, i: int) -> dict:
    return dict(model=args.model, prompt=_PROMPTS[(i // 2) % len(_PROMPTS)], negative_prompt="",
                seed=(i // 2), frames=args.frames, height=args.size, width=args.size, steps=args.steps,
                bps=4.0, lattice="e8", mma="auto", kv_enabled=False, kv_bps=4.0, kv_correction="haar+dither")


def _finite_metric(v) -> bool:
    return v == "inf" or (isinstance(v, (int, float)) and math.isfinite(v))


def _check(results: list[dict], requests: list[dict]) -> list[str]:
    """Problems with the results (empty when all is well)."""
    problems = []
    by_input: dict[tuple, list[dict]] = {}
    for req, res in zip(requests, results):
        m = res["metrics"]
        if not all(os.path.isfile(p) and os.path.getsize(p) > 0 for p in res["videos"]):
            problems.append(f"request {req['prompt']!r}/{req['seed']}: a video file is missing or empty")
        psnr, ssim = m["per_frame"]["psnr"], m["per_frame"]["ssim"]
        if len(psnr) != m["output"]["frames"] or not all(_finite_metric(v) for v in psnr):
            problems.append(f"non-finite or missing PSNR: {psnr}")
        if not all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in ssim):
            problems.append(f"SSIM out of range: {ssim}")
        w = m["compression"]["weights"]
        if not (w["ratio"] and w["ratio"] > 1 and abs(w["bits_per_weight"] - 4.0) < 0.25):
            problems.append(f"unexpected compression numbers: {w}")
        by_input.setdefault((req["prompt"], req["seed"]), []).append(m["digests"])
    for key, digests in by_input.items():
        if len({d["bf16_sha256"] for d in digests}) != 1:
            problems.append(f"identical inputs {key} gave different bf16 outputs")
        if len({d["quantized_sha256"] for d in digests}) != 1:
            problems.append(f"identical inputs {key} gave different quantized outputs")
    return problems


def _reference_digest(args, req: dict) -> str:
    """bf16 output digest of ``req`` generated here, independently of the server."""
    import torch

    from hq_diffusion.app.config import AppSettings
    from hq_diffusion.app.engine import frames_digest, to_uint8
    from hq_diffusion.integrations import families
    from hq_diffusion.models import generate, tiny_pipeline

    family = families.by_alias(args.model)
    kind = family.key
    pipe = tiny_pipeline(kind, seed=AppSettings.tiny_seed, dtype=torch.bfloat16)
    kw = dict(num_inference_steps=req["steps"], height=req["height"], width=req["width"])
    if family.video:
        kw["num_frames"] = req["frames"]
    out = generate(pipe, kind, req["prompt"], req["seed"], **kw)
    return frames_digest(to_uint8(out["frames"] if isinstance(out, dict) else out))


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not 1 <= args.requests <= 32:
        print("app_load: --requests must be in 1..32", file=sys.stderr)
        return 2
    from hq_diffusion.integrations import families

    if args.model not in families.tiny_aliases():
        print(f"app_load: only the tiny models ({', '.join(families.tiny_aliases())}) are supported here",
              file=sys.stderr)
        return 2
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    if args.soak:
        return _soak(args, argv)
    from gradio_client import Client

    from ._common import emit, header, table

    t0 = time.perf_counter()
    with _server(args) as (proc, url):
        start_s = time.perf_counter() - t0
        client = Client(url, verbose=False)
        requests = [_request(args, i) for i in range(args.requests)]

        t0 = time.perf_counter()
        warm = client.predict(**{**requests[0], "seed": 10_000}, api_name="/generate")
        warm_s = time.perf_counter() - t0
        warm_timings = warm[-1]["timings"]

        # the probe: a trivial API call and a page load, timed while the load runs
        probes: dict[str, list[float]] = {"limits": [], "page": []}
        stop = threading.Event()
        probe_client = Client(url, verbose=False)

        def probe_once(into: dict[str, list[float]]) -> None:
            t = time.perf_counter()
            probe_client.predict(api_name="/limits")
            into["limits"].append(time.perf_counter() - t)
            into["page"].append(_get(url))

        def probe():
            for _ in range(int(args.timeout / max(args.probe_interval, 0.05))):
                probe_once(probes)
                if stop.wait(args.probe_interval):
                    return

        idle: dict[str, list[float]] = {"limits": [], "page": []}
        for _ in range(5):  # the same probes on the idle server, for comparison
            probe_once(idle)
        prober = threading.Thread(target=probe, name="app-load-probe", daemon=True)
        latencies: list[float] = [0.0] * len(requests)
        results: list[dict | None] = [None] * len(requests)

        def one(i: int):
            t = time.perf_counter()
            out = client.predict(**requests[i], api_name="/generate")
            latencies[i] = time.perf_counter() - t
            bf16, quant, err = out[0], out[1], out[2]
            results[i] = {"videos": [bf16, quant, err], "metrics": out[-1]}

        t_load = time.perf_counter()
        prober.start()
        with cf.ThreadPoolExecutor(max_workers=len(requests)) as pool:
            futures = [pool.submit(one, i) for i in range(len(requests))]
            done, pending = cf.wait(futures, timeout=args.timeout)
        wall = time.perf_counter() - t_load
        stop.set()
        prober.join(timeout=30)
        errors = [f.exception() for f in done if f.exception() is not None]
        if pending or errors:
            print(f"app_load: FAILED: {len(pending)} request(s) did not finish within {args.timeout:.0f} s, "
                  f"{len(errors)} failed: {errors[:3]}", file=sys.stderr)
            return 1
        problems = _check(results, requests)
        ref = _reference_digest(args, requests[0])
        if ref != results[0]["metrics"]["digests"]["bf16_sha256"]:
            problems.append("the server's bf16 output differs from an independent generation of the same request")
        if problems:
            print("app_load: FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1

        timings = [r["metrics"]["timings"] for r in results]
        uncached = [t["bf16_seconds"] for t in timings if not t["bf16_cached"]]
        n = len(requests)
        cmd = "hq-diffusion bench app-load " + " ".join(argv if argv is not None else sys.argv[1:])
        rows = [
            ["/generate, concurrent", n, f"{statistics.median(latencies):.2f} s", f"{max(latencies):.2f} s",
             f"{n / wall:.2f} req/s ({wall:.1f} s wall)"],
        ]
        for name, label in (("limits", "/limits API call"), ("page", "page load (GET /)")):
            for when, values in (("idle", idle[name]), ("during the load", probes[name])):
                rows.append([f"{label}, {when}", len(values), f"{statistics.median(values) * 1e3:.0f} ms",
                             f"{max(values) * 1e3:.0f} ms", ""])
        text = "\n".join([
            header("Gradio app under load", cmd.strip()),
            f"{_server_line(args)}; requests: {args.frames} frames of {args.size}x{args.size} px, {args.steps} steps, "
            f"4 bits/weight E8, {n} concurrent calls ({n // 2 or 1} distinct inputs, each sent twice).",
            "",
            table(["request", "count", "p50 latency", "max latency", "throughput"], rows),
            "",
            f"Server ready after {start_s:.1f} s; warm-up call (model load + first quantization) {warm_s:.1f} s "
            f"(quantization {warm_timings['quantize_seconds']:.2f} s). Under load: bf16 results from the cache "
            f"{sum(t['bf16_cached'] for t in timings)}/{n}, quantized pipeline from the cache "
            f"{sum(t['quantized_pipeline_cached'] for t in timings)}/{n}; median model time per call: bf16 "
            f"{statistics.median(uncached) if uncached else float('nan'):.2f} s (uncached), quantized "
            f"{statistics.median(t['quantized_seconds'] for t in timings):.2f} s; p90 "
            f"/limits latency {_pct(probes['limits'], 0.9) * 1e3:.0f} ms.",
            "",
            f"Checks passed: {n}/{n} completed; identical inputs gave identical bf16 and quantized frames "
            f"(SHA-256); the bf16 frames equal an independent in-process generation; all PSNR/SSIM finite; "
            f"compression ratio and bits/weight as configured.",
        ])
        emit(text, args.out)
        return 0



# ---- the soak run ------------------------------------------------------------------------------------------

#: Invalid requests of the soak: (what is wrong, the request's overrides or positional arguments, the text
#: its error message must contain).
_INVALID = (
    ("lone surrogate", {"prompt": "a cat \ud800"}, "not valid text"),
    ("int prompt", {"prompt": 12}, "The prompt must be text; got int"),
    ("missing arguments", ("tiny-ltx", "a cat"), "takes 14 arguments"),
    ("over budget", {"frames": 33, "height": 512, "width": 512, "steps": 50}, "frame-pixel-steps"),
    ("bad frame count", {"frames": 8}, "Frames must be of the form 4k+1"),
)


def _rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def raw_generate(url: str, data: list, timeout: float = 120.0) -> str:
    """Call /generate over plain HTTP with the positional ``data`` (JSON-encoded with ASCII escapes, so a lone
    surrogate travels as ``\\ud800`` as any client may send it; gradio_client cannot). Returns the event
    stream's text (``event: complete`` or ``event: error`` and its data)."""
    import json

    r = urllib.request.Request(url + "gradio_api/call/generate", data=json.dumps({"data": data}).encode(),
                               headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=30) as fh:  # noqa: S310 - loopback URL built here
        event = json.load(fh)["event_id"]
    with urllib.request.urlopen(url + f"gradio_api/call/generate/{event}", timeout=timeout) as fh:  # noqa: S310
        return fh.read().decode("utf-8", "replace")


def _soak_one(client, url: str, args, i: int) -> dict:
    """Request ``i`` of the soak: every fourth one invalid (sent over plain HTTP). Returns what happened."""
    t = time.perf_counter()
    if i % 4 == 3:
        what, over, needle = _INVALID[(i // 4) % len(_INVALID)]
        data = list(over) if isinstance(over, tuple) else list({**_request(args, i), **over}.values())
        out = raw_generate(url, data)
        ok = "event: error" in out and needle in out and "Traceback" not in out
        return {"valid": False, "ok": ok, "problem": None if ok else f"{what}: unclear answer {out[:300]!r}",
                "seconds": time.perf_counter() - t}
    req = _request(args, i % 8)  # 4 distinct inputs, each sent many times
    out = client.predict(**req, api_name="/generate")
    res = {"videos": list(out[:3]), "metrics": out[-1]}
    return {"valid": True, "req": req, "res": res, "seconds": time.perf_counter() - t}


def _soak(args, argv) -> int:
    from gradio_client import Client

    from ._common import emit, header, table

    if args.model not in ("tiny-ltx",):
        print("app_load: --soak runs tiny-ltx (its invalid requests name tiny-ltx)", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.timeout
    with _server(args) as (proc, url):
        client = Client(url, verbose=False)
        outcomes: list[dict] = []
        phases = []
        rss_base = None
        t0 = time.perf_counter()
        for i in range(args.soak_sequential):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the soak did not finish within {args.timeout:.0f} s")
            outcomes.append(_soak_one(client, url, args, i))
            if i + 1 == min(16, args.soak_sequential):
                rss_base = _rss_bytes(proc.pid)
        phases.append(["sequential", args.soak_sequential, time.perf_counter() - t0, _rss_bytes(proc.pid)])
        clients = [Client(url, verbose=False) for _ in range(args.soak_concurrent)]
        for r in range(args.soak_rounds):
            t0 = time.perf_counter()
            base = args.soak_sequential + r * args.soak_concurrent
            with cf.ThreadPoolExecutor(max_workers=args.soak_concurrent) as pool:
                futures = [pool.submit(_soak_one, clients[j], url, args, base + j)
                           for j in range(args.soak_concurrent)]
                done, pending = cf.wait(futures, timeout=max(1.0, deadline - time.monotonic()))
            if pending:
                raise TimeoutError(f"round {r + 1}: {len(pending)} request(s) did not finish in time")
            outcomes += [f.result() for f in futures]
            phases.append([f"concurrent round {r + 1}", args.soak_concurrent, time.perf_counter() - t0,
                           _rss_bytes(proc.pid)])
        if rss_base is None:
            rss_base = phases[0][3]
        valid = [o for o in outcomes if o["valid"]]
        invalid = [o for o in outcomes if not o["valid"]]
        problems = [o["problem"] for o in invalid if not o["ok"]]
        check = _check([o["res"] for o in valid], [o["req"] for o in valid])
        problems += check
        rss_end = phases[-1][3]
        if rss_end > 1.10 * rss_base:
            problems.append(f"RSS grew from {rss_base / 2**20:.0f} MiB (after the first 16 requests) to "
                            f"{rss_end / 2**20:.0f} MiB (more than 10%)")
        cmd = "hq-diffusion bench app-load " + " ".join(argv if argv is not None else sys.argv[1:])
        rows = [[name, n, f"{sec:.1f} s", f"{rss / 2**20:.0f} MiB"] for name, n, sec, rss in phases]
        lat = [o["seconds"] for o in valid]
        text = "\n".join([
            header("Gradio app soak", cmd.strip()),
            f"{_server_line(args)}; valid requests: {args.frames} frames of {args.size}x{args.size} px, "
            f"{args.steps} steps, 4 distinct inputs; every fourth request invalid "
            f"({', '.join(w for w, _, _ in _INVALID)}).",
            "",
            table(["phase", "requests", "wall", "server RSS after"], rows),
            "",
            f"RSS after the first {min(16, args.soak_sequential)} requests {rss_base / 2**20:.0f} MiB, at the end "
            f"{rss_end / 2**20:.0f} MiB ({(rss_end / rss_base - 1) * 100:+.1f}%; limit +10%). Valid requests: "
            f"{len(valid)}, {len(valid) if not check else 'not all'} correct ({len(check)} problem(s) found; p50 "
            f"latency {statistics.median(lat) if lat else float('nan'):.2f} s); invalid "
            f"requests with their specific message: {sum(o['ok'] for o in invalid)}/{len(invalid)}.",
        ])
        emit(text, args.out)
        if problems:
            print("app_load: soak FAILED:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
