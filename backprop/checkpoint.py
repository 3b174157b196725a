"""Checkpoints: a model, its optimizer and a little training state in one ``.npz``.

``save(model, path, *, optimizer=None, state=None)`` writes:

- one array per entry of ``model.named_parameters()`` (``"0.W"``, ``"0.b"``, ...
  for a Sequential; the node names for a Graph; the parameter names for a single
  layer), under that name; a tied Parameter is stored once, under its first name;
- the buffers of the layers that have them (BatchNorm's ``running_mean`` and
  ``running_var``) and the state of every random generator a layer owns
  (Dropout's), so that training resumes exactly where it stopped;
- with ``optimizer``, its settings and its per-Parameter state (Adam's moments
  and step count, a velocity), keyed by the parameter names;
- with ``state``, a small dict of training state: numbers, strings, lists and
  dicts of them, and ``numpy.random.Generator`` objects (stored as their
  bit generator's state), such as ``{"epoch": 2, "rng": rng}``.

``load(model, path, *, optimizer=None)`` puts all of it back into the same
objects (a tie survives the round trip) and returns the training state, its
generators rebuilt (``{}`` when none was saved). Loading is all or nothing:
the whole file is read and checked first (its checksum; the names, shapes and
dtypes against the model; every value finite; the optimizer's kind), and any
problem raises one ``ValueError`` that names the path and every difference,
with nothing changed. A float64 array loads into a float32 parameter (the
values are converted) and a float32 one into float64; other dtypes (float16,
integers) are refused, and so are non-finite values, which ``save`` refuses
to write in the first place.

The file itself (``backprop.checkpoint_io``) is written atomically and sealed
with a SHA-256, and is still plain numpy: ``np.load(path)`` reads it.
Nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import numpy as np

from backprop.checkpoint_io import read_arrays, write_arrays
from backprop.finite import non_finite
from backprop.layer import FLOAT_DTYPES, Layer, Parameter
from backprop.optim import Optimizer

__all__ = ["load", "save"]

_META = "__backprop__"
_BUFFER = "__buffer__/"
_OPTIM = "__optimizer__/"
_FORMAT = "backprop-checkpoint"
_VERSION = 1
#: The training state is meant to be small: its JSON may take this many bytes.
STATE_LIMIT = 1 << 20


# ------------------------------------------------------------------ what a model holds


def _named(model: Any, where: str) -> dict[str, Parameter]:
    if isinstance(model, Layer):
        return dict(model.params)
    if hasattr(model, "named_parameters"):
        return dict(model.named_parameters())
    raise TypeError(
        f"{where}: expected a Layer, a Sequential or a Graph (anything with "
        f"named_parameters()), got {type(model).__name__}"
    )


def _named_layers(model: Any, prefix: str = "") -> dict[str, Layer]:
    """Every layer of ``model`` by the name that prefixes its parameters."""
    if isinstance(model, Layer):
        return {prefix.rstrip("."): model}
    found: dict[str, Layer] = {}
    for node in model.nodes():
        if node.layer is not None:
            found.update(_named_layers(node.layer, f"{prefix}{node.name}."))
    return found


def _buffers(model: Any) -> dict[str, tuple[Layer, str, np.ndarray]]:
    """``{"<layer>.<buffer>": (layer, buffer name, array)}`` of the layers with buffers."""
    out = {}
    for lname, layer in _named_layers(model).items():
        for bname, value in (getattr(layer, "buffers", None) or {}).items():
            out[f"{lname}.{bname}".lstrip(".")] = (layer, bname, np.asarray(value))
    return out


def _generators(model: Any) -> dict[str, np.random.Generator]:
    """Every ``numpy.random.Generator`` a layer owns, by ``"<layer>.<attribute>"``."""
    out = {}
    for lname, layer in _named_layers(model).items():
        for attr, value in vars(layer).items():
            if isinstance(value, np.random.Generator):
                out[f"{lname}.{attr.lstrip('_')}".lstrip(".")] = value
    return out


def _path(path: Any, where: str) -> Path:
    """The ``.npz`` path meant by ``path`` (``.npz`` added if missing); never a folder."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{where}: path must be a str or a Path, got {type(path).__name__}")
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(
            f"{where}: {str(p)!r} is a folder; give a file name, such as {str(p / 'model.npz')!r}"
        )
    target = p if p.suffix == ".npz" else p.with_name(p.name + ".npz")
    if where == "load" and not p.exists() and target.exists():
        return target
    return p if where == "load" else target


