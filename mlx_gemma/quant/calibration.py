"""Calibration text for GPTQ: text and data files -> (N, window) token-id windows.

By default the project's bundled Chinese Q&A training split (rendered in the chat format) and
an English text (data/calibration_en.txt), taking turns window by window: of the default 4,096
tokens, the English text is short enough to give 1,024 and the Chinese split the rest. Any .txt
or .jsonl/.json data files can replace them.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from ..data import DATA_DIR
from ..errors import NAME_ONLY, UserError
from ..files import read_text
from ..training.data import encode_record, read_records

DEFAULT_TOKENS = 4096  # calibration tokens: 8 windows of 512
WINDOW = 512


def default_sources() -> list[Path]:
    return [Path(DATA_DIR) / "zh_baike" / "train.jsonl", Path(DATA_DIR) / "calibration_en.txt"]


def resolve_sources(spec, bits: int):
    """The calibration files for a `calibration` value, or None for no calibration.

    spec: "auto" (or None) = the bundled sources for 4-bit, none for 8-bit (whose
    round-to-nearest error is already ~0.1% perplexity); "none"; or a list of file paths
    (a single "auto"/"none" in the list counts as that word)."""
    if spec is None or isinstance(spec, (str, Path)):
        spec = [] if spec is None else [spec]
    spec = [str(s) for s in spec]
    if not spec or spec == ["auto"]:
        return default_sources() if bits < 8 else None
    if spec == ["none"]:
        return None
    if "auto" in spec or "none" in spec:
        raise UserError("{calibration}: 'auto' and 'none' cannot be combined with files; pass one or the other",
                        calibration=NAME_ONLY)
    paths = [Path(s) for s in spec]
    for path in paths:
        if not path.is_file():
            raise UserError("{calibration}: no such file; pass a .txt or .jsonl file, or none (no calibration)",
                            calibration=path)
    return paths


def check_calibration_tokens(tokens: int, window: int = WINDOW) -> None:
    """Raise UserError unless `tokens` fills at least one calibration window."""
    if tokens < window:
        raise UserError(f"{{calibration_tokens}} must be at least {window} (one window), got {tokens}",
                        calibration_tokens=NAME_ONLY)


def _source_ids(path: Path, tokenizer) -> list[int]:
    """Token ids of one calibration file: a .txt as plain text, a .jsonl/.json data file with each
    record rendered as training renders it (chat template, prompt/completion or text)."""
    if not path.is_file():
        raise UserError(f"{path}: no such calibration file; pass a .txt or .jsonl file, or " "{calibration}",
                        calibration="none")
    if path.suffix in (".jsonl", ".json"):
        ids = []
        for where, record in read_records(path):
            ids += encode_record(record, tokenizer, where)[1].tolist()
        return ids
    text = read_text(path)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos + tokenizer.encode(text, add_bos=False)


def calibration_windows(tokenizer, sources=None, tokens: int = DEFAULT_TOKENS, window: int = WINDOW) -> mx.array:
    """(N, window) token ids, N = tokens // window: each source (default `default_sources()`) is
    cut into consecutive windows, and the sources take turns, so they share the budget evenly
    unless one runs out (then the others fill in)."""
    check_calibration_tokens(tokens, window)
    per_source = []
    for path in [Path(s) for s in (sources or default_sources())]:
        ids = _source_ids(path, tokenizer)
        cut = [ids[a:a + window] for a in range(0, len(ids) - window + 1, window)]
        if not cut:
            raise UserError(f"{path}: {len(ids)} tokens, fewer than one {window}-token calibration window; "
                            "pass a longer file")
        per_source.append(cut)
    windows = []
    for turn in range(max(map(len, per_source))):
        windows += [cut[turn] for cut in per_source if turn < len(cut)]
    return mx.array(np.asarray(windows[:tokens // window], dtype=np.int32))
