"""End to end: an MLP trained with SGD (eq. 14.9) learns the three-arm spirals."""

from __future__ import annotations

import numpy as np

import backprop as bp


def spirals(
    n_per_class: int, n_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Interleaved spiral arms in 2-D: arm ``j`` has radius ``r`` in [0, 1] and angle
    ``4j + 4r`` plus Gaussian noise (sd 0.2); labels are the arm index."""
    X = np.zeros((n_per_class * n_classes, 2))
    y = np.zeros(n_per_class * n_classes, dtype=np.int64)
    for j in range(n_classes):
        r = np.linspace(0.0, 1.0, n_per_class)
        t = 4.0 * j + 4.0 * r + 0.2 * rng.standard_normal(n_per_class)
        rows = slice(j * n_per_class, (j + 1) * n_per_class)
        X[rows] = np.column_stack([r * np.sin(t), r * np.cos(t)])
        y[rows] = j
    return X, y


def logits_by_hand(net: bp.Sequential, X: np.ndarray) -> np.ndarray:
    """The trained MLP evaluated with plain numpy from its parameter values."""
    W1, b1, W2, b2, W3, b3 = (p.value for p in net.parameters())
    h1 = np.maximum(X @ W1.T + b1, 0)
    h2 = np.maximum(h1 @ W2.T + b2, 0)
    return h2 @ W3.T + b3


def test_mlp_learns_spirals_with_sgd() -> None:
    rng = np.random.default_rng(0)
    X, y = spirals(100, 3, rng)
    net = bp.Sequential(
        [
            bp.Linear(2, 64, rng=rng),
            bp.ReLU(),
            bp.Linear(64, 64, rng=rng),
            bp.ReLU(),
            bp.Linear(64, 3, rng=rng),
            bp.SoftmaxCrossEntropy(),
        ]
    )
    chance = 1.0 / 3.0
    assert np.mean(logits_by_hand(net, X).argmax(axis=1) == y) < 0.6  # not solved at the start
    J_start = float(net.forward(X, y))
    assert abs(J_start - np.log(3)) < 0.3  # about log(3) for a fresh net

    opt = bp.SGD(net.parameters(), lr=0.3)
    batch = 32
    for _ in range(300):  # epochs of minibatch SGD
        order = rng.permutation(len(X))
        for start in range(0, len(X), batch):
            idx = order[start : start + batch]
            net.forward(X[idx], y[idx])
            _, grads = net.backward(input_grad=False)
            opt.step(grads)

    J_end = float(net.forward(X, y))
    accuracy = float(np.mean(logits_by_hand(net, X).argmax(axis=1) == y))
    assert accuracy >= 0.95, f"training accuracy {accuracy:.3f} (chance {chance:.3f})"
    assert J_end < 0.2 < J_start
