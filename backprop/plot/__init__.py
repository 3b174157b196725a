"""Figures: training curves, Jacobians, one backward step, and networks drawn as DAGs.

Matplotlib is an optional extra (``pip install 'backprop[plot]'``); it is imported
inside each function, so ``import backprop`` never needs it. ``to_dot`` needs
nothing. Every function returns the matplotlib ``Figure`` it drew on (that of
``ax`` when one is given) and never calls ``plt.show()``.

The chapter's conventions hold in every picture: a Jacobian ``L`` of one example
is drawn as a matrix with one row per entry of ``x_out`` and one column per
entry of ``x_in`` (or of θ), so a gradient, a row vector ``g``, multiplies it
from the left (eq. 14.8 and 14.10).

- ``jacobians``: ``plot_jacobian``, ``plot_sparsity``, ``plot_backward_step``;
- ``history``: ``plot_history``, the training curves;
- ``inputs``: ``plot_input_gradients``, gradients with respect to an input image;
- ``conv``: ``plot_filters``, a convolution's kernels, and ``plot_toeplitz``, its
  ``L^x`` as the doubly-block Toeplitz matrix next to the kernel it repeats;
- ``dag``: ``draw_graph`` and ``to_dot``, a model as a DAG (read by ``_view``,
  placed by ``_layout``);
- ``recurrent``: ``plot_gradient_norms``, ``‖∂h_T/∂h_t‖`` over the steps of an
  unrolled recurrent net (vanishing and exploding gradients);
- ``attention``: ``plot_attention``, the attention matrix of each head;
- ``mixing``: ``plot_three_matrices``, ``∂Y/∂X`` of a token-wise Linear, a convolution
  over tokens and self-attention side by side (the transformers chapter's comparison).
"""

from backprop.plot.attention import plot_attention
from backprop.plot.conv import plot_filters, plot_toeplitz
from backprop.plot.dag import draw_graph, to_dot
from backprop.plot.history import plot_history
from backprop.plot.inputs import plot_input_gradients
from backprop.plot.jacobians import plot_backward_step, plot_jacobian, plot_sparsity
from backprop.plot.mixing import plot_three_matrices
from backprop.plot.recurrent import plot_gradient_norms

__all__ = [
    "draw_graph",
    "plot_attention",
    "plot_backward_step",
    "plot_filters",
    "plot_gradient_norms",
    "plot_history",
    "plot_input_gradients",
    "plot_jacobian",
    "plot_sparsity",
    "plot_three_matrices",
    "plot_toeplitz",
    "to_dot",
]
