"""Tests for fastem.io: pickle-free model files and the registry of their formats."""

import ast
import fractions
import io
import json
import math
import pickle
import re
import struct
import time
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import sklearn.mixture
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

import fastem.io
from fastem import GaussianMixture
from fastem.io import (
    META_KEY,
    ModelFormat,
    load_model,
    register_model_format,
    registered_model_formats,
    save_model,
)

GM_FORMAT = registered_model_formats()["fastem.GaussianMixture"]

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


def rewrite(path, meta_changes=None, drop=(), replace=None, params=None, drop_params=()):
    """Rewrite a saved model with its metadata or arrays changed."""
    with np.load(path, allow_pickle=False) as archive:
        entries = {name: archive[name] for name in archive.files}
    meta = json.loads(str(entries[META_KEY]))
    meta.update(meta_changes or {})
    meta["params"].update(params or {})
    for name in drop_params:
        del meta["params"][name]
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


# A value other than the default for every constructor parameter, consistent
# with a two-component diagonal model of two features.
NON_DEFAULT_PARAMS = {
    "n_components": 2,
    "covariance_type": "diag",
    "tol": 1e-4,
    "reg_covar": 1e-5,
    "max_iter": 50,
    "n_init": 2,
    "init_params": "random",
    "weights_init": [0.4, 0.6],
    "means_init": [[0.0, 0.0], [5.0, 1.0]],
    "precisions_init": [[1.0, 2.0], [0.5, 0.25]],
    "random_state": 7,
    "warm_start": True,
    "verbose": 2,
    "verbose_interval": 5,
    "n_threads": 1,
    "learning_offset": 3.0,
    "learning_decay": 0.9,
    "batch_size": 100,
    "n_epochs": 3,
    "prior": "default",
    "missing": "em",
}


def test_a_version_2_file_loads_with_the_default_learning_parameters(model_file):
    """Version 2 predates learning_offset, learning_decay, batch_size and n_epochs."""
    rewrite(model_file, meta_changes={"format_version": 2},
            drop_params=("learning_offset", "learning_decay", "batch_size", "n_epochs"))
    loaded = load_model(model_file)
    assert loaded.learning_offset == 1.0 and loaded.learning_decay == 0.7
    # The current version must store them.
    rewrite(model_file, meta_changes={"format_version": 4})
    with pytest.raises(ValueError, match="lacks the parameters 'batch_size', 'learning_"):
        load_model(model_file)


def test_a_version_3_file_loads_without_a_prior(model_file):
    """Version 3 predates prior (MAP EM) and the fitted prior_."""
    with np.load(model_file, allow_pickle=False) as archive:
        meta = json.loads(str(archive[META_KEY]))
    del meta["fitted"]["prior_"]
    rewrite(model_file, meta_changes={"format_version": 3, "fitted": meta["fitted"]},
            drop_params=("prior",))
    loaded = load_model(model_file)
    assert loaded.prior is None and loaded.prior_ is None
    rewrite(model_file, meta_changes={"format_version": 4})
    with pytest.raises(ValueError, match="lacks the parameters 'prior'"):
        load_model(model_file)


@pytest.mark.parametrize("bad", [{"GaussianPrior": {"mean": "x"}}, {"Other": {}}, 3.5,
                                 {"GaussianPrior": {"mean": None, "shrinkage": [1, 2],
                                                    "dof": None, "scale": None}}])
def test_a_malformed_prior_is_refused(model_file, bad):
    rewrite(model_file, params={"prior": bad})
    with pytest.raises(ValueError, match="prior"):
        load_model(model_file)


def test_every_constructor_parameter_round_trips(tmp_path, X):
    defaults = GaussianMixture().get_params(deep=False)
    # A new constructor parameter must be added above, so that it is tested too.
    assert set(NON_DEFAULT_PARAMS) == set(defaults)
    model = GaussianMixture(n_components=2, covariance_type="diag", random_state=0).fit(X)
    model.set_params(**NON_DEFAULT_PARAMS)
    path = tmp_path / "params.npz"
    save_model(model, path)
    loaded = load_model(path).get_params(deep=False)

    assert set(loaded) == set(defaults)
    for name, value in NON_DEFAULT_PARAMS.items():
        if name in GM_FORMAT.array_params:
            assert defaults[name] is None
            assert loaded[name].dtype == np.float64, name
            np.testing.assert_array_equal(loaded[name], value)
        else:
            assert value != defaults[name], name
            assert loaded[name] == value, name
            assert type(loaded[name]) is type(value), name


