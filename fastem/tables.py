"""Reading data tables: the numeric matrices fastem fits.

:func:`read_table` reads a numeric matrix from CSV, TSV, whitespace-separated
text, ``.npy``, ``.npz`` or Parquet files, choosing the format by the file's
extension; :func:`load_table` does the same and also says whether the column
names came from the file; :func:`load_demo_data` returns the Old Faithful
data shipped with fastem. NumPy files are opened with ``allow_pickle=False``;
text files must be UTF-8 (a byte-order mark is allowed).

Every problem with a file's existence or content is reported as a
``ValueError`` whose message names the file, so a caller such as the command
line can report all bad input the same way; columns asked for by a name the
file does not have raise its subclass :class:`MissingColumnsError`. Missing
values are read as NaN and left for the estimator (or the caller) to reject.

Model files are a different matter and live in :mod:`fastem.io`.
"""

from __future__ import annotations

import codecs
import csv
import os
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["MissingColumnsError", "ParquetBlocks", "Table", "load_demo_data", "load_table",
           "read_table"]

# Fields read as missing values (NaN) in text tables.
_MISSING_TOKENS = frozenset({"", "NA"})


class Table(NamedTuple):
    """A numeric table read by :func:`load_table`."""

    X: np.ndarray
    """The data, of shape (n_samples, n_columns), dtype float64."""
    names: list[str]
    """The names of the columns of ``X``."""
    named: bool
    """Whether the file names its columns (a header row, a Parquet schema);
    False when the names are made up (``x0``, ``x1``, ...)."""


class MissingColumnsError(ValueError):
    """Columns asked for by name that the file does not have.

    Attributes
    ----------
    path : pathlib.Path
        The file.
    missing : list of str
        The names asked for that it lacks.
    available : list of str
        The names of its columns.
    named : bool
        Whether those names come from the file (see :attr:`Table.named`).
    """

    def __init__(self, path: Path, missing: list, available: list[str], named: bool):
        super().__init__(
            f"{path}: unknown columns: {_quoted(missing)}; available: {_quoted(available)}"
        )
        self.path = path
        self.missing = missing
        self.available = available
        self.named = named


