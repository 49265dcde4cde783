"""How the main job's preset was chosen: train variants, judge them on held-out questions that are
NOT the test split (the report's numbers stay untouched by the choice).

Each variant trains from the embedded Gemma 3 270M with the guide's LoRA recipe (r=16, alpha=32,
dropout 0.05, q/k/v/o, AdamW, peak lr 2e-4, the system prompt) in its own process, then answers
greedily (<= 128 new tokens, the report's settings) the 46 questions of the bundled *valid* split
and, separately, the "extra" questions: every 10th record of data/raw/baike_zh_c.jsonl and
baike_zh_d.jsonl (53 project-written questions in no split; the variants that train on c + d
leave exactly those records out). Prints one row per variant.

    python benchmarks/main_job_tuning.py [--variants cosine160,cosine400,wsd400,more_data400] [--iters N]

--iters N replaces every variant's step count (a quick check of the script, not a result).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
# name: (train options, whether the training split adds data/raw c + d minus the extra questions)
VARIANTS = {
    "cosine160": ({"iters": 160, "batch_size": 2, "lr_schedule": "cosine"}, False),
    "cosine400": ({"iters": 400, "batch_size": 2, "lr_schedule": "cosine"}, False),
    "wsd400": ({"iters": 400, "batch_size": 2, "lr_schedule": "wsd"}, False),
    "more_data400": ({"iters": 400, "batch_size": 2, "lr_schedule": "cosine"}, True),
}


def extra_split(tmp: Path) -> tuple[Path, Path]:
    """(chat records of c + d minus every 10th, the every-10th records) as JSONL files."""
    from mlx_gemma.training.hc3 import hc3_to_chat

    kept, held = [], []
    for name in ("baike_zh_c.jsonl", "baike_zh_d.jsonl"):
        hc3_to_chat(DATA / "raw" / name, tmp / name, test_size=0, valid_size=0, seed=0)
        rows = (tmp / name / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        held += rows[::10]
        kept += [r for i, r in enumerate(rows) if i % 10]
    (tmp / "kept.jsonl").write_text("".join(kept), encoding="utf-8")
    (tmp / "held.jsonl").write_text("".join(held), encoding="utf-8")
    return tmp / "kept.jsonl", tmp / "held.jsonl"


def data_dir(tmp: Path, more: bool, kept: Path) -> Path:
    out = tmp / ("more" if more else "bundled")
    out.mkdir(exist_ok=True)
    train = (DATA / "zh_baike" / "train.jsonl").read_text(encoding="utf-8")
    (out / "train.jsonl").write_text(train + (kept.read_text(encoding="utf-8") if more else ""), encoding="utf-8")
    (out / "valid.jsonl").write_text((DATA / "zh_baike" / "valid.jsonl").read_text(encoding="utf-8"),
                                     encoding="utf-8")
    return out


def child(spec: dict) -> dict:
    import mlx_gemma  # noqa: F401  (OpenBLAS first)
    from mlx_gemma.loading import load
    from mlx_gemma.training import data as data_lib
    from mlx_gemma.training.report import evaluate_generation
    from mlx_gemma.training.trainer import (TrainArgs, check_args, evaluate_dataset, load_training_data,
                                            resolve_defaults, setup, train)

    args = resolve_defaults(TrainArgs(out=spec["out"], data=spec["data"], force=True, test=False, eval_every=0,
                                      save_every=0, **spec["options"]))
    check_args(args)
    model, tok = load(args.model)
    splits = load_training_data(args, tok)
    t0 = time.perf_counter()
    res = train(model, tok, args, splits["train"], splits["valid"], None, progress=False,
                adapter_config=setup(model, args))
    seconds = time.perf_counter() - t0
    valid_loss = evaluate_dataset(model, tok, splits["valid"], 8, args.max_seq_len)["loss"]
    out = {"train_s": seconds, "tokens": res.tokens, "valid_loss": valid_loss}
    for key, path in (("valid", Path(spec["data"]) / "valid.jsonl"), ("extra", Path(spec["extra"]))):
        records = [r for _, r in data_lib.read_records(path)]
        g = evaluate_generation(model, tok, records, 128)
        out[key] = {k: g[k] for k in ("n", "end_of_turn_share", "repeated_4gram_share", "cjk_share", "mean_tokens")}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--iters", type=int, help="override every variant's steps (a quick check)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kept, held = extra_split(tmp)
        for name in args.variants.split(","):
            options, more = VARIANTS[name]
            options = dict(options, **({"iters": args.iters} if args.iters else {}))
            spec = {"options": options, "data": str(data_dir(tmp, more, kept)), "extra": str(held),
                    "out": str(tmp / name)}
            load = os.getloadavg()[0]
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True)
            if proc.returncode:
                print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((name, r, load))
            print(f"  {name}: {r}", file=sys.stderr, flush=True)
    print(f"\nMain-job variants, Gemma 3 270M, fp32 CPU ({os.cpu_count()} cores), from {started}; greedy, "
          "<= 128 new tokens\n")
    print("| variant | train s | valid loss | valid: stop / 4-gram rep / CJK | extra: stop / 4-gram rep / CJK | load |")
    print("|---|---:|---:|---|---|---:|")
    for name, r, load in rows:
        cells = [f"{100 * r[k]['end_of_turn_share']:.1f}% / {100 * r[k]['repeated_4gram_share']:.1f}% / "
                 f"{100 * r[k]['cjk_share']:.1f}% (n={r[k]['n']})" for k in ("valid", "extra")]
        print(f"| {name} | {r['train_s']:.0f} | {r['valid_loss']:.3f} | {cells[0]} | {cells[1]} | {load:.1f} |")


if __name__ == "__main__":
    main()
