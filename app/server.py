"""``hq-diffusion app``: serve the Gradio app (bf16 and HyperQuant side by side).

Binds 127.0.0.1 by default, turns Gradio's analytics off and never opens a share link. :func:`start` runs the
server in a background thread and returns a handle (used by the tests and ``hq_diffusion.bench.app_load``).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from .config import TINY_MODELS, AppSettings, is_tiny

__all__ = ["main", "start", "RunningApp", "free_port", "build_parser", "stop_handler"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _gradio_env() -> None:
    # Before gradio is imported: no telemetry or version check, nothing phones home.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


@dataclass
class RunningApp:
    """A server started by :func:`start`; ``url`` ends with ``/``. Call :meth:`close` (or use ``with``)."""

    demo: object
    url: str
    engine: object

    def close(self, timeout: float = 60.0) -> None:
        """Stop accepting requests, cancel the generations in flight (they stop at their next denoising step),
        close the server, wait up to ``timeout`` s for the engine to be idle, then drop the models."""
        try:
            self.engine.shutdown(timeout=0)
            self.demo.close()
        finally:
            if not self.engine.shutdown(timeout=timeout):
                print(f"hq-diffusion app: a generation was still running {timeout:.0f} s after the stop",
                      file=sys.stderr, flush=True)
            self.engine.close()

    def __enter__(self) -> "RunningApp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start(settings: AppSettings, engine=None, *, preload: bool = True, quiet: bool = True) -> RunningApp:
    """Build the app and serve it on ``settings.host:settings.port`` from a background thread.

    Args:
        settings: app settings (``port=0`` picks a free port).
        engine: an :class:`~hq_diffusion.app.engine.Engine` (default: a new one).
        preload: load the default model in a background thread now, so the first click is faster.
        quiet: no start-up banner.
    """
    _gradio_env()
    from .engine import Engine
    from .ui import build_app, launch_options

    engine = engine or Engine(settings)
    demo = build_app(settings, engine)
    port = settings.port or free_port(settings.host)
    if preload:
        threading.Thread(target=_preload, args=(engine,), name="hq-app-preload", daemon=True).start()
    try:
        demo.launch(server_name=settings.host, server_port=port, share=False, prevent_thread_lock=True,
                    inbrowser=False, quiet=quiet, show_error=False, ssr_mode=False, pwa=False, mcp_server=False,
                    enable_monitoring=False, footer_links=["api", "settings"],
                    allowed_paths=[engine.workdir], **launch_options())
    except BaseException:
        engine.close()
        raise
    return RunningApp(demo=demo, url=f"http://{_url_host(settings.host)}:{port}/", engine=engine)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _preload(engine) -> None:
    try:
        engine.preload()
    except Exception as e:  # noqa: BLE001 - the first request reports the same error to the user
        print(f"hq-diffusion app: could not preload {engine.settings.default_model}: {e}", file=sys.stderr)


def stop_handler(engine, stop: threading.Event) -> Callable:
    """The SIGTERM handler of ``hq-diffusion app``: ``stop`` is set (the main loop then closes the server) and
    the engine refuses new runs and cancels the one in flight at its next denoising step, so the process ends
    cleanly instead of tearing down a thread that is still inside the model."""

    def handler(signum, frame) -> None:
        stop.set()
        engine.shutdown(timeout=0)

    return handler


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hq-diffusion app",
                                description="Gradio app: bf16 and HyperQuant-quantized generations side by side.")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; anything else exposes the app to your network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    p.add_argument("--model", action="append", metavar="MODEL",
                   help="model to offer, repeatable, the first is the default: "
                        f"{', '.join(TINY_MODELS)} (embedded) or a local diffusers pipeline directory "
                        "(LTXPipeline, LTX2Pipeline, PixArtSigmaPipeline, FluxPipeline): a float one, quantized "
                        "by the app with the settings of each request, or one saved quantized by hq-diffusion, "
                        "served as stored (its bps and lattice are fixed) beside its float reference. "
                        "Default: all tiny models, tiny-ltx-trained first")
    p.add_argument("--reference", metavar="KEY|FLOAT_DIR|none",
                   help="float reference of a --model saved quantized: a tiny model key or a float pipeline "
                        "directory of the same class, or none (the quantized output alone, no PSNR/SSIM). "
                        "Default: the origin the directory records, else none")
    p.add_argument("--max-concurrency", type=int, default=2,
                   help="generations in flight at once (default 2; the model itself runs one at a time)")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait (default 16)")
    p.add_argument("--device", help="device for local checkpoints (default: cuda when available, else cpu)")
    p.add_argument("--fps", type=float, help="playback frame rate (default: 8 for tiny models, else the "
                                             "pipeline's frame rate)")
    p.add_argument("--lpips-weights", metavar="PATH",
                   help="full LPIPS state dict (default: the torchvision AlexNet backbone in the torch hub cache, "
                        "when present; otherwise LPIPS is reported as unavailable)")
    return p


def _settings_from_args(args) -> AppSettings:
    models = tuple(args.model) if args.model else AppSettings.models
    if args.model and all(not is_tiny(m) for m in models):
        models = models + tuple(TINY_MODELS)  # the tiny ones stay available next to a checkpoint
    return AppSettings(host=args.host, port=args.port, models=models, max_concurrency=args.max_concurrency,
                       queue_size=args.queue_size, device=args.device, fps=args.fps, reference=args.reference)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings_from_args(args)
    except ValueError as e:
        print(f"hq-diffusion app: error: {e}", file=sys.stderr)
        return 2
    _gradio_env()
    from .engine import Engine

    lpips = None
    if args.lpips_weights:
        from hq_diffusion.eval.metrics import LPIPSMetric

        lpips = LPIPSMetric(weights_path=args.lpips_weights)
        if not lpips.available:
            print(f"hq-diffusion app: warning: LPIPS unavailable: {lpips.reason}", file=sys.stderr)
    engine = Engine(settings, lpips=lpips)
    try:
        for m in settings.models:
            engine.kind(m)  # a bad checkpoint directory fails here, with its reason
    except ValueError as e:
        engine.close()
        print(f"hq-diffusion app: error: {e}", file=sys.stderr)
        return 2
    from hq_diffusion.eval.files import quiet_library_logs

    quiet_library_logs()
    if not settings.is_loopback:
        print(f"hq-diffusion app: warning: binding {settings.host}: the app is reachable from other machines",
              file=sys.stderr)
    stop = threading.Event()
    # SIGTERM stops the app like Ctrl+C (SIGINT raises KeyboardInterrupt as usual); both end in app.close(),
    # which cancels the generation in flight and waits for it before the process exits
    signal.signal(signal.SIGTERM, stop_handler(engine, stop))
    app = start(settings, engine, quiet=True)
    print(f"hq-diffusion app: serving on {app.url} (Ctrl+C to stop)", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown(timeout=0)  # Ctrl+C too: cancel what is in flight
        n = engine.inflight
        print("hq-diffusion app: stopping" + (f"; cancelling {n} generation(s) in flight at the next denoising "
                                              "step" if n else ""), file=sys.stderr, flush=True)
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
