"""Same answers as scikit-learn's GaussianMixture from identical initial parameters."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import COVARIANCE_TYPES, make_mixture, shared_csv
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

from fastem import GaussianMixture


def _initial_parameters(X, n_components, covariance_type, seed):
    """A deliberately rough start: two EM iterations from a random start."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rough = SklearnGaussianMixture(n_components, covariance_type=covariance_type,
                                       init_params="random", max_iter=2,
                                       random_state=seed).fit(X)
    return dict(weights_init=rough.weights_, means_init=rough.means_,
                precisions_init=rough.precisions_)


def _fit_both(X, n_components, covariance_type, seed=0, **kwargs):
    init = _initial_parameters(X, n_components, covariance_type, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = GaussianMixture(n_components, covariance_type=covariance_type, **init,
                               **kwargs).fit(X)
        theirs = SklearnGaussianMixture(n_components, covariance_type=covariance_type,
                                        **init, **kwargs).fit(X)
    return ours, theirs


def _assert_same_fit(ours, theirs, rtol=1e-8):
    assert ours.n_iter_ == theirs.n_iter_
    assert ours.converged_ == theirs.converged_
    np.testing.assert_allclose(ours.lower_bound_, theirs.lower_bound_, rtol=rtol)
    np.testing.assert_allclose(ours.lower_bounds_, theirs.lower_bounds_, rtol=rtol)
    for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        a, b = getattr(ours, name), getattr(theirs, name)
        scale = np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7 * scale, err_msg=name)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("shape", [(800, 2, 3), (500, 6, 4), (3000, 30, 3)],
                         ids=["D2", "D6", "D30-blas"])
def test_same_fit_as_sklearn_on_synthetic_data(covariance_type, shape):
    n, d, k = shape
    X = make_mixture(n, d, k, seed=d)
    ours, theirs = _fit_both(X, k, covariance_type, tol=1e-6, max_iter=300)
    _assert_same_fit(ours, theirs)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_same_fit_as_sklearn_on_old_faithful(covariance_type):
    X = shared_csv("faithful.csv")
    ours, theirs = _fit_both(X, 3, covariance_type, seed=1, tol=1e-6, max_iter=500)
    _assert_same_fit(ours, theirs)
    np.testing.assert_allclose(ours.bic(X), theirs.bic(X), rtol=1e-8)
    np.testing.assert_allclose(ours.aic(X), theirs.aic(X), rtol=1e-8)
    np.testing.assert_allclose(ours.score_samples(X), theirs.score_samples(X), rtol=1e-8)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-8)
    np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))


def test_warm_start_continues_like_sklearn():
    X = make_mixture(400, 2, 2, seed=3)
    init = _initial_parameters(X, 2, "full", 0)
    models = [cls(2, warm_start=True, max_iter=3, **init)
              for cls in (GaussianMixture, SklearnGaussianMixture)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            for m in models:
                m.fit(X)
    np.testing.assert_allclose(models[0].means_, models[1].means_, rtol=1e-9)
    np.testing.assert_allclose(models[0].lower_bound_, models[1].lower_bound_, rtol=1e-10)


def test_max_iter_zero_keeps_initial_parameters():
    # scikit-learn 1.9 raises AttributeError here (covariances_ is never set
    # when all three initial parameters are given), so compare with the input.
    X = make_mixture(200, 2, 2)
    init = _initial_parameters(X, 2, "diag", 0)
    ours = GaussianMixture(2, covariance_type="diag", max_iter=0, **init).fit(X)
    np.testing.assert_allclose(ours.means_, init["means_init"])
    np.testing.assert_allclose(ours.precisions_, init["precisions_init"], rtol=1e-12)
    np.testing.assert_allclose(ours.covariances_, 1.0 / init["precisions_init"], rtol=1e-12)
    assert ours.n_iter_ == 0 and ours.lower_bound_ == -np.inf and not ours.converged_


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_default_init_reaches_sklearn_quality(covariance_type):
    """With default (k-means) init both land on the same optimum of separated data."""
    X = make_mixture(1500, 3, 3, seed=11, separation=8.0)
    ours = GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
    theirs = SklearnGaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
    np.testing.assert_allclose(ours.lower_bound_, theirs.lower_bound_, rtol=1e-4)
    order_ours = np.lexsort(ours.means_.T)
    order_theirs = np.lexsort(theirs.means_.T)
    np.testing.assert_allclose(ours.means_[order_ours], theirs.means_[order_theirs], atol=1e-2)


def test_sample_matches_fitted_distribution():
    X = make_mixture(600, 2, 2, seed=5, separation=10.0)
    gm = GaussianMixture(2, random_state=0).fit(X)
    draws, labels = gm.sample(20000)
    assert draws.shape == (20000, 2) and labels.shape == (20000,)
    for k in range(2):
        np.testing.assert_allclose(draws[labels == k].mean(axis=0), gm.means_[k], atol=0.1)
    np.testing.assert_allclose(np.bincount(labels) / 20000, gm.weights_, atol=0.02)


def _tied_data(kind, seed):
    """Data whose rows are often at exactly equal distances from two centres."""
    rng = np.random.default_rng(seed)
    if kind == "binary":
        return rng.integers(0, 2, size=(200, 4)).astype(np.float64)
    if kind == "integers":
        return np.round(rng.normal(size=(300, 3)))
    return np.round(rng.normal(size=(300, 2)), 1)


@pytest.mark.parametrize("kind", ["binary", "integers", "tenths"])
def test_kmeans_breaks_distance_ties_as_sklearn(kind):
    from sklearn.cluster import KMeans
    from sklearn.utils import check_random_state

    from fastem.initialization import kmeans_plusplus, lloyd

    for seed in range(8):
        X = _tied_data(kind, seed)
        k = 2 + seed % 4
        seeds, _ = kmeans_plusplus(X, k, check_random_state(seed))
        labels, _, _, _ = lloyd(X, seeds)
        expected = KMeans(k, n_init=1, random_state=seed).fit(X).labels_
        np.testing.assert_array_equal(labels, expected, err_msg=f"seed {seed}")


@pytest.mark.parametrize("kind", ["binary", "integers", "tenths"])
def test_same_fit_as_sklearn_on_data_with_ties(kind):
    for seed in range(4):
        X = _tied_data(kind, seed + 20)
        for covariance_type in ("full", "spherical"):
            params = dict(n_components=2 + seed % 3, covariance_type=covariance_type,
                          random_state=seed, reg_covar=1e-3)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours = GaussianMixture(**params).fit(X)
                theirs = SklearnGaussianMixture(**params).fit(X)
            assert ours.n_iter_ == theirs.n_iter_
            np.testing.assert_allclose(ours.means_, theirs.means_, atol=1e-7)
            np.testing.assert_allclose(ours.weights_, theirs.weights_, atol=1e-8)
