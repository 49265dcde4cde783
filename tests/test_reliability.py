"""Every failure a user can cause ends in one `error:` line (exit 1, no traceback) naming the file or
value and the cause, and leaves no output or temporary behind (issue #17).

The full-disk and read-only cases run twice where they can: on a real 64 KiB tmpfs (needs
CAP_SYS_ADMIN, as root here; skipped in containers without it) and with the write patched to fail
the way the system fails it (always runs).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_gemma import files, loading
from mlx_gemma.cli import main
from mlx_gemma.config import GemmaConfig
from mlx_gemma.errors import UserError
from mlx_gemma.training.data import read_records

# ---- helpers --------------------------------------------------------------------------------------


def run(*args, stdin=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=stdin)


def error_line(result) -> str:
    """The one `error:` line of a failed command (exit 1, no traceback, nothing else on stdout)."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert result.output.strip().splitlines()[-1] == errors[0], result.output
    assert result.stdout == "", result.stdout  # progress and errors go to stderr only
    return errors[0]


def everything(folder: Path) -> list:
    """Every path under `folder`, hidden temporaries included, relative and sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


TINY = dict(model_type="gemma3_text", vocab_size=262144, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8, sliding_window_pattern=6,
            rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tokenizer():
    from mlx_gemma.tokenizer import GemmaTokenizer

    return GemmaTokenizer(loading.resolve("gemma-3-270m"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A random 6-layer (as llama.cpp wants Gemma 3: 5 local, 1 global), 32-wide Gemma 3 with the real tokenizer and a 64-token context: every command runs
    on it in about a second, and a chat fills its context in two turns."""
    from mlx_gemma.model import Gemma

    mx.random.seed(0)
    model = Gemma(GemmaConfig(**TINY))
    return loading.save_model(model, tokenizer, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    from mlx_gemma.lora import apply_lora, save_adapter

    model, _ = loading.load(str(model_dir), dtype="float32")
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter", apply_lora(model, rank=2))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Chat data (train/valid/test) and an HC3 source, with U+2028 inside the strings."""
    root = tmp_path_factory.mktemp("data")
    chat = [{"messages": [{"role": "user", "content": f"question {i}\u2028?"},
                          {"role": "assistant", "content": f"answer {i}\u2029\x85."}]} for i in range(4)]
    for split in ("train", "valid", "test"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chat),
                                             encoding="utf-8")
    hc3 = [{"question": f"什么是{i}？", "human_answers": [f"答案\u2028{i}。"]} for i in range(6)]
    (root / "hc3.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in hc3), encoding="utf-8")
    return root


def command(name, model_dir, adapter_dir, data_dir, out):
    """argv of each command that writes an output, into `out`."""
    return {
        "convert": ["convert", model_dir, out],
        "convert-to-hf": ["convert-to-hf", model_dir, out, "--dtype", "float32"],
        "convert-to-gguf": ["convert-to-gguf", model_dir, out, "--type", "f32"],
        "fuse": ["fuse", "--model", model_dir, "--adapter", adapter_dir, out],
        "quantize": ["quantize", model_dir, out, "--bits", "8", "--group-size", "32", "--no-eval",
                     "--calibration", "none", "--keep-embedding"],
        "train": ["train", "--model", model_dir, "--data", data_dir, "--out", out, "--iters", "1", "--batch-size", "1",
                  "--rank", "2", "--max-seq-len", "32", "--eval-every", "0", "--save-every", "0", "--no-test",
                  "--no-report"],
        "data hc3": ["data", "hc3", data_dir / "hc3.jsonl", out],
    }[name]


COMMANDS = ["convert", "convert-to-hf", "convert-to-gguf", "fuse", "quantize", "train", "data hc3"]


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs at tmp_path/disk, unmounted afterwards; skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0777", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the patched tests cover this case")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


# ---- 1. one JSONL reader, split on "\n" only ------------------------------------------------------

