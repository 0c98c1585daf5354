"""Exact pruning of far components in the full BLAS engine: the same bits as no pruning."""

from __future__ import annotations

import numpy as np
import pytest

import fastem.stats as stats
from fastem import GaussianMixture
from fastem._kernels import estep
from fastem._kernels.chunks import n_chunks_for
from fastem.stats import (
    GaussianParameters,
    _run_pass,
    engine_for,
    kernel_operands,
    operand_dtype,
)

N_FEATURES = 30  # the full BLAS engine (from stats.BLAS_MIN_FEATURES = 24 on)


def _separated(n_samples, dtype=np.float64, seed=0):
    """Four clusters of covariances with eigenvalues within a factor of ten,
    far enough apart that most responsibilities are exactly 0 and the
    bounds (Euclidean distances times extreme eigenvalues) show it."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=12.0, size=(4, N_FEATURES))
    mixing = np.eye(N_FEATURES) + rng.normal(scale=0.3 / np.sqrt(N_FEATURES),
                                             size=(4, N_FEATURES, N_FEATURES))
    labels = rng.integers(0, 4, n_samples)
    noise = rng.normal(size=(n_samples, N_FEATURES))
    X = centres[labels] + np.einsum("nd,nde->ne", noise, mixing[labels])
    return X.astype(dtype)


def _pass(X, params, covariance_type, mode, prune, monkeypatch):
    monkeypatch.setattr(stats, "PRUNE_MIN_ROWS_PER_FEATURE", 64 if prune else 10**12)
    engine = engine_for(X.shape[1], covariance_type)
    means, prec, log_const, _ = kernel_operands(params, covariance_type,
                                                operand_dtype(engine, X.dtype))
    n_chunks = n_chunks_for(X.shape[0], 1)
    pruned = np.zeros(n_chunks, dtype=np.int64)
    n_components = means.shape[0]
    if mode == estep.MODE_STATISTICS:
        parts, _ = _run_pass(engine, mode, X, None, stats._NO_LABELS, means, prec, log_const,
                             n_chunks, pruned=pruned)
        return parts, int(pruned.sum())
    labels = np.zeros(X.shape[0], dtype=np.int32)
    out = np.empty((X.shape[0], n_components) if mode == estep.MODE_PROBA else (0, 0))
    log_norm = np.empty(X.shape[0])
    _run_pass(engine, mode, X, None, labels if mode == estep.MODE_ARGMAX else stats._NO_LABELS,
              means, prec, log_const, n_chunks, out, log_norm, pruned=pruned)
    return (out, log_norm, labels), int(pruned.sum())


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mode", [estep.MODE_STATISTICS, estep.MODE_PROBA, estep.MODE_ARGMAX,
                                  estep.MODE_LOG_NORM])
def test_pruning_gives_the_bits_of_computing_every_component(covariance_type, dtype, mode,
                                                             monkeypatch):
    X = _separated(4000, dtype)
    model = GaussianMixture(4, covariance_type=covariance_type, random_state=0,
                            max_iter=5).fit(X)
    params = GaussianParameters(model.weights_, model.means_, model.covariances_,
                                model.precisions_cholesky_)
    pruned, skipped = _pass(X, params, covariance_type, mode, True, monkeypatch)
    full, none = _pass(X, params, covariance_type, mode, False, monkeypatch)
    assert none == 0
    if dtype == np.float64:
        # Most of the far components were left out ...
        assert skipped > 0.5 * 3 * X.shape[0]
    else:
        assert skipped == 0  # float32 data: no bounds (their distances would be float32)
    # ... and every output has the same bits.
    for a, b in zip(pruned, full):
        np.testing.assert_array_equal(a, b)


def test_overlapping_components_are_not_pruned(monkeypatch):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(6000, N_FEATURES))  # one cloud: nothing can be skipped
    model = GaussianMixture(3, random_state=0, max_iter=3).fit(X)
    params = GaussianParameters(model.weights_, model.means_, model.covariances_,
                                model.precisions_cholesky_)
    pruned, skipped = _pass(X, params, "full", estep.MODE_STATISTICS, True, monkeypatch)
    full, _ = _pass(X, params, "full", estep.MODE_STATISTICS, False, monkeypatch)
    assert skipped == 0
    for a, b in zip(pruned, full):
        np.testing.assert_array_equal(a, b)


def test_a_fit_with_pruning_equals_one_without(monkeypatch):
    X = _separated(4000, seed=2)
    fitted = GaussianMixture(4, random_state=0, max_iter=20, tol=0.0).fit(X)
    monkeypatch.setattr(stats, "PRUNE_MIN_ROWS_PER_FEATURE", 10**12)
    plain = GaussianMixture(4, random_state=0, max_iter=20, tol=0.0).fit(X)
    assert fitted.lower_bounds_ == plain.lower_bounds_
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_array_equal(getattr(fitted, name), getattr(plain, name))
    np.testing.assert_array_equal(fitted.predict_proba(X), plain.predict_proba(X))


def test_pruning_needs_a_dtrmm_whose_rows_do_not_depend_on_their_neighbours(monkeypatch):
    # This machine's OpenBLAS has the property (for every width the BLAS engine
    # meets); a BLAS without it turns pruning off rather than change any bits.
    assert all(stats.pruning_is_exact(d) for d in (24, 30, 57, 100, 128))
    X = _separated(4000)
    U = GaussianMixture(4, random_state=0, max_iter=2).fit(X).precisions_cholesky_
    bounds = stats.pruning_bounds(U, X)
    assert bounds.shape == (4, 2) and np.all(bounds[:, 0] > 0)
    assert np.all(bounds[:, 0] < bounds[:, 1])
    monkeypatch.setattr(stats, "pruning_is_exact", lambda n_features: False)
    assert stats.pruning_bounds(U, X).shape == (0, 2)
    assert stats.pruning_bounds(U, X[:100]).shape == (0, 2)  # too few rows to pay


def test_pruned_fraction_reports_the_pass():
    from fastem.stats import pruned_fraction

    X = _separated(4000)
    model = GaussianMixture(4, random_state=0, max_iter=5).fit(X)
    fraction = pruned_fraction(X, model.weights_, model.means_, model.precisions_cholesky_,
                               "full")
    # At most the three far components of every row; at least half of them here.
    assert 0.5 * 0.75 < fraction <= 0.75
    assert pruned_fraction(X, model.weights_, model.means_,
                           1.0 / np.sqrt(model.covariances_.diagonal(axis1=1, axis2=2)),
                           "diag") == 0.0


@pytest.mark.parametrize("estimator", ["GaussianMixture", "BayesianGaussianMixture"])
def test_weighted_and_variational_fits_with_pruning_equal_those_without(estimator,
                                                                         monkeypatch):
    import fastem

    X = _separated(4000, seed=5)
    weights = np.random.default_rng(5).uniform(0.2, 3.0, X.shape[0])
    cls = getattr(fastem, estimator)

    def fit():
        model = cls(n_components=4, random_state=0, max_iter=15, tol=0.0)
        with pytest.warns(Warning):  # tol=0 never converges
            return model.fit(X, sample_weight=weights) if estimator == "GaussianMixture" \
                else model.fit(X)

    pruned = fit()
    assert stats.pruned_fraction(X, pruned.weights_, pruned.means_,
                                 pruned.precisions_cholesky_, "full") > 0.3
    monkeypatch.setattr(stats, "PRUNE_MIN_ROWS_PER_FEATURE", 10**12)
    plain = fit()
    assert pruned.lower_bounds_ == plain.lower_bounds_
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_array_equal(getattr(pruned, name), getattr(plain, name))
