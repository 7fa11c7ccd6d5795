"""Attention over the tiered KV pool: torch reference / CPU path (the Triton kernels live in fade_sglang.kernels)."""

from .reference import attend, decode_attention_ref, extend_attention_ref

__all__ = ["attend", "decode_attention_ref", "extend_attention_ref"]
