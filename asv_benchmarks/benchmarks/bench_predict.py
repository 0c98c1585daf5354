"""``predict_proba`` and ``score_samples``: fastem and :mod:`fastem.reference`."""

from __future__ import annotations

import numpy as np

from fastem import GaussianMixture, reference

from .common import Benchmark, dataset, grid, speedup, starting_point

_AXES = ("n_samples", "n_features", "n_components", "covariance_type")


def _reference_log_responsibilities(X, start, covariance_type):
    return reference.log_responsibilities(X, start.weights, start.means,
                                          start.precisions_cholesky, covariance_type)


class Predict(Benchmark):
    """Per-row outputs of a fitted fastem model (parameters = the shared start)."""

    param_names, params = grid(*_AXES)

    def setup(self, n_samples, n_features, n_components, covariance_type):
        self.X = dataset(n_samples, n_features, n_components)
        self.start = starting_point(n_samples, n_features, n_components, covariance_type)
        self.covariance_type = covariance_type
        # max_iter=0 turns the start into a fitted model without running EM.
        self.model = GaussianMixture(
            n_components, covariance_type=covariance_type, max_iter=0,
            weights_init=self.start.weights, means_init=self.start.means,
            precisions_init=self.start.precisions,
        ).fit(self.X)
        # Compiles (or loads) the kernels, so that JIT stays out of every timing.
        self.model.predict_proba(self.X[:10])

    def predict_proba(self):
        self.model.predict_proba(self.X)

    def score_samples(self):
        self.model.score_samples(self.X)

    def reference_predict_proba(self):
        np.exp(_reference_log_responsibilities(self.X, self.start, self.covariance_type)[1])

    def reference_score_samples(self):
        _reference_log_responsibilities(self.X, self.start, self.covariance_type)

    def time_predict_proba(self, *params):
        self.predict_proba()

    def time_score_samples(self, *params):
        self.score_samples()

    def track_speedup_predict_proba(self, *params):
        return speedup(self.predict_proba, self.reference_predict_proba)

    track_speedup_predict_proba.unit = "x reference"

    def track_speedup_score_samples(self, *params):
        return speedup(self.score_samples, self.reference_score_samples)

    track_speedup_score_samples.unit = "x reference"


class ReferencePredict(Benchmark):
    """The reference's E-step, which yields both outputs at once."""

    param_names, params = grid(*_AXES)

    def setup(self, n_samples, n_features, n_components, covariance_type):
        self.X = dataset(n_samples, n_features, n_components)
        self.start = starting_point(n_samples, n_features, n_components, covariance_type)
        self.covariance_type = covariance_type

    def time_predict_proba(self, *params):
        np.exp(_reference_log_responsibilities(self.X, self.start, self.covariance_type)[1])

    def time_score_samples(self, *params):
        _reference_log_responsibilities(self.X, self.start, self.covariance_type)
