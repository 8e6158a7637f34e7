#!/usr/bin/env bash
# The device check: what a borrowed GPU machine (no internet, 15 minutes in all, one command at most 600 s, at
# most 8 files back) runs, in stages with their own time limits, so a stage that hangs or fails costs only itself.
#
#   bash benchmarks/device_check.sh [RESULTS_DIR]              eager: build, import, GPU tests, sanitizer, kernel
#                                                              benchmarks, eager train steps; 545 s of stage limits
#   bash benchmarks/device_check.sh compiled [RESULTS_DIR]     the torch.compile variants of both benchmarks, 490 s
#   bash benchmarks/device_check.sh --rehearse [RESULTS_DIR]   every stage on a CPU (emulator, interpreter, smoke
#                                                              shapes), same files: a script bug shows here first
#   ... --only STAGE[,STAGE]                                   just these stages (e.g. --only kernels on a second
#                                                              call); the others are not run and not counted
#
# DEVICE_CHECK_LIMIT_SCALE multiplies every stage's time limit (e.g. 1.5 on an A100, which is slower than an H100).
# The exit status is 0 when the verdict is PASS, 1 otherwise.
# RESULTS_DIR defaults to $OUT, else .benchmarks/device-check. It receives at most 7 files: summary.txt (first line
# PASS, or FAIL and the stages that failed, or INCOMPLETE), build.log (ptxas registers and spills per kernel),
# check.log (import, tests, sanitizer), bench.log, and the results JSON of each benchmark, every row written as
# soon as it is measured. Without .git (a device copy), set SPIDR_FAST_COMMIT to the commit that was sent.
# What the machine lacks travels as wheels in $WHEELS (default .whl/, from benchmarks/fetch_wheels.sh).
# Afterwards: copy the JSON files into benchmarks/results/ and run python -m benchmarks.report.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=eager ONLY=""
while (($#)); do
  case $1 in
    compiled) MODE=compiled ;;
    --rehearse) MODE=rehearse ;;
    --only) ONLY=",$2,"; shift ;;
    *) break ;;
  esac
  shift
done
RESULTS=${1:-${OUT:-.benchmarks/device-check}}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WHEELS=${WHEELS:-.whl}
export WHEELS PYTHONUNBUFFERED=1 SPIDR_FAST_CUDA_ARCHS=${SPIDR_FAST_CUDA_ARCHS:-90}
SCRATCH=$(mktemp -d)  # outside RESULTS (every file there comes back): the carried wheels, the stage lines
trap 'rm -rf "$SCRATCH"' EXIT
SITE="$SCRATCH/site" LINES="$SCRATCH/stages" SUMMARY="$RESULTS/summary.txt"
: > "$LINES"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [[ $MODE == rehearse ]]; then
  # The GPU machine lacks these; here they are made unimportable, so a stage that needs one fails in the rehearsal.
  for missing in soundfile nvtx; do
    echo "raise ImportError('the GPU machine has no $missing: carry its wheel (benchmarks/fetch_wheels.sh)')" \
      > "$SCRATCH/$missing.py"
  done
  PYTHONPATH="$PYTHONPATH:$SCRATCH"
fi
case $MODE in
  compiled) STAGE_NAMES="environment build import train_step kernels" ;;
  *) STAGE_NAMES="environment build import tests sanitizer kernels train_step" ;;
