"""Training data: JSONL/JSON records -> token ids + loss masks -> padded or packed batches.

Three record formats, recognised per record by their keys:

- chat: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}``
  (optionally ``"tools": [...]`` and assistant ``tool_calls``, as OpenAI writes them), rendered
  with the model's chat template: the dir's own Jinja template when it ships one, else ours
  (Gemma 1-3 or Gemma 4 format; tool calls in mlx_gemma.tools's format). Loss on every assistant
  answer (its tool calls included) and its closing end-of-turn marker (so the model learns to
  stop); turn headers, user/system text and tool results are prompt. ``train_on_prompt=True``
  puts loss on every token but the first.
- completion: ``{"prompt": ..., "completion": ...}``. We follow TRL's convention for
  "standard" (non-conversational) prompt-completion data: plain text, no chat template,
  ``<bos>`` + prompt + completion + ``<eos>``, loss on the completion and ``<eos>`` only. (mlx-lm
  wraps the pair in the chat template instead; write a ``messages`` record to get that.) The
  prompt and completion are tokenized separately, so the boundary is always a token boundary.
- text: ``{"text": ...}``: ``<bos>`` + text + ``<eos>``, plain LM loss on every token but ``<bos>``.

A data path is a file (.jsonl, or .json holding a list of records) or a directory holding
``train``/``valid``/``test`` files (``.jsonl`` or ``.json``).

Token layout: ``ids`` is a record's tokens (``<bos>`` first); ``loss_mask[i] == 1`` when token
``i`` is a training target (predicted from the tokens before it), so ``loss_mask[0]`` is 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..errors import UserError
from ..files import read_text
from ..tools import encode_conversation

SPLITS = ("train", "valid", "test")
SUFFIXES = (".jsonl", ".json")
_JSON_SPACE = " \t\r"  # the whitespace JSON allows around a value (besides the "\n" lines split on)


@dataclass
class Dataset:
    """Tokenized records of one split. `examples` holds (ids, loss_mask) int32 array pairs."""

    name: str
    examples: list = field(default_factory=list)
    truncated: int = 0  # records cut to max_seq_len
    dropped: int = 0  # records longer than max_seq_len skipped (drop_long)
    formats: dict = field(default_factory=dict)  # format -> count

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids, _ in self.examples], dtype=np.int64)

    @property
    def loss_tokens(self) -> int:
        return int(sum(int(m.sum()) for _, m in self.examples))

    def summary(self) -> str:
        """One line: records, tokens, loss tokens, formats, truncated/dropped counts."""
        fmts = ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items()))
        line = (f"{self.name}: {len(self)} records ({fmts}), {int(self.lengths.sum())} tokens, "
                f"{self.loss_tokens} with loss")
        if self.truncated:
            line += f", {self.truncated} truncated to max_seq_len"
        if self.dropped:
            line += f", {self.dropped} longer than max_seq_len dropped"
        return line


# ---- reading files ----------------------------------------------------------------------------


def split_file(data: Path, split: str) -> Optional[Path]:
    """The file of `split` inside a data dir (train.jsonl / train.json), or None."""
    for suffix in SUFFIXES:
        path = data / f"{split}{suffix}"
        if path.is_file():
            return path
    return None


def resolve_split(data, split: str, required: bool = True) -> Optional[Path]:
    """A data path (file or dir) and a split name -> the file to read.

    A single file serves as whatever split asks for it; a dir must hold ``{split}.jsonl|json``.
    """
    data = Path(data).expanduser()
    if data.is_file():
        return data
    if data.is_dir():
        found = split_file(data, split)
        if found is None and required:
            raise UserError(f"{data}: no {split}.jsonl or {split}.json in this directory "
                            f"(a data dir holds train/valid/test .jsonl files)")
        return found
    if data.exists():  # /dev/null, a FIFO, a socket: reading it would give nothing or block
        raise UserError(f"{data}: not a regular file (a device, pipe or socket); give a .jsonl/.json file "
                        "or a dir with train/valid/test .jsonl files")
    raise UserError(f"{data}: no such file or directory (give a .jsonl/.json file or a dir with "
                    "train/valid/test .jsonl files)")


def read_records(path) -> list[tuple[str, dict]]:
    """[(where, record)] from a JSONL file or a JSON list; `where` is "file:line" for errors."""
    path = Path(path)
    text = read_text(path)
    records = []
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: a .json data file must hold a list of records")
        records = [(f"{path}: record {i}", item) for i, item in enumerate(items, 1)]
    else:
        # Split on "\n" only: str.splitlines() also splits on U+2028, U+2029, U+0085 and a few
        # control characters, which json.dumps(ensure_ascii=False) leaves unescaped inside
        # strings. A trailing "\r" (CRLF files) is JSON whitespace, so json.loads accepts it.
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip(_JSON_SPACE):
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
    for where, rec in records:
        if not isinstance(rec, dict):
            raise UserError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    return records


# ---- records -> tokens ------------------------------------------------------------------------


def record_format(record: dict, where: str) -> str:
    """"chat", "completion" or "text", from the record's keys."""
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    raise UserError(f"{where}: unknown record format (keys {sorted(record)[:6]}); expected "
                    '"messages", "prompt" + "completion", or "text"')


