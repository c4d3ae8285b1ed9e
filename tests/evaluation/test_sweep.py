"""Sweeps over samplers, steps and guidance: their settings, series and plots (log axes over steps)."""

import pytest

from latent_diffusion.evaluation.sweep import plot_sweep, settings, sweep_series


def test_sweep_settings_and_series():
    sweep = settings(["ddim", "euler"], [5, 10], [3.0])
    assert [(s.sampler, s.steps) for s in sweep] == [("ddim", 5), ("ddim", 10), ("euler", 5), ("euler", 10)]
    results = [{**s.as_dict(), "all": i / 10} for i, s in enumerate(sweep)]
    x_key, series = sweep_series(results, {"all": "all"})
    assert x_key == "steps" and series == {"ddim": ([5.0, 10.0], [0.0, 0.1]), "euler": ([5.0, 10.0], [0.2, 0.3])}
    results = [{**s.as_dict(), "all": 0.5, "fid": 1.0} for s in settings(["ddim"], [5], [1, 2])]
    x_key, series = sweep_series(results, {"all": "all", "fid": "FID"})
    assert x_key == "guidance" and series["FID"] == ([1.0, 2.0], [1.0, 1.0]) and set(series) == {"all", "FID"}
    for bad in (dict(samplers=["nope"], steps=[5], guidance=[1]), dict(samplers=["ddim"], steps=[0], guidance=[1]),
                dict(samplers=["ddim"], steps=[5], guidance=[-1])):
        with pytest.raises(ValueError):
            settings(**bad)


def test_sweep_over_steps_plots_fid_on_log_axes(tmp_path, monkeypatch):
    results = [{"sampler": "ddim", "steps": n, "guidance": 3.0, "fid": f} for n, f in ((5, 80.0), (10, 40.0),
                                                                                     (50, 20.0))]
    figures = []
    monkeypatch.setattr("latent_diffusion.evaluation.plot.save_figure", lambda fig, path: figures.append(fig))
    plot_sweep(results, {"fid": "FID"}, tmp_path / "fid.png", "FID", "FID", log_y=True)
    axes = figures[0].axes[0]
    assert (axes.get_xscale(), axes.get_yscale()) == ("log", "log") and axes.get_xlabel() == "sampling steps"
