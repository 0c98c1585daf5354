"""Compile and cache every kernel ahead of use (``fastem compile``), and time compilation.

Numba compiles fastem's kernels on first use and caches them on disk
(``cache=True``, next to the package or in ``NUMBA_CACHE_DIR``). A fresh
container, CI job or cluster worker pays that compilation once; running
:func:`compile_kernels` at image-build time pays it there instead, so that a
first script compiles nothing.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["compile_kernels", "compile_times"]


@contextlib.contextmanager
def compile_times() -> Iterator[dict[str, float]]:
    """Seconds Numba spends compiling each kernel called from Python, while inside.

    Yields a dict filled on exit: kernel name -> seconds, counting the
    helpers compiled for it (nested compilations are charged to the
    outermost kernel). Uses Numba's event API (``numba:compile``).
    """
    from numba.core import event

    totals: dict[str, float] = defaultdict(float)
    depth = [0]
    started: list[float] = []

    class _Listener(event.Listener):
        def on_start(self, ev):
            depth[0] += 1
            started.append(time.perf_counter())

        def on_end(self, ev):
            depth[0] -= 1
            seconds = time.perf_counter() - started.pop()
            if depth[0] == 0:
                totals[ev.data["dispatcher"].py_func.__qualname__] += seconds

    listener = _Listener()
    event.register("numba:compile", listener)
    try:
        yield totals
    finally:
        event.unregister("numba:compile", listener)


def _warm_data(n_samples: int, n_features: int, dtype) -> np.ndarray:
    """Deterministic, well-conditioned data with two clusters."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n_samples, n_features))
    X[: n_samples // 2] += 4.0
    return np.ascontiguousarray(X, dtype=dtype)


def compile_kernels(dtypes=(np.float64, np.float32),
                    report: Callable[[str], None] | None = print) -> dict[str, float]:
    """Compile (or load from the cache) every kernel fastem uses, for each dtype.

    Runs the code paths of a fit on tiny data: k-means++ and Lloyd, the
    hierarchical start, the label statistics, the fused pass of every engine
    (loops and BLAS, full and diagonal scatter) in each of its modes, the
    M-steps, the compiled EM loop and predictions, for every covariance type,
    the pass of EM with missing values, and the forward-backward and Viterbi
    kernels of hidden Markov models.

    Parameters
    ----------
    dtypes : sequence of dtypes
        The data precisions to compile for (float64 and float32 by default).
    report : callable or None
        Called with one line per step (what was compiled and how long it took).

    Returns
    -------
    dict
        Kernel name -> seconds spent compiling it (0 entries when everything
        was already cached).
    """
    from .covariance import COVARIANCE_TYPES
    from .mixture import GaussianMixture

    totals: dict[str, float] = defaultdict(float)
    # Small fits run the compiled EM loop from their first iteration here (it
    # is what a warmed cache is for; see sources.COMPILED_LOOP_AFTER).
    with _compiled_loops_at_once():
        _compile_mixture_kernels(dtypes, totals, report)
    # EM with missing values: its kernel works in float64 whatever the data.
    X = _warm_data(64, 3, np.float64)
    X[::5, 1] = np.nan
    start = time.perf_counter()
    with compile_times() as seconds, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GaussianMixture(2, missing="em", max_iter=2, random_state=0).fit(X)
        model.predict_proba(X)
        model.impute(X)
    _add_step(totals, seconds, report, "missing values", start)
    # Hidden Markov models: forward-backward (both recursions), Viterbi and the
    # emission passes of every covariance type (in float64, as GaussianHMM fits).
    from .hmm import GaussianHMM

    X = _warm_data(64, 2, np.float64)
    start = time.perf_counter()
    with compile_times() as seconds, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for covariance_type in COVARIANCE_TYPES:
            for implementation in ("log", "scaling"):
                model = GaussianHMM(2, covariance_type=covariance_type, n_iter=2,
                                    implementation=implementation, random_state=0)
                model.fit(X, [24, 40])
                model.predict_proba(X)
            model.decode(X, [24, 40])
    _add_step(totals, seconds, report, "hidden Markov models", start)
    return dict(totals)


@contextlib.contextmanager
def _compiled_loops_at_once() -> Iterator[None]:
    """Small fits run the compiled EM loop at once while inside."""
    from . import sources

    saved = sources.COMPILED_LOOP_AFTER
    sources.COMPILED_LOOP_AFTER = 0
    try:
        yield
    finally:
        sources.COMPILED_LOOP_AFTER = saved


def _compile_mixture_kernels(dtypes, totals, report) -> None:
    """The mixture's kernels of every engine, covariance type and dtype."""
    from .covariance import COVARIANCE_TYPES
    from .mixture import GaussianMixture
    from .stats import BLAS_MIN_FEATURES

    for dtype in dtypes:
        dtype = np.dtype(dtype)
        # One width per engine family: the vectorised loops and BLAS.
        for n_features, engine in ((2, "loops"), (BLAS_MIN_FEATURES, "BLAS")):
            X = _warm_data(64, n_features, dtype)
            start = time.perf_counter()
            with compile_times() as seconds, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for covariance_type in COVARIANCE_TYPES:
                    # A small fit: the starts' kernels, the pass (which large
                    # data run from Python) and the compiled EM loop.
                    model = GaussianMixture(2, covariance_type=covariance_type, max_iter=3,
                                            random_state=0).fit(X)
                    model.predict_proba(X)
                    model.score_samples(X)
                GaussianMixture(2, init_params="hierarchical", max_iter=1).fit(X)
            _add_step(totals, seconds, report, f"{dtype.name:8s} {engine:5s} engines", start)


def _add_step(totals, seconds, report, label: str, start: float) -> None:
    """Add a step's compile times to ``totals`` and report them in one line."""
    for name, value in seconds.items():
        totals[name] += value
    if report is not None:
        compiled = sum(seconds.values())
        what = f"{len(seconds)} kernels compiled" if seconds else "all cached"
        report(f"{label}: {what} in {compiled:.1f} s "
               f"({time.perf_counter() - start:.1f} s in all)")
