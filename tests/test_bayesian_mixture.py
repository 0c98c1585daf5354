"""BayesianGaussianMixture: parity with scikit-learn, the variational bound, files."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import BayesianGaussianMixture as SklearnBGM

import fastem
from fastem import BayesianGaussianMixture
from fastem.sources import InMemorySource
from fastem.variational import VariationalParameters, VariationalUpdate

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
PRIOR_TYPES = ("dirichlet_process", "dirichlet_distribution")


def blobs(seed=0, n=200, dim=3):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0, 0, 0], [5, 0, 1, 0], [0, 6, -1, 2]])[:, :dim]
    return np.vstack([rng.normal(size=(n, dim)) * (0.5 + i) + c
                      for i, c in enumerate(centres)])


def sklearn_after_one_iteration(X, **params):
    """scikit-learn's model after one iteration, and fastem's holding a copy of it."""
    params = dict(random_state=0, warm_start=True, max_iter=1, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = SklearnBGM(**params).fit(X)
        ours = BayesianGaussianMixture(**params).fit(X)
    ours._set_parameters(copy.deepcopy(theirs._get_parameters()))
    ours.lower_bound_ = float(np.ravel(theirs.lower_bound_)[0])
    return theirs, ours


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
def test_same_fit_as_sklearn_from_the_same_state(covariance_type, prior_type):
    X = blobs()
    theirs, ours = sklearn_after_one_iteration(
        X, n_components=5, covariance_type=covariance_type,
        weight_concentration_prior_type=prior_type, tol=1e-6)
    theirs.max_iter = ours.max_iter = 300
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs.fit(X)
        ours.fit(X)
    their_bound = float(np.ravel(theirs.lower_bound_)[0])
    assert ours.lower_bound_ == pytest.approx(their_bound, rel=1e-8)
    assert abs(ours.n_iter_ - theirs.n_iter_) <= 1
    assert ours.converged_ == theirs.converged_
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_",
                 "mean_precision_", "degrees_of_freedom_", "precisions_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name),
                                   rtol=1e-7, atol=1e-9, err_msg=name)
    if prior_type == "dirichlet_process":
        for mine, other in zip(ours.weight_concentration_, theirs.weight_concentration_):
            np.testing.assert_allclose(mine, other, rtol=1e-7)
    else:
        np.testing.assert_allclose(ours.weight_concentration_, theirs.weight_concentration_,
                                   rtol=1e-7)
    np.testing.assert_allclose(ours.score_samples(X), theirs.score_samples(X), rtol=1e-9)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-9)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_private_interface_matches_sklearn(covariance_type):
    """The E-step terms and the bound scikit-learn's code computes, from one state."""
    X = blobs(1)
    theirs, ours = sklearn_after_one_iteration(X, n_components=4,
                                               covariance_type=covariance_type)
    np.testing.assert_allclose(ours._estimate_log_weights(), theirs._estimate_log_weights(),
                               rtol=1e-12)
    np.testing.assert_allclose(ours._estimate_log_prob(X), theirs._estimate_log_prob(X),
                               rtol=1e-10, atol=1e-10)
    log_prob_norm, log_resp = theirs._e_step(X)
    assert ours._e_step(X)[0] == pytest.approx(log_prob_norm, rel=1e-12)
    theirs._m_step(X, log_resp)
    ours._m_step(X, log_resp)
    np.testing.assert_allclose(ours.means_, theirs.means_, rtol=1e-10)
    np.testing.assert_allclose(ours.covariances_, theirs.covariances_, rtol=1e-9)
    assert ours._compute_lower_bound(log_resp, log_prob_norm) == pytest.approx(
        float(np.ravel(theirs._compute_lower_bound(log_resp, log_prob_norm))[0]), rel=1e-10)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_bound_from_statistics_equals_the_bound_from_responsibilities(covariance_type):
    """The driver's bound (entropy from the statistics) against the direct sum over rows."""
    X = blobs(2)
    model = BayesianGaussianMixture(n_components=4, covariance_type=covariance_type,
                                    max_iter=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X)
    params = model._current_parameters()
    update = VariationalUpdate(covariance_type, model.reg_covar, model._prior())
    stats = InMemorySource(X, None, covariance_type).statistics(params)
    updated, _ = update(stats)
    log_prob_norm, log_resp = model._e_step(X)
    model._set_parameters(updated)
    direct = model._compute_lower_bound(log_resp, log_prob_norm)
    assert update.objective(stats, params, updated) == pytest.approx(direct, rel=1e-10)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), covariance_type=st.sampled_from(COVARIANCE_TYPES),
       prior_type=st.sampled_from(PRIOR_TYPES), n_components=st.integers(1, 6))
