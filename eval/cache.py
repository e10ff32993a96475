"""Cache and resume state of an evaluation run: the run record (run.json), the reference cache, the status of
each (prompt, seed, bps) item and the file layout.

Output directory layout (``--out DIR``)
---------------------------------------
::

    DIR/run.json                          configuration of the run (item set + what the outputs depend on)
    DIR/ref/p0003-s0.npz                  cached reference output of prompt 3, seed 0: ``frames`` uint8
                                          (F, H, W, 3) [+ ``audio`` float32 (C, T), ``audio_sample_rate``]
    DIR/items/<bps>/summary.json          hq_diffusion.summary(pipe).to_dict() at <bps>, taken right after
                                          generating prompt 0 with the first seed (K/V rates are measured)
    DIR/items/<bps>/p0003-s0/frames.npz   uint8 ``ref`` and ``quant`` (F, H, W, 3): what the metrics used
    DIR/items/<bps>/p0003-s0/video.mp4    reference | quantized | amplified error map (LTX-2: + audio)
    DIR/items/<bps>/p0003-s0/audio.npz    LTX-2 only: float32 ``ref`` / ``quant`` (C, T), ``sample_rate``
    DIR/items/<bps>/p0003-s0/metrics.json per-frame metrics; written last: its presence marks the item done
    DIR/report.json, report.csv, report.html

``<bps>`` is ``report.bps_key(bps)`` ("4", "2.5").  Every file is written atomically, so an interrupted
run continues where it stopped, and re-running a complete run generates nothing.  Each cached file records
a fingerprint of what it depends on (model, dtype, generation settings, quantization options, prompt); a
file whose fingerprint does not match is redone.  A DIR that holds a run with different settings is
refused rather than mixed.

"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import report as R
from .config import EvalConfig, fingerprint
from .files import EvalInputError, read_json, warn, write_npz

__all__ = ["RUN_FILE", "RUN_FORMAT", "ref_path", "bps_dir", "item_dir", "save_ref", "load_ref",
           "check_and_write_run", "Item", "item_status"]

RUN_FILE = "run.json"
RUN_FORMAT = 1


# --------------------------------------------------------------------------------------------- files
def _item_name(idx: int, seed: int) -> str:
    return f"p{idx:04d}-s{seed}"


def ref_path(out: str, idx: int, seed: int) -> str:
    """``out/ref/p<idx>-s<seed>.npz``: the cached reference output of one (prompt, seed)."""
    return os.path.join(out, "ref", _item_name(idx, seed) + ".npz")


def bps_dir(out: str, bps: float) -> str:
    """``out/items/<bps_key(bps)>``: the items and summary.json of one bit rate."""
    return os.path.join(out, "items", R.bps_key(bps))


def item_dir(out: str, bps: float, idx: int, seed: int) -> str:
    """``out/items/<bps>/p<idx>-s<seed>``: the files of one (prompt, seed, bps) item."""
    return os.path.join(bps_dir(out, bps), _item_name(idx, seed))


def save_ref(path: str, meta: dict, frames: np.ndarray, audio: np.ndarray | None,
             sample_rate: int | None) -> None:
    """Cache a reference output: uint8 ``frames`` (F, H, W, 3), optional float32 ``audio`` (C, T) at
    ``sample_rate`` Hz, and ``meta`` (its fingerprint and prompt, checked by :func:`load_ref`)."""
    arrays = {"frames": frames, "meta": np.array(json.dumps(meta))}
    if audio is not None:
        arrays["audio"] = np.asarray(audio, dtype=np.float32)
        arrays["audio_sample_rate"] = np.array(int(sample_rate))
    write_npz(path, **arrays)


def load_ref(path: str, meta: dict) -> dict | None:
    """The cached reference if it exists and its metadata matches ``meta``; else None."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["meta"])) != meta:
                return None
            out = {"frames": z["frames"], "audio": z["audio"] if "audio" in z.files else None,
                   "audio_sample_rate": int(z["audio_sample_rate"]) if "audio_sample_rate" in z.files else None}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        warn(f"ignoring unreadable reference cache {path} ({type(e).__name__}: {e}); regenerating")
        return None
    return out


# --------------------------------------------------------------------------------------------- run record
def _run_record(cfg: EvalConfig) -> dict:
    return {
        "format": RUN_FORMAT,
        "model": cfg.model, "pipeline": cfg.pipeline, "dtype": cfg.dtype,
        "model_seed": cfg.model_seed if cfg.ref_is_tiny else None,
        "quantized_model": cfg.quantized is not None, "reference": cfg.ref_model,
        "reference_note": cfg.reference_note,
        "prompts_file": cfg.prompts_file, "prompts": list(cfg.prompts), "seeds": list(cfg.seeds),
        "bps_list": list(cfg.bps_list), "quantizer": cfg.quantizer, "quantize": cfg.quantize,
        "call_kwargs": cfg.call_kwargs(),
        "lpips_weights": cfg.lpips_weights,
        "run_fingerprint": fingerprint(cfg.run_fingerprint_data()),
        "fingerprints": {R.bps_key(b): cfg.quant_fingerprint(b) for b in cfg.bps_list},
        "gen_fingerprint": cfg.gen_fingerprint(),
    }


def check_and_write_run(cfg: EvalConfig, rank: int) -> None:
    """Refuse an ``out`` that holds a run with other settings; else write run.json (rank 0, or any rank when
    it is missing).  Raises EvalInputError naming the settings that differ."""
    path = os.path.join(cfg.out, RUN_FILE)
    new = _run_record(cfg)
    old = read_json(path)
    if isinstance(old, dict) and old.get("run_fingerprint") not in (None, new["run_fingerprint"]):
        keys = [k for k in ("model", "pipeline", "dtype", "model_seed", "quantizer", "quantize", "call_kwargs")
                if R.to_jsonable(old.get(k)) != R.to_jsonable(new.get(k))]
        raise EvalInputError(f"{cfg.out} holds a run with different settings ({', '.join(keys) or 'settings'} "
                             f"differ); use another --out or delete it")
    if rank == 0 or old is None:
        R.write_json_atomic(path, new)


@dataclass
class Item:
    """One (prompt ``idx``, ``seed``, ``bps``) of the run, with its resume ``state``."""

    idx: int
    prompt: str
    seed: int
    bps: float
    state: str = "todo"  # "done", "metrics" (frames exist, metrics stale), "todo"


def item_status(cfg: EvalConfig, it: Item, lpips_source: Any) -> str:
    """``"done"`` (metrics and video up to date), ``"metrics"`` (frames up to date, metrics stale: e.g. LPIPS
    weights changed) or ``"todo"`` (generate again)."""
    d = item_dir(cfg.out, it.bps, it.idx, it.seed)
    m = read_json(os.path.join(d, "metrics.json"))
    ok = (isinstance(m, dict) and m.get("fingerprint") == cfg.quant_fingerprint(it.bps)
          and m.get("prompt") == it.prompt and m.get("seed") == it.seed)
    if not ok:
        return "todo"
    if (m.get("lpips") or {}).get("source") == lpips_source and os.path.isfile(os.path.join(d, "video.mp4")):
        return "done"
    return "metrics" if os.path.isfile(os.path.join(d, "frames.npz")) else "todo"
