"""One-shot GPU check of fade's Triton kernels: correctness (bf16 / fp16) and decode timing, within a time budget.

Run it through ``benchmarks/gpu_check.sh`` (which adds the outer timeout, the log and nvidia-smi):

  1. correctness, per dtype (bf16 and fp16 on a GPU): fade's ``decode_attention`` / ``extend_attention`` /
     ``quantize_rows`` against the float32 torch reference (``decode_attention_ref`` / ``extend_attention_ref`` /
     ``fade_sglang.quant.quantize``) on synthetic KV with outlier channels in K (``fade_sglang.eval.synthetic``),
     GQA, ragged lengths (an empty request included) and every tier mix, written through
     ``TieredKVStore``'s real demotion path (rotation, key centering, clip search); plus an agreement check of
     the timing baselines (SGLang's Triton decode kernel, torch SDPA) against the same reference;
  2. decode timing (``benchmarks/kernels.py``'s ``bench_shape``: SGLang's Triton ``decode_attention_fwd`` over
     fp16 KV, fade over all-fp16 / all-INT4 / all-INT2 / the realistic mix) plus torch's flash SDPA over dense
     KV, at each (batch, context), with bytes read and speedups over SGLang and over SDPA;
  3. a time budget: a case starts only if its estimate fits before the deadline, the rest is recorded as skipped;
  4. device name, torch / triton / CUDA versions and the date.

Results go to ``<out>/gpu_check.json`` (rewritten after every case, so a killed run still leaves its results)
and tables on stdout. Exit status: 0 all ran cases passed, 1 a correctness failure or a case error, 2 a setup error.

Imports: no install is needed. The repo root goes on ``sys.path`` and, when ``fade_sglang.kernels`` is not
importable (pyproject maps it to ``kernels/``), a shim registers ``kernels/`` under that name. SGLang is not
imported as a package (its ``__init__`` pulls in transformers, aiohttp, ...): its decode kernel file is taken
from the wheel that ``gpu_check.sh --prepare`` downloads into ``.whl/`` (or from an installed SGLang) and
imported by file path under stub parent packages (``sglang.srt.environ`` and ``score_mod`` are the real files;
``sglang.srt.utils`` is a 4-function stub).

CPU smoke (the test suite runs it): ``TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke``: tiny shapes,
fp16 / fp32 (the interpreter breaks bf16), SDPA through the math backend, times meaningless.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
import types
import zipfile
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SGLANG_VERSION = "0.5.23"
SGLANG_DECODE = "sglang.kernels.ops.attention.decode_attention"
# What importing SGLang's decode kernel by file path needs from the package (everything else is stubbed).
SGLANG_FILES = (
    "sglang/kernels/ops/attention/decode_attention.py",
    "sglang/kernels/ops/attention/score_mod.py",
    "sglang/srt/environ.py",
)
WHEEL_LIMIT_BYTES = 64 << 20
# max |err| / max |ref| per dtype (the float32 reference reads the same stored / dequantized values, so this is
# the kernels' arithmetic: bf16 / fp16 dot operands with fp32 accumulation, as in SGLang's kernel).
ATTN_TOL = {"bf16": 3e-2, "fp16": 1e-2, "fp32": 2e-4}
DTYPE_NAMES = ("bf16", "fp16", "fp32")


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# ---------------------------------------------------------------------------- imports


def import_fade() -> types.ModuleType:
    """``fade_sglang.kernels`` from this checkout, installed or not (see the module docstring)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module("fade_sglang.kernels")
    except ModuleNotFoundError as e:
        if e.name != "fade_sglang.kernels":
            raise
    import fade_sglang

    spec = importlib.util.spec_from_file_location("fade_sglang.kernels", ROOT / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    fade_sglang.kernels = mod
    return mod


def load_bench() -> types.ModuleType:
    """benchmarks/kernels.py as a module (not on sys.path as ``kernels``: that name is the repo's kernels/ folder)."""
    name = "fade_bench_kernels"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def find_wheel(wheel_dir: Path) -> Path | None:
    wheels = sorted(wheel_dir.glob(f"sglang-{SGLANG_VERSION}-*.whl")) if wheel_dir.is_dir() else []
    return wheels[-1] if wheels else None


def verify_wheels(wheel_dir: Path) -> int:
    """--verify-wheels: the SGLang wheel is there, holds the kernel files, and the folder fits the limit."""
    wheel = find_wheel(wheel_dir)
    if wheel is None:
        print(f"gpu_check: ERROR: no sglang-{SGLANG_VERSION}-*.whl in {wheel_dir}", file=sys.stderr)
        return 1
    with zipfile.ZipFile(wheel) as z:
        missing = [f for f in SGLANG_FILES if f not in z.namelist()]
    total = sum(p.stat().st_size for p in wheel_dir.rglob("*") if p.is_file())
    for p in sorted(wheel_dir.glob("*.whl")):
        print(f"  {p.name}  {p.stat().st_size / 2**20:.1f} MiB")
    print(f"  {wheel_dir}: {total / 2**20:.1f} MiB in all (limit {WHEEL_LIMIT_BYTES >> 20} MiB)")
    if missing:
        print(f"gpu_check: ERROR: {wheel.name} lacks {missing}", file=sys.stderr)
        return 1
    if total > WHEEL_LIMIT_BYTES:
        print(f"gpu_check: ERROR: {wheel_dir} is over {WHEEL_LIMIT_BYTES >> 20} MiB", file=sys.stderr)
        return 1
    return 0


def _stub_package(name: str, path: Path) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    mod.__package__ = name
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    mod.__spec__.submodule_search_locations = [str(path)]
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, mod)
    return mod


def _stub_srt_utils() -> types.ModuleType:
    """The four helpers decode_attention.py takes from sglang.srt.utils (same logic, CUDA / ROCm only)."""
    import torch

    mod = types.ModuleType("sglang.srt.utils")

    def is_hip() -> bool:
        return torch.version.hip is not None

    def get_device_core_count(device_id: int = 0) -> int:
        return torch.cuda.get_device_properties(device_id).multi_processor_count if torch.cuda.is_available() else 0

    def _gcn(arch: str) -> bool:
        return bool(torch.version.hip) and arch in torch.cuda.get_device_properties(0).gcnArchName

    mod.is_hip = is_hip
    mod.get_device_core_count = get_device_core_count
    mod.is_gfx95_supported = lambda: _gcn("gfx95")
    mod.is_gfx1250_supported = lambda: _gcn("gfx1250")
    return mod


