"""Tiered radix cache policy (SGLang-free): which tree tokens stay fp16 (sinks, shared prefixes, locked
nodes, recent tokens) and which may be demoted. ``fade_sglang.patches.radix_cache.TieredRadixCache``
applies it to SGLang's ``RadixCache``; ``fade_sglang.patches.running_demotion`` ages running requests."""