def test_numpy_scalar_parameters_are_stored_as_numbers(tmp_path, X):
    model = GaussianMixture(n_components=np.int64(2), tol=np.float32(0.25), random_state=0)
    model.fit(X)
    path = tmp_path / "np.npz"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.n_components == 2 and type(loaded.n_components) is int
    assert loaded.tol == np.float32(0.25)


# ---------------------------------------------------------------------------
# Saved models: refusing to save what a file cannot hold
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "random_state", [np.random.RandomState(0), np.random.default_rng(0)]
)
def test_random_state_instance_refuses_to_save(tmp_path, X, fitted, random_state):
    path = tmp_path / "model.npz"
    save_model(fitted, path)
    before = path.read_bytes()
    model = GaussianMixture(n_components=2, random_state=np.random.RandomState(0)).fit(X)
    # fit does not take a Generator, but set_params does.
    model.set_params(random_state=random_state)
    with pytest.raises(ValueError) as info:
        save_model(model, path)
    message = str(info.value)
    assert f"random_state={random_state!r} cannot be stored in a model file" in message
    assert "set it to an int or None before saving" in message
    assert str(path) in message
    # The older file is untouched, and no temporary file is left behind.
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]


def test_other_unstorable_parameter_refuses_to_save(tmp_path, fitted):
    model = pickle.loads(pickle.dumps(fitted))
    model.set_params(tol=fractions.Fraction(1, 1000))
    with pytest.raises(ValueError, match=r"tol=Fraction\(1, 1000\) cannot be stored") as info:
        save_model(model, tmp_path / "m.npz")
    assert "set it to one of those before saving" in str(info.value)
    assert not any(tmp_path.iterdir())


def test_non_numeric_initial_array_refuses_to_save(tmp_path, fitted):
    model = pickle.loads(pickle.dumps(fitted))
    model.set_params(means_init=[["a", "b"]] * 3)
    with pytest.raises(ValueError, match="means_init=.* is not an array of numbers"):
        save_model(model, tmp_path / "m.npz")
    assert not any(tmp_path.iterdir())


