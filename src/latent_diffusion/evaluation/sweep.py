"""Sampling settings to evaluate (sampler × steps × guidance scale), and the plot of a figure across them.

Both `ldm eval-adherence` and `ldm eval-fid` measure every combination of the samplers, step counts and guidance
scales they are given and write one `results` list: [{"sampler", "steps", "guidance", <figures>...}, ...].
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

from latent_diffusion.evaluation.plot import line_plot
from latent_diffusion.samplers import SAMPLERS


@dataclass(frozen=True)
class Setting:
    """How one set of samples is drawn."""

    sampler: str
    steps: int
    guidance: float

    def label(self) -> str:
        return f"{self.sampler} {self.steps} steps w={self.guidance:g}"

    def as_dict(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "guidance": self.guidance}


def settings(samplers: Sequence[str], steps: Sequence[int], guidance: Sequence[float]) -> list[Setting]:
    """Every combination, checked before any sampling: known samplers, steps ≥ 1, guidance ≥ 0."""
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        raise ValueError(f"unknown sampler(s) {unknown}; expected some of {sorted(SAMPLERS)}")
    if any(n < 1 for n in steps):
        raise ValueError(f"steps must be >= 1, got {list(steps)}")
    if any(w < 0 for w in guidance):
        raise ValueError(f"guidance scales must be >= 0, got {list(guidance)}")
    return [Setting(s, int(n), float(w)) for s, n, w in itertools.product(samplers, steps, guidance)]


def sweep_series(results: list[dict], metrics: dict[str, str]) -> tuple[str, dict[str, tuple[list, list]]]:
    """(x key, {legend: (xs, ys)}) for `metrics` ({result key: legend name}) over the setting that varies: the
    number of steps when several were measured, else the guidance scale; one line per metric and per value of
    the other settings."""
    varies = {key: len({r[key] for r in results}) > 1 for key in ("sampler", "steps", "guidance")}
    x_key = "steps" if varies["steps"] else "guidance"
    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in results:
        others = [r["sampler"]] if varies["sampler"] else []
        if x_key == "steps" and varies["guidance"]:
            others.append(f"w={r['guidance']:g}")
        for key, name in metrics.items():
            label = " ".join(([name] if len(metrics) > 1 or not others else []) + others)
            xs, ys = series.setdefault(label, ([], []))
            xs.append(float(r[x_key]))
            ys.append(float(r[key]))
    return x_key, series


def plot_sweep(results: list[dict], metrics: dict[str, str], path: str | os.PathLike, title: str,
               ylabel: str, log_y: bool = False, share: bool = False) -> None:
    """`sweep_series` as a PNG line plot (steps on a log axis); `log_y` for figures like FID, `share` for shares
    (a linear 0..1 axis)."""
    x_key, series = sweep_series(results, metrics)
    by_steps = x_key == "steps"
    line_plot(series, path, title, "sampling steps" if by_steps else "guidance scale w", ylabel, log_x=by_steps,
              log_y=log_y, y_limits=(-0.02, 1.02) if share else None)
