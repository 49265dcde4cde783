"""Process-wide setup: the Linux BLAS (before mlx.core is imported) and glibc's malloc.

`setup_blas()` must run before `mlx.core` is first imported: MLX's Linux CPU
wheel resolves `cblas_sgemm` and friends from a reference BLAS (~6 GFLOPS),
and an OpenBLAS loaded earlier with RTLD_GLOBAL interposes those symbols
(~100-190 GFLOPS on a 2-core x86 machine). On macOS MLX uses Accelerate and
Metal, so nothing is done there.

Set MLX_GEMMA_NO_OPENBLAS=1 to skip it, or MLX_GEMMA_OPENBLAS=/path/libopenblas.so
to choose the library. `import mlx_gemma` calls `setup_blas()` and nothing else of this module;
`tune_malloc()` runs only through `mlx_gemma.cpu.enable()` (the CLI calls it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import sysconfig

from ..files import home_dir

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


def _provide_libgfortran() -> bool:
    """Make `libgfortran.so.5` resolvable on machines without the system package.

    cmeel-openblas's library needs libgfortran.so.5 (Debian: libgfortran5). The mlx and numpy
    wheels bundle a libgfortran too, but renamed by auditwheel (`libgfortran-<hash>.so.5.0.0`,
    with that SONAME), so the dynamic linker does not match it to the name OpenBLAS asks for.
    We copy it once into the cache with its SONAME string rewritten in place to
    `libgfortran.so.5` (shorter, so the ELF layout is unchanged) and preload the copy and
    its libquadmath with RTLD_GLOBAL: the linker then satisfies OpenBLAS's dependency by SONAME.
    """
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}:
        for libs in ("mlx_cpu.libs", "mlx.libs", "numpy.libs"):
            found = sorted(glob.glob(os.path.join(base or "", libs, "libgfortran-*.so*")))
            if not found:
                continue
            src = found[0]
            try:
                for quadmath in glob.glob(os.path.join(os.path.dirname(src), "libquadmath-*.so*")):
                    ctypes.CDLL(quadmath, mode=os.RTLD_GLOBAL)
                with open(src, "rb") as f:
                    data = bytearray(f.read())
                old = os.path.basename(src).encode() + b"\0"
                at = data.find(old)
                if at < 0:
                    continue
                new = b"libgfortran.so.5"
                data[at:at + len(old)] = new + b"\0" * (len(old) - len(new))
                folder = os.path.join(home_dir(), "blas")  # the one definition of the cache root
                os.makedirs(folder, exist_ok=True)
                target = os.path.join(folder, f"libgfortran.so.5-{os.path.basename(src)}")
                if not os.path.exists(target):
                    tmp = f"{target}.tmp-{os.getpid()}"
                    with open(tmp, "wb") as f:
                        f.write(data)
                    os.replace(tmp, target)
                ctypes.CDLL(target, mode=os.RTLD_GLOBAL)
                return True
            except OSError:
                continue
    return False


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
        _warn_reference_blas(sys.modules["mlx.core"])
        return BLAS_STATUS
    errors = []
    for path in _candidates():
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        except OSError as exc:
            if "libgfortran.so.5" not in str(exc) or not _provide_libgfortran():
                errors.append(f"{path}: {exc}")
                continue
            try:
                ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            except OSError as exc2:
                errors.append(f"{path}: {exc2}")
                continue
            BLAS_STATUS.update(library=path, note="OpenBLAS loaded before mlx.core (with the libgfortran "
                                                  "bundled in the mlx/numpy wheel)")
            return BLAS_STATUS
        BLAS_STATUS.update(library=path, note="OpenBLAS loaded before mlx.core")
        return BLAS_STATUS
    hint = ("install the system OpenBLAS runtime (Debian/Ubuntu: apt-get install libgfortran5, "
            "or libopenblas0-pthread)")
    BLAS_STATUS.update(note="no usable OpenBLAS found, matmuls use MLX's slow reference BLAS; " + hint
                       + ("; tried " + "; ".join(errors) if errors else ""))
    return BLAS_STATUS


class ReferenceBLASWarning(RuntimeWarning):
    """MLX's CPU matmuls run on its reference BLAS in this process (mlx.core was imported first)."""