# Characters str.splitlines() breaks lines on, mixed into every string often enough to matter.
BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def json_records(surrogates: bool):
    """Lists of JSON objects; strings may hold lone surrogates only when `surrogates` (json.dumps
    writes them escaped with ensure_ascii, while no UTF-8 file can hold them raw)."""
    chars = st.characters(exclude_categories=() if surrogates else ("Cs",)) | st.sampled_from(BREAKS)
    text = st.text(chars)
    values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
        max_leaves=12)
    return st.lists(st.dictionaries(text, values, max_size=5), max_size=6)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), ensure_ascii=st.booleans(), crlf=st.booleans())
def test_jsonl_reader_reads_back_whatever_json_dumps_wrote(tmp_path_factory, data, ensure_ascii, crlf):
    records = data.draw(json_records(surrogates=ensure_ascii))
    path = tmp_path_factory.getbasetemp() / "property.jsonl"  # one file, rewritten by every example
    end = "\r\n" if crlf else "\n"
    path.write_bytes("".join(json.dumps(r, ensure_ascii=ensure_ascii) + end for r in records).encode("utf-8"))
    assert [r for _, r in read_records(path)] == records


def test_line_separators_inside_strings_are_not_line_breaks(tmp_path):
    path = tmp_path / "d.jsonl"
    odd = "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg\x1dh\x1ei"  # every character str.splitlines() breaks on
    path.write_text(json.dumps({"text": odd}, ensure_ascii=False) + "\n" + "{broken\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.jsonl:2: malformed JSON line"):  # line numbers count "\n" only
        read_records(path)
    path.write_text(json.dumps({"text": odd}, ensure_ascii=False) + "\n\n  \n", encoding="utf-8")
    assert [r for _, r in read_records(path)] == [{"text": odd}]


def test_hc3_output_with_line_separators_trains_evaluates_and_calibrates(data_dir, model_dir, tokenizer, tmp_path):
    from mlx_gemma.quant.calibration import _source_ids
    from mlx_gemma.training.hc3 import hc3_to_chat

    hc3_to_chat(data_dir / "hc3.jsonl", tmp_path / "chat", test_size=0.0, valid_size=0.0)
    back = [r for _, r in read_records(tmp_path / "chat" / "train.jsonl")]
    assert sorted(r["messages"][-1]["content"] for r in back) == [f"答案\u2028{i}。" for i in range(6)]
    result = run("evaluate", "--model", model_dir, "--data", tmp_path / "chat" / "train.jsonl", "--max-seq-len", "64")
    assert result.exit_code == 0, result.output
    assert "6 records" not in result.output and "perplexity" in result.output
    assert len(_source_ids(tmp_path / "chat" / "train.jsonl", tokenizer)) > 6 * 10


# ---- 2. refused writes: one line naming the output and the cause, nothing left ---------------------


