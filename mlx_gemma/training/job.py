"""The training job as the CLI runs it: options -> data -> model -> train -> report.

    run_training(args)     load, set up LoRA, train (SFT, DPO or ORPO: args.method)
    run_main_job(args)     the main job: evaluate the base, train, evaluate again, write report.md
    ranks_outcome(...)     what `--ranks N`'s exit codes mean, as an exit status and a line

Above the loop (training/loop.py) and the report (training/report.py); below cli.py only.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path
from typing import Callable, Optional

from ..errors import NAME_ONLY, UserError
from ..files import write_atomic
from ..loading import load
from ..lora import CONFIG_FILE as ADAPTER_CONFIG_FILE, WEIGHTS_FILE as ADAPTER_WEIGHTS_FILE
from . import data as data_lib
from . import distributed as dist
from .args import DEFAULT_OUT, PREFERENCE_NEEDS_DATA, TrainArgs, check_args, resolve_defaults, train_fields
from .loop import TrainResult, train
from .objectives import SFT, Objective
from .preference import DPO, ORPO
from .report import (DEFAULT_MAX_TOKENS, LOSS_BATCH, LOSS_CURVE, REPORT_JSON, REPORT_MD, SAMPLES, evaluate_model,
                     machine_line, prompt_messages, question, reference_answer, reference_metrics, summary,
                     write_report)
from .run_dir import RunDir
from .setup import setup


def default_data_dir() -> Path:
    from .. import data as bundled

    return Path(bundled.DATA_DIR) / "zh_baike"


def data_path(args: TrainArgs) -> Path:
    return Path(args.data).expanduser() if args.data else default_data_dir()


def make_objective(args: TrainArgs) -> Objective:
    """The loss of args.method: SFT, DPO (args.beta, args.dpo_loss) or ORPO (args.orpo_alpha)."""
    if args.method == "dpo":
        return DPO(beta=args.beta, loss_types=tuple(args.dpo_loss.split(",")),
                   cached_reference=bool(args.adapter_init), loss_chunk=args.loss_chunk)
    if args.method == "orpo":
        return ORPO(alpha=args.orpo_alpha)
    return SFT()


def load_training_data(args: TrainArgs, tokenizer) -> dict:
    """{split: Dataset or None} for args.data (default: the bundled zh_baike splits); preference
    records (PairDataset) for --method dpo / orpo."""
    if args.method in ("dpo", "orpo"):
        if not args.data:
            raise UserError(PREFERENCE_NEEDS_DATA, method=args.method, data=NAME_ONLY)
        return data_lib.load_pair_splits(data_path(args), tokenizer, args.max_seq_len, args.drop_long)
    return data_lib.load_splits(data_path(args), tokenizer, args.max_seq_len, args.drop_long, args.train_on_prompt)


def prepare_out_dir(args: TrainArgs) -> Optional[Path]:
    """Check --out before slow work; the checkpoint to resume from, or None (see RunDir.check)."""
    return RunDir(args.out, writer=dist.rank() == 0).check(args.resume, args.force, args.to_dict())


def restore_options(values: dict, given: set) -> dict:
    """--resume: the options of the run in values["out"] (its train_config.json) for every field
    not in `given` (what the user typed or a config file set); `values` otherwise unchanged."""
    previous = RunDir(values.get("out") or DEFAULT_OUT).read_config()
    if previous is None:
        return values
    merged = dict(values)
    for f in train_fields():
        if f.name in previous and f.name not in given and f.name not in TrainArgs.PER_RUN_KEYS:
            merged[f.name] = previous[f.name]
    return merged


def train_argv(args: TrainArgs) -> list:
    """`args` as `mlx-gemma train` options (what each rank of `--ranks N` is started with)."""
    argv = []
    for f in train_fields():
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else ([f"--no-{flag[2:]}"] if f.default else [])
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _load(args: TrainArgs, echo) -> tuple:
    """The model and the tokenized splits of `args` (their one-line summaries echoed)."""
    model, tokenizer = load(args.model, dtype=args.dtype)
    splits = load_training_data(args, tokenizer)
    for split in data_lib.SPLITS:
        if splits[split] is not None:
            echo(splits[split].summary())
    extra = {"data_resolved": str(data_path(args)),
             "data_summary": {k: v.summary() for k, v in splits.items() if v is not None}}
    return model, tokenizer, splits, extra


def run_training(args: TrainArgs, progress: bool = True, echo=print) -> TrainResult:
    """Load the model and data named by `args`, set up LoRA, train, and return the result (the CLI's `train`)."""
    args = resolve_defaults(args)
    check_args(args)
    if args.method in ("dpo", "orpo") and not args.data:  # fail before the slow model load
        raise UserError(PREFERENCE_NEEDS_DATA, method=args.method, data=NAME_ONLY)
    prepare_out_dir(args)
    model, tokenizer, splits, extra = _load(args, echo)
    adapter_config = setup(model, args)
    return train(model, tokenizer, args, splits["train"], splits["valid"], splits["test"], progress=progress,
                 adapter_config=adapter_config, extra_config=extra, loss=make_objective(args))


def ranks_outcome(ended: dict, out: str, ranks: int) -> tuple[int, Optional[str]]:
    """(exit status, line to print or None) for `train --ranks N`, from distributed.launch_local's
    {"failed": [(rank, code)], "returncode", "said_error"}: 0 when every rank finished, 130 after a
    Ctrl-C (every rank stopped after the same step), 1 when a rank failed or was killed."""
    codes = dict(ended["failed"])
    if not codes and ended["returncode"] == 0:
        return 0, None
    ckpts = sorted((Path(out).expanduser() / "checkpoints").glob("step-*"))
    resume = (f"continue from {ckpts[-1].name} with: mlx-gemma train --out {out} --resume --ranks {ranks}"
              if ckpts else "no checkpoint was saved")
    stopped = (130, 143, -2, -15)  # Ctrl-C, or terminated by the launcher because another rank ended
    killed = [(r, c) for r, c in sorted(codes.items()) if c is None or c < 0 and c not in stopped]
    failed = [(r, c) for r, c in sorted(codes.items()) if c is not None and c not in stopped]
    if not killed and not failed:
        return 130, f"interrupted; {resume}"
    if not killed and ended["said_error"]:
        return 1, None  # the failing rank's own one-line message is above
    rank, code = (killed or failed)[0]
    how = "was killed" if code is None else f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return 1, f"error: rank {rank} {how}, so every rank was stopped; {resume}"


# ---- the main job -------------------------------------------------------------------------------


def run_main_job(args, *, max_tokens: int = DEFAULT_MAX_TOKENS, generation_limit: Optional[int] = None,
                 progress: bool = True, echo: Callable = print):
    """The whole job behind `mlx-gemma train`: evaluate the base model on the test split, fine-tune
    (loop.train), evaluate again; with args.preference_stage "dpo" (the main job's preset) DPO-tune
    on pairs made from the tuned model's failures on training questions and evaluate a third time
    (--out: the final adapter, pairs.jsonl; --out/sft: the SFT run); write the report next to the
    final adapter and print its summary.

    args: a TrainArgs. generation_limit: answer only the first N test questions (default: all);
    the test loss always covers the whole split. Returns (TrainResult of the last training, path
    of report.md). Under mlx.launch every rank runs this, sharing the steps, the evaluations and
    the pair answers; only rank 0 speaks and writes, the others return (result, None).
    """
    t = {"start": time.perf_counter()}
    writer = dist.rank() == 0
    echo = echo if writer else (lambda s: None)
    args, sft_args = _job_args(args, writer)
    staged, out = sft_args is not args, Path(args.out).expanduser()
    model, tokenizer, splits, extra = _load(args, echo)
    t["loaded"] = time.perf_counter()
    records, subset = _test_records(args, splits, generation_limit)
    pair_records = _pair_records(args) if staged else None  # checked before the training, not after

    def evaluate(m):
        return evaluate_model(m, tokenizer, splits["test"], records[0], max_tokens, LOSS_BATCH, args.max_seq_len,
                              progress)

    echo(f"evaluating the base model on the test split ({len(records[1])} records; answering {subset})...")
    before = evaluate(model)
    t["before"] = time.perf_counter()
    result = train(model, tokenizer, sft_args, splits["train"], splits["valid"], None, progress=progress,
                   adapter_config=setup(model, sft_args), extra_config=extra)
    t["trained"] = time.perf_counter()
    after = _evaluated(result, model, evaluate, "fine-tuned", echo, t, "after")
    sft, sft_result, stage = None, result, None
    if after is not None and staged:
        echo(result.summary())
        sft, stage = after, _preference_stage(args, model, tokenizer, pair_records, max_tokens, progress, echo, t)
        del model
        if stage["result"] is not None:  # else no pairs: the SFT adapter is the final one, evaluated above
            result = stage["result"]
            after = _evaluated(result, stage["model"], evaluate, "preference-tuned", echo, t, "final")
    if after is None:  # interrupted
        return result, None
    if not writer:
        return result, None
    samples = _samples(records[0], before, sft, after)
    info = _run_info(args, sft_result, tokenizer, records[0], subset, t)
    if staged:
        info.update(_stage_info(args, out, stage))
    path = write_report(out, before, after, samples, info, sft=sft)
    echo(result.summary())
    echo(summary(before, after, path, sft=sft))
    return result, path


def _evaluated(result: TrainResult, model, evaluate: Callable, what: str, echo: Callable, t: dict,
               key: str) -> Optional[dict]:
    """The test evaluation of the model `result` trained (its test loss recorded in it; t[key] the
    time it ended), or None when the training was interrupted."""
    if result.interrupted:
        echo(result.summary())
        return None
    echo(f"evaluating the {what} model on the test split...")
    after = evaluate(model)
    result.test_loss, result.test_perplexity = after["loss"], after["perplexity"]
    t[key] = time.perf_counter()
    return after


def _job_args(args: TrainArgs, writer: bool) -> tuple:
    """(the job's args, the SFT run's: a copy into --out/sft when the preference stage follows),
    checked, and each run's --out checked, before the slow model load."""
    args = resolve_defaults(args)
    check_args(args)
    if args.method != "sft":
        raise UserError("the report evaluates SFT on chat data; pass {report} with {method}",
                        report=NAME_ONLY, method=args.method)
    if args.preference_stage != "dpo":
        _check_out_dirs((args,), writer)
        return args, args
    sft_args = dataclasses.replace(args, out=str(Path(args.out).expanduser() / SFT_DIR))
    _check_out_dirs((args, sft_args), writer)
    return args, sft_args


def _check_out_dirs(runs: tuple, writer: bool) -> None:
    """Each run's --out; with --force a stale report is removed (it must not outlive a failed new run)."""
    for run_args in runs:
        if prepare_out_dir(run_args) is None and run_args.force and writer:
            for name in (REPORT_MD, REPORT_JSON):
                (Path(run_args.out).expanduser() / name).unlink(missing_ok=True)


def _samples(records: list, before: dict, sft: Optional[dict], after: dict) -> list:
    """The report's side-by-side answers to the first SAMPLES test questions."""
    samples = [{"question": question(r), "before": b["answer"], "after": a["answer"], "reference": reference_answer(r)}
               for r, b, a in zip(records[:SAMPLES], before["answers"], after["answers"])]
    for sample, s in zip(samples, sft["answers"] if sft is not None else []):
        sample["sft"] = s["answer"]
    return samples


SFT_DIR = "sft"  # the SFT run inside --out when the preference stage follows it
PAIRS_FILE = "pairs.jsonl"


def _pair_records(args: TrainArgs) -> list:
    """The first args.pair_questions chat records of the training split (the stage's questions)."""
    path = data_lib.resolve_split(data_path(args), "train")
    records = []
    for where, record in data_lib.read_records(path)[:args.pair_questions]:
        try:
            prompt_messages(record)
        except UserError:
            raise UserError(f"{where}: the preference stage needs chat records ending in an assistant answer; "
                            "pass {preference_stage}", preference_stage="none") from None
        records.append(record)
    return records


def _preference_stage(args: TrainArgs, sft_model, tokenizer, records: list, max_tokens: int, progress: bool,
                      echo: Callable, t: dict) -> dict:
    """The SFT model answers `records` greedily; its loops and unfinished answers become pairs
    (--out/pairs.jsonl), and a fresh copy of the base with the SFT adapter is DPO-tuned on them
    into --out (reference: the SFT adapter, its log-probs cached). With no failure to learn from,
    the SFT adapter is copied to --out as the final one.

    Returns {"counts", "pairs", "result" (TrainResult or None), "model" (the final model)}; sets
    t["pairs"] when the answers are in and t["stage"] at the end."""
    import shutil

    from .pairs import DEFAULT_MAX_REPEAT, build_pairs

    out = Path(args.out).expanduser()
    sft_dir = out / SFT_DIR
    fitting = _fitting(records, tokenizer, args.max_seq_len - max_tokens)
    echo(f"preference stage: answering {len(fitting)} training questions with the SFT adapter"
         + (f" ({len(records) - len(fitting)} skipped: prompt + {max_tokens} new tokens over --max-seq-len)"
            if len(fitting) < len(records) else "") + "...")
    pairs, counts = build_pairs(sft_model, tokenizer, fitting, max_tokens, DEFAULT_MAX_REPEAT, progress=progress)
    counts["too long"] = len(records) - len(fitting)
    t["pairs"] = time.perf_counter()
    echo(f"{len(pairs)} pairs from its failures ({counts['loops']} loops, {counts['no stop']} unfinished, "
         f"{counts['blank']} blank skipped, of {counts['answered']})")
    if dist.rank() == 0:
        write_atomic(out / PAIRS_FILE, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    dist.gather_json(None)  # every rank reads the file after rank 0 wrote it
    if not pairs:
        echo("no failures to learn from: the SFT adapter is the final one")
        if dist.rank() == 0:
            RunDir(out).clean()  # no earlier run's metrics or checkpoints beside the copied adapter
            for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
                shutil.copyfile(sft_dir / name, out / name)
        t["stage"] = time.perf_counter()
        return {"counts": counts, "pairs": 0, "result": None, "model": sft_model}
    pref_args = dataclasses.replace(args, method="dpo", data=str(out / PAIRS_FILE), adapter_init=str(sft_dir),
                                    iters=args.preference_iters, epochs=None, lr=args.preference_lr,
                                    lr_schedule="constant", warmup=None, min_lr=0.0, eval_every=0, test=False,
                                    force=True, preference_stage="none", pack=False)
    model, _ = load(args.model, dtype=args.dtype)
    pair_splits = data_lib.load_pair_splits(out / PAIRS_FILE, tokenizer, args.max_seq_len, args.drop_long)
    echo(pair_splits["train"].summary())
    echo(f"DPO from the SFT adapter: its log-probs of the {len(pairs)} pairs first (the reference), then "
         f"{pref_args.iters} steps...")
    result = train(model, tokenizer, pref_args, pair_splits["train"], None, None, progress=progress,
                   adapter_config=setup(model, pref_args), loss=make_objective(pref_args),
                   extra_config={"data_resolved": str(out / PAIRS_FILE), "pairs": counts})
    t["stage"] = time.perf_counter()
    return {"counts": counts, "pairs": len(pairs), "result": result, "model": model}


def _fitting(records: list, tokenizer, most: int) -> list:
    """The records whose prompt (chat template, generation header) is at most `most` tokens: an
    answer to a longer one could not be trained on whole within --max-seq-len."""
    def length(r):
        return len(tokenizer.apply_chat_template(prompt_messages(r), add_generation_prompt=True, tokenize=True))

    return [r for r in records if length(r) <= most]


def _stage_info(args: TrainArgs, out: Path, stage: dict) -> dict:
    """The report's lines on the SFT run and the preference stage."""
    c = stage["counts"]
    words = (f"The preference stage: the SFT adapter ({SFT_DIR}/) answered {c['answered']} training questions; "
             f"{stage['pairs']} failed ({c['loops']} loops, {c['no stop']} without `<end_of_turn>`; {c['blank']} "
             f"blank ones skipped) and became preference pairs ({PAIRS_FILE}: its answer rejected, the reference "
             "answer chosen)" + (f"; {c['too long']} questions too long for --max-seq-len were not asked"
                                 if c.get("too long") else ""))
    r = stage["result"]
    if r is None:
        words += "; with none to learn from, the SFT adapter is the final one."
    else:
        words += (f"; DPO from the SFT adapter: {r.steps} steps, {r.tokens} tokens in {r.seconds:.1f} s "
                  f"({r.tokens_per_second:.0f} tok/s).")
    return {"preference": words, "adapter": str(out),
            "loss_curve": f"{SFT_DIR}/{LOSS_CURVE}" if (out / SFT_DIR / LOSS_CURVE).exists() else None,
            "preference_curve": LOSS_CURVE if r is not None and (out / LOSS_CURVE).exists() else None,
            "preference_settings": {k: getattr(args, k) for k in ("pair_questions", "preference_iters",
                                                                   "preference_lr", "beta", "dpo_loss")}}


def _test_records(args: TrainArgs, splits: dict, generation_limit: Optional[int]) -> tuple:
    """((records answered, all test records), words for the subset answered)."""
    where = data_path(args)
    test_file = data_lib.resolve_split(where, "test", required=False) if where.is_dir() else None
    if splits["test"] is None or test_file is None:
        raise UserError(f"{where}: the report needs a test split (test.jsonl) to evaluate on")
    records = [r for _, r in data_lib.read_records(test_file)]
    answered = records[:generation_limit] if generation_limit else records
    subset = "all of them" if len(answered) == len(records) else f"the first {len(answered)} of {len(records)}"
    return (answered, records), subset


def _run_info(args: TrainArgs, result: TrainResult, tokenizer, records: list, subset: str, t: dict) -> dict:
    """The report's description of the run: settings, machine, training numbers, phase times."""
    out = Path(result.out)
    settings = {k: getattr(args, k) for k in ("model", "rank", "alpha", "dropout", "targets", "lr", "lr_schedule",
                                              "epochs", "iters", "batch_size", "max_seq_len", "eval_every", "seed")}
    settings["steps"] = result.steps
    return {
        "model": args.model, "data": str(data_path(args)), "adapter": str(out),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "machine": machine_line(),
        "generation_subset": subset, "reference": reference_metrics(tokenizer, records),
        "loss_curve": LOSS_CURVE if (out / LOSS_CURVE).exists() else None,
        "training": (f"{result.steps} steps, {result.tokens} tokens in {result.seconds:.1f} s "
                     f"({result.tokens_per_second:.0f} tok/s), peak memory {result.peak_memory_gb:.2f} GB"),
        "train_loss_last": result.train_loss, "val_loss": result.val_loss,
        "seconds": {"load model (incl. first-time conversion)": t["loaded"] - t["start"],
                    "evaluate before": t["before"] - t["loaded"], "train": t["trained"] - t["before"],
                    "evaluate after": t["after"] - t["trained"],
                    **({"preference pairs (answering)": t["pairs"] - t["after"],
                        "preference training (reference log-probs, DPO)": t["stage"] - t["pairs"],
                        "evaluate final": t["final"] - t["stage"]} if "final" in t else {}),
                    "total": time.perf_counter() - t["start"]},
        "settings": settings,
    }
