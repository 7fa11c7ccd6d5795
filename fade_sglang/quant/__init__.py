"""Quantizer: packed asymmetric INT8/INT4/INT2 formats and the fixed rotation over head_dim."""

from .formats import QuantFormat, QuantizedKV, dequantize, pack_codes, quantize, unpack_codes
from .rotation import is_power_of_two, rotation_matrix

__all__ = [
    "QuantFormat",
    "QuantizedKV",
    "dequantize",
    "is_power_of_two",
    "pack_codes",
    "quantize",
    "rotation_matrix",
    "unpack_codes",
]
