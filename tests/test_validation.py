"""Bad input gets a clear ValueError; degenerate data ends in a finite model with a warning."""

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

from fastem import DegenerateDataWarning, GaussianMixture


@pytest.mark.parametrize(
    "X, message",
    [
        (np.array([[1.0, np.nan], [2.0, 3.0], [4.0, 5.0]]), "NaN"),
        (np.array([[1.0, np.inf], [2.0, 3.0], [4.0, 5.0]]), "infinity"),
        (np.empty((0, 2)), "0 sample"),
        (np.arange(10.0), "Expected 2D array"),
        (np.array([["a", "b"], ["c", "d"]]), "could not convert|dtype"),
        (np.array([[1.0, 2.0]]), "1 sample"),
    ],
    ids=["nan", "inf", "empty", "1d", "strings", "one-row"],
)
def test_bad_data_raises_value_error_naming_the_problem(X, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixture(1).fit(X)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_data_get_scikit_learns_own_message(bad, dtype):
    # fastem's fit checks finiteness from the data's extremes (read for its
    # scale anyway); a failure must still read exactly as scikit-learn's.
    from sklearn.mixture import BayesianGaussianMixture as SkBayesian
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    from fastem import BayesianGaussianMixture

    X = make_mixture(50, 3, 2).astype(dtype)
    X[7, 1] = bad
    for ours, theirs in ((GaussianMixture(2), SkGaussianMixture(2)),
                         (BayesianGaussianMixture(n_components=2), SkBayesian(n_components=2))):
        with pytest.raises(ValueError) as expected:
            theirs.fit(X)
        with pytest.raises(ValueError) as raised:
            ours.fit(X)
        assert str(raised.value) == str(expected.value)


def test_missing_em_accepts_nan_but_not_infinity():
    X = make_mixture(200, 3, 2)
    X[5, 0] = np.nan
    model = GaussianMixture(2, missing="em", random_state=0).fit(X)
    assert np.all(np.isfinite(model.means_))
    X[9, 2] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        GaussianMixture(2, missing="em", random_state=0).fit(X)


def test_fewer_samples_than_components():
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        GaussianMixture(5).fit(np.random.default_rng(0).normal(size=(4, 2)))


def test_wrong_feature_count_at_predict():
    gm = GaussianMixture(2, random_state=0).fit(make_mixture(100, 3, 2))
    for method in (gm.predict, gm.predict_proba, gm.score_samples, gm.score):
        with pytest.raises(ValueError, match="3 features"):
            method(np.zeros((5, 2)))


def test_unfitted_model_raises():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        GaussianMixture().predict(np.zeros((3, 2)))


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(n_components=0), "n_components"),
        (dict(covariance_type="banana"), "covariance_type"),
        (dict(init_params="magic"), "init_params"),
        (dict(tol=-1.0), "tol"),
        (dict(n_threads=0), "n_threads"),
        (dict(n_components=2, weights_init=[0.7, 0.7]), "normalized"),
        (dict(n_components=2, weights_init=[1.0]), "shape"),
        (dict(n_components=2, means_init=np.zeros((3, 2))), "shape"),
        (dict(n_components=2, covariance_type="diag", precisions_init=-np.ones((2, 2))),
         "positive"),
        (dict(n_components=1, precisions_init=np.array([[[1.0, 2.0], [2.0, 1.0]]])),
         "positive-definite"),
    ],
)
def test_bad_parameters_raise_value_error(params, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixture(**params).fit(make_mixture(50, 2, 2))


@pytest.mark.parametrize(
    "sample_weight, message",
    [(np.ones(49), "shape"), (-np.ones(50), "non-negative"), (np.zeros(50), "zero"),
     (np.full(50, np.nan), "NaN")],
)
def test_bad_sample_weight(sample_weight, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixture(2).fit(make_mixture(50, 2, 2), sample_weight=sample_weight)


def _assert_finite_model(gm):
    for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        assert np.all(np.isfinite(getattr(gm, name))), name
    assert np.isfinite(gm.lower_bound_)
    np.testing.assert_allclose(gm.weights_.sum(), 1.0)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_duplicated_points_give_finite_model(covariance_type):
    X = np.repeat(np.array([[0.0, 1.0], [5.0, 5.0], [9.0, 0.0]]), 40, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = GaussianMixture(5, covariance_type=covariance_type, random_state=0).fit(X)
    _assert_finite_model(gm)
    assert np.all(np.isfinite(gm.predict_proba(X)))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_constant_column_gives_finite_model(covariance_type):
    X = make_mixture(300, 3, 2)
    X[:, 1] = 7.0
    gm = GaussianMixture(2, covariance_type=covariance_type, random_state=0).fit(X)
    _assert_finite_model(gm)


def test_zero_regularisation_on_singular_data_is_sklearns_error_and_positive_is_repaired():
    X = np.repeat(np.array([[0.0, 1.0], [5.0, 5.0]]), 50, axis=0)
    # As scikit-learn: reg_covar=0 asks for no regularisation, so no repair.
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        GaussianMixture(2, reg_covar=0.0, random_state=0, max_iter=5).fit(X)
    # Collinear columns: 1e-300 on the diagonal is lost to rounding, and the
    # repair (with its warning) makes the covariances positive definite.
    rng = np.random.default_rng(0)
    t = rng.normal(size=(200, 1))
    collinear = np.hstack([t, 3.0 * t + 1.0, t / 7.0])
    with pytest.warns(DegenerateDataWarning, match="positive definite"):
        gm = GaussianMixture(2, reg_covar=1e-300, random_state=0, max_iter=5).fit(collinear)
    _assert_finite_model(gm)


def test_collapsed_component_is_reseeded_with_warning():
    X = make_mixture(400, 2, 2, seed=1)
    w, means, _, pc = random_parameters(X, 3, "full")
    means[2] = X.max(axis=0) + 1e3   # nothing is responsible for this component
    precisions = precisions_from_cholesky(pc, "full")
    precisions[2] = np.eye(2) * 100.0
    with pytest.warns(DegenerateDataWarning, match="collapsed"):
        gm = GaussianMixture(3, weights_init=w, means_init=means, precisions_init=precisions,
                             max_iter=50).fit(X)
    _assert_finite_model(gm)
    # Re-seeded inside the data, not left at the far point or at the origin.
    lo, hi = X.min(axis=0), X.max(axis=0)
    assert np.all((gm.means_ >= lo - 1) & (gm.means_ <= hi + 1))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_large_offset_gives_same_covariances_as_centred_data(covariance_type):
    X = make_mixture(500, 3, 2, seed=3)
    w, means, _, pc = random_parameters(X, 2, covariance_type)
    prec = precisions_from_cholesky(pc, covariance_type)
    kw = dict(covariance_type=covariance_type, weights_init=w, precisions_init=prec,
              tol=0.0, max_iter=20)
    centred = GaussianMixture(2, means_init=means, **kw).fit(X)
    shifted = GaussianMixture(2, means_init=means + 1e7, **kw).fit(X + 1e7)
    np.testing.assert_allclose(shifted.covariances_, centred.covariances_, rtol=1e-5)
    np.testing.assert_allclose(shifted.means_ - 1e7, centred.means_, atol=1e-6)


def test_far_outliers_get_finite_responsibilities():
    X = np.vstack([make_mixture(300, 2, 2, seed=2), [[1e8, -1e8], [3e7, 2e7]]])
    gm = GaussianMixture(2, random_state=0).fit(X)
    proba = gm.predict_proba(X)
    assert np.all(np.isfinite(proba))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert np.all(np.isfinite(gm.score_samples(X)))


def test_float32_stays_float32():
    X = make_mixture(400, 3, 2).astype(np.float32)
    gm = GaussianMixture(2, random_state=0).fit(X)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert getattr(gm, name).dtype == np.float32, name
    assert gm.predict_proba(X).dtype == np.float32
    assert gm.score_samples(X).dtype == np.float32
    as64 = GaussianMixture(2, random_state=0).fit(X.astype(np.float64))
    np.testing.assert_allclose(gm.means_, as64.means_, rtol=1e-4, atol=1e-4)
