"""Model files: fitted models written and read back without pickle.

Saved models
------------
:func:`save_model` writes a fitted :class:`fastem.GaussianMixture` to a
NumPy ``.npz`` archive (``numpy.savez_compressed``) and :func:`load_model`
reads it back with ``allow_pickle=False``, so opening a model file can never
run code. The archive holds, as plain numeric or unicode arrays:

``weights_``, ``means_``, ``covariances_``, ``precisions_``, ``precisions_cholesky_``
    The fitted parameters, with the shapes of the covariance type.
``lower_bounds_``
    The per-iteration lower bounds of the best restart, as a 1-D array.
``feature_names_in_``
    Only when the model has it; a 1-D unicode array.
``weights_init``, ``means_init``, ``precisions_init``
    Only when the corresponding constructor parameter is an array (stored as
    float64, so ``get_params`` of the loaded model returns float64 arrays).
``__fastem_meta__``
    A 0-d unicode array holding a JSON object with ``"format"``
    (``"fastem.GaussianMixture"``), ``"format_version"`` (``1``),
    ``"fastem_version"``, ``"params"`` (the constructor parameters whose
    values JSON can hold exactly: ``None``, booleans, integers, floats and
    strings) and ``"fitted"`` (``converged_``, ``n_iter_``, ``lower_bound_``,
    ``n_features_in_``). A model fitted with ``max_iter=0`` has
    ``lower_bound_ = -inf``, written as Python's JSON extension ``-Infinity``.

A constructor parameter that is neither JSON-representable nor one of the
three initial arrays (in practice a ``numpy.random.RandomState`` or
``Generator`` passed as ``random_state``) is not saved, so the loaded model has
the class default for it.

Every problem with a file's existence or content is reported as a
``ValueError`` whose message names the file, so a caller such as the command
line can report all bad input the same way.

Data tables (the matrices a model is fitted to) are read by :mod:`fastem.tables`.
"""

from __future__ import annotations

import json
import os
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np
from sklearn.utils.validation import check_is_fitted

# Transitional: fastem/bench_selection.py and tests/test_cli.py still import the
# table readers from here; drop this line once they import from fastem.tables.
from .tables import load_demo_data, read_table  # noqa: F401

__all__ = ["load_model", "save_model"]

FORMAT_NAME = "fastem.GaussianMixture"
FORMAT_VERSION = 1
META_KEY = "__fastem_meta__"

_PARAMETER_ARRAYS = (
    "weights_",
    "means_",
    "covariances_",
    "precisions_",
    "precisions_cholesky_",
)
_INIT_ARRAYS = ("weights_init", "means_init", "precisions_init")
_COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")



