"""Exceptions of the codec."""


class HQFormatError(ValueError):
    """A serialized or in-memory encoded tensor is corrupt, truncated, or of an unsupported version."""
