"""Checkpoints: a model's parameters in a ``.npz`` file, keyed by their names.

``save(model, path)`` writes one array per entry of ``model.named_parameters()``
(``"0.W"``, ``"0.b"``, ... for a Sequential; the node names for a Graph; the
parameter names for a single layer). A tied Parameter is stored once, under the
first name it has. ``load(model, path)`` puts the arrays back into the same
Parameter objects, so a tie survives the round trip.

Loading is all or nothing: when the file does not fit the model (a name
missing or unexpected, a shape or dtype that differs) it raises a
``ValueError`` listing every difference with its shapes, and no parameter is
changed. The file is plain numpy: ``np.load(path)`` reads it too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from backprop.layer import Layer, Parameter

__all__ = ["load", "save"]


def _named(model: Any, where: str) -> dict[str, Parameter]:
    if isinstance(model, Layer):
        return dict(model.params)
    if hasattr(model, "named_parameters"):
        return dict(model.named_parameters())
    raise TypeError(
        f"{where}: expected a Layer, a Sequential or a Graph (anything with "
        f"named_parameters()), got {type(model).__name__}"
    )


def _npz_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p if p.suffix == ".npz" else p.with_name(p.name + ".npz")


def save(model: Any, path: str | os.PathLike[str]) -> Path:
    """Write the parameters of ``model`` to ``path`` (``.npz`` is added if missing).

    The file is written next to its destination and renamed into place, so an
    interrupted save never leaves a truncated checkpoint. Returns the path written.
    """
    named = _named(model, "save")
    target = _npz_path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"save: the folder {str(target.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, allow_pickle=False, **{name: p.value for name, p in named.items()})
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _describe(value: Any) -> str:
    return f"{tuple(value.shape)} {value.dtype.name}"


def load(model: Any, path: str | os.PathLike[str]) -> None:
    """Set the parameters of ``model`` from the checkpoint at ``path``.

    Raises ``ValueError`` (and changes nothing) unless the file holds exactly the
    model's parameter names, each with the parameter's shape. A float64 array
    loads into a float32 parameter and back (the values are converted), and any
    other dtype is an error.
    """
    named = _named(model, "load")
    source = Path(path)
    if not source.exists() and _npz_path(path).exists():
        source = _npz_path(path)
    with np.load(source, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    missing = [n for n in named if n not in arrays]
    unexpected = [n for n in arrays if n not in named]
    mismatched = []
    for name, p in named.items():
        a = arrays.get(name)
        if a is None:
            continue
        if a.shape != p.shape or not np.issubdtype(a.dtype, np.floating):
            mismatched.append(f"{name}: model {_describe(p.value)}, file {_describe(a)}")
    if missing or unexpected or mismatched:
        lines = [f"load: the checkpoint {str(source)!r} does not fit this {type(model).__name__}"]
        lines += [f"  missing from the file: {n} {_describe(named[n].value)}" for n in missing]
        lines += [f"  unexpected in the file: {n} {_describe(arrays[n])}" for n in unexpected]
        lines += [f"  different shape or dtype: {m}" for m in mismatched]
        lines.append("no parameter was changed")
        raise ValueError("\n".join(lines))
    for name, p in named.items():
        p.value = arrays[name].astype(p.dtype, copy=False)