def _stub_runtime_context() -> types.ModuleType:
    mod = types.ModuleType("sglang.srt.runtime_context")

    def get_exec():  # only read on the ROCm MLA path; "not published yet" is its documented answer
        raise ValueError("no SGLang runtime in gpu_check")

    mod.get_exec = get_exec
    return mod


def _import_sglang_decode(root: Path) -> types.ModuleType:
    """Import ``sglang/kernels/ops/attention/decode_attention.py`` under ``root`` without SGLang's __init__s."""
    base = root / "sglang"
    for name in ("sglang", "sglang.kernels", "sglang.kernels.ops", "sglang.kernels.ops.attention", "sglang.srt"):
        _stub_package(name, base.joinpath(*name.split(".")[1:]))
    sys.modules["sglang.srt.utils"] = _stub_srt_utils()
    sys.modules["sglang.srt.runtime_context"] = _stub_runtime_context()
    sys.modules["sglang"].srt.utils = sys.modules["sglang.srt.utils"]
    return importlib.import_module(SGLANG_DECODE)


def load_sglang_decode(mode: str, wheel_dir: Path) -> dict[str, Any]:
    """Make ``from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd`` work (or fail fast).

    ``mode``: wheel (``wheel_dir``), installed (an installed SGLang's files, its __init__ not run), auto
    (wheel, else installed), none. Returns what was loaded, or why not (``error``).
    """
    info: dict[str, Any] = {"mode": mode}
    if "sglang" in sys.modules and mode != "none":  # the real package is already imported: use it
        try:
            mod = importlib.import_module(SGLANG_DECODE)
            info.update(source="already imported", file=mod.__file__)
            return info
        except Exception as e:  # noqa: BLE001
            info["error"] = f"{type(e).__name__}: {e}"
            return info
    root: Path | None = None
    try:
        if mode in ("wheel", "auto"):
            wheel = find_wheel(wheel_dir)
            if wheel is not None:
                dest = Path(tempfile.mkdtemp(prefix="gpu_check_sglang_"))
                atexit.register(shutil.rmtree, dest, True)
                with zipfile.ZipFile(wheel) as z:
                    missing = [f for f in SGLANG_FILES if f not in z.namelist()]
                    if missing:
                        raise FileNotFoundError(f"{wheel.name} lacks {missing}")
                    for f in SGLANG_FILES:
                        z.extract(f, dest)
                root = dest
                info.update(source="wheel", wheel=wheel.name, wheel_mib=round(wheel.stat().st_size / 2**20, 1))
            elif mode == "wheel":
                raise FileNotFoundError(f"no sglang-{SGLANG_VERSION}-*.whl in {wheel_dir} "
                                        "(run: bash benchmarks/gpu_check.sh --prepare, and carry .whl)")
        if root is None and mode in ("installed", "auto"):
            spec = importlib.util.find_spec("sglang")  # finds the package without running its __init__
            if spec is None or not spec.submodule_search_locations:
                raise FileNotFoundError(f"SGLang is neither in {wheel_dir} (run gpu_check.sh --prepare) "
                                        "nor installed")
            root = Path(list(spec.submodule_search_locations)[0]).parent
            info.update(source="installed", path=str(root / "sglang"))
        if root is None:
            raise RuntimeError("disabled (--sglang none)")
        mod = _import_sglang_decode(root)
        src = Path(mod.__file__).read_bytes()
        info.update(file=mod.__file__, sha256=hashlib.sha256(src).hexdigest()[:16])
        if not hasattr(mod, "decode_attention_fwd"):
            raise AttributeError(f"{mod.__file__} has no decode_attention_fwd")
    except Exception as e:  # noqa: BLE001 - recorded; the SGLang rows are skipped with this reason
        info["error"] = f"{type(e).__name__}: {e}"[:400]
        for name in [n for n in sys.modules if n == "sglang" or n.startswith("sglang.")]:
            del sys.modules[name]
        sys.modules[SGLANG_DECODE] = None  # the bench's import fails at once instead of finding a real SGLang
    return info


# ---------------------------------------------------------------------------- bookkeeping


class Budget:
    """Wall-clock budget from process start; a case starts only if ``est_s`` fits before the deadline."""

    def __init__(self, seconds: float, start: float):
        self.seconds, self.start = seconds, start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows(self, est_s: float) -> bool:
        return self.elapsed() + est_s <= self.seconds


class Report:
    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {"meta": meta, "correctness": [], "timing": [], "targets": [], "skipped": [],
                                     "errors": [], "summary": {"complete": False}}

    def log(self, budget: Budget, msg: str) -> None:
        print(f"[{budget.elapsed():6.1f}s] {msg}", flush=True)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, self.path)


def _tb() -> str:
    """The current exception's traceback: its start (the innermost cause, printed first) and its end."""
    tb = traceback.format_exc()
    return tb if len(tb) <= 6000 else tb[:3000] + "\n...\n" + tb[-3000:]


def _rel(a, b) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def _rel_l2(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12)) if b.numel() else 0.0


# ---------------------------------------------------------------------------- correctness data


