"""A real CPU SGLang server (fade plugin installed, flag absent) matches HF greedy decoding.

Also checks the CPU shims (fade_sglang.cpu_shims) that make such a server possible on CPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator

import pytest
import torch

from sglang_server import CPU_SHIMS_SITE_DIR, ServerProcess, hf_greedy

PROMPTS = ["The cat sees a red ball", "My friend paints the green house after dinner, and"]
MAX_NEW_TOKENS = 16


def _load_fake_sgl_kernel():
    spec = importlib.util.spec_from_file_location("fade_fake_sgl_kernel", CPU_SHIMS_SITE_DIR / "sgl_kernel" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fake_assign_req_to_token_pool_cpu() -> None:
    sk = _load_fake_sgl_kernel()
    req_to_token = torch.zeros((4, 10), dtype=torch.int32)
    rows = torch.tensor([2, 0, 3])
    start, end = torch.tensor([3, 0, 5]), torch.tensor([5, 4, 5])  # lengths 2, 4, 0
    out_cache_loc = torch.arange(100, 106, dtype=torch.int64)
    sk.assign_req_to_token_pool_cpu(rows, req_to_token, start, end, out_cache_loc, req_to_token.shape[1])
    assert req_to_token[2, 3:5].tolist() == [100, 101]
    assert req_to_token[0, 0:4].tolist() == [102, 103, 104, 105]
    assert int(req_to_token.count_nonzero()) == 6


def test_fake_sgl_kernel_fails_loudly() -> None:
    sk = _load_fake_sgl_kernel()
    with pytest.raises(NotImplementedError, match="copy_all_layer_kv_cache_cpu"):
        sk.copy_all_layer_kv_cache_cpu(None, None, None, None)  # importable stub, not callable
    with pytest.raises(AttributeError, match="not provided"):
        sk.decode_attention_cpu  # noqa: B018  (never imported by the CPU path: ImportError for `from`)


def test_fake_torchvision_imports() -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF  # noqa: N812

    assert InterpolationMode.BICUBIC is not None
    with pytest.raises(NotImplementedError, match="fake torchvision"):
        TF.resize(None, 4)
    import sglang.srt.configs  # noqa: F401  (the import the fake exists for)


@pytest.fixture(scope="module")
def baseline_server(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(tiny_model_dir) as srv:  # one server for the whole module (~15-40 s to start)
        yield srv


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.mark.server
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_hf_generate(baseline_server: ServerProcess, tiny_model_dir: Path, tokenizer, prompt: str) -> None:
    ids = tokenizer(prompt)["input_ids"]
    expected = hf_greedy(tiny_model_dir, ids, MAX_NEW_TOKENS)
    got = baseline_server.generate(input_ids=ids, max_new_tokens=MAX_NEW_TOKENS)
    assert got["output_ids"] == expected
    assert got["text"] == tokenizer.decode(expected)


@pytest.mark.server
def test_text_prompt_and_prefix_reuse(baseline_server: ServerProcess, tiny_model_dir: Path, tokenizer) -> None:
    prompt = PROMPTS[0]
    expected = hf_greedy(tiny_model_dir, tokenizer(prompt)["input_ids"], MAX_NEW_TOKENS)
    first = baseline_server.generate(prompt, max_new_tokens=MAX_NEW_TOKENS)
    again = baseline_server.generate(prompt, max_new_tokens=MAX_NEW_TOKENS)  # served from the radix cache
    assert first["output_ids"] == expected
    assert again["output_ids"] == expected
    assert again["meta_info"]["cached_tokens"] > 0


@pytest.mark.server
def test_plugin_inert_without_flag(baseline_server: ServerProcess) -> None:
    log = baseline_server.log_text()
    assert "[fade]" not in log
    assert "fade-sglang:" not in log  # no error / warning lines from the CLI hooks
    info = baseline_server.request("/server_info")
    assert not any(k.startswith("fade") or k.startswith("_fade") for k in info)
