"""Graph errors: each names the node and the shapes, and leaves nothing half-updated."""

from __future__ import annotations

import numpy as np
import pytest

import backprop as bp


def small_graph(rng: int = 0) -> tuple[bp.Graph, bp.Linear]:
    g = bp.Graph()
    x, y = g.input("x"), g.input("y")
    lin = bp.Linear(4, 2, rng=rng)
    g.output(g.add(bp.L2Loss(), g.add(lin, x), y))
    return g, lin


X, Y = np.ones((5, 4)), np.zeros((5, 2))


# -- building -------------------------------------------------------------------------


def test_same_layer_twice_points_to_weight_sharing() -> None:
    g = bp.Graph()
    x = g.input("x")
    lin = bp.Linear(3, 3, rng=0)
    h = g.add(lin, x)
    with pytest.raises(ValueError, match=r"already node 'linear_0'.*W=first\.W"):
        g.add(lin, h)
    # Also when the instance hides inside a Sequential or a nested Graph.
    with pytest.raises(ValueError, match="already node 'linear_0'"):
        g.add(bp.Sequential([bp.Tanh(), lin]), h)
    inner = bp.Graph()
    inner.output(inner.add(lin, inner.input("p")))
    with pytest.raises(ValueError, match="already node 'linear_0'"):
        g.add(inner, h)
    # The refused calls changed nothing: the next default name is still linear_1.
    assert g.add(bp.Linear(3, 3, rng=0), h).name == "linear_1"


def test_wrong_number_of_inputs_and_non_handles() -> None:
    g = bp.Graph()
    x = g.input("x")
    with pytest.raises(
        TypeError, match=r"'add_0' \(Add\(\)\) takes 2 input\(s\) \(x_a, x_b\), got 1"
    ):
        g.add(bp.Add(), x)
    with pytest.raises(TypeError, match=r"Merge\(2\).*takes 2 input\(s\).*got 3"):
        g.add(bp.Merge(2), x, x, x)
    with pytest.raises(TypeError, match=r"Merge\(2\).*takes 1 input.*got 0"):
        g.add(bp.Merge())
    with pytest.raises(TypeError, match="ndarray, not a handle"):
        g.add(bp.ReLU(), np.ones((1, 2)))  # type: ignore[arg-type]
    pair = g.add(bp.Branch(2), x)
    with pytest.raises(TypeError, match="tuple of 2 handles"):
        g.add(bp.ReLU(), pair)
    with pytest.raises(TypeError, match="Layer, a Sequential or a Graph"):
        g.add(np.tanh, x)


def test_handle_from_another_graph() -> None:
    g1, g2 = bp.Graph(), bp.Graph()
    x1 = g1.input("x")
    g2.input("x")
    with pytest.raises(ValueError, match="handle 'x' of another Graph"):
        g2.add(bp.ReLU(), x1)
    with pytest.raises(ValueError, match="another Graph"):
        g2.output(x1)


def test_names_are_unique_and_inputs_are_identifiers() -> None:
    g = bp.Graph()
    x = g.input("x")
    g.add(bp.ReLU(), x, name="h")
    with pytest.raises(ValueError, match="'h' already exists"):
        g.add(bp.Tanh(), x, name="h")
    with pytest.raises(ValueError, match="'x' already exists"):
        g.input("x")
    with pytest.raises(ValueError, match="identifier"):
        g.input("my input")
    with pytest.raises(ValueError, match="reserved"):
        g.input("cache")
    with pytest.raises(ValueError, match="without ':'"):
        g.add(bp.Tanh(), x, name="a:b")


def test_graph_frozen_after_output() -> None:
    g = bp.Graph()
    x = g.input("x")
    h = g.add(bp.ReLU(), x)
    with pytest.raises(RuntimeError, match="declare the outputs first"):
        g.forward(x=np.ones((1, 1)))
    g.output(h)
    for call in (lambda: g.add(bp.Tanh(), h), lambda: g.input("z"), lambda: g.output(h)):
        with pytest.raises(RuntimeError, match="already declared"):
            call()


def test_output_arguments() -> None:
    g = bp.Graph()
    x = g.input("x")
    with pytest.raises(TypeError, match="at least one"):
        g.output()
    with pytest.raises(ValueError, match="twice"):
        g.output(x, x)


def test_graph_nodes_must_be_finished_and_not_contain_themselves() -> None:
    g = bp.Graph()
    x = g.input("x")
    with pytest.raises(ValueError, match="node of itself"):
        g.add(g, x)
    unfinished = bp.Graph()
    unfinished.input("p")
    with pytest.raises(RuntimeError, match="no outputs yet"):
        g.add(unfinished, x)


# -- forward ---------------------------------------------------------------------------


def test_missing_and_unknown_inputs() -> None:
    g, _ = small_graph()
    with pytest.raises(TypeError, match=r"missing input\(s\) 'y'.*inputs are 'x', 'y'"):
        g.forward(x=X)
    with pytest.raises(TypeError, match=r"unknown input\(s\) 'z'"):
        g.forward(x=X, y=Y, z=Y)
    with pytest.raises(TypeError, match="'x' is given twice"):
        g.forward({"x": X}, x=X, y=Y)
    with pytest.raises(TypeError, match=r"unknown input\(s\) 'linear_0'"):
        g.forward(x=X, y=Y, linear_0=X)


