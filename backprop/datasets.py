"""Small datasets for examples, tests and notebooks: real digits and toy 2-D problems.

Every loader returns ``(X, y)``: ``X`` of shape ``(N, *features)`` in a floating dtype
(float64 unless asked), batch on axis 0 as everywhere in ``backprop``, and ``y`` of
shape ``(N,)`` holding int64 class labels ``0 .. n_classes - 1``.

- :func:`load_digits`, :func:`load_digits_images`: the 1,797 real 8×8 handwritten
  digits shipped in ``backprop/data/digits.npz`` (see ``backprop/data/README.md``).
- :func:`make_spirals`, :func:`make_moons`: seeded toy problems a linear model
  cannot separate.
- :func:`make_adding`: the adding problem, a seeded sequence task that needs memory
  (its ``y`` is a real number per sequence, ``(N, 1)``, not a label).
- :func:`train_test_split`: a seeded shuffle and split.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any, TypeAlias, TypeVar

import numpy as np
from numpy.typing import DTypeLike, NDArray

__all__ = [
    "load_digits",
    "load_digits_images",
    "make_adding",
    "make_moons",
    "make_spirals",
    "train_test_split",
]

RngLike: TypeAlias = int | np.random.Generator | np.random.SeedSequence | None
"""Anything :func:`numpy.random.default_rng` accepts: a seed, a Generator, or None."""

_FloatArray = NDArray[np.floating[Any]]
_ScalarT = TypeVar("_ScalarT", bound=np.generic)
_LabelT = TypeVar("_LabelT", bound=np.generic)

_DIGITS_MAX = 16  # pixel values of the digits are counts 0..16


# ---------------------------------------------------------------- argument checks


def _float_dtype(dtype: DTypeLike) -> np.dtype[Any]:
    dt = np.dtype(dtype)
    if not np.issubdtype(dt, np.floating):
        raise ValueError(f"dtype must be a floating type such as np.float64, got {dt}")
    return dt


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_noise(noise: float) -> float:
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    return float(noise)


# ---------------------------------------------------------------- digits


def _read_digits() -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """The raw arrays of ``digits.npz``: images (1797, 8, 8) and target (1797,), uint8."""
    ref = resources.files("backprop") / "data" / "digits.npz"
    with ref.open("rb") as f, np.load(f) as data:
        return data["images"], data["target"]


def load_digits_images(
    dtype: DTypeLike = np.float64,
) -> tuple[_FloatArray, NDArray[np.int64]]:
    """The 8×8 handwritten digits as images.

    Parameters
    ----------
    dtype : floating dtype, default ``np.float64``
        dtype of the returned images.

    Returns
    -------
    images : ndarray, shape (1797, 8, 8)
        Pixel intensities scaled to [0, 1]: the raw counts 0..16 divided by 16.
    y : ndarray of int64, shape (1797,)
        The digit shown, 0..9; 174 to 183 examples per class.

    Notes
    -----
    The test set of the UCI "Optical Recognition of Handwritten Digits" data
    (E. Alpaydin and C. Kaynak, 1998; CC BY 4.0) as bundled by scikit-learn, in
    scikit-learn's order. See ``backprop/data/README.md``.
    """
    dt = _float_dtype(dtype)
    images, target = _read_digits()
    return images.astype(dt) / dt.type(_DIGITS_MAX), target.astype(np.int64)


def load_digits(dtype: DTypeLike = np.float64) -> tuple[_FloatArray, NDArray[np.int64]]:
    """The 8×8 handwritten digits, flattened for a fully connected network.

    Parameters
    ----------
    dtype : floating dtype, default ``np.float64``
        dtype of the returned features.

    Returns
    -------
    X : ndarray, shape (1797, 64)
        Each row is one image read row by row, scaled to [0, 1] (raw counts / 16).
    y : ndarray of int64, shape (1797,)
        The digit shown, 0..9; 174 to 183 examples per class.

    See Also
    --------
    load_digits_images : the same data with shape (1797, 8, 8).

    Examples
    --------
    >>> X, y = load_digits()
    >>> X.shape, y.shape
    ((1797, 64), (1797,))
    """
    images, y = load_digits_images(dtype)
    return images.reshape(images.shape[0], -1), y


# ---------------------------------------------------------------- toy problems


def make_spirals(
    n_per_class: int = 100,
    n_classes: int = 3,
    noise: float = 0.2,
    rng: RngLike = None,
    dtype: DTypeLike = np.float64,
) -> tuple[_FloatArray, NDArray[np.int64]]:
    """Interleaved spiral arms, one per class (the classic cs231n toy problem).

    Arm ``j`` has points at radius ``r`` evenly spaced in [0, 1] and angle
    ``t = 4 j + 4 r + noise · ε`` with ``ε ~ N(0, 1)``; the point is
    ``(r sin t, r cos t)``.

    Parameters
    ----------
    n_per_class : int, default 100
        Points per arm (>= 1).
    n_classes : int, default 3
        Number of arms, i.e. classes (>= 2).
    noise : float, default 0.2
        Standard deviation of the Gaussian noise added to the angle (>= 0).
    rng : int, Generator, SeedSequence or None
        Seed or generator, passed to :func:`numpy.random.default_rng`.
    dtype : floating dtype, default ``np.float64``
        dtype of ``X``.

    Returns
    -------
    X : ndarray, shape (n_per_class * n_classes, 2)
        The points, grouped by class (class 0 first), inside the unit disc up to noise.
    y : ndarray of int64, shape (n_per_class * n_classes,)
        The arm each point belongs to, ``0 .. n_classes - 1``.
    """
    n = _check_int("n_per_class", n_per_class, 1)
    k = _check_int("n_classes", n_classes, 2)
    sigma = _check_noise(noise)
    dt = _float_dtype(dtype)
    gen = np.random.default_rng(rng)

    radius = np.tile(np.linspace(0.0, 1.0, n), k)  # (k n,)
    y = np.repeat(np.arange(k, dtype=np.int64), n)  # (k n,)
    angle = 4.0 * y + 4.0 * radius + sigma * gen.standard_normal(k * n)
    X = np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1)
    return X.astype(dt), y


def make_moons(
    n: int = 200,
    noise: float = 0.1,
    rng: RngLike = None,
    dtype: DTypeLike = np.float64,
) -> tuple[_FloatArray, NDArray[np.int64]]:
    """Two interleaved half circles.

    Class 0 is the upper half of the unit circle centred at (0, 0); class 1 is the
    lower half of the unit circle centred at (1, 0.5). Gaussian noise is added to
    both coordinates.

    Parameters
    ----------
    n : int, default 200
        Total number of points (>= 2); class 0 gets ``n // 2``, class 1 the rest.
    noise : float, default 0.1
        Standard deviation of the Gaussian noise added to each coordinate (>= 0).
    rng : int, Generator, SeedSequence or None
        Seed or generator, passed to :func:`numpy.random.default_rng`.
    dtype : floating dtype, default ``np.float64``
        dtype of ``X``.

    Returns
    -------
    X : ndarray, shape (n, 2)
        The points, grouped by class (class 0 first).
    y : ndarray of int64, shape (n,)
        The moon each point belongs to, 0 or 1.
    """
    total = _check_int("n", n, 2)
    sigma = _check_noise(noise)
    dt = _float_dtype(dtype)
    gen = np.random.default_rng(rng)

    n_upper = total // 2
    n_lower = total - n_upper
    t_upper = np.linspace(0.0, np.pi, n_upper)
    t_lower = np.linspace(0.0, np.pi, n_lower)
    upper = np.stack([np.cos(t_upper), np.sin(t_upper)], axis=1)
    lower = np.stack([1.0 - np.cos(t_lower), 0.5 - np.sin(t_lower)], axis=1)
    X = np.concatenate([upper, lower]) + sigma * gen.standard_normal((total, 2))
    y = np.repeat(np.array([0, 1], dtype=np.int64), [n_upper, n_lower])
    return X.astype(dt), y


def make_adding(
    n: int = 1000, T: int = 20, rng: RngLike = None, dtype: DTypeLike = np.float64
) -> tuple[_FloatArray, _FloatArray]:
    """The adding problem (Hochreiter and Schmidhuber's LSTM paper): a sum to remember.

    Each sequence has ``T`` steps of two numbers: a value drawn uniformly from
    ``[0, 1)`` and a marker, 1 at exactly two steps (one in the first half of the
    sequence, one in the second) and 0 elsewhere. The target is the sum of the two
    marked values. A model must carry the first marked value across up to ``T − 1``
    steps: predicting the mean, 1, leaves a mean squared error of 1/6.

    Parameters
    ----------
    n : int, default 1000
        Number of sequences (>= 1).
    T : int, default 20
        Steps per sequence (>= 2).
    rng : int, Generator, SeedSequence or None
        Seed or generator, passed to :func:`numpy.random.default_rng`.
    dtype : floating dtype, default ``np.float64``
        dtype of ``X`` and ``y``.

    Returns
    -------
    X : ndarray, shape (n, T, 2)
        The sequences: ``X[:, t, 0]`` the values, ``X[:, t, 1]`` the markers.
    y : ndarray, shape (n, 1)
        The sums of the two marked values, in ``[0, 2)``.
    """
    count = _check_int("n", n, 1)
    steps = _check_int("T", T, 2)
    dt = _float_dtype(dtype)
    gen = np.random.default_rng(rng)

    values = gen.random((count, steps))
    half = steps // 2
    first = gen.integers(0, half, size=count)
    second = gen.integers(half, steps, size=count)
    rows = np.arange(count)
    markers = np.zeros((count, steps))
    markers[rows, first] = markers[rows, second] = 1.0
    y = values[rows, first] + values[rows, second]
    return np.stack([values, markers], axis=2).astype(dt), y[:, None].astype(dt)


# ---------------------------------------------------------------- splitting


def train_test_split(
    X: NDArray[_ScalarT],
    y: NDArray[_LabelT],
    test_fraction: float = 0.25,
    rng: RngLike = 0,
) -> tuple[NDArray[_ScalarT], NDArray[_ScalarT], NDArray[_LabelT], NDArray[_LabelT]]:
    """Shuffle the examples with a seeded generator and split them in two.

    Parameters
    ----------
    X : ndarray, shape (N, ...)
        Examples, batch on axis 0.
    y : ndarray, shape (N, ...)
        Targets, one per example.
    test_fraction : float, default 0.25
        Share of the examples put in the test set, in (0, 1). The test set gets
        ``ceil(test_fraction * N)`` examples; both sets must end up non-empty.
    rng : int, Generator, SeedSequence or None, default 0
        Seed or generator for the shuffle, passed to :func:`numpy.random.default_rng`;
        the same seed gives the same split. Not stratified.

    Returns
    -------
    X_train : ndarray, shape (N - N_test, ...)
    X_test : ndarray, shape (N_test, ...)
    y_train : ndarray, shape (N - N_test, ...)
    y_test : ndarray, shape (N_test, ...)
        New arrays (copies), in the shuffled order, dtypes unchanged.
    """
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim == 0 or y.ndim == 0 or X.shape[0] != y.shape[0]:
        raise ValueError(
            "X and y must have the same number of examples on axis 0, "
            f"got X.shape={X.shape} and y.shape={y.shape}"
        )
    if not (0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    n = X.shape[0]
    n_test = math.ceil(test_fraction * n)
    if n_test >= n:
        raise ValueError(
            f"test_fraction={test_fraction} of {n} examples leaves no training example"
        )
    order = np.random.default_rng(rng).permutation(n)
    test, train = order[:n_test], order[n_test:]
    return X[train], X[test], y[train], y[test]
