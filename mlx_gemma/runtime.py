"""Process-wide runtime setup: the Linux BLAS and the compute dtype per device.

`setup_blas()` must run before `mlx.core` is first imported: MLX's Linux CPU
wheel resolves `cblas_sgemm` and friends from a reference BLAS (~6 GFLOPS),
and an OpenBLAS loaded earlier with RTLD_GLOBAL interposes those symbols
(~100-190 GFLOPS on a 2-core x86 machine). On macOS MLX uses Accelerate and
Metal, so nothing is done there.

Set MLX_GEMMA_NO_OPENBLAS=1 to skip it, or MLX_GEMMA_OPENBLAS=/path/libopenblas.so
to choose the library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import sysconfig

# What happened at import time, reported by `mlx-gemma info`.
BLAS_STATUS: dict = {"library": None, "note": "not attempted"}


def _candidates() -> list[str]:
    explicit = os.environ.get("MLX_GEMMA_OPENBLAS")
    if explicit:
        return [explicit]
    found = []
    # cmeel-openblas (a Linux dependency of this package) installs under
    # site-packages/cmeel.prefix/lib.
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}:
        if base and os.path.isdir(base):
            found += sorted(glob.glob(os.path.join(base, "cmeel.prefix", "lib", "libopenblas.so*")))
    # Debian/Ubuntu's libopenblas0 and other system installs.
    for name in ("openblas", "openblasp", "openblas64"):
        lib = ctypes.util.find_library(name)
        if lib:
            found.append(lib)
    found += sorted(glob.glob("/usr/lib/*/libopenblas.so.0")) + sorted(glob.glob("/usr/lib/*/openblas*/libopenblas.so.0"))
    seen, ordered = set(), []
    for path in found:
        if path not in seen:
            seen.add(path)
            ordered.append(path)
    return ordered


def setup_blas() -> dict:
    """Load an OpenBLAS with RTLD_GLOBAL before mlx.core (Linux only). Idempotent."""
    if BLAS_STATUS["note"] != "not attempted":
        return BLAS_STATUS
    if not sys.platform.startswith("linux"):
        BLAS_STATUS.update(note="not needed on this platform (MLX uses Accelerate/Metal)")
        return BLAS_STATUS
    if os.environ.get("MLX_GEMMA_NO_OPENBLAS", "") not in ("", "0"):
        BLAS_STATUS.update(note="disabled by MLX_GEMMA_NO_OPENBLAS")
        return BLAS_STATUS
    if "mlx.core" in sys.modules:
        BLAS_STATUS.update(note="mlx.core was imported before mlx_gemma; its reference BLAS stays in use "
                                "(import mlx_gemma first for the fast OpenBLAS path)")
        return BLAS_STATUS
    errors = []
    for path in _candidates():
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        BLAS_STATUS.update(library=path, note="OpenBLAS loaded before mlx.core")
        return BLAS_STATUS
    hint = ("install the system OpenBLAS runtime (Debian/Ubuntu: apt-get install libgfortran5, "
            "or libopenblas0-pthread)")
    BLAS_STATUS.update(note="no usable OpenBLAS found, matmuls use MLX's slow reference BLAS; " + hint
                       + ("; tried " + "; ".join(errors) if errors else ""))
    return BLAS_STATUS


def is_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.gpu


def default_compute_dtype():
    """float32 on the CPU (bf16 matmuls are ~20x slower there), bfloat16 on a GPU."""
    import mlx.core as mx

    return mx.bfloat16 if is_gpu() else mx.float32


def parse_dtype(name: str | None):
    """'float32' / 'fp32' / 'bfloat16' / 'bf16' / 'float16' / 'fp16' / 'auto' / None -> mx.Dtype."""
    import mlx.core as mx

    if name is None or name == "auto":
        return default_compute_dtype()
    table = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
             "float16": mx.float16, "fp16": mx.float16}
    if name not in table:
        from .errors import UserError

        raise UserError(f"unknown dtype {name!r}; use one of auto, float32, bfloat16, float16")
    return table[name]
