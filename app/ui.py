"""The Gradio Blocks of the app: :func:`build_app` (nothing runs at import; models load on first use).

Layout: settings on the left (model, prompts, seed, frames, steps, size, quantization, Generate); on the right
the bf16 and quantized videos side by side (autoplay, loop, kept in sync by a small script), below them the
error-map video and the per-frame PSNR plot, the mean PSNR / SSIM / LPIPS and the compression card, then a row
of example prompts and the raw metrics JSON.

The Generate button is also the API endpoint ``/generate`` (``gradio_client``: ``client.predict(...,
api_name="/generate")``) returning the three videos, the plot, the metrics text, the compression card and
the metrics as JSON; ``/limits`` returns the input limits and the offered models.

A model saved quantized by hq-diffusion (``--model QUANTIZED_DIR``) fixes its quantization: the controls are
disabled for it with a note saying so (``/limits`` lists its settings under ``saved_quantized``); without a
float reference the left video, the error map, the plot and the comparison metrics stay empty (None in the API's
JSON) and the metrics text says "No float reference: PSNR/SSIM not computed".
"""
from __future__ import annotations

import asyncio
import dataclasses
import html
import logging
import threading
import math
import os
from typing import Any

from hq_diffusion.integrations import families

from .config import (
    KV_CORRECTION_CHOICES,
    LATTICE_CHOICES,
    MMA_CHOICES,
    TINY_MODELS,
    VIDEO_KINDS,
    AppSettings,
    GenerationRequest,
    InputError,
    QuantSettings,
    is_tiny,
)

__all__ = ["build_app", "launch_options", "EXAMPLES", "RANDOM_EXAMPLES", "ui_defaults", "DEFAULT_NEGATIVE", "CSS"]

log = logging.getLogger(__name__)

DEFAULT_NEGATIVE = "worst quality, blurry, jittery, distorted"
#: Example prompts for the random-weight models; words from the tiny pipelines' vocabulary.
RANDOM_EXAMPLES: list[str] = [
    "a red robot walking in the city at night, cinematic",
    "a small boat on the ocean at sunset, realistic",
    "a white horse running on the beach, slow camera",
    "a dark forest in the rain, close up shot",
]


def _heldout_captions() -> list[str]:
    """The trained tiny model's held-out captions (``assets/prompts_shapes.txt``: never seen in training)."""
    from hq_diffusion.eval.files import read_prompts, shapes_prompts_file

    return read_prompts(shapes_prompts_file())


#: Example prompts: the held-out captions of the default model, the trained tiny LTX (it draws what they say).
EXAMPLES: list[str] = _heldout_captions()


def ui_defaults(model: str) -> dict:
    """The generation fields the UI starts with for ``model``: ``{"steps", "height", "width", "frames",
    "examples", "negative"}``. A trained tiny model uses its family's fast settings with its own
    ``call_defaults`` on top (``tiny-ltx-trained``: 32x32, 9 frames, 12 steps), its held-out captions and no
    negative prompt (it was trained with empty captions for guidance; other words would steer it off); anything
    else the previous defaults (64x64, 9 frames for video, 4 steps), :data:`RANDOM_EXAMPLES` and
    :data:`DEFAULT_NEGATIVE`."""
    if families.is_trained(model):
        t = families.trained(model)
        kw = {**families.get(t.family).call_defaults, **t.call_defaults}
        return {"steps": int(kw["num_inference_steps"]), "height": int(kw["height"]), "width": int(kw["width"]),
                "frames": int(kw.get("num_frames", 1)), "examples": EXAMPLES, "negative": ""}
    return {"steps": 4, "height": 64, "width": 64, "frames": 9, "examples": RANDOM_EXAMPLES,
            "negative": DEFAULT_NEGATIVE}


