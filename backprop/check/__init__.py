"""Numerical Jacobians and the three-way gradient check.

- ``differences``: central and one-sided finite differences, ``numerical_jacobian``;
- ``compare``: when two computations agree (the rule), ``GradcheckError``, ``GradcheckReport``;
- ``looks``: the second look at a disagreeing entry (kinks, truncation, rounding);
- ``modes``: entry by entry or along random directions, and how ``"auto"`` picks;
- ``layer``, ``graph``: checking a ``Layer``, a ``Graph`` (a ``Sequential`` is one);
- ``second``: the second-order check (``order=2``), Hessian products against
  differences of the gradient;
- ``model``: ``gradcheck``, for either.
"""

from backprop.check.compare import GradcheckError, GradcheckReport
from backprop.check.differences import numerical_jacobian
from backprop.check.graph import gradcheck_graph
from backprop.check.model import gradcheck

__all__ = [
    "GradcheckError",
    "GradcheckReport",
    "gradcheck",
    "gradcheck_graph",
    "numerical_jacobian",
]
