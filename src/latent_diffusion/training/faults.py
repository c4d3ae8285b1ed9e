"""Surviving faults: SIGTERM/SIGINT become a checkpoint and a clean exit; non-finite losses skip their step."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class StopRequested(Exception):
    """A stop signal that arrived during start-up, where there is no step to finish: start-up ends early."""

    def __init__(self, signal_name: str, step: int = 0):
        super().__init__(f"{signal_name} during start-up")
        self.signal, self.step = signal_name, step


class StopSignals:
    """While active, SIGTERM and SIGINT set `requested` (the signal's name) instead of killing the process;
    the training loop checks it after each step, saves a checkpoint and returns."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = name
        log.warning("%s received: saving a checkpoint after this step, then stopping", name)

    def check(self, step: int = 0) -> None:
        """Raise `StopRequested` if a signal has arrived (start-up's checkpoints; `step`: where a resume would
        start)."""
        if self.requested is not None:
            raise StopRequested(self.requested, step)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteGuard:
    """Counts steps skipped for a NaN/inf loss; `max_in_a_row` consecutive ones stop the run."""

    def __init__(self, max_in_a_row: int, what: str):
        self.max_in_a_row, self.what = max_in_a_row, what
        self.in_a_row = self.skipped = 0

    def ok(self, finite: bool, step: int, loss: float) -> bool:
        """Whether step `step` may update the weights; raises after too many bad steps in a row."""
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        log.warning("step %d: non-finite %s loss (%s): step skipped (%d skipped so far)", step, self.what, loss,
                    self.skipped)
        if self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(
                f"{self.in_a_row} non-finite {self.what} losses in a row, the last at step {step}: the run diverged. "
                "Likely causes: a learning rate too high (lower training.learning_rate, or add warm-up / "
                "training.grad_clip), fp16 overflow (use bf16), or corrupt input data")
        return False
