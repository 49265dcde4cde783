"""mlx_gemma.files: atomic file and directory writes (no half-written output, usual permissions)."""

import json
import os
import stat

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma import files
from mlx_gemma.errors import UserError
from mlx_gemma.files import atomic_output_dir, write_atomic, write_json_atomic


def names(folder):
    """Everything in `folder`, hidden temp names included."""
    return sorted(p.name for p in folder.iterdir())


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    """Run the test under a known umask (two, so a hard-coded 0o644 / 0o755 cannot pass)."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


class Boom(Exception):
    pass


# ---- write_atomic / write_json_atomic ----------------------------------------------------------


def test_write_atomic_bytes_str_and_callable(tmp_path):
    assert write_atomic(tmp_path / "a.bin", b"\x00\x01") == tmp_path / "a.bin"
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    write_atomic(str(tmp_path / "b.txt"), "héllo\r\n")  # str paths too; UTF-8, no newline translation
    assert (tmp_path / "b.txt").read_bytes() == "héllo\r\n".encode("utf-8")
    write_atomic(tmp_path / "b.txt", bytearray(b"new"))  # replaces an existing file
    assert (tmp_path / "b.txt").read_bytes() == b"new"
    assert names(tmp_path) == ["a.bin", "b.txt"]


def test_callable_gets_a_fresh_hidden_name_with_the_same_suffix(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert not os.path.exists(tmp)
        with open(tmp, "wb") as f:
            f.write(b"x")

    write_atomic(tmp_path / "w.safetensors", write)
    tmp = seen[0]
    assert os.path.dirname(tmp) == str(tmp_path)
    assert os.path.basename(tmp).startswith(".") and tmp.endswith(".safetensors")
    # the reason for the suffix: mx.save_safetensors appends ".safetensors" to a path without it
    write_atomic(tmp_path / "m.safetensors", lambda t: mx.save_safetensors(t, {"a": mx.arange(3)}))
    assert mx.load(str(tmp_path / "m.safetensors"))["a"].tolist() == [0, 1, 2]
    assert names(tmp_path) == ["m.safetensors", "w.safetensors"]


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path, error):
    target = tmp_path / "data.json"
    target.write_text("old")

    def half_write(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise error()

    with pytest.raises(error):
        write_atomic(target, half_write)
    assert target.read_text() == "old"
    assert names(tmp_path) == ["data.json"]

    with pytest.raises(error):  # and with no file there before: still nothing there after
        write_atomic(tmp_path / "new.bin", half_write)
    assert names(tmp_path) == ["data.json"]


def test_failed_rename_leaves_no_temp(tmp_path):
    (tmp_path / "taken").mkdir()  # a file cannot be renamed over a directory
    with pytest.raises(OSError):
        write_atomic(tmp_path / "taken", b"x")
    assert names(tmp_path) == ["taken"] and names(tmp_path / "taken") == []


def test_write_json_atomic_format(tmp_path):
    write_json_atomic(tmp_path / "c.json", {"名": [1, 2], "b": None})
    text = (tmp_path / "c.json").read_text(encoding="utf-8")
    assert text == '{\n  "名": [\n    1,\n    2\n  ],\n  "b": null\n}\n'
    assert json.loads(text) == {"名": [1, 2], "b": None}


def test_unserializable_json_leaves_the_old_file(tmp_path):
    write_json_atomic(tmp_path / "c.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "c.json", {"a": object()})
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": 1}
    assert names(tmp_path) == ["c.json"]


def test_files_get_the_umask_permissions(tmp_path, umask):
    write_atomic(tmp_path / "a", b"x")
    write_atomic(tmp_path / "b.safetensors", lambda t: mx.save_safetensors(t, {"a": mx.zeros(2)}))
    write_json_atomic(tmp_path / "c.json", [])
    for name in ("a", "b.safetensors", "c.json"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name


# ---- atomic_output_dir -------------------------------------------------------------------------


def test_output_dir_is_created_with_umask_permissions(tmp_path, umask):
    out = tmp_path / "deeper" / "out"  # missing parents are made
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".") and tmp.is_dir()
        assert names(tmp) == []
        assert not out.exists()  # nothing at the final path until the block is done
        (tmp / "f.txt").write_text("new")
        write_atomic(tmp / "g.bin", b"g")
    assert names(out) == ["f.txt", "g.bin"]
    assert names(out.parent) == ["out"]
    assert mode(out) == 0o777 & ~umask
    assert mode(out / "g.bin") == 0o666 & ~umask


def test_existing_output_dir_without_force_is_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(UserError) as e:
        with atomic_output_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
    message = str(e.value)
    assert str(out) in message and "force=True" in message and "\n" not in message
    assert names(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    assert names(tmp_path) == ["out"]


def test_force_replaces_an_existing_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "keep.txt").read_text() == "old"  # the old dir stays until the new one is done
    assert names(out) == ["new.txt"]
    assert names(tmp_path) == ["out"]  # the old dir, moved aside, is gone too


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("existed", [False, True])
def test_failure_in_the_block_keeps_the_old_dir_and_leaves_no_temp(tmp_path, error, existed):
    out = tmp_path / "out"
    if existed:
        out.mkdir()
        (out / "keep.txt").write_text("old")
    with pytest.raises(error):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "half.txt").write_text("half")
            raise error()
    if existed:
        assert names(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
        assert names(tmp_path) == ["out"]
    else:
        assert names(tmp_path) == []


def test_failed_final_rename_puts_the_old_dir_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in os.path.basename(src):  # the new dir's rename, after the old one moved aside
            raise OSError("disk went away")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="disk went away"):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert names(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    assert names(tmp_path) == ["out"]


def test_a_file_at_the_output_path_is_refused_even_with_force(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(UserError, match="not a directory"):
        with atomic_output_dir(tmp_path / "out", force=True):
            pass
    assert (tmp_path / "out").read_text() == "a file"
    assert names(tmp_path) == ["out"]


def test_output_that_appears_meanwhile_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="force=True"):
        with atomic_output_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            out.mkdir()  # another process got there first
    assert names(out) == []
    assert names(tmp_path) == ["out"]


# ---- the writers that use this module ----------------------------------------------------------


def test_module_outputs_get_the_umask_permissions(tmp_path, umask):
    from mlx_gemma.training.hc3 import hc3_to_chat
    from mlx_gemma.training.plot import write_loss_curve

    src = tmp_path / "hc3.jsonl"
    src.write_text("".join(json.dumps({"question": f"问{i}？", "human_answers": [f"答{i}"]},
                                      ensure_ascii=False) + "\n" for i in range(10)), encoding="utf-8")
    out = tmp_path / "chat"
    hc3_to_chat(src, out)
    assert mode(out) == 0o777 & ~umask
    assert all(mode(p) == 0o666 & ~umask for p in out.iterdir())
    write_loss_curve(tmp_path / "loss.png", [(1, 2.0), (2, 1.5)])
    assert mode(tmp_path / "loss.png") == 0o666 & ~umask
    assert names(tmp_path) == ["chat", "hc3.jsonl", "loss.png"]


def test_loss_figure_shows_smoothed_train_validation_from_step_0_tokens_and_epochs():
    """What loss.png promises, read back from the matplotlib figure: the raw and the smoothed
    training curve, every validation point (step 0, the base model, included), a second x axis
    in tokens, and a marker where each new epoch starts (taken from metrics.jsonl records)."""
    from mlx_gemma.training.plot import epoch_starts, render_loss_figure, smooth

    metrics = [{"step": s, "epoch": (s - 1) // 4, "loss": 3.0 - 0.1 * s + 0.3 * (s % 2), "tokens": 100}
               for s in range(1, 11)]
    metrics += [{"step": 0, "val_loss": 3.5}, {"step": 5, "val_loss": 2.9}, {"step": 10, "val_loss": 2.7}]
    assert epoch_starts(metrics) == [5, 9]
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    fig = render_loss_figure(train, [(0, 3.5), (5, 2.9), (10, 2.7)], tokens_per_step=100.0,
                             epoch_starts=epoch_starts(metrics))
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["train (raw)"].get_ydata()) == [y for _, y in train]
    smoothed = lines["train (smoothed)"].get_ydata()
    np.testing.assert_allclose(smoothed, smooth([y for _, y in train]))
    assert np.std(np.diff(smoothed)) < np.std(np.diff([y for _, y in train]))  # smoother than the raw curve
    assert list(lines["validation"].get_xdata()) == [0, 5, 10]
    epochs = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert sorted(line.get_xdata()[0] for line in epochs) == [5, 9]
    top = [a for a in ax.child_axes if "tokens" in a.get_xlabel()]
    assert top and top[0].get_xlabel() == "training tokens (real, unpadded)"
