"""The one thread that owns the model: jobs wait in a bounded queue and are decoded one at a time.

Each job is decoded by `engine.stream_decode`, the entry point every command uses. Its events are handed, one by one,
to the job's `deliver` function (the server passes one that moves them onto the asyncio loop), and a `JobEnd` follows
the last. The worker looks at the job's cancel flag after every event: a cancelled job's event stream is closed at
once, which gives the model its own layers back, so the next job starts from an intact model whatever happened to
the one before it (a disconnect, an exception in the engine, an exception in `deliver`).

By default one job is decoded at a time. D3 runs one depth per step for a whole batch, so a request cannot join a
batch that is already decoding at its own position; with `max_batch` above 1 the worker takes, with the job at the
head of the queue, the greedy jobs waiting behind it whose settings share its `DecodeSettings.batch_key()`, and
decodes them as one batch from position 0. Each row's events go to its own job; a row that finishes or is cancelled
gets its `JobEnd` at once, and the batch's stream is closed as soon as no row is left open. Rows of a padded batch
are not bit-identical to the same prompt decoded alone, which is why batching is not the default. docs/SERVE.md
has the measurements.

With `prompt_cache` (d3 serve's default) a job decoded alone keeps its reply's cache (prefix_cache.PrefixCache), and
the next one alone prefills only what follows the prompt tokens the two share (a chat template's system prompt,
few-shot examples, the earlier turns of a conversation); `Job.cached_tokens` says how many it reused.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from d3cli.core.decode.engine import stream_decode
from d3cli.core.session.prefix_cache import PrefixCache

STOP = object()  # put on the queue to end the worker


class QueueFull(Exception):
    """Every place in the queue is taken."""


@dataclass(frozen=True)
class JobEnd:
    """What the worker delivers after a job's last event."""

    reason: str  # "done", "cancelled" or "failed"
    error: str | None = None  # for "failed": what went wrong, in one line
    steps_after_cancel: int | None = None  # for "cancelled": events decoded between the cancel and the stop


@dataclass
class Job:
    """One reply to decode: token ids, its plan (settings and schedule), and where its events go."""

    token_ids: list[int]
    plan: object  # plan.DecodePlan
    deliver: Callable[[object], None]  # called on the worker thread with each TokenEvent, then a JobEnd
    cancelled: threading.Event = field(default_factory=threading.Event)
    delivered: int = 0
    delivered_at_cancel: int | None = None
    batch_size: int = 1  # how many jobs were decoded together with this one (itself included)
    cached_tokens: int = 0  # leading prompt tokens taken from the prompt cache, not prefilled

    @property
    def batchable(self) -> bool:
        """Greedy replies may share a batch; a sampled one keeps its own random stream (its seed means what it says)."""
        return self.plan.sampling.greedy

    def cancel(self) -> None:
        """Stop this job at its next event (or skip it, if it has not started). Safe from any thread."""
        if not self.cancelled.is_set():
            self.delivered_at_cancel = self.delivered
            self.cancelled.set()


class Worker:
    """A daemon thread that decodes queued jobs in order with `loaded` (a loader.LoadedModel)."""

    def __init__(self, loaded, queue_size: int, decode=None, max_batch: int = 1, prompt_cache: bool = False):
        self.loaded = loaded
        self.decode = decode or stream_decode
        self.max_batch = max_batch
        self.prefix = PrefixCache(loaded.model) if prompt_cache else None
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.current: list[Job] = []
        self.finished_jobs = 0
        self.thread = threading.Thread(target=self._run, name="d3-decode", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when `queue_size` jobs already wait."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job, running or waiting, and end the thread (waiting at most `timeout` seconds)."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not STOP:
                job.cancel()
                _deliver(job, JobEnd("cancelled", steps_after_cancel=0))
        self.cancel_running()
        try:
            self.jobs.put_nowait(STOP)
        except queue.Full:
            pass
        if self.thread.is_alive():
            self.thread.join(timeout)

    def cancel_running(self) -> None:
        for job in list(self.current):
            job.cancel()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is STOP:
                return
            batch = self.batch_for(job)
            self.current = batch
            try:
                self.run_batch(batch)
            finally:
                self.current = []
                self.finished_jobs += len(batch)

    def batch_for(self, first: Job) -> list[Job]:
        """`first` and, up to `max_batch` in all, the jobs waiting behind it that may share its batch."""
        if self.max_batch == 1 or not first.batchable:
            return [first]
        key = first.plan.settings.batch_key()
        with self.jobs.mutex:  # taken out of the queue's own deque, in order, under its lock
            waiting = self.jobs.queue
            taken = [job for job in waiting if job is not STOP and job.batchable and not job.cancelled.is_set()
                     and job.plan.settings.batch_key() == key][: self.max_batch - 1]
            for job in taken:
                waiting.remove(job)
            if taken:
                self.jobs.not_full.notify(len(taken))
        return [first, *taken]

    def run_job(self, job: Job) -> None:
        self.run_batch([job])

    def run_batch(self, jobs: list[Job]) -> None:
        """Decode jobs as one batch, each row's events to its job; every job gets its JobEnd, and the event stream
        is always closed (the model gets its own layers back before anything else runs)."""
        open_rows = {}
        for row, job in enumerate(jobs):
            job.batch_size = len(jobs)
            if job.cancelled.is_set():
                _deliver(job, JobEnd("cancelled", steps_after_cancel=0))
            else:
                open_rows[row] = job
        if not open_rows:
            return
        rows = list(open_rows.values())
        open_rows = dict(enumerate(rows))
        events = None
        cache, generated = None, []
        try:
            if self.prefix is not None and len(rows) == 1:
                cache, reused = self.prefix.take(rows[0].token_ids)
                rows[0].cached_tokens = reused
                events = self.decode(self.loaded, [rows[0].token_ids[reused:]], rows[0].plan, cache=cache,
                                     past_length=reused)
            else:
                events = self.decode(self.loaded, [job.token_ids for job in rows], rows[0].plan)
            for event in events:
                job = open_rows.get(event.row)
                if job is None:
                    continue
                generated.append(event.token_id)
                end = self._hand_over(job, event)
                if end is not None:
                    del open_rows[event.row]
                    _deliver(job, end)
                    if not open_rows:
                        break
        except Exception as error:  # the engine or the sampler failed: these jobs end, the server goes on
            for job in open_rows.values():
                _deliver(job, JobEnd("failed", error=one_line(error)))
            open_rows, cache = {}, None  # a cache a failed forward wrote into is not kept
        finally:
            if events is not None:
                events.close()
        if cache is not None:  # finished or cancelled between two tokens: every position it holds is whole
            self.prefix.keep(cache, rows[0].token_ids, generated)
        for job in open_rows.values():  # the stream ended without a finish reason (it always gives one)
            _deliver(job, JobEnd("done"))

    @staticmethod
    def _hand_over(job: Job, event) -> JobEnd | None:
        """Deliver one event; the job's end when this event ends it (finished, cancelled, or deliver failed)."""
        job.delivered += 1
        try:
            job.deliver(event)
        except Exception as error:  # whoever consumes this job broke: it ends, the other rows go on
            return JobEnd("failed", error=one_line(error))
        if event.finish_reason is not None:
            return JobEnd("done")
        if job.cancelled.is_set():
            return JobEnd("cancelled", steps_after_cancel=job.delivered - (job.delivered_at_cancel or 0))
        return None


def _deliver(job: Job, item) -> None:
    try:
        job.deliver(item)
    except Exception:  # whoever waited for this job is gone (the loop has stopped): nothing to tell
        pass


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
