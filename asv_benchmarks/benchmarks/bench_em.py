"""EM through ``fit``: fastem and :mod:`fastem.reference` from the same start."""

from __future__ import annotations

import statistics
import warnings
from time import perf_counter

from fastem import GaussianMixture, reference

from .common import (
    FIT_ITERATIONS,
    PROFILE,
    SPEEDUP_REPEATS,
    Benchmark,
    dataset,
    grid,
    speedup,
    starting_point,
)

_AXES = ("n_samples", "n_features", "n_components", "covariance_type")


def _fastem_fit(X, start, n_components, covariance_type, max_iter=FIT_ITERATIONS,
                estimator=GaussianMixture):
    """``max_iter`` iterations of ``estimator`` (fastem's, or scikit-learn's) from ``start``."""
    model = estimator(n_components, covariance_type=covariance_type, tol=0.0,
                      max_iter=max_iter, weights_init=start.weights,
                      means_init=start.means, precisions_init=start.precisions)
    # tol=0 never converges, by design: the ConvergenceWarning is expected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X)


def _reference_fit(X, start, covariance_type):
    reference.em_fit(X, start.weights, start.means, start.precisions_cholesky,
                     covariance_type, tol=0.0, max_iter=FIT_ITERATIONS)


def _median_seconds(func, repeats=SPEEDUP_REPEATS):
    times = []
    for _ in range(repeats):
        start = perf_counter()
        func()
        times.append(perf_counter() - start)
    return statistics.median(times)


class EMFit(Benchmark):
    """fastem's ``fit``: ``FIT_ITERATIONS`` EM iterations (tol=0) from a fixed start."""

    param_names, params = grid(*_AXES)

    def setup(self, n_samples, n_features, n_components, covariance_type):
        self.X = dataset(n_samples, n_features, n_components)
        self.start = starting_point(n_samples, n_features, n_components, covariance_type)
        self.n_components = n_components
        self.covariance_type = covariance_type
        # Compiles (or loads) the kernels, so that JIT stays out of every timing.
        self.fit()

    def fit(self, max_iter=FIT_ITERATIONS):
        _fastem_fit(self.X, self.start, self.n_components, self.covariance_type, max_iter)

    def reference_fit(self):
        _reference_fit(self.X, self.start, self.covariance_type)

    def time_fit(self, *params):
        self.fit()

    def peakmem_fit(self, *params):
        self.fit()

    def track_fit_ms_per_iteration(self, *params):
        # A max_iter=0 fit pays validation and set-up only: the difference is EM.
        fixed = _median_seconds(lambda: self.fit(max_iter=0))
        return 1e3 * (_median_seconds(self.fit) - fixed) / FIT_ITERATIONS

    track_fit_ms_per_iteration.unit = "ms"

    def track_speedup_fit(self, *params):
        return speedup(self.fit, self.reference_fit)

    track_speedup_fit.unit = "x reference"


class ReferenceEMFit(Benchmark):
    """:func:`fastem.reference.em_fit`, the same iterations as :class:`EMFit`."""

    param_names, params = grid(*_AXES)

    def setup(self, n_samples, n_features, n_components, covariance_type):
        self.X = dataset(n_samples, n_features, n_components)
        self.start = starting_point(n_samples, n_features, n_components, covariance_type)
        self.covariance_type = covariance_type

    def fit(self):
        _reference_fit(self.X, self.start, self.covariance_type)

    def time_fit(self, *params):
        self.fit()

    def peakmem_fit(self, *params):
        self.fit()

    def track_fit_ms_per_iteration(self, *params):
        return 1e3 * _median_seconds(self.fit) / FIT_ITERATIONS

    track_fit_ms_per_iteration.unit = "ms"


class WideEMFit(Benchmark):
    """Full covariances at D = 100 (issue 15's wide cases, the lecture's "minutes"
    one at a million rows): separated components, where exact pruning leaves
    most of them out of each row's E-step. fastem against scikit-learn from
    the same start, and the fraction of (row, component) pairs pruned."""

    param_names = ["n_samples"]
    params = [[200_000] if PROFILE == "quick" else [200_000, 1_000_000]]
    n_features = 100
    n_components = 5

    def setup(self, n_samples):
        self.X = dataset(n_samples, self.n_features, self.n_components)
        self.start = starting_point(n_samples, self.n_features, self.n_components, "full")
        self.fit()  # compiles (or loads) the kernels

    def fit(self):
        _fastem_fit(self.X, self.start, self.n_components, "full")

    def sklearn_fit(self):
        from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

        _fastem_fit(self.X, self.start, self.n_components, "full",
                    estimator=SklearnGaussianMixture)

    def time_fit(self, n_samples):
        self.fit()

    def track_speedup_vs_sklearn(self, n_samples):
        return speedup(self.fit, self.sklearn_fit)

    track_speedup_vs_sklearn.unit = "x sklearn"

    def track_pruned_fraction(self, n_samples):
        from fastem.stats import pruned_fraction

        return pruned_fraction(self.X, self.start.weights, self.start.means,
                               self.start.precisions_cholesky, "full")

    track_pruned_fraction.unit = "of pairs"
