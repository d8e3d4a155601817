"""d3 serve's decode worker: one job at a time, a bounded queue, cancel within a step, every event stream closed
(the model gets its layers back) whether a job ends, is cancelled or fails, and the next job exact after each."""

from __future__ import annotations

import queue

import pytest

from d3cli.core.decode.engine import TokenEvent, decode
from d3cli.core.session.plan import plan_of
from d3cli.core.session.settings import DecodeSettings
from d3cli.core.text.prompts import encode_prompt
from d3cli.server.worker import Job, JobEnd, QueueFull, Worker


class FakeStream:
    """An event stream of `count` tokens that records whether it was closed and how far it got."""

    def __init__(self, count: int, fail_at: int | None = None):
        self.count, self.fail_at, self.made, self.closed = count, fail_at, 0, False

    def __iter__(self):
        for index in range(self.count):
            if index == self.fail_at:
                raise RuntimeError("boom\nsecond line")
            self.made += 1
            yield TokenEvent(0, index, index, "x", 8, 0.0, "length" if index == self.count - 1 else None)

    def close(self):
        self.closed = True


def collecting_job(on_event=None):
    items: queue.Queue = queue.Queue()

    def deliver(item):
        items.put(item)
        if on_event is not None:
            on_event(job, item)

    job = Job([1, 2, 3], plan_of(DecodeSettings(), 8), deliver)
    return job, items


def drain(items: queue.Queue) -> list:
    got = []
    while True:
        item = items.get(timeout=30)
        got.append(item)
        if isinstance(item, JobEnd):
            return got


def worker_with(streams: list[FakeStream], queue_size: int = 4) -> Worker:
    pending = iter(streams)
    wrapped = []

    def fake_decode(loaded, prompts, plan):
        stream = next(pending)
        wrapped.append(stream)
        return _closing(stream)

    return Worker(loaded=None, queue_size=queue_size, decode=fake_decode)


def test_a_job_delivers_every_event_then_done_and_its_stream_is_closed():
    stream = FakeStream(5)
    worker = worker_with([stream])
    job, items = collecting_job()
    worker.run_job(job)
    got = drain(items)
    assert len(got) == 6 and got[-1] == JobEnd("done") and stream.closed


def test_a_cancelled_job_stops_at_the_next_event():
    stream = FakeStream(100)
    worker = worker_with([stream])
    job, items = collecting_job(lambda job, item: job.cancel() if getattr(item, "index", -1) == 3 else None)
    worker.run_job(job)
    got = drain(items)
    assert got[-1].reason == "cancelled" and got[-1].steps_after_cancel == 0
    assert stream.made == 4 and stream.closed


def test_a_failing_decode_ends_the_job_with_one_line_and_closes_the_stream():
    stream = FakeStream(10, fail_at=4)
    worker = worker_with([stream])
    job, items = collecting_job()
    worker.run_job(job)
    end = drain(items)[-1]
    assert end == JobEnd("failed", error="RuntimeError: boom") and stream.closed


def test_a_failing_deliver_ends_the_job_too():
    stream = FakeStream(10)
    worker = worker_with([stream])

    def deliver(item):
        if isinstance(item, TokenEvent) and item.index == 2:
            raise ValueError("the loop is gone")

    worker.run_job(Job([1], plan_of(DecodeSettings(), 8), deliver))
    assert stream.closed and stream.made == 3


def test_a_job_cancelled_while_waiting_is_skipped():
    stream = FakeStream(10)
    worker = worker_with([stream])
    job, items = collecting_job()
    job.cancel()
    worker.run_job(job)
    assert drain(items) == [JobEnd("cancelled", steps_after_cancel=0)] and stream.made == 0


def test_the_queue_is_bounded_and_stop_cancels_what_waits():
    worker = worker_with([], queue_size=2)  # not started: jobs stay queued
    first, first_items = collecting_job()
    second, _ = collecting_job()
    worker.submit(first)
    worker.submit(second)
    with pytest.raises(QueueFull):
        worker.submit(collecting_job()[0])
    worker.stop(timeout=1)
    assert first.cancelled.is_set() and drain(first_items)[-1].reason == "cancelled"


def test_the_thread_runs_jobs_in_order():
    worker = worker_with([FakeStream(2), FakeStream(3)])
    worker.start()
    jobs = [collecting_job() for _ in range(2)]
    for job, _ in jobs:
        worker.submit(job)
    assert [len(drain(items)) for _, items in jobs] == [3, 4]
    worker.stop()
    assert not worker.thread.is_alive()


def test_after_a_cancelled_and_a_failed_decode_the_model_decodes_exactly(tiny_models, tokenizer):
    """The real engine under the worker: a reply cut short at alpha < 1 (layers swapped out at that moment) and
    a reply that fails mid-way leave the model as it was; the next reply at alpha 1 equals a fresh decode."""
    from d3cli.core.model.loader import LoadedModel

    loaded = LoadedModel(tiny_models["llama"], tokenizer, "tiny")
    prompt = encode_prompt(tokenizer, "Tell me about the sea.", chat=False)
    exact = DecodeSettings(alpha=1.0, max_new_tokens=12)
    reference = decode(loaded, [prompt], plan_of(exact, 8))[0].token_ids
    decaying = DecodeSettings(alpha=0.7, min_layers=3, head=1, tail=1, max_new_tokens=40)
    worker = Worker(loaded, queue_size=4)

    job, items = collecting_job(lambda job, item: job.cancel() if getattr(item, "index", -1) == 6 else None)
    job.token_ids, job.plan = prompt, plan_of(decaying, 8)
    worker.run_job(job)
    got = drain(items)
    assert got[-1].reason == "cancelled" and got[-2].layers < 8 and len(got) == 8

    def fail(job, item):
        if getattr(item, "index", -1) == 5:
            raise RuntimeError("the client's handler broke")

    job, items = collecting_job(fail)
    job.token_ids, job.plan = prompt, plan_of(decaying, 8)
    worker.run_job(job)
    assert drain(items)[-1].reason == "failed"

    job, items = collecting_job()
    job.token_ids, job.plan = prompt, plan_of(exact, 8)
    worker.run_job(job)
    assert [event.token_id for event in drain(items)[:-1]] == reference


