"""Turn HC3-style question/answer records into chat-format train/valid/test splits.

HC3 (Human ChatGPT Comparison Corpus) stores one record per question:

    {"question": "什么是光合作用？", "human_answers": ["光合作用是……"], "chatgpt_answers": ["……"]}

The guide this project reproduces instruction-tunes a *base* Gemma on the Chinese
'baike' subset: each record becomes a system / user / assistant conversation whose
answer is the first human answer, so the model learns to answer in Chinese and stop.
`hc3_to_chat` is that conversion as a library function; `mlx-gemma data hc3` wraps it.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..errors import UserError
from ..files import atomic_output_dir
from .data import read_records

DEFAULT_SYSTEM_PROMPT = "你是一个知识丰富的人工智能助手，用户将用中文向你提问，你将根据你的知识用中文来如实回答问题"

SPLITS = ("train", "valid", "test")

# CJK ideographs, CJK / full-width punctuation and kana: a space next to one of these is
# a stray left by scraping (HC3's baike answers have many), not a word separator.
_CJK = r"\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_SPACE_BEFORE_CJK = re.compile(rf"[ ]+(?=[{_CJK}])")
_SPACE_AFTER_CJK = re.compile(rf"(?<=[{_CJK}])[ ]+")
_HSPACE = re.compile(r"[ \t\u00a0\u2002-\u200b\u3000\ufeff]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """Tidy scraped text: unify newlines, drop stray spaces, keep paragraph breaks.

    - ``\\r\\n`` / ``\\r`` become ``\\n``; each line is stripped; three or more newlines
      collapse to one blank line (a paragraph break survives, padding does not);
    - runs of spaces, tabs, non-breaking and full-width spaces become one space;
    - a space touching a CJK character or CJK/full-width punctuation is removed
      (``"水 是 H2O 。"`` → ``"水是H2O。"``), while spaces between Latin words stay.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = []
    for line in text.split("\n"):
        line = _HSPACE.sub(" ", line).strip()
        line = _SPACE_AFTER_CJK.sub("", _SPACE_BEFORE_CJK.sub("", line))
        lines.append(line)
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _read_records(src: Path) -> list[tuple[str, dict]]:
    """``[(where, record), ...]`` from a JSONL file or a JSON array file (see
    ``data.read_records``: ``where`` names the file and line or record number)."""
    if not src.exists():
        raise UserError(f"{src}: no such file")
    if not src.is_file():
        raise UserError(f"{src}: not a file (expected HC3-style .jsonl or .json)")
    return read_records(src)


def _question_and_answer(where: str, record: dict) -> tuple[str, str]:
    """The normalised question and first non-empty human answer ('' if there is none)."""
    if "question" not in record:
        raise UserError(f"{where}: record has no 'question' field")
    question = record["question"]
    if not isinstance(question, str) or not normalize_text(question):
        raise UserError(f"{where}: 'question' must be a non-empty string")
    answers = record.get("human_answers")
    if answers is None:
        answers = []
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise UserError(f"{where}: 'human_answers' must be a list of strings")
    answer = next((a for a in map(normalize_text, answers) if a), "")
    _check_text(where, "question", question)
    _check_text(where, "human_answers", answer)
    return normalize_text(question), answer


