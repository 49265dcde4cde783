"""hc3_to_chat: HC3-style Q&A records → chat-format train/valid/test splits."""

import json

import pytest

from mlx_gemma.errors import UserError
from mlx_gemma.training.hc3 import DEFAULT_SYSTEM_PROMPT, hc3_to_chat, normalize_text

GUIDE_PROMPT = "你是一个知识丰富的人工智能助手，用户将用中文向你提问，你将根据你的知识用中文来如实回答问题"


def record(question, answers, chatgpt=()):
    return {"question": question, "human_answers": list(answers), "chatgpt_answers": list(chatgpt)}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def fixture_records():
    """20 good records, 2 with no usable answer, 2 duplicates of earlier questions."""
    good = [record(f"问题{i}是什么？", [f"答案{i}。"], chatgpt=[f"机器答案{i}"]) for i in range(20)]
    bad = [
        record("没有回答的问题？", []),
        record("只有空回答的问题？", ["", "   \n "]),
        record("问题3是什么？", ["重复问题的另一个答案。"]),
        record("  问题7是什么？ ", ["又一个重复。"]),  # duplicate once whitespace is stripped
    ]
    return good[:10] + bad[:2] + good[10:] + bad[2:]


@pytest.fixture
def src(tmp_path):
    return write_jsonl(tmp_path / "hc3.jsonl", fixture_records())


def all_splits(out):
    return {name: read_jsonl(out / f"{name}.jsonl") for name in ("train", "valid", "test")}


def test_counts_and_skips(src, tmp_path):
    report = hc3_to_chat(src, tmp_path / "out")
    assert report["records"] == 24
    assert report["skipped_empty"] == 2
    assert report["skipped_duplicate"] == 2
    assert (report["train"], report["valid"], report["test"]) == (16, 2, 2)
    assert report["source"] == str(src)
    splits = all_splits(tmp_path / "out")
    assert {k: len(v) for k, v in splits.items()} == {"train": 16, "valid": 2, "test": 2}
    questions = [ex["messages"][-2]["content"] for rows in splits.values() for ex in rows]
    assert sorted(questions) == sorted(f"问题{i}是什么？" for i in range(20))


def test_message_shape_system_prompt_and_first_answer(src, tmp_path):
    assert DEFAULT_SYSTEM_PROMPT == GUIDE_PROMPT
    hc3_to_chat(src, tmp_path / "out")
    for rows in all_splits(tmp_path / "out").values():
        for ex in rows:
            assert list(ex) == ["messages"]
            system, user, assistant = ex["messages"]
            assert system == {"role": "system", "content": GUIDE_PROMPT}
            assert user["role"] == "user" and assistant["role"] == "assistant"
            i = user["content"][2:-4]
            # the kept answer is the first human one, never the duplicate's or ChatGPT's
            assert assistant["content"] == f"答案{i}。"


def test_custom_and_no_system_prompt(src, tmp_path):
    hc3_to_chat(src, tmp_path / "custom", system="请用中文回答。")
    ex = read_jsonl(tmp_path / "custom" / "train.jsonl")[0]
    assert ex["messages"][0] == {"role": "system", "content": "请用中文回答。"}
    for i, system in enumerate(["", None]):
        report = hc3_to_chat(src, tmp_path / f"none{i}", system=system)
        assert report["system"] is None
        for rows in all_splits(tmp_path / f"none{i}").values():
            for ex in rows:
                assert [m["role"] for m in ex["messages"]] == ["user", "assistant"]


def test_first_non_empty_answer_and_normalisation(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [
        record(" 水 的 化学式 是什么？\n", ["", "  \n", " 水的化学式是 H2O 。\r\n\r\n\r\n它由氢和氧组成 。 ", "第二个"]),
    ])
    hc3_to_chat(src, tmp_path / "out", test_size=0, valid_size=0)
    (ex,) = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert ex["messages"][1]["content"] == "水的化学式是什么？"
    assert ex["messages"][2]["content"] == "水的化学式是H2O。\n\n它由氢和氧组成。"
    assert not (tmp_path / "out" / "valid.jsonl").exists()  # empty splits get no file
    assert normalize_text("use the  Python\tlanguage") == "use the Python language"


def test_split_sizes(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [record(f"问{i}？", [f"答{i}"]) for i in range(100)])
    report = hc3_to_chat(src, tmp_path / "a", test_size=0.15, valid_size=0.05)
    assert (report["train"], report["valid"], report["test"]) == (80, 5, 15)
    report = hc3_to_chat(src, tmp_path / "b", test_size=0.001, valid_size=0)
    assert (report["train"], report["valid"], report["test"]) == (99, 0, 1)  # non-zero → ≥ 1
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["test.jsonl", "train.jsonl"]