def _string(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _bos(tokenizer) -> list:
    return [tokenizer.bos_id] if tokenizer.bos_id is not None else []


def _eos(tokenizer) -> list:
    return [tokenizer.eos_id] if tokenizer.eos_id is not None else []


def _completion_ids(tokenizer, prompt: str, answer: str) -> tuple[list, list]:
    """(ids, loss mask) of `<bos>prompt answer<eos>`: the answer, its eos included, carries the loss."""
    prompt_ids = _bos(tokenizer) + tokenizer.encode(prompt, add_bos=False)
    answer_ids = tokenizer.encode(answer, add_bos=False) + _eos(tokenizer)
    return prompt_ids + answer_ids, [0] * len(prompt_ids) + [1] * len(answer_ids)


def encode_record(record: dict, tokenizer, where: str, train_on_prompt: bool = False):
    """One record -> (format, ids, loss_mask) as int32 arrays (see the module doc)."""
    fmt = record_format(record, where)
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not any(
                isinstance(m, dict) and m.get("role") in ("assistant", "model") for m in messages):
            raise UserError(f"{where}: a chat record needs at least one assistant message to train on")
        try:
            ids, mask = encode_conversation(tokenizer, messages, record.get("tools"))
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    elif fmt == "completion":
        ids, mask = _completion_ids(tokenizer, _string(record, "prompt", where), _string(record, "completion", where))
    else:
        bos, eos = _bos(tokenizer), _eos(tokenizer)
        ids = bos + tokenizer.encode(_string(record, "text", where), add_bos=False) + eos
        mask = [0] * len(bos) + [1] * (len(ids) - len(bos))
    ids = np.asarray(ids, dtype=np.int32)
    mask = np.asarray(mask, dtype=np.int32)
    if train_on_prompt:
        mask = np.ones_like(mask)
    if len(mask):
        mask[0] = 0  # the first token is never predicted
    if not mask.any():
        raise UserError(f"{where}: the record has no tokens to train on (empty answer/text)")
    return fmt, ids, mask


def load_dataset(path, tokenizer, name: str = "train", max_seq_len: int = 2048, drop_long: bool = False,
                 train_on_prompt: bool = False) -> Dataset:
    """Read and tokenize one data file (see `resolve_split` for picking it from a dir).

    Records longer than `max_seq_len` tokens are cut to it (or skipped with `drop_long`); a record
    whose answer starts beyond `max_seq_len` is an error unless `drop_long`, since cutting would
    leave nothing to train on. An empty file is an error.
    """

    def encode(record: dict, where: str):
        fmt, ids, mask = encode_record(record, tokenizer, where, train_on_prompt)
        return fmt, [(ids, mask)]

    return _read_dataset(path, Dataset(name=name), encode, max_seq_len, drop_long, "record")


def _read_dataset(path, data: Dataset, encode, max_seq_len: int, drop_long: bool, unit: str) -> Dataset:
    """`data` filled from one data file: `encode(record, where)` gives a record's (format,
    [(ids, loss_mask), ...]) (one sequence, or a pair's two), and a record longer than
    `max_seq_len` has every sequence cut to it, or is skipped with `drop_long`; cutting that
    leaves a sequence nothing to train on is an error. `unit` names a record in messages."""
    path = Path(path)
    records = read_records(path)
    if not records:
        raise UserError(f"{path}: no records (the {data.name} split is empty)")
    for where, record in records:
        fmt, sequences = encode(record, where)
        if max(len(ids) for ids, _ in sequences) > max_seq_len:
            if drop_long:
                data.dropped += 1
                continue
            if not all(mask[:max_seq_len].any() for _, mask in sequences):
                first = int(np.argmax(sequences[0][1]))
                raise UserError(f"{where}: the prompt is {first} tokens, so nothing to train on fits in "
                                "{max_seq_len}; raise it or pass {drop_long}", max_seq_len=max_seq_len,
                                drop_long=True)
            sequences = [(ids[:max_seq_len], mask[:max_seq_len]) for ids, mask in sequences]
            data.truncated += 1
        data.examples += sequences
        data.formats[fmt] = data.formats.get(fmt, 0) + 1
    if not data.examples:
        raise UserError(f"{path}: every {unit} is longer than " "{max_seq_len} and {drop_long} dropped them "
                        "all; raise it", max_seq_len=max_seq_len, drop_long=True)
    return data


def load_splits(data, tokenizer, max_seq_len: int = 2048, drop_long: bool = False, train_on_prompt: bool = False,
                splits=SPLITS) -> dict:
    """{split: Dataset or None} for a data dir (missing valid/test -> None) or a single file (train only)."""
    return _each_split(data, splits, lambda path, split: load_dataset(path, tokenizer, split, max_seq_len, drop_long,
                                                                      train_on_prompt))


def load_pair_splits(data, tokenizer, max_seq_len: int = 2048, drop_long: bool = False, splits=SPLITS) -> dict:
    """{split: PairDataset or None}: `load_splits` for preference records."""
    return _each_split(data, splits, lambda path, split: load_pair_dataset(path, tokenizer, split, max_seq_len,
                                                                           drop_long))


def _each_split(data, splits, read) -> dict:
    data = Path(data).expanduser()
    out = {}
    for split in splits:
        if data.is_file():
            path = data if split == "train" else None
        else:
            path = resolve_split(data, split, required=(split == "train"))
        out[split] = None if path is None else read(path, split)
    return out


# ---- preference pairs ------------------------------------------------------------------------
#
# TRL's preference format: {"prompt", "chosen", "rejected"}, either plain text (three strings:
# <bos> + prompt, then each answer + <eos>, loss on the answer and <eos>) or conversational (three
# message lists: the prompt's turns, and one assistant message in each of chosen and rejected,
# rendered with the chat template; loss on the answer and its <end_of_turn>). A PairDataset keeps
# chosen and rejected of pair i as examples 2i and 2i + 1.


@dataclass
class PairDataset(Dataset):
    """Tokenized preference pairs: `examples[2 * i]` is pair i's chosen, `examples[2 * i + 1]` its rejected."""

    def __len__(self) -> int:
        return len(self.examples) // 2

    @property
    def lengths(self) -> np.ndarray:
        """Per pair: the longer of its two sequences (what batching plans by)."""
        n = np.array([len(ids) for ids, _ in self.examples], dtype=np.int64)
        return np.maximum(n[0::2], n[1::2])

    def summary(self) -> str:
        fmts = ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items()))
        tokens = sum(len(ids) for ids, _ in self.examples)
        line = f"{self.name}: {len(self)} preference pairs ({fmts}), {tokens} tokens, {self.loss_tokens} with loss"
        if self.truncated:
            line += f", {self.truncated} truncated to max_seq_len"
        if self.dropped:
            line += f", {self.dropped} longer than max_seq_len dropped"
        return line


