"""Resume through the real CLI in subprocesses: a real SIGINT delivered while the step is being
evaluated, a Ctrl-C from outside, a kill -9 after a periodic checkpoint, with --grad-accum 2 and
--pack; the resumed run must end bit-identical to an uninterrupted one. Plus what --resume
refuses (another data set, damaged run files) and Ctrl-C before the first step."""

import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from test_train import tiny_model
from test_train_data import random_chat, tiny_tokenizer, write_jsonl

# Runs the CLI in a child process whose mx.eval sends the process a real SIGINT right after the
# step's final evaluation (the one of [model/optimizer/RNG state, loss, tokens]) of step STOP has
# run: exactly what a Ctrl-C during that C-level call does (Python raises KeyboardInterrupt as
# soon as the call returns, before the trainer counts the step as done).
DRIVER = r"""
import os, signal, sys
import mlx_gemma
import mlx.core as mx
stop, seen, real = int(os.environ["STOP_AT_STEP"]), [0], mx.eval
def eval_(*a, **k):
    out = real(*a, **k)
    if sys._getframe(1).f_code.co_name == "step" and a and isinstance(a[0], list):
        seen[0] += 1
        if seen[0] == stop:
            os.kill(os.getpid(), signal.SIGINT)
    return out
mx.eval = eval_
from mlx_gemma.cli import main
main(sys.argv[1:], prog_name="mlx-gemma")
"""
CLI = "from mlx_gemma.cli import main; import sys; main(sys.argv[1:], prog_name='mlx-gemma')"


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    from mlx_gemma.loading import save_model

    root = tmp_path_factory.mktemp("resume")
    tok = tiny_tokenizer()
    save_model(tiny_model(), tok, root / "model")
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [random_chat(rng, turns=int(rng.integers(1, 3))) for _ in range(24)])
    write_jsonl(data / "valid.jsonl", [random_chat(rng) for _ in range(6)])
    other = root / "other"
    other.mkdir()
    write_jsonl(other / "train.jsonl", [random_chat(rng) for _ in range(24)])
    return root


def options(root, out, extra=()):
    return ["train", "--model", str(root / "model"), "--data", str(root / "data"), "--out", str(out),
            "--iters", "8", "--lr", "3e-3", "--batch-size", "4", "--max-seq-len", "64", "--eval-every", "3",
            "--eval-batches", "1", "--save-every", "3", "--warmup", "1", "--no-report", *extra]


