"""``plot_filters`` and ``plot_toeplitz``: what they draw is the layer's W and its ``L^x``."""

from __future__ import annotations

import numpy as np
import pytest

from backprop.layers import Conv2d, ConvTranspose2d

plt = pytest.importorskip("matplotlib.pyplot")
plot = pytest.importorskip("backprop.plot")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _conv(c_in: int = 1, c_out: int = 4, **kw) -> Conv2d:
    return Conv2d(c_in, c_out, 3, padding=1, rng=0, dtype=np.float64, **kw)


def _images(fig) -> list:
    return [ax for ax in fig.axes if ax.images]


def _stored(conv: Conv2d, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The 0/1 pattern and the values of ``conv.jacobians()[0].to_sparse(0)``, after a
    real forward pass at ``size``."""
    conv.forward(np.zeros((1, conv.c_in, *size)))
    S = conv.jacobians()[0].to_sparse(0).tocoo()
    pattern = np.zeros(S.shape)
    pattern[S.row, S.col] = 1.0
    return pattern, S.toarray()


def test_plot_filters_draws_each_kernel_on_one_symmetric_scale() -> None:
    conv = _conv(c_in=2, c_out=5)
    W = conv.params["W"].value
    fig = plot.plot_filters(conv.params["W"], in_channel=1, ncols=3)
    panels = _images(fig)
    assert len(panels) == 5  # one image per output channel; the 6th cell is blank
    assert len(fig.axes) == 2 * 3 + 1  # the grid, then the colour bar
    lim = np.abs(W[:, 1]).max()
    for o, ax in enumerate(panels):
        (image,) = ax.images
        np.testing.assert_array_equal(image.get_array(), W[o, 1])
        assert image.get_clim() == (-lim, lim)
        assert ax.get_title() == str(o)
    assert not fig.axes[5].axison  # the blank cell


def test_plot_filters_takes_three_axes_and_refuses_other_shapes() -> None:
    W = np.arange(18.0).reshape(2, 3, 3) - 9
    fig = plot.plot_filters(W)
    np.testing.assert_array_equal(_images(fig)[1].images[0].get_array(), W[1])
    with pytest.raises(ValueError, match=r"W has shape \(3, 3\)"):
        plot.plot_filters(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="in_channel 1 is out of range"):
        plot.plot_filters(W, in_channel=1)


@pytest.mark.parametrize("size", [(8, 8), (5, 7)])
def test_plot_toeplitz_draws_the_pattern_and_values_of_to_sparse(size) -> None:
    conv = _conv(c_in=2, c_out=3)
    pattern, dense = _stored(conv, size)
    H, W_ = size
    fig = plot.plot_toeplitz(conv, size, out_channel=2, in_channel=1)
    assert len(fig.axes) == 4 and len(_images(fig)) == 3  # 3 panels, then the colour bar
    assert fig.axes[3].get_label() == "<colorbar>"
    where, values, kernel = (ax.images[0].get_array() for ax in fig.axes[:3])
    rows, cols = slice(2 * H * W_, 3 * H * W_), slice(H * W_, 2 * H * W_)
    np.testing.assert_array_equal(where, pattern[rows, cols])
    assert where.sum() == (where == 1).sum() > 0
    np.testing.assert_array_equal(np.ma.getmaskarray(values), pattern[rows, cols] == 0)
    np.testing.assert_array_equal(values.filled(0.0), dense[rows, cols])
    np.testing.assert_array_equal(kernel, conv.params["W"].value[2, 1])
    caption = fig.get_supxlabel()
    assert "Toeplitz" in caption and "shifted along the image" in caption


def test_plot_toeplitz_stacks_every_output_channel() -> None:
    conv = _conv(c_out=4)
    pattern, _ = _stored(conv, (6, 6))
    fig = plot.plot_toeplitz(conv.jacobians()[0], out_channel=None)  # the L^x itself
    where, _, kernel = (ax.images[0].get_array() for ax in fig.axes[:3])
    np.testing.assert_array_equal(where, pattern)
    assert where.shape == (4 * 36, 36)
    np.testing.assert_array_equal(kernel, conv.params["W"].value[:, 0].reshape(12, 3))


def test_plot_toeplitz_refuses_what_it_cannot_draw() -> None:
    with pytest.raises(ValueError, match=r"give the input size \(H, W\)"):
        plot.plot_toeplitz(_conv())
    with pytest.raises(TypeError, match="expected a Conv2d or its L\\^x"):
        plot.plot_toeplitz(ConvTranspose2d(1, 2, 3), (8, 8))
    with pytest.raises(ValueError, match="out_channel 4 is out of range"):
        plot.plot_toeplitz(_conv(), (8, 8), out_channel=4)
    with pytest.raises(ValueError, match="groups=1"):
        plot.plot_toeplitz(_conv(c_in=2, groups=2), (8, 8))