def test_with_the_prompt_cache_a_lone_job_reuses_the_shared_start_and_decodes_exactly(tokenizer):
    """The real engine on d3's kernels: the second prompt prefills only what follows the start it shares with the
    first, and its reply is a fresh decode's; a failed decode leaves no cache, so the job after it starts afresh."""
    from native_models import tiny

    from d3cli.core.model.loader import LoadedModel

    loaded = LoadedModel(tiny("llama", "int4", vocab_size=len(tokenizer)), tokenizer, "tiny")
    first, second = (encode_prompt(tokenizer, text, chat=True) for text in ("Tell me about the sea.", "Why?"))
    shared = next(index for index, (a, b) in enumerate(zip(first, second)) if a != b)
    decaying = DecodeSettings(alpha=0.8, min_layers=3, head=1, tail=1, max_new_tokens=12)
    reference = decode(loaded, [second], plan_of(decaying, 6))[0]
    worker = Worker(loaded, queue_size=4, prompt_cache=True)

    def run(token_ids, on_event=None):
        job, items = collecting_job(on_event)
        job.token_ids, job.plan = token_ids, plan_of(decaying, 6)
        worker.run_job(job)
        return job, drain(items)

    job, _ = run(first)
    assert job.cached_tokens == 0
    job, got = run(second)
    assert job.cached_tokens == shared > 10
    assert [event.token_id for event in got[:-1]] == reference.token_ids
    assert [event.layers for event in got[:-1]] == reference.layers_per_token

    worker.decode = _failing_after(3)
    _, got = run(first)
    assert got[-1].reason == "failed" and worker.prefix.cache is None
    worker.decode = decode_stream
    job, got = run(second)
    assert job.cached_tokens == 0 and [event.token_id for event in got[:-1]] == reference.token_ids


def decode_stream(*args, **kwargs):
    from d3cli.core.decode.engine import stream_decode

    return stream_decode(*args, **kwargs)


def _failing_after(count: int):
    """stream_decode whose engine fails after `count` tokens (the cache it wrote into is half-done)."""
    def failing(*args, **kwargs):
        events = decode_stream(*args, **kwargs)

        def generator():
            try:
                for index, event in enumerate(events):
                    if index == count:
                        raise RuntimeError("the engine broke")
                    yield event
            finally:
                events.close()

        return generator()

    return failing


# --- batches of waiting requests ----------------------------------------------------------------------------------


def job_with(temperature: float = 0.0, alpha: float = 0.98, deliver=None) -> Job:
    from d3cli.core.decode.sampling import SamplingSettings

    settings = DecodeSettings(alpha=alpha, sampling=SamplingSettings(temperature=temperature))
    return Job([1, 2], plan_of(settings, 8), deliver or (lambda item: None))


def test_a_batch_takes_the_greedy_jobs_with_the_same_settings_that_wait_behind_the_first():
    worker = Worker(loaded=None, queue_size=8, decode=lambda *args: None, max_batch=3)
    first, same, other, sampled, same_too, same_three = (job_with(), job_with(), job_with(alpha=0.9),
                                                         job_with(temperature=0.7), job_with(), job_with())
    for job in (same, other, sampled, same_too, same_three):
        worker.submit(job)
    assert worker.batch_for(first) == [first, same, same_too]  # at most 3 in all
    assert list(worker.jobs.queue) == [other, sampled, same_three]  # the others keep their places
    lone = job_with(temperature=0.5)
    assert worker.batch_for(lone) == [lone]  # a sampled reply is never batched
    assert Worker(None, 4, max_batch=1).batch_for(first) == [first]


class BatchStream:
    """Events of a batch whose rows end after the given numbers of tokens; records how far it got and its close."""

    def __init__(self, lengths: list[int]):
        self.lengths, self.steps, self.closed = lengths, 0, False

    def __iter__(self):
        for index in range(max(self.lengths)):
            self.steps += 1
            for row, length in enumerate(self.lengths):
                if index < length:
                    yield TokenEvent(row, index, index, "x", 8, 0.0, "length" if index == length - 1 else None)

    def close(self):
        self.closed = True


def test_each_row_of_a_batch_ends_on_its_own_and_a_cancelled_row_stops_alone():
    stream = BatchStream([3, 10, 6])
    worker = Worker(None, 4, decode=lambda loaded, prompts, plan: _closing(stream), max_batch=4)
    jobs = [collecting_job() for _ in range(3)]
    jobs[1][0].deliver = _cancel_at(jobs[1][0], jobs[1][1], index=4)
    worker.run_batch([job for job, _ in jobs])
    got = [drain(items) for _, items in jobs]
    assert [len(events) for events in got] == [4, 6, 7]
    assert [events[-1].reason for events in got] == ["done", "cancelled", "done"]
    assert got[1][-1].steps_after_cancel == 0 and all(job.batch_size == 3 for job, _ in jobs)
    assert stream.steps == 6 and stream.closed  # no row was left after step 6: the batch stopped there


def _cancel_at(job, items, index):
    def deliver(item):
        items.put(item)
        if getattr(item, "index", -1) == index:
            job.cancel()

    return deliver


def _closing(stream):
    generator = iter(stream)

    class Events:
        def __iter__(self):
            return generator

        def close(self):
            stream.close()

    return Events()
