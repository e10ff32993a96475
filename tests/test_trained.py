"""The trained tiny LTX model shipped in assets/tiny_ltx_trained: loads offline, makes the prompt's object
move the prompt's way, and its recipe reproduces the recorded first training losses from the seed."""
import json
from importlib import resources

import numpy as np
import pytest
import torch

from hq_diffusion.integrations import families

ASSET = resources.files("hq_diffusion.assets").joinpath(families.trained("tiny-ltx-trained").asset)


def _record() -> dict:
    return json.loads(ASSET.joinpath("training_record.json").read_text())


def test_assets_are_plain_small_files_and_complete():
    files = [p for p in _walk(ASSET)]
    names = {p.name for p in files}
    assert {"model_index.json", "training_record.json", "loss_curve.png"} <= names
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    for p in files:
        if p.suffix == ".safetensors":
            head = p.read_bytes()[:64]
            assert not head.startswith(b"version https://git-lfs"), p  # a real file, not an LFS pointer
            from safetensors import safe_open

            with safe_open(str(p), "pt") as f:
                assert len(list(f.keys())) > 0
    rec = _record()
    assert rec["complete"] and rec["vae_steps_done"] == rec["recipe"]["vae_steps"]
    assert rec["dit_steps_done"] == rec["recipe"]["dit_steps"]
    assert len(rec["curves"]["dit_loss"]) == rec["dit_steps_done"]
    assert rec["final_losses"]["dit"] < 0.2 * np.mean(rec["curves"]["dit_loss"][:50])  # it learned
    assert rec["final_losses"]["vae_mse"] < 0.1 * np.mean(rec["curves"]["vae_mse"][:20])


def _walk(root):
    for p in root.iterdir():
        if p.is_dir():
            yield from _walk(p)
        else:
            yield p


def test_registry_and_offline_load(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from hq_diffusion.models import tiny_pipeline, trained_call_kwargs

    assert list(families.tiny_aliases())[0] == "tiny-ltx-trained"
    assert families.by_alias("tiny-ltx-trained").key == "ltx"
    pipe = tiny_pipeline("tiny-ltx-trained", dtype=torch.bfloat16)
    assert type(pipe).__name__ == "LTXPipeline" and pipe.transformer.dtype == torch.bfloat16
    assert pipe.transformer.config.num_layers == 4 and pipe.transformer.config.num_attention_heads == 4
    kw = trained_call_kwargs("tiny-ltx-trained")
    assert kw["num_inference_steps"] == 12 and kw["height"] == kw["width"] == 32 and kw["num_frames"] == 9
    with pytest.raises(families.UnknownFamilyError, match="tiny-ltx-untrained"):
        families.trained("tiny-ltx-untrained")


# Two held-out captions (hq_diffusion.tiny.data.heldout_captions): the bf16 model draws the prompt's colour moving
# the prompt's way (15 of the 16 held-out captions in BENCHMARKS.md section 16).
HELD_OUT = ("a large blue circle moving up on a black background",
            "a large green square moving up on a black background")


@pytest.mark.parametrize("prompt", HELD_OUT)
def test_generates_the_prompt_colour_and_direction(prompt):
    from hq_diffusion.eval import content
    from hq_diffusion.models import generate, tiny_pipeline, trained_call_kwargs
    from hq_diffusion.tiny import data

    assert data.parse_caption(prompt) in data.heldout_captions()
    pipe = tiny_pipeline("tiny-ltx-trained", dtype=torch.bfloat16)
    kw = trained_call_kwargs("tiny-ltx-trained")
    frames = generate(pipe, "ltx", prompt, 0, **kw)
    assert frames.shape == (9, 32, 32, 3)
    r = content.check(frames, prompt)
    assert r.colour_ok and r.direction_ok, r


def test_recipe_reproduces_the_first_losses():
    """From the seed: the first VAE steps (fresh init), and the first transformer steps (fresh init, on the
    shipped VAE, which is frozen in that stage) give the recorded losses (1 CPU thread, as recorded).

    Bit for bit on the machine that recorded them; torch's float kernels sum in an order that depends on the
    CPU's vector width, which moves a loss by about one float32 ulp on another CPU (2.5e-7 relative on an
    AVX-512 machine, 2026-11-29), so the check allows 1e-5 relative: far below what a changed recipe, seed or
    data moves."""
    from diffusers import AutoencoderKLLTXVideo

    from hq_diffusion.tiny import train

    rec = _record()
    assert rec["threads"] == 1
    recipe = {k: tuple(v) if isinstance(v, list) else v for k, v in rec["recipe"].items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            comps = train.build_components(recipe)
            vae = [loss for _, loss, _ in train.vae_losses(comps, recipe, 2)]
            comps = train.build_components(recipe)
            shipped = AutoencoderKLLTXVideo.from_pretrained(str(ASSET.joinpath("vae")), local_files_only=True)
            comps["vae"].load_state_dict(shipped.state_dict())
            dit = [loss for _, loss in train.transformer_stage_losses(comps, recipe, 2)]
    finally:
        torch.set_num_threads(threads)
    assert vae == pytest.approx(rec["first_losses"]["vae"][:2], rel=1e-5, abs=0)
    assert dit == pytest.approx(rec["first_losses"]["dit"][:2], rel=1e-5, abs=0)


def test_vae_from_reuses_only_the_same_stage1_recipe(tmp_path, capsys):
    """``train-tiny --vae-from DIR`` skips stage 1 only for an output of the very same stage-1 recipe."""
    from pathlib import Path

    from hq_diffusion.tiny import train

    asset = Path(str(ASSET))
    rec = _record()
    recipe = {k: tuple(v) if isinstance(v, list) else v for k, v in rec["recipe"].items()}
    assert train.check_stage1(recipe, asset)["recipe"] == rec["recipe"]
    with pytest.raises(ValueError, match="differs in vae_lr"):
        train.check_stage1(dict(recipe, vae_lr=recipe["vae_lr"] * 2), asset)
    with pytest.raises(ValueError, match="not a train-tiny output"):
        train.check_stage1(recipe, tmp_path)
    with pytest.raises(SystemExit) as e:  # the CLI refuses it in one line before training anything
        train.main(["--out", str(tmp_path / "out"), "--vae-from", str(tmp_path)])
    assert e.value.code == 2 and "not a train-tiny output" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
