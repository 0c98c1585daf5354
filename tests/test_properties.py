"""Invariants of EM checked on generated problems (hypothesis)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import (
    COVARIANCE_TYPES,
    make_mixture,
    precisions_from_cholesky,
    random_parameters,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastem import DegenerateDataWarning, GaussianMixture

PROFILE = settings(max_examples=15, deadline=None)


def problems():
    return st.tuples(
        st.integers(60, 700),           # n_samples (crosses the 256-row block size)
        st.integers(1, 5),              # n_features
        st.integers(1, 4),              # n_components
        st.sampled_from(COVARIANCE_TYPES),
        st.integers(0, 2**16),          # seed
    )


def _fixed_start(X, k, covariance_type, seed):
    w, means, _, pc = random_parameters(X, k, covariance_type, seed=seed)
    return dict(weights_init=w, means_init=means,
                precisions_init=precisions_from_cholesky(pc, covariance_type))


def _fit(X, k, covariance_type, sample_weight=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GaussianMixture(k, covariance_type=covariance_type, **kwargs).fit(
            X, sample_weight=sample_weight)


@PROFILE
@given(problems())
def test_loglik_never_decreases(problem):
    n, d, k, covariance_type, seed = problem
    X = make_mixture(n, d, max(k, 1), seed=seed)
    # EM is monotone for the maximum-likelihood M-step; reg_covar > 0 (or the
    # jitter that repairs a singular covariance) makes the M-step maximise
    # something else, and the lower bound can then fall (scikit-learn's too).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            gm = GaussianMixture(k, covariance_type=covariance_type, tol=0.0, max_iter=40,
                                 reg_covar=0.0, **_fixed_start(X, k, covariance_type, seed)
                                 ).fit(X)
        except ValueError as error:
            # A covariance that became singular: with reg_covar=0 that is
            # scikit-learn's error, not a fit whose monotonicity can be checked.
            assert "ill-defined empirical covariance" in str(error)
            assume(False)
    assume(not any(issubclass(w.category, DegenerateDataWarning) for w in caught))
    steps = np.diff(gm.lower_bounds_)
    # Allow rounding at the 1e-12 level of the per-row log-likelihood.
    tolerance = 1e-12 * np.abs(gm.lower_bounds_).max()
    assert steps.min() >= -tolerance, f"lower bound fell by {-steps.min():.3e}"


@PROFILE
@given(problems())
def test_row_order_does_not_change_the_fit(problem):
    n, d, k, covariance_type, seed = problem
    X = make_mixture(n, d, k, seed=seed)
    start = _fixed_start(X, k, covariance_type, seed)
    perm = np.random.default_rng(seed).permutation(n)
    a = _fit(X, k, covariance_type, max_iter=25, tol=0.0, **start)
    b = _fit(X[perm], k, covariance_type, max_iter=25, tol=0.0, **start)
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=1e-9)
    np.testing.assert_allclose(a.means_, b.means_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(a.predict_proba(X)[perm], b.predict_proba(X[perm]), atol=1e-7)


@pytest.fixture
def python_driven_em(monkeypatch):
    """Force the Python EM driver (parallel kernels) even on small data."""
    import fastem.sources

    monkeypatch.setattr(fastem.sources, "COMPILED_LOOP_WORK", -1)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n_features", [3, 26])  # the loop and the BLAS engines
@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_and_python_em_loops_are_bit_identical(covariance_type, dtype, n_features,
                                                        weighted, monkeypatch):
    # The compiled loop calls the pass, reduction and M-step kernels the Python
    # driver calls, on the same chunks in the same order, and no kernel
    # reassociates: the two loops give the same bits.
    import fastem.sources

    n_samples = 3000 if n_features < 10 else 600
    X = make_mixture(n_samples, n_features, 3, seed=8).astype(dtype)
    start = _fixed_start(X, 3, covariance_type, 4)
    assert fastem.sources.InMemorySource(X, None, covariance_type).compiled_loop_applies(3), \
        "the first fit must run the compiled loop"
    weights = np.random.default_rng(3).uniform(0.1, 3.0, n_samples) if weighted else None
    compiled = _fit(X, 3, covariance_type, weights, tol=1e-8, max_iter=50, **start)
    monkeypatch.setattr(fastem.sources, "COMPILED_LOOP_WORK", -1)
    driven = _fit(X, 3, covariance_type, weights, tol=1e-8, max_iter=50, **start)
    assert compiled.n_iter_ == driven.n_iter_
    assert compiled.lower_bounds_ == driven.lower_bounds_
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(compiled, name), getattr(driven, name),
                                      err_msg=name)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_one_and_two_threads_are_bit_identical(covariance_type, python_driven_em):
    X = make_mixture(5000, 4, 3, seed=2)  # 20 blocks: both threads get work
    fits = [_fit(X, 3, covariance_type, n_threads=t, random_state=0, max_iter=30)
            for t in (1, 2)]
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(fits[0], name), getattr(fits[1], name))
    assert fits[0].lower_bounds_ == fits[1].lower_bounds_
    np.testing.assert_array_equal(fits[0].score_samples(X), fits[1].score_samples(X))


# The fixture only patches a constant, so sharing it across examples is safe.
@settings(PROFILE, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problems())
def test_thread_count_never_changes_results(python_driven_em, problem):
    n, d, k, covariance_type, seed = problem
    X = make_mixture(n, d, k, seed=seed)
    fits = [_fit(X, k, covariance_type, n_threads=t, random_state=seed, max_iter=10)
            for t in (1, 2)]
    np.testing.assert_array_equal(fits[0].means_, fits[1].means_)
    assert fits[0].lower_bounds_ == fits[1].lower_bounds_


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_integer_weights_equal_repeated_rows(covariance_type):
    X = make_mixture(300, 3, 3, seed=4)
    counts = np.random.default_rng(0).integers(0, 4, size=300)
    start = _fixed_start(X, 3, covariance_type, 1)
    weighted = _fit(X, 3, covariance_type, sample_weight=counts.astype(float), tol=0.0,
                    max_iter=30, **start)
    repeated = _fit(np.repeat(X, counts, axis=0), 3, covariance_type, tol=0.0, max_iter=30,
                    **start)
    np.testing.assert_allclose(weighted.lower_bounds_, repeated.lower_bounds_, rtol=1e-10)
    np.testing.assert_allclose(weighted.covariances_, repeated.covariances_, rtol=1e-8)


def test_zero_weight_rows_are_ignored():
    X = make_mixture(300, 2, 2, seed=6)
    outliers = np.full((20, 2), 1e3)
    start = _fixed_start(X, 2, "full", 0)
    sw = np.r_[np.ones(300), np.zeros(20)]
    a = _fit(np.vstack([X, outliers]), 2, "full", sample_weight=sw, tol=0.0, max_iter=20,
             **start)
    b = _fit(X, 2, "full", tol=0.0, max_iter=20, **start)
    np.testing.assert_allclose(a.means_, b.means_, rtol=1e-10)