def save_model(model, path: str | os.PathLike) -> None:
    """Write a fitted Gaussian mixture to an ``.npz`` file, without pickle.

    Parameters
    ----------
    model : fastem.GaussianMixture or sklearn.mixture.GaussianMixture
        A fitted estimator.
    path : str or os.PathLike
        Destination. Exactly this path is written: unlike
        ``numpy.savez_compressed`` given a file name, no ``.npz`` suffix is
        appended. The archive is first written to a temporary file in the same
        directory and then renamed over ``path``, so an interrupted save never
        leaves a truncated model behind.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If ``model`` has not been fitted.

    See Also
    --------
    load_model : Read the file back.

    Notes
    -----
    The file layout is described in the module docstring of :mod:`fastem.io`.
    """
    check_is_fitted(model, "means_")
    path = Path(path)

    arrays = {name: np.asarray(getattr(model, name)) for name in _PARAMETER_ARRAYS}
    arrays["lower_bounds_"] = np.asarray(model.lower_bounds_, dtype=np.float64)
    if hasattr(model, "feature_names_in_"):
        arrays["feature_names_in_"] = np.asarray(model.feature_names_in_, dtype=str)

    params = {}
    for name, value in model.get_params(deep=False).items():
        if name in _INIT_ARRAYS and value is not None:
            arrays[name] = np.asarray(value, dtype=np.float64)
            continue
        kept, json_value = _as_json_scalar(value)
        if kept:
            params[name] = json_value

    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fastem_version": _fastem_version(),
        "params": params,
        "fitted": {
            "converged_": bool(model.converged_),
            "n_iter_": int(model.n_iter_),
            # json writes floats with repr, which round-trips float64 exactly,
            # and the -inf of a max_iter=0 fit as -Infinity, which it reads back.
            "lower_bound_": float(model.lower_bound_),
            "n_features_in_": int(model.n_features_in_),
        },
    }
    arrays[META_KEY] = np.array(json.dumps(meta))

    # A sibling temporary file makes the final rename atomic; opening it with
    # open() rather than mkstemp keeps the usual umask-based permissions.
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        # Passing an open file rather than a name stops NumPy from appending ".npz".
        with open(tmp_path, "xb") as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def load_model(path: str | os.PathLike):
    """Read a Gaussian mixture written by :func:`save_model`.

    The file is opened with ``numpy.load(..., allow_pickle=False)``: no Python
    object is ever unpickled, so loading an untrusted file cannot run code.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`save_model`.

    Returns
    -------
    model : fastem.GaussianMixture
        A fitted estimator whose parameters and fitted arrays are bit-identical
        to the saved ones. ``lower_bounds_`` is restored as a list of floats and
        ``feature_names_in_`` as an object array of str, as scikit-learn has
        them.

    Raises
    ------
    ValueError
        If the file does not exist, is not an ``.npz`` archive, was not written
        by fastem, has a newer format version than this fastem reads, holds
        pickled objects, or has missing, misshapen or non-finite arrays. The
        message names the file and the problem.
    """
    path = Path(path)
    entries = _read_npz_entries(path)
    if META_KEY not in entries:
        raise ValueError(
            f"{path} is not a fastem model file: it has no '{META_KEY}' entry "
            f"(entries: {_quoted(sorted(entries))})"
        )
    meta = _parse_meta(path, entries.pop(META_KEY))
    params, fitted = meta["params"], meta["fitted"]
    _check_arrays(path, entries, params, fitted)

    for name in _INIT_ARRAYS:
        if name in entries:
            params[name] = entries.pop(name)

    from fastem.mixture import GaussianMixture

    model = GaussianMixture()
    try:
        model.set_params(**params)
    except ValueError as exc:
        raise ValueError(
            f"{path}: the saved parameters do not fit this fastem: {exc}"
        ) from exc

    for name in _PARAMETER_ARRAYS:
        setattr(model, name, entries[name])
    model.lower_bounds_ = entries["lower_bounds_"].tolist()
    if "feature_names_in_" in entries:
        model.feature_names_in_ = entries["feature_names_in_"].astype(object)
    model.converged_ = fitted["converged_"]
    model.n_iter_ = fitted["n_iter_"]
    model.lower_bound_ = np.float64(fitted["lower_bound_"])
    model.n_features_in_ = fitted["n_features_in_"]
    return model


def _as_json_scalar(value) -> tuple[bool, object]:
    """Return ``(True, value)`` if JSON holds ``value`` exactly, else ``(False, None)``.

    NumPy scalars are converted to the Python scalars JSON can write.
    """
    if value is None or isinstance(value, (bool, str)):
        return True, value
    if isinstance(value, np.bool_):
        return True, bool(value)
    if isinstance(value, (int, np.integer)):
        return True, int(value)
    if isinstance(value, (float, np.floating)):
        return True, float(value)
    return False, None


def _fastem_version() -> str:
    try:
        from fastem import __version__
    except ImportError:
        return "unknown"
    return str(__version__)


def _read_npz_entries(path: Path) -> dict[str, np.ndarray]:
    """Load every entry of an ``.npz`` file, refusing anything pickled."""
    if not path.is_file():
        raise ValueError(f"{path}: no such model file")
    not_ours = f"{path} is not a fastem model file"
    # numpy.load falls back to unpickling for content it does not recognise,
    # so anything that is not a zip archive is rejected before it gets there.
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{not_ours}: not an .npz (zip) archive")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{not_ours}: {exc}") from exc
    entries = {}
    with archive:
        for name in archive.files:
            try:
                entry = archive[name]
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise ValueError(
                        f"{not_ours}: entry '{name}' holds pickled Python objects, "
                        "which fastem never loads"
                    ) from None
                raise ValueError(f"{not_ours}: entry '{name}': {exc}") from exc
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise ValueError(
                    f"{not_ours}: entry '{name}' is unreadable: {exc}"
                ) from exc
            # A zip member that is not an .npy comes back as bytes; as a bytes
            # array it fails the dtype checks every entry goes through.
            entries[name] = np.asarray(entry)
    return entries