# ------------------------------------------------------------------ save


def save(
    model: Any,
    path: str | os.PathLike[str],
    *,
    optimizer: Optimizer | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and ``optimizer``, and ``state``) to ``path``; return the path.

    ``.npz`` is added to a name without it. The file appears whole or not at all.
    A non-finite value, an optimizer that does not update exactly the model's
    parameters, or a ``state`` that is not a small dict of plain values is a
    ``ValueError``/``TypeError``, and nothing is written.
    """
    named = _named(model, "save")
    target = _path(path, "save")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"save: the folder {str(target.parent)!r} does not exist")
    arrays: dict[str, np.ndarray] = {}
    for name, p in named.items():
        if name == _META or name.startswith((_BUFFER, _OPTIM)):
            raise ValueError(f"save: the parameter name {name!r} is reserved by the file format")
        arrays[name] = _finite(f"parameter {name!r}", p.value)
    for key, (_, _, value) in _buffers(model).items():
        arrays[_BUFFER + key] = _finite(f"buffer {key!r}", value)
    meta: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "model": type(model).__name__}
    meta["generators"] = {k: g.bit_generator.state for k, g in _generators(model).items()}
    if optimizer is not None:
        meta["optimizer"] = _save_optimizer(optimizer, named, arrays)
    if state is not None:
        meta["state"] = _encode_state(state)
    text = json.dumps(meta, allow_nan=False)
    arrays[_META] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    write_arrays(target, arrays)
    return target


def _finite(what: str, value: np.ndarray) -> np.ndarray:
    count, first = non_finite(value)
    if count:
        raise ValueError(
            f"save: {what} has {count} non-finite entries (NaN or inf); a checkpoint holds "
            f"finite values only: nothing was written"
        )
    return value


def _save_optimizer(
    optimizer: Optimizer, named: dict[str, Parameter], arrays: dict[str, np.ndarray]
) -> dict[str, Any]:
    """The optimizer's settings and scalar state as JSON; its arrays into ``arrays``."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"save: optimizer must be an Optimizer, got {type(optimizer).__name__}")
    names = {id(p): n for n, p in named.items()}
    foreign = [repr(p) for p in optimizer.params if id(p) not in names]
    missing = [n for n, p in named.items() if p not in optimizer.state]
    if foreign or missing:
        raise ValueError(
            f"save: the optimizer must update exactly the model's parameters; it also updates "
            f"{foreign or 'nothing else'}, and misses {missing or 'none'}"
        )
    scalars: dict[str, dict[str, Any]] = {}
    for p in optimizer.params:
        name = names[id(p)]
        scalars[name] = {}
        for key, value in optimizer.state[p].items():
            if isinstance(value, np.ndarray):
                arrays[f"{_OPTIM}{name}/{key}"] = _finite(f"optimizer state {name}/{key}", value)
            else:
                scalars[name][key] = value
    settings = {k: v for k, v in vars(optimizer).items() if isinstance(v, bool | int | float)}
    return {"type": type(optimizer).__name__, "settings": settings, "scalars": scalars}


