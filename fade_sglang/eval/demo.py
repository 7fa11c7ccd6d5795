"""``fade-sglang demo``: full-precision KV vs ``--kv-compression fade`` under the same KV byte budget.

Starts two real SGLang servers one after the other on the same model, both with
``--max-total-tokens N``: fade's pool is sized exactly like plain SGLang's (the same KV
bytes, all of it usable at full precision) and holds more tokens as it compresses them.
Drives the same multi-turn shared-prefix agent trace against both (the fade server
replays the baseline's exact prompts, so greedy outputs compare token by token), and
prints a side-by-side table (or ``--json``).

Servers run in their own process groups and are always stopped, also on
Ctrl-C / SIGTERM (see :class:`fade_sglang.eval.launcher.ServerProcess`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .workloads import (AgentTrace, AgentTraceSpec, TraceRun, TurnRecord, build_agent_trace, load_tokenizer,
                        run_agent_trace, scheduler_log_summary, token_agreement)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_ROOT / "models" / "fade-tiny-llama"
# Random weights (capacity, speed, serving correctness), used when no trained model is shipped.
GENERATED_MODEL = REPO_ROOT / ".cache" / "tiny-llama-random"
FADE_ARGS = ("--kv-compression", "fade", "--attention-backend", "fade_torch")
LOG_ARGS = ("--decode-log-interval", "1")
REQUEST_TIMEOUT_S = 120.0  # a stuck server fails the demo in minutes, not hours  # every decode step logs #running-req / #queue-req

# Workload sizes. Sessions run turn by turn (every session's turn t, then t + 1), so a server must
# keep all sessions' histories cached between turns: the full trace has more unique KV tokens than
# the baseline pool holds (it evicts history and recomputes it), while fade holds all of it.
# Every request in flight keeps its sinks + recent window at full precision, hence the moderate
# concurrency (see fp16_window_shortfall).
FULL_SPEC = AgentTraceSpec(sessions=12, turns=4, system_tokens=256, user_tokens=48, tool_tokens=192,
                           output_tokens=32)
QUICK_SPEC = AgentTraceSpec(sessions=6, turns=3, system_tokens=128, user_tokens=24, tool_tokens=96,
                            output_tokens=16)
FULL_BASE_TOKENS = 6144
QUICK_BASE_TOKENS = 768  # below the quick trace's 1280 unique KV tokens: both servers feel memory pressure
CONCURRENCY = 3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class DemoError(RuntimeError):
    """A problem the user can fix (printed as one line, exit code 2)."""


# ----------------------------------------------------------------------------- sizing


@dataclass(frozen=True)
class KVGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 4  # KV is stored in the model dtype (CPU servers run float32 by default)

    @property
    def full_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes  # K and V, every layer

    def baseline_pool_bytes(self, tokens: int) -> int:
        """Bytes of SGLang's MHATokenToKVPool: per layer K and V buffers of ``[tokens + page_size, H, D]``."""
        return (tokens + 1) * self.full_bytes_per_token