def _pair_format(record: dict, where: str) -> str:
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise UserError(f"{where}: a preference record needs \"prompt\", \"chosen\" and \"rejected\" "
                        f"(missing {', '.join(repr(k) for k in missing)})")
    kinds = {type(record[k]).__name__ for k in ("prompt", "chosen", "rejected")}
    if kinds == {"str"}:
        return "text pair"
    if kinds == {"list"}:
        return "chat pair"
    raise UserError(f"{where}: \"prompt\", \"chosen\" and \"rejected\" must be all strings (plain text) or "
                    "all message lists (conversational)")


def _chat_pair_side(tokenizer, prompt: list, answer, key: str, where: str):
    if not (isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], dict)
            and answer[0].get("role") in ("assistant", "model")):
        raise UserError(f"{where}: {key!r} must hold one assistant message, e.g. "
                        '[{"role": "assistant", "content": "..."}]')
    try:
        prompt_ids = tokenizer.encode_chat(prompt, add_generation_prompt=True)[0]
        ids, mask = tokenizer.encode_chat(prompt + answer)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    if ids[:len(prompt_ids)] != prompt_ids:
        raise UserError(f"{where}: the chat template renders the prompt differently once {key!r} follows it")
    return ids, [0] * len(prompt_ids) + mask[len(prompt_ids):]


