"""The suite's own guards (tests/conftest.py), checked by running pytest in a subprocess:
with CI=true a required package that does not import fails the run and is named, and so does a
skip whose reason is not in tests/ci_allowed_skips.yaml; a test that loads the 270M or runs training
without the `slow` marker fails."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def run_pytest(args, tmp_path, ci=True, hide=None, extra_test=None):
    """pytest in a subprocess; `hide`: a module made unimportable (as if uninstalled) by a shim first on PYTHONPATH."""
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    env["CI"] = "true" if ci else ""
    if hide:
        shim = tmp_path / "shim"
        shim.mkdir()
        (shim / f"{hide}.py").write_text(f"raise ModuleNotFoundError('{hide} is not installed (test shim)')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(shim), env.get("PYTHONPATH", "")])
    paths = list(args)
    probe = None
    if extra_test:  # a throw-away test file beside the others, so tests/conftest.py applies to it
        probe = ROOT / "tests" / f"test_zz_guard_probe_{os.getpid()}.py"
        probe.write_text(textwrap.dedent(extra_test))
        paths.append(str(probe))
    try:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
    finally:
        if probe is not None:
            probe.unlink()


def test_ci_run_fails_and_names_a_required_package_that_does_not_import(tmp_path):
    proc = run_pytest(["tests/test_constrain.py", "--co"], tmp_path, hide="jsonschema")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "jsonschema is not installed (test shim)" in out


def test_ci_run_fails_on_a_skip_outside_the_allow_list_and_names_it(tmp_path):
    probe = """
        import pytest

        def test_allowed_elsewhere():
            pass

        def test_hidden_by_a_skip():
            pytest.skip("the frobnicator is not installed")
    """
    proc = run_pytest([], tmp_path, extra_test=probe)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "CI=true: 1 test(s) skipped for a reason not in tests/ci_allowed_skips.yaml" in out
    assert "test_hidden_by_a_skip: the frobnicator is not installed" in out
    # without CI the same skip is only reported
    proc = run_pytest([], tmp_path, ci=False, extra_test=probe)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_run_fails_when_llama_cpp_is_missing(tmp_path):
    """The llama.cpp tests skip (importorskip) without llama-cpp-python; in CI that fails the run."""
    proc = run_pytest(["tests/test_llamacpp.py", "--co"], tmp_path, hide="llama_cpp")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "tests/test_llamacpp.py: llama-cpp-python is not installed" in out


def test_a_test_that_builds_a_270m_size_model_must_be_marked_slow(tmp_path):
    probe = """
        import pytest

        from mlx_gemma.config import GemmaConfig
        from mlx_gemma.model import Gemma

        CFG = dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=64,
                   num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=16)

        def test_unmarked():
            Gemma(GemmaConfig.from_dict(CFG))

        @pytest.mark.slow
        def test_marked():
            Gemma(GemmaConfig.from_dict(CFG))
    """
    proc = run_pytest([], tmp_path, ci=False, extra_test=probe)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "1 failed, 1 passed" in out, out
    assert "test_unmarked is not marked slow but builds a 640-wide, 262144-word model" in out


def test_a_test_that_runs_training_must_be_marked_slow(tmp_path):
    """The training probe: `mlx-gemma train` in a subprocess (here only its --help, which is enough
    to be seen) in a test without the marker fails the test; with the marker it passes."""
    probe = """
        import subprocess
        import sys

        import pytest

        ARGV = [sys.executable, "-m", "mlx_gemma.cli", "train", "--help"]

        def test_unmarked():
            subprocess.run(ARGV, check=True, capture_output=True)

        @pytest.mark.slow
        def test_marked():
            subprocess.run(ARGV, check=True, capture_output=True)
    """
    proc = run_pytest([], tmp_path, ci=False, extra_test=probe)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "1 failed, 1 passed" in out, out
    assert "test_unmarked is not marked slow but starts a training run in a subprocess" in out


def test_every_allowed_skip_names_tests_that_exist(tmp_path):
    """An allow-list entry whose `test` matches no collected node id is dead: the skip it was written
    for then fails CI under another id (a re-parametrized test), or the entry outlives its test."""
    import yaml

    entries = yaml.safe_load((ROOT / "tests" / "ci_allowed_skips.yaml").read_text())
    files = sorted({e["test"].split("::")[0] for e in entries})
    proc = run_pytest([*files, "--co"], tmp_path, ci=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    for e in entries:
        assert any(i.startswith(e["test"]) for i in ids), f"ci_allowed_skips.yaml: no test id starts with {e['test']}"
