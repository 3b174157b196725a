"""Writing a layer: the protocol names a forgotten hook and a wrong g_in."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop.jacobian import Diagonal, Jacobian
from backprop.layer import Layer, OperatingPoint


class Cube(Layer):
    """``x ↦ x³``: the two hooks a layer must write, and nothing else."""

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return x_in**3

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        return Diagonal((3 * x**2).reshape(x.shape[0], -1), "3x²"), {}


def test_a_layer_with_its_two_hooks_works_and_checks() -> None:
    x = np.random.default_rng(0).standard_normal((3, 4))
    layer = Cube()
    np.testing.assert_array_equal(layer.forward(x), x**3)
    g_in, grads = layer.backward(np.ones_like(x))
    np.testing.assert_allclose(g_in, 3 * x**2, rtol=1e-15)
    assert grads == {}
    assert bp.gradcheck(Cube(), x).worst < 1e-6


def test_a_forgotten_forward_is_named() -> None:
    class NoForward(Layer):
        def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
            return None, {}

    with pytest.raises(TypeError, match=r"NoForward cannot be built.*_forward\(self, op"):
        NoForward()


def test_forgotten_jacobians_are_named() -> None:
    class NoJacobians(Layer):
        def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
            return x_in

    with pytest.raises(TypeError, match=r"NoJacobians cannot be built.*_jacobians\(self, op\)"):
        NoJacobians()


def test_both_forgotten_hooks_are_named_at_once() -> None:
    class Empty(Layer):
        pass

    with pytest.raises(TypeError, match=r"_forward.*nor _jacobians.*Writing your own layer"):
        Empty()


class WrongShape(Cube):
    """A fused backward that forgets to reshape its gradient."""

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        return (g_out * 3 * op.x_in[0] ** 2).ravel(), {}


def test_a_g_in_of_the_wrong_shape_is_named() -> None:
    layer = WrongShape()
    x = np.ones((2, 3))
    layer.forward(x)
    with pytest.raises(RuntimeError, match=r"WrongShape\(\)._backward .*input 0 \(x_in\) as "
                       r"float64 of shape \(6,\), but that input is float64 of "
                       r"shape \(2, 3\)"):  # fmt: skip
        layer.backward(np.ones((2, 3)))


class WrongDtype(Cube):
    """A fused backward that computes its gradient in float64 whatever the input."""

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        return (g_out * 3 * op.x_in[0] ** 2).astype(np.float64), {}


def test_a_g_in_of_the_wrong_dtype_is_named() -> None:
    layer = WrongDtype()
    layer.forward(np.ones((2, 3), np.float32))
    with pytest.raises(RuntimeError, match=r"input 0 \(x_in\) as float64 of shape \(2, 3\), "
                       r"but that input is float32"):  # fmt: skip
        layer.backward(np.ones((2, 3), np.float32))
    # Inside a model, the layer below never sees the float64 gradient.
    net = bp.Sequential([bp.Linear(3, 3, dtype=np.float32), WrongDtype()])
    net.forward(np.ones((2, 3), np.float32))
    with pytest.raises(RuntimeError, match=r"WrongDtype\(\)._backward .*float64"):
        net.backward(np.ones((2, 3), np.float32))


def test_a_wrong_g_in_inside_a_model_is_named_too() -> None:
    net = bp.Sequential([bp.Linear(3, 3), WrongShape()])
    net.forward(np.ones((2, 3)))
    with pytest.raises(RuntimeError, match=r"WrongShape\(\)._backward"):
        net.backward(np.ones((2, 3)))


def test_a_two_input_layer_must_return_one_gradient_per_input() -> None:
    class HalfAdd(Layer):
        inputs = ("x_a", "x_b")

        def _forward(self, op: OperatingPoint, x_a: np.ndarray, x_b: np.ndarray) -> np.ndarray:
            return x_a + x_b

        def _backward(
            self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
        ) -> tuple[Any, dict[str, np.ndarray]]:
            return g_out, {}  # one array for two inputs

        def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
            raise AssertionError("not reached")

    layer = HalfAdd()
    layer.forward(np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(RuntimeError, match=r"HalfAdd\(\)._backward returned ndarray.*2 inputs"):
        layer.backward(np.ones((2, 2)))


def test_the_operating_point_is_public_and_named_when_missing() -> None:
    layer = Cube()
    with pytest.raises(RuntimeError, match=r"Cube\(\): operating_point\(\) needs .*forward"):
        layer.operating_point()
    x = np.full((2, 3), 2.0)
    layer.forward(x)
    op = layer.operating_point()
    np.testing.assert_array_equal(op.x_in[0], x)
    np.testing.assert_array_equal(op.x_out, np.full((2, 3), 8.0))
