"""The one place that knows the device: compute dtype and the CPU-only fast paths.

Every module that behaves differently on MLX's CPU backend than on a GPU (Metal, CUDA) asks
`policy()` for a named capability instead of testing the device itself:

    policy().compute_dtype          float32 on the CPU (bf16 matmuls are ~20x slower there),
                                    bfloat16 on a GPU
    policy().fast_math              polynomial exp / tanh / GELU (mlx_gemma.fastmath): MLX's CPU
                                    kernels evaluate transcendentals one scalar at a time
    policy().host_loss              the LM-head cross-entropy in numpy (train/loss.py): numpy's
                                    SIMD exp is ~10x MLX's CPU exp over a 262k vocabulary
    policy().host_gemv              a one-row LM-head product (decoding one sequence) as a
                                    cblas_sgemv in the OpenBLAS MLX itself uses (runtime.sgemv): MLX
                                    sends it to sgemm, which packs the whole (V, E) weight per call
                                    (measured: 35 vs 17 ms per token for the 270M's 671 MB head)
    policy().host_decode            a whole one-row decode step of a float32 model on the host
                                    (hostdecode.HostDecoder): every layer product a cblas_sgemv
                                    (sgemm runs one row at half the read bandwidth: 27.7 vs 13.7 ms
                                    for the 270M's 18 layers), the vector work in numpy
    policy().dequantize_rows(n)     whether a quantized layer called on n rows dequantizes and
                                    runs a float matmul instead of mx.quantized_matmul (MLX's
                                    CPU quantized kernel is not vectorised; on a GPU it is fast)

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
    quantized_path: str = "auto"  # "auto" (by rows and device), "kernel" or "dequantize"

    def dequantize_rows(self, rows: int) -> bool:
        """True when a quantized layer called on `rows` rows should dequantize + matmul."""
        if self.quantized_path != "auto":
            return self.quantized_path == "dequantize"
        return self.device == "cpu" and rows >= DEQUANTIZE_MIN_ROWS

    def describe(self) -> str:
        dtype = str(self.compute_dtype).replace("mlx.core.", "")
        fast = ", ".join(name for name, on in (("fast math", self.fast_math), ("host loss", self.host_loss),
                                               ("host gemv head", self.host_gemv),
                                               ("host one-row decode", self.host_decode)) if on)
        return f"{self.device}, compute dtype {dtype}" + (f", CPU paths: {fast}" if fast else "")


def _detect() -> Backend:
    from .runtime import blas_sgemv

    cpu = mx.default_device().type == mx.DeviceType.cpu
    gemv = cpu and blas_sgemv() is not None
    return Backend(device="cpu" if cpu else "gpu", compute_dtype=mx.float32 if cpu else mx.bfloat16,
                   fast_math=cpu, host_loss=cpu, host_gemv=gemv, host_decode=gemv)


_current: Optional[Backend] = None


def policy() -> Backend:
    """The process's backend policy (detected on first use)."""
    global _current
    if _current is None:
        _current = _detect()
    return _current


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
