"""Everything CPU-specific, behind one seam.

MLX's Linux CPU backend leaves speed on the table in places a small amount of host code recovers:
a reference BLAS under its matmuls, transcendental functions evaluated one scalar at a time, a
one-row product sent to sgemm, a quantized kernel that is not vectorised. This package holds the
code that works around each, and decides per machine, by measurement, which of it runs:

    runtime.py      the OpenBLAS preload (done by `import mlx_gemma`, see below) and malloc tuning
    machine.py      CPU model name, instruction-set features, library versions (keys)
    native.py       qgemv.c, the 4/8-bit one-row kernel, built for this CPU at first use
    fastmath.py     polynomial exp / tanh / GELU / softmax in MLX ops
    hostloss.py     the LM-head cross-entropy and its gradient in numpy
    hostdecode.py   the one-row decode step on the host; `host_paths(model)` is the seam the
                    decode step asks
    calibrate.py    times each path against MLX's own kernel on the model's shapes, keeps it only
                    where it wins by a margin, caches the choice per machine

What happens when:
- `import mlx_gemma` (Linux): only `runtime.setup_blas()`, because MLX must find OpenBLAS before
  `mlx.core` is first imported (MLX_GEMMA_NO_OPENBLAS=1 skips it). Nothing is built, timed or tuned,
  and every CPU path below is off: MLX's own kernels run.
- `enable()` (the CLI calls it; library users call it once): glibc keeps large freed blocks
  (MLX_GEMMA_NO_MALLOPT=1 skips that), and from then on each model `load()` returns is calibrated
  (`calibrate.prepare`, ~3 s for the 270M the first time per machine and model shape, then read
  from $MLX_GEMMA_HOME/calibration/) and the winning paths are switched on in `backend.policy()`.
- MLX_GEMMA_CPU_PATHS forces choices instead of measuring them (tests, benchmarks): a comma list of
  `path=on|off` for the paths in PATHS, or `all=on|off`, e.g. `all=off,row_decode=on`.

On a GPU (Metal, CUDA) none of this runs: `calibrate.prepare` returns at once.
"""

from __future__ import annotations

import os
import sys

from .runtime import BLAS_STATUS, setup_blas, tune_malloc

# The CPU paths a calibration decides, and what each replaces.
PATHS = {
    "fast_math": "polynomial exp / tanh / GELU / softmax instead of MLX's CPU kernels",
    "attention": "explicit attention (scores, fastmath softmax) instead of MLX's fused SDPA in prefill",
    "host_loss": "the LM-head cross-entropy and its gradient in numpy instead of MLX's chunked loss",
    "row_decode": "one-row decode step on the host (cblas_sgemv + numpy) instead of MLX's compiled step",
    "native": "the native 4/8-bit one-row kernel instead of MLX's quantized_matmul (one-row decoding)",
}
ENV = "MLX_GEMMA_CPU_PATHS"

_STATE = {"enabled": False, "malloc": False}


def forced() -> dict:
    """{path: bool} that MLX_GEMMA_CPU_PATHS forces; a value it cannot read raises ValueError
    naming it (a typo must not silently fall back to measuring)."""
    out = {}
    for item in filter(None, (part.strip() for part in os.environ.get(ENV, "").split(","))):
        name, _, value = item.partition("=")
        names = list(PATHS) if name == "all" else [name]
        if name != "all" and name not in PATHS or value not in ("on", "off"):
            raise ValueError(f"{ENV}: cannot read {item!r}; use path=on|off with path one of all, "
                             + ", ".join(PATHS))
        out.update({n: value == "on" for n in names})
    return out


def enable() -> None:
    """Switch the CPU paths on for this process: tune malloc now, and calibrate each model that
    `load()` returns from now on (or call `calibrate.prepare(model)` for a model built otherwise).
    Idempotent; does nothing harmful on a GPU."""
    if not _STATE["enabled"]:
        _STATE["malloc"] = tune_malloc()
        _STATE["enabled"] = True
        # A policy detected before (all paths off) is detected again. Looked up, not imported:
        # this package is imported before mlx.core (the BLAS preload), and backend imports it.
        backend = sys.modules.get(__name__.rpartition(".")[0] + ".backend")
        if backend is not None:
            backend.reset()


def enabled() -> bool:
    """Whether `enable()` ran in this process."""
    return _STATE["enabled"]


def malloc_tuned() -> bool:
    """Whether `enable()` changed glibc's malloc thresholds."""
    return _STATE["malloc"]


__all__ = ["BLAS_STATUS", "ENV", "PATHS", "enable", "enabled", "forced", "malloc_tuned", "setup_blas"]