CSS = """
#hq-header h1 { margin-bottom: 0.1em; }
#hq-header p { margin-top: 0; opacity: 0.8; }
.hq-card { border: 1px solid var(--border-color-primary); border-radius: var(--radius-lg);
           padding: 0.8em 1em; background: var(--block-background-fill); }
.hq-card h3 { margin: 0 0 0.4em 0; font-size: 1.05em; }
.hq-card table { width: 100%; border-collapse: collapse; font-size: 0.92em; border: none !important; }
.hq-card tr, .hq-card td { border: none !important; background: transparent !important; }
.hq-card td { padding: 0.22em 0.4em; vertical-align: top; }
.hq-card td:first-child { white-space: nowrap; opacity: 0.75; width: 1%; }
.hq-big { font-size: 1.25em; font-weight: 700; }
.hq-note { font-size: 0.85em; opacity: 0.7; }
#hq-metrics { min-height: 4em; }
"""

# Keeps the quantized and error-map videos on the bf16 video's clock (play/pause state and position).
_SYNC_JS = """
const lead = () => document.querySelector('#hq-video-bf16 video');
const followers = () => ['#hq-video-quant video', '#hq-video-error video']
    .map((s) => document.querySelector(s)).filter((v) => v);
setInterval(() => {
    const a = lead();
    if (!a) return;
    for (const v of [a, ...followers()]) { v.muted = true; v.loop = true; }
    for (const v of followers()) {
        if (v === a || !Number.isFinite(a.currentTime) || v.readyState < 2) continue;
        if (!a.paused && v.paused) v.play().catch(() => {});
        if (a.paused && !v.paused) v.pause();
        if (Math.abs(v.currentTime - a.currentTime) > 0.1) v.currentTime = a.currentTime;
    }
}, 250);
"""


def launch_options() -> dict:
    """Keyword arguments of ``Blocks.launch`` that style the app (Gradio 6 takes theme and CSS there)."""
    import gradio as gr

    return {"theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="slate"), "css": CSS}


# ---- formatting ------------------------------------------------------------------------------------------

def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e6:.3f} MB"


