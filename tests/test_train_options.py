"""`mlx-gemma train` option and config-file checks: every bad value ends in one `error:` line
naming the option (or the file and key), exit 1, before the model is loaded, nothing written."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from test_train import tiny_model
from test_train_data import random_chat, tiny_tokenizer, write_jsonl

MISSING_MODEL = "/nonexistent/model-dir"  # the checks must fire before anything tries to load it


def run(args):
    from mlx_gemma.cli import main

    return CliRunner().invoke(main, ["train", "--no-report", *args])


def assert_one_error(res, *needles):
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    for n in needles:
        assert n in lines[0], lines[0]
    assert MISSING_MODEL not in lines[0]  # not the model-load error: the check came first


@pytest.mark.parametrize("flag,value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--lr", "-0.001"), ("--warmup", "-5"), ("--eval-every", "-1"),
    ("--save-every", "-2"), ("--min-lr", "nan"), ("--max-grad-norm", "-inf"), ("--weight-decay", "inf"),
    ("--alpha", "nan"), ("--dropout", "1.5"), ("--seed", "-1"), ("--iters", "0"), ("--eval-batches", "0"),
    ("--quantize-group-size", "7"), ("--batch-size", "0"), ("--max-seq-len", "1"),
])
def test_out_of_range_and_non_finite_options(tmp_path, flag, value):
    out = tmp_path / "out"
    res = run(["--model", MISSING_MODEL, "--out", str(out), flag, value])
    assert_one_error(res, flag, value if value not in ("0", "-1", "-2", "7") else flag)
    assert not out.exists()


@pytest.mark.parametrize("line,needles", [
    ("iters: 3.7", ("iters", "whole number", "3.7")),
    ('lr: "fast"', ("lr", "a number", "fast")),
    ("data: 5", ("data", "a string", "5")),
    ("pack: 2", ("pack", "true or false")),
    ("targets: [q_proj, 5]", ("targets", "a string")),
    ("warmup: -5", ("--warmup", "-5")),
    ("lr: .inf", ("--lr", "finite")),
    ("lr_schedule: linear", ("--lr-schedule", "cosine, wsd, constant", "linear")),
])
def test_config_values_are_type_checked(tmp_path, line, needles):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {MISSING_MODEL}\n{line}\n")
    out = tmp_path / "out"
    res = run(["--config", str(cfg), "--out", str(out)])
    assert_one_error(res, *needles)
    if "--" not in needles[0]:
        assert str(cfg) in res.output  # a type error names the file
    assert not out.exists()


@pytest.mark.slow
def test_natural_yaml_values_are_accepted(tmp_path):
    """A YAML list of targets, `1e-4` (a string to YAML 1.1) as lr, and integral floats as ints."""
    from mlx_gemma.loading import save_model

    tok = tiny_tokenizer()
    save_model(tiny_model(), tok, tmp_path / "model")
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [random_chat(rng) for _ in range(8)])
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {tmp_path / 'model'}\ndata: {data}\ntargets: [q_proj, v_proj]\nlr: 1e-4\n"
                   "iters: 2.0\nmax_seq_len: 64\nsave_every: 0\n")
    out = tmp_path / "out"
    res = run(["--config", str(cfg), "--out", str(out)])
    assert res.exit_code == 0, res.output
    used = json.loads((out / "train_config.json").read_text())
    assert used["targets"] == "q_proj,v_proj" and used["lr"] == 1e-4 and used["iters"] == 2
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("args,needles", [
    (["--preference-stage", "dpo"], ("--preference-stage dpo", "--no-report")),  # run() passes --no-report
    (["--method", "dpo", "--data", "x.jsonl", "--preference-stage", "dpo"], ("--method dpo", "--preference-stage")),
    (["--pair-questions", "0"], ("--pair-questions", "at least 1")),
    (["--preference-iters", "0"], ("--preference-iters",)),
    (["--preference-lr", "0"], ("--preference-lr", "above 0")),
    (["--preference-stage", "orpo"], ("--preference-stage",)),
])
def test_preference_stage_options(tmp_path, args, needles):
    out = tmp_path / "out"
    res = run(["--model", MISSING_MODEL, "--out", str(out), *args])
    if "orpo" in args:  # click's own choice check: a usage error, exit 2, before anything runs
        assert res.exit_code == 2 and "--preference-stage" in res.output
    else:
        assert_one_error(res, *needles)
    assert not out.exists()


def test_the_main_job_preset_includes_the_preference_stage():
    from mlx_gemma.training.args import MAIN_JOB, TrainArgs, resolve_defaults

    assert resolve_defaults(TrainArgs()).preference_stage == "dpo"  # `mlx-gemma train`: the main job
    assert resolve_defaults(TrainArgs(iters=10)).preference_stage == "none"  # a recipe of one's own: SFT only
    assert resolve_defaults(TrainArgs(data="d")).preference_stage == "none"
    assert resolve_defaults(TrainArgs(preference_stage="dpo", data="d")).preference_stage == "dpo"
    assert resolve_defaults(TrainArgs(method="dpo")).preference_stage == "none"
    assert resolve_defaults(TrainArgs(preference_stage="none")).iters == MAIN_JOB["iters"]  # the rest stays
