"""The engine thread: the only thread that touches MLX while the server runs.

MLX is not thread-safe across streams, so one thread owns the model and the BatchGenerator and
runs it; the HTTP side (asyncio) hands it work through a queue and gets events back on its own
event loop (`loop.call_soon_threadsafe`), never waiting on MLX itself.

    engine = Engine(model, tokenizer, adapters={"zh": 1})
    engine.start()
    job = engine.submit(ids, params, adapter="zh", loop=asyncio.get_running_loop())
    async for event in job: ...            # generation.Event objects, the last one finished
    engine.cancel(job)                     # a client that went away frees its row at once
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional, Sequence

import mlx.core as mx

from ..errors import UserError
from ..engine import BatchGenerator, Event, PrefixCache, Request, check_prompt
from ..sampling import LogitsProcessor, SamplingParams

log = logging.getLogger("mlx_gemma.serve")


@dataclass
class Job:
    """One request in flight: its events arrive on `events` (an asyncio.Queue of the caller's loop)."""

    ids: list
    params: SamplingParams
    adapter: int
    loop: asyncio.AbstractEventLoop
    processors: Sequence[LogitsProcessor] = ()
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    rid: Optional[int] = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: Optional[float] = None
    finished: Optional[float] = None
    n_out: int = 0
    cached: int = 0  # prompt tokens the prefix cache supplied (set by the engine thread when the job ends)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        """The next event; the caller stops after the one with a finish_reason."""
        event = await self.events.get()
        if isinstance(event, BaseException):
            raise event
        return event


class Engine:
    def __init__(self, model, tokenizer, adapters: Optional[dict] = None, prefill_step: int = 256,
                 compile: bool = True, prompt_cache_bytes: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.adapters = dict(adapters or {})  # name -> row adapter index (mlx_gemma.adapters)
        # served prompts' KV, reused by later prompts that start the same way (keyed by adapter row)
        self.prefix_cache = PrefixCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        self.generator = BatchGenerator(model, tokenizer, prefill_step, compile, prefix_cache=self.prefix_cache)
        self.inbox: queue.Queue = queue.Queue()
        self.jobs: dict[int, Job] = {}
        self.thread = threading.Thread(target=self._run, name="mlx-gemma-engine", daemon=True)
        self.error: Optional[str] = None
        self.steps = 0

    # ---- called from the HTTP side -----------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def load(self) -> tuple[int, int]:
        """(rows decoding, requests queued or prefilling); plain reads, safe from any thread."""
        return len(self.generator.active), len(self.generator.waiting) + self.inbox.qsize()

    def check(self, ids: Sequence[int]) -> None:
        """UserError for a prompt the model cannot take (empty, past the context, foreign ids).
        Pure Python on the config: safe outside the engine thread."""
        check_prompt(self.model, list(ids))

    def submit(self, ids: list, params: SamplingParams, adapter: int, loop, processors=()) -> Job:
        job = Job(ids=ids, params=params, adapter=adapter, loop=loop, processors=processors)
        self.inbox.put(("submit", job))
        if self.error is not None:  # stopped meanwhile: nobody will take it from the queue
            self._fail_queued()
        return job

    def cancel(self, job: Job) -> None:
        self.inbox.put(("cancel", job))

    def stop(self) -> None:
        self.inbox.put(("stop", None))

    # ---- the engine thread -------------------------------------------------------------------

    def _deliver(self, job: Job, item) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, item)
        except RuntimeError:  # the caller's event loop has closed (the server is shutting down): nobody listens
            pass

    def _take(self, block: bool) -> bool:
        """Apply queued submissions and cancellations; False when asked to stop."""
        while True:
            try:
                kind, job = self.inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "submit":
                try:
                    job.rid = self.generator.submit(Request(job.ids, job.params, processors=job.processors,
                                                            adapter=job.adapter))
                    self.jobs[job.rid] = job
                except UserError as exc:
                    job.finished = time.perf_counter()
                    self._deliver(job, exc)
            elif kind == "cancel" and job.rid is not None and job.rid in self.jobs:
                self.generator.cancel(job.rid)
                del self.jobs[job.rid]
                job.finished = time.perf_counter()
                log.info("%s cancelled after %d tokens (client gone)", getattr(job, "request_id", job.rid), job.n_out)

    def _run(self) -> None:
        # MLX streams belong to the thread that made them: this thread gets its own.
        mx.set_default_stream(mx.new_stream(mx.default_device()))
        try:
            while self._take(block=not self.generator.busy):
                if not self.generator.busy:
                    continue
                for event in self.generator.step():
                    job = self.jobs.get(event.rid)
                    if job is None:
                        continue
                    now = time.perf_counter()
                    job.n_out += event.token is not None
                    if job.first_token is None:
                        job.first_token = now
                    if event.finish_reason:
                        job.finished, job.cached = now, event.prompt_cached
                        del self.jobs[event.rid]
                    self._deliver(job, event)
                self.steps += 1
        except Exception as exc:  # a bug: fail every request in flight, keep the reason for /health
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("engine stopped: %s\n%s", self.error, traceback.format_exc())
            for job in list(self.jobs.values()):
                self._deliver(job, RuntimeError(f"the engine stopped: {self.error}"))
            self.jobs.clear()
            self._fail_queued()
        finally:
            # Work this thread queued and never waited for (a step dispatched ahead) must end
            # before the process does: MLX aborts at exit while its stream still runs.
            mx.synchronize()

    def _fail_queued(self) -> None:
        """Answer every request still queued with the engine's error (the engine has stopped)."""
        while True:
            try:
                kind, job = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                job.finished = time.perf_counter()
                self._deliver(job, RuntimeError(f"the engine stopped: {self.error}"))
