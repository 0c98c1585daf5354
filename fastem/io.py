"""Model files: fitted estimators written to ``.npz`` and read back without pickle.

:func:`save_model` writes a fitted estimator to a NumPy ``.npz`` archive
(``numpy.savez_compressed``) and :func:`load_model` reads it back with
``allow_pickle=False``, so opening a model file can never run code.

Model formats
-------------
The code here knows no estimator. What a file of one estimator class holds is
described by a :class:`ModelFormat` (its name and version, the class, its
fitted arrays, lists and scalars, which constructor parameters may be arrays,
and a hook giving the shapes the arrays must have), registered with
:func:`register_model_format`. :func:`save_model` finds the format from the
model's exact class, :func:`load_model` from the ``"format"`` field of the
file. Importing fastem registers ``"fastem.GaussianMixture"``, version 2.

File layout
-----------
The archive holds only plain numeric or unicode arrays:

``__fastem_meta__``
    A 0-d unicode array holding a JSON object with ``"format"`` (the format's
    name), ``"format_version"`` (an integer), ``"fastem_version"`` (the fastem
    that wrote the file; informative only), ``"params"`` (the constructor
    parameters whose values JSON holds exactly: ``None``, booleans, integers,
    floats and strings) and ``"fitted"`` (the format's fitted scalars).
    Floats are written with ``repr``, so they read back bit-identical; an
    infinity is written as Python's JSON extension ``Infinity``/``-Infinity``.
one entry per fitted array of the format
    With the array's own dtype (a model fitted on float32 data keeps float32).
one entry per fitted list of the format
    A 1-D float64 array, restored as a list of floats.
``feature_names_in_``
    Only when the model has it; a 1-D unicode array, restored as an object
    array of str as scikit-learn has it.
one entry per array-valued constructor parameter
    Only for the parameters the format declares may be arrays, and only when
    the value is not ``None`` or a number; stored as float64, so
    ``get_params`` of the loaded model returns float64 arrays.

Every constructor parameter (``get_params(deep=False)``) is stored, in
``"params"`` or as an array. :func:`save_model` refuses, with a ``ValueError``
naming the parameter, a model with a parameter that can be neither (in
practice a ``numpy.random.RandomState`` or ``Generator`` as ``random_state``),
since the file could not reproduce the model. It also checks what it is about
to write as :func:`load_model` would, so every file it writes loads.

A file of the current version of its format must have every constructor
parameter of the estimator. A file of an older version may lack some (version 1
of ``"fastem.GaussianMixture"`` left out those JSON cannot hold); they are
loaded with the class default.

The ``"fastem.GaussianMixture"`` format
---------------------------------------
Fitted arrays ``weights_``, ``means_``, ``covariances_``, ``precisions_`` and
``precisions_cholesky_``, with the shapes of the covariance type; fitted list
``lower_bounds_`` (the per-iteration lower bounds of the best restart); fitted
scalars ``converged_``, ``n_iter_``, ``lower_bound_`` (``-inf`` for a model
fitted with ``max_iter=0``) and ``n_features_in_``; array parameters
``weights_init``, ``means_init`` and ``precisions_init``.

Errors
------
Every problem with a file's existence or content is reported as a
``ValueError`` whose message names the file, so a caller such as the command
line can report all bad input the same way.

Data tables (the matrices a model is fitted to) are read by :mod:`fastem.tables`.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from sklearn.utils.validation import check_is_fitted

__all__ = [
    "META_KEY",
    "ModelFormat",
    "load_model",
    "register_model_format",
    "registered_model_formats",
    "save_model",
]

META_KEY = "__fastem_meta__"
FEATURE_NAMES = "feature_names_in_"

# The types a fitted scalar may be declared with: those JSON holds exactly.
_SCALAR_TYPES = (bool, int, float)

_FORMATS: dict[str, ModelFormat] = {}


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFormat:
    """What a model file of one estimator class holds.

    Parameters
    ----------
    name : str
        The format's name, written to the file's ``"format"`` field; by
        convention the estimator's public dotted name, such as
        ``"fastem.GaussianMixture"``.
    version : int
        The version :func:`save_model` writes, at least 1. Files of versions 1
        to ``version`` are read; bump it whenever what is stored changes (a
        constructor parameter added, an attribute added or removed), so that
        older files are still read and files lacking a parameter are refused
        only when they claim the current version.
    estimator : type
        The estimator class. :func:`load_model` calls it with no arguments, so
        every constructor parameter needs a default; :func:`save_model` uses
        this format for models of exactly this class (a subclass may add
        parameters and needs a format of its own).
    fitted_arrays : tuple of str
        Fitted attributes holding floating-point arrays, stored with their dtype.
    fitted_scalars : mapping of str to {bool, int, float}
        Fitted attributes holding one number, stored in the JSON metadata and
        checked to be of this type on loading (an ``int`` is not a bool, a
        ``float`` is not NaN). Floats are restored as ``numpy.float64``.
    fitted_lists : tuple of str, default=()
        Fitted attributes holding a list of floats, stored as 1-D float64
        arrays and restored as lists.
    array_params : tuple of str, default=()
        Constructor parameters that may be array-like (initial values, priors).
        Such a value is stored as a float64 array unless it is ``None`` or a
        number, which go to the JSON metadata like every other parameter.
    array_shapes : callable, optional
        ``array_shapes(params, fitted) -> dict``: the shape each fitted array
        and each array parameter must have, given all constructor parameters
        (already checked by the estimator's own parameter validation, with
        array parameters as arrays) and the fitted scalars (already
        type-checked). It may raise ``ValueError`` for values the estimator
        cannot have. Without it, shapes are not checked.
    """

    name: str
    version: int
    estimator: type
    fitted_arrays: tuple[str, ...]
    fitted_scalars: Mapping[str, type]
    fitted_lists: tuple[str, ...] = ()
    array_params: tuple[str, ...] = ()
    array_shapes: Callable[[Mapping, Mapping], Mapping[str, tuple[int, ...]]] | None = None

    def __post_init__(self):
        # Frozen, so that a registered format cannot change under saved files.
        for name in ("fitted_arrays", "fitted_lists", "array_params"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(
            self, "fitted_scalars", MappingProxyType(dict(self.fitted_scalars))
        )


def register_model_format(model_format: ModelFormat) -> None:
    """Make :func:`save_model` and :func:`load_model` handle one more estimator class.

    Parameters
    ----------
    model_format : ModelFormat
        The format. Registering a format under a name already taken replaces
        the old one only if both are for the same class (by module and
        qualified name, so that re-importing the estimator's module works).

    Raises
    ------
    TypeError
        If ``model_format`` is not a :class:`ModelFormat`.
    ValueError
        If the format is inconsistent (an empty name, a version below 1, an
        attribute named twice, a scalar type other than bool, int or float, an
        array parameter the estimator does not have) or clashes with a
        registered format of another class.
    """
    fmt = model_format
    if not isinstance(fmt, ModelFormat):
        raise TypeError(f"expected a ModelFormat, got {type(fmt).__name__}")
    if not isinstance(fmt.name, str) or not fmt.name:
        raise ValueError(f"invalid format name {fmt.name!r}")
    if not _is_int(fmt.version) or fmt.version < 1:
        raise ValueError(f"format {fmt.name!r}: invalid version {fmt.version!r}")
    stored = [*fmt.fitted_arrays, *fmt.fitted_lists, *fmt.array_params, *fmt.fitted_scalars]
    reserved = {META_KEY, FEATURE_NAMES}
    clashes = sorted({n for n in stored if stored.count(n) > 1 or n in reserved})
    if clashes:
        raise ValueError(
            f"format {fmt.name!r}: names used twice or reserved: {_quoted(clashes)}"
        )
    bad_types = [n for n, kind in fmt.fitted_scalars.items() if kind not in _SCALAR_TYPES]
    if bad_types:
        raise ValueError(
            f"format {fmt.name!r}: fitted scalars {_quoted(bad_types)} must be "
            "declared bool, int or float"
        )
    params = fmt.estimator().get_params(deep=False)
    unknown = [n for n in fmt.array_params if n not in params]
    if unknown:
        raise ValueError(
            f"format {fmt.name!r}: {fmt.estimator.__name__} has no parameters "
            f"{_quoted(unknown)}"
        )

    old = _FORMATS.get(fmt.name)
    if old is not None and _class_name(old.estimator) != _class_name(fmt.estimator):
        raise ValueError(
            f"format {fmt.name!r} is already registered for {_class_name(old.estimator)}"
        )
    for other in _FORMATS.values():
        if other.estimator is fmt.estimator and other.name != fmt.name:
            raise ValueError(
                f"{_class_name(fmt.estimator)} already has the format {other.name!r}"
            )
    _FORMATS[fmt.name] = fmt


def registered_model_formats() -> Mapping[str, ModelFormat]:
    """Return the registered formats by name, as a read-only mapping."""
    return MappingProxyType(_FORMATS)


def _format_of(model) -> ModelFormat:
    for fmt in _FORMATS.values():
        if type(model) is fmt.estimator:
            return fmt
    raise ValueError(
        f"cannot save a {_class_name(type(model))}: no model format is registered for "
        f"it (registered: {_quoted(sorted(_FORMATS)) or 'none'})"
    )


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------


def save_model(model, path: str | os.PathLike) -> None:
    """Write a fitted estimator to an ``.npz`` file, without pickle.

    Parameters
    ----------
    model : estimator
        A fitted estimator of a class with a registered :class:`ModelFormat`,
        such as :class:`fastem.GaussianMixture`.
    path : str or os.PathLike
        Destination. Exactly this path is written: unlike
        ``numpy.savez_compressed`` given a file name, no ``.npz`` suffix is
        appended. The archive is first written to a temporary file in the same
        directory and then renamed over ``path``, so a failed or interrupted
        save leaves an existing file at ``path`` as it was.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If ``model`` has not been fitted.
    ValueError
        If no format is registered for the model's class, if a constructor
        parameter can be stored neither as a JSON scalar nor as an array (for
        instance a ``numpy.random.RandomState`` as ``random_state``; the
        message names the parameter), or if the file would not load (say, a
        non-finite fitted array). Nothing is written then.

    See Also
    --------
    load_model : Read the file back.

    Notes
    -----
    The file layout is described in the module docstring of :mod:`fastem.io`.
    """
    fmt = _format_of(model)
    check_is_fitted(model, list(fmt.fitted_arrays) or None)
    path = Path(path)
    cannot = f"cannot save the model to {path}"

    arrays = {name: np.asarray(getattr(model, name)) for name in fmt.fitted_arrays}
    for name in fmt.fitted_lists:
        arrays[name] = np.asarray(getattr(model, name), dtype=np.float64)
    if hasattr(model, FEATURE_NAMES):
        arrays[FEATURE_NAMES] = np.asarray(getattr(model, FEATURE_NAMES), dtype=str)

    params = {}
    for name, value in model.get_params(deep=False).items():
        kept, json_value = _as_json_scalar(value)
        if kept:
            params[name] = json_value
        elif name in fmt.array_params:
            try:
                arrays[name] = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{cannot}: {name}={value!r} is not an array of numbers"
                ) from None
        else:
            raise ValueError(f"{cannot}: {_unstorable(fmt, name, value)}")

    fitted = {}
    for name in fmt.fitted_scalars:
        value = getattr(model, name)
        kept, fitted[name] = _as_json_scalar(value)
        if not kept:
            raise ValueError(f"{cannot}: the fitted attribute {name}={value!r} is not a number")

    # Check what is about to be written as load_model would: a file that does
    # not load is worse than no file.
    try:
        _rebuild(fmt, fmt.version, params, fitted, arrays)
    except ValueError as exc:
        raise ValueError(f"{cannot}: {exc}") from exc

    meta = {
        "format": fmt.name,
        "format_version": fmt.version,
        "fastem_version": _fastem_version(),
        "params": params,
        "fitted": fitted,
    }
    # json writes floats with repr, which round-trips float64 exactly, and
    # infinities as Infinity/-Infinity, which it reads back.
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


def _unstorable(fmt: ModelFormat, name: str, value) -> str:
    """Say why a parameter value cannot go into a model file, and what to do."""
    holds = "None, booleans, integers, floats and strings"
    if fmt.array_params:
        holds += f", or arrays for {', '.join(fmt.array_params)}"
    if isinstance(value, (np.random.RandomState, np.random.Generator)):
        # The generator's state would have to be pickled, and a seed cannot be
        # recovered from it.
        fix = "set it to an int or None before saving"
    else:
        fix = "set it to one of those before saving"
    return f"{name}={value!r} cannot be stored in a model file, which holds {holds}; {fix}"


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


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_model(path: str | os.PathLike):
    """Read an estimator written by :func:`save_model`.

    The file is opened with ``numpy.load(..., allow_pickle=False)``: no Python
    object is ever unpickled, so loading an untrusted file cannot run code.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`save_model`.

    Returns
    -------
    model : estimator
        A fitted estimator of the class of the file's format, such as
        :class:`fastem.GaussianMixture`, whose parameters and fitted arrays are
        bit-identical to the saved ones. Fitted lists are restored as lists of
        floats and ``feature_names_in_`` as an object array of str, as
        scikit-learn has them.

    Raises
    ------
    ValueError
        If the file does not exist, is not an ``.npz`` archive, was not written
        by fastem, is of a format no registered :class:`ModelFormat` describes
        or of a newer version than this fastem reads, holds pickled objects,
        lacks a constructor parameter (unless its format version is older),
        has parameters the estimator refuses, or has missing, unexpected,
        misshapen or non-finite arrays. The message names the file and the
        problem.
    """
    path = Path(path)
    entries = _read_npz_entries(path)
    if META_KEY not in entries:
        raise ValueError(
            f"{path} is not a fastem model file: it has no '{META_KEY}' entry "
            f"(entries: {_quoted(sorted(entries))})"
        )
    meta = _parse_meta(path, entries.pop(META_KEY))
    fmt = _FORMATS.get(meta.get("format"))
    if fmt is None:
        raise ValueError(
            f"{path} is not a model file this fastem reads: format is "
            f"{meta.get('format')!r}, expected one of {_quoted(sorted(_FORMATS))}"
        )
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        raise ValueError(f"{path}: invalid format_version {version!r}")
    if version > fmt.version:
        raise ValueError(
            f"{path} has model format version {version}, newer than the version "
            f"{fmt.version} of {fmt.name!r} this fastem reads; upgrade fastem to load it"
        )
    try:
        return _rebuild(fmt, version, meta.get("params"), meta.get("fitted"), entries)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


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
    """Decode the JSON metadata entry; anything but a JSON object reads as ``{}``."""
    if raw.ndim != 0 or raw.dtype.kind != "U":
        raise ValueError(f"{path}: the '{META_KEY}' entry is not a unicode string")
    try:
        meta = json.loads(str(raw))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: the '{META_KEY}' entry is not valid JSON: {exc}"
        ) from exc
    # An empty object is then rejected with a message about what is missing.
    return _json_object(meta)


def _rebuild(fmt: ModelFormat, version: int, params, fitted, arrays: Mapping):
    """Build the fitted estimator a file describes, checking everything on the way.

    :func:`load_model` calls it on a file's contents and :func:`save_model` on
    what it is about to write, so that both refuse the same things. The
    messages do not name the file; the callers add it. Nothing passed in is
    modified.
    """
    params, fitted = _json_object(params), _json_object(fitted)
    _check_fitted_scalars(fmt, fitted)
    _check_entries(fmt, arrays)
    array_params = {name: arrays[name] for name in fmt.array_params if name in arrays}

    defaults = fmt.estimator().get_params(deep=False)
    unknown = [name for name in params if name not in defaults]
    if unknown:
        raise ValueError(
            f"unknown parameters {_quoted(unknown)} for {fmt.estimator.__name__}"
        )
    twice = [name for name in array_params if name in params]
    if twice:
        raise ValueError(f"parameters stored twice (in the metadata and as arrays): "
                         f"{_quoted(twice)}")
    not_scalar = [name for name, value in params.items() if not _as_json_scalar(value)[0]]
    if not_scalar:
        raise ValueError(
            f"parameters {_quoted(not_scalar)} are neither None, a boolean, a number "
            "nor a string"
        )
    missing = [name for name in defaults if name not in params and name not in array_params]
    # Older versions may predate a parameter or (version 1 of the Gaussian
    # mixture format) have left it out; the current version stores them all.
    if missing and version >= fmt.version:
        raise ValueError(
            f"the metadata lacks the parameters {_quoted(missing)}, which format "
            f"version {version} of {fmt.name!r} stores"
        )

    model = fmt.estimator()
    model.set_params(**params, **array_params)
    # scikit-learn's validation from the class's declared constraints, which
    # fit runs too, so that a loaded model has only parameters its class accepts.
    if hasattr(model, "_parameter_constraints"):
        try:
            model._validate_params()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the saved parameters do not fit this fastem: {exc}") from exc

    if fmt.array_shapes is not None:
        shapes = fmt.array_shapes(model.get_params(deep=False), MappingProxyType(fitted))
        for name in (*fmt.fitted_arrays, *array_params):
            expected = tuple(shapes[name])
            if arrays[name].shape != expected:
                raise ValueError(
                    f"array {name} has shape {arrays[name].shape}, expected {expected} "
                    "for the saved parameters"
                )
    if FEATURE_NAMES in arrays:
        _check_feature_names(fmt, arrays[FEATURE_NAMES], fitted)

    for name in fmt.fitted_arrays:
        setattr(model, name, arrays[name])
    for name in fmt.fitted_lists:
        setattr(model, name, arrays[name].tolist())
    if FEATURE_NAMES in arrays:
        setattr(model, FEATURE_NAMES, arrays[FEATURE_NAMES].astype(object))
    for name, kind in fmt.fitted_scalars.items():
        value = fitted[name]
        setattr(model, name, np.float64(value) if kind is float else kind(value))
    return model


def _check_fitted_scalars(fmt: ModelFormat, fitted: Mapping) -> None:
    """Check that the metadata has exactly the format's fitted scalars, typed right."""
    for name, kind in fmt.fitted_scalars.items():
        if name not in fitted:
            raise ValueError(f"the metadata lacks the fitted attribute {name}")
        value = fitted[name]
        if kind is bool:
            valid = isinstance(value, bool)
        elif kind is int:
            valid = _is_int(value)
        else:
            # NaN is no fitted value; infinities can be (the -inf lower bound of
            # a mixture fitted without iterations).
            valid = (isinstance(value, float) or _is_int(value)) and not math.isnan(value)
        if not valid:
            raise ValueError(
                f"invalid fitted attribute {name}={value!r} (expected {kind.__name__})"
            )
    unexpected = [name for name in fitted if name not in fmt.fitted_scalars]
    if unexpected:
        raise ValueError(f"unexpected fitted attributes {_quoted(unexpected)}")


def _check_entries(fmt: ModelFormat, arrays: Mapping) -> None:
    """Check that the arrays are exactly the format's, numeric where they must be and finite."""
    required = (*fmt.fitted_arrays, *fmt.fitted_lists)
    missing = [name for name in required if name not in arrays]
    if missing:
        raise ValueError(f"missing arrays {_quoted(missing)}")
    known = {*required, *fmt.array_params, FEATURE_NAMES}
    unexpected = [name for name in arrays if name not in known]
    if unexpected:
        raise ValueError(f"unexpected entries {_quoted(unexpected)}")
    for name, array in arrays.items():
        if name == FEATURE_NAMES:
            continue
        if array.dtype.kind != "f":
            raise ValueError(f"array {name} has dtype {array.dtype}, expected floats")
        if name in fmt.fitted_lists and array.ndim != 1:
            raise ValueError(f"array {name} must be 1-D, got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"array {name} has non-finite values")


def _check_feature_names(fmt: ModelFormat, names: np.ndarray, fitted: Mapping) -> None:
    # scikit-learn's convention: one name per feature the model was fitted on.
    n_features = fitted.get("n_features_in_") if "n_features_in_" in fmt.fitted_scalars else None
    if (
        names.dtype.kind != "U"
        or names.ndim != 1
        or (n_features is not None and names.shape != (n_features,))
    ):
        count = "" if n_features is None else f"{n_features} "
        raise ValueError(
            f"{FEATURE_NAMES} must be a 1-D array of {count}strings, "
            f"got dtype {names.dtype} and shape {names.shape}"
        )


def _json_object(value) -> dict:
    return value if isinstance(value, dict) else {}


def _is_int(value) -> bool:
    # bool is a subclass of int, but True is no count.
    return isinstance(value, int) and not isinstance(value, bool)


def _quoted(items) -> str:
    return ", ".join(repr(str(item)) for item in items)
