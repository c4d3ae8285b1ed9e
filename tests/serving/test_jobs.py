"""The job queue: bounded, in order, on one or more threads; progress found by task id; interrupts at a step."""

import threading
import time

import pytest

from latent_diffusion.serving.jobs import Interrupted, QueueFull, Worker


def wait_until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_worker_bounds_its_queue_runs_in_order_and_interrupts_at_a_step():
    worker, release, order = Worker(max_queue=1), threading.Event(), []

    def blocking(job):
        release.wait(5)
        order.append(job)
        for step in range(1, 4):
            worker.step(job, 0, 1, step, 3)
        return job

    first, future1 = worker.submit(blocking)
    wait_until(lambda: worker.progress.job is not None)
    second, future2 = worker.submit(lambda job: order.append(job) or job)
    with pytest.raises(QueueFull, match="--max-queue 1"):
        worker.submit(lambda job: job)
    worker.interrupt()  # the running job stops at its next step
    release.set()
    with pytest.raises(Interrupted):
        future1.result(5)
    assert future2.result(5) == second and order == [first, second] and worker.waiting == 0
    worker.shutdown()


def test_tasks_are_found_by_name_with_their_place_in_the_queue_and_interrupted_alone():
    worker, release = Worker(max_queue=4), threading.Event()

    def job(job_id):
        release.wait(5)
        for step in range(1, 3):
            worker.step(job_id, 0, 1, step, 2)
        return job_id

    _, running = worker.submit(job, task="a")
    wait_until(lambda: worker.progress.job is not None)
    _, second = worker.submit(job, task="b")
    _, third = worker.submit(job, task="c")
    (a, ahead_a), (b, ahead_b), (c, ahead_c) = worker.find("a"), worker.find("b"), worker.find("c")
    assert a.running and not b.running and not c.running and (ahead_a, ahead_b, ahead_c) == (0, 0, 1)
    assert worker.find("z") == (None, 0)
    assert worker.interrupt("b") and not worker.interrupt("z")
    release.set()
    assert running.result(5) and third.result(5)
    with pytest.raises(Interrupted, match="before it started"):
        second.result(5)
    assert worker.find("a") == (None, 0) and worker.waiting == 0


def test_several_workers_run_jobs_side_by_side_in_the_order_they_came():
    worker, started, release = Worker(max_queue=8, workers=2), [], threading.Event()

    def job(job_id):
        started.append(job_id)
        release.wait(5)
        return job_id

    futures = [worker.submit(job)[1] for _ in range(4)]
    wait_until(lambda: len(started) == 2)
    assert len(worker.running) == 2 and worker.waiting == 2
    release.set()
    assert [f.result(5) for f in futures] == [1, 2, 3, 4] and started == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="--workers = 0"):
        Worker(max_queue=1, workers=0)
    worker.shutdown()