@pytest.mark.parametrize("name", COMMANDS)
def test_output_under_a_file(name, model_dir, adapter_dir, data_dir, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out"
    line = error_line(run(*command(name, model_dir, adapter_dir, data_dir, out)))
    assert str(tmp_path / "file") in line and "is a file, not a folder" in line, line
    assert everything(tmp_path) == ["file"]


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_full_disk(name, model_dir, adapter_dir, data_dir, small_disk):
    with open(small_disk / "filler", "wb") as f:  # fill the disk up
        try:
            f.write(b"\0" * (1 << 20))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    out = small_disk / "out"
    line = error_line(run(*command(name, model_dir, adapter_dir, data_dir, out)))
    assert line.startswith(f"error: cannot write {out}") and "no space left on device" in line, line
    assert everything(small_disk) == ["filler"]


@pytest.mark.parametrize("name", COMMANDS)
def test_read_only_disk(name, model_dir, adapter_dir, data_dir, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = small_disk / "out"
    line = error_line(run(*command(name, model_dir, adapter_dir, data_dir, out)))
    assert str(out) in line and "read-only file system" in line, line
    assert everything(small_disk) == []


def test_full_disk_patched_mlx_write(model_dir, tmp_path, monkeypatch):
    """MLX's own message on a full disk, `[write] Unable to write N bytes to file.`, after part of the
    file went out; the free space the partial file left is what tells the cause."""
    real_save = mx.save_safetensors

    def full(path, arrays, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)
        raise RuntimeError("[write] Unable to write 4634398 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full)
    monkeypatch.setattr(files, "_free_bytes", lambda folder: 512)
    out = tmp_path / "out"
    line = error_line(run("convert", model_dir, out))
    assert line == (f"error: cannot write {out}: no space left on device; free some space or choose another "
                    "folder")
    assert everything(tmp_path) == []
    monkeypatch.setattr(mx, "save_safetensors", real_save)


def test_full_disk_patched_python_write(data_dir, tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "splits"
    line = error_line(run("data", "hc3", data_dir / "hc3.jsonl", out))
    assert line == f"error: cannot write {out}: no space left on device; free some space or choose another folder"
    assert everything(tmp_path) == []


def test_full_disk_inside_the_output_dir_names_the_output(model_dir, tmp_path, monkeypatch):
    """A file the output dir's writer itself writes atomically (the tokenizer) meets a full disk:
    the line names the file as it would be in the output, not the hidden temporary dir."""
    from mlx_gemma.tokenizer import GemmaTokenizer

    def full(self, directory):
        def write(tmp):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)

        files.write_atomic(Path(directory) / "tokenizer.model", write)

    monkeypatch.setattr(GemmaTokenizer, "save", full)
    out = tmp_path / "out"
    line = error_line(run("convert", model_dir, out))
    assert line == (f"error: cannot write {out / 'tokenizer.model'}: no space left on device; free some space or "
                    "choose another folder")
    assert everything(tmp_path) == []


def test_read_only_folder_patched(model_dir, tmp_path, monkeypatch):
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(files.os, "mkdir", read_only)
    out = tmp_path / "out"
    line = error_line(run("convert", model_dir, out))
    assert line == f"error: cannot write {out}: read-only file system; choose a folder on a writable disk"
    assert everything(tmp_path) == []


def test_unwritable_model_cache(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MLX_GEMMA_HOME", str(tmp_path / "file" / "home"))
    line = error_line(run("generate", "--prompt", "hi"))  # the default model converts into the cache
    assert line == (f"error: cannot create the model cache {tmp_path / 'file' / 'home' / 'models'}: "
                    f"{tmp_path / 'file'} is a file, not a folder; set MLX_GEMMA_HOME to a writable folder")
    assert everything(tmp_path) == ["file"]


def test_other_os_errors_are_one_line():
    """What no writer words itself reaches the CLI's handler as an OSError; its line names the
    file(s) and the cause."""
    assert files.describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/d/f")) == \
        "/d/f: no space left on device; free some space or choose another folder"
    assert files.describe_os_error(OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")) == \
        "/a -> /b: invalid cross-device link"
    assert files.describe_os_error(OSError("disk went away")) == "disk went away"


# ---- 3. SIGTERM and SIGKILL: no temporaries left --------------------------------------------------

SLOW_HC3 = """
import pathlib, sys, time
from mlx_gemma.cli import main

write_text = pathlib.Path.write_text
def slow(self, *args, **kwargs):
    n = write_text(self, *args, **kwargs)
    print("writing", self, flush=True)
    time.sleep(60)
    return n
pathlib.Path.write_text = slow
main(sys.argv[1:])
"""


def start_slow_hc3(data_dir, out):
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_HC3), "data", "hc3", str(data_dir / "hc3.jsonl"),
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("writing"), (line, proc.stderr.read() if proc.poll() is not None else "")
    temp = Path(line.split(maxsplit=1)[1].strip()).parent
    assert temp.parent == out.parent and temp.name.startswith(f".{out.name}.tmp-{proc.pid}-") and temp.is_dir()
    return proc, temp


def test_sigterm_removes_the_temporary_output(data_dir, tmp_path):
    out = tmp_path / "splits"
    proc, temp = start_slow_hc3(data_dir, out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and stderr.strip() == "terminated", stderr
    assert everything(tmp_path) == []


def test_stale_temporaries_of_killed_runs_are_removed_by_the_next_run(data_dir, tmp_path):
    out = tmp_path / "splits"
    proc, temp = start_slow_hc3(data_dir, out)
    proc.kill()
    proc.communicate(timeout=60)
    assert temp.exists()  # SIGKILL: nothing could clean up
    result = run("data", "hc3", data_dir / "hc3.jsonl", out)
    assert result.exit_code == 0, result.output
    assert not temp.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["splits"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_stale_temps_only_touches_dead_writers(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    (tmp_path / f".out.tmp-{dead}-0123abcd").mkdir()
    (tmp_path / f".out.tmp-{dead}-0123abcd" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / f".w.tmp-{dead}-89abcdef.safetensors").write_bytes(b"half")
    (tmp_path / f".live.tmp-{alive}-0123abcd").mkdir()  # a writer still running
    (tmp_path / f".kept.old-{dead}-0123abcd").mkdir()  # moved aside, new one never arrived: put back
    (tmp_path / f".done.old-{dead}-0123abcd").mkdir()  # moved aside, new one in place: remove
    (tmp_path / "done").mkdir()
    (tmp_path / ".hidden.tmp-notapid-0123abcd").mkdir()  # not one of ours
    (tmp_path / "notes.tmp-123-0123abcd").write_text("")  # not hidden: not one of ours
    removed = files.clean_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".out.tmp-{dead}-0123abcd", f".w.tmp-{dead}-89abcdef.safetensors",
                                                      f".done.old-{dead}-0123abcd"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".live.tmp-{alive}-0123abcd", "kept", "done", ".hidden.tmp-notapid-0123abcd", "notes.tmp-123-0123abcd"])


def test_write_atomic_cleans_its_folder_first(tmp_path):
    (tmp_path / f".a.tmp-{dead_pid()}-0123abcd.json").write_text("{")
    files.write_json_atomic(tmp_path / "a.json", {"k": 1})
    assert everything(tmp_path) == ["a.json"]


# ---- 4. chat survives per-turn errors -------------------------------------------------------------


def prompt_counts(stderr: str) -> list:
    return [int(line.split()[1]) for line in stderr.splitlines() if line.startswith("prompt:")]


def test_chat_full_context_keeps_the_session(model_dir, tokenizer):
    from mlx_gemma.generation import ChatSession

    long = "word " * 80  # more than the 64-token context
    stdin = f"hi\n{long}\nhello\n/reset\nhi\n".encode()
    result = run("chat", "--model", model_dir, "--max-tokens", "3", stdin=stdin)
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "context is 64 tokens" in errors[0], errors
    assert errors[0].endswith("(type /reset to start a new conversation)"), errors
    # "hello" is answered as if the refused message had never been sent, and /reset still works
    session = ChatSession(loading.load(str(model_dir))[0], tokenizer, max_tokens=3)
    expected = []
    for text in ("hi", "hello"):
        list(session.send(text))
        expected.append(session.last_stats.prompt_tokens)
    assert prompt_counts(result.stderr) == expected + [expected[0]]


def test_chat_non_utf8_line_is_an_error_line(model_dir):
    result = run("chat", "--model", model_dir, "--max-tokens", "2", stdin=b"hi\ncaf\xe9\nhello\n")
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: input line 2: not UTF-8 text (byte 0xe9 at offset 3"), errors
    assert len(prompt_counts(result.stderr)) == 2  # both UTF-8 lines answered


# ---- 8. tracebacks that became error lines --------------------------------------------------------


def test_non_utf8_prompt_in_argv(model_dir):
    # Python hands undecodable argv bytes over as lone surrogates (PEP 383): "caf\xe9" -> "caf\udce9"
    line = error_line(run("generate", "--model", model_dir, "--prompt", "caf\udce9"))
    assert line.startswith("error: --prompt: not UTF-8 text (byte 0xe9 at character 4)"), line


def test_non_utf8_prompt_in_real_argv(tmp_path):
    """The same through a real process and real bytes; refused before any model is loaded."""
    proc = subprocess.run([sys.executable, "-m", "mlx_gemma.cli", "generate", "--model", str(tmp_path / "none"),
                           "--prompt", b"caf\xe9"], capture_output=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == b""
    assert proc.stderr.decode().startswith("error: --prompt: not UTF-8 text (byte 0xe9") and \
        len(proc.stderr.splitlines()) == 1, proc.stderr


def test_non_utf8_prompt_on_stdin(model_dir):
    line = error_line(run("generate", "--model", model_dir, "--prompt", "-", stdin=b"\xff\xfe hi"))
    assert line.startswith("error: --prompt - (stdin): not UTF-8 text (byte 0xff at offset 0"), line


@pytest.mark.parametrize("cmd", ["evaluate", "quantize"])
def test_non_utf8_text_file(cmd, model_dir, tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes("un café crème".encode("latin-1"))
    args = (["evaluate", "--model", model_dir, "--text", text] if cmd == "evaluate" else
            ["quantize", model_dir, tmp_path / "q", "--text", text, "--bits", "8", "--group-size", "32"])
    line = error_line(run(*args))
    assert line.startswith(f"error: {text}: not UTF-8 text (byte 0xe9 at offset 6"), line
    assert everything(tmp_path) == ["latin1.txt"]


def test_evaluate_batch_size_zero_before_the_load(tmp_path):
    line = error_line(run("evaluate", "--model", tmp_path / "none", "--data", tmp_path, "--batch-size", "0"))
    assert line == "error: --batch-size must be at least 1, got 0"


@pytest.mark.parametrize("seed", ["-1", str(2 ** 64)])
def test_generate_seed_out_of_range(seed, tmp_path):
    line = error_line(run("generate", "--model", tmp_path / "none", "--prompt", "hi", "--seed", seed))
    assert line == f"error: seed must be an integer in [0, 2**64), got {seed}"


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", "32", "hidden_size must be an integer, got '32' (str)"),
    ("num_key_value_heads", 0, "num_key_value_heads must be at least 1, got 0"),
    ("rms_norm_eps", "tiny", "rms_norm_eps must be a number, got 'tiny' (str)"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false, got 'yes' (str)"),
    ("num_hidden_layers", True, "num_hidden_layers must be an integer, got True (bool)"),
])
def test_config_field_types(field, value, message, model_dir, tmp_path):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config[field] = value
    (bad / "config.json").write_text(json.dumps(config))
    line = error_line(run("generate", "--model", bad, "--prompt", "hi"))
    assert line == f"error: {bad / 'config.json'}: {message}"


def test_config_accepts_json_numbers_and_numpy_scalars():
    import numpy as np

    config = GemmaConfig.from_dict({**TINY, "rope_theta": 10000, "hidden_size": np.int64(32),
                                    "rms_norm_eps": np.float32(1e-6)})
    assert config.rope_theta == 10000 and config.head_dim == 16


# ---- 9. clearer messages -------------------------------------------------------------------------


def test_adapter_that_is_a_file(model_dir, adapter_dir):
    weights = adapter_dir / "adapter_model.safetensors"
    line = error_line(run("generate", "--model", model_dir, "--prompt", "hi", "--adapter", weights))
    assert line.startswith(f"error: adapter {weights} is a file, not an adapter dir") and str(adapter_dir) in line


@pytest.mark.parametrize("cmd", ["evaluate", "train"])
def test_data_that_is_not_a_regular_file(cmd, model_dir, tmp_path):
    args = (["evaluate", "--model", tmp_path / "none", "--data", "/dev/null"] if cmd == "evaluate" else
            ["train", "--model", model_dir, "--data", "/dev/null", "--out", tmp_path / "a", "--no-report"])
    line = error_line(run(*args))
    assert line.startswith("error: /dev/null: not a regular file (a device, pipe or socket)"), line
    assert everything(tmp_path) == []


@pytest.mark.parametrize("args,message", [
    (["--max-seq-len", "0"], "error: --max-seq-len must be at least 2 (a token and the one it predicts), got 0"),
    (["--text", "EMPTY"], "the file has no text to score"),
])
def test_quantize_checks_before_the_model_load(args, message, tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\n")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    line = error_line(run("quantize", tmp_path / "no-such-model", tmp_path / "q", *args))  # no model: not loaded
    assert message in line, line
    assert everything(tmp_path) == ["empty.txt"]


@pytest.mark.parametrize("size", ["0", "0B", "0.5B", "0.0001KB"])
def test_nonsense_shard_size(size, tmp_path):
    line = error_line(run("convert-to-hf", tmp_path / "no-such-model", tmp_path / "hf", "--max-shard-size", size))
    assert line == f"error: shard size {size!r} is below one byte; use e.g. 5GB or 500MB"
    assert everything(tmp_path) == []


@pytest.fixture(scope="module")
def tiny_gguf(model_dir, tmp_path_factory):
    from mlx_gemma.export import convert_to_gguf

    return convert_to_gguf(str(model_dir), tmp_path_factory.mktemp("gguf") / "tiny.gguf", out_type="f32")


@pytest.fixture
def tiny_alias(tiny_gguf, tmp_path, monkeypatch):
    """An alias like gemma-3-270m whose 'package' assembles a GGUF of the tiny model, with the cache
    in tmp_path/home (converted there on first use)."""
    gguf = tiny_gguf
    monkeypatch.setitem(sys.modules, "tiny_alias_pkg", types.SimpleNamespace(assemble=lambda: str(gguf)))
    monkeypatch.setitem(loading.ALIASES, "tiny-alias", {"package": "tiny_alias_pkg", "extra": "x",
                                                        "description": "test"})
    monkeypatch.setenv("MLX_GEMMA_HOME", str(tmp_path / "home"))
    first = run("generate", "--model", "tiny-alias", "--prompt", "hi", "--max-tokens", "2")
    assert first.exit_code == 0, first.output
    return tmp_path / "home" / "models" / "tiny-alias"


def damage_header(path: Path):
    """Overwrite 16 bytes of the safetensors JSON header: same size, unreadable."""
    with open(path, "r+b") as f:
        f.seek(9)
        f.write(b"#" * 16)


def test_damaged_alias_cache_is_detected_and_rebuilt(tiny_alias):
    manifest = json.loads((tiny_alias / "manifest.json").read_text())
    assert set(manifest["sha256"]) == set(manifest["sizes"]) >= {"model.safetensors", "config.json", "tokenizer.model"}
    damage_header(tiny_alias / "model.safetensors")
    result = run("generate", "--model", "tiny-alias", "--prompt", "hi", "--max-tokens", "2")
    assert result.exit_code == 0, result.output
    assert f"the cached tiny-alias at {tiny_alias} is damaged (model.safetensors changed since it was written)" \
        in result.stderr
    assert loading._cache_entry_problem(tiny_alias) is None
    assert sorted(p.name for p in tiny_alias.parent.iterdir()) == ["tiny-alias"]  # no temporaries


def test_damage_the_manifest_cannot_see_says_what_to_delete(tiny_alias):
    manifest = json.loads((tiny_alias / "manifest.json").read_text())
    (tiny_alias / "manifest.json").write_text(json.dumps({"sizes": manifest["sizes"]}))  # an old, size-only one
    damage_header(tiny_alias / "model.safetensors")
    line = error_line(run("generate", "--model", "tiny-alias", "--prompt", "hi"))
    assert line.startswith(f"error: the cached tiny-alias at {tiny_alias} is damaged: delete it (rm -r '{tiny_alias}') "
                           "and run again to convert it anew (") and "cannot read safetensors" in line, line


def test_alias_cache_check_costs_little(tiny_alias):
    start = time.perf_counter()
    for _ in range(5):
        assert loading._cache_entry_problem(tiny_alias) is None
    assert (time.perf_counter() - start) / 5 < 0.5


# ---- issue #32: options checked before the slow work, malformed inputs as one line ----------------


def cli(*args, timeout=600):
    """The real command line in a child process: (exit status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "mlx_gemma.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def one_line(code, stdout, stderr) -> str:
    assert code == 1 and stdout == "" and "Traceback" not in stderr, (code, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def train_args(model_dir, data_dir, out, *extra):
    return ["train", "--model", model_dir, "--data", data_dir, "--out", out, "--iters", "2", "--batch-size", "1",
            "--rank", "2", "--max-seq-len", "32", "--eval-every", "0", "--save-every", "1", "--no-test",
            "--no-report", *extra]


@pytest.fixture(scope="module")
def trained_run(model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    result = run(*train_args(model_dir, data_dir, out))
    assert result.exit_code == 0, result.output
    return out


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# every option that shapes the adapter or its step sequence, with a value other than the run's
RESUME_CHANGES = [("--rank", "4"), ("--alpha", "8"), ("--dropout", "0.2"), ("--targets", "q_proj,v_proj"),
                  ("--num-layers", "2"), ("--quantize-bits", "4"), ("--quantize-group-size", "32"),
                  ("--dtype", "float16"), ("--batch-size", "2"), ("--grad-accum", "2"), ("--max-seq-len", "48"),
                  ("--drop-long", None), ("--pack", None), ("--train-on-prompt", None), ("--seed", "7"),
                  ("--lr", "1e-3"), ("--min-lr", "1e-6"), ("--lr-schedule", "constant"), ("--warmup", "1"),
                  ("--weight-decay", "0.1"), ("--max-grad-norm", "0.5")]


@pytest.mark.slow
@pytest.mark.parametrize("flag,value", RESUME_CHANGES, ids=[f for f, _ in RESUME_CHANGES])
def test_resume_refuses_options_that_shaped_the_adapter(trained_run, flag, value):
    before = snapshot(trained_run)
    args = ["train", "--out", trained_run, "--resume", "--iters", "3", flag] + ([value] if value else [])
    line = error_line(run(*args))
    assert line.startswith(f"error: --resume: {flag} ") and "differs from the run in" in line, line
    assert str(trained_run / "train_config.json") in line and "--force" in line, line
    assert snapshot(trained_run) == before


@pytest.mark.slow
def test_resume_rank_through_the_real_cli(trained_run):
    """The issue's case: a rank-2 run resumed with --rank 8 (it exited 0 and wrote r=8 over rank-2 weights)."""
    before = snapshot(trained_run)
    line = one_line(*cli("train", "--out", trained_run, "--resume", "--rank", "8"))
    assert line == (f"error: --resume: --rank 8 differs from the run in {trained_run / 'train_config.json'} "
                    "(--rank 2); a resumed run keeps the options that shaped its adapter: drop --rank, or start a "
                    "new run (another --out, or --force)")
    assert snapshot(trained_run) == before


@pytest.mark.slow
def test_resume_with_the_same_options_and_more_steps_runs(trained_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    result = run("train", "--out", out, "--resume", "--rank", "2", "--lr", "2e-4", "--iters", "3")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert run("generate", "--model", json.loads((out / "train_config.json").read_text())["model"], "--adapter", out,
               "--prompt", "hi", "--max-tokens", "2").exit_code == 0


@pytest.mark.slow
def test_rank_above_the_layer_sizes_is_refused_before_the_load(model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    line = one_line(*cli(*train_args(model_dir, data_dir, out, "--rank", "100000")))
    assert line == ("error: --rank 100000 is above what LoRA can use on this model: k_proj maps 32 to 16 features, "
                    "so its update has rank at most 16; use --rank 16 or less")
    assert everything(tmp_path) == []


def test_rank_memory_estimate_on_the_270m():
    """Within the layer sizes, a rank whose LoRA weights, gradients and AdamW state outgrow the memory."""
    from mlx_gemma.training.args import TrainArgs, check_rank

    config = loading.read_config(loading.resolve("gemma-3-270m"))
    args = TrainArgs(rank=256, targets="all-linear")
    check_rank(args, config)  # this machine's memory holds it
    params = config.num_hidden_layers * 256 * sum(
        a + b for a, b in [(640, 1024), (640, 256), (640, 256), (1024, 640), (640, 2048), (640, 2048), (2048, 640)])
    with pytest.raises(UserError, match=f"--rank 256 trains {params:,} LoRA parameters: about "):
        check_rank(args, config, memory_bytes=params * 16 - 1)
    check_rank(args, config, memory_bytes=params * 16)


@pytest.mark.slow
@pytest.mark.parametrize("value", ["0", "-1", "abc", "1000"])
def test_ranks_is_bounded_with_one_error_line(value, model_dir, data_dir, tmp_path):
    line = one_line(*cli(*train_args(model_dir, data_dir, tmp_path / "out", "--ranks", value)))
    cores = os.cpu_count()
    if value == "1000":
        assert line.startswith(f"error: --ranks 1000 is more than this machine's {cores} cores"), line
    else:
        assert line == f"error: --ranks must be a whole number of processes from 1 to {cores}, got {value!r}"
    assert everything(tmp_path) == []


def test_unwritable_out_is_refused_before_the_model_loads(data_dir, tmp_path, monkeypatch):
    """--model does not exist: the --out error coming first shows the check runs before the load."""
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    out = tmp_path / "out"
    line = error_line(run(*train_args(tmp_path / "no-such-model", data_dir, out)))
    assert line == f"error: cannot write {out}: read-only file system; choose a folder on a writable disk"
    assert everything(tmp_path) == []


@pytest.mark.slow
def test_read_only_out_through_the_real_cli(data_dir, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = small_disk / "run"
    line = one_line(*cli(*train_args(small_disk / "no-such-model", data_dir, out)))
    assert line.startswith(f"error: cannot write {out}: read-only file system"), line


BAD_TOKENIZER_JSON = [
    ("[]", "the file must hold a JSON object, got list"), ("5", "the file must hold a JSON object, got int"),
    ("null", "the file must hold a JSON object, got NoneType"), ('{"model": 5}', "model must be an object"),
    ('{"model": {"type": "BPE", "vocab": "abc"}}', "model.vocab must map pieces to token ids"),
    ('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a"]], "unk_token": "a"}, "normalizer": '
     '{"type": "Replace", "pattern": {"String": " "}, "content": "\\u2581"}}', "merge 0 (['a']) is not a pair"),
    ('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [5]}}', "model.merges must be a list"),
    ('{"added_tokens": {"id": 1}}', "added_tokens must be a list of {id, content} objects"),
]


@pytest.mark.parametrize("text,needle", BAD_TOKENIZER_JSON, ids=[t[:24] for t, _ in BAD_TOKENIZER_JSON])
def test_malformed_tokenizer_json_is_one_line(text, needle, model_dir, tmp_path):
    import shutil

    src = tmp_path / "hf"
    shutil.copytree(model_dir, src)
    (src / "tokenizer.model").unlink()
    (src / "tokenizer.json").write_text(text)
    line = error_line(run("convert", src, tmp_path / "out"))
    assert line.startswith(f"error: {src / 'tokenizer.json'}: ") and needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_hc3_lone_surrogate_names_the_record(tmp_path):
    src = tmp_path / "hc3.jsonl"
    src.write_text('{"question": "q1", "human_answers": ["a1"]}\n'
                   '{"question": "q2", "human_answers": ["fine", "x"]}\n'
                   '{"question": "q3", "human_answers": ["caf\\udce9"]}\n')
    line = one_line(*cli("data", "hc3", src, tmp_path / "out"))
    assert line == (f"error: {src}:3: 'human_answers' holds a lone surrogate (\\udce9 at character 4), which is not "
                    "text; fix or drop the record")
    assert everything(tmp_path) == ["hc3.jsonl"]


def test_generate_temp_underflow_is_greedy_and_huge_values_are_refused(model_dir):
    greedy = run("generate", "--model", model_dir, "--prompt", "hi", "--max-tokens", "6", "--raw")
    tiny = run("generate", "--model", model_dir, "--prompt", "hi", "--max-tokens", "6", "--raw", "--temp", "1e-300",
               "--seed", "1")
    assert greedy.exit_code == tiny.exit_code == 0 and greedy.stdout == tiny.stdout, (greedy.output, tiny.output)
    for flag, value, needle in [("--temp", "1e300", "temp must be at most 10000"),
                                ("--temp", "1" * 400, "temp must be a finite number"),
                                ("--repetition-penalty", "1e-300", "repetition_penalty must be in [0.01, 100]"),
                                ("--repetition-window", str(10 ** 30), "repetition_window must be in [1, 2**31)"),
                                ("--top-p", "nan", "top_p must be a finite number")]:
        line = error_line(run("generate", "--model", model_dir, "--prompt", "hi", flag, value))
        assert needle in line, line
