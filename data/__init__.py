"""Sample datasets and texts shipped with mlx-gemma (installed as `mlx_gemma.data`)."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