def encode_pair(record: dict, tokenizer, where: str):
    """One preference record -> (format, (chosen ids, mask), (rejected ids, mask)) as int32 arrays."""
    fmt = _pair_format(record, where)
    sides = []
    for key in ("chosen", "rejected"):
        text = record[key] if fmt == "text pair" else "".join(
            str(m.get("content", "")) for m in record[key] if isinstance(m, dict))
        if not text.strip():
            raise UserError(f"{where}: {key!r} is empty (no answer to train on)")
        if fmt == "chat pair":
            if not record["prompt"] or not all(isinstance(m, dict) for m in record["prompt"]):
                raise UserError(f"{where}: \"prompt\" must be a non-empty list of messages")
            ids, mask = _chat_pair_side(tokenizer, record["prompt"], record[key], key, where)
        else:
            ids, mask = _completion_ids(tokenizer, record["prompt"], record[key])
        mask = np.asarray(mask, np.int32)
        if len(mask):
            mask[0] = 0
        sides.append((np.asarray(ids, np.int32), mask))
    return fmt, sides[0], sides[1]


def load_pair_dataset(path, tokenizer, name: str = "train", max_seq_len: int = 2048,
                      drop_long: bool = False) -> PairDataset:
    """Read and tokenize a preference file; each side is cut to `max_seq_len` tokens as
    `load_dataset` cuts a record (or the pair skipped with `drop_long`)."""

    def encode(record: dict, where: str):
        fmt, chosen, rejected = encode_pair(record, tokenizer, where)
        return fmt, [chosen, rejected]

    return _read_dataset(path, PairDataset(name=name), encode, max_seq_len, drop_long, "pair")


def make_pair_batch(dataset: PairDataset, units: list[list[int]], pad_id: int, max_seq_len: int) -> dict:
    """Pairs (rows of one pair index each, as `plan_batches` gives them) -> one batch whose rows are
    the B chosen answers then the B rejected ones (`make_batch`'s arrays), plus `real` (2B, L): 1
    where the target is a real token, prompt included (ORPO's NLL term)."""
    pairs = [row[0] for row in units]
    batch = make_batch(dataset, [[2 * p] for p in pairs] + [[2 * p + 1] for p in pairs], pad_id, max_seq_len)
    real = np.zeros_like(batch["weights"])
    for b, i in enumerate([2 * p for p in pairs] + [2 * p + 1 for p in pairs]):
        real[b, :len(dataset.examples[i][0]) - 1] = 1.0
    batch["real"] = real
    return batch


# ---- batching ---------------------------------------------------------------------------------


def bucket_length(n: int, multiple: int = 32, cap: Optional[int] = None) -> int:
    """Round a row length up to a multiple (fewer distinct shapes -> fewer recompiles)."""
    n = int(math.ceil(n / multiple) * multiple)
    return min(n, cap) if cap else n


