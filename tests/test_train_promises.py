"""Trainer options the README promises, checked through the `train` command's outputs (metrics.jsonl,
the adapter), not the trainer's internals: warmup + cosine decay, --grad-checkpoint, --epochs,
--weight-decay. A tiny Gemma 3 with the real tokenizer, a few steps each."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_gemma.cli import main

from test_promises import tiny_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow  # several short training runs each


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    chat = [{"messages": [{"role": "user", "content": f"question number {i}?"},
                          {"role": "assistant", "content": f"the answer is {i * 7}."}]} for i in range(12)]
    for split in ("train", "valid"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat), encoding="utf-8")
    return root


def train(model_dir, data_dir, out, *options):
    args = ["train", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out), "--batch-size", "2",
            "--rank", "2", "--max-seq-len", "32", "--eval-every", "0", "--save-every", "0", "--no-test",
            "--no-report", "--dropout", "0", *options]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line) and "step" in json.loads(line) and "val_loss" not in json.loads(line)]


def test_warmup_then_cosine_decay(tiny_dir, data_dir, tmp_path):  # noqa: F811
    """lr 1e-3, warmup 4 of 20 steps, min_lr 1e-4: the lr climbs to its peak during the warmup, then
    falls monotonically along a cosine to min_lr (halfway down at the middle of the decay)."""
    rows = train(tiny_dir, data_dir, tmp_path / "run", "--iters", "20", "--lr", "1e-3", "--min-lr", "1e-4",
                 "--warmup", "4")
    lr = np.array([r["lr"] for r in rows])
    assert len(lr) == 20 and lr.max() == pytest.approx(1e-3, rel=1e-5)
    peak = int(np.argmax(lr))
    assert 2 <= peak <= 5, lr  # the peak sits at the end of the warmup (off-by-one conventions aside)
    assert np.all(np.diff(lr[:peak + 1]) > 0) and np.all(np.diff(lr[peak:]) <= 1e-12)
    assert lr[0] <= 0.5e-3  # a real ramp, not a constant
    assert lr[-1] == pytest.approx(1e-4, abs=3e-5)
    # cosine, not linear: the decay is flat at both ends and steepest in the middle
    steps = np.diff(lr[peak:])
    assert abs(steps[len(steps) // 2]) > abs(steps[0]) and abs(steps[len(steps) // 2]) > abs(steps[-1])


def test_wsd_schedule_holds_the_peak_then_decays_linearly(tiny_dir, data_dir, tmp_path):  # noqa: F811
    """--lr-schedule wsd, 20 steps, warmup 4: the ramp, then lr exactly at its peak until the last
    20% of the steps (4), which fall in equal steps towards min_lr (transformers' get_wsd_schedule:
    min_lr is where the line reaches one step after the last; tests/test_optimizer_torch.py)."""
    rows = train(tiny_dir, data_dir, tmp_path / "run", "--iters", "20", "--lr", "1e-3", "--min-lr", "1e-4",
                 "--warmup", "4", "--lr-schedule", "wsd")
    lr = np.array([r["lr"] for r in rows])
    assert len(lr) == 20
    # step k records the rate its update used: schedule(k - 1)
    held = lr[(lr > 0.999e-3)]
    assert len(held) >= 11 and np.allclose(held, 1e-3, rtol=1e-6)
    tail = lr[-4:]
    assert np.all(np.diff(lr[:4]) > 0) and lr[0] < 0.5e-3
    assert np.all(np.diff(tail) < 0) and np.allclose(np.diff(tail), np.diff(tail)[0], rtol=1e-4)
    assert lr[-1] == pytest.approx(1e-4 + 0.9e-3 / 4, rel=1e-5) and lr[-4] == pytest.approx(1e-3, rel=1e-6)


def test_grad_checkpoint_gives_the_same_run(tiny_dir, data_dir, tmp_path):  # noqa: F811
    plain = train(tiny_dir, data_dir, tmp_path / "a", "--iters", "4")
    ckpt = train(tiny_dir, data_dir, tmp_path / "b", "--iters", "4", "--grad-checkpoint")
    np.testing.assert_allclose([r["loss"] for r in ckpt], [r["loss"] for r in plain], rtol=1e-5)


def test_epochs_sets_the_number_of_steps(tiny_dir, data_dir, tmp_path):  # noqa: F811
    """12 records, batch 2: one epoch is 6 steps, --epochs 2 is 12."""
    rows = train(tiny_dir, data_dir, tmp_path / "e", "--epochs", "2")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {r["epoch"] for r in rows} >= {1, 2} or {r["epoch"] for r in rows} >= {0, 1}


def test_weight_decay_shrinks_the_adapter(tiny_dir, data_dir, tmp_path):  # noqa: F811
    from safetensors.numpy import load_file

    train(tiny_dir, data_dir, tmp_path / "wd0", "--iters", "6", "--lr", "1e-2")
    train(tiny_dir, data_dir, tmp_path / "wd1", "--iters", "6", "--lr", "1e-2", "--weight-decay", "5.0")
    a = load_file(str(tmp_path / "wd0" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "wd1" / "adapter_model.safetensors"))
    lora_a = [k for k in a if "lora_A" in k]
    assert lora_a
    norm = lambda w: sum(float(np.sum(w[k].astype(np.float64) ** 2)) for k in lora_a)  # noqa: E731
    # AdamW decoupled decay multiplies weights by (1 - lr * wd) each step: 0.95^6 ~ 0.74 of the norm.
    assert norm(b) < 0.9 * norm(a)
