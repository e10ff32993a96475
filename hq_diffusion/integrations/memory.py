"""The C heap's freed pages, given back to the system between layers (encoders allocate and free several times
a layer's float bytes; glibc keeps much of that mapped)."""
from __future__ import annotations


def _libc_malloc_trim():
    """glibc's ``malloc_trim`` (None where the C library has none: musl, macOS, Windows)."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # no C library to open by None (Windows)
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim(0)``, all arenas); True if it ran.

    The encoder of one layer allocates and frees several times the layer's float bytes, partly in the arenas of
    torch's worker threads; glibc keeps such freed memory mapped (only the top of each heap is trimmed
    automatically), so without this the process's RSS keeps every layer's left-over work space — measured on
    the LTX-2 slice (BENCHMARKS.md §20b): +0.35 GB over the finished model. Called after each layer by
    quantize-on-load and :func:`~.quantize.quantize`, and by the conversion after large layers
    (:func:`release_after_layer`). Where the C library has no ``malloc_trim`` this does nothing and returns
    False (the encoding itself is unaffected)."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


#: A layer of fewer float bytes than this is not followed by a trim in the conversion (:func:`release_after_layer`).
TRIM_MIN_BYTES = 16 << 20


def release_after_layer(nbytes: int) -> bool:
    """:func:`release_freed_memory` after encoding a layer of ``nbytes`` float weight bytes, only when ``nbytes ≥``
    :data:`TRIM_MIN_BYTES`; True if it ran.

    The encoder's work space is several times the layer's float bytes; what a small layer leaves in the heap
    is small and the next layer reuses it, while trimming after it costs the next layer the page faults of
    mapping it again: on a narrow LTX-2 slice whose layers are all under 16 MiB, trimming after every layer
    cost 8 % of the 2-worker encode throughput and 15 % of one worker's (BENCHMARKS.md §27)."""
    return release_freed_memory() if nbytes >= TRIM_MIN_BYTES else False
