"""The HyperQuant codec: RHT → lattice → bit-stripping → rANS or Rice coding (torch, numpy, numba loops)."""
from .config import FORMAT_VERSION, CodecConfig
from .core import RateBudgetWarning, decode, encode, rotated_rows, warm_compiled
from .errors import HQFormatError, HQRangeError
from .format import EncodedTensor
from .hashing import rht_signs
from .lattice import LATTICES, lattice_info, nearest
from .rht import excess_kurtosis, inverse_rht, plan_tiles, rht

__all__ = [
    "CodecConfig", "EncodedTensor", "HQFormatError", "HQRangeError", "RateBudgetWarning", "FORMAT_VERSION",
    "encode", "decode", "warm_compiled", "rht", "inverse_rht", "rht_signs", "plan_tiles", "rotated_rows",
    "nearest", "lattice_info", "LATTICES", "excess_kurtosis",
]
