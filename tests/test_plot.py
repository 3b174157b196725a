"""``backprop.plot`` runs headless and draws the numbers it is given."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import backprop as bp
from backprop import plot

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
plt = pytest.importorskip("matplotlib.pyplot")
Figure = pytest.importorskip("matplotlib.figure").Figure


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def images(fig) -> list[np.ndarray]:
    return [np.asarray(im.get_array()) for ax in fig.axes for im in ax.get_images()]


def texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def ticks(axis) -> list[float]:
    """The tick positions inside the axis's view: the ones that are drawn."""
    lo, hi = sorted(axis.get_view_interval())
    return [float(t) for t in axis.get_majorticklocs() if lo <= t <= hi]


def is_integer_list(values) -> bool:
    return all(float(v).is_integer() for v in values)


@pytest.fixture
def linear():
    rng = np.random.default_rng(0)
    lin = bp.Linear(4, 3, rng=rng)
    x_in = rng.standard_normal((2, 4))
    lin.forward(x_in)
    return lin, x_in


def test_import_backprop_does_not_import_matplotlib() -> None:
    code = "import sys, backprop; assert 'matplotlib' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plot_jacobian_shows_the_dense_matrix_with_the_chapters_axes(linear) -> None:
    lin, _ = linear
    L_x, L_theta = lin.jacobians()
    fig = plot.plot_jacobian(L_x, example=1)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    np.testing.assert_array_equal(images(fig)[0], lin.W.value)  # L^x = W (eq. 14.16)
    assert "x_out" in ax.get_ylabel() and "row" in ax.get_ylabel()
    assert "x_in" in ax.get_xlabel() and "column" in ax.get_xlabel()
    assert ax.get_title() == "L^x = ∂x_out/∂x_in  (3×4)"
    lo, hi = images(fig)[0].min(), images(fig)[0].max()
    vmin, vmax = ax.get_images()[0].get_clim()
    assert vmin == -vmax == -max(abs(lo), abs(hi))  # zero is the middle of the scale
    # one tick per entry index, never between entries (-0.5, 0.5, ...)
    assert ticks(ax.xaxis) == [0, 1, 2, 3] and ticks(ax.yaxis) == [0, 1, 2]
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]


def test_plot_jacobian_ticks_are_integers_for_any_size() -> None:
    for M, N in ((1, 1), (2, 2), (5, 13), (40, 64)):
        ax = plot.plot_jacobian(np.ones((M, N))).axes[0]
        for axis, n in ((ax.xaxis, N), (ax.yaxis, M)):
            shown = ticks(axis)
            assert shown and is_integer_list(shown), (M, N, shown)
            assert min(shown) >= 0 and max(shown) <= n - 1
        plt.close("all")


def test_plot_jacobian_of_a_parameter(linear) -> None:
    lin, x_in = linear
    _, L_theta = lin.jacobians()
    fig, ax = plt.subplots()
    out = plot.plot_jacobian(L_theta["W"], example=0, ax=ax, wrt="W", title="L^W")
    assert out is fig
    # L^W = I_3 ⊗ x_inᵀ (eq. 14.14), built here with numpy
    np.testing.assert_array_equal(images(fig)[0], np.kron(np.eye(3), x_in[0][None, :]))
    assert "W entry" in ax.get_xlabel() and ax.get_title() == "L^W"


def test_plot_jacobian_accepts_arrays_and_checks_the_example() -> None:
    A = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(images(plot.plot_jacobian(A))[0], A)
    with pytest.raises(ValueError, match="only example 0"):
        plot.plot_jacobian(A, example=1)
    with pytest.raises(ValueError, match="out of range for a batch of 2"):
        plot.plot_jacobian(np.zeros((2, 3, 3)), example=2)


