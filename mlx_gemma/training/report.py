"""The main job's before/after report: did fine-tuning teach the base model to answer and stop?

Pure metrics (unit-tested against hand-computed values):
    cjk_share(text)                       share of non-space characters that are CJK
    repeated_ngram_share(seq, n=4)        share of n-grams that repeat an earlier one (looping)
    ends_with_end_of_turn(ids, tokenizer) did the answer stop with <end_of_turn>?

Model-facing pieces:
    evaluate_generation(model, tokenizer, records, max_tokens)   greedy answers + the metrics above
    evaluate_model(model, tokenizer, test_set, records, ...)      test loss/perplexity + generation
    write_report(out_dir, before, after, samples, run_info)       report.md + report.json

The test split is only evaluated, never trained or tuned on; the sample questions are the first
`SAMPLES` test records (a fixed rule, not a choice).
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx

from ..errors import UserError
from ..files import write_atomic, write_json_atomic
from . import distributed as dist

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
LOSS_CURVE = "loss.png"  # drawn by the trainer (train/plot.py) next to the adapter
DEFAULT_MAX_TOKENS = 128
LOSS_BATCH = 8  # rows per test-loss batch: fewer passes over the 262k-word LM head than the training batch
SAMPLES = 3
NGRAM = 4

# Targets of the main job: >= 80% of answers stop, no more than 25% of their 4-grams repeat, they
# are in Chinese, the test loss falls by 30%, and the whole job fits in 15 minutes.
# {name: (bound, "min" when the value must reach it / "max" when it must stay under it)}
TARGETS = {"end_of_turn_share": (0.80, "min"), "repeated_4gram_share": (0.25, "max"), "cjk_share": (0.80, "min"),
           "loss_drop": (0.30, "min"), "total_minutes": (15.0, "max")}

# CJK ideographs and the punctuation / full-width forms Chinese text is written with.
# (code point ranges, inclusive)
CJK_RANGES = (
    (0x3000, 0x303F),  # CJK symbols and punctuation: 、。《》「」
    (0x3400, 0x4DBF),  # CJK unified ideographs extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF00, 0xFFEF),  # half-/full-width forms: ，！？（）：；
    (0x20000, 0x2FA1F),  # extensions B-F and compatibility supplement
)


# ---- pure metrics -------------------------------------------------------------------------------


def is_cjk(ch: str) -> bool:
    """True for a CJK ideograph or CJK punctuation / full-width form (see CJK_RANGES)."""
    cp = ord(ch)
    return any(a <= cp <= b for a, b in CJK_RANGES)


def cjk_counts(text: str) -> tuple[int, int]:
    """(CJK characters, non-whitespace characters) of `text`."""
    chars = [c for c in text if not c.isspace()]
    return sum(is_cjk(c) for c in chars), len(chars)


def cjk_share(text: str) -> float:
    """Share of the non-whitespace characters of `text` that are CJK (0.0 for an empty text).

    "你好, world" -> 2 CJK of 8 non-space characters = 0.25 (the ASCII comma is not CJK).
    """
    cjk, total = cjk_counts(text)
    return cjk / total if total else 0.0


def ngram_counts(seq: Sequence, n: int = NGRAM) -> tuple[int, int]:
    """(repeated n-grams, all n-grams) of `seq`: an n-gram is repeated when the same n items
    already occurred at an earlier position."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def repeated_ngram_share(seq: Sequence, n: int = NGRAM) -> float:
    """Share of the n-grams of `seq` (token ids or characters) that repeat an earlier n-gram.

    A text that loops has a share near 1; ordinary prose near 0. Fewer than n items -> 0.0.
    "abcabc" with n=2: ab bc ca ab bc -> 2 repeats of 5 = 0.4.
    """
    repeats, total = ngram_counts(seq, n)
    return repeats / total if total else 0.0


