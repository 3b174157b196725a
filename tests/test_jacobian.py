"""Every structured Jacobian in ``backprop.jacobian`` against plain dense numpy algebra.

Each case builds one Jacobian object and, independently, the dense batch of matrices
``(B, M, N)`` it stands for. Every product and view of the object is then checked
against that reference with ``einsum``/``matmul``, never against the object's own
``to_dense``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse as sp

from backprop.jacobian import (
    Dense,
    Diagonal,
    Identity,
    Jacobian,
    Kronecker,
    Product,
    Selection,
    Sparse,
    Sum,
    Tile,
    explicit_vjp,
)

B = 3

Factory = Callable[[np.random.Generator], tuple[Jacobian, np.ndarray]]


def _eye_batch(n: int) -> np.ndarray:
    return np.broadcast_to(np.eye(n), (B, n, n)).copy()


def dense_shared(rng: np.random.Generator) -> tuple[Jacobian, np.ndarray]:
    A = rng.standard_normal((4, 5))
    return Dense(A, batch=B), np.broadcast_to(A, (B, 4, 5)).copy()


def dense_per_example(rng: np.random.Generator) -> tuple[Jacobian, np.ndarray]:
    A = rng.standard_normal((B, 4, 5))
    return Dense(A.copy()), A


def diagonal(rng: np.random.Generator) -> tuple[Jacobian, np.ndarray]:
    d = rng.standard_normal((B, 4))
    return Diagonal(d.copy()), np.stack([np.diag(row) for row in d])


def identity(rng: np.random.Generator) -> tuple[Jacobian, np.ndarray]:
    return Identity(4, B), _eye_batch(4)


def kronecker(rng: np.random.Generator) -> tuple[Jacobian, np.ndarray]:
    # I_m ⊗ x_bᵀ: row i holds x_b in columns i*n .. i*n+n-1 (eq. 14.14).
    m, n = 2, 3
    x = rng.standard_normal((B, n))
    ref = np.zeros((B, m, m * n))
    for b in range(B):
        for i in range(m):
            ref[b, i, i * n : (i + 1) * n] = x[b]
    return Kronecker(m, x.copy()), ref


def selection(rng: np.random.Generator) -> tuple[Jacobian, np.ndarray]:
    # Rows 2..4 of a 6-vector: [0; I; 0] (eq. 14.41).
    ref = np.zeros((B, 6, 3))
    ref[:, 2:5, :] = np.eye(3)
    return Selection(6, 2, 3, B), ref


def tile(rng: np.random.Generator) -> tuple[Jacobian, np.ndarray]:
    # [I; I; I] for n = 2 (eq. 14.45).
    ref = np.broadcast_to(np.vstack([np.eye(2)] * 3), (B, 6, 2)).copy()
    return Tile(3, 2, B), ref


def sparse(rng: np.random.Generator) -> tuple[Jacobian, np.ndarray]:
    A = np.array([[1.5, 0, 0, -2.0], [0, 0, 3.0, 0], [0, 0.5, 0, 0]])
    return Sparse(sp.csr_array(A), B), np.broadcast_to(A, (B, 3, 4)).copy()


def product(rng: np.random.Generator) -> tuple[Jacobian, np.ndarray]:
    # A per-example Dense (2, 4) after a Kronecker (4, 4*2): both factors vary per example.
    A = rng.standard_normal((B, 2, 4))
    outer = Dense(A.copy())
    inner, inner_ref = kronecker_m4(rng)
    return Product(outer, inner), np.matmul(A, inner_ref)


def kronecker_m4(rng: np.random.Generator) -> tuple[Jacobian, np.ndarray]:
    m, n = 4, 2
    x = rng.standard_normal((B, n))
    ref = np.zeros((B, m, m * n))
    for b in range(B):
        ref[b] = np.kron(np.eye(m), x[b][None, :])
    return Kronecker(m, x.copy()), ref


def product_shared(rng: np.random.Generator) -> tuple[Jacobian, np.ndarray]:
    A = rng.standard_normal((5, 6))
    _, sel_ref = selection(rng)
    return Product(Dense(A, batch=B), Selection(6, 2, 3, B)), np.matmul(A, sel_ref)


def sum_(rng: np.random.Generator) -> tuple[Jacobian, np.ndarray]:
    A = rng.standard_normal((B, 4, 4))
    d = rng.standard_normal((B, 4))
    ref = A + np.stack([np.diag(row) for row in d]) + np.eye(4)
    return Sum([Dense(A.copy()), Diagonal(d.copy()), Identity(4, B)]), ref


CASES: dict[str, Factory] = {
    "Dense-shared": dense_shared,
    "Dense-per-example": dense_per_example,
    "Diagonal": diagonal,
    "Identity": identity,
    "Kronecker": kronecker,
    "Selection": selection,
    "Tile": tile,
    "Sparse": sparse,
    "Product": product,
    "Product-shared": product_shared,
    "Sum": sum_,
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[Jacobian, np.ndarray]:
    return CASES[request.param](np.random.default_rng(7))


def test_shape_and_batch(case: tuple[Jacobian, np.ndarray]) -> None:
    J, ref = case
    assert (J.batch, *J.shape) == ref.shape


def test_vjp(case: tuple[Jacobian, np.ndarray]) -> None:
    J, ref = case
    g = np.random.default_rng(1).standard_normal((B, ref.shape[1]))
    g0 = g.copy()
    np.testing.assert_allclose(J.vjp(g), np.einsum("bm,bmn->bn", g, ref), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(g, g0)


def test_vjp_sum(case: tuple[Jacobian, np.ndarray]) -> None:
    J, ref = case
    g = np.random.default_rng(2).standard_normal((B, ref.shape[1]))
    np.testing.assert_allclose(J.vjp_sum(g), np.einsum("bm,bmn->n", g, ref), rtol=1e-12, atol=1e-12)


def test_jvp(case: tuple[Jacobian, np.ndarray]) -> None:
    J, ref = case
    u = np.random.default_rng(3).standard_normal((B, ref.shape[2]))
    np.testing.assert_allclose(J.jvp(u), np.einsum("bmn,bn->bm", ref, u), rtol=1e-12, atol=1e-12)


def test_products_refuse_wrong_shapes(case: tuple[Jacobian, np.ndarray]) -> None:
    J, _ = case
    M, N = J.shape
    for method, good in (("vjp", (B, M)), ("vjp_sum", (B, M)), ("jvp", (B, N))):
        for bad in ((B + 1, good[1]), (B, good[1] + 1), (B * good[1],)):
            with pytest.raises(
                ValueError, match=rf"{method[:3]} takes \w of shape \({B}, {good[1]}\)"
            ):
                getattr(J, method)(np.zeros(bad))


def test_to_dense(case: tuple[Jacobian, np.ndarray]) -> None:
    J, ref = case
    D = J.to_dense()
    assert D.shape == ref.shape
    np.testing.assert_allclose(D, ref, rtol=1e-12, atol=1e-15)


def test_to_sparse_each_example(case: tuple[Jacobian, np.ndarray]) -> None:
    J, ref = case
    for b in range(B):
        S = J.to_sparse(b)
        assert sp.issparse(S)
        assert S.shape == ref.shape[1:]
        np.testing.assert_allclose(S.toarray(), ref[b], rtol=1e-12, atol=1e-15)


def test_stacked_sparse(case: tuple[Jacobian, np.ndarray]) -> None:
    J, ref = case
    S = J.stacked_sparse()
    assert sp.issparse(S)
    np.testing.assert_allclose(S.toarray(), np.concatenate(list(ref), axis=0), atol=1e-15)


def test_block_diagonal(case: tuple[Jacobian, np.ndarray]) -> None:
    J, ref = case
    _, m, n = ref.shape
    expected = np.zeros((B * m, B * n))
    for b in range(B):
        expected[b * m : (b + 1) * m, b * n : (b + 1) * n] = ref[b]
    S = J.block_diagonal()
    assert sp.issparse(S)
    np.testing.assert_allclose(S.toarray(), expected, atol=1e-15)


def test_nnz_counts_one_examples_entries(case: tuple[Jacobian, np.ndarray]) -> None:
    # The data are generic (no accidental zeros), so the stored entries are the nonzeros.
    J, ref = case
    assert J.nnz == np.count_nonzero(ref[0])


def test_repr_says_kind_and_size(case: tuple[Jacobian, np.ndarray]) -> None:
    J, ref = case
    text = repr(J)
    assert text.startswith(f"{type(J).__name__} {ref.shape[1]}×{ref.shape[2]}")
    assert f"batch of {B}" in text
    assert len(text) < 200  # a description, not a wall of numbers


def test_explicit_vjp_matches_dense_algebra(case: tuple[Jacobian, np.ndarray]) -> None:
    J, ref = case
    g = np.random.default_rng(4).standard_normal((B, ref.shape[1]))
    np.testing.assert_allclose(
        explicit_vjp(J, g), np.einsum("bm,bmn->bn", g, ref), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        explicit_vjp(J, g, sum_batch=True),
        np.einsum("bm,bmn->n", g, ref),
        rtol=1e-12,
        atol=1e-12,
    )


def test_shared_flag_matches_reference(case: tuple[Jacobian, np.ndarray]) -> None:
    J, ref = case
    if J.shared:
        np.testing.assert_array_equal(ref, np.broadcast_to(ref[0], ref.shape))


def test_explicit_vjp_per_example_and_shared_dense() -> None:
    # The same matrices held once as shared and once per example give the same products.
    rng = np.random.default_rng(5)
    A = rng.standard_normal((4, 5))
    g = rng.standard_normal((B, 4))
    shared = Dense(A, batch=B)
    per = Dense(np.broadcast_to(A, (B, 4, 5)).copy())
    assert shared.shared and not per.shared
    for sum_batch in (False, True):
        expected = g @ A if not sum_batch else g.sum(axis=0) @ A
        np.testing.assert_allclose(explicit_vjp(shared, g, sum_batch), expected, rtol=1e-12)
        np.testing.assert_allclose(explicit_vjp(per, g, sum_batch), expected, rtol=1e-12)


def test_float32_products_stay_float32() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((B, 3)).astype(np.float32)
    g = rng.standard_normal((B, 2)).astype(np.float32)
    for J in (
        Dense(rng.standard_normal((2, 3)).astype(np.float32), batch=B),
        Kronecker(2, x),
    ):
        assert J.vjp(g).dtype == np.float32
        assert J.vjp_sum(g).dtype == np.float32
        assert J.to_dense().dtype == np.float32
    d = Diagonal(x)
    assert d.vjp(x).dtype == np.float32
    assert d.jvp(x).dtype == np.float32


# -- composition: `@` is the chain rule, keeping structure --------------------------


def test_diagonal_at_diagonal_is_diagonal() -> None:
    rng = np.random.default_rng(10)
    d1, d2 = rng.standard_normal((2, B, 4))
    C = Diagonal(d1) @ Diagonal(d2)
    assert type(C) is Diagonal
    np.testing.assert_allclose(C.d, d1 * d2, rtol=1e-15)


def test_dense_at_dense_is_dense_and_keeps_sharing() -> None:
    rng = np.random.default_rng(11)
    A1, A2 = rng.standard_normal((2, 3)), rng.standard_normal((3, 4))
    C = Dense(A1, batch=B) @ Dense(A2, batch=B)
    assert type(C) is Dense and C.shared
    np.testing.assert_allclose(C.to_dense()[0], A1 @ A2, rtol=1e-12)
    P = rng.standard_normal((B, 2, 3))
    C2 = Dense(P) @ Dense(A2, batch=B)
    assert type(C2) is Dense and not C2.shared
    np.testing.assert_allclose(C2.to_dense(), np.matmul(P, A2), rtol=1e-12)


def test_identity_is_neutral() -> None:
    rng = np.random.default_rng(12)
    A = Dense(rng.standard_normal((B, 3, 4)))
    assert (Identity(3, B) @ A) is A
    assert (A @ Identity(4, B)) is A
    K = Kronecker(2, rng.standard_normal((B, 3)))
    assert (Identity(2, B) @ K) is K


COMPOSE_PRODUCT_CASES = {
    # name: (outer factory, inner factory) whose pair has no cheaper structure.
    "Dense@Kronecker": (
        lambda r: Dense(r.standard_normal((3, 4)), batch=B),
        lambda r: Kronecker(4, r.standard_normal((B, 2))),
    ),
    "Tile@Diagonal": (lambda r: Tile(3, 2, B), lambda r: Diagonal(r.standard_normal((B, 2)))),
    "Selection@Dense": (
        lambda r: Selection(6, 1, 3, B),
        lambda r: Dense(r.standard_normal((B, 3, 4))),
    ),
    "Dense@Selection": (
        lambda r: Dense(r.standard_normal((B, 2, 6))),
        lambda r: Selection(6, 3, 3, B),
    ),
    "Sum@Dense": (
        lambda r: Sum([Dense(r.standard_normal((B, 3, 3))), Identity(3, B)]),
        lambda r: Dense(r.standard_normal((3, 2)), batch=B),
    ),
    "Sparse@Dense": (
        lambda r: Sparse(sp.random_array((3, 4), density=0.5, rng=r) + sp.eye_array(3, 4), B),
        lambda r: Dense(r.standard_normal((4, 2)), batch=B),
    ),
}


@pytest.mark.parametrize("name", list(COMPOSE_PRODUCT_CASES))
def test_unstructured_pairs_compose_to_product(name: str) -> None:
    rng = np.random.default_rng(13)
    make_outer, make_inner = COMPOSE_PRODUCT_CASES[name]
    outer, inner = make_outer(rng), make_inner(rng)
    # Independent references, read off the factors before they are composed.
    ref_outer = np.stack([outer.to_sparse(b).toarray() for b in range(B)])
    ref_inner = np.stack([inner.to_sparse(b).toarray() for b in range(B)])
    C = outer @ inner
    assert type(C) is Product
    assert C.shape == (outer.shape[0], inner.shape[1])
    expected = np.matmul(ref_outer, ref_inner)
    np.testing.assert_allclose(C.to_dense(), expected, rtol=1e-12, atol=1e-14)
    g = rng.standard_normal((B, C.shape[0]))
    np.testing.assert_allclose(C.vjp(g), np.einsum("bm,bmn->bn", g, expected), atol=1e-12)


def test_mixed_diagonal_dense_compositions_are_dense() -> None:
    rng = np.random.default_rng(14)
    d = rng.standard_normal((B, 3))
    A = rng.standard_normal((3, 3))
    D = np.stack([np.diag(row) for row in d])
    left = Diagonal(d) @ Dense(A, batch=B)
    right = Dense(A, batch=B) @ Diagonal(d)
    assert type(left) is Dense and type(right) is Dense
    np.testing.assert_allclose(left.to_dense(), np.matmul(D, A), rtol=1e-12)
    np.testing.assert_allclose(right.to_dense(), np.matmul(A, D), rtol=1e-12)


def test_sparse_at_sparse_is_sparse() -> None:
    A = np.array([[1.0, 0, 2], [0, 3, 0]])
    C = np.array([[0, 1.0], [4, 0], [0, -1]])
    S = Sparse(A, B) @ Sparse(C, B)
    assert type(S) is Sparse
    np.testing.assert_allclose(S.to_sparse(0).toarray(), A @ C)


def test_long_chain_value() -> None:
    # Three layers' worth of Jacobians: Dense W2 · diag(h') · Dense W1.
    rng = np.random.default_rng(15)
    W1, W2 = rng.standard_normal((4, 3)), rng.standard_normal((2, 4))
    d = rng.standard_normal((B, 4))
    C = Dense(W2, batch=B) @ Diagonal(d) @ Dense(W1, batch=B)
    expected = np.stack([W2 @ np.diag(d[b]) @ W1 for b in range(B)])
    np.testing.assert_allclose(C.to_dense(), expected, rtol=1e-12)


def test_chain_shape_mismatch_raises() -> None:
    rng = np.random.default_rng(16)
    outer = Dense(rng.standard_normal((2, 3)), batch=B)
    inner = Dense(rng.standard_normal((4, 5)), batch=B)
    with pytest.raises(ValueError, match=r"3 inputs") as info:
        outer @ inner
    assert "Dense 2×3" in str(info.value) and "Dense 4×5" in str(info.value)
    with pytest.raises(ValueError, match="batches"):
        Dense(rng.standard_normal((2, 3)), batch=2) @ Dense(rng.standard_normal((3, 3)), batch=3)


# -- addition -------------------------------------------------------------------------


def test_add_keeps_structure_and_value() -> None:
    rng = np.random.default_rng(17)
    d1, d2 = rng.standard_normal((2, B, 3))
    S = Diagonal(d1) + Diagonal(d2)
    assert type(S) is Diagonal
    np.testing.assert_allclose(S.d, d1 + d2)
    A1, A2 = rng.standard_normal((2, 3, 3))
    S2 = Dense(A1, batch=B) + Dense(A2, batch=B)
    assert type(S2) is Dense
    np.testing.assert_allclose(S2.to_dense()[1], A1 + A2)


def test_add_mixed_is_sum_and_flattens() -> None:
    rng = np.random.default_rng(18)
    d = rng.standard_normal((B, 3))
    A = rng.standard_normal((3, 3))
    S = Diagonal(d) + Dense(A, batch=B)
    assert type(S) is Sum
    S3 = S + Identity(3, B)
    assert type(S3) is Sum and len(S3.terms) == 3
    expected = np.stack([np.diag(d[b]) + A + np.eye(3) for b in range(B)])
    np.testing.assert_allclose(S3.to_dense(), expected, rtol=1e-12)
    g = rng.standard_normal((B, 3))
    np.testing.assert_allclose(S3.vjp(g), np.einsum("bm,bmn->bn", g, expected), rtol=1e-12)


def test_add_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="cannot add"):
        Identity(3, B) + Identity(4, B)


# -- size guard --------------------------------------------------------------------------


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


def test_constructors_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="batch"):
        Dense(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        Diagonal(np.ones(3))
    with pytest.raises(ValueError, match="do not fit"):
        Selection(4, 3, 2, B)
