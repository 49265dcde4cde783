"""The one place that knows the device: compute dtype and the CPU-only fast paths.

Every module that behaves differently on MLX's CPU backend than on a GPU (Metal, CUDA) asks
`policy()` for a named capability instead of testing the device itself:

    policy().compute_dtype          float32 on the CPU (bf16 matmuls are ~20x slower there),
                                    bfloat16 on a GPU
    policy().fast_math              polynomial exp / tanh / GELU / softmax (cpu/fastmath.py)
    policy().explicit_attention     cached (prefill) attention as explicit scores + softmax
                                    instead of MLX's fused scaled_dot_product_attention
    policy().host_loss              the LM-head cross-entropy in numpy (cpu/hostloss.py)
    policy().host_gemv              a one-row LM head as cblas_sgemv (cpu/hostdecode.OneRowHead)
    policy().host_decode            the whole one-row decode step on the host (cpu/hostdecode.py)
    policy().native_kernel          4/8-bit one-row products in the native kernel (cpu/native.py)
    policy().dequantize_rows(n)     whether a quantized layer called on n rows dequantizes and
                                    runs a float matmul instead of mx.quantized_matmul (MLX's
                                    CPU quantized kernel is not vectorised; on a GPU it is fast)

The CPU paths are all off (MLX's own kernels) until `mlx_gemma.cpu.enable()` (the CLI calls it);
then each is what MLX_GEMMA_CPU_PATHS forces, or off until `cpu.calibrate.prepare(model)` measured
it on this machine and model (`load()` does that) and switched on the ones that win.
The policy is decided once per process from the default device, the first time it is asked.
`configure(...)` overrides fields (tests and benchmarks use it to force a path), and
`override(...)` does so for a `with` block.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import mlx.core as mx

from . import cpu as cpu_paths
from .cpu.runtime import blas_sgemv
from .errors import UserError

# quantized matmul vs dequantize + float matmul on the CPU: measured on the 270M, the kernel
# costs ~2 ms per row, dequantizing + matmul ~30 ms flat, so they cross near 8-16 rows.
DEQUANTIZE_MIN_ROWS = 8
QUANTIZED_PATHS = ("auto", "kernel", "dequantize")


@dataclass(frozen=True)
class Backend:
    device: str  # "cpu" or "gpu"
    compute_dtype: mx.Dtype
    fast_math: bool
    host_loss: bool
    host_gemv: bool = False
    host_decode: bool = False
    explicit_attention: bool = False
    native_kernel: bool = False
    quantized_path: str = "auto"  # "auto" (by rows and device), "kernel" or "dequantize"

    def dequantize_rows(self, rows: int) -> bool:
        """True when a quantized layer called on `rows` rows should dequantize + matmul."""
        if self.quantized_path != "auto":
            return self.quantized_path == "dequantize"
        return self.device == "cpu" and rows >= DEQUANTIZE_MIN_ROWS

    def describe(self) -> str:
        dtype = str(self.compute_dtype).replace("mlx.core.", "")
        fast = ", ".join(name for name, on in (("fast math", self.fast_math), ("explicit attention", self.explicit_attention),
                                               ("host loss", self.host_loss), ("host gemv head", self.host_gemv),
                                               ("host one-row decode", self.host_decode),
                                               ("native 4/8-bit kernel", self.native_kernel)) if on)
        return f"{self.device}, compute dtype {dtype}" + (f", CPU paths: {fast}" if fast else "")


def cpu_path_fields(choices: dict) -> dict:
    """Policy fields for {cpu path: on} (mlx_gemma.cpu.PATHS names); the one-row paths need the
    OpenBLAS cblas_sgemv, so they stay off without it."""
    gemv = blas_sgemv() is not None
    fields = {"fast_math": choices.get("fast_math"), "explicit_attention": choices.get("attention"),
              "host_loss": choices.get("host_loss"), "native_kernel": choices.get("native")}
    if "row_decode" in choices:
        fields["host_decode"] = fields["host_gemv"] = choices["row_decode"] and gemv
    return {k: bool(v) for k, v in fields.items() if v is not None}


def _detect() -> Backend:
    cpu = mx.default_device().type == mx.DeviceType.cpu
    base = Backend(device="cpu" if cpu else "gpu", compute_dtype=mx.float32 if cpu else mx.bfloat16,
                   fast_math=False, host_loss=False)
    if not (cpu and cpu_paths.enabled()):
        return base
    return dataclasses.replace(base, **cpu_path_fields(cpu_paths.forced()))


_current: Optional[Backend] = None


def policy() -> Backend:
    """The process's backend policy (detected on first use)."""
    global _current
    if _current is None:
        _current = _detect()
    return _current


def reset() -> None:
    """Forget the policy: the next `policy()` detects it again (after `cpu.enable()`)."""
    global _current
    _current = None


def configure(**fields) -> Backend:
    """Replace fields of the policy for the rest of the process; returns the new policy."""
    global _current
    if "quantized_path" in fields and fields["quantized_path"] not in QUANTIZED_PATHS:
        raise UserError(f"unknown quantized_path {fields['quantized_path']!r}; use one of {', '.join(QUANTIZED_PATHS)}")
    _current = dataclasses.replace(policy(), **fields)
    return _current


@contextmanager
def override(**fields) -> Iterator[Backend]:
    """`configure(**fields)` for the duration of a with block."""
    global _current
    saved = policy()
    try:
        yield configure(**fields)
    finally:
        _current = saved


def parse_dtype(name: Optional[str]):
    """'float32' / 'fp32' / 'bfloat16' / 'bf16' / 'float16' / 'fp16' / 'auto' / None -> mx.Dtype."""
    if name is None or name == "auto":
        return policy().compute_dtype
    table = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
             "float16": mx.float16, "fp16": mx.float16}
    if name not in table:
        raise UserError(f"unknown dtype {name!r}; use one of auto, float32, bfloat16, float16")
    return table[name]
