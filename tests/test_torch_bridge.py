"""``from_torch`` and ``to_torch``: equal outputs and gradients in float64, weights
bit for bit both ways, ties kept, and a clear refusal of what has no row."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop import torch_bridge

torch = pytest.importorskip("torch")
nn = torch.nn
ROOT = Path(__file__).resolve().parents[1]


def cnn(p_drop: float = 0.0) -> Any:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding="same", bias=False), nn.LeakyReLU(0.1)),
        nn.AvgPool2d(2, stride=1),
        nn.ConvTranspose2d(6, 3, 2, stride=2, output_padding=1),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(3, 2, 3, stride=2, dilation=2, groups=1),
        nn.Flatten(),
        nn.Linear(2 * 9 * 9, 10),
        nn.BatchNorm1d(10),
        nn.LayerNorm(10),
        nn.Tanh(),
        nn.Dropout(p_drop),
        nn.Linear(10, 5),
        nn.Softplus(),
        nn.Sigmoid(),
        nn.Softmax(dim=1),
        nn.LogSoftmax(dim=-1),
    ).double()


def mlp() -> Any:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def close(ours: np.ndarray, theirs: Any, scale: float | None = None) -> None:
    """Equal to rtol 1e-10; entries near zero compared at 1e-12 of ``scale`` (the
    largest entry, or of the whole gradient when a tensor's true value is zero, as
    the bias of a convolution that a BatchNorm in training mode follows)."""
    theirs = theirs.detach().numpy()
    scale = float(np.abs(theirs).max()) if scale is None else scale
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12 * max(scale, 1e-300))


def compare(module: Any, net: bp.Sequential, x: np.ndarray) -> None:
    """Outputs, the input gradient and every parameter gradient, side by side."""
    x_t = torch.tensor(x, requires_grad=True)
    y_t = module(x_t)
    y = net.forward(x)
    close(y, y_t)
    g = np.random.default_rng(2).standard_normal(y.shape)
    y_t.backward(torch.tensor(g))
    grads = net.backward(g)
    close(grads.inputs["x"], x_t.grad)
    ours, theirs = net.parameters(), list(module.parameters())
    assert len(ours) == len(theirs)
    scale = max(float(t.grad.abs().max()) for t in theirs)
    for p, t in zip(ours, theirs, strict=True):
        assert p.shape == tuple(t.shape)
        close(grads.params[p], t.grad, scale)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_converted_cnn_has_the_same_outputs_and_gradients(mode: str) -> None:
    module = cnn(p_drop=0.0 if mode == "train" else 0.5)
    if mode == "eval":  # running statistics that are not the defaults
        with torch.no_grad():
            module(torch.randn(8, 2, 12, 12, dtype=torch.float64))
        module.eval()
    net = bp.from_torch(module)
    assert net.training == (mode == "train")
    assert all(layer.training == (mode == "train") for layer in net.layers)
    x = np.random.default_rng(0).standard_normal((3, 2, 12, 12))
    compare(module, net, x)
    bn, bn_t = net[1], module[1]
    close(bn.running_mean, bn_t.running_mean)  # updated alike in training mode
    close(bn.running_var, bn_t.running_var)


def test_to_torch_gives_the_same_outputs_and_gradients() -> None:
    rng = np.random.default_rng(3)
    net = bp.Sequential(
        [
            bp.Conv2d(1, 3, 3, padding=1, rng=rng),
            bp.BatchNorm2d(3),
            bp.ReLU(),
            bp.MaxPool2d(2),
            bp.Flatten(),
            bp.Linear(12, 4, rng=rng),
            bp.LayerNorm(4),
            bp.Sigmoid(),
        ]
    )
    net[1].set_running_stats(rng.standard_normal(3), rng.random(3) + 0.5)
    x = rng.standard_normal((5, 1, 4, 4))
    for train in (True, False):
        net.train(train)
        module = bp.to_torch(net)
        assert module.training == train
        compare(module, net, x)


def test_round_trips_keep_every_weight_bit_for_bit() -> None:
    module = cnn()
    with torch.no_grad():
        module(torch.randn(4, 2, 12, 12, dtype=torch.float64))  # move the running statistics
    back = bp.to_torch(bp.from_torch(module))
    theirs = {k: v for k, v in module.state_dict().items() if "num_batches" not in k}
    again = {k: v for k, v in back.state_dict().items() if "num_batches" not in k}
    assert len(theirs) == len(again)
    for (k, a), b in zip(theirs.items(), again.values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), k

    rng = np.random.default_rng(4)
    net = bp.Sequential([bp.Linear(3, 5, rng=rng), bp.Tanh(), bp.Linear(5, 2, rng=rng)])
    twice = bp.from_torch(bp.to_torch(net))
    for p, q in zip(net.parameters(), twice.parameters(), strict=True):
        assert p.dtype == q.dtype and np.array_equal(p.value, q.value)


def test_float32_stays_float32_both_ways() -> None:
    module = mlp().float()
    net = bp.from_torch(module)
    assert all(p.dtype == np.float32 for p in net.parameters())
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    assert net.forward(x).dtype == np.float32
    np.testing.assert_allclose(net.forward(x), module(torch.tensor(x)).detach().numpy(), rtol=1e-5)
    assert all(t.dtype == torch.float32 for t in bp.to_torch(net).parameters())


def test_tied_weights_stay_tied_both_ways() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4).double()
    other = nn.Linear(4, 4).double()
    other.weight = shared.weight  # tied weight, separate bias
    module = nn.Sequential(shared, nn.Tanh(), other, nn.Tanh(), shared)  # the same module twice
    net = bp.from_torch(module)
    assert net[0].W is net[2].W is net[4].W and net[0].b is net[4].b
    assert net[2].b is not net[0].b
    assert len(net.parameters()) == len(list(module.parameters())) == 3
    compare(module, net, np.random.default_rng(1).standard_normal((3, 4)))
    back = bp.to_torch(net)
    assert back[0].weight is back[2].weight is back[4].weight
    assert back[0].bias is back[4].bias and back[2].bias is not back[0].bias


def test_a_trained_model_predicts_the_same_in_torch() -> None:
    X, y = bp.datasets.make_spirals(30, 3, rng=0)
    rng = np.random.default_rng(0)
    net = bp.Sequential([bp.Linear(2, 16, rng=rng), bp.ReLU(), bp.Linear(16, 3, rng=rng)])
    bp.fit(net, X, y, epochs=3, progress=False)
    logits = module_logits = bp.to_torch(net)(torch.tensor(X)).detach().numpy()
    np.testing.assert_allclose(bp.predict(net, X), module_logits, rtol=1e-12, atol=1e-14)
    assert logits.shape == (90, 3)


@pytest.mark.parametrize(
    "module, words",
    [
        (nn.Sequential(nn.Linear(2, 2), nn.GRU(2, 2)), r"module '1' \(GRU\) is not supported"),
        (
            nn.Sequential(nn.Sequential(nn.ReLU(), nn.Identity())),
            r"module '0\.1' \(Identity\) is not supported.*converts Linear, ReLU",
        ),
        (nn.Sequential(nn.MaxPool2d(2, ceil_mode=True)), r"'0' \(MaxPool2d\): ceil_mode=True"),
        (nn.Sequential(nn.Conv2d(1, 1, 3, padding_mode="reflect")), "padding_mode='reflect'"),
        (nn.Sequential(nn.Softplus(beta=2.0)), r"\(Softplus\): beta=2\.0 is not supported"),
        (nn.Sequential(nn.Linear(2, 2).half()), "torch.float16 parameter"),
        (nn.Sequential(nn.BatchNorm1d(2, momentum=None)), "momentum=None"),
        (nn.Sequential(nn.Upsample(scale_factor=1.5)), "whole factors"),
        (nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear")), "mode='bilinear'"),
        (nn.Sequential(nn.AvgPool2d(2, count_include_pad=False)), "count_include_pad=False"),
        (nn.Sequential(nn.Flatten(0)), "start_dim=0"),
        (nn.Sequential(nn.Dropout(1.0)), r"'0' \(Dropout\): Dropout: p must be"),
        (nn.Sequential(), "holds no layer"),
        ("not a module", "expected a torch.nn.Module"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_unsupported_modules_are_refused_by_name(module: Any, words: str) -> None:
    with pytest.raises((TypeError, ValueError), match=words):
        bp.from_torch(module)


@pytest.mark.parametrize(
    "model, words",
    [
        (
            bp.Sequential([bp.Linear(2, 2), bp.Transpose((0,))]),
            r"layer 1 \(Transpose.*\) has no torch.nn counterpart",
        ),
        (bp.Sequential([bp.Linear(2, 3), bp.SoftmaxCrossEntropy()]), "SoftmaxCrossEntropy"),
        (bp.Sequential([bp.Softmax(axis=1, temperature=2.0)]), "temperature 2.0"),
        (bp.Graph(), "not a Graph"),
        (object(), "not object"),
    ],
)
def test_to_torch_refuses_what_it_cannot_carry(model: Any, words: str) -> None:
    with pytest.raises(TypeError, match=words):
        bp.to_torch(model)


def test_one_layer_and_one_module_convert_too() -> None:
    lin = bp.Linear(3, 2, rng=np.random.default_rng(0))
    module = bp.to_torch(lin)
    assert isinstance(module, nn.Sequential) and len(module) == 1
    assert isinstance(bp.from_torch(nn.Tanh())[0], bp.Tanh)


def test_a_new_row_is_all_a_layer_needs() -> None:
    class Cube(bp.Pointwise):
        def h(self, x):
            return x**3

        def dh(self, x_in, x_out):
            return 3 * x_in**2

    class TorchCube(nn.Module):
        def forward(self, x):
            return x**3

    nn.Cube = TorchCube  # the bridge looks rows up by their torch.nn name
    try:
        torch_bridge.register(
            torch_bridge.Row("Cube", Cube, lambda m, c: Cube(), lambda layer, c: TorchCube())
        )
        net = bp.from_torch(nn.Sequential(nn.Linear(2, 2).double(), TorchCube()))
        assert isinstance(net[1], Cube) and isinstance(bp.to_torch(net)[1], TorchCube)
    finally:
        del nn.Cube
        torch_bridge.ROWS[:] = [r for r in torch_bridge.ROWS if r.torch_name != "Cube"]


def test_importing_backprop_does_not_import_torch() -> None:
    code = "import sys, backprop; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert out.stdout.strip() == "False"