def test_deterministic_with_seed_and_no_overlap(src, tmp_path):
    hc3_to_chat(src, tmp_path / "a", seed=3)
    hc3_to_chat(src, tmp_path / "b", seed=3)
    hc3_to_chat(src, tmp_path / "c", seed=4)
    for name in ("train", "valid", "test"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == \
               (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert all_splits(tmp_path / "a") != all_splits(tmp_path / "c")
    questions = {name: {ex["messages"][1]["content"] for ex in rows}
                 for name, rows in all_splits(tmp_path / "a").items()}
    assert not questions["train"] & questions["valid"]
    assert not questions["train"] & questions["test"]
    assert not questions["valid"] & questions["test"]


def test_json_array_input(tmp_path):
    records = fixture_records()
    jsonl = write_jsonl(tmp_path / "a.jsonl", records)
    array = tmp_path / "a.json"
    array.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    r1 = hc3_to_chat(jsonl, tmp_path / "from_jsonl")
    r2 = hc3_to_chat(array, tmp_path / "from_array")
    assert {k: r1[k] for k in ("train", "valid", "test", "skipped_empty", "skipped_duplicate")} == \
           {k: r2[k] for k in ("train", "valid", "test", "skipped_empty", "skipped_duplicate")}
    assert all_splits(tmp_path / "from_jsonl") == all_splits(tmp_path / "from_array")


def test_existing_out_dir_needs_force_and_is_untouched(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old", encoding="utf-8")
    with pytest.raises(UserError, match="already exists"):
        hc3_to_chat(src, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hc3.jsonl", "out"]  # no temp dirs left

    report = hc3_to_chat(src, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["test.jsonl", "train.jsonl", "valid.jsonl"]
    assert report["train"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hc3.jsonl", "out"]


def test_failure_leaves_no_output(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [record("问？", ["答"]), {"human_answers": ["x"]}])
    with pytest.raises(UserError):
        hc3_to_chat(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_malformed_line_names_file_and_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(record("问？", ["答"]), ensure_ascii=False) + "\n\n"
                   '{"question": "坏行", "human_answers": ["x"]\n', encoding="utf-8")
    with pytest.raises(UserError, match=rf"{src}:3: malformed JSON") as e:
        hc3_to_chat(src, tmp_path / "out")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad, message", [
    ({"human_answers": ["答"]}, r"a\.jsonl:2: record has no 'question' field"),
    ({"question": "", "human_answers": ["答"]}, r"a\.jsonl:2: 'question' must be a non-empty"),
    ({"question": "问？", "human_answers": "答"}, r"a\.jsonl:2: 'human_answers' must be a list"),
    (["问？", "答"], r"a\.jsonl:2: a record must be a JSON object, got list"),
])
def test_bad_records(tmp_path, bad, message):
    src = write_jsonl(tmp_path / "a.jsonl", [record("好问题？", ["答"]), bad])
    with pytest.raises(UserError, match=message):
        hc3_to_chat(src, tmp_path / "out")


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        hc3_to_chat(tmp_path / "missing.jsonl", tmp_path / "out")
    empty = write_jsonl(tmp_path / "empty.jsonl", [record("问？", []), record("问2？", [""])])
    with pytest.raises(UserError, match="no usable records"):
        hc3_to_chat(empty, tmp_path / "out")
    good = write_jsonl(tmp_path / "good.jsonl", [record(f"问{i}？", ["答"]) for i in range(3)])
    for kwargs in ({"test_size": 1.0}, {"valid_size": -0.1}, {"test_size": "0.1"},
                   {"test_size": 0.6, "valid_size": 0.5}):
        with pytest.raises(UserError, match="size"):
            hc3_to_chat(good, tmp_path / "out", **kwargs)
    with pytest.raises(UserError, match="too few"):
        hc3_to_chat(good, tmp_path / "out", test_size=0.5, valid_size=0.3)
    assert not (tmp_path / "out").exists()


def test_bundled_splits_are_what_data_readme_says(tmp_path):
    """data/zh_baike is exactly what data/README.md's recipe makes from data/raw/baike_zh_a + b
    (seed 0, default sizes): a hand edit of a split, or a raw file that no longer makes it, fails
    here. The extra sources c + d are in no split, and none of their questions is asked there."""
    from pathlib import Path

    data = Path(__file__).resolve().parent.parent / "data"
    src = tmp_path / "ab.jsonl"
    src.write_bytes(b"".join((data / "raw" / n).read_bytes() for n in ("baike_zh_a.jsonl", "baike_zh_b.jsonl")))
    hc3_to_chat(src, tmp_path / "ab", seed=0)
    questions = []
    for split in ("train", "valid", "test"):
        made = (tmp_path / "ab" / f"{split}.jsonl").read_bytes()
        assert (data / "zh_baike" / f"{split}.jsonl").read_bytes() == made, split
        questions += [m["content"] for r in read_jsonl(tmp_path / "ab" / f"{split}.jsonl")
                      for m in r["messages"] if m["role"] == "user"]
    assert len(questions) == len(set(questions))
    extra = [json.loads(line)["question"] for n in ("baike_zh_c.jsonl", "baike_zh_d.jsonl")
             for line in (data / "raw" / n).read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(extra) == len(set(extra)) and not set(map(normalize_text, extra)) & set(questions)
