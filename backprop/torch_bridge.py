"""The bridge to PyTorch: ``from_torch(module)`` and ``to_torch(model)``.

PyTorch is an optional extra, imported only when one of these is called. A
``torch.nn.Sequential`` (nested ones are flattened into one chain) of the
supported modules becomes a ``Sequential`` with the same weights, so that its
outputs and every gradient agree in float64; ``to_torch`` goes back. Weights
are copied bit for bit both ways (float32 stays float32, float64 stays
float64), training/evaluation modes carry over, and a Parameter used by two
modules (tied weights) is one Parameter on the other side too. BatchNorm's
running statistics come along; dropout masks do not (each side draws its own).

One row of ``ROWS`` per kind of layer says how to convert it each way, so a
layer added later is one more row, or a call to ``register``. A module with no
row, or with a setting the engine does not have (``ceil_mode=True``,
``padding_mode="reflect"``, a Softplus with ``beta != 1``, ...), is refused with
an error that names it and its place.

Sequences: ``nn.Embedding`` is ``Embedding`` (without ``padding_idx``,
``max_norm``, ``scale_grad_by_freq`` or ``sparse``), and ``nn.MultiheadAttention``
with ``batch_first=True`` is ``MultiHeadAttention`` run as self-attention,
``mha(x, x, x)`` (no dropout, no ``add_bias_kv``, no ``add_zero_attn``, keys and
values of the query's width). Its ``in_proj_weight`` ``[Wq; Wk; Wv]`` is split into
three Parameters and stacked again on the way back, so a tie between two attention
modules holds when it ties all three (or the stacked tensor). torch's module takes
its masks at each call, not as settings: a causal ``MultiHeadAttention`` is refused
by ``to_torch`` (the module would attend everywhere), and the module that
``to_torch`` returns is called ``mha(x, x, x, need_weights=False)[0]``, so it cannot
run inside an ``nn.Sequential``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from backprop.graph import Graph, Sequential
from backprop.layer import FLOAT_DTYPES, Layer, Parameter
from backprop.layers import (
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Embedding,
    Flatten,
    LayerNorm,
    LeakyReLU,
    Linear,
    LogSoftmax,
    MaxPool2d,
    MultiHeadAttention,
    ReLU,
    Sigmoid,
    Softmax,
    Softplus,
    Tanh,
    Upsample,
)

__all__ = ["ROWS", "Row", "from_torch", "register", "to_torch"]


class Unsupported(TypeError):
    """A module or layer the bridge has no row for, or a setting it cannot carry."""


@dataclass(frozen=True)
class Row:
    """How one kind of layer crosses: ``torch.nn.<torch_name>`` ⇄ ``ours``.

    ``to_ours(module, c)`` builds the layer (``c.param(tensor)`` gives the
    Parameter for a torch parameter, the same one for a tied tensor);
    ``to_torch(layer, c)`` builds the module (``c.tensor(p)`` likewise).
    """

    torch_name: str
    ours: type[Layer]
    to_ours: Callable[[Any, _Converter], Layer]
    to_torch: Callable[[Any, _Converter], Any]


ROWS: list[Row] = []


def register(row: Row) -> None:
    """Add (or replace) the row for ``row.ours`` and ``row.torch_name``."""
    ROWS[:] = [r for r in ROWS if r.ours is not row.ours and r.torch_name != row.torch_name]
    ROWS.append(row)


class _Converter:
    """What one conversion shares: torch itself, and the Parameters made so far."""

    def __init__(self, torch: Any) -> None:
        self.torch, self.nn = torch, torch.nn
        self._params: dict[int, Parameter] = {}
        self._tensors: dict[int, Any] = {}
        self._row_params: dict[int, list[Parameter]] = {}
        self._stacked: dict[tuple[int, ...], Any] = {}
        self.where = ""

    def param(self, t: Any) -> Parameter:
        """The Parameter for torch tensor ``t``: its values, bit for bit, in its dtype."""
        if id(t) not in self._params:
            value = t.detach().cpu().numpy()
            if value.dtype not in FLOAT_DTYPES:
                raise Unsupported(
                    f"from_torch: {self.where} has a {t.dtype} parameter; "
                    f"the engine works in float32 or float64"
                )
            self._params[id(t)] = Parameter(value.copy())
        return self._params[id(t)]

    def tensor(self, p: Parameter) -> Any:
        """The ``torch.nn.Parameter`` for Parameter ``p``, its values bit for bit."""
        if id(p) not in self._tensors:
            value = np.array(p.value, copy=True)
            self._tensors[id(p)] = self.nn.Parameter(self.torch.from_numpy(value))
        return self._tensors[id(p)]

    def params_of_rows(self, t: Any, parts: tuple[str, ...]) -> dict[str, Parameter]:
        """Parameters for the equal row blocks of torch tensor ``t``, named ``parts``
        (``in_proj_weight`` as ``Wq``, ``Wk``, ``Wv``): copies, the same ones for the
        same tensor."""
        if id(t) not in self._row_params:
            blocks = np.split(self.param(t).value, len(parts))
            self._row_params[id(t)] = [Parameter(b.copy()) for b in blocks]
        return dict(zip(parts, self._row_params[id(t)], strict=True))

    def stacked(self, ps: list[Parameter]) -> Any:
        """The ``torch.nn.Parameter`` stacking the values of ``ps`` by rows, the same
        one for the same Parameters."""
        key = tuple(id(p) for p in ps)
        if key not in self._stacked:
            value = np.concatenate([p.value for p in ps])
            self._stacked[key] = self.nn.Parameter(self.torch.from_numpy(value))
        return self._stacked[key]

    def buffer(self, a: np.ndarray) -> Any:
        return self.torch.from_numpy(np.array(a, copy=True))

    def refuse(self, what: str) -> Unsupported:
        return Unsupported(f"{self.where}: {what}")


def _require(c: _Converter, module: Any, **expected: Any) -> None:
    """Refuse ``module`` unless each named attribute has the value the engine supports."""
    for name, want in expected.items():
        got = getattr(module, name, want)
        if got != want:
            raise c.refuse(f"{name}={got!r} is not supported (only {want!r})")


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# -- the rows -------------------------------------------------------------------------


def _linear(m: Any, c: _Converter) -> Layer:
    W = c.param(m.weight)
    b = c.param(m.bias) if m.bias is not None else None
    return Linear(m.in_features, m.out_features, bias=b is not None, W=W, b=b)


def _linear_back(layer: Any, c: _Converter) -> Any:
    m = c.nn.Linear(layer.n_in, layer.n_out, bias="b" in layer.params, device="meta")
    return _with_params(m, c, weight=layer.params["W"], bias=layer.params.get("b"))


def _with_params(m: Any, c: _Converter, **params: Parameter | None) -> Any:
    """``m`` with its parameters replaced by ours (a module built on the meta device)."""
    for name, p in params.items():
        setattr(m, name, None if p is None else c.tensor(p))
    return m


def _conv_padding(m: Any, c: _Converter) -> Any:
    _require(c, m, padding_mode="zeros")
    if m.padding == "valid":
        return 0
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        if any(t % 2 for t in total) or m.stride != (1, 1):
            raise c.refuse("padding='same' with an even span is not supported")
        return tuple(t // 2 for t in total)
    return m.padding


def _conv(m: Any, c: _Converter) -> Layer:
    W = c.param(m.weight)
    b = c.param(m.bias) if m.bias is not None else None
    options = {"stride": m.stride, "dilation": m.dilation, "groups": m.groups}
    kind = type(m).__name__
    if kind == "ConvTranspose2d":
        _require(c, m, padding_mode="zeros")
        return ConvTranspose2d(
            m.in_channels, m.out_channels, m.kernel_size, padding=m.padding,
            output_padding=m.output_padding, bias=b is not None, W=W, b=b, **options,
        )  # fmt: skip
    padding = _conv_padding(m, c)
    return Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, padding=padding, bias=b is not None,
        W=W, b=b, **options,
    )  # fmt: skip


def _conv_back(layer: Any, c: _Converter) -> Any:
    options = {
        "stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
        "groups": layer.groups, "bias": "b" in layer.params, "device": "meta",
    }  # fmt: skip
    if isinstance(layer, ConvTranspose2d):
        options["output_padding"] = layer.output_padding
        m = c.nn.ConvTranspose2d(layer.c_in, layer.c_out, layer.kernel_size, **options)
    else:
        m = c.nn.Conv2d(layer.c_in, layer.c_out, layer.kernel_size, **options)
    return _with_params(m, c, weight=layer.params["W"], bias=layer.params.get("b"))


def _pool(m: Any, c: _Converter) -> Layer:
    _require(c, m, ceil_mode=False)
    if type(m).__name__ == "MaxPool2d":
        _require(c, m, dilation=1, return_indices=False)
        return MaxPool2d(m.kernel_size, m.stride, m.padding)
    _require(c, m, count_include_pad=True, divisor_override=None)
    return AvgPool2d(m.kernel_size, m.stride, m.padding)


def _pool_back(layer: Any, c: _Converter) -> Any:
    kind = c.nn.MaxPool2d if isinstance(layer, MaxPool2d) else c.nn.AvgPool2d
    return kind(layer.kernel_size, layer.stride, layer.padding)


def _batchnorm(m: Any, c: _Converter) -> Layer:
    _require(c, m, affine=True, track_running_stats=True)
    if m.momentum is None:
        raise c.refuse("momentum=None (a cumulative average) is not supported")
    kind = BatchNorm2d if type(m).__name__ == "BatchNorm2d" else BatchNorm1d
    gamma, beta = c.param(m.weight), c.param(m.bias)
    layer = kind(m.num_features, eps=m.eps, momentum=m.momentum, dtype=gamma.dtype)
    layer.params.update(gamma=gamma, beta=beta)
    mean = m.running_mean.detach().cpu().numpy().astype(gamma.dtype)
    var = m.running_var.detach().cpu().numpy().astype(gamma.dtype)
    layer.set_running_stats(mean, var)
    return layer


def _batchnorm_back(layer: Any, c: _Converter) -> Any:
    kind = c.nn.BatchNorm2d if isinstance(layer, BatchNorm2d) else c.nn.BatchNorm1d
    m = kind(layer.c, eps=layer.eps, momentum=layer.momentum, device="meta")
    _with_params(m, c, weight=layer.params["gamma"], bias=layer.params["beta"])
    m.running_mean = c.buffer(layer.running_mean)
    m.running_var = c.buffer(layer.running_var)
    m.num_batches_tracked = c.torch.tensor(0, dtype=c.torch.long)
    return m


def _layernorm(m: Any, c: _Converter) -> Layer:
    affine = m.elementwise_affine
    if affine and m.bias is None:
        raise c.refuse("a LayerNorm with a weight but no bias is not supported")
    dtype = m.weight.detach().cpu().numpy().dtype if affine else np.float64
    layer = LayerNorm(tuple(m.normalized_shape), eps=m.eps, affine=affine, dtype=dtype)
    if affine:
        layer.params.update(gamma=c.param(m.weight), beta=c.param(m.bias))
    return layer


def _layernorm_back(layer: Any, c: _Converter) -> Any:
    m = c.nn.LayerNorm(layer.shape, eps=layer.eps, elementwise_affine=layer.affine, device="meta")
    if layer.affine:
        _with_params(m, c, weight=layer.params["gamma"], bias=layer.params["beta"])
    return m


def _softplus(m: Any, c: _Converter) -> Layer:
    _require(c, m, beta=1.0)
    return Softplus()


def _softmax(kind: type[Softmax] | type[LogSoftmax]) -> Callable[[Any, _Converter], Layer]:
    def convert(m: Any, c: _Converter) -> Layer:
        if m.dim is None:
            raise c.refuse("dim=None is not supported: give the axis")
        return kind(axis=m.dim)

    return convert


def _softmax_back(layer: Any, c: _Converter) -> Any:
    if isinstance(layer, Softmax):
        if layer.temperature != 1.0:
            raise c.refuse(f"temperature {layer.temperature} has no torch.nn.Softmax setting")
        return c.nn.Softmax(dim=layer.axis)
    return c.nn.LogSoftmax(dim=layer.axis)


def _flatten(m: Any, c: _Converter) -> Layer:
    _require(c, m, start_dim=1, end_dim=-1)
    return Flatten()


def _upsample(m: Any, c: _Converter) -> Layer:
    _require(c, m, mode="nearest", size=None)
    scale = m.scale_factor
    pair = scale if isinstance(scale, tuple) else (scale, scale)
    if any(float(s) != int(s) for s in pair):
        raise c.refuse(f"scale_factor={scale!r}: only whole factors are supported")
    return Upsample(tuple(int(s) for s in pair))


def _embedding(m: Any, c: _Converter) -> Layer:
    for name in ("padding_idx", "max_norm"):
        if getattr(m, name) is not None:
            raise c.refuse(f"{name}={getattr(m, name)!r} is not supported (only None)")
    _require(c, m, scale_grad_by_freq=False, sparse=False)
    W = c.param(m.weight)
    return Embedding(m.num_embeddings, m.embedding_dim, W=W)


def _embedding_back(layer: Any, c: _Converter) -> Any:
    m = c.nn.Embedding(layer.n, layer.d, device="meta")
    return _with_params(m, c, weight=layer.params["W"])


def _attention(m: Any, c: _Converter) -> Layer:
    _require(c, m, batch_first=True, dropout=0.0, add_zero_attn=False)
    if m.bias_k is not None:
        raise c.refuse("add_bias_kv=True is not supported (only False)")
    if not m._qkv_same_embed_dim:
        raise c.refuse(
            f"kdim={m.kdim}, vdim={m.vdim} are not supported: self-attention reads keys and "
            f"values of the query's width, embed_dim={m.embed_dim}"
        )
    bias = m.in_proj_bias is not None
    if bias != (m.out_proj.bias is not None):
        raise c.refuse("an in-projection and out-projection that differ in having a bias")
    P = c.params_of_rows(m.in_proj_weight, ("Wq", "Wk", "Wv"))
    P["Wo"] = c.param(m.out_proj.weight)
    if bias:
        P.update(c.params_of_rows(m.in_proj_bias, ("bq", "bk", "bv")), bo=c.param(m.out_proj.bias))
    dtype = P["Wq"].value.dtype
    layer = MultiHeadAttention(m.embed_dim, m.num_heads, bias=bias, dtype=dtype)
    layer.params.update(P)
    layer.graph = layer._build(dtype)  # its inner graph reads the Parameters just given
    return layer


def _attention_back(layer: Any, c: _Converter) -> Any:
    if layer.causal:
        raise c.refuse(
            "causal=True has no torch.nn.MultiheadAttention setting: torch takes the causal "
            "mask at each call (attn_mask), and the module would attend to every key"
        )
    m = c.nn.MultiheadAttention(
        layer.d, layer.n_heads, bias=layer.bias, batch_first=True, device="meta"
    )
    P = layer.params
    m.in_proj_weight = c.stacked([P["Wq"], P["Wk"], P["Wv"]])
    _with_params(m.out_proj, c, weight=P["Wo"], bias=P.get("bo"))
    if layer.bias:
        m.in_proj_bias = c.stacked([P["bq"], P["bk"], P["bv"]])
    return m


def _simple(make: Callable[[], Layer]) -> Callable[[Any, _Converter], Layer]:
    return lambda m, c: make()


def _module(name: str, **kwargs: Any) -> Callable[[Any, _Converter], Any]:
    return lambda layer, c: getattr(c.nn, name)(**kwargs)


for _row in [
    Row("Linear", Linear, _linear, _linear_back),
    Row("ReLU", ReLU, _simple(ReLU), _module("ReLU")),
    Row("Sigmoid", Sigmoid, _simple(Sigmoid), _module("Sigmoid")),
    Row("Tanh", Tanh, _simple(Tanh), _module("Tanh")),
    Row("Softplus", Softplus, _softplus, _module("Softplus")),
    Row(
        "LeakyReLU",
        LeakyReLU,
        lambda m, c: LeakyReLU(m.negative_slope),
        lambda layer, c: c.nn.LeakyReLU(layer.slope),
    ),
    Row("Conv2d", Conv2d, _conv, _conv_back),
    Row("ConvTranspose2d", ConvTranspose2d, _conv, _conv_back),
    Row("MaxPool2d", MaxPool2d, _pool, _pool_back),
    Row("AvgPool2d", AvgPool2d, _pool, _pool_back),
    Row("BatchNorm1d", BatchNorm1d, _batchnorm, _batchnorm_back),
    Row("BatchNorm2d", BatchNorm2d, _batchnorm, _batchnorm_back),
    Row("LayerNorm", LayerNorm, _layernorm, _layernorm_back),
    Row("Dropout", Dropout, lambda m, c: Dropout(m.p), lambda layer, c: c.nn.Dropout(layer.p)),
    Row("Flatten", Flatten, _flatten, _module("Flatten")),
    Row("Embedding", Embedding, _embedding, _embedding_back),
    Row("MultiheadAttention", MultiHeadAttention, _attention, _attention_back),
    Row("Softmax", Softmax, _softmax(Softmax), _softmax_back),
    Row("LogSoftmax", LogSoftmax, _softmax(LogSoftmax), _softmax_back),
    Row(
        "Upsample",
        Upsample,
        _upsample,
        lambda layer, c: c.nn.Upsample(scale_factor=tuple(map(float, layer.scale))),
    ),
]:
    register(_row)


# -- the two directions ----------------------------------------------------------------


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(
            "the PyTorch bridge needs torch, an optional extra: pip install torch"
        ) from None
    return torch


def _supported() -> str:
    return ", ".join(r.torch_name for r in ROWS)


def from_torch(module: Any) -> Sequential:
    """A ``Sequential`` with the weights (bit for bit) and modes of ``module``.

    ``module`` is a ``torch.nn.Sequential`` of supported modules (nested
    Sequentials are flattened in order), or one supported module. A module with
    no row in ``ROWS`` raises a ``TypeError`` naming it and its place.
    """
    torch = _torch()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch: expected a torch.nn.Module, got {type(module).__name__}")
    c = _Converter(torch)
    layers = []
    for where, m in _leaves(module, torch):
        c.where = f"from_torch: module {where} ({type(m).__name__})"
        row = next((r for r in ROWS if type(m) is getattr(torch.nn, r.torch_name, None)), None)
        why = f"is not supported: {m!r}; the bridge converts {_supported()} (and Sequentials)"
        layers.append(_cross(row, m, c, why))
    if not layers:
        raise ValueError("from_torch: the module holds no layer")
    return Sequential(layers).train(module.training)  # type: ignore[return-value]


def _cross(row: Row | None, item: Any, c: _Converter, why: str) -> Any:
    """``item`` (a module or a layer) converted by ``row``, in the same mode; without a
    row, ``Unsupported`` saying ``why``. Errors are led by the place of ``item``."""
    if row is None:
        raise Unsupported(f"{c.where} {why}")
    how = row.to_ours if isinstance(item, c.nn.Module) else row.to_torch
    try:
        converted = how(item, c)
    except Unsupported:
        raise
    except (ValueError, TypeError) as e:
        raise type(e)(f"{c.where}: {e}") from e
    converted.train(item.training)
    return converted


def _leaves(module: Any, torch: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``[(dotted place, module)]`` in order, nested Sequentials opened."""
    if type(module) is not torch.nn.Sequential:
        return [(repr(prefix or type(module).__name__), module)]
    found = []
    for name, child in module._modules.items():  # a module used twice is listed twice
        found += _leaves(child, torch, f"{prefix}.{name}" if prefix else name)
    return found


def to_torch(model: Any) -> Any:
    """A ``torch.nn.Sequential`` with the weights (bit for bit) and modes of ``model``.

    ``model`` is a ``Sequential`` (or one layer) of layers with a row in ``ROWS``;
    any other layer, a loss or a general ``Graph`` raises a ``TypeError`` naming it.
    """
    torch = _torch()
    if isinstance(model, Layer):
        model = Sequential([model])
    if not isinstance(model, Sequential):
        kind = "a Graph" if isinstance(model, Graph) else type(model).__name__
        raise TypeError(
            f"to_torch: converts a Sequential (a chain of layers), not {kind}; a general "
            f"DAG has no torch.nn.Sequential form"
        )
    c = _Converter(torch)
    modules = []
    for i, layer in enumerate(model.layers):
        c.where = f"to_torch: layer {i} ({layer!r})"
        row = next((r for r in ROWS if type(layer) is r.ours), None)
        converts = ", ".join(r.ours.__name__ for r in ROWS)
        why = f"has no torch.nn counterpart in the bridge; it converts {converts}"
        modules.append(_cross(row, layer, c, why))
    return torch.nn.Sequential(*modules).train(model.training)