def _encode_state(state: Any) -> Any:
    """``state`` as JSON: plain values, with each Generator as its tagged state."""
    if not isinstance(state, dict):
        raise TypeError(f"save: state must be a dict, got {type(state).__name__}")
    encoded = _encode(state, "state")
    size = len(json.dumps(encoded))
    if size > STATE_LIMIT:
        raise ValueError(
            f"save: state takes {size:,} bytes as JSON, over {STATE_LIMIT:,}; it is meant for "
            f"a little training state (epoch, generators): save large arrays as parameters"
        )
    return encoded


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, np.random.Generator):
        return {"__generator__": value.bit_generator.state}
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not np.isfinite(value):
            raise ValueError(f"save: {where} is {value}; the training state holds finite numbers")
        return value
    if isinstance(value, list | tuple):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"save: {where} has a key that is not a string")
        if "__generator__" in value:
            raise ValueError(f"save: {where} uses the reserved key '__generator__'")
        return {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(
        f"save: {where} is a {type(value).__name__}; the training state holds numbers, "
        f"strings, None, lists, dicts and numpy Generators"
    )


# ------------------------------------------------------------------ load


def load(
    model: Any, path: str | os.PathLike[str], *, optimizer: Optimizer | None = None
) -> dict[str, Any]:
    """Set ``model`` (and ``optimizer``) from the checkpoint at ``path``; return the
    training state that was saved with it (``{}`` if none).

    All or nothing: one ``ValueError`` naming the path and every difference (a
    missing, unexpected or misshapen array; a dtype other than float32/float64;
    a non-finite value; a corrupt, truncated, empty or foreign file; another kind
    of optimizer), and nothing changed.
    """
    named = _named(model, "load")
    source = _path(path, "load")
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError(f"load: optimizer must be an Optimizer, got {type(optimizer).__name__}")
    if not source.exists():
        raise FileNotFoundError(f"load: no checkpoint at {str(source)!r}")
    arrays = read_arrays(source)
    meta = _meta(arrays, source)
    problems: list[str] = []
    values = _match_params(named, arrays, problems)
    buffers = _match_buffers(model, arrays, problems)
    generators = _match_generators(model, meta.get("generators", {}), problems)
    optim = _match_optimizer(optimizer, named, meta.get("optimizer"), arrays, problems)
    leftover = [k for k in arrays if k != _META and k not in named and not k.startswith(_OPTIM)]
    leftover = [k for k in leftover if not k.startswith(_BUFFER)]
    problems += [f"unexpected in the file: {k} {_describe(arrays[k])}" for k in leftover]
    try:
        state = _decode(meta.get("state") or {})
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        problems.append(f"the training state cannot be rebuilt: {e}")
    if problems:
        lines = [f"load: the checkpoint {str(source)!r} does not fit this {type(model).__name__}"]
        lines += [f"  {m}" for m in problems]
        lines.append("no parameter was changed")
        raise ValueError("\n".join(lines))
    for p, value in values:
        p.value = value
    for (layer, _), new in buffers.items():
        layer.set_buffers(new)  # type: ignore[attr-defined]
    for g, saved in generators:
        g.bit_generator.state = saved
    if optim is not None:  # read only when an optimizer was given
        _apply_optimizer(cast(Optimizer, optimizer), *optim)
    return state


def _meta(arrays: dict[str, np.ndarray], source: Path) -> dict[str, Any]:
    raw = arrays.get(_META)
    where = f"load: {str(source)!r}"
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"{where} has no backprop header: not a checkpoint written by save")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{where} has a header that is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{where} is not a backprop checkpoint (its header says otherwise)")
    if meta.get("version") != _VERSION:
        raise ValueError(f"{where} has format version {meta.get('version')!r}; this is {_VERSION}")
    return meta


def _describe(value: Any) -> str:
    return f"{tuple(value.shape)} {value.dtype.name}"


def _usable(what: str, a: np.ndarray, want: Any, problems: list[str]) -> bool:
    """Whether array ``a`` can stand for ``want`` (shape, float32/64 dtype, finite)."""
    if a.shape != want.shape or a.dtype not in FLOAT_DTYPES:
        problems.append(
            f"different shape or dtype: {what}: model {_describe(want)}, file {_describe(a)}"
        )
        return False
    count, first = non_finite(a)
    if count:
        problems.append(f"non-finite values: {what} has {count} (NaN or inf) in the file")
        return False
    return True


def _match_params(
    named: dict[str, Parameter], arrays: dict[str, np.ndarray], problems: list[str]
) -> list[tuple[Parameter, np.ndarray]]:
    values = []
    for name, p in named.items():
        a = arrays.get(name)
        if a is None:
            problems.append(f"missing from the file: {name} {_describe(p.value)}")
        elif _usable(name, a, p.value, problems):
            values.append((p, a.astype(p.dtype, copy=False)))
    return values


