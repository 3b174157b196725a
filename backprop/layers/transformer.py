"""A pre-norm transformer encoder block, built as a ``Graph`` of layers.

The transformers chapter alternates two kinds of layer over a set of tokens: one that
mixes tokens (attention) and one that modifies each token alone (a small MLP applied
token by token), each wrapped in a residual connection and preceded here by a
normalization of each token (the "pre-norm" order). Like ``attention``, this module
composes layers through the executor (``backprop.graph``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.graph import Graph
from backprop.layers.attention import MultiHeadAttention
from backprop.layers.linear import Linear
from backprop.layers.normalization import LayerNorm
from backprop.layers.pointwise import ReLU
from backprop.layers.structure import Add

__all__ = ["transformer_block"]


def transformer_block(
    d: int,
    n_heads: int,
    dim_feedforward: int,
    *,
    causal: bool = False,
    key_padding_mask: bool = False,
    eps: float = 1e-5,
    rng: Any = None,
    dtype: Any = None,
) -> Graph:
    """A pre-norm transformer encoder block on ``(B, T, d)``, as a ``Graph``:

        h = x + MHA(LN₁(x)),    y = h + W₂ relu(W₁ LN₂(h) + b₁) + b₂

    the same function as ``torch.nn.TransformerEncoderLayer(d, n_heads,
    dim_feedforward, dropout=0, batch_first=True, norm_first=True)``. Each residual
    ``Add`` makes its input's gradient the sum of two paths (eq. 14.46): around the
    sublayer and through it.

    Input ``"x"`` and, with ``key_padding_mask=True``, ``"key_padding_mask"`` ``(B, T)``
    (True: ignore that key); output ``"y"``. The nodes and their torch counterparts:
    ``norm1`` and ``norm2`` (``LayerNorm``: ``gamma``, ``beta`` = ``normK.weight``,
    ``normK.bias``), ``attn`` (``MultiHeadAttention``: ``self_attn``, see its
    docstring), ``ff1`` and ``ff2`` (``Linear``: ``W``, ``b`` = ``linearK.weight``,
    ``linearK.bias``), ``relu``, ``residual1``, ``residual2``. Weights are drawn with
    ``rng`` as torch's layers draw them (LayerNorm: γ = 1, β = 0).
    """
    gen = np.random.default_rng(rng)
    dt = np.dtype(np.float64 if dtype is None else dtype)
    g = Graph()
    x = g.input("x")
    mha = MultiHeadAttention(d, n_heads, causal=causal, rng=gen, dtype=dt)
    n1 = g.add(LayerNorm(d, eps=eps, dtype=dt), x, name="norm1")
    if key_padding_mask:
        attended = g.add(mha, n1, g.input("key_padding_mask", requires_grad=False), name="attn")
    else:
        attended = g.add(mha, n1, name="attn")
    h = g.add(Add(), x, attended, name="residual1")
    n2 = g.add(LayerNorm(d, eps=eps, dtype=dt), h, name="norm2")
    f = g.add(Linear(d, dim_feedforward, rng=gen, dtype=dt), n2, name="ff1")
    f = g.add(ReLU(), f, name="relu")
    f = g.add(Linear(dim_feedforward, d, rng=gen, dtype=dt), f, name="ff2")
    g.output(g.add(Add(), h, f, name="residual2"), names=["y"])
    return g
