"""Machine instructions per training step, counted under valgrind: a noise-free measure.

Timings of a step that takes a tenth of a millisecond move by several percent from one
process to the next on a shared machine; the number of instructions it executes does
not. This script runs each contestant's step (``bench.steps``) under ``valgrind
--tool=cachegrind`` twice, once for ``--steps`` steps and once for none (the same
start-up either way), and prints the difference per step::

    python benchmarks/instructions.py            # the small float64 MLP step
    python benchmarks/instructions.py --case tiny --steps 100

The engine's extra instructions over the numpy step are the interpreter's: they run far
slower per instruction than the BLAS kernels, so a change that removes Python work
shows here long before a timing can tell it from noise. Needs ``valgrind`` on the PATH.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

#: Run under valgrind: build one contestant's step, warm it up, then take ``n`` steps.
_CHILD = """
import sys
import numpy as np
from bench.problems import make_problem
from bench.steps import step_contestants
who, case, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
problem = make_problem(case, np.float64)
contestant = step_contestants(problem)[who](problem)
for _ in range(20 + n):
    contestant.step()
"""


def child(who: str, case: str, steps: int) -> tuple[list[str], dict[str, str]]:
    """The command (without valgrind) and environment of one counted run: the package
    and ``bench`` importable, hashing fixed, BLAS on one thread."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONHASHSEED="0", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), here])
    return [sys.executable, "-c", _CHILD, who, case, str(steps)], env


def instructions(who: str, case: str, steps: int) -> int:
    """Instructions that valgrind counts for the whole child run of ``steps`` steps."""
    cmd, env = child(who, case, steps)
    valgrind = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
    ]
    out = subprocess.run(valgrind + cmd, env=env, capture_output=True, text=True, check=True).stderr
    match = re.search(r"I\s+refs:\s+([\d,]+)", out)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out[-2000:]}")
    return int(match.group(1).replace(",", ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="small", help="tiny, small or large (default small)")
    ap.add_argument("--steps", type=int, default=200, help="steps counted (default 200)")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: apt install valgrind", file=sys.stderr)
        return 1
    per_step = {}
    for who in ("numpy", "engine"):
        total = instructions(who, args.case, args.steps) - instructions(who, args.case, 0)
        per_step[who] = total / args.steps
        print(f"{args.case} step, float64, {who:6s}: {per_step[who]:12,.0f} instructions")
    print(f"engine / numpy: {per_step['engine'] / per_step['numpy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