class StoreCase:
    """One layer of a real ``TieredKVStore`` where every token exists in all three tiers.

    Each synthetic token is written to three fp16 slots: copy A stays fp16, copy B is demoted to INT4 (the
    first demotion freezes the key centers), copy C to INT2 (a third of it through INT4, the warm -> cold
    path). Any tier mix of a request is then a choice of slot per token.
    """

    def __init__(self, lens: list[int], kv_heads: int, head_dim: int, dtype, device: str, seed: int = 0,
                 knobs: dict[str, Any] | None = None):
        import torch

        from fade_sglang.config import FadeConfig
        from fade_sglang.eval.synthetic import synthetic_kv
        from fade_sglang.pool.layout import Tier
        from fade_sglang.pool.tiered_store import TieredKVStore

        n = sum(lens)
        self.lens, self.n, self.device = lens, n, device
        # INT4 + INT2 sharing the arena with fp16 (``knobs``: e.g. keys at more bits, a protected layer);
        # rotation, centering, clip search
        cfg = FadeConfig(**(knobs or {}))
        # The three fp16 copies at once, plus free pages for the packed records a demotion writes before it
        # frees the fp16 rows it read (the tiers share the arena's pages).
        size = 4 * n + 64
        self.store = store = TieredKVStore(size, dtype, kv_heads, head_dim, 1, device, fade_config=cfg)
        k, v = synthetic_kv(n, kv_heads, head_dim, seed=seed)
        self.k, self.v = k.to(device), v.to(device)  # float32 originals
        copies = []
        for _ in range(3):
            s = store.alloc(n)
            store.write_kv(0, s, self.k.to(dtype), self.v.to(dtype))
            copies.append(s)
        a, b, c = copies
        b = store.demote(b, Tier.WARM)
        third = n // 3
        c = c.clone()
        c[:third] = store.demote(c[:third], Tier.WARM)
        c = store.demote(c, Tier.COLD)
        self.slots = {"fp16": a, "int4": b, "int2": c}
        self.starts = [0]
        for length in lens:
            self.starts.append(self.starts[-1] + length)
        self.indptr = torch.tensor(self.starts, device=device)

    @property
    def view(self):
        return self.store.layer_view(0)

    def indices(self, scheme: str, seed: int = 0, sinks: int = 16, recent: int = 128, warm_share: float = 0.7):
        """kv_indices of every request: fp16 / int4 / int2 (one tier), aged (sinks + recent fp16, then the newer
        ``warm_share`` of the middle INT4 and the oldest INT2: the layout aging produces), shuffled (random tier
        per token, 25% / 45% / 30%, in random order)."""
        import torch

        if scheme in self.slots:
            return self.slots[scheme]
        gen = torch.Generator().manual_seed(seed)
        tier = torch.empty(self.n, dtype=torch.long)
        for b, length in enumerate(self.lens):
            s = self.starts[b]
            if scheme == "aged":
                pos = torch.arange(length)
                n_mid = max(0, length - sinks - recent)
                t = torch.where(pos < length - recent - int(round(warm_share * n_mid)), 2, 1)
                tier[s:s + length] = torch.where((pos < sinks) | (pos >= length - recent), 0, t)
            elif scheme == "shuffled":
                tier[s:s + length] = torch.multinomial(torch.tensor([0.25, 0.45, 0.3]), length, True,
                                                       generator=gen) if length else tier[s:s]
            else:
                raise ValueError(scheme)
        tier = tier.to(self.device)
        idx = torch.where(tier == 0, self.slots["fp16"], torch.where(tier == 1, self.slots["int4"],
                                                                     self.slots["int2"]))
        if scheme == "shuffled":
            order = torch.cat([s + torch.randperm(length, generator=gen)
                               for s, length in zip(self.starts, self.lens)]).to(self.device)
            idx = idx[order]
        return idx

    def queries(self, group: int, dtype, seed: int = 0, per_request: int = 1):
        """Peaked queries aimed at a few keys of each request (random for an empty request): [B*per, Hq, D]."""
        import torch

        from fade_sglang.eval.synthetic import correlated_queries

        hkv, d = self.k.shape[1], self.k.shape[2]
        qs = []
        for b, length in enumerate(self.lens):
            s = self.starts[b]
            if length:
                qs.append(correlated_queries(self.k[s:s + length].cpu(), group, per_request, seed=seed + b))
            else:
                qs.append(torch.randn(per_request, hkv * group, d, generator=torch.Generator().manual_seed(seed + b)))
        return torch.cat(qs).to(device=self.device, dtype=dtype)


# ---------------------------------------------------------------------------- correctness


