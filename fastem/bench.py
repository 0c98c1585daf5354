"""fastem against scikit-learn and :mod:`fastem.reference`, side by side.

Run as ``python -m fastem.bench`` (or ``fastem bench``).

Every case runs all libraries in one process on the same data, from the same
starting parameters, *interleaved* (fastem, sklearn, reference, fastem, ...)
so that a slow phase of a shared machine hits every library alike, and
reports medians over the repeats.

Methods
-------
EM iteration cost
    One "unit" is one EM iteration. ``fit`` is called with ``max_iter=m``,
    ``tol=0`` (exactly ``m`` iterations) and ``weights_init``/``means_init``/
    ``precisions_init`` given; for the reference, ``reference.em_fit`` with
    ``max_iter=m, tol=0``. For fastem and scikit-learn a sample is
    ``(T(m + 1) - T(1)) / m``: subtracting a one-iteration call removes what
    every fit pays once (validation, set-up, the final E-step scikit-learn
    runs after its loop), leaving exactly ``m`` E- and M-steps
    (scikit-learn cannot fit with ``max_iter=0`` from given parameters, hence
    one iteration rather than none). ``em_fit`` has no such fixed cost: its
    sample is ``T(m) / m``. fastem is warmed up once first, so JIT
    compilation is excluded. ``m`` is chosen per library so that a sample
    takes about ``--budget / 15`` seconds, and is at least 4 where a fixed
    cost is subtracted (scikit-learn's varies by ~10% between calls). A
    library stops taking samples once the next would bring its time on the
    case over ``--budget`` seconds (it always takes one).
    Each sample starts after a short pause, so that BLAS or OpenMP threads
    still spinning after the previous library's call do not steal its CPU.
Whole fit and the small case
    One unit is one whole ``fit`` (default parameters, or 100 iterations on
    Old Faithful), as many per sample as fit in ``--budget / 15`` seconds.
Peak extra memory
    The fit runs in a fresh subprocess with ``X`` already allocated and the
    kernels warmed up on a small slice. Numba allocates outside Python's
    allocator, so ``tracemalloc`` would miss it; instead the peak resident
    set size is reset (``/proc/self/clear_refs``) and the growth of
    ``VmHWM`` over ``VmRSS`` during ``fit`` is reported. Where ``/proc`` is
    unavailable the growth of ``ru_maxrss`` is used (a lower bound if an
    earlier peak exceeded the baseline).
Import time and first fit
    Fresh ``python -c`` subprocesses, timed inside the child with
    ``time.perf_counter`` (interpreter start-up excluded), one untimed run
    first so that bytecode and Numba caches are warm. The cold-cache case
    points ``NUMBA_CACHE_DIR`` at a new temporary directory and reports the
    extra time over the warm run: the time spent compiling.

The load average is printed before and after: another job on the machine
slows every library, but multi-threaded kernels suffer most.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from time import perf_counter, sleep
from typing import NamedTuple

import numpy as np

from . import reference
from .mixture import GaussianMixture

__all__ = [
    "InitialParameters",
    "Result",
    "format_results",
    "format_targets",
    "initial_parameters",
    "machine_info",
    "main",
    "make_mixture",
    "peak_fit_memory",
]

_FULL_SIZE = 1_000_000
# name -> (n_samples, n_features, n_components, covariance_type) at full size.
_EM_CASES = {
    "d2": (_FULL_SIZE, 2, 5, "full"),
    "d10": (_FULL_SIZE, 10, 5, "full"),
    "d100": (200_000, 100, 5, "full"),
    "diag50": (_FULL_SIZE, 50, 20, "diag"),
}
_D10 = _EM_CASES["d10"]
# Canonical order: cases sharing the D=10 data set run back to back.
CASES = ("small", "d2", "d10", "float32", "fit", "outofcore", "d100", "diag50", "memory",
         "import", "warm", "online", "missing", "bayesian", "hmm", "cold", "selection",
         "dask", "spark")
# Opt-in: 'cold' compiles every kernel, 'selection' runs 100 k-means starts
# per cell as its reference and scikit-learn's n_init=20 grids (about 25
# minutes over six data sets, a minute with --quick) and mclust when Rscript
# is installed;
# 'outofcore' writes the D=10 data set to a temporary .npy, 'online' fits
# 400,000 rows several times, 'dask' starts a LocalCluster (dask and
# distributed needed), 'spark' starts Spark (pyspark and Java needed).
DEFAULT_CASES = tuple(c for c in CASES if c not in ("cold", "selection", "outofcore",
                                                   "online", "dask", "spark"))
_SMALL_COMPONENTS = 3
_SMALL_ITERATIONS = 100
_FAITHFUL_COMPONENTS = 2
# Import and first-fit timings are short and jittery; never take fewer samples.
_MIN_SUBPROCESS_REPEATS = 5
_MAX_UNITS = 1000
_MIN_DIFFERENCED_ITERATIONS = 4
# OpenBLAS and OpenMP worker threads busy-wait for up to ~0.1 s after a call;
# on a machine with few cores they would steal the next library's CPU time,
# so every timed call starts after this pause.
_SETTLE_S = 0.2
_MIN_MEAN_GAP = 6.0
_SLAB_ROWS = 65536
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "NUMBA_CACHE_DIR")


# ---------------------------------------------------------------- data
def make_mixture(n_samples: int, n_features: int, n_components: int, *,
                 seed: int = 0) -> np.ndarray:
    r"""Rows drawn from a well-separated random Gaussian mixture.

    Means are thrown one by one, uniformly in a cube of side
    :math:`12K^{1/D}`, each kept only if at least 6 away from those kept;
    covariances are :math:`A_kA_k^T + I/2` with :math:`A_k` Gaussian of
    variance :math:`1/(4D)` (eigenvalues roughly in [0.5, 1.5]), so clusters
    are about five standard deviations apart. Rows are generated in slabs,
    so the peak memory is that of ``X`` itself.

    Parameters
    ----------
    n_samples, n_features, n_components : int
    seed : int
        Everything is a function of the seed and of the shape.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features), float64, C-contiguous
    """
    rng = np.random.default_rng(seed)
    side = 12.0 * n_components ** (1.0 / n_features)
    means = np.empty((0, n_features))
    for _ in range(100_000):
        if len(means) == n_components:
            break
        candidate = rng.uniform(-side / 2, side / 2, size=n_features)
        if np.all(np.linalg.norm(means - candidate, axis=1) >= _MIN_MEAN_GAP):
            means = np.vstack([means, candidate])
    else:
        raise RuntimeError(f"could not place {n_components} separated means in {n_features}-D")
    factors = rng.normal(scale=0.5 / math.sqrt(n_features),
                         size=(n_components, n_features, n_features))
    cov = factors @ factors.transpose(0, 2, 1) + 0.5 * np.eye(n_features)
    chol = np.linalg.cholesky(cov)
    weights = rng.dirichlet(np.full(n_components, 5.0))
    X = np.empty((n_samples, n_features))
    for start in range(0, n_samples, _SLAB_ROWS):
        stop = min(start + _SLAB_ROWS, n_samples)
        labels = rng.choice(n_components, size=stop - start, p=weights)
        noise = rng.standard_normal((stop - start, n_features))
        block = X[start:stop]
        for k in range(n_components):
            rows = labels == k
            block[rows] = noise[rows] @ chol[k].T + means[k]
    return X


class InitialParameters(NamedTuple):
    """Starting point shared by every library (float64, scikit-learn's shapes)."""

    weights: np.ndarray
    means: np.ndarray
    precisions: np.ndarray
    precisions_cholesky: np.ndarray


def initial_parameters(X: np.ndarray, n_components: int, covariance_type: str, *,
                       max_rows: int = 20_000) -> InitialParameters:
    """Parameters from a short fastem fit on an evenly spaced subsample of ``X``.

    Starting near a fitted model keeps the timed iterations free of collapsing
    components, whose repair would time something other than EM.
    """
    step = max(1, X.shape[0] // max_rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GaussianMixture(n_components, covariance_type=covariance_type, max_iter=10,
                                random_state=0).fit(X[::step])
    return InitialParameters(*(np.asarray(a, dtype=np.float64) for a in (
        model.weights_, model.means_, model.precisions_, model.precisions_cholesky_)))


def _faithful_path() -> str:
    return str(resources.files("fastem") / "data" / "faithful.csv")


def _faithful() -> np.ndarray:
    return np.loadtxt(_faithful_path(), delimiter=",", skiprows=1)


# ------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> str | None:
    # Another job on a shared machine skews every library; show how busy it was.
    if not hasattr(os, "getloadavg"):
        return None
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def machine_info() -> dict:
    """CPU, thread counts, library versions and BLAS configuration of this process.

    Returns
    -------
    dict
        JSON-serialisable; ``blas`` is ``threadpoolctl.threadpool_info()``
        after scikit-learn and SciPy are loaded (OpenBLAS settings in the
        environment change what the baselines get).
    """
    import numba
    import scipy
    from threadpoolctl import threadpool_info

    from . import __version__

    sklearn_version = None
    try:
        # sklearn.mixture rather than sklearn: threadpool_info lists loaded libraries only.
        import sklearn.mixture

        sklearn_version = sklearn.__version__
    except ImportError:
        pass
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(affinity) if affinity is not None else os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "load_average": _load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"fastem": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
                     "numba": numba.__version__, "sklearn": sklearn_version},
        "thread_env": {name: os.environ[name] for name in _THREAD_ENV if name in os.environ},
        "blas": [{key: pool.get(key) for key in ("user_api", "internal_api", "version",
                                                  "architecture", "threading_layer",
                                                  "num_threads", "filepath")}
                 for pool in threadpool_info()],
    }


