"""Convolution fast-path candidates, timed per layer of the digits CNN and LeNet-5.

Run it with ``python benchmarks/conv_paths.py`` (``--help`` for the options). For
each conv layer of the two nets (batch 64), in float64 and float32, on one BLAS
thread, it times the three products of a training step,

- forward ``y = conv(x; W)``,
- input gradient ``g_in = g L^x`` (the transposed convolution),
- weight gradient ``dJ/dW = Σ_b g_b L^W_b``,

each by the candidate paths:

- ``im2col+bmm``: the library's (``backprop.jacobian.conv``): ``unfold`` (im2col,
  one copy into GEMM order ``(B, 1, K, P)``) and a batched matrix product per
  example; for the input gradient ``conv2d_transpose`` (col2im with the batch as
  the last axis, see below); for the weight gradient the
  per-example products ``G_b X_colᵀ`` and their sum (``bmm+sum``) or one
  ``tensordot`` over batch and positions (``tensordot``), from the patches that
  ``forward`` cached (not counted);
- ``swv+tensordot`` / ``swv+einsum``: no im2col copy, the windows as a
  ``sliding_window_view`` contracted by ``np.tensordot`` (which copies into GEMM
  order itself) or ``np.einsum(optimize=True)``; the input gradient as the
  correlation of the zero-padded ``g`` with the flipped kernel;
- ``im2col+bmm (conv of padded g)``: the stride-1 input gradient as the forward's
  own path (``conv2d``: one im2col copy and one batched GEMM) run on ``g`` padded by
  ``k - 1 - p``, with the flipped, channel-transposed kernel ``W[:, :, ::-1,
  ::-1]ᵀ`` ``(c_in, c_out, k, k)``, instead of the ``k²`` strided adds of ``fold``;
- the input gradient's col2im: ``fold`` on ``(B, c_in, H, W)`` (the batched GEMM
  ``W_gᵀ g`` per example, then ``k²`` strided adds, each over runs of ``Wo``
  entries), against the library's ``conv2d_transpose``, the same with the batch as
  the last axis: ``g`` copied to ``(c_out, Ho·Wo·B)``, one GEMM for the whole batch,
  the ``k²`` adds into ``(c_in, H, W, B)`` (runs of ``Wo·B`` contiguous entries),
  and one copy back to ``(B, c_in, H, W)``.

Every candidate is first checked against the library's product (rtol 1e-10 in
float64, 1e-4 in float32), then all candidates of one product are timed interleaved
(``bench.timing``, medians). The table gives the median and the ratio to the
fastest candidate of that product. Which path ``Conv2d`` takes is set in
``backprop/jacobian/conv.py`` (``conv2d``, ``conv2d_transpose``,
``conv2d_weight_grad``); this script is the measurement behind that choice.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

if __name__ == "__main__":
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from backprop.jacobian.conv import ConvGeometry, conv2d, conv2d_transpose, fold, unfold

#: name -> (c_in, H, c_out, k, padding): the conv layers of the two nets.
LAYERS = {
    "cnn conv1": (1, 8, 16, 3, 1),
    "cnn conv2": (16, 4, 32, 3, 1),
    "lenet conv1": (1, 28, 6, 5, 0),
    "lenet conv2": (6, 12, 16, 5, 0),
}
BATCH = 64
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}

Fn = Callable[[], np.ndarray]


def _pad(x: np.ndarray, p: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x


def _windows(x: np.ndarray, k: int, p: int) -> np.ndarray:
    """``(B, C, Ho, Wo, k, k)``: a view, no copy (beyond the padding)."""
    return sliding_window_view(_pad(x, p), (k, k), axis=(2, 3))


def candidates(
    x: np.ndarray, W: np.ndarray, g: np.ndarray, geo: ConvGeometry
) -> dict[str, dict[str, Fn]]:
    """op -> candidate -> a function computing that product on ``x``, ``W``, ``g``."""
    k, p = geo.kernel[0], geo.padding[0]
    B, c_out = x.shape[0], W.shape[0]
    cols = unfold(x, geo)  # what forward caches for the weight gradient
    Wf = np.ascontiguousarray(W[:, :, ::-1, ::-1])  # the flipped kernel

    def full_windows() -> np.ndarray:  # windows of g padded for the transposed conv
        return _windows(g, k, k - 1 - p)

    g3 = g.reshape(B, 1, c_out, geo.P)
    # the input gradient as a stride-1 convolution of g padded by k - 1 - p
    geo_t = ConvGeometry(c_out, geo.Ho, geo.Wo, x.shape[1], (k, k), padding=(k - 1 - p,) * 2)
    Wt = np.ascontiguousarray(Wf.transpose(1, 0, 2, 3))  # (c_in, c_out, k, k)

    return {
        "forward": {
            "im2col+bmm": lambda: conv2d(x, W, geo),
            "swv+tensordot": lambda: np.tensordot(
                _windows(x, k, p), W, axes=([1, 4, 5], [1, 2, 3])
            ).transpose(0, 3, 1, 2),
            "swv+einsum": lambda: np.einsum(
                "bchwij,ocij->bohw", _windows(x, k, p), W, optimize=True
            ),
        },
        "input grad": {
            "im2col+bmm (batch-last fold)": lambda: conv2d_transpose(g, W, geo),
            "im2col+bmm (fold)": lambda: fold(np.matmul(W.reshape(c_out, -1).T, g3), geo),
            "im2col+bmm (conv of padded g)": lambda: conv2d(g, Wt, geo_t),
            "swv+tensordot": lambda: np.tensordot(
                full_windows(), Wf, axes=([1, 4, 5], [0, 2, 3])
            ).transpose(0, 3, 1, 2),
            "swv+einsum": lambda: np.einsum("bohwij,ocij->bchw", full_windows(), Wf, optimize=True),
        },
        "weight grad": {
            "cols bmm+sum": lambda: np.matmul(g3, cols.transpose(0, 1, 3, 2)).sum(axis=0),
            "cols tensordot": lambda: np.tensordot(g3[:, 0], cols[:, 0], axes=([0, 2], [0, 2])),
            "swv+tensordot": lambda: np.tensordot(
                g, _windows(x, k, p), axes=([0, 2, 3], [0, 2, 3])
            ),
            "swv+einsum": lambda: np.einsum(
                "bohw,bchwij->ocij", g, _windows(x, k, p), optimize=True
            ),
        },
    }


def run(dtypes: list[str], repeats: int, target: float) -> list[list[str]]:
    from bench.timing import time_interleaved

    rows = []
    rng = np.random.default_rng(0)
    for dt in map(np.dtype, dtypes):
        for name, (c_in, H, c_out, k, p) in LAYERS.items():
            geo = ConvGeometry(c_in, H, H, c_out, (k, k), (1, 1), (p, p), (1, 1), 1)
            x = rng.standard_normal((BATCH, c_in, H, H)).astype(dt)
            W = rng.standard_normal((c_out, c_in, k, k)).astype(dt)
            g = rng.standard_normal((BATCH, c_out, geo.Ho, geo.Wo)).astype(dt)
            for op, fns in candidates(x, W, g, geo).items():
                ref = next(iter(fns.values()))()
                for cname, fn in fns.items():
                    got = fn().reshape(ref.shape)
                    err = np.abs(got - ref).max() / np.abs(ref).max()
                    if err > RTOL[dt]:
                        raise AssertionError(f"{name} {dt} {op} {cname}: rel. error {err:.1e}")
                t = time_interleaved(fns, repeats, target)
                best = min(v["median_s"] for v in t.values())
                for cname, v in t.items():
                    ratio = v["median_s"] / best
                    mark = " *" if ratio == 1.0 else ""
                    us = f"{v['median_s'] * 1e6:.0f}"
                    rows.append([name, dt.name, op, cname, us, f"{ratio:.2f}{mark}"])
                print(f"  {name} {dt.name} {op}: done", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--dtypes", default="float64,float32", help="comma-separated dtypes")
    ap.add_argument("--repeats", type=int, default=11, help="interleaved rounds (default 11)")
    ap.add_argument("--quick", action="store_true", help="3 short rounds (a smoke run)")
    args = ap.parse_args(argv)
    repeats, target = (3, 0.002) if args.quick else (args.repeats, 0.02)
    rows = run([d.strip() for d in args.dtypes.split(",") if d.strip()], repeats, target)
    header = ["layer", "dtype", "product", "candidate", "median µs", "× fastest"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
