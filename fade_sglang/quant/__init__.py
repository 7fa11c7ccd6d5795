"""Quantizer: packed asymmetric INT8/INT4/INT3/INT2 formats, the fixed rotation over head_dim, and
the query-aware rounding factor for keys."""

from .formats import QuantFormat, QuantizedKV, dequantize, pack_codes, quantize, unpack_codes
from .rotation import is_power_of_two, rotation_matrix
from .rounding import rounding_factor

__all__ = [
    "QuantFormat",
    "QuantizedKV",
    "dequantize",
    "is_power_of_two",
    "pack_codes",
    "quantize",
    "rotation_matrix",
    "rounding_factor",
    "unpack_codes",
]