def test_save_refuses_what_load_would_refuse(tmp_path, fitted):
    path = tmp_path / "model.npz"
    save_model(fitted, path)
    before = path.read_bytes()
    model = pickle.loads(pickle.dumps(fitted))
    model.means_ = model.means_.copy()
    model.means_[0, 0] = np.nan
    with pytest.raises(ValueError, match="means_ has non-finite values") as info:
        save_model(model, path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    # A parameter the estimator's own validation refuses.
    model = pickle.loads(pickle.dumps(fitted)).set_params(covariance_type="round")
    with pytest.raises(ValueError, match="covariance_type"):
        save_model(model, path)
    assert path.read_bytes() == before


def test_save_of_unregistered_class_refuses(tmp_path, X):
    model = sklearn.mixture.GaussianMixture(n_components=2, random_state=0).fit(X)
    with pytest.raises(ValueError, match="no model format is registered"):
        save_model(model, tmp_path / "m.npz")
    assert not any(tmp_path.iterdir())


def test_save_of_subclass_refuses(tmp_path, X):
    class Sub(GaussianMixture):
        pass

    model = Sub(n_components=2, random_state=0).fit(X)
    with pytest.raises(ValueError, match="no model format is registered"):
        save_model(model, tmp_path / "m.npz")


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
    assert meta["format"] == GM_FORMAT.name == "fastem.GaussianMixture"
    assert meta["format_version"] == GM_FORMAT.version == 4
    assert isinstance(meta["fastem_version"], str)
    # Every constructor parameter, None included.
    assert meta["params"] == fitted.get_params(deep=False)
    assert meta["fitted"]["n_iter_"] == fitted.n_iter_
    assert meta["fitted"]["lower_bound_"] == fitted.lower_bound_


# ---------------------------------------------------------------------------
# Saved models: format versions
# ---------------------------------------------------------------------------


def test_current_version_lacking_a_parameter_is_refused(model_file):
    rewrite(model_file, drop_params=["random_state", "n_threads"])
    with pytest.raises(ValueError, match="lacks the parameters 'n_threads', 'random_state'"):
        load_model(model_file)


def test_version_1_file_lacking_a_parameter_gets_the_default(model_file, fitted, X):
    # Version 1 left out a random_state it could not write as JSON.
    rewrite(model_file, {"format_version": 1}, drop_params=["random_state"])
    loaded = load_model(model_file)
    assert loaded.random_state is None
    expected = fitted.get_params()
    expected["random_state"] = None
    assert loaded.get_params() == expected
    np.testing.assert_array_equal(loaded.predict_proba(X), fitted.predict_proba(X))


def test_version_1_file_with_every_parameter_loads(model_file, fitted):
    rewrite(model_file, {"format_version": 1})
    assert load_model(model_file).get_params() == fitted.get_params()


@pytest.mark.parametrize("version", [0, -1, 1.0, "2", True, None])
def test_invalid_format_version(model_file, version):
    rewrite(model_file, {"format_version": version})
    with pytest.raises(ValueError, match="invalid format_version"):
        load_model(model_file)


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


@pytest.mark.parametrize("name", ["someone.else", "fastem.PoissonHMM", None])
def test_load_unregistered_format(model_file, name):
    rewrite(model_file, {"format": name})
    with pytest.raises(ValueError, match=f"format is {name!r}, expected one of ") as info:
        load_model(model_file)
    assert str(model_file) in str(info.value)


def test_load_future_format_version(model_file):
    future = GM_FORMAT.version + 1
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
    rewrite(model_file, params={"covariance_type": "diag"})
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
    rewrite(model_file, params={"no_such_param": 1})
    with pytest.raises(ValueError, match="unknown parameters 'no_such_param'"):
        load_model(model_file)


def test_load_parameter_the_estimator_refuses(model_file):
    rewrite(model_file, params={"n_components": 0})
    with pytest.raises(ValueError, match="saved parameters do not fit.*n_components"):
        load_model(model_file)


def test_load_non_scalar_parameter(model_file):
    rewrite(model_file, params={"tol": [0.1]})
    with pytest.raises(ValueError, match="parameters 'tol' are neither None"):
        load_model(model_file)


def test_load_initial_array_stored_twice(model_file):
    rewrite(model_file, replace={"weights_init": np.full(3, 1 / 3)})
    with pytest.raises(ValueError, match="stored twice.*'weights_init'"):
        load_model(model_file)


@pytest.mark.parametrize(
    "name, value",
    [("converged_", 1), ("n_iter_", 2.0), ("n_iter_", -1), ("lower_bound_", float("nan")),
     ("lower_bound_", float("inf")), ("n_features_in_", 0), ("n_features_in_", True)],
)
def test_load_invalid_fitted_scalar(model_file, name, value):
    with np.load(model_file, allow_pickle=False) as archive:
        fitted = json.loads(str(archive[META_KEY]))["fitted"]
    rewrite(model_file, {"fitted": {**fitted, name: value}})
    with pytest.raises(ValueError, match=f"invalid fitted attribute.*{name}"):
        load_model(model_file)


def test_load_missing_and_unexpected_fitted_scalar(model_file):
    with np.load(model_file, allow_pickle=False) as archive:
        fitted = json.loads(str(archive[META_KEY]))["fitted"]
    rewrite(model_file, {"fitted": {**fitted, "n_iter_": None} | {"extra_": 1}})
    with pytest.raises(ValueError, match="invalid fitted attribute n_iter_=None"):
        load_model(model_file)
    rewrite(model_file, {"fitted": {k: v for k, v in fitted.items() if k != "n_iter_"}})
    with pytest.raises(ValueError, match="lacks the fitted attribute n_iter_"):
        load_model(model_file)
    rewrite(model_file, {"fitted": {**fitted, "extra_": 1}})
    with pytest.raises(ValueError, match="unexpected fitted attributes 'extra_'"):
        load_model(model_file)


def test_load_feature_names_of_wrong_length(model_file):
    rewrite(model_file, replace={"feature_names_in_": np.array(["a", "b", "c"])})
    with pytest.raises(ValueError, match="feature_names_in_ must be a 1-D array of 2 strings"):
        load_model(model_file)


def test_never_unpickles(monkeypatch, model_file, fitted):
    def refuse(*args, **kwargs):
        raise AssertionError("load_model must not unpickle nor go through numpy.load")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(np, "load", refuse)
    monkeypatch.setattr(np.lib.format, "read_array", refuse)
    loaded = load_model(model_file)
    assert loaded.means_.tobytes() == fitted.means_.tobytes()


# ---------------------------------------------------------------------------
# Saved models: damaged files (edited here with zipfile and numpy.lib.format)
# ---------------------------------------------------------------------------


def zip_members(path):
    """The raw (uncompressed) bytes of every member of a zip file, in order."""
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def write_zip(path, members, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def npy_bytes(array):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_array(data):
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def with_claimed_shape(data, shape):
    """An .npy entry whose (version 1.0) header claims ``shape``; the data stays."""
    length = struct.unpack_from("<H", data, 8)[0]
    header = data[10 : 10 + length].decode("latin-1")
    claimed = re.sub(r"'shape': \([^)]*\)", f"'shape': {shape!r}", header)
    # Keep the header length, so only the claim changes.
    claimed = claimed.rstrip().ljust(length - 1) + "\n"
    assert len(claimed) == length
    return data[:10] + claimed.encode("latin-1") + data[10 + length :]


def replace_entries(path, **arrays):
    members = zip_members(path)
    for name, array in arrays.items():
        members[f"{name}.npy"] = npy_bytes(array)
    write_zip(path, members)


def central_directory_entry(data, member):
    """Offset of ``member``'s record in the zip central directory."""
    at = data.index(b"PK\x01\x02")
    while True:
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, at + 28)
        if data[at + 46 : at + 46 + name_length] == member.encode():
            return at
        at += 46 + name_length + extra_length + comment_length


def assert_refused(path, *fragments):
    """load_model raises one ValueError naming the file and saying each fragment."""
    with pytest.raises(ValueError) as info:
        load_model(path)
    message = str(info.value)
    # Not a low-level error that also happens to be a ValueError.
    assert type(info.value).__module__ in ("builtins", "fastem.io"), type(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# (field, offset in a central directory record, bit flipped, the low-level error)
DIRECTORY_FLIPS = {
    "compression method 8 -> 9 (deflate64)": (10, 0, "NotImplementedError"),
    "compression method 8 -> 12 (bzip2)": (10, 2, "OSError"),
    "encrypted flag": (8, 0, "RuntimeError"),
    "CRC-32": (16, 5, "Bad CRC-32"),
    "uncompressed size": (24, 3, "but it holds"),
    "file name": (46, 1, "File name in directory"),
    "local header offset": (42, 2, "BadZipFile"),
    "file name length": (28, 0, "BadZipFile"),
}


@pytest.mark.parametrize("field", DIRECTORY_FLIPS, ids=list(DIRECTORY_FLIPS))
def test_flipped_bit_in_zip_directory_is_one_value_error(model_file, field):
    offset, bit, error = DIRECTORY_FLIPS[field]
    data = bytearray(model_file.read_bytes())
    data[central_directory_entry(data, "means_.npy") + offset] ^= 1 << bit
    model_file.write_bytes(bytes(data))
    assert_refused(model_file, "is not a fastem model file", error)


def test_flipped_bit_in_stored_data_fails_the_crc(model_file):
    # Stored (uncompressed) entries: the flip changes a float, and only the
    # CRC-32, checked once the entry is read to its end, tells.
    members = zip_members(model_file)
    write_zip(model_file, members, zipfile.ZIP_STORED)
    data = bytearray(model_file.read_bytes())
    data[data.index(members["means_.npy"]) + len(members["means_.npy"]) - 3] ^= 0x10
    model_file.write_bytes(bytes(data))
    assert_refused(model_file, "entry 'means_' is damaged", "Bad CRC-32")


def test_npy_followed_by_an_empty_zip(tmp_path):
    path = tmp_path / "npy-then-zip.npz"
    empty_zip = io.BytesIO()
    zipfile.ZipFile(empty_zip, "w").close()
    path.write_bytes(npy_bytes(np.arange(4.0)) + empty_zip.getvalue())
    assert_refused(path, "is not a fastem model file", f"no '{META_KEY}' entry")


@pytest.mark.parametrize("name, shape", [
    ("lower_bounds_", (10**12,)),
    ("means_", (10**12, 2)),
    ("weights_", (10**6, 10**6)),
    (META_KEY, (10**12,)),
])
def test_header_claiming_an_enormous_shape_is_refused_without_allocating(model_file, name,
                                                                         shape):
    members = zip_members(model_file)
    members[f"{name}.npy"] = with_claimed_shape(members[f"{name}.npy"], shape)
    write_zip(model_file, members)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        assert_refused(model_file, f"entry '{name}' is damaged: its header claims shape")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 5e6, f"refusing the file allocated {peak} bytes"
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("name, fragment", [
    # The format says what shape means_ has: refused before reading.
    ("means_", "array means_ has shape (200000000, 2), expected (3, 2)"),
    # lower_bounds_ has no shape in the format: reading stops where the data does.
    ("lower_bounds_", "entry 'lower_bounds_' is damaged: it ends early"),
])
def test_enormous_shape_with_a_matching_zip_size_is_refused_without_allocating(
        model_file, name, fragment):
    shape = (200_000_000, 2) if name == "means_" else (400_000_000,)
    members = zip_members(model_file)
    entry = with_claimed_shape(members[f"{name}.npy"], shape)
    members[f"{name}.npy"] = entry
    write_zip(model_file, members)
    data = bytearray(model_file.read_bytes())
    header_size = 10 + struct.unpack_from("<H", entry, 8)[0]
    claimed_size = header_size + 8 * math.prod(shape)
    # The uncompressed size, in the central directory and the local header.
    record = central_directory_entry(data, f"{name}.npy")
    struct.pack_into("<I", data, record + 24, claimed_size)
    (local,) = struct.unpack_from("<I", data, record + 42)
    struct.pack_into("<I", data, local + 22, claimed_size)
    model_file.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        assert_refused(model_file, fragment)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 5e6, f"refusing the file allocated {peak} bytes"


def test_object_array_member_is_refused_before_unpickling(model_file):
    members = zip_members(model_file)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    members["means_.npy"] = buffer.getvalue()
    write_zip(model_file, members)
    assert_refused(model_file, "entry 'means_' holds pickled Python objects")


def test_member_that_is_not_npy_is_refused(model_file):
    members = zip_members(model_file)
    members["notes.txt"] = b"hello"
    write_zip(model_file, members)
    assert_refused(model_file, "entry 'notes.txt' is not an .npy array")


def test_member_twice_is_refused(model_file):
    data = zip_members(model_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
        with zipfile.ZipFile(model_file, "a") as archive:
            archive.writestr("weights_.npy", data["weights_.npy"])
    assert_refused(model_file, "entry 'weights_' appears twice")


@pytest.mark.parametrize("header_text", [
    "{'descr': '<f8', 'fortran_order': False}",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (-3,), }",
    "{'descr': '<f8', 'fortran_order': 0, 'shape': (3,), }",
    "{'descr': '<f8', 'fortran_order': False, 'shape': [3], }",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), " + "(" * 500 + "}",
    "__import__('os').system('false')",
    "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }",
    "{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (3,), }",
])
def test_invalid_npy_header_is_refused(model_file, header_text):
    members = zip_members(model_file)
    text = header_text.ljust(len(header_text) + 63 - (len(header_text) + 10) % 64) + "\n"
    data = members["weights_.npy"]
    length = struct.unpack_from("<H", data, 8)[0]
    members["weights_.npy"] = (data[:8] + struct.pack("<H", len(text)) + text.encode()
                               + data[10 + length :])
    write_zip(model_file, members)
    assert_refused(model_file, "entry 'weights_'")


def test_file_of_the_other_byte_order_loads(model_file, fitted, X):
    members = {
        name: npy_bytes(npy_array(data).astype(npy_array(data).dtype.newbyteorder("S")))
        for name, data in zip_members(model_file).items()
    }
    write_zip(model_file, members)
    loaded = load_model(model_file)
    for name in FITTED_ARRAYS:
        assert getattr(loaded, name).dtype == getattr(fitted, name).dtype, name
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fitted, name))
    np.testing.assert_array_equal(loaded.predict_proba(X), fitted.predict_proba(X))


