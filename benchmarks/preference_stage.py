"""Does a short preference stage after the main job's SFT make the tuned model stop more and loop
less, at the same total time? Judged as the preset was (benchmarks/main_job_tuning.py): greedy,
<= 128 new tokens, on the 46 questions of the *valid* split and the 53 "extra" questions, never
the test split.

Variants, each in its own process:
  sft       the main job's SFT recipe (--sft-iters steps, default 400, the preset before the stage;
            batch 2, wsd), then SFT for as many more steps as the preference stage's time buys (so
            both variants spend the same time);
  sft+dpo   the same SFT steps; `data pairs` on the first --pair-questions questions of the
            *train* split (the SFT adapter's greedy answers that loop or do not stop become rejected,
            the reference answers chosen); then --method dpo (or orpo) from the SFT adapter.

    python benchmarks/preference_stage.py [--method dpo|orpo] [--sft-iters 400] [--pref-iters 40]
                                          [--pair-questions 150] [--questions N]

--sft-iters / --questions shorten everything (a check that the pipeline runs, not a result).
--no-control runs the sft+dpo variant alone (e.g. with fewer --sft-iters, to fit the budget);
--control-only N runs the sft variant alone with N SFT steps in all (N from an earlier run's
sft+dpo timing: 400 x (1 + pref_seconds / SFT seconds)), when the whole run does not fit.

Each child runs as the CLI does (`mlx_gemma.cpu.enable()`: the CPU paths this machine's
calibration keeps). Time: on 2026-12-07 (AMD EPYC, 2 cores, before the children called
`cpu.enable()`, so on MLX's own kernels) the sft+dpo child alone took 33 min: 400 SFT steps
22 min at 77 tok/s, 150 pair answers 4 min, the DPO stage's reference log-probs 1.5 min and its
40 steps 4.5 min, then 99 judged answers; the sft child repeats the 400 steps and adds ~47 %
more, so plan on about 1.5 h for the whole run on such a machine.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job_tuning import DATA, data_dir, extra_split  # noqa: E402


def _train(options: dict, data: str, out: str):
    from mlx_gemma.training.trainer import TrainArgs, run_training

    args = TrainArgs(out=out, data=data, force=True, test=False, eval_every=0, save_every=0, **options)
    return run_training(args, progress=False, echo=lambda s: None)


def _judge(spec: dict, adapter: str) -> dict:
    from mlx_gemma.loading import load
    from mlx_gemma.training import data as data_lib
    from mlx_gemma.training.report import evaluate_generation

    model, tok = load("gemma-3-270m", adapter=adapter)
    out = {}
    for key, path in (("valid", Path(spec["data"]) / "valid.jsonl"), ("extra", Path(spec["extra"]))):
        records = [r for _, r in data_lib.read_records(path)][:spec["questions"]]
        g = evaluate_generation(model, tok, records, 128)
        out[key] = {k: g[k] for k in ("n", "end_of_turn_share", "repeated_4gram_share", "cjk_share")}
    return out


def child(spec: dict) -> dict:
    import mlx_gemma.cpu  # (OpenBLAS first)
    from mlx_gemma.training.pairs import write_pairs

    mlx_gemma.cpu.enable()  # as `mlx-gemma train` and `data pairs` run

    sft = dict(iters=spec["sft_iters"], batch_size=2, lr_schedule="wsd")
    t0 = time.perf_counter()
    if spec.get("control_steps"):  # the control alone, its step count given
        _train(dict(sft, iters=spec["control_steps"]), spec["data"], spec["out"] + "/final")
        return dict(steps=f"{spec['control_steps']} SFT", seconds=time.perf_counter() - t0,
                    **_judge(spec, spec["out"] + "/final"))
    _train(sft, spec["data"], spec["out"] + "/sft")
    t_sft = time.perf_counter() - t0
    if spec["variant"] == "sft":  # the same time again: more SFT steps at the measured rate
        extra = max(1, round(spec["sft_iters"] * spec["pref_seconds"] / t_sft))
        _train(dict(sft, iters=spec["sft_iters"] + extra), spec["data"], spec["out"] + "/final")
        result = {"steps": f"{spec['sft_iters'] + extra} SFT"}
    else:
        t1 = time.perf_counter()
        made = write_pairs(Path(spec["data"]) / "train.jsonl", spec["out"] + "/pairs.jsonl", "gemma-3-270m",
                           spec["out"] + "/sft", limit=spec["pair_questions"], force=True, progress=False)
        pref = dict(iters=spec["pref_iters"], batch_size=2, lr=spec["lr"], method=spec["method"],
                    lr_schedule="constant", adapter_init=spec["out"] + "/sft")
        _train(pref, spec["out"] + "/pairs.jsonl", spec["out"] + "/final")
        result = {"steps": f"{spec['sft_iters']} SFT + {spec['pref_iters']} {spec['method']}", "pairs": made,
                  "pref_seconds": time.perf_counter() - t1}
    result.update(seconds=time.perf_counter() - t0, **_judge(spec, spec["out"] + "/final"))
    return result


def run(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{spec['variant']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="dpo", choices=("dpo", "orpo"))
    ap.add_argument("--sft-iters", type=int, default=400)
    ap.add_argument("--pref-iters", type=int, default=40)
    ap.add_argument("--pair-questions", type=int, default=150)
    ap.add_argument("--questions", type=int, default=None, help="judge on the first N of each held-out set")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--control-only", type=int, metavar="N", help="only the sft variant, N SFT steps in all")
    ap.add_argument("--no-control", action="store_true", help="only the sft+pref variant")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    started, load = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        _, held = extra_split(Path(tmp))
        base = {"data": str(data_dir(Path(tmp), False, Path(tmp) / "kept.jsonl")), "extra": str(held),
                "sft_iters": a.sft_iters, "pref_iters": a.pref_iters, "pair_questions": a.pair_questions,
                "questions": a.questions, "method": a.method, "lr": a.lr}
        pref = None if a.control_only else run(dict(base, variant="sft+pref", out=str(Path(tmp) / "pref")))
        if pref is not None:
            print(f"  sft+{a.method}: {pref}", file=sys.stderr, flush=True)
        control = dict(base, variant="sft", out=str(Path(tmp) / "sft"), control_steps=a.control_only,
                       pref_seconds=pref and pref["pref_seconds"])
        sft = None if a.no_control else run(control)
        if sft is not None:
            print(f"  sft: {sft}", file=sys.stderr, flush=True)
    print(f"\nPreference stage after SFT, Gemma 3 270M, fp32 CPU ({os.cpu_count()} cores), from {started}, "
          f"load {load:.1f}; greedy, <= 128 new tokens\n")
    print("| variant | steps | total s | valid: stop / 4-gram rep / CJK | extra: stop / 4-gram rep / CJK |")
    print("|---|---|---:|---|---|")
    for name, r in ((f"sft+{a.method}", pref), ("sft (same time)", sft)):
        if r is None:
            continue
        cells = [f"{100 * r[k]['end_of_turn_share']:.1f}% / {100 * r[k]['repeated_4gram_share']:.1f}% / "
                 f"{100 * r[k]['cjk_share']:.1f}% (n={r[k]['n']})" for k in ("valid", "extra")]
        print(f"| {name} | {r['steps']} | {r['seconds']:.0f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
