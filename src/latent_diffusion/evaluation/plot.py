"""Line plots as PNG with Pillow alone (no plotting library): axes, ticks, labels and a legend."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from latent_diffusion.images import save_image

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 640, 420, 70, 170, 40, 50


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi == lo:
        return [lo]
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


def _label(value: float) -> str:
    return f"{value:.3g}"


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike, title: str,
              xlabel: str, ylabel: str, log_x: bool = False) -> None:
    """One line with markers per series {name: (xs, ys)}, written as a PNG (atomically)."""
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(y)]
    if not points:
        raise ValueError(f"nothing to plot for {title!r}")
    fx = (lambda x: math.log10(x)) if log_x else (lambda x: x)
    x_lo, x_hi = min(fx(p[0]) for p in points), max(fx(p[0]) for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    pad = 0.05 * ((y_hi - y_lo) or abs(y_hi) or 1.0)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_hi = x_hi if x_hi > x_lo else x_lo + 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (LEFT + (fx(x) - x_lo) / (x_hi - x_lo) * plot_w, TOP + (y_hi - y) / (y_hi - y_lo) * plot_h)

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    draw.rectangle([LEFT, TOP, LEFT + plot_w, TOP + plot_h], outline="black")
    for value in _ticks(y_lo, y_hi):
        y = to_px(0 if not log_x else 10 ** x_lo, value)[1]
        draw.line([LEFT - 4, y, LEFT, y], fill="black")
        draw.text((8, y - 6), _label(value), fill="black", font=font)
    xs_all = sorted({p[0] for p in points})
    for value in xs_all if len(xs_all) <= 10 else [10 ** t if log_x else t for t in _ticks(x_lo, x_hi)]:
        x = to_px(value, y_lo)[0]
        draw.line([x, TOP + plot_h, x, TOP + plot_h + 4], fill="black")
        draw.text((x - 10, TOP + plot_h + 8), _label(value), fill="black", font=font)
    draw.text((LEFT, 12), title, fill="black", font=font)
    draw.text((LEFT + plot_w // 2 - 30, HEIGHT - 20), xlabel + (" (log scale)" if log_x else ""), fill="black",
              font=font)
    draw.text((8, TOP - 18), ylabel, fill="black", font=font)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pixels = [to_px(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = TOP + 10 + 18 * i
        draw.line([WIDTH - RIGHT + 12, ly + 6, WIDTH - RIGHT + 32, ly + 6], fill=colour, width=3)
        draw.text((WIDTH - RIGHT + 38, ly), name, fill="black", font=font)
    save_image(image, path)