def test_entry_of_a_stray_byte_order_is_refused(model_file, fitted):
    # A flipped bit turns '<f8' into '>f8': the data would be read byte-swapped.
    replace_entries(model_file, means_=fitted.means_.astype(">f8"))
    assert_refused(model_file, "its entries have different byte orders")


def test_invalid_unicode_in_metadata_is_refused(model_file):
    members = zip_members(model_file)
    data = bytearray(members[f"{META_KEY}.npy"])
    data[-2] = 0xFF  # the high byte of the last UTF-32 code unit
    members[f"{META_KEY}.npy"] = bytes(data)
    write_zip(model_file, members)
    assert_refused(model_file, f"entry '{META_KEY}' holds invalid unicode")


def test_load_directory_says_it_is_a_directory(tmp_path):
    assert_refused(tmp_path, "is a directory")
    with pytest.raises(ValueError) as info:
        load_model(tmp_path)
    assert "no such" not in str(info.value)


# ---------------------------------------------------------------------------
# Saved models: values no fitted model has
# ---------------------------------------------------------------------------


def test_negative_weights_are_refused(model_file, fitted):
    weights = fitted.weights_.copy()
    weights[1] += weights[0] + 0.1
    weights[0] = -0.1  # still summing to 1
    replace_entries(model_file, weights_=weights)
    assert_refused(model_file, "weights_ has the negative weight -0.1 (component 0)")


