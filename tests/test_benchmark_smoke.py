"""The benchmark's contestants do correct work: each first step matches the numpy reference.

This is a correctness test of the case builders in ``benchmarks/bench/``, never a timing
test. The numpy reference is itself checked against a step written out independently
here. One quick run of ``benchmarks/run.py`` checks that the script still writes its
results.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import backprop as bp

_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load_bench() -> Any:
    """The package ``benchmarks/bench`` (not on the import path), loaded from its file."""
    spec = importlib.util.spec_from_file_location(
        "backprop_bench", _BENCHMARKS / "bench" / "__init__.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its submodules and dataclasses look it up there
    spec.loader.exec_module(module)
    return module


_load_bench()
problems = importlib.import_module("backprop_bench.problems")
steps = importlib.import_module("backprop_bench.steps")
jacobians = importlib.import_module("backprop_bench.jacobians")
goals = importlib.import_module("backprop_bench.goals")
cli = importlib.import_module("backprop_bench.cli")
convnets = importlib.import_module("backprop_bench.convnets")
transformer = importlib.import_module("backprop_bench.transformer")
rnn = importlib.import_module("backprop_bench.rnn")
curvature = importlib.import_module("backprop_bench.curvature")

CASES = [(size, dt) for size in ("tiny", "small") for dt in (np.float64, np.float32)]


def _independent_first_step(p: Any) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
    """One SGD step in float64 written without the benchmark's code (no in-place tricks)."""
    Ws = [W.astype(np.float64) for W, _ in p.weights]
    bs = [b.astype(np.float64) for _, b in p.weights]
    X = p.X.astype(np.float64)
    zs, acts = [], [X]
    for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        z = acts[-1] @ W.T + b
        zs.append(z)
        acts.append(np.maximum(z, 0.0) if i < len(Ws) - 1 else z)
    out, B = acts[-1], p.batch
    if p.loss == "l2":
        loss = np.sum((out - p.y) ** 2) / B
        g = 2.0 * (out - p.y) / B
    else:
        e = np.exp(out - out.max(axis=1, keepdims=True))
        prob = e / e.sum(axis=1, keepdims=True)
        onehot = np.eye(out.shape[1])[p.y]
        loss = -np.mean(np.log(prob[np.arange(B), p.y]))
        g = (prob - onehot) / B
    new = []
    for i in range(len(Ws) - 1, -1, -1):
        gW, gb = g.T @ acts[i], g.sum(axis=0)
        if i > 0:
            g = (g @ Ws[i]) * (zs[i - 1] > 0)
        new.append((Ws[i] - p.lr * gW, bs[i] - p.lr * gb))
    return float(loss), new[::-1]


@pytest.mark.parametrize(("size", "dtype"), CASES)
def test_numpy_reference_matches_independent_step(size: str, dtype: Any) -> None:
    p = problems.make_problem(size, dtype)
    ref = steps.NumpyStep(p)
    loss = ref.step()
    want_loss, want = _independent_first_step(p)
    rtol = 1e-12 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(loss, want_loss, rtol=rtol)
    for (W, b), (W0, b0) in zip(ref.weights(), want, strict=True):
        assert W.dtype == np.dtype(dtype) and b.dtype == np.dtype(dtype)
        np.testing.assert_allclose(W, W0, rtol=rtol, atol=rtol * np.abs(W0).max())
        np.testing.assert_allclose(b, b0, rtol=rtol, atol=rtol * np.abs(b0).max())
    # one step moved the weights: the check above compares something that changed
    assert not np.allclose(ref.weights()[0][0], p.weights[0][0], rtol=0, atol=0)


@pytest.mark.parametrize(("size", "dtype"), CASES)
def test_every_contestant_first_step_matches_reference(size: str, dtype: Any) -> None:
    p = problems.make_problem(size, dtype)
    contestants = steps.step_contestants(p)
    assert {"numpy", "engine"} <= set(contestants)
    assert not any("explicit" in name for name in contestants)  # explicit mode is not timed
    for name, factory in contestants.items():
        ok, msg = steps.check_first_step(factory, p)
        assert ok, f"{name} ({size}, {np.dtype(dtype).name}): {msg}"


