"""Training data: formats -> ids + loss masks, truncation, batching, packing, and bad input."""

import json

import numpy as np
import pytest

from mlx_gemma.errors import UserError
from mlx_gemma.training import data as D

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a"]


def tiny_tokenizer():
    """A real GemmaTokenizer over a tiny vocabulary (Gemma 3 ids: <end_of_turn> = 106), < 512 ids."""
    from mlx_gemma.convert.spm import tokenizer_model_from_gguf_fields
    from mlx_gemma.tokenizer import GemmaTokenizer

    tokens, types = ["<pad>", "<eos>", "<bos>", "<unk>"], [3, 3, 3, 2]
    while len(tokens) < 105:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(3)
    tokens += ["<start_of_turn>", "<end_of_turn>", "\n"]
    types += [3, 3, 4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    words = ["▁", "user", "model", "system"] + ["▁" + w for w in WORDS]
    tokens += words
    types += [1] * len(words)
    scores = [0.0] * (len(tokens) - len(words)) + [-float(k) for k in range(len(words))]
    return GemmaTokenizer.from_bytes(tokenizer_model_from_gguf_fields(tokens, scores, types, 2, 1, 3, 0))


def random_chat(rng, turns=1, system=False):
    msgs = [{"role": "system", "content": "a cat"}] if system else []
    for _ in range(turns):
        msgs.append({"role": "user", "content": " ".join(rng.choice(WORDS, rng.integers(2, 8)))})
        msgs.append({"role": "assistant", "content": " ".join(rng.choice(WORDS, rng.integers(2, 12)))})
    return {"messages": msgs}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def pieces(tok, ids, mask):
    return [(tok.id_to_piece(int(i)), int(m)) for i, m in zip(ids, mask)]


def test_chat_loss_on_every_answer_and_its_end_of_turn(tok):
    rec = {"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "the cat"},
                        {"role": "assistant", "content": "sat"}, {"role": "user", "content": "dog"},
                        {"role": "assistant", "content": "ran on"}]}
    fmt, ids, mask = D.encode_record(rec, tok, "x")
    assert fmt == "chat"
    # the loss-carrying runs, decoded: exactly each answer with its closing <end_of_turn>
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(tok.decode(cur).strip())
            cur = []
    assert runs == ["sat<end_of_turn>", "ran on<end_of_turn>"]
    # the token right before each run is the "\n" ending "<start_of_turn>model\n" (a prompt token)
    starts = [k for k in range(1, len(mask)) if mask[k] and not mask[k - 1]]
    assert [tok.decode(ids[:k]).endswith("<start_of_turn>model\n") for k in starts] == [True, True]
    assert list(ids) == tok.apply_chat_template(rec["messages"], tokenize=True)
    _, _, all_mask = D.encode_record(rec, tok, "x", train_on_prompt=True)
    assert all_mask[0] == 0 and all_mask[1:].all()


def split_text(tok, ids, mask):
    """(text of the prompt tokens, text of the loss tokens), ids checked to be one contiguous tail."""
    k = int(np.argmax(mask))
    assert mask[k:].all() and not mask[:k].any()
    return tok.decode(ids[:k]), tok.decode(ids[k:])


def test_completion_and_text_formats(tok):
    fmt, ids, mask = D.encode_record({"prompt": " the cat", "completion": " sat"}, tok, "x")
    assert fmt == "completion" and split_text(tok, ids, mask) == ("<bos> the cat", " sat<eos>")
    assert list(ids) == tok.encode(" the cat") + tok.encode(" sat", add_bos=False) + [tok.eos_id]
    fmt, ids, mask = D.encode_record({"text": " a dog"}, tok, "x")
    assert fmt == "text" and split_text(tok, ids, mask) == ("<bos>", " a dog<eos>")


def test_truncation_and_drop_long_are_counted(tok, tmp_path):
    short = {"prompt": " a", "completion": " cat"}
    long = {"prompt": " a", "completion": " cat" * 20}
    path = write_jsonl(tmp_path / "train.jsonl", [short, long, short])
    ds = D.load_dataset(path, tok, max_seq_len=8)
    assert len(ds) == 3 and ds.truncated == 1 and ds.lengths.max() == 8
    ds = D.load_dataset(path, tok, max_seq_len=8, drop_long=True)
    assert len(ds) == 2 and ds.dropped == 1
    assert "1 longer than max_seq_len dropped" in ds.summary()