def _parse_meta(path: Path, raw: np.ndarray) -> dict:
    """Decode and check the JSON metadata entry; return it as a dict."""
    if raw.ndim != 0 or raw.dtype.kind != "U":
        raise ValueError(f"{path}: the '{META_KEY}' entry is not a unicode string")
    try:
        meta = json.loads(str(raw))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: the '{META_KEY}' entry is not valid JSON: {exc}"
        ) from exc
    # Anything but a JSON object is read as an empty one, which the checks
    # below then reject with a message about what is missing.
    meta = _json_object(meta)
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path} is not a fastem model file: format is {meta.get('format')!r}, "
            f"expected {FORMAT_NAME!r}"
        )
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        raise ValueError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has model format version {version}, newer than the version "
            f"{FORMAT_VERSION} this fastem reads; upgrade fastem to load it"
        )

    params = meta["params"] = _json_object(meta.get("params"))
    fitted = meta["fitted"] = _json_object(meta.get("fitted"))
    n_components = params.get("n_components")
    if not _is_int(n_components) or n_components < 1:
        raise ValueError(f"{path}: invalid n_components {n_components!r}")
    if params.get("covariance_type") not in _COVARIANCE_TYPES:
        raise ValueError(
            f"{path}: invalid covariance_type {params.get('covariance_type')!r}"
        )

    checks = {
        "converged_": lambda v: isinstance(v, bool),
        "n_iter_": lambda v: _is_int(v) and v >= 0,
        # -inf is what a model fitted with max_iter=0 reports.
        "lower_bound_": lambda v: (
            (isinstance(v, float) or _is_int(v)) and (np.isfinite(v) or v == -np.inf)
        ),
        "n_features_in_": lambda v: _is_int(v) and v >= 1,
    }
    for name, is_valid in checks.items():
        if name not in fitted:
            raise ValueError(f"{path}: the metadata lacks the fitted attribute {name}")
        if not is_valid(fitted[name]):
            raise ValueError(
                f"{path}: invalid fitted attribute {name}={fitted[name]!r}"
            )
    return meta


def _json_object(value) -> dict:
    return value if isinstance(value, dict) else {}


def _is_int(value) -> bool:
    # bool is a subclass of int, but True is no count.
    return isinstance(value, int) and not isinstance(value, bool)


def _covariance_shape(
    covariance_type: str, n_components: int, n_features: int
) -> tuple:
    return {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }[covariance_type]


def _check_arrays(path: Path, entries: dict, params: dict, fitted: dict) -> None:
    """Check that the archive holds exactly the expected arrays, shaped and finite."""
    k, d = params["n_components"], fitted["n_features_in_"]
    cov_shape = _covariance_shape(params["covariance_type"], k, d)
    expected = {
        "weights_": (k,),
        "means_": (k, d),
        "covariances_": cov_shape,
        "precisions_": cov_shape,
        "precisions_cholesky_": cov_shape,
        "lower_bounds_": None,
    }
    optional = {
        "feature_names_in_": (d,),
        "weights_init": (k,),
        "means_init": (k, d),
        "precisions_init": cov_shape,
    }

    missing = [name for name in expected if name not in entries]
    if missing:
        raise ValueError(f"{path}: missing arrays {_quoted(missing)}")
    unexpected = [
        name for name in entries if name not in expected and name not in optional
    ]
    if unexpected:
        raise ValueError(f"{path}: unexpected entries {_quoted(unexpected)}")

    for name, array in entries.items():
        shape = expected.get(name, optional.get(name))
        if name == "feature_names_in_":
            if array.dtype.kind != "U" or array.shape != shape:
                raise ValueError(
                    f"{path}: feature_names_in_ must be {d} strings, "
                    f"got dtype {array.dtype} and shape {array.shape}"
                )
            continue
        if array.dtype.kind != "f":
            raise ValueError(
                f"{path}: array {name} has dtype {array.dtype}, expected floats"
            )
        if shape is None:
            if array.ndim != 1:
                raise ValueError(
                    f"{path}: array {name} must be 1-D, got shape {array.shape}"
                )
        elif array.shape != shape:
            raise ValueError(
                f"{path}: array {name} has shape {array.shape}, expected {shape} for "
                f"covariance_type={params['covariance_type']!r}, n_components={k}, "
                f"n_features={d}"
            )
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{path}: array {name} has non-finite values")


def _quoted(items) -> str:
    return ", ".join(repr(str(item)) for item in items)
