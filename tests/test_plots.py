"""Sample figures per data modality (DataSpec.modality): image grids, vector scatters, signal line plots (one per
sample, channels stacked), and the across-steps strips. Checked on the matplotlib figure itself: the number of
axes and lines, and the drawn values against the samples."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from helpers import SineSignals
from PIL import Image

from diffsteps.reporting.plots import (
    grid_figure,
    save_grid,
    save_steps_grid,
    steps_grid_figure,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_image_grid_places_every_sample():
    x = rand(5, 1, 3, 4)
    x[0, 0, 0, 0] = 7.0  # out of range: drawn clipped to white
    fig = grid_figure(x, modality="image", title="t")
    assert len(fig.axes) == 1 and len(fig.axes[0].images) == 1 and fig.axes[0].get_title() == "t"
    grid = np.asarray(fig.axes[0].images[0].get_array())
    # 5 samples → 3 columns, 2 rows, a one-pixel white border around each 3×4 cell
    assert grid.shape == (2 * 4 + 1, 3 * 5 + 1)
    want = (x.clamp(-1, 1)[:, 0] * 0.5 + 0.5).numpy()
    for i in range(5):
        r, k = divmod(i, 3)
        np.testing.assert_allclose(grid[1 + 4 * r: 4 + 4 * r, 1 + 5 * k: 5 + 5 * k], want[i], rtol=0, atol=1e-6)
    assert grid[0, 0] == grid[5:8, 11:15].min() == 1.0  # border and the empty sixth cell are white
    rgb = np.asarray(grid_figure(rand(4, 3, 2, 2), modality="image").axes[0].images[0].get_array())
    assert rgb.shape == (2 * 3 + 1, 2 * 3 + 1, 3)


def test_vector_scatter_draws_the_first_two_coordinates():
    x = rand(50, 8)
    fig = grid_figure(x, modality="vector")
    assert len(fig.axes) == 1
    np.testing.assert_allclose(fig.axes[0].collections[0].get_offsets(), x[:, :2].numpy(), rtol=0, atol=0)
    one = rand(10, 1)
    offsets = grid_figure(one, modality="vector").axes[0].collections[0].get_offsets()
    np.testing.assert_array_equal(offsets, np.stack([one[:, 0].numpy(), np.zeros(10)], 1))


def test_signal_grid_is_one_line_plot_per_sample_with_channels_stacked():
    dm = SineSignals(channels=3, length=40)  # a (C, L) data module
    x = dm.real_samples(5, split="train")
    fig = grid_figure(x, modality=dm.spec.modality, title="sines")
    assert len(fig.axes) == 5 and fig._suptitle.get_text() == "sines"  # no empty frames for the 3×2 layout's sixth
    spacing = 2 * x.abs().max().item()
    for ax, sample in zip(fig.axes, x):
        assert len(ax.lines) == 3
        for c, line in enumerate(ax.lines):
            np.testing.assert_array_equal(line.get_xdata(), np.arange(40))
            np.testing.assert_allclose(line.get_ydata(), (sample[c] - c * spacing).numpy(), rtol=0, atol=1e-6)
        # stacked, not overlapping: channel c lies in its own band [−(c + ½)·spacing, −(c − ½)·spacing]
        lo, hi = ax.get_ylim()
        assert lo == pytest.approx(-2.5 * spacing) and hi == pytest.approx(0.5 * spacing)
    one = grid_figure(rand(1, 1, 7), modality="signal")
    assert len(one.axes) == 1 and len(one.axes[0].lines) == 1


def test_steps_grids_have_a_row_per_step_count():
    labels = ["5 steps", "10 steps", "20 steps"]
    imgs = {lab: rand(4, 1, 3, 3, seed=i) for i, lab in enumerate(labels)}
    fig = steps_grid_figure(imgs, modality="image", title="same noise")
    assert [ax.get_ylabel() for ax in fig.axes] == labels
    for ax, x in zip(fig.axes, imgs.values()):
        strip = np.asarray(ax.images[0].get_array())
        assert strip.shape == (3, 4 * 4 - 1)
        np.testing.assert_allclose(strip[:, 4:7], (x[1, 0] * 0.5 + 0.5).numpy(), rtol=0, atol=1e-6)

    sig = {lab: rand(4, 2, 16, seed=i) for i, lab in enumerate(labels)}
    sig["20 steps"] = sig["20 steps"][:3]  # a shorter row leaves no empty frame
    fig = steps_grid_figure(sig, modality="signal")
    assert len(fig.axes) == 4 + 4 + 3 and all(len(ax.lines) == 2 for ax in fig.axes)
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()] == labels
    np.testing.assert_array_equal(fig.axes[5].lines[0].get_ydata(), sig["10 steps"][1, 0].numpy())

    vec = {lab: rand(30, 2, seed=i) for i, lab in enumerate(labels)}
    fig = steps_grid_figure(vec, modality="vector")
    assert [ax.get_title() for ax in fig.axes] == labels
    for ax, x in zip(fig.axes, vec.values()):
        np.testing.assert_allclose(ax.collections[0].get_offsets(), x.numpy(), rtol=0, atol=0)


@pytest.mark.parametrize("modality,x", [("image", rand(6, 3, 4, 4)), ("vector", rand(20, 2)),
                                        ("signal", rand(6, 2, 12))])
def test_files_written_and_figures_closed(tmp_path, modality, x):
    plt.close("all")
    save_grid(x, tmp_path / "grid.png", title="t", modality=modality)
    out = save_steps_grid({"5 steps": x[:4], "10 steps": x[:4]}, tmp_path / "steps.png", modality=modality)
    assert out == tmp_path / "steps.png" and plt.get_fignums() == []
    for name in ("grid.png", "steps.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and min(im.size) > 100


def test_wrong_layout_for_the_modality_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="valid choices: image, vector, signal"):
        grid_figure(rand(4, 2), modality="audio")
    with pytest.raises(ValueError, match=r"image samples are batches \(B, C, H, W\), got shape \(4, 2, 8\)"):
        grid_figure(rand(4, 2, 8), modality="image")
    with pytest.raises(ValueError, match=r"signal samples are batches \(B, C, L\), got shape \(4, 8\)"):
        steps_grid_figure({"5 steps": rand(4, 8)}, modality="signal")
    with pytest.raises(ValueError, match="no samples"):
        steps_grid_figure({"5 steps": rand(0, 2)}, modality="vector")
    with pytest.raises(TypeError):
        save_grid(rand(4, 2), tmp_path / "x.png")  # the modality must be said, not guessed