def test_plot_sparsity_marks_the_stored_entries() -> None:
    relu = bp.ReLU()
    relu.forward(np.array([[1.0, -2.0, 3.0, 0.5, -1.0]]))
    L_x, _ = relu.jacobians()  # Diagonal 5×5
    fig = plot.plot_sparsity(L_x)
    ax = fig.axes[0]
    (line,) = ax.get_lines()
    # relu'(x_in) on the diagonal: 1 where x_in > 0, so entries 0, 2 and 3
    np.testing.assert_array_equal(np.sort(line.get_xdata()), [0, 2, 3])
    np.testing.assert_array_equal(line.get_xdata(), line.get_ydata())  # the diagonal
    assert "3 of 5×5" in ax.get_title() and "12.0%" in ax.get_title()
    assert "x_out" in ax.get_ylabel() and "x_in" in ax.get_xlabel()
    assert ticks(ax.xaxis) == ticks(ax.yaxis) == [0, 1, 2, 3, 4]
    assert ax.xaxis.get_ticks_position() == "bottom"  # next to its label


def test_plot_backward_step_is_the_matrix_product(linear) -> None:
    lin, x_in = linear
    g_out = np.array([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0]])
    L_x, _ = lin.jacobians()
    fig = plot.plot_backward_step(g_out, L_x, example=0)
    g_in, g_row, L = images(fig)
    W = lin.W.value
    np.testing.assert_allclose(g_in, (g_out[0] @ W)[None, :], rtol=1e-15)  # eq. 14.10
    np.testing.assert_array_equal(g_row, g_out[:1])
    np.testing.assert_array_equal(L, W)
    titles = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert titles == ["g_in  (1×4)", "g_out  (1×3)", "L^x  (3×4)"]
    assert fig._suptitle.get_text() == "g_in = g_out · L^x  (eq. 14.10)"
    assert {"=", "·"} <= set(texts(fig))
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert [ticks(ax.xaxis) for ax in panels] == [[0, 1, 2, 3], [0, 1, 2], [0, 1, 2, 3]]
    assert ticks(panels[2].yaxis) == [0, 1, 2] and panels[2].get_ylabel() == "x_out entry"


def test_plot_backward_step_keeps_the_signs_clear_of_the_labels(linear) -> None:
    lin, _ = linear
    L_x, L_theta = lin.jacobians()
    for L, g_out, wrt in ((L_x, np.ones((1, 3)), "x_in"), (L_theta["W"], np.ones((1, 3)), "W")):
        fig = plot.plot_backward_step(g_out, L, wrt=wrt)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        signs = [t for ax in fig.axes for t in ax.texts if t.get_text() in ("=", "·")]
        panels = [ax for ax in fig.axes if ax.get_images()]
        assert len(signs) == 2 and len(panels) == 3
        for sign in signs:
            box = sign.get_window_extent(renderer)
            for ax in panels:  # the sign overlaps no panel, tick label or axis label
                assert not box.overlaps(ax.get_tightbbox(renderer)), (wrt, sign.get_text())
        # the "·" sits between g_out and L, clear of L's y label
        dot = next(s for s in signs if s.get_text() == "·").get_window_extent(renderer)
        ylabel = panels[2].yaxis.label.get_window_extent(renderer)
        assert dot.x1 < ylabel.x0
        plt.close(fig)


def test_plot_backward_step_shows_a_given_g_in_and_parameter_steps(linear) -> None:
    lin, x_in = linear
    g_out = np.array([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0]])
    g_in, _ = lin.backward(g_out)
    L_x, L_theta = lin.jacobians()
    fig = plot.plot_backward_step(g_out, L_x, g_in=g_in, example=1)
    np.testing.assert_array_equal(images(fig)[0], g_in[1:2])
    fig = plot.plot_backward_step(g_out, L_theta["W"], example=1, wrt="W")
    # g_out · (I ⊗ x_inᵀ) = vec(g_out x_inᵀ): eq. 14.8 with 14.14
    np.testing.assert_allclose(images(fig)[0][0], np.outer(g_out[1], x_in[1]).ravel())
    assert fig._suptitle.get_text() == "∂J/∂W = g_out · L^W  (eq. 14.8)"
    with pytest.raises(ValueError, match="L has 3 rows"):
        plot.plot_backward_step(np.ones((2, 4)), L_x)


