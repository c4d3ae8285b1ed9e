"""What a training run reports: log.jsonl lines with the same figures as TensorBoard scalars, grids as TensorBoard
images, a start-up summary and an estimate of the time left."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.contrib.logging import logging_redirect_tqdm

from latent_diffusion.config import TrainConfig
from latent_diffusion.files.atomic import atomic_write_bytes
from latent_diffusion.training.common import append_jsonl

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"  # `tensorboard --logdir RUN` (or a folder of runs) shows it


def is_log_step(cfg: TrainConfig, step: int) -> bool:
    """Whether step `step` (counted from 1) writes a log line: the first, every `log_every`-th, and the last."""
    return step == 1 or step % cfg.log_every == 0 or step == cfg.max_steps


class RunLog:
    """The log of a run folder: `log.jsonl` and TensorBoard events in `tensorboard/`, written by rank 0 only
    (`enabled`). Opened at a resumed `step`, it first drops what an interrupted run logged after that step."""

    def __init__(self, root: Path, step: int = 0, enabled: bool = True):
        self.path = root / LOG_FILE
        self.writer: SummaryWriter | None = None
        if enabled:
            _drop_lines_after(self.path, step)
            # TensorBoard hides the earlier files' events from purge_step on: the steps after `step` are done again
            self.writer = SummaryWriter(str(root / TENSORBOARD_DIR), purge_step=step + 1, flush_secs=30)

    def write(self, line: dict) -> None:
        """Append `line` ({"step": ..., figures}) to log.jsonl; each number is also the scalar `train/<key>`."""
        if self.writer is None:
            return
        append_jsonl(self.path, line)
        for key, value in line.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"train/{key}", value, line["step"])

    def add_image(self, tag: str, image: Image.Image, step: int) -> None:
        """A grid (as written to samples/) shown under TensorBoard's Images tab."""
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _drop_lines_after(path: Path, step: int) -> None:
    """Remove the lines of log.jsonl past `step` (logged after the checkpoint a run resumes from), and a line
    torn by a crash."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and _step_of(line) <= step]
    if len(kept) < len(lines):
        atomic_write_bytes(path, "".join(kept).encode())


def _step_of(line: str) -> float:
    """The step of a log line; infinite (dropped) for one that is not a JSON object with a step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def parameter_counts(trained: list[nn.Module | None], frozen: list[nn.Module | None]) -> tuple[int, int]:
    """(trained, frozen) numbers of parameters; one in both lists (or twice in one) is counted once, as trained."""
    return _count(trained), _count(trained + frozen) - _count(trained)


def _count(modules: list[nn.Module | None]) -> int:
    unique = {id(p): p for module in modules if module is not None for p in module.parameters()}
    return sum(p.numel() for p in unique.values())


def log_summary(images: int, batch_size: int, max_steps: int, trained: int, frozen: int,
                captioned: int | None = None) -> None:
    """Say, before the first step, what is trained on what, and how long `max_steps` is in epochs."""
    captions = f" ({captioned:,} with a caption)" if captioned is not None else ""
    log.info("data: %s images%s", f"{images:,}", captions)
    log.info("parameters: %s trained, %s frozen", f"{trained:,}", f"{frozen:,}")
    log.info("batch %d × max_steps %s = %s images = %.1f epochs", batch_size, f"{max_steps:,}",
             f"{batch_size * max_steps:,}", batch_size * max_steps / images)


class TimeEstimate:
    """Logs once, `after` steps past the first (slow with warm-up), how long the steps up to `max_steps` will take."""

    def __init__(self, start: int, max_steps: int, after: int = 5, enabled: bool = True):
        self.start, self.max_steps, self.after, self.enabled = start, max_steps, after, enabled
        self.since: float | None = None

    def step(self, step: int) -> None:
        """Call after step `step` has finished."""
        if not self.enabled:
            return
        if step == self.start + 1:
            self.since = time.perf_counter()
        elif step == self.start + 1 + self.after and step < self.max_steps:
            per_step = (time.perf_counter() - self.since) / self.after
            with logging_redirect_tqdm():  # a line of its own, not after the progress bar
                log.info("≈ %s for the %s steps left to max_steps (%.2f s a step)",
                         _duration(per_step * (self.max_steps - step)), f"{self.max_steps - step:,}", per_step)


def _duration(seconds: float) -> str:
    """`seconds` as '40 s', '12 min' or '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"
