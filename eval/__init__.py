"""Evaluation of quantized pipelines (``hq-diffusion eval``):

- ``metrics``: per-frame PSNR / SSIM / LPIPS / flicker, audio SNR;
- ``report``: npz / mp4 / JSON / CSV / HTML writers;
- ``files``: frame and file helpers shared with the app and the benchmarks (``to_uint8``, the prompt suite,
  JSON / npz helpers, library log levels, memory release) and ``EvalInputError``;
- ``config``: ``EvalConfig``, ``build_config`` and the model families the evaluator knows;
- ``cache``: run record, reference cache, item status and file layout (resume);
- ``runner``: ``run_eval`` (generation, metrics);
- ``merge``: report assembly from the items on disk;
- ``cli``: the argument parser and ``main``;
- ``plots``, ``page``, ``table``: the report figures, page blocks and the printed summary table;
- ``sweep``, ``peers``: the rate-quality sweep over schemes (``--schemes``) and the RTN int4 g128 peer.

Submodules load on first access, so importing ``hq_diffusion.eval`` costs nothing.
"""

import importlib

__all__ = ["metrics", "report", "files", "config", "cache", "runner", "merge", "cli", "plots", "page", "table",
           "sweep", "peers"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
