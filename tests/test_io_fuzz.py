"""Fuzzing model files: seeded bit flips, truncations and insertions of saved models.

Every damaged file must either be refused with one ``ValueError`` naming the
file, or load a model that is a Gaussian mixture (checked here with NumPy,
independently of fastem.io) and predicts finite values.

Two layers are damaged. The raw file: a change there almost always lands in
compressed data, which the CRC-32 of its entry catches, so half of the flips
are aimed at the zip headers and directory. And the entries' contents (an
``.npy`` header, the array data, the JSON metadata), re-zipped with a valid
CRC, which is what reaches the reader's checks of headers and values.
"""

import io
import struct
import warnings
import zipfile
import zlib

import numpy as np
import pytest

from fastem import GaussianMixture
from fastem.io import load_model, save_model

N_MUTATIONS = 35  # per model and kind of mutation: 4 models x 6 kinds x 35 = 840 files


def three_blobs(n_per_blob=60, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [5.0, 1.0], [1.0, 6.0]])
    scales = np.array([[1.0, 0.5], [0.7, 1.2], [0.4, 0.4]])
    return np.vstack(
        [c + s * rng.standard_normal((n_per_blob, 2)) for c, s in zip(centres, scales)]
    )


def fitted_model(name, X):
    if name == "full":
        return GaussianMixture(3, covariance_type="full", random_state=0).fit(X)
    if name == "diag-float32-names":
        model = GaussianMixture(3, covariance_type="diag", random_state=0)
        model.fit(X.astype(np.float32))
        model.feature_names_in_ = np.array(["length", "width"], dtype=object)
        return model
    if name == "tied-initial-arrays":
        return GaussianMixture(
            3, covariance_type="tied", weights_init=[0.3, 0.3, 0.4],
            means_init=[[0.0, 0.0], [5.0, 1.0], [1.0, 6.0]],
            precisions_init=[[1.0, 0.2], [0.2, 1.0]], max_iter=20,
        ).fit(X)
    assert name == "spherical"
    return GaussianMixture(3, covariance_type="spherical", random_state=0).fit(X)


MODELS = ["full", "diag-float32-names", "tied-initial-arrays", "spherical"]


@pytest.fixture(scope="module")
def X():
    return three_blobs()


@pytest.fixture(scope="module")
def saved(X, tmp_path_factory):
    """The bytes of each model's file."""
    files = {}
    for name in MODELS:
        path = tmp_path_factory.mktemp("saved") / f"{name}.npz"
        save_model(fitted_model(name, X), path)
        files[name] = path.read_bytes()
    return files


# ---------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------


def flip_bits(rng, data, positions=None, most=3):
    """Flip 1 to ``most`` bits, at bytes drawn from ``positions`` (default: anywhere)."""
    data = bytearray(data)
    for _ in range(rng.integers(1, most + 1)):
        at = rng.choice(positions) if positions is not None else rng.integers(len(data))
        data[at] ^= 1 << rng.integers(8)
    return bytes(data), "flip"


def truncate(rng, data):
    return data[: rng.integers(len(data))], "truncate"


def insert_bytes(rng, data):
    at = rng.integers(len(data) + 1)
    return data[:at] + rng.bytes(int(rng.integers(1, 9))) + data[at:], "insert"


def zip_structure_positions(data):
    """Byte positions of the local file headers, the central directory and its end."""
    positions = []
    end = data.rindex(b"PK\x05\x06")
    (directory,) = struct.unpack_from("<I", data, end + 16)
    positions.extend(range(directory, len(data)))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            start = info.header_offset
            name_length, extra_length = struct.unpack_from("<HH", data, start + 26)
            positions.extend(range(start, start + 30 + name_length + extra_length))
    return np.array(positions)


def mutate_file(kind, rng, data):
    """A damaged copy of a model file's bytes."""
    if kind == "flip":
        return flip_bits(rng, data)
    if kind == "flip-zip-structure":
        return flip_bits(rng, data, zip_structure_positions(data))
    if kind == "truncate":
        return truncate(rng, data)
    return insert_bytes(rng, data)


