"""Multi-head self-attention, as a layer that runs a graph of the primitive layers.

An attention layer is a linear combination of tokens whose weights are computed from
the tokens themselves (the transformers chapter). For tokens ``X`` ``(T, d)`` and
each head ``h`` of ``m = d / n_heads`` features:

    Q = X W_qᵀ + b_q,   K = X W_kᵀ + b_k,   V = X W_vᵀ + b_v     (token-wise Linear)
    A_h = softmax(Q_h K_hᵀ / √m)       (row i: how much query i takes from each key)
    Y = [A_1 V_1, ..., A_H V_H] W_oᵀ + b_o

The attention matrix ``A_h`` is data, not a parameter: ``Y`` is linear in ``V`` for a
fixed ``A`` (``L = A ⊗ I``), but ``A`` moves with ``Q`` and ``K`` as well.

``MultiHeadAttention`` is a ``Layer`` whose forward and backward run an inner
``Graph`` of the primitive layers, so the pieces of that formula are nodes whose
Jacobians can be looked at and checked like any other (``mha.graph``; ``Reshape`` and
``Transpose`` split the ``d`` features into heads and merge them back):

    x ─┬─ q ── q_split ── q_heads ─────┐
       ├─ k ── k_split ── k_heads_t ───┴─ scores ── scaled ─┐        (Q_h K_hᵀ, /√m)
       │                   key_padding_mask ────────────────┴─ attention ─┐  (A_h)
       └─ v ── v_split ── v_heads ────────────────────────────────────────┴─ context
    context ── context_tokens ── merge ── out  = y                     (A_h V_h, W_o)

With ``transformer`` it is one of the two layer modules that use the executor
(``backprop.graph``, which knows no concrete layer), to compose the others.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.graph import Graph
from backprop.jacobian import Dense, Jacobian
from backprop.layer import Layer, OperatingPoint, Parameter
from backprop.layers.linear import Linear
from backprop.layers.sequence import _positive
from backprop.layers.shape import Reshape, Transpose
from backprop.layers.softmax import Softmax
from backprop.layers.structure import MatMul
from backprop.layers.worked import Scale

__all__ = ["MultiHeadAttention"]

_INPUTS = ("x", "key_padding_mask")


class MultiHeadAttention(Layer):
    """Self-attention on ``(B, T, d)``, as ``torch.nn.MultiheadAttention(d, n_heads,
    batch_first=True)`` called with ``(x, x, x)``.

    Parameters: ``"Wq"``, ``"Wk"``, ``"Wv"``, ``"Wo"`` ``(d, d)`` and, with ``bias``,
    ``"bq"``, ``"bk"``, ``"bv"``, ``"bo"`` ``(d,)``. torch's ``in_proj_weight`` is
    ``[Wq; Wk; Wv]`` stacked, ``in_proj_bias`` is ``[bq; bk; bv]``, ``out_proj`` is
    ``(Wo, bo)``; they are drawn as torch draws them (Xavier-uniform in-projection,
    ``±1/√d`` uniform out-projection, zero biases) with ``rng``.

    Masks: ``causal=True`` lets query ``t`` see the keys ``≤ t`` (torch's
    ``attn_mask=generate_square_subsequent_mask(T)``). A key padding mask ``(B, T)``,
    booleans with True where a key is ignored, is given as
    ``forward(x, key_padding_mask=mask)`` or, as a node of a Graph, as its second input
    (``g.add(mha, x, mask)``). A query that sees no key at all (every key padded, or
    causal with key 0 padded) gets attention weights of zero, so a zero context, the
    output ``b_o`` (zeros without bias) and no gradient through it. (torch 2.13 gives
    the same through its fused path, ``need_weights=False``, and NaN on the path that
    returns the attention weights.)

    The key bias ``b_k`` adds ``q_i · b_k`` to every score of query ``i``, the same
    amount along the whole row, which the softmax ignores: ``y`` does not depend on
    ``b_k``. Its gradient is exactly zero (torch's is zero up to rounding), its
    Jacobian the zero matrix, and the inner graph leaves it out (node ``k`` has no
    bias); it is kept as a Parameter so that torch's weights carry over.

    The computation is the inner ``Graph`` ``self.graph`` (see the module docstring),
    whose nodes share this layer's Parameters: after a forward, ``mha.graph`` holds the
    operating point of every piece (``mha.graph["attention"].jacobians()`` is the
    softmax's diagonal-plus-low-rank Jacobian of each row of attention weights). The
    fast backward pass is the inner graph's backward; ``jacobians()`` are the inner
    graph's whole-model Jacobians, chained from its nodes' structured Jacobians
    (``Product`` objects), and per-example gradients come from its per-example pass.
    Second derivatives too come from the inner graph (``inner_graph``): the curvature
    tools walk its nodes as those of a nested Graph.
    """

    inputs: tuple[str, ...] = _INPUTS[:1]
    mask_inputs = frozenset({"key_padding_mask"})
    variadic = True

    def __init__(
        self,
        d: int,
        n_heads: int,
        *,
        causal: bool = False,
        bias: bool = True,
        rng: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.d = _positive("MultiHeadAttention", "d", d)
        self.n_heads = _positive("MultiHeadAttention", "n_heads", n_heads)
        if self.d % self.n_heads:
            raise ValueError(
                f"MultiHeadAttention: d = {self.d} is not divisible by n_heads = {self.n_heads}; "
                f"each head takes d / n_heads features"
            )
        dt = np.dtype(np.float64 if dtype is None else dtype)
        if dt not in (np.float32, np.float64):
            raise TypeError(f"MultiHeadAttention: dtype must be float32 or float64, got {dt}")
        self.causal, self.bias = bool(causal), bool(bias)
        gen = np.random.default_rng(rng)
        bound = np.sqrt(6.0 / (self.d + 3 * self.d))  # Xavier-uniform over (3d, d)
        W_in = gen.uniform(-bound, bound, size=(3, self.d, self.d)).astype(dt)
        W_o = gen.uniform(-1, 1, size=(self.d, self.d)) / np.sqrt(self.d)
        for name, W in zip(("Wq", "Wk", "Wv", "Wo"), (*W_in, W_o.astype(dt)), strict=True):
            self.params[name] = Parameter(W)
        if self.bias:
            for name in ("bq", "bk", "bv", "bo"):
                self.params[name] = Parameter(np.zeros(self.d, dt))
        self.graph = self._build(dt)
        for name, p in self.params.items():
            p._set_place(name)  # as the layer calls them, until a model places the layer
        self._cache_inner = True
        self._no_mask: dict[tuple[int, ...], np.ndarray] = {}  # (B, T) of False, read-only

    def _build(self, dt: np.dtype[Any]) -> Graph:
        """The inner graph: inputs ``x`` and ``key_padding_mask``, output ``y``."""
        d, h = self.d, self.n_heads
        m = d // h
        P = self.params
        g = Graph()
        x = g.input("x")
        mask = g.input("key_padding_mask", requires_grad=False)

        def project(what: str, source: Any, name: str) -> Any:
            bias = self.bias and what != "k"  # b_k cannot move y: see the class docstring
            lin = Linear(d, d, W=P[f"W{what}"], b=P[f"b{what}"] if bias else None, bias=bias)
            return g.add(lin, source, name=name)

        def split(what: str, axes: tuple[int, int, int], name: str) -> Any:
            heads = g.add(Reshape(-1, h, m), project(what, x, what), name=f"{what}_split")
            return g.add(Transpose(axes), heads, name=name)

        q = split("q", (1, 0, 2), "q_heads")  # (B, h, T, m)
        k_t = split("k", (1, 2, 0), "k_heads_t")  # (B, h, m, T): Kᵀ per head
        v = split("v", (1, 0, 2), "v_heads")
        scores = g.add(MatMul(), q, k_t, name="scores")  # (B, h, T, T)
        scaled = g.add(Scale(1.0 / np.sqrt(m), learnable=False), scores, name="scaled")
        attention = g.add(
            Softmax(-1, causal=self.causal, masked=True), scaled, mask, name="attention"
        )
        context = g.add(MatMul(), attention, v, name="context")  # (B, h, T, m)
        tokens = g.add(Transpose((1, 0, 2)), context, name="context_tokens")  # (B, T, h, m)
        merged = g.add(Reshape(-1, d), tokens, name="merge")
        g.output(project("o", merged, "out"), names=["y"])
        return g

    # -- the Layer protocol ----------------------------------------------------------------
    def take_inputs(self, n: int) -> None:
        """In a Graph: ``x`` alone, or ``x`` and the key padding mask."""
        if n not in (1, 2):
            raise TypeError(
                f"{self!r} takes x and, optionally, key_padding_mask (1 or 2 inputs), got {n}"
            )
        self.inputs = _INPUTS[:n]

    def forward(self, *x_in: Any, key_padding_mask: Any = None, cache: bool = True) -> Any:
        """``y`` for ``x`` ``(B, T, d)``; ``key_padding_mask`` ``(B, T)`` (True: ignore
        that key) may be given by keyword or as the second positional input."""
        if key_padding_mask is not None:
            if len(x_in) != 1:
                raise TypeError(
                    f"{self!r}.forward: give x, and key_padding_mask once (by keyword or "
                    f"positionally), got {len(x_in)} positional input(s) and the keyword"
                )
            x_in = (x_in[0], key_padding_mask)
        self._cache_inner = cache
        return super().forward(*x_in, cache=cache)

    def _validate_inputs(self, x_in: Any) -> tuple[np.ndarray, ...]:
        if len(x_in) not in (1, 2):
            raise TypeError(
                f"{self!r}.forward takes x and, optionally, key_padding_mask, got "
                f"{len(x_in)} inputs"
            )
        x = self._as_input("x", x_in[0], self._dtype())
        if x.ndim != 3 or x.shape[2] != self.d:
            raise ValueError(
                f"{self!r}: x has shape {x.shape}, expected (B, T, {self.d}) (a batch of "
                f"sequences of d = {self.d} features)"
            )
        if len(x_in) == 1:
            return (x,)
        mask = self._as_input("key_padding_mask", x_in[1], None)
        if mask.shape != x.shape[:2]:
            raise ValueError(
                f"{self!r}: key_padding_mask has shape {mask.shape}, expected (B, T) = "
                f"{x.shape[:2]} for x of shape {x.shape} (True where a key is ignored)"
            )
        return (x, mask)

    def _forward(
        self, op: OperatingPoint, x: np.ndarray, mask: np.ndarray | None = None
    ) -> np.ndarray:
        if mask is None:
            mask = self._no_mask.get(x.shape[:2])
            if mask is None:
                mask = self._no_mask[x.shape[:2]] = np.zeros(x.shape[:2], dtype=bool)
                mask.setflags(write=False)
        y = self.graph.forward(x=x, key_padding_mask=mask, cache=self._cache_inner)
        op.saved["inner"] = self.graph["out"]._op  # the inner run this operating point is
        return np.asarray(y)

    def _inner(self, op: OperatingPoint, what: str) -> None:
        """A ``RuntimeError`` unless the inner graph still holds this forward's run."""
        if op.saved["inner"] is None or self.graph["out"]._op is not op.saved["inner"]:
            raise RuntimeError(
                f"{self!r}.{what}: its inner graph (.graph) was run on its own since this "
                f"layer's forward, so it no longer holds this layer's operating point; call "
                f"forward again"
            )

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        self._inner(op, "backward")
        grads = self.graph.backward(g_out, input_grad=input_grad)
        named = {name: grads.params.get(p, 0 * p.value) for name, p in self.params.items()}
        g_x = grads.inputs["x"] if input_grad else None
        return (g_x if len(op.x_in) == 1 else (g_x, None)), named

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        self._inner(op, "jacobians")
        J = self.graph.jacobians("y")
        x = op.x_in[0]
        zero = Dense(
            np.zeros((x[0].size, self.d), x.dtype), "0 (y does not depend on b_k)", x.shape[0]
        )
        L_theta = {name: J.params.get(p, zero) for name, p in self.params.items()}
        L_x = J.inputs["x"]
        return (L_x if len(op.x_in) == 1 else (L_x, None)), L_theta

    def inner_graph(self, where: str | None = None) -> Graph:
        """``self.graph``: with ``where``, only while it holds this layer's last forward.

        Second derivatives come from it: the curvature tools push tangents through its
        nodes and differentiate its backward pass node by node (each primitive's
        ``_tangent`` and ``_hvp``), in a model as when this layer stands alone, so no
        formula of attention's own second derivatives is written here.
        """
        if where is not None:
            self._inner(self._operating_point(where), where)
        return self.graph

    def per_example_grads(self, g_out: Any = None) -> dict[str, np.ndarray]:
        """Each example's term of every parameter gradient, from the inner graph's
        per-example backward pass (``Graph.backward(per_example=True)``)."""
        op = self._operating_point("per_example_grads")
        self._inner(op, "per_example_grads")
        g = self._validate_g_out(op, g_out)
        grads = self.graph.backward(g, per_example=True, input_grad=False)
        zero = np.zeros((g.shape[0], self.d), g.dtype)
        return {name: grads.params.get(p, zero) for name, p in self.params.items()}

    def train(self, mode: bool = True) -> MultiHeadAttention:
        super().train(mode)
        self.graph.train(mode)
        return self

    def __repr__(self) -> str:
        extra = (", causal=True" if self.causal else "") + ("" if self.bias else ", bias=False")
        return f"MultiHeadAttention({self.d}, n_heads={self.n_heads}{extra})"
