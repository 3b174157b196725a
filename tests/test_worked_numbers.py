"""Worked numbers from chapter 14, derived by hand and written out literally.

(a) the Linear layer's Jacobians (eq. 14.13-14.15); (b) the ReLU Jacobian
(eq. 14.32); (c) the 4-3-3-2 MLP of figure 14.15 without biases, forward and
backward, in both backward modes; (d) eq. 14.11: the gradient of the batch mean
loss is the mean of the per-example gradients.
"""

from __future__ import annotations

import numpy as np
import pytest

import backprop as bp

# -- (a) Linear: eq. 14.13, 14.14, 14.15 -------------------------------------------------

W_A = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
B_A = np.array([0.5, -1.0])
X_A = np.array([[7.0, 8.0, 9.0]])


def test_linear_forward_worked() -> None:
    lin = bp.Linear(3, 2, W=W_A, b=B_A)
    # x_out = W x_in + b = [7 + 16 + 27 + 0.5, 28 + 40 + 54 - 1]
    np.testing.assert_array_equal(lin.forward(X_A), [[50.5, 121.0]])


def test_linear_jacobians_worked() -> None:
    lin = bp.Linear(3, 2, W=W_A, b=B_A)
    lin.forward(X_A)
    L_x, L_theta = lin.jacobians()
    # eq. 14.13: L^x[i, j] = W[i, j]
    np.testing.assert_array_equal(L_x.to_dense()[0], [[1, 2, 3], [4, 5, 6]])
    # eq. 14.14: L^W[i, j*3 + k] = x_in[k] where i == j, else 0 (W flattened row by row)
    np.testing.assert_array_equal(
        L_theta["W"].to_dense()[0],
        [
            [7, 8, 9, 0, 0, 0],
            [0, 0, 0, 7, 8, 9],
        ],
    )
    # eq. 14.15: L^b = I
    np.testing.assert_array_equal(L_theta["b"].to_dense()[0], [[1, 0], [0, 1]])


def test_linear_backward_worked() -> None:
    lin = bp.Linear(3, 2, W=W_A, b=B_A)
    lin.forward(X_A)
    g_out = np.array([[1.0, -2.0]])
    g_in, grads = lin.backward(g_out)
    # g_in = g_out W = [1 - 8, 2 - 10, 3 - 12]  (eq. 14.18)
    np.testing.assert_array_equal(g_in, [[-7.0, -8.0, -9.0]])
    # dJ/dW in W's shape = g_outᵀ x_in, the transpose of the chapter's x_in g_out (eq. 14.28)
    np.testing.assert_array_equal(grads["W"], [[7.0, 8.0, 9.0], [-14.0, -16.0, -18.0]])
    # dJ/db = g_out  (eq. 14.20)
    np.testing.assert_array_equal(grads["b"], [1.0, -2.0])


# -- (b) ReLU: eq. 14.32, with h'(0) = 1 as in the chapter -------------------------------


def test_relu_diagonal_worked() -> None:
    relu = bp.ReLU()
    out = relu.forward(np.array([[-1.5, 0.0, 2.0]]))
    np.testing.assert_array_equal(out, [[0.0, 0.0, 2.0]])
    L_x, L_theta = relu.jacobians()
    assert L_theta == {}
    np.testing.assert_array_equal(L_x.to_dense()[0], [[0, 0, 0], [0, 1, 0], [0, 0, 1]])
    g_in, _ = relu.backward(np.array([[1.0, 2.0, 3.0]]))
    np.testing.assert_array_equal(g_in, [[0.0, 2.0, 3.0]])


# -- (c) the MLP of figure 14.15: x (4) -> W1 -> z (3) -> relu -> h (3) -> W2 -> ŷ (2) -> L2 ---
#
# Forward, by hand:
#   x  = [1, 2, 0, -1]
#   W1 = [[1, 0,  1, 2],        z = W1 x = [1 + 0 + 0 - 2,
#         [0, 1, -1, 1],                    0 + 2 - 0 - 1,
#         [2, 1,  0, 1]]                    2 + 2 + 0 - 1] = [-1, 1, 3]
#   h  = relu(z) = [0, 1, 3]
#   W2 = [[1, 2, -1],           ŷ = W2 h = [0 + 2 - 3, 0 + 1 + 3] = [-1, 4]
#         [0, 1,  1]]
#   y  = [1, 2];  ŷ - y = [-2, 2];  J = ‖ŷ - y‖² = 4 + 4 = 8   (eq. 14.34, B = 1)
#
# Backward, by hand (g's as row vectors):
#   g_ŷ = 2(ŷ - y) = [-4, 4]                                    (eq. 14.35)
#   dJ/dW2 = g_ŷᵀ h = [[-4·0, -4·1, -4·3], [4·0, 4·1, 4·3]]
#          = [[0, -4, -12], [0, 4, 12]]
#   g_h = g_ŷ W2 = [-4·1 + 4·0, -4·2 + 4·1, -4·(-1) + 4·1] = [-4, -4, 8]   (eq. 14.18)
#   g_z = g_h diag(relu'(z)) = [-4, -4, 8] * [0, 1, 1] = [0, -4, 8]    (eq. 14.33)
#   dJ/dW1 = g_zᵀ x = [[0, 0, 0, 0], [-4, -8, 0, 4], [8, 16, 0, -8]]
#   g_x = g_z W1 = [0·1 - 4·0 + 8·2, 0·0 - 4·1 + 8·1, 0·1 - 4·(-1) + 8·0, 0·2 - 4·1 + 8·1]
#       = [16, 4, 4, 4]