def _fmt(v: Any, spec: str, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if v == "inf":
        return "∞" + unit
    return f"{format(float(v), spec)}{unit}"


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def compression_card(metrics: dict) -> str:
    """HTML of the compression card from :meth:`GenerationResult.metrics`."""
    c = metrics["compression"]
    w, kv, t = c["weights"], c["kv"], metrics["timings"]
    q = metrics["request"]["quant"]
    e = html.escape
    if kv.get("enabled"):
        kv_row = (f"<b>{_fmt(kv.get('bits_per_scalar'), '.2f')}</b> bits/scalar "
                  f"({_fmt(kv.get('compression'), '.2f', '×')} vs 16-bit; {e(q['kv_correction'])}, "
                  f"{kv.get('attention_modules', 'n/a')} attention modules)")
    else:
        kv_row = "off (16-bit)"
    saved = c.get("saved")
    if t["bf16_seconds"] is None:
        bf16_t = "<span class='hq-note'>(no float reference)</span>"
    else:
        bf16_t = _seconds(t["bf16_seconds"]) + (" <span class='hq-note'>(cached result)</span>"
                                                if t["bf16_cached"] else "")
    if saved:
        qz = "none: loaded as saved in " + _seconds(t["quantize_seconds"])
    else:
        qz = _seconds(t["quantize_seconds"]) + (" <span class='hq-note'>(cached pipeline)</span>"
                                                if t["quantized_pipeline_cached"] else "")
    rows = [
        ("Transformer linears",
         f"<span class='hq-big'>{_fmt_bytes(w['bytes_bf16'])} → {_fmt_bytes(w['bytes_quantized'])}</span> "
         f"&nbsp;<span class='hq-big'>{_fmt(w['ratio'], '.2f', '×')}</span>"),
        ("Weights", f"<b>{_fmt(w['bits_per_weight'], '.3f')}</b> bits/weight, everything stored counted "
                    f"({e(q['lattice'].upper())} lattice, matmul {e(q['mma'])}); {w['layers_quantized']} layers "
                    f"quantized, {w['layers_kept']} kept in bf16 ({_fmt_bytes(w['bytes_kept'])})"),
        ("Attention K/V", kv_row),
        *([("Saved directory", f"{e(str(metrics['reference']['quantized_dir']))}: requested "
                               f"{_fmt(saved['requested_bps'], 'g')} bps, {e(str(saved['storage']))} storage, saved "
                               f"in {e(str(saved['dtype']))}; the bits/weight above are measured on what it stores")]
          if saved else []),
        ("Time", f"bf16 {bf16_t} · quantized {_seconds(t['quantized_seconds'])} · quantization {qz}"),
    ]
    body = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return f"<div class='hq-card' id='hq-card'><h3>Compression</h3><table>{body}</table></div>"


def _short_paths(text: str | None) -> str:
    """``text`` with the torch hub directory written as ``$TORCH_HOME/hub`` (shorter on the page)."""
    if not text:
        return ""
    try:
        import torch

        return text.replace(torch.hub.get_dir(), "$TORCH_HOME/hub")
    except ImportError:  # pragma: no cover - torch is a dependency
        return text


def metrics_markdown(metrics: dict) -> str:
    """Mean PSNR / SSIM / LPIPS (or why LPIPS is unavailable) as Markdown."""
    m, lp = metrics["means"], metrics["lpips"]
    psnr = metrics["per_frame"]["psnr"]
    o = metrics["output"]
    if metrics.get("no_reference"):
        why = metrics["reference"]["note"].removeprefix("no float reference: ")
        return (f"**No float reference: PSNR/SSIM not computed** ({html.escape(why)})  \n"
                f"<span class='hq-note'>{o['frames']} frame(s) of {o['width']}×{o['height']} px, quantized "
                f"pipeline only; give --reference KEY|FLOAT_DIR to compare.</span>")
    finite = [p for p in psnr if isinstance(p, (int, float))]
    if metrics.get("psnr_all_frames_identical"):
        psnr_txt = "∞ (the quantized output is identical)"
    else:
        psnr_txt = _fmt(m["psnr"], ".2f", " dB")
        if finite and len(psnr) > 1:
            psnr_txt += f" (min {min(finite):.2f} dB)"
    lines = [f"**Mean PSNR** {psnr_txt}", f"**Mean SSIM** {_fmt(m['ssim'], '.4f')}"]
    if lp["available"]:
        lines.append(f"**Mean LPIPS** {_fmt(m['lpips'], '.4f')}" + (f" ({lp['reason']})" if lp["reason"] else ""))
    else:
        lines.append(f"**LPIPS** unavailable: {_short_paths(lp['reason'])}")
    if metrics.get("audio_snr_db") is not None:
        lines.append(f"**Audio SNR** {_fmt(metrics['audio_snr_db'], '.2f', ' dB')}")
    lines.append(f"<span class='hq-note'>{o['frames']} frame(s) of {o['width']}×{o['height']} px; same prompt "
                 f"and seed for both; error map = |bf16 − quantized| × {metrics['error_map_gain']}.</span>")
    return "  \n".join(lines)


def psnr_frame(metrics: dict):
    """pandas DataFrame for the per-frame PSNR plot (identical frames, PSNR = ∞, are left out)."""
    import pandas as pd

    rows = [{"frame": i, "PSNR (dB)": float(p)} for i, p in enumerate(metrics["per_frame"]["psnr"] or [])
            if isinstance(p, (int, float)) and math.isfinite(p)]
    return pd.DataFrame(rows, columns=["frame", "PSNR (dB)"])


def _model_choices(settings: AppSettings, engine) -> list[tuple[str, str]]:
    out = []
    for m in settings.models:
        name = os.path.basename(os.path.normpath(m))
        label = (TINY_MODELS[m] if is_tiny(m) else f"Saved quantized: {name}" if engine.saved(m) is not None
                 else f"Local checkpoint: {name}")
        out.append((label, m))
    return out


def reference_label(saved) -> str:
    """Label of the left video: ``"bf16"``, or for a directory saved quantized its float reference."""
    if saved is None:
        return "bf16"
    if saved.reference is None:
        return "float reference: none"
    name = saved.reference if is_tiny(saved.reference) else os.path.basename(os.path.normpath(saved.reference))
    return f"float reference: {name} ({saved.info.dtype or 'bfloat16'})"


def quant_note(saved) -> str:
    """The note under the quantization controls: empty for a model the app quantizes; for a directory saved
    quantized (:class:`~hq_diffusion.app.engine.SavedModel`), that it fixes bps and lattice, and the reference."""
    if saved is None:
        return ""
    q = saved.quant
    ref = (f"Float reference: {html.escape(saved.reference)} ({html.escape(saved.note)})." if saved.reference
           else f"{html.escape(saved.note[0].upper() + saved.note[1:])}: PSNR/SSIM not computed.")
    return (f"<span class='hq-note'>This model is a directory saved quantized ({q.lattice.upper()} lattice at "
            f"{q.bps:g} bps{', K/V ' + format(q.kv_bps, 'g') + ' bits' if q.kv_enabled else ''}): the directory "
            f"fixes bps and lattice, so the settings above are not used. {ref}</span>")


#: The /generate API's arguments, in order.
_GENERATE_INPUTS = ("model", "prompt", "negative_prompt", "seed", "frames", "height", "width", "steps", "bps",
                    "lattice", "mma", "kv_enabled", "kv_bps", "kv_correction")


def _arguments_error(got: int):
    """The ``gr.Error`` for a /generate call with ``got`` arguments instead of 14, naming the missing ones."""
    import gradio as gr

    missing = ", ".join(_GENERATE_INPUTS[got:]) or "none"
    return gr.Error(f"/generate takes {len(_GENERATE_INPUTS)} arguments ({', '.join(_GENERATE_INPUTS)}); got "
                    f"{got}. Missing: {missing}.", title="Invalid input", print_exception=False)


def _clear_argument_count_errors(demo) -> None:
    """Gradio checks the argument count of an API call before the handler runs and reports too few as a bare
    ValueError, which the client sees as ``{"error": null}``; for /generate, report the missing arguments."""
    check = demo.validate_inputs

    def validate_inputs(block_fn, inputs):
        if getattr(block_fn, "api_name", None) == "generate" and len(inputs) < len(_GENERATE_INPUTS):
            raise _arguments_error(len(inputs))
        return check(block_fn, inputs)

    demo.validate_inputs = validate_inputs


# ---- the app ---------------------------------------------------------------------------------------------

def build_app(settings: AppSettings | None = None, engine=None):
    """Build the Blocks (and configure its queue); no model is loaded until the first request.

    Args:
        settings: app settings (default ``AppSettings()``).
        engine: an :class:`~hq_diffusion.app.engine.Engine` (default: a new one for ``settings``).

    Returns:
        ``gr.Blocks``; its ``hq_engine`` attribute is the engine (close it after the server stops).
    """
    import gradio as gr

    from .engine import Engine, GenerationCancelled

    settings = settings or AppSettings()
    engine = engine or Engine(settings)
    lim = settings.limits
    default_kind = engine.kind(settings.default_model)
    default_video = default_kind in VIDEO_KINDS

    async def on_generate(model, prompt, negative_prompt, seed, frames, height, width, steps, bps, lattice, mma,
                          kv_enabled, kv_bps, kv_correction, progress=gr.Progress()):
        # An async handler running the engine in a worker thread: when the client cancels (or disconnects),
        # Gradio cancels this task and the engine stops at its next denoising step, freeing the model lock.
        req = GenerationRequest(
            model=model, prompt=prompt, negative_prompt=negative_prompt or "", seed=seed, frames=frames,
            height=height, width=width, steps=steps,
            quant=QuantSettings(bps=bps, lattice=lattice, mma=mma, kv_enabled=kv_enabled, kv_bps=kv_bps,
                                kv_correction=kv_correction))
        cancel = threading.Event()
        try:
            res = await asyncio.to_thread(engine.run, req, lambda f, d: progress(f, desc=d), cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise
        except InputError as e:
            raise gr.Error("\n".join(html.escape(p, quote=False) for p in e.problems), title="Invalid input",
                           print_exception=False) from None
        except GenerationCancelled as e:
            raise gr.Error(html.escape(str(e), quote=False), title="Stopped", print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - shown to the user as a message, logged with its traceback
            log.exception("generation failed")
            raise gr.Error(f"Generation failed: {type(e).__name__}: {html.escape(str(e), quote=False)}",
                           title="Generation failed", print_exception=False) from None
        m = res.metrics()
        return (res.bf16_video, res.quant_video, res.error_video, psnr_frame(m), metrics_markdown(m),
                compression_card(m), m)

    def on_model(model):
        video = engine.kind(model) in VIDEO_KINDS
        if video:
            fr = gr.Slider(interactive=True, label="Frames (4k+1)")
        else:
            fr = gr.Slider(value=1, interactive=False, label="Frames (image model: 1)")
        sv = engine.saved(model)
        return (fr, *(gr.update(interactive=sv is None) for _ in range(4)), gr.HTML(quant_note(sv)),
                gr.Video(label=reference_label(sv)))

    def on_kv(enabled):
        return gr.Slider(interactive=bool(enabled)), gr.Dropdown(interactive=bool(enabled))

    def limits() -> dict:
        # models saved quantized: the quantization their directory fixes, and their float reference
        saved = {m: {**dataclasses.asdict(sv.quant), "reference": sv.reference, "reference_note": sv.note}
                 for m in settings.models if (sv := engine.saved(m)) is not None}
        return {"limits": lim.to_dict(), "models": list(settings.models), "saved_quantized": saved,
                "lattices": list(LATTICE_CHOICES), "mma": list(MMA_CHOICES),
                "kv_corrections": list(KV_CORRECTION_CHOICES)}

    with gr.Blocks(title="hq-diffusion: HyperQuant vs bf16", analytics_enabled=False,
                   delete_cache=(1800, 3600)) as demo:
        gr.HTML("<h1>hq-diffusion · HyperQuant vs bf16</h1>"
                "<p>Same prompt, same seed: the bf16 pipeline and its HyperQuant-quantized copy (RHT + lattice "
                "+ Rice-coded weights, optional K/V quantization), side by side. The default model is a tiny LTX "
                "trained here on coloured shapes moving over plain backgrounds: prompt it like the examples "
                "(its other words are unknown to it). The other embedded tiny models have random weights, so "
                "their videos look like noise; start the app with <code>--model DIR</code> for a real "
                "checkpoint.</p>",
                elem_id="hq-header", js_on_load=_SYNC_JS)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=360):
                model = gr.Dropdown(_model_choices(settings, engine), value=settings.default_model, label="Model")
                default_saved = engine.saved(settings.default_model)
                start = ui_defaults(default_saved.origin or "" if default_saved else settings.default_model)
                prompt = gr.Textbox(value=start["examples"][0], label="Prompt", lines=2, max_lines=6,
                                    max_length=lim.prompt_max_chars, elem_id="hq-prompt",
                                    placeholder="Describe the video")
                negative = gr.Textbox(value=start["negative"], label="Negative prompt", lines=1,
                                      max_length=lim.prompt_max_chars)
                with gr.Row():
                    # no minimum/maximum: validated with the other fields
                    seed = gr.Number(value=0, label="Seed", precision=0, min_width=100)
                    frames = gr.Slider(1, lim.frames_max, value=start["frames"] if default_video else 1, step=4,
                                       label="Frames (4k+1)" if default_video else "Frames (image model: 1)",
                                       interactive=default_video)
                    steps = gr.Slider(lim.steps_min, lim.steps_max, value=start["steps"], step=1, label="Steps")
                with gr.Row():
                    height = gr.Slider(lim.size_min, lim.size_max, value=start["height"], step=lim.size_multiple,
                                       label="Height (px)")
                    width = gr.Slider(lim.size_min, lim.size_max, value=start["width"], step=lim.size_multiple,
                                      label="Width (px)")
                with gr.Accordion("Quantization", open=True):
                    free = default_saved is None  # a directory saved quantized fixes the quantization
                    bps = gr.Slider(lim.bps_min, lim.bps_max, value=4.0, step=0.25, label="Weights: bits per weight",
                                    info="everything stored counted: payload, Rice side information, row scales",
                                    interactive=free)
                    with gr.Row():
                        lattice = gr.Radio(list(LATTICE_CHOICES), value="e8", label="Lattice", min_width=200,
                                           interactive=free)
                        mma = gr.Dropdown(list(MMA_CHOICES), value="auto", label="Matmul path", min_width=120,
                                          interactive=free)
                    kv_enabled = gr.Checkbox(value=False, label="Quantize attention K/V", elem_id="hq-kv",
                                             interactive=free)
                    with gr.Row():
                        kv_bps = gr.Slider(lim.bps_min, lim.bps_max, value=4.0, step=0.25,
                                           label="K/V bits/scalar", interactive=False)
                        kv_correction = gr.Dropdown(list(KV_CORRECTION_CHOICES), value="haar+dither",
                                                    label="K/V correction", interactive=False)
                    fixed_note = gr.HTML(quant_note(default_saved), elem_id="hq-quant-note")
                generate = gr.Button("Generate", variant="primary", elem_id="hq-generate")
            with gr.Column(scale=7):
                with gr.Row():
                    v_bf16 = gr.Video(label=reference_label(default_saved), autoplay=True, loop=True, interactive=False, height=330,
                                      elem_id="hq-video-bf16")
                    v_quant = gr.Video(label="HyperQuant (quantized)", autoplay=True, loop=True,
                                       interactive=False, height=330, elem_id="hq-video-quant")
                with gr.Row(equal_height=True):
                    v_err = gr.Video(label="Error map |bf16 − quantized| × gain", autoplay=True, loop=True,
                                     interactive=False, height=250, elem_id="hq-video-error")
                    plot = gr.LinePlot(x="frame", y="PSNR (dB)", title="PSNR per frame, bf16 vs quantized",
                                       height=250, elem_id="hq-psnr-plot", x_title="frame", y_title="PSNR (dB)")
                with gr.Row(equal_height=False):
                    metrics_md = gr.Markdown("*Mean PSNR / SSIM / LPIPS appear here.*", elem_id="hq-metrics")
                    card = gr.HTML("<div class='hq-card' id='hq-card-empty'><h3>Compression</h3>"
                                   "<span class='hq-note'>Generate to see sizes and bit rates.</span></div>",
                                   js_on_load=None)
                gr.Examples([[p] for p in start["examples"]], inputs=[prompt], label="Example prompts")
                with gr.Accordion("Metrics (JSON, as returned by the /generate API)", open=False):
                    metrics_json = gr.JSON(elem_id="hq-metrics-json")

        model.change(on_model, inputs=model, outputs=[frames, bps, lattice, mma, kv_enabled, fixed_note, v_bf16],
                     api_visibility="private", queue=False)
        kv_enabled.change(on_kv, inputs=kv_enabled, outputs=[kv_bps, kv_correction], api_visibility="private",
                          queue=False)
        generate.click(
            on_generate,
            inputs=[model, prompt, negative, seed, frames, height, width, steps, bps, lattice, mma, kv_enabled,
                    kv_bps, kv_correction],
            outputs=[v_bf16, v_quant, v_err, plot, metrics_md, card, metrics_json],
            api_name="generate",
            api_description="Generate with the bf16 and the quantized pipeline; returns the bf16, quantized and "
                            "error-map videos, the per-frame PSNR plot, the metrics text, the compression card "
                            "and the metrics as JSON.",
            concurrency_limit=settings.max_concurrency,
            concurrency_id="generate",
            # The handler gets the raw values and validates them all (GenerationRequest.validate): Gradio's own
            # per-component checks would stop at the first out-of-range value with a message that names no
            # field ("Value 100 is greater than maximum value 33.") and log a traceback.
            preprocess=False,
        )
        gr.api(limits, api_name="limits", queue=False)
    _clear_argument_count_errors(demo)
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=settings.max_concurrency)
    demo.hq_engine = engine
    return demo
