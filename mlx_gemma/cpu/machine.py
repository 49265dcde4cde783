"""What this machine is, for keys that must change when the machine does: the CPU's model name
and instruction-set features, and the versions of the libraries whose kernels we time.

Two users of it: the native kernel's build key (a library compiled with `-march=native` for one
CPU must never be loaded on a CPU without those instructions: SIGILL) and the calibration cache
(a speed measured on one CPU or MLX version says nothing about another). Neither imports MLX.
"""

from __future__ import annotations

import hashlib
import platform
import re
from functools import lru_cache
from importlib import metadata
from pathlib import Path

# The flags that decide which instructions a compiler may emit or a library may pick at run time
# (x86: SSE/AVX/AVX-512/AMX families, FMA, F16C, BMI; Arm: NEON/SVE/SME/dot-product/bf16/i8mm).
ISA_FLAG = re.compile(r"^(sse|ssse|avx|amx|fma|f16c|bmi|asimd|sve|sme\d*$|fphp|fp16|bf16|i8mm|dotprod|vnni)")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple:
    """(model name, every flag) from /proc/cpuinfo (Linux); elsewhere the platform's processor string."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return name, frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and value.strip():
            name = value.strip()
        elif key in ("flags", "features"):
            flags |= set(value.split())
    return name, frozenset(flags)


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8481C", ...)."""
    return _cpuinfo()[0]


def isa_features() -> tuple:
    """The CPU's instruction-set features, sorted (e.g. ('avx', 'avx2', 'avx512f', ..., 'fma'))."""
    return tuple(sorted(f for f in _cpuinfo()[1] if ISA_FLAG.match(f)))


def isa_level() -> str:
    """A short name of the widest vector ISA: 'AVX-512 + AMX', 'AVX-512', 'AVX2', 'NEON', ..."""
    features = set(isa_features())
    if "avx512f" in features:
        return "AVX-512 + AMX" if any(f.startswith("amx") for f in features) else "AVX-512"
    for flag, name in (("avx2", "AVX2"), ("avx", "AVX"), ("sve", "SVE"), ("asimd", "NEON")):
        if flag in features:
            return name
    return platform.machine()


def library_versions() -> dict:
    """Versions of the libraries whose kernels a calibration times (without importing them)."""
    out = {}
    for name in ("mlx", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def code_version() -> str:
    """A hash of this package's CPU code (cpu/*.py, qgemv.c): a changed kernel is re-timed."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.[pc]*")):
        if path.suffix in (".py", ".c"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]