def read_table(
    path: str | os.PathLike, columns: Sequence[str | int] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Read a numeric data matrix from a file, choosing the format by extension.

    Parameters
    ----------
    path : str or os.PathLike
        The file. Supported extensions (case-insensitive):

        ``.csv``
            Comma-separated. The first row is a header if any of its fields is
            not a number (empty fields and ``NA`` count as numbers here, being
            missing values).
        ``.tsv``, ``.tab``
            Tab-separated, header detected as for ``.csv``.
        ``.txt``
            Comma-separated if the first non-blank line contains a comma,
            otherwise separated by runs of spaces and tabs; header detected as
            for ``.csv``.

        Text files must be UTF-8 (with or without a byte-order mark).
        ``.npy``
            A 1-D array (read as one column) or a 2-D array.
        ``.npz``
            The archive's only array, or the array named ``X`` if it has several.
        ``.parquet``
            Needs pyarrow (``pip install fastem[parquet]``); read a row group
            at a time (:class:`ParquetBlocks` streams them instead).

        Blank lines in text files are skipped. Columns without a header, and
        the columns of NumPy files, are named ``x0``, ``x1``, ...
    columns : sequence of str or int, optional
        The columns to return, in this order, by name or by 0-based index. A
        string of digits is taken as an index unless a column has that name.
        By default all columns are returned.

    Returns
    -------
    X : ndarray of shape (n_samples, n_columns), dtype float64
        The data. Missing values (empty fields, ``NA``, ``nan``; nulls in
        Parquet) are NaN: they are read here and rejected later by the
        estimator with its own message.
    names : list of str
        The names of the returned columns.

    Raises
    ------
    ValueError
        If the file does not exist or is a folder (a ``ValueError`` rather
        than ``FileNotFoundError``, like every other input problem here), has
        an unsupported extension, is text but not UTF-8 (the message gives the
        offset of the first invalid byte), is empty or has no data rows, has a
        row with the wrong number of fields (the message gives its line
        number), if ``columns`` names unknown columns
        (:class:`MissingColumnsError`; the message lists the available ones),
        or if a selected column is not numeric (the message names all such
        columns).

    See Also
    --------
    load_table : The same, and whether the names came from the file.
    """
    table = load_table(path, columns)
    return table.X, table.names


def load_table(path: str | os.PathLike, columns: Sequence[str | int] | None = None) -> Table:
    """Read a numeric data matrix from a file, and whether the file names its columns.

    Parameters and errors are those of :func:`read_table`.

    Returns
    -------
    Table
        ``X`` and ``names`` as :func:`read_table` returns them, and ``named``:
        True for a text table with a header row and for Parquet, False for a
        text table without one and for NumPy files (whose names are made up).
    """
    path = _existing_file(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".tab", ".txt"):
        return _read_text_table(path, suffix, columns)
    if suffix in (".npy", ".npz"):
        array = _read_numpy_array(path, suffix)
        names = [f"x{j}" for j in range(array.shape[1])]
        selected = _select_columns(path, names, columns, named=False)
        if (selected == list(range(array.shape[1])) and array.dtype == np.float64
                and array.flags.c_contiguous):
            # A memory-mapped .npy of every column stays on disk: fits stream it.
            return Table(array, names, False)
        return Table(
            np.ascontiguousarray(array[:, selected], dtype=np.float64),
            [names[j] for j in selected],
            False,
        )
    if suffix == ".parquet":
        return _read_parquet(path, columns)
    raise ValueError(
        f"{path}: unsupported file type {path.suffix!r} "
        "(use .csv, .tsv, .tab, .txt, .npy, .npz or .parquet)"
    )


def load_demo_data() -> tuple[np.ndarray, list[str]]:
    """Return the Old Faithful geyser data shipped with fastem.

    Returns
    -------
    X : ndarray of shape (272, 2), dtype float64
        Eruption duration (minutes) and waiting time to the next eruption
        (minutes), a classic two-cluster example.
    names : list of str
        ``["eruptions", "waiting"]``.
    """
    source = resources.files(__package__) / "data" / "faithful.csv"
    with resources.as_file(source) as path:
        return read_table(path)


def _text_rows(path: Path, suffix: str) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, fields)`` for each non-blank line of a text table."""
    try:
        # utf-8-sig drops the byte-order mark spreadsheet programs put in front.
        with open(path, encoding="utf-8-sig", newline="") as handle:
            yield from _split_lines(path, handle, suffix)
    except UnicodeDecodeError:
        # The decoder's position is within its buffer, not the file: find the byte again.
        raise ValueError(_not_utf8(path)) from None


def _split_lines(path: Path, handle, suffix: str) -> Iterator[tuple[int, list[str]]]:
    if suffix == ".txt":
        first = next((line for line in handle if line.strip()), "")
        handle.seek(0)
        if "," not in first:
            for line_number, line in enumerate(handle, start=1):
                fields = line.split()
                if fields:
                    yield line_number, fields
            return
    delimiter = "\t" if suffix in (".tsv", ".tab") else ","
    reader = csv.reader(handle, delimiter=delimiter)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # a field over csv's size limit, for one
            raise ValueError(f"{path}: line {reader.line_num}: {exc}") from None
        if row:
            # line_num counts physical lines, so it is right after quoted newlines.
            yield reader.line_num, [field.strip() for field in row]


def _not_utf8(path: Path) -> str:
    """Say that a text table is not UTF-8, and where (called once decoding has failed)."""
    fix = "save it as UTF-8"
    with open(path, "rb") as handle:
        if handle.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            return f"{path}: the file is UTF-16 text, not UTF-8; {fix}"
        handle.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        while True:
            chunk = handle.read(1 << 20)
            # Bytes of a character split across chunks wait in the decoder.
            waiting = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                byte = exc.object[exc.start]
                return (f"{path}: not UTF-8 text (byte 0x{byte:02x} at offset "
                        f"{offset - waiting + exc.start} is invalid); {fix}")
            if not chunk:
                return f"{path}: not UTF-8 text; {fix}"
            offset += len(chunk)


def _is_number(field: str) -> bool:
    if field in _MISSING_TOKENS:
        return True
    try:
        float(field)
    except ValueError:
        return False
    return True


def _read_text_table(
    path: Path, suffix: str, columns: Sequence[str | int] | None
) -> Table:
    rows = _text_rows(path, suffix)
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{path}: the file is empty")
    first_line, first_fields = first
    n_fields = len(first_fields)
    named = not all(_is_number(field) for field in first_fields)
    if named:
        names = first_fields
        data = []
    else:
        names = [f"x{j}" for j in range(n_fields)]
        data = [first_fields]
    for line_number, fields in rows:
        if len(fields) != n_fields:
            raise ValueError(
                f"{path}: line {line_number} has {len(fields)} fields, expected {n_fields} "
                f"(as on line {first_line})"
            )
        data.append(fields)
    if not data:
        raise ValueError(f"{path}: no data rows after the header")

    selected = _select_columns(path, names, columns, named)
    X = np.empty((len(data), len(selected)), dtype=np.float64)
    non_numeric = []
    for out, j in enumerate(selected):
        values = ["nan" if row[j] in _MISSING_TOKENS else row[j] for row in data]
        try:
            X[:, out] = np.array(values, dtype=np.float64)
        except ValueError:
            non_numeric.append(names[j])
    if non_numeric:
        raise ValueError(
            f"{path}: non-numeric columns: {_quoted(non_numeric)} "
            "(select numeric columns with columns= or --columns)"
        )
    return Table(X, [names[j] for j in selected], named)


def _read_numpy_array(path: Path, suffix: str) -> np.ndarray:
    """Return the 2-D array stored in a ``.npy`` or ``.npz`` file."""
    unreadable = f"{path}: cannot read it as a NumPy {suffix} file"
    try:
        # .npy files are memory-mapped, not read (.npz members cannot be).
        loaded = np.load(path, allow_pickle=False,
                         mmap_mode="r" if suffix == ".npy" else None)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{unreadable}: {exc}") from exc
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            names = loaded.files
            if len(names) != 1 and "X" not in names:
                raise ValueError(
                    f"{path}: expected one array or an array named 'X', "
                    f"found {len(names)}: {_quoted(names)}"
                )
            key = names[0] if len(names) == 1 else "X"
            try:
                loaded = loaded[key]
            except (
                OSError,
                ValueError,
                EOFError,
                zipfile.BadZipFile,
                zlib.error,
            ) as exc:
                raise ValueError(f"{unreadable}: array '{key}': {exc}") from exc
    if not isinstance(loaded, np.ndarray) or loaded.dtype.kind not in "biuf":
        raise ValueError(f"{path}: the file does not hold a numeric array")
    if loaded.ndim == 1:
        loaded = loaded[:, np.newaxis]
    if loaded.ndim != 2:
        raise ValueError(
            f"{path}: expected a 1-D or 2-D array, got shape {loaded.shape}"
        )
    if loaded.shape[0] == 0:
        raise ValueError(f"{path}: the array has no rows")
    return loaded


def _import_pyarrow(path: Path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"{path}: reading Parquet files needs pyarrow (pip install pyarrow)"
        ) from None
    return pa, pq


class ParquetBlocks:
    """The numeric columns of a Parquet file, read a row group at a time.

    A callable of row blocks (see :class:`fastem.blocks.RowBlocks`): each
    call returns a fresh iterator over float64 blocks of at most ``block_rows``
    rows, decoded from one row group after another, so a fit streams a file
    of any size through memory one block at a time::

        GaussianMixture(5).fit(ParquetBlocks("big.parquet", columns=["a", "b"]))

    Parameters
    ----------
    path : str or os.PathLike
        The Parquet file (needs pyarrow).
    columns : sequence of str or int, optional
        As for :func:`read_table`: the columns, by name or 0-based index.
    block_rows : int, optional
        Rows per block (default: about ``fastem.blocks.BLOCK_BYTES`` of
        float64; a row group with more rows is decoded in several batches).

    Attributes
    ----------
    names : list of str
        The selected columns' names.
    shape : tuple of int
        ``(n_rows, n_columns)``, from the file's metadata.

    Nulls become NaN, which a fit rejects with the estimator's message.
    """

    def __init__(self, path: str | os.PathLike, columns: Sequence[str | int] | None = None,
                 block_rows: int | None = None):
        from .blocks import BLOCK_BYTES

        path = _existing_file(path)
        pa, pq = _import_pyarrow(path)
        self._pa, self._pq = pa, pq
        try:
            metadata = pq.read_metadata(path)
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"{path}: cannot read it as a Parquet file: {exc}") from exc
        if metadata.num_rows == 0:
            raise ValueError(f"{path}: no data rows")
        all_names = list(schema.names)
        selected = _select_columns(path, all_names, columns, named=True)
        non_numeric = [all_names[j] for j in selected
                       if not (pa.types.is_integer(schema.field(j).type)
                               or pa.types.is_floating(schema.field(j).type)
                               or pa.types.is_boolean(schema.field(j).type))]
        if non_numeric:
            raise ValueError(
                f"{path}: non-numeric columns: {_quoted(non_numeric)} "
                "(select numeric columns with columns= or --columns)"
            )
        self.path = path
        self.names = [all_names[j] for j in selected]
        self._indices = selected
        self.shape = (int(metadata.num_rows), len(selected))
        self.block_rows = block_rows or max(1024, BLOCK_BYTES // (8 * len(selected)))

    def __call__(self) -> Iterator[np.ndarray]:
        pa = self._pa
        try:
            # Buffered reads: a column chunk is read in 1 MiB pieces rather than
            # whole (about half the peak memory of decoding a row group).
            handle = self._pq.ParquetFile(self.path, buffer_size=1 << 20, pre_buffer=False)
            names = [handle.schema_arrow.names[j] for j in self._indices]
            # One row group at a time: what is decoded at once is a row group's
            # selected columns, and a block never spans two groups.
            for group in range(handle.num_row_groups):
                for batch in handle.iter_batches(batch_size=self.block_rows,
                                                 row_groups=[group], columns=names):
                    yield self._block(batch)
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"{self.path}: cannot read it as a Parquet file: {exc}") from exc

    def _block(self, batch) -> np.ndarray:
        pa = self._pa
        block = np.empty((batch.num_rows, len(self.names)), dtype=np.float64)
        for out, column in enumerate(batch.columns):
            column = column.cast(pa.float64())
            block[:, out] = column.to_numpy(zero_copy_only=False)
            # Nulls come back as NaN from a float column, but say so rather than rely on it.
            if column.null_count:
                block[np.asarray(column.is_null()), out] = np.nan
        return block

    def read(self) -> np.ndarray:
        """All rows in one array, filled block by block (one copy of the data)."""
        X = np.empty(self.shape, dtype=np.float64)
        start = 0
        for block in self():
            X[start:start + block.shape[0]] = block
            start += block.shape[0]
        if start != self.shape[0]:
            raise ValueError(f"{self.path}: the metadata promise {self.shape[0]} rows, the "
                             f"row groups hold {start}")
        return X


