"""Evaluation plots: matplotlib figures written as PNGs, with log axes where figures span decades."""

import pytest
from PIL import Image

from latent_diffusion.evaluation.plot import line_figure, line_plot

FID = {"FID": ([1, 2, 3, 5], [300.0, 40.0, 12.0, 25.0]), "KID": ([1, 2, 3, 5], [3.0, 2.0, float("nan"), 2.5])}


def test_line_plot_writes_a_png_of_the_figure_size(tmp_path):
    line_plot(FID, tmp_path / "plot.png", "FID against guidance", "w", "FID", log_y=True)
    image = Image.open(tmp_path / "plot.png")
    assert image.format == "PNG" and image.size == (640, 420) and len(image.getcolors(maxcolors=100000)) > 3
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary file left


def test_log_axes_and_share_limits_are_what_was_asked_for():
    axes = line_figure(FID, "t", "steps", "FID", log_x=True, log_y=True).axes[0]
    assert (axes.get_xscale(), axes.get_yscale()) == ("log", "log")
    assert [t.get_text() for t in axes.get_xticklabels()] == ["1", "2", "3", "5"]  # plain numbers at the data
    share = line_figure({"all": ([1, 3], [0.2, 0.9])}, "t", "w", "share", y_limits=(0, 1)).axes[0]
    assert share.get_yscale() == "linear" and share.get_ylim() == (0, 1)


def test_nothing_finite_is_an_error():
    with pytest.raises(ValueError, match="nothing to plot"):
        line_figure({"x": ([1], [float("nan")])}, "t", "x", "y")