def correctness(dname: str, cfg: argparse.Namespace, report: Report, budget: Budget, bench: types.ModuleType) -> None:
    import torch

    from fade_sglang import kernels as K
    from fade_sglang.attention import decode_attention_ref, extend_attention_ref
    from fade_sglang.eval.synthetic import correlated_queries, synthetic_kv
    from fade_sglang.pool.view import PackedPart
    from fade_sglang.quant import QuantFormat, dequantize, quantize, unpack_codes

    dtype, device, tol = _dtype(dname), cfg.device, ATTN_TOL[dname]
    group, hkv, d = cfg.group, cfg.kv_heads, cfg.head_dim
    scale = d ** -0.5
    est = cfg.case_est_s
    state: dict[str, Any] = {}

    def case(kind: str, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        full = f"{kind}/{name}"
        if not budget.allows(est):
            report.data["skipped"].append({"section": "correctness", "dtype": dname, "case": full,
                                           "reason": f"time budget ({budget.seconds:.0f} s)"})
            report.log(budget, f"correctness {dname:4} {full:34} SKIP (time budget)")
            report.write()
            return
        t0 = time.monotonic()
        try:
            res = fn()
            passed = bool(res.pop("passed"))
            row = {"dtype": dname, "kind": kind, "case": name, "passed": passed, **res}
        except Exception as e:  # noqa: BLE001 - recorded as a failed case, the run goes on
            row = {"dtype": dname, "kind": kind, "case": name, "passed": False,
                   "error": f"{type(e).__name__}: {e}"[:600], "traceback": _tb()}
            report.data["errors"].append({"section": "correctness", "dtype": dname, "case": full,
                                          "error": row["error"]})
        if device == "cuda":
            torch.cuda.synchronize()
        row["seconds"] = round(time.monotonic() - t0, 2)
        report.data["correctness"].append(row)
        detail = row.get("error") or " ".join(f"{k}={_fmt(v)}" for k, v in row.items()
                                              if k in ("max_rel", "tol", "rel_l2", "code_diff_frac", "max_code_diff",
                                                       "param_rel", "same_params", "err_ratio"))
        report.log(budget, f"correctness {dname:4} {full:34} {'PASS' if row['passed'] else 'FAIL'}  {detail}")
        report.write()

    def setup() -> dict[str, Any]:
        sc = StoreCase(cfg.lens, hkv, d, dtype, device, seed=1)
        state["sc"] = sc
        return {"passed": True, "tokens": sc.n, "lens": cfg.lens, "kv_heads": hkv, "q_heads": hkv * group,
                "head_dim": d, "note": "TieredKVStore: synthetic K with outlier channels, 3 copies per token "
                                      "(fp16 / INT4 g64 / INT2 g32, a third via INT4), default clip search"}

    case("setup", "tiered-store", setup)
    sc: StoreCase | None = state.get("sc")
    if sc is None:
        return
    q = sc.queries(group, dtype, seed=3)

    def attn_result(out, ref) -> dict[str, Any]:
        err = _rel(out, ref)
        empty_ok = all(bool((out[b] == 0).all()) for b, n in enumerate(sc.lens) if n == 0)
        return {"passed": err < tol and empty_ok and bool(torch.isfinite(out).all()), "max_rel": err, "tol": tol,
                "rel_l2": _rel_l2(out, ref), "empty_requests_zero": empty_ok}

    decode_cases = [(s, None) for s in ("fp16", "int4", "int2", "aged", "shuffled")]
    decode_cases += [("shuffled", 1), ("shuffled", 3 if cfg.smoke else 13)]
    for scheme, splits in decode_cases:
        def run_decode(scheme=scheme, splits=splits) -> dict[str, Any]:
            idx = sc.indices(scheme, seed=5)
            out = K.decode_attention(q, sc.view, sc.indptr, idx, scale, num_kv_splits=splits)
            ref = decode_attention_ref(q.float(), sc.view, sc.indptr, idx, scale)
            return attn_result(out, ref)

        case("decode", f"{scheme}" + (f"-splits{splits}" if splits else ""), run_decode)

    # Extend: new tokens (a chunk of 40 and one of 130 span several query blocks) over a mixed-tier prefix.
    new = [cfg.new_lens[i % len(cfg.new_lens)] for i in range(len(sc.lens))]
    kn, vn = synthetic_kv(sum(new), hkv, d, seed=11)
    chunk_starts = [sum(new[:i]) for i in range(len(new))]
    qe = torch.cat([correlated_queries(kn[s:s + m], group, m, seed=13 + i) if m else torch.zeros(0, hkv * group, d)
                    for i, (s, m) in enumerate(zip(chunk_starts, new))])
    qe, kn, vn = qe.to(device, dtype), kn.to(device, dtype), vn.to(device, dtype)
    qo = torch.tensor([0] + new, device=device).cumsum(0)
    for scheme in ("aged", "shuffled", "fp16"):
        def run_extend(scheme=scheme) -> dict[str, Any]:
            idx = sc.indices(scheme, seed=7)
            out = K.extend_attention(qe, kn, vn, sc.view, qo, sc.indptr, idx, scale)
            ref = extend_attention_ref(qe.float(), kn, vn, sc.view, qo, sc.indptr, idx, scale)
            err = _rel(out, ref)
            return {"passed": err < tol and bool(torch.isfinite(out).all()), "max_rel": err, "tol": tol,
                    "rel_l2": _rel_l2(out, ref), "new_tokens": new}

        case("extend", f"{scheme}-prefix", run_extend)

    # Keys at more bits than values (the presets' k8v4 warm / k4v2 cold tiers: key codes in two pieces), and a
    # protected layer (padded fp16 rows, records grown to 8-bit keys).
    def run_store_variant(knobs: dict[str, Any]) -> dict[str, Any]:
        sk = StoreCase(cfg.lens, hkv, d, dtype, device, seed=1, knobs=knobs)
        idx = sk.indices("shuffled", seed=5)
        out = K.decode_attention(q, sk.view, sk.indptr, idx, scale)
        res = attn_result(out, decode_attention_ref(q.float(), sk.view, sk.indptr, idx, scale))
        ext = K.extend_attention(qe, kn, vn, sk.view, qo, sk.indptr, idx, scale)
        err = _rel(ext, extend_attention_ref(qe.float(), kn, vn, sk.view, qo, sk.indptr, idx, scale))
        res.update(passed=res["passed"] and err < tol and bool(torch.isfinite(ext).all()), extend_max_rel=err)
        return res

    case("decode+extend", "k8v4-k4v2-shuffled", lambda: run_store_variant({"warm_key_bits": 8, "cold_key_bits": 4}))
    case("decode+extend", "protected-layer-shuffled", lambda: run_store_variant({"protected_layers": (0,)}))
    case("decode+extend", "k4v3-g64-shuffled",  # 3-bit values (two code planes), aggressive's cold tier
         lambda: run_store_variant({"cold_bits": 3, "cold_key_bits": 4, "cold_group_size": 64}))

    # Quantize: the kernel twin of fade_sglang.quant.quantize on synthetic K (outliers) and V in this dtype.
    xk, xv = synthetic_kv(cfg.quant_tokens, hkv, d, seed=17)
    xq = torch.stack((xk, xv)).to(device, dtype)

    def code_cmp(got, want, fmt) -> dict[str, Any]:
        cg, cw = unpack_codes(got.data, fmt.bits).int(), unpack_codes(want.data, fmt.bits).int()
        diff = (cg - cw).abs()
        prel = max(float(((got.scale.float() - want.scale.float()).abs()
                          / want.scale.float().abs().clamp_min(1e-4)).max()),
                   float(((got.zero.float() - want.zero.float()).abs()
                          / want.zero.float().abs().clamp_min(1e-4)).max()))
        return {"max_code_diff": int(diff.max()), "code_diff_frac": float((diff > 0).float().mean()),
                "param_rel": prel}

    for bits, gsz in ((4, 64), (2, 32), (8, 64), (3, 64)):
        def run_quant(bits=bits, gsz=gsz) -> dict[str, Any]:
            fmt = QuantFormat(bits, gsz)
            r = code_cmp(K.quantize(xq, fmt), quantize(xq, fmt), fmt)
            # Same float32 math; compiled FMAs may move a value sitting on a rounding boundary by one code.
            r["passed"] = r["max_code_diff"] <= 1 and r["code_diff_frac"] < 1e-3 and r["param_rel"] < 2e-3
            r["tol"] = "codes: |diff| <= 1 on < 0.1%; scale / zero within 2e-3 relative (1 fp16 ulp)"
            return r

        case("quantize", f"int{bits}-g{gsz}", run_quant)
    for bits, gsz in ((4, 64), (2, 32)):
        def run_clip(bits=bits, gsz=gsz) -> dict[str, Any]:
            fmt = QuantFormat(bits, gsz, clip_search=True)
            got, want = K.quantize(xq, fmt), quantize(xq, fmt)
            same = float(((got.scale == want.scale) & (got.zero == want.zero)).float().mean())
            e_k = float((dequantize(got, fmt) - xq.float()).square().sum())
            e_t = float((dequantize(want, fmt) - xq.float()).square().sum())
            return {"passed": same > 0.98 and e_k <= e_t * 1.001, "same_params": same, "err_ratio": e_k / e_t,
                    "tol": "same (scale, zero) on > 98% of groups (ties may differ); squared error <= 1.001x torch's"}

        case("quantize", f"int{bits}-g{gsz}-clip", run_clip)

    def run_fused() -> dict[str, Any]:
        """quantize_rows as the pool calls it on CUDA: gather fp16 slots, rotate, center K, pack; all in one launch."""
        st = sc.store
        fmt = QuantFormat(4, 64)
        src_rows = sc.slots["fp16"]
        x = st.kv_fp16[:, :, src_rows].float()
        if st.rotation is not None:
            x = x @ st.rotation
        x[:, 0] -= st.k_center[:, None]
        want = quantize(x, fmt)
        n = src_rows.numel()
        got = [PackedPart.zeros(fmt, 1, n, hkv, d, device) for _ in range(2)]
        for kv, part in enumerate(got):
            K.quantize_rows(st.kv_fp16[:, kv], part, torch.arange(n, device=device), src_rows=src_rows,
                            rotation=st.rotation, k_center=st.k_center if kv == 0 else None)
        data = torch.stack([p.data for p in got], 1)  # [1, 2, n, H, X] like the reference
        sc_, zr = torch.stack([p.scale for p in got], 1), torch.stack([p.zero for p in got], 1)
        cg, cw = unpack_codes(data, 4).int(), unpack_codes(want.data, 4).int()
        diff = (cg - cw).abs()
        close = all(torch.allclose(a.float(), b.float(), rtol=2e-3, atol=1e-4) for a, b in ((sc_, want.scale),
                                                                                             (zr, want.zero)))
        frac = float((diff > 0).float().mean())
        return {"passed": int(diff.max()) <= 1 and frac < 0.01 and close, "max_code_diff": int(diff.max()),
                "code_diff_frac": frac, "params_close": close,
                "tol": "codes |diff| <= 1 on < 1% (fused rotation sums in another order); scale / zero allclose "
                       "rtol 2e-3 atol 1e-4"}

    case("quantize", "rows-fused-rotate-center", run_fused)

    def run_query_aware() -> dict[str, Any]:
        """Query-aware key rounding as the pool runs it on CUDA (torch feedback rounding on the device, from the
        factor of queries it saw): the logit error under held-out queries, against nearest rounding and CPU."""
        from fade_sglang.quant import rounding_factor

        fmt = QuantFormat(4, 64)
        keys = xq[0].float()
        keys = keys - keys.mean(0)  # the pool's centered space
        seen, held = (correlated_queries(keys.cpu(), 1, 2048, seed=s).double() for s in (1, 2))
        factor = rounding_factor(torch.einsum("nhd,nhe->hde", seen, seen) / seen.shape[0])

        def logit_err(q: Any) -> float:
            e = (dequantize(q, fmt) - keys).double().cpu()
            return float(torch.einsum("nhd,mhd->nmh", e, held).square().mean())

        nearest, dev = quantize(keys, fmt), quantize(keys, fmt, factor.to(device))
        cpu = quantize(keys.cpu(), fmt, factor)
        r_dev, r_cpu = logit_err(dev) / logit_err(nearest), logit_err(cpu) / logit_err(nearest)
        same = float((unpack_codes(dev.data, 4).cpu() == unpack_codes(cpu.data, 4)).float().mean())
        return {"passed": r_dev < 1.0 and abs(r_dev - r_cpu) < 0.05 * r_cpu, "logit_err_vs_nearest": r_dev,
                "cpu_logit_err_vs_nearest": r_cpu, "codes_same_as_cpu": same,
                "tol": "held-out logit error below nearest rounding's, within 5% of the CPU result (error feedback "
                       "carries float differences, so codes may differ where the CPU's do not)"}

    case("quantize", "query-aware-keys", run_query_aware)

    # The timing baselines compute the same attention: SGLang's kernel (pool + indices) and SDPA (dense KV).
    def run_baselines() -> dict[str, Any]:
        b, ctx = cfg.agree_shape
        sub = StoreCase([ctx] * b, hkv, d, dtype, device, seed=21)
        qb = sub.queries(group, dtype, seed=23)
        idx = sub.slots["fp16"]
        ref = decode_attention_ref(qb.float(), sub.view, sub.indptr, idx, scale)
        outs: dict[str, Any] = {"fade-fp16": K.decode_attention(qb, sub.view, sub.indptr, idx, scale)}
        fn, why = bench.sglang_runner(qb, sub.view, sub.indptr, idx, scale, cfg.sglang_splits)
        notes = {}
        if fn is not None:
            outs["sglang-fp16"] = fn().clone()
        else:
            notes["sglang-fp16"] = report.data["meta"].get("sglang", {}).get("error") or why
        kd = sub.view.k_fp16[idx].reshape(b, ctx, hkv, d)
        vd = sub.view.v_fp16[idx].reshape(b, ctx, hkv, d)
        for name, (run, why) in sdpa_runners(qb, kd, vd, scale, cfg.smoke).items():
            if run is None:
                notes[name] = why
            else:
                with sdpa_context(cfg.smoke):
                    outs[name] = run().clone()
        errs = {k: _rel(o, ref) for k, o in outs.items()}
        return {"passed": all(e < tol for e in errs.values()), "max_rel": max(errs.values()), "tol": tol,
                "per_impl": errs, "not_run": notes, "shape": {"batch": b, "context": ctx}}

    case("baselines", "agree-with-reference", run_baselines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1e}"
    return str(v)


# ---------------------------------------------------------------------------- SDPA baseline


def sdpa_context(smoke: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH if smoke else SDPBackend.FLASH_ATTENTION)


def sdpa_runners(q, k_dense, v_dense, scale: float, smoke: bool) -> dict[str, tuple[Callable | None, str]]:
    """torch SDPA decode over dense KV ``[B, ctx, Hkv, D]`` (viewed as [B, Hkv, ctx, D], no copy).

    ``-gqa``: ``enable_gqa=True``; ``-fold``: the ``group`` query heads of a KV head as ``group`` query rows
    of one head (same math, no KV expansion). Each is tried once under the backend; a failure is the reason.
    """
    import torch.nn.functional as F

    b, hq, d = q.shape
    hkv = k_dense.shape[2]
    g = hq // hkv
    k4, v4 = k_dense.transpose(1, 2), v_dense.transpose(1, 2)
    backend = "math" if smoke else "flash"

    def gqa():
        o = F.scaled_dot_product_attention(q.view(b, hq, 1, d), k4, v4, scale=scale, enable_gqa=True)
        return o.reshape(b, hq, d)

    def fold():
        return F.scaled_dot_product_attention(q.view(b, hkv, g, d), k4, v4, scale=scale).reshape(b, hq, d)

    out: dict[str, tuple[Callable | None, str]] = {}
    for name, fn in ((f"sdpa-{backend}-gqa", gqa), (f"sdpa-{backend}-fold", fold)):
        try:
            with sdpa_context(smoke):
                fn()
            out[name] = (fn, "")
        except Exception as e:  # noqa: BLE001
            out[name] = (None, f"{type(e).__name__}: {e}"[:200].replace("\n", " "))
    return out


# ---------------------------------------------------------------------------- timing


def timing(cfg: argparse.Namespace, report: Report, budget: Budget, bench: types.ModuleType) -> None:
    import torch

    dtype, device = _dtype(cfg.bench_dtype), cfg.device
    st = bench.Setup(device, dtype, cfg.kv_heads, cfg.group, cfg.head_dim, cfg.sglang_splits, cfg.smoke, None)
    if budget.allows(cfg.case_est_s):
        try:  # the %copy column's denominator (1 GiB device-to-device copy)
            st.copy_bw = bench.copy_bandwidth_gbps(device, cfg.smoke)
        except Exception as e:  # noqa: BLE001
            report.data["errors"].append({"section": "timing", "case": "copy bandwidth",
                                          "error": f"{type(e).__name__}: {e}"[:600]})
        report.data["meta"]["copy_bw_gbps"] = st.copy_bw
    timer = bench._timer(cfg.smoke)
    hq, hkv, d = cfg.kv_heads * cfg.group, cfg.kv_heads, cfg.head_dim
    scale = 1.0 / math.sqrt(d)
    per_tok_all = hkv * (2 * d * st.elem + 2 * bench.WARM_FMT.bytes_per_token_head(d)
                         + 2 * bench.COLD_FMT.bytes_per_token_head(d))
    for ctx in cfg.contexts:
        for batch in cfg.batches:
            shape = f"batch={batch} ctx={ctx}"
            est = cfg.case_est_s * (1 + batch * ctx / 2**21)  # bigger shapes: more data, longer kernels
            if not budget.allows(est):
                report.data["skipped"].append({"section": "timing", "case": shape,
                                               "reason": f"time budget ({budget.seconds:.0f} s; needs ~{est:.0f} s)"})
                report.log(budget, f"timing {shape:24} SKIP (time budget)")
                report.write()
                continue
            # bench_shape holds every tier of every token at once; SDPA's dense K and V come after it is freed
            need = 1.1 * batch * ctx * max(per_tok_all, 2 * hkv * d * st.elem)
            if device == "cuda":
                free = torch.cuda.mem_get_info()[0]
                if need > 0.85 * free:
                    report.data["skipped"].append({"section": "timing", "case": shape,
                                                   "reason": f"memory: needs {need / 2**30:.1f} GiB, "
                                                             f"{free / 2**30:.1f} GiB free"})
                    report.log(budget, f"timing {shape:24} SKIP (memory)")
                    report.write()
                    continue
            t0 = time.monotonic()
            report.log(budget, f"timing {shape:24} ...")
            rows: list[dict[str, Any]] = []

            def fade_and_sglang(b=batch, c=ctx) -> list[dict[str, Any]]:
                return [_asdict(r) for r in bench.bench_shape(st, b, c)]

            def sdpa(b=batch, c=ctx) -> list[dict[str, Any]]:
                return sdpa_rows(st, b, c, hq, hkv, d, scale, timer, cfg.smoke)

            for what, make in (("bench_shape", fade_and_sglang), ("sdpa", sdpa)):
                try:
                    rows += make()
                except Exception as e:  # noqa: BLE001 - recorded; the other half of the shape still runs
                    err = f"{type(e).__name__}: {e}"[:600]
                    report.data["errors"].append({"section": "timing", "case": f"{shape} {what}", "error": err,
                                                  "traceback": _tb()})
                    report.log(budget, f"timing {shape:24} {what} ERROR {err}")
                finally:
                    if device == "cuda":
                        torch.cuda.empty_cache()
            for r in rows:
                if r["note"].startswith("failed:"):  # bench_shape's add() keeps the other rows of the shape
                    report.data["errors"].append({"section": "timing", "case": f"{shape} {r['impl']}",
                                                  "error": r["note"]})
            if rows and report.data["meta"].get("sglang", {}).get("error"):
                for r in rows:
                    if r["impl"] == "sglang-fp16":
                        r["note"] = f"SGLang kernel not loaded: {report.data['meta']['sglang']['error']}"
            sdpa_times = [r["time_ms"] for r in rows if r["impl"].startswith("sdpa-") and r["time_ms"]]
            best_sdpa = min(sdpa_times) if sdpa_times else None
            sgl = next((r["time_ms"] for r in rows if r["impl"] == "sglang-fp16"), None)
            for r in rows:
                attn = r["time_ms"] and "partition" not in r["impl"]  # the partition row is not an attention
                r["speedup_vs_sdpa"] = best_sdpa / r["time_ms"] if best_sdpa and attn else None
                if r["impl"].startswith("sdpa-"):
                    r["speedup_vs_sglang"] = sgl / r["time_ms"] if sgl and attn else None
                r["shape_seconds"] = round(time.monotonic() - t0, 2)
            report.data["timing"] += rows
            for r in rows:
                report.log(budget, f"  {r['impl']:26} {_ms(r['time_ms'])} ms  {r['bytes_read'] / 1e6:9.1f} MB  "
                                   f"xSGL {_x(r['speedup_vs_sglang'])}  xSDPA {_x(r['speedup_vs_sdpa'])}  {r['note']}")
            report.write()


def _asdict(row) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(row)


def _ms(x: float | None) -> str:
    return f"{x:9.4f}" if x is not None else f"{'-':>9}"


def _x(x: float | None) -> str:
    return f"{x:6.2f}" if x is not None else f"{'-':>6}"


def sdpa_rows(st, batch: int, ctx: int, hq: int, hkv: int, d: int, scale: float, timer, smoke: bool) -> list[dict]:
    """torch SDPA over dense contiguous fp16 KV of the same shape (its own buffers, after bench_shape's are freed)."""
    import torch

    kd = torch.randn(batch, ctx, hkv, d, dtype=st.dtype, device=st.device)
    vd = torch.randn_like(kd)
    q = torch.randn(batch, hq, d, dtype=st.dtype, device=st.device)
    nbytes = batch * (2 * ctx * hkv * d * st.elem + 2 * hq * d * st.elem)
    rows = []
    for name, (fn, why) in sdpa_runners(q, kd, vd, scale, smoke).items():
        t = None
        if fn is not None:
            try:
                with sdpa_context(smoke):
                    t = timer(fn)
            except Exception as e:  # noqa: BLE001
                why = f"failed: {type(e).__name__}: {e}"[:300]
        gbps = nbytes / (t * 1e-3) / 1e9 if t else None
        rows.append({"batch": batch, "context": ctx, "impl": name, "time_ms": t, "bytes_read": nbytes, "gbps": gbps,
                     "pct_of_copy_bw": 100 * gbps / st.copy_bw if gbps and st.copy_bw else None,
                     "speedup_vs_sglang": None, "note": why or "dense KV, no indices"})
    del kd, vd
    return rows


def targets(report: Report) -> None:
    """The issue's kernel targets, read off the timing rows (informational; not part of the exit status)."""
    rows = report.data["timing"]
    by = {(r["batch"], r["context"], r["impl"]): r for r in rows}
    out = []
    for (b, ctx, impl), r in sorted(by.items()):
        if not impl.startswith("fade-") or impl == "fade-partition (per step)" or ctx < 4096:
            continue
        x = r.get("speedup_vs_sglang")
        if x is None:
            continue
        out.append({"batch": b, "context": ctx, "impl": impl, "speedup_vs_sglang": x,
                    "target": ">= 1 (never slower than fp16 at >= 4K)", "met": x >= 1.0})
        if ctx == 32768 and impl in ("fade-int4", "fade-int2"):
            want = 2.5 if impl == "fade-int4" else 4.0
            out.append({"batch": b, "context": ctx, "impl": impl, "speedup_vs_sglang": x,
                        "target": f">= {want} at 32K", "met": x >= want})
    report.data["targets"] = out


# ---------------------------------------------------------------------------- tables


def print_tables(report: Report) -> None:
    c = report.data["correctness"]
    if c:
        print("\n# correctness vs the float32 torch reference")
        head = f"{'dtype':5} {'case':36} {'result':6}  detail"
        print(head + "\n" + "-" * 100)
        for r in c:
            detail = r.get("error") or ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in (
                "dtype", "kind", "case", "passed", "traceback", "note", "lens", "per_impl", "not_run", "new_tokens"))
            if "per_impl" in r:
                detail += "  " + " ".join(f"{k}={v:.1e}" for k, v in r["per_impl"].items())
            print(f"{r['dtype']:5} {r['kind'] + '/' + r['case']:36} {'PASS' if r['passed'] else 'FAIL':6}  {detail}")
    t = report.data["timing"]
    if t:
        print("\n# decode timing (one layer; xSGL / xSDPA: speedup over SGLang's Triton fp16 kernel / best torch SDPA)")
        head = (f"{'batch':>5} {'ctx':>7} {'impl':<26} {'ms':>9} {'MB read':>9} {'GB/s':>7} {'%copy':>6} "
                f"{'xSGL':>6} {'xSDPA':>6}  note")
        print(head + "\n" + "-" * len(head))
        for r in t:
            gb = f"{r['gbps']:7.0f}" if r.get("gbps") else f"{'-':>7}"
            pc = f"{r['pct_of_copy_bw']:6.1f}" if r.get("pct_of_copy_bw") else f"{'-':>6}"
            print(f"{r['batch']:>5} {r['context']:>7} {r['impl']:<26} {_ms(r['time_ms'])} "
                  f"{r['bytes_read'] / 1e6:>9.1f} {gb} {pc} {_x(r['speedup_vs_sglang'])} {_x(r['speedup_vs_sdpa'])}  "
                  f"{r['note']}")
    if report.data["targets"]:
        print("\n# kernel targets (speedup over SGLang's fp16 kernel)")
        for r in report.data["targets"]:
            print(f"  batch={r['batch']:<3} ctx={r['context']:<7} {r['impl']:10} {r['speedup_vs_sglang']:6.2f}x  "
                  f"target {r['target']:40} {'met' if r['met'] else 'NOT met'}")
    for s in report.data["skipped"]:
        print(f"skipped: {s}")
    for e in report.data["errors"]:
        print(f"error: {e['section']} {e.get('dtype', '')} {e['case']}: {e['error']}")