def _match_buffers(
    model: Any, arrays: dict[str, np.ndarray], problems: list[str]
) -> dict[tuple[Layer, int], dict[str, np.ndarray]]:
    """``{(layer, id): {buffer: new value}}`` for every buffer the file has for the model.

    A file without any buffer (written for the parameters alone) leaves them as they are.
    """
    if not any(k.startswith(_BUFFER) for k in arrays):
        return {}
    out: dict[tuple[Layer, int], dict[str, np.ndarray]] = {}
    for key, (layer, bname, value) in _buffers(model).items():
        a = arrays.get(_BUFFER + key)
        if not callable(getattr(layer, "set_buffers", None)):
            problems.append(f"buffer {key}: {layer!r} has no set_buffers() to restore it")
        elif a is None:
            problems.append(f"missing from the file: buffer {key} {_describe(value)}")
        elif _usable(f"buffer {key}", a, value, problems):
            out.setdefault((layer, id(layer)), {})[bname] = a.astype(value.dtype, copy=False)
    known = {_BUFFER + k for k in _buffers(model)}
    problems += [
        f"unexpected in the file: {k}" for k in arrays if k.startswith(_BUFFER) and k not in known
    ]
    return out


def _match_generators(
    model: Any, saved: Any, problems: list[str]
) -> list[tuple[np.random.Generator, Any]]:
    out = []
    for key, g in _generators(model).items():
        if key not in saved:
            continue  # a file without it leaves the generator as it is
        try:
            type(g.bit_generator)().state = saved[key]  # refused here if it does not fit
        except (TypeError, ValueError, KeyError) as e:
            problems.append(f"generator {key}: the saved state does not fit ({e})")
            continue
        out.append((g, saved[key]))
    return out


def _match_optimizer(
    optimizer: Optimizer | None,
    named: dict[str, Parameter],
    meta: Any,
    arrays: dict[str, np.ndarray],
    problems: list[str],
) -> tuple[dict[str, Any], dict[Parameter, dict[str, Any]]] | None:
    if optimizer is None:
        return None
    if meta is None:
        problems.append("the file holds no optimizer state (it was saved without optimizer=)")
        return None
    kind = type(optimizer).__name__
    if meta.get("type") != kind:
        problems.append(f"the file holds the state of a {meta.get('type')}, not of a {kind}")
        return None
    ids = {id(p): n for n, p in named.items()}
    if {id(p) for p in optimizer.params} != set(ids):
        problems.append("the optimizer does not update exactly this model's parameters")
        return None
    states: dict[Parameter, dict[str, Any]] = {}
    for p in optimizer.params:
        name = ids[id(p)]
        entry = dict(meta.get("scalars", {}).get(name, {}))
        prefix = f"{_OPTIM}{name}/"
        for k in arrays:
            if k.startswith(prefix):
                a = arrays[k]
                if a.dtype not in FLOAT_DTYPES or non_finite(a)[0]:
                    problems.append(
                        f"optimizer state {k[len(_OPTIM) :]}: {_describe(a)} not finite floats"
                    )
                entry[k[len(prefix) :]] = a
        states[p] = entry
    known = {f"{_OPTIM}{n}/" for n in ids.values()}
    for k in arrays:
        if k.startswith(_OPTIM) and not any(k.startswith(pre) for pre in known):
            problems.append(f"unexpected in the file: {k}")
    return dict(meta.get("settings", {})), states


def _apply_optimizer(
    optimizer: Optimizer, settings: dict[str, Any], states: dict[Parameter, dict[str, Any]]
) -> None:
    for key, value in settings.items():
        if hasattr(optimizer, key) and type(getattr(optimizer, key)) is type(value):
            setattr(optimizer, key, value)
    for p, entry in states.items():
        optimizer.state[p] = entry


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__generator__"}:
            saved = value["__generator__"]
            g = np.random.Generator(getattr(np.random, saved["bit_generator"])())
            g.bit_generator.state = saved
            return g
        return {k: _decode(v) for k, v in value.items()}
    return value
