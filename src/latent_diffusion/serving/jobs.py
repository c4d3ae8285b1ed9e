"""The server's job queue: generation jobs start in the order they came, on `workers` threads (one by default), at
most `max_queue` waiting; each job's progress (steps, batches, its latest prediction for a preview), looked up by
the client's task id; interrupting a job, or every running one, at its next sampling step."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(RuntimeError):
    """More jobs are waiting than the server takes (`max_queue`)."""


class Interrupted(RuntimeError):
    """The job was interrupted (`Worker.interrupt`) or its client went away."""


@dataclass
class Progress:
    """Where a job is: waiting, or running (sampling steps of its current batch, batches done of all)."""

    job: int | None = None
    task: str | None = None  # the client's name for the job
    running: bool = False
    step: int = 0
    steps: int = 0
    batch: int = 0
    batches: int = 1
    started: float = field(default_factory=time.monotonic)
    # A preview of the latest step (base64 PNG), drawn by the job at its next step after someone asked for one
    # (`wants_preview`): the job's own thread does all of its tensor work (see `Worker`).
    preview: str | None = None
    wants_preview: bool = False

    @property
    def fraction(self) -> float:
        """Share of the job done, 0 to 1."""
        if not self.running or not self.steps:
            return 0.0
        return min(1.0, (self.batch + self.step / self.steps) / self.batches)

    @property
    def eta(self) -> float:
        """Seconds left, from the pace so far (0 before the first step)."""
        done = self.fraction
        return (time.monotonic() - self.started) * (1 - done) / done if done > 0 else 0.0


class Worker:
    """Runs submitted functions on `workers` threads, first come first served; `step` is their per-step hook.

    Keep every tensor operation of the process on these threads (loading models included): each thread that
    runs PyTorch's parallel CPU code gets its own OpenMP team, and once the teams' threads outnumber the cores,
    GNU OpenMP stops spinning between parallel regions; measured on 2 cores, a generation then takes twice as
    long (1.1 s against 0.5 s for the bundled model, 20 steps)."""

    def __init__(self, max_queue: int, workers: int = 1):
        if max_queue < 1:
            raise ValueError(f"--max-queue = {max_queue}: expected at least 1")
        if workers < 1:
            raise ValueError(f"--workers = {workers}: expected at least 1")
        self.max_queue, self.workers = max_queue, workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ldm-job")
        self._lock = threading.Lock()
        self._next_id = 0
        self._jobs: dict[int, Progress] = {}  # waiting and running, in the order they came
        self._interrupted: set[int] = set()

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(not p.running for p in self._jobs.values())

    @property
    def running(self) -> list[Progress]:
        with self._lock:
            return [p for p in self._jobs.values() if p.running]

    @property
    def progress(self) -> Progress:
        """The oldest running job's progress (AUTOMATIC1111 shows one job), or an idle one."""
        return next(iter(self.running), Progress())

    def find(self, task: str) -> tuple[Progress | None, int]:
        """The progress of the job named `task` and how many jobs wait before it (None when none is known)."""
        with self._lock:
            ahead = 0
            for progress in self._jobs.values():
                if progress.task == task:
                    return progress, ahead
                ahead += not progress.running
            return None, 0

    def submit(self, job: Callable[[int], Any], task: str | None = None) -> tuple[int, Future]:
        """Queue `job(job_id)`; QueueFull when `max_queue` jobs wait already."""
        with self._lock:
            waiting = sum(not p.running for p in self._jobs.values())
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting already (--max-queue {self.max_queue})")
            self._next_id += 1
            job_id = self._next_id
            self._jobs[job_id] = Progress(job=job_id, task=task)
        return job_id, self._executor.submit(self._run, job, job_id)

    def _run(self, job: Callable[[int], Any], job_id: int) -> Any:
        with self._lock:
            if job_id in self._interrupted:
                self._forget(job_id)
                raise Interrupted("interrupted before it started")
            progress = self._jobs[job_id]
            progress.running, progress.started = True, time.monotonic()
        try:
            return job(job_id)
        finally:
            with self._lock:
                self._forget(job_id)

    def _forget(self, job_id: int) -> None:
        self._jobs.pop(job_id, None)
        self._interrupted.discard(job_id)

    def cancel(self, job_id: int, future: Future) -> None:
        """Drop a waiting job, or stop a running one at its next step (its client went away)."""
        if future.cancel():
            with self._lock:
                self._forget(job_id)
            return
        with self._lock:
            if job_id in self._jobs:
                self._interrupted.add(job_id)

    def interrupt(self, task: str | None = None) -> bool:
        """Stop the job named `task` (waiting or running), or every running job (AUTOMATIC1111's /interrupt), at
        its next sampling step; False when there was no such job."""
        with self._lock:
            jobs = [p.job for p in self._jobs.values() if (p.task == task if task is not None else p.running)]
            self._interrupted.update(jobs)
            return bool(jobs)

    def step(self, job_id: int, batch: int, batches: int, done: int, total: int) -> Progress:
        """A job's hook after each sampling step: records progress (returned, for the job to draw a preview when
        one is wanted), raises Interrupted when asked to stop."""
        with self._lock:
            if job_id in self._interrupted:
                raise Interrupted("interrupted")
            progress = self._jobs[job_id]
            progress.batch, progress.batches, progress.step, progress.steps = batch, batches, done, total
            return progress

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
