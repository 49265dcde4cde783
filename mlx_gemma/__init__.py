"""mlx-gemma: Gemma 1 / 2 / 3 / 3n / 4 (text) on MLX — generation, LoRA/QLoRA training, quantization, conversion.

Public API (imported lazily, so `import mlx_gemma` stays cheap and sets up the BLAS first):
    load, save_model, generate, stream_generate, batch_generate, SamplingParams, ChatSession,
    GemmaConfig, Gemma, GemmaTokenizer,
    quantize_model, apply_lora, fuse_lora, load_adapter, train, TrainArgs
"""

# The one thing importing does, and it must come before anything imports mlx.core: on Linux, put
# OpenBLAS under MLX's CPU matmuls (~30x MLX's reference BLAS; MLX_GEMMA_NO_OPENBLAS=1 opts out).
# Malloc tuning, native builds and the CPU paths' calibration wait for `mlx_gemma.cpu.enable()`,
# which the CLI calls (see mlx_gemma/cpu/__init__.py).
from .cpu.runtime import setup_blas as _setup_blas

_setup_blas()

__version__ = "0.1.0"

_EXPORTS = {
    "load": "loading", "save_model": "loading", "convert_gguf": "loading",
    "GemmaConfig": "config", "Gemma": "model", "GemmaTokenizer": "tokenizer",
    "generate": "generation", "stream_generate": "generation", "batch_generate": "generation",
    "quantize_model": "quant", "perplexity": "evaluate",
    "apply_lora": "lora", "fuse_lora": "lora", "load_adapter": "lora", "save_adapter": "lora",
    "train": "training.trainer", "TrainArgs": "training.trainer",
    "UserError": "errors", "SamplingParams": "sampling", "ChatSession": "generation",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'mlx_gemma' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
