"""Rice coding of non-negative int32 symbol streams in a split-stream layout (DESIGN.md §1.5).

A stream of ``n`` symbols is cut into blocks of ``B`` symbols (``B`` a multiple of 8); each block has its
own Rice parameter ``k`` chosen to minimize its coded length. Every Rice code ``z`` is split in two parts
kept in two byte arrays:

- ``unary``: the quotient ``q = z >> k`` as ``q`` zero bits followed by a one bit, all symbols of the
  stream concatenated (bit ``i`` of the stream is bit ``i & 7`` of byte ``i >> 3``). The positions of the
  one bits are the symbol ends, so ``q_i = pos_i − pos_{i−1} − 1`` decodes without a sequential parse.
- ``rem``: the low ``k`` bits of each symbol at fixed width. Each group of 8 consecutive symbols
  occupies exactly ``k`` bytes (the last group is zero-padded), so any group starts at a byte computable
  from the per-block ``k`` alone.

Quotients are bounded: a symbol with ``q ≥ ESC`` is written as exactly ``ESC`` zeros and a one, and its
full quotient goes into the int32 ``escapes`` array (in stream order). A decoder therefore never follows a
run longer than ``ESC`` zeros, and a stream with the wrong number of one bits, a longer run, or a
mismatched escape count is rejected. ``offsets`` holds the unary bit offset at which each block starts —
what a parallel decoder (one program per block) needs to begin anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import HQFormatError

ESC = 32  # longest unary run; quotients ≥ ESC are escaped
KMAX = 24  # largest Rice parameter
_CANDIDATES = (-1, 0, 1, 2)


@dataclass
class RiceStream:
    """One Rice-coded symbol stream.

    Attributes (NB = ceil(n / block) blocks, G = ceil(n / 8) groups of 8 symbols):
        n: number of symbols.
        block: symbols per block, a multiple of 8.
        ks: uint8 (NB,) Rice parameter of each block.
        offsets: int32 (NB,) unary-stream bit offset where each block starts.
        unary: uint8 (U,) unary quotient bits, LSB first.
        rem: uint8 (Σ_g k_g,) fixed-width remainders, k bytes per group of 8 symbols.
        escapes: int32 (E,) full quotients of the escaped symbols.
    """

    n: int
    block: int
    ks: torch.Tensor
    offsets: torch.Tensor
    unary: torch.Tensor
    rem: torch.Tensor
    escapes: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"ks": self.ks, "offsets": self.offsets, "unary": self.unary, "rem": self.rem,
                "escapes": self.escapes}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def _block_lengths(n: int, block: int, device) -> torch.Tensor:
    nb = _num_blocks(n, block)
    lens = torch.full((nb,), block, dtype=torch.int64, device=device)
    lens[-1] = n - (nb - 1) * block
    return lens


def coded_bits(z: torch.Tensor, k: torch.Tensor, lens: torch.Tensor, block: int) -> torch.Tensor:
    """Exact coded size in bits of each block for the given per-block ``k``.

    z: int32 (NB·block,) symbols zero-padded to whole blocks; k: int64 (NB,); lens: int64 (NB,) real
    symbols per block. Returns int64 (NB,): unary bits + remainder bytes·8 + 32 per escape.
    """
    zb = z.view(-1, block)
    q = zb >> k.to(torch.int32).unsqueeze(1)
    esc = (q >= ESC).sum(1, dtype=torch.int64)
    unary = q.clamp_max(ESC).sum(1, dtype=torch.int64) + lens  # padded zeros add 0 to Σq
    rem = ((lens + 7) // 8) * 8 * k
    return unary + rem + 32 * esc


def choose_k(z: torch.Tensor, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal per-block Rice parameter among candidates around the block mean.

    z: int32 (n,). Returns (ks int64 (NB,), bits int64 (NB,) the coded size of each block).
    """
    nb = _num_blocks(n, block)
    zp = torch.nn.functional.pad(z, (0, nb * block - n))
    lens = _block_lengths(n, block, z.device)
    mean = zp.view(nb, block).sum(1, dtype=torch.int64).double() / lens.double()
    # For a geometric source the optimal k is ≈ log2(mean · ln 2); evaluate its neighbours exactly.
    base = torch.floor(torch.log2(mean.clamp_min(1e-9) * 0.6931 + 1e-12)).clamp(0, KMAX).to(torch.int64)
    best_bits = best_k = None
    for d in _CANDIDATES:
        k = (base + d).clamp(0, KMAX)
        bits = coded_bits(zp, k, lens, block)
        if best_bits is None:
            best_bits, best_k = bits, k
        else:
            better = bits < best_bits
            best_bits = torch.where(better, bits, best_bits)
            best_k = torch.where(better, k, best_k)
    return best_k, best_bits


