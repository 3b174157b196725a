"""The benchmark behind ``benchmarks/run.py``, one module per part.

- ``problems``: the three MLPs, their data and weights, and the closeness check;
- ``steps``: the training-step contestants (numpy, the engine, PyTorch, autograd),
  each checked against the numpy step before it is timed;
- ``timing``: interleaved timing with medians;
- ``jacobians`` and ``memory``: the Jacobian and peak-memory cases of the large MLP;
- ``machine``: what the run ran on;
- ``goals`` and ``report``: the bounds the ratios are held to, and the tables;
- ``cli``: the command line.

The package uses only relative imports, so it can be loaded under any name (the
tests load it from its path).
"""
