"""Property-based tests (hypothesis): random models, random DAGs, random corruptions.

- Random stacks of the engine's layers, with random sizes, batch sizes and dtypes,
  pass the three-way check (fast path = explicit Jacobians = central differences),
  and their float32 twin stays float32 and agrees with float64.
- Random DAGs with fan-out (a value read by several nodes, or twice by one) and tied
  weights give PyTorch's outputs and gradients in float64.
- Random corruptions of a checkpoint (flipped bytes, truncations, appended or
  inserted bytes) always give the one clear error, and leave the model unchanged.

How many examples each draws is a hypothesis profile (``tests/conftest.py``):
``BACKPROP_HYPOTHESIS_PROFILE=nightly`` for a long run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import backprop as bp

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
given = hypothesis.given

# ------------------------------------------------------------------ random stacks

POINTWISE = {
    "tanh": bp.Tanh,
    "sigmoid": bp.Sigmoid,
    "softplus": bp.Softplus,
    "relu": bp.ReLU,
    "leaky": lambda: bp.LeakyReLU(0.1),
}


@st.composite
def vector_stacks(draw: Any) -> tuple[int, int, list[tuple[Any, ...]]]:
    """``(B, n_in, plan)``: a chain on ``(B, n)`` data, one plan entry per layer."""
    B, n0 = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    kinds = ["linear", *POINTWISE, "layernorm", "batchnorm", "softmax", "logsoftmax", "dropout"]
    n, plan = n0, []
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=5)):
        if kind == "linear":
            m = draw(st.integers(1, 5))
            plan.append((kind, n, m, draw(st.booleans())))
            n = m
        elif kind == "layernorm" and n < 3:
            # Over one or two entries x̂ is constant (0, or ±1), so L^x is zero, and its
            # diagonal-plus-low-rank product leaves rounding of size γ/sqrt(ε)·|u|, which no
            # relative test can tell from a wrong value: not a case worth drawing.
            continue
        else:
            plan.append((kind, n))
    return B, n0, plan or [("tanh", n0)]


def build_vector(plan: list[tuple[Any, ...]], B: int, seed: int, dtype: Any) -> bp.Sequential:
    rng = np.random.default_rng(seed)
    layers: list[bp.Layer] = []
    for kind, n, *rest in plan:
        if kind == "linear":
            layers.append(bp.Linear(n, rest[0], bias=rest[1], rng=rng, dtype=dtype))
        elif kind in POINTWISE:
            layers.append(POINTWISE[kind]())
        elif kind == "layernorm":
            layers.append(_scrambled(bp.LayerNorm(n, dtype=dtype), rng))
        elif kind == "batchnorm":
            layers.append(_running(_scrambled(bp.BatchNorm1d(n, dtype=dtype), rng), rng))
        elif kind == "softmax":
            layers.append(bp.Softmax(axis=-1))
        elif kind == "logsoftmax":
            layers.append(bp.LogSoftmax(axis=-1))
        else:  # dropout in eval mode: the identity (a fresh mask per run defeats differences)
            layers.append(bp.Dropout(0.5, rng=0).eval())
    return bp.Sequential(layers)


def _scrambled(layer: bp.Layer, rng: np.random.Generator) -> bp.Layer:
    """Normalization with γ, β away from their defaults (1 and 0 hide mistakes)."""
    for name, p in layer.params.items():
        p.value = (rng.uniform(0.5, 1.5, p.shape) * (1 if name == "gamma" else -0.3)).astype(
            p.dtype
        )
    return layer


def _running(bn: Any, rng: np.random.Generator) -> bp.Layer:
    """BatchNorm in eval mode, with running statistics away from 0 and 1. (Whole-model
    Jacobians are chained per example, which batch statistics forbid; the battery in
    ``test_layers.py`` checks training mode layer by layer.)"""
    dt = bn.running_mean.dtype
    mean, var = rng.standard_normal(bn.c).astype(dt), rng.uniform(0.5, 2, bn.c).astype(dt)
    bn.set_running_stats(mean, var)
    return bn.eval()


@st.composite
def image_stacks(draw: Any) -> tuple[int, tuple[int, int, int], list[tuple[Any, ...]]]:
    """``(B, (C, H, W), plan)``: convolutions, pooling and the like, then a Linear."""
    B = draw(st.integers(1, 3))
    C, H, W = draw(st.integers(1, 3)), draw(st.integers(3, 6)), draw(st.integers(3, 6))
    shape = (C, H, W)
    c, h, w = shape
    plan: list[tuple[Any, ...]] = []
    kinds = ["conv", "convT", "maxpool", "avgpool", "upsample", "batchnorm", "tanh", "relu"]
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=4)):
        if kind in ("conv", "convT"):
            k, s, p = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1))
            c_out = draw(st.integers(1, 3))
            if kind == "conv":
                h2, w2 = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            else:
                h2, w2 = (h - 1) * s - 2 * p + k, (w - 1) * s - 2 * p + k
            if min(h2, w2) < 1 or max(h2, w2) > 8:
                continue
            plan.append((kind, c, c_out, k, s, p))
            c, h, w = c_out, h2, w2
        elif kind in ("maxpool", "avgpool"):
            if min(h, w) >= 2:
                plan.append((kind,))
                h, w = h // 2, w // 2
        elif kind == "upsample":
            if max(h, w) <= 4:
                plan.append((kind,))
                h, w = 2 * h, 2 * w
        else:
            plan.append((kind, c))
    plan.append(("head", c * h * w, draw(st.integers(1, 3))))
    return B, shape, plan


def build_image(plan: list[tuple[Any, ...]], B: int, seed: int, dtype: Any) -> bp.Sequential:
    rng = np.random.default_rng(seed)
    layers: list[bp.Layer] = []
    for kind, *args in plan:
        if kind == "conv":
            c, c_out, k, s, p = args
            layers.append(bp.Conv2d(c, c_out, k, stride=s, padding=p, rng=rng, dtype=dtype))
        elif kind == "convT":
            c, c_out, k, s, p = args
            layers.append(
                bp.ConvTranspose2d(c, c_out, k, stride=s, padding=p, rng=rng, dtype=dtype)
            )
        elif kind == "maxpool":
            layers.append(bp.MaxPool2d(2))
        elif kind == "avgpool":
            layers.append(bp.AvgPool2d(2))
        elif kind == "upsample":
            layers.append(bp.Upsample(2))
        elif kind == "batchnorm":
            layers.append(_running(_scrambled(bp.BatchNorm2d(args[0], dtype=dtype), rng), rng))
        elif kind in POINTWISE:
            layers.append(POINTWISE[kind]())
        else:
            layers += [bp.Flatten(), bp.Linear(args[0], args[1], rng=rng, dtype=dtype)]
    return bp.Sequential(layers)


def check_stack(net64: bp.Sequential, net32: bp.Sequential, x: np.ndarray) -> None:
    """The three-way check in float64; the float32 twin stays float32 and agrees."""
    bp.gradcheck(net64, x)  # raises GradcheckError (an AssertionError) on a mismatch
    y64 = net64.forward(x, cache=False)
    y32 = net32.forward(x.astype(np.float32), cache=False)
    assert y32.dtype == np.float32 and y64.dtype == np.float64
    scale = max(float(np.abs(y64).max()), 1.0)
    np.testing.assert_allclose(y32, y64, rtol=2e-3, atol=2e-4 * scale)


@given(vector_stacks(), st.integers(0, 2**16))
def test_random_vector_stacks_pass_the_three_way_check(stack, seed: int) -> None:
    B, n0, plan = stack
    x = np.random.default_rng(seed + 1).standard_normal((B, n0))
    check_stack(build_vector(plan, B, seed, np.float64), build_vector(plan, B, seed, np.float32), x)


@given(image_stacks(), st.integers(0, 2**16))
def test_random_image_stacks_pass_the_three_way_check(stack, seed: int) -> None:
    B, shape, plan = stack
    x = np.random.default_rng(seed + 1).standard_normal((B, *shape))
    check_stack(build_image(plan, B, seed, np.float64), build_image(plan, B, seed, np.float32), x)


def test_the_stack_check_can_fail() -> None:
    class Wrong(bp.Tanh):
        def dh(self, x_in, x_out):
            return 1.001 * super().dh(x_in, x_out)

    x = np.random.default_rng(0).standard_normal((2, 3))
    net = bp.Sequential([bp.Linear(3, 3, rng=np.random.default_rng(0)), Wrong()])
    with pytest.raises(AssertionError):
        bp.gradcheck(net, x)


# ------------------------------------------------------------------ random DAGs vs PyTorch

OPS = ["linear", "tied", "tanh", "sigmoid", "add", "mul", "merge"]


@st.composite
def dags(draw: Any) -> tuple[int, int, list[tuple[Any, ...]]]:
    """``(B, d, ops)``: each op reads earlier values by index (a value may be read by
    several ops, or twice by one: fan-out)."""
    B, d = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    dims, linears, ops = [d], [], []
    for _ in range(draw(st.integers(1, 7))):
        op = draw(st.sampled_from(OPS))
        i = draw(st.integers(0, len(dims) - 1))
        if op == "tied" and not any(n_in == dims[i] for n_in, _ in linears):
            op = "linear"
        if op == "linear":
            m = draw(st.integers(1, 4))
            ops.append(("linear", i, m))
            linears.append((dims[i], m))
            dims.append(m)
        elif op == "tied":
            k = draw(st.sampled_from([k for k, (n, _) in enumerate(linears) if n == dims[i]]))
            ops.append(("tied", i, k))
            linears.append(linears[k])
            dims.append(linears[k][1])
        elif op in ("add", "mul"):
            j = draw(st.sampled_from([j for j, n in enumerate(dims) if n == dims[i]]))
            ops.append((op, i, j))
            dims.append(dims[i])
        elif op == "merge":
            j = draw(st.integers(0, len(dims) - 1))
            ops.append((op, i, j))
            dims.append(dims[i] + dims[j])
        else:
            ops.append((op, i))
            dims.append(dims[i])
    return B, d, ops


def build_dag(ops: list[tuple[Any, ...]], d: int, torch: Any, x: np.ndarray, seed: int) -> Any:
    """The Graph and the same computation in torch: ``(graph, outputs_t, x_t, params)``."""
    rng = np.random.default_rng(seed)
    g = bp.Graph()
    handles = [g.input("x")]
    x_t = torch.tensor(x, requires_grad=True)
    values = [x_t]
    linears: list[bp.Linear] = []
    tensors: dict[int, Any] = {}
    read = [0] * (len(ops) + 1)

    def t(p: bp.Parameter) -> Any:
        if id(p) not in tensors:
            tensors[id(p)] = torch.tensor(p.value, requires_grad=True)
        return tensors[id(p)]

    for op, i, *rest in ops:
        read[i] += 1
        if op in ("linear", "tied"):
            if op == "linear":
                layer = bp.Linear(values[i].shape[1], rest[0], rng=rng)
            else:
                first = linears[rest[0]]
                layer = bp.Linear(first.n_in, first.n_out, W=first.W, b=first.b)
            linears.append(layer)
            handles.append(g.add(layer, handles[i]))
            values.append(torch.nn.functional.linear(values[i], t(layer.W), t(layer.b)))
        elif op in ("tanh", "sigmoid"):
            handles.append(g.add(bp.Tanh() if op == "tanh" else bp.Sigmoid(), handles[i]))
            values.append(torch.tanh(values[i]) if op == "tanh" else torch.sigmoid(values[i]))
        else:
            j = rest[0]
            read[j] += 1
            layer = {"add": bp.Add, "mul": bp.Multiply, "merge": bp.Merge}[op]()
            handles.append(g.add(layer, handles[i], handles[j]))
            a, b = values[i], values[j]
            values.append(a + b if op == "add" else a * b if op == "mul" else torch.cat([a, b], 1))
    sinks = [k for k in range(1, len(values)) if read[k] == 0]
    g.output(*[handles[k] for k in sinks])
    return g, [values[k] for k in sinks], x_t, tensors


@given(dags(), st.integers(0, 2**16))
def test_random_dags_with_fan_out_and_ties_match_torch(dag, seed: int) -> None:
    torch = pytest.importorskip("torch")
    B, d, ops = dag
    x = np.random.default_rng(seed).standard_normal((B, d))
    g, outs_t, x_t, tensors = build_dag(ops, d, torch, x, seed)
    outs = g.forward(x=x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    rng = np.random.default_rng(seed + 1)
    seeds = [rng.standard_normal(o.shape) for o in outs]
    for ours, theirs in zip(outs, outs_t, strict=True):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-12, atol=1e-14)
    grads = g.backward(tuple(seeds) if len(seeds) > 1 else seeds[0])
    total = sum((o * torch.tensor(s)).sum() for o, s in zip(outs_t, seeds, strict=True))
    total.backward()
    np.testing.assert_allclose(grads.inputs["x"], x_t.grad.numpy(), rtol=1e-10, atol=1e-13)
    params = g.parameters()
    assert len(params) == len(tensors)  # a tied Parameter is one, on both sides
    for p in params:
        theirs = tensors[id(p)].grad
        expected = np.zeros(p.shape) if theirs is None else theirs.numpy()
        np.testing.assert_allclose(grads.params[p], expected, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------ corrupted checkpoints


@pytest.fixture(scope="module")
def saved(tmp_path_factory: Any) -> tuple[Path, bytes]:
    folder = tmp_path_factory.mktemp("corrupt")
    rng = np.random.default_rng(0)
    net = bp.Sequential([bp.Linear(3, 4, rng=rng), bp.BatchNorm1d(4), bp.Linear(4, 2, rng=rng)])
    opt = bp.Adam(net)
    opt.step({p: np.ones(p.shape) for p in net.parameters()})
    path = bp.save(net, folder / "good.npz", optimizer=opt, state={"epoch": 1})
    return folder, path.read_bytes()


def corruptions(size: int) -> Any:
    flips = st.lists(
        st.tuples(st.integers(0, size - 1), st.integers(1, 255)), min_size=1, max_size=4
    )
    return st.one_of(
        flips.map(lambda f: ("flip", f)),
        st.integers(0, size - 1).map(lambda n: ("truncate", n)),
        st.binary(min_size=1, max_size=64).map(lambda b: ("append", b)),
        st.tuples(st.integers(0, size - 1), st.binary(min_size=1, max_size=8)).map(
            lambda t: ("insert", t)
        ),
    )


def corrupt(good: bytes, how: tuple[str, Any]) -> bytes:
    kind, arg = how
    if kind == "flip":
        data = bytearray(good)
        for pos, mask in arg:
            data[pos] ^= mask
        return bytes(data) if bytes(data) != good else b""  # flips that cancel: empty it
    if kind == "truncate":
        return good[:arg]
    if kind == "append":
        return good + arg
    pos, extra = arg
    return good[:pos] + extra + good[pos:]


@given(data=st.data())
def test_random_corruptions_always_give_the_clear_error(saved, data) -> None:
    folder, good = saved
    how = data.draw(corruptions(len(good)))
    path = folder / "bad.npz"
    path.write_bytes(corrupt(good, how))
    rng = np.random.default_rng(1)
    net = bp.Sequential([bp.Linear(3, 4, rng=rng), bp.BatchNorm1d(4), bp.Linear(4, 2, rng=rng)])
    opt = bp.Adam(net, lr=0.5)
    before = [p.value.copy() for p in net.parameters()] + [net[1].running_var.copy()]
    with pytest.raises(ValueError) as info:
        bp.load(net, path, optimizer=opt)
    assert str(path) in str(info.value)
    after = [p.value for p in net.parameters()] + [net[1].running_var]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert opt.lr == 0.5 and all(s == {} for s in opt.state.values())


def test_the_uncorrupted_file_loads(saved) -> None:
    folder, good = saved
    path = folder / "copy.npz"
    path.write_bytes(good)
    net = bp.Sequential([bp.Linear(3, 4), bp.BatchNorm1d(4), bp.Linear(4, 2)])
    assert bp.load(net, path, optimizer=bp.Adam(net)) == {"epoch": 1}
    with np.load(path) as f:
        assert json.loads(f["__backprop__"].tobytes())["state"] == {"epoch": 1}