def _read_parquet(path: Path, columns: Sequence[str | int] | None) -> Table:
    blocks = ParquetBlocks(path, columns)
    return Table(blocks.read(), blocks.names, True)


def _existing_file(path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a data file")
    if not path.is_file():
        if path.exists():
            raise ValueError(f"{path}: not a regular file")
        raise ValueError(f"{path}: no such data file")
    return path


def _select_columns(
    path: Path, names: list[str], columns: Sequence[str | int] | None, named: bool
) -> list[int]:
    """Resolve ``columns`` (names or 0-based indices) to indices into ``names``."""
    if columns is None:
        return list(range(len(names)))
    if isinstance(columns, (str, int, np.integer)):
        columns = [columns]
    if len(columns) == 0:
        raise ValueError(f"{path}: no columns selected")

    selected, unknown = [], []
    for key in columns:
        if isinstance(key, str) and key in names:
            matches = [j for j, name in enumerate(names) if name == key]
            if len(matches) > 1:
                raise ValueError(f"{path}: several columns are named {key!r}")
            selected.append(matches[0])
        elif (
            # bool is a subclass of int, but True is no column index.
            (isinstance(key, (int, np.integer)) and not isinstance(key, bool))
            or (isinstance(key, str) and key.isascii() and key.isdigit())
        ):
            index = int(key)
            if not 0 <= index < len(names):
                raise ValueError(
                    f"{path}: column index {index} is out of range for {len(names)} columns"
                )
            selected.append(index)
        else:
            unknown.append(key)
    if unknown:
        raise MissingColumnsError(path, unknown, names, named)
    repeated = sorted({names[j] for j in selected if selected.count(j) > 1})
    if repeated:
        raise ValueError(
            f"{path}: columns selected more than once: {_quoted(repeated)}"
        )
    return selected


def _quoted(items) -> str:
    return ", ".join(repr(str(item)) for item in items)