def test_batches_are_length_grouped_deterministic_and_cover_the_epoch(tok, tmp_path):
    rng = np.random.default_rng(0)
    path = write_jsonl(tmp_path / "train.jsonl", [random_chat(rng, turns=int(rng.integers(1, 3))) for _ in range(30)])
    ds = D.load_dataset(path, tok)
    plan = D.plan_batches(ds, 4, seed=1, epoch=0, max_seq_len=512)
    assert plan == D.plan_batches(ds, 4, seed=1, epoch=0, max_seq_len=512)
    assert plan != D.plan_batches(ds, 4, seed=1, epoch=1, max_seq_len=512)
    assert sorted(i for b in plan for row in b for i in row) == list(range(30))
    lengths = ds.lengths
    # length grouping: padding is far below what random batches would need
    grouped = sum(max(lengths[r[0]] for r in b) * len(b) - sum(lengths[r[0]] for r in b) for b in plan)
    order = np.random.default_rng(0).permutation(30)
    random_pad = sum(lengths[order[k:k + 4]].max() * len(order[k:k + 4]) - lengths[order[k:k + 4]].sum()
                     for k in range(0, 30, 4))
    assert grouped < random_pad / 2
    batch = D.make_batch(ds, plan[0], tok.pad_id, 512)
    ids, mask = ds.examples[plan[0][0][0]]
    n = len(ids) - 1
    assert (batch["inputs"][0, :n] == ids[:-1]).all() and (batch["targets"][0, :n] == ids[1:]).all()
    assert (batch["weights"][0, :n] == mask[1:]).all() and batch["weights"][0, n:].sum() == 0
    assert batch["inputs"].shape[1] % 32 == 0 and batch["segment_ids"] is None
    # resuming at global batch k yields exactly the tail of the stream
    full = [b for _, _, b in zip(range(12), range(12), D.iterate_batches(ds, 4, 512, 0, seed=3))]
    tail = [b for _, b in zip(range(7), D.iterate_batches(ds, 4, 512, 0, seed=3, start=5))]
    for a, (_, _, b) in zip(full[5:], tail):
        assert (a[2]["inputs"] == b["inputs"]).all()


def test_packing_keeps_records_apart(tok, tmp_path):
    rng = np.random.default_rng(1)
    path = write_jsonl(tmp_path / "train.jsonl", [random_chat(rng) for _ in range(20)])
    ds = D.load_dataset(path, tok)
    plan = D.plan_batches(ds, 2, seed=0, epoch=0, max_seq_len=128, pack=True)
    assert sorted(i for b in plan for row in b for i in row) == list(range(20))
    assert all(sum(len(ds.examples[i][0]) for i in row) <= 128 for b in plan for row in b)
    batch = D.make_batch(ds, plan[0], tok.pad_id, 128)
    row = plan[0][0]
    assert len(row) > 1 and batch["segment_ids"] is not None
    seg = batch["segment_ids"][0]
    assert list(np.unique(seg[seg > 0])) == list(range(1, len(row) + 1))
    assert batch["weights"].sum() == sum(ds.examples[i][1].sum() for r in plan[0] for i in r)


@pytest.mark.parametrize("content, message", [
    ('{"messages": [{"role": "user", "content": "a"}]}\n', "needs at least one assistant"),
    ('{"text": "a"}\n{"text": "a"\n', "train.jsonl:2: malformed JSON"),
    ('{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     "train.jsonl:1: message 0 has role 'robot'"),
    ('{"foo": 1}\n', "train.jsonl:1: unknown record format"),
    ("\n\n", "no records"),
    ('{"prompt": 3, "completion": "a"}\n', "'prompt' must be a string"),
])
def test_bad_data_is_one_clear_user_error(tok, tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        D.load_dataset(path, tok)


def test_max_seq_len_shorter_than_the_prompt(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": " cat" * 10, "completion": " a"}])
    with pytest.raises(UserError, match=r"train.jsonl:1: the prompt is \d+ tokens.*max_seq_len=6"):
        D.load_dataset(path, tok, max_seq_len=6)
    with pytest.raises(UserError, match="dropped them all"):
        D.load_dataset(path, tok, max_seq_len=6, drop_long=True)


def test_splits_from_a_dir_and_missing_train(tok, tmp_path):
    rng = np.random.default_rng(2)
    write_jsonl(tmp_path / "train.jsonl", [random_chat(rng) for _ in range(3)])
    (tmp_path / "valid.json").write_text(json.dumps([random_chat(rng) for _ in range(2)]))
    splits = D.load_splits(tmp_path, tok)
    assert len(splits["train"]) == 3 and len(splits["valid"]) == 2 and splits["test"] is None
    with pytest.raises(UserError, match="nope: no such file or directory"):
        D.load_splits(tmp_path / "nope", tok)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no train.jsonl or train.json"):
        D.load_splits(empty, tok)
