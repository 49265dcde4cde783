"""Preference pairs from the model's own failures: `mlx-gemma data pairs`.

The model (an SFT adapter, typically) answers each question of a chat split greedily. An answer
that loops (more than `max_repeat` of its 4-grams repeat an earlier one, the main job's measure)
or fails to stop (no <end_of_turn> within `max_tokens`) becomes `rejected`, and the split's
reference answer `chosen`: TRL's conversational preference format, for `train --method dpo|orpo`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import NAME_ONLY, UserError
from ..files import write_atomic
from . import data as data_lib
from . import distributed as dist
from .report import (DEFAULT_MAX_TOKENS, NGRAM, answer_greedily, finish_reason, prompt_messages,
                     repeated_ngram_share)

DEFAULT_MAX_REPEAT = 0.25  # the main job's target for the share of repeated 4-grams


def failure(row: dict, tokenizer, max_repeat: float) -> Optional[str]:
    """Why a greedy answer {"tokens", "stop_token"} is a failure ("loops", "no stop"), or None."""
    ids = row["tokens"] + ([row["stop_token"]] if row["stop_token"] is not None else [])
    if finish_reason(ids, tokenizer) != "end_of_turn":
        return "no stop"
    if len(row["tokens"]) >= NGRAM and repeated_ngram_share(row["tokens"], NGRAM) > max_repeat:
        return "loops"
    return None


def build_pairs(model, tokenizer, records: list, max_tokens: int = DEFAULT_MAX_TOKENS,
                max_repeat: float = DEFAULT_MAX_REPEAT, batch_size: int = 64, progress: bool = False) -> tuple:
    """(pairs, counts): a preference record per failed answer; counts {"answered", "loops", "no stop",
    "blank"} (blank: failed answers with no visible text, which no preference record can hold).

    In a data-parallel run each rank answers its share of the records and every rank returns all
    the pairs (greedy answers do not depend on their batch neighbours)."""
    prompts = [prompt_messages(r) for r in records]
    mine = answer_greedily(model, tokenizer, dist.share(prompts), max_tokens, batch_size, progress)
    rows = [row for part in dist.gather_json(mine) for row in part]  # in record order
    pairs, counts = [], {"answered": len(rows), "loops": 0, "no stop": 0, "blank": 0}
    for record, prompt, row in zip(records, prompts, rows):
        why = failure(row, tokenizer, max_repeat)
        if why is None:
            continue
        if not row["text"].strip():
            counts["blank"] += 1
            continue
        counts[why] += 1
        pairs.append({"prompt": prompt, "chosen": [record["messages"][-1]],
                      "rejected": [{"role": "assistant", "content": row["text"]}]})
    return pairs, counts


def write_pairs(src, out, model_spec: str, adapter: Optional[str] = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                max_repeat: float = DEFAULT_MAX_REPEAT, limit: Optional[int] = None, force: bool = False,
                dtype: str = "auto", progress: bool = True) -> dict:
    """Answer the chat records of `src` (a file, or a data dir's train split) with the model (and
    adapter) and write the failures as TRL-format JSONL to `out`, atomically. Returns the counts
    plus "pairs" and "out"."""
    from ..loading import load

    out = Path(out).expanduser()
    if out.exists() and not force:
        raise UserError(f"{out} already exists; choose another path or pass {{force}}", force=NAME_ONLY)
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory for the output file")
    if not 0.0 <= max_repeat <= 1.0:
        raise UserError("{max_repeat} must be between 0 and 1", max_repeat=max_repeat)
    path = data_lib.resolve_split(src, "train")
    records = []
    for where, record in data_lib.read_records(path)[:limit]:
        try:
            prompt_messages(record)
        except UserError:
            raise UserError(f"{where}: `data pairs` needs chat records ending in an assistant answer") from None
        records.append(record)
    model, tokenizer = load(model_spec, dtype=dtype, adapter=adapter)
    pairs, counts = build_pairs(model, tokenizer, records, max_tokens, max_repeat, progress=progress)
    write_atomic(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return dict(counts, pairs=len(pairs), out=str(out))