def stream_bits(z: torch.Tensor, block: int) -> int:
    """Total coded bits of ``z`` (int32 (n,)) with optimal per-block k, side information excluded."""
    _, bits = choose_k(z, z.numel(), block)
    return int(bits.sum())


_BYTE_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8 0/1 (8m,) → uint8 (m,), LSB first."""
    w = _BYTE_WEIGHTS.to(bits.device)
    return (bits.view(-1, 8) * w).sum(1, dtype=torch.uint8)


def _unpack_bits(b: torch.Tensor) -> torch.Tensor:
    """uint8 (m,) → uint8 0/1 (8m,), LSB first."""
    return ((b.unsqueeze(1) >> _BIT_SHIFTS.to(b.device)) & 1).reshape(-1)


def _pack_groups(vals: torch.Tensor, k: int) -> torch.Tensor:
    """Pack groups of 8 k-bit values. vals: int32 (G, 8) with 0 ≤ v < 2**k → uint8 (G, k)."""
    if k <= 7:
        sh = torch.arange(0, 8 * k, k, dtype=torch.int64, device=vals.device)
        word = (vals.to(torch.int64) << sh).sum(1, keepdim=True)
        bsh = torch.arange(0, 8 * k, 8, dtype=torch.int64, device=vals.device)
        return ((word >> bsh) & 0xFF).to(torch.uint8)
    bits = ((vals.unsqueeze(-1) >> torch.arange(k, dtype=torch.int32, device=vals.device)) & 1)
    return _pack_bits(bits.to(torch.uint8).reshape(-1)).view(-1, k)


def _unpack_groups(b: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`_pack_groups`. b: uint8 (G, k) → int32 (G, 8)."""
    if k <= 7:
        bsh = torch.arange(0, 8 * k, 8, dtype=torch.int64, device=b.device)
        word = (b.to(torch.int64) << bsh).sum(1, keepdim=True)
        sh = torch.arange(0, 8 * k, k, dtype=torch.int64, device=b.device)
        return ((word >> sh) & ((1 << k) - 1)).to(torch.int32)
    bits = _unpack_bits(b.reshape(-1)).view(-1, 8, k).to(torch.int32)
    return (bits << torch.arange(k, dtype=torch.int32, device=b.device)).sum(-1, dtype=torch.int32)


