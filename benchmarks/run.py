"""Side-by-side benchmark of the engine against hand-written numpy, PyTorch and autograd.

Run it with ``make bench`` (or ``python benchmarks/run.py``; ``--help`` for the
options). In one run it

- times one training step (forward, loss, backward, SGD update) of three MLPs, two
  convnets (the digits CNN and LeNet-5) and one pre-norm transformer encoder block in
  float64 and float32, with the contestants interleaved round by round, and reports
  the median of the repeats and its ratio to the hand-written numpy step;
- times one step of backprop through time (an Elman RNN over 32 steps, SGD update)
  against a hand-written numpy BPTT, PyTorch's ``nn.RNNCell`` called step by step and
  its fused ``nn.RNN``;
- times the Jacobians of the large MLP (``∂y/∂x`` for 1 and for 32 examples,
  ``∂y/∂W1`` for 1 example) against the explicit numpy chain ``W3 diag W2 diag W1``
  and ``torch.func.jacrev``;
- measures the peak memory of the large step with ``tracemalloc`` against the numpy
  step, and lists any float64 array that shows up in a float32 step;
- holds the ratios to the goals in ``bench/goals.py``.

Every contestant's first step (or Jacobian) is checked against the numpy reference
before it is timed, so only correct work is timed. BLAS runs on one thread. The
results go to ``benchmarks/results.json`` and ``benchmarks/results.md``. The code is
the package ``bench`` next to this file (see its ``__init__``).

PyTorch and HIPS autograd are optional: a contestant whose package is missing is
left out of the table.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Pin every BLAS / OpenMP pool to one thread before numpy (or torch) is imported.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    # Run as a script, this file's directory is first on sys.path: ``bench`` is there.
    from bench.cli import main

    sys.exit(main())
