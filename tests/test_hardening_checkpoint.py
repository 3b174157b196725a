"""Checkpoints under stress: atomic writes, killed saves, the umask, bad files of every
kind, optimizer state, buffers and training state, and a bit-exact resume."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import backprop as bp
from backprop import checkpoint_io

ROOT = Path(__file__).resolve().parents[1]


def model(seed: int = 0, p_drop: float = 0.2) -> bp.Sequential:
    rng = np.random.default_rng(seed)
    return bp.Sequential(
        [
            bp.Linear(4, 16, rng=rng),
            bp.BatchNorm1d(16),
            bp.ReLU(),
            bp.Dropout(p_drop, rng=seed + 1),
            bp.Linear(16, 3, rng=rng),
        ]
    )


def everything(net: bp.Sequential, opt: bp.Optimizer | None = None) -> list[np.ndarray]:
    """Parameters, buffers, the dropout generator's state and the optimizer's arrays."""
    out = [p.value.copy() for p in net.parameters()]
    out += [net[1].running_mean.copy(), net[1].running_var.copy()]
    out.append(np.array(json.dumps(net[3]._rng.bit_generator.state)))
    if opt is not None:
        for p in opt.params:
            out += [np.array(v, copy=True) for _, v in sorted(opt.state[p].items())]
    return out


def identical(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b, strict=True)
    )


def data(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    return rng.standard_normal((n, 4)), rng.integers(0, 3, n)


# ------------------------------------------------------------------ resume, bit for bit


def test_four_epochs_equal_two_then_save_load_into_fresh_objects_then_two(tmp_path) -> None:
    X, y = data()
    straight = model(0)
    opt = bp.Adam(straight, lr=1e-2)
    bp.fit(
        straight,
        X,
        y,
        epochs=4,
        batch_size=16,
        optimizer=opt,
        rng=np.random.default_rng(7),
        progress=False,
    )

    first = model(0)
    opt1, rng1 = bp.Adam(first, lr=1e-2), np.random.default_rng(7)
    bp.fit(first, X, y, epochs=2, batch_size=16, optimizer=opt1, rng=rng1, progress=False)
    path = bp.save(first, tmp_path / "run", optimizer=opt1, state={"epoch": 2, "rng": rng1})

    fresh = model(99)  # other weights, other dropout generator
    opt2 = bp.Adam(fresh, lr=0.5, betas=(0.5, 0.5))  # other settings: the file's come back
    assert not identical(everything(fresh), everything(first))
    state = bp.load(fresh, path, optimizer=opt2)
    assert state["epoch"] == 2 and isinstance(state["rng"], np.random.Generator)
    assert (opt2.lr, opt2.beta1, opt2.beta2) == (1e-2, 0.9, 0.999)
    assert identical(everything(fresh, opt2), everything(first, opt1))
    bp.fit(fresh, X, y, epochs=2, batch_size=16, optimizer=opt2, rng=state["rng"], progress=False)

    assert identical(everything(fresh, opt2), everything(straight, opt))
    # and the comparison can fail: one more epoch moves everything
    bp.fit(fresh, X, y, epochs=1, batch_size=16, optimizer=opt2, rng=1, progress=False)
    assert not identical(everything(fresh, opt2), everything(straight, opt))


@pytest.mark.parametrize(
    "make",
    [
        lambda net: bp.SGD(net, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda net: bp.Adam(net, lr=1e-3, decoupled=True, weight_decay=1e-2),
    ],
    ids=["sgd", "adamw"],
)
def test_optimizer_state_and_settings_round_trip(tmp_path, make) -> None:
    X, y = data()
    net = model(0)
    opt = make(net)
    bp.fit(net, X, y, epochs=1, optimizer=opt, progress=False)
    path = bp.save(net, tmp_path / "o.npz", optimizer=opt)
    other = model(5)
    opt2 = make(other)
    opt2.lr = 123.0
    assert bp.load(other, path, optimizer=opt2) == {}
    assert opt2.lr == opt.lr and repr(opt2) == repr(opt)
    assert identical(everything(other, opt2), everything(net, opt))
    for p, q in zip(net.parameters(), other.parameters(), strict=True):
        assert opt.state[p].keys() == opt2.state[q].keys()
        assert type(opt.state[p].get("t")) is type(opt2.state[q].get("t"))


def test_graph_with_nested_model_keeps_buffer_and_generator_names(tmp_path) -> None:
    inner = model(0)
    g = bp.Graph()
    g.output(g.add(bp.Tanh(), g.add(inner, g.input("x"), name="body"), name="head"))
    X, _ = data(8)
    g.forward(x=X)  # moves the running statistics and the dropout generator
    path = bp.save(g, tmp_path / "g.npz")
    with np.load(path) as f:
        names = set(f.files)
        header = json.loads(f["__backprop__"].tobytes())
    assert {"body.0.W", "__buffer__/body.1.running_mean", "__buffer__/body.1.running_var"} <= names
    assert set(header["generators"]) == {"body.3.rng"}
    copy = model(3)
    h = bp.Graph()
    h.output(h.add(bp.Tanh(), h.add(copy, h.input("x"), name="body"), name="head"))
    bp.load(h, path)
    assert identical(everything(copy), everything(inner))


def test_parameters_only_files_leave_buffers_alone(tmp_path) -> None:
    net = model(0)
    net.forward(data(8)[0])
    path = bp.save(net, tmp_path / "p.npz")
    # rewrite the file without buffers (a checkpoint of the parameters alone)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files if not k.startswith("__buffer__/")}
    checkpoint_io.write_arrays(path, arrays)
    other = model(1)
    before = other[1].running_mean.copy()
    bp.load(other, path)
    np.testing.assert_array_equal(other[1].running_mean, before)


# ------------------------------------------------------------------ the file on disk


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_file_mode_follows_the_umask(tmp_path, mask: int) -> None:
    old = os.umask(mask)
    try:
        path = bp.save(model(), tmp_path / "m.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_a_save_leaves_one_file_and_np_load_reads_it(tmp_path) -> None:
    net = model()
    path = bp.save(net, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]
    with np.load(path, allow_pickle=False) as f:
        np.testing.assert_array_equal(f["0.W"], net[0].W.value)


def test_stale_temporary_files_are_removed_by_the_next_save_and_never_loaded(tmp_path) -> None:
    net = model()
    bp.save(net, tmp_path / "m.npz")
    dead = _dead_pid()
    stale = tmp_path / f".m.npz.{dead}.0123abcd{checkpoint_io.TEMP_SUFFIX}"
    stale.write_bytes((tmp_path / "m.npz").read_bytes())  # even a whole one is refused
    live = tmp_path / f".m.npz.{os.getppid()}.89abcdef{checkpoint_io.TEMP_SUFFIX}"
    live.write_bytes(b"a save under way in a live process")
    other = tmp_path / ".m.npz.notours.tmp"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="temporary file of a save that did not finish"):
        bp.load(net, stale)
    bp.save(net, tmp_path / "elsewhere.npz")  # any save into the folder cleans it
    assert not stale.exists() and live.exists() and other.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import backprop as bp

    rng = np.random.default_rng(0)
    lin = bp.Linear(1500, 1500, rng=rng)  # 18 MB of float64
    while True:
        bp.save(lin, sys.argv[1])
    """
)