def _format_machine(info: dict) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items()
                         if version is not None)
    cpu = (f"CPU: {info['cpu']} ({info['cpu_count']} logical CPUs, {info['usable_cpus']} "
           f"usable); numba threads: {info['numba_threads']}")
    lines = [
        cpu,
        f"Python {info['python']} on {info['platform']}",
        f"Load average (1, 5, 15 min): {info['load_average']}",
        f"Versions: {versions}",
        "Thread environment: " + (", ".join(f"{k}={v}" for k, v in info["thread_env"].items())
                                  or "none set"),
    ]
    for pool in info["blas"]:
        version = f" {pool['version']}" if pool["version"] else ""
        build = (f" ({pool['architecture']}, {pool['threading_layer']})"
                 if pool["architecture"] else "")
        lines.append(f"{pool['user_api']}: {pool['internal_api']}{version}{build}, "
                     f"{pool['num_threads']} threads, "
                     f"{os.path.basename(pool['filepath'] or '')}")
    return "\n".join(lines)


# -------------------------------------------------------- measurement
@dataclass
class _Runner:
    """``run(n)`` does ``n`` units of work and returns the seconds it took.

    A sample times ``run(fixed + n)`` and subtracts ``run(fixed)``, which
    must pay whatever ``run`` costs regardless of ``n``; ``n`` is at least
    ``min_units``.
    """

    run: Callable[[int], float]
    warm_up: bool = False
    fixed: int = 0
    min_units: int = 1


@dataclass
class _Timing:
    median: float
    units: int
    samples: list[float]
    # False when the differenced samples were lost in noise and whole runs
    # per unit (an upper bound) are reported instead.
    differenced: bool = True