CONV_CASES = [(net, dt) for net in ("cnn", "lenet") for dt in (np.float64, np.float32)]


def _independent_conv_step(p: Any) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
    """One SGD step of a convnet in float64 by loops over the kernel taps and a
    comparison mask for the pooling (no im2col, no reshape tricks): the benchmark's
    numpy reference checked against a different computation."""
    Ws = [W.astype(np.float64) for W, _ in p.weights]
    bs = [b.astype(np.float64) for _, b in p.weights]
    a, saved, i = p.X.astype(np.float64), [], 0
    for spec in p.layers:
        saved.append(a)
        if spec[0] == "conv":
            k, pad = spec[3], spec[4]
            x = np.pad(a, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
            Ho, Wo = x.shape[2] - k + 1, x.shape[3] - k + 1
            out = np.zeros((a.shape[0], Ws[i].shape[0], Ho, Wo)) + bs[i][:, None, None]
            for ky in range(k):
                for kx in range(k):
                    patch = x[:, :, ky : ky + Ho, kx : kx + Wo]
                    out += np.einsum("bchw,oc->bohw", patch, Ws[i][:, :, ky, kx])
            a, i = out, i + 1
        elif spec[0] == "linear":
            a, i = a @ Ws[i].T + bs[i], i + 1
        elif spec[0] == "relu":
            a = np.maximum(a, 0.0)
        elif spec[0] == "pool":
            a = np.max([a[:, :, r::2, c::2] for r in (0, 1) for c in (0, 1)], axis=0)
        else:
            a = a.reshape(a.shape[0], -1)
    B = p.batch
    e = np.exp(a - a.max(axis=1, keepdims=True))
    prob = e / e.sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(prob[np.arange(B), p.y]))
    g = (prob - np.eye(10)[p.y]) / B
    new: list[Any] = [None] * len(Ws)
    for spec, x_in in zip(p.layers[::-1], saved[::-1], strict=True):
        if spec[0] == "conv":
            i -= 1
            k, pad = spec[3], spec[4]
            x = np.pad(x_in, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
            Ho, Wo = g.shape[2:]
            gW, gx = np.zeros_like(Ws[i]), np.zeros_like(x)
            for ky in range(k):
                for kx in range(k):
                    patch = x[:, :, ky : ky + Ho, kx : kx + Wo]
                    gW[:, :, ky, kx] = np.einsum("bohw,bchw->oc", g, patch)
                    gx[:, :, ky : ky + Ho, kx : kx + Wo] += np.einsum(
                        "bohw,oc->bchw", g, Ws[i][:, :, ky, kx]
                    )
            new[i] = (Ws[i] - p.lr * gW, bs[i] - p.lr * g.sum(axis=(0, 2, 3)))
            g = gx[:, :, pad : pad + x_in.shape[2], pad : pad + x_in.shape[3]]
        elif spec[0] == "linear":
            i -= 1
            new[i] = (Ws[i] - p.lr * (g.T @ x_in), bs[i] - p.lr * g.sum(axis=0))
            g = g @ Ws[i]
        elif spec[0] == "relu":
            g = g * (x_in > 0)
        elif spec[0] == "pool":  # continuous data: the positive maxima are unique
            up = np.repeat(np.repeat(g, 2, axis=2), 2, axis=3)
            top = np.repeat(np.repeat(np.max(
                [x_in[:, :, r::2, c::2] for r in (0, 1) for c in (0, 1)], axis=0
            ), 2, axis=2), 2, axis=3)  # fmt: skip
            g = up * (x_in == top) * (x_in > 0)
        else:
            g = g.reshape(x_in.shape)
    return float(loss), new


@pytest.mark.parametrize(("net", "dtype"), CONV_CASES)
def test_numpy_conv_reference_matches_independent_step(net: str, dtype: Any) -> None:
    p = convnets.make_conv_problem(net, dtype)
    ref = convnets.NumpyConvStep(p)
    loss = ref.step()
    want_loss, want = _independent_conv_step(p)
    rtol = 1e-12 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(loss, want_loss, rtol=rtol)
    for (W, b), (W0, b0) in zip(ref.weights(), want, strict=True):
        assert W.dtype == np.dtype(dtype) and b.dtype == np.dtype(dtype)
        np.testing.assert_allclose(W, W0, rtol=rtol, atol=rtol * np.abs(W0).max())
        np.testing.assert_allclose(b, b0, rtol=rtol, atol=rtol * np.abs(b0).max())
    for (W, _), (W0, _) in zip(ref.weights(), p.weights, strict=True):
        assert not np.array_equal(W, W0)  # every layer moved: its check compares something


@pytest.mark.parametrize(("net", "dtype"), CONV_CASES)
def test_every_conv_contestant_first_step_matches_reference(net: str, dtype: Any) -> None:
    p = convnets.make_conv_problem(net, dtype)
    contestants = convnets.conv_contestants(p)
    assert {"numpy", "engine"} <= set(contestants)
    for name, factory in contestants.items():
        ok, msg = steps.check_first_step(factory, p, reference=convnets.NumpyConvStep)
        assert ok, f"{name} ({net}, {np.dtype(dtype).name}): {msg}"


def test_conv_check_catches_a_wrong_conv_weight_gradient() -> None:
    p = convnets.make_conv_problem("cnn", np.float64)

    class FlippedKernel(convnets.NumpyConvStep):  # weight gradient of the flipped kernel
        @staticmethod
        def _conv_back(g: Any, W: Any, saved: Any, k: int, pad: int, input_grad: bool) -> Any:
            g_in, gW, gb = convnets.NumpyConvStep._conv_back(g, W, saved, k, pad, input_grad)
            return g_in, gW[:, :, ::-1, ::-1], gb

    ok, msg = steps.check_first_step(FlippedKernel, p, reference=convnets.NumpyConvStep)
    assert not ok and "layer 0 W" in msg


def test_check_first_step_catches_a_wrong_contestant() -> None:
    p = problems.make_problem("small", np.float64)

    class OffByLr(steps.NumpyStep):  # a step with the wrong learning rate
        def __init__(self, q: Any) -> None:
            super().__init__(q)
            self.lr = q.lr * 1.001

    ok, msg = steps.check_first_step(OffByLr, p)
    assert not ok and "rel. error" in msg


def test_engine_jacobian_matches_numpy_chain_on_one_example() -> None:
    p = problems.make_problem("large", np.float64)
    X = p.X[:2].copy()
    net = problems.build_engine_net(p, loss=False)
    for wrt in ("x", "W1"):
        want = jacobians.numpy_chain(p, X[:1] if wrt == "W1" else X, wrt)
        got = jacobians.engine_jacobian(net, X[:1] if wrt == "W1" else X, wrt)
        ok, err = problems.close(got, want, 1e-10)
        assert ok, f"∂y/∂{wrt}: rel. error {err}"
    # the chain itself against a finite difference of the network output
    eps = 1e-6
    x0 = X[:1]
    J = jacobians.numpy_chain(p, x0, "x")[0]
    for k in (0, 100, 700):
        e = np.zeros_like(x0)
        e[0, k] = eps
        fd = (net.forward(x0 + e) - net.forward(x0 - e))[0] / (2 * eps)
        np.testing.assert_allclose(J[:, k], fd, rtol=1e-5, atol=1e-8)


def test_script_runs_as_make_bench_runs_it() -> None:
    """``python benchmarks/run.py`` finds its package (here only as far as ``--help``)."""
    cmd = [sys.executable, str(_BENCHMARKS / "run.py"), "--help"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--cases" in done.stdout
    assert "tiny,small,large,cnn,lenet,rnn,transformer,jacobians,memory" in "".join(
        done.stdout.split()
    )


def test_quick_run_writes_its_results(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "results.json", tmp_path / "results.md"
    args = ["--quick", "--repeats", "1", "--cases", "tiny", "--dtypes", "float64"]
    assert cli.main([*args, "--json", str(out_json), "--md", str(out_md)]) == 0
    report = json.loads(out_json.read_text())
    assert [(r["case"], r["dtype"]) for r in report["results"]] == [("tiny step", "float64")]
    (result,) = report["results"]
    assert all(msg.startswith("ok") for msg in result["checks"].values()), result["checks"]
    assert {"numpy", "engine"} <= set(result["timings"])
    measured = [g["goal"] for g in report["goals"] if g["holds"] is not None]
    assert measured == ["tiny step float64: engine / numpy"]
    md = out_md.read_text()
    assert "| tiny step | float64 | backprop (fast) |" in md
    assert "explicit" not in md and "explicit" not in out_json.read_text()


def test_quick_run_of_the_convnets(tmp_path: Path) -> None:
    out_json = tmp_path / "results.json"
    args = ["--quick", "--repeats", "1", "--cases", "cnn,lenet", "--json", str(out_json)]
    assert cli.main(args) == 0
    report = json.loads(out_json.read_text())
    cases = [(r["case"], r["dtype"]) for r in report["results"]]
    assert cases == [(f"{n} step", d) for n in ("cnn", "lenet") for d in ("float64", "float32")]
    for r in report["results"]:
        assert all(msg.startswith("ok") for msg in r["checks"].values()), r["checks"]
        assert {"numpy", "engine"} <= set(r["timings"])
    measured = {g["goal"] for g in report["goals"] if g["holds"] is not None}
    want = {
        f"{n} step {d}: engine / numpy" for n in ("cnn", "lenet") for d in ("float64", "float32")
    }
    assert want <= measured
    if steps.torch_ok():
        assert "lenet step float32: engine / PyTorch (stretch)" in measured
    assert not measured & {g["goal"] for g in report["goals"] if "tiny" in g["goal"]}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_transformer_contestant_first_step_matches_reference(dtype: Any) -> None:
    # The hand-written numpy block, the engine's transformer_block and torch's
    # TransformerEncoderLayer are three separate computations of the same step.
    p = transformer.make_block_problem(dtype, batch=4, T=5, d=8, heads=2, ff=16)
    contestants = transformer.block_contestants(p)
    assert {"numpy", "engine"} <= set(contestants)
    for name, factory in contestants.items():
        ok, msg = steps.check_first_step(factory, p, reference=transformer.NumpyBlockStep)
        assert ok, f"{name} ({np.dtype(dtype).name}): {msg}"
    ref = transformer.NumpyBlockStep(p)
    ref.step()
    pairs = zip(ref.weights(), p.weights, strict=True)
    moved = [not np.array_equal(W, W0) for (W, _), (W0, _) in pairs]
    assert all(moved)  # every pair of weights took a step: the check compares something


def test_transformer_check_catches_a_wrong_attention_gradient() -> None:
    p = transformer.make_block_problem(np.float64, batch=2, T=3, d=4, heads=2, ff=8)

    class NoScale(transformer.NumpyBlockStep):  # attention scores without their 1/√m
        def __init__(self, q: Any) -> None:
            super().__init__(q)
            self.scale = 1.0

    ok, msg = steps.check_first_step(NoScale, p, reference=transformer.NumpyBlockStep)
    assert not ok and "loss" in msg
    engine = transformer.EngineBlockStep
    ok, msg = steps.check_first_step(engine, p, reference=NoScale)
    assert not ok


def test_quick_run_of_the_transformer_block(tmp_path: Path) -> None:
    out_json = tmp_path / "results.json"
    args = ["--quick", "--repeats", "1", "--cases", "transformer", "--dtypes", "float32"]
    assert cli.main([*args, "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    (result,) = report["results"]
    assert (result["case"], result["dtype"]) == ("transformer step", "float32")
    assert all(msg.startswith("ok") for msg in result["checks"].values()), result["checks"]
    assert {"numpy", "engine"} <= set(result["timings"])
    measured = {g["goal"] for g in report["goals"] if g["holds"] is not None}
    assert measured == (
        {"transformer step float32: engine / PyTorch"} if steps.torch_ok() else set()
    )


def _independent_rnn_step(p: Any) -> tuple[float, list[np.ndarray]]:
    """One BPTT + SGD step in float64 written plainly: a state list forward, the chain
    rule step by step backward, every input term recomputed per step."""
    W_x, W_h, b = (a.astype(np.float64) for a in (p.W_x, p.W_h, p.b))
    X, Y = p.X.astype(np.float64), p.Y.astype(np.float64)
    B, T, _ = X.shape
    hs = [np.zeros((B, W_h.shape[0]))]
    for t in range(T):
        hs.append(np.tanh(X[:, t] @ W_x.T + hs[-1] @ W_h.T + b))
    loss = sum(np.sum((hs[t + 1] - Y[:, t]) ** 2) for t in range(T)) / B
    gW_x, gW_h, gb = np.zeros_like(W_x), np.zeros_like(W_h), np.zeros_like(b)
    carry = np.zeros_like(hs[0])
    for t in reversed(range(T)):
        g = 2.0 * (hs[t + 1] - Y[:, t]) / B + carry
        ga = g * (1.0 - hs[t + 1] ** 2)
        gW_x, gW_h, gb = gW_x + ga.T @ X[:, t], gW_h + ga.T @ hs[t], gb + ga.sum(axis=0)
        carry = ga @ W_h
    return float(loss), [W_x - p.lr * gW_x, W_h - p.lr * gW_h, b - p.lr * gb]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numpy_rnn_reference_matches_independent_step(dtype: Any) -> None:
    p = rnn.make_rnn_problem(dtype)
    ref = rnn.NumpyRNNStep(p)
    loss = ref.step()
    want_loss, want = _independent_rnn_step(p)
    rtol = 1e-12 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(loss, want_loss, rtol=rtol)
    for got, w in zip(ref.weights(), want, strict=True):
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got, w, rtol=rtol, atol=rtol * np.abs(w).max())
    assert not np.allclose(ref.weights()[1], p.W_h, rtol=0, atol=0)  # the step moved W_h


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_rnn_contestant_first_step_matches_reference(dtype: Any) -> None:
    p = rnn.make_rnn_problem(dtype)
    contestants = rnn.rnn_contestants()
    assert {"numpy", "engine"} <= set(contestants)
    if steps.torch_ok():
        assert {"torch", "torch_fused"} <= set(contestants)
    for name, factory in contestants.items():
        ok, msg = rnn.check_rnn_first_step(factory, p)
        assert ok, f"{name} ({np.dtype(dtype).name}): {msg}"


def test_rnn_check_catches_a_wrong_contestant() -> None:
    class Truncated(rnn.EngineRNNStep):
        """BPTT cut to 8 steps: a real gradient, of another function."""

        def step(self) -> float:
            J = self.model.forward(x=self.X, y=self.Y)
            with bp.truncated(self.model, 8):
                self.opt.step(self.model.backward(input_grad=False).params)
            return float(J)

    ok, msg = rnn.check_rnn_first_step(Truncated, rnn.make_rnn_problem())
    assert not ok and "W_" in msg


def test_quick_run_of_the_rnn(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "results.json", tmp_path / "results.md"
    args = ["--quick", "--repeats", "1", "--cases", "rnn", "--dtypes", "float32"]
    assert cli.main([*args, "--json", str(out_json), "--md", str(out_md)]) == 0
    report = json.loads(out_json.read_text())
    (result,) = report["results"]
    assert (result["case"], result["dtype"]) == ("rnn step", "float32")
    assert all(msg.startswith("ok") for msg in result["checks"].values()), result["checks"]
    if steps.torch_ok():
        goals_by_name = {g["goal"]: g for g in report["goals"]}
        assert goals_by_name["rnn step float32: engine / PyTorch nn.RNNCell loop"]["ratio"]
        fused = goals_by_name["rnn step float32: engine / PyTorch nn.RNN (fused)"]
        assert fused["bound"] is None and fused["ratio"] > 0
        assert "| rnn step | float32 | PyTorch nn.RNN (fused) |" in out_md.read_text()


def test_conv_paths_candidates_agree() -> None:
    """``benchmarks/conv_paths.py``: every candidate computes the library's product."""
    spec = importlib.util.spec_from_file_location("conv_paths", _BENCHMARKS / "conv_paths.py")
    assert spec is not None and spec.loader is not None
    conv_paths = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv_paths)
    rng = np.random.default_rng(1)
    for c_in, H, c_out, k, p in conv_paths.LAYERS.values():
        geo = conv_paths.ConvGeometry(c_in, H, H, c_out, (k, k), (1, 1), (p, p), (1, 1), 1)
        x = rng.standard_normal((3, c_in, H, H))
        W = rng.standard_normal((c_out, c_in, k, k))
        g = rng.standard_normal((3, c_out, geo.Ho, geo.Wo))
        for op, fns in conv_paths.candidates(x, W, g, geo).items():
            results = [fn() for fn in fns.values()]
            for name, got in zip(fns, results, strict=True):
                np.testing.assert_allclose(
                    got.reshape(results[0].shape), results[0], rtol=1e-10, atol=1e-10,
                    err_msg=f"{op} {name}",
                )  # fmt: skip


def test_goals_table_names_every_goal_once() -> None:
    names = [g["goal"] for g in goals.evaluate_goals([], None)]
    assert len(names) == len(set(names)) == 31
    assert "rnn step float32: engine / PyTorch nn.RNNCell loop" in names
    assert "hvp, small MLP: hvp / one gradient" in names
    assert "top Hessian eigenvalue, digits MLP: seconds" in names
    for net in ("cnn", "lenet"):
        assert f"{net} step float64: engine / PyTorch" in names
        assert f"{net} step float32: engine / PyTorch (stretch)" in names
        assert f"{net} step float64: engine / PyTorch (stretch)" not in names
    assert all(g["holds"] is None for g in goals.evaluate_goals([], None))
    assert not any("explicit" in name for name in names)


def test_curvature_case_contestants_compute_what_they_say() -> None:
    # The hand-written gradient is the engine's; the hvp case's torch product is the
    # engine's hvp (both checked again by the case itself before timing).
    p = problems.make_problem("small", np.float64)
    net = problems.build_engine_net(p)
    net.forward(p.X, p.y)
    grads = net.backward().params
    want = [grads[q] for q in net.parameters()]
    for got, ref in zip(curvature.numpy_gradient(net, p.X, p.y)(), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
    if not steps.torch_ok():
        return
    import backprop as bp

    v = [np.random.default_rng(3).standard_normal(q.shape) for q in net.parameters()]
    ours = bp.hvp(net, p.X, p.y, v=dict(zip(net.parameters(), v, strict=True)))
    with warnings.catch_warnings():  # torch's forward mode loads through torch.jit.script
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = curvature.torch_hvp_fn(net, p.X, p.y, v)()
    double = curvature.torch_double_backward_fn(net, p.X, p.y, v)()
    for q, t, d in zip(net.parameters(), theirs, double, strict=True):
        np.testing.assert_allclose(ours[q], t, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(ours[q], d, rtol=1e-10, atol=1e-14)


def _load_instructions() -> Any:
    spec = importlib.util.spec_from_file_location("instructions", _BENCHMARKS / "instructions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_instruction_count_child_runs_both_steps() -> None:
    """``benchmarks/instructions.py``: the run valgrind would count works, for both
    contestants (here without valgrind, which CI need not have)."""
    instructions = _load_instructions()
    for who in ("numpy", "engine"):
        cmd, env = instructions.child(who, "tiny", 2)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr


def test_instruction_count_says_when_valgrind_is_missing(monkeypatch: Any, capsys: Any) -> None:
    instructions = _load_instructions()
    monkeypatch.setattr(instructions.shutil, "which", lambda name: None)
    monkeypatch.setattr(sys, "argv", ["instructions.py"])
    assert instructions.main() == 1
    assert "valgrind is not installed" in capsys.readouterr().err
