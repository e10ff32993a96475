"""Exceptions of the codec."""


class HQFormatError(ValueError):
    """A serialized or in-memory encoded tensor is corrupt, truncated, or of an unsupported version."""


class HQRangeError(ValueError):
    """A tensor holds magnitudes the codec cannot represent.

    Raised by :func:`~hq_diffusion.codec.encode` (never a silent Inf or a silently zeroed row) when

    - some ``|w|`` exceeds :data:`~hq_diffusion.codec.core.MAX_ABS_VALUE` (the float32 rotation would
      overflow), or
    - a row that is not all zeros has an RMS that its scale dtype rounds to 0 (too small, e.g. a row of
      1e-8 or 1e-30 with float16 scales) or to Inf (too large, e.g. 1e6 with float16 scales).

    A row of exact zeros is not an error: it encodes exactly, with scale 0. The message names the tensor
    (the layer key when it is a name), the offending range and the fix (``scale_dtype='float32'``)."""