def _warn_reference_blas(mx) -> None:
    """Say so, once, where it costs: a process whose MLX computes on the CPU. The symbols are bound
    when mlx.core loads, so nothing can swap the BLAS afterwards; the caller has to import us first."""
    if mx.default_device() != mx.cpu:
        return
    import warnings

    warnings.warn("mlx.core was imported before mlx_gemma, so MLX's CPU matmuls stay on its reference BLAS "
                  "(about 30x slower than OpenBLAS); put `import mlx_gemma` before the first `import mlx` "
                  "(MLX_GEMMA_NO_OPENBLAS=1 keeps MLX's BLAS and silences this)", ReferenceBLASWarning, stacklevel=4)


_SGEMV: list = []  # [the cblas_sgemv of the loaded OpenBLAS, or None], filled on first use
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS enums


def blas_sgemv():
    """`cblas_sgemv` of the OpenBLAS `setup_blas` loaded (the library MLX's own matmuls run in), as a
    ctypes function whose pointer arguments are plain addresses (`array.ctypes.data`: no per-call
    conversion, for hot loops that keep their buffers; the caller owns the layout checks), or None
    when none was loaded or it lacks the symbol.

    Calling the same library matters: a second BLAS (numpy's own OpenBLAS) keeps a second pool of
    spinning threads that contends with MLX's on every call (measured: 11.9 tok/s decoding with
    numpy's gemv against 22 with this one and 15.7 with MLX's matmul)."""
    if not _SGEMV:
        fn = None
        if BLAS_STATUS.get("library"):
            try:
                fn = ctypes.CDLL(BLAS_STATUS["library"]).cblas_sgemv
            except (OSError, AttributeError):
                fn = None
        if fn is not None:
            addr, i32 = ctypes.c_void_p, ctypes.c_int
            fn.restype = None
            fn.argtypes = [i32, i32, i32, i32, ctypes.c_float, addr, i32, addr, i32, ctypes.c_float, addr, i32]
        _SGEMV.append(fn)
    return _SGEMV[0]


def sgemv(weight, x, out) -> None:
    """out = weight @ x in the loaded OpenBLAS: weight (M, N), x (N,), out (M,), all C-contiguous
    float32 numpy arrays (checked: a wrong layout would read the wrong memory)."""
    M, N = weight.shape
    for a in (weight, x, out):
        if a.dtype.name != "float32" or not a.flags.c_contiguous:
            raise ValueError("sgemv needs C-contiguous float32 arrays")
    if x.shape != (N,) or out.shape != (M,):
        raise ValueError(f"sgemv shapes: weight {weight.shape}, x {x.shape}, out {out.shape}")
    blas_sgemv()(ROW_MAJOR, NO_TRANS, M, N, 1.0, weight.ctypes.data, N, x.ctypes.data, 1, 0.0, out.ctypes.data, 1)


def tune_malloc() -> bool:
    """glibc (Linux): keep freed large blocks in the heap for reuse. Idempotent.

    MLX's CPU backend allocates every array with malloc. glibc serves blocks above its mmap
    threshold (at most 32 MiB by default) with fresh mmap'ed pages and returns them on free,
    so every large temporary (a chunk of logits, an MLP activation) page-faults its memory
    in again: measured here, that made a 50 MB elementwise op 4x slower than the same op on
    reused memory. A 1 GiB mmap threshold and trim threshold keep such blocks in the heap.
    The cost: up to that much freed memory may stay mapped to the process.
    Set MLX_GEMMA_NO_MALLOPT=1 to leave glibc's defaults.
    """
    if not sys.platform.startswith("linux") or os.environ.get("MLX_GEMMA_NO_MALLOPT", "") not in ("", "0"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))
