"""One worker thread per engine: it batches waiting requests and runs them, one generate call at a time.

Why a thread per engine: generation is long, CPU- or GPU-bound work that must not run on the event loop (the
server would stop answering), and one loaded model can only serve one forward at a time anyway. The worker is the
only code that touches its engine's model, so switching adapters needs no lock: the switch and the generation it
serves run back to back in the same thread, and a request for another adapter waits for the next turn.

Batching: when the worker takes a request it also takes every waiting request it can run in the same `generate`
call (same served model, i.e. same adapter and prompt program, and equal sampling parameters), up to
`max_batch_size` sequences. A burst of concurrent requests that finds the worker idle should still become one
batch, so a request that has only just arrived waits for companions: always `MIN_WAIT`, and up to `batch_wait`
while other admitted requests for this engine are still being prepared (chat template, token count), since those
are about to join the queue. Under load the queue fills while a batch runs and nobody waits. Seeded sampling runs
alone, so its result depends only on the request. Streams run alone (their n choices are one batch).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from honellm.errors import HoneError
from honellm.serve.errors import SERVER, APIError

log = logging.getLogger("honellm.serve")
MIN_WAIT = 0.002  # seconds a fresh request waits for companions even when none is known to be on its way


@dataclass(eq=False)
class Job:
    """One request's work: its prompts (n choices, or several completion prompts) under one set of parameters.

    A non-streaming job's result is `future` (a list of Completions). A streaming job calls `sink` from the worker
    thread with ("start", None), then ("delta", (prompt index, text)) per piece, then ("end", list of Completions
    or None) or ("error", APIError); its `future` only tells that the worker is done with it. A stream of several
    prompts (OpenAI's `n`) decodes them together in one batch.
    """

    served: Any  # ServedModel
    prompts: list[str]
    params: Any  # SamplingParams
    deadline: float  # time.monotonic() after which the request has timed out
    sink: Callable[[tuple[str, Any]], None] | None = None
    events: Any = None  # for a stream: the asyncio.Queue that `sink` feeds (the app reads it)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def stream(self) -> bool:
        return self.sink is not None

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one generate call."""
        alone = self.stream or (self.params.seed is not None and self.params.temperature > 0)
        return (id(self.served), self.params, id(self) if alone else None)

    def cancel(self) -> None:
        """Give up on the job: dropped if still queued; a running stream stops at its next piece."""
        self.cancelled.set()
        self.future.cancel()


class Scheduler:
    """The queue and worker thread of one engine."""

    def __init__(self, engine, *, max_batch_size: int = 16, batch_wait: float = 0.005):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._incoming = 0  # admitted requests being prepared for this engine, not yet submitted
        self._thread = threading.Thread(target=self._run, name=f"hone-serve:{engine.key}", daemon=True)
        self.batches = 0  # generate calls made, and the sequences they held (for /health and the bench)
        self.sequences = 0

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for job in self._queue:
                job.cancel()
            self._queue.clear()
            self._cv.notify_all()

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Wrap a request's preparation and `submit`: while it runs, an idle worker waits for it to batch."""
        with self._cv:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cv:
                self._incoming -= 1
                self._cv.notify_all()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise APIError(503, "the server is shutting down", type=SERVER, code="shutting_down")
            self._queue.append(job)
            self._cv.notify_all()

    def waiting(self) -> int:
        return len(self._queue)

    # ---------------------------------------------------------------------------------------------- the worker

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                if batch[0].stream:
                    self._run_stream(batch[0])
                else:
                    self._run_batch(batch)
            except BaseException as err:  # noqa: BLE001 - the worker must outlive any one request
                log.exception("serving worker: unexpected error")
                for job in batch:
                    _fail(job, _server_error(err))

    def _take(self) -> list[Job] | None:
        """The next job and every queued job that can share its generate call."""
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            first = self._queue.popleft()
            if first.stream:
                return [first]
            batch, rows = [first], len(first.prompts)
            short, until = first.enqueued + min(MIN_WAIT, self.batch_wait), first.enqueued + self.batch_wait
            while rows < self.max_batch_size:
                for job in list(self._queue):
                    if job.key == first.key and rows + len(job.prompts) <= self.max_batch_size:
                        self._queue.remove(job)
                        batch.append(job)
                        rows += len(job.prompts)
                now = time.monotonic()
                if rows >= self.max_batch_size or now >= until or self._closed:
                    break
                if now >= short and self._incoming == 0:
                    break  # nobody is on the way
                self._cv.wait((short if now < short else until) - now)
            return batch

    def _run_batch(self, jobs: list[Job]) -> None:
        jobs = [job for job in jobs if _claim(job)]
        if not jobs:
            return
        try:
            results = self._generate([p for job in jobs for p in job.prompts], jobs[0])
        except Exception as err:  # noqa: BLE001 - retried alone so one bad request cannot fail its neighbours
            if len(jobs) == 1:
                _fail(jobs[0], _as_api_error(err))
                return
            log.warning("a batch of %d requests failed (%s); running them one by one", len(jobs), err)
            for job in jobs:
                try:
                    job.future.set_result(self._generate(job.prompts, job))
                except Exception as single:  # noqa: BLE001
                    _fail(job, _as_api_error(single))
            return
        start = 0
        for job in jobs:
            job.future.set_result(results[start: start + len(job.prompts)])
            start += len(job.prompts)

    def _generate(self, prompts: list[str], job: Job) -> list:
        # "auto" reuses the keys and values of whatever all prompts share (the system prompt and demonstrations).
        shared = "auto" if len(prompts) > 1 else None
        with self.engine.use(job.served.adapter):
            results = (job.served.generator or self.engine.generator).generate(prompts, job.params, shared_prefix=shared)
        self.batches += 1
        self.sequences += len(prompts)
        return results

    def _run_stream(self, job: Job) -> None:
        if not _claim(job):
            return
        sink = job.sink
        final = None
        try:
            with self.engine.use(job.served.adapter):
                generator = job.served.generator or self.engine.generator  # the artifact's inference settings
                if len(job.prompts) == 1:
                    pieces = _indexed(generator.stream(job.prompts[0], job.params))
                else:  # n choices of one prompt, decoded together
                    pieces = generator.stream_batch(job.prompts, job.params)
                sink(("start", None))
                try:
                    while True:
                        if job.cancelled.is_set() or time.monotonic() > job.deadline:
                            sink(("error", APIError(504, "the request timed out while streaming", type=SERVER,
                                                    code="timeout")))
                            return
                        try:
                            piece = next(pieces)
                        except StopIteration as stop:
                            final = stop.value  # the Completions, when the engine returns them
                            break
                        sink(("delta", piece))
                finally:
                    pieces.close()
            self.batches += 1
            self.sequences += len(job.prompts)
            sink(("end", final))
        except Exception as err:  # noqa: BLE001
            sink(("error", _as_api_error(err)))
        finally:
            job.future.set_result(None)


def _indexed(pieces):
    """A one-prompt stream as `(0, delta)` pairs, returning `[Completion]` (None when the engine returns none)."""
    try:
        while True:
            try:
                piece = next(pieces)
            except StopIteration as stop:
                return None if stop.value is None else [stop.value]
            yield 0, piece
    finally:
        pieces.close()


def _claim(job: Job) -> bool:
    """Mark a job running; False (and the job dropped) when it was cancelled or has timed out in the queue."""
    if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
        return False
    if time.monotonic() > job.deadline:
        _fail(job, APIError(504, "the request timed out in the queue", type=SERVER, code="timeout"))
        return False
    return True


def _fail(job: Job, error: APIError) -> None:
    if job.stream and job.sink is not None:
        job.sink(("error", error))
    if not job.future.done() and (job.future.running() or job.future.set_running_or_notify_cancel()):
        job.future.set_exception(error)


def _as_api_error(err: BaseException) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, HoneError):
        return APIError(400, err.what, code="invalid_request")
    log.error("generation failed", exc_info=err)
    return _server_error(err)


def _server_error(err: BaseException) -> APIError:
    return APIError(500, f"generation failed ({type(err).__name__}); see the server log", type=SERVER,
                    code="generation_failed")
