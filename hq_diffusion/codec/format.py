"""The encoded tensor and its self-describing, versioned, checksummed byte format.

Byte layout (little-endian), version 1::

    header   "HQCT" u8 version, u8 lattice, u8 dtype, u8 scale dtype, u8 ndim, u8 log2(tile),
             u8 log2(block), u8 flags, u32 × ndim shape, u32 seed, u32 key, f32 alpha,
             per stream: u32 n, u32 unary bytes, u32 remainder bytes, u32 escapes
    payload  scales (rows × scale dtype), then per stream: ks (NB × u8), offsets (NB × i32),
             unary bytes, remainder bytes, escapes (E × i32)
    crc32    u32 over everything before it

Scale dtype ids: 0 float16, 1 bfloat16, 2 float32 (rows values each), 3 log8 (both versions): the scale section
is then ``f32 offset, f32 step, rows × u8 code`` (:mod:`.scales`; code 0 is an all-zero row); its grid is
checked on read (finite, step ≥ 0, every code a normal float32 scale). A build that predates id 3 rejects such a
blob with "unknown ... scale dtype id"; blobs with ids 0–2 are unchanged, byte for byte.

Version 2 (written for ``coder="rans"``; Rice tensors are still written as version 1, byte for byte as
before) inserts ``u8 coder`` after the fixed header and describes each stream as ``u32 n, u8 prec,
u16 T, u32 words, u32 escapes``; its payload per stream is ``freqs (C × T u16), states (NB × 8 u32),
offsets (NB × u32), words (W × u16), escapes (E × i32)`` (:mod:`.rans`; C = 2 for E8's stream, else 1).

``EncodedTensor.total_bits`` is exactly ``8 * len(to_bytes())``: every stored bit counts in the rate.

:meth:`EncodedTensor.from_bytes` checks every header field's range before it allocates anything: ids, ndim,
flags, the tile against the row length (only a tile an encoder's plan, :func:`~.rht.plan_tiles` or
:func:`~.rht.legacy_plan_tiles`, can choose for that length, so the padded row is at most ``3n + 8`` long), α in :data:`ALPHA_RANGE`, and each stream's
sizes against its symbol count (a Rice code spends at least one unary bit and at most ``ESC + 1`` per
symbol, ``KMAX`` remainder bits, at most one escape per ``ESC + 1`` unary bits) and the declared sizes
against the blob length. A blob therefore cannot claim more symbols than 8 per byte it holds, and
decoding costs memory and time linear in the output size. For rANS streams the tables are checked
(precision 12–15, 2 ≤ T ≤ 256, rows summing to M, no entry above 15/16 of M) and a stream must store at
least one word per 172 symbols beyond what its states hold (what the frequency cap guarantees).
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

import torch

from .config import FORMAT_VERSION, SCALE_DTYPES
from .scales import check_log8_grid, log8_grid, scale_count
from .errors import HQFormatError

from . import rans
from .rans import RansStream
from .rht import decodable_tiles
from .rice import ESC, KMAX, RiceStream, _num_blocks
from .strip import NUM_STREAMS, stream_lengths

MAGIC = b"HQCT"
LATTICE_IDS = {"e8": 0, "d4": 1, "a2": 2, "z": 3}
DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
SCALE_IDS = {"float16": 0, "bfloat16": 1, "float32": 2, "log8": 3}
FLAG_FITS_INT8 = 1
_FIXED = struct.Struct("<4sBBBBBBBB")
_TAIL = struct.Struct("<IIf")
_STREAM = struct.Struct("<IIII")
_MAX_NDIM = 8
VERSIONS = (1, 2)  # formats this build reads: 1 (Rice), 2 (coder byte; rANS)
CODER_IDS = {"rice": 0, "rans": 1}
_RANS_STREAM = struct.Struct("<IBHII")
_SYMBOLS_PER_WORD = 256  # at most this many symbols per stored word or half state (see rans.max_freq)
#: Range of the operating point α that :func:`~hq_diffusion.codec.encode` writes and ``from_bytes`` accepts
#: (the encoder's α lies in about [0.01, 3e4]; outside this range a decode could overflow).
ALPHA_RANGE = (2.0**-24, 2.0**24)


def _inv(d: dict):
    return {v: k for k, v in d.items()}


def header_bytes(ndim: int, num_streams: int, coder: str = "rice") -> int:
    """Bytes of the fixed-size parts of a blob: header, shape, per-stream headers and the CRC."""
    if coder == "rans":
        return _FIXED.size + 1 + 4 * ndim + _TAIL.size + _RANS_STREAM.size * num_streams + 4
    return _FIXED.size + 4 * ndim + _TAIL.size + _STREAM.size * num_streams + 4


def rans_contexts(lattice: str, stream: int) -> int:
    """Contexts of a lattice's rANS stream: 2 for E8 (coordinates 1–7, coordinate 8), else 1."""
    return 2 if lattice == "e8" and stream == 0 else 1