def test_lower_bound_never_decreases(seed, covariance_type, prior_type, n_components):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(60, 2)) * rng.uniform(0.1, 10, size=2) + rng.normal(size=2)
    X[: 20] += 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = BayesianGaussianMixture(
            n_components=n_components, covariance_type=covariance_type,
            weight_concentration_prior_type=prior_type, max_iter=40, tol=0,
            random_state=seed % 1000).fit(X)
    bounds = np.asarray(model.lower_bounds_)
    assert np.all(np.isfinite(bounds))
    assert np.all(np.diff(bounds) >= -1e-9 * np.abs(bounds[1:]))


def test_unneeded_components_empty():
    """Three round clusters, ten components: the Dirichlet process uses three
    (from the best of five starts: one start can split a cluster, in
    scikit-learn as here)."""
    rng = np.random.default_rng(3)
    X = np.vstack([rng.normal(size=(300, 3)) * 0.5 + c
                   for c in ([0, 0, 0], [5, 0, 1], [0, 6, -1])])
    model = BayesianGaussianMixture(n_components=10, weight_concentration_prior=1e-3,
                                    n_init=5, max_iter=500, random_state=0).fit(X)
    assert model.effective_n_components() == 3
    assert np.sort(model.weights_)[-3:].sum() > 0.99


def test_threads_do_not_change_the_bits():
    X = blobs(4, n=3000, dim=4)
    fits = [BayesianGaussianMixture(n_components=4, random_state=0, n_threads=n).fit(X)
            for n in (1, 2)]
    assert fits[0].lower_bounds_ == fits[1].lower_bounds_
    assert np.array_equal(fits[0].means_, fits[1].means_)
    assert np.array_equal(fits[0].covariances_, fits[1].covariances_)


