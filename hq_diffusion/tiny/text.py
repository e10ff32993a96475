"""Tiny tokenizers (in-memory vocabularies) and text encoders for the tiny offline pipelines.

Everything is built in code with random weights: no model hub, no network, no files.
"""
from __future__ import annotations

import string

__all__ = ["t5_tokenizer", "clip_tokenizer", "gemma_tokenizer", "vocab_size", "t5_encoder", "clip_text_encoder",
           "gemma3_encoder", "gemma2_encoder"]

# ----------------------------------------------------------------------------------------------------------
# Tokenizers from an in-memory vocabulary.
# ----------------------------------------------------------------------------------------------------------

# Whole-word tokens; anything else falls back to single characters (all tokenizers below cover a-z, 0-9).
_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "to", "is", "by", "under", "over",
    "cat", "dog", "robot", "horse", "bird", "fish", "man", "woman", "child", "car", "boat", "tree",
    "house", "city", "forest", "beach", "mountain", "river", "ocean", "sky", "sun", "moon", "rain",
    "snow", "street", "garden", "room", "red", "blue", "green", "yellow", "white", "black", "small",
    "large", "bright", "dark", "slow", "fast", "walking", "running", "dancing", "flying", "swimming",
    "sitting", "video", "photo", "painting", "close", "up", "shot", "camera", "light", "night", "day",
    "sunset", "cinematic", "realistic", "quality", "worst", "blurry", "jittery", "distorted",
)
_CHARS: str = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?'-"


def _bpe_vocab_and_merges(
    specials: list[str], words: list[list[str]], chars: list[str]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tiny, deterministic byte-pair-encoding "training" run over ``words`` (each a list of symbols).

    Repeatedly merges the most frequent adjacent pair (ties broken by the pair itself) until every word is a
    single symbol, so each word of the list encodes to exactly one token; anything else falls back to
    ``chars``. Returns ``(vocab, merges)`` with ``specials`` first, then ``chars``, then the merged symbols.
    """
    vocab: dict[str, int] = {}
    for tok in [*specials, *chars]:
        vocab.setdefault(tok, len(vocab))
    seqs = [list(w) for w in words]
    for seq in seqs:
        for sym in seq:
            vocab.setdefault(sym, len(vocab))
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        merged = best[0] + best[1]
        vocab.setdefault(merged, len(vocab))
        for k, seq in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = out
    return vocab, merges


def t5_tokenizer(model_max_length: int = 512, extra_words: tuple[str, ...] = ()):
    """SentencePiece-style (Unigram) ``T5Tokenizer``: ``<pad>``=0, ``</s>``=1, ``<unk>``=2 first.

    ``extra_words`` are whole-word tokens appended after the default vocabulary (the default tokenizer, used by
    every random-weight tiny model, is unchanged when it is empty).
    """
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS]
    vocab += [("\u2581" + w, -1.0) for w in extra_words if w not in _WORDS]
    vocab += [(c, -5.0) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def clip_tokenizer(model_max_length: int = 77):
    """Byte-pair ``CLIPTokenizer`` (``<|startoftext|>``=0, ``<|endoftext|>``=1 is also the pad token)."""
    from transformers import CLIPTokenizer

    chars = list(_CHARS) + [c + "</w>" for c in _CHARS]
    words = [[*w[:-1], w[-1] + "</w>"] for w in _WORDS]  # CLIP marks the last symbol of a word
    vocab, merges = _bpe_vocab_and_merges(["<|startoftext|>", "<|endoftext|>"], words, chars)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


# Gemma-3 multimodal special tokens (needed for a valid Gemma3Config; never produced from plain text).
_GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_image>", "<end_of_image>",
                   "<image_soft_token>"]


def gemma_tokenizer(model_max_length: int = 1024):
    """Byte-pair ``GemmaTokenizer`` (``<pad>``=0, ``<eos>``=1, ``<bos>``=2, adds ``<bos>``, pads on the left)."""
    from transformers import GemmaTokenizer

    words = [list(w) for w in _WORDS] + [["\u2581", *w] for w in _WORDS]  # "a red" -> "a", "\u2581red"
    vocab, merges = _bpe_vocab_and_merges(_GEMMA_SPECIALS, words, list(_CHARS) + ["\u2581"])
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=model_max_length)
    tok.padding_side = "left"
    return tok


def vocab_size(tokenizer, multiple: int = 8) -> int:
    n = len(tokenizer)
    return (n + multiple - 1) // multiple * multiple


# ----------------------------------------------------------------------------------------------------------
# Text encoders.
# ----------------------------------------------------------------------------------------------------------

def t5_encoder(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def clip_text_encoder(vocab_size: int, hidden: int = 32, with_projection: bool = False):
    """Tiny ``CLIPTextModel`` (``CLIPTextModelWithProjection`` with ``with_projection``, ``hidden`` wide)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
        attention_dropout=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def gemma2_encoder(tokenizer, hidden: int = 32, num_layers: int = 2):
    """Tiny ``Gemma2Model`` (``hidden`` wide), the text encoder kind of Sana."""
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(
        vocab_size=vocab_size(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        query_pre_attn_scalar=16, sliding_window=64, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return Gemma2Model(cfg).eval()


def gemma3_encoder(tokenizer, hidden: int = 32, num_layers: int = 2):
    """Tiny ``Gemma3ForConditionalGeneration`` (text tower ``hidden`` wide; 1-layer SigLIP vision tower)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text_cfg = Gemma3TextConfig(
        vocab_size=vocab_size(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        query_pre_attn_scalar=16, sliding_window=64, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision_cfg = SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
        image_size=28, patch_size=14, vision_use_head=False,
    )
    ids = tokenizer.convert_tokens_to_ids
    cfg = Gemma3Config(
        text_config=text_cfg, vision_config=vision_cfg, mm_tokens_per_image=4,
        boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    return Gemma3ForConditionalGeneration(cfg).eval()


