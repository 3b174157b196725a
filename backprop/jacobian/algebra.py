"""The dispatch of ``@`` (composition, eq. 14.2) and ``+`` (sum, eq. 14.46).

Each class declares, next to its definition, the rules that keep structure::

    @compose_rule(Diagonal, Diagonal)
    def _(outer, inner):
        return Diagonal(outer.d * inner.d, product_label(outer, inner))

A rule takes the two operands (already checked to fit) and returns the
result, or ``None`` when it does not apply to these particular operands (two
``Dense`` of which one is shared and one is not, a ``Rows`` that straddles two
copies of a ``Tile``). The rules for a pair of operands are looked up along
both classes' MROs, the most specific pair first (the smallest sum of the two
MRO positions, then the outer class's position); the first rule that returns
a Jacobian wins. ``combinators`` registers the generic ``Product`` and ``Sum``
for ``(Jacobian, Jacobian)``, the least specific pair, so every pair has an
answer. A sum rule registered for ``(A, B)`` also serves ``B + A``.

A new class therefore needs no edit here: it registers its own rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from backprop.jacobian.base import Jacobian

__all__ = ["add", "compose", "compose_rule", "rules_for", "sum_rule"]

#: A rule takes the two operands (annotated with the classes it was registered for).
Rule = Callable[..., "Jacobian | None"]
F = TypeVar("F", bound=Rule)

#: ``(left class, right class) -> rule``, one table per operation.
_COMPOSE: dict[tuple[type, type], Rule] = {}
_SUM: dict[tuple[type, type], Rule] = {}
#: The rules that apply to a pair of concrete classes, most specific first.
_LOOKUP: dict[tuple[int, type, type], list[Rule]] = {}


def compose_rule(outer: type, inner: type) -> Callable[[F], F]:
    """Register ``rule(outer, inner)`` for ``outer @ inner`` (subclasses included)."""

    def register(rule: F) -> F:
        _COMPOSE[(outer, inner)] = rule
        _LOOKUP.clear()
        return rule

    return register


def sum_rule(a: type, b: type) -> Callable[[F], F]:
    """Register ``rule(a, b)`` for ``a + b`` and, swapped, for ``b + a``."""

    def register(rule: F) -> F:
        _SUM[(a, b)] = rule
        if a is not b:
            _SUM[(b, a)] = lambda x, y: rule(y, x)
        _LOOKUP.clear()
        return rule

    return register


def rules_for(table: dict[tuple[type, type], Rule], left: type, right: type) -> list[Rule]:
    """The rules of ``table`` for a pair of classes, most specific first."""
    key = (id(table), left, right)
    found = _LOOKUP.get(key)
    if found is None:
        ranked = [
            (i + j, i, table[(a, b)])
            for i, a in enumerate(left.__mro__)
            for j, b in enumerate(right.__mro__)
            if (a, b) in table
        ]
        ranked.sort(key=lambda t: (t[0], t[1]))
        found = _LOOKUP[key] = [rule for _, _, rule in ranked]
    return found


def _apply(table: dict[tuple[type, type], Rule], a: Jacobian, b: Jacobian, op: str) -> Jacobian:
    for rule in rules_for(table, type(a), type(b)):
        result = rule(a, b)
        if result is not None:
            return result
    raise TypeError(f"no rule for {a!r} {op} {b!r} (is backprop.jacobian imported whole?)")


def compose(outer: Jacobian, inner: Jacobian) -> Jacobian:
    """``outer @ inner`` with the structure kept where the pair allows it."""
    if outer.shape[1] != inner.shape[0]:
        raise ValueError(
            f"cannot chain {outer!r} after {inner!r}: inner has {inner.shape[0]} outputs, "
            f"outer takes {outer.shape[1]} inputs"
        )
    if outer.batch != inner.batch:
        raise ValueError(
            f"cannot chain {outer!r} after {inner!r}: batches of {outer.batch} and {inner.batch}"
        )
    return _apply(_COMPOSE, outer, inner, "@")


def add(a: Jacobian, b: Jacobian) -> Jacobian:
    """``a + b``, for two Jacobians of the same shape and batch."""
    if a.shape != b.shape or a.batch != b.batch:
        raise ValueError(f"cannot add {a!r} and {b!r}: shapes or batches differ")
    return _apply(_SUM, a, b, "+")