def test_plot_history_draws_the_recorded_numbers() -> None:
    history = bp.History(
        epoch=[1, 2, 3],
        train_loss=[1.0, 0.5, 0.25],
        train_accuracy=[0.5, 0.75, 0.875],
        val_loss=[1.1, 0.6, 0.4],
        val_accuracy=[0.4, 0.7, 0.8],
        seconds=[0.1, 0.2, 0.3],
    )
    fig = plot.plot_history(history)
    loss_ax, acc_ax = fig.axes
    assert [list(line.get_ydata()) for line in loss_ax.get_lines()] == [
        [1.0, 0.5, 0.25],
        [1.1, 0.6, 0.4],
    ]
    assert [list(line.get_ydata()) for line in acc_ax.get_lines()] == [
        [0.5, 0.75, 0.875],
        [0.4, 0.7, 0.8],
    ]
    assert loss_ax.get_xlabel() == "epoch" and "loss" in loss_ax.get_ylabel()
    fig.canvas.draw()
    for axes in (loss_ax, acc_ax):  # an epoch is a whole number
        assert all(float(t).is_integer() for t in axes.get_xticks())
    # one Axes given: losses on it, accuracies on a twin axis
    fig2, ax = plt.subplots()
    assert plot.plot_history(history.as_dict(), ax=ax) is fig2
    assert len(fig2.axes) == 2 and len(ax.get_lines()) == 2


def test_plot_history_without_accuracy_has_one_panel() -> None:
    nan = float("nan")
    history = bp.History([1, 2], [1.0, 0.5], [nan, nan], [], [], [0.1, 0.2])
    fig = plot.plot_history(history)
    assert len(fig.axes) == 1
    assert [list(line.get_ydata()) for line in fig.axes[0].get_lines()] == [[1.0, 0.5]]


def test_plot_input_gradients_one_panel_per_row() -> None:
    grads = np.arange(3 * 64, dtype=float).reshape(3, 64) - 90.0
    image = np.linspace(0, 1, 64)
    fig = plot.plot_input_gradients(grads, (8, 8), titles=["a", "b", "c"], image=image)
    shown = images(fig)
    assert len(shown) == 4
    np.testing.assert_array_equal(shown[0], image.reshape(8, 8))
    for k in range(3):
        np.testing.assert_array_equal(shown[k + 1], grads[k].reshape(8, 8))
    titled = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert titled == ["input x", "a", "b", "c"]
    clims = {ax.get_images()[0].get_clim() for ax in fig.axes[1:4]}
    assert clims == {(-101.0, 101.0)}  # one shared, symmetric scale: max |g| = 191 - 90
    # and one colour bar for that scale: the last Axes, after the 4 panels
    assert len(fig.axes) == 4 + 1
    bar = fig.axes[-1]
    assert bar.get_label() == "<colorbar>" and bar.get_ylabel() == "gradient"
    assert bar.get_ylim() == (-101.0, 101.0)
    without_image = plot.plot_input_gradients(grads, (8, 8))
    assert len(without_image.axes) == 3 + 1
    assert without_image.axes[-1].get_ylim() == (-101.0, 101.0)
    with pytest.raises(ValueError, match=r"expected \(K, 64\)"):
        plot.plot_input_gradients(np.zeros((2, 10)))


def sequential_with_loss() -> bp.Sequential:
    rng = np.random.default_rng(0)
    return bp.Sequential(
        [bp.Linear(3, 4, rng=rng), bp.ReLU(), bp.Linear(4, 2, rng=rng), bp.SoftmaxCrossEntropy()]
    )


def test_draw_sequential() -> None:
    fig = plot.draw_graph(sequential_with_loss())
    words = texts(fig)
    for expected in ("x", "labels", "J", "0.W\n4×3", "0.b\n4", "2.W\n2×4", "2.b\n2"):
        assert expected in words
    assert any(w.startswith("Linear(3→4)") for w in words)
    assert any(w.startswith("SoftmaxCrossEntropy") for w in words)
    # the layers are numbered from 0, as print(model) and the parameter names count
    layers = [w for w in words if w.rpartition("\n")[2].isdigit() and not w[0].isdigit()]
    assert layers == [
        "Linear(3→4)\n0",
        "ReLU\n1",
        "Linear(4→2)\n2",
        "SoftmaxCrossEntropy\n3",
    ]
    colours = {t.get_text(): t.get_bbox_patch().get_facecolor() for t in fig.axes[0].texts}
    assert colours["0.W\n4×3"] != colours["x"]  # parameters are not data
    # 3 data edges into layers + labels + J, and 4 parameter edges
    assert len(fig.axes[0].patches) == 4 + 1 + 1 + 4


