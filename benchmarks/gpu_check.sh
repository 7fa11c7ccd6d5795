#!/usr/bin/env bash
# GPU check of fade's Triton kernels (issue 14 item 7): bf16 / fp16 correctness of decode / extend / quantize
# against the torch reference, and decode timing at 4K / 32K / 128K context (batch 1 and 32, 32 q / 8 kv heads,
# head_dim 128) against SGLang's Triton fp16 decode kernel and torch flash SDPA. See benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh --prepare   CPU side, once, needs PyPI: downloads SGLang's wheel (no deps)
#                                            into .whl/ (git-ignored; ~37 MiB, checked against the 64 MiB limit)
#   bash benchmarks/gpu_check.sh [ARGS]      on the GPU machine, from the repo root, with .whl carried along:
#                                            no network, no install; ARGS go to gpu_check.py (e.g. --sections timing)
#   bash benchmarks/gpu_check.sh --smoke     CPU smoke run under TRITON_INTERPRET=1 (tests/test_gpu_check.py)
#
# Outputs (all under $OUT, default ./out/gpu_check): gpu_check.json (rewritten after every case), gpu_check.log,
# nvidia-smi.txt. The Python side stops starting cases after GPU_CHECK_BUDGET_S (default 400 s); the whole run
# is killed at GPU_CHECK_TIMEOUT_S (default 450 s), so it ends within 8 minutes. Exit status: 0 all passed,
# 1 a correctness failure / case error / timeout, 2 a setup error.
# Environment: OUT, PYTHON (default: python3 on the GPU machine, .venv/bin/python here when present),
# FADE_WHL_DIR (default ./.whl), GPU_CHECK_BUDGET_S, GPU_CHECK_TIMEOUT_S.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SGLANG_VERSION=0.5.23
WHL_DIR="${FADE_WHL_DIR:-$ROOT/.whl}"

die() {
    echo "gpu_check: ERROR: $*" >&2
    exit 2
}

pick_python() {  # $1: prefer the repo's venv (CPU side) or the machine's python3 (GPU side)
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
    elif [[ "$1" == venv && -x "$ROOT/.venv/bin/python" ]]; then
        echo "$ROOT/.venv/bin/python"
    elif command -v python3 >/dev/null 2>&1; then
        echo python3
    else
        die "no python3 on PATH (set PYTHON)"
    fi
}

prepare() {
    local py
    py="$(pick_python venv)"
    mkdir -p "$WHL_DIR"
    if compgen -G "$WHL_DIR/sglang-$SGLANG_VERSION-*.whl" >/dev/null; then
        echo "gpu_check: SGLang $SGLANG_VERSION wheel already in $WHL_DIR"
    else
        echo "gpu_check: downloading sglang==$SGLANG_VERSION (no deps) into $WHL_DIR"
        # The GPU image's python is 3.12; only the kernel's .py files are used, so any build of the wheel works.
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$WHL_DIR" "sglang==$SGLANG_VERSION" \
            || "$py" -m pip download -q --no-deps -d "$WHL_DIR" "sglang==$SGLANG_VERSION" \
            || die "pip download of sglang==$SGLANG_VERSION failed (no network / no package index?)"
    fi
    "$py" benchmarks/gpu_check.py --verify-wheels "$WHL_DIR" || die "the prepared wheel folder $WHL_DIR is not usable"
    if command -v git >/dev/null 2>&1 && git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        local tree
        tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -n1 | cut -f1)
        echo "gpu_check: the working tree that travels is $((tree / 1048576)) MiB + the wheels (64 MiB in all)"
    fi
    echo "gpu_check: ready. On the GPU machine: bash benchmarks/gpu_check.sh  (carry .whl)"
}

run_check() {  # $1: gpu | smoke; the rest go to gpu_check.py
    local mode="$1" py out rc budget limit
    shift
    out="${OUT:-$ROOT/out/gpu_check}"
    mkdir -p "$out" || die "cannot create the output folder $out"
    out="$(cd "$out" && pwd)"
    export PYTHONUNBUFFERED=1
    if [[ "$mode" == smoke ]]; then
        py="$(pick_python venv)"
        export TRITON_INTERPRET=1
        set -- --smoke "$@"
    else
        py="$(pick_python system)"
        unset TRITON_INTERPRET
        if command -v nvidia-smi >/dev/null 2>&1; then
            nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "gpu_check: nvidia-smi failed (see $out/nvidia-smi.txt)"
        else
            echo "gpu_check: no nvidia-smi on PATH" | tee "$out/nvidia-smi.txt"
        fi
        compgen -G "$WHL_DIR/sglang-$SGLANG_VERSION-*.whl" >/dev/null \
            || echo "gpu_check: WARNING: no sglang-$SGLANG_VERSION wheel in $WHL_DIR (run --prepare here and carry .whl):" \
                "the SGLang baseline rows will be skipped"
    fi
    command -v "$py" >/dev/null 2>&1 || die "no python at '$py' (set PYTHON)"
    budget="${GPU_CHECK_BUDGET_S:-400}"
    limit="${GPU_CHECK_TIMEOUT_S:-450}"
    local -a wrap=()
    if command -v timeout >/dev/null 2>&1; then
        wrap=(timeout --signal=TERM --kill-after=15 "$limit")
    else
        echo "gpu_check: WARNING: no 'timeout' command: relying on the Python time budget alone"
    fi
    echo "gpu_check: $mode run with $py, budget ${budget}s, hard limit ${limit}s, output in $out"
    set +e
    ${wrap[@]+"${wrap[@]}"} "$py" benchmarks/gpu_check.py --out "$out" --wheel-dir "$WHL_DIR" --budget-s "$budget" "$@" \
        2>&1 | tee "$out/gpu_check.log"
    rc=${PIPESTATUS[0]}
    set -e
    case "$rc" in
        0) echo "gpu_check: done, all passed: $out/gpu_check.json" ;;
        124 | 137) echo "gpu_check: ERROR: killed at the ${limit}s limit; partial results in $out/gpu_check.json"
                   rc=1 ;;
        1) echo "gpu_check: done with failures or errors: see $out/gpu_check.json" ;;
        *) echo "gpu_check: ERROR: gpu_check.py exited with $rc (see $out/gpu_check.log)" ;;
    esac
    return "$rc"
}

case "${1:-}" in
    --prepare)
        shift
        [[ $# -eq 0 ]] || die "--prepare takes no other arguments"
        prepare
        ;;
    --smoke)
        shift
        run_check smoke "$@"
        ;;
    -h | --help)
        sed -n '2,20p' "$0"
        ;;
    *)
        run_check gpu "$@"
        ;;
esac
