"""Data-parallel training on 2 local ranks (mx.distributed ring backend on loopback, started by
`mlx-gemma train --ranks 2`, which calls mlx.launch) against one process with the same
effective batch: the adapters agree to float32 tolerance although the two ranks hold very
different numbers of loss tokens, and a killed 2-rank run resumes to the uninterrupted weights."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from test_train import tiny_model
from test_train_data import random_chat, tiny_tokenizer, write_jsonl
from tiny import TINY

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="mlx.launch ring backend")


def long_chat(rng):
    messages = []
    for _ in range(5):
        messages.append({"role": "user", "content": " ".join(rng.choice(["the", "cat", "sat"], 10))})
        messages.append({"role": "assistant", "content": " ".join(rng.choice(["on", "mat", "dog", "ran"], 12))})
    return {"messages": messages}


def short_chat(rng):
    return {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": str(rng.choice(["on", "dog"]))}]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from mlx_gemma.loading import save_model

    root = tmp_path_factory.mktemp("dp")
    tok = tiny_tokenizer()
    save_model(tiny_model(), tok, root / "model")
    rng = np.random.default_rng(1)
    data = root / "data"
    data.mkdir()
    # 4 long records and 12 short ones: the first micro-batch of 8 (length-grouped) is the 4 long
    # + 4 short, so rank 0 gets the long rows and rank 1 the short ones
    records = [long_chat(rng) for _ in range(4)] + [short_chat(rng) for _ in range(12)]
    write_jsonl(data / "train.jsonl", records)
    write_jsonl(data / "valid.jsonl", [random_chat(rng) for _ in range(12)])
    return root


def options(root, out, *extra):
    return ["train", "--model", str(root / "model"), "--data", str(root / "data"), "--out", str(out),
            "--batch-size", "8", "--grad-accum", "2", "--max-seq-len", "160", "--lr", "3e-3", "--warmup", "1",
            "--dropout", "0", "--eval-every", "2", "--save-every", "2", "--no-report", *extra]


def cli(args, wait=True):
    p = subprocess.Popen([sys.executable, "-m", "mlx_gemma.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=400)
    assert p.returncode == 0, err[-3000:]
    return out, err


def adapter(out):
    return dict(mx.load(str(out / "adapter_model.safetensors")))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_ranks_hold_very_different_token_counts(root):
    """The case where averaging per-rank means is wrong: check the data really makes it."""
    from mlx_gemma.training import data as D
    from mlx_gemma.training.distributed import share

    ds = D.load_dataset(root / "data" / "train.jsonl", tiny_tokenizer(), max_seq_len=160)
    first = D.plan_batches(ds, 8, 0, 0, 160)
    counts = [[sum(int(ds.examples[i][1].sum()) for row in share(rows, r, 2) for i in row) for r in (0, 1)]
              for rows in first]
    assert max(max(c) / max(min(c), 1) for c in counts) > 3, counts


@pytest.mark.parametrize("extra", [[], ["--quantize-bits", "4", "--quantize-group-size", "32", "--pack"]],
                         ids=["lora", "qlora-pack"])
@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_same_effective_batch(root, tmp_path, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    cli(options(root, one, "--iters", "3", *extra))
    _, err = cli(options(root, two, "--iters", "3", "--ranks", "2", *extra))
    assert "2 ranks" in err
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    for k in a:  # Adam's first steps are ~lr * sign(g) (lr 3e-3): a wrong token weighting moves them by ~1e-3
        assert mx.allclose(a[k], b[k], rtol=1e-4, atol=2e-5).item(), (k, mx.abs(a[k] - b[k]).max().item())
    ma, mb = metrics(one), metrics(two)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):  # losses, token counts (reduced over the ranks) and validation
        for key in ("loss", "val_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), (key, x, y)
        for key in ("loss_tokens", "tokens", "val_tokens"):
            if key in x:
                assert x[key] == y[key], (key, x, y)
    assert json.loads((two / "train_config.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_weights(root, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cli(options(root, straight, "--iters", "6", "--ranks", "2"))
    p = cli(options(root, killed, "--iters", "6", "--ranks", "2"), wait=False)
    t0 = time.time()
    while not ((killed / "checkpoints" / "step-000002").is_dir() and _last_step(killed) >= 3):
        assert p.poll() is None and time.time() - t0 < 300, p.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # the wrapper, the launcher and both ranks
    p.communicate(timeout=60)
    one = tmp_path / "on-one-process"
    shutil.copytree(killed, one)
    cli(["train", "--out", str(killed), "--resume", "--ranks", "2"])
    a, b = adapter(straight), adapter(killed)
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k
    assert [m.get("loss") for m in metrics(straight)] == [m.get("loss") for m in metrics(killed)]
    # Ctrl-C to `--ranks` (the terminal signals only its own process group): passed on to every
    # rank, which stop after the same step; rank 0 checkpoints it
    stopped = tmp_path / "ctrl-c"
    p = cli(options(root, stopped, "--iters", "6", "--ranks", "2", "--save-every", "100"), wait=False)
    t0 = time.time()
    while _last_step(stopped) < 2:
        assert p.poll() is None and time.time() - t0 < 300, p.communicate()[1][-3000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "--resume --ranks 2" in err.strip().splitlines()[-1], err[-2000:]
    cli(["train", "--out", str(stopped), "--resume", "--ranks", "2"])
    d = adapter(stopped)
    for k in a:
        assert mx.array_equal(a[k], d[k]).item(), k
    # the batch plan does not depend on the number of ranks: one process may finish the run
    cli(["train", "--out", str(one), "--resume"])
    c = adapter(one)
    for k in a:
        assert mx.allclose(a[k], c[k], rtol=1e-4, atol=2e-5).item(), k


def _last_step(out):
    try:
        return max([json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
                    if x.endswith("}")] or [-1])
    except (OSError, ValueError):
        return -1


@pytest.mark.slow
def test_a_rank_that_fails_ends_every_rank_with_one_message(root, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    p = subprocess.run([sys.executable, "-m", "mlx_gemma.cli", "train", "--model", str(root / "model"), "--data",
                        str(bad), "--out", str(tmp_path / "out"), "--iters", "2", "--ranks", "2", "--no-report"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "bad.jsonl:2" in errors[0], p.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_rank_killed_mid_run_stops_every_rank_and_keeps_a_resumable_checkpoint(root, tmp_path):
    out = tmp_path / "lost"
    p = cli(options(root, out, "--iters", "500", "--ranks", "2", "--save-every", "1000"), wait=False)
    t0 = time.time()
    while _last_step(out) < 3:
        assert p.poll() is None and time.time() - t0 < 300, p.communicate()[1][-3000:]
        time.sleep(0.05)
    os.kill(_rank_pid(1, out), signal.SIGKILL)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 was killed by signal 9") and "--resume --ranks 2" in last, err[-2000:]
    # rank 0 rolled back any half-done step and saved the last finished one
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert step >= 3 and step == max(m["step"] for m in metrics(out) if "loss" in m), (step, err[-2000:])


def _rank_pid(rank, out):
    for pid in os.listdir("/proc"):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except (OSError, ValueError):
            continue
        if f"MLX_RANK={rank}".encode() in env and str(out).encode() in cmd and b"mlx_gemma.cli" in cmd:
            return int(pid)
    raise AssertionError(f"no rank {rank} process")


@pytest.fixture(scope="module")
def report_data(root):
    """The training data of `root` plus a test split of 11 questions: 2 test-loss batches (one per
    rank) and a 6 / 5 share of the questions."""
    from mlx_gemma.config import GemmaConfig
    from mlx_gemma.loading import save_model
    from mlx_gemma.model import Gemma

    data = root / "report-data"
    shutil.copytree(root / "data", data)
    rng = np.random.default_rng(2)
    write_jsonl(data / "test.jsonl", [random_chat(rng) if i % 2 else short_chat(rng) for i in range(11)])
    tok = tiny_tokenizer()
    mx.random.seed(3)  # generation needs every id the model can pick to be in the tokenizer's vocabulary
    model = Gemma(GemmaConfig.from_dict(dict(TINY["gemma"], model_type="gemma", vocab_size=tok.vocab_size)))
    # larger weights than the init's (which answer "\n" to everything) and a longer <end_of_turn>
    # row of the tied embedding / head: answers that differ, some stopping and some cut at the limit
    model.update(tree_map(lambda p: 4 * p, model.parameters()))
    embed = model.model.embed_tokens
    embed.weight = embed.weight.at[tok.end_of_turn_id].multiply(2.0)
    save_model(model, tok, root / "report-model")
    return data


@pytest.mark.slow
def test_the_report_on_two_ranks_has_the_numbers_of_one_process(root, report_data, tmp_path):
    """`train --ranks 2` with its report: the ranks share the test loss batches and the questions;
    rank 0's report.json holds what one process computes on the same base model and adapter."""
    from mlx_gemma.loading import load
    from mlx_gemma.training import data as D
    from mlx_gemma.training import report as R

    out = tmp_path / "two"
    _, err = cli(["train", "--model", str(root / "report-model"), "--data", str(report_data), "--out", str(out),
                  "--iters", "2", "--batch-size", "8", "--max-seq-len", "160", "--lr", "3e-3", "--dropout", "0",
                  "--save-every", "2", "--report-max-tokens", "12", "--ranks", "2"])
    assert "2 ranks" in err and err.count("evaluating the base model") == 1, err[-3000:]  # rank 0 speaks
    written = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file()
    records = [json.loads(line) for line in (report_data / "test.jsonl").read_text().splitlines()]
    for when, adapter_dir in (("before", None), ("after", out)):
        model, tok = load(str(root / "report-model"), adapter=None if adapter_dir is None else str(adapter_dir))
        test_set = D.load_splits(report_data, tok, 160)["test"]
        one = R.evaluate_model(model, tok, test_set, records, 12, R.LOSS_BATCH, 160)
        two = written[when]
        assert two["answers"] == one["answers"], when  # per question: text, token count, finish reason
        if when == "before":  # the answers differ, so a wrong order of the questions would show
            assert len({a["answer"] for a in one["answers"]}) > 5, one["answers"]
            assert {a["finish_reason"] for a in one["answers"]} == {"end_of_turn", "length"}, one["answers"]
        for key in ("n", "loss", "perplexity", "loss_tokens", "end_of_turn_share", "cjk_share",
                    "repeated_4gram_share", "mean_tokens"):
            assert two[key] == one[key], (when, key, two[key], one[key])


