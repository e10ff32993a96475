"""The encoder's row-blocked full-tensor passes (bounded work space) give the same bytes as one pass."""
import warnings

import pytest
import torch

from hq_diffusion.codec import CodecConfig, HQRangeError, RateBudgetWarning, encode
from hq_diffusion.codec import core

CASES = [  # (shape, dtype, lattice, coder, scale dtype): odd widths pad to the tile; 3-D weights flatten
    ((37, 1000), torch.bfloat16, "e8", "rice", "float16"),
    ((129, 3000), torch.float32, "d4", "rice", "bfloat16"),
    ((3, 41, 777), torch.float16, "a2", "rice", "float32"),
    ((100, 520), torch.bfloat16, "z", "rice", "float16"),
    ((65, 2048), torch.float32, "e8", "rans", "float16"),
    ((33, 1000), torch.float32, "d4", "rans", "bfloat16"),  # two rANS streams, rate model over row blocks
]


def _bytes(w, cfg, key, block_elems, monkeypatch):
    monkeypatch.setattr(core, "_BLOCK_ELEMS", block_elems)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RateBudgetWarning)
        return encode(w, cfg, key=key).to_bytes()


@pytest.mark.parametrize("shape,dtype,lattice,coder,scale", CASES)
def test_blocked_encode_is_byte_identical(shape, dtype, lattice, coder, scale, monkeypatch):
    g = torch.Generator().manual_seed(hash((shape, lattice)) % 2**31)
    w = torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g) * 0.05  # uneven columns
    w[..., 0, :] *= 40.0  # one loud row
    w = w.to(dtype)
    n_pad = core.plan_tiles(shape[-1], 256)[1]
    rows = w.numel() // shape[-1]
    assert len(core._row_blocks(rows, n_pad)) == 1  # the default keeps these small tensors in one pass
    cfg = CodecConfig(bps=3.5, lattice=lattice, coder=coder, scale_dtype=scale, tile=256)
    whole = _bytes(w, cfg, "layer.w", 1 << 40, monkeypatch)
    for block_elems in (1, 5 * n_pad, 11 * n_pad + 3):  # one row a block; uneven blocks with a remainder
        monkeypatch.setattr(core, "_BLOCK_ELEMS", block_elems)
        assert len(core._row_blocks(rows, n_pad)) > 1
        assert _bytes(w, cfg, "layer.w", block_elems, monkeypatch) == whole, block_elems


@pytest.mark.parametrize("rows,n_pad,block", [(10, 8, 16), (7, 1000, 2500), (1, 64, 8), (100, 8, 1), (5, 8, 10**6)])
def test_row_blocks_cover_rows_in_order(rows, n_pad, block, monkeypatch):
    monkeypatch.setattr(core, "_BLOCK_ELEMS", block)
    blocks = core._row_blocks(rows, n_pad)
    assert [i for sl in blocks for i in range(sl.start, sl.stop)] == list(range(rows))
    if len(blocks) > 1:  # every block reaches the size that makes glibc map it (returned when freed)
        assert min((sl.stop - sl.start) * n_pad for sl in blocks) >= block


def test_blocked_errors_name_the_whole_tensor_row(monkeypatch):
    w = torch.randn(64, 512) * 0.1
    w[50] = 1e-30  # float16 scales round this row's RMS to 0: the error names row 50 of the whole tensor
    monkeypatch.setattr(core, "_BLOCK_ELEMS", 8 * 512)
    with pytest.raises(HQRangeError, match=r"1 row\(s\) \(first: row 50\)"):
        encode(w, CodecConfig(bps=4.0, scale_dtype="float16"), key="x")