def mutate_entry(kind, rng, data):
    """The file with the content of one entry damaged, re-zipped with valid CRCs."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    name = sorted(members)[rng.integers(len(members))]
    content = members[name]
    header_size = 10 + struct.unpack_from("<H", content, 8)[0]
    if kind == "entry-flip-header":
        content, what = flip_bits(rng, content, np.arange(header_size))
    else:
        change = [flip_bits, truncate, insert_bytes][rng.integers(3)]
        if change is flip_bits:
            # At most two flips, so that the means of one of the three components
            # stay intact: a model whose every mean is astronomically far from the
            # data is a Gaussian mixture, but predicts -inf everywhere.
            content, what = flip_bits(rng, content, np.arange(header_size, len(content)),
                                      most=2)
        else:
            content, what = change(rng, content)
    members[name] = content
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, value in members.items():
            archive.writestr(member, value)
    return out.getvalue(), f"{what} in {name}"


FILE_KINDS = ["flip", "flip-zip-structure", "truncate", "insert"]
ENTRY_KINDS = ["entry-flip-header", "entry-data"]


# ---------------------------------------------------------------------------
# What a loaded model must be
# ---------------------------------------------------------------------------


def as_matrices(array, covariance_type, n_components, n_features):
    """Covariance-shaped parameters as (n_components, D, D) matrices."""
    array = np.asarray(array, dtype=np.float64)
    if covariance_type == "full":
        return array
    if covariance_type == "tied":
        return np.repeat(array[None], n_components, axis=0)
    if covariance_type == "diag":
        return np.stack([np.diag(row) for row in array])
    return array[:, None, None] * np.eye(n_features)


def assert_is_a_gaussian_mixture(model, X, label):
    k, d = model.n_components, model.n_features_in_
    weights = np.asarray(model.weights_, dtype=np.float64)
    assert weights.shape == (k,) and np.all(np.isfinite(weights)), label
    assert np.all(weights >= 0) and abs(weights.sum() - 1) < 1e-5, (label, weights)
    assert model.means_.shape == (k, d) and np.all(np.isfinite(model.means_)), label
    cov = as_matrices(model.covariances_, model.covariance_type, k, d)
    factor = as_matrices(model.precisions_cholesky_, model.covariance_type, k, d)
    precision = as_matrices(model.precisions_, model.covariance_type, k, d)
    for name, array in [("cov", cov), ("factor", factor), ("precision", precision)]:
        assert np.all(np.isfinite(array)), (label, name)
    np.testing.assert_allclose(cov, cov.transpose(0, 2, 1), rtol=1e-6, err_msg=label)
    assert np.all(np.linalg.eigvalsh(cov) > 0), (label, np.linalg.eigvalsh(cov))
    assert np.all(np.tril(factor, -1) == 0), label
    assert np.all(np.diagonal(factor, axis1=1, axis2=2) > 0), label
    eye = np.broadcast_to(np.eye(d), cov.shape)
    # U U^T is the inverse of the covariance.
    np.testing.assert_allclose(factor @ factor.transpose(0, 2, 1) @ cov, eye, atol=1e-4,
                               err_msg=label)
    np.testing.assert_allclose(precision, factor @ factor.transpose(0, 2, 1), rtol=1e-4,
                               err_msg=label)
    assert len(model.lower_bounds_) == model.n_iter_, label
    with warnings.catch_warnings():
        # A model with feature names warns about the unnamed columns of X.
        warnings.simplefilter("ignore", UserWarning)
        proba = model.predict_proba(X)
        log_density = model.score_samples(X)
        labels = model.predict(X)
    assert np.all(np.isfinite(proba)) and np.allclose(proba.sum(axis=1), 1), label
    assert np.all(np.isfinite(log_density)), label
    assert labels.min() >= 0 and labels.max() < k, label


def test_saved_models_load_as_gaussian_mixtures(saved, X, tmp_path):
    for name, data in saved.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(data)
        assert_is_a_gaussian_mixture(load_model(path), X, name)


# ---------------------------------------------------------------------------
# The fuzz
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FILE_KINDS + ENTRY_KINDS)
@pytest.mark.parametrize("model", MODELS)
def test_damaged_file_is_refused_or_loads_a_gaussian_mixture(saved, X, tmp_path, model,
                                                             kind):
    seed = zlib.crc32(f"{model}/{kind}".encode())
    rng = np.random.default_rng(seed)
    path = tmp_path / "fuzzed.npz"
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(N_MUTATIONS):
        mutate = mutate_file if kind in FILE_KINDS else mutate_entry
        data, what = mutate(kind, rng, saved[model])
        path.write_bytes(data)
        label = f"{model}, {kind} #{i} (seed {seed}): {what}"
        try:
            loaded = load_model(path)
        except ValueError as exc:
            assert str(path) in str(exc), (label, str(exc))
            outcomes["refused"] += 1
        except BaseException as exc:
            raise AssertionError(f"{label}: {type(exc).__name__} escaped: {exc}") from exc
        else:
            assert_is_a_gaussian_mixture(loaded, X, label)
            outcomes["loaded"] += 1
    # The damage must reach the reader: most damaged files are refused.
    assert outcomes["refused"] >= N_MUTATIONS // 3, outcomes
