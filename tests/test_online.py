"""Online EM: partial_fit by stepwise EM (a driver step of fastem.em fed by the
in-memory source of each batch)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import COVARIANCE_TYPES, make_mixture

from fastem import GaussianMixture


def _quiet(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


def test_one_pass_of_batches_reaches_full_em():
    X = make_mixture(n_samples=200_000, n_features=3, n_components=4, seed=3, separation=3.0)
    rng = np.random.default_rng(0)
    X = X[rng.permutation(X.shape[0])]
    full = _quiet(GaussianMixture(4, random_state=0).fit, X)
    online = GaussianMixture(4, random_state=0)
    for start in range(0, X.shape[0], 10_000):
        _quiet(online.partial_fit, X[start:start + 10_000])
    gap = (full.score(X) - online.score(X)) / abs(full.score(X))
    assert gap < 0.005, gap


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_a_step_blends_the_batches_statistics_as_the_reference_does(covariance_type):
    """Step 2 = the M-step of batch 1's statistics under the first fit, per unit
    weight, times (1 - rho), plus batch 2's under the same parameters times rho:
    the reference M-step of both batches with those row weights."""
    from fastem import reference

    X = make_mixture(n_samples=3000, n_features=3, n_components=3, seed=7)
    first, second = X[:1700], X[1700:]
    w2 = np.random.default_rng(2).uniform(0.5, 2.0, size=second.shape[0])
    model = GaussianMixture(3, covariance_type=covariance_type, random_state=0,
                            learning_offset=2.0, learning_decay=0.8)
    _quiet(model.partial_fit, first)
    params = (model.weights_, model.means_, model.precisions_cholesky_)
    _quiet(model.partial_fit, second, sample_weight=w2)
    rho = (1 + 2.0) ** -0.8
    resp1 = np.exp(reference.log_responsibilities(first, *params, covariance_type)[1])
    resp2 = np.exp(reference.log_responsibilities(second, *params, covariance_type)[1])
    w2 = w2 * (w2.size / w2.sum())  # weights are relative (rescaled to average 1)
    rows = np.concatenate([np.full(first.shape[0], (1 - rho) / first.shape[0]),
                           w2 * rho / w2.sum()])
    nk, means, cov = reference.estimate_parameters(
        np.vstack([first, second]), np.vstack([resp1, resp2]) * rows[:, None],
        model.reg_covar, covariance_type)
    np.testing.assert_allclose(model.weights_, nk / nk.sum(), rtol=1e-9)
    np.testing.assert_allclose(model.means_, means, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.covariances_, cov, rtol=1e-8, atol=1e-12)


def test_a_step_from_a_loaded_model_is_one_em_iteration_on_its_batch(tmp_path):
    from fastem import load

    X = make_mixture(n_samples=2000, n_features=2, n_components=2, seed=4)
    model = _quiet(GaussianMixture(2, random_state=0, max_iter=5).fit, X[:1000])
    model.save(tmp_path / "m.npz")
    online = load(tmp_path / "m.npz")
    _quiet(online.partial_fit, X[1000:])
    warm = load(tmp_path / "m.npz").set_params(warm_start=True, max_iter=1)
    _quiet(warm.fit, X[1000:])
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(online, name), getattr(warm, name), rtol=1e-10,
                                   err_msg=name)


def test_first_call_fits_its_batch_and_fit_restarts_the_steps():
    X = make_mixture(n_samples=2000, n_features=2, n_components=2, seed=1)
    online = _quiet(GaussianMixture(2, random_state=0).partial_fit, X[:1000])
    fitted = _quiet(GaussianMixture(2, random_state=0).fit, X[:1000])
    np.testing.assert_array_equal(online.means_, fitted.means_)
    steps = online.n_iter_
    _quiet(online.partial_fit, X[1000:])
    assert online.n_iter_ == steps + 1 and len(online.lower_bounds_) == online.n_iter_
    assert online.lower_bound_ == online.lower_bounds_[-1]
    _quiet(online.fit, X)
    assert online._running is None


def test_partial_fit_validates():
    X = make_mixture(n_samples=500, n_features=2, n_components=2, seed=1)
    model = _quiet(GaussianMixture(2, random_state=0).partial_fit, X)
    with pytest.raises(ValueError, match="features"):
        model.partial_fit(np.ones((10, 3)))
    with pytest.raises(ValueError, match="learning_decay"):
        GaussianMixture(2, learning_decay=0.4).partial_fit(X)
    with pytest.raises(ValueError, match="learning_offset"):
        GaussianMixture(2, learning_offset=-1.0).partial_fit(X)


def test_a_saved_online_model_keeps_its_learning_parameters(tmp_path):
    from fastem import load

    X = make_mixture(n_samples=500, n_features=2, n_components=2, seed=1)
    model = GaussianMixture(2, random_state=0, learning_offset=5.0, learning_decay=0.9)
    _quiet(model.partial_fit, X)
    _quiet(model.partial_fit, X)
    model.save(tmp_path / "m.npz")
    loaded = load(tmp_path / "m.npz")
    assert loaded.learning_offset == 5.0 and loaded.learning_decay == 0.9
    _quiet(loaded.partial_fit, X)  # continues, its running statistics restarted
    assert loaded.n_iter_ == model.n_iter_ + 1


def test_minibatch_fit_reaches_full_em_and_polishing_converges():
    X = make_mixture(n_samples=100_000, n_features=3, n_components=4, seed=3, separation=3.0)
    full = _quiet(GaussianMixture(4, random_state=0).fit, X)
    rough = _quiet(GaussianMixture(4, random_state=0, batch_size=5000, n_epochs=1,
                                   max_iter=0).fit, X)
    gap = (full.score(X) - rough.score(X)) / abs(full.score(X))
    assert gap < 0.005, gap
    polished = _quiet(GaussianMixture(4, random_state=0, batch_size=5000).fit, X)
    assert polished.converged_
    assert polished.score(X) >= full.score(X) - 1e-3 * abs(full.score(X))


def test_minibatch_fit_with_weights_and_batches_as_large_as_the_data():
    X = make_mixture(n_samples=4000, n_features=2, n_components=3, seed=6)
    weights = np.random.default_rng(0).uniform(0.5, 2.0, size=X.shape[0])
    plain = _quiet(GaussianMixture(3, random_state=0).fit, X, sample_weight=weights)
    whole = _quiet(GaussianMixture(3, random_state=0, batch_size=4000).fit, X,
                   sample_weight=weights)
    np.testing.assert_array_equal(whole.means_, plain.means_)  # one batch: plain EM
    scaled = _quiet(GaussianMixture(3, random_state=0, batch_size=500).fit, X,
                    sample_weight=weights * 1e-9)
    again = _quiet(GaussianMixture(3, random_state=0, batch_size=500).fit, X,
                   sample_weight=weights)
    np.testing.assert_allclose(scaled.means_, again.means_, rtol=1e-9)
    with pytest.raises(ValueError, match="batch_size"):
        GaussianMixture(3, batch_size=0).fit(X)
    with pytest.raises(ValueError, match="n_epochs"):
        GaussianMixture(3, batch_size=10, n_epochs=0).fit(X)
