#!/usr/bin/env bash
# Downloads into .whl/ (or $WHEELS) the wheels that the GPU machine lacks and the device check imports, for the
# device call to carry (it has no internet). Its image has torch, triton, numpy, pytest, pytest-benchmark, tqdm,
# cmake, ninja and pybind11 for Python 3.12 on x86-64 Linux.
#
#   bash benchmarks/fetch_wheels.sh          the official spidr 0.2.0 (pure Python): the official columns; and
#                                            vector-quantize-pytorch with its dependencies: the drop-in rows
#   bash benchmarks/fetch_wheels.sh --train  also soundfile (audio files) and nvtx (the training loop's NVTX ranges
#                                            on a GPU), to run python -m spidr_fast.train there
#
# No stage of the device check imports soundfile or nvtx: its rehearsal (--rehearse) makes both unimportable to
# prove it, so the default carries only what is used.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
# vector-quantize-pytorch and its pure-Python dependencies: the drop-in benchmark's comparison rows (kernels.py).
PACKAGES=(spidr==0.2.0 vector-quantize-pytorch einops einx loguru torch-einops-utils frozendict)
if [[ ${1:-} == --train ]]; then
  PACKAGES+=(soundfile cffi pycparser nvtx)  # cffi and pycparser: soundfile's own dependencies
elif (($#)); then
  echo "usage: bash benchmarks/fetch_wheels.sh [--train]" >&2
  exit 2
fi
mkdir -p "$WHEELS"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any --dest "$WHEELS" "${PACKAGES[@]}"
ls -1 "$WHEELS"
