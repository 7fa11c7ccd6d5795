"""Tiered radix cache policy: fp16 shared prefixes / sinks, idle and running demotion, demote-before-evict.

``TieredRadixCache`` imports SGLang; import it from ``.tiered_radix_cache``. ``policy`` is SGLang-free.
The SGLang-facing allocator it frees through lives with the glue: ``fade_sglang.patches.allocator``.
"""