def finish_reason(ids: Sequence[int], tokenizer) -> str:
    """How a generated answer ended: "end_of_turn", "eos" (the first stop id seen) or "length"."""
    stops = set(tokenizer.stop_ids)
    for t in ids:
        if t in stops:
            return "end_of_turn" if t == tokenizer.end_of_turn_id else "eos"
    return "length"


def ends_with_end_of_turn(ids: Sequence[int], tokenizer) -> bool:
    """True when the generated ids stop with `<end_of_turn>`: it is the first stop token in them
    (generation ends at the first stop token; no stop token means the token limit was hit)."""
    return finish_reason(ids, tokenizer) == "end_of_turn"


# ---- generation ---------------------------------------------------------------------------------


def prompt_messages(record: dict) -> list:
    """A chat record's messages up to (not including) its last assistant answer."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not messages or messages[-1].get("role") != "assistant":
        raise UserError("the generation metrics need chat records ({'messages': [..., {'role': 'assistant', "
                        "...}]}) in the test split")
    return messages[:-1]


def reference_answer(record: dict) -> str:
    return record["messages"][-1]["content"]


def question(record: dict) -> str:
    """The last user message of a chat record."""
    return next(m["content"] for m in reversed(record["messages"]) if m.get("role") == "user")


def evaluate_generation(model, tokenizer, records: Sequence[dict], max_tokens: int = DEFAULT_MAX_TOKENS,
                        batch_size: int = 64, progress: bool = False) -> dict:
    """Greedy answers to the prompts of chat `records` (system + user, chat template with the
    generation header), and how they look.

    Returns {"n", "max_tokens", "end_of_turn_share", "cjk_share", "repeated_4gram_share",
    "mean_tokens", "answers": [{"question", "answer", "tokens", "finish_reason"}]}.
    cjk_share pools the characters of every answer; repeated_4gram_share pools the 4-grams of
    every answer's token ids (stop token excluded).

    In a data-parallel run each rank answers its contiguous share of the records and every rank
    gets all the answers back (greedy rows do not depend on their batch neighbours, so the
    numbers are one process's). progress: a tqdm bar of generated tokens on stderr.
    """
    messages = [prompt_messages(r) for r in records]  # every rank checks every record: they fail alike
    mine = answer_greedily(model, tokenizer, dist.share(messages), max_tokens, batch_size, progress)
    outputs = [row for part in dist.gather_json(mine) for row in part]  # in record order
    answers = []
    cjk = chars = reps = grams = tokens = 0
    for record, out in zip(records, outputs):
        reason = finish_reason(out["tokens"] + ([out["stop_token"]] if out["stop_token"] is not None else []),
                               tokenizer)
        body, text = out["tokens"], out["text"]
        c, t = cjk_counts(text)
        r, g = ngram_counts(body, NGRAM)
        cjk, chars, reps, grams, tokens = cjk + c, chars + t, reps + r, grams + g, tokens + len(body)
        answers.append({"question": question(record), "answer": text, "tokens": len(body),
                        "finish_reason": reason})
    n = len(answers)
    return {
        "n": n, "max_tokens": max_tokens,
        "end_of_turn_share": sum(a["finish_reason"] == "end_of_turn" for a in answers) / n if n else 0.0,
        "cjk_share": cjk / chars if chars else 0.0,
        "repeated_4gram_share": reps / grams if grams else 0.0,
        "mean_tokens": tokens / n if n else 0.0,
        "answers": answers,
    }


def answer_greedily(model, tokenizer, messages: list, max_tokens: int, batch_size: int, progress: bool = False) -> list:
    """Greedy answers to the prompts `messages` (chat turns up to the answer), in eval mode, as
    JSON-ready rows {"text", "tokens", "stop_token"} (see generation.BatchOutput)."""
    from ..generation import batch_generate
    from .evaluation import progress_bar

    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in messages]
    was_training = model.training
    model.eval()
    rows = []
    # the bar counts generated tokens against the most there can be (every answer runs to
    # max_tokens); answers that stop early end it short of its total
    bar = progress_bar(len(prompts) * max_tokens, "answering", "tok", progress and dist.rank() == 0)
    done = 0

    def on_step(events):
        nonlocal done
        done += sum(e.finish_reason is not None for e in events)
        bar.set_postfix_str(f"{done}/{len(prompts)} answers done", refresh=False)
        bar.update(len(events))

    try:
        for a in range(0, len(prompts), batch_size):
            for out in batch_generate(model, tokenizer, prompts[a:a + batch_size], max_tokens=max_tokens,
                                      details=True, on_step=on_step):
                rows.append({"text": out.text, "tokens": [int(t) for t in out.tokens],
                             "stop_token": None if out.stop_token is None else int(out.stop_token)})
    finally:
        bar.close()
        model.train(was_training)
    return rows



def reference_metrics(tokenizer, records: Sequence[dict]) -> dict:
    """The same text metrics on the test split's own answers: what "Chinese, no loops" looks like."""
    cjk = chars = reps = grams = tokens = 0
    for r in records:
        text = reference_answer(r)
        ids = tokenizer.encode(text, add_bos=False)
        c, t = cjk_counts(text)
        rp, g = ngram_counts(ids, NGRAM)
        cjk, chars, reps, grams, tokens = cjk + c, chars + t, reps + rp, grams + g, tokens + len(ids)
    n = max(len(records), 1)
    return {"cjk_share": cjk / chars if chars else 0.0, "repeated_4gram_share": reps / grams if grams else 0.0,
            "mean_tokens": tokens / n}


def evaluate_model(model, tokenizer, test_set, records: Sequence[dict], max_tokens: int = DEFAULT_MAX_TOKENS,
                   batch_size: int = 4, max_seq_len: Optional[int] = None, progress: bool = False) -> dict:
    """Test loss / perplexity over the whole tokenized `test_set` and generation metrics on
    the chat `records` (see evaluate_generation), with the seconds each took.

    In a data-parallel run both halves are shared out among the ranks and gathered, and every
    rank returns the numbers one process would (the seconds are this rank's). progress: tqdm
    bars on stderr for both halves."""
    from .evaluation import evaluate_dataset

    t0 = time.perf_counter()
    loss = evaluate_dataset(model, tokenizer, test_set, batch_size, max_seq_len, progress=progress)
    t1 = time.perf_counter()
    gen = evaluate_generation(model, tokenizer, records, max_tokens, progress=progress)
    t2 = time.perf_counter()
    return {"loss": loss["loss"], "perplexity": loss["perplexity"], "loss_tokens": loss["tokens"], **gen,
            "seconds": {"loss": t1 - t0, "generation": t2 - t1}}


# ---- the report ---------------------------------------------------------------------------------


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: Optional[float], digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _cell(text: str, limit: int = 400) -> str:
    """Text for one Markdown table cell: escaped pipes, line breaks as <br>, cut at `limit` chars."""
    text = text.strip()
    if len(text) > limit:
        text = text[:limit] + " …"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return text.replace("\r", "").replace("\n", "<br>") or "*(empty)*"


def loss_drop(before: dict, after: dict) -> float:
    """Relative drop of the test loss: (before - after) / before."""
    return (before["loss"] - after["loss"]) / before["loss"]


def checks(before: dict, after: dict, total_seconds: Optional[float] = None) -> dict:
    """{target name: (measured value, bound, met)} for the TARGETS (the wall-time target only when
    total_seconds is given)."""
    values = {"end_of_turn_share": after["end_of_turn_share"], "repeated_4gram_share": after["repeated_4gram_share"],
              "cjk_share": after["cjk_share"], "loss_drop": loss_drop(before, after)}
    if total_seconds is not None:
        values["total_minutes"] = total_seconds / 60
    out = {}
    for name, value in values.items():
        bound, kind = TARGETS[name]
        out[name] = (value, bound, value >= bound if kind == "min" else value <= bound)
    return out


def _metric_rows(columns: list, reference: Optional[dict]) -> list:
    """The before/after table's rows: metric, one cell per evaluated model in `columns` (the base
    first, the final model last), the test answers' own value, and the change from first to last."""
    ref = reference or {}
    evals = [c for _, c in columns]
    first, last = evals[0], evals[-1]
    n, mt = last.get("n"), last.get("max_tokens")

    def row(name, key, shown, ref_cell, change=""):
        return (name, *[shown(e[key]) for e in evals], ref_cell, change)

    return [
        row("test loss (nats/token)", "loss", lambda x: _num(x, 4), "", f"{-100 * loss_drop(first, last):+.1f}%"),
        row("test perplexity", "perplexity", lambda x: _num(x, 2), "",
            f"{last['perplexity'] / first['perplexity']:.2f}x"),
        row(f"answers ending with `<end_of_turn>` within {mt} tokens (of {n})", "end_of_turn_share", _pct, "100.0%"),
        row("CJK share of generated characters", "cjk_share", _pct, _pct(ref.get("cjk_share"))),
        row("repeated 4-grams (share of answer token 4-grams)", "repeated_4gram_share", _pct,
            _pct(ref.get("repeated_4gram_share"))),
        row("mean answer length (tokens)", "mean_tokens", lambda x: _num(x, 1), _num(ref.get("mean_tokens"), 1)),
    ]


def _columns(before: dict, after: dict, sft: Optional[dict]) -> list:
    """[(title, evaluation)]: base and tuned, or base, SFT and SFT + the preference stage (which,
    when it found no pairs, left the SFT adapter as the final one: `after is sft`)."""
    if sft is None:
        return [("before", before), ("after", after)]
    return [("base", before), ("SFT", sft), ("SFT + DPO" if after is not sft else "final (= SFT: no pairs)", after)]


TARGET_NAMES = {"end_of_turn_share": ("answers that stop with `<end_of_turn>`", _pct),
                "repeated_4gram_share": ("repeated 4-grams in the answers", _pct),
                "cjk_share": ("CJK share of generated characters", _pct), "loss_drop": ("test loss drop", _pct),
                "total_minutes": ("wall time of the whole job", lambda m: f"{m:.1f} min")}


def _total_seconds(run_info: dict) -> Optional[float]:
    return (run_info.get("seconds") or {}).get("total")


def render_markdown(before: dict, after: dict, samples: list, run_info: dict, sft: Optional[dict] = None) -> str:
    """The report as Markdown (see write_report)."""
    ref = run_info.get("reference")
    columns = _columns(before, after, sft)
    titles = [t for t, _ in columns]
    lines = [f"# Fine-tuning report: {run_info.get('model', '?')} on {run_info.get('data', '?')}", ""]
    if run_info.get("date"):
        lines += [f"{run_info['date']} on {run_info.get('machine', 'this machine')}.", ""]
    lines += ["## Before / after", "",
              f"| metric | {' | '.join(titles)} | test answers (reference) | change |",
              "| --- |" + " ---: |" * (len(titles) + 2)]
    lines += [f"| {' | '.join(row)} |" for row in _metric_rows(columns, ref)]
    lines += ["", "Targets:", ""]
    for key, (value, bound, met) in checks(before, after, _total_seconds(run_info)).items():
        name, shown = TARGET_NAMES[key]
        sign = ">=" if TARGETS[key][1] == "min" else "<="
        lines.append(f"- {name}: {shown(value)} (target {sign} {shown(bound)}) {'met' if met else '**not met**'}")
    lines += ["", f"Loss: the whole test split ({after.get('loss_tokens', '?')} answer tokens, the model's "
              "answers and their `<end_of_turn>`). Generation: greedy, the chat template with the system "
              f"prompt, at most {after.get('max_tokens')} new tokens, {after.get('n')} test questions "
              f"({run_info.get('generation_subset', 'all of them')}). The test split is never trained on.", ""]
    if run_info.get("preference"):
        lines += [run_info["preference"], ""]
    if run_info.get("loss_curve"):
        lines += ["## Loss curve", "", f"![train and validation loss]({run_info['loss_curve']})", ""]
    if run_info.get("preference_curve"):
        lines += [f"The preference stage: ![DPO loss and rewards]({run_info['preference_curve']})", ""]
    keys = ["before", "sft", "after"] if sft is not None else ["before", "after"]
    lines += [f"## Samples (the first {len(samples)} test questions)", "",
              f"| question | {' | '.join(titles)} | reference |", "| --- |" + " --- |" * (len(titles) + 1)]
    for s in samples:
        cells = " | ".join(_cell(s.get(k, "")) for k in keys)
        lines.append(f"| {_cell(s['question'])} | {cells} | {_cell(s.get('reference', ''))} |")
    lines += ["", "## Run", ""]
    times = run_info.get("seconds", {})
    if times:
        lines.append("| step | seconds |")
        lines.append("| --- | ---: |")
        lines += [f"| {k} | {v:.1f} |" for k, v in times.items()]
        lines.append("")
    for key, title in (("settings", "Settings"), ("preference_settings", "Preference stage")):
        if run_info.get(key):
            lines += [f"{title}: " + ", ".join(f"`{k}={v}`" for k, v in run_info[key].items()), ""]
    for key in ("training", "adapter"):
        if run_info.get(key):
            lines.append(f"{key.capitalize()}: {run_info[key]}")
    return "\n".join(lines).rstrip() + "\n"


def write_report(out_dir, before: dict, after: dict, samples: list, run_info: dict,
                 sft: Optional[dict] = None) -> Path:
    """Write report.md (before/after table, targets, loss curve, side-by-side samples, run time and
    settings) and report.json (every number, every generated answer) into `out_dir`.

    before / after: evaluate_model results of the base and the final model; sft: the SFT model's
    when a preference stage followed it (a third column; the targets are the final model's);
    samples: [{"question", "before", "after", "reference"} (+ "sft")];
    run_info: {"model", "data", "date", "machine", "seconds": {step: s}, "settings": {...},
    "loss_curve": file name or None, "reference": reference_metrics(...), ...}.
    Returns the path of report.md.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"before": before, "after": after, **({"sft": sft} if sft is not None else {}),
              "samples": samples, "run": run_info,
              "loss_drop": loss_drop(before, after),
              "targets": {k: {"value": v, "bound": b, "met": m}
                          for k, (v, b, m) in checks(before, after, _total_seconds(run_info)).items()}}
    write_json_atomic(out / REPORT_JSON, result)
    md = out / REPORT_MD
    write_atomic(md, render_markdown(before, after, samples, run_info, sft))
    return md


def summary(before: dict, after: dict, report_path, sft: Optional[dict] = None) -> str:
    """A few lines for the terminal: each metric base -> final (base -> SFT -> final with `sft`)."""
    evals = [before] + ([sft] if sft is not None else []) + [after]

    def chain(key, shown):
        return " -> ".join(shown(e[key]) for e in evals)

    drop = loss_drop(before, after)
    titles = " -> ".join(t for t, _ in _columns(before, after, sft))
    lines = [f"models           {titles}"] if sft is not None else []
    return "\n".join(lines + [
        f"test loss        {chain('loss', lambda x: f'{x:.4f}')} ({-100 * drop:+.1f}%), "
        f"perplexity {chain('perplexity', lambda x: f'{x:.2f}')}",
        f"<end_of_turn>    {chain('end_of_turn_share', _pct)} of {after['n']} answers within "
        f"{after['max_tokens']} tokens",
        f"CJK characters   {chain('cjk_share', _pct)}",
        f"repeated 4-grams {chain('repeated_4gram_share', _pct)}",
        f"report: {report_path}",
    ])


def machine_line() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, MLX {mx.__version__} ({mx.default_device()})"