def test_info_under_mlx_launch_shows_rank_and_world_size():
    launcher = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; main()"]
    p = subprocess.run([*launcher, "-n", "2", "--backend", "ring", "-p", str(_port()), "--", sys.executable, "-m",
                        "mlx_gemma.cli", "info"], capture_output=True, text=True, timeout=120)
    lines = sorted(line.split(None, 1)[1] for line in p.stdout.splitlines() if line.startswith("distributed"))
    assert lines == ["rank 0 of 2", "rank 1 of 2"], p.stdout + p.stderr
    alone = subprocess.run([sys.executable, "-m", "mlx_gemma.cli", "info"], capture_output=True, text=True)
    assert "distributed   single process" in alone.stdout


def _port():
    from mlx_gemma.training.distributed import free_port_pair

    return free_port_pair()


@pytest.mark.slow
def test_the_preference_stage_on_two_ranks_makes_the_pairs_of_one_process(root, report_data, tmp_path):
    """`train --ranks 2 --preference-stage dpo`: the ranks share the stage's answers; the pairs
    rank 0 writes are those one process builds with the SFT adapter, and DPO trains on them."""
    from mlx_gemma.loading import load
    from mlx_gemma.training import data as D
    from mlx_gemma.training.pairs import build_pairs

    out = tmp_path / "two"
    _, err = cli(["train", "--model", str(root / "report-model"), "--data", str(report_data), "--out", str(out),
                  "--iters", "2", "--batch-size", "8", "--max-seq-len", "160", "--lr", "3e-3", "--dropout", "0",
                  "--save-every", "2", "--report-max-tokens", "12", "--ranks", "2", "--preference-stage", "dpo",
                  "--pair-questions", "9", "--preference-iters", "2", "--preference-lr", "1e-3"])
    # the first 4 training records (long_chat) are longer than --max-seq-len: not asked
    assert err.count("preference stage: answering 5 training questions with the SFT adapter (4 skipped") == 1, \
        err[-3000:]  # rank 0 speaks
    written = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    model, tok = load(str(root / "report-model"), adapter=str(out / "sft"))
    records = [r for _, r in D.read_records(report_data / "train.jsonl")][4:9]
    pairs, counts = build_pairs(model, tok, records, 12)
    assert written == pairs and len(pairs) >= 2, counts
    assert json.loads((out / "report.json").read_text())["sft"]["n"] == 11
    assert (out / "adapter_model.safetensors").read_bytes() != (out / "sft" / "adapter_model.safetensors").read_bytes()