def test_a_save_killed_mid_write_leaves_the_old_file_and_a_temporary_the_next_save_removes(
    tmp_path,
) -> None:
    target = tmp_path / "big.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    leftover: list[Path] = []
    for _ in range(10):  # a kill can miss the write window; try again
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(target)], env=env)
        try:
            leftover = _kill_while_writing(child, tmp_path)
        finally:
            child.kill()
            child.wait()
        if leftover:
            break
    assert leftover, "no save was caught in the middle of its write"
    lin = bp.Linear(1500, 1500, rng=np.random.default_rng(0))
    expected = lin.W.value.copy()
    lin.W.value = np.zeros_like(expected)
    with pytest.raises(ValueError, match="temporary file"):
        bp.load(lin, leftover[0])
    np.testing.assert_array_equal(lin.W.value, 0.0)
    if target.exists():  # an earlier save finished: it is whole
        bp.load(lin, target)
        np.testing.assert_array_equal(lin.W.value, expected)
    bp.save(lin, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npz"]


def _kill_while_writing(child: subprocess.Popen, folder: Path) -> list[Path]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        temps = [p for p in folder.iterdir() if p.name.endswith(checkpoint_io.TEMP_SUFFIX)]
        if temps and temps[0].stat().st_size > 0:
            child.send_signal(9)
            child.wait()
            return [p for p in folder.iterdir() if p.name.endswith(checkpoint_io.TEMP_SUFFIX)]
        time.sleep(0.0005)
    return []


# ------------------------------------------------------------------ bad files


def _seal(raw: bytes) -> bytes:
    """Bytes of a zip made into a valid checkpoint file (checksum and all)."""
    f = io.BytesIO(raw)
    checkpoint_io._seal(f)
    return f.getvalue()


def _npz(**arrays) -> bytes:
    f = io.BytesIO()
    np.savez(f, **arrays)
    return f.getvalue()


def _header(**extra) -> np.ndarray:
    meta = {"format": "backprop-checkpoint", "version": 1, "model": "Sequential", **extra}
    return np.frombuffer(json.dumps(meta).encode(), np.uint8)


def _bad_files(good: bytes, net: bp.Sequential) -> dict[str, tuple[bytes, str]]:
    arrays = {k: v for k, v in np.load(io.BytesIO(good)).items()}
    half = {**arrays, "0.W": arrays["0.W"].astype(np.float16)}
    nan = {**arrays, "4.b": np.array([0.0, np.nan, 0.0])}
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    return {
        "empty": (b"", "is empty"),
        "truncated": (good[: len(good) // 2], "not a backprop checkpoint, or is truncated"),
        "trailer cut": (good[:-1], "truncated"),
        "one bit flipped": (bytes(flipped), "is corrupt"),
        "text": (b"these are not the weights you are looking for\n", "not a backprop"),
        "plain npz": (_npz(**{"0.W": arrays["0.W"]}), "not a backprop checkpoint"),
        "png": (b"\x89PNG\r\n\x1a\n" + bytes(200), "not a backprop checkpoint"),
        "no header": (_seal(_npz(**{"0.W": arrays["0.W"]})), "has no backprop header"),
        "foreign header": (
            _seal(_npz(__backprop__=np.frombuffer(b'{"format": "x"}', np.uint8))),
            "not a backprop checkpoint",
        ),
        "future version": (_seal(_npz(__backprop__=_header(version=9))), "format version 9"),
        "float16": (_seal(_npz(**half)), r"0\.W: model \(16, 4\) float64, file \(16, 4\) float16"),
        "non-finite": (_seal(_npz(**nan)), r"non-finite values: 4\.b has 1"),
        "pickled object": (
            _seal(_npz(**arrays, extra=np.array([{"a": 1}], dtype=object))),
            "cannot be read as arrays",
        ),
    }


def test_every_bad_file_is_one_clear_error_naming_the_path_and_changes_nothing(tmp_path) -> None:
    X, y = data()
    net = model(0)
    opt = bp.Adam(net)
    bp.fit(net, X, y, epochs=1, optimizer=opt, progress=False)
    good = bp.save(net, tmp_path / "good.npz", optimizer=opt).read_bytes()
    victim = model(1)
    opt_v = bp.Adam(victim, lr=0.3)
    before = everything(victim, opt_v)
    for name, (content, words) in _bad_files(good, net).items():
        path = tmp_path / f"{name.replace(' ', '_')}.npz"
        path.write_bytes(content)
        with pytest.raises(ValueError) as info:
            bp.load(victim, path, optimizer=opt_v)
        message = str(info.value)
        assert str(path) in message, name
        assert re.search(words, message), f"{name}: {message}"
        assert identical(everything(victim, opt_v), before), name
        assert opt_v.lr == 0.3


def test_save_refuses_non_finite_values_and_writes_nothing(tmp_path) -> None:
    net = model()
    net[4].b.value = np.array([0.0, np.inf, 0.0])
    with pytest.raises(
        ValueError, match=r"parameter '4\.b' has 1 non-finite .* nothing was written"
    ):
        bp.save(net, tmp_path / "m.npz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["save", "load"])
def test_a_folder_path_is_refused(tmp_path, where: str) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder; give a file name"):
        getattr(bp, where)(model(), folder)
    assert list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_optimizer_mismatches_are_refused(tmp_path) -> None:
    net = model()
    adam = bp.Adam(net)
    adam.step({p: np.ones(p.shape) for p in net.parameters()})
    plain = bp.save(net, tmp_path / "plain.npz")
    with_adam = bp.save(net, tmp_path / "adam.npz", optimizer=adam)
    other = model(1)
    before = everything(other)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        bp.load(other, plain, optimizer=bp.Adam(other))
    with pytest.raises(ValueError, match="the state of a Adam, not of a SGD"):
        bp.load(other, with_adam, optimizer=bp.SGD(other, lr=0.1))
    assert identical(everything(other), before)
    with pytest.raises(ValueError, match="must update exactly the model's parameters"):
        bp.save(net, tmp_path / "x.npz", optimizer=bp.Adam(net.parameters()[:2]))
    with pytest.raises(TypeError, match="optimizer must be an Optimizer"):
        bp.save(net, tmp_path / "x.npz", optimizer="adam")


@pytest.mark.parametrize(
    "state, error, match",
    [
        ({"when": object()}, TypeError, r"state\['when'\] is a object"),
        ({"loss": float("nan")}, ValueError, "finite numbers"),
        ({1: 2}, TypeError, "key that is not a string"),
        ([1, 2], TypeError, "state must be a dict"),
        ({"big": list(range(300_000))}, ValueError, "over 1,048,576"),
    ],
)
def test_bad_training_state_is_refused(tmp_path, state, error, match) -> None:
    with pytest.raises(error, match=match):
        bp.save(model(), tmp_path / "m.npz", state=state)
    assert list(tmp_path.iterdir()) == []


def test_training_state_round_trips_with_generators_and_numpy_scalars(tmp_path) -> None:
    rng = np.random.default_rng(3)
    rng.random(5)
    state = {"epoch": np.int64(4), "loss": np.float32(0.5), "tags": ("a", None), "rng": rng}
    path = bp.save(model(), tmp_path / "m.npz", state=state)
    back = bp.load(model(), path)
    assert back["epoch"] == 4 and back["loss"] == 0.5 and back["tags"] == ["a", None]
    assert back["rng"].random() == rng.random()