def _group_layout(ks: torch.Tensor, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of 8 symbols: its k (int64 (G,)) and its first remainder byte (int64 (G,))."""
    groups = -(-n // 8)
    kg = ks.to(torch.int64).repeat_interleave(block // 8)[:groups]
    start = torch.cumsum(kg, 0) - kg
    return kg, start


def encode_stream(z: torch.Tensor, block: int) -> RiceStream:
    """Rice-code a stream. z: int32 (n,) non-negative symbols, n ≥ 1; block: a multiple of 8."""
    if block % 8 or block <= 0:
        raise ValueError(f"block must be a positive multiple of 8, got {block}")
    n = z.numel()
    if n == 0:
        raise ValueError("cannot encode an empty stream")
    z = z.to(torch.int32).reshape(-1)
    ks, _ = choose_k(z, n, block)
    nb = ks.numel()
    k_sym = ks.to(torch.int32).repeat_interleave(block)[:n]
    q = z >> k_sym
    esc_mask = q >= ESC
    escapes = q[esc_mask].to(torch.int32)
    q = q.clamp_max(ESC)
    # unary part
    pos = torch.cumsum(q.to(torch.int64) + 1, 0) - 1
    total = int(pos[-1]) + 1
    if total >= 2**31:
        raise ValueError("stream too long for one encoded tensor (more than 2**31 unary bits)")
    nbytes = -(-total // 8)
    bits = torch.zeros(nbytes * 8, dtype=torch.uint8, device=z.device)
    bits[pos] = 1
    unary = _pack_bits(bits)
    offsets = torch.zeros(nb, dtype=torch.int64, device=z.device)
    if nb > 1:
        offsets[1:] = pos[block - 1:(nb - 1) * block:block] + 1
    # remainder part
    groups = -(-n // 8)
    r = z & ((torch.ones_like(k_sym) << k_sym) - 1)
    r8 = torch.nn.functional.pad(r, (0, groups * 8 - n)).view(groups, 8)
    kg, start = _group_layout(ks, n, block)
    rem = torch.empty(int(kg.sum()), dtype=torch.uint8, device=z.device)
    for k in torch.unique(kg).tolist():
        if k == 0:
            continue
        sel = (kg == k).nonzero().squeeze(1)
        idx = start[sel].unsqueeze(1) + torch.arange(k, device=z.device)
        rem[idx.reshape(-1)] = _pack_groups(r8[sel], k).reshape(-1)
    return RiceStream(n=n, block=block, ks=ks.to(torch.uint8), offsets=offsets.to(torch.int32),
                      unary=unary, rem=rem, escapes=escapes)


def decode_stream(st: RiceStream) -> torch.Tensor:
    """Decode a :class:`RiceStream` to int32 (n,) symbols. Raises :class:`HQFormatError` on any
    inconsistency (wrong number of symbol ends, overlong runs, escape or remainder size mismatch)."""
    n, block = st.n, st.block
    dev = st.unary.device
    nb = _num_blocks(n, block)
    if st.ks.numel() != nb or st.offsets.numel() != nb:
        raise HQFormatError(f"stream of {n} symbols needs {nb} block headers, found {st.ks.numel()}")
    ks = st.ks.to(torch.int64)
    if nb and int(ks.max()) > KMAX:
        raise HQFormatError(f"Rice parameter {int(ks.max())} exceeds the maximum {KMAX}")
    # unary part: symbol ends are the one bits
    pos = torch.nonzero(_unpack_bits(st.unary)).squeeze(1)
    if pos.numel() != n:
        raise HQFormatError(f"unary stream holds {pos.numel()} symbols, expected {n}")
    if st.unary.numel() != -(-(int(pos[-1]) + 1) // 8):
        raise HQFormatError("unary stream has trailing bytes after its last symbol")
    q = torch.diff(pos, prepend=pos.new_full((1,), -1)) - 1
    if int(q.max()) > ESC:
        raise HQFormatError(f"unary run longer than the escape length {ESC}")
    expect_off = torch.zeros(nb, dtype=torch.int64, device=dev)
    if nb > 1:
        expect_off[1:] = pos[block - 1:(nb - 1) * block:block] + 1
    if not torch.equal(expect_off, st.offsets.to(torch.int64)):
        raise HQFormatError("block offsets do not match the unary stream")
    q = q.to(torch.int32)
    esc_mask = q == ESC
    n_esc = int(esc_mask.sum())
    if n_esc != st.escapes.numel():
        raise HQFormatError(f"stream has {n_esc} escaped symbols but {st.escapes.numel()} escape values")
    k_sym = ks.to(torch.int32).repeat_interleave(block)[:n]
    if n_esc:
        ev = st.escapes.to(torch.int32)
        if int(ev.min()) < ESC or bool((ev.to(torch.int64) << k_sym[esc_mask].to(torch.int64)).max() >= 2**31):
            raise HQFormatError("escape value out of range")
        q[esc_mask] = ev
    # remainder part
    groups = -(-n // 8)
    kg, start = _group_layout(ks, n, block)
    if st.rem.numel() != int(kg.sum()):
        raise HQFormatError(f"remainder stream has {st.rem.numel()} bytes, expected {int(kg.sum())}")
    r8 = torch.zeros(groups, 8, dtype=torch.int32, device=dev)
    for k in torch.unique(kg).tolist():
        if k == 0:
            continue
        sel = (kg == k).nonzero().squeeze(1)
        idx = start[sel].unsqueeze(1) + torch.arange(k, device=dev)
        r8[sel] = _unpack_groups(st.rem[idx], k)
    r = r8.view(-1)[:n]
    return (q << k_sym) | r
