"""Every structured Jacobian in ``backprop.jacobian`` against plain dense numpy algebra.

One table, ``CASES``: each row builds one Jacobian object and, independently, the
dense batch of matrices ``(B, M, N)`` it stands for (from loops, ``np.kron``,
``np.diag``). One battery runs over the table: every product and view of the
object, its composition with the other rows and its sums, are checked against
that reference with ``einsum``/``matmul``, never against the object's own
``to_dense``. A new class is one row here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse as sp

from backprop.jacobian import (
    BlockKronecker,
    Convolution,
    ConvolutionTranspose,
    ConvolutionWeight,
    Dense,
    Diagonal,
    DiagonalBlocks,
    DiagonalPlusLowRank,
    Identity,
    IndexSelection,
    Jacobian,
    Kronecker,
    KroneckerMatrix,
    Product,
    RepeatedBlock,
    Rows,
    Selection,
    Sparse,
    Sum,
    Tile,
    explicit_vjp,
)
from backprop.jacobian.conv import ConvGeometry

B = 3

Case = tuple[Jacobian, np.ndarray]
Factory = Callable[[np.random.Generator], Case]


def _diag(d: np.ndarray) -> np.ndarray:
    """A batch of diagonal matrices from ``d`` ``(B, N)``."""
    return np.stack([np.diag(row) for row in d])


def _same(A: np.ndarray) -> np.ndarray:
    return np.broadcast_to(A, (B, *A.shape)).copy()


# -- the table: one row per kind ----------------------------------------------------------


def dense_shared(rng: np.random.Generator) -> Case:
    A = rng.standard_normal((4, 5))
    return Dense(A, batch=B), _same(A)


def dense_per_example(rng: np.random.Generator) -> Case:
    A = rng.standard_normal((B, 4, 5))
    return Dense(A.copy()), A


def diagonal(rng: np.random.Generator) -> Case:
    d = rng.standard_normal((B, 4))
    return Diagonal(d.copy()), _diag(d)


def identity(rng: np.random.Generator) -> Case:
    return Identity(4, B), _same(np.eye(4))


def kronecker(rng: np.random.Generator) -> Case:
    # I_m ⊗ x_bᵀ: row i holds x_b in columns i*n .. i*n+n-1 (eq. 14.14).
    m, n = 2, 3
    x = rng.standard_normal((B, n))
    ref = np.zeros((B, m, m * n))
    for b in range(B):
        for i in range(m):
            ref[b, i, i * n : (i + 1) * n] = x[b]
    return Kronecker(m, x.copy()), ref


def kronecker_m4(rng: np.random.Generator) -> Case:
    m, n = 4, 2
    x = rng.standard_normal((B, n))
    return Kronecker(m, x.copy()), np.stack([np.kron(np.eye(m), x[b][None, :]) for b in range(B)])


def kronecker_matrix_positions(rng: np.random.Generator) -> Case:
    # out[p, i] = Σ_k W[i, k] X_b[p, k]: row p*m + i holds X_b[p] at columns i*N ...
    m, P, N = 2, 3, 4
    X = rng.standard_normal((B, P, N))
    ref = np.zeros((B, P * m, m * N))
    for b, p, i in itertools.product(range(B), range(P), range(m)):
        ref[b, p * m + i, i * N : (i + 1) * N] = X[b, p]
    return KroneckerMatrix(m, X.copy(), rows="positions"), ref


def kronecker_matrix_channels(rng: np.random.Generator) -> Case:
    # Channels-major rows (i, p): exactly I_m ⊗ X_b (the im2col form of a convolution).
    m, P, N = 3, 2, 2
    X = rng.standard_normal((B, P, N))
    ref = np.stack([np.kron(np.eye(m), X[b]) for b in range(B)])
    return KroneckerMatrix(m, X.copy(), rows="channels"), ref


def softmax_jacobian(rng: np.random.Generator) -> Case:
    z = rng.standard_normal((B, 4))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    ref = np.stack([np.diag(p[b]) - np.outer(p[b], p[b]) for b in range(B)])
    return DiagonalPlusLowRank.softmax(p.copy()), ref


def diagonal_plus_rank2(rng: np.random.Generator) -> Case:
    d = rng.standard_normal((B, 4))
    U, V = rng.standard_normal((2, B, 4, 2))
    ref = np.stack([np.diag(d[b]) + U[b] @ V[b].T for b in range(B)])
    return DiagonalPlusLowRank(d.copy(), U.copy(), V.copy()), ref


def repeated_block(rng: np.random.Generator) -> Case:
    A = rng.standard_normal((2, 3))
    return RepeatedBlock(2, A.copy(), B), _same(np.kron(np.eye(2), A))


def _block_diagonal(blocks: list[np.ndarray]) -> np.ndarray:
    return sp.block_diag(blocks).toarray()


def block_kronecker_left(rng: np.random.Generator) -> Case:
    # ∂(A C)/∂A for P = 2 products of A_p (3 × 2) and C_p (2 × 4): blocks I_3 ⊗ C_pᵀ.
    C = rng.standard_normal((B, 2, 2, 4))
    ref = np.stack(
        [_block_diagonal([np.kron(np.eye(3), C[b, p].T) for p in range(2)]) for b in range(B)]
    )
    return BlockKronecker(C.swapaxes(2, 3), 3, "left"), ref


def block_kronecker_right(rng: np.random.Generator) -> Case:
    # ∂(A C)/∂C for P = 2 products of A_p (3 × 2) and C_p (2 × 4): blocks A_p ⊗ I_4.
    A = rng.standard_normal((B, 2, 3, 2))
    ref = np.stack(
        [_block_diagonal([np.kron(A[b, p], np.eye(4)) for p in range(2)]) for b in range(B)]
    )
    return BlockKronecker(A.copy(), 4, "right"), ref


def rows(rng: np.random.Generator) -> Case:
    # Entries 1..3 of a 6-vector: [0 I 0], 3 × 6.
    ref = np.zeros((3, 6))
    ref[:, 1:4] = np.eye(3)
    return Rows(6, 1, 3, B), _same(ref)


def selection(rng: np.random.Generator) -> Case:
    # Rows 2..4 of a 6-vector: [0; I; 0] (eq. 14.41).
    ref = np.zeros((6, 3))
    ref[2:5, :] = np.eye(3)
    return Selection(6, 2, 3, B), _same(ref)


def tile(rng: np.random.Generator) -> Case:
    # [I; I; I] for n = 2 (eq. 14.45).
    return Tile(3, 2, B), _same(np.vstack([np.eye(2)] * 3))


def sparse(rng: np.random.Generator) -> Case:
    A = np.array([[1.5, 0, 0, -2.0], [0, 0, 3.0, 0], [0, 0.5, 0, 0]])
    return Sparse(sp.csr_array(A), B), _same(A)


def product(rng: np.random.Generator) -> Case:
    # A per-example Dense (2, 4) after a Kronecker (4, 4*2): both factors vary per example.
    A = rng.standard_normal((B, 2, 4))
    inner, inner_ref = kronecker_m4(rng)
    return Product(Dense(A.copy()), inner), np.matmul(A, inner_ref)


def product_shared(rng: np.random.Generator) -> Case:
    A = rng.standard_normal((5, 6))
    _, sel_ref = selection(rng)
    return Product(Dense(A, batch=B), Selection(6, 2, 3, B)), np.matmul(A, sel_ref)


def sum_(rng: np.random.Generator) -> Case:
    A = rng.standard_normal((B, 4, 4))
    d = rng.standard_normal((B, 4))
    ref = A + _diag(d) + np.eye(4)
    return Sum([Dense(A.copy()), Diagonal(d.copy()), Identity(4, B)]), ref


# -- convolution: references from loops over outputs and taps --


def _conv_entries(geo: ConvGeometry) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """``(row, col, w)``: the Toeplitz matrix of a convolution holds ``W[w]`` at
    ``(row, col)``, for every output entry and every tap inside the input."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    Ho = (geo.H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (geo.W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    Cg, og = geo.c_in // geo.groups, geo.c_out // geo.groups
    found = []
    for o, i, j, c, ky, kx in itertools.product(
        range(geo.c_out), range(Ho), range(Wo), range(Cg), range(kh), range(kw)
    ):
        y, x = i * sh - ph + ky * dh, j * sw - pw + kx * dw
        if 0 <= y < geo.H and 0 <= x < geo.W:
            ch = (o // og) * Cg + c
            found.append(((o * Ho + i) * Wo + j, (ch * geo.H + y) * geo.W + x, (o, c, ky, kx)))
    return found


_GEO = ConvGeometry(2, 5, 4, 3, (3, 2), stride=(2, 1), padding=(1, 1))
# Its output (2·4·5 = 40 entries) is _GEO's input, so the two rows chain.
_GEO_GROUPED = ConvGeometry(4, 4, 5, 2, (3, 2), padding=(1, 1), dilation=(1, 2), groups=2)


def _toeplitz(W: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    entries = _conv_entries(geo)
    n_out = max(r for r, _, _ in entries) + 1  # every output row has a tap here
    ref = np.zeros((n_out, geo.c_in * geo.H * geo.W))
    for r, c, w in entries:
        ref[r, c] = W[w]
    return ref


def convolution(rng: np.random.Generator) -> Case:
    W = rng.standard_normal((3, 2, 3, 2))
    return Convolution(W.copy(), _GEO, B), _same(_toeplitz(W, _GEO))


def convolution_grouped(rng: np.random.Generator) -> Case:
    W = rng.standard_normal((2, 2, 3, 2))
    return Convolution(W.copy(), _GEO_GROUPED, B), _same(_toeplitz(W, _GEO_GROUPED))


def convolution_transpose(rng: np.random.Generator) -> Case:
    W = rng.standard_normal((3, 2, 3, 2))
    J = ConvolutionTranspose(Convolution(W.copy(), _GEO, B), output_padding=(1, 0))
    return J, _same(_toeplitz(W, _GEO).T)


def convolution_weight(rng: np.random.Generator) -> Case:
    # ∂y/∂W[w] at output row r is x_b at the input entry that tap w reads.
    geo = _GEO_GROUPED
    x = rng.standard_normal((B, geo.c_in, geo.H, geo.W))
    entries = _conv_entries(geo)
    ref = np.zeros((B, max(r for r, _, _ in entries) + 1, 2 * 2 * 3 * 2))
    for r, c, w in entries:
        ref[:, r, np.ravel_multi_index(w, (2, 2, 3, 2))] = x.reshape(B, -1)[:, c]
    return ConvolutionWeight(x.copy(), geo), ref


def convolution_weight_transposed(rng: np.random.Generator) -> Case:
    # y = Lᵀ x: ∂y[col]/∂W[w] is x_b[row] wherever L holds W[w] at (row, col).
    geo = _GEO
    Ho, Wo = 3, 5  # (5 + 2 - 2 - 1) // 2 + 1 and (4 + 2 - 1 - 1) + 1
    x = rng.standard_normal((B, geo.c_out, Ho, Wo))
    ref = np.zeros((B, geo.c_in * geo.H * geo.W, 3 * 2 * 3 * 2))
    for r, c, w in _conv_entries(geo):
        ref[:, c, np.ravel_multi_index(w, (3, 2, 3, 2))] = x.reshape(B, -1)[:, r]
    return ConvolutionWeight(x.copy(), geo, transposed=True), ref


def diagonal_blocks(rng: np.random.Generator) -> Case:
    # 2 × 3 blocks of 4 × 4 diagonals: block (r, c) of example b is diag(d[b, r, c]).
    d = rng.standard_normal((B, 2, 3, 4))
    ref = np.zeros((B, 8, 12))
    for b, r, c, k in itertools.product(range(B), range(2), range(3), range(4)):
        ref[b, r * 4 + k, c * 4 + k] = d[b, r, c, k]
    return DiagonalBlocks(d.copy()), ref


def diagonal_blocks_column(rng: np.random.Generator) -> Case:
    # One column of blocks (an LSTM's [∂h'/∂c; ∂c'/∂c]): 3 × 1 blocks of 5 × 5 diagonals.
    d = rng.standard_normal((B, 3, 1, 5))
    ref = np.concatenate([_diag(d[:, r, 0]) for r in range(3)], axis=1)
    return DiagonalBlocks(d.copy(), "column"), ref


def index_selection(rng: np.random.Generator) -> Case:
    # Row i of example b holds a 1 at column index[b, i] (columns may repeat: overlapping
    # pooling windows).
    index = rng.integers(0, 6, size=(B, 4))
    ref = np.zeros((B, 4, 6))
    for b, i in itertools.product(range(B), range(4)):
        ref[b, i, index[b, i]] = 1.0
    return IndexSelection(index.copy(), 6, label="argmax"), ref


def index_selection_scaled(rng: np.random.Generator) -> Case:
    index = rng.integers(0, 5, size=(B, 3))
    values = rng.standard_normal((B, 3))
    ref = np.zeros((B, 3, 5))
    for b, i in itertools.product(range(B), range(3)):
        ref[b, i, index[b, i]] = values[b, i]
    return IndexSelection(index.copy(), 5, values=values.copy()), ref


CASES: dict[str, Factory] = {
    "Dense-shared": dense_shared,
    "Dense-per-example": dense_per_example,
    "Diagonal": diagonal,
    "Identity": identity,
    "Kronecker": kronecker,
    "KroneckerMatrix-positions": kronecker_matrix_positions,
    "KroneckerMatrix-channels": kronecker_matrix_channels,
    "DiagonalPlusLowRank-softmax": softmax_jacobian,
    "DiagonalPlusLowRank-rank2": diagonal_plus_rank2,
    "RepeatedBlock": repeated_block,
    "BlockKronecker-left": block_kronecker_left,
    "BlockKronecker-right": block_kronecker_right,
    "Rows": rows,
    "Selection": selection,
    "Tile": tile,
    "Sparse": sparse,
    "Product": product,
    "Product-shared": product_shared,
    "Sum": sum_,
    "Convolution": convolution,
    "Convolution-grouped-dilated": convolution_grouped,
    "ConvolutionTranspose": convolution_transpose,
    "ConvolutionWeight-grouped": convolution_weight,
    "ConvolutionWeight-transposed": convolution_weight_transposed,
    "DiagonalBlocks": diagonal_blocks,
    "DiagonalBlocks-column": diagonal_blocks_column,
    "IndexSelection": index_selection,
    "IndexSelection-scaled": index_selection_scaled,
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param](np.random.default_rng(7))


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


# -- the battery: views and products -----------------------------------------------------


def test_shape_and_batch(case: Case) -> None:
    J, ref = case
    assert (J.batch, *J.shape) == ref.shape


def test_vjp(case: Case) -> None:
    J, ref = case
    g = np.random.default_rng(1).standard_normal((B, ref.shape[1]))
    g0 = g.copy()
    _close(J.vjp(g), np.einsum("bm,bmn->bn", g, ref))
    np.testing.assert_array_equal(g, g0)


def test_vjp_sum(case: Case) -> None:
    J, ref = case
    g = np.random.default_rng(2).standard_normal((B, ref.shape[1]))
    _close(J.vjp_sum(g), np.einsum("bm,bmn->n", g, ref))


def test_jvp(case: Case) -> None:
    J, ref = case
    u = np.random.default_rng(3).standard_normal((B, ref.shape[2]))
    _close(J.jvp(u), np.einsum("bmn,bn->bm", ref, u))


def test_dot_product_identity(case: Case) -> None:
    # <v, L u> = <v L, u> for every example: jvp and vjp are each other's transpose.
    J, _ = case
    rng = np.random.default_rng(8)
    u = rng.standard_normal((B, J.shape[1]))
    v = rng.standard_normal((B, J.shape[0]))
    _close(np.einsum("bm,bm->b", v, J.jvp(u)), np.einsum("bn,bn->b", J.vjp(v), u))


def test_products_refuse_wrong_shapes(case: Case) -> None:
    J, _ = case
    M, N = J.shape
    for method, good in (("vjp", (B, M)), ("vjp_sum", (B, M)), ("jvp", (B, N))):
        for bad in ((B + 1, good[1]), (B, good[1] + 1), (B * good[1],)):
            with pytest.raises(
                ValueError, match=rf"{method[:3]} takes \w of shape \({B}, {good[1]}\)"
            ):
                getattr(J, method)(np.zeros(bad))


def test_to_dense(case: Case) -> None:
    J, ref = case
    D = J.to_dense()
    assert D.shape == ref.shape
    np.testing.assert_allclose(D, ref, rtol=1e-12, atol=1e-15)


def test_to_sparse_each_example(case: Case) -> None:
    J, ref = case
    for b in range(B):
        S = J.to_sparse(b)
        assert sp.issparse(S)
        assert S.shape == ref.shape[1:]
        np.testing.assert_allclose(S.toarray(), ref[b], rtol=1e-12, atol=1e-15)


def test_stacked_sparse(case: Case) -> None:
    J, ref = case
    S = J.stacked_sparse()
    assert sp.issparse(S)
    np.testing.assert_allclose(S.toarray(), np.concatenate(list(ref), axis=0), atol=1e-15)


def test_block_diagonal(case: Case) -> None:
    J, ref = case
    _, m, n = ref.shape
    expected = np.zeros((B * m, B * n))
    for b in range(B):
        expected[b * m : (b + 1) * m, b * n : (b + 1) * n] = ref[b]
    S = J.block_diagonal()
    assert sp.issparse(S)
    np.testing.assert_allclose(S.toarray(), expected, atol=1e-15)


def test_nnz_counts_one_examples_entries(case: Case) -> None:
    # The data are generic (no accidental zeros), so the stored entries are the nonzeros.
    J, ref = case
    assert J.nnz == np.count_nonzero(ref[0])
    S = J.to_sparse(0)
    S.eliminate_zeros()
    assert J.nnz == S.nnz


def test_repr_says_kind_and_size(case: Case) -> None:
    J, ref = case
    text = repr(J)
    assert text.startswith(f"{type(J).__name__} {ref.shape[1]}×{ref.shape[2]}")
    assert f"batch of {B}" in text
    assert len(text) < 200  # a description, not a wall of numbers


def test_explicit_vjp_matches_dense_algebra(case: Case) -> None:
    J, ref = case
    g = np.random.default_rng(4).standard_normal((B, ref.shape[1]))
    _close(explicit_vjp(J, g), np.einsum("bm,bmn->bn", g, ref))
    _close(explicit_vjp(J, g, sum_batch=True), np.einsum("bm,bmn->n", g, ref))


def test_shared_flag_matches_reference(case: Case) -> None:
    J, ref = case
    if J.shared:
        np.testing.assert_array_equal(ref, np.broadcast_to(ref[0], ref.shape))


# -- the battery: composition and sums ----------------------------------------------------


def _partners(M: int, N: int, rng: np.random.Generator) -> list[tuple[str, Case]]:
    """Jacobians to put after a case (``side == "outer"``, ``M`` inputs) or before it
    (``"inner"``, ``N`` outputs): Identity, Diagonal and Dense of matching size, and
    every table row whose shape fits."""
    dm, dn = rng.standard_normal((B, M)), rng.standard_normal((B, N))
    Am, An = rng.standard_normal((2, M)), rng.standard_normal((N, 3))
    out: list[tuple[str, Case]] = [
        ("outer", (Identity(M, B), _same(np.eye(M)))),
        ("inner", (Identity(N, B), _same(np.eye(N)))),
        ("outer", (Diagonal(dm), _diag(dm))),
        ("inner", (Diagonal(dn), _diag(dn))),
        ("outer", (Dense(Am, batch=B), _same(Am))),
        ("inner", (Dense(An, batch=B), _same(An))),
    ]
    for make in CASES.values():
        other, ref = make(rng)
        if other.shape[1] == M:
            out.append(("outer", (other, ref)))
        if other.shape[0] == N:
            out.append(("inner", (other, ref)))
    return out


def test_composition_equals_matrix_product(case: Case) -> None:
    J, ref = case
    rng = np.random.default_rng(9)
    partners = _partners(*J.shape, rng)
    for side, (other, other_ref) in partners:
        if side == "outer":
            C, expected = other @ J, np.matmul(other_ref, ref)
        else:
            C, expected = J @ other, np.matmul(ref, other_ref)
        assert C.shape == expected.shape[1:] and C.batch == B
        np.testing.assert_allclose(C.to_dense(), expected, rtol=1e-12, atol=1e-12)
        g = rng.standard_normal((B, C.shape[0]))
        _close(C.vjp(g), np.einsum("bm,bmn->bn", g, expected))
        u = rng.standard_normal((B, C.shape[1]))
        _close(C.jvp(u), np.einsum("bmn,bn->bm", expected, u))
    assert len(partners) > 6  # Identity, Diagonal, Dense on both sides, and table rows


def test_identity_is_neutral_for_every_kind(case: Case) -> None:
    J, _ = case
    M, N = J.shape
    assert (Identity(M, B) @ J) is J
    if not isinstance(J, Identity):  # I @ I is one of the two, either will do
        assert (J @ Identity(N, B)) is J


def test_sum_equals_matrix_sum(case: Case) -> None:
    J, ref = case
    rng = np.random.default_rng(10)
    J2, ref2 = CASES[_name_of(J, ref)](rng)  # the same kind, other values
    A = rng.standard_normal((B, *J.shape))
    for S, expected in ((J + J2, ref + ref2), (J + Dense(A.copy()), ref + A)):
        assert S.shape == J.shape
        np.testing.assert_allclose(S.to_dense(), expected, rtol=1e-12, atol=1e-12)
        g = rng.standard_normal((B, J.shape[0]))
        _close(S.vjp(g), np.einsum("bm,bmn->bn", g, expected))
        _close(explicit_vjp(S, g), np.einsum("bm,bmn->bn", g, expected))


def _name_of(J: Jacobian, ref: np.ndarray) -> str:
    """The table row that built ``J`` (same class and same reference)."""
    for name, make in CASES.items():
        K, r = make(np.random.default_rng(7))
        if type(K) is type(J) and r.shape == ref.shape and np.array_equal(r, ref):
            return name
    raise AssertionError(f"no row builds {J!r}")


# -- the rules: which structure each pair keeps --------------------------------------------

R = np.random.default_rng(11)


def _d(n: int) -> Diagonal:
    return Diagonal(R.standard_normal((B, n)))


def _dplr(n: int, r: int = 1) -> DiagonalPlusLowRank:
    U, V = R.standard_normal((2, B, n, r))
    return DiagonalPlusLowRank(R.standard_normal((B, n)), U, V)


def _dense(m: int, n: int, shared: bool = True) -> Dense:
    if shared:
        return Dense(R.standard_normal((m, n)), batch=B)
    return Dense(R.standard_normal((B, m, n)))


def _km(m: int = 2, P: int = 3, N: int = 2) -> KroneckerMatrix:
    return KroneckerMatrix(m, R.standard_normal((B, P, N)))


def _rb(P: int, m: int, n: int) -> RepeatedBlock:
    return RepeatedBlock(P, R.standard_normal((m, n)), B)


def _db(rows: int, cols: int, n: int) -> DiagonalBlocks:
    return DiagonalBlocks(R.standard_normal((B, rows, cols, n)))


COMPOSE_RULES: dict[str, tuple[Callable[[], Jacobian], Callable[[], Jacobian], type]] = {
    # name: (outer, inner, the class the rules promise)
    "Diagonal@Diagonal": (lambda: _d(4), lambda: _d(4), Diagonal),
    "Dense@Dense shared": (lambda: _dense(2, 3), lambda: _dense(3, 4), Dense),
    "Dense@Dense per-example after shared": (
        lambda: _dense(2, 3, False),
        lambda: _dense(3, 4),
        Dense,
    ),
    "Dense@Dense per-example": (lambda: _dense(2, 3, False), lambda: _dense(3, 4, False), Dense),
    "Dense@Dense shared after per-example": (
        lambda: _dense(2, 3),
        lambda: _dense(3, 4, False),
        Dense,
    ),
    "Diagonal@Dense": (lambda: _d(3), lambda: _dense(3, 3), Dense),
    "Dense@Diagonal": (lambda: _dense(3, 3), lambda: _d(3), Dense),
    "Sparse@Sparse": (
        lambda: Sparse(np.array([[1.0, 0, 2], [0, 3, 0]]), B),
        lambda: Sparse(np.array([[0, 1.0], [4, 0], [0, -1]]), B),
        Sparse,
    ),
    "Diagonal@DiagonalPlusLowRank": (lambda: _d(4), lambda: _dplr(4), DiagonalPlusLowRank),
    "DiagonalPlusLowRank@Diagonal": (lambda: _dplr(4), lambda: _d(4), DiagonalPlusLowRank),
    "DiagonalPlusLowRank@DiagonalPlusLowRank": (
        lambda: _dplr(4, 2),
        lambda: _dplr(4, 1),
        DiagonalPlusLowRank,
    ),
    "RepeatedBlock@RepeatedBlock": (lambda: _rb(3, 2, 4), lambda: _rb(3, 4, 2), RepeatedBlock),
    "RepeatedBlock@RepeatedBlock other P": (lambda: _rb(2, 3, 6), lambda: _rb(3, 4, 2), Product),
    "Diagonal@RepeatedBlock": (lambda: _d(6), lambda: _rb(3, 2, 4), Product),
    "DiagonalBlocks@DiagonalBlocks": (lambda: _db(2, 4, 3), lambda: _db(4, 1, 3), DiagonalBlocks),
    "DiagonalBlocks@DiagonalBlocks other n": (lambda: _db(1, 2, 3), lambda: _db(3, 1, 2), Product),
    "Diagonal@DiagonalBlocks": (lambda: _d(6), lambda: _db(2, 4, 3), DiagonalBlocks),
    "DiagonalBlocks@Diagonal": (lambda: _db(2, 4, 3), lambda: _d(12), DiagonalBlocks),
    "DiagonalBlocks@Dense": (lambda: _db(2, 4, 3), lambda: _dense(12, 5), Product),
    "Rows@Tile, one whole copy": (lambda: Rows(6, 2, 2, B), lambda: Tile(3, 2, B), Identity),
    "Rows@Tile, part of one copy": (lambda: Rows(9, 4, 2, B), lambda: Tile(3, 3, B), Rows),
    "Rows@Tile, across copies": (lambda: Rows(6, 1, 2, B), lambda: Tile(3, 2, B), Product),
    "Rows@Selection, the same block": (
        lambda: Rows(6, 2, 3, B),
        lambda: Selection(6, 2, 3, B),
        Identity,
    ),
    "Rows@Selection, overlapping": (
        lambda: Rows(6, 1, 3, B),
        lambda: Selection(6, 2, 3, B),
        Sparse,
    ),
    "Rows@Selection, disjoint": (lambda: Rows(6, 0, 2, B), lambda: Selection(6, 3, 3, B), Sparse),
    "Rows@Rows": (lambda: Rows(4, 1, 2, B), lambda: Rows(7, 3, 4, B), Rows),
    # Pairs with no cheaper structure: the generic Product.
    "Dense@Kronecker": (
        lambda: _dense(3, 4),
        lambda: Kronecker(4, R.standard_normal((B, 2))),
        Product,
    ),
    "Tile@Diagonal": (lambda: Tile(3, 2, B), lambda: _d(2), Product),
    "Selection@Dense": (lambda: Selection(6, 1, 3, B), lambda: _dense(3, 4, False), Product),
    "Dense@Selection": (lambda: _dense(2, 6, False), lambda: Selection(6, 3, 3, B), Product),
    "Sum@Dense": (
        lambda: Sum([_dense(3, 3, False), Identity(3, B)]),
        lambda: _dense(3, 2),
        Product,
    ),
    "Sparse@Dense": (
        lambda: Sparse(sp.random_array((3, 4), density=0.5, rng=R) + sp.eye_array(3, 4), B),
        lambda: _dense(4, 2),
        Product,
    ),
    "Dense@KroneckerMatrix": (lambda: _dense(2, 6), lambda: _km(), Product),
}


def _ref(J: Jacobian) -> np.ndarray:
    """The dense batch of a factor, read off its per-example sparse matrices."""
    return np.stack([J.to_sparse(b).toarray() for b in range(J.batch)])


@pytest.mark.parametrize("name", list(COMPOSE_RULES))
def test_composition_rules_keep_their_structure(name: str) -> None:
    make_outer, make_inner, kind = COMPOSE_RULES[name]
    outer, inner = make_outer(), make_inner()
    expected = np.matmul(_ref(outer), _ref(inner))
    C = outer @ inner
    assert type(C) is kind, f"{name}: got {C!r}"
    assert C.shape == expected.shape[1:]
    np.testing.assert_allclose(C.to_dense(), expected, rtol=1e-12, atol=1e-12)
    g = R.standard_normal((B, C.shape[0]))
    _close(C.vjp(g), np.einsum("bm,bmn->bn", g, expected))
    _close(C.vjp_sum(g), np.einsum("bm,bmn->n", g, expected))


def test_rows_of_selection_disjoint_is_an_empty_matrix() -> None:
    Z = Rows(6, 0, 2, B) @ Selection(6, 3, 3, B)
    assert type(Z) is Sparse and Z.nnz == 0 and Z.shape == (2, 3)


def test_output_of_a_branch_is_just_the_next_jacobian() -> None:
    # A graph takes output k of a Branch as Rows_k @ Tile; the consumer's S_k after it
    # must come out as S_k itself: no Product of 0-1 matrices left in the chain.
    n, copies = 3, 4
    S_k = Dense(R.standard_normal((B, 2, n)))
    for k in range(copies):
        picked = Rows(copies * n, k * n, n, B) @ Tile(copies, n, B)
        assert type(picked) is Identity
        assert (S_k @ picked) is S_k


SUM_RULES: dict[str, tuple[Callable[[], Jacobian], Callable[[], Jacobian], type]] = {
    "Diagonal+Diagonal": (lambda: _d(3), lambda: _d(3), Diagonal),
    "Dense+Dense shared": (lambda: _dense(3, 3), lambda: _dense(3, 3), Dense),
    "Dense+Dense per-example": (lambda: _dense(3, 3, False), lambda: _dense(3, 3, False), Dense),
    "Dense shared+per-example": (lambda: _dense(3, 3), lambda: _dense(3, 3, False), Sum),
    "DiagonalPlusLowRank+DiagonalPlusLowRank": (
        lambda: _dplr(4, 2),
        lambda: _dplr(4),
        DiagonalPlusLowRank,
    ),
    "DiagonalPlusLowRank+Diagonal": (lambda: _dplr(4), lambda: _d(4), DiagonalPlusLowRank),
    "Diagonal+DiagonalPlusLowRank": (lambda: _d(4), lambda: _dplr(4), DiagonalPlusLowRank),
    "Identity+DiagonalPlusLowRank": (
        lambda: Identity(4, B),
        lambda: _dplr(4),
        DiagonalPlusLowRank,
    ),
    "RepeatedBlock+RepeatedBlock": (lambda: _rb(2, 3, 2), lambda: _rb(2, 3, 2), RepeatedBlock),
    "RepeatedBlock+RepeatedBlock other P": (lambda: _rb(2, 3, 2), lambda: _rb(1, 6, 4), Sum),
    "KroneckerMatrix+KroneckerMatrix": (lambda: _km(), lambda: _km(), KroneckerMatrix),
    "DiagonalBlocks+DiagonalBlocks": (lambda: _db(2, 3, 2), lambda: _db(2, 3, 2), DiagonalBlocks),
    "DiagonalBlocks+DiagonalBlocks other grid": (lambda: _db(2, 3, 2), lambda: _db(4, 6, 1), Sum),
    "Diagonal+Dense": (lambda: _d(3), lambda: _dense(3, 3), Sum),
}


@pytest.mark.parametrize("name", list(SUM_RULES))
def test_sum_rules_keep_their_structure(name: str) -> None:
    make_a, make_b, kind = SUM_RULES[name]
    a, b = make_a(), make_b()
    expected = _ref(a) + _ref(b)
    S = a + b
    assert type(S) is kind, f"{name}: got {S!r}"
    np.testing.assert_allclose(S.to_dense(), expected, rtol=1e-12, atol=1e-12)
    g = R.standard_normal((B, S.shape[0]))
    _close(S.vjp(g), np.einsum("bm,bmn->bn", g, expected))


def test_sums_flatten() -> None:
    d, A = R.standard_normal((B, 3)), R.standard_normal((3, 3))
    S = Diagonal(d) + Dense(A, batch=B)
    S3 = S + Identity(3, B)
    assert type(S3) is Sum and len(S3.terms) == 3
    S4 = Dense(np.ones((B, 3, 3))) + S3
    assert type(S4) is Sum and len(S4.terms) == 4
    expected = np.ones((B, 3, 3)) + _diag(d) + A + np.eye(3)
    np.testing.assert_allclose(S4.to_dense(), expected, rtol=1e-12)


def test_long_chain_value_and_label() -> None:
    # Three layers' worth of Jacobians: Dense W2 · diag(h') · Dense W1.
    W1, W2 = R.standard_normal((4, 3)), R.standard_normal((2, 4))
    d = R.standard_normal((B, 4))
    C = Dense(W2, batch=B) @ Diagonal(d) @ Dense(W1, batch=B)
    expected = np.stack([W2 @ np.diag(d[b]) @ W1 for b in range(B)])
    np.testing.assert_allclose(C.to_dense(), expected, rtol=1e-12)
    # A chain of 60 diagonals keeps a one-line label that counts its factors.
    chain = Diagonal(np.ones((B, 2)), "d0")
    for k in range(1, 60):
        chain = chain @ Diagonal(np.ones((B, 2)), f"d{k}")
    assert chain.label.startswith("d0 · … · d59") and chain.label.endswith("(60 factors)")


def test_chain_and_sum_shape_mismatch_raise() -> None:
    outer = Dense(R.standard_normal((2, 3)), batch=B)
    inner = Dense(R.standard_normal((4, 5)), batch=B)
    with pytest.raises(ValueError, match=r"3 inputs") as info:
        outer @ inner
    assert "Dense 2×3" in str(info.value) and "Dense 4×5" in str(info.value)
    with pytest.raises(ValueError, match="batches"):
        Dense(R.standard_normal((2, 3)), batch=2) @ Dense(R.standard_normal((3, 3)), batch=3)
    with pytest.raises(ValueError, match="cannot add"):
        Identity(3, B) + Identity(4, B)


# -- the algebra is open: a class defined here, with no rule anywhere ---------------------


class Reversal(Jacobian):
    """``c`` times the anti-identity (reverses the entries), per example: only the
    four methods a subclass must write."""

    kind = "Reversal"

    def __init__(self, c: np.ndarray) -> None:
        super().__init__((c.shape[1], c.shape[1]), c.shape[0], c.dtype, "c · reverse")
        self.c = c

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        return (g * self.c)[:, ::-1]

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        return u[:, ::-1] * self.c

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        n = self.shape[0]
        return sp.csr_array((self.c[b], (np.arange(n), np.arange(n)[::-1])), shape=(n, n))

    @property
    def nnz(self) -> int:
        return self.shape[0]


def test_a_new_class_composes_adds_and_runs_explicitly() -> None:
    n = 4
    c = R.standard_normal((B, n))
    ref = np.stack([np.fliplr(np.diag(c[b])) for b in range(B)])
    J = Reversal(c)
    D, d = _dense(n, n, False), R.standard_normal((B, n))
    g = R.standard_normal((B, n))
    cases = {
        "J@Dense": (J @ D, np.matmul(ref, D.A), Product),
        "Diagonal@J": (Diagonal(d) @ J, np.matmul(_diag(d), ref), Product),
        "J@J": (J @ J, np.matmul(ref, ref), Product),
        "J+Diagonal": (J + Diagonal(d), ref + _diag(d), Sum),
        "Identity@J": (Identity(n, B) @ J, ref, Reversal),
    }
    for name, (C, expected, kind) in cases.items():
        assert type(C) is kind, name
        np.testing.assert_allclose(C.to_dense(), expected, rtol=1e-12, err_msg=name)
        _close(explicit_vjp(C, g), np.einsum("bm,bmn->bn", g, expected))
        _close(explicit_vjp(C, g, sum_batch=True), np.einsum("bm,bmn->n", g, expected))
    _close(explicit_vjp(J, g), np.einsum("bm,bmn->bn", g, ref))
    _close(J.vjp_sum(g), np.einsum("bm,bmn->n", g, ref))
    assert repr(J).startswith("Reversal 4×4: c · reverse")


# -- explicit mode, dtypes, size guard, constructors ----------------------------------------


def test_explicit_vjp_per_example_and_shared_dense() -> None:
    # The same matrices held once as shared and once per example give the same products.
    A = R.standard_normal((4, 5))
    g = R.standard_normal((B, 4))
    shared = Dense(A, batch=B)
    per = Dense(np.broadcast_to(A, (B, 4, 5)).copy())
    assert shared.shared and not per.shared
    for sum_batch in (False, True):
        expected = g @ A if not sum_batch else g.sum(axis=0) @ A
        np.testing.assert_allclose(explicit_vjp(shared, g, sum_batch), expected, rtol=1e-12)
        np.testing.assert_allclose(explicit_vjp(per, g, sum_batch), expected, rtol=1e-12)


def test_explicit_vjp_on_a_batch_of_64() -> None:
    # The batch sizes the graph tests run in explicit mode: built without a loop per example.
    rng = np.random.default_rng(12)
    Bb, m, P, N = 64, 3, 5, 4
    X = rng.standard_normal((Bb, P, N))
    g = rng.standard_normal((Bb, P * m))
    J = KroneckerMatrix(m, X)
    expected = np.einsum("bpi,bpk->ik", g.reshape(Bb, P, m), X).ravel()
    _close(explicit_vjp(J, g, sum_batch=True), expected)
    _close(J.vjp_sum(g), expected)


def test_float32_products_stay_float32() -> None:
    rng = np.random.default_rng(6)
    f32 = np.float32
    x = rng.standard_normal((B, 3)).astype(f32)
    for J in (
        Dense(rng.standard_normal((2, 3)).astype(f32), batch=B),
        Kronecker(2, x),
        KroneckerMatrix(2, rng.standard_normal((B, 3, 1)).astype(f32)),
        RepeatedBlock(3, rng.standard_normal((2, 1)).astype(f32), B),
        DiagonalPlusLowRank.softmax(rng.uniform(size=(B, 6)).astype(f32)),
        Tile(3, 2, B, f32),
    ):
        g = rng.standard_normal((B, J.shape[0])).astype(f32)
        assert J.vjp(g).dtype == f32, J
        assert J.vjp_sum(g).dtype == f32, J
        assert J.jvp(rng.standard_normal((B, J.shape[1])).astype(f32)).dtype == f32, J
        assert J.to_dense().dtype == f32, J
        assert explicit_vjp(J, g).dtype == f32, J
        assert explicit_vjp(J, g, sum_batch=True).dtype == f32, J
    d = Diagonal(x)
    assert d.vjp(x).dtype == f32
    assert d.jvp(x).dtype == f32


def test_to_dense_refuses_large_array_with_byte_count() -> None:
    J = Dense(np.ones((B, 4, 5)))  # 3*4*5 float64 = 480 bytes
    with pytest.raises(ValueError, match="480 bytes") as info:
        J.to_dense(max_bytes=100)
    assert "to_sparse" in str(info.value)
    np.testing.assert_array_equal(J.to_dense(max_bytes=480), np.ones((B, 4, 5)))


def test_to_dense_guard_applies_to_structured_kinds() -> None:
    K = Kronecker(2, np.ones((B, 3)))  # (3, 2, 6) float64 = 288 bytes
    with pytest.raises(ValueError, match="288 bytes"):
        K.to_dense(max_bytes=287)
    KM = KroneckerMatrix(2, np.ones((B, 4, 3)))  # (3, 8, 6) float64 = 1152 bytes
    with pytest.raises(ValueError, match="1.1 KiB"):
        KM.to_dense(max_bytes=1151)


def test_constructors_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="batch"):
        Dense(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        Diagonal(np.ones(3))
    with pytest.raises(ValueError, match="do not fit"):
        Selection(4, 3, 2, B)
    with pytest.raises(ValueError, match="do not fit"):
        Rows(4, 3, 2, B)
    with pytest.raises(ValueError, match=r"\(B, P, N\)"):
        KroneckerMatrix(2, np.ones((B, 3)))
    with pytest.raises(ValueError, match="rows must be one of"):
        KroneckerMatrix(2, np.ones((B, 3, 2)), rows="columns")
    with pytest.raises(ValueError, match=r"\(M, N\)"):
        RepeatedBlock(2, np.ones((B, 3, 2)), B)
    with pytest.raises(ValueError, match=r"U, V \(B, N, r\)"):
        DiagonalPlusLowRank(np.ones((B, 3)), np.ones((B, 3, 1)), np.ones((B, 3, 2)))
    with pytest.raises(ValueError, match=r"\(B, P, r, c\)"):
        BlockKronecker(np.ones((B, 3, 2)), 2, "left")
    with pytest.raises(ValueError, match="side must be one of"):
        BlockKronecker(np.ones((B, 1, 3, 2)), 2, "top")


def test_repr_names_the_structure() -> None:
    p = np.full((B, 5), 0.2)
    assert repr(DiagonalPlusLowRank.softmax(p)).startswith(
        "DiagonalPlusLowRank 5×5: diag(p) − p pᵀ (rank 1)"
    )
    assert "rows channels-major, P = 3" in repr(
        KroneckerMatrix(2, np.ones((B, 3, 4)), rows="channels")
    )
    assert "I_4 ⊗ 2×3 block" in repr(RepeatedBlock(4, np.ones((2, 3)), B))
    assert repr(BlockKronecker(np.ones((B, 2, 3, 4)), 5, "right")).startswith(
        "BlockKronecker 30×40: F_p ⊗ I_5 (2 block(s) of 15×20)"
    )
    assert repr(Rows(6, 1, 3, B)).startswith("Rows 3×6: entries 1..3 of 6")
