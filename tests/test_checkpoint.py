"""Checkpoints: exact round trips, and mismatches that name everything and change nothing."""

from __future__ import annotations

import numpy as np
import pytest

import backprop as bp


def chain(sizes: tuple[int, ...], seed: int = 0, dtype: type = np.float64) -> bp.Sequential:
    rng = np.random.default_rng(seed)
    layers: list[bp.Layer] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [bp.Linear(n_in, n_out, rng=rng, dtype=dtype), bp.ReLU()]
    return bp.Sequential(layers[:-1])


def graph(seed: int = 0) -> bp.Graph:
    rng = np.random.default_rng(seed)
    g = bp.Graph()
    x = g.input("x")
    a, b = g.add(bp.Branch(2), g.add(bp.Linear(3, 4, rng=rng), x, name="first"))
    m = g.add(bp.Merge(), g.add(bp.ReLU(), a), g.add(bp.Tanh(), b))
    g.output(g.add(bp.Linear(8, 2, rng=rng), m, name="head"))
    return g


def stored(data) -> list[str]:
    """The parameter entries of an opened checkpoint (not its header, buffers, optimizer)."""
    return sorted(name for name in data.files if not name.startswith("__"))


def values(model) -> dict[str, np.ndarray]:
    return {name: p.value.copy() for name, p in model.named_parameters().items()}


@pytest.mark.parametrize("make", [lambda s: chain((3, 5, 2), s), graph])
def test_round_trip_is_exact(tmp_path, make) -> None:
    source, target = make(0), make(1)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(values(source).values(), values(target).values(), strict=True)
    )
    path = bp.save(source, tmp_path / "model.npz")
    bp.load(target, path)
    saved = values(source)
    for name, value in values(target).items():
        assert value.dtype == saved[name].dtype
        np.testing.assert_array_equal(value, saved[name])
    # the file is plain numpy, keyed by named_parameters()
    with np.load(path) as data:
        assert stored(data) == sorted(source.named_parameters())
        np.testing.assert_array_equal(data[next(iter(saved))], next(iter(saved.values())))


def test_graph_keys_are_node_names(tmp_path) -> None:
    path = bp.save(graph(), tmp_path / "g.npz")
    with np.load(path) as data:
        assert stored(data) == ["first.W", "first.b", "head.W", "head.b"]


def test_npz_suffix_is_added_and_found(tmp_path) -> None:
    net = chain((2, 2))
    path = bp.save(net, tmp_path / "weights")
    assert path == tmp_path / "weights.npz" and path.exists()
    other = chain((2, 2), seed=5)
    bp.load(other, tmp_path / "weights")
    np.testing.assert_array_equal(other[0].W.value, net[0].W.value)
    assert [p.name for p in tmp_path.iterdir()] == ["weights.npz"]  # no temporary left over


def test_tied_parameter_is_stored_once_and_stays_tied(tmp_path) -> None:
    rng = np.random.default_rng(0)
    first = bp.Linear(3, 3, rng=rng)
    net = bp.Sequential([first, bp.Tanh(), bp.Linear(3, 3, W=first.W, b=first.b)])
    path = bp.save(net, tmp_path / "tied.npz")
    with np.load(path) as data:
        assert stored(data) == ["0.W", "0.b"]
    first.W.value = np.zeros((3, 3))
    bp.load(net, path)
    assert net[2].W is net[0].W
    assert not np.array_equal(net[2].W.value, np.zeros((3, 3)))


def test_float64_file_loads_into_float32_model(tmp_path) -> None:
    path = bp.save(chain((2, 3)), tmp_path / "w.npz")
    small = chain((2, 3), seed=3, dtype=np.float32)
    bp.load(small, path)
    assert small[0].W.value.dtype == np.float32
    np.testing.assert_array_equal(small[0].W.value, chain((2, 3))[0].W.value.astype(np.float32))


def test_mismatch_lists_names_and_shapes_and_changes_nothing(tmp_path) -> None:
    path = bp.save(chain((3, 5, 2)), tmp_path / "small.npz")
    other = chain((3, 4, 2, 2), seed=1)  # 0.W (4, 3), 0.b (4,), 2.W (2, 4), 2.b, 4.W, 4.b
    before = values(other)
    with pytest.raises(ValueError) as info:
        bp.load(other, path)
    message = str(info.value)
    assert "does not fit this Sequential" in message
    assert "missing from the file: 4.W (2, 2) float64" in message
    assert "missing from the file: 4.b (2,) float64" in message
    assert "different shape or dtype: 0.W: model (4, 3) float64, file (5, 3) float64" in message
    assert "different shape or dtype: 0.b: model (4,) float64, file (5,) float64" in message
    assert "different shape or dtype: 2.W: model (2, 4) float64, file (2, 5) float64" in message
    assert "2.b" not in message  # (2,) in both: it fits
    assert message.endswith("no parameter was changed")
    for name, value in values(other).items():
        np.testing.assert_array_equal(value, before[name])


def test_unexpected_names_are_listed(tmp_path) -> None:
    path = bp.save(chain((3, 5, 2)), tmp_path / "big.npz")
    one = chain((3, 5), seed=2)
    before = values(one)
    with pytest.raises(ValueError, match=r"unexpected in the file: 2\.W \(2, 5\) float64"):
        bp.load(one, path)
    for name, value in values(one).items():
        np.testing.assert_array_equal(value, before[name])


def test_sequential_file_does_not_fit_a_graph(tmp_path) -> None:
    path = bp.save(chain((3, 4)), tmp_path / "seq.npz")
    g = graph()
    before = values(g)
    with pytest.raises(ValueError, match=r"does not fit this Graph(.|\n)*first\.W \(4, 3\)"):
        bp.load(g, path)
    for name, value in values(g).items():
        np.testing.assert_array_equal(value, before[name])


def test_single_layer_and_bad_model(tmp_path) -> None:
    lin = bp.Linear(2, 2, W=np.eye(2), b=np.ones(2))
    path = bp.save(lin, tmp_path / "layer.npz")
    with np.load(path) as data:
        assert stored(data) == ["W", "b"]
    with pytest.raises(TypeError, match="named_parameters"):
        bp.save(object(), tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bp.save(lin, tmp_path / "missing" / "x.npz")
