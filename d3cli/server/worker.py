"""The one thread that owns the model: jobs wait in a bounded queue and are decoded one at a time.

Each job is decoded by `engine.stream_decode`, the entry point every command uses. Its events are handed, one by one,
to the job's `deliver` function (the server passes one that moves them onto the asyncio loop), and a `JobEnd` follows
the last. The worker looks at the job's cancel flag after every event: a cancelled job's event stream is closed at
once, which gives the model its own layers back, so the next job starts from an intact model whatever happened to
the one before it (a disconnect, an exception in the engine, an exception in `deliver`).

Why one decode at a time: D3 runs one depth per step for a whole batch, so a request cannot join a batch that is
already decoding at its own position, and rows of a padded batch are not bit-identical to the same prompt decoded
alone. docs/SERVE.md has the measurements.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

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
    """One reply to decode: token ids, settings and schedule, and where its events go."""

    token_ids: list[int]
    settings: object  # settings.DecodeSettings
    schedule: object  # schedule.DecaySchedule
    deliver: Callable[[object], None]  # called on the worker thread with each TokenEvent, then a JobEnd
    cancelled: threading.Event = field(default_factory=threading.Event)
    delivered: int = 0
    delivered_at_cancel: int | None = None

    def cancel(self) -> None:
        """Stop this job at its next event (or skip it, if it has not started). Safe from any thread."""
        if not self.cancelled.is_set():
            self.delivered_at_cancel = self.delivered
            self.cancelled.set()


class Worker:
    """A daemon thread that decodes queued jobs in order with `loaded` (a loader.LoadedModel)."""

    def __init__(self, loaded, queue_size: int, decode=None):
        from d3cli.core.engine import stream_decode

        self.loaded = loaded
        self.decode = decode or stream_decode
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.current: Job | None = None
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
        current = self.current
        if current is not None:
            current.cancel()
        try:
            self.jobs.put_nowait(STOP)
        except queue.Full:
            pass
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is STOP:
                return
            self.current = job
            try:
                self.run_job(job)
            finally:
                self.current = None
                self.finished_jobs += 1

    def run_job(self, job: Job) -> None:
        """Decode one job, delivering its events; always deliver a JobEnd and always close the event stream."""
        if job.cancelled.is_set():
            _deliver(job, JobEnd("cancelled", steps_after_cancel=0))
            return
        end = JobEnd("done")
        events = None
        try:
            events = self.decode(self.loaded, [job.token_ids], job.schedule, job.settings)
            for event in events:
                job.delivered += 1
                job.deliver(event)
                if job.cancelled.is_set():
                    end = JobEnd("cancelled", steps_after_cancel=job.delivered - (job.delivered_at_cancel or 0))
                    break
        except Exception as error:  # the engine, the sampler or deliver failed: this job ends, the server goes on
            end = JobEnd("failed", error=one_line(error))
        finally:
            if events is not None:
                events.close()  # the model gets its own layers back before anything else runs
        _deliver(job, end)


def _deliver(job: Job, item) -> None:
    try:
        job.deliver(item)
    except Exception:  # whoever waited for this job is gone (the loop has stopped): nothing to tell
        pass


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