def _check_text(where: str, field: str, text: str) -> None:
    """UserError for a lone surrogate (JSON can escape one, "\\ud800"; no UTF-8 file can hold it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"{where}: '{field}' holds a lone surrogate (\\u{ord(text[exc.start]):04x} at character "
                        f"{exc.start + 1}), which is not text; fix or drop the record") from None


def _split_counts(n: int, test_size: float, valid_size: float) -> tuple[int, int, int]:
    """(train, valid, test) record counts; a non-zero fraction always gets at least one."""

    def count(size: float) -> int:
        return max(1, int(n * size + 0.5)) if size > 0 else 0

    n_test, n_valid = count(test_size), count(valid_size)
    n_train = n - n_test - n_valid
    if n_train < 1:
        raise UserError(f"only {n} usable records: too few for test_size={test_size} and "
                        f"valid_size={valid_size}; add records or lower the sizes")
    return n_train, n_valid, n_test


def _check_sizes(test_size: float, valid_size: float) -> None:
    for name, size in (("test_size", test_size), ("valid_size", valid_size)):
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 <= size < 1:
            raise UserError(f"{name}={size!r}: must be a fraction in [0, 1), e.g. 0.1")
    if test_size + valid_size >= 1:
        raise UserError(f"test_size + valid_size = {test_size + valid_size:g}: must be below 1 "
                        "so that records are left for training")


def hc3_to_chat(src_path, out_dir, system: str | None = DEFAULT_SYSTEM_PROMPT,
                test_size: float = 0.1, valid_size: float = 0.1, seed: int = 0,
                force: bool = False) -> dict:
    """Convert HC3-style Q&A records into chat-format ``train/valid/test.jsonl`` splits.

    Input (``src_path``): JSONL, one object per line (blank lines ignored), or a file holding
    one JSON array of such objects. Each object needs ``question`` (string) and
    ``human_answers`` (list of strings); ``chatgpt_answers`` and any other field are ignored.

    Each usable record becomes one line::

        {"messages": [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": QUESTION},
                      {"role": "assistant", "content": FIRST NON-EMPTY HUMAN ANSWER}]}

    Questions and answers are normalised with `normalize_text` (stripped, stray spaces next
    to Chinese characters removed, runs of blank lines collapsed). Records are skipped and
    counted when no human answer is non-empty (``skipped_empty``) or when their normalised
    question already appeared in an earlier usable record (``skipped_duplicate``; the first
    one is kept).

    The usable records are shuffled with ``random.Random(seed)`` and split: the first
    ``round(n * test_size)`` go to ``test``, the next ``round(n * valid_size)`` to ``valid``
    (a non-zero size always gets at least one record), the rest to ``train``. A split with no
    records gets no file. Same input and seed, same files.

    Args:
        src_path: HC3-style ``.jsonl`` (or ``.json`` array) file.
        out_dir: directory to create with ``train.jsonl``, ``valid.jsonl``, ``test.jsonl``.
        system: system prompt for every conversation (default: the guide's Chinese prompt,
            `DEFAULT_SYSTEM_PROMPT`); ``""`` or ``None`` writes no system message.
        test_size: fraction of records for ``test.jsonl``, in [0, 1). Default 0.1.
        valid_size: fraction of records for ``valid.jsonl``, in [0, 1). Default 0.1.
        seed: shuffling seed. Default 0.
        force: replace ``out_dir`` if it already exists. Default False (it is an error).

    Output is written into a temporary directory next to ``out_dir`` and renamed into place
    only when complete, so an interrupted run leaves no half-written splits.

    Returns:
        A report dict: ``source``, ``out_dir``, ``records`` (read), ``train``, ``valid``,
        ``test`` (lines written per split), ``skipped_empty``, ``skipped_duplicate``,
        ``files`` (paths written) and ``system`` (the prompt used, or None).

    Raises:
        UserError: missing/unreadable source, malformed JSON (names ``file:line``), a record
            without ``question`` or with wrongly typed fields, no usable records, sizes out of
            range, or ``out_dir`` existing without ``force``.
    """
    src, out, system = Path(src_path), Path(out_dir), system or None
    _check_sizes(test_size, valid_size)
    _check_out_dir(out, force)
    records = _read_records(src)
    examples, skipped_empty, skipped_duplicate = _conversations(src, records, system)
    splits = _split(examples, test_size, valid_size, seed)
    _write_splits(out, splits, force)
    return {"source": str(src), "out_dir": str(out), "records": len(records),
            **{name: len(splits[name]) for name in SPLITS},
            "skipped_empty": skipped_empty, "skipped_duplicate": skipped_duplicate,
            "files": [str(out / f"{name}.jsonl") for name in SPLITS if splits[name]], "system": system}


def _check_out_dir(out: Path, force: bool) -> None:
    """UserError when ``out`` exists and may not be replaced (before any record is read)."""
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; choose another output directory or pass " "{force}", force=True)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")


def _conversations(src: Path, records: list, system: str | None) -> tuple[list, int, int]:
    """``(examples, skipped_empty, skipped_duplicate)``: one ``{"messages": [...]}`` per record
    with a non-empty human answer and a question not seen before, in input order; UserError
    when no record is usable."""
    examples, seen = [], set()
    skipped_empty = skipped_duplicate = 0
    for where, record in records:
        question, answer = _question_and_answer(where, record)
        if not answer:
            skipped_empty += 1
        elif question in seen:
            skipped_duplicate += 1
        else:
            seen.add(question)
            messages = [{"role": "system", "content": system}] if system else []
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]
            examples.append({"messages": messages})
    if not examples:
        raise UserError(f"{src}: no usable records ({len(records)} read, {skipped_empty} with no "
                        f"non-empty human answer, {skipped_duplicate} duplicates)")
    return examples, skipped_empty, skipped_duplicate


def _split(examples: list, test_size: float, valid_size: float, seed: int) -> dict:
    """``{split name: examples}``: shuffled with ``random.Random(seed)``, test first, then valid."""
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    n_train, n_valid, n_test = _split_counts(len(examples), test_size, valid_size)
    return {"test": examples[:n_test],
            "valid": examples[n_test:n_test + n_valid],
            "train": examples[n_test + n_valid:]}


def _write_splits(out: Path, splits: dict, force: bool) -> None:
    """Write each non-empty split as ``NAME.jsonl`` into ``out``, atomically (all files or none)."""
    with atomic_output_dir(out, force) as tmp:
        for name in SPLITS:
            if splits[name]:
                lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in splits[name])
                (tmp / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