@dataclass
class EncodedTensor:
    """A tensor encoded by :func:`hq_diffusion.codec.encode`.

    Shapes (R = rows = numel / n, n = last dimension of ``shape``, n_pad = ``n`` padded to the tile):
        scales: the stored scale section (:mod:`.scales`): (R,) in ``scale_dtype`` — the RMS of each rotated row —
            or for ``scale_dtype="log8"`` uint8 (8 + R,): the grid (float32 offset, step), then one code per row.
            :func:`~.scales.scale_values` gives the float32 (R,) scales of either.
        streams: coded symbol streams (see :mod:`strip`; :mod:`rice` or :mod:`rans` by ``coder``).
    The lattice integers ``Y`` (R, n_pad) reconstruct the rotated row as ``p(Y) / alpha * scale``.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    lattice: str
    tile: int
    block: int
    seed: int
    key: int
    alpha: float
    scale_dtype: str
    scales: torch.Tensor
    streams: list[RiceStream] | list[RansStream]
    fits_int8: bool
    version: int = FORMAT_VERSION
    meta: dict = field(default_factory=dict)  # not serialized: encode-time statistics
    coder: str = "rice"

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.shape[-1] if len(self.shape) else 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.numel // self.n

    @property
    def n_pad(self) -> int:
        return -(-self.n // self.tile) * self.tile

    @property
    def codes_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-1], self.n_pad) if len(self.shape) else (self.n_pad,)

    @property
    def total_bits(self) -> int:
        """Every stored bit: header, scales, block headers, payload, checksum."""
        return 8 * self.serialized_size

    @property
    def bps(self) -> float:
        return self.total_bits / self.numel

    @property
    def serialized_size(self) -> int:
        return header_bytes(len(self.shape), len(self.streams), self.coder) + self.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by the tensors of this object (scales and streams)."""
        return self.scales.numel() * self.scales.element_size() + sum(s.nbytes for s in self.streams)

    def to(self, device) -> "EncodedTensor":
        if self.coder == "rans":
            streams = [s.to(device) for s in self.streams]
        else:
            streams = [RiceStream(s.n, s.block, *(t.to(device) for t in s.tensors().values()))
                       for s in self.streams]
        return EncodedTensor(self.shape, self.dtype, self.lattice, self.tile, self.block, self.seed, self.key,
                             self.alpha, self.scale_dtype, self.scales.to(device), streams, self.fits_int8,
                             self.version, dict(self.meta), self.coder)

    # ---- serialization -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        flags = FLAG_FITS_INT8 if self.fits_int8 else 0
        rans_coded = self.coder == "rans"
        parts = [
            _FIXED.pack(MAGIC, 2 if rans_coded else self.version, LATTICE_IDS[self.lattice], DTYPE_IDS[self.dtype],
                        SCALE_IDS[self.scale_dtype], len(self.shape), self.tile.bit_length() - 1,
                        self.block.bit_length() - 1, flags),
            bytes([CODER_IDS["rans"]]) if rans_coded else b"",
            struct.pack(f"<{len(self.shape)}I", *self.shape),
            _TAIL.pack(self.seed, self.key, self.alpha),
        ]
        if rans_coded:
            for s in self.streams:
                parts.append(_RANS_STREAM.pack(s.n, s.prec, s.freqs.shape[1], s.words.numel(), s.escapes.numel()))
            parts.append(_tensor_bytes(self.scales))
            for s in self.streams:
                parts += [_tensor_bytes(t) for t in s.tensors().values()]
            body = b"".join(parts)
            return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)
        for s in self.streams:
            parts.append(_STREAM.pack(s.n, s.unary.numel(), s.rem.numel(), s.escapes.numel()))
        parts.append(_tensor_bytes(self.scales))
        for s in self.streams:
            parts += [_tensor_bytes(s.ks), _tensor_bytes(s.offsets), _tensor_bytes(s.unary),
                      _tensor_bytes(s.rem), _tensor_bytes(s.escapes)]
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> "EncodedTensor":
        """Parse and validate a blob. Raises :class:`HQFormatError` on any corruption or version mismatch."""
        blob = memoryview(bytes(blob))
        if len(blob) < _FIXED.size + _TAIL.size + 4:
            raise HQFormatError(f"blob of {len(blob)} bytes is too short to be an encoded tensor")
        magic, version, lat, dt, sdt, ndim, ltile, lblock, flags = _FIXED.unpack_from(blob, 0)
        if magic != MAGIC:
            raise HQFormatError(f"bad magic {magic!r}: not an hq-diffusion encoded tensor")
        if version not in VERSIONS:
            raise HQFormatError(f"encoded tensor has format version {version}; this build reads {VERSIONS}")
        body, (crc,) = blob[:-4], struct.unpack("<I", blob[-4:])
        if zlib.crc32(body) & 0xFFFFFFFF != crc:
            raise HQFormatError("checksum mismatch: the encoded tensor is corrupt or truncated")
        try:
            lattice = _inv(LATTICE_IDS)[lat]
            dtype = _inv(DTYPE_IDS)[dt]
            scale_dtype = _inv(SCALE_IDS)[sdt]
        except KeyError:
            raise HQFormatError("unknown lattice, dtype or scale dtype id in header") from None
        if ndim > _MAX_NDIM or not (3 <= ltile <= 11) or not (3 <= lblock <= 20) or flags & ~FLAG_FITS_INT8:
            raise HQFormatError("header field out of range")
        if len(body) < header_bytes(ndim, 0) - 4:
            raise HQFormatError("encoded tensor is truncated")
        off = _FIXED.size
        coder = "rice"
        if version == 2:
            coder = _inv(CODER_IDS).get(blob[off])
            if coder is None:
                raise HQFormatError(f"unknown coder id {blob[off]} in header")
            off += 1
            if len(body) < header_bytes(ndim, 0, coder) - 4:
                raise HQFormatError("encoded tensor is truncated")
        shape = struct.unpack_from(f"<{ndim}I", blob, off)
        off += 4 * ndim
        if any(d == 0 for d in shape):
            raise HQFormatError(f"empty shape {shape}")
        seed, key, alpha = _TAIL.unpack_from(blob, off)
        off += _TAIL.size
        if not (math.isfinite(alpha) and ALPHA_RANGE[0] <= alpha <= ALPHA_RANGE[1]):
            raise HQFormatError(f"invalid alpha {alpha!r}: must be finite and in [{ALPHA_RANGE[0]:.3g}, "
                                f"{ALPHA_RANGE[1]:.3g}]")
        tile, block = 1 << ltile, 1 << lblock
        n = shape[-1] if ndim else 1
        numel = math.prod(shape)
        if tile not in _encoder_tiles(n):
            raise HQFormatError(f"tile {tile} is not one the encoder uses for rows of {n} (expected one of "
                                f"{sorted(_encoder_tiles(n))})")
        n_pad = -(-n // tile) * tile
        rows = numel // n
        expect_n = stream_lengths(lattice, rows * n_pad)
        if coder == "rans":
            return cls._rans_from(blob, body, off, (shape, dtype, lattice, tile, block, seed, key, float(alpha),
                                                    scale_dtype, rows, expect_n, flags, version))
        stream_heads = []
        need = _scale_bytes(scale_dtype, rows)
        for i in range(NUM_STREAMS[lattice]):
            if off + _STREAM.size > len(body):
                raise HQFormatError("truncated stream header")
            sn, ub, rb, ne = _STREAM.unpack_from(blob, off)
            off += _STREAM.size
            if sn != expect_n[i]:
                raise HQFormatError(f"stream {i} has {sn} symbols, expected {expect_n[i]}")
            _check_stream_sizes(i, sn, ub, rb, ne)
            stream_heads.append((sn, ub, rb, ne))
            need += 5 * _num_blocks(sn, block) + ub + rb + 4 * ne
        if need != len(body) - off:
            raise HQFormatError(f"header declares {need} payload bytes but the blob holds {len(body) - off}")
        reader = _Reader(body, off)
        scales = _take_scales(reader, scale_dtype, rows)
        streams = []
        for sn, ub, rb, ne in stream_heads:
            nb = _num_blocks(sn, block)
            ks = reader.take(nb, torch.uint8)
            offs = reader.take(nb, torch.int32)
            unary = reader.take(ub, torch.uint8)
            rem = reader.take(rb, torch.uint8)
            esc = reader.take(ne, torch.int32)
            if nb and int(ks.max()) > KMAX:
                raise HQFormatError(f"Rice parameter {int(ks.max())} exceeds the maximum {KMAX}")
            streams.append(RiceStream(sn, block, ks, offs, unary, rem, esc))
        if reader.off != len(body):
            raise HQFormatError(f"{len(body) - reader.off} unexpected trailing bytes")
        return cls(tuple(shape), dtype, lattice, tile, block, seed, key, float(alpha), scale_dtype, scales,
                   streams, bool(flags & FLAG_FITS_INT8), version)

    @classmethod
    def _rans_from(cls, blob, body, off: int, head) -> "EncodedTensor":
        """The rANS part of :meth:`from_bytes` (format version 2): stream headers, sizes, tables."""
        shape, dtype, lattice, tile, block, seed, key, alpha, scale_dtype, rows, expect_n, flags, version = head
        heads, need = [], _scale_bytes(scale_dtype, rows)
        for i in range(NUM_STREAMS[lattice]):
            if off + _RANS_STREAM.size > len(body):
                raise HQFormatError("truncated stream header")
            sn, prec, t, nw, ne = _RANS_STREAM.unpack_from(blob, off)
            off += _RANS_STREAM.size
            nb, nctx = rans.num_blocks(sn, block), rans_contexts(lattice, i)
            if sn != expect_n[i]:
                raise HQFormatError(f"stream {i} has {sn} symbols, expected {expect_n[i]}")
            if not (rans.PREC_RANGE[0] <= prec <= rans.PREC_RANGE[1] and 2 <= t <= rans.MAX_TABLE):
                raise HQFormatError(f"stream {i}: rANS precision {prec} or table size {t} out of range")
            if nw > sn or ne > sn or sn > _SYMBOLS_PER_WORD * (nw + 2 * rans.LANES * nb + 1):
                raise HQFormatError(f"stream {i}: {nw} words and {ne} escapes do not fit {sn} symbols")
            heads.append((sn, prec, t, nw, ne, nb, nctx))
            need += 2 * nctx * t + 4 * rans.LANES * nb + 4 * nb + 2 * nw + 4 * ne
        if need != len(body) - off:
            raise HQFormatError(f"header declares {need} payload bytes but the blob holds {len(body) - off}")
        reader = _Reader(body, off)
        scales = _take_scales(reader, scale_dtype, rows)
        streams = []
        for sn, prec, t, nw, ne, nb, nctx in heads:
            freqs = reader.take(nctx * t, torch.uint16).reshape(nctx, t)
            states = reader.take(nb * rans.LANES, torch.uint32).reshape(nb, rans.LANES)
            offs = reader.take(nb, torch.uint32)
            st = RansStream(sn, block, prec, freqs, states, offs, reader.take(nw, torch.uint16),
                            reader.take(ne, torch.int32))
            rans.check_tables(st, nctx)
            streams.append(st)
        return cls(tuple(shape), dtype, lattice, tile, block, seed, key, alpha, scale_dtype, scales, streams,
                   bool(flags & FLAG_FITS_INT8), FORMAT_VERSION, coder="rans")


def _scale_bytes(scale_dtype: str, rows: int) -> int:
    """Bytes of the stored scale section of ``rows`` rows (a log8 grid's 8 bytes included)."""
    return scale_count(scale_dtype, rows) * SCALE_DTYPES[scale_dtype].itemsize


def _take_scales(reader: "_Reader", scale_dtype: str, rows: int) -> torch.Tensor:
    """The scale section of a blob, validated: float scales finite and non-negative, a log8 grid valid
    (:func:`~.scales.check_log8_grid`); HQFormatError otherwise."""
    scales = reader.take(scale_count(scale_dtype, rows), SCALE_DTYPES[scale_dtype])
    if scale_dtype == "log8":
        check_log8_grid(*log8_grid(scales))
    elif not torch.isfinite(scales.float()).all() or (scales.float() < 0).any():
        raise HQFormatError("row scales must be finite and non-negative")
    return scales


def _encoder_tiles(n: int) -> set[int]:
    """The tiles an encoder chooses for rows of ``n`` at some allowed maximum tile: the current
    :func:`~.rht.plan_tiles` and the first encoder's :func:`~.rht.legacy_plan_tiles` (blobs written with it
    still decode; the tile is recorded in the header)."""
    return decodable_tiles(n)


def _check_stream_sizes(i: int, sn: int, ub: int, rb: int, ne: int) -> None:
    """Sizes of one stream's parts against its ``sn`` symbols (HQFormatError when impossible): unary
    bytes ``ceil(sn/8) .. ceil(sn·(ESC+1)/8)``, remainder bytes ``≤ KMAX·ceil(sn/8)``, escapes ``≤`` one per
    ``ESC + 1`` unary bits."""
    if not -(-sn // 8) <= ub <= -(-sn * (ESC + 1) // 8):
        raise HQFormatError(f"stream {i}: {ub} unary bytes cannot hold {sn} symbols")
    if rb > KMAX * -(-sn // 8):
        raise HQFormatError(f"stream {i}: {rb} remainder bytes exceed {KMAX} bits per symbol of {sn}")
    if ne * (ESC + 1) > 8 * ub:
        raise HQFormatError(f"stream {i}: {ne} escapes cannot fit in {ub} unary bytes")


class _Reader:
    def __init__(self, buf: bytes, off: int):
        self.buf, self.off = buf, off

    def take(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        size = count * torch.empty(0, dtype=dtype).element_size()
        if self.off + size > len(self.buf):
            raise HQFormatError("encoded tensor is truncated")
        raw = bytearray(self.buf[self.off:self.off + size])  # a writable copy the tensor keeps alive
        self.off += size
        if count == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(raw, dtype=dtype)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
