"""Figures that read at a glance (issue 15, part 3): plain NFE tick labels, metric names with their feature space,
pixel-exact sample grids, and the trajectory pictures captured through the sampler callback — checked against a
direct re-computation of the same sampling run with the exact score of a Gaussian mixture."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

import diffsteps as ds
from diffsteps.reporting.plots import metric_label, quality_vs_nfe_figure, save_grid
from diffsteps.reporting.trajectory import capture, gather_samplers_grid, save_trajectory, strip_figure


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def rows(samplers=("ddim", "heun"), nfes=(5, 10, 20, 50)):
    return [{"sampler": s, "nfe": n, "sample_seconds": 0.01 * n * (i + 1), "fid": 30.0 / n + i, "kid_mean": 1.0 / n}
            for i, s in enumerate(samplers) for n in nfes]


def tick_texts(axis) -> list[str]:
    axis.figure.canvas.draw()
    return [t.get_text() for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]


def test_nfe_axis_has_plain_tick_labels_and_metric_names_their_features():
    fig = quality_vs_nfe_figure(rows(), "fid", features="digits")
    nfe_ax, time_ax = fig.axes
    assert tick_texts(nfe_ax.xaxis) == ["5", "10", "20", "50"]
    assert nfe_ax.xaxis.get_scale() == "log"
    assert not [t for t in nfe_ax.xaxis.get_minorticklabels() if t.get_text()]
    assert all("^" not in t and "10^" not in t for t in tick_texts(time_ax.xaxis))
    assert set(tick_texts(time_ax.xaxis)) <= {"0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "2", "5"}
    assert nfe_ax.get_ylabel() == "FID, digits-classifier features"
    assert metric_label("kid_mean", "inception") == "KID, Inception-v3 features"
    assert metric_label("mse", "digits") == "trajectory MSE"  # not a feature-space metric
    # close neighbours are thinned instead of printed over each other
    fig = quality_vs_nfe_figure(rows(nfes=(9, 10, 20, 100)), "fid")
    assert tick_texts(fig.axes[0].xaxis) == ["9", "20", "100"]


def runs(flags) -> list[tuple[bool, int]]:
    """Run lengths of a boolean sequence: [(value, length), ...]."""
    out: list[list] = []
    for f in flags:
        if out and out[-1][0] == f:
            out[-1][1] += 1
        else:
            out.append([bool(f), 1])
    return [tuple(r) for r in out]


def test_sample_grid_renders_every_separator_equally(tmp_path):
    # 6×6 images in [−1, 0.7], never white, so inside the drawn grid the only white screen columns are separators
    x = torch.rand(9, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 1.7 - 1.0
    save_grid(x, tmp_path / "grid.png", modality="image")
    px = np.asarray(Image.open(tmp_path / "grid.png").convert("L")).astype(int)
    ys, xs = np.nonzero(px < 255)
    body = px[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    for flags in ((body == 255).all(axis=0), (body == 255).all(axis=1)):  # columns, then rows
        r = runs(flags)
        tiles = [n for white, n in r if not white]
        gaps = [n for white, n in r if white]
        # 3 × 3 tiles: three tiles of one width, two inner separators of one width (no stray or missing bars)
        assert len(tiles) == 3 and len(set(tiles)) == 1 and len(gaps) == 2 and len(set(gaps)) == 1, r
        assert tiles[0] == 6 * gaps[0]  # the same integer zoom for image pixels and separator pixels


def mixture_model():
    means = torch.tensor([[-1.5, 0.5], [1.0, -1.0]], dtype=torch.float64)
    covs = torch.stack([torch.eye(2, dtype=torch.float64) * 0.1, torch.tensor([[0.2, 0.05], [0.05, 0.1]],
                                                                              dtype=torch.float64)])
    schedule = ds.make_schedule("linear", 1000)
    return ds.ExactEpsilon(ds.GaussianMixture(means, covs), schedule), schedule


def test_trajectory_matches_a_direct_recomputation(tmp_path):
    model, schedule = mixture_model()
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    traj = capture(model, noise, schedule=schedule, sampler="ddim", steps=6, spacing="trailing")
    ts = ds.make_timesteps("trailing", 6, schedule)
    assert len(traj) == 6 and traj.t.tolist() == ts.tolist()[1:] + [-1.0]
    # the strip's last x̂_0 is the sample (DDIM's step into the data returns x̂_0)
    torch.testing.assert_close(traj.x0[-1], traj.sample, rtol=0, atol=0)
    # every intermediate state is what sampling stopped at that level gives (a fresh run, no callback) ...
    for i in range(5):
        direct = ds.sample(model, noise, schedule=schedule, sampler="ddim", spacing=ts[: i + 2], denoise_final=False)
        torch.testing.assert_close(traj.x[i], direct.float(), rtol=1e-6, atol=1e-6)
    # ... and every x̂_0 is the exact model's at the state the step started from: x̂_0 = (x − σ ε)/α
    starts = [noise] + [traj.x[i].double() for i in range(5)]
    for i, (x, t) in enumerate(zip(starts, ts.tolist())):
        abar = schedule.alphas_cumprod[int(t)]
        x0 = (x - (1 - abar).sqrt() * model(x, torch.full((16,), t, dtype=torch.float64))) / abar.sqrt()
        torch.testing.assert_close(traj.x0[i], x0.float(), rtol=1e-5, atol=1e-5)
    # vector data draw as one scatter panel per step, x_t and x̂_0 overlaid
    fig = strip_figure(traj, modality="vector")
    assert len(fig.axes) == 6
    np.testing.assert_allclose(fig.axes[2].collections[1].get_offsets(), traj.x0[2].numpy(), rtol=0, atol=0)


def test_image_trajectory_files_gif_frames_and_sampler_grid(tmp_path):
    # an image "model": ε-prediction of a fixed linear map, enough to give each step a different picture
    schedule = ds.make_schedule("linear", 1000)
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(2)) * 0.1

    def model(x, t):
        return (x.flatten(1) @ w).reshape(x.shape)

    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    for run, (sampler, steps) in enumerate((("ddim", 5), ("heun", 3))):
        traj = capture(model, noise, schedule=schedule, sampler=sampler, steps=steps, label=f"{sampler} {steps}")
        out = tmp_path / f"run{run}" / "trajectory"  # as the runner writes them
        out.mkdir(parents=True)
        png, gif, pt = save_trajectory(traj, out, f"{sampler}_{steps}")
        with Image.open(gif) as im:
            assert im.n_frames == steps  # one frame per step
        strip = np.asarray(strip_figure(traj, n=2).axes[0].images[0].get_array())
        # two samples × (x_t, x̂_0) rows of 4-pixel tiles with 1-pixel gaps, one column per step
        assert strip.shape == (4 * 5 - 1, steps * 5 - 1)
        np.testing.assert_allclose(strip[15:19, -4:], (traj.sample[1, 0].clamp(-1, 1) * 0.5 + 0.5).numpy(),
                                   rtol=0, atol=1e-6)  # the last x̂_0 of sample #1 ends its strip
        assert png.is_file() and torch.load(pt, weights_only=True)["sample"].shape == (3, 1, 4, 4)
    grid = gather_samplers_grid(tmp_path)
    assert grid == tmp_path / "trajectory_samplers.png" and grid.is_file()


def test_sweep_figure_reads_plainly_on_both_cost_axes(tmp_path, monkeypatch):
    import diffsteps.reporting.plots as plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    rs = [dict(r, group=r["sampler"]) for r in rows()]
    plots.plot_sweep_metric(rs, "fid", tmp_path / "sweep.png", {"nfe": rs[:2], "sample_seconds": rs[:2]})
    nfe_ax, time_ax = figs[0].axes[:2]
    assert tick_texts(nfe_ax.xaxis) == ["5", "10", "20", "50"]
    seconds = tick_texts(time_ax.xaxis)
    assert seconds and set(seconds) <= {"0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "2", "5"}, seconds
