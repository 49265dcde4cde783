"""Data-parallel training over `mx.distributed` ranks (processes started by `mlx.launch`).

Every rank builds the same batch plan (a function of the seed and epoch only) and, for every
micro-batch, takes its own contiguous share of the rows. A step sums each rank's gradient of the
*sum* of its token losses, and divides by the global number of loss tokens (itself summed over
the ranks): the update is the single-process step on the whole micro-batches, whatever the
ranks' token counts. (Averaging per-rank mean gradients, as a naive data-parallel loop does,
weights a short row on a rank with few tokens more than a long one.)

Without a launcher `mx.distributed.init()` gives a group of size 1: every function here returns
its input unchanged and the single-process path runs exactly as before.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import UserError

_group = None


def group():
    """The process group (initialised on first use; size 1 without a launcher)."""
    global _group
    if _group is None:
        _group = mx.distributed.init()
    return _group


def launched() -> bool:
    """True when this process was started by a distributed launcher (mlx.launch, mpirun)."""
    return any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def rank() -> int:
    return group().rank() if launched() else 0


def world_size() -> int:
    return group().size() if launched() else 1


def share(rows: list, rank_: Optional[int] = None, size: Optional[int] = None) -> list:
    """This rank's contiguous share of a micro-batch's rows (sizes differ by at most one)."""
    rank_ = rank() if rank_ is None else rank_
    size = world_size() if size is None else size
    bounds = np.linspace(0, len(rows), size + 1).round().astype(int)
    return rows[bounds[rank_]:bounds[rank_ + 1]]


def all_sum(x):
    """Sum of `x` (an array) over the ranks; `x` itself on one process."""
    if world_size() == 1:
        return x
    return mx.distributed.all_sum(x, group=group())


def all_sum_tree(tree):
    """Sum a tree of arrays over the ranks with one collective: the leaves are flattened into one
    float32 vector (a ring reduction per small LoRA tensor would cost a round trip each)."""
    if world_size() == 1:
        return tree
    flat = tree_flatten(tree)
    vec = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in flat])
    vec = mx.distributed.all_sum(vec, group=group())
    out, k = [], 0
    for name, v in flat:
        out.append((name, vec[k:k + v.size].reshape(v.shape).astype(v.dtype)))
        k += v.size
    return tree_unflatten(out)


def sum_scalars(*values: float) -> list:
    """Python floats summed over the ranks (loss sums, token counts for progress and metrics)."""
    if world_size() == 1:
        return list(values)
    total = all_sum(mx.array(np.array(values, np.float64).astype(np.float32)))
    return [float(v) for v in np.array(total)]


def sum_rows(rows: dict, n: int, width: int) -> np.ndarray:
    """An (n, width) float32 table whose row i is `rows[i]` on whichever rank holds it, every rank
    given the whole table (one all_sum; the other ranks add zeros, so the values arrive exact).

    For per-item results (a batch's loss sum and token count) that a caller then adds up in item
    order: the total is bit-for-bit what one process adding the same items in the same order gets,
    which a sum of per-rank partial sums is not."""
    table = np.zeros((n, width), np.float32)
    for i, values in rows.items():
        table[i] = values
    if world_size() == 1:
        return table
    return np.array(all_sum(mx.array(table)))


def gather_json(obj) -> list:
    """Every rank's `obj` (anything JSON can write, e.g. a rank's generated answers), as a list in
    rank order, on every rank.

    Variable-sized data over a sum-only collective: the JSON sizes are summed first, then each
    rank writes its bytes into its own slice of one buffer and the buffers are summed (as int32,
    a type every backend sums; a byte plus zeros stays that byte)."""
    if world_size() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.zeros(world_size(), np.int32)
    sizes[rank()] = data.size
    sizes = np.array(all_sum(mx.array(sizes)))
    ends = np.cumsum(sizes)
    starts = ends - sizes
    buf = np.zeros(int(ends[-1]), np.int32)
    buf[starts[rank()]:ends[rank()]] = data
    buf = np.array(all_sum(mx.array(buf))).astype(np.uint8)
    return [json.loads(buf[a:b].tobytes()) for a, b in zip(starts, ends)]


def peer_lost(exc: BaseException) -> bool:
    """Whether an error raised by a collective means another rank is gone (it died or was stopped)."""
    text = str(exc).lower()
    return world_size() > 1 and any(k in text for k in ("[ring]", "[jaccl]", "[mpi]", "peer", "connection"))


def describe() -> str:
    """'rank r of n (backend)' when launched, else 'single process'."""
    if not launched():
        return "single process"
    return f"rank {rank()} of {world_size()}"


class _Flag:
    """What `deferred_interrupt` returns: call it for 0 / 1 (a SIGINT arrived), `release()` at the end."""

    def __init__(self):
        self.raised, self._old = 0, None

    def __call__(self) -> int:
        return self.raised

    def _set(self, *_):
        self.raised = 1

    def release(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def deferred_interrupt() -> _Flag:
    """In a data-parallel run, turn SIGINT into a flag that the ranks sum after every step.

    Ctrl-C reaches each rank at a different point; a rank that stopped at once would leave the
    others waiting forever in the step's all_sum. With the flag they all finish the same step and
    stop together (rank 0 then saves the checkpoint). On one process SIGINT stays a
    KeyboardInterrupt (the trainer rolls a half-applied step back).
    """
    flag = _Flag()
    if world_size() > 1 and threading.current_thread() is threading.main_thread():
        flag._old = signal.signal(signal.SIGINT, flag._set)
    return flag


# ---- local ranks: `mlx-gemma train --ranks N` -------------------------------------------------

_RANK_EXIT = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")


def free_port_pair() -> int:
    """A base port p with p and p + 1 free on loopback (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise UserError("--ranks: found no free pair of loopback ports for the ring backend")


def launch_local(ranks: int, argv: list, blas_threads: Optional[int] = None) -> dict:
    """Run `python -m mlx_gemma.cli *argv` as `ranks` local processes through mlx.launch (ring
    backend on loopback) and wait. Each rank gets `blas_threads` OpenBLAS threads (default: the
    cores divided among the ranks, so they do not oversubscribe them).

    The launcher's output is passed through, without its own per-rank exit warnings. Returns
    {"returncode": the launcher's, "failed": [(rank, exit code or None when killed), ...],
    "said_error": whether a rank printed an `error:` line}.
    """
    threads = blas_threads or max(1, (os.cpu_count() or 1) // ranks)
    script = Path(sys.executable).with_name("mlx.launch")
    launcher = [str(script)] if script.exists() else [
        sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; main()"]
    cmd = [*launcher, "-n", str(ranks), "--backend", "ring", "-p", str(free_port_pair()),
           "--env", f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', threads)}",
           "--", sys.executable, "-m", "mlx_gemma.cli", *argv]
    # The launcher and the ranks get a process group of their own, and Ctrl-C / SIGTERM are passed
    # on to all of them: each rank then stops after the same step (see deferred_interrupt).
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, start_new_session=True)

    def forward(signum, frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:  # all ended already
            pass

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed, said_error = _relay_stderr(proc.stderr.fileno())
        returncode = proc.wait()
        _wait_for_group(proc.pid)  # a launcher stopped by a signal leaves its ranks finishing a checkpoint
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return {"returncode": returncode, "failed": failed, "said_error": said_error}


def _wait_for_group(pgid: int, timeout: float = 300.0) -> None:
    """Wait until no process of the group is left (or `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)


def _relay_stderr(fd: int) -> tuple[list, bool]:
    """Copy the launcher's stderr to ours until it closes, without its per-rank exit warnings.
    Returns ([(rank, exit code or None), ...] from those warnings, whether a rank printed `error:`)."""
    failed, pending, said_error = [], b"", False
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            text = re.sub(r"\x1b\[[0-9;]*m", "", line.decode(errors="replace"))
            found = _RANK_EXIT.search(text)
            if found:
                failed.append((int(found.group(1)), None if found.group(2) is None else int(found.group(2))))
            else:
                said_error = said_error or text.startswith("error:")
                sys.stderr.buffer.write(line + b"\n")
        if b"\r" in pending:  # a progress bar redrawing its line: pass it on without waiting for \n
            head, pending = pending.rsplit(b"\r", 1)
            sys.stderr.buffer.write(head + b"\r")
        sys.stderr.flush()
    sys.stderr.buffer.write(pending)
    sys.stderr.flush()
    return failed, said_error
