"""Tiered radix cache policy: fp16 shared prefixes / sinks, idle and running demotion, demote-before-evict.

``TieredRadixCache`` and ``TieredTokenAllocator`` import SGLang; import them from
``.tiered_radix_cache`` / ``.allocator``. ``policy`` is SGLang-free.
"""
