"""Baum–Welch (``GaussianHMM``): fastem against hmmlearn from the same start."""

from __future__ import annotations

import warnings

import numpy as np

from fastem import GaussianHMM
from fastem.bench import hmm_problem

from .common import FIT_ITERATIONS, PROFILE, Benchmark, speedup

# 100 sequences, 8 states, 4 features, diagonal covariances (the shape).
_ROWS = 100_000 if PROFILE == "quick" else 1_000_000


def _fit(estimator, X, lengths, start, implementation):
    model = estimator(n_components=start["means_"].shape[0], covariance_type="diag",
                      n_iter=FIT_ITERATIONS, tol=-np.inf, init_params="", params="stmc",
                      implementation=implementation)
    for name, value in start.items():
        setattr(model, name, value.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, lengths)


class HMMFit(Benchmark):
    """``FIT_ITERATIONS`` Baum–Welch iterations from one start."""

    param_names = ["implementation"]
    params = [["log", "scaling"]]

    def setup(self, implementation):
        self.X, self.lengths, self.start = hmm_problem(_ROWS, 100, 8, 4)
        self.implementation = implementation
        self.fit()  # compiles (or loads) the kernels

    def fit(self):
        _fit(GaussianHMM, self.X, self.lengths, self.start, self.implementation)

    def time_fit(self, implementation):
        self.fit()

    def track_speedup_vs_hmmlearn(self, implementation):
        try:
            from hmmlearn.hmm import GaussianHMM as HmmlearnHMM
        except ImportError:
            return float("nan")
        return speedup(self.fit, lambda: _fit(HmmlearnHMM, self.X, self.lengths, self.start,
                                              self.implementation))

    track_speedup_vs_hmmlearn.unit = "x hmmlearn"
