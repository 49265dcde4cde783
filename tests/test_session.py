"""The test session's isolation: its own MLX_GEMMA_HOME, seen by the library and by subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

from mlx_gemma.loading import home_dir, resolve


def test_the_session_never_uses_the_users_cache(session_home):
    user_cache = Path.home() / ".cache" / "mlx-gemma"
    assert home_dir() == session_home and session_home != user_cache
    assert resolve("gemma-3-270m") == session_home / "models" / "gemma-3-270m"
    # A subprocess (the CLI, `mlx-gemma serve`) inherits it.
    out = subprocess.run([sys.executable, "-c", "from mlx_gemma.loading import home_dir; print(home_dir())"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(session_home) == os.environ["MLX_GEMMA_HOME"]
