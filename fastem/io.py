"""Model files: fitted estimators written to ``.npz`` and read back without pickle.

:func:`save_model` writes a fitted estimator to a NumPy ``.npz`` archive
(``numpy.savez_compressed``) and :func:`load_model` reads it back. Loading
never unpickles and never calls ``numpy.load``: the archive is read with
:mod:`zipfile` and each ``.npy`` entry by a reader that knows only float32,
float64 and unicode arrays, so opening a model file can never run code.

Model formats
-------------
What a file of one estimator class holds is described by a
:class:`ModelFormat` (its name and version, the class, its fitted arrays,
lists and scalars, which constructor parameters may be arrays, a hook giving
the shapes the arrays must have and one checking their values), registered
with :func:`register_model_format`. :func:`save_model` finds the format from
the model's exact class, :func:`load_model` from the ``"format"`` field of the
file. Importing fastem registers ``"fastem.GaussianMixture"``, version 2. The
code here imports no estimator; it holds only the value check of that one
format (see below).

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
    With the array's own dtype, float32 or float64 (a model fitted on float32
    data keeps float32).
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

Reading a file
--------------
A model file is untrusted input, read in this order:

1. the zip directory, and the ``.npy`` header of every entry: a dtype a model
   file holds and a shape whose size is the size of the entry, all entries of
   one byte order (that of the machine that wrote them);
2. the metadata: format and version, the constructor parameters (checked by
   the estimator's own parameter validation, as ``fit`` checks them) and the
   fitted scalars (checked against the types the format declares);
3. the name, dtype and shape of every entry against the format; only then is
   any array's data read, so no header can make the reader allocate more than
   the file holds;
4. the data: every entry read to its end, which checks its CRC-32, and every
   float finite;
5. the values, by the format's ``check_fitted``.

The ``"fastem.GaussianMixture"`` format
---------------------------------------
Fitted arrays ``weights_``, ``means_``, ``covariances_``, ``precisions_`` and
``precisions_cholesky_``, with the shapes of the covariance type; fitted list
``lower_bounds_`` (the per-iteration lower bounds of the best restart); fitted
scalars ``converged_``, ``n_iter_``, ``lower_bound_`` (``-inf`` for a model
fitted with ``max_iter=0``) and ``n_features_in_``; array parameters
``weights_init``, ``means_init`` and ``precisions_init``.

Its values are checked as those of a Gaussian mixture, within the rounding of
the arrays' dtype: the fitted arrays share one dtype; the weights are
non-negative and sum to one; every covariance is symmetric and positive
definite (the variances of 'diag' and 'spherical' positive); every precision
factor :math:`U` is upper triangular with a positive diagonal and
:math:`U^T \\Sigma U = I`; ``precisions_`` is :math:`U U^T`; ``lower_bounds_``
has ``n_iter_`` values, the last of them ``lower_bound_``; and the initial
arrays are values ``fit`` accepts. A file failing any of these would load a
model that predicts garbage.

Errors
------
Every problem with a file's existence or content is reported by
:func:`load_model` as one ``ValueError`` whose message names the file and the
problem, whatever the low-level error was (a damaged zip directory, a failed
decompression, a CRC mismatch), so a caller such as the command line can
report all bad input the same way. :func:`save_model` reports a folder that
does not exist, or another failure to write, as an ``OSError`` naming the
path it was given.

Data tables (the matrices a model is fitted to) are read by :mod:`fastem.tables`.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import json
import math
import os
import re
import reprlib
import struct
import sys
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
from sklearn.utils.validation import check_is_fitted

__all__ = [
    "JSONCodec",
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
        and each array parameter must have, given the constructor parameters
        but the array parameters (which are read only once their shapes are
        known to be right), already checked by the estimator's own parameter
        validation, and the fitted scalars (already type-checked). It may
        raise ``ValueError`` for values the estimator cannot have. An array
        parameter it leaves out may have any shape (a prior that broadcasts,
        say; ``check_fitted`` should then check it). Without it, shapes are
        not checked.
    param_codecs : mapping of str to JSONCodec, default={}
        Constructor parameters that are neither JSON scalars nor arrays (a
        prior object, say), stored in the metadata as the JSON value their
        codec encodes them to and decoded on loading.
    fitted_codecs : mapping of str to JSONCodec, default={}
        Fitted attributes stored the same way; a file of an older version
        may lack them (decoded from ``None`` then).
    check_fitted : callable, optional
        ``check_fitted(model)``: called with the rebuilt model, every
        parameter and attribute set (arrays finite, of the right shapes);
        raises ``ValueError`` saying which values no fitted model has (weights
        that do not sum to one, a covariance that is not positive definite).
        :func:`save_model` calls it too, so a model failing it is not saved.
    """

    name: str
    version: int
    estimator: type
    fitted_arrays: tuple[str, ...]
    fitted_scalars: Mapping[str, type]
    fitted_lists: tuple[str, ...] = ()
    array_params: tuple[str, ...] = ()
    array_shapes: Callable[[Mapping, Mapping], Mapping[str, tuple[int, ...]]] | None = None
    param_codecs: Mapping[str, JSONCodec] = field(default_factory=dict)
    fitted_codecs: Mapping[str, JSONCodec] = field(default_factory=dict)
    check_fitted: Callable[[object], None] | None = None

    def __post_init__(self):
        # Frozen, so that a registered format cannot change under saved files.
        for name in ("fitted_arrays", "fitted_lists", "array_params"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("fitted_scalars", "param_codecs", "fitted_codecs"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))


