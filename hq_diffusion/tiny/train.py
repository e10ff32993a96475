"""Train the tiny LTX-Video pipeline on the procedural dataset (``hq-diffusion train-tiny --out DIR``).

The architecture is diffusers' own (``AutoencoderKLLTXVideo``, ``LTXVideoTransformer3DModel``, a T5 encoder),
only small, so every code path of ``LTXPipeline`` is the real one. Two stages, both seeded:

1. **VAE** as a (deterministic) autoencoder on 9 x 32 x 32 clips of :mod:`hq_diffusion.tiny.data`: the
   posterior mean is decoded; reconstruction MSE in ``[-1, 1]`` (object pixels weighted up) plus a small KL
   term on the posterior, which keeps the latents near unit scale. Then the per-channel mean and
   std of the posterior means over a batch of clips are written into the VAE's ``latents_mean`` /
   ``latents_std`` buffers, which ``LTXPipeline`` uses to (de)normalise latents.
2. **Transformer + text encoder** (jointly) with the flow-matching objective ``LTXPipeline`` samples with:
   ``x_s = (1 - s) x_0 + s n`` for ``s ~ U(0, 1)``, timestep ``1000 s``, target velocity ``n - x_0`` (the
   Euler step of ``FlowMatchEulerDiscreteScheduler`` is ``x += (s_next - s) v``); latents normalised with the
   VAE's ``latents_mean`` / ``latents_std`` and packed with ``LTXPipeline._pack_latents``; the RoPE
   interpolation scale of the pipeline at ``frame_rate``; 10% of the captions are dropped to the empty prompt
   so that classifier-free guidance works. The latents come from a bank of clips encoded once with the
   frozen VAE (posterior means), in chunks; each step takes one chunk.

3. **Decoder fine-tuning**: the VAE decoder alone (encoder frozen, so the latents and the transformer trained
   on them are unchanged) on the same reconstruction loss; it depends only on the stage-1 VAE and the seed.

The output directory is a diffusers pipeline directory (``LTXPipeline.save_pretrained``: safetensors and
configs) plus ``training_record.json`` (steps, wall time, final and first losses, seed, commit, recipe) and
``loss_curve.png``. A checkpoint of the whole pipeline is written every ``--checkpoint-every`` transformer
steps (atomically), so an interrupted run leaves a usable model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data
from .text import t5_encoder, t5_tokenizer, vocab_size

__all__ = ["RECIPE", "build_components", "vae_losses", "transformer_stage_losses", "train", "main",
           "latent_chunk", "decoder_losses"]

#: The training recipe (every number the run depends on); recorded in ``training_record.json``.
RECIPE: dict[str, Any] = dict(
    seed=0, frames=9, size=32, frame_rate=25,
    latent_channels=16, vae_blocks=(16, 32, 32), vae_steps=3000, vae_batch=8, vae_lr=5e-4, vae_kl=1e-4,
    vae_object_weight=4.0,
    heads=4, head_dim=32, layers=4, text_width=32,
    decoder_steps=0,
    dit_steps=2500, dit_lr=1e-3, dit_warmup=100, dit_sigma_shift=1.0, chunk=32, bank_chunks=96, caption_dropout=0.1,
    max_sequence_length=16,
)


def build_components(recipe: dict[str, Any] | None = None, seed: int | None = None) -> dict[str, Any]:
    """The untrained pipeline components of ``recipe`` (default :data:`RECIPE`), seeded.

    The VAE is initialised from ``seed``, the text encoder and transformer from ``seed + 1`` (so that the
    second stage starts from the same weights whatever the first stage did).

    Returns:
        ``{"scheduler", "vae", "text_encoder", "tokenizer", "transformer"}`` (float32, CPU), ready for
        ``LTXPipeline(**components)``.
    """
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel

    r = dict(RECIPE if recipe is None else recipe)
    seed = int(r["seed"] if seed is None else seed)
    blocks = tuple(r["vae_blocks"])
    n = len(blocks)
    scaling = (True, True) + (False,) * (n - 2)  # spatial x4 and temporal x4 from two stages, x2 from patching
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLLTXVideo(
            in_channels=3, out_channels=3, latent_channels=r["latent_channels"],
            block_out_channels=blocks, decoder_block_out_channels=blocks,
            layers_per_block=(1,) * (n + 1), decoder_layers_per_block=(1,) * (n + 1),
            spatio_temporal_scaling=scaling, decoder_spatio_temporal_scaling=scaling,
            decoder_inject_noise=(False,) * (n + 1), upsample_residual=(False,) * n, upsample_factor=(1,) * n,
            timestep_conditioning=False, patch_size=2, patch_size_t=1, encoder_causal=True, decoder_causal=False,
        )
        torch.manual_seed(seed + 1)
        tokenizer = t5_tokenizer(extra_words=data.EXTRA_WORDS)
        text_encoder = t5_encoder(vocab_size(tokenizer), r["text_width"])
        hidden = r["heads"] * r["head_dim"]
        transformer = LTXVideoTransformer3DModel(
            in_channels=r["latent_channels"], out_channels=r["latent_channels"], patch_size=1, patch_size_t=1,
            num_attention_heads=r["heads"], attention_head_dim=r["head_dim"], cross_attention_dim=hidden,
            num_layers=r["layers"], caption_channels=r["text_width"],
        )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                tokenizer=tokenizer, transformer=transformer)


def _to_video(clips: np.ndarray) -> torch.Tensor:
    """(B, F, H, W, 3) float in [0, 1] -> (B, 3, F, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).mul(2.0).sub(1.0).contiguous()


