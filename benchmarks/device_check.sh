#!/usr/bin/env bash
# One device check, for a GPU machine without internet, in under 8 minutes on one H100 (10 at worst, by the
# timeouts below):
#   build the CUDA extension, report the installation, run the GPU tests (and compute-sanitizer on a small case),
#   run both benchmarks; every log and result lands in one folder.
#
#   bash benchmarks/device_check.sh [RESULTS_DIR]      (default: $OUT, else benchmarks/results/device-check-<UTC time>)
#
# Expects on the machine: torch with CUDA, triton, nvcc, cmake, ninja, pybind11, setuptools. What it lacks
# travels as wheels in $WHEELS (default .whl/), installed offline first: pytest, pytest-benchmark, soundfile,
# tqdm, nvtx as needed, and the official spidr 0.2.0 wheel (pure Python; without it the official columns and
# parity tests are absent and the summary says so). Fetch them where pip works, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl spidr==0.2.0 pytest-benchmark
# Afterwards: copy kernels.json and train_step.json into benchmarks/results/ and run python -m benchmarks.report.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-benchmarks/results/device-check-$(date -u +%Y%m%d-%H%M)}}
mkdir -p "$RESULTS"
WHEELS=${WHEELS:-.whl}
export PYTHONUNBUFFERED=1 SPIDR_FAST_CUDA_ARCHS=${SPIDR_FAST_CUDA_ARCHS:-90}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to NAME.log, one summary line
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$SUMMARY"
  return $rc
}

step build 90 bash -c 'python3 setup.py build_ext --inplace && python3 -m spidr_fast.info && \
  python3 -m spidr_fast.build_extension --archs "$SPIDR_FAST_CUDA_ARCHS" --verbose | grep -E "registers|spill"'
step tests 150 bash -c 'SPIDR_FAST_REQUIRE_GPU=1 python3 -m pytest -q -x -p no:cacheprovider -m gpu \
  tests/test_flash_attention.py && python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_codebook_assign.py \
  tests/test_kernels_codebook_ema.py tests/test_kernels_heads_cross_entropy.py'
step sanitizer 45 compute-sanitizer --tool memcheck --error-exitcode 1 python3 -c '
import torch
from spidr_fast.ops.flash_attention import flash_attention_varlen
for head_dim in (64, 128):
    q, k, v = (torch.randn(200, 2, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    cu = torch.tensor([0, 1, 70, 200], dtype=torch.int32, device="cuda")
    out = flash_attention_varlen(q, k, v, cu, 130, dropout_p=0.1)
    out.sum().backward()
torch.cuda.synchronize()
print("sanitizer case ran")'
step kernels 120 python3 -m benchmarks.kernels --output "$RESULTS/kernels.json"
step train_step 150 python3 -m benchmarks.train_step --output "$RESULTS/train_step.json"
python3 -c "import spidr" 2> /dev/null || echo "official spidr not importable: official columns absent" | tee -a "$SUMMARY"
echo "results and logs: $RESULTS"
