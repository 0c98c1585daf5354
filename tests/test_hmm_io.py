"""GaussianHMM model files: round trips, and files that no fit gives refused."""

import json

import numpy as np
import pytest

from fastem import GaussianHMM, GaussianMixture
from fastem.covariance import COVARIANCE_TYPES
from fastem.io import META_KEY, load_model

LENGTHS = [150, 250]


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(4)
    calm = rng.normal(size=(200, 2))
    volatile = rng.normal(loc=3.0, scale=2.0, size=(200, 2))
    return np.vstack([calm[:100], volatile[:120], calm[100:], volatile[120:]])


def _priors(covariance_type):
    """Priors of every shape the M-step broadcasts, none of them the default."""
    return {
        "startprob_prior": np.array([2.0, 3.0]),
        "transmat_prior": np.array([[5.0, 1.5], [1.5, 5.0]]),
        "means_prior": np.array([0.5, -0.5]),
        "means_weight": 0.25,
        "covars_prior": ({"full": np.full((2, 2, 2), 0.02) + np.eye(2) * 0.1,
                          "tied": np.eye(2) * 0.05,
                          "diag": np.array([0.02, 0.03]),
                          "spherical": 0.02})[covariance_type],
        "covars_weight": 3.0 if covariance_type == "tied" else np.array([2.0, 2.5]),
    }


@pytest.fixture(scope="module", params=COVARIANCE_TYPES)
def fitted(request, X):
    model = GaussianHMM(n_components=2, covariance_type=request.param, n_iter=15,
                        random_state=1, n_init=2, **_priors(request.param))
    return model.fit(X, LENGTHS)


def _rewrite(path, fitted_changes=None, replace=None, params=None):
    with np.load(path, allow_pickle=False) as archive:
        entries = {name: archive[name] for name in archive.files}
    meta = json.loads(str(entries[META_KEY]))
    meta["fitted"].update(fitted_changes or {})
    meta["params"].update(params or {})
    entries[META_KEY] = np.array(json.dumps(meta))
    entries.update(replace or {})
    with open(path, "wb") as handle:
        np.savez(handle, **entries)


def test_round_trip_gives_the_same_model(tmp_path, fitted, X):
    path = tmp_path / "hmm.npz"
    fitted.save(path)
    loaded = load_model(path)
    assert type(loaded) is GaussianHMM
    for name in ("startprob_", "transmat_", "means_", "_covars_", "covars_"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fitted, name))
    theirs, ours = fitted.get_params(), loaded.get_params()
    assert theirs.keys() == ours.keys()
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    assert (loaded.n_iter_, loaded.converged_, loaded.n_features, loaded.n_features_in_) == (
        fitted.n_iter_, fitted.converged_, 2, 2)
    assert list(loaded.monitor_.history) == list(fitted.monitor_.history)
    assert loaded.monitor_.converged == fitted.monitor_.converged
    assert loaded.score(X, LENGTHS) == fitted.score(X, LENGTHS)
    np.testing.assert_array_equal(loaded.predict(X, LENGTHS), fitted.predict(X, LENGTHS))
    np.testing.assert_array_equal(loaded.predict_proba(X, LENGTHS),
                                  fitted.predict_proba(X, LENGTHS))


def test_loaded_model_fits_on_from_its_parameters(tmp_path, fitted, X):
    # A loaded model is a start like a hand-set one (init_params="").
    path = tmp_path / "hmm.npz"
    fitted.save(path)
    loaded = load_model(path).set_params(init_params="", n_iter=1, n_init=1)
    fitted_copy = GaussianHMM(**{**fitted.get_params(), "init_params": "", "n_iter": 1,
                                 "n_init": 1})
    for name in ("startprob_", "transmat_", "means_"):
        setattr(fitted_copy, name, getattr(fitted, name))
    fitted_copy.covars_ = fitted._covars_
    loaded.fit(X, LENGTHS)
    fitted_copy.fit(X, LENGTHS)
    np.testing.assert_array_equal(loaded.means_, fitted_copy.means_)
    assert loaded.lower_bound_ == fitted_copy.lower_bound_