X_C = np.array([[1.0, 2.0, 0.0, -1.0]])
W1_C = np.array([[1.0, 0.0, 1.0, 2.0], [0.0, 1.0, -1.0, 1.0], [2.0, 1.0, 0.0, 1.0]])
W2_C = np.array([[1.0, 2.0, -1.0], [0.0, 1.0, 1.0]])
Y_C = np.array([[1.0, 2.0]])

Z_C = [[-1.0, 1.0, 3.0]]
H_C = [[0.0, 1.0, 3.0]]
YHAT_C = [[-1.0, 4.0]]
J_C = 8.0
G_YHAT_C = [[-4.0, 4.0]]
G_H_C = [[-4.0, -4.0, 8.0]]
G_Z_C = [[0.0, -4.0, 8.0]]
G_X_C = [[16.0, 4.0, 4.0, 4.0]]
DW2_C = [[0.0, -4.0, -12.0], [0.0, 4.0, 12.0]]
DW1_C = [[0.0, 0.0, 0.0, 0.0], [-4.0, -8.0, 0.0, 4.0], [8.0, 16.0, 0.0, -8.0]]


def mlp() -> bp.Sequential:
    return bp.Sequential(
        [
            bp.Linear(4, 3, bias=False, W=W1_C),
            bp.ReLU(),
            bp.Linear(3, 2, bias=False, W=W2_C),
            bp.L2Loss(),
        ]
    )


def test_mlp_forward_worked() -> None:
    net = mlp()
    J = net.forward(X_C, Y_C)
    assert J.shape == ()
    assert float(J) == J_C
    lin1, relu, lin2, _ = net.layers
    np.testing.assert_array_equal(lin1.forward(X_C), Z_C)
    np.testing.assert_array_equal(relu.forward(lin1.forward(X_C)), H_C)
    np.testing.assert_array_equal(lin2.forward(np.array(H_C)), YHAT_C)


def test_mlp_layer_by_layer_g_worked() -> None:
    lin1, relu, lin2, loss = mlp().layers
    z = lin1.forward(X_C)
    h = relu.forward(z)
    y_hat = lin2.forward(h)
    loss.forward(y_hat, Y_C)
    (g_yhat, g_y), _ = loss.backward()
    np.testing.assert_array_equal(g_yhat, G_YHAT_C)
    np.testing.assert_array_equal(g_y, [[4.0, -4.0]])  # dJ/dy = -2(ŷ - y)
    g_h, grads2 = lin2.backward(g_yhat)
    np.testing.assert_array_equal(g_h, G_H_C)
    np.testing.assert_array_equal(grads2["W"], DW2_C)
    g_z, _ = relu.backward(g_h)
    np.testing.assert_array_equal(g_z, G_Z_C)
    g_x, grads1 = lin1.backward(g_z)
    np.testing.assert_array_equal(g_x, G_X_C)
    np.testing.assert_array_equal(grads1["W"], DW1_C)


def test_mlp_explicit_jacobians_worked() -> None:
    """The same g's as plain matrix products with the dense Jacobians (Algorithm 14.1)."""
    lin1, relu, lin2, loss = mlp().layers
    loss.forward(lin2.forward(relu.forward(lin1.forward(X_C))), Y_C)
    g = loss.jacobians()[0][0].to_dense()[0]  # 1×2: dJ/dŷ
    np.testing.assert_array_equal(g, G_YHAT_C)
    L_x, L_theta = lin2.jacobians()
    np.testing.assert_array_equal((g @ L_theta["W"].to_dense()[0]).reshape(2, 3), DW2_C)
    g = g @ L_x.to_dense()[0]
    np.testing.assert_array_equal(g, G_H_C)
    g = g @ relu.jacobians()[0].to_dense()[0]
    np.testing.assert_array_equal(g, G_Z_C)
    L_x, L_theta = lin1.jacobians()
    np.testing.assert_array_equal((g @ L_theta["W"].to_dense()[0]).reshape(3, 4), DW1_C)
    np.testing.assert_array_equal(g @ L_x.to_dense()[0], G_X_C)


