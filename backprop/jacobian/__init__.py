"""Structured Jacobian operators.

A Jacobian here is an object, not a matrix. For one example it stands for the
matrix ``L`` of shape ``(M, N)`` (``M`` outputs, ``N`` inputs, each counted as
the entries of that example's tensor, chapter 14.3), and it holds a batch of
``B`` such matrices. It keeps the structure that makes the backward pass cheap
(a diagonal is a vector, ``I ⊗ x_inᵀ`` is ``x_in``) and still becomes a matrix
when a person wants to look at one.

Conventions, stated once for every class of this package:

- ``g`` is a batch of row vectors, an array of shape ``(B, M)``; ``vjp(g)`` is
  the backward product ``g L`` (eq. 14.10), shape ``(B, N)``.
- ``vjp_sum(g)`` is ``sum_b g_b L_b``, shape ``(N,)``: a parameter gradient,
  computed without per-example copies where the structure allows.
- ``jvp(u)`` is the forward product ``L u`` for ``u`` of shape ``(B, N)``.
- ``to_dense()`` has shape ``(B, M, N)``; ``to_sparse(b)`` is example ``b`` as a
  ``scipy.sparse`` CSR array of shape ``(M, N)``; ``stacked_sparse()`` is the
  ``B`` examples stacked, ``(B*M, N)``; ``block_diagonal()`` is the batch as one
  block-diagonal matrix ``(B*M, B*N)``.
- ``A @ B`` is the chain rule, ``A`` applied after ``B`` (eq. 14.2), and
  ``A + B`` the sum of two paths (eq. 14.46). Both keep the structure where they
  can (diagonal times diagonal is diagonal, and so on): each class declares its
  rules next to its definition (``algebra.compose_rule``, ``algebra.sum_rule``),
  and a pair with no rule becomes the generic ``Product`` or ``Sum``.
- ``nnz`` counts the entries one example's matrix stores.
- Index orders are row-major (C order): a tensor's entries are counted as numpy
  flattens it.

Modules: ``base`` (the ``Jacobian`` protocol), ``algebra`` (dispatch of ``@``
and ``+``), ``basic`` (Dense, Diagonal, Identity, Sparse), ``structure``
(Selection, Tile, Rows), ``conv`` (Convolution, ConvolutionTranspose,
ConvolutionWeight), ``kronecker`` (Kronecker, KroneckerMatrix, RepeatedBlock,
BlockKronecker), ``lowrank`` (DiagonalPlusLowRank), ``selection``
(IndexSelection), ``blocks`` (DiagonalBlocks, a grid of diagonals),
``combinators`` (Product, Sum) and ``explicit`` (the literal product of
Algorithm 14.1).

This package knows nothing of layers.
"""

from backprop.jacobian.algebra import add, compose, compose_rule, sum_rule
from backprop.jacobian.base import DENSE_LIMIT_BYTES, Jacobian
from backprop.jacobian.basic import Dense, Diagonal, Identity, Sparse
from backprop.jacobian.blocks import DiagonalBlocks
from backprop.jacobian.combinators import Product, Sum
from backprop.jacobian.conv import Convolution, ConvolutionTranspose, ConvolutionWeight
from backprop.jacobian.coupled import WholeBatch
from backprop.jacobian.explicit import explicit_vjp
from backprop.jacobian.kronecker import BlockKronecker, Kronecker, KroneckerMatrix, RepeatedBlock
from backprop.jacobian.lowrank import DiagonalPlusLowRank
from backprop.jacobian.selection import IndexSelection
from backprop.jacobian.structure import Rows, Selection, Tile

__all__ = [
    "DENSE_LIMIT_BYTES",
    "BlockKronecker",
    "Convolution",
    "ConvolutionTranspose",
    "ConvolutionWeight",
    "Dense",
    "Diagonal",
    "DiagonalBlocks",
    "DiagonalPlusLowRank",
    "Identity",
    "IndexSelection",
    "Jacobian",
    "Kronecker",
    "KroneckerMatrix",
    "Product",
    "RepeatedBlock",
    "Rows",
    "Selection",
    "Sparse",
    "Sum",
    "Tile",
    "WholeBatch",
    "add",
    "compose",
    "compose_rule",
    "explicit_vjp",
    "sum_rule",
]
