"""Line plots as PNG with matplotlib (its Agg renderer: no display, no pyplot state), written atomically."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence

from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter, NullLocator

from latent_diffusion.files.atomic import atomic_write_bytes

SIZE, DPI = (6.4, 4.2), 100  # 640 × 420 pixels
Series = dict[str, tuple[Sequence[float], Sequence[float]]]


def line_figure(series: Series, title: str, xlabel: str, ylabel: str, log_x: bool = False, log_y: bool = False,
                y_limits: tuple[float, float] | None = None) -> Figure:
    """One line with markers per series {name: (xs, ys)} (non-finite points left out); `y_limits` fixes the y
    range, e.g. (0, 1) for shares."""
    finite = {name: sorted((x, y) for x, y in zip(xs, ys) if math.isfinite(y)) for name, (xs, ys) in series.items()}
    if not any(finite.values()):
        raise ValueError(f"nothing to plot for {title!r}")
    figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    for name, points in finite.items():
        if points:
            axes.plot(*zip(*points), marker="o", label=name)
    if log_x:
        axes.set_xscale("log")
        _plain_log_ticks(axes.xaxis)
    xs = sorted({x for points in finite.values() for x, _ in points})
    if len(xs) <= 10:  # few settings measured: a tick at each
        axes.xaxis.set_ticks(xs)
        axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes.xaxis.set_minor_locator(NullLocator())
    if log_y:
        axes.set_yscale("log")
        _plain_log_ticks(axes.yaxis)
    if y_limits is not None:
        axes.set_ylim(*y_limits)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    return figure


def _plain_log_ticks(axis: Axis) -> None:
    """Tick labels of a log axis as plain numbers (20, not 2×10¹), minor ticks labelled too over < 2 decades."""
    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def save_figure(figure: Figure, path: str | os.PathLike) -> None:
    """Write `figure` as a PNG atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def line_plot(series: Series, path: str | os.PathLike, title: str, xlabel: str, ylabel: str, log_x: bool = False,
              log_y: bool = False, y_limits: tuple[float, float] | None = None) -> None:
    """`line_figure` written as a PNG (atomically)."""
    save_figure(line_figure(series, title, xlabel, ylabel, log_x, log_y, y_limits), path)
