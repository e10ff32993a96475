"""Frame / audio quality metrics for comparing a quantized pipeline's output with a reference.

Conventions
-----------
* Frames are ``numpy.ndarray`` of dtype ``uint8`` and shape ``(F, H, W, 3)`` (RGB, F frames;
  a single image is ``F == 1`` -- use ``img[None]`` for an ``(H, W, 3)`` image).  ``ref`` and
  ``test`` must have identical shapes.  Anything else raises ``ValueError`` naming the
  offending shapes / dtypes.
* Per-frame metrics return ``numpy.ndarray`` of dtype ``float64`` and shape ``(F,)``
  (``flicker_psnr``: ``(F - 1,)``).
* PSNR of identical frames is ``+inf`` (not an error).  ``summarize`` computes its statistics
  over the *finite* values only and reports how many ``+inf`` / ``-inf`` / NaN values were
  skipped; a statistic with no finite value to summarize is ``None``.  Its output never
  contains a non-finite float, so it is JSON-safe as is.

LPIPS
-----
``LPIPSMetric`` never touches the network.  The LPIPS linear layers ship inside the ``lpips``
wheel; the backbone (torchvision ImageNet weights) must already be in the torch hub cache
(``torch.hub.get_dir()/checkpoints/<file>``, see ``LPIPS_BACKBONE_FILES``) or a full
``lpips.LPIPS`` state dict must be passed as ``weights_path``.  Otherwise ``available`` is
False and ``reason`` says what is missing.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Iterable

import numpy as np

__all__ = [
    "psnr_per_frame",
    "ssim_per_frame",
    "flicker_psnr",
    "audio_snr_db",
    "summarize",
    "LPIPSMetric",
    "make_plumbing_weights",
    "lpips_backbone_cache_path",
    "LPIPS_BACKBONE_FILES",
    "LPIPS_MIN_SIDE",
    "ssim_win_size",
]

# File names torchvision's ``load_state_dict_from_url`` stores in ``<hub dir>/checkpoints``
# for the ImageNet weights lpips uses (basename of the download URL of
# AlexNet_Weights / VGG16_Weights / SqueezeNet1_1_Weights .IMAGENET1K_V1).
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}

# Smallest H and W each lpips backbone accepts (below that a pooling layer gets an empty input).
LPIPS_MIN_SIDE = {"alex": 31, "vgg": 16, "squeeze": 17}

# Marker key stored by ``make_plumbing_weights`` so a loaded file can be recognised.
_PLUMBING_MARKER = "__hq_plumbing_weights__"

# Pixels per PSNR chunk: caps the int32 temporary at ~64 MiB for long/large videos.
_PSNR_CHUNK_ELEMS = 16 * 1024 * 1024


# --------------------------------------------------------------------------- validation
def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"shape={x.shape} dtype={x.dtype}"
    return f"type={type(x).__name__}"


def _check_frames(ref: Any, test: Any, fn: str) -> None:
    """Raise ValueError unless ref/test are uint8 (F, H, W, 3) arrays of the same shape."""
    for name, a in (("ref", ref), ("test", test)):
        if not isinstance(a, np.ndarray):
            raise ValueError(f"{fn}: {name} must be a numpy uint8 array of shape (F, H, W, 3), "
                             f"got {_describe(a)}")
        if a.dtype != np.uint8:
            raise ValueError(f"{fn}: {name} must have dtype uint8 (0..255 RGB), got "
                             f"{_describe(a)}; convert with e.g. "
                             f"(np.clip(x, 0, 1) * 255).round().astype(np.uint8)")
        if a.ndim != 4 or a.shape[-1] != 3:
            hint = " (single image? use img[None])" if a.ndim == 3 else ""
            raise ValueError(f"{fn}: {name} must have shape (F, H, W, 3), got "
                             f"{_describe(a)}{hint}")
        if min(a.shape[:3]) < 1:
            raise ValueError(f"{fn}: {name} is empty: {_describe(a)}")
    if ref.shape != test.shape:
        raise ValueError(f"{fn}: shape mismatch: ref {_describe(ref)} vs test {_describe(test)}")


def _psnr_from_sse(sse: np.ndarray, n: int, peak: float) -> np.ndarray:
    """PSNR (float64) from integer sums of squared errors over ``n`` elements; sse==0 -> inf."""
    sse = np.asarray(sse, dtype=np.float64)
    mse = sse / float(n)
    out = np.full(sse.shape, np.inf, dtype=np.float64)
    nz = mse > 0
    out[nz] = 10.0 * np.log10((peak * peak) / mse[nz])
    return out


def _sse_per_frame(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact int64 sum of squared differences per frame of two integer (F, ...) arrays."""
    f = a.shape[0]
    per = int(np.prod(a.shape[1:]))
    step = max(1, _PSNR_CHUNK_ELEMS // max(per, 1))
    out = np.empty(f, dtype=np.int64)
    for s in range(0, f, step):
        d = a[s:s + step].astype(np.int32) - b[s:s + step].astype(np.int32)
        d *= d  # |d| <= 510 for uint8, <= 1020 for int16 diffs: fits int32 squared
        out[s:s + step] = d.reshape(d.shape[0], -1).sum(axis=1, dtype=np.int64)
    return out


# --------------------------------------------------------------------------- PSNR / SSIM
def psnr_per_frame(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-frame PSNR in dB, ``10 * log10(255**2 / MSE)`` over all pixels and channels.

    Args:
        ref, test: uint8 arrays of shape (F, H, W, 3).
    Returns:
        float64 array of shape (F,); ``+inf`` for frames that are identical.
    """
    _check_frames(ref, test, "psnr_per_frame")
    sse = _sse_per_frame(ref, test)
    return _psnr_from_sse(sse, int(np.prod(ref.shape[1:])), 255.0)


def ssim_win_size(h: int, w: int) -> int:
    """SSIM window used for an H x W frame: 7 (skimage default), or for frames smaller than
    7 px on a side the largest odd size <= min(H, W); frames under 3 px raise ValueError."""
    m = min(int(h), int(w))
    if m >= 7:
        return 7
    if m < 3:
        raise ValueError(f"ssim_per_frame: frames of {h}x{w} are too small for SSIM "
                         f"(need at least 3x3)")
    return m if m % 2 == 1 else m - 1


def ssim_per_frame(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-frame SSIM via ``skimage.metrics.structural_similarity(channel_axis=-1,
    data_range=255)`` (mean of the per-channel SSIMs, default 7x7 uniform window).

    Frames smaller than 7 px on a side use the largest odd ``win_size`` <= min(H, W)
    (see ``ssim_win_size``); frames smaller than 3x3 raise ValueError.

    Args:
        ref, test: uint8 arrays of shape (F, H, W, 3).
    Returns:
        float64 array of shape (F,); 1.0 for identical frames.
    """
    _check_frames(ref, test, "ssim_per_frame")
    from skimage.metrics import structural_similarity

    win = ssim_win_size(ref.shape[1], ref.shape[2])
    out = np.empty(ref.shape[0], dtype=np.float64)
    for i in range(ref.shape[0]):  # skimage has no batch axis
        out[i] = structural_similarity(ref[i], test[i], channel_axis=-1, data_range=255,
                                       win_size=win)
    return out


def flicker_psnr(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Temporal-consistency PSNR: PSNR between the frame-to-frame differences of ref and test.

    ``d_ref = diff(ref, axis=0)`` and ``d_test = diff(test, axis=0)`` as int16 (range -255..255,
    so data range / peak = 510); ``PSNR_k = 10 * log10(510**2 / MSE(d_ref[k], d_test[k]))``.
    A quantized video that flickers where the reference is steady scores low; a constant
    offset between ref and test (no temporal change) scores ``+inf``.

    Args:
        ref, test: uint8 arrays of shape (F, H, W, 3).
    Returns:
        float64 array of shape (F - 1,) (empty when F == 1); ``+inf`` where the differences agree.
    """
    _check_frames(ref, test, "flicker_psnr")
    if ref.shape[0] < 2:
        return np.empty(0, dtype=np.float64)
    d_ref = np.diff(ref.astype(np.int16), axis=0)
    d_test = np.diff(test.astype(np.int16), axis=0)
    sse = _sse_per_frame(d_ref, d_test)
    return _psnr_from_sse(sse, int(np.prod(ref.shape[1:])), 510.0)


# --------------------------------------------------------------------------- audio
def audio_snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """SNR of ``test`` against ``ref`` in dB: ``10 * log10(sum(ref**2) / sum((ref - test)**2))``.

    Args:
        ref, test: real arrays of shape (T,) or (C, T) (channels first) with the same ndim and
            channel count; float (any scale) or integer PCM.  Both are trimmed to the shorter T.
    Returns:
        Python float; ``+inf`` when identical (after trimming), ``-inf`` when the reference is
        silent but the test is not.
    """
    r = np.asarray(ref)
    t = np.asarray(test)
    for name, a in (("ref", r), ("test", t)):
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"audio_snr_db: {name} must be a real float/int array, got "
                             f"{_describe(a)}")
        if a.ndim not in (1, 2):
            raise ValueError(f"audio_snr_db: {name} must have shape (T,) or (C, T), got "
                             f"{_describe(a)}")
        if a.size and not np.all(np.isfinite(a)):
            raise ValueError(f"audio_snr_db: {name} contains NaN/inf")
    if r.ndim != t.ndim or (r.ndim == 2 and r.shape[0] != t.shape[0]):
        raise ValueError(f"audio_snr_db: channel layout mismatch: ref {_describe(r)} vs test "
                         f"{_describe(t)} (expected (T,) or (C, T) with equal C)")
    n = min(r.shape[-1], t.shape[-1])
    if n == 0:
        raise ValueError(f"audio_snr_db: empty audio: ref {_describe(r)} test {_describe(t)}")
    r = r[..., :n].astype(np.float64)
    t = t[..., :n].astype(np.float64)
    sig = float(np.sum(r * r))
    noise = float(np.sum((r - t) ** 2))
    if noise == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / noise)


# --------------------------------------------------------------------------- summary
def _as_float_array(values: Any) -> np.ndarray:
    """1-D float64 array from an array / iterable of numbers, ``None`` (-> NaN) or the JSON
    spellings "inf" / "-inf" / "nan" (as written by ``report.write_json_atomic``)."""
    if values is None:
        return np.empty(0, dtype=np.float64)
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values.astype(np.float64).ravel()
    return np.array([np.nan if v is None else float(v) for v in np.ravel(np.asarray(values, dtype=object))],
                    dtype=np.float64)


def summarize(values: Iterable[float] | np.ndarray | None) -> dict:
    """JSON-safe summary of a 1-D collection of numbers.

    Returns ``{"mean", "median", "min", "max", "count", "n_finite", "n_inf", "n_neg_inf",
    "n_nan"}``.  ``mean``/``median``/``min``/``max`` are Python floats computed over the
    finite values only, or ``None`` when there is no finite value (e.g. every frame was
    identical and PSNR is ``+inf`` everywhere: then ``n_inf == count``).  When ``n_inf > 0``
    the true maximum (and, if mixed, mean) is +inf; the finite statistics ignore those frames.
    ``None`` in ``values`` (e.g. an unavailable metric) counts as NaN; the strings
    "inf" / "-inf" (JSON spelling used by ``report.write_json_atomic``) are accepted.
    """
    arr = _as_float_array(values)
    fin = arr[np.isfinite(arr)]
    out: dict[str, Any] = {
        "mean": None, "median": None, "min": None, "max": None,
        "count": int(arr.size),
        "n_finite": int(fin.size),
        "n_inf": int(np.sum(np.isposinf(arr))),
        "n_neg_inf": int(np.sum(np.isneginf(arr))),
        "n_nan": int(np.sum(np.isnan(arr))),
    }
    if fin.size:
        out["mean"] = float(np.mean(fin))
        out["median"] = float(np.median(fin))
        out["min"] = float(np.min(fin))
        out["max"] = float(np.max(fin))
    return out


# --------------------------------------------------------------------------- LPIPS
def lpips_backbone_cache_path(net: str = "alex") -> str:
    """Where torchvision keeps (or would download) the ImageNet backbone ``net`` uses:
    ``torch.hub.get_dir()/checkpoints/<LPIPS_BACKBONE_FILES[net]>``.  Does not download."""
    import torch

    _check_net(net)
    return os.path.join(torch.hub.get_dir(), "checkpoints", LPIPS_BACKBONE_FILES[net])


def _check_net(net: str) -> None:
    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")


def _build_lpips_model(net: str, pretrained_lin: bool = True):
    """lpips.LPIPS with a randomly initialised backbone (``pnet_rand=True``: torchvision is
    never asked for weights, so nothing is downloaded) and, if ``pretrained_lin``, the linear
    layers shipped inside the lpips wheel."""
    import lpips

    with warnings.catch_warnings():  # torchvision's 'pretrained is deprecated' warnings
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net=net, pretrained=pretrained_lin, pnet_rand=True, verbose=False)


def _backbone_state_from_torchvision(model, tv_state: dict) -> dict:
    """Map a torchvision ``features.N.*`` state dict onto lpips' ``net.sliceK.N.*`` keys."""
    mapped = {}
    missing = []
    for key in model.net.state_dict().keys():
        slice_name, rest = key.split(".", 1)  # 'slice2', '3.weight'
        src = "features." + rest
        if src not in tv_state:
            missing.append(src)
            continue
        mapped[key] = tv_state[src]
    if missing:
        raise KeyError(f"backbone file lacks {len(missing)} expected keys, e.g. {missing[:3]}")
    return mapped


class LPIPSMetric:
    """Batched LPIPS distance (lower is better; 0 for identical frames) between uint8 frames.

    Construction never touches the network.  Weights come from, in order:

    1. ``weights_path``: a ``torch.save``-d state dict of the *full* ``lpips.LPIPS`` model
       (backbone + linear layers), loaded strictly;
    2. the torchvision backbone file already in the torch hub cache
       (``lpips_backbone_cache_path(net)``), combined with the linear layers shipped in the
       lpips wheel.

    If neither is usable, ``available`` is False and ``reason`` explains why; calling the
    metric then raises RuntimeError.  A ``weights_path`` that exists but fails to load also
    gives ``available=False`` (reason carries the error) rather than raising.

    ``plumbing`` is True when the weights came from ``make_plumbing_weights``: such numbers
    exercise the code path only and are NOT perceptual quality numbers.

    Args:
        net: "alex" (default), "vgg" or "squeeze".
        weights_path: optional full-model state dict file.
        device: torch device string for the model and inputs.
        batch_size: frames per forward pass.
    Attributes:
        available (bool), reason (str | None), source (str | None: where weights came from),
        plumbing (bool), net (str), device (str).
    """

    def __init__(self, net: str = "alex", weights_path: str | os.PathLike | None = None,
                 device: str = "cpu", batch_size: int = 8):
        _check_net(net)
        if int(batch_size) < 1:
            raise ValueError(f"LPIPSMetric: batch_size must be >= 1, got {batch_size}")
        self.net = net
        self.device = device
        self.batch_size = int(batch_size)
        self.available = False
        self.reason: str | None = None
        self.source: str | None = None
        self.plumbing = False
        self._model = None

        import torch

        if weights_path is not None:
            weights_path = os.fspath(weights_path)
            if not os.path.isfile(weights_path):
                self.reason = f"LPIPS weights file {weights_path} does not exist"
                return
            try:
                state = torch.load(weights_path, map_location="cpu", weights_only=True)
                if not isinstance(state, dict):
                    raise TypeError(f"expected a state dict, got {type(state).__name__}")
                state = dict(state)
                self.plumbing = state.pop(_PLUMBING_MARKER, None) is not None
                model = _build_lpips_model(net, pretrained_lin=False)
                model.load_state_dict(state, strict=True)
            except Exception as e:  # noqa: BLE001 - reported via .reason
                self.reason = (f"could not load LPIPS ({net}) weights from {weights_path}: "
                               f"{type(e).__name__}: {e}")
                return
            self.source = weights_path
        else:
            cache = lpips_backbone_cache_path(net)
            if not os.path.isfile(cache):
                self.reason = (f"LPIPS backbone weights for {LPIPS_BACKBONE_FILES[net].split('-')[0]} "
                               f"not found in {cache}; pass --lpips-weights PATH or run once with "
                               f"internet access")
                return
            try:
                tv_state = torch.load(cache, map_location="cpu", weights_only=True)
                model = _build_lpips_model(net, pretrained_lin=True)
                model.net.load_state_dict(_backbone_state_from_torchvision(model, tv_state),
                                          strict=True)
            except Exception as e:  # noqa: BLE001
                self.reason = (f"could not load LPIPS backbone weights from {cache}: "
                               f"{type(e).__name__}: {e}")
                return
            self.source = cache
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self._model = model.to(device)
        self.available = True

    def __repr__(self) -> str:
        return (f"LPIPSMetric(net={self.net!r}, available={self.available}, "
                f"source={self.source!r}, plumbing={self.plumbing}, reason={self.reason!r})")

    def __call__(self, ref: np.ndarray, test: np.ndarray) -> np.ndarray:
        """LPIPS per frame.

        Args:
            ref, test: uint8 arrays of shape (F, H, W, 3); H and W must be at least
                ``LPIPS_MIN_SIDE[net]`` (alex 31, vgg 16, squeeze 17).
        Returns:
            float64 array of shape (F,).
        """
        if not self.available:
            raise RuntimeError(f"LPIPS unavailable: {self.reason}")
        _check_frames(ref, test, "LPIPSMetric")
        h, w = ref.shape[1:3]
        if min(h, w) < LPIPS_MIN_SIDE[self.net]:
            raise ValueError(f"LPIPSMetric: frames of {h}x{w} are too small for the {self.net} "
                             f"backbone (need H, W >= {LPIPS_MIN_SIDE[self.net]})")
        import torch

        def to_tensor(a: np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
            return t.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0  # [-1, 1] NCHW

        out = np.empty(ref.shape[0], dtype=np.float64)
        with torch.inference_mode():
            for s in range(0, ref.shape[0], self.batch_size):
                d = self._model(to_tensor(ref[s:s + self.batch_size]),
                                to_tensor(test[s:s + self.batch_size]))
                out[s:s + self.batch_size] = d.reshape(-1).double().cpu().numpy()
        return out


def make_plumbing_weights(path: str | os.PathLike, net: str = "alex", seed: int = 0) -> str:
    """Save a full ``lpips.LPIPS`` state dict with a RANDOMLY INITIALISED backbone (seeded;
    the linear layers are the ones shipped in the lpips wheel) to ``path``; return the path.

    FOR TESTS ONLY: it lets ``LPIPSMetric(weights_path=...)`` run without the ImageNet
    backbone.  Numbers computed with it are NOT perceptual-quality numbers; ``LPIPSMetric``
    flags them with ``plumbing=True``.  The global torch RNG state is left untouched.
    """
    import torch

    _check_net(net)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = _build_lpips_model(net, pretrained_lin=True)
    state = dict(model.state_dict())
    state[_PLUMBING_MARKER] = torch.ones(1)
    path = os.fspath(path)
    torch.save(state, path)
    return path
