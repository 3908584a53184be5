"""The batching scheduler on its own: pure Python, no model."""

import threading
import time

import pytest

from cdd.runtime.serving.scheduler import DeadlineExceeded, Job, QueueFull, Scheduler, SchedulerClosed


def job(key="a", rows=1, deadline=float("inf"), payload=None):
    return Job(key, rows, payload, deadline)


def test_batches_same_key_up_to_max_batch_oldest_first():
    s = Scheduler(max_batch=3, max_wait=10.0, queue_size=10)
    jobs = [s.submit(job("a", payload=i)) for i in range(4)]
    s.submit(job("b"))
    first = s.next_batch(timeout=1)  # full: no waiting for max_wait
    assert [j.payload for j in first] == [0, 1, 2]
    assert all(j.future.running() and j.started is not None for j in first)
    assert len(s) == 2 and jobs[3] not in first


def test_keys_are_served_in_arrival_order_and_never_mixed():
    s = Scheduler(max_batch=8, max_wait=0.0, queue_size=10)
    for key in "abab":
        s.submit(job(key, payload=key))
    assert [j.key for j in s.next_batch(timeout=1)] == ["a", "a"]
    assert [j.key for j in s.next_batch(timeout=1)] == ["b", "b"]
    assert s.next_batch(timeout=0.01) is None


def test_rows_count_and_a_large_job_runs_alone():
    s = Scheduler(max_batch=4, max_wait=0.0, queue_size=10)
    s.submit(job(rows=3, payload="three"))
    s.submit(job(rows=2, payload="two"))
    s.submit(job(rows=9, payload="nine"))
    assert [j.payload for j in s.next_batch(timeout=1)] == ["three"]  # 3 + 2 > 4
    assert [j.payload for j in s.next_batch(timeout=1)] == ["two"]  # 2 + 9 > 4
    assert [j.payload for j in s.next_batch(timeout=1)] == ["nine"]


def _two_clients(s):
    """Traffic so far: two requests at once (one batch of both)."""
    s.submit(job(payload="x"))
    s.submit(job(payload="y"))
    assert len(s.next_batch(timeout=1)) == 2
    s.record_batch(seconds=0.01, rows=2)


def test_a_lone_request_on_an_idle_scheduler_starts_at_once():
    s = Scheduler(max_batch=4, max_wait=5.0, queue_size=10)
    for i in range(3):  # one client, one request after another: nobody else is coming, so no max_wait
        s.submit(job(payload=i))
        t0 = time.monotonic()
        assert [j.payload for j in s.next_batch(timeout=1)] == [i]
        assert time.monotonic() - t0 < 0.5
        s.record_batch(seconds=0.01, rows=1)


def test_waits_max_wait_for_more_requests_when_traffic_had_company():
    s = Scheduler(max_batch=4, max_wait=0.3, queue_size=10)
    _two_clients(s)
    s.submit(job(payload=0))  # the other client does not come back: max_wait, then alone
    t0 = time.monotonic()
    assert [j.payload for j in s.next_batch(timeout=2)] == [0]
    assert 0.25 <= time.monotonic() - t0 < 1.5


def test_a_batch_goes_as_soon_as_the_company_is_back():
    s = Scheduler(max_batch=4, max_wait=2.0, queue_size=10)
    _two_clients(s)
    s.submit(job(payload=0))
    threading.Timer(0.05, lambda: s.submit(job(payload=1))).start()
    t0 = time.monotonic()
    assert [j.payload for j in s.next_batch(timeout=5)] == [0, 1]
    assert time.monotonic() - t0 < 1.5  # not the whole max_wait


def test_clients_that_drifted_apart_are_batched_again():
    s = Scheduler(max_batch=4, max_wait=2.0, queue_size=10)
    s.submit(job(payload="a1"))
    assert [j.payload for j in s.next_batch(timeout=1)] == ["a1"]  # no history: at once
    s.submit(job(payload="b1"))  # the second client arrives while a1 runs
    s.record_batch(seconds=0.01, rows=1)
    assert [j.payload for j in s.next_batch(timeout=1)] == ["b1"]  # alone as far as the last cycle knew
    s.submit(job(payload="a2"))  # a1's client is back while b1 runs
    s.record_batch(seconds=0.01, rows=1)
    threading.Timer(0.05, lambda: s.submit(job(payload="b2"))).start()
    assert [j.payload for j in s.next_batch(timeout=5)] == ["a2", "b2"]  # two at once were seen: waits for b2


