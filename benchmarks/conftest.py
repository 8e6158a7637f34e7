"""`pytest benchmarks --benchmark-only`: micro-benchmarks of the ops with pytest-benchmark (test_micro.py)."""

import os

import torch

if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter, chosen before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")
