"""The content check (eval/content.py) on clips whose truth is known (hq_diffusion.tiny.data)."""
import numpy as np
import pytest

from hq_diffusion.eval import content
from hq_diffusion.tiny import data


def _clip(caption, seed=0, size=32):
    return data.render_clip(caption, np.random.default_rng(seed), frames=9, size=size)[0]


def test_ground_truth_clips_agree():
    scores = []
    for i, cap in enumerate(data.all_captions()):
        r = content.check(_clip(cap, seed=i), str(cap))
        scores.append(r.agreement)
    assert np.mean(scores) >= 0.95
    r = content.check(_clip(data.all_captions()[5], size=64), str(data.all_captions()[5]))
    assert r.colour_ok and r.direction_ok and r.agreement == 1.0 and r.found_frames == 9


def test_wrong_clip_fails():
    truth = data.Caption("small", "red", "square", "left", "black")
    other = data.Caption("small", "blue", "square", "up", "black")
    r = content.check(_clip(truth), str(other))
    assert (r.colour, r.direction) == ("red", "left")
    assert not r.colour_ok and not r.direction_ok and r.agreement == 0.0
    # right colour, wrong direction: half
    r = content.check(_clip(truth), "a small red square moving right on a black background")
    assert r.colour_ok and not r.direction_ok and r.agreement == 0.5


def test_still_noise_and_empty_clips_fail():
    cap = data.Caption("large", "green", "circle", "down", "gray")
    clip = _clip(cap)
    still = np.repeat(clip[:1], 9, axis=0)
    r = content.check(still, str(cap))
    assert r.colour_ok and r.direction == "still" and r.agreement == 0.5
    empty = np.broadcast_to(np.asarray(data.BACKGROUNDS["gray"], np.float32), clip.shape)
    r = content.check(empty, str(cap))
    assert r.colour is None and r.direction is None and r.agreement == 0.0
    noise = np.random.default_rng(0).random(clip.shape, dtype=np.float32)
    assert content.check(noise, str(cap)).agreement <= 0.5


def test_reversed_clip_reverses_direction():
    cap = data.Caption("large", "yellow", "square", "right", "black")
    r = content.check(_clip(cap)[::-1], str(cap))
    assert r.direction == "left" and not r.direction_ok


def test_bad_input_is_a_clear_error():
    cap = str(data.all_captions()[0])
    assert content.checkable(cap) and not content.checkable("a cat walking on the beach")
    with pytest.raises(data.CaptionError, match="a cat"):
        content.check(np.zeros((9, 32, 32, 3)), "a cat")
    with pytest.raises(content.ContentError, match="shape"):
        content.check(np.zeros((9, 32, 32)), cap)
    bad = np.zeros((9, 32, 32, 3), np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(content.ContentError, match="non-finite"):
        content.check(bad, cap)


def test_runner_records_content_per_item_and_summarizes_per_bps():
    from hq_diffusion.eval import report, runner

    cap = data.Caption("small", "yellow", "circle", "right", "gray")
    ref = (_clip(cap) * 255).round().astype(np.uint8)
    quant = ref[::-1].copy()  # the quantized output moves the wrong way
    res = runner.compute_metrics(ref, quant, None, prompt=str(cap))
    assert res["content"]["ref"]["agreement"] == 1.0 and res["content"]["quant"]["agreement"] == 0.5
    assert runner.compute_metrics(ref, quant, None, prompt="a cat walking")["content"] is None
    entries = [{"bps": 4.0, "content": res["content"]}, {"bps": 4.0, "content": None},
               {"bps": 3.0, "content": content.check_pair(ref, ref, str(cap))}]
    s = content.summarize(entries)
    assert s["4"] == {"n": 1, "ref": 1.0, "quant": 0.5, "ref_both": 1.0, "quant_both": 0.0, "quant_colour": 1.0,
                      "quant_direction": 0.0}
    assert s["3"]["quant"] == 1.0 and set(s) == {"4", "3"}
    assert report._content_cell(res["content"]) == "100% / 50%" and report._content_cell(None) == "\u2013"
