"""``from_torch`` and ``to_torch``: equal outputs and gradients in float64, weights
bit for bit both ways, ties kept, and a clear refusal of what has no row."""

from __future__ import annotations

import re
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


# ------------------------------------------------------------------ sequences


def test_an_embedding_crosses_both_ways() -> None:
    torch.manual_seed(2)
    module = nn.Embedding(7, 5).double()
    net = bp.from_torch(module)
    assert isinstance(net[0], bp.Embedding)
    assert np.array_equal(net[0].params["W"].value, module.weight.detach().numpy())
    ids = np.random.default_rng(3).integers(0, 7, size=(4, 6))
    y_t = module(torch.tensor(ids))
    y = net.forward(ids)
    close(y, y_t)
    g = np.random.default_rng(4).standard_normal(y.shape)
    y_t.backward(torch.tensor(g))
    grads = net.backward(g)
    assert grads.inputs.get("x") is None  # ids are data: no gradient
    close(grads.params[net[0].params["W"]], module.weight.grad)  # repeated ids add up
    back = bp.to_torch(net)
    assert type(back[0]) is nn.Embedding and back[0].weight.dtype == torch.float64
    assert torch.equal(back[0].weight, module.weight)
    net32 = bp.from_torch(nn.Embedding(3, 2))
    assert net32[0].params["W"].dtype == np.float32
    assert bp.to_torch(net32)[0].weight.dtype == torch.float32


def random_attention(d: int, heads: int, bias: bool, seed: int) -> Any:
    """A float64 torch ``MultiheadAttention`` with every weight and bias drawn (torch
    starts the biases at zero, which would leave their mapping untested)."""
    torch.manual_seed(seed)
    module = nn.MultiheadAttention(d, heads, bias=bias, batch_first=True).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return module


def attend(module: Any, x: np.ndarray, g: np.ndarray) -> tuple[Any, Any]:
    """torch's self-attention ``module(x, x, x)`` and ``dJ/dx`` for ``J = <g, y>``."""
    x_t = torch.tensor(x, requires_grad=True)
    y_t, _ = module(x_t, x_t, x_t, need_weights=False)
    y_t.backward(torch.tensor(g))
    return y_t, x_t.grad


def attention_grads(module: Any) -> dict[str, Any]:
    """torch's gradients under the engine's parameter names."""
    d = module.embed_dim
    W = module.in_proj_weight.grad
    out = {"Wq": W[:d], "Wk": W[d : 2 * d], "Wv": W[2 * d :], "Wo": module.out_proj.weight.grad}
    if module.in_proj_bias is not None:
        b = module.in_proj_bias.grad
        out.update(bq=b[:d], bk=b[d : 2 * d], bv=b[2 * d :], bo=module.out_proj.bias.grad)
    return out


@pytest.mark.parametrize("bias", [True, False])
def test_multihead_attention_crosses_both_ways(bias: bool) -> None:
    module = random_attention(8, 2, bias, seed=5)
    net = bp.from_torch(module)
    mha = net[0]
    assert isinstance(mha, bp.MultiHeadAttention) and (mha.d, mha.n_heads) == (8, 2)
    W = module.in_proj_weight.detach().numpy()
    for i, name in enumerate(("Wq", "Wk", "Wv")):
        assert np.array_equal(mha.params[name].value, W[8 * i : 8 * (i + 1)])
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 5, 8))
    y = net.forward(x)
    g = rng.standard_normal(y.shape)
    y_t, gx_t = attend(module, x, g)
    grads = net.backward(g)
    close(y, y_t)
    close(grads.inputs["x"], gx_t)
    theirs = attention_grads(module)
    assert set(theirs) == set(mha.params)
    scale = max(float(t.abs().max()) for t in theirs.values())
    for name, t in theirs.items():  # torch's dJ/db_k is zero up to rounding
        close(grads.params[mha.params[name]], t, scale)

    back = bp.to_torch(net)[0]
    assert type(back) is nn.MultiheadAttention and back.batch_first
    theirs_back, ours_back = back.state_dict(), module.state_dict()
    assert theirs_back.keys() == ours_back.keys()
    for k in ours_back:
        assert torch.equal(theirs_back[k], ours_back[k]), k
    close(attend(back, x, g)[0].detach().numpy(), y_t)


def test_embedding_then_attention_converts_as_a_chain() -> None:
    torch.manual_seed(7)
    module = nn.Sequential(nn.Embedding(10, 8).double(), random_attention(8, 4, True, seed=8))
    net = bp.from_torch(module)  # torch cannot call this chain (attention takes x, x, x) ...
    ids = np.random.default_rng(9).integers(0, 10, size=(2, 6))
    h = module[0](torch.tensor(ids))
    y_t, _ = module[1](h, h, h, need_weights=False)
    close(net.forward(ids), y_t)  # ... but the engine's chain is the same function
    assert len(net.parameters()) == 1 + 8


def test_a_causal_attention_and_torch_only_settings_are_refused() -> None:
    with pytest.raises(TypeError, match=r"causal=True has no torch.nn.MultiheadAttention"):
        bp.to_torch(bp.MultiHeadAttention(4, 2, causal=True))
    bad = [
        (nn.MultiheadAttention(4, 2), "batch_first=False is not supported"),
        (nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True), "dropout=0.1"),
        (nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True), "add_bias_kv=True"),
        (nn.MultiheadAttention(4, 2, add_zero_attn=True, batch_first=True), "add_zero_attn"),
        (nn.MultiheadAttention(4, 2, kdim=3, batch_first=True), "kdim=3, vdim=4"),
        (nn.Embedding(5, 2, padding_idx=0), "padding_idx=0 is not supported"),
        (nn.Embedding(5, 2, max_norm=1.0), "max_norm=1.0"),
        (nn.Embedding(5, 2, scale_grad_by_freq=True), "scale_grad_by_freq=True"),
        (nn.Embedding(5, 2, sparse=True), "sparse=True"),
    ]
    for module, words in bad:
        with pytest.raises(TypeError, match=re.escape(words)):
            bp.from_torch(nn.Sequential(module))


def test_an_engine_attention_goes_to_torch_with_its_gradients() -> None:
    rng = np.random.default_rng(10)
    mha = bp.MultiHeadAttention(6, 3, rng=rng)
    for p in mha.params.values():  # biases drawn too
        p.value = 0.5 * rng.standard_normal(p.shape)
    module = bp.to_torch(mha)[0]
    x = rng.standard_normal((2, 4, 6))
    y = mha.forward(x)
    g = rng.standard_normal(y.shape)
    g_x, grads = mha.backward(g)
    y_t, gx_t = attend(module, x, g)
    close(y, y_t)
    close(g_x, gx_t)
    theirs = attention_grads(module)
    scale = max(float(t.abs().max()) for t in theirs.values())
    for name, t in theirs.items():
        close(grads[name], t, scale)


def test_attention_modules_tied_in_torch_stay_tied() -> None:
    first = random_attention(4, 2, True, seed=11)
    second = nn.MultiheadAttention(4, 2, batch_first=True).double()
    second.in_proj_weight = first.in_proj_weight  # the same [Wq; Wk; Wv]
    net = bp.from_torch(nn.Sequential(first, second))
    for name in ("Wq", "Wk", "Wv"):
        assert net[0].params[name] is net[1].params[name]
    assert net[0].params["Wo"] is not net[1].params["Wo"]
    back = bp.to_torch(net)
    assert back[0].in_proj_weight is back[1].in_proj_weight
    assert back[0].out_proj.weight is not back[1].out_proj.weight
