"""Pure-torch stand-in for ``sgl_kernel`` (on the PYTHONPATH of CPU server children only, see ``fade_sglang.cpu_shims``).

``SGLANG_USE_CPU_ENGINE=1`` makes SGLang import ``sgl_kernel``, which has no CPU
build on PyPI. On a CPU without AMX the only op the serving path calls is
``assign_req_to_token_pool_cpu``; everything else is either behind an AMX check
or belongs to models/features the tests do not run. Names we do not provide fail
loudly: importing them raises ImportError, and the stubs below raise
NotImplementedError when called.
"""

from __future__ import annotations

from typing import Any, NoReturn

import torch

__version__ = "0.0.0+fade.fake"

_PROVIDED = ("assign_req_to_token_pool_cpu",)


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write each request's slice of ``out_cache_loc`` into its ``req_to_token`` row.

    Request ``i`` owns ``out_cache_loc[sum(len_0..len_{i-1}) : +len_i]`` with
    ``len_i = end_offset[i] - start_offset[i]``; it lands at
    ``req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]]``.
    """
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    cursor = 0
    for row, start, end in zip(rows, starts, ends):
        n = end - start
        if n <= 0:
            continue
        if end > pool_len:
            raise IndexError(f"assign_req_to_token_pool_cpu: end {end} exceeds pool_len {pool_len}")
        req_to_token[row, start:end] = out_cache_loc[cursor : cursor + n].to(req_to_token.dtype)
        cursor += n


def _not_implemented(name: str) -> NoReturn:
    raise NotImplementedError(
        f"sgl_kernel.{name} is not implemented by the fade-sglang test stand-in "
        f"(provided: {', '.join(_PROVIDED)}); this code path needs the real sgl_kernel"
    )


def _make_stub(name: str) -> Any:
    def stub(*args: Any, **kwargs: Any) -> NoReturn:
        _not_implemented(name)

    stub.__name__ = stub.__qualname__ = name
    return stub


# Imported at module level by SGLang when SGLANG_USE_CPU_ENGINE=1 but only called on
# paths the tests never take (KV move/compaction, speculative decoding).
_IMPORT_ONLY = (
    "copy_all_layer_kv_cache_cpu",  # kernels/ops/kvcache/cache_move.py (move_kv_cache)
    "build_tree_kernel_efficient_cpu",  # kernels/ops/speculative/spec_tree.py
    "verify_tree_greedy_cpu",
    "assign_draft_cache_locs_contiguous_cpu",  # kernels/ops/speculative/cache_locs.py
    "assign_extend_cache_locs_cpu",
    "fill_accept_out_cache_loc_cpu",  # kernels/ops/speculative/eagle.py
    "fill_bonus_tokens_cpu",
    "rotate_input_ids_cpu",  # kernels/ops/speculative/multi_layer_eagle.py
)
for _name in _IMPORT_ONLY:
    globals()[_name] = _make_stub(_name)
del _name


def __getattr__(name: str) -> Any:
    # An AttributeError here turns `from sgl_kernel import X` into a clear ImportError
    # and keeps hasattr()-style feature probes answering "not available".
    if name.startswith("__"):
        raise AttributeError(name)
    import os
    import sys

    if os.environ.get("FADE_FAKE_SGL_KERNEL_TRACE"):
        print(f"[fake sgl_kernel] missing attribute {name!r}", file=sys.stderr, flush=True)
    raise AttributeError(
        f"sgl_kernel.{name} is not provided by the fade-sglang test stand-in "
        f"(provided: {', '.join(_PROVIDED)})"
    )