def test_model_fitted_without_iterations_round_trips(tmp_path, X):
    model = GaussianHMM(n_components=2, n_iter=0, random_state=0).fit(X)
    assert model.lower_bounds_ == [] and model.lower_bound_ == -np.inf
    model.save(tmp_path / "m.npz")
    loaded = load_model(tmp_path / "m.npz")
    assert loaded.n_iter_ == 0 and loaded.lower_bound_ == -np.inf
    np.testing.assert_array_equal(loaded.means_, model.means_)


def test_unfitted_model_and_random_state_instance_refuse_to_save(tmp_path, X):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        GaussianHMM(n_components=2).save(tmp_path / "m.npz")
    model = GaussianHMM(n_components=2, n_iter=2,
                        random_state=np.random.RandomState(0)).fit(X)
    with pytest.raises(ValueError, match="random_state"):
        model.save(tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()


def test_hand_edited_model_that_no_fit_gives_refuses_to_save(tmp_path, X):
    model = GaussianHMM(n_components=2, n_iter=3, random_state=0).fit(X)
    model.transmat_ = np.array([[0.5, 0.4], [0.2, 0.8]])
    with pytest.raises(ValueError, match="transmat_ rows must .* sum to 1"):
        model.save(tmp_path / "m.npz")


@pytest.mark.parametrize("change, message", [
    ({"replace": {"transmat_": np.array([[0.7, 0.7], [0.1, 0.9]])}}, "transmat_ rows"),
    ({"replace": {"startprob_": np.array([-0.5, 1.5])}}, "startprob_ must be non-negative"),
    ({"replace": {"means_": np.zeros((3, 2))}}, r"array means_ has shape \(3, 2\)"),
    ({"fitted_changes": {"n_features": 3}}, "invalid fitted attributes"),
    ({"fitted_changes": {"n_iter_": 99}}, "invalid fitted attributes"),
    ({"fitted_changes": {"lower_bound_": -1.0}}, "lower_bound_ is"),
    ({"replace": {"transmat_prior": np.ones((3, 3))}}, "transmat_prior of shape"),
    ({"replace": {"means_weight": np.array([1.0, np.nan])}}, "non-finite"),
    ({"params": {"covariance_type": "spherical"}}, r"array _covars_ has shape \(2, 2\)"),
])
def test_file_that_no_fit_gives_is_refused(tmp_path, X, change, message):
    model = GaussianHMM(n_components=2, n_iter=5, random_state=0,
                        means_weight=np.array([0.1, 0.2]),
                        transmat_prior=np.full((2, 2), 2.0)).fit(X)
    path = tmp_path / "m.npz"
    model.save(path)
    _rewrite(path, **change)
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_diag_covars_must_be_positive_in_a_file(tmp_path, X):
    model = GaussianHMM(n_components=2, n_iter=3, random_state=0).fit(X)
    path = tmp_path / "m.npz"
    model.save(path)
    _rewrite(path, replace={"_covars_": np.array([[1.0, -1.0], [1.0, 1.0]])})
    with pytest.raises(ValueError, match="covars must be positive"):
        load_model(path)


def test_fit_refuses_a_prior_that_does_not_broadcast(X):
    with pytest.raises(ValueError, match="transmat_prior of shape"):
        GaussianHMM(n_components=2, transmat_prior=np.ones((3, 3))).fit(X)
    with pytest.raises(ValueError, match="covars_weight must be a number"):
        GaussianHMM(n_components=2, covariance_type="tied",
                    covars_weight=np.ones(2)).fit(X)
    with pytest.raises(ValueError, match="means_prior must be finite"):
        GaussianHMM(n_components=2, means_prior=np.nan).fit(X)


def test_mixture_and_hmm_files_load_as_their_own_class(tmp_path, X):
    GaussianMixture(n_components=2, random_state=0).fit(X).save(tmp_path / "gm.npz")
    GaussianHMM(n_components=2, n_iter=2, random_state=0).fit(X).save(tmp_path / "hmm.npz")
    assert type(load_model(tmp_path / "gm.npz")) is GaussianMixture
    assert type(load_model(tmp_path / "hmm.npz")) is GaussianHMM
