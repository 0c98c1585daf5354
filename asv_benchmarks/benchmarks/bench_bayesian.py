"""Variational EM (``BayesianGaussianMixture``): fastem against scikit-learn,
both continuing from the same posterior."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.mixture import BayesianGaussianMixture as SklearnBayesian

from fastem import BayesianGaussianMixture

from .common import FIT_ITERATIONS, Benchmark, dataset, grid, speedup

_AXES = ("n_samples", "n_features", "n_components", "covariance_type")


def _continue(estimator, X, start, n_components, covariance_type, max_iter=FIT_ITERATIONS):
    model = estimator(n_components=n_components, covariance_type=covariance_type, tol=0.0,
                      max_iter=max_iter, warm_start=True)
    model._set_parameters(tuple(tuple(p.copy() for p in value) if isinstance(value, tuple)
                                else np.copy(value) for value in start))
    model.converged_, model.lower_bound_, model.n_features_in_ = False, -np.inf, X.shape[1]
    # tol=0 never converges, by design: the ConvergenceWarning is expected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X)


class BayesianFit(Benchmark):
    """``FIT_ITERATIONS`` variational EM iterations from one posterior (scikit-learn's
    parameters after one iteration of fastem's fit)."""

    param_names, params = grid(*_AXES)

    def setup(self, n_samples, n_features, n_components, covariance_type):
        self.X = dataset(n_samples, n_features, n_components)
        self.args = (n_components, covariance_type)
        state = BayesianGaussianMixture(n_components=n_components, max_iter=1,
                                        covariance_type=covariance_type, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state.fit(self.X)
        self.start = state._get_parameters()
        self.fit()  # compiles (or loads) the kernels

    def fit(self):
        _continue(BayesianGaussianMixture, self.X, self.start, *self.args)

    def sklearn_fit(self):
        _continue(SklearnBayesian, self.X, self.start, *self.args)

    def time_fit(self, *params):
        self.fit()

    def track_speedup_vs_sklearn(self, *params):
        return speedup(self.fit, self.sklearn_fit)

    track_speedup_vs_sklearn.unit = "x sklearn"