def test_weights_not_summing_to_one_are_refused(model_file, fitted):
    replace_entries(model_file, weights_=fitted.weights_ * 1.01)
    assert_refused(model_file, "weights_ sum to 1.01")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_negated_covariances_are_refused(tmp_path, X, covariance_type):
    model = GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
    path = tmp_path / "negated.npz"
    save_model(model, path)
    replace_entries(path, covariances_=-model.covariances_, precisions_=-model.precisions_)
    what = "the tied covariance" if covariance_type == "tied" else "component 0"
    expected = ("not positive definite" if covariance_type in ("full", "tied")
                else "is not positive")
    assert_refused(path, f"covariances_ of {what}", expected)


def test_indefinite_covariance_is_refused(model_file, fitted):
    # A symmetric matrix with a positive diagonal whose correlation is 2.
    covariances = fitted.covariances_.copy()
    covariances[2, 0, 1] = covariances[2, 1, 0] = 2 * np.sqrt(
        covariances[2, 0, 0] * covariances[2, 1, 1])
    replace_entries(model_file, covariances_=covariances)
    assert_refused(model_file, "covariances_ of component 2 is not positive definite")


def test_asymmetric_covariance_is_refused(model_file, fitted):
    covariances = fitted.covariances_.copy()
    covariances[1, 0, 1] *= 1.001
    replace_entries(model_file, covariances_=covariances)
    assert_refused(model_file, "covariances_ of component 1 is not symmetric")


