"""Pieces shared by the training loops: learning-rate schedule, JSONL logs."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from latent_diffusion.config import TrainConfig
from latent_diffusion.files.lock import run_folder_lock
from latent_diffusion.training.faults import StopRequested, StopSignals

log = logging.getLogger(__name__)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay from `learning_rate` to `learning_rate · lr_min_ratio`."""
    if step < cfg.lr_warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.lr_warmup_steps
    span = max(1, cfg.max_steps - cfg.lr_warmup_steps)
    progress = min(1.0, (step - cfg.lr_warmup_steps) / span)
    low = cfg.learning_rate * cfg.lr_min_ratio
    return low + 0.5 * (cfg.learning_rate - low) * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line (the log survives crashes line by line)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def check_batch_fits(cfg: TrainConfig, data, images: int) -> None:
    """Refuse a dataset smaller than one batch."""
    if images < cfg.batch_size:
        raise ValueError(f"training.batch_size = {cfg.batch_size} but {data} holds only {images} images")


def run_in_folder(folder: Path, is_main: bool, train: Callable[[StopSignals], dict]) -> dict:
    """`train(signals)` holding `folder`'s lock (rank 0), with SIGTERM/SIGINT caught from the very start: a stop
    during start-up (loading, caching latents) returns {"step", "stopped"} once what start-up wrote is whole."""
    with run_folder_lock(folder, enabled=is_main), StopSignals() as signals:
        try:
            return train(signals)
        except StopRequested as stop:
            log.info("stopped during start-up (%s)", stop.signal)
            return {"step": stop.step, "stopped": stop.signal}
