"""The batching scheduler: a bounded queue, dynamic batching per key, deadlines, backpressure.

Pure Python (no torch, no CUDA), so it is unit-tested on its own. Jobs with the same `key` (task,
adapter, steps, sampler, resolution) are batched together, oldest first, up to `max_batch` rows;
a batch waits at most `max_wait` seconds after its oldest job arrived for more to come, and only while
fewer jobs are queued than the company the traffic has shown: the most requests queued or running at
once since the batch before last. A lone client's request on an idle engine starts at once (waiting
would gain nothing: nobody else is coming), N clients in lock step are batched as soon as the N-th is
back, and clients that drifted apart wait for each other again (at most `max_wait`). A full
queue refuses new jobs (`QueueFull`, with a Retry-After estimate), and so does admission when the
job's estimated answer time is past its deadline (`Overloaded`): overload is shed by honest refusals
at the door, not by timeouts after a minute in the queue. A job whose deadline passes
before it starts executing fails with `DeadlineExceeded`. Once a job is handed out it is the
consumer's to finish: the scheduler never fails a running job, it only marks it `cancelled` (a
consumer may stop it early).

The wait estimate: a batch costs about the same however full it is (exact batching pads every batch
to `max_batch` rows), so the time per row-step of a full batch is learnt from executed batches
(`record_batch`, a moving average plus twice its spread, since a shared machine's batches vary); a new job waits for the rest of the running batch and the batches
queued ahead of it (a queued batch of its key with room it joins), then runs in its own.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class SchedulerError(Exception):
    """Base class of the scheduler's refusals."""