@pytest.mark.parametrize("change, fragment", [
    (lambda u: 2 * u, "is not the precision factor of its covariances_"),
    (lambda u: u[[1, 2, 0]], "is not the precision factor of its covariances_"),
    (lambda u: u.transpose(0, 2, 1), "is not upper triangular with a positive diagonal"),
    (lambda u: -u, "is not upper triangular with a positive diagonal"),
])
def test_wrong_precision_factor_is_refused(model_file, fitted, change, fragment):
    factor = change(fitted.precisions_cholesky_)
    # precisions_ made to agree with the wrong factor: only covariances_ tells.
    replace_entries(model_file, precisions_cholesky_=factor,
                    precisions_=np.einsum("kij,klj->kil", factor, factor))
    assert_refused(model_file, "precisions_cholesky_ of component 0", fragment)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_wrong_diagonal_precision_factor_is_refused(tmp_path, X, covariance_type):
    model = GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
    path = tmp_path / "wrong.npz"
    save_model(model, path)
    factor = model.precisions_cholesky_ * 1.5
    replace_entries(path, precisions_cholesky_=factor, precisions_=factor**2)
    assert_refused(path, "precisions_cholesky_ of component 0 is not 1 / sqrt(covariances_)")


def test_precisions_disagreeing_with_the_factor_are_refused(model_file, fitted):
    replace_entries(model_file, precisions_=fitted.precisions_ * 1.001)
    assert_refused(model_file, "precisions_ of component 0 is not precisions_cholesky_ "
                               "times its transpose")


def test_fitted_arrays_of_mixed_dtypes_are_refused(model_file, fitted):
    replace_entries(model_file, means_=fitted.means_.astype(np.float32))
    assert_refused(model_file, "the fitted arrays mix the dtypes float32, float64")


def test_lower_bounds_disagreeing_with_the_fitted_scalars_are_refused(model_file, fitted):
    replace_entries(model_file, lower_bounds_=np.asarray(fitted.lower_bounds_[:-1]))
    assert_refused(model_file, f"lower_bounds_ has {fitted.n_iter_ - 1} values, but n_iter_ "
                               f"is {fitted.n_iter_}")
    bounds = np.array(fitted.lower_bounds_)
    bounds[-1] += 1.0
    replace_entries(model_file, lower_bounds_=bounds)
    assert_refused(model_file, "lower_bound_ is", "but the last of lower_bounds_ is")


def test_initial_weights_fit_would_refuse_are_refused(model_file):
    replace_entries(model_file, weights_init=np.array([0.5, 0.5, 0.5]))
    rewrite(model_file, drop_params=["weights_init"])
    assert_refused(model_file, "the parameter weights_init is not one fit accepts")


