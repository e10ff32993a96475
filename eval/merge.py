"""Merging of an evaluation run: report.json / report.csv / report.html from the items on disk (also what
``hq-diffusion eval --merge-only`` does after sharded runs)."""

from __future__ import annotations

import os
from typing import Any

from . import metrics as M
from .content import summarize as content_summary
from . import report as R
from .cache import RUN_FILE, RUN_FORMAT, bps_dir, item_dir
from .files import EvalInputError, read_json

__all__ = ["merge"]

# (key of QuantSummary.to_dict(), label) shown first in the HTML "Compression" table
_COMPRESSION_KEYS = (
    ("ratio", "compression \u00d7 (bf16 bytes / quantized bytes)"),
    ("weighted_bps", "bits per weight (all stored bits / weights)"),
    ("mean_bps", "bits per weight, mean over layers"),
    ("bytes_bf16", "quantized layers: bf16 bytes"),
    ("bytes_quantized", "quantized layers: stored bytes"),
    ("bytes_skipped", "layers kept unquantized: bytes"),
)


def _compression_display(summaries: dict[str, dict]) -> dict:
    """The HTML "Compression" table: per bps, the headline numbers of ``hq_diffusion.summary(pipe).to_dict()``
    (labelled), layer counts, measured K/V rates, and any other scalar it reports.  The full dicts are in
    ``report["quantization"]``."""
    out: dict[str, Any] = {}
    for k, s in summaries.items():
        body = (s or {}).get("summary") or {}
        pre = f"{k} bps: "
        for key, label in _COMPRESSION_KEYS:
            if key in body:
                out[pre + label] = body[key]
        for key in ("layers", "skipped"):
            if isinstance(body.get(key), list):
                out[pre + ("layers quantized" if key == "layers" else "layers kept unquantized")] = len(body[key])
        kv = body.get("kv")
        if isinstance(kv, dict):
            for comp, info in kv.items():
                ks = (info or {}).get("summary") or {}
                out[pre + f"K/V ({comp}): bits per scalar, measured"] = ks.get("bits_per_scalar")
                out[pre + f"K/V ({comp}): compression \u00d7 vs fp16"] = ks.get("compression")
        elif "kv" in body:
            out[pre + "K/V"] = "not quantized"
        for key, v in ((s or {}).get("run") or {}).items():  # timing and memory of one generation
            out[pre + key.replace("_", " ")] = v
        known = {key for key, _ in _COMPRESSION_KEYS} | {"layers", "skipped", "kv", "config"}
        for key, v in body.items():
            if key not in known and (isinstance(v, (int, float, str, bool)) or v is None):
                out[pre + key] = v
    return out


def merge(out: str) -> dict:
    """Build report.json / report.csv / report.html in ``out`` from the items that exist.

    Returns the report dict; ``report["missing"]`` lists the items not (yet) there.
    Raises:
        EvalInputError: ``out`` holds no run.json.
    """
    out = os.path.abspath(out)
    run = read_json(os.path.join(out, RUN_FILE))
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
        raise EvalInputError(f"{out} holds no evaluation run ({RUN_FILE} missing or unreadable)")
    prompts, seeds, bps_list = run["prompts"], run["seeds"], [float(b) for b in run["bps_list"]]
    entries: list[dict] = []
    missing: list[dict] = []
    lpips_infos: list[dict] = []
    summaries: dict[str, dict] = {}
    for b in bps_list:
        k = R.bps_key(b)
        fp = run["fingerprints"][k]
        s = read_json(os.path.join(bps_dir(out, b), "summary.json"))
        if isinstance(s, dict) and s.get("fingerprint") == fp:
            summaries[k] = s
        for i, p in enumerate(prompts):
            for seed in seeds:
                m = read_json(os.path.join(item_dir(out, b, i, seed), "metrics.json"))
                if not (isinstance(m, dict) and m.get("fingerprint") == fp and m.get("prompt") == p
                        and m.get("seed") == seed):
                    missing.append({"index": i, "prompt": p, "seed": seed, "bps": b})
                    continue
                lpips_infos.append(m.get("lpips") or {})
                entries.append({key: m.get(key) for key in
                                ("prompt", "index", "seed", "bps", "per_frame", "means", "audio_snr_db",
                                 "video", "frames", "audio", "content", "seconds")})
    lp = lpips_infos[0] if lpips_infos else {"available": False, "reason": "no items"}
    if any(x.get("available") != lp.get("available") for x in lpips_infos):
        lp = {"available": False, "reason": "LPIPS was computed for some items only"}
    lp = {"available": bool(lp.get("available")), "reason": lp.get("reason"), "plumbing": bool(lp.get("plumbing"))}

    saved = bool(run.get("quantized_model"))
    no_reference = saved and run.get("reference") is None
    if not saved:
        reference = f"unquantized, {run['dtype']}"
    elif no_reference:
        reference = f"none ({run.get('reference_note')})"
    else:
        reference = f"{run['reference']}, unquantized, {run['dtype']} ({run.get('reference_note')})"
    config = {
        "model": run["model"], "pipeline": run["pipeline"], "reference": reference,
        "quantized": (f"saved quantized in {run['model']} (loaded as stored)" if saved
                      else "quantized by this run (hq_diffusion.quantize)"),
        "dtype": run["dtype"], "num_prompts": len(prompts), "seeds": seeds, "bps": bps_list,
        **run["quantize"],
        "generation": run["call_kwargs"],
    }
    if run.get("model_seed") is not None:
        config["model_seed"] = run["model_seed"]
    report = {
        "model": run["model"],
        "config": config,
        "compression": _compression_display(summaries),
        "quantization": {k: s.get("summary") for k, s in summaries.items()},
        "bps_list": bps_list,
        "prompts": entries,
        "lpips": lp,
        "missing": missing,
        "no_reference": no_reference,
    }
    report["suite"] = R.suite_aggregates(entries)
    report["content"] = content_summary(entries)
    R.write_json_atomic(os.path.join(out, "report.json"), report)
    R.write_csv_atomic(os.path.join(out, "report.csv"), [_csv_row(e) for e in entries])
    R.write_html_report(os.path.join(out, "report.html"), report)
    return report


def _csv_row(e: dict) -> dict:
    pf = e.get("per_frame") or {}
    means = e.get("means") or {}
    row = {"prompt_index": e["index"], "prompt": e["prompt"], "seed": e["seed"], "bps": e["bps"]}
    for m in R.METRICS:
        row[f"{m}_mean"] = means.get(m)
    row["psnr_min"] = M.summarize(pf.get("psnr"))["min"]
    row["ssim_min"] = M.summarize(pf.get("ssim"))["min"]
    row["audio_snr_db"] = e.get("audio_snr_db")
    row["frames"] = len(pf.get("psnr") or [])
    row["video"] = e.get("video")
    row["frames_npz"] = e.get("frames")
    return row
