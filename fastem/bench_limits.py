"""How close an EM iteration comes to what the machine can do (``fastem bench``'s limit table).

An EM iteration of a Gaussian mixture streams the data once (the fused pass
computes the log-densities, the responsibilities and the statistics of each
block of rows while it is in cache) and does a known amount of arithmetic
per row and component. Its lower bound on this machine is

.. math::

    t_{\\min} = \\max\\Big(\\frac{F}{P}, \\frac{B}{W}\\Big),

with :math:`F` the useful floating-point operations of an iteration
(:func:`iteration_work`), :math:`B` the bytes of data it must read, and
:math:`P`, :math:`W` the machine's measured matrix-product rate and read
bandwidth on all its cores (:func:`machine_peak`). The fraction of the limit
reached is :math:`t_{\\min} / t`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from time import perf_counter

import numpy as np

__all__ = ["MachinePeak", "format_limits", "iteration_work", "machine_peak"]

# The product timed for the arithmetic peak: large enough for BLAS to reach
# its steady rate on every core, small enough to take a fraction of a second.
_GEMM_SIZE = 1536
# The array read for the bandwidth: well beyond any cache.
_READ_BYTES = 512 * 2**20
_REPEATS = 5


def iteration_work(n_samples: int, n_features: int, n_components: int, covariance_type: str,
                   itemsize: int = 8) -> tuple[float, float]:
    r"""Useful floating-point operations and bytes read in one EM iteration.

    Per row and component (a multiply-add counts as two operations):

    * full and tied: the triangular product :math:`L_k^T(x - \mu_k)`,
      :math:`D(D+1)` operations, and :math:`4D` for centring, the squared
      norm and :math:`\sum r x`; the scatter's upper triangle
      :math:`\sum r (x-\mu_k)(x-\mu_k)^T`, :math:`D(D+1)` more per component
      for 'full' and once per row for 'tied' (its scatter is pooled);
    * diag: :math:`3D` for :math:`\sum_d p_{kd}(x_d - \mu_{kd})^2` and
      :math:`5D` for :math:`\sum r x` and :math:`\sum r x^2`;
    * spherical: :math:`3D` and :math:`4D`.

    The exponentials and logarithms (K per row) are left out: they are not
    matrix arithmetic and no bound counts them. The bytes are one read of the
    data, :math:`N D` times the item size.

    Returns
    -------
    flops, bytes : float
    """
    n, d, k = float(n_samples), float(n_features), float(n_components)
    triangle = d * (d + 1.0)
    per_row = {
        "full": k * (2.0 * triangle + 4.0 * d),
        "tied": k * (triangle + 4.0 * d) + triangle,
        "diag": k * 8.0 * d,
        "spherical": k * 7.0 * d,
    }[covariance_type]
    return n * per_row, n * d * itemsize


@dataclass(frozen=True)
class MachinePeak:
    """The machine's measured rates on all the cores this process may use."""

    gflops: dict            # dtype name -> GFLOP/s of a large matrix product
    read_gb_per_s: float    # GB/s of a parallel sum over a large array
    n_threads: int


def _best_seconds(work, repeats: int = _REPEATS) -> float:
    work()
    best = float("inf")
    for _ in range(repeats):
        start = perf_counter()
        work()
        best = min(best, perf_counter() - start)
    return best


def machine_peak(dtypes=("float64", "float32")) -> MachinePeak:
    """Time a matrix product per dtype and a parallel read (best of a few runs).

    The product is NumPy's (threaded BLAS, every core); the read sums
    contiguous slices of one large float64 array on one thread per core
    (NumPy releases the GIL in the sum), which is what a pass over the data
    needs at the least. The best of five runs is kept: the limit is what the
    machine can do, not what it did while busy.
    """
    n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    gflops = {}
    for name in dtypes:
        a = rng.standard_normal((_GEMM_SIZE, _GEMM_SIZE)).astype(name)
        b = rng.standard_normal((_GEMM_SIZE, _GEMM_SIZE)).astype(name)
        seconds = _best_seconds(lambda: a @ b)
        gflops[name] = 2.0 * _GEMM_SIZE**3 / seconds / 1e9
    data = np.ones(_READ_BYTES // 8)
    parts = np.array_split(data, n_threads)
    with ThreadPoolExecutor(n_threads) as pool:
        seconds = _best_seconds(lambda: list(pool.map(np.sum, parts)))
    return MachinePeak(gflops, data.nbytes / seconds / 1e9, n_threads)


def format_limits(results, peak: MachinePeak) -> str:
    """A Markdown table of every per-iteration mixture row: its work, the
    machine's limit and the fraction fastem reaches (None when no row fits)."""
    from .bench import _table

    rows = []
    for r in results:
        if (r.unit != "ms/iter" or r.covariance_type not in ("full", "tied", "diag", "spherical")
                or r.dtype not in peak.gflops or "fastem" not in r.values or r.n_samples is None):
            continue
        flops, nbytes = iteration_work(r.n_samples, r.n_features, r.n_components,
                                       r.covariance_type, np.dtype(r.dtype).itemsize)
        limit_ms = 1e3 * max(flops / (peak.gflops[r.dtype] * 1e9),
                             nbytes / (peak.read_gb_per_s * 1e9))
        bound = "arithmetic" if flops / peak.gflops[r.dtype] > nbytes / peak.read_gb_per_s \
            else "memory"
        fastem_ms = r.values["fastem"]
        rows.append([r.case, r.dtype, f"{flops / 1e9:.3g}", f"{nbytes / 1e6:.3g}",
                     f"{limit_ms:.3g} ({bound})", f"{fastem_ms:.3g}",
                     f"{100.0 * limit_ms / fastem_ms:.0f}%"])
    if not rows:
        return None
    header = (f"Machine limit ({peak.n_threads} threads): "
              + ", ".join(f"{name} matrix product {rate:.1f} GFLOP/s"
                          for name, rate in peak.gflops.items())
              + f", read {peak.read_gb_per_s:.1f} GB/s")
    table = _table(["case", "dtype", "GFLOP/iter", "MB read/iter", "limit ms/iter",
                    "fastem ms/iter", "of the limit"], rows)
    return header + "\n\n" + table
