"""Build csrc/ with the root CMakeLists.txt outside setup.py, and load the result.

    python -m spidr_fast.build_extension --emulate        # CPU emulator build (tests, no GPU needed)
    python -m spidr_fast.build_extension --archs 90       # nvcc build for sm_90, ptxas report with --verbose
    python -m spidr_fast.build_extension --archs 90 --install   # and put it in the package: import spidr_fast._flash_attn

Builds are cached by a hash of the sources and options, so a second call with nothing changed is instant.
"""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from spidr_fast.cli import ArgumentParser

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SPIDR_FAST_BUILD_CACHE", Path.home() / ".cache" / "spidr_fast" / "build"))


def _sources_digest(*options: str) -> str:
    digest = hashlib.sha256("\0".join(options).encode())
    for path in sorted([ROOT / "CMakeLists.txt", *(ROOT / "csrc").rglob("*")]):
        if path.is_file():
            digest.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def build(*, emulate: bool, archs: str = "80;90", verbose: bool = False) -> tuple[Path, str]:
    """Configure and build; returns the module's path and the build log (ptxas figures with verbose)."""
    if not (ROOT / "csrc").is_dir():
        raise FileNotFoundError(f"no csrc/ beside the package ({ROOT}): build from a source checkout")
    kind = "emulator" if emulate else f"cuda-{archs.replace(';', '_')}"
    build_dir = CACHE / f"{kind}-{_sources_digest(kind, str(verbose), sys.executable)}"
    log_path = build_dir / "build.log"
    built = list(build_dir.glob("_flash_attn*.so"))
    if built and log_path.exists():
        return built[0], log_path.read_text()
    configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja"]
    configure += [f"-DPython_EXECUTABLE={sys.executable}", f"-DSPIDR_FAST_EMULATE={'ON' if emulate else 'OFF'}"]
    env = dict(os.environ, SPIDR_FAST_CUDA_ARCHS=archs, SPIDR_FAST_PTXAS_VERBOSE="1" if verbose else "")
    log = []
    for command in (configure, ["cmake", "--build", str(build_dir)]):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        log.append(result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{''.join(log)[-4000:]}")
    log_path.write_text("".join(log))
    return next(build_dir.glob("_flash_attn*.so")), log_path.read_text()


def load(path: Path) -> ModuleType:
    """Import a built `_flash_attn` module from its file."""
    spec = importlib.util.spec_from_file_location("_flash_attn", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--emulate", action="store_true", help="build for the CPU emulator instead of CUDA")
    parser.add_argument("--archs", default=os.environ.get("SPIDR_FAST_CUDA_ARCHS", "80;90"))
    parser.add_argument("--verbose", action="store_true", help="print ptxas register and spill figures")
    parser.add_argument("--install", action="store_true", help="copy the CUDA build into the spidr_fast package")
    args = parser.parse_args()
    if args.install and args.emulate:
        parser.error("--install takes the CUDA build only: the emulator build is loaded by the tests themselves")
    path, log = build(emulate=args.emulate, archs=args.archs, verbose=args.verbose)
    if args.verbose:
        print(log)
    if args.install:
        path = Path(shutil.copy2(path, ROOT / "spidr_fast" / path.name))
    print(path)


if __name__ == "__main__":
    main()
