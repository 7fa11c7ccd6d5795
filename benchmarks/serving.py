"""Serving benchmark: fp16 vs fp8 vs fade presets under the same KV byte budget.

For every configuration one real SGLang server is started with a KV pool of the
same bytes (the fp16 server and every fade preset get ``--max-total-tokens N``:
fade's pool is sized like plain SGLang's and holds more tokens as it compresses
them; fp8 gets 2N), and two workloads run against it, the cache flushed in between:

* ``gsp``: SGLang's own ``python -m sglang.bench_serving --dataset-name
  generated-shared-prefix`` (groups of prompts sharing a system prompt, multi-turn).
* ``agent``: :func:`fade_sglang.eval.workloads.run_agent_trace`, a multi-turn agent
  trace (shared system prompt, growing per-session conversations, long
  tool-output turns), all sessions in flight.

N is chosen so the fp16 server is memory-bound (its pool is smaller than the
workloads' KV): queueing, retractions and lost cache hits show in the report.
Reported per configuration and workload: request throughput, output tok/s,
TTFT / TPOT p50 / p99, cache hit rate, max running / queued requests and
preempted (retracted) requests from the server log, and fade's tier stats
(per-tier tokens / bytes, demotions, evictions, compression ratio).
Writes ``serving.json`` and ``serving.png`` (throughput and capacity per configuration).

    .venv/bin/python benchmarks/serving.py --scale tiny --model-path /path/to/model   # CPU, a few minutes
    python benchmarks/serving.py --scale gpu --model-path meta-llama/...                 # GPU, later
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fade_sglang.eval.demo import (DTYPE_BYTES, FADE_ARGS, LOG_ARGS, DemoError, model_geometry,  # noqa: E402
                                   resolve_model)
from fade_sglang.eval.launcher import ServerProcess, ServerStartupError, server_env, unwind_on_signals  # noqa: E402
from fade_sglang.eval.workloads import (AgentTraceSpec, build_agent_trace, load_tokenizer, run_agent_trace,  # noqa: E402
                                   scheduler_log_summary)


@dataclass(frozen=True)
class Scale:
    base_tokens: int  # --max-total-tokens of the fp16 server
    gsp: dict[str, int]  # --gsp-* flags of sglang.bench_serving
    gsp_concurrency: int
    agent: AgentTraceSpec
    agent_concurrency: int
    max_running_requests: int | None = None  # --max-running-requests of every server (None: SGLang's)
    device: str = "cpu"


SCALES = {
    # CPU: ~10 minutes on 2 cores. The workloads' KV exceeds the fp16 pool (6144 tokens), so it evicts
    # cached prefixes. Concurrency is capped (the same cap for every configuration): each fade request
    # in flight keeps sinks + its recent window at full precision (3 x (16 + 256 + 64) tokens for `safe`,
    # well inside the arena now that fp16 may use all of it; the cap dates from a fixed fp16 tier and is
    # kept so results stay comparable with earlier runs).
    "tiny": Scale(
        base_tokens=6144,
        gsp={"num-groups": 6, "prompts-per-group": 2, "system-prompt-len": 768, "question-len": 64,
             "output-len": 16, "num-turns": 3},
        gsp_concurrency=3,
        agent=AgentTraceSpec(sessions=10, turns=3, system_tokens=512, user_tokens=48, tool_tokens=512,
                             output_tokens=16),
        agent_concurrency=3,
        max_running_requests=3,
    ),
    # CI: both workloads end to end in about a minute per configuration (tests/test_serving_benchmark.py).
    "smoke": Scale(
        base_tokens=1024,  # below the agent trace's ~1600 tokens of KV: plain evicts, fade compresses
        gsp={"num-groups": 2, "prompts-per-group": 2, "system-prompt-len": 256, "question-len": 32,
             "output-len": 8, "num-turns": 2},
        gsp_concurrency=2,
        agent=AgentTraceSpec(sessions=4, turns=2, system_tokens=256, user_tokens=32, tool_tokens=128,
                             output_tokens=8),
        agent_concurrency=2,
        max_running_requests=2,
    ),
    # GPU (not run yet): a real model, a pool of ~200K fp16 tokens, long shared prefixes.
    "gpu": Scale(
        base_tokens=200_000,
        gsp={"num-groups": 64, "prompts-per-group": 16, "system-prompt-len": 2048, "question-len": 256,
             "output-len": 256, "num-turns": 4},
        gsp_concurrency=256,
        agent=AgentTraceSpec(sessions=128, turns=8, system_tokens=2048, user_tokens=128, tool_tokens=2048,
                             output_tokens=256),
        agent_concurrency=128,
        device="cuda",
    ),
}


@dataclass(frozen=True)
class Config:
    name: str
    args: tuple[str, ...] = ()
    kv_bytes_per_value: int | None = None  # None: the model dtype
    fade_preset: str | None = None
    gpu_only: bool = False
    env: dict[str, str] = field(default_factory=dict)


CONFIGS = (
    Config("fp16"),
    Config("fp8", ("--kv-cache-dtype", "fp8_e4m3"), kv_bytes_per_value=1, gpu_only=True),
    Config("fade-safe", (*FADE_ARGS, "--fade-preset", "safe"), fade_preset="safe"),
    Config("fade-balanced", (*FADE_ARGS, "--fade-preset", "balanced"), fade_preset="balanced"),
    Config("fade-aggressive", (*FADE_ARGS, "--fade-preset", "aggressive"), fade_preset="aggressive"),
)


def config_tokens(cfg: Config, model: Path, dtype: str, base_tokens: int) -> int:
    """``--max-total-tokens`` that gives ``cfg`` the KV bytes of the fp16 server's ``base_tokens``
    (fade: the same count, its pool is sized like plain SGLang's; fp8: more tokens of fewer bytes)."""
    geom = model_geometry(model, dtype)
    if cfg.kv_bytes_per_value is not None:
        return base_tokens * geom.dtype_bytes // cfg.kv_bytes_per_value
    return base_tokens


# ----------------------------------------------------------------------------- workloads


def has_chat_template(model: Path) -> bool:
    """Whether the model ships a chat template (``chat_template.jinja`` or in ``tokenizer_config.json``)."""
    if (model / "chat_template.jinja").is_file():
        return True
    config = model / "tokenizer_config.json"
    return config.is_file() and "chat_template" in json.loads(config.read_text())


def with_gsp_turns(scale: Scale, turns: int) -> Scale:
    return replace(scale, gsp={**scale.gsp, "num-turns": turns})


def gsp_turns_for(scale: Scale, model: Path, say: Callable[[str], None]) -> Scale:
    """The scale itself, or with one gsp turn when the model cannot be driven through chat:
    bench_serving's multi-turn mode replays conversations over /v1/chat/completions."""
    turns = scale.gsp.get("num-turns", 1)
    if turns <= 1 or has_chat_template(model):
        return scale
    say(f"gsp: {model} has no chat template, which multi-turn bench_serving needs; "
        f"running --gsp-num-turns 1 instead of {turns}")
    return with_gsp_turns(scale, 1)


def _bench_serving_env() -> dict[str, str]:
    """Environment for ``sglang.bench_serving``. It imports HF ``datasets`` at module level (for MMMU) even
    for the generated-shared-prefix dataset; the slim CPU install lacks it, so an import-only stand-in
    goes on PYTHONPATH when the real package is missing."""
    import importlib.util
    import os
    import tempfile

    env = server_env()
    if importlib.util.find_spec("datasets") is None:
        stub = Path(tempfile.mkdtemp(prefix="fade-bench-")) / "datasets"
        stub.mkdir()
        (stub / "__init__.py").write_text(
            "def load_dataset(*args, **kwargs):\n"
            "    raise RuntimeError('HF datasets is not installed (fade-sglang import stand-in)')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(stub.parent), env.get("PYTHONPATH", "")])
    return env


def run_gsp(srv: ServerProcess, model: Path, scale: Scale, out_file: Path, timeout_s: float) -> dict[str, Any]:
    """SGLang's bench_serving on the generated-shared-prefix dataset; its JSONL result line."""
    gsp = [f"--gsp-{k}={v}" for k, v in scale.gsp.items()]
    # < 1: lengths vary a little, and bench_serving does not reuse a dataset cached on disk under a key
    # that ignores the tokenizer's path (a cache from another model would send foreign token ids).
    gsp.append("--gsp-range-ratio=0.95")
    backend = "sglang-oai-chat" if scale.gsp.get("num-turns", 1) > 1 else "sglang"  # multi-turn: chat only
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", backend, "--host", "127.0.0.1",
           "--port", str(srv.port), "--dataset-name", "generated-shared-prefix", "--tokenizer", str(model),
           *gsp, "--max-concurrency", str(scale.gsp_concurrency), "--request-rate", "inf",
           "--cache-report", "--disable-tqdm", "--seed", "1", "--output-file", str(out_file)]
    out_file.unlink(missing_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_bench_serving_env())
    if proc.returncode != 0 or not out_file.exists():
        return {"error": f"bench_serving exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
    row = json.loads(out_file.read_text().strip().splitlines()[-1])
    cache = row.get("cache_report") or {}
    prompt = cache.get("total_prompt_tokens") or 0
    return {
        "requests": row["completed"],
        "request_throughput": row["request_throughput"],
        "output_tok_per_s": row["output_throughput"],
        "ttft_ms_p50": row["median_ttft_ms"], "ttft_ms_p99": row["p99_ttft_ms"],
        "tpot_ms_p50": row["median_tpot_ms"], "tpot_ms_p99": row["p99_tpot_ms"],
        "cache_hit_rate": (cache.get("total_cached_tokens", 0) / prompt) if prompt else None,
        "client_max_concurrent_requests": row.get("max_concurrent_requests"),
    }


def run_agent(srv: ServerProcess, model: Path, scale: Scale) -> dict[str, Any]:
    trace = build_agent_trace(scale.agent, load_tokenizer(model))
    s = run_agent_trace(srv.base_url, trace, concurrency=scale.agent_concurrency, timeout_s=600).summary()
    return {
        "requests": s["requests"], "failed": s["failed"],
        "request_throughput": s["requests_per_s"], "output_tok_per_s": s["output_tok_per_s"],
        "ttft_ms_p50": s["ttft_ms_p50"], "ttft_ms_p99": s["ttft_ms_p99"],
        "tpot_ms_p50": s["tpot_ms_p50"], "tpot_ms_p99": s["tpot_ms_p99"],
        "cache_hit_rate": s["cache_hit_rate"],
    }


def fade_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The fade tier stats worth a benchmark row (from ``GET /fade/stats``)."""
    radix = stats.get("radix", {})
    return {
        "tiers": {n: {"tokens": t["used"], "bytes": t["used_bytes"], "pages": t["pages"]}
                  for n, t in stats["tiers"].items()},
        "tokens": stats["tokens"], "stored_bytes": stats["stored_bytes"],
        "compression_ratio": stats["compression_ratio"], "demoted_tokens": stats["demoted_tokens"],
        "evicted_tokens": radix.get("evicted_tokens"),
    }


def prometheus_fade_gauges(srv: ServerProcess) -> dict[str, float]:
    """The ``fade_kv_*`` samples of ``GET /metrics`` (the server runs with ``--enable-metrics``)."""
    with urllib.request.urlopen(srv.base_url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("fade_kv_"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _log_slice(srv: ServerProcess, start: int) -> tuple[str, int]:
    text = srv.log_text()
    return text[start:], len(text)


def run_config(cfg: Config, model: Path, scale: Scale, dtype: str, out_dir: Path,
               say: Callable[[str], None]) -> dict[str, Any]:
    if cfg.gpu_only and scale.device == "cpu":
        return {"config": cfg.name, "skipped": "needs a GPU (fp8 KV kernels); run with --scale gpu"}
    tokens = config_tokens(cfg, model, dtype, scale.base_tokens)
    device_args = ("--dtype", dtype) if scale.device == "cpu" else ("--device", scale.device, "--dtype", "auto")
    env = dict(cfg.env)
    if scale.device != "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "0"  # launcher.server_env() sets 1 for CPU runs
    say(f"{cfg.name}: starting server (--max-total-tokens {tokens})")
    row: dict[str, Any] = {"config": cfg.name, "max_total_tokens": tokens}
    cap = ("--max-running-requests", str(scale.max_running_requests)) if scale.max_running_requests else ()
    with ServerProcess(model, [*device_args, *cap, *cfg.args, *LOG_ARGS, "--enable-metrics"], max_total_tokens=tokens,
                       env=env, startup_timeout_s=600) as srv:
        (state,) = srv.request("/server_info")["internal_states"]
        row["capacity_tokens"] = row["server_token_capacity"] = state["memory_usage"]["token_capacity"]
        row["server_kvcache_gb"] = state["memory_usage"]["kvcache"]
        fade = cfg.fade_preset is not None
        if fade:
            stats = srv.fade_stats()
            row["pool_bytes"] = stats["pool_bytes"]
            row["page_bytes"] = stats["pages"]["page_bytes"]  # the arena is whole pages (all layers, K and V)
            # Most tokens the arena holds once compressed (SGLang's token_capacity counts every tier's slot
            # range, an address space); the fp16 count is what it holds before anything is compressed.
            row["capacity_tokens"] = stats["capacity_tokens"]
            row["fp16_capacity_tokens"] = stats["fp16_capacity_tokens"]
        else:
            # SGLang's buffers: (tokens + 1) rows (slot 0 pads) of K and V per layer, at the KV dtype.
            geom = model_geometry(model, dtype)
            per_value = cfg.kv_bytes_per_value or geom.dtype_bytes
            row["pool_bytes"] = geom.baseline_pool_bytes(row["capacity_tokens"]) * per_value // geom.dtype_bytes
        offset = len(srv.log_text())
        for name, fn in (("gsp", lambda: run_gsp(srv, model, scale, out_dir / f"gsp-{cfg.name}.jsonl", 1800)),
                         ("agent", lambda: run_agent(srv, model, scale))):
            say(f"{cfg.name}: {name} workload")
            t0 = time.perf_counter()
            res = fn()
            log, offset = _log_slice(srv, offset)
            res.update(scheduler_log_summary(log))
            if fade:
                res["fade"] = fade_summary(srv.fade_stats())
                res["fade"]["prometheus"] = prometheus_fade_gauges(srv)
            res["wall_s"] = round(time.perf_counter() - t0, 2)
            row[name] = res
            if "error" in res:
                say(f"{cfg.name}: {name} FAILED: {res['error'][-400:]}")
            say(f"{cfg.name}: {name} done in {res['wall_s']}s: "
                + ", ".join(f"{k}={_short(res.get(k))}" for k in ("output_tok_per_s", "cache_hit_rate",
                                                                   "max_running_requests", "preempted_requests")))
            srv.flush_cache()
    row["log_path"] = str(srv.log_path)
    return row


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- report


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = ("config", "tokens", "MiB", "wl", "req/s", "out tok/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms",
            "hit", "max run", "preempt", "tier mix (tokens)")
    lines, notes = [], []
    for r in rows:
        if "skipped" in r:  # listed under the table: a long reason would widen every column
            notes.append(f"{r['config']}: skipped ({r['skipped']})")
            continue
        for wl in ("gsp", "agent"):
            w = r[wl]
            if "error" in w:
                notes.append(f"{r['config']} {wl}: error: {w['error'][-300:]}")
                continue
            mix = " ".join(f"{n}={t['tokens']}" for n, t in w["fade"]["tiers"].items()) if "fade" in w else "fp 100%"
            hit = "-" if w.get("cache_hit_rate") is None else f"{w['cache_hit_rate']:.0%}"
            lines.append((r["config"], str(r["capacity_tokens"]), f"{r['pool_bytes'] / 2**20:.2f}", wl,
                          f"{w['request_throughput']:.2f}", f"{w['output_tok_per_s']:.1f}",
                          f"{_ms(w['ttft_ms_p50'])}/{_ms(w['ttft_ms_p99'])}",
                          f"{_ms(w['tpot_ms_p50'])}/{_ms(w['tpot_ms_p99'])}", hit,
                          str(w["max_running_requests"]), str(w["preempted_requests"]), mix))
    widths = [max(len(c), *(len(l[i]) for l in lines if i < len(l))) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    out += ["  ".join(v.ljust(w) for v, w in zip(l, widths)) for l in lines]
    return "\n".join(out + notes)


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if "skipped" not in r]
    names = [r["config"] for r in ran]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].bar(names, [r["capacity_tokens"] for r in ran], color="tab:blue")
    axes[0].set_title("KV capacity (tokens) at equal KV bytes")
    for ax, wl in zip(axes[1:], ("gsp", "agent")):
        vals = [r[wl].get("output_tok_per_s", 0) for r in ran]
        ax.bar(names, vals, color="tab:green")
        ax.set_title(f"{wl}: output tok/s")
        for i, r in enumerate(ran):
            hit = r[wl].get("cache_hit_rate")
            if hit is not None:
                ax.annotate(f"hit {hit:.0%}\npre {r[wl].get('preempted_requests', 0)}", (i, vals[i]),
                            ha="center", va="bottom", fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    p.add_argument("--model-path", default=None, help="model dir (default: models/fade-tiny-llama)")
    p.add_argument("--configs", default=",".join(c.name for c in CONFIGS),
                   help="comma-separated subset of: " + ", ".join(c.name for c in CONFIGS))
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES), help="CPU model / KV dtype")
    p.add_argument("--gsp-turns", type=int, default=None, help="turns per gsp conversation (default: the scale's)")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    try:
        model = resolve_model(args.model_path)
    except DemoError as e:
        print(f"serving.py: error: {e}", file=sys.stderr)
        return 2
    scale = SCALES[args.scale]
    if args.gsp_turns is not None:
        if args.gsp_turns < 1:
            print(f"serving.py: error: --gsp-turns must be >= 1 (got {args.gsp_turns})", file=sys.stderr)
            return 2
        scale = with_gsp_turns(scale, args.gsp_turns)
    dtype = args.dtype if scale.device == "cpu" else "bfloat16"  # GPU servers run the model dtype (sizing only)
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(wanted) - {c.name for c in CONFIGS}
    if unknown:
        print(f"serving.py: error: unknown configs {sorted(unknown)}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(f"[serving {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    scale = gsp_turns_for(scale, model, say)
    rows = []
    try:
        with unwind_on_signals():
            for cfg in CONFIGS:
                if cfg.name in wanted:
                    rows.append(run_config(cfg, model, scale, dtype, args.out_dir, say))
    except ServerStartupError as e:
        print(f"serving.py: error: a server did not start: {e.headline}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("serving.py: interrupted; servers stopped", file=sys.stderr)
        return 130
    result = {"scale": args.scale, "scale_config": asdict(scale), "model": str(model), "dtype": dtype,
              "equal_kv_bytes_of_fp16_tokens": scale.base_tokens, "results": rows}
    (args.out_dir / "serving.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out_dir / "serving.png")
    print(format_table(rows))
    print(f"\nwrote {args.out_dir / 'serving.json'} and {args.out_dir / 'serving.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