@dataclass
class _Settings:
    repeats: int
    budget: float
    n_samples: int | None
    quick: bool
    reference: bool
    sklearn: type | None

    @property
    def sample_time(self) -> float:
        return self.budget / 15.0

    @property
    def subprocess_repeats(self) -> int:
        return self.repeats if self.quick else max(self.repeats, _MIN_SUBPROCESS_REPEATS)

    @property
    def warm_up_subprocesses(self) -> bool:
        # An untimed first run warms bytecode and Numba caches; --quick has
        # already run everything in this process and only checks that it works.
        return not self.quick

    def size(self, full_size: int) -> int:
        if self.n_samples is not None:
            return self.n_samples
        if self.quick:
            return max(full_size // _QUICK_SHRINK, _MIN_N_SAMPLES)
        return full_size


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _measure(runners: dict[str, _Runner], settings: _Settings) -> dict[str, _Timing]:
    """Interleaved medians of seconds per unit of work, one entry per runner.

    Each runner is calibrated once (after a warm-up call if it compiles), so
    that a sample lasts about ``settings.sample_time``. Every runner takes
    one sample per round, for ``settings.repeats`` rounds, except that after
    its first sample a runner skips the rounds that would take its time in
    this case (calibration included) over ``settings.budget``.
    """
    units, spent = {}, {}
    for label, runner in runners.items():
        if runner.warm_up:
            runner.run(1)
        sleep(_SETTLE_S)
        per_unit, spent[label] = _marginal_cost(runner)
        units[label] = int(min(_MAX_UNITS, max(runner.min_units,
                                                math.ceil(settings.sample_time / per_unit))))
    samples: dict[str, list[float]] = {label: [] for label in runners}
    whole: dict[str, list[float]] = {label: [] for label in runners}
    last: dict[str, float] = {}
    for _ in range(settings.repeats):
        for label, runner in runners.items():
            if label in last and spent[label] + last[label] > settings.budget:
                continue
            sleep(_SETTLE_S)
            start = perf_counter()
            fixed = runner.run(runner.fixed)
            total = runner.run(runner.fixed + units[label])
            last[label] = perf_counter() - start
            spent[label] += last[label]
            samples[label].append((total - fixed) / units[label])
            whole[label].append(total / (runner.fixed + units[label]))
    timings = {}
    for label, s in samples.items():
        median = statistics.median(s)
        differenced = median > 0
        if not differenced:
            # Noise swamped the difference: report the whole run per unit,
            # an upper bound, rather than a meaningless non-positive time.
            _log(f"{label}: differenced samples lost in noise; reporting whole runs")
            s = whole[label]
            median = statistics.median(s)
        timings[label] = _Timing(median, units[label], s, differenced)
    _log(", ".join(f"{label}: {t.median * 1e3:.4g} ms/unit ({len(t.samples)} x {t.units})"
                   for label, t in timings.items()))
    return timings


def _marginal_cost(runner: _Runner) -> tuple[float, float]:
    """Estimated seconds per unit of work beyond the fixed cost, and the time spent.

    Calibrating on the whole ``run(1)`` would count the fixed cost as work:
    on small data, where the fixed cost dominates, samples would then span
    too few units for their difference to rise above the noise.
    """
    start = perf_counter()
    fixed = runner.run(runner.fixed)
    total = runner.run(runner.fixed + runner.min_units)
    spent = perf_counter() - start
    # When noise swamps the difference, a hundredth of the whole run stands in
    # for it, so that samples stay long but finite.
    marginal = max(total - fixed, 0.01 * total)
    return max(marginal / runner.min_units, 1e-9), spent


def _quietly(fit: Callable[[], object]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = perf_counter()
        fit()
        return perf_counter() - start


def _em_runner(estimator: type, X, n_components, covariance_type,
               init: InitialParameters) -> _Runner:
    def run(n_iter):
        model = estimator(n_components, covariance_type=covariance_type, tol=0.0,
                          max_iter=n_iter, weights_init=init.weights, means_init=init.means,
                          precisions_init=init.precisions)
        return _quietly(lambda: model.fit(X))

    # scikit-learn's fixed cost (validation and a final E-step) is about one
    # iteration and varies by ~10% from call to call at a million rows: the
    # difference must span several iterations to rise above that noise.
    return _Runner(run, warm_up=estimator is GaussianMixture, fixed=1,
                   min_units=_MIN_DIFFERENCED_ITERATIONS)


def _reference_runner(X, covariance_type, init: InitialParameters) -> _Runner:
    def run(n_iter):
        return _quietly(lambda: reference.em_fit(
            X, init.weights, init.means, init.precisions_cholesky, covariance_type, tol=0.0,
            max_iter=n_iter))

    # em_fit does nothing outside its iterations, so there is nothing to subtract.
    return _Runner(run)


# ------------------------------------------------------------- results
@dataclass
class Result:
    """One row of the report: a measurement of every library for one case."""

    case: str
    unit: str
    values: dict[str, float]
    n_samples: int | None = None
    n_features: int | None = None
    n_components: int | None = None
    covariance_type: str | None = None
    dtype: str | None = None
    peak_memory_percent_of_x: float | None = None
    details: dict = field(default_factory=dict)

    def speedup(self, baseline: str) -> float | None:
        """``values[baseline] / values['fastem']`` (above 1: fastem is better)."""
        # No ratio to a fastem value of zero (no measurable extra memory on
        # small data, say).
        if baseline not in self.values or not self.values.get("fastem"):
            return None
        return self.values[baseline] / self.values["fastem"]

    def to_dict(self) -> dict:
        return {
            "case": self.case, "unit": self.unit, "n_samples": self.n_samples,
            "n_features": self.n_features, "n_components": self.n_components,
            "covariance_type": self.covariance_type, "dtype": self.dtype,
            "values": self.values, "speedup_vs_sklearn": self.speedup("sklearn"),
            "speedup_vs_reference": self.speedup("reference"),
            "peak_memory_percent_of_x": self.peak_memory_percent_of_x, "details": self.details,
        }


class _Datasets:
    """Keeps the last data set and its starting parameters (they are large)."""

    def __init__(self):
        self._key = None
        self._X = None
        self._init: dict[tuple, InitialParameters] = {}

    def get(self, n_samples, n_features, n_components) -> np.ndarray:
        key = (n_samples, n_features, n_components)
        if key != self._key:
            # Drop the old data set first: two at once could exhaust memory.
            self._key, self._X, self._init = None, None, {}
            self._X = make_mixture(n_samples, n_features, n_components)
            self._key = key
        return self._X

    def init(self, n_samples, n_features, n_components, covariance_type) -> InitialParameters:
        X = self.get(n_samples, n_features, n_components)
        if covariance_type not in self._init:
            self._init[covariance_type] = initial_parameters(X, n_components, covariance_type)
        return self._init[covariance_type]


def _library_runners(settings: _Settings, X, n_components, covariance_type,
                     init: InitialParameters) -> dict[str, _Runner]:
    runners = {"fastem": _em_runner(GaussianMixture, X, n_components, covariance_type, init)}
    if settings.sklearn is not None:
        runners["sklearn"] = _em_runner(settings.sklearn, X, n_components, covariance_type, init)
    if settings.reference:
        runners["reference"] = _reference_runner(X, covariance_type, init)
    return runners


def _per_iteration_row(case, timings, shape, covariance_type, dtype) -> Result:
    n_samples, n_features, n_components = shape
    return Result(
        case, "ms/iter", {label: t.median * 1e3 for label, t in timings.items()}, n_samples,
        n_features, n_components, covariance_type, dtype,
        details={"iterations_per_sample": {label: t.units for label, t in timings.items()},
                 "differenced": {label: t.differenced for label, t in timings.items()},
                 "samples_ms": {label: [s * 1e3 for s in t.samples]
                                for label, t in timings.items()}},
    )


# --------------------------------------------------------------- cases
def _case_em(name: str, settings: _Settings, data: _Datasets) -> list[Result]:
    full_size, n_features, n_components, covariance_type = _EM_CASES[name]
    shape = (settings.size(full_size), n_features, n_components)
    X = data.get(*shape)
    init = data.init(*shape, covariance_type)
    timings = _measure(_library_runners(settings, X, n_components, covariance_type, init),
                       settings)
    return [_per_iteration_row(name, timings, shape, covariance_type, "float64")]


def _case_float32(settings: _Settings, data: _Datasets) -> list[Result]:
    full_size, n_features, n_components, covariance_type = _D10
    shape = (settings.size(full_size), n_features, n_components)
    X = data.get(*shape)
    init = data.init(*shape, covariance_type)
    X32 = X.astype(np.float32)
    timings = _measure({
        "float32": _em_runner(GaussianMixture, X32, n_components, covariance_type, init),
        "float64": _em_runner(GaussianMixture, X, n_components, covariance_type, init),
    }, settings)
    return [_per_iteration_row("float32", {"fastem": timings[dtype]}, shape, covariance_type,
                               dtype) for dtype in ("float32", "float64")]


def _case_fit(settings: _Settings, data: _Datasets) -> list[Result]:
    """Whole ``fit`` with default parameters (k-means init, tol=1e-3)."""
    full_size, n_features, n_components, covariance_type = _D10
    shape = (settings.size(full_size), n_features, n_components)
    X = data.get(*shape)
    n_iter = {}

    def runner(label, estimator):
        def run(n_fits):
            total = 0.0
            for _ in range(n_fits):
                model = estimator(n_components, random_state=0)
                total += _quietly(partial(model.fit, X))
                n_iter[label] = int(model.n_iter_)
            return total

        return _Runner(run, warm_up=estimator is GaussianMixture)

    runners = {"fastem": runner("fastem", GaussianMixture)}
    if settings.sklearn is not None:
        runners["sklearn"] = runner("sklearn", settings.sklearn)
    timings = _measure(runners, settings)
    return [Result("fit", "s/fit", {label: t.median for label, t in timings.items()}, *shape,
                   covariance_type, "float64",
                   details={"n_iter": n_iter, "fits_per_sample": {
                       label: t.units for label, t in timings.items()}})]


def _case_outofcore(settings: _Settings, data: _Datasets) -> list[Result]:
    """EM iteration on a memory-mapped .npy (in the page cache) against the same
    array in memory, from the same start."""
    full_size, n_features, n_components, covariance_type = _D10
    shape = (settings.size(full_size), n_features, n_components)
    X = data.get(*shape)
    init = data.init(*shape, covariance_type)
    with tempfile.TemporaryDirectory(prefix="fastem-outofcore-") as folder:
        path = os.path.join(folder, "X.npy")
        np.save(path, X)
        mapped = np.load(path, mmap_mode="r")
        timings = _measure({
            "fastem": _em_runner(GaussianMixture, mapped, n_components, covariance_type, init),
            "in memory": _em_runner(GaussianMixture, X, n_components, covariance_type, init),
        }, settings)
        del mapped
    return [_per_iteration_row("outofcore", timings, shape, covariance_type, "float64")]


def _case_online(settings: _Settings, data: _Datasets) -> list[Result]:
    """One pass of partial_fit over batches of 10,000 rows against a full fit
    (default init, tol 1e-3): time, and the log-likelihood reached."""
    full_size, n_features, n_components, covariance_type = 400_000, 3, 4, "full"
    n_samples = settings.size(full_size)
    X = data.get(n_samples, n_features, n_components)
    X = X[np.random.default_rng(0).permutation(n_samples)]
    batch = max(1000, min(10_000, n_samples // 40))
    outcome = {}

    def full_fit():
        model = GaussianMixture(n_components, covariance_type=covariance_type, random_state=0)
        seconds = _quietly(partial(model.fit, X))
        outcome["full EM"] = model.score(X)
        return seconds

    def online_pass():
        model = GaussianMixture(n_components, covariance_type=covariance_type, random_state=0)

        def run():
            for start in range(0, n_samples, batch):
                model.partial_fit(X[start:start + batch])

        seconds = _quietly(run)
        outcome["fastem"] = model.score(X)
        return seconds

    def runner(once):
        return _Runner(lambda n: sum(once() for _ in range(n)), warm_up=True)

    timings = _measure({"fastem": runner(online_pass), "full EM": runner(full_fit)}, settings)
    gap = 100.0 * (outcome["full EM"] - outcome["fastem"]) / abs(outcome["full EM"])
    _log(f"online: one pass in batches of {batch} ends at log-likelihood "
         f"{outcome['fastem']:.5f} per row, full EM at {outcome['full EM']:.5f} "
         f"({gap:.3f} % below)")
    return [Result("online", "s/pass", {label: t.median for label, t in timings.items()},
                   n_samples, n_features, n_components, covariance_type, "float64",
                   details={"log_likelihood": outcome, "gap_percent": gap,
                            "batch_rows": batch})]


def _case_missing(settings: _Settings, data: _Datasets) -> list[Result]:
    """EM iteration with 20 % of the entries missing completely at random
    (``missing='em'``) against the complete data, from the same start."""
    n_samples, n_features, n_components = settings.size(200_000), 10, 5
    shape = (n_samples, n_features, n_components)
    X = data.get(*shape)
    init = data.init(*shape, "full")
    holes = X.copy()
    holes[np.random.default_rng(0).random(X.shape) < 0.2] = np.nan

    def runner(data_set, **extra):
        def run(n_iter):
            model = GaussianMixture(n_components, tol=0.0, max_iter=n_iter,
                                    weights_init=init.weights, means_init=init.means,
                                    precisions_init=init.precisions, **extra)
            return _quietly(lambda: model.fit(data_set))

        return _Runner(run, warm_up=True, fixed=1, min_units=_MIN_DIFFERENCED_ITERATIONS)

    timings = _measure({"fastem": runner(holes, missing="em"), "complete": runner(X)},
                       settings)
    row = _per_iteration_row("missing", timings, shape, "full", "float64")
    _log(f"missing: EM iteration with 20% MCAR {row.values['fastem']:.1f} ms against "
         f"{row.values['complete']:.1f} ms on the complete data "
         f"({row.values['fastem'] / row.values['complete']:.2f}x)")
    return [row]


def _case_bayesian(settings: _Settings, data: _Datasets) -> list[Result]:
    """A variational EM iteration (``BayesianGaussianMixture``, D=10, K=5, full)
    against scikit-learn's, both continuing from the same posterior."""
    from .bayesian_mixture import BayesianGaussianMixture

    full_size, n_features, n_components, covariance_type = _D10
    shape = (settings.size(full_size), n_features, n_components)
    X = data.get(*shape)
    state = BayesianGaussianMixture(n_components=n_components, max_iter=1, random_state=0)
    _quietly(lambda: state.fit(X))
    start = state._get_parameters()

    def runner(estimator):
        def run(n_iter):
            model = estimator(n_components=n_components, covariance_type=covariance_type,
                              tol=0.0, max_iter=n_iter, warm_start=True)
            # A warm start from the same posterior: no initialisation timed.
            model._set_parameters(tuple(
                tuple(p.copy() for p in value) if isinstance(value, tuple)
                else np.copy(value) for value in start))
            model.converged_, model.lower_bound_ = False, -np.inf
            model.n_features_in_ = n_features
            return _quietly(lambda: model.fit(X))

        return _Runner(run, warm_up=estimator is BayesianGaussianMixture, fixed=1,
                       min_units=_MIN_DIFFERENCED_ITERATIONS)

    runners = {"fastem": runner(BayesianGaussianMixture)}
    if settings.sklearn is not None:
        from sklearn.mixture import BayesianGaussianMixture as SklearnBayesian

        runners["sklearn"] = runner(SklearnBayesian)
    timings = _measure(runners, settings)
    return [_per_iteration_row("bayesian", timings, shape, covariance_type, "float64")]


_HMM_SHAPE = (1_000_000, 100, 8, 4)     # rows, sequences, states, features (diag)


def hmm_problem(n_samples: int, n_sequences: int, n_states: int, n_features: int,
                seed: int = 0):
    """Sequences of a sticky Gaussian HMM and a start for Baum–Welch (diagonal).

    Returns ``(X, lengths, start)``, ``start`` a dict of ``startprob_``,
    ``transmat_``, ``means_`` and ``covars_`` that every library is given.
    """
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=3.0, size=(n_states, n_features))
    n_sequences = max(1, min(n_sequences, n_samples // 2))
    lengths = np.full(n_sequences, n_samples // n_sequences)
    lengths[: n_samples - lengths.sum()] += 1
    # States change with probability 0.05 per step.
    switches = rng.random(n_samples) < 0.05
    states = np.cumsum(switches * rng.integers(1, n_states, size=n_samples)) % n_states
    X = means[states] + rng.normal(size=(n_samples, n_features))
    off = 0.1 / max(n_states - 1, 1)
    start = {"startprob_": np.full(n_states, 1.0 / n_states),
             "transmat_": np.full((n_states, n_states), off) + np.eye(n_states) * (0.9 - off),
             "means_": means + rng.normal(scale=0.5, size=means.shape),
             "covars_": np.full((n_states, n_features), 1.5)}
    return X, lengths, start


def _hmm_runner(estimator, X, lengths, start, implementation: str) -> _Runner:
    def run(n_iter):
        model = estimator(n_components=start["means_"].shape[0], covariance_type="diag",
                          n_iter=n_iter, tol=-np.inf, init_params="", params="stmc",
                          implementation=implementation)
        for name, value in start.items():
            setattr(model, name, value.copy())
        seconds = _quietly(lambda: model.fit(X, lengths))
        if model.monitor_.iter != n_iter:
            raise RuntimeError(f"{estimator.__module__} ran {model.monitor_.iter} of "
                               f"{n_iter} iterations")
        return seconds

    return _Runner(run, warm_up=True, fixed=1, min_units=_MIN_DIFFERENCED_ITERATIONS)


def _case_hmm(settings: _Settings, data: _Datasets) -> list[Result]:
    """A Baum–Welch iteration of ``fastem.GaussianHMM`` against hmmlearn's, from the
    same start, for both implementations ('log', hmmlearn's default, and 'scaling')."""
    from .hmm import GaussianHMM

    n_samples, n_sequences, n_states, n_features = _HMM_SHAPE
    X, lengths, start = hmm_problem(settings.size(n_samples), n_sequences, n_states,
                                    n_features)
    try:
        from hmmlearn.hmm import GaussianHMM as HmmlearnHMM
    except ImportError:
        HmmlearnHMM = None
        _log("hmm: hmmlearn is not installed; timing fastem alone")
    rows = []
    for implementation in ("log", "scaling"):
        runners = {"fastem": _hmm_runner(GaussianHMM, X, lengths, start, implementation)}
        if HmmlearnHMM is not None:
            runners["hmmlearn"] = _hmm_runner(HmmlearnHMM, X, lengths, start, implementation)
        timings = _measure(runners, settings)
        case = "hmm" if implementation == "log" else "hmm-scaling"
        rows.append(_per_iteration_row(case, timings, (X.shape[0], n_features, n_states),
                                       "diag", "float64"))
        rows[-1].details["sequences"] = int(len(lengths))
    return rows


def _case_dask(settings: _Settings, data: _Datasets) -> list[Result]:
    """EM iteration on a Dask array (a 2-worker LocalCluster of processes, one
    thread each, one row chunk per worker, persisted) against the same array
    in memory, from the same start. Skipped without dask and distributed."""
    try:
        import dask
        import dask.array as da
        from distributed import Client, LocalCluster
    except ImportError:
        _log("dask: dask and distributed are not installed (pip install fastem[dask]): "
             "skipped")
        return []
    full_size, n_features, n_components, covariance_type = _D10
    shape = (settings.size(full_size), n_features, n_components)
    X = data.get(*shape)
    init = data.init(*shape, covariance_type)
    n_workers = 2
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(n_workers)
        # Scattered, not embedded in the graph: each worker holds its chunk.
        bounds = np.linspace(0, shape[0], n_workers + 1).astype(int)
        parts = client.scatter([X[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
        chunked = da.concatenate([
            da.from_delayed(dask.delayed(part), shape=(b - a, n_features), dtype=X.dtype)
            for part, a, b in zip(parts, bounds[:-1], bounds[1:])]).persist()
        timings = _measure({
            "fastem": _em_runner(GaussianMixture, chunked, n_components, covariance_type, init),
            "in memory": _em_runner(GaussianMixture, X, n_components, covariance_type, init),
        }, settings)
    row = _per_iteration_row("dask", timings, shape, covariance_type, "float64")
    _log(f"dask: EM iteration {row.values['fastem']:.1f} ms on {n_workers} workers against "
         f"{row.values['in memory']:.1f} ms in memory "
         f"({row.values['fastem'] / row.values['in memory']:.2f}x)")
    return [row]


def _case_spark(settings: _Settings, data: _Datasets) -> list[Result]:
    """Spark MLlib's GaussianMixture (pyspark, local[2]) as a peer: time per EM
    iteration (differenced over maxIter) and the log-likelihood each reaches
    from its own start. Skipped without pyspark or Java; never a dependency."""
    import shutil

    try:
        from pyspark.ml.clustering import GaussianMixture as SparkGaussianMixture
        from pyspark.ml.linalg import Vectors
        from pyspark.sql import SparkSession
    except ImportError:
        _log("spark: pyspark is not installed (pip install pyspark): skipped")
        return []
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        _log("spark: no Java runtime found: skipped")
        return []
    n_samples, n_features, n_components = settings.size(200_000), 10, 5
    X = data.get(n_samples, n_features, n_components)
    init = data.init(n_samples, n_features, n_components, "full")
    spark = (SparkSession.builder.master("local[2]").appName("fastem-bench")
             .config("spark.ui.enabled", "false").config("spark.driver.memory", "4g")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        frame = spark.createDataFrame([(Vectors.dense(row),) for row in X.tolist()],
                                      ["features"]).cache()
        frame.count()
        outcome = {}

        def spark_run(n_iter):
            start = perf_counter()
            model = SparkGaussianMixture(k=n_components, maxIter=n_iter, tol=0.0,
                                         seed=0).fit(frame)
            outcome["spark"] = model.summary.logLikelihood / n_samples
            return perf_counter() - start

        timings = _measure({
            "fastem": _em_runner(GaussianMixture, X, n_components, "full", init),
            "spark": _Runner(spark_run, fixed=2, min_units=10),
        }, settings)
    finally:
        spark.stop()
    fitted = GaussianMixture(n_components, random_state=0)
    _quietly(partial(fitted.fit, X))
    outcome["fastem"] = fitted.score(X)
    _log(f"spark: log-likelihood per row, fastem (default start, converged) "
         f"{outcome['fastem']:.5f}; Spark MLlib (its random start, after the timed "
         f"iterations) {outcome['spark']:.5f}")
    row = _per_iteration_row("spark", timings, (n_samples, n_features, n_components), "full",
                             "float64")
    _log(f"spark: EM iteration {row.values['spark']:.1f} ms against fastem's "
         f"{row.values['fastem']:.1f} ms ({row.speedup('spark'):.1f}x)")
    row.details["log_likelihood"] = outcome
    return [row]


def _case_small(settings: _Settings, data: _Datasets) -> list[Result]:
    """The model-selection workload: many fits of a tiny data set (Old Faithful)."""
    X = _faithful()
    covariance_type = "full"
    init = initial_parameters(X, _SMALL_COMPONENTS, covariance_type)

    def repeated(single: _Runner) -> _Runner:
        def run(n_fits):
            return sum(single.run(_SMALL_ITERATIONS) for _ in range(n_fits))

        return _Runner(run, warm_up=single.warm_up)

    runners = {label: repeated(r) for label, r in
               _library_runners(settings, X, _SMALL_COMPONENTS, covariance_type, init).items()}
    timings = _measure(runners, settings)
    shape = (X.shape[0], X.shape[1], _SMALL_COMPONENTS)
    per_fit = {label: t.median * 1e3 for label, t in timings.items()}
    details = {"iterations_per_fit": _SMALL_ITERATIONS}
    return [
        Result("small", "ms/fit", per_fit, *shape, covariance_type, "float64", details=details),
        Result("small", "ms/iter", {k: v / _SMALL_ITERATIONS for k, v in per_fit.items()},
               *shape, covariance_type, "float64", details=details),
    ]


def _peak_probes() -> tuple[str, Callable[[], int], Callable[[], int]]:
    """Reset the peak resident set size; return (method, current, peak) probes in KiB."""
    def status(key):
        with open("/proc/self/status") as lines:
            for line in lines:
                if line.startswith(key):
                    return int(line.split()[1])
        raise OSError(f"{key} missing from /proc/self/status")

    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return "VmHWM - VmRSS", lambda: status("VmRSS:"), lambda: status("VmHWM:")
    except OSError:
        import resource

        # ru_maxrss cannot be reset, and is in KiB on Linux but bytes on macOS.
        scale = 1024 if sys.platform == "darwin" else 1

        def maxrss():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale

        return "ru_maxrss growth", maxrss, maxrss


def peak_fit_memory(library: str, n_samples: int, n_features: int, n_components: int) -> dict:
    """Peak memory that ``fit`` (default init) adds on top of ``X``, in this process.

    Meant to run in a fresh process (``python -c``); see the module docstring.

    Parameters
    ----------
    library : {'fastem', 'sklearn'}
    n_samples, n_features, n_components : int
        Shape of the :func:`make_mixture` data set and of the model.

    Returns
    -------
    dict with ``x_mib`` (size of X), ``peak_extra_mib`` and ``method``.
    """
    import gc

    from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

    estimator = GaussianMixture if library == "fastem" else SklearnGaussianMixture
    X = make_mixture(n_samples, n_features, n_components)
    _quietly(lambda: estimator(n_components, random_state=0, max_iter=2).fit(X[:2000]))
    gc.collect()
    method, current, peak = _peak_probes()
    baseline = current()
    _quietly(lambda: estimator(n_components, random_state=0).fit(X))
    return {"x_mib": X.nbytes / 2**20, "peak_extra_mib": (peak() - baseline) / 1024,
            "method": method}


def _python(args: list[str], env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark subprocess {args[:2]} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _case_memory(settings: _Settings, data: _Datasets) -> list[Result]:
    full_size, n_features, n_components, covariance_type = _D10
    shape = (settings.size(full_size), n_features, n_components)
    libraries = ["fastem"] + (["sklearn"] if settings.sklearn is not None else [])
    peaks = {}
    for library in libraries:
        code = ("import json; from fastem.bench import peak_fit_memory; "
                f"print(json.dumps(peak_fit_memory({library!r}, {shape[0]}, {shape[1]}, "
                f"{shape[2]})))")
        peaks[library] = _python(["-c", code])
        _log(f"memory {library}: {peaks[library]}")
    x_mib = peaks["fastem"]["x_mib"]
    return [Result("memory", "MiB", {lib: p["peak_extra_mib"] for lib, p in peaks.items()},
                   *shape, covariance_type, "float64",
                   peak_memory_percent_of_x=100.0 * peaks["fastem"]["peak_extra_mib"] / x_mib,
                   details={"x_mib": x_mib, "method": peaks["fastem"]["method"]})]


_IMPORT_SCRIPT = ("import json, time; start = time.perf_counter(); import {module}; "
                  "print(json.dumps(time.perf_counter() - start))")


def _case_import(settings: _Settings, data: _Datasets) -> list[Result]:
    modules = {"fastem": "fastem"}
    if settings.sklearn is not None:
        modules["sklearn"] = "sklearn.mixture"
    scripts = {lib: _IMPORT_SCRIPT.format(module=module) for lib, module in modules.items()}
    for script in scripts.values() if settings.warm_up_subprocesses else ():
        _python(["-c", script])
    samples: dict[str, list[float]] = {lib: [] for lib in scripts}
    for _ in range(settings.subprocess_repeats):
        for lib, script in scripts.items():
            samples[lib].append(_python(["-c", script]))
    values = {lib: statistics.median(s) * 1e3 for lib, s in samples.items()}
    _log(f"import: {values}")
    return [Result("import", "ms", values, details={
        "modules": modules, "samples_ms": {k: [x * 1e3 for x in s] for k, s in samples.items()}})]


# Imports, then the first fit on Old Faithful (with warm caches).
_FIRST_FIT_SCRIPT = """
import json, sys, time
start = time.perf_counter()
from {module} import GaussianMixture
imported = time.perf_counter()
import numpy as np
X = np.loadtxt(sys.argv[1], delimiter=",", skiprows=1)
loaded = time.perf_counter()
GaussianMixture({k}, random_state=0).fit(X)
fitted = time.perf_counter()
print(json.dumps({{"import": imported - start, "first_fit": fitted - loaded}}))
"""


def _first_fit(module: str) -> dict:
    script = _FIRST_FIT_SCRIPT.format(module=module, k=_FAITHFUL_COMPONENTS)
    return _python(["-c", script, _faithful_path()])


def _warm_first_fits(settings: _Settings, modules: dict[str, str]
                     ) -> dict[str, dict[str, float]]:
    """Median import / first-fit seconds per library, with warm caches."""
    for module in modules.values() if settings.warm_up_subprocesses else ():
        _first_fit(module)
    runs: dict[str, list[dict]] = {lib: [] for lib in modules}
    for _ in range(settings.subprocess_repeats):
        for lib, module in modules.items():
            runs[lib].append(_first_fit(module))
    return {lib: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
            for lib, rs in runs.items()}


def _case_warm(settings: _Settings, data: _Datasets) -> list[Result]:
    modules = {"fastem": "fastem"}
    if settings.sklearn is not None:
        modules["sklearn"] = "sklearn.mixture"
    warm = _warm_first_fits(settings, modules)
    _log(f"warm first fit: {warm}")
    X_shape = _faithful().shape
    return [Result("warm", "s", {lib: w["first_fit"] for lib, w in warm.items()}, *X_shape,
                   _FAITHFUL_COMPONENTS, "full", "float64", details={"medians_s": warm})]


# The first session of the engine issue: a 200,000 x 10, K=5 full fit with the
# default init, then predict_proba, score_samples, a diagonal fit, a 300-row
# fit, a float32 fit and a D=30 fit. Prints the seconds of each step and the
# compilation seconds of each kernel.
_SESSION_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import numpy as np
from fastem import GaussianMixture
from fastem.compilation import compile_times
steps = {}
def step(name, work):
    t = time.perf_counter()
    work()
    steps[name] = time.perf_counter() - t
rng = np.random.default_rng(0)
X = rng.normal(size=(200_000, 10)) + 3.0 * rng.integers(0, 5, size=(200_000, 1))
with compile_times() as kernels:
    model = GaussianMixture(5, random_state=0)
    step("fit 200000x10 K=5 full", lambda: model.fit(X))
    step("predict_proba", lambda: model.predict_proba(X))
    step("score_samples", lambda: model.score_samples(X))
    step("diag fit", lambda: GaussianMixture(5, covariance_type="diag", random_state=0).fit(X))
    step("300-row fit", lambda: GaussianMixture(3, random_state=0).fit(X[:300]))
    step("float32 fit", lambda: GaussianMixture(5, random_state=0).fit(X.astype(np.float32)))
    X30 = rng.normal(size=(20_000, 30))
    step("D=30 fit", lambda: GaussianMixture(3, random_state=0).fit(X30))
print(json.dumps({"steps": steps, "session": time.perf_counter() - start,
                  "kernels": dict(kernels)}))
"""


def _cold_session(cache: str, precompile: bool) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    compiled = None
    if precompile:
        t = perf_counter()
        subprocess.run([sys.executable, "-m", "fastem", "compile"], env=env, check=True,
                       capture_output=True)
        compiled = perf_counter() - t
    outcome = _python(["-c", _SESSION_SCRIPT], env=env)
    outcome["fastem compile"] = compiled
    return outcome


def format_compile_table(kernels: dict[str, float]) -> str:
    """The kernels a session compiled, slowest first, with their seconds."""
    rows = [[name, f"{seconds:.2f}"]
            for name, seconds in sorted(kernels.items(), key=lambda item: -item[1])]
    rows.append(["total", f"{sum(kernels.values()):.2f}"])
    return _table(["kernel (with its helpers)", "s compiling"], rows)


def _case_cold(settings: _Settings, data: _Datasets) -> list[Result]:
    """First use with an empty Numba cache: the first fit, the first session, and
    the same session after ``fastem compile``."""
    with tempfile.TemporaryDirectory(prefix="fastem-cold-cache-") as cache:
        cold = _cold_session(cache, precompile=False)
    with tempfile.TemporaryDirectory(prefix="fastem-compiled-cache-") as cache:
        warmed = _cold_session(cache, precompile=True)
    print(format_compile_table(cold["kernels"]), flush=True)
    _log(f"cold session: {cold['steps']}; after fastem compile ({warmed['fastem compile']:.1f}"
         f" s): {warmed['steps']}")
    first = next(iter(cold["steps"]))
    shape = (200_000, 10, 5, "full", "float64")
    return [
        Result("cold", "s (1st fit)", {"fastem": cold["steps"][first]}, *shape,
               details={"cold": cold}),
        Result("session", "s (1st session)", {"fastem": cold["session"]}, *shape,
               details={"steps": cold["steps"]}),
        Result("precompiled", "s (session after compile)", {"fastem": warmed["session"]},
               *shape, details={"warmed": warmed}),
    ]


def _case_selection(settings: _Settings, data: _Datasets) -> list[Result]:
    """The K x covariance grid on small real data sets: fastem's defaults against
    100 k-means starts per cell, scikit-learn and mclust (``--quick``: Old
    Faithful and crabs, scikit-learn n_init=1 only)."""
    from . import bench_selection

    rows = bench_selection.run(
        datasets=bench_selection.QUICK_DATASETS if settings.quick
        else tuple(bench_selection.DATASETS),
        repeats=settings.repeats, sklearn_n_init=(1,) if settings.quick else (1, 20),
        reference=True)
    print(bench_selection.format_rows(rows, tables=True), flush=True)
    results = []
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        found = {f"{r['tool']} {r['settings']}": r for r in rows if r["dataset"] == dataset}
        fastem = next(r for r in found.values() if r["tool"] == "fastem")
        values = {"fastem": fastem["seconds"]}
        for name, tool in (("sklearn", "scikit-learn n_init=1"), ("mclust", "mclust")):
            row = next((r for key, r in found.items() if key.startswith(tool)), None)
            if row is not None and np.isfinite(row["seconds"]):
                values[name] = row["seconds"]
        details = {name: {"best": r["best"], "bic": r["bic"], "seconds": r["seconds"]}
                   for name, r in found.items()}
        details["dataset"] = dataset
        if "gap" in fastem:
            details["gap"] = fastem["gap"]
        results.append(Result("selection", "s/grid", values, details=details))
    return results


_CASE_FUNCTIONS: dict[str, Callable[[_Settings, _Datasets], list[Result]]] = {
    "small": _case_small,
    **{name: partial(_case_em, name) for name in _EM_CASES},
    "float32": _case_float32,
    "fit": _case_fit,
    "memory": _case_memory,
    "import": _case_import,
    "warm": _case_warm,
    "cold": _case_cold,
    "selection": _case_selection,
    "outofcore": _case_outofcore,
    "online": _case_online,
    "spark": _case_spark,
    "dask": _case_dask,
    "missing": _case_missing,
    "bayesian": _case_bayesian,
    "hmm": _case_hmm,
}


# -------------------------------------------------------------- targets
@dataclass(frozen=True)
class _Target:
    case: str
    description: str
    required: str
    measure: Callable[[list[Result]], float | None]
    met: Callable[[float], bool]
    shape: tuple | None = None
    suffix: str = "x"


def _row(results, case, dtype=None) -> Result | None:
    for r in results:
        if r.case == case and (dtype is None or r.dtype == dtype):
            return r
    return None


def _speedup_of(case):
    def measure(results):
        row = _row(results, case)
        return None if row is None else row.speedup("sklearn")

    return measure


def _float32_gain(results):
    f32, f64 = _row(results, "float32", "float32"), _row(results, "float32", "float64")
    return None if f32 is None or f64 is None else f64.values["fastem"] / f32.values["fastem"]


def _memory_percent(results):
    row = _row(results, "memory")
    return None if row is None else row.peak_memory_percent_of_x


def _import_ratio(results):
    row = _row(results, "import")
    return None if row is None or row.speedup("sklearn") is None else 1.0 / row.speedup("sklearn")


def _speed_relative_to(case, other):
    def measure(results):
        row = _row(results, case)
        return None if row is None else row.speedup(other)

    return measure


def _online_gap(results):
    row = _row(results, "online")
    return None if row is None else row.details["gap_percent"]


def _selection_worst(key, datasets=None):
    """The largest ``key`` over the selection rows (of those ``datasets``):
    'gap' (BIC above the reference) or 'mclust' (time relative to mclust)."""
    def measure(results):
        values = []
        for row in results:
            if row.case != "selection" or (datasets is not None and not any(
                    row.details.get("dataset", "").startswith(d) for d in datasets)):
                continue
            if key == "gap" and "gap" in row.details:
                values.append(row.details["gap"])
            elif key == "mclust" and "mclust" in row.values:
                values.append(row.values["fastem"] / row.values["mclust"])
            elif key == "seconds":
                values.append(row.values["fastem"])
        return max(values) if values else None

    return measure


def _fastem_value(case):
    def measure(results):
        row = _row(results, case)
        return None if row is None else row.values["fastem"]

    return measure


_TARGETS = (
    *(_Target(name, f"{name}: EM iteration vs sklearn", f">= {need}x", _speedup_of(name),
              lambda v, need=need: v >= need, _EM_CASES[name][:3])
      for name, need in (("d10", 20), ("d2", 30), ("d100", 4), ("diag50", 10))),
    _Target("fit", "fit: whole fit, default init, vs sklearn", ">= 10x", _speedup_of("fit"),
            lambda v: v >= 10, _D10[:3]),
    # The aims of the work on speed closer to the machine (the floors above
    # guard against regressions; these say how far there is to go).
    *(_Target(name, f"{label}: EM iteration vs sklearn (aim)", f">= {need}x", _speedup_of(name),
              lambda v, need=need: v >= need, shape)
      for name, label, need, shape in (
          ("d10", "d10", 40, _D10[:3]), ("d2", "d2", 50, _EM_CASES["d2"][:3]),
          ("d100", "d100", 20, _EM_CASES["d100"][:3]),
          ("d100", "d100 at 1M rows", 15, (_FULL_SIZE, 100, 5)),
          ("diag50", "diag50", 25, _EM_CASES["diag50"][:3]))),
    _Target("fit", "fit: whole fit, default init, vs sklearn (aim)", ">= 25x",
            _speedup_of("fit"), lambda v: v >= 25, _D10[:3]),
    _Target("bayesian", "bayesian: variational EM iteration vs sklearn", ">= 10x",
            _speedup_of("bayesian"), lambda v: v >= 10, _D10[:3]),
    _Target("hmm", "hmm: Baum-Welch iteration vs hmmlearn 'log'", ">= 10x",
            _speed_relative_to("hmm", "hmmlearn"), lambda v: v >= 10,
            (_HMM_SHAPE[0], _HMM_SHAPE[3], _HMM_SHAPE[2])),
    _Target("hmm-scaling", "hmm: Baum-Welch iteration vs hmmlearn 'scaling'", ">= 5x",
            _speed_relative_to("hmm-scaling", "hmmlearn"), lambda v: v >= 5,
            (_HMM_SHAPE[0], _HMM_SHAPE[3], _HMM_SHAPE[2])),
    _Target("memory", "memory: peak extra memory of fit", "<= 25% of X", _memory_percent,
            lambda v: v <= 25, _D10[:3], suffix="% of X"),
    _Target("float32", "float32: EM iteration vs float64", ">= 1.5x", _float32_gain,
            lambda v: v >= 1.5, _D10[:3]),
    _Target("float32", "float32: EM iteration vs float64 (aim)", ">= 1.8x", _float32_gain,
            lambda v: v >= 1.8, _D10[:3]),
    _Target("import", "import: fastem vs sklearn.mixture", "<= 1.2x", _import_ratio,
            lambda v: v <= 1.2),
    _Target("warm", "warm: first fit on Old Faithful, after import", "<= 1 s",
            _fastem_value("warm"), lambda v: v <= 1.0, suffix=" s"),
    _Target("outofcore", "outofcore: memmap EM iteration vs in memory", ">= 0.5x",
            _speed_relative_to("outofcore", "in memory"), lambda v: v >= 0.5, _D10[:3]),
    _Target("online", "online: one partial_fit pass, gap to full EM", "<= 0.5%",
            _online_gap, lambda v: v <= 0.5, suffix="%"),
    _Target("selection", "selection: grid time vs mclust (faithful, crabs)", "<= 1.5x",
            _selection_worst("mclust", ("faithful", "crabs")), lambda v: v <= 1.5),
    _Target("selection", "selection: grid on 150-1000 rows", "<= 1 s",
            _selection_worst("seconds", ("faithful", "crabs", "iris", "wine", "breast_cancer")),
            lambda v: v <= 1.0, suffix=" s"),
    _Target("selection", "selection: BIC above 100 k-means starts", "<= 0.5",
            _selection_worst("gap"), lambda v: v <= 0.5, suffix=""),
    _Target("cold", "cold: first 200k x 10 fit, empty cache", "<= 10 s",
            _fastem_value("cold"), lambda v: v <= 10.0, suffix=" s"),
    _Target("session", "cold: first session (7 steps), empty cache", "<= 25 s",
            _fastem_value("session"), lambda v: v <= 25.0, suffix=" s"),
    _Target("precompiled", "the same session after fastem compile", "<= 5 s",
            _fastem_value("precompiled"), lambda v: v <= 5.0, suffix=" s"),
)


def _evaluate_targets(results: list[Result]) -> list[dict]:
    rows = []
    for target in _TARGETS:
        value = target.measure(results)
        if value is None:
            continue
        row = _row(results, target.case)
        off_size = target.shape is not None and (row.n_samples, row.n_features,
                                                 row.n_components) != target.shape
        rows.append({"case": target.case, "target": target.description,
                     "required": target.required, "measured": value,
                     "measured_text": f"{_number(value)}{target.suffix}",
                     "met": bool(target.met(value)), "at_target_size": not off_size})
    return rows


# ------------------------------------------------------------- printing
def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-" if value is None else str(value)
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{_number(value)}x"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


RESULT_COLUMNS = ["case", "N", "D", "K", "cov", "dtype", "unit", "fastem", "sklearn",
                  "reference", "vs sklearn", "vs reference", "peak extra mem"]
TARGET_COLUMNS = ["target", "required", "measured", "met"]


def format_results(results: list[Result]) -> str:
    """The measurements as a Markdown table (columns: ``RESULT_COLUMNS``, and
    ``hmmlearn`` with its ratio when a row measured it)."""
    hmmlearn = any("hmmlearn" in r.values for r in results)
    rows = []
    for r in results:
        memory = (f"{r.peak_memory_percent_of_x:.1f}% of X"
                  if r.peak_memory_percent_of_x is not None else "-")
        extra = ([_number(r.values.get("hmmlearn")), _ratio(r.speedup("hmmlearn"))]
                 if hmmlearn else [])
        rows.append([r.case, *(str(v) if v is not None else "-" for v in (
            r.n_samples, r.n_features, r.n_components, r.covariance_type, r.dtype)), r.unit,
            *(_number(r.values.get(lib)) for lib in ("fastem", "sklearn", "reference")),
            _ratio(r.speedup("sklearn")), _ratio(r.speedup("reference")), memory, *extra])
    return _table(RESULT_COLUMNS + (["hmmlearn", "vs hmmlearn"] if hmmlearn else []), rows)


def format_targets(targets: list[dict]) -> str:
    """The performance targets, measured (``*``: measured at another size)."""
    rows = [[t["target"], t["required"], t["measured_text"],
             ("yes" if t["met"] else "NO") + ("" if t["at_target_size"] else "*")]
            for t in targets]
    return _table(TARGET_COLUMNS, rows)


# ------------------------------------------------------------------ CLI
# --quick: a check that every case runs, in well under a minute on this
# project's 2-vCPU machine (shared) with a warm Numba cache: 37 s measured. It took
# 86 s with data sets 100x smaller, 3 repeats, a 1 s budget and warm-up
# subprocesses (48 s of it in the import and first-fit subprocesses), and
# 59 s with 1 repeat and a 0.5 s budget.
_QUICK_SHRINK = 1000
_QUICK_BUDGET_S = 0.5
_QUICK_REPEATS = 1
_DEFAULT_BUDGET_S = 20.0
_DEFAULT_REPEATS = 3
_MIN_N_SAMPLES = 1000


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _n_samples(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < _MIN_N_SAMPLES:
        raise argparse.ArgumentTypeError(
            f"expected an integer of at least {_MIN_N_SAMPLES}, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # "not value > 0" also refuses NaN.
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _json_path(text: str) -> str:
    # Checked now rather than when the report is written, minutes later.
    folder = os.path.dirname(text) or "."
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder!r} does not exist")
    return text


def _parse_cases(values: list[str]) -> list[str]:
    names = [name for value in values for name in value.split(",") if name]
    if "all" in names:
        return list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)} or 'all'")
    return [c for c in CASES if c in names]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastem.bench",
        description="Time fastem against scikit-learn and fastem.reference on the same data, "
                    "interleaved, and check the project's performance targets.",
    )
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), metavar="CASE",
                        help=f"cases to run, space or comma separated, from {', '.join(CASES)}"
                             " or 'all' (default: all but 'cold' and 'selection', which take"
                             " a minute each)")
    parser.add_argument("--n-samples", type=_n_samples, default=None,
                        help="rows of every synthetic data set, at least "
                             f"{_MIN_N_SAMPLES:,} (default: the target sizes, 1,000,000, or "
                             "200,000 for d100)")
    parser.add_argument("--quick", action="store_true",
                        help=f"data sets {_QUICK_SHRINK}x smaller (at least "
                             f"{_MIN_N_SAMPLES:,} rows), one sample per library, a "
                             f"{_QUICK_BUDGET_S:g} s budget and no warm-up or minimum of "
                             f"{_MIN_SUBPROCESS_REPEATS} for the subprocesses: a check that "
                             "everything works, in well under a minute once the Numba cache "
                             "is warm (the first run after installing also compiles the "
                             "kernels, for minutes); its numbers are rough")
    parser.add_argument("--repeats", type=_positive_int, default=None,
                        help=f"interleaved samples per library (median reported; default "
                             f"{_DEFAULT_REPEATS}, or {_QUICK_REPEATS} with --quick; at least "
                             f"{_MIN_SUBPROCESS_REPEATS} for the import and first-fit "
                             "subprocesses without --quick)")
    parser.add_argument("--budget", type=_positive_seconds, default=None,
                        help="seconds one library may spend on one case; slower libraries "
                             f"take fewer samples (default {_DEFAULT_BUDGET_S:g}, or "
                             f"{_QUICK_BUDGET_S:g} with --quick)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip fastem.reference (slow at a million rows)")
    parser.add_argument("--json", metavar="FILE", type=_json_path,
                        help="also write the results as JSON")
    return parser


def _sklearn_estimator() -> type | None:
    try:
        from sklearn.mixture import GaussianMixture as SklearnGaussianMixture
    except ImportError:
        return None
    return SklearnGaussianMixture


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark cases, print the tables and optionally write JSON.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default: ``sys.argv[1:]``); see ``--help``.

    Returns
    -------
    int
        Exit code: 0 once the report is printed (missed targets are reported,
        not failed).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cases = _parse_cases(args.cases)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    default_repeats, default_budget = ((_QUICK_REPEATS, _QUICK_BUDGET_S) if args.quick
                                       else (_DEFAULT_REPEATS, _DEFAULT_BUDGET_S))
    settings = _Settings(
        repeats=args.repeats if args.repeats is not None else default_repeats,
        budget=args.budget if args.budget is not None else default_budget,
        n_samples=args.n_samples, quick=args.quick, reference=not args.no_reference,
        sklearn=_sklearn_estimator(),
    )
    machine = machine_info()
    print(_format_machine(machine), flush=True)
    data = _Datasets()
    results: list[Result] = []
    for case in cases:
        _log(f"case {case}")
        start = perf_counter()
        results.extend(_CASE_FUNCTIONS[case](settings, data))
        _log(f"case {case} took {perf_counter() - start:.1f} s")
    targets = _evaluate_targets(results)
    machine["load_average_at_end"] = _load_average()
    print()
    print(format_results(results))
    limits = None
    if any(r.unit == "ms/iter" for r in results):
        from .bench_limits import format_limits, machine_peak

        peak = machine_peak()
        limits = {"gflops": peak.gflops, "read_gb_per_s": peak.read_gb_per_s,
                  "n_threads": peak.n_threads}
        table = format_limits(results, peak)
        if table is not None:
            print()
            print(table)
    if targets:
        print()
        print(format_targets(targets))
        if not all(t["at_target_size"] for t in targets):
            print("* measured at a size other than the target's")
    print(f"\nLoad average at the end: {machine['load_average_at_end']}")
    if args.json:
        report = {"machine": machine,
                  "settings": {"cases": cases, "repeats": settings.repeats,
                               "budget_s": settings.budget, "n_samples": settings.n_samples,
                               "quick": settings.quick, "reference": settings.reference},
                  "results": [r.to_dict() for r in results], "targets": targets,
                  "machine_limit": limits}
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