# ---------------------------------------------------------------------------- main


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU run under TRITON_INTERPRET=1 (tiny shapes, fp16/fp32)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "out" / "gpu_check"),
                   help="output folder (default $OUT, else out/gpu_check)")
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="no case starts unless its estimate ends within this many seconds of the start")
    p.add_argument("--sections", default="correctness,timing")
    p.add_argument("--dtypes", help="correctness dtypes (default bf16,fp16; smoke: fp16,fp32)")
    p.add_argument("--bench-dtype", default="fp16", choices=DTYPE_NAMES, help="timing dtype (all implementations)")
    p.add_argument("--batches", help="default 1,32 (smoke: 2)")
    p.add_argument("--contexts", help="default 4096,32768,131072 (smoke: 48)")
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--group", type=int, help="query heads per KV head (default 4: 32 q / 8 kv heads)")
    p.add_argument("--head-dim", type=int)
    p.add_argument("--sglang-splits", type=int, default=8, help="SGLang's triton_attention_num_kv_splits")
    p.add_argument("--sglang", choices=("auto", "wheel", "installed", "none"), default="auto",
                   help="where SGLang's decode kernel comes from (auto: the wheel in --wheel-dir, else installed)")
    p.add_argument("--wheel-dir", default=str(ROOT / ".whl"))
    p.add_argument("--verify-wheels", metavar="DIR", help="check the prepared wheel folder and exit (no torch)")
    a = p.parse_args(argv)
    smoke = a.smoke
    a.device = "cpu" if smoke else "cuda"
    a.sections = [s for s in a.sections.split(",") if s]
    a.dtypes = (a.dtypes or ("fp16,fp32" if smoke else "bf16,fp16")).split(",")
    for dn in a.dtypes:
        if dn not in DTYPE_NAMES:
            p.error(f"unknown dtype {dn!r} (choose from {DTYPE_NAMES})")
    a.batches = _ints(a.batches or ("2" if smoke else "1,32"))
    a.contexts = _ints(a.contexts or ("48" if smoke else "4096,32768,131072"))
    a.kv_heads = a.kv_heads or (1 if smoke else 8)
    a.group = a.group or 4
    a.head_dim = a.head_dim or (32 if smoke else 128)
    # correctness shapes: ragged lengths with an empty request; extend chunks spanning several query blocks
    a.lens = [1, 9, 0, 21] if smoke else [1, 37, 0, 300, 1024, 2053]
    a.new_lens = [2, 5, 1, 3] if smoke else [5, 40, 1, 130, 64, 3]
    a.quant_tokens = 8 if smoke else 512
    a.agree_shape = (2, 16) if smoke else (4, 1024)
    a.case_est_s = 0.0 if smoke else 10.0
    return a