def _vae_step_loss(vae, clips: np.ndarray, masks: np.ndarray, r: dict[str, Any]) -> tuple[torch.Tensor, float]:
    x = _to_video(clips)
    w = 1.0 + r["vae_object_weight"] * torch.from_numpy(masks)[:, None]
    posterior = vae.encode(x).latent_dist
    # Decode the posterior mean: the pipeline decodes what the transformer generates, i.e. means; sampling at
    # the initial unit variance drowns the latents in noise and the decoder learns to ignore them.
    recon = vae.decode(posterior.mode(), return_dict=False)[0]
    mse = (w * (recon - x) ** 2).mean() / w.mean()
    kl = posterior.kl().mean() / float(np.prod(posterior.mean.shape[1:]))
    return mse + r["vae_kl"] * kl, float(mse.detach())


def _update(opt, sched, params: list, loss: torch.Tensor) -> None:
    """One optimiser step: backward, gradient norm clipped to 1, step, learning-rate schedule step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def vae_losses(components: dict[str, Any], recipe: dict[str, Any], steps: int, progress: bool = False):
    """Run the first ``steps`` VAE training steps in place; yields ``(step, loss, mse)`` per step."""
    from tqdm.auto import tqdm

    r = recipe
    vae = components["vae"].train()
    opt = torch.optim.AdamW(vae.parameters(), lr=r["vae_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (
        1 + np.cos(np.pi * min(s, r["vae_steps"]) / r["vae_steps"])) + 0.02)
    rng = np.random.default_rng([r["seed"], 1])
    torch.manual_seed(r["seed"] + 10)
    for step in tqdm(range(steps), desc="vae", disable=not progress, mininterval=5.0):
        clips, masks, _ = data.sample_batch(rng, r["vae_batch"], r["frames"], r["size"])
        loss, mse = _vae_step_loss(vae, clips, masks, r)
        _update(opt, sched, list(vae.parameters()), loss)
        yield step, float(loss.detach()), mse
    vae.eval()


def decoder_losses(components: dict[str, Any], recipe: dict[str, Any], steps: int, progress: bool = False):
    """Stage 3: fine-tune the VAE decoder alone (encoder frozen, so the latents -- and the transformer trained
    on them -- are unchanged) for ``steps`` steps in place; yields ``(step, weighted mse)``. It depends only on
    the stage-1 VAE and the seed, so it may run before, after or alongside stage 2."""
    from tqdm.auto import tqdm

    r = recipe
    vae = components["vae"]
    params = [p for n, p in vae.named_parameters() if n.startswith("decoder.")]
    opt = torch.optim.AdamW(params, lr=r["vae_lr"], weight_decay=0.0)
    total = max(1, r["decoder_steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (
        1 + np.cos(np.pi * min(s, total) / total)) + 0.02)
    rng = np.random.default_rng([r["seed"], 5])
    torch.manual_seed(r["seed"] + 30)
    vae.eval()
    vae.decoder.train()
    for step in tqdm(range(steps), desc="decoder", disable=not progress, mininterval=5.0):
        clips, masks, _ = data.sample_batch(rng, r["vae_batch"], r["frames"], r["size"])
        x = _to_video(clips)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z, return_dict=False)[0]
        w = 1.0 + r["vae_object_weight"] * torch.from_numpy(masks)[:, None]
        loss = (w * (recon - x) ** 2).mean() / w.mean()
        _update(opt, sched, params, loss)
        yield step, float(loss.detach())
    vae.eval()


@torch.no_grad()
def set_latent_stats(vae, recipe: dict[str, Any]) -> None:
    """Write the per-channel mean / std of the posterior means of 64 training clips into ``vae``'s
    ``latents_mean`` / ``latents_std`` buffers (float32, shape ``(latent_channels,)``)."""
    clips, _, _ = data.sample_batch(np.random.default_rng([recipe["seed"], 2]), 64, recipe["frames"],
                                    recipe["size"])
    z = torch.cat([vae.encode(_to_video(c)).latent_dist.mode() for c in np.split(clips, 4)])
    vae.latents_mean.copy_(z.mean(dim=(0, 2, 3, 4)))
    vae.latents_std.copy_(z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3))


@torch.no_grad()
def latent_chunk(vae, recipe: dict[str, Any], index: int) -> tuple[torch.Tensor, list[str]]:
    """Chunk ``index`` of the latent bank: ``recipe["chunk"]`` training clips drawn from
    ``default_rng([seed, 3, index])``, encoded (posterior mean) and normalised as ``LTXPipeline`` does.

    Returns:
        ``(latents, texts)``: latents float32 ``(chunk, C, F', H', W')``, texts the chunk's captions.
    """
    from diffusers import LTXPipeline

    rng = np.random.default_rng([recipe["seed"], 3, index])
    clips, _, texts = data.sample_batch(rng, recipe["chunk"], recipe["frames"], recipe["size"])
    z = vae.encode(_to_video(clips)).latent_dist.mode()
    z = LTXPipeline._normalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    return z, texts


def _encode_text(components: dict[str, Any], texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    tok = components["tokenizer"](texts, padding="max_length", max_length=max_len, truncation=True,
                                  add_special_tokens=True, return_tensors="pt")
    emb = components["text_encoder"](tok.input_ids)[0]
    return emb, tok.attention_mask.bool()


def transformer_stage_losses(components: dict[str, Any], recipe: dict[str, Any], steps: int,
                             bank: list | None = None, progress: bool = False):
    """Run the first ``steps`` transformer/text-encoder training steps in place (the VAE is frozen and must
    already be trained); yields ``(step, loss)``. ``bank`` (a list, filled lazily with
    :func:`latent_chunk` results) may be passed to reuse encoded chunks."""
    from diffusers import LTXPipeline
    from tqdm.auto import tqdm

    r = recipe
    vae, transformer, text_encoder = components["vae"].eval(), components["transformer"], components["text_encoder"]
    transformer.train()
    text_encoder.train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=r["dit_lr"], weight_decay=0.01)
    total = r["dit_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / r["dit_warmup"]) * (
        0.5 * (1 + np.cos(np.pi * min(s, total) / total))) + 0.01)
    bank = [] if bank is None else bank
    n_chunks = r["bank_chunks"]
    rng = np.random.default_rng([r["seed"], 4])
    order: list[int] = []
    torch.manual_seed(r["seed"] + 20)
    t_ratio, s_ratio = vae.temporal_compression_ratio, vae.spatial_compression_ratio
    rope = (t_ratio / r["frame_rate"], s_ratio, s_ratio)
    shift = float(r.get("dit_sigma_shift", 1.0))  # records written before the key existed trained with 1.0
    for step in tqdm(range(steps), desc="transformer", disable=not progress, mininterval=5.0):
        if not order:
            order = list(rng.permutation(n_chunks))
        idx = int(order.pop(0))
        while len(bank) <= idx:
            bank.append(None)
        if bank[idx] is None:
            bank[idx] = latent_chunk(vae, r, idx)
        x0, texts = bank[idx]
        drop = rng.random(len(texts)) < r["caption_dropout"]
        texts = ["" if d else t for d, t in zip(drop, texts)]
        emb, mask = _encode_text(components, texts, r["max_sequence_length"])
        b, _, f, h, w = x0.shape
        sigma = torch.rand(b)
        if shift != 1.0:  # spend more steps at high noise, where layout and motion are decided
            sigma = shift * sigma / (1.0 + (shift - 1.0) * sigma)
        noise = torch.randn_like(x0)
        s = sigma.view(b, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        target = LTXPipeline._pack_latents(noise - x0, 1, 1)
        pred = transformer(hidden_states=LTXPipeline._pack_latents(xt, 1, 1), encoder_hidden_states=emb,
                           timestep=sigma * 1000.0, encoder_attention_mask=mask, num_frames=f, height=h, width=w,
                           rope_interpolation_scale=rope, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        _update(opt, sched, params, loss)
        yield step, float(loss.detach())
    transformer.eval()
    text_encoder.eval()


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def save_pipeline(components: dict[str, Any], out: Path, record: dict[str, Any]) -> None:
    """Write the pipeline directory, ``training_record.json`` and ``loss_curve.png`` to ``out`` atomically
    (into a sibling temporary directory, then exchanged)."""
    from diffusers import LTXPipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    LTXPipeline(**components).save_pretrained(tmp, safe_serialization=True)
    (tmp / "training_record.json").write_text(json.dumps(record, indent=1) + "\n")
    _plot(record, tmp / "loss_curve.png")
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def _smooth(values: list[float], k: int = 25) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < k:
        return v
    return np.convolve(v, np.ones(k) / k, mode="valid")


def _plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, title in ((axes[0], "vae_mse", "1. VAE reconstruction MSE (weighted)"),
                           (axes[1], "dit_loss", "2. transformer flow-matching loss"),
                           (axes[2], "decoder_mse", "3. decoder fine-tuning MSE (weighted)")):
        v = record["curves"].get(key, [])
        if v:
            ax.plot(np.arange(len(v)), v, color="0.8", lw=0.6, label="per step")
            s = _smooth(v)
            ax.plot(np.arange(len(s)) + (len(v) - len(s)), s, color="C0", lw=1.5, label="moving mean (25)")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not run (0 steps)", ha="center", va="center", transform=ax.transAxes, color="0.4")
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


#: The recipe keys stage 1 (the VAE) depends on: a stage-1 result may be reused only where they all agree.
STAGE1_KEYS = ("seed", "frames", "size", "latent_channels", "vae_blocks", "vae_steps", "vae_batch", "vae_lr",
               "vae_kl", "vae_object_weight")


def load_stage1(components: dict[str, Any], recipe: dict[str, Any], src: Path) -> dict[str, Any]:
    """Load the trained VAE of an earlier ``train-tiny`` output ``src`` into ``components`` (in place) instead of
    re-running stage 1, which is deterministic given :data:`STAGE1_KEYS` (bit-exact for one thread).

    Returns:
        ``src``'s training record (its stage-1 curves are copied into the new record by :func:`train`).

    Raises:
        ValueError: ``src`` is no complete ``train-tiny`` output, or its stage-1 recipe differs (keys named).
    """
    from diffusers import AutoencoderKLLTXVideo

    prior = check_stage1(recipe, src)
    vae = AutoencoderKLLTXVideo.from_pretrained(str(src / "vae"), local_files_only=True)
    components["vae"].load_state_dict(vae.state_dict(), strict=True)
    components["vae"].eval()
    return prior


def check_stage1(recipe: dict[str, Any], src: Path) -> dict[str, Any]:
    """``src``'s training record if its stage 1 matches ``recipe`` (:data:`STAGE1_KEYS`); else ValueError."""
    rec_path = src / "training_record.json"
    if not rec_path.is_file() or not (src / "vae" / "config.json").is_file():
        raise ValueError(f"--vae-from {src}: not a train-tiny output (no training_record.json or vae/)")
    prior = json.loads(rec_path.read_text())
    theirs = prior.get("recipe", {})
    differ = [k for k in STAGE1_KEYS if _plain(theirs.get(k)) != _plain(recipe[k])]
    if differ or prior.get("vae_steps_done") != recipe["vae_steps"]:
        raise ValueError(f"--vae-from {src}: its stage-1 recipe differs in {', '.join(differ) or 'vae_steps_done'}")
    return prior


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def train(out: Path, recipe: dict[str, Any] | None = None, checkpoint_every: int = 150,
          progress: bool = True, vae_from: Path | None = None) -> dict[str, Any]:
    """Run both stages of ``recipe`` and write the pipeline to ``out``. Returns the training record.

    ``vae_from``: an earlier output of the same stage-1 recipe whose VAE is reused (:func:`load_stage1`)."""
    r = dict(RECIPE if recipe is None else recipe)
    comps = build_components(r)
    t0 = time.time()
    curves: dict[str, list[float]] = {"vae_loss": [], "vae_mse": [], "dit_loss": [], "decoder_mse": []}
    record: dict[str, Any] = dict(recipe=r, commit=_commit(), torch=torch.__version__,
                                  threads=torch.get_num_threads(), curves=curves)

    def update(stage: str, done: bool = False) -> dict[str, Any]:
        record.update(
            stage=stage, complete=done, wall_s=round(time.time() - t0, 1), vae_steps_done=len(curves["vae_loss"]),
            dit_steps_done=len(curves["dit_loss"]), decoder_steps_done=len(curves["decoder_mse"]),
            first_losses=dict(vae=curves["vae_loss"][:3], dit=curves["dit_loss"][:3]),
            final_losses=dict(vae_mse=float(np.mean(curves["vae_mse"][-50:])) if curves["vae_mse"] else None,
                              dit=float(np.mean(curves["dit_loss"][-100:])) if curves["dit_loss"] else None,
                              decoder_mse=float(np.mean(curves["decoder_mse"][-50:])) if curves["decoder_mse"]
                              else None),
        )
        return record

    if vae_from is not None:
        prior = load_stage1(comps, r, Path(vae_from))
        curves["vae_loss"].extend(prior["curves"]["vae_loss"])
        curves["vae_mse"].extend(prior["curves"]["vae_mse"])
        record["vae_wall_s"] = prior.get("vae_wall_s")
        record["vae_from"] = dict(commit=prior.get("commit"), vae_wall_s=prior.get("vae_wall_s"))
    else:
        for step, loss, mse in vae_losses(comps, r, r["vae_steps"], progress=progress):
            curves["vae_loss"].append(loss)
            curves["vae_mse"].append(mse)
            if progress and step % 50 == 0:
                print(f"vae step {step}: mse {np.mean(curves['vae_mse'][-50:]):.4f} ({time.time() - t0:.0f} s)",
                      flush=True)
        set_latent_stats(comps["vae"], r)
        record["vae_wall_s"] = round(time.time() - t0, 1)
    for step, loss in transformer_stage_losses(comps, r, r["dit_steps"], progress=progress):
        curves["dit_loss"].append(loss)
        if progress and step % 50 == 0:
            print(f"transformer step {step}: loss {np.mean(curves['dit_loss'][-50:]):.4f} ({time.time() - t0:.0f} s)",
                  flush=True)
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < r["dit_steps"]:
            save_pipeline(comps, out, update(f"checkpoint at transformer step {step + 1}"))
    for step, loss in decoder_losses(comps, r, r["decoder_steps"], progress=progress):
        curves["decoder_mse"].append(loss)
    save_pipeline(comps, out, update("complete", done=True))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hq-diffusion train-tiny",
                                description="train the tiny LTX-Video pipeline on the procedural dataset")
    p.add_argument("--out", required=True, type=Path, help="output pipeline directory (replaced atomically)")
    p.add_argument("--seed", type=int, default=RECIPE["seed"])
    p.add_argument("--vae-steps", type=int, default=RECIPE["vae_steps"])
    p.add_argument("--dit-steps", type=int, default=RECIPE["dit_steps"])
    p.add_argument("--decoder-steps", type=int, default=RECIPE["decoder_steps"],
                   help="stage 3: decoder fine-tuning steps (0: none)")
    p.add_argument("--vae-lr", type=float, default=RECIPE["vae_lr"])
    p.add_argument("--vae-object-weight", type=float, default=RECIPE["vae_object_weight"],
                   help="extra weight of object pixels in the VAE loss")
    p.add_argument("--checkpoint-every", type=int, default=150, help="transformer steps between checkpoints")
    p.add_argument("--vae-from", type=Path, default=None,
                   help="reuse the VAE of an earlier train-tiny output with the same stage-1 recipe (skips stage 1)")
    p.add_argument("--dit-layers", type=int, default=RECIPE["layers"], help="transformer blocks")
    p.add_argument("--dit-heads", type=int, default=RECIPE["heads"], help="attention heads (head dim 32)")
    p.add_argument("--dit-sigma-shift", type=float, default=RECIPE["dit_sigma_shift"],
                   help="shift s of the training noise levels: sigma = s*u / (1 + (s-1)*u), u uniform (1: uniform)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the recorded first losses are bit-exact for 1 thread)")
    args = p.parse_args(argv)
    for name in ("vae_steps", "dit_steps", "threads", "dit_layers", "dit_heads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    recipe = dict(RECIPE, seed=args.seed, vae_steps=args.vae_steps, dit_steps=args.dit_steps, vae_lr=args.vae_lr,
                  vae_object_weight=args.vae_object_weight, decoder_steps=args.decoder_steps,
                  layers=args.dit_layers, heads=args.dit_heads, dit_sigma_shift=args.dit_sigma_shift)
    if args.vae_from is not None:
        try:
            check_stage1(recipe, args.vae_from)
        except ValueError as e:
            p.error(str(e))
    torch.set_num_threads(args.threads)
    rec = train(args.out, recipe, checkpoint_every=args.checkpoint_every, vae_from=args.vae_from)
    print(f"train-tiny: wrote {args.out} in {rec['wall_s']:.0f} s; final VAE MSE "
          f"{rec['final_losses']['vae_mse']:.4f}, transformer loss {rec['final_losses']['dit']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
