#!/usr/bin/env bash
# The one-shot GPU check: evidence from a rarely available GPU even when the run is cut short.
# Written for an H200 with torch 2.11, triton 3.6, nvcc 13, pytest, hypothesis, pytest-benchmark, no network.
#
#   bash benchmarks/gpu_check.sh                       # whole run within GPU_CHECK_BUDGET (default 480 s)
#   GPU_CHECK_BUDGET=900 bash benchmarks/gpu_check.sh  # more time: the optional sweeps run too
#   bash benchmarks/gpu_check.sh --dry-run             # plan and bookkeeping only, every GPU step skipped
#
# Phases, in order of value; each gets a time limit computed from what is left of the one budget
# (limit = left * share / shares of the phases still to come, so time a phase leaves unused flows on):
#   1 env      python, CUDA toolkit, GPU, versions: one line each
#   2 build    FOD_BUILD_CUDA=1 in-place build of the extensions (fails loudly without fod_kernels._C_cuda),
#              with ptxas -v: the spill count of every CUDA kernel lands in the log
#   3 smoke    one fused forward+backward per backend at a FOD shape against float64: one line per backend
#   4 tests    the GPU tests, one pytest run per file, never -x (a failure does not hide the rest)
#   5 bench    the operator benchmarks at FOD's shapes
#   6 sweep    optional, only with budget left: L up to 16384 and the full model, then the out-of-memory
#              boundary (the required phases are sized for 480 s; a larger budget's excess is kept for these)
#   7 report   benchmarks/report.py over the JSON written so far
# After every phase the log, the JSON results and the report are copied to $OUT (if set), so a run
# killed at its limit still returns what it measured. Results also land in benchmarks/results/gpu/.
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
BUDGET=${GPU_CHECK_BUDGET:-480}
RES="$ROOT/benchmarks/results/gpu"
mkdir -p "$RES"
LOG="$RES/gpu_check.log"
: >"$LOG"
T0=$(date +%s)
SUMMARY=()

say() { echo "$*" | tee -a "$LOG"; }
SIM=0  # dry run: seconds the skipped phases would have used (each its whole limit), so the plan shows
left() { echo $(( BUDGET - ($(date +%s) - T0) - SIM )); }

# --- what is here ---------------------------------------------------------------------------------
PY=${PYTHON:-$(command -v python3 || command -v python || true)}
if [ -z "$PY" ]; then say "=== no python3 or python on PATH; nothing can run"; exit 2; fi
# CUDA toolkit: $CUDA_HOME if it has nvcc, else /usr/local/cuda, else the toolkit of the nvcc on PATH.
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then :
elif [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
elif command -v nvcc >/dev/null 2>&1; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
else CUDA_HOME=""
fi
export CUDA_HOME PATH="${CUDA_HOME:+$CUDA_HOME/bin:}$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FOD_KERNELS_QUIET=1
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu} FOD_CUDA_ARCH=${FOD_CUDA_ARCH:-90} MAX_JOBS=${MAX_JOBS:-16}
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
NVCC=$([ -n "$CUDA_HOME" ] && "$CUDA_HOME/bin/nvcc" --version 2>/dev/null | grep -o 'release [0-9.]*' | head -n 1)
HAVE_GPU=0
[ -n "$GPU" ] && [ $DRY -eq 0 ] && HAVE_GPU=1
say "=== found: python $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1)); CUDA toolkit ${CUDA_HOME:-NONE}${NVCC:+ (nvcc $NVCC)}; GPU ${GPU:-NONE}; budget ${BUDGET}s$([ $DRY -eq 1 ] && echo '; DRY RUN')"

