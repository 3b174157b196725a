"""The benchmark behind ``benchmarks/run.py``, one module per part.

- ``problems``: the three MLPs, their data and weights, and the closeness check;
- ``steps``: the training-step contestants (numpy, the engine, PyTorch, autograd),
  each checked against the numpy step before it is timed;
- ``convnets``: the digits CNN and LeNet-5, a hand-written numpy im2col step and the
  other contestants on them (``benchmarks/conv_paths.py`` times the conv products);
- ``transformer``: one pre-norm transformer encoder block, a hand-written numpy step
  and the other contestants on it;
- ``rnn``: backprop through time, the engine's unrolled net against a numpy BPTT,
  PyTorch's ``nn.RNNCell`` loop and its fused ``nn.RNN``;
- ``timing``: interleaved timing with medians;
- ``jacobians`` and ``memory``: the Jacobian and peak-memory cases of the large MLP;
- ``curvature``: a Hessian-vector product of the small MLP against a gradient and
  ``torch.func``, and the top Hessian eigenvalue of the demo's digits MLP;
- ``machine``: what the run ran on;
- ``goals`` and ``report``: the bounds the ratios are held to, and the tables;
- ``cli``: the command line.

The package uses only relative imports, so it can be loaded under any name (the
tests load it from its path).
"""