def model_geometry(model_path: Path, dtype: str = "float32") -> KVGeometry:
    cfg = json.loads((model_path / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return KVGeometry(layers=cfg["num_hidden_layers"], kv_heads=cfg.get("num_key_value_heads", heads),
                      head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, dtype_bytes=DTYPE_BYTES[dtype])


def fp16_window_shortfall(preset: str, tokens: int, concurrency: int) -> str | None:
    """Why ``concurrency`` requests in flight may not all keep their full-precision windows, or None.

    The tiers share one arena, so at most ``tokens`` (the pool's full-precision size) can be fp16
    at once; every running request keeps its sinks, its recent window and up to one demotion chunk
    there. When that exceeds the pool, requests are retracted or their windows shrink.
    """
    from ..config import FadeConfig

    cfg = FadeConfig.from_preset(preset)
    need = concurrency * (cfg.sink_tokens + cfg.recent_window + cfg.demote_chunk)
    if need <= tokens:
        return None
    return (f"{concurrency} requests x (sinks + recent window + demotion chunk) = {need} full-precision tokens "
            f"exceed the pool's {tokens}; use a larger --max-total-tokens or a lower --concurrency")


# ----------------------------------------------------------------------------- phases


def _progress(quiet: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if not quiet:
            print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    return say


def _reporters(name: str, spec: AgentTraceSpec, say: Callable[[str], None]
               ) -> tuple[Callable[[TurnRecord], None], Callable[[int, float], None]]:
    """Progress: a line per failed request and a line per finished turn (all sessions)."""
    failed = [0]

    def on_turn(rec: TurnRecord) -> None:
        if rec.error is not None:
            failed[0] += 1
            say(f"{name}: session {rec.session} turn {rec.turn + 1} FAILED: {rec.error}")

    def on_wave(turn: int, elapsed: float) -> None:
        say(f"{name}: turn {turn + 1}/{spec.turns} done for {spec.sessions} sessions ({elapsed:.1f}s"
            + (f", {failed[0]} failed so far)" if failed[0] else ")"))
    return on_turn, on_wave


def _server_state(srv: Any) -> dict[str, Any]:
    (state,) = srv.request("/server_info")["internal_states"]
    return state


def run_phase(name: str, model: Path, extra_args: Sequence[str], tokens: int, trace: AgentTrace,
              say: Callable[[str], None], *, concurrency: int, replay: TraceRun | None = None, fade: bool = False,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start a server, run the trace, collect stats, stop the server (always)."""
    from .launcher import ServerProcess

    say(f"{name}: starting server (--max-total-tokens {tokens})")
    t0 = time.perf_counter()
    with ServerProcess(model, [*extra_args, *LOG_ARGS], max_total_tokens=tokens, env=env,
                       startup_timeout_s=300) as srv:
        say(f"{name}: ready in {time.perf_counter() - t0:.0f}s; running {trace.spec.sessions} sessions x "
            f"{trace.spec.turns} turns")
        on_turn, on_wave = _reporters(name, trace.spec, say)
        run = run_agent_trace(srv.base_url, trace, concurrency=concurrency, replay=replay, on_turn=on_turn,
                              on_wave=on_wave, timeout_s=REQUEST_TIMEOUT_S)
        state = _server_state(srv)
        fade_stats = srv.fade_stats() if fade else None
        log = srv.log_text()
    say(f"{name}: server stopped")
    return {"run": run, "state": state, "fade_stats": fade_stats, "log": scheduler_log_summary(log),
            "log_path": str(srv.log_path)}


# ----------------------------------------------------------------------------- report


def result_dtype(geom: KVGeometry) -> str:
    return "float32" if geom.dtype_bytes == 4 else "16-bit"


def _tier_mix(stats: dict[str, Any]) -> dict[str, Any]:
    tiers = stats["tiers"]
    tokens = stats["tokens"] or 1
    return {name: {"tokens": t["used"], "share": t["used"] / tokens, "bytes": t["used_bytes"],
                   "pages": t["pages"]} for name, t in tiers.items()}


def summarize(geom: KVGeometry, base_tokens: int, preset: str, base: dict[str, Any],
              fade: dict[str, Any]) -> dict[str, Any]:
    base_cap = base["state"]["memory_usage"]["token_capacity"]
    base_bytes = geom.baseline_pool_bytes(base_cap)
    fs = fade["fade_stats"]
    rows = {
        "fp16": {
            "config": f"full-precision KV ({result_dtype(geom)})",
            "max_tokens": base_cap,
            "pool_bytes": base_bytes,
            "pool_bytes_source": "SGLang buffer shapes (tokens+1) x 2 x layers x kv_heads x head_dim x 4",
            "server_kvcache_gb": base["state"]["memory_usage"]["kvcache"],
            "bytes_per_token": base_bytes / base_cap,
            "tier_mix": {"fp16": {"tokens": None, "share": 1.0}},
            **base["run"].summary(),
            **base["log"],
        },
        "fade": {
            "config": f"--kv-compression fade --fade-preset {preset}",
            "max_tokens": fs["capacity_tokens"],
            "pool_bytes": fs["pool_bytes"],
            "pool_bytes_source": "/fade/stats pool_bytes (the KV arena every tier shares, scales included)",
            "server_kvcache_gb": fade["state"]["memory_usage"]["kvcache"],
            "bytes_per_token": fs["pool_bytes"] / fs["capacity_tokens"],
            "page_tokens": fs["pages"]["rows_per_page"]["fp16"],  # the arena is whole pages of this many fp16 rows
            "tier_mix": _tier_mix(fs),
            "held_tokens": fs["tokens"],
            "compression_ratio": fs["compression_ratio"],
            "demoted_tokens": fs["demoted_tokens"],
            "evicted_tokens": fs.get("radix", {}).get("evicted_tokens"),
            **fade["run"].summary(),
            **fade["log"],
        },
    }
    return {
        "model": {**asdict(geom), "full_bytes_per_token": geom.full_bytes_per_token},
        "preset": preset,
        "baseline_max_total_tokens": base_tokens,
        "results": rows,
        "capacity_gain": rows["fade"]["max_tokens"] / rows["fp16"]["max_tokens"],
        "bytes_ratio_fade_over_fp16": rows["fade"]["pool_bytes"] / rows["fp16"]["pool_bytes"],
        "greedy_agreement": token_agreement(base["run"], fade["run"]),
        "server_logs": {"fp16": base["log_path"], "fade": fade["log_path"]},
    }


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def format_table(result: dict[str, Any]) -> str:
    b, f = result["results"]["fp16"], result["results"]["fade"]
    mix = " / ".join(f"{name} {t['share']:.0%}" for name, t in f["tier_mix"].items())
    agree = result["greedy_agreement"]
    rate = agree["token_match_rate"]
    rows = [
        ("KV pool bytes (measured)", f"{b['pool_bytes'] / 2**20:.3f} MiB", f"{f['pool_bytes'] / 2**20:.3f} MiB"),
        ("max tokens the pool holds", _fmt(b["max_tokens"]), f"{f['max_tokens']} ({result['capacity_gain']:.2f}x)"),
        ("bytes / token", f"{b['bytes_per_token']:.0f}", f"{f['bytes_per_token']:.0f}"),
        ("tier mix after the run", "fp16 100%", f"{mix} of {f['held_tokens']} tok"),
        ("compression ratio of held KV", "1.00x", f"{f['compression_ratio']:.2f}x"),
        ("cache hit rate (cached/prompt)", f"{b['cache_hit_rate']:.1%}", f"{f['cache_hit_rate']:.1%}"),
        ("greedy token match vs fp16", "(reference)",
         "-" if rate is None else f"{rate:.1%} ({agree['requests_identical']}/{agree['requests_compared']} identical)"),
        ("output tok/s", f"{b['output_tok_per_s']:.1f}", f"{f['output_tok_per_s']:.1f}"),
        ("requests/s", f"{b['requests_per_s']:.2f}", f"{f['requests_per_s']:.2f}"),
        ("TTFT p50 / p99 (ms)", f"{_fmt(b['ttft_ms_p50'], '.0f')} / {_fmt(b['ttft_ms_p99'], '.0f')}",
         f"{_fmt(f['ttft_ms_p50'], '.0f')} / {_fmt(f['ttft_ms_p99'], '.0f')}"),
        ("max running requests", _fmt(b["max_running_requests"]), _fmt(f["max_running_requests"])),
        ("preempted (retracted) requests", _fmt(b["preempted_requests"]), _fmt(f["preempted_requests"])),
        ("failed requests", _fmt(b["failed"]), _fmt(f["failed"])),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "fp16 KV", "")])
    lines = [f"{'':<{w0}}  {'fp16 KV':<{w1}}  fade ({result['preset']})",
             f"{'-' * w0}  {'-' * w1}  {'-' * 34}"]
    lines += [f"{name:<{w0}}  {x:<{w1}}  {y}" for name, x, y in rows]
    m = result["model"]
    lines.append(f"\nsame KV budget: fade pool = {result['bytes_ratio_fade_over_fp16']:.3f}x the fp16 pool's bytes; "
                 f"model KV {m['layers']} layers x {m['kv_heads']} kv heads x head_dim {m['head_dim']} "
                 f"({m['full_bytes_per_token']} B/token at full precision, {m['dtype_bytes']} B/value)")
    lines.append(f"demoted tokens: {f['demoted_tokens']}; evicted from the radix tree: {f['evicted_tokens']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None,
                   help=f"model directory (default: {DEFAULT_MODEL.relative_to(REPO_ROOT)} in the repository if "
                        f"present, else a seeded random tiny Llama built in {GENERATED_MODEL.relative_to(REPO_ROOT)})")
    p.add_argument("--preset", default="balanced", help="fade preset: safe, balanced (default) or aggressive")
    p.add_argument("--max-total-tokens", type=int, default=None,
                   help=f"--max-total-tokens of both servers: the same KV bytes, which fade fills with more "
                        f"tokens as it compresses (default {FULL_BASE_TOKENS}, {QUICK_BASE_TOKENS} with --quick)")
    p.add_argument("--sessions", type=int, default=None, help="concurrent sessions sharing the system prompt")
    p.add_argument("--turns", type=int, default=None, help="turns per session")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY, help="requests in flight (default %(default)s)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPE_BYTES),
                   help="model and KV dtype of both servers (default: float32 on CPU, where fp16/bf16 matmuls are "
                        "~10x slower, so the capacity gain there is against float32 KV; bfloat16 on GPU)")
    p.add_argument("--quick", action="store_true", help="a smaller workload (tests, smoke runs)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def resolve_model(arg: str | None, say: Callable[[str], None] = lambda _: None) -> Path:
    """The given model, else the shipped trained model, else a seeded random tiny Llama built locally."""
    if arg is None and not (DEFAULT_MODEL / "config.json").is_file():
        if not (GENERATED_MODEL / "config.json").is_file():
            from .tiny_model import build_tiny_llama

            say(f"no trained model in {DEFAULT_MODEL}: building the seeded random tiny Llama in {GENERATED_MODEL}")
            build_tiny_llama(GENERATED_MODEL)
        return GENERATED_MODEL.resolve()
    path = DEFAULT_MODEL if arg is None else Path(arg).expanduser()
    if not (path / "config.json").is_file():
        raise DemoError(f"model directory {path} not found or has no config.json")
    return path.resolve()


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from ..config import PRESETS

    if args.preset not in PRESETS:
        raise DemoError(f"unknown preset {args.preset!r} (choose from {', '.join(PRESETS)})")
    say = _progress(args.quiet)
    model = resolve_model(args.model_path, say)
    spec = QUICK_SPEC if args.quick else FULL_SPEC
    spec = AgentTraceSpec(**{**asdict(spec), **{k: v for k, v in (("sessions", args.sessions),
                                                                   ("turns", args.turns)) if v}})
    base_tokens = args.max_total_tokens or (QUICK_BASE_TOKENS if args.quick else FULL_BASE_TOKENS)
    from .launcher import server_device

    dtype = args.dtype or ("float32" if server_device() == "cpu" else "bfloat16")
    geom = model_geometry(model, dtype)
    say(f"model {model}: {geom.full_bytes_per_token} B/token full precision; both servers get "
        f"--max-total-tokens {base_tokens} ({geom.baseline_pool_bytes(base_tokens) / 2**20:.1f} MiB of KV); "
        f"fade {args.preset} holds more tokens in them as it compresses")
    short = fp16_window_shortfall(args.preset, base_tokens, args.concurrency)
    if short:
        say(f"warning: {short}")
    trace = build_agent_trace(spec, load_tokenizer(model))
    say(f"workload: {spec.sessions} sessions x {spec.turns} turns, shared system prompt {spec.system_tokens} tok, "
        f"final context {spec.final_context_tokens()} tok, {spec.unique_tokens()} unique KV tokens")
    dtype_args = ("--dtype", dtype)  # after launcher.CPU_SERVER_ARGS' --dtype: the last one wins
    base = run_phase("fp16", model, dtype_args, base_tokens, trace, say, concurrency=args.concurrency)
    fade = run_phase("fade", model, (*dtype_args, *FADE_ARGS, "--fade-preset", args.preset), base_tokens, trace,
                     say, concurrency=args.concurrency, replay=base["run"], fade=True)
    result = summarize(geom, base_tokens, args.preset, base, fade)
    result["workload"] = asdict(spec)
    return result


def main(argv: Sequence[str] | None = None, prog: str = "fade-sglang demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from .launcher import ServerStartupError, unwind_on_signals

    try:
        with unwind_on_signals():
            result = run_demo(args)
    except DemoError as e:
        print(f"fade-sglang: error: {e}", file=sys.stderr)
        return 2
    except ServerStartupError as e:
        print(f"fade-sglang: error: a server did not start: {e.headline}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fade-sglang: interrupted; servers stopped", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2) if args.json else format_table(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
