"""mlx-gemma: Gemma 1 / 2 / 3-text on MLX — generation, LoRA/QLoRA training, quantization, conversion."""

# First, before anything imports mlx.core: on Linux, put OpenBLAS under MLX's CPU matmuls.
from .runtime import setup_blas as _setup_blas

_setup_blas()

__version__ = "0.1.0"
