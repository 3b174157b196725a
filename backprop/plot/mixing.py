"""Three ways to map a sequence of tokens to another, drawn as their Jacobians.

The transformers chapter closes by comparing layers that are all, for one input, a
matrix acting on the whole token sequence: a fully connected layer, a convolution and
self-attention. Here the sequence is ``X`` ``(T, d)`` (``T`` tokens of ``d`` features),
every layer maps it to ``Y`` ``(T, d)``, and the matrix is the engine's input Jacobian
``∂vec(Y)/∂vec(X)`` ``(T·d, T·d)``, rows and columns token-major (the ``d`` features of
token ``t`` are entries ``t·d … t·d + d − 1``), so its ``d × d`` block ``(t, s)`` says
how token ``s`` of the input moves token ``t`` of the output:

- a token-wise ``Linear`` (``y_t = W x_t + b``, the chapter's per-token layer and the
  query/key/value projections): block ``(t, s)`` is ``W`` when ``s = t`` and zero
  otherwise, ``I_T ⊗ W``, block diagonal;
- a convolution over the token axis with a kernel of ``k`` taps (``y_t = Σ_j W_j
  x_{t+j−⌊k/2⌋} + b``, zero padding): block ``(t, s)`` is tap ``W_{s−t+⌊k/2⌋}``, which
  depends only on ``s − t`` (block Toeplitz: constant along each block diagonal) and is
  zero beyond ``⌊k/2⌋`` tokens away. Built from existing layers: ``Transpose`` to
  ``(d, T)``, ``Reshape`` to an image ``(d, 1, T)``, a ``Conv2d`` with a ``1 × k``
  kernel, and back;
- self-attention (``MultiHeadAttention``): ``y_t = Σ_s A_ts W_o W_v x_s + …`` with the
  weights ``A`` themselves functions of every token, so every block is in general
  non-zero, and the whole matrix changes with ``X``.

The first two matrices are the same for every input (the layers are linear, up to the
bias); the third is the Jacobian of a nonlinear map at ``X``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.plot._figure import DIVERGING, pyplot, symmetric_limit

#: The three layers, in the order drawn.
MIXERS = ("token-wise Linear", "convolution over tokens", "self-attention")


def token_mixers(
    d: int, *, kernel_size: int = 3, n_heads: int = 1, rng: Any = None, dtype: Any = None
) -> dict[str, Any]:
    """The three layers of ``MIXERS`` on tokens ``(B, T, d)``, weights drawn with ``rng``:
    ``Linear(d, d)``, the convolution over tokens (a ``Sequential``; ``kernel_size`` odd,
    zero padding keeps ``T``) and ``MultiHeadAttention(d, n_heads)`` with its biases
    drawn too (torch starts them at zero)."""
    from backprop.graph import Sequential
    from backprop.layers import Conv2d, Linear, MultiHeadAttention, Reshape, Transpose

    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size % 2 != 1:
        raise ValueError(
            f"token_mixers: kernel_size must be an odd positive integer (so that zero padding "
            f"keeps the number of tokens), got {kernel_size!r}"
        )
    gen = np.random.default_rng(rng)
    dt = np.dtype(np.float64 if dtype is None else dtype)
    conv = Sequential(
        [
            Transpose((1, 0)),  # (T, d) -> (d, T): the features become channels
            Reshape(d, 1, -1),  # an image of height 1 and width T
            Conv2d(d, d, (1, kernel_size), padding=(0, kernel_size // 2), rng=gen, dtype=dt),
            Reshape(d, -1),
            Transpose((1, 0)),  # back to (T, d)
        ]
    )
    attention = MultiHeadAttention(d, n_heads, rng=gen, dtype=dt)
    for name in ("bq", "bk", "bv", "bo"):
        p = attention.params[name]
        p.value = (0.5 * gen.standard_normal(p.shape)).astype(dt)
    mixers = (Linear(d, d, rng=gen, dtype=dt), conv, attention)
    return dict(zip(MIXERS, mixers, strict=True))


def mixing_jacobians(x: Any, mixers: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """``{name: ∂vec(Y)/∂vec(X)}`` ``(T·d, T·d)`` of each layer in ``mixers`` (by default
    ``token_mixers(d, rng=0)``) at the one sequence ``x`` ``(T, d)``: each layer runs
    forward on ``x[None]`` and its input Jacobian is ``jacobians()[0].to_dense()[0]``."""
    X = np.asarray(x)
    if X.ndim != 2 or not X.size:
        raise ValueError(f"mixing_jacobians: x has shape {X.shape}; expected one sequence (T, d)")
    mixers = token_mixers(X.shape[1], rng=0, dtype=X.dtype) if mixers is None else mixers
    found = {}
    for name, layer in mixers.items():
        layer.forward(X[None])
        found[name] = np.asarray(layer.jacobians()[0].to_dense()[0])
    return found


def _title(name: str, mixers: dict[str, Any], T: int) -> str:
    layer = mixers[name]
    if name == MIXERS[0]:
        return f"{name}: I_{T} ⊗ W, block diagonal"
    if name == MIXERS[1]:
        k = layer.layers[2].kernel_size[1]
        return f"{name} ({k} taps): block Toeplitz"
    heads = getattr(layer, "n_heads", 1)
    return f"{name} ({heads} head{'s' * (heads > 1)}): dense, depends on X"


def plot_three_matrices(
    x: Any = None,
    mixers: dict[str, Any] | None = None,
    *,
    T: int = 8,
    d: int = 4,
    rng: Any = 0,
    title: str | None = None,
) -> Any:
    """The input Jacobians of the three layers of ``token_mixers`` side by side, for one
    token sequence ``x`` ``(T, d)`` (by default drawn from N(0, 1) with ``rng``, ``T``
    tokens of ``d`` features); ``mixers`` may give the layers (``token_mixers``' keys).

    Each panel is a ``(T·d, T·d)`` matrix on its own symmetric colour scale (zero is
    white), thin lines between the ``d × d`` token blocks. Returns the figure; its
    Axes are the three panels, then their colour bars.
    """
    gen = np.random.default_rng(rng)
    X = gen.standard_normal((T, d)) if x is None else np.asarray(x)
    if X.ndim != 2:
        raise ValueError(f"plot_three_matrices: x has shape {X.shape}; expected (T, d)")
    if mixers is None:
        mixers = token_mixers(X.shape[1], rng=gen, dtype=X.dtype)
    if tuple(mixers) != MIXERS:
        raise ValueError(f"plot_three_matrices: mixers must have the keys {MIXERS}")
    Js = mixing_jacobians(X, mixers)
    n_tokens, n_features = X.shape
    fig, axes = pyplot().subplots(1, 3, figsize=(14.0, 5.0), layout="constrained")
    for ax, (name, J) in zip(axes, Js.items(), strict=True):
        lim = symmetric_limit(J)
        image = ax.imshow(J, cmap=DIVERGING, vmin=-lim, vmax=lim, interpolation="nearest")
        for k in range(n_features, J.shape[0], n_features):
            ax.axhline(k - 0.5, color="0.8", lw=0.5)
            ax.axvline(k - 0.5, color="0.8", lw=0.5)
        ticks = np.arange(n_tokens) * n_features + (n_features - 1) / 2
        ax.set_xticks(ticks, [str(t) for t in range(n_tokens)])
        ax.set_yticks(ticks, [str(t) for t in range(n_tokens)])
        ax.tick_params(labelsize=7, length=0)
        ax.set_xlabel("input token s (d features each)", fontsize=8)
        ax.set_ylabel("output token t", fontsize=8)
        ax.set_title(_title(name, mixers, n_tokens), fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.7)
    fig.suptitle(
        title
        or f"∂Y/∂X of one sequence of {n_tokens} tokens (d = {n_features}): three ways to mix "
        f"tokens, as matrices"
    )
    return fig
