"""The run directory of a training run: what `mlx-gemma train --out DIR` writes and resumes from.

    adapter_model.safetensors, adapter_config.json   the latest adapter, PEFT format
    train_config.json                                 the TrainArgs used (+ data summary and hash)
    metrics.jsonl                                     one JSON object per step / evaluation
    loss.png                                          train and validation loss curves
    checkpoints/step-000100/                          adapter + optimizer.safetensors + trainer_state.json

`RunDir` owns every read and write of these files. Checkpoints are written into a temporary dir
and renamed (a reader sees the old checkpoint or the complete new one); a damaged file read back
on --resume is a one-line UserError naming it. In a data-parallel run only rank 0 writes
(`writer=False` on the others turns every write into a no-op) while every rank reads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import UserError
from ..files import atomic_output_dir, read_text, write_error, write_json_atomic
from .args import resume_conflict

KEEP_CHECKPOINTS = 3
CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
LOSS_CURVE = "loss.png"
# what a run writes at the top level; --force removes these (never the whole dir)
RUN_FILES = ("adapter_model.safetensors", "adapter_config.json", CONFIG, METRICS, LOSS_CURVE,
             "report.md", "report.json")


def _damaged(path: Path, what: str) -> UserError:
    return UserError(f"{path} is damaged ({what}); delete it, or pass --force to start the run over")


def read_json_file(path: Path, required_keys: tuple = ()) -> dict:
    """A JSON object from `path`, or a UserError naming the file when it is not one."""
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise _damaged(path, f"not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(obj, dict):
        raise _damaged(path, "not a JSON object")
    missing = [k for k in required_keys if k not in obj]
    if missing:
        raise _damaged(path, f"no {', '.join(missing)}")
    return obj


class RunDir:
    """The output dir of one run (see the module docstring)."""

    def __init__(self, path, writer: bool = True):
        self.path = Path(path).expanduser()
        self.writer = writer
        self._log = None
        self.metrics: list = []

    # ---- what is there ----------------------------------------------------------------------

    def checkpoints(self) -> list:
        """Complete checkpoint dirs, oldest first."""
        root = self.path / "checkpoints"
        if not root.is_dir():
            return []
        found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                 and p.name[5:].isdigit() and (p / "trainer_state.json").exists()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def latest_checkpoint(self) -> Optional[Path]:
        found = self.checkpoints()
        return found[-1] if found else None

    def holds_files(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    def read_config(self) -> Optional[dict]:
        """train_config.json of the run in this dir (None when there is none)."""
        path = self.path / CONFIG
        return read_json_file(path) if path.exists() else None

    # ---- starting -----------------------------------------------------------------------------

    def check(self, resume: bool, force: bool, options: Optional[dict] = None) -> Optional[Path]:
        """Check the dir before any slow work; return the checkpoint to resume from, or None.

        A dir holding another run is an error unless `resume` (continue) or `force` (start over).
        `options` (the TrainArgs as a dict): on resume, refused where they differ from the run's
        in an option that shaped its adapter; on a new run, --out must be writable.
        """
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} exists and is not a directory")
        if resume:
            ckpt = self.latest_checkpoint()
            if ckpt is None:
                raise UserError(f"--resume: no checkpoint in {self.path}/checkpoints; start a new run without "
                                "--resume (or with --force if the dir holds files)")
            saved = self.read_config()  # a damaged config is reported now, not after the model load
            if saved is not None and options is not None:
                resume_conflict(saved, options, str(self.path / CONFIG))
            self.check_writable()
            return ckpt
        if self.holds_files() and not force and self.writer:  # other ranks: rank 0 may be writing already
            raise UserError(f"--out {self.path} already holds files (another run?); pass --resume to continue it or "
                            "--force to start over")
        self.check_writable()
        return None

    def check_writable(self) -> None:
        """files.WriteError (one line: the folder and the cause) when the run could not write into
        --out: tried with a temporary file in the nearest folder that exists, before the model
        loads and the data is tokenized, rather than at the first checkpoint."""
        if not self.writer:
            return
        folder = self.path
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise UserError(f"--out {self.path}: {folder} is a file, not a folder; choose another output path")
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:  # worded for --out, not for the probe's temporary name
            raise write_error(OSError(exc.errno, exc.strerror), self.path) or exc from None

    def start(self, config: dict, resume_step: Optional[int]) -> None:
        """Begin writing: a fresh run removes a previous run's files and writes train_config.json;
        a resumed one keeps the metrics up to its checkpoint's step. Opens metrics.jsonl."""
        if not self.writer:  # rank 0 rewrites metrics.jsonl meanwhile: the others neither read nor write it
            return
        self.metrics = self._read_metrics(resume_step) if resume_step is not None else []
        if resume_step is None:
            self.clean()
            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path / CONFIG, config)
        self._log = open(self.path / METRICS, "w", encoding="utf-8")
        for rec in self.metrics:
            self._log.write(json.dumps(rec) + "\n")
        self._log.flush()

    def clean(self) -> None:
        """Remove what a previous run wrote (only our files, never the whole dir)."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / "checkpoints", ignore_errors=True)

    def abandon(self, created_dir: bool) -> None:
        """An interrupted run that saved no checkpoint: leave nothing that claims a run is here."""
        if not self.writer or self.latest_checkpoint() is not None:
            return
        self.close()
        for name in (CONFIG, METRICS):
            (self.path / name).unlink(missing_ok=True)
        if created_dir and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    # ---- metrics ------------------------------------------------------------------------------

    def _read_metrics(self, upto: int) -> list:
        """The metrics of steps <= upto. A last line cut short (a process killed mid-write) is
        dropped; any other line that is not a JSON object with a step is a UserError."""
        path = self.path / METRICS
        if not path.exists():
            return []
        text = read_text(path)
        lines = text.split("\n")
        out = []
        for k, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, TypeError, KeyError):
                if k == len(lines) and not text.endswith("\n"):
                    break  # the write of this line was cut short
                raise _damaged(path, f"line {k} is not a metrics record") from None
            if step <= upto:
                out.append(rec)
        return out

    def record(self, rec: dict) -> None:
        """Append one metrics record (kept in `self.metrics` on every rank)."""
        self.metrics.append(rec)
        if self._log is not None:
            self._log.write(json.dumps(rec) + "\n")
            self._log.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # ---- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, model, adapter_config: dict, optimizer, state: dict) -> Path:
        """checkpoints/step-N/ (adapter, optimizer state, trainer state) written into a temp dir and
        renamed; then the top-level adapter is updated. Keeps the last KEEP_CHECKPOINTS."""
        from ..lora import save_adapter

        final = self.path / "checkpoints" / f"step-{state['step']:06d}"
        if not self.writer:
            return final
        with atomic_output_dir(final, force=True) as tmp:
            save_adapter(model, tmp, adapter_config)
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
            write_json_atomic(tmp / "trainer_state.json", state)
        save_adapter(model, self.path, adapter_config)
        for old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, ckpt: Path, model, optimizer) -> dict:
        """Restore LoRA weights and optimizer state from a checkpoint dir; return its trainer state."""
        from ..convert import peft as peft_format
        from ..lora import lora_parameters

        state = read_json_file(ckpt / "trainer_state.json", ("step",))
        if not isinstance(state["step"], int) or state["step"] < 0:
            raise _damaged(ckpt / "trainer_state.json", f"step {state['step']!r}")
        weights = peft_format.from_peft(_load_tensors(ckpt / "adapter_model.safetensors"), str(ckpt))
        current = lora_parameters(model)
        if set(weights) != set(current):
            raise UserError(f"{ckpt}: the checkpoint's LoRA tensors do not match this model's; use --force to "
                            "start over")
        opt = _load_tensors(ckpt / "optimizer.safetensors")
        expected = {k for k, _ in tree_flatten(optimizer.state)}
        if set(opt) != expected:
            raise _damaged(ckpt / "optimizer.safetensors", "its tensors are not this optimizer's state")
        model.update(tree_unflatten(list(weights.items())))
        optimizer.state.clear()  # in place: a compiled step may hold this dict already
        optimizer.state.update(tree_unflatten(list(opt.items())))
        return state


def _load_tensors(path: Path) -> dict:
    """mx.load of a safetensors file, with a damaged or missing file as a UserError."""
    if not path.is_file():
        raise _damaged(path.parent, f"{path.name} is missing")
    try:
        return dict(mx.load(str(path)))
    except (RuntimeError, ValueError, OSError) as exc:
        raise _damaged(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
