"""Tests for backprop.datasets: the shipped digits, the toy problems and the split."""

from __future__ import annotations

import hashlib
import math
from importlib import resources

import numpy as np
import pytest

from backprop.datasets import (
    load_digits,
    load_digits_images,
    make_moons,
    make_spirals,
    train_test_split,
)

# Counts per class 0..9 of scikit-learn's load_digits(), checked against it when the
# file was made (see backprop/data/README.md).
DIGITS_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
DIGITS_IMAGES_SHA256 = "8f26b2bd9d135c256808f68f14fdabddde6d9c7f869ae419704b051f0f14b3b3"
DIGITS_TARGET_SHA256 = "8ba4f891220f5e4c9c819638d1602d74b83618f167043c6da52a2a247841ddf0"

FLOAT_DTYPES = [np.float64, np.float32]


# ---------------------------------------------------------------- digits


def test_digits_data_files_are_package_resources() -> None:
    data = resources.files("backprop") / "data"
    assert (data / "digits.npz").is_file()
    assert (data / "README.md").is_file()


def test_digits_shapes_dtypes_and_range() -> None:
    X, y = load_digits()
    assert X.shape == (1797, 64)
    assert y.shape == (1797,)
    assert X.dtype == np.float64
    assert y.dtype == np.int64
    assert X.min() == 0.0
    assert X.max() == 1.0
    # Raw counts 0..16 divided by 16: 16 X is integral.
    np.testing.assert_array_equal(16 * X, np.round(16 * X))


def test_digits_class_counts() -> None:
    _, y = load_digits()
    assert np.bincount(y).tolist() == DIGITS_CLASS_COUNTS
    assert y.min() == 0
    assert y.max() == 9
    # scikit-learn's order starts 0, 1, ..., 9, 0, 1, ...
    assert y[:10].tolist() == list(range(10))


def test_digits_content_matches_checksums() -> None:
    images, y = load_digits_images()
    raw_images = np.rint(16 * images).astype(np.uint8)
    assert hashlib.sha256(raw_images.tobytes()).hexdigest() == DIGITS_IMAGES_SHA256
    assert hashlib.sha256(y.astype(np.uint8).tobytes()).hexdigest() == DIGITS_TARGET_SHA256


def test_digits_images_are_the_flat_rows_reshaped() -> None:
    images, y_images = load_digits_images()
    X, y = load_digits()
    assert images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(images.reshape(1797, 64), X)
    np.testing.assert_array_equal(y_images, y)
    # A zero of the 8x8 grid: the left and right columns are mostly empty.
    zero = images[0]
    assert zero[:, 0].sum() == 0.0
    assert zero[2:6, 3:5].max() < zero.max()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_digits_dtype(dtype: type[np.floating]) -> None:
    X, y = load_digits(dtype=dtype)
    images, _ = load_digits_images(dtype=dtype)
    assert X.dtype == dtype
    assert images.dtype == dtype
    assert y.dtype == np.int64
    np.testing.assert_array_equal(X, load_digits()[0].astype(dtype))


def test_digits_returns_fresh_arrays() -> None:
    X, y = load_digits()
    X[:] = -1.0
    y[:] = -1
    X_again, y_again = load_digits()
    assert X_again.min() == 0.0
    assert y_again.min() == 0


@pytest.mark.parametrize("loader", [load_digits, load_digits_images])
@pytest.mark.parametrize("dtype", [np.int64, np.uint8, bool])
def test_digits_rejects_non_float_dtype(loader, dtype) -> None:
    with pytest.raises(ValueError, match="floating"):
        loader(dtype=dtype)


# ---------------------------------------------------------------- toy problems

TOY_PROBLEMS = {
    # name: (function, kwargs, expected N, expected class counts)
    "spirals": (make_spirals, {"n_per_class": 50, "n_classes": 4}, 200, [50, 50, 50, 50]),
    "spirals-default": (make_spirals, {}, 300, [100, 100, 100]),
    "moons": (make_moons, {"n": 101}, 101, [50, 51]),
    "moons-default": (make_moons, {}, 200, [100, 100]),
}


