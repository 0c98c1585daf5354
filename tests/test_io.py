"""Tests for fastem.io: pickle-free model files."""

import json
import pickle

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from fastem import GaussianMixture
from fastem.io import (
    FORMAT_NAME,
    FORMAT_VERSION,
    META_KEY,
    load_model,
    save_model,
)

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]
FITTED_ARRAYS = [
    "weights_",
    "means_",
    "covariances_",
    "precisions_",
    "precisions_cholesky_",
]


def three_blobs(n_per_blob=50, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [5.0, 1.0], [1.0, 6.0]])
    scales = np.array([[1.0, 0.5], [0.7, 1.2], [0.4, 0.4]])
    return np.vstack(
        [c + s * rng.standard_normal((n_per_blob, 2)) for c, s in zip(centres, scales)]
    )


@pytest.fixture(scope="module")
def X():
    return three_blobs()


@pytest.fixture(scope="module")
def fitted(X):
    return GaussianMixture(n_components=3, covariance_type="full", random_state=0).fit(
        X
    )


@pytest.fixture
def model_file(tmp_path, fitted):
    path = tmp_path / "model.npz"
    save_model(fitted, path)
    return path


def rewrite(path, meta_changes=None, drop=(), replace=None):
    """Rewrite a saved model with its metadata or arrays changed."""
    with np.load(path, allow_pickle=False) as archive:
        entries = {name: archive[name] for name in archive.files}
    meta = json.loads(str(entries[META_KEY]))
    meta.update(meta_changes or {})
    entries[META_KEY] = np.array(json.dumps(meta))
    entries.update(replace or {})
    for name in drop:
        del entries[name]
    with open(path, "wb") as handle:
        np.savez(handle, **entries)


# ---------------------------------------------------------------------------
# Saved models: round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_round_trip_is_bit_identical(tmp_path, X, covariance_type):
    model = GaussianMixture(
        n_components=3, covariance_type=covariance_type, random_state=0
    )
    model.fit(X)
    path = tmp_path / f"{covariance_type}.npz"
    save_model(model, path)
    loaded = load_model(path)

    assert type(loaded) is GaussianMixture
    for name in FITTED_ARRAYS:
        saved, restored = getattr(model, name), getattr(loaded, name)
        assert restored.dtype == saved.dtype, name
        assert restored.shape == saved.shape, name
        # Bit-identical, not merely close: compare the raw bytes.
        assert restored.tobytes() == saved.tobytes(), name
    assert loaded.get_params() == model.get_params()
    assert loaded.converged_ == model.converged_
    assert loaded.n_iter_ == model.n_iter_
    assert loaded.lower_bound_ == model.lower_bound_
    assert loaded.n_features_in_ == model.n_features_in_
    np.testing.assert_array_equal(loaded.lower_bounds_, model.lower_bounds_)
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))


def test_round_trip_keeps_float32_parameters(tmp_path, X):
    X32 = X.astype(np.float32)
    model = GaussianMixture(n_components=3, random_state=0).fit(X32)
    path = tmp_path / "f32.npz"
    save_model(model, path)
    loaded = load_model(path)
    for name in FITTED_ARRAYS:
        assert getattr(loaded, name).dtype == getattr(model, name).dtype, name
        assert getattr(loaded, name).tobytes() == getattr(model, name).tobytes(), name
    np.testing.assert_array_equal(loaded.predict_proba(X32), model.predict_proba(X32))


def test_round_trip_of_model_fitted_without_iterations(tmp_path, X):
    model = GaussianMixture(n_components=2, max_iter=0, random_state=0).fit(X)
    path = tmp_path / "zero.npz"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.lower_bound_ == model.lower_bound_
    assert list(loaded.lower_bounds_) == list(model.lower_bounds_)
    assert loaded.n_iter_ == model.n_iter_
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))


def test_round_trip_keeps_initial_arrays_and_feature_names(tmp_path, X):
    weights_init = np.array([0.2, 0.3, 0.5])
    means_init = np.array([[0.0, 0.0], [5.0, 1.0], [1.0, 6.0]])
    precisions_init = np.array([[1.0, 2.0], [1.5, 0.5], [4.0, 4.0]])
    model = GaussianMixture(
        n_components=3,
        covariance_type="diag",
        weights_init=weights_init,
        means_init=means_init,
        precisions_init=precisions_init,
        max_iter=5,
    ).fit(X)
    model.feature_names_in_ = np.array(["length", "width"], dtype=object)
    path = tmp_path / "init.npz"
    save_model(model, path)
    loaded = load_model(path)

    params = loaded.get_params()
    np.testing.assert_array_equal(params["weights_init"], weights_init)
    np.testing.assert_array_equal(params["means_init"], means_init)
    np.testing.assert_array_equal(params["precisions_init"], precisions_init)
    assert params["max_iter"] == 5
    assert list(loaded.feature_names_in_) == ["length", "width"]
    assert loaded.feature_names_in_.dtype == object


def test_random_state_instance_is_not_saved(tmp_path, X):
    model = GaussianMixture(n_components=2, random_state=np.random.RandomState(0)).fit(
        X
    )
    path = tmp_path / "rs.npz"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.random_state == GaussianMixture().random_state
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))


