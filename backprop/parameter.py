"""Parameters, and the arrays a layer may keep: float, and owned.

- ``Parameter``: a free parameter θ (chapter 14.1), a read-only array that
  learning replaces;
- ``check_float``: data as a float array of the layer's dtype, or a clear error;
- ``_owned``: an array that nobody else can change, copied only when someone could.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FLOAT_DTYPES", "Parameter", "check_float"]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Parameter:
    """A free parameter θ (chapter 14.1): an array set by learning.

    ``value`` may be replaced by an array of the same shape and dtype (the
    optimizers do this). It is read-only: an operating point cached by
    ``forward`` refers to it, so an in-place edit would silently change the
    point that ``backward`` differentiates at. Assign a new array instead
    (``p.value = p.value * 0.5``); the Parameter keeps its own copy. Passing one
    Parameter to several layers ties them (chapter 14.8): their gradients add up.
    """

    def __init__(self, value: Any, name: str | None = None) -> None:
        array = np.array(value, copy=True)
        if array.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"Parameter{f' {name!r}' if name else ''}: value has dtype {array.dtype}; "
                f"parameters are float32 or float64 (use np.asarray(value, dtype=np.float64))"
            )
        array.flags.writeable = False
        self._value = array
        self.name = name
        self._placed = False  # True while ``name`` is the place a model gave it

    def _set_place(self, name: str) -> None:
        """Name the Parameter by its place in a model (``"0.W"``), unless its user
        named it. The outermost model, whose ``output()`` runs last, names it last."""
        if self.name is None or self._placed:
            self.name = name
            self._placed = True

    @property
    def value(self) -> np.ndarray:
        return self._value

    @value.setter
    def value(self, new: Any) -> None:
        new = np.asarray(new)
        if new.shape != self._value.shape:
            raise ValueError(
                f"{self!r}: new value has shape {new.shape}, expected {self._value.shape}"
            )
        if new.dtype != self._value.dtype:
            raise TypeError(
                f"{self!r}: new value has dtype {new.dtype}, expected {self._value.dtype}"
            )
        self._value = _owned(new)

    def _assign(self, new: np.ndarray) -> None:
        """Take ``new`` (checked by the caller) as the value, without a copy.

        For an optimizer's freshly computed array, which nobody else holds: it is
        only marked read-only. Any other array is copied, as by the setter.
        """
        if new.base is None:  # it owns its memory, and nobody else holds it
            new.setflags(write=False)
            self._value = new
        else:
            self._value = _owned(new)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._value.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._value.dtype

    @property
    def size(self) -> int:
        return int(self._value.size)

    def __repr__(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return f"Parameter{name} {self.shape} {self.dtype.name}"


def check_float(where: str, what: str, x: Any, dtype: np.dtype[Any] | None = None) -> np.ndarray:
    """``x`` as a float array, or a clear ``TypeError`` naming ``where`` and ``what``."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype not in FLOAT_DTYPES:
        kind = "integer" if np.issubdtype(x.dtype, np.integer) else "non-float"
        raise TypeError(
            f"{where}: {what} has {kind} dtype {x.dtype} (shape {x.shape}); layers take "
            f"float32 or float64 data: convert with x.astype(np.float64)"
        )
    if dtype is not None and x.dtype != dtype:
        raise TypeError(
            f"{where}: {what} is {x.dtype.name} but the layer works in {dtype.name}; a layer "
            f"never changes the dtype of its data: convert with x.astype(np.{dtype.name})"
        )
    return x


def _owned(x: np.ndarray) -> np.ndarray:
    """A read-only array whose contents nobody else can change.

    ``x`` itself when it is read-only and so is every array it views; otherwise
    a read-only copy (a read-only view of a writeable array can still change).
    """
    if x.flags.writeable or (x.base is not None and _views_writeable(x)):
        x = x.copy()
        # setflags costs about half of assigning x.flags.writeable, on every step's path.
        x.setflags(write=False)
    return x


def _views_writeable(x: np.ndarray) -> bool:
    """True if ``x`` is a view into memory that some array may still write."""
    base: Any = x.base
    while base is not None:
        flags = getattr(base, "flags", None)
        if flags is None:  # a buffer that is not an array (bytes, memoryview, mmap)
            try:
                return not memoryview(base).readonly
            except TypeError:  # not a buffer numpy could have read: assume writeable
                return True
        if flags.writeable:
            return True
        base = base.base
    return False