sync_out() {  # the log, every JSON result and the report, to $OUT
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    cp "$LOG" "$OUT"/ 2>/dev/null
    for f in "$RES"/*.json "$RES"/gpu_report.md "$RES"/gpu_report_*.png; do
        [ -f "$f" ] && cp "$f" "$OUT"/
    done
}

# Phase shares; a phase's limit is left * share / (sum of the shares of this and the later phases).
declare -A SHARE=([build]=30 [smoke]=10 [test_cuda]=14 [test_gpu_triton]=18 [test_triton]=8 [bench]=20 [report]=3)
ORDER=(build smoke test_cuda test_gpu_triton test_triton bench report)
MIN=30  # a phase with less than this is skipped
# The required phases are sized for 480 s; a larger budget keeps the excess for the optional phases.
OPT_RESERVE=$(( BUDGET > 480 ? BUDGET - 480 : 0 ))

limit_for() {
    local name=$1 rest=0 seen=0 n
    for n in "${ORDER[@]}"; do
        [ "$n" = "$name" ] && seen=1
        [ $seen -eq 1 ] && rest=$(( rest + SHARE[$n] ))
    done
    local avail=$(( $(left) - OPT_RESERVE ))
    echo $(( avail * SHARE[$name] / rest ))
}

# phase NAME LIMIT -- command...: runs the command under its limit (SIGINT first, so pytest still writes
# its JSON; SIGKILL 15 s later), records the verdict, copies everything to $OUT.
phase() {
    local name=$1 limit=$2
    shift 3
    if [ "$limit" -lt $MIN ]; then
        say "=== [$name] SKIPPED: ${limit}s of the ${BUDGET}s budget left for it"
        SUMMARY+=("$name: skipped (budget)")
        sync_out
        return 0
    fi
    if [ $HAVE_GPU -eq 0 ]; then  # the dry run assumes the phase takes its whole limit
        say "=== [$name] SKIPPED (no GPU$([ $DRY -eq 1 ] && echo ': dry run')), limit ${limit}s: $*"
        SUMMARY+=("$name: skipped (no GPU), limit ${limit}s")
        SIM=$(( SIM + limit ))
        sync_out
        return 1
    fi
    say "=== [$name] limit ${limit}s, $(date +%T): $*"
    local start rc took verdict=ok
    start=$(date +%s)
    timeout -s INT --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    if [ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT (rc $rc)"
    elif [ $rc -ne 0 ]; then verdict="FAILED (rc $rc)"; fi
    say "=== [$name] $verdict after ${took}s"
    SUMMARY+=("$name: $verdict, ${took}s")
    sync_out
    [ "$verdict" = ok ]
}

build() {
    FOD_BUILD_CUDA=1 FOD_PTXAS_VERBOSE=1 "$PY" setup.py build_ext --inplace || return 1
    "$PY" - <<'EOF' || return 1
import fod_kernels
from fod_kernels import _ext
mod, why = _ext.load("_C_cuda")
if mod is None:
    raise SystemExit(f"BUILD FAILED: the CUDA extension is not importable: {why}")
print("built:", mod.__file__)
for name, st in fod_kernels.available_backends().items():
    print(f"backend {name}: {'available' if st.available else 'UNAVAILABLE'} ({st.reason})")
EOF
    local spills
    spills=$(grep -c "bytes spill stores" "$LOG"); local bad
    bad=$(grep "bytes spill stores" "$LOG" | grep -vc " 0 bytes spill stores, 0 bytes spill loads")
    echo "ptxas: $spills kernel entries, $bad with spills"
}

smoke() {
    "$PY" - <<'EOF'
# One fused forward+backward per backend at FOD's first level (L = 32 x 32, D = 32, 8 heads, a batch-shared
# inter memory), float32 against the float64 reference: one line per backend.
import time, torch, fod_kernels as fk
torch.manual_seed(0)
B, H, rows, cols, D = 4, 8, 32, 32, 32
L = rows * cols
dev = "cuda"
def branch(bk):
    q, k, v = torch.randn(B, H, L, D), torch.randn(bk, H, L, D), torch.randn(bk, H, L, D)
    return q, k, v, 0.1 + 1.9 * torch.rand(B, H, L, 2)
args = [t.to(dev) for t in (*branch(B), *branch(1))]
def run(backend, dtype):
    leaves = [a.to(dtype).requires_grad_() for a in args]
    torch.cuda.synchronize(); t0 = time.perf_counter()
    oi, oe, si, se = fk.i2correlation(*leaves, (rows, cols), backend=backend)
    loss = (oi.double().square().sum() + oe.double().sum() + (si.kl_prior - si.kl_attn - 0.5 * si.entropy).double().mean()
            + (se.kl_attn - se.kl_prior + 0.5 * se.entropy).double().mean())
    grads = torch.autograd.grad(loss, leaves)
    torch.cuda.synchronize()
    vals = [oi, oe, si.kl_attn, si.entropy, se.kl_attn, se.entropy, *grads]
    return [v.detach().double() for v in vals], time.perf_counter() - t0
names = ["out_intra", "out_inter", "K_intra", "E_intra", "K_inter", "E_inter", "dq", "dk", "dv", "dsigma",
         "dq_ref", "dk_ref", "dv_ref", "dsigma_ref"]
ref, _ = run("reference", torch.float64)
bad = 0
for backend in ("cuda", "triton", "reference"):
    st = fk.available_backends()[backend]
    if not st.available:
        print(f"smoke {backend:9s} UNAVAILABLE: {st.reason}"); bad += 1; continue
    try:
        run(backend, torch.float32)  # compile / warm up
        got, dt = run(backend, torch.float32)
    except Exception as e:  # report and go on to the next backend
        print(f"smoke {backend:9s} ERROR {type(e).__name__}: {str(e).splitlines()[0][:300]}"); bad += 1; continue
    errs = {n: ((g - r).abs().max() / r.abs().max().clamp(min=1)).item() for n, g, r in zip(names, got, ref)}
    worst = max(errs, key=errs.get)
    ok = errs[worst] < 1e-3
    bad += not ok
    print(f"smoke {backend:9s} {'OK ' if ok else 'BAD'} float32 fwd+bwd {dt * 1e3:8.2f} ms, largest relative error "
          f"{errs[worst]:.2e} ({worst}), B={B} H={H} L={L} D={D}")
raise SystemExit(1 if bad else 0)
EOF
}

TESTS="-p no:cacheprovider -q -rfEs --durations=15"
BENCH="-m pytest benchmarks/ -p no:cacheprovider --benchmark-only --fod-device cuda -q"

# --- the phases ------------------------------------------------------------------------------------
say "=== [env] $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1) | $("$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1) | $(nvidia-smi -L 2>/dev/null | head -n 1 || true)"
export -f build smoke say
export PY LOG
BUILT=0
phase build "$(limit_for build)" -- bash -c build && BUILT=1
if [ $BUILT -eq 0 ] && [ $HAVE_GPU -eq 1 ]; then  # loud, and the rest still runs
    say "=== BUILD FAILED: the cuda backend cannot be tested; the triton tests and benchmarks still run"
fi
phase smoke "$(limit_for smoke)" -- bash -c smoke
# GPU tests: one run per file, no -x. test_triton.py runs its interpreter-sized cases on the GPU.
phase test_cuda "$(limit_for test_cuda)" -- "$PY" -m pytest tests/kernels/test_cuda_gpu.py tests/kernels/test_mask_memory_kernels.py -m gpu $TESTS
phase test_gpu_triton "$(limit_for test_gpu_triton)" -- "$PY" -m pytest tests/kernels/test_gpu_triton.py $TESTS
phase test_triton "$(limit_for test_triton)" -- "$PY" -m pytest tests/kernels/test_triton.py -k "not no_register_spills" $TESTS
# Operator benchmarks: FOD's two levels, B 1/8/32, float32 + bfloat16, all modes, every provider.
phase bench "$(limit_for bench)" -- "$PY" $BENCH -k test_operator \
    --fod-providers cuda,triton,reference,official,sdpa --fod-case-seconds 0.25 --fod-max-rounds 25 \
    --benchmark-json="$RES/gpu_operator.json"
# Optional, only with budget left after the required phases (the report keeps its share).
REPORT_RESERVE=$(( BUDGET * SHARE[report] / 100 + MIN ))
if [ $(( $(left) - REPORT_RESERVE )) -ge 60 ]; then
    phase sweep $(( ($(left) - REPORT_RESERVE) * 2 / 3 )) -- "$PY" $BENCH -k "test_model or test_sweep" --fod-sweep \
        --fod-sweep-lengths 1024,2048,4096,8192,16384 --fod-sweep-modes fwd+bwd,infer --fod-dtypes bfloat16 \
        --fod-providers cuda,triton,reference,sdpa --fod-case-seconds 0.2 --fod-max-rounds 10 \
        --benchmark-json="$RES/gpu_sweep.json"
    phase oom $(( $(left) - REPORT_RESERVE )) -- "$PY" $BENCH -k test_oom --fod-oom --fod-providers cuda,triton,reference \
        --fod-oom-trial-seconds 20 --benchmark-json="$RES/gpu_oom.json"
else
    say "=== [sweep, oom] SKIPPED: $(left)s left, the report keeps ${REPORT_RESERVE}s"
    SUMMARY+=("sweep, oom: skipped (budget)")
fi
jsons=()
for f in "$RES"/gpu_operator.json "$RES"/gpu_sweep.json "$RES"/gpu_oom.json; do [ -s "$f" ] && jsons+=("$f"); done
if [ ${#jsons[@]} -gt 0 ]; then
    phase report "$(left)" -- "$PY" benchmarks/report.py "${jsons[@]}" --out "$RES" --name gpu_report
else
    say "=== [report] no benchmark JSON was written"
    SUMMARY+=("report: no JSON")
fi

{
    echo "=== summary ($(( $(date +%s) - T0 ))s of ${BUDGET}s)"
    for s in "${SUMMARY[@]}"; do echo "  $s"; done
} | tee -a "$LOG"
sync_out
exit 0