@pytest.mark.parametrize("as_str", [False, True])
def test_save_writes_exactly_the_given_path(tmp_path, fitted, as_str):
    path = tmp_path / "model.fastem"
    save_model(fitted, str(path) if as_str else path)
    # NumPy appends ".npz" to bare file names; the file must not move, and no
    # temporary file may be left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fastem"]
    loaded = load_model(str(path) if as_str else path)
    np.testing.assert_array_equal(loaded.means_, fitted.means_)


def test_save_replaces_an_existing_file(tmp_path, X, fitted):
    path = tmp_path / "model.npz"
    other = GaussianMixture(n_components=2, random_state=0).fit(X)
    save_model(other, path)
    save_model(fitted, path)
    assert load_model(path).n_components == fitted.n_components


def test_loaded_model_pickles(model_file, X):
    loaded = load_model(model_file)
    again = pickle.loads(pickle.dumps(loaded))
    np.testing.assert_array_equal(again.predict_proba(X), loaded.predict_proba(X))
    assert again.get_params() == loaded.get_params()


def test_save_unfitted_model_raises(tmp_path):
    with pytest.raises(NotFittedError):
        save_model(GaussianMixture(), tmp_path / "m.npz")
    assert not any(tmp_path.iterdir())


def test_metadata_entry_holds_format_and_scalars(model_file, fitted):
    with np.load(model_file, allow_pickle=False) as archive:
        raw = archive[META_KEY]
    assert raw.ndim == 0 and raw.dtype.kind == "U"
    meta = json.loads(str(raw))
    assert meta["format"] == FORMAT_NAME
    assert meta["format_version"] == FORMAT_VERSION
    assert isinstance(meta["fastem_version"], str)
    assert meta["params"]["n_components"] == fitted.n_components
    assert meta["fitted"]["n_iter_"] == fitted.n_iter_
    assert meta["fitted"]["lower_bound_"] == fitted.lower_bound_


# ---------------------------------------------------------------------------
# Saved models: refusing bad files
# ---------------------------------------------------------------------------


def test_load_missing_file(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(ValueError, match="no such model file") as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_load_random_bytes(tmp_path):
    path = tmp_path / "noise.npz"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ValueError, match="is not a fastem model file") as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_load_truncated_model(model_file):
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not a fastem model file"):
        load_model(model_file)


def test_load_npy_file(tmp_path):
    path = tmp_path / "array.npy"
    np.save(path, np.arange(4.0))
    with pytest.raises(ValueError, match="is not a fastem model file"):
        load_model(path)


def test_load_foreign_npz(tmp_path):
    path = tmp_path / "foreign.npz"
    np.savez(path, weights=np.ones(3))
    with pytest.raises(ValueError, match=f"has no '{META_KEY}' entry"):
        load_model(path)


def test_load_wrong_format_name(model_file):
    rewrite(model_file, {"format": "someone.else"})
    with pytest.raises(ValueError, match="format is 'someone.else'"):
        load_model(model_file)


def test_load_future_format_version(model_file):
    future = FORMAT_VERSION + 1
    rewrite(model_file, {"format_version": future})
    with pytest.raises(ValueError, match=f"format version {future}, newer"):
        load_model(model_file)


def test_load_npz_with_pickled_entry(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, payload=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="'payload' holds pickled Python objects"):
        load_model(path)


def test_load_model_with_pickled_entry_added(model_file):
    rewrite(model_file, replace={"weights_": np.array([0.5, 0.3, 0.2], dtype=object)})
    with pytest.raises(ValueError, match="'weights_' holds pickled"):
        load_model(model_file)


def test_load_missing_array(model_file):
    rewrite(model_file, drop=["covariances_"])
    with pytest.raises(ValueError, match="missing arrays 'covariances_'"):
        load_model(model_file)


def test_load_shape_inconsistent_with_covariance_type(model_file):
    # A full model's (K, D, D) arrays do not fit a diag model's (K, D).
    rewrite(model_file, {"params": {"n_components": 3, "covariance_type": "diag"}})
    with pytest.raises(ValueError, match=r"has shape \(3, 2, 2\), expected \(3, 2\)"):
        load_model(model_file)


def test_load_non_finite_array(model_file, fitted):
    means = fitted.means_.copy()
    means[1, 0] = np.nan
    rewrite(model_file, replace={"means_": means})
    with pytest.raises(ValueError, match="means_ has non-finite values"):
        load_model(model_file)


def test_load_unexpected_entry(model_file):
    rewrite(model_file, replace={"extra": np.zeros(2)})
    with pytest.raises(ValueError, match="unexpected entries 'extra'"):
        load_model(model_file)


def test_load_unknown_parameter(model_file):
    rewrite(
        model_file,
        {"params": {"n_components": 3, "covariance_type": "full", "no_such_param": 1}},
    )
    with pytest.raises(ValueError, match="no_such_param"):
        load_model(model_file)


def test_never_loads_with_pickle(monkeypatch, model_file):
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    load_model(model_file)
    assert calls == [False]