@pytest.mark.parametrize("mode", ["fast", "explicit"])
def test_mlp_backward_worked(mode: str) -> None:
    net = mlp()
    net.forward(X_C, Y_C)
    g_x, grads = net.backward(mode=mode)
    np.testing.assert_array_equal(g_x, G_X_C)
    W1, W2 = net.layers[0].params["W"], net.layers[2].params["W"]
    assert set(grads) == {W1, W2}
    np.testing.assert_array_equal(grads[W1], DW1_C)
    np.testing.assert_array_equal(grads[W2], DW2_C)


def test_mlp_sgd_step_worked() -> None:
    """eq. 14.9 with η = 0.5: θ ← θ - η dJ/dθ, in the parameter's own shape."""
    net = mlp()
    net.forward(X_C, Y_C)
    _, grads = net.backward()
    bp.SGD(net.parameters(), lr=0.5).step(grads)
    np.testing.assert_array_equal(
        net.layers[2].params["W"].value, [[1.0, 4.0, 5.0], [0.0, -1.0, -5.0]]
    )
    np.testing.assert_array_equal(
        net.layers[0].params["W"].value,
        [[1.0, 0.0, 1.0, 2.0], [2.0, 5.0, -1.0, -1.0], [-2.0, -7.0, 0.0, 5.0]],
    )


# -- (d) eq. 14.11: batch gradient = mean of per-example gradients -----------------------


def _net(rng: np.random.Generator, loss: bp.Layer) -> bp.Sequential:
    return bp.Sequential([bp.Linear(3, 5, rng=rng), bp.Tanh(), bp.Linear(5, 4, rng=rng), loss])


@pytest.mark.parametrize("loss", ["l2", "xent"])
def test_batch_gradient_is_mean_of_per_example(loss: str) -> None:
    rng = np.random.default_rng(0)
    B = 5
    net = _net(rng, bp.L2Loss() if loss == "l2" else bp.SoftmaxCrossEntropy())
    x = rng.standard_normal((B, 3))
    y = rng.standard_normal((B, 4)) if loss == "l2" else rng.integers(0, 4, size=B)
    params = net.parameters()

    per_example_J = []
    per_example = []  # unscaled: the gradient of example i's own loss J_i
    for i in range(B):
        per_example_J.append(float(net.forward(x[i : i + 1], y[i : i + 1])))
        g_i, grads_i = net.backward()
        per_example.append((g_i[0], {p: grads_i[p] for p in params}))

    J = float(net.forward(x, y))
    g_batch, grads_batch = net.backward()
    assert J == pytest.approx(np.mean(per_example_J), rel=1e-14)
    for p in params:
        summed_scaled = sum(grads[p] for _, grads in per_example) * (1.0 / B)
        mean_unscaled = np.mean([grads[p] for _, grads in per_example], axis=0)
        np.testing.assert_allclose(grads_batch[p], summed_scaled, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(grads_batch[p], mean_unscaled, rtol=1e-12, atol=1e-15)
    # dJ/dx_i in the batch is (1/B) dJ_i/dx_i: each example only moves its own loss.
    for i, (g_i, _) in enumerate(per_example):
        np.testing.assert_allclose(g_batch[i], g_i / B, rtol=1e-12, atol=1e-15)


def test_per_example_gradients_from_batch_jacobians() -> None:
    """The whole-chain L^θ of a batch, without the batch sum, gives each example's
    gradient already scaled by 1/B; B times it is the batch-1 gradient."""
    rng = np.random.default_rng(1)
    B = 4
    net = _net(rng, bp.SoftmaxCrossEntropy())
    x = rng.standard_normal((B, 3))
    y = rng.integers(0, 4, size=B)
    net.forward(x, y)
    _, grads_batch = net.backward()
    _, L_theta = net.jacobians()
    for p in net.parameters():
        rows = L_theta[p].vjp(np.ones((B, 1)))  # (B, |θ|): example b's share of dJ/dθ
        np.testing.assert_allclose(rows.sum(axis=0).reshape(p.shape), grads_batch[p], rtol=1e-12)
        for i in range(B):
            net.forward(x[i : i + 1], y[i : i + 1])
            _, grads_i = net.backward()
            np.testing.assert_allclose(
                B * rows[i].reshape(p.shape), grads_i[p], rtol=1e-12, atol=1e-15
            )
        net.forward(x, y)
