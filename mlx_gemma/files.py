"""Write files and directories so that readers never see half-written output.

Every writer here builds its output under a temporary name in the target's own folder and
renames it into place only when it is complete. The rename is atomic because both names are
on the same file system, so a reader sees the old content or the new, never a mix; a failed
or interrupted write removes its temporary and leaves the previous content where it was.

Created files and directories get the usual permissions, 0o666 / 0o777 minus the umask, like
any file `open()` creates -- not the 0600 / 0700 of `tempfile.mkstemp` / `mkdtemp`, which
would stay on the output after the rename.

A write the operating system refuses (full disk, read-only or unwritable folder, a file where a
folder should be) raises `WriteError`: a UserError whose one line names the output and the cause,
and still an OSError for callers that catch those. MLX reports its own failed writes as
`RuntimeError: [write] Unable to write N bytes to file.` without path or cause; those are
translated too, the cause found by looking at the folder (free space, read-only mount).

Temporaries are named `.{stem}.tmp-{pid}-{hex}{suffix}` (and `.old-` for a directory moved aside
during a replacement). A process killed outright (SIGKILL, power loss of the process, not of the
machine) cannot remove its own; the next write into the same folder removes the temporaries of
processes that are no longer running (see `clean_stale_temps`).

Scope: this protects readers from failed and interrupted processes. It does not fsync, so it
promises nothing about a power cut or an OS crash.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

from .errors import UserError


def home_dir() -> Path:
    """mlx-gemma's cache root: $MLX_GEMMA_HOME, default ~/.cache/mlx-gemma."""
    return Path(os.environ.get("MLX_GEMMA_HOME", Path.home() / ".cache" / "mlx-gemma")).expanduser()


Content = Union[bytes, bytearray, memoryview, str, Callable[[str], object]]


def decode_utf8(data: bytes, where: str, fix: str = "save it as UTF-8") -> str:
    """UTF-8 bytes as text (a leading BOM dropped); anything else raises a one-line UserError
    naming `where` (a file, "stdin", "input line 3"), the offending byte and the `fix`."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}: "
                        f"{exc.reason}); {fix}") from None


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents (a leading BOM dropped); unreadable or non-UTF-8 files raise a
    one-line UserError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({_cause(exc.errno, exc.strerror or str(exc))})") from None
    return decode_utf8(data, str(path))


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError that no writer here turned into a WriteError: the file(s) it names,
    the cause in words ("no space left on device") and what to do, when that is clear."""
    cause = _cause(exc.errno, exc.strerror or str(exc))
    names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n)
    blocker = None
    if exc.filename and exc.errno == errno.ENOTDIR:
        blocker = _file_in_the_way(Path(exc.filename))
    elif exc.filename and exc.errno == errno.EEXIST and os.path.isfile(exc.filename):  # mkdir over a file
        blocker = exc.filename
    if blocker is not None:
        return f"{names}: {blocker} is a file, not a folder; choose another path"
    advice = _ADVICE.get(exc.errno)
    return (f"{names}: {cause}" if names else cause) + (f"; {advice}" if advice else "")


class WriteError(UserError, OSError):
    """A write the operating system refused (full disk, read-only folder, a file where a folder
    should be). The message is one line naming the output and the cause; `errno` is kept."""


# MLX's own writers (mx.save_safetensors, mx.save, ...) raise RuntimeError("[write] Unable to
# write N bytes to file.") or RuntimeError("[save_safetensors] Failed to open file X"), no errno.
_MLX_WRITE_FAILURE = re.compile(r"^\[(write|save\w*)\] ")
_MLX_BYTES = re.compile(r"Unable to write (\d+) bytes")

# What to do about each cause, after "cannot write X: <cause>".
_ADVICE = {
    errno.ENOSPC: "free some space or choose another folder",
    errno.EDQUOT: "free some space or choose another folder",
    errno.EROFS: "choose a folder on a writable disk",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
}