esac
STAGES=0
for name in $STAGE_NAMES; do [[ -z $ONLY || $ONLY == *",$name,"* ]] && STAGES=$((STAGES + 1)); done
for name in ${ONLY//,/ }; do
  [[ " $STAGE_NAMES " == *" $name "* ]] || { echo "--only: no stage '$name' in $MODE mode ($STAGE_NAMES)" >&2; exit 2; }
done
FAILED=() DONE=0
SCALE=${DEVICE_CHECK_LIMIT_SCALE:-1}

write_summary() {  # first line: the verdict so far; then one line per stage
  local verdict="PASS"
  if ((${#FAILED[@]})); then verdict="FAIL: ${FAILED[*]}"; elif ((DONE < STAGES)); then
    verdict="INCOMPLETE: $DONE of $STAGES stages done"; fi
  { echo "$verdict ($MODE mode)"; cat "$LINES"; } > "$SUMMARY"
}

step() {  # step NAME LOG TIMEOUT_S COMMAND...: run with a time limit, append to LOG, record the outcome
  local name=$1 log=$2 limit; shift 2
  [[ -z $ONLY || $ONLY == *",$name,"* ]] || return 0
  limit=$(awk -v s="$1" -v k="$SCALE" 'BEGIN { l = int(s * k + 0.5); print (l < 1 ? 1 : l) }'); shift
  local start=$SECONDS
  echo "=== $name (limit $limit s) ===" >> "$RESULTS/$log"
  timeout --kill-after=10 "$limit" "$@" >> "$RESULTS/$log" 2>&1
  local rc=$?
  local outcome="ok"
  if ((rc == 124 || rc == 137)); then outcome="TIMED OUT"; elif ((rc != 0)); then outcome="FAILED (exit $rc)"; fi
  [[ $outcome == ok ]] || FAILED+=("$name")
  DONE=$((DONE + 1))
  echo "$name: $outcome in $((SECONDS - start)) s (limit $limit s; log $log)" | tee -a "$LINES"
  write_summary
}

# Every gpu test, then the Triton kernels' own tests (on CUDA when there is one); the second runs even when the first
# fails. Under SPIDR_FAST_REQUIRE_GPU=1 a gpu test that skips fails (tests/conftest.py).
GPU_TESTS='XDIST=$(python3 -c "import xdist" 2> /dev/null && echo "-n 4")
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_attention.py tests/test_gpu_parity.py; first=$?
python3 -m pytest -q -p no:cacheprovider $XDIST tests/test_kernels_codebook.py tests/test_kernels_heads_cross_entropy.py; second=$?
exit $((first | second))'

write_summary
# The carried wheels (the official spidr requires Python 3.12 on paper; it runs on 3.11 too).
step environment check.log 30 bash -c 'if compgen -G "$WHEELS/*.whl" > /dev/null; then python3 -m pip install -q \
  --no-index --no-deps --no-compile --no-cache-dir --ignore-requires-python --upgrade --target "$SITE" "$WHEELS"/*.whl \
  || exit 1; fi; date -u; nvidia-smi 2>&1 | head -15; python3 -c "
import torch, triton, numpy, sys
print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"triton\", triton.__version__, \"numpy\", numpy.__version__)
print(\"device\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"none\")"; nvcc --version | tail -2; echo "commit ${SPIDR_FAST_COMMIT:-see git}"'

if [[ $MODE == rehearse ]]; then
  step build build.log 240 python3 -m spidr_fast.build_extension --emulate
  # The CPU has no real extension: the emulator build stands in for it, loaded as the tests load it.
  step import check.log 60 python3 -c '
from spidr_fast import build_extension, info
from spidr_fast.ops.kernels import attention as attention_kernel
module = build_extension.load(build_extension.build(emulate=True)[0])
assert module.emulated, "the rehearsal expects the emulator build"
attention_kernel.use_extension(module)
info.main()'
  step tests check.log 400 bash -c "$GPU_TESTS"
  step sanitizer check.log 10 bash -c 'echo "no compute-sanitizer on a CPU: skipped"'
  step kernels bench.log 300 python3 benchmarks/kernels.py --smoke --output "$RESULTS/kernels.json"
  step train_step bench.log 300 python3 benchmarks/train_step.py --smoke --output "$RESULTS/train_step.json"
elif [[ $MODE == eager ]]; then
  # One build, for sm_90 only, with ptxas's report per kernel (names kept); installed where the package imports it.
  step build build.log 90 python3 -m spidr_fast.build_extension --archs "$SPIDR_FAST_CUDA_ARCHS" --verbose --install
  # A missing, emulated or unloadable extension fails here, not as silently skipped tests later.
  step import check.log 30 python3 -c '
import torch
from spidr_fast import info
from spidr_fast.ops.kernels import attention as attention_kernel
module = attention_kernel.extension()
assert module is not None, "spidr_fast._flash_attn does not import: the build stage installed no extension"
assert not module.emulated, "spidr_fast._flash_attn is the CPU emulator build"
assert torch.cuda.is_available(), "torch sees no CUDA device"
info.main()'
  # 150 s: flash-attention's case matrix at full sizes (40 gpu tests, estimated 20-35 s) came after the last run.
  step tests check.log 150 env SPIDR_FAST_REQUIRE_GPU=1 bash -c "$GPU_TESTS"
  # API errors that torch raises while it probes the device are not ours: only memory errors count.
  step sanitizer check.log 45 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 python3 -c '
import torch
from spidr_fast.ops.kernels.attention import flash_attention_varlen
for head_dim in (64, 128):
    q, k, v = (torch.randn(200, 2, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    cu = torch.tensor([0, 1, 70, 200], dtype=torch.int32, device="cuda")
    out = flash_attention_varlen(q, k, v, cu, 130, dropout_p=0.1)
    out.sum().backward()
torch.cuda.synchronize()
print("sanitizer case ran")'
  step kernels bench.log 100 python3 benchmarks/kernels.py --variants eager --output "$RESULTS/kernels.json"
  step train_step bench.log 100 python3 benchmarks/train_step.py --variants eager --output "$RESULTS/train_step.json"
else
  step build build.log 60 python3 -m spidr_fast.build_extension --archs "$SPIDR_FAST_CUDA_ARCHS" --verbose --install
  step import check.log 20 python3 -m spidr_fast.info
  # Each compiled SpidR-base takes about a minute to build on an H100 machine; the official one comes last (it
  # failed in torch 2.11's inductor after two minutes).
  step train_step bench.log 300 python3 benchmarks/train_step.py --variants compiled \
    --output "$RESULTS/train_step_compiled.json"
  step kernels bench.log 80 python3 benchmarks/kernels.py --variants compiled --only codebook heads_cross_entropy \
    --output "$RESULTS/kernels_compiled.json"
fi
python3 -c "import spidr.models" 2> /dev/null || echo "official spidr not importable: official columns absent" \
  | tee -a "$LINES"
write_summary
echo "$(head -1 "$SUMMARY"); results and logs: $RESULTS"
[[ $(head -1 "$SUMMARY") == PASS* ]]
