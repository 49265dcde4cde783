"""Small C kernels for the CPU decode path, compiled at first use with the machine's C compiler.

`qgemv()` returns `qgemv_affine` from qgemv.c (one row times an MLX affine-quantized 4/8-bit
matrix, vectorised by the compiler for this CPU: `-O3 -march=native`), or None when no compiler
is found or the build fails; callers then keep MLX's `quantized_matmul`. The shared library is
cached under $MLX_GEMMA_HOME/native/ by a hash of the source, compiler, flags and this CPU's
instruction-set features (machine.isa_features()): `-march=native` code built on one CPU can hold
instructions another lacks (SIGILL), so a cache folder shared between machines gets one library
per CPU kind, and a library built for other features is never loaded. It is written to a
temporary name and renamed into place, so concurrent first uses do not see a half-written file.
$CC chooses the compiler (default `cc`); MLX_GEMMA_NO_NATIVE=1 turns the kernels off.
`STATUS` says what happened (`mlx-gemma info` prints it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from ..files import home_dir
from .machine import isa_features

SOURCE = Path(__file__).with_name("qgemv.c")
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])  # -march=native where the compiler knows it
STATUS: dict = {"library": None, "note": "not built yet"}
_LOADED: list = []  # [the ctypes function or None], filled on first use


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def build_key(source: bytes, cc: str, flags: list) -> str:
    """The cache key of a build: source, compiler, flags, architecture and the CPU's features."""
    parts = [cc, *flags, platform.machine(), *isa_features()]
    return hashlib.sha256(source + "\0".join(parts).encode()).hexdigest()[:16]


def _build(cc: str, folder: Path) -> Optional[Path]:
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = build_key(source, cc, flags)
        target = folder / f"qgemv-{key}.so"
        if target.is_file():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".qgemv-", suffix=".so", dir=folder)
        os.close(fd)
        try:
            run = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)], capture_output=True,
                                 text=True, timeout=120)
            if run.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}")
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    STATUS["note"] = f"{cc} could not build {SOURCE.name}: {errors[-1]}"
    return None


def qgemv():
    """The ctypes function `qgemv_affine(w, scales, biases, x, out, M, N, group, bits, work) -> int`
    (pointers as ints), or None (see STATUS["note"])."""
    if not _LOADED:
        fn = None
        if os.environ.get("MLX_GEMMA_NO_NATIVE", "") not in ("", "0"):
            STATUS["note"] = "disabled by MLX_GEMMA_NO_NATIVE"
        elif (cc := _compiler()) is None:
            STATUS["note"] = "no C compiler found (set CC): quantized decoding uses MLX's kernel"
        else:
            try:
                path = _build(cc, home_dir() / "native")
            except OSError as exc:  # an unwritable cache folder
                path = None
                STATUS["note"] = f"cannot build the native kernels: {exc}"
            if path is not None:
                try:
                    fn = ctypes.CDLL(str(path)).qgemv_affine
                except (OSError, AttributeError) as exc:
                    STATUS["note"] = f"cannot load {path}: {exc}"
                else:
                    addr, i32 = ctypes.c_void_p, ctypes.c_int
                    fn.restype = i32
                    fn.argtypes = [addr, addr, addr, addr, addr, i32, i32, i32, i32, addr]
                    STATUS.update(library=str(path), note=f"built with {cc}")
        _LOADED.append(fn)
    return _LOADED[0]
