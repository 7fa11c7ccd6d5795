"""Helpers to run real SGLang 0.5.23 server processes on a CPU-only machine (test-only).

* :func:`build_tiny_llama` (from :mod:`fade_sglang.eval.tiny_model`) writes a seeded random
  Llama (GQA) plus a locally trained tokenizer, loadable by HF transformers and SGLang offline.
* :class:`ServerProcess` / :func:`run_server_expect_failure` are re-exported
  from :mod:`fade_sglang.eval.launcher` (the demo and benchmarks use them too).

On a host without the real ``sgl_kernel`` the child processes get ``fade_sglang/cpu_shims/site`` on
PYTHONPATH: its ``sitecustomize.py`` installs the import-only torchvision fake and it holds the
pure-torch ``sgl_kernel`` stand-in that ``SGLANG_USE_CPU_ENGINE=1`` imports.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from fade_sglang.cpu_shims import SITE_DIR as CPU_SHIMS_SITE_DIR  # noqa: F401


# ----------------------------------------------------------------------------- tiny model

# The tiny model and its corpus live in the package (the demo builds one when none is shipped).
from fade_sglang.eval.tiny_model import build_tiny_llama, build_tokenizer, english_like_corpus  # noqa: E402,F401


def corpus_ids(tokenizer: Any, n: int, seed: int) -> list[int]:
    """The first ``n`` token ids of the seeded English-like corpus (a prompt of realistic text)."""
    ids: list[int] = []
    for line in english_like_corpus(num_sentences=200, seed=seed):
        ids += tokenizer(" " + line)["input_ids"]
        if len(ids) >= n:
            return ids[:n]
    raise AssertionError("corpus too short")


def hf_greedy(model_path: str | os.PathLike, input_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by HF ``generate()``; EOS does not stop it (matches SGLang ``ignore_eos``)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    ids = torch.tensor([list(input_ids)], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=model.config.pad_token_id,
        )
    return out[0, ids.shape[1]:].tolist()


# ----------------------------------------------------------------------------- processes
# The process helpers live in the package (the demo and benchmarks use them too).
from fade_sglang.eval.launcher import (  # noqa: E402,F401
    CPU_SERVER_ARGS,
    DEFAULT_MAX_TOTAL_TOKENS,
    ServerProcess,
    ServerStartupError,
    free_port,
    launch_command,
    run_server_expect_failure,
    server_env,
    tail,
)