@pytest.mark.parametrize("name, value", [
    ("tol", -1), ("n_threads", "abc"), ("reg_covar", float("nan")), ("n_init", 0),
    ("covariance_type", "round"), ("max_iter", 1.5), ("random_state", -1),
])
def test_parameter_value_the_estimator_refuses(model_file, name, value):
    rewrite(model_file, params={name: value})
    message = assert_refused(model_file, "the saved parameters do not fit this fastem",
                             f"'{name}' parameter")
    assert "GaussianMixture" in message


def test_fitted_float_too_large_for_a_float_is_refused(model_file):
    with np.load(model_file, allow_pickle=False) as archive:
        fitted = json.loads(str(archive[META_KEY]))["fitted"]
    rewrite(model_file, {"fitted": {**fitted, "lower_bound_": 10**400}})
    assert_refused(model_file, "invalid fitted attribute lower_bound_")


@pytest.mark.parametrize("name", [["fastem.GaussianMixture"], {"a": 1}, 3])
def test_format_name_that_is_no_string_is_refused(model_file, name):
    rewrite(model_file, {"format": name})
    assert_refused(model_file, "is not a model file this fastem reads")


# ---------------------------------------------------------------------------
# Saved models: the value checks accept every model fit produces
# ---------------------------------------------------------------------------


def test_model_with_a_zero_weight_round_trips(tmp_path, X):
    # weights_init may give a component weight 0; max_iter=0 keeps it.
    model = GaussianMixture(3, weights_init=[0.0, 0.5, 0.5], max_iter=0,
                            random_state=0).fit(X)
    assert model.weights_[0] == 0
    path = tmp_path / "zero-weight.npz"
    save_model(model, path)
    np.testing.assert_array_equal(load_model(path).predict_proba(X), model.predict_proba(X))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_model_of_nearly_singular_data_round_trips(tmp_path, covariance_type):
    # Exactly collinear columns with a large spread: rounding the float64
    # covariance to float32 leaves it indefinite by a hair (its factor, rounded
    # too, is still right), which the checks allow as rounding.
    t = np.random.default_rng(1).normal(size=(500, 1)) * 100
    X32 = np.hstack([t, 2 * t, t + 1]).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GaussianMixture(2, covariance_type=covariance_type, random_state=0).fit(X32)
    path = tmp_path / "singular.npz"
    save_model(model, path)
    loaded = load_model(path)
    np.testing.assert_array_equal(loaded.predict_proba(X32), model.predict_proba(X32))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("n_features", [1, 7, 20])
def test_models_of_many_shapes_round_trip(tmp_path, covariance_type, n_features):
    rng = np.random.default_rng(n_features)
    X = rng.normal(size=(400, n_features)) @ rng.normal(size=(n_features, n_features)) * 30
    model = GaussianMixture(4, covariance_type=covariance_type, random_state=0).fit(X)
    path = tmp_path / "model.npz"
    save_model(model, path)
    assert load_model(path).means_.tobytes() == model.means_.tobytes()


def test_save_refuses_a_model_whose_values_are_no_mixture(tmp_path, fitted):
    path = tmp_path / "model.npz"
    model = pickle.loads(pickle.dumps(fitted))
    model.weights_ = -model.weights_
    with pytest.raises(ValueError, match="weights_ has the negative weight") as info:
        save_model(model, path)
    assert str(path) in str(info.value)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# Saving: errors name the path the caller gave
# ---------------------------------------------------------------------------


def test_save_into_a_missing_folder_names_the_folder(tmp_path, fitted):
    path = tmp_path / "no" / "such" / "model.npz"
    with pytest.raises(FileNotFoundError) as info:
        save_model(fitted, path)
    message = str(info.value)
    assert f"the folder {path.parent} does not exist" in message, message
    assert info.value.filename == str(path)
    assert ".tmp" not in message and info.value.__cause__ is None, message
    assert not any(tmp_path.iterdir())


def test_save_onto_a_directory_says_so(tmp_path, fitted):
    with pytest.raises(IsADirectoryError, match="it is a directory") as info:
        save_model(fitted, tmp_path)
    assert info.value.filename == str(tmp_path)


def test_save_beside_a_file_that_is_no_folder(tmp_path, fitted):
    (tmp_path / "plain").write_text("x")
    path = tmp_path / "plain" / "model.npz"
    with pytest.raises(NotADirectoryError, match="is not a folder") as info:
        save_model(fitted, path)
    assert str(tmp_path / "plain") in str(info.value)