def test_shape_mismatch_names_node_and_shapes_and_restores_state() -> None:
    g, lin = small_graph()
    g.forward(x=X, y=Y)
    before = g.backward()
    with pytest.raises(
        ValueError, match=r"node 'linear_0' \(Linear\(4→2\)\) with input\(s\) x \(5, 3\)"
    ):
        g.forward(x=np.ones((5, 3)), y=Y)
    with pytest.raises(ValueError, match=r"node 'l2loss_1'.*linear_0 \(5, 2\), y \(5, 3\)"):
        g.forward(x=2 * X, y=np.zeros((5, 3)))  # fails after linear_0 ran on 2 * X
    with pytest.raises(TypeError, match="node 'linear_0'.*integer"):
        g.forward(x=np.ones((5, 4), dtype=int), y=Y)
    after = g.backward()  # still the operating point of the last good forward
    np.testing.assert_array_equal(before.params[lin.W], after.params[lin.W])
    np.testing.assert_array_equal(before.inputs["x"], after.inputs["x"])
    assert g.nodes()[2].shape == (5, 2)


def test_failed_first_forward_leaves_no_operating_point() -> None:
    g, _ = small_graph()
    with pytest.raises(ValueError, match="linear_0"):
        g.forward(x=np.ones((5, 3)), y=Y)
    with pytest.raises(RuntimeError, match="no forward pass yet"):
        g.backward()
    assert all(n.shape is None for n in g.nodes())


# -- backward --------------------------------------------------------------------------


def test_backward_before_forward() -> None:
    g, _ = small_graph()
    with pytest.raises(RuntimeError, match=r"no forward pass yet; call forward\(\.\.\.\) first"):
        g.backward()


def test_backward_after_uncached_forward() -> None:
    g, _ = small_graph()
    g.forward(x=X, y=Y, cache=False)
    with pytest.raises(RuntimeError, match="cache=False"):
        g.backward()


def test_non_scalar_output_needs_a_seed() -> None:
    g = bp.Graph()
    g.output(g.add(bp.Linear(4, 2, rng=0), g.input("x")))
    g.forward(x=X)
    with pytest.raises(ValueError, match=r"output 'linear_0' has shape \(5, 2\), not a scalar"):
        g.backward()


def test_seed_of_wrong_shape_or_type() -> None:
    g = bp.Graph()
    g.output(g.add(bp.Linear(4, 2, rng=0), g.input("x")))
    g.forward(x=X)
    with pytest.raises(
        ValueError, match=r"'linear_0' has shape \(2,\), but the output has shape \(5, 2\)"
    ):
        g.backward(np.ones(2))
    with pytest.raises(TypeError, match="integer"):
        g.backward(np.ones((5, 2), dtype=int))
    with pytest.raises(ValueError, match="unknown output"):
        g.backward({"nope": np.ones((5, 2))})
    with pytest.raises(ValueError, match="mode must be one of"):
        g.backward(np.ones((5, 2)), mode="slow")


def test_several_outputs_need_one_seed_each() -> None:
    g = bp.Graph()
    x = g.input("x")
    g.output(g.add(bp.ReLU(), x), g.add(bp.Tanh(), x))
    g.forward(x=np.ones((1, 2)))
    with pytest.raises(TypeError, match=r"2 outputs \('relu_0', 'tanh_1'\)"):
        g.backward(np.ones((1, 2)))
    with pytest.raises(ValueError, match="'tanh_1' has shape"):
        g.backward((np.ones((1, 2)), None))


def test_layer_run_outside_the_graph_is_detected() -> None:
    g, lin = small_graph()
    g.forward(x=X, y=Y)
    lin.forward(np.zeros((2, 4)))
    with pytest.raises(RuntimeError, match="node 'linear_0'.*run outside this graph"):
        g.backward()


def test_gradcheck_argument_errors() -> None:
    g, _ = small_graph()
    with pytest.raises(TypeError, match=r"takes 2 input\(s\) \(x, y\), got 3"):
        bp.gradcheck(g, X, Y, Y)
    with pytest.raises(TypeError, match="float64"):
        bp.gradcheck(g, x=X.astype(np.float32), y=Y)
    with pytest.raises(TypeError, match="by name are for a Graph"):
        bp.gradcheck(bp.ReLU(), x=X)


def test_layer_of_a_nested_graph_run_outside_is_detected() -> None:
    inner = bp.Graph()
    lin = bp.Linear(2, 2, rng=0)
    inner.output(inner.add(lin, inner.input("p")))
    outer = bp.Graph()
    outer.output(outer.add(inner, outer.input("x")))
    outer.forward(x=np.ones((1, 2)))
    lin.forward(np.zeros((1, 2)))
    with pytest.raises(RuntimeError, match="node 'linear_0'.*run outside this graph"):
        outer.backward(np.ones((1, 2)))