@pytest.mark.parametrize("name", TOY_PROBLEMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_toy_shapes_dtypes_and_classes(name: str, dtype: type[np.floating]) -> None:
    make, kwargs, n, counts = TOY_PROBLEMS[name]
    X, y = make(**kwargs, rng=0, dtype=dtype)
    assert X.shape == (n, 2)
    assert y.shape == (n,)
    assert X.dtype == dtype
    assert y.dtype == np.int64
    assert np.all(np.isfinite(X))
    assert np.bincount(y).tolist() == counts
    # Grouped by class, class 0 first.
    assert np.all(np.diff(y) >= 0)


@pytest.mark.parametrize("name", TOY_PROBLEMS)
def test_toy_seed_determinism(name: str) -> None:
    make, kwargs, _, _ = TOY_PROBLEMS[name]
    X1, y1 = make(**kwargs, rng=123)
    X2, y2 = make(**kwargs, rng=123)
    X3, _ = make(**kwargs, rng=124)
    X4, _ = make(**kwargs, rng=np.random.default_rng(123))
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(X1, X4)
    assert not np.allclose(X1, X3)


def test_spirals_without_noise_follow_the_formula() -> None:
    X, y = make_spirals(n_per_class=7, n_classes=3, noise=0.0, rng=0)
    r = np.tile(np.linspace(0.0, 1.0, 7), 3)
    t = 4.0 * y + 4.0 * r
    np.testing.assert_allclose(X, np.stack([r * np.sin(t), r * np.cos(t)], axis=1))
    np.testing.assert_allclose(np.hypot(X[:, 0], X[:, 1]), r)
    # Noise only moves points along their circle: radii stay the same.
    X_noisy, _ = make_spirals(n_per_class=7, n_classes=3, noise=0.5, rng=0)
    np.testing.assert_allclose(np.hypot(X_noisy[:, 0], X_noisy[:, 1]), r)
    assert not np.allclose(X_noisy, X)


def test_moons_without_noise_lie_on_their_circles() -> None:
    X, y = make_moons(n=40, noise=0.0, rng=0)
    upper, lower = X[y == 0], X[y == 1]
    np.testing.assert_allclose(np.hypot(upper[:, 0], upper[:, 1]), 1.0)
    np.testing.assert_allclose(np.hypot(lower[:, 0] - 1.0, lower[:, 1] - 0.5), 1.0)
    assert upper[:, 1].min() >= 0.0
    assert lower[:, 1].max() <= 0.5 + 1e-12
    # The moons interleave: each one's tip reaches into the other's bowl.
    assert upper[:, 0].max() > lower[:, 0].min()


def test_moons_noise_has_the_requested_scale() -> None:
    X0, _ = make_moons(n=20_000, noise=0.0, rng=0)
    X, _ = make_moons(n=20_000, noise=0.3, rng=0)
    assert np.std(X - X0) == pytest.approx(0.3, rel=0.02)


BAD_TOY_ARGUMENTS = [
    (make_spirals, {"n_classes": 1}, ValueError, "n_classes must be >= 2"),
    (make_spirals, {"n_classes": 0}, ValueError, "n_classes"),
    (make_spirals, {"n_per_class": 0}, ValueError, "n_per_class must be >= 1"),
    (make_spirals, {"n_per_class": 2.5}, TypeError, "n_per_class must be an integer"),
    (make_spirals, {"n_classes": True}, TypeError, "n_classes must be an integer"),
    (make_spirals, {"noise": -0.1}, ValueError, "noise"),
    (make_spirals, {"noise": math.nan}, ValueError, "noise"),
    (make_spirals, {"dtype": np.int32}, ValueError, "floating"),
    (make_moons, {"n": 1}, ValueError, "n must be >= 2"),
    (make_moons, {"n": 10.0}, TypeError, "n must be an integer"),
    (make_moons, {"noise": -1.0}, ValueError, "noise"),
    (make_moons, {"noise": math.inf}, ValueError, "noise"),
    (make_moons, {"dtype": np.int64}, ValueError, "floating"),
]


@pytest.mark.parametrize(("make", "kwargs", "error", "message"), BAD_TOY_ARGUMENTS)
def test_toy_bad_arguments(make, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        make(**kwargs)


def test_numpy_integers_are_accepted() -> None:
    X, y = make_spirals(n_per_class=np.int64(5), n_classes=np.int32(2), rng=0)
    assert X.shape == (10, 2)
    assert np.bincount(y).tolist() == [5, 5]


# ---------------------------------------------------------------- train_test_split


def _indexed_data(n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """X whose row i is (i, -i, 2 i) as float32, y = i as int64, so rows can be traced."""
    i = np.arange(n)
    return np.stack([i, -i, 2 * i], axis=1).astype(np.float32), i.astype(np.int64)


def test_split_sizes_dtypes_and_pairing() -> None:
    X, y = _indexed_data(100)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_fraction=0.25, rng=0)
    assert X_train.shape == (75, 3)
    assert X_test.shape == (25, 3)
    assert y_train.shape == (75,)
    assert y_test.shape == (25,)
    assert X_train.dtype == np.float32
    assert y_train.dtype == np.int64
    # Every example lands in exactly one set, with its own target.
    np.testing.assert_array_equal(np.sort(np.concatenate([y_train, y_test])), y)
    np.testing.assert_array_equal(X_train[:, 0], y_train)
    np.testing.assert_array_equal(X_test[:, 0], y_test)
    # And the order is shuffled, not a plain cut.
    assert not np.array_equal(y_test, np.arange(75, 100))


@pytest.mark.parametrize(("n", "fraction", "n_test"), [(100, 0.25, 25), (10, 0.25, 3), (7, 0.5, 4)])
def test_split_test_size_is_ceil(n: int, fraction: float, n_test: int) -> None:
    X, y = _indexed_data(n)
    _, X_test, _, y_test = train_test_split(X, y, test_fraction=fraction)
    assert len(X_test) == len(y_test) == n_test


def test_split_determinism_and_seeds() -> None:
    X, y = _indexed_data(100)
    a = train_test_split(X, y, rng=7)
    b = train_test_split(X, y, rng=7)
    c = train_test_split(X, y, rng=8)
    d = train_test_split(X, y, rng=np.random.default_rng(7))
    for part_a, part_b, part_d in zip(a, b, d, strict=True):
        np.testing.assert_array_equal(part_a, part_b)
        np.testing.assert_array_equal(part_a, part_d)
    assert not np.array_equal(a[3], c[3])
    # The default seed is fixed too.
    np.testing.assert_array_equal(train_test_split(X, y)[3], train_test_split(X, y, rng=0)[3])


def test_split_returns_copies_and_leaves_inputs_alone() -> None:
    X, y = _indexed_data(20)
    X_before, y_before = X.copy(), y.copy()
    X_train, _, y_train, _ = train_test_split(X, y)
    X_train[:] = -5.0
    y_train[:] = -5
    np.testing.assert_array_equal(X, X_before)
    np.testing.assert_array_equal(y, y_before)


def test_split_keeps_extra_axes() -> None:
    images, y = load_digits_images()
    X_train, X_test, y_train, y_test = train_test_split(images, y, test_fraction=0.2, rng=1)
    assert X_train.shape == (1437, 8, 8)
    assert X_test.shape == (360, 8, 8)
    assert len(y_train) + len(y_test) == 1797


def test_split_rejects_mismatched_lengths() -> None:
    X, _ = _indexed_data(10)
    y = np.zeros(9, dtype=np.int64)
    with pytest.raises(ValueError, match=r"X\.shape=\(10, 3\).*y\.shape=\(9,\)"):
        train_test_split(X, y)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.25, 1.5, math.nan])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    X, y = _indexed_data(10)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        train_test_split(X, y, test_fraction=fraction)


def test_split_rejects_a_split_that_leaves_no_training_data() -> None:
    X, y = _indexed_data(1)
    with pytest.raises(ValueError, match="no training example"):
        train_test_split(X, y, test_fraction=0.5)
