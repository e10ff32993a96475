"""The procedural dataset of the trained tiny LTX model (hq_diffusion.tiny.data)."""
import numpy as np
import pytest

from hq_diffusion.tiny import data


def test_split_is_disjoint_and_covers_every_pair():
    train, held = data.train_captions(), data.heldout_captions()
    assert len(train) == 112 and len(held) == 16
    assert not set(train) & set(held)
    assert sorted(train + held) == data.all_captions()
    pairs = {(c.colour, c.direction) for c in held}
    assert len(pairs) == 16  # one held-out caption per (colour, direction) pair ...
    for word in ("size", "colour", "shape", "direction", "background"):  # ... whose every word is trained
        assert {getattr(c, word) for c in held} <= {getattr(c, word) for c in train}


def test_caption_round_trip_and_errors():
    for c in data.all_captions():
        assert data.parse_caption(str(c)) == c
    assert data.parse_caption("  A small RED square moving left on a black background. ") == \
        data.Caption("small", "red", "square", "left", "black")
    with pytest.raises(data.CaptionError, match="a cat walking"):
        data.parse_caption("a cat walking")
    with pytest.raises(data.CaptionError, match="purple"):
        data.parse_caption("a small purple square moving left on a black background")


def test_tokenizer_knows_every_caption_word():
    from hq_diffusion.tiny.text import t5_tokenizer

    tok = t5_tokenizer(extra_words=data.EXTRA_WORDS)
    for c in data.all_captions():
        ids = tok(str(c)).input_ids
        assert len(ids) == len(str(c).split()) + 1, str(c)  # one token per word + </s>
    assert len(t5_tokenizer()) < len(tok)  # the default tokenizer is unchanged


@pytest.mark.parametrize("direction", list(data.DIRECTIONS))
def test_render_moves_the_object_in_the_caption_direction(direction):
    cap = data.Caption("large", "red", "circle", direction, "gray")
    clip, mask = data.render_clip(cap, np.random.default_rng(0), frames=9, size=32)
    assert clip.shape == (9, 32, 32, 3) and clip.dtype == np.float32 and mask.shape == (9, 32, 32)
    assert 0.0 <= clip.min() and clip.max() <= 1.0
    yy, xx = np.mgrid[0:32, 0:32]
    cx = (mask * xx).sum(axis=(1, 2)) / mask.sum(axis=(1, 2))
    cy = (mask * yy).sum(axis=(1, 2)) / mask.sum(axis=(1, 2))
    dx, dy = data.DIRECTIONS[direction]
    np.testing.assert_allclose(cx[-1] - cx[0], dx * data.TRAVEL * 32, atol=0.3)
    np.testing.assert_allclose(cy[-1] - cy[0], dy * data.TRAVEL * 32, atol=0.3)
    # the object stays inside the frame: its full area is visible in every frame
    assert np.ptp(mask.sum(axis=(1, 2))) < 1.0
    # object pixels have the caption colour, the rest the background's
    np.testing.assert_allclose(clip[mask == 1.0][0], data.COLOURS["red"], atol=1e-6)
    np.testing.assert_allclose(clip[mask == 0.0][0], data.BACKGROUNDS["gray"], atol=1e-6)


def test_sample_batch_is_seeded_and_uses_training_captions():
    a = data.sample_batch(np.random.default_rng(3), 6, size=32)
    b = data.sample_batch(np.random.default_rng(3), 6, size=32)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2] == b[2]
    assert a[0].shape == (6, 9, 32, 32, 3)
    train = {str(c) for c in data.train_captions()}
    _, _, texts = data.sample_batch(np.random.default_rng(4), 200, frames=2, size=16)
    assert set(texts) <= train
    with pytest.raises(ValueError, match="frames >= 2"):
        data.render_clip(data.all_captions()[0], np.random.default_rng(0), frames=1)
