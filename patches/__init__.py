"""Everything that hooks fade-sglang into SGLang 0.5.23 (plugin entry point, CLI, pool, radix cache, backend)."""
