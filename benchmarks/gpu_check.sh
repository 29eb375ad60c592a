#!/usr/bin/env bash
# One prepared GPU check for a machine with an NVIDIA GPU (written for an H200: torch 2.11, triton 3.6,
# nvcc 13, pytest, hypothesis, pytest-benchmark, timm, scikit-learn; no network).
#
#   bash benchmarks/gpu_check.sh            # from anywhere; whole run kept under ~9 minutes
#
# Steps: versions + nvidia-smi, build (pip install --no-build-isolation --no-deps -e .), the GPU tests
# (pytest -m gpu tests/), the GPU benchmarks (a subset sized to fit), report.py. Every step has its own
# time limit; a failing step is reported and the rest still runs; optional steps run only while the
# overall budget lasts. Results land in benchmarks/results/gpu/ and, if $OUT is set, in $OUT
# (at most 8 files: the log, the report, two plots, four JSON files).
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export FOD_CUDA_ARCH=${FOD_CUDA_ARCH:-90}
export MAX_JOBS=${MAX_JOBS:-16}
export FOD_KERNELS_QUIET=1
export PYTHONUNBUFFERED=1
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu}
export PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET:-540}          # seconds for the whole script
RES="$ROOT/benchmarks/results/gpu"
mkdir -p "$RES"
LOG="$RES/gpu_check.log"
: >"$LOG"
T0=$(date +%s)
SUMMARY=()

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# step NAME LIMIT_SECONDS [optional] -- command...
step() {
    local name=$1 limit=$2 optional=$3
    shift 4
    local remaining
    remaining=$(left)
    if [ "$optional" = optional ] && [ "$remaining" -lt 45 ]; then
        echo "=== [$name] SKIPPED: only ${remaining}s of the ${BUDGET}s budget left" | tee -a "$LOG"
        SUMMARY+=("$name: skipped (budget)")
        return 0
    fi
    if [ "$optional" = optional ] && [ "$limit" -gt "$remaining" ]; then limit=$remaining; fi
    echo "=== [$name] limit ${limit}s, $(date +%T): $*" | tee -a "$LOG"
    local start rc
    start=$(date +%s)
    # SIGINT first: pytest then still writes its --benchmark-json; SIGKILL 30 s later.
    timeout -s INT --kill-after=30 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    local took=$(( $(date +%s) - start ))
    local verdict="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT (rc $rc)";
    elif [ $rc -ne 0 ]; then verdict="FAILED (rc $rc)"; fi
    echo "=== [$name] $verdict after ${took}s" | tee -a "$LOG"
    [ "$verdict" = ok ] || tail -n 8 "$LOG" | head -n 7 | sed 's/^/    | /'
    SUMMARY+=("$name: $verdict, ${took}s")
}

info() {
    date -u
    nvidia-smi || echo "nvidia-smi failed"
    nvcc --version || echo "nvcc not found (CUDA_HOME=$CUDA_HOME)"
    "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton not importable:", e)
for m in ("pytest", "hypothesis", "pytest_benchmark", "timm", "sklearn"):
    try:
        mod = __import__(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", e)
EOF
}

backends() {
    "$PY" -c "import fod_kernels, pprint; pprint.pprint(dict(fod_kernels.available_backends()))"
}

export -f info backends  # timeout runs them through bash -c

BENCH="$PY -m pytest benchmarks/ -p no:cacheprovider --benchmark-only --fod-device cuda -q"

step versions 60 required -- bash -c info
step build 240 required -- "$PY" -m pip install --no-build-isolation --no-deps -e .
step backends 60 required -- bash -c backends
step gpu-tests 150 required -- "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider -x --durations=10
# The operator benchmarks: FOD's two levels, B 1/8/32, float32 + bfloat16, all modes; torch.compile apart
# (one compilation per shape and dtype) at B=8 only.
step bench-operator 210 optional -- $BENCH -k test_operator \
    --fod-providers cuda,triton,reference,official,sdpa --fod-case-seconds 0.25 --fod-max-rounds 25 \
    --benchmark-json="$RES/gpu_operator.json"
step bench-compile 120 optional -- $BENCH -k test_operator --fod-providers compile --fod-batches 8 \
    --fod-modes fwd+bwd,infer --fod-case-seconds 0.25 --fod-max-rounds 25 \
    --benchmark-json="$RES/gpu_compile.json"
step bench-model-sweep 120 optional -- $BENCH -k "test_model or test_sweep" --fod-sweep \
    --fod-sweep-lengths 1024,2048,4096,8192,16384 --fod-sweep-modes fwd+bwd,infer --fod-dtypes bfloat16 \
    --fod-providers cuda,triton,reference,sdpa --fod-case-seconds 0.2 --fod-max-rounds 10 \
    --benchmark-json="$RES/gpu_model_sweep.json"
step bench-oom 90 optional -- $BENCH -k test_oom --fod-oom --fod-providers cuda,reference \
    --fod-oom-trial-seconds 20 --benchmark-json="$RES/gpu_oom.json"

jsons=()
for f in "$RES"/gpu_operator.json "$RES"/gpu_compile.json "$RES"/gpu_model_sweep.json "$RES"/gpu_oom.json; do
    [ -s "$f" ] && jsons+=("$f")
done
if [ ${#jsons[@]} -gt 0 ]; then
    step report 60 required -- "$PY" benchmarks/report.py "${jsons[@]}" --out "$RES" --name gpu_report
else
    echo "=== [report] no benchmark JSON was written" | tee -a "$LOG"
    SUMMARY+=("report: no JSON")
fi

{
    echo "=== summary ($(( $(date +%s) - T0 ))s of ${BUDGET}s)"
    for s in "${SUMMARY[@]}"; do echo "  $s"; done
} | tee -a "$LOG"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    for f in "$LOG" "$RES"/gpu_report.md "$RES"/gpu_report_time_vs_L.png "$RES"/gpu_report_memory_vs_L.png \
             ${jsons[@]+"${jsons[@]}"}; do
        [ -f "$f" ] && cp "$f" "$OUT"/
    done
    echo "copied results to $OUT"
fi
exit 0
