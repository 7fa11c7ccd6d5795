"""fade-sglang: tiered-precision KV cache for SGLang."""
__version__ = "0.1.0"
