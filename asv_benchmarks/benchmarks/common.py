"""Profiles, data and timing helpers shared by fastem's asv benchmarks.

``FASTEM_ASV_PROFILE`` selects the parameter grid:

quick (default)
    10,000 rows, D in {2, 10}, K = 5, 'full' and 'diag': minutes, for CI and
    for checking that the benchmarks run.
regular
    N in {1e4, 1e5, 1e6}, D in {2, 10, 50}, K = 5, 'full' and 'diag'.
large
    The full grid: N in {1e4, 1e5, 1e6}, D in {2, 10, 50}, K in {5, 20} and
    every covariance type (hours: the reference is slow at a million rows).

Data sets are the well-separated mixtures of :func:`fastem.bench.make_mixture`
and every library starts from the same :func:`fastem.bench.initial_parameters`,
both cached per parameter combination within a benchmark process.
"""

from __future__ import annotations

import os
import statistics
from functools import lru_cache
from time import perf_counter, sleep

import numpy as np

from fastem.bench import InitialParameters, initial_parameters, make_mixture

PROFILE = os.environ.get("FASTEM_ASV_PROFILE", "quick")

_GRIDS = {
    "quick": {
        "n_samples": [10_000],
        "n_features": [2, 10],
        "n_components": [5],
        "covariance_type": ["full", "diag"],
    },
    "regular": {
        "n_samples": [10_000, 100_000, 1_000_000],
        "n_features": [2, 10, 50],
        "n_components": [5],
        "covariance_type": ["full", "diag"],
    },
    "large": {
        "n_samples": [10_000, 100_000, 1_000_000],
        "n_features": [2, 10, 50],
        "n_components": [5, 20],
        "covariance_type": ["full", "tied", "diag", "spherical"],
    },
}
if PROFILE not in _GRIDS:
    raise ValueError(f"FASTEM_ASV_PROFILE={PROFILE!r}; expected one of {', '.join(_GRIDS)}")

# EM iterations per timed fit: enough to dwarf validation, few enough that the
# reference stays within the timeout at a million rows.
FIT_ITERATIONS = 5
# Samples per library inside a track_speedup_* method (the median is used).
SPEEDUP_REPEATS = 3
# OpenBLAS and OpenMP worker threads busy-wait for up to ~0.1 s after a call;
# pausing before each timed call keeps one library from slowing the next.
_SETTLE_S = 0.25


def grid(*names: str) -> tuple[list[str], list[list]]:
    """``(param_names, params)`` of the current profile for the named axes."""
    return list(names), [_GRIDS[PROFILE][name] for name in names]


class Benchmark:
    """Class attributes common to every benchmark (asv reads them)."""

    processes = 1
    timeout = 1800 if PROFILE == "large" else 300


@lru_cache(maxsize=2)
def dataset(n_samples: int, n_features: int, n_components: int) -> np.ndarray:
    """The benchmark data set for these parameters (float64, C-contiguous)."""
    return make_mixture(n_samples, n_features, n_components)


@lru_cache(maxsize=8)
def starting_point(n_samples: int, n_features: int, n_components: int,
                   covariance_type: str) -> InitialParameters:
    """Initial parameters shared by fastem and the reference."""
    return initial_parameters(dataset(n_samples, n_features, n_components), n_components,
                              covariance_type)


def speedup(fast, slow, repeats: int = SPEEDUP_REPEATS) -> float:
    """Median time of ``slow()`` over median time of ``fast()``, calls interleaved."""
    times: dict[str, list[float]] = {"fast": [], "slow": []}
    for _ in range(repeats):
        for name, func in (("fast", fast), ("slow", slow)):
            sleep(_SETTLE_S)
            start = perf_counter()
            func()
            times[name].append(perf_counter() - start)
    return statistics.median(times["slow"]) / statistics.median(times["fast"])
