#!/usr/bin/env bash
# Everything a fresh machine of this project's kind needs, idempotent (a second run takes seconds):
# torch (a CUDA build, so the CUDA extension compiles and links even without a GPU), the Python
# dependencies, and the C++/CUDA extensions built in place by `pip install --no-build-isolation -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${FOD_TORCH_SPEC:-torch==2.14.1}

if ! $PY -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  $PY -m pip install -q "$TORCH_SPEC"
fi
missing=$($PY - <<'PY'
import importlib.util as u
mods = {"numpy": "numpy", "scipy": "scipy", "sklearn": "scikit-learn", "PIL": "pillow", "tqdm": "tqdm",
        "matplotlib": "matplotlib", "timm": "timm", "safetensors": "safetensors", "pytest": "pytest",
        "hypothesis": "hypothesis",
        "pytest_benchmark": "pytest-benchmark", "triton": "triton>=3.6", "ruff": "ruff",
        # fod export and its tests (the 'export' extra): about 40 MB of wheels
        "onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime",
        # training curves as TensorBoard event files (the 'tensorboard' extra; fod writes log.csv without it)
        "tensorboard": "tensorboard"}
print(" ".join(p for m, p in mods.items() if u.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "[setup] installing $missing"
  # shellcheck disable=SC2086
  $PY -m pip install -q $missing
fi

# CUDA_HOME must be the toolkit folder that holds lib64/libcudart.so (torch guesses it from nvcc's
# path, which is /usr/local/bin here, and would get it wrong).
if [ -z "${CUDA_HOME:-}" ] || [ ! -e "$CUDA_HOME/lib64/libcudart.so" ]; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [ -e "$d/lib64/libcudart.so" ]; then export CUDA_HOME=$d; break; fi
  done
fi
export MAX_JOBS=${MAX_JOBS:-2}

# Rebuild only when a source is newer than the built extension (or it does not import).
need_build=1
so=$(ls fod_kernels/_C.*.so 2>/dev/null | head -n1 || true)
if [ -n "$so" ] && $PY -c "import fod_kernels._C" 2>/dev/null && command -v fod >/dev/null; then
  newer=$(find csrc setup.py fod_kernels/_build_flags.py -newer "$so" -type f | head -n1)
  cuda_ok=1
  if [ "${FOD_BUILD_CUDA:-auto}" != "0" ] && [ -n "${CUDA_HOME:-}" ] && $PY -c "import torch,sys; sys.exit(torch.version.cuda is None)"; then
    ls fod_kernels/_C_cuda.*.so >/dev/null 2>&1 || cuda_ok=0
  fi
  [ -z "$newer" ] && [ "$cuda_ok" = 1 ] && need_build=0
fi
if [ "$need_build" = 1 ]; then
  echo "[setup] building the extensions (CUDA_HOME=${CUDA_HOME:-none}, FOD_CUDA_ARCH=${FOD_CUDA_ARCH:-80;90})"
  $PY -m pip install -q --no-build-isolation --no-deps -e .
fi
$PY -c "import fod_kernels as fk; [print(f'[setup] backend {n:9s} {\"yes\" if s.available else \"no \"}  {s.reason}') for n, s in fk.available_backends().items()]"