def branchy_graph() -> bp.Graph:
    rng = np.random.default_rng(0)
    g = bp.Graph()
    x = g.input("x")
    h = g.add(bp.Linear(3, 3, rng=rng), x, name="lin")
    a, b = g.add(bp.Branch(2), h, name="split")
    m = g.add(bp.Merge(), g.add(bp.ReLU(), a, name="relu"), g.add(bp.Tanh(), b, name="tanh"))
    z = g.add(bp.Linear(6, 6, rng=rng), m, name="mix")
    g.output(g.add(bp.Add(), g.add(bp.Tanh(), z, name="act"), z, name="sum"))  # z used twice
    return g


def test_draw_graph_shows_branch_merge_and_automatic_branch() -> None:
    g = branchy_graph()
    auto = [n.name for n in g.nodes() if n.auto]
    assert len(auto) == 1
    fig = plot.draw_graph(g)
    words = texts(fig)
    assert "Branch(2)\nsplit" in words
    assert any(w.startswith("Merge") for w in words)
    marked = [t for t in fig.axes[0].texts if t.get_text() == f"Branch (auto)\n{auto[0]}"]
    assert len(marked) == 1
    assert marked[0].get_bbox_patch().get_linestyle() == "--"
    assert {"0", "1"} <= set(words)  # the Branch outputs are numbered
    assert "lin.W\n3×3" in words and "mix.b\n6" in words


def test_to_dot_lists_every_node_and_edge() -> None:
    g = branchy_graph()
    dot = plot.to_dot(g)
    assert dot.startswith('digraph "Graph" {') and dot.rstrip().endswith("}")
    assert '"x" -> "lin";' in dot
    assert '"split" -> "relu" [label="0"];' in dot
    assert '"split" -> "tanh" [label="1"];' in dot
    assert '"param:lin.W" -> "lin" [style=dotted];' in dot
    assert 'style="filled,dashed"' in dot  # the automatic Branch
    edges = [line for line in dot.splitlines() if "->" in line]
    # x→lin, lin→split, split→relu, split→tanh, relu→merge, tanh→merge, merge→mix,
    # mix→auto, auto→act, act→sum, auto→sum, sum→output, and 4 parameter edges
    assert len(edges) == 16


def test_draw_graph_rejects_a_layer() -> None:
    with pytest.raises(TypeError, match="wrap a layer in a Sequential"):
        plot.draw_graph(bp.ReLU())


def test_nested_sequential_is_one_box() -> None:
    rng = np.random.default_rng(0)
    g = bp.Graph()
    x = g.input("x")
    inner = bp.Sequential([bp.Linear(3, 3, rng=rng), bp.ReLU()])
    g.output(g.add(bp.Linear(3, 2, rng=rng), g.add(inner, x, name="block"), name="head"))
    words = texts(plot.draw_graph(g))
    assert "Sequential of 2\nblock" in words
    assert "block.0.W\n3×3" in words  # its parameters are drawn with their full names
    assert '"param:block.0.W" -> "block" [style=dotted];' in plot.to_dot(g)


def test_plot_gradient_norms_draws_the_geometric_mean_of_each_set_on_a_log_scale() -> None:
    net = bp.unroll(bp.RNNCell(2, 3, rng=0), 6)
    net.forward(x=np.random.default_rng(1).standard_normal((4, 6, 2)), h0=np.zeros((4, 3)))
    norms = bp.recurrent.gradient_norms(net)
    one = np.array([1.0, 0.5, 0.25])
    fig = plot.plot_gradient_norms({"net": norms, "one sequence": one})
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["net", "one sequence"]
    np.testing.assert_allclose(lines[0].get_ydata(), np.exp(np.log(norms).mean(axis=0)))
    np.testing.assert_array_equal(lines[1].get_xdata(), [0, 1, 2])
    assert is_integer_list(ticks(ax.xaxis))
    with pytest.raises(ValueError, match="'bad' must be positive finite norms"):
        plot.plot_gradient_norms({"bad": np.array([1.0, 0.0])})
    with pytest.raises(TypeError, match="expected {label: norms"):
        plot.plot_gradient_norms({})
