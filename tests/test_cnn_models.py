"""Whole convolutional models against PyTorch float64, and the checks only this engine has.

Each model is built twice with the same weights (the engine's initial values copied into
the torch modules) and run forward, through its loss and backward. The prediction, the
cost, ``dJ/dx`` and every parameter gradient must agree at rtol 1e-10, in the fast
backward pass and in ``mode="explicit"`` (Algorithm 14.1 with sparse Jacobian matrices);
then both sides take SGD and Adam steps, each from its own gradients, and the weights
must still agree. Every expected number comes from torch (its modules, its autograd, its
optimizers); nothing the engine computed is handed to torch but the starting weights.

Then what torch has no counterpart for: ``bp.gradcheck`` on small CNNs, the backward
network of ``bp.backward_graph`` and the whole-model Jacobians of ``model.jacobians()``,
the last two held against torch as well.

Inputs are continuous random numbers, so no pre-activation sits exactly at a ReLU's kink
and no max-pooling window holds a tie that matters (a window whose entries are all zero
after a ReLU ties, but every one of them has ReLU' = 0, so no gradient reaches it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop.jacobian import Diagonal

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
F = torch.nn.functional
nn = torch.nn

RTOL = 1e-10
ATOL = 1e-13

#: the engine's parameter names to torch's
TORCH_NAME = {"W": "weight", "b": "bias", "gamma": "weight", "beta": "bias"}


def tt(a: Any, grad: bool = True) -> Any:
    """A float64 torch leaf holding a copy of ``a`` (the engine's arrays are read-only)."""
    return torch.tensor(np.array(a, dtype=np.float64, copy=True), requires_grad=grad)


def close(actual: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL) -> None:
    """``actual`` (the engine's) equals ``expected`` (a torch tensor)."""
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().numpy()
    assert actual is not None
    assert np.shape(actual) == np.shape(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


def twin(layer: bp.Layer, module: Any) -> list[tuple[bp.Parameter, Any]]:
    """Copy ``layer``'s parameters into the float64 torch ``module``; return the pairs
    (engine Parameter, torch Parameter). The layouts are the same: no reshaping."""
    module.double()
    pairs = []
    with torch.no_grad():
        for name, p in layer.params.items():
            t = getattr(module, TORCH_NAME[name])
            assert tuple(t.shape) == p.shape, (name, tuple(t.shape), p.shape)
            t.copy_(torch.tensor(np.array(p.value)))
            pairs.append((p, t))
    assert len(list(module.parameters())) == len(pairs)  # nothing left at torch's init
    return pairs


def randomized(bn: bp.Layer, rng: np.random.Generator) -> bp.Layer:
    """A normalization layer with ``gamma`` and ``beta`` away from their 1 and 0."""
    bn.params["gamma"].value = rng.uniform(0.5, 1.5, bn.params["gamma"].shape)
    bn.params["beta"].value = 0.3 * rng.standard_normal(bn.params["beta"].shape)
    return bn


# ------------------------------------------------------------------------- the models


@dataclass
class Twin:
    """One model in both libraries, with its inputs."""

    model: bp.Graph  # the engine's (a Sequential is a Graph)
    module: Any  # torch's: the float input -> the prediction
    pairs: list[tuple[bp.Parameter, Any]]
    x: np.ndarray
    #: class labels, when ``model`` ends in SoftmaxCrossEntropy; ``prediction`` names
    #: the node holding the logits
    labels: np.ndarray | None = None
    prediction: str | None = None
    #: else ``dJ/d(output)``: the cost is ``<seed, output>``
    seed: np.ndarray | None = None
    #: batch norms whose running statistics are compared, (engine layer, torch module)
    norms: list[tuple[Any, Any]] = field(default_factory=list)
    #: training-mode forwards run before the model is put in ``eval`` mode
    warmup: list[np.ndarray] = field(default_factory=list)
    eval: bool = False

    def inputs(self) -> dict[str, np.ndarray]:
        return {"x": self.x} if self.labels is None else {"x": self.x, "labels": self.labels}

    def torch_cost(self, x_t: Any) -> tuple[Any, Any]:
        """torch's prediction and cost for the input tensor ``x_t``."""
        pred = self.module(x_t)
        if self.labels is not None:
            return pred, F.cross_entropy(pred, torch.tensor(self.labels))
        return pred, (pred * torch.tensor(self.seed)).sum()


def chain(rows: list[tuple[bp.Layer, Any]], x: np.ndarray, labels: np.ndarray) -> Twin:
    """A classifier chain: the engine's layers then SoftmaxCrossEntropy, torch's modules
    in an ``nn.Sequential`` then ``F.cross_entropy``."""
    model = bp.Sequential([layer for layer, _ in rows] + [bp.SoftmaxCrossEntropy()])
    pairs = [pair for layer, module in rows for pair in twin(layer, module)]
    module = nn.Sequential(*(m for _, m in rows))
    return Twin(model, module, pairs, x, labels, prediction=str(len(rows) - 1))


def lenet5(rng: np.random.Generator, B: int = 8) -> Twin:
    """LeNet-5 on 28×28: two 5×5 convolutions each followed by 2×2 max pooling, then
    three fully connected layers (16·4·4 = 256 features in)."""
    rows: list[tuple[bp.Layer, Any]] = [
        (bp.Conv2d(1, 6, 5, rng=rng), nn.Conv2d(1, 6, 5)),
        (bp.ReLU(), nn.ReLU()),
        (bp.MaxPool2d(2), nn.MaxPool2d(2)),
        (bp.Conv2d(6, 16, 5, rng=rng), nn.Conv2d(6, 16, 5)),
        (bp.ReLU(), nn.ReLU()),
        (bp.MaxPool2d(2), nn.MaxPool2d(2)),
        (bp.Flatten(), nn.Flatten()),
        (bp.Linear(256, 120, rng=rng), nn.Linear(256, 120)),
        (bp.ReLU(), nn.ReLU()),
        (bp.Linear(120, 84, rng=rng), nn.Linear(120, 84)),
        (bp.ReLU(), nn.ReLU()),
        (bp.Linear(84, 10, rng=rng), nn.Linear(84, 10)),
    ]
    return chain(rows, rng.standard_normal((B, 1, 28, 28)), rng.integers(0, 10, B))


def digits_rows(rng: np.random.Generator) -> list[tuple[bp.Layer, Any]]:
    """The digits CNN on 8×8 images: 16·8·8 → pool → 32·4·4 = 512 features."""
    return [
        (bp.Conv2d(1, 16, 3, padding=1, rng=rng), nn.Conv2d(1, 16, 3, padding=1)),
        (bp.ReLU(), nn.ReLU()),
        (bp.MaxPool2d(2), nn.MaxPool2d(2)),
        (bp.Conv2d(16, 32, 3, padding=1, rng=rng), nn.Conv2d(16, 32, 3, padding=1)),
        (bp.ReLU(), nn.ReLU()),
        (bp.Flatten(), nn.Flatten()),
        (bp.Linear(512, 10, rng=rng), nn.Linear(512, 10)),
    ]


def digits_cnn(rng: np.random.Generator, B: int = 16) -> Twin:
    return chain(digits_rows(rng), rng.standard_normal((B, 1, 8, 8)), rng.integers(0, 10, B))


class TorchResidual(nn.Module):  # type: ignore[misc]
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Any) -> Any:
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(h + x)


def residual_block(rng: np.random.Generator, *, eval_mode: bool) -> Twin:
    """``x → conv → BN → ReLU → conv → BN → (+ x) → ReLU`` as a Graph (x is read twice:
    the Graph routes it through a Branch). The convolutions have no bias, as in ResNet:
    BatchNorm would remove it (its gradient would be rounding noise around 0)."""
    c, B = 3, 4
    conv1 = bp.Conv2d(c, c, 3, padding=1, bias=False, rng=rng)
    conv2 = bp.Conv2d(c, c, 3, padding=1, bias=False, rng=rng)
    bn1, bn2 = randomized(bp.BatchNorm2d(c), rng), randomized(bp.BatchNorm2d(c), rng)
    g = bp.Graph()
    x = g.input("x")
    h = g.add(bn1, g.add(conv1, x, name="conv1"), name="bn1")
    h = g.add(bn2, g.add(conv2, g.add(bp.ReLU(), h), name="conv2"), name="bn2")
    g.output(g.add(bp.ReLU(), g.add(bp.Add(), h, x)))

    ref = TorchResidual(c)
    pairs = [
        *twin(conv1, ref.conv1),
        *twin(bn1, ref.bn1),
        *twin(conv2, ref.conv2),
        *twin(bn2, ref.bn2),
    ]
    shape = (B, c, 5, 6)
    # warm-up batches off zero mean and unit variance, so the running statistics move
    warmup = [
        1.5 * rng.standard_normal(shape) + rng.standard_normal((1, c, 1, 1)) for _ in range(3)
    ]
    return Twin(
        g,
        ref,
        pairs,
        rng.standard_normal(shape),
        seed=rng.standard_normal(shape),
        norms=[(bn1, ref.bn1), (bn2, ref.bn2)],
        warmup=warmup if eval_mode else [],
        eval=eval_mode,
    )


class TorchUNet(nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv2d(5, 3, 1)

    def forward(self, x: Any) -> Any:
        u = self.up(F.relu(self.down(x)))
        return self.head(torch.cat([u, x], dim=1))


def unet_skip(rng: np.random.Generator) -> Twin:
    """``x → Conv2d(stride 2) → ReLU → ConvTranspose2d(stride 2) → Merge(axis=1) with x →
    Conv2d(1×1)``: 3 classes per pixel, a per-pixel cross-entropy over (B, H, W) labels."""
    down = bp.Conv2d(2, 4, 3, stride=2, padding=1, rng=rng)
    up = bp.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1, rng=rng)
    head = bp.Conv2d(5, 3, 1, rng=rng)
    g = bp.Graph()
    x, y = g.input("x"), g.input("labels")
    u = g.add(up, g.add(bp.ReLU(), g.add(down, x, name="down")), name="up")
    logits = g.add(head, g.add(bp.Merge(axis=1), u, x, name="skip"), name="head")
    g.output(g.add(bp.SoftmaxCrossEntropy(), logits, y))
    ref = TorchUNet()
    pairs = [*twin(down, ref.down), *twin(up, ref.up), *twin(head, ref.head)]
    B, H, W = 3, 6, 8
    return Twin(
        g,
        ref,
        pairs,
        rng.standard_normal((B, 2, H, W)),
        labels=rng.integers(0, 3, (B, H, W)),
        prediction="head",
    )


class ChannelsLast(nn.Module):  # type: ignore[misc]
    """torch's LayerNorm over the channels of (B, C, H, W), moved last and back."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x: Any) -> Any:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def mixed_cnn(rng: np.random.Generator) -> Twin:
    """Conv → LayerNorm over channels-last (Transpose, LayerNorm, Transpose) → ReLU →
    AvgPool2d → Upsample → Conv(stride 2) → Dropout (eval) → GlobalAvgPool → Linear."""
    conv1 = bp.Conv2d(3, 4, 3, padding=1, rng=rng)
    norm = randomized(bp.LayerNorm(4), rng)
    conv2 = bp.Conv2d(4, 6, 3, stride=2, padding=1, rng=rng)
    lin = bp.Linear(6, 5, rng=rng)
    model = bp.Sequential(
        [
            conv1,
            bp.Transpose((1, 2, 0)),  # (C, H, W) -> (H, W, C)
            norm,
            bp.Transpose((2, 0, 1)),
            bp.ReLU(),
            bp.AvgPool2d(2),
            bp.Upsample(2),
            conv2,
            bp.Dropout(0.5, rng=rng),
            bp.GlobalAvgPool(),
            lin,
            bp.SoftmaxCrossEntropy(),
        ]
    )
    conv1_t, ln_t = nn.Conv2d(3, 4, 3, padding=1), ChannelsLast(4)
    conv2_t, lin_t = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Linear(6, 5)
    pairs = [*twin(conv1, conv1_t), *twin(norm, ln_t.norm), *twin(conv2, conv2_t)]
    pairs += twin(lin, lin_t)
    module = nn.Sequential(
        conv1_t,
        ln_t,
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Upsample(scale_factor=2, mode="nearest"),
        conv2_t,
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        lin_t,
    )
    B = 4
    return Twin(
        model,
        module,
        pairs,
        rng.standard_normal((B, 3, 6, 10)),
        labels=rng.integers(0, 5, B),
        prediction="10",
        eval=True,
    )


CASES: list[tuple[str, Callable[[np.random.Generator], Twin]]] = [
    ("lenet5", lenet5),
    ("digits_cnn", digits_cnn),
    ("residual_train", lambda rng: residual_block(rng, eval_mode=False)),
    ("residual_eval", lambda rng: residual_block(rng, eval_mode=True)),
    ("unet_skip", unet_skip),
    ("pool_upsample_layernorm_dropout", mixed_cnn),
]


def prepare(tw: Twin) -> None:
    """Run the warm-up forwards on both sides (comparing the running statistics after
    each), then put both in eval mode if the case asks for it."""
    for x in tw.warmup:
        tw.model.forward({"x": x})
        with torch.no_grad():
            tw.module(tt(x, grad=False))
        compare_running_stats(tw)
    if tw.warmup:  # the warm-up moved them: the comparisons were of something
        for bn, _ in tw.norms:
            assert np.all(np.abs(bn.running_mean) > 1e-3)
    if tw.eval:
        tw.model.eval()
        tw.module.eval()


def compare_running_stats(tw: Twin) -> None:
    for bn, bn_t in tw.norms:
        close(bn.running_mean, bn_t.running_mean)
        close(bn.running_var, bn_t.running_var)


# ------------------------------------------------------- forward, loss, backward, steps


@pytest.mark.parametrize("mode", ["fast", "explicit"])
@pytest.mark.parametrize("build", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_model_matches_torch(build: Callable[[np.random.Generator], Twin], mode: str) -> None:
    tw = build(np.random.default_rng(1))
    prepare(tw)
    # the logits first: evaluate keeps no operating point, so it must precede forward
    pred = None if tw.prediction is None else tw.model.evaluate(tw.prediction, tw.inputs())
    out = tw.model.forward(tw.inputs())
    grads = tw.model.backward(tw.seed, mode=mode)  # no seed for a cost: dJ/dJ = 1

    x_t = tt(tw.x)
    pred_t, J_t = tw.torch_cost(x_t)
    J_t.backward()

    if tw.prediction is None:
        close(out, pred_t)
    else:
        close(pred, pred_t)
        close(out, J_t)
    assert list(grads.inputs) == ["x"]
    close(grads.inputs["x"], x_t.grad)
    assert set(grads.params) == {p for p, _ in tw.pairs} == set(tw.model.parameters())
    for p, t in tw.pairs:
        close(grads.params[p], t.grad)
    compare_running_stats(tw)  # the training forward updated both alike; eval, neither


OPTIMIZERS = [
    ("sgd", bp.SGD, torch.optim.SGD, {"lr": 0.1}),
    ("adam", bp.Adam, torch.optim.Adam, {"lr": 0.01}),
]


@pytest.mark.parametrize(
    "ours, theirs, hyper", [o[1:] for o in OPTIMIZERS], ids=[o[0] for o in OPTIMIZERS]
)
@pytest.mark.parametrize("build", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_training_steps_match_torch(
    build: Callable[[np.random.Generator], Twin],
    ours: Callable[..., bp.Optimizer],
    theirs: Callable[..., Any],
    hyper: dict[str, Any],
) -> None:
    # Two steps: each side computes its own gradients at its own weights, then steps.
    tw = build(np.random.default_rng(2))
    prepare(tw)
    opt = ours(tw.model, **hyper)
    opt_t = theirs([t for _, t in tw.pairs], **hyper)
    before = [np.array(p.value) for p, _ in tw.pairs]
    x_t = tt(tw.x, grad=False)
    for _ in range(2):
        out = tw.model.forward(tw.inputs())
        opt.step(tw.model.backward(tw.seed, input_grad=False))

        opt_t.zero_grad()
        pred_t, J_t = tw.torch_cost(x_t)
        J_t.backward()
        opt_t.step()

        close(out, J_t if tw.prediction is not None else pred_t)
        for p, t in tw.pairs:
            close(p.value, t)
        compare_running_stats(tw)
    for (p, _), v in zip(tw.pairs, before, strict=True):
        assert not np.array_equal(p.value, v), p  # every parameter moved


# ------------------------------------------------------------ what only this engine has


def test_gradcheck_small_cnn_with_odd_sizes_and_strides_that_floor() -> None:
    # 6×7 images: the stride-2 convolution floors (6 + 2 - 3) / 2; the transposed
    # convolution gives 7×9, which 2×2 max pooling floors to 3×4 (the last row and
    # column get no gradient, here as in torch).
    rng = np.random.default_rng(60)
    net = bp.Sequential(
        [
            bp.Conv2d(2, 3, 3, stride=2, padding=1, rng=rng),
            bp.Tanh(),
            bp.ConvTranspose2d(3, 2, 3, stride=2, rng=rng),
            bp.ReLU(),
            bp.MaxPool2d(2),
            bp.Flatten(),
            bp.Linear(2 * 3 * 4, 4, rng=rng),
            bp.SoftmaxCrossEntropy(),
        ]
    )
    x, labels = rng.standard_normal((3, 2, 6, 7)), np.array([0, 3, 1])
    report = bp.gradcheck(net, x, labels, mode="entries")
    assert report.mode == "entries" and report.worst < 1e-5
    checked = " ".join(report.checks)
    assert all(name in checked for name in ("0.W", "0.b", "2.W", "2.b", "6.W", "6.b"))


@pytest.mark.parametrize(
    "build",
    [lenet5, lambda rng: residual_block(rng, eval_mode=True)],
    ids=["lenet5", "residual_eval"],
)
def test_gradcheck_along_directions_on_whole_models(
    build: Callable[[np.random.Generator], Twin],
) -> None:
    # Too many entries to difference one by one: random directions, and the
    # dot-product test, on the whole model.
    tw = build(np.random.default_rng(61))
    prepare(tw)
    report = bp.gradcheck(tw.model, g_out=tw.seed, mode="directions", **tw.inputs())
    assert report.mode == "directions"
    # every input and parameter was compared three ways; the fast path and the explicit
    # Jacobians agree to rounding (the finite differences are judged inside gradcheck)
    for name in ["input 'x'", *(f"parameter '{n}'" for n in tw.model.named_parameters())]:
        kinds = [what for what in report.checks if what.startswith(name + ":")]
        assert len(kinds) == 4, (name, kinds)
    exact = [err for what, err in report.checks.items() if "finite differences" not in what]
    assert max(exact) < 1e-12


class SlightlyOffWeights(bp.Conv2d):
    """A convolution whose weight gradient is 0.1 % too large, in the fast path and in
    the explicit Jacobian alike: only the finite differences can tell."""

    def _backward(
        self, op: Any, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        g_in, grads = super()._backward(op, g_out, input_grad)
        return g_in, {**grads, "W": grads["W"] * 1.001}

    def _jacobians(self, op: Any) -> tuple[Any, dict[str, Any]]:
        L_x, L_theta = super()._jacobians(op)
        L = L_theta["W"]
        off = Diagonal(np.full((L.batch, L.shape[0]), 1.001), "1.001")
        return L_x, {**L_theta, "W": off @ L}


@pytest.mark.parametrize("seed", [61, 62, 63, 64, 65])
def test_gradcheck_along_directions_catches_a_slightly_wrong_conv_in_lenet5(seed: int) -> None:
    # Every direction crosses ReLU and max-pooling kinks within its step; a 0.1 % error in
    # the second convolution's weight gradient must fail, or be reported as uncheckable.
    tw = lenet5(np.random.default_rng(seed))
    layers = list(tw.model.layers)
    conv = layers[3]
    layers[3] = SlightlyOffWeights(6, 16, 5, W=conv.params["W"].value, b=conv.params["b"].value)
    with pytest.raises(bp.GradcheckError, match=r"3\.W|could not check"):
        bp.gradcheck(bp.Sequential(layers), tw.x, tw.labels, mode="directions")


def test_backward_graph_of_the_digits_cnn_reproduces_backward_and_torch() -> None:
    tw = digits_cnn(np.random.default_rng(62), B=2)
    tw.model.forward(tw.inputs())
    fast = tw.model.backward()
    bg = bp.backward_graph(tw.model)
    named = tw.model.named_parameters()
    assert bg.input_names() == ["g_J"]
    assert bg.output_names() == ["g_x", *(f"dJ/d{name}" for name in named)]
    outs = bg.forward(g_J=np.ones((2, 1)))

    x_t = tt(tw.x)
    tw.torch_cost(x_t)[1].backward()
    torch_grad = {p: t.grad for p, t in tw.pairs}
    g_x, *param_grads = outs
    close(g_x, x_t.grad)
    np.testing.assert_allclose(g_x, fast.inputs["x"], rtol=1e-12, atol=1e-15)
    for p, value in zip(named.values(), param_grads, strict=True):
        close(value, torch_grad[p])
        np.testing.assert_allclose(value, fast.params[p], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("order", ["reverse", "forward"])
def test_whole_model_jacobians_of_a_tiny_cnn_match_torch_per_example(order: str) -> None:
    rng = np.random.default_rng(63)
    conv, lin = bp.Conv2d(2, 3, 3, stride=2, padding=1, rng=rng), bp.Linear(12, 4, rng=rng)
    net = bp.Sequential([conv, bp.ReLU(), bp.MaxPool2d(2, stride=1), bp.Flatten(), lin])
    conv_t, lin_t = nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Linear(12, 4)
    pairs = [*twin(conv, conv_t), *twin(lin, lin_t)]
    B = 3
    x = rng.standard_normal((B, 2, 5, 6))  # 5×6 → 3×3 (5 + 2 - 3 and 6 + 2 - 3 over 2)
    out = net.forward(x)
    assert out.shape == (B, 4)
    L_x, L_theta = net.jacobians(order=order)
    dense_x = L_x.to_dense()
    assert dense_x.shape == (B, 4, 2 * 5 * 6)
    assert set(L_theta) == {p for p, _ in pairs}

    def f(xv: Any, W1: Any, b1: Any, W2: Any, b2: Any) -> Any:
        h = F.max_pool2d(F.relu(F.conv2d(xv[None], W1, b1, stride=2, padding=1)), 2, stride=1)
        return F.linear(h.flatten(1), W2, b2)[0]

    thetas = [t.detach() for _, t in pairs]
    for b in range(B):
        J_x, *J_thetas = torch.autograd.functional.jacobian(f, (tt(x[b], False), *thetas))
        close(dense_x[b], J_x.reshape(4, -1))
        for (p, _), J_p in zip(pairs, J_thetas, strict=True):
            close(L_theta[p].to_dense()[b], J_p.reshape(4, -1))