def test_full_queue_refuses_with_retry_after():
    s = Scheduler(max_batch=1, max_wait=0.0, queue_size=2)
    s.record_batch(seconds=3.0, rows=1)
    s.submit(job())
    s.submit(job())
    with pytest.raises(QueueFull) as e:
        s.submit(job())
    assert e.value.retry_after >= 6  # two queued rows at about 3 s a row
    s.next_batch(timeout=1)
    s.submit(job())  # room again


def test_deadline_passed_in_the_queue_fails_the_job():
    s = Scheduler(max_batch=4, max_wait=0.0, queue_size=10)
    s.pause()
    late = s.submit(job(deadline=time.monotonic() + 0.05))
    ok = s.submit(job(key="b"))
    assert s.next_batch(timeout=0.2) is None  # paused; but deadlines still expire
    with pytest.raises(DeadlineExceeded):
        late.future.result(timeout=0)
    s.resume()
    assert s.next_batch(timeout=1) == [ok]
    with pytest.raises(DeadlineExceeded):
        s.submit(job(deadline=time.monotonic() - 1))


def test_cancel_only_before_start():
    s = Scheduler(max_batch=1, max_wait=0.0, queue_size=10)
    a, b = s.submit(job()), s.submit(job())
    assert s.next_batch(timeout=1) == [a]
    assert not s.cancel(a)  # running: it finishes
    assert s.cancel(b)
    with pytest.raises(DeadlineExceeded):
        b.future.result(timeout=0)
    assert len(s) == 0


def test_a_job_whose_waiter_left_is_skipped():
    s = Scheduler(max_batch=1, max_wait=0.0, queue_size=10)
    gone, kept = s.submit(job(payload="gone")), s.submit(job(payload="kept"))
    assert gone.future.cancel()
    assert [j.payload for j in s.next_batch(timeout=1)] == ["kept"]


def test_close_drains_then_stops():
    s = Scheduler(max_batch=1, max_wait=5.0, queue_size=10)
    s.pause()
    s.submit(job(payload=1))
    s.submit(job(payload=2))
    s.close()  # closing overrides pause and max_wait: admitted jobs are handed out at once
    with pytest.raises(SchedulerClosed):
        s.submit(job())
    assert [j.payload for j in s.next_batch(timeout=1)] == [1]
    assert [j.payload for j in s.next_batch(timeout=1)] == [2]
    assert s.next_batch(timeout=1) is None


def test_consumer_blocks_until_work_arrives():
    s = Scheduler(max_batch=2, max_wait=0.0, queue_size=10)
    got = []
    t = threading.Thread(target=lambda: got.append(s.next_batch(timeout=5)))
    t.start()
    time.sleep(0.05)
    s.submit(job(payload="x"))
    t.join(2)
    assert [j.payload for j in got[0]] == ["x"]


def test_take_admits_the_oldest_jobs_of_any_key_that_fit():
    """Step-level batching's consumer: first come first served across keys, up to the free rows, nothing
    overtakes a job that does not fit yet, and a job larger than max_batch goes alone when all rows are free."""
    s = Scheduler(max_batch=4, max_wait=10.0, queue_size=10)
    for key, rows in (("a", 1), ("b", 2), ("c", 2), ("a", 1)):
        s.submit(job(key, rows, payload=key + str(rows)))
    assert [j.payload for j in s.take(4, timeout=0)] == ["a1", "b2"]  # c2 does not fit in the last row
    assert s.take(1, timeout=0) == [] and len(s) == 2  # ... and a1 behind it waits its turn
    taken = s.take(4, timeout=0)
    assert [j.payload for j in taken] == ["c2", "a1"] and all(j.future.running() for j in taken)
    s.submit(job("big", 9, payload="big"))
    s.submit(job("a", 1, payload="after"))
    assert s.take(3, timeout=0) == []
    assert [j.payload for j in s.take(4, timeout=0)] == ["big"]
    assert [j.payload for j in s.take(4, timeout=0)] == ["after"]


def test_take_waits_for_a_job_or_the_timeout_and_respects_pause():
    s = Scheduler(max_batch=4, max_wait=10.0, queue_size=10)
    t0 = time.monotonic()
    assert s.take(4, timeout=0.05) == [] and time.monotonic() - t0 >= 0.05
    threading.Timer(0.05, lambda: s.submit(job(payload="late"))).start()
    assert [j.payload for j in s.take(4, timeout=5)] == ["late"]  # no max_wait once one is there
    s.pause()
    s.submit(job(payload="held"))
    assert s.take(4, timeout=0.02) == []
    s.resume()
    assert [j.payload for j in s.take(4, timeout=0)] == ["held"]
