"""Decode-attention kernel benchmark: fade's mixed-tier kernel vs SGLang / FlashInfer over fp16 KV.

Same shapes side by side in one run (one layer, GQA 8:1, head_dim 128 by default):

  * ``sglang-fp16``     SGLang's Triton ``decode_attention_fwd`` over the model-dtype KV
                        (static ``--sglang-splits`` KV splits, SGLang's default 8);
  * ``flashinfer-fp16`` FlashInfer ``BatchDecodeWithPagedKVCacheWrapper`` (page size 1), when importable;
  * ``fade-fp16``       our kernel with every slot in the fp16 tier (overhead check);
  * ``fade-int4`` / ``fade-int2``  every slot packed (warm INT4 g64 / cold INT2 g32);
  * ``fade-mix``        per request: 16 sink + 128 recent tokens fp16, 70% of the rest INT4, the rest INT2.

Per row: median time (``triton.testing.do_bench``), bytes read (KV of every tier, with
scales / zeros, plus indices, q and out), achieved GB/s and its share of the measured
device copy bandwidth, and speedup over ``sglang-fp16``. The per-step tier partition
(shared by all layers) is timed once per shape and reported separately. Packed codes
are random bytes: the timing does not depend on the values.

GPU:   python benchmarks/kernels.py [--dtype bf16|fp16] [--batches 1,8,32] [--contexts 4096,32768,131072] [--json out.json]
CPU:   TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke   (tiny shapes, fp16, one timed run each, plus a
       correctness check against the torch reference; keeps this script from rotting)
       python benchmarks/kernels.py --compile-only 90   (compile every kernel for sm_90 without a GPU; registers)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from fade_sglang.pool.view import PackedLayerKV, PackedPart, TieredLayerKV
from fade_sglang.quant import QuantFormat, rotation_matrix

SINKS, RECENT, WARM_SHARE = 16, 128, 0.7
WARM_FMT, COLD_FMT = QuantFormat(4, 64), QuantFormat(2, 32)


@dataclass
class Row:
    batch: int
    context: int
    impl: str
    time_ms: float | None
    bytes_read: int
    gbps: float | None
    pct_of_copy_bw: float | None
    speedup_vs_sglang: float | None
    note: str = ""


# ---------------------------------------------------------------------------- data


def _packed(rows: int, heads: int, d: int, fmt: QuantFormat, base: int, device: str) -> PackedLayerKV:
    """Random codes and plausible scales / zeros; keys and values in ``fmt``."""
    parts = []
    for _ in range(2):
        p = PackedPart.zeros(fmt, 1, rows, heads, d, device)
        p.data.random_(0, 256)
        p.scale.copy_(torch.rand_like(p.scale, dtype=torch.float32) * 0.1 + 0.01)
        p.zero.copy_(torch.randn_like(p.zero, dtype=torch.float32) * 0.1 - 0.5)
        parts.append(p.layer(0))
    return PackedLayerKV(parts[0], parts[1], base)


def build_view(tokens: int, kv_heads: int, d: int, dtype: torch.dtype, device: str) -> TieredLayerKV:
    """One layer where every token exists in all three tiers: fp16 rows [1, tokens], warm and cold stores."""
    fp_rows = tokens + 1  # row 0 is SGLang's padding slot
    kv = torch.randn(2, fp_rows, kv_heads, d, dtype=dtype, device=device)
    warm_base, cold_base = fp_rows, fp_rows + tokens
    return TieredLayerKV(kv[0], kv[1], _packed(tokens, kv_heads, d, WARM_FMT, warm_base, device),
                         _packed(tokens, kv_heads, d, COLD_FMT, cold_base, device), warm_base, cold_base,
                         rotation_matrix(d, 0, torch.float32, device),
                         torch.randn(kv_heads, d, device=device) * 0.1)


def scenario_indices(kind: str, batch: int, ctx: int, view: TieredLayerKV, device: str) -> torch.Tensor:
    """kv_indices of ``batch`` requests of ``ctx`` tokens (token t of request b is token b * ctx + t)."""
    tok = torch.arange(batch * ctx, device=device).reshape(batch, ctx)
    fp, warm, cold = tok + 1, tok + view.warm_base, tok + view.cold_base
    if kind == "fp16":
        return fp.reshape(-1)
    if kind == "int4":
        return warm.reshape(-1)
    if kind == "int2":
        return cold.reshape(-1)
    pos = torch.arange(ctx, device=device)
    is_fp = (pos < SINKS) | (pos >= ctx - RECENT)
    n_mid = max(0, ctx - SINKS - RECENT)
    is_warm = ~is_fp & (pos >= ctx - RECENT - int(round(WARM_SHARE * n_mid)))  # newer middle tokens INT4
    out = torch.where(is_fp, fp, torch.where(is_warm, warm, cold))
    return out.reshape(-1)


def bytes_read(kind: str, batch: int, ctx: int, q_heads: int, kv_heads: int, d: int, elem: int) -> int:
    per_tok = {"fp16": 2 * d * elem, "int4": 2 * WARM_FMT.bytes_per_token_head(d),
               "int2": 2 * COLD_FMT.bytes_per_token_head(d)}
    if kind == "mix":
        n_fp = min(ctx, SINKS + RECENT)
        n_warm = int(round(WARM_SHARE * (ctx - n_fp)))
        kv = (n_fp * per_tok["fp16"] + n_warm * per_tok["int4"] + (ctx - n_fp - n_warm) * per_tok["int2"]) * kv_heads
    else:
        kv = ctx * per_tok[kind] * kv_heads
    return batch * (kv + 4 * ctx + 2 * q_heads * d * elem)


# ---------------------------------------------------------------------------- timing


def _timer(smoke: bool) -> Callable[[Callable[[], object]], float]:
    if smoke:
        def once(fn: Callable[[], object]) -> float:
            fn()  # first call builds the interpreter state; time the second
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return once
    import triton.testing

    return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth_gbps(device: str, smoke: bool) -> float | None:
    if smoke:
        return None
    n = 1 << 30  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _timer(False)(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3) / 1e9  # read + write


def sglang_runner(q, view, indptr, indices, scale, splits) -> tuple[Callable[[], object] | None, str]:
    try:
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    except Exception as e:  # noqa: BLE001 - report any import failure as a skip reason
        return None, f"sglang decode_attention_fwd not importable: {type(e).__name__}: {e}"
    b, hq, d = q.shape
    o = torch.empty_like(q)
    logits = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    nsplits = torch.full((b,), splits, dtype=torch.int32, device=q.device)
    idx32, ptr32 = indices.to(torch.int32), indptr.to(torch.int32)

    def run() -> torch.Tensor:
        decode_attention_fwd(q, view.k_fp16, view.v_fp16, o, ptr32, idx32, logits, lse, nsplits, splits, scale,
                             1.0, 1.0)
        return o

    return run, ""


def flashinfer_runner(q, view, indptr, indices, scale) -> tuple[Callable[[], object] | None, str]:
    if q.device.type != "cuda":
        return None, "FlashInfer kernels need a GPU"
    try:
        import flashinfer
    except Exception as e:  # noqa: BLE001
        return None, f"flashinfer not importable: {type(e).__name__}: {e}"
    b, hq, d = q.shape
    hkv = view.k_fp16.shape[1]
    try:  # FlashInfer's API moves between releases: report a failure instead of aborting the table
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=q.device)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=hq // hkv >= 4)
        wrapper.plan(indptr.to(torch.int32), indices.to(torch.int32),
                     torch.ones(b, dtype=torch.int32, device=q.device), hq, hkv, d, 1, sm_scale=scale,
                     q_data_type=q.dtype, kv_data_type=view.k_fp16.dtype)
        cache = (view.k_fp16[:, None], view.v_fp16[:, None])  # [pages, page_size=1, H, D]
        wrapper.run(q, cache)
    except Exception as e:  # noqa: BLE001
        return None, f"flashinfer failed: {type(e).__name__}: {e}"[:200]
    return (lambda: wrapper.run(q, cache)), ""


# ---------------------------------------------------------------------------- main


@dataclass
class Setup:
    device: str
    dtype: torch.dtype
    kv_heads: int
    group: int
    head_dim: int
    sglang_splits: int
    smoke: bool
    copy_bw: float | None

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def bench_shape(st: Setup, batch: int, ctx: int) -> list[Row]:
    """All implementations on one (batch, context) shape; buffers die with this frame."""
    from fade_sglang import kernels as K

    d, kv_heads, device = st.head_dim, st.kv_heads, st.device
    q_heads, scale, tokens = kv_heads * st.group, 1.0 / math.sqrt(st.head_dim), batch * ctx
    timer = _timer(st.smoke)
    view = build_view(tokens, kv_heads, d, st.dtype, device)
    q = torch.randn(batch, q_heads, d, dtype=st.dtype, device=device)
    indptr = torch.arange(0, tokens + 1, ctx, device=device)
    rows: list[Row] = []

    def add(impl: str, fn: Callable[[], object] | None, kind: str, note: str = "") -> None:
        b = bytes_read(kind, batch, ctx, q_heads, kv_heads, d, st.elem)
        try:
            t = timer(fn) if fn is not None else None
        except Exception as e:  # noqa: BLE001 - one failing implementation must not lose the shape's other rows
            t, note = None, f"failed: {type(e).__name__}: {e}"[:300]
        base = rows[0].time_ms if rows else t  # rows[0] is sglang-fp16
        gbps = b / (t * 1e-3) / 1e9 if t else None
        rows.append(Row(batch, ctx, impl, t, b, gbps, 100 * gbps / st.copy_bw if gbps and st.copy_bw else None,
                        base / t if base and t else None, note))

    fp_idx = scenario_indices("fp16", batch, ctx, view, device)
    fn, why = sglang_runner(q, view, indptr, fp_idx, scale, st.sglang_splits)
    add("sglang-fp16", fn, "fp16", why)
    fn, why = flashinfer_runner(q, view, indptr, fp_idx, scale)
    add("flashinfer-fp16", fn, "fp16", why)
    for kind in ("fp16", "int4", "int2", "mix"):
        idx = scenario_indices(kind, batch, ctx, view, device)
        part = K.partition_by_tier(indptr, idx, view)
        splits = K.default_num_kv_splits(batch, kv_heads, idx.numel(), device)
        ws = K.DecodeWorkspace.allocate(batch, q_heads, d, splits, device)
        out = torch.empty_like(q)

        def ours(idx=idx, part=part, splits=splits, ws=ws, out=out) -> torch.Tensor:
            return K.decode_attention(q, view, indptr, idx, scale, out, partition=part, num_kv_splits=splits,
                                      workspace=ws)

        add(f"fade-{kind}", ours, kind, f"splits={splits}")
        if kind == "mix":
            t = timer(lambda idx=idx, part=part: K.partition_by_tier(indptr, idx, view, out=part))
            rows.append(Row(batch, ctx, "fade-partition (per step)", t, 0, None, None, None,
                            "once per forward step, shared by all layers"))
    return rows


def check_correctness(st: Setup, batch: int = 3, ctx: int = 300) -> None:
    """Decode (every scenario) and extend (mixed prefix) vs the torch reference, before any timing.

    The test suite runs the kernels only in the CPU interpreter (fp16 / fp32), so this is where
    bf16 and the compiled GPU code get checked. Tolerance: max |err| / max |ref| < 3e-2 (bf16 dots).
    """
    from fade_sglang import kernels as K
    from fade_sglang.attention import decode_attention_ref, extend_attention_ref

    d, kv_heads = st.head_dim, st.kv_heads
    q_heads, scale = kv_heads * st.group, 1.0 / math.sqrt(st.head_dim)
    view = build_view(batch * ctx, kv_heads, d, st.dtype, st.device)
    gen = torch.Generator(device=st.device).manual_seed(0)
    q = torch.randn(batch, q_heads, d, dtype=st.dtype, device=st.device, generator=gen)
    indptr = torch.arange(0, batch * ctx + 1, ctx, device=st.device)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max() / b.float().abs().max())

    errs = {}
    for kind in ("fp16", "int4", "int2", "mix"):
        idx = scenario_indices(kind, batch, ctx, view, st.device)
        errs[f"decode-{kind}"] = rel(K.decode_attention(q, view, indptr, idx, scale, num_kv_splits=3),
                                     decode_attention_ref(q.float(), view, indptr, idx, scale))
    new = ([5, 40, 1] * batch)[:batch]  # 40 new tokens span several query blocks
    qo = torch.tensor([0] + new, device=st.device).cumsum(0)
    qe = torch.randn(sum(new), q_heads, d, dtype=st.dtype, device=st.device, generator=gen)
    kn = torch.randn(sum(new), kv_heads, d, dtype=st.dtype, device=st.device, generator=gen)
    vn = torch.randn(sum(new), kv_heads, d, dtype=st.dtype, device=st.device, generator=gen)
    idx = scenario_indices("mix", batch, ctx, view, st.device)
    errs["extend-mix"] = rel(K.extend_attention(qe, kn, vn, view, qo, indptr, idx, scale),
                             extend_attention_ref(qe.float(), kn, vn, view, qo, indptr, idx, scale))
    bad = {k: v for k, v in errs.items() if not v < 3e-2}
    print("# correctness vs torch reference (max rel err): " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    if bad:
        raise AssertionError(f"kernels disagree with the torch reference: {bad}")


def run(args: argparse.Namespace) -> list[Row]:
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    st = Setup(device, torch.float16 if smoke or args.dtype == "fp16" else torch.bfloat16,
               *((2, 4, 64) if smoke else (args.kv_heads, args.group, args.head_dim)),
               args.sglang_splits, smoke, copy_bandwidth_gbps(device, smoke))
    batches = [2] if smoke else [int(x) for x in args.batches.split(",")]
    contexts = [200] if smoke else [int(x) for x in args.contexts.split(",")]
    print(f"# device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu (TRITON_INTERPRET: times are meaningless)'} "
          f"dtype={st.dtype} kv_heads={st.kv_heads} group={st.group} head_dim={st.head_dim} "
          f"copy_bw={'n/a' if st.copy_bw is None else f'{st.copy_bw:.0f} GB/s'}")
    check_correctness(st, *((2, 200) if smoke else (3, 300)))
    rows: list[Row] = []
    for batch in batches:
        for ctx in contexts:
            per_tok = st.kv_heads * (2 * st.head_dim * st.elem + 2 * WARM_FMT.bytes_per_token_head(st.head_dim)
                                     + 2 * COLD_FMT.bytes_per_token_head(st.head_dim))
            need = 1.1 * batch * ctx * per_tok
            if device == "cuda":
                free = torch.cuda.mem_get_info()[0]
                if need > 0.85 * free:
                    print(f"skip batch={batch} ctx={ctx}: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
                    continue
            rows += bench_shape(st, batch, ctx)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def print_table(rows: list[Row]) -> None:
    head = f"{'batch':>5} {'ctx':>7} {'impl':<26} {'ms':>9} {'MB read':>9} {'GB/s':>7} {'%copy':>6} {'xSGL':>6}  note"
    print(head)
    print("-" * len(head))
    def fmt(x: float | None, spec: str) -> str:
        return format("-", ">" + spec.split(".")[0]) if x is None else format(x, spec)

    for r in rows:
        print(f"{r.batch:>5} {r.context:>7} {r.impl:<26} {fmt(r.time_ms, '9.4f')} {r.bytes_read / 1e6:>9.1f} "
              f"{fmt(r.gbps, '7.0f')} {fmt(r.pct_of_copy_bw, '6.1f')} {fmt(r.speedup_vs_sglang, '6.2f')}  {r.note}")


def compile_only(args: argparse.Namespace) -> list[dict]:
    """Compile every fade kernel for ``cuda:sm_<arch>`` without a GPU (ptxas ships with triton).

    The interpreter never runs the real compiler, so this is the CPU-side check that the kernels
    lower (dtypes, layouts, bf16) and a first look at register pressure / spills. Launches go
    through the real launchers with small CPU tensors; ``JITFunction.run`` compiles instead.
    """
    import inspect
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction, mangle_type

    from fade_sglang.kernels.decode import DecodeWorkspace, launch_decode, partition_by_tier
    from fade_sglang.kernels.extend import launch_extend
    from fade_sglang.kernels.quantize import launch_quantize

    target = GPUTarget("cuda", int(args.compile_only), 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    report: list[dict] = []

    def compile_instead(self, *a, grid, warmup, **kw):  # noqa: ANN001 - JITFunction.run's signature
        opts = {k: kw.pop(k) for k in list(kw) if k in ("num_warps", "num_stages", "enable_fp_fusion", "maxnreg")}
        bound = inspect.signature(self.fn).bind(*a, **kw)
        bound.apply_defaults()
        signature, constexprs = {}, {}
        for i, (name, val) in enumerate(bound.arguments.items()):
            if self.params[i].is_constexpr or val is None:
                signature[name], constexprs[(i,)] = "constexpr", getattr(val, "value", val)
            elif isinstance(val, torch.Tensor):
                signature[name] = mangle_type(val)
            elif isinstance(val, bool):
                signature[name] = "i1"
            elif isinstance(val, int):
                signature[name] = "i64" if abs(val) >= 2**31 else "i32"
            else:
                signature[name] = "fp32"
        entry = {"kernel": self.fn.__name__, **opts}
        try:
            k = triton.compile(ASTSource(self, signature, constexprs), target=target, options=opts)
            entry["shared_bytes"] = k.metadata.shared
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                                       capture_output=True, text=True).stdout
            entry["resources"] = " ".join(w for w in usage.split() if w.startswith(("REG:", "STACK:")))
        except Exception as e:  # noqa: BLE001 - report, keep compiling the others
            entry["error"] = f"{type(e).__name__}: {e}"[:500]
        report.append(entry)
        print(entry, flush=True)

    JITFunction.run = compile_instead
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    hkv, d = args.kv_heads, args.head_dim
    hq = hkv * args.group
    view = build_view(8, hkv, d, dtype, "cpu")
    indptr = torch.tensor([0, 4, 8])
    part = partition_by_tier(indptr, scenario_indices("mix", 2, 4, view, "cpu"), view.warm_base, view.cold_base)
    q = torch.zeros(2, hq, d, dtype=dtype)
    launch_decode(q, view, part, 0.1, torch.empty_like(q), 4, DecodeWorkspace.allocate(2, hq, d, 4, "cpu"))
    kn = torch.zeros(8, hkv, d, dtype=dtype)
    launch_extend(torch.zeros(8, hq, d, dtype=dtype), kn, kn, view, indptr, part, 0.1,
                  torch.empty(8, hq, d, dtype=dtype), 4)
    for fmt in (QuantFormat(4, 64, True), QuantFormat(2, 32, True)):
        launch_quantize(torch.zeros(1, 8, hkv, d, dtype=dtype), torch.arange(4), PackedPart.zeros(fmt, 1, 8, hkv, d, "cpu"),
                        torch.arange(4), view.rotation, torch.zeros(1, hkv, d))
    failed = [r for r in report if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} kernel(s) failed to compile for sm_{args.compile_only}")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--contexts", default="4096,32768,131072")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="query heads per KV head")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sglang-splits", type=int, default=8, help="SGLang's triton_attention_num_kv_splits")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--compile-only", metavar="ARCH", help="no GPU needed: compile every kernel for sm_ARCH "
                   "(e.g. 90) and print registers / spills (do not set TRITON_INTERPRET)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.compile_only:
        if os.environ.get("TRITON_INTERPRET") == "1":
            sys.exit("--compile-only needs the real compiler: unset TRITON_INTERPRET")
        report = compile_only(args)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
        return []
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--smoke runs on CPU and needs TRITON_INTERPRET=1 set before Python starts")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) on CPU")
    rows = run(args)
    print_table(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return rows


if __name__ == "__main__":
    main()