def _cause(code: int | None, fallback: str) -> str:
    """'no space left on device' for ENOSPC: the C library's wording, lower-cased as in a sentence."""
    text = os.strerror(code) if code else fallback
    return text[:1].lower() + text[1:]


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _probe_errno(folder: Path, needed: int) -> int | None:
    """Why a write under `folder` failed when the writer did not say (MLX): read-only mount, no
    permission, or no space for the `needed` bytes it could not write. None when nothing shows."""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return errno.EROFS
    except OSError:
        pass
    if not os.access(folder, os.W_OK | os.X_OK):
        return errno.EACCES
    free = _free_bytes(folder)
    if free is not None and free < max(needed, 1):
        return errno.ENOSPC
    return None


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is a file, not a folder (mkdir then fails)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _about_output(name: Path, path: Path, tmp: Path | None) -> bool:
    """Whether a failing file name is the output, one of its folders, or inside its temporary."""
    if name == path or name in path.parents:
        return True
    return tmp is not None and (name == Path(tmp) or Path(tmp) in name.parents)


def write_cause(exc: OSError, path: Path) -> str:
    """Why writing `path` failed, in words: "F is a file, not a folder", "the folder F does not
    exist", or the system's own wording ("no space left on device")."""
    path = Path(path)
    code = exc.errno
    blocker = _file_in_the_way(path) if code in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT) else None
    if blocker is not None:
        return f"{blocker} is a file, not a folder"
    if code == errno.ENOENT and not path.parent.is_dir():
        return f"the folder {path.parent} does not exist"
    return _cause(code, exc.strerror or str(exc))


def write_error(exc: BaseException, path: Path, tmp: Path | None = None) -> WriteError | None:
    """The WriteError for `exc` raised while writing `path` (through the temporary `tmp`), or None
    when `exc` is not a failed write (a bug or a user error keeps its own exception).

    Call it before removing `tmp`: for MLX's errors the cause is read from the disk, and the
    partial file still takes its space. An OSError about some other file (a source read lazily
    during the write) names that file instead of `path`.
    """
    path = Path(path)
    if isinstance(exc, WriteError) and tmp is not None and str(tmp) in str(exc):
        # A file inside this temporary dir (written atomically itself) failed: name it as it
        # would have been in the output, not by the hidden temporary name.
        error = WriteError(str(exc).replace(str(tmp), str(path)))
        error.errno = exc.errno
        return error
    if isinstance(exc, OSError) and not isinstance(exc, UserError):
        code = exc.errno
        if exc.filename and not _about_output(Path(exc.filename), path, tmp):
            error = WriteError(f"{exc.filename}: {_cause(code, exc.strerror or str(exc))}")
            error.errno = code
            return error
        cause = write_cause(exc, path)
        advice = _ADVICE.get(code, "choose another output path" if code in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT)
                             else None)
    elif isinstance(exc, RuntimeError) and _MLX_WRITE_FAILURE.match(str(exc)):
        needed = _MLX_BYTES.search(str(exc))
        folder = Path(tmp) if tmp is not None and Path(tmp).is_dir() else path.parent
        code = _probe_errno(folder, int(needed.group(1)) if needed else 0)
        cause, advice = _cause(code, f"the write failed ({exc})"), _ADVICE.get(code)
    else:
        return None
    error = WriteError(f"cannot write {path}: {cause}" + (f"; {advice}" if advice else ""))
    error.errno = code
    return error