def test_save_with_a_long_file_name_works(tmp_path, fitted):
    # The temporary file's name must not be longer than the file system allows
    # when the final name is not.
    path = tmp_path / ("m" * 240 + ".npz")
    save_model(fitted, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# ---------------------------------------------------------------------------
# The registry of formats
# ---------------------------------------------------------------------------


class Centre(BaseEstimator):
    """A toy estimator, to show that a new estimator needs only a format."""

    def __init__(self, shift=0.0, start=None, label="c"):
        self.shift = shift
        self.start = start
        self.label = label

    def fit(self, X):
        self.centre_ = X.mean(axis=0) + self.shift
        self.trace_ = [float(v) for v in X[:, 0]]
        self.n_features_in_ = X.shape[1]
        self.exact_ = True
        return self


def centre_format(**changes):
    fields = dict(
        name="tests.Centre",
        version=1,
        estimator=Centre,
        fitted_arrays=("centre_",),
        fitted_lists=("trace_",),
        fitted_scalars={"n_features_in_": int, "exact_": bool},
        array_params=("start",),
        array_shapes=lambda params, fitted: {
            "centre_": (fitted["n_features_in_"],),
            "start": (fitted["n_features_in_"],),
        },
    )
    return ModelFormat(**{**fields, **changes})


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry that the test may change."""
    formats = dict(fastem.io._FORMATS)
    monkeypatch.setattr(fastem.io, "_FORMATS", formats)
    return formats


def test_a_registered_estimator_round_trips(registry, tmp_path, X):
    register_model_format(centre_format())
    assert registered_model_formats()["tests.Centre"].estimator is Centre
    model = Centre(shift=0.5, start=[1.0, 2.0], label="x").fit(X)
    path = tmp_path / "centre.npz"
    save_model(model, path)
    loaded = load_model(path)
    assert type(loaded) is Centre
    assert loaded.shift == 0.5 and loaded.label == "x"
    np.testing.assert_array_equal(loaded.start, [1.0, 2.0])
    assert loaded.centre_.tobytes() == model.centre_.tobytes()
    assert loaded.trace_ == model.trace_
    assert loaded.exact_ is True and loaded.n_features_in_ == 2
    # The shape hook is applied to the array parameter too.
    model.set_params(start=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"array start has shape \(3,\), expected \(2,\)"):
        save_model(model, path)


def test_registering_a_second_class_under_a_taken_name_fails(registry):
    with pytest.raises(ValueError, match="already registered"):
        register_model_format(centre_format(name="fastem.GaussianMixture"))


def test_registering_a_second_format_for_a_class_fails(registry):
    with pytest.raises(ValueError, match="already has the format 'fastem.GaussianMixture'"):
        register_model_format(ModelFormat(
            name="other", version=1, estimator=GaussianMixture, fitted_arrays=("means_",),
            fitted_scalars={},
        ))


def test_re_registering_the_same_class_replaces_the_format(registry):
    register_model_format(centre_format())
    register_model_format(centre_format(version=2))
    assert registered_model_formats()["tests.Centre"].version == 2


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"version": 0}, "invalid version"),
        ({"fitted_lists": ("centre_",)}, "names used twice or reserved: 'centre_'"),
        ({"fitted_arrays": ("feature_names_in_",)}, "reserved: 'feature_names_in_'"),
        ({"fitted_scalars": {"n_features_in_": str}}, "must be declared bool, int or float"),
        ({"array_params": ("begin",)}, "Centre has no parameters 'begin'"),
    ],
)
def test_inconsistent_formats_are_refused(registry, changes, message):
    with pytest.raises(ValueError, match=message):
        register_model_format(centre_format(**changes))
    assert "tests.Centre" not in registry


def test_registered_formats_are_read_only():
    with pytest.raises(TypeError):
        registered_model_formats()["x"] = GM_FORMAT


def test_io_does_not_import_the_estimators():
    # fastem.io knows estimators only through their registered formats, so it
    # must not import fastem.mixture (which would be an import cycle).
    tree = ast.parse(Path(fastem.io.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            imported.update(f"{module}.{alias.name}".replace("..", ".") for alias in node.names)
            imported.add(module)
    assert not [name for name in imported if "mixture" in name], sorted(imported)
    # Nor behind the back of the import statement.
    source = Path(fastem.io.__file__).read_text()
    assert "import_module" not in source and "__import__" not in source