class QueueFull(SchedulerError):
    def __init__(self, queued: int, retry_after: int):
        super().__init__(f"the queue is full ({queued} requests waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class Overloaded(QueueFull):
    """The job's estimated answer time (queue, then its batch) is past its deadline."""

    def __init__(self, wait: float, budget: float, retry_after: int):
        SchedulerError.__init__(
            self,
            f"the server is overloaded: this request would be answered in about {wait:.1f} s, past its "
            f"deadline of {budget:.1f} s; retry in {retry_after} s",
        )
        self.retry_after, self.wait = retry_after, wait


class Cancelled(SchedulerError):
    def __init__(self, reason: str):
        super().__init__(reason)


class DeadlineExceeded(SchedulerError):
    def __init__(self, waited: float):
        super().__init__(f"the request's deadline passed after {waited:.3f} s in the queue, before it could run")
        self.waited = waited


class SchedulerClosed(SchedulerError):
    def __init__(self):
        super().__init__("the server is shutting down and admits no new requests")


@dataclass(eq=False)
class Job:
    """One request: `rows` images (or tiles) that must run together with the same `key`; `steps`
    sampling steps each (its cost is rows x steps row-steps)."""

    key: Hashable
    rows: int
    payload: Any
    deadline: float = math.inf  # on the scheduler's clock
    steps: int = 1
    enqueued: float = 0.0
    started: float | None = None
    cancelled: bool = False  # its client left: a consumer may drop it between steps
    future: Future = field(default_factory=Future)

    @property
    def cost(self) -> int:
        return self.rows * self.steps

    @property
    def waited(self) -> float:
        return (self.started or 0.0) - self.enqueued


def _fail(job: Job, error: Exception) -> None:
    if not job.future.done():  # a waiter that left cancels its future
        job.future.set_exception(error)


class Scheduler:
    def __init__(
        self,
        max_batch: int,
        max_wait: float,
        queue_size: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_batch < 1 or queue_size < 1 or max_wait < 0:
            raise ValueError(f"bad scheduler limits: max_batch={max_batch}, queue_size={queue_size}, max_wait={max_wait}")
        self.max_batch, self.max_wait, self.queue_size = max_batch, max_wait, queue_size
        self.clock = clock
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._paused = False
        self._seconds_per_row = 0.0  # exponential moving average of executed batches, for Retry-After
        self._seconds_per_row_step = 0.0  # the same per row-step of a full batch, for admission
        self._row_step_spread = 0.0  # moving average of |batch - average|: a busy machine varies
        self._running_until = 0.0  # when the batch handed out last should end (estimate)
        self._running = 0  # jobs of the batch handed out last, until it is recorded
        self._peak = 0  # most jobs queued or running at once since the last batch was handed out
        self._company = 0  # the same over the cycle before: how many a batch may wait for

    # -- producers -------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        """Admit a job or raise QueueFull / DeadlineExceeded (already late) / SchedulerClosed."""
        if job.rows < 1:
            raise ValueError(f"a job needs at least one row, got {job.rows}")
        with self._cond:
            if self._closed:
                raise SchedulerClosed()
            if len(self._queue) >= self.queue_size:
                raise QueueFull(len(self._queue), self._retry_after())
            job.enqueued = now = self.clock()
            if job.deadline <= now:
                raise DeadlineExceeded(0.0)
            wait = self._estimated_wait(now, job)
            if now + wait > job.deadline:
                budget = job.deadline - now
                raise Overloaded(wait, budget, max(1, math.ceil(wait - budget)))
            self._queue.append(job)
            self._peak = max(self._peak, len(self._queue) + self._running)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job, error: Exception | None = None) -> bool:
        """Withdraw a job that has not started (its future fails with `error`, default DeadlineExceeded).
        False when the job already started (or finished): then it is only marked `cancelled`."""
        with self._cond:
            job.cancelled = True
            if job not in self._queue:
                return False
            self._queue.remove(job)
            _fail(job, error or DeadlineExceeded(self.clock() - job.enqueued))
            self._cond.notify_all()
            return True

    # -- the consumer ----------------------------------------------------------------------

    def next_batch(self, timeout: float | None = None) -> list[Job] | None:
        """Block until a batch is ready and hand it out (jobs marked started), or None after `timeout`
        seconds with nothing ready, or when the scheduler is closed and drained."""

        def attempt(now: float):
            head = self._queue[0]
            batch = self._gather(head.key)
            ready_at = head.enqueued + self.max_wait
            full = sum(j.rows for j in batch) >= self.max_batch or len(batch) < self._count(head.key)
            alone = len(self._queue) >= self._company  # everyone the recent traffic had is here
            if not (full or alone or self._closed or now >= ready_at):
                return None, ready_at  # wait for the batch's max-wait
            started = self._start(batch, now)
            if started:
                self._running_until = now + self._batch_seconds(started)
                self._company = max(self._peak, len(self._queue) + len(started))
                self._running = len(started)
                self._peak = len(self._queue) + self._running
                return started, None
            return None, None  # every waiter was gone: look again

        return self._wait_for(attempt, timeout, None)

    def take(self, max_rows: int, timeout: float | None = None) -> list[Job]:
        """Step-level batching's consumer: the oldest jobs of any key whose rows fit in `max_rows`, marked
        started, without waiting for max_wait (a job arriving later joins at the next step). First come,
        first served: nothing overtakes a job that does not fit yet; a job larger than max_batch goes
        alone when all max_batch rows are free. Blocks up to `timeout` while nothing is queued (or paused);
        [] after the timeout or when the oldest job does not fit."""

        def attempt(now: float):
            fitting, rows = [], 0
            for job in self._queue:
                oversized_alone = not fitting and max_rows >= self.max_batch
                if rows + job.rows > max_rows and not oversized_alone:
                    break
                fitting.append(job)
                rows += job.rows
                if rows >= max_rows:
                    break
            taken = self._start(fitting, now)
            if taken or len(taken) == len(fitting):
                return taken, None  # [] when the oldest job does not fit
            return None, None  # every waiter was gone: look again

        return self._wait_for(attempt, timeout, [])

    def _start(self, jobs: list[Job], now: float) -> list[Job]:
        """Take `jobs` off the queue and mark them started; those whose waiter is gone are dropped."""
        started = []
        for job in jobs:
            self._queue.remove(job)
            if job.future.set_running_or_notify_cancel():  # False: its waiter is gone
                job.started = now
                started.append(job)
        self._cond.notify_all()
        return started

    def _wait_for(self, attempt, timeout: float | None, nothing):
        """The consumers' shared wait loop, under the lock: expire overdue jobs, then, while jobs are queued
        and the scheduler is not paused, call `attempt(now)`, which returns (result, wake): a result to hand
        out, or None and the time to look again (None: at once). Returns `nothing` after `timeout` seconds or
        once the scheduler is closed and drained. Sleeps until the wake time, the next deadline, the timeout
        or a notify, whichever comes first."""
        give_up = None if timeout is None else self.clock() + timeout
        with self._cond:
            while True:
                self._expire()
                now = self.clock()
                wake = math.inf
                if self._queue and not (self._paused and not self._closed):
                    result, wake = attempt(now)
                    if result is not None:
                        return result
                    if wake is None:
                        continue
                elif self._closed and not self._queue:
                    return nothing
                wake = min([wake] + [j.deadline for j in self._queue])
                if give_up is not None:
                    if now >= give_up:
                        return nothing
                    wake = min(wake, give_up)
                self._cond.wait(None if wake == math.inf else max(wake - now, 0.0))

    def _gather(self, key: Hashable) -> list[Job]:
        """The oldest jobs of `key` that fit in one batch; a job larger than max_batch goes alone."""
        batch, rows = [], 0
        for job in self._queue:
            if job.key != key:
                continue
            if batch and rows + job.rows > self.max_batch:
                break
            batch.append(job)
            rows += job.rows
        return batch

    def _count(self, key: Hashable) -> int:
        return sum(1 for j in self._queue if j.key == key)

    def _expire(self) -> None:
        now = self.clock()
        for job in [j for j in self._queue if j.deadline <= now]:
            self._queue.remove(job)
            _fail(job, DeadlineExceeded(now - job.enqueued))

    # -- bookkeeping -----------------------------------------------------------------------

    def record_batch(self, seconds: float, rows: int, steps: float = 1) -> None:
        """Feed the Retry-After and admission estimates with an executed batch's time."""
        per_row = seconds / max(rows, 1)
        per_row_step = seconds / (max(rows, self.max_batch) * max(steps, 1))
        with self._cond:
            self._seconds_per_row = per_row if self._seconds_per_row == 0 else 0.8 * self._seconds_per_row + 0.2 * per_row
            old = self._seconds_per_row_step
            if old:
                self._row_step_spread = 0.8 * self._row_step_spread + 0.2 * abs(per_row_step - old)
            self._seconds_per_row_step = per_row_step if old == 0 else 0.8 * old + 0.2 * per_row_step
            self._running_until = 0.0
            self._running = 0

    def _retry_after(self) -> int:
        rows = sum(j.rows for j in self._queue)
        return max(1, math.ceil(rows * self._seconds_per_row))

    def _row_step_seconds(self) -> float:
        """A cautious time per row-step: the average plus twice its spread."""
        return self._seconds_per_row_step + 2 * self._row_step_spread

    def _batch_seconds(self, jobs: list[Job]) -> float:
        rows = max(sum(j.rows for j in jobs), self.max_batch)
        return rows * max(j.steps for j in jobs) * self._row_step_seconds()

    def _estimated_wait(self, now: float, job: Job) -> float:
        """Seconds until `job`, admitted now, would be answered: the running batch's rest, the batches
        queued ahead of it (of its own key, those it cannot join), then its own batch (0 until a batch
        has been timed)."""
        rows: dict[Hashable, list[int]] = {}
        for j in self._queue:
            rows.setdefault(j.key, [0, j.steps])[0] += j.rows
        own = rows.pop(job.key, [0, job.steps])[0]
        joins = own % self.max_batch and own % self.max_batch + job.rows <= self.max_batch
        ahead = sum(math.ceil(n / self.max_batch) * steps for n, steps in rows.values())  # in 1-step batches
        ahead += (own // self.max_batch if joins else math.ceil(own / self.max_batch)) * job.steps
        mine = math.ceil(job.rows / self.max_batch) * job.steps
        return max(self._running_until - now, 0.0) + (ahead + mine) * self.max_batch * self._row_step_seconds()

    def pause(self) -> None:
        """Hand out nothing (admission and deadlines go on) until `resume` or `close`."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def close(self) -> None:
        """Admit nothing more; queued jobs are still handed out (without waiting for max_wait, paused or not)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def queued_rows(self) -> int:
        with self._cond:
            return sum(j.rows for j in self._queue)