# `.{stem}.{kind}-{pid}-{8 hex}{suffix}`, as _temp_name makes them; nothing else matches.
_TEMP = re.compile(r"^\.(?P<stem>.*)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}(?P<suffix>(\.[^.]*)?)$")


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs. Errs on "alive": a temp is kept when unsure."""
    if pid == os.getpid() or os.name != "posix":  # Windows' os.kill(pid, 0) would terminate it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: someone else's live process
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that processes no longer running left in `folder`; returns them.

    A process killed outright (kill -9, OOM killer) leaves its `.OUT.tmp-<pid>-<hex>` behind, which
    can be as large as the output. Whether the writer still runs is told by the pid in the name.
    A `.old-` dir (an output moved aside during a replacement) is renamed back to its output
    name when the writer died before putting the new one there, so nothing is lost; otherwise
    it is removed. Best effort: anything that cannot be read or removed is left as it is.
    Limitation: a writer in another PID namespace (container) or on another machine sharing the
    folder looks dead from here.
    """
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        target = folder / f"{match['stem']}{match['suffix']}"
        try:
            if match["kind"] == "old" and not (target.exists() or target.is_symlink()):
                os.replace(entry, target)
                continue
            _remove(entry)
        except OSError:  # a read-only folder, another cleaner first: leave it
            continue
        removed.append(entry)
    return removed


def _temp_name(path: Path, kind: str) -> Path:
    """A fresh hidden name beside `path`: `.{stem}.{kind}-{pid}-{hex}{suffix}`.

    The suffix is kept because some writers decide the format by it, or append their own when
    it is missing (mx.save_safetensors adds ".safetensors", so the file would land elsewhere).
    The pid and random part keep concurrent writers of the same target apart; the leading dot
    keeps the name out of globs such as `*.safetensors`.
    """
    return path.with_name(f".{path.stem}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def _remove(path: Path) -> None:
    """Delete a file, a symlink or a whole directory tree, whichever `path` is; quiet if gone.
    Best effort: it runs while another error propagates (a read-only disk refuses even the
    unlink of a file that was never created), and that error is the one to report."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


@contextmanager
def _removed_on_failure(path: Path, tmp: Path) -> Iterator[None]:
    """Around the writes into `tmp` (a file or a folder that becomes `path`): when the block
    raises, `tmp` is deleted and a refused write is re-raised as the WriteError naming `path`."""
    try:
        yield
    except BaseException as exc:
        error = write_error(exc, path, tmp)  # before the removal: a partial file shows a full disk
        _remove(tmp)
        if error is not None:
            raise error from exc
        raise


def write_atomic(path: str | os.PathLike, content: Content) -> Path:
    """Write `content` to `path` all at once: readers see the old file or the complete new one.

    content: bytes-like (written as is), str (written as UTF-8, no newline translation), or a
        callable `write(tmp)` that gets the temporary path as a str -- which does not exist
        yet and has the same suffix as `path` -- and must create the complete file there.
    The folder of `path` must exist. A file already at `path` is replaced.
    Returns `path` as a Path. On any exception (KeyboardInterrupt included) the temporary
    file is removed, the previous file at `path`, if any, is left unchanged, and the
    exception propagates -- as a WriteError when the system refused the write (see module doc).
    Stale temporaries of dead processes in the folder are removed first.
    """
    path = Path(path)
    clean_stale_temps(path.parent)
    tmp = _temp_name(path, "tmp")
    with _removed_on_failure(path, tmp):
        if callable(content):
            content(str(tmp))
        else:
            data = content.encode("utf-8") if isinstance(content, str) else content
            # "x": never write through a name that is somehow there already. Plain open(), not
            # mkstemp, so the mode is 0o666 & ~umask.
            with open(tmp, "xb") as f:
                f.write(data)
        os.replace(tmp, path)
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
    was (nothing is created there), and the exception propagates. Stale temporaries of dead
    processes beside `path` are removed on entry.

    Raises:
        UserError: `path` exists and force is False (checked on entry and again before the
            rename, in case something created it meanwhile), or `path` exists and is not a
            directory.
        WriteError (a UserError and an OSError): the system refused a write, in the block or
            here (full disk, read-only or unwritable folder, a file where a folder should be).
    """
    path = Path(path)
    check_new_output_dir(path, force)
    tmp = _temp_name(path, "tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path.parent)
        # os.mkdir applies the umask itself; mkdtemp's 0700 would need a chmod, and finding the
        # umask means setting it for a moment, which races with other threads creating files.
        os.mkdir(tmp)
    except OSError as exc:
        raise write_error(exc, path, tmp) from exc
    with _removed_on_failure(path, tmp):
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