@dataclass(frozen=True)
class JSONCodec:
    """How a value that is neither a JSON scalar nor an array goes into a model file.

    ``encode(value)`` returns a JSON value (None, numbers, strings, lists and
    dicts of them; floats are written with ``repr`` and read back exactly);
    ``decode(json_value)`` rebuilds the value and raises ``ValueError`` for
    anything it did not encode.
    """

    encode: Callable[[object], object]
    decode: Callable[[object], object]


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
    OSError
        If the file cannot be written: ``FileNotFoundError`` if the folder of
        ``path`` does not exist, ``IsADirectoryError`` if ``path`` is a
        directory, and so on. The message names ``path`` and the folder, never
        the temporary file.

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
        if name in fmt.param_codecs:
            params[name] = fmt.param_codecs[name].encode(value)
            continue
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
    for name, codec in fmt.fitted_codecs.items():
        fitted[name] = codec.encode(getattr(model, name, None))

    # Check what is about to be written as load_model would: a file that does
    # not load is worse than no file.
    try:
        _rebuild(fmt, fmt.version, params, fitted,
                 {name: _Layout(a.dtype, a.shape) for name, a in arrays.items()},
                 arrays.__getitem__)
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

    if path.is_dir() or not path.parent.is_dir():
        raise _save_error(path)
    # A sibling temporary file makes the final rename atomic; opening it with
    # open() rather than mkstemp keeps the usual umask-based permissions. The
    # name is cut so that the temporary name is not too long where ``path`` is not.
    tmp_path = path.with_name(f".{path.name[:50]}.{uuid.uuid4().hex}.tmp")
    try:
        # Passing an open file rather than a name stops NumPy from appending ".npz".
        with open(tmp_path, "xb") as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(tmp_path, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            # Its message names the temporary file, which the caller never heard of.
            raise _save_error(path, exc) from None
        raise


def _save_error(path: Path, exc: OSError | None = None) -> OSError:
    """The error of a save to ``path`` that cannot write, naming ``path``."""
    folder = path.parent
    if not folder.exists():
        code, reason = errno.ENOENT, f"the folder {folder} does not exist"
    elif not folder.is_dir():
        code, reason = errno.ENOTDIR, f"{folder} is not a folder"
    elif path.is_dir():
        code, reason = errno.EISDIR, "it is a directory"
    elif exc is not None and exc.errno is not None:
        code, reason = exc.errno, exc.strerror
    else:
        return OSError(f"cannot save the model to {path}: {exc}")
    # OSError(errno, ...) is the subclass of that errno, such as FileNotFoundError;
    # str() shows it as "[Errno 2] cannot save the model: ...: 'path'".
    return OSError(code, f"cannot save the model: {reason}", str(path))


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

    Nothing in the file is ever unpickled, so loading an untrusted file cannot
    run code; and no array is allocated before its shape has been checked
    against the entry's size and the format, so a damaged or hostile header
    cannot exhaust memory.

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
        If the file does not exist or is a directory, is not an ``.npz``
        archive or is damaged (a bad zip directory, a failed decompression, a
        CRC mismatch, an ``.npy`` header that disagrees with its entry), was
        not written by fastem, is of a format no registered
        :class:`ModelFormat` describes or of a newer version than this fastem
        reads, holds pickled objects, lacks a constructor parameter (unless
        its format version is older), has parameters the estimator refuses,
        has missing, unexpected, misshapen or non-finite arrays, or values no
        fitted model has (see the module docstring). One ``ValueError``
        whatever the cause; the message names the file and the problem.
    """
    path = Path(path)
    with _open_archive(path) as archive:
        entries = _npy_entries(path, archive)
        meta = _read_meta(path, archive, entries)
        fmt, version = _file_format(path, meta)
        layouts = {name: entry.layout for name, entry in entries.items() if name != META_KEY}
        try:
            return _rebuild(fmt, version, meta.get("params"), meta.get("fitted"), layouts,
                            lambda name: _read_array(path, archive, entries[name]))
        except _FileError:
            raise
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


class _FileError(ValueError):
    """A ``ValueError`` whose message already names the file."""


def _not_ours(path: Path, problem: str) -> _FileError:
    return _FileError(f"{path} is not a fastem model file: {problem}")


def _zip_call(problem: str, call, *args):
    """``call(*args)``, a :mod:`zipfile` call on the file's bytes.

    zipfile, and the decompressor it picks by the file's (untrusted)
    compression field, raise a zoo of exceptions on damaged input:
    ``BadZipFile``, ``zlib.error``, ``lzma.LZMAError``, ``OSError`` from bz2,
    ``EOFError``, ``NotImplementedError`` (an unknown compression method),
    ``RuntimeError`` (an "encrypted" flag), ``struct.error``, ``ValueError``
    (a negative seek)... Each means the same: the bytes are not a readable
    archive. Only library calls go through here, so that a bug in this
    module is not reported as a damaged file.
    """
    try:
        return call(*args)
    except Exception as exc:
        raise ValueError(f"{problem} ({type(exc).__name__}: {exc})") from exc


def _open_archive(path: Path) -> zipfile.ZipFile:
    """The zip archive of a model file, read into memory."""
    try:
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not a model file")
        if not path.exists():
            raise ValueError(f"{path}: no such model file")
        if not path.is_file():
            raise ValueError(f"{path} is not a regular file, so not a model file")
        data = path.read_bytes()
    except OSError as exc:
        # Permission denied on the file or a folder above it, an I/O error...
        raise ValueError(f"{path}: cannot read the model file: {exc.strerror or exc}") from exc
    # From memory, a size field that lies cannot make a read wait for, or
    # allocate, more than the file holds.
    try:
        return _zip_call("not a readable .npz (zip) archive", zipfile.ZipFile, BytesIO(data))
    except ValueError as exc:
        raise _not_ours(path, str(exc)) from exc


# .npy files: magic string, then the version, then the header length in bytes.
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER_LENGTH = {(1, 0): "<H", (2, 0): "<I", (3, 0): "<I"}
# numpy.lib.format refuses longer headers too (its max_header_size).
_NPY_MAX_HEADER = 10_000
# The dtypes a model file holds: float32, float64 and unicode, as numpy writes them.
_NPY_DESCR = re.compile(r"[<>](f4|f8|U[1-9][0-9]{0,9})")


class _Layout(NamedTuple):
    """What an array is, known before its data is read."""

    dtype: np.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Entry:
    """An ``.npy`` entry of a model file whose header agrees with its size."""

    name: str
    info: zipfile.ZipInfo
    header_size: int
    layout: _Layout
    fortran_order: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.layout.shape) * self.layout.dtype.itemsize


def _npy_entries(path: Path, archive: zipfile.ZipFile) -> dict[str, _Entry]:
    """The ``.npy`` header of every entry, by entry name (``numpy.savez``'s keys)."""
    entries = {}
    for info in archive.infolist():
        try:
            entry = _npy_entry(archive, info)
        except ValueError as exc:
            raise _not_ours(path, str(exc)) from exc
        if entry.name in entries:
            raise _not_ours(path, f"entry '{entry.name}' appears twice")
        entries[entry.name] = entry
    # Every array of a file is written in the byte order of one machine; a
    # stray byte order is a damaged header, which would byte-swap the data.
    orders = {_byte_order(e.layout.dtype) for e in entries.values()}
    if len(orders) > 1:
        raise _not_ours(path, "its entries have different byte orders")
    return entries


def _byte_order(dtype: np.dtype) -> str:
    return {"=": sys.byteorder, "<": "little", ">": "big"}[dtype.byteorder]


def _npy_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Entry:
    if not info.filename.endswith(".npy"):
        raise ValueError(f"entry {reprlib.repr(info.filename)} is not an .npy array")
    name = info.filename[: -len(".npy")]
    with _zip_call(f"entry '{name}' is damaged", archive.open, info) as stream:
        prefix = _read_exactly(stream, len(_NPY_MAGIC) + 2, name)
        if prefix[: len(_NPY_MAGIC)] != _NPY_MAGIC:
            raise ValueError(f"entry '{name}' is not an .npy array")
        version = (prefix[-2], prefix[-1])
        if version not in _NPY_HEADER_LENGTH:
            raise ValueError(f"entry '{name}' has the unknown .npy version {version}")
        length_format = _NPY_HEADER_LENGTH[version]
        length_size = struct.calcsize(length_format)
        (length,) = struct.unpack(length_format, _read_exactly(stream, length_size, name))
        if length > _NPY_MAX_HEADER:
            raise ValueError(f"entry '{name}' has an .npy header of {length} bytes, longer "
                             f"than {_NPY_MAX_HEADER}")
        text = _read_exactly(stream, length, name)
    layout, fortran_order = _parse_npy_header(text, version, name)
    entry = _Entry(name, info, len(prefix) + length_size + length, layout, fortran_order)
    # The size in the zip directory is checked again as the data is read.
    held = info.file_size - entry.header_size
    if entry.nbytes != held:
        raise ValueError(
            f"entry '{name}' is damaged: its header claims shape {reprlib.repr(layout.shape)} "
            f"of {layout.dtype}, {entry.nbytes} bytes, but it holds {held}"
        )
    return entry


def _read_exactly(stream, size: int, name: str) -> bytes:
    data = _zip_call(f"entry '{name}' is damaged", stream.read, size)
    if len(data) != size:
        raise ValueError(f"entry '{name}' is damaged: it ends early")
    return data


def _parse_npy_header(text: bytes, version: tuple[int, int], name: str):
    """``(layout, fortran_order)`` from an ``.npy`` header, a Python dict literal."""
    invalid = f"entry '{name}' has an invalid .npy header"
    try:
        header = ast.literal_eval(text.decode("utf-8" if version >= (3, 0) else "latin-1"))
    except (ValueError, SyntaxError, TypeError, OverflowError, MemoryError, RecursionError):
        # Malformed, or nested too deeply for the parser (a few KB can be).
        raise ValueError(invalid) from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise ValueError(invalid)
    descr, fortran_order, shape = header["descr"], header["fortran_order"], header["shape"]
    if not (isinstance(fortran_order, bool) and isinstance(shape, tuple)
            and all(_is_int(n) and n >= 0 for n in shape)):
        raise ValueError(invalid)
    if isinstance(descr, str) and _NPY_DESCR.fullmatch(descr):
        return _Layout(np.dtype(descr), shape), fortran_order
    if isinstance(descr, str) and descr.lstrip("<>|=").startswith("O"):
        raise ValueError(f"entry '{name}' holds pickled Python objects, which fastem never loads")
    raise ValueError(f"entry '{name}' has the dtype {reprlib.repr(descr)}; model files hold "
                     "only float32, float64 and unicode arrays")


def _read_array(path: Path, archive: zipfile.ZipFile, entry: _Entry) -> np.ndarray:
    """The data of an entry whose layout has been checked, as a native-endian array."""
    damaged = f"entry '{entry.name}' is damaged"
    try:
        with _zip_call(damaged, archive.open, entry.info) as stream:
            _read_exactly(stream, entry.header_size, entry.name)
            data = _read_exactly(stream, entry.nbytes, entry.name)
            # Reading to the end is what makes zipfile compare the CRC-32.
            if _zip_call(damaged, stream.read, 1):
                raise ValueError(f"{damaged}: it holds more than its header says")
    except ValueError as exc:
        raise _not_ours(path, str(exc)) from exc
    dtype = entry.layout.dtype
    if dtype.kind == "U":
        # UTF-32 code units that are no Unicode scalar value.
        codes = np.frombuffer(data, dtype=np.dtype(np.uint32).newbyteorder(dtype.byteorder))
        if np.any((codes > 0x10FFFF) | ((codes >= 0xD800) & (codes <= 0xDFFF))):
            raise _not_ours(path, f"entry '{entry.name}' holds invalid unicode")
    array = np.frombuffer(data, dtype=dtype).reshape(
        entry.layout.shape, order="F" if entry.fortran_order else "C")
    # A writable copy in the machine's byte order.
    return array.astype(dtype.newbyteorder("="), order="K")


def _read_meta(path: Path, archive: zipfile.ZipFile, entries: Mapping[str, _Entry]) -> dict:
    """Decode the JSON metadata entry; anything but a JSON object reads as ``{}``."""
    if META_KEY not in entries:
        raise _not_ours(path, f"it has no '{META_KEY}' entry "
                              f"(entries: {_quoted(sorted(entries)) or 'none'})")
    layout = entries[META_KEY].layout
    if layout.shape != () or layout.dtype.kind != "U":
        raise _FileError(f"{path}: the '{META_KEY}' entry is not a unicode string")
    raw = str(_read_array(path, archive, entries[META_KEY])[()])
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError is a ValueError, as is an integer of too many digits.
        raise _FileError(f"{path}: the '{META_KEY}' entry is not valid JSON: {exc}") from exc
    # An empty object is then rejected with a message about what is missing.
    return _json_object(meta)


def _file_format(path: Path, meta: Mapping) -> tuple[ModelFormat, int]:
    name = meta.get("format")
    fmt = _FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise _FileError(
            f"{path} is not a model file this fastem reads: format is "
            f"{reprlib.repr(name)}, expected one of {_quoted(sorted(_FORMATS))}"
        )
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        raise _FileError(f"{path}: invalid format_version {reprlib.repr(version)}")
    if version > fmt.version:
        raise _FileError(
            f"{path} has model format version {version}, newer than the version "
            f"{fmt.version} of {fmt.name!r} this fastem reads; upgrade fastem to load it"
        )
    return fmt, version


def _rebuild(fmt: ModelFormat, version: int, params, fitted,
             layouts: Mapping[str, _Layout], read: Callable[[str], np.ndarray]):
    """Build the fitted estimator a file describes, checking everything on the way.

    :func:`load_model` calls it on a file's contents and :func:`save_model` on
    what it is about to write, so that both refuse the same things.
    ``layouts`` gives the dtype and shape of every array, ``read(name)`` its
    data; no array is read before every layout and parameter is checked. The
    messages do not name the file; the callers add it. Nothing passed in is
    modified.
    """
    # Copies: the decoding below pops entries, and nothing passed in is modified.
    params, fitted = dict(_json_object(params)), dict(_json_object(fitted))
    decoded_fitted = {name: fmt.fitted_codecs[name].decode(fitted.pop(name, None))
                      for name in fmt.fitted_codecs}
    _check_fitted_scalars(fmt, fitted)
    _check_layouts(fmt, layouts, fitted)
    array_params = [name for name in fmt.array_params if name in layouts]

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
    decoded = {name: fmt.param_codecs[name].decode(params.pop(name))
               for name in list(params) if name in fmt.param_codecs}
    not_scalar = [name for name, value in params.items() if not _as_json_scalar(value)[0]]
    if not_scalar:
        raise ValueError(
            f"parameters {_quoted(not_scalar)} are neither None, a boolean, a number "
            "nor a string"
        )
    missing = [name for name in defaults
               if name not in params and name not in decoded and name not in array_params]
    # Older versions may predate a parameter or (version 1 of the Gaussian
    # mixture format) have left it out; the current version stores them all.
    if missing and version >= fmt.version:
        raise ValueError(
            f"the metadata lacks the parameters {_quoted(missing)}, which format "
            f"version {version} of {fmt.name!r} stores"
        )

    model = fmt.estimator()
    model.set_params(**params, **decoded)
    _validate_params(model)

    if fmt.array_shapes is not None:
        given = {name: value for name, value in model.get_params(deep=False).items()
                 if name not in fmt.array_params}
        shapes = fmt.array_shapes(MappingProxyType(given), MappingProxyType(fitted))
        for name in (*fmt.fitted_arrays, *array_params):
            if name in array_params and name not in shapes:
                continue  # any shape the estimator accepts (its check_fitted says)
            expected = tuple(shapes[name])
            if layouts[name].shape != expected:
                raise ValueError(
                    f"array {name} has shape {reprlib.repr(layouts[name].shape)}, expected "
                    f"{reprlib.repr(expected)} for the saved parameters"
                )

    arrays = {name: read(name) for name in layouts}
    for name, array in arrays.items():
        if name != FEATURE_NAMES and not np.all(np.isfinite(array)):
            raise ValueError(f"array {name} has non-finite values")
    if array_params:
        model.set_params(**{name: arrays[name] for name in array_params})
        _validate_params(model)

    for name in fmt.fitted_arrays:
        setattr(model, name, arrays[name])
    for name in fmt.fitted_lists:
        setattr(model, name, arrays[name].tolist())
    if FEATURE_NAMES in arrays:
        setattr(model, FEATURE_NAMES, arrays[FEATURE_NAMES].astype(object))
    for name, kind in fmt.fitted_scalars.items():
        value = fitted[name]
        setattr(model, name, np.float64(value) if kind is float else kind(value))
    for name, value in decoded_fitted.items():
        setattr(model, name, value)
    if fmt.check_fitted is not None:
        fmt.check_fitted(model)
    return model


def _validate_params(model) -> None:
    # scikit-learn's validation from the class's declared constraints, which
    # fit runs too, so that a loaded model has only parameters its class accepts.
    if hasattr(model, "_parameter_constraints"):
        try:
            model._validate_params()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the saved parameters do not fit this fastem: {exc}") from exc


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
            # a mixture fitted without iterations). An integer must fit a float.
            valid = ((isinstance(value, float) and not math.isnan(value))
                     or (_is_int(value) and abs(value) <= sys.float_info.max))
        if not valid:
            raise ValueError(
                f"invalid fitted attribute {name}={reprlib.repr(value)} "
                f"(expected {kind.__name__})"
            )
    unexpected = [name for name in fitted if name not in fmt.fitted_scalars]
    if unexpected:
        raise ValueError(f"unexpected fitted attributes {_quoted(unexpected)}")


def _check_layouts(fmt: ModelFormat, layouts: Mapping[str, _Layout], fitted: Mapping) -> None:
    """Check that the arrays are exactly the format's, with the dtypes they must have."""
    required = (*fmt.fitted_arrays, *fmt.fitted_lists)
    missing = [name for name in required if name not in layouts]
    if missing:
        raise ValueError(f"missing arrays {_quoted(missing)}")
    known = {*required, *fmt.array_params, FEATURE_NAMES}
    unexpected = [name for name in layouts if name not in known]
    if unexpected:
        raise ValueError(f"unexpected entries {_quoted(unexpected)}")
    for name, (dtype, shape) in layouts.items():
        if name == FEATURE_NAMES:
            _check_feature_names(fmt, dtype, shape, fitted)
        elif dtype.kind != "f" or dtype.itemsize not in (4, 8):
            raise ValueError(f"array {name} has dtype {dtype}, expected float32 or float64")
        elif name in fmt.fitted_lists and len(shape) != 1:
            raise ValueError(f"array {name} must be 1-D, got shape {reprlib.repr(shape)}")


def _check_feature_names(fmt: ModelFormat, dtype: np.dtype, shape: tuple, fitted: Mapping
                         ) -> None:
    # scikit-learn's convention: one name per feature the model was fitted on.
    n_features = fitted.get("n_features_in_") if "n_features_in_" in fmt.fitted_scalars else None
    if dtype.kind != "U" or len(shape) != 1 or (n_features is not None
                                                and shape != (n_features,)):
        count = "" if n_features is None else f"{n_features} "
        raise ValueError(
            f"{FEATURE_NAMES} must be a 1-D array of {count}strings, "
            f"got dtype {dtype} and shape {reprlib.repr(shape)}"
        )


def _json_object(value) -> dict:
    return value if isinstance(value, dict) else {}


def _is_int(value) -> bool:
    # bool is a subclass of int, but True is no count.
    return isinstance(value, int) and not isinstance(value, bool)


def _quoted(items) -> str:
    return ", ".join(repr(str(item)) for item in items)
