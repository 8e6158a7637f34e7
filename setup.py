"""Build entry. Metadata lives in pyproject.toml.

With a CUDA toolkit (nvcc on PATH or under $CUDA_HOME), the flash-attention extension of csrc/ is built by the
root CMakeLists.txt (ninja + nvcc, architectures from $SPIDR_FAST_CUDA_ARCHS, default "80;90"). Without one,
or with SPIDR_FAST_CUDA=0, the pure-Python package installs with no compile step and attention runs on SDPA.
Either way the build says which happened.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def find_nvcc() -> str | None:
    if os.environ.get("SPIDR_FAST_CUDA", "auto") == "0":
        return None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    return str(candidate) if candidate and candidate.exists() else shutil.which("nvcc")


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        output_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja"]
        configure += [f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_CUDA_COMPILER={NVCC}"]
        configure.append(f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}")
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir)], check=True)


NVCC = find_nvcc()
if NVCC:
    print(f"spidr_fast: CUDA toolkit found ({NVCC}): building the flash-attention extension spidr_fast._flash_attn")
    extensions = [Extension("spidr_fast._flash_attn", sources=[])]
else:
    print("spidr_fast: no CUDA toolkit found (or SPIDR_FAST_CUDA=0): no CUDA extension, attention runs on SDPA")
    extensions = []

setup(ext_modules=extensions, cmdclass={"build_ext": CMakeBuild})
