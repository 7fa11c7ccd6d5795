"""The control: fade's pool, allocator, radix cache and attention backend with nothing compressed serve exactly
what plain SGLang serves, in bfloat16, through the prefix cache.

Plain SGLang (torch_native) and a fade server whose packed tiers are off (``tier_max_share`` 0, idle timers that
never fire: the document-QA harness's ``control``) run the same multi-turn conversations on the tiny model in
bfloat16 (where any difference in the numerics shows as a different logprob): turn 2 is served over turn 1's
cached history. Output tokens *and* their logprobs must be bit-identical, and the cached prefix the same length:
every difference a quality run measures is then the compression's, not fade's machinery's. Both servers run
SGLang's default overlap schedule. Turn 1 ends on a stop token, as a chat answer does: the overlap loop has
already computed that token's KV when it learns the request finished, and caches it; the non-overlapped loop
caches one token less, so the next turn recomputes it in its prefill and the numerics part (fade forced that
loop before, and its control differed from plain SGLang on 2 of 12 real-model answers; with
``--disable-overlap-schedule`` on the control this test fails).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from fade_sglang.eval.doc_qa import CONTROL_EXTRA
from sglang_server import ServerProcess, corpus_ids as _ids

pytestmark = pytest.mark.server

TOKENS = 4096
BF16 = ["--dtype", "bfloat16"]
CONTROL_ARGS = ["--kv-compression", "fade", "--attention-backend", "fade_torch", *CONTROL_EXTRA, *BF16]
ANSWER_TOKENS = 24


def _server(model: Path, args: list[str]) -> Iterator[ServerProcess]:
    with ServerProcess(model, args, max_total_tokens=TOKENS, startup_timeout_s=300) as srv:
        yield srv
    print(f"\nserver log: {srv.log_path}")


@pytest.fixture(scope="module")
def plain_bf16(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    yield from _server(tiny_model_dir, BF16)


@pytest.fixture(scope="module")
def control_bf16(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    yield from _server(tiny_model_dir, CONTROL_ARGS)



def _answer(srv: ServerProcess, ids: list[int], stop: int | None = None) -> dict[str, Any]:
    sampling: dict[str, Any] = {"max_new_tokens": ANSWER_TOKENS, "temperature": 0, "ignore_eos": stop is None}
    if stop is not None:
        sampling["stop_token_ids"] = [stop]
    out = srv.request("/generate", {"input_ids": ids, "return_logprob": True, "logprob_start_len": len(ids) - 1,
                                    "sampling_params": sampling}, timeout_s=300)
    meta = out["meta_info"]
    return {"ids": [int(t) for t in out["output_ids"]], "logprobs": [e[0] for e in meta["output_token_logprobs"]],
            "cached": meta.get("cached_tokens"), "finish": meta["finish_reason"]["type"]}


def _stop_token(answer: list[int]) -> int:
    """A token the greedy answer first produces after a few tokens: stopping there ends turn 1 the way a chat
    answer ends (on a stop token whose KV the next turn's history then holds)."""
    return next(t for k, t in enumerate(answer) if k >= 6 and t not in answer[:k])


def test_control_is_bit_identical_to_plain_sglang_through_the_prefix_cache(
        plain_bf16: ServerProcess, control_bf16: ServerProcess, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for conversation in range(3):
        system = _ids(tokenizer, 160 + 40 * conversation, 300 + conversation)
        stop = _stop_token(_answer(plain_bf16, system)["ids"])
        for srv in (plain_bf16, control_bf16):  # the same cache state on both: each conversation starts empty
            srv.flush_cache()
        turn1 = {name: _answer(srv, system, stop) for name, srv in (("plain", plain_bf16), ("control", control_bf16))}
        assert turn1["plain"]["finish"] == "stop" and turn1["plain"]["ids"][-1] == stop
        # Turn 2 over the cached turn 1 (plain SGLang's answer as the history on both servers).
        history = system + turn1["plain"]["ids"] + _ids(tokenizer, 20, 400 + conversation)
        turn2 = {name: _answer(srv, history) for name, srv in (("plain", plain_bf16), ("control", control_bf16))}
        for turn, got in (("turn 1", turn1), ("turn 2", turn2)):
            assert got["control"]["ids"] == got["plain"]["ids"], f"conversation {conversation} {turn}: tokens differ"
            assert got["control"]["logprobs"] == got["plain"]["logprobs"], (
                f"conversation {conversation} {turn}: logprobs differ (not bit-identical)")
            assert got["control"]["cached"] == got["plain"]["cached"], f"conversation {conversation} {turn}"
        assert turn2["plain"]["cached"] >= len(system)  # turn 2 really read turn 1's history from the cache
    stats = control_bf16.fade_stats()
    assert sum(stats["demoted_tokens"].values()) == 0 and stats["radix"]["tree_tokens"]["fp16"] > 0