def default_sigint():
    """In the child, before exec: Ctrl-C as a user's shell gives it. A disposition of SIG_IGN is
    inherited across exec, and one test process may have run code that set it (a child that
    ignores SIGINT would finish instead of being interrupted)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def child(args, driver=CLI, env=None, wait=True):
    env = dict(os.environ, **(env or {}))
    p = subprocess.Popen([sys.executable, "-c", driver, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, preexec_fn=default_sigint)
    if not wait:
        return p
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def adapter(out):
    return dict(mx.load(str(out / "adapter_model.safetensors")))


def losses(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in recs]


def assert_same_run(a, b):
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:  # bit-identical, not merely close
        assert mx.array_equal(wa[k], wb[k]).item(), k
    assert losses(a) == losses(b)


_reference = {}


def reference(root, extra):
    """The uninterrupted run with these options (once per variant)."""
    key = tuple(extra)
    if key not in _reference:
        out = root / f"straight-{len(_reference)}"
        rc, _, err = child(options(root, out, extra))
        assert rc == 0, err
        _reference[key] = out
    return _reference[key]


VARIANTS = {"plain": [], "grad-accum-2": ["--grad-accum", "2", "--batch-size", "2"], "pack": ["--pack"]}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigint_during_the_step_eval_resumes_bit_identical(fixture_dirs, tmp_path, variant):
    extra = VARIANTS[variant]
    out = tmp_path / "run"
    rc, stdout, err = child(options(fixture_dirs, out, extra), DRIVER, {"STOP_AT_STEP": "5"})
    assert rc == 130, err
    # step 5 was computed but interrupted before it counted: the checkpoint is step 4's state
    assert "checkpoint" in stdout and "step-000004" in stdout, stdout
    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4
    # the hint printed on Ctrl-C works as printed: no option retyped
    rc, _, err = child(["train", "--out", str(out), "--resume"])
    assert rc == 0, err
    assert_same_run(reference(fixture_dirs, extra), out)


@pytest.mark.slow
def test_ctrl_c_from_outside_and_kill_after_a_periodic_checkpoint(fixture_dirs, tmp_path):
    ref = reference(fixture_dirs, [])
    # a Ctrl-C at whatever point of the loop it lands
    out = tmp_path / "sigint"
    p = child(options(fixture_dirs, out), wait=False)
    _wait_for(lambda: _last_step(out) >= 2, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    rc, _, err = child(["train", "--out", str(out), "--resume"])
    assert rc == 0, err
    assert_same_run(ref, out)
    # kill -9 once the step-3 checkpoint is written and training went on past it
    out = tmp_path / "killed"
    p = child(options(fixture_dirs, out), wait=False)
    _wait_for(lambda: (out / "checkpoints" / "step-000003").is_dir() and _last_step(out) >= 4, p)
    p.kill()
    p.communicate(timeout=60)
    rc, _, err = child(["train", "--out", str(out), "--resume"])
    assert rc == 0, err
    assert_same_run(ref, out)


def _last_step(out):
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return max([json.loads(x)["step"] for x in lines if x.strip().endswith("}")] or [-1])
    except (OSError, ValueError):
        return -1


def _wait_for(cond, p, timeout=120):
    t0 = time.time()
    while not cond():
        assert p.poll() is None, p.communicate()[1]
        assert time.time() - t0 < timeout
        time.sleep(0.02)


@pytest.mark.slow
def test_ctrl_c_before_the_first_step_claims_no_checkpoint(fixture_dirs, tmp_path):
    out = tmp_path / "early"
    rc, stdout, err = child(options(fixture_dirs, out), DRIVER, {"STOP_AT_STEP": "1"})
    assert rc == 130, err
    assert "nothing was saved" in stdout and "--resume" not in stdout, stdout
    assert not out.exists()  # the dir it created is gone: a plain rerun starts cleanly
    rc, _, err = child(options(fixture_dirs, out))
    assert rc == 0, err


def _run_cli(args):
    from mlx_gemma.cli import main

    return CliRunner().invoke(main, args)


def _one_error_line(res, *needles):
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()  # (data summaries may come first)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.fixture(scope="module")
def finished_run(fixture_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    res = _run_cli(options(fixture_dirs, out, ["--iters", "4"]))
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_resume_with_other_data_is_refused(fixture_dirs, finished_run):
    before = adapter(finished_run)
    res = _run_cli(["train", "--out", str(finished_run), "--resume", "--data", str(fixture_dirs / "other")])
    _one_error_line(res, "training data differs", "--force")
    after = adapter(finished_run)
    assert all(mx.array_equal(before[k], after[k]).item() for k in before)


@pytest.mark.parametrize("name", ["optimizer.safetensors", "trainer_state.json", "train_config.json",
                                  "metrics.jsonl"])
@pytest.mark.slow
def test_damaged_run_files_give_one_error_line(finished_run, tmp_path, name):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    path = (ckpt / name) if name in ("optimizer.safetensors", "trainer_state.json") else out / name
    if name == "metrics.jsonl":  # a line in the middle damaged (a cut last line is tolerated)
        lines = path.read_text().splitlines()
        lines[1] = lines[1][:10]
        path.write_text("\n".join(lines) + "\n")
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    res = _run_cli(["train", "--out", str(out), "--resume"])
    _one_error_line(res, name)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