def _pack_rows(lengths: np.ndarray, order: np.ndarray, row_len: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of records (by index) into rows of `row_len` tokens."""
    rows, free = [], []
    for i in sorted(order.tolist(), key=lambda i: -lengths[i]):
        n = int(lengths[i])
        for r, space in enumerate(free):
            if space >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(row_len - n)
    return rows


def plan_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int, max_seq_len: int,
                 pack: bool = False, shuffle: bool = True) -> list[list[list[int]]]:
    """The batches of one epoch: a list of batches, each a list of rows, each a list of record indices.

    Deterministic in (seed, epoch), so a resumed run sees the same order. Length grouping: records
    are sorted by length and cut into batches of similar length, then the batch order is shuffled
    (little padding, random order). With `pack`, records are packed into rows of `max_seq_len`
    tokens first and rows are batched in the same way.
    """
    lengths = dataset.lengths
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if pack:
        rows = _pack_rows(lengths, order, max_seq_len)
        row_lengths = np.array([sum(int(lengths[i]) for i in row) for row in rows])
    else:
        rows = [[int(i)] for i in order]
        row_lengths = lengths[order]
    # stable sort keeps the shuffled order among equal lengths
    by_length = np.argsort(-row_lengths, kind="stable")
    batches = [[rows[j] for j in by_length[k:k + batch_size]] for k in range(0, len(rows), batch_size)]
    if shuffle:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches


def make_batch(dataset: Dataset, rows: list[list[int]], pad_id: int, max_seq_len: int,
               length_multiple: int = 32) -> dict:
    """Rows of record indices -> numpy arrays for one step.

    inputs (B, L) token ids; targets (B, L) next tokens; weights (B, L) 1.0 where the target carries
    loss; segment_ids (B, L) record number inside a packed row, 0 on padding (only when some row
    holds more than one record, else None); tokens: real (unpadded) input tokens. L is the longest
    row minus one, rounded up to `length_multiple`.
    """
    seqs = []
    for row in rows:
        ids = np.concatenate([dataset.examples[i][0] for i in row])
        mask = np.concatenate([dataset.examples[i][1] for i in row])
        seg = np.concatenate([np.full(len(dataset.examples[i][0]), k + 1, np.int32) for k, i in enumerate(row)])
        seqs.append((ids, mask, seg))
    longest = max(len(s[0]) for s in seqs) - 1
    L = max(1, bucket_length(longest, length_multiple, cap=max_seq_len))
    B = len(seqs)
    inputs = np.full((B, L), pad_id, np.int32)
    targets = np.zeros((B, L), np.int32)
    weights = np.zeros((B, L), np.float32)
    segments = np.zeros((B, L), np.int32)
    for b, (ids, mask, seg) in enumerate(seqs):
        n = len(ids) - 1
        inputs[b, :n] = ids[:-1]
        targets[b, :n] = ids[1:]
        # A record's first token (bos) is never a target; in a packed row this also stops a
        # record's last position from predicting the next record's first token.
        same = seg[1:] == seg[:-1]
        weights[b, :n] = mask[1:] * same
        segments[b, :n] = seg[:-1]
    packed = any(len(row) > 1 for row in rows)
    return dict(inputs=inputs, targets=targets, weights=weights, segment_ids=segments if packed else None,
                tokens=int(sum(len(s[0]) - 1 for s in seqs)))


def iterate_batches(dataset: Dataset, batch_size: int, max_seq_len: int, pad_id: int, seed: int = 0,
                    pack: bool = False, shuffle: bool = True, start: int = 0, epochs: Optional[int] = None,
                    ) -> Iterator[tuple[int, int, dict]]:
    """Yield (epoch, index in epoch, batch) forever (or for `epochs`), starting at global batch `start`.

    The order depends only on (seed, epoch), so starting at `start` resumes exactly where a run
    that had consumed `start` batches stopped.
    """
    n = len(plan_batches(dataset, batch_size, seed, 0, max_seq_len, pack, shuffle=False))
    epoch, pos = divmod(start, n)
    while epochs is None or epoch < epochs:
        plan = plan_batches(dataset, batch_size, seed, epoch, max_seq_len, pack, shuffle)
        for k in range(pos, len(plan)):
            yield epoch, k, make_batch(dataset, plan[k], pad_id, max_seq_len)
        epoch, pos = epoch + 1, 0


def batches_per_epoch(dataset: Dataset, batch_size: int, max_seq_len: int, pack: bool = False) -> int:
    return len(plan_batches(dataset, batch_size, 0, 0, max_seq_len, pack, shuffle=False))