def meta_info(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import triton

    m: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "smoke (CPU, TRITON_INTERPRET=1: times are meaningless)" if args.smoke else "gpu",
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "host": platform.node(),
        "config": {k: getattr(args, k) for k in ("budget_s", "sections", "dtypes", "bench_dtype", "batches", "contexts",
                                                 "kv_heads", "group", "head_dim", "sglang_splits", "lens", "new_lens",
                                                 "quant_tokens", "agree_shape")},
        "tolerances": {"attention max|err|/max|ref|": ATTN_TOL},
    }
    if torch.cuda.is_available() and not args.smoke:
        p = torch.cuda.get_device_properties(0)
        m.update(device=torch.cuda.get_device_name(0), capability=f"sm_{p.major}{p.minor}",
                 multiprocessors=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    else:
        m["device"] = "cpu"
    return m


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    if args.verify_wheels:
        return verify_wheels(Path(args.verify_wheels))
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_check: ERROR: --smoke runs on CPU and needs TRITON_INTERPRET=1 set before Python starts",
              file=sys.stderr)
        return 2
    if not args.smoke and os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_check: ERROR: TRITON_INTERPRET=1 is set: unset it for the GPU run (or pass --smoke)",
              file=sys.stderr)
        return 2
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as e:
        print(f"gpu_check: ERROR: {sys.executable} cannot import torch / triton: {e}", file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: ERROR: torch sees no CUDA device (run with --smoke and TRITON_INTERPRET=1 on CPU)",
              file=sys.stderr)
        return 2
    budget = Budget(args.budget_s, start)
    out_dir = Path(args.out)
    report = Report(out_dir / "gpu_check.json", meta_info(args))
    report.log(budget, f"gpu_check: {report.data['meta']['device']} torch {torch.__version__} "
                       f"triton {report.data['meta']['triton']} -> {report.path}")
    report.write()

    def on_term(signum, frame):  # the outer timeout: leave a JSON that says so
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    rc = 0
    try:
        try:
            import_fade()
            bench = load_bench()
        except Exception as e:  # noqa: BLE001
            report.data["errors"].append({"section": "setup", "case": "import fade_sglang.kernels",
                                          "error": f"{type(e).__name__}: {e}"[:600],
                                          "traceback": _tb()})
            report.log(budget, f"ERROR importing fade_sglang.kernels: {type(e).__name__}: {e}")
            report.write()
            return 2
        report.data["meta"]["sglang"] = load_sglang_decode(args.sglang, Path(args.wheel_dir))
        sg = report.data["meta"]["sglang"]
        report.log(budget, "SGLang decode kernel: " + (f"NOT loaded ({sg['error']})" if "error" in sg
                                                       else f"{sg['source']} {sg.get('wheel') or sg.get('path', '')}"))
        report.write()
        if "correctness" in args.sections:
            for dn in args.dtypes:
                correctness(dn, args, report, budget, bench)
        if "timing" in args.sections:
            timing(args, report, budget, bench)
            targets(report)
    except KeyboardInterrupt as e:
        report.data["summary"]["aborted"] = f"interrupted ({e}) after {budget.elapsed():.0f} s"
        report.log(budget, f"ABORTED: {report.data['summary']['aborted']}")
        rc = 1
    c = report.data["correctness"]
    failed = [f"{r['dtype']} {r['kind']}/{r['case']}" for r in c if not r["passed"]]
    report.data["summary"].update(
        complete="aborted" not in report.data["summary"], elapsed_s=round(budget.elapsed(), 1),
        correctness_passed=sum(r["passed"] for r in c), correctness_failed=failed,
        timing_rows=len(report.data["timing"]), skipped=len(report.data["skipped"]), errors=len(report.data["errors"]))
    report.write()
    print_tables(report)
    s = report.data["summary"]
    print(f"\n# summary: {s['correctness_passed']} correctness cases passed, {len(failed)} failed, "
          f"{s['timing_rows']} timing rows, {s['skipped']} skipped, {s['errors']} errors, {s['elapsed_s']} s "
          f"-> {report.path}")
    if failed or report.data["errors"]:
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
