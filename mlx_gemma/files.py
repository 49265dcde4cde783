"""Write files and directories so that readers never see half-written output.

Every writer here builds its output under a temporary name in the target's own folder and
renames it into place only when it is complete. The rename is atomic because both names are
on the same file system, so a reader sees the old content or the new, never a mix; a failed
or interrupted write removes its temporary and leaves the previous content where it was.

Created files and directories get the usual permissions, 0o666 / 0o777 minus the umask, like
any file `open()` creates -- not the 0600 / 0700 of `tempfile.mkstemp` / `mkdtemp`, which
would stay on the output after the rename.

Scope: this protects readers from failed and interrupted processes. It does not fsync, so it
promises nothing about a power cut or an OS crash.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

from .errors import UserError

Content = Union[bytes, bytearray, memoryview, str, Callable[[str], object]]


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents (a leading BOM dropped); unreadable or non-UTF-8 files raise a
    one-line UserError naming the file."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def _temp_name(path: Path, kind: str) -> Path:
    """A fresh hidden name beside `path`: `.{stem}.{kind}-{pid}-{hex}{suffix}`.

    The suffix is kept because some writers decide the format by it, or append their own when
    it is missing (mx.save_safetensors adds ".safetensors", so the file would land elsewhere).
    The pid and random part keep concurrent writers of the same target apart; the leading dot
    keeps the name out of globs such as `*.safetensors`.
    """
    return path.with_name(f".{path.stem}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def _remove(path: Path) -> None:
    """Delete a file, a symlink or a whole directory tree, whichever `path` is; quiet if gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def write_atomic(path: str | os.PathLike, content: Content) -> Path:
    """Write `content` to `path` all at once: readers see the old file or the complete new one.

    content: bytes-like (written as is), str (written as UTF-8, no newline translation), or a
        callable `write(tmp)` that gets the temporary path as a str -- which does not exist
        yet and has the same suffix as `path` -- and must create the complete file there.
    The folder of `path` must exist. A file already at `path` is replaced.
    Returns `path` as a Path. On any exception (KeyboardInterrupt included) the temporary
    file is removed, the previous file at `path`, if any, is left unchanged, and the
    exception propagates.
    """
    path = Path(path)
    tmp = _temp_name(path, "tmp")
    try:
        if callable(content):
            content(str(tmp))
        else:
            data = content.encode("utf-8") if isinstance(content, str) else content
            # "x": never write through a name that is somehow there already. Plain open(), not
            # mkstemp, so the mode is 0o666 & ~umask.
            with open(tmp, "xb") as f:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as JSON (indent=2, non-ASCII kept as is, trailing newline) with `write_atomic`.

    The object is serialized before anything is written, so an unserializable value raises
    (TypeError / ValueError) and leaves `path` untouched. Returns `path` as a Path.
    """
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    return write_atomic(path, text)


def check_new_output_dir(path: Path, force: bool) -> None:
    """Raise UserError if `path` exists (unless force) or is not a directory; checks an output
    dir before slow work, as `atomic_output_dir` does again when writing."""
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise UserError(f"{path} already exists; choose another output path or pass " "{force} to overwrite it",
                        force=True)
    if not path.is_dir():
        # force replaces an output dir; a file there is more likely a wrong path than an old output.
        raise UserError(f"{path} exists and is not a directory; choose another output path")


@contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """`with atomic_output_dir(path, force) as tmp:` fill the directory `tmp`; it becomes `path`.

    `tmp` is a new, empty directory beside `path` (same file system), created with the usual
    0o777 & ~umask permissions; missing parent folders of `path` are created.

    When the block finishes, `tmp` is renamed to `path`. An existing `path` is first renamed
    aside, then deleted once the new directory is in place, so at every moment `path` holds
    either the complete old directory or the complete new one.

    When the block raises (KeyboardInterrupt included), `tmp` is deleted, `path` is left as it
    was (nothing is created there), and the exception propagates.

    Raises:
        UserError: `path` exists and force is False (checked on entry and again before the
            rename, in case something created it meanwhile), or `path` exists and is not a
            directory.
    """
    path = Path(path)
    check_new_output_dir(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    # os.mkdir applies the umask itself; mkdtemp's 0700 would need a chmod, and finding the
    # umask means setting it for a moment, which races with other threads creating files.
    os.mkdir(tmp)
    try:
        yield tmp
        check_new_output_dir(path, force)
        if not (path.exists() or path.is_symlink()):
            os.replace(tmp, path)
            return
        old = _temp_name(path, "old")
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)  # put the old directory back rather than leave nothing at path
            raise
        _remove(old)
    except BaseException:
        _remove(tmp)
        raise
