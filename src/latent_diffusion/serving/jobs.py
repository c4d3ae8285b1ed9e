"""The server's one worker: generation jobs run one at a time, in the order they came, at most `max_queue` waiting;
progress of the running job, and interrupting it at its next sampling step."""

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
    """The running job was interrupted (`Worker.interrupt`) or its client went away."""


@dataclass
class Progress:
    """What the running job has done: sampling steps of the current batch, batches of the job."""

    job: int | None = None
    step: int = 0
    steps: int = 0
    batch: int = 0
    batches: int = 1
    started: float = field(default_factory=time.monotonic)

    @property
    def fraction(self) -> float:
        """Share of the job done, 0 to 1."""
        if self.job is None or not self.steps:
            return 0.0
        return min(1.0, (self.batch + self.step / self.steps) / self.batches)

    @property
    def eta(self) -> float:
        """Seconds left, from the pace so far (0 before the first step)."""
        done = self.fraction
        return (time.monotonic() - self.started) * (1 - done) / done if done > 0 else 0.0


class Worker:
    """Runs submitted functions on one thread, first come first served; `step` is their per-step hook."""

    def __init__(self, max_queue: int):
        if max_queue < 1:
            raise ValueError(f"--max-queue = {max_queue}: expected at least 1")
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ldm-job")
        self._lock = threading.Lock()
        self._waiting = 0
        self._next_id = 0
        self._interrupted: set[int] = set()
        self.progress = Progress()

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, job: Callable[[int], Any]) -> tuple[int, Future]:
        """Queue `job(job_id)`; QueueFull when `max_queue` jobs wait already."""
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are waiting already (--max-queue {self.max_queue})")
            self._waiting += 1
            self._next_id += 1
            job_id = self._next_id
        return job_id, self._executor.submit(self._run, job, job_id)

    def _run(self, job: Callable[[int], Any], job_id: int) -> Any:
        with self._lock:
            self._waiting -= 1
            if job_id in self._interrupted:
                raise Interrupted("interrupted before it started")
            self.progress = Progress(job=job_id)
        try:
            return job(job_id)
        finally:
            with self._lock:
                self._interrupted.discard(job_id)
                self.progress = Progress()

    def cancel(self, job_id: int, future: Future) -> None:
        """Drop a waiting job, or stop the running one at its next step (its client went away)."""
        if future.cancel():
            with self._lock:
                self._waiting -= 1
            return
        with self._lock:
            self._interrupted.add(job_id)

    def interrupt(self) -> None:
        """Stop the running job at its next sampling step (A1111's /interrupt)."""
        with self._lock:
            if self.progress.job is not None:
                self._interrupted.add(self.progress.job)

    def step(self, job_id: int, batch: int, batches: int, done: int, total: int) -> None:
        """A job's hook after each sampling step: records progress, raises Interrupted when asked to stop."""
        with self._lock:
            if job_id in self._interrupted:
                raise Interrupted("interrupted")
            progress = self.progress
            progress.batch, progress.batches, progress.step, progress.steps = batch, batches, done, total

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