def test_row_order_does_not_matter_from_the_same_start():
    X = blobs(5)
    order = np.random.default_rng(0).permutation(X.shape[0])
    start = BayesianGaussianMixture(n_components=3, max_iter=1, random_state=0,
                                    warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start.fit(X)
    fits = []
    for rows in (X, X[order]):
        model = copy.deepcopy(start)
        model.max_iter = 50
        fits.append(model.fit(rows))
    assert fits[0].n_iter_ == fits[1].n_iter_
    assert fits[0].lower_bound_ == pytest.approx(fits[1].lower_bound_, rel=1e-12)
    np.testing.assert_allclose(fits[0].means_, fits[1].means_, rtol=1e-10)


def test_memory_mapped_data_fit_as_in_memory(tmp_path):
    X = blobs(6, n=500)
    path = tmp_path / "x.npy"
    np.save(path, X)
    start = BayesianGaussianMixture(n_components=3, max_iter=1, random_state=0,
                                    warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start.fit(X)
    fits = []
    for data in (X, np.load(path, mmap_mode="r")):
        model = copy.deepcopy(start)
        model.max_iter = 30
        fits.append(model.fit(data))
    assert fits[0].lower_bound_ == pytest.approx(fits[1].lower_bound_, rel=1e-10)
    np.testing.assert_allclose(fits[0].means_, fits[1].means_, rtol=1e-9)


def test_float32_data_keep_their_dtype_and_the_fit():
    X = blobs(7)
    fit64 = BayesianGaussianMixture(n_components=3, random_state=0).fit(X)
    fit32 = BayesianGaussianMixture(n_components=3, random_state=0).fit(X.astype(np.float32))
    assert fit32.means_.dtype == np.float32 and fit32.covariances_.dtype == np.float32
    np.testing.assert_allclose(fit32.means_, fit64.means_, rtol=1e-3, atol=1e-3)


def test_bad_priors_get_sklearns_errors():
    X = blobs(8)
    with pytest.raises(ValueError, match="'degrees_of_freedom_prior' should be greater than 2"):
        BayesianGaussianMixture(degrees_of_freedom_prior=1.5).fit(X)
    with pytest.raises(ValueError, match="'means' should have the shape of \\(3,\\)"):
        BayesianGaussianMixture(mean_prior=[0.0, 1.0]).fit(X)
    with pytest.raises(ValueError, match="'full precision' should be symmetric"):
        BayesianGaussianMixture(covariance_prior=-np.eye(3)).fit(X)
    with pytest.raises(ValueError, match="'diag precision' should be positive"):
        BayesianGaussianMixture(covariance_type="diag", covariance_prior=[1, -1, 1]).fit(X)
    with pytest.raises(ValueError, match="weight_concentration_prior"):
        BayesianGaussianMixture(weight_concentration_prior=0.0).fit(X)


def test_degenerate_data_end_in_a_finite_model():
    X = np.ones((50, 3))
    X[:25, 0] = 2.0                      # two points, repeated; two constant columns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BayesianGaussianMixture(n_components=4, random_state=0).fit(X)
    assert all(np.all(np.isfinite(getattr(model, name)))
               for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"))
    assert np.isfinite(model.lower_bound_)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
def test_model_files_round_trip(tmp_path, covariance_type, prior_type):
    X = blobs(9)
    model = BayesianGaussianMixture(n_components=4, covariance_type=covariance_type,
                                    weight_concentration_prior_type=prior_type,
                                    random_state=0).fit(X)
    model.save(tmp_path / "m.npz")
    loaded = fastem.load(tmp_path / "m.npz")
    assert type(loaded) is BayesianGaussianMixture
    assert np.array_equal(loaded.predict_proba(X), model.predict_proba(X))
    assert loaded.get_params().keys() == model.get_params().keys()
    assert isinstance(loaded.weight_concentration_, tuple) == (prior_type ==
                                                               "dirichlet_process")
    loaded.warm_start = model.warm_start = True
    loaded.max_iter = model.max_iter = 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert loaded.fit(X).lower_bound_ == model.fit(X).lower_bound_


def test_a_tampered_model_file_is_refused(tmp_path):
    import json
    import zipfile

    X = blobs(10)
    model = BayesianGaussianMixture(n_components=3, random_state=0).fit(X)
    model.save(tmp_path / "m.npz")
    with zipfile.ZipFile(tmp_path / "m.npz") as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    meta_name = next(name for name in entries if "meta" in name)
    meta_array = np.load(tmp_path / "m.npz")[meta_name[:-4]]
    meta = json.loads(str(meta_array))
    meta["fitted"]["weight_concentration_"]["stick_breaking"][0][0] *= 5
    arrays = dict(np.load(tmp_path / "m.npz"))
    arrays[meta_name[:-4]] = np.array(json.dumps(meta))
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="weights_ are not the posterior mean"):
        fastem.load(tmp_path / "bad.npz")


def test_no_methods_that_scikit_learns_class_does_not_have():
    model = BayesianGaussianMixture()
    for name in ("bic", "aic", "partial_fit", "impute"):
        assert not hasattr(model, name)
    assert not isinstance(model, fastem.GaussianMixture)


def test_variational_parameters_are_the_kernel_operands():
    """The E-step's constant per component: E[log pi] + E[log|Lambda|]/2 - D/(2 beta)
    - D/2 log 2pi, as the kernel computes it from the posterior's operands."""
    X = blobs(11)
    model = BayesianGaussianMixture(n_components=3, random_state=0).fit(X)
    params = model._current_parameters()
    assert isinstance(params, VariationalParameters)
    log_rho = model._estimate_weighted_log_prob(X)
    from scipy.special import digamma

    d = X.shape[1]
    expected_log_det = (np.array([np.linalg.slogdet(np.linalg.inv(c) / v)[1]
                                  for c, v in zip(model.covariances_, model.degrees_of_freedom_)])
                        + d * np.log(2) + sum(digamma((model.degrees_of_freedom_ - i) / 2)
                                              for i in range(d)))
    diff = X[:, None, :] - model.means_[None]
    maha = np.einsum("nki,kij,nkj->nk", diff, model.precisions_, diff)
    expected = (model._estimate_log_weights() + 0.5 * expected_log_det
                - 0.5 * d / model.mean_precision_ - 0.5 * d * np.log(2 * np.pi) - 0.5 * maha)
    np.testing.assert_allclose(log_rho, expected, rtol=1e-9, atol=1e-9)
