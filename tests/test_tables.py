"""Tests for fastem.tables: the data-table readers."""

import sys
from pathlib import Path

import numpy as np
import pytest

import fastem.tables
from fastem.tables import MissingColumnsError, load_demo_data, load_table, read_table


def test_never_loads_with_pickle(monkeypatch, tmp_path):
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle"))
        return real_load(*args, **kwargs)

    np.save(tmp_path / "a.npy", np.ones((3, 2)))
    np.savez(tmp_path / "a.npz", X=np.ones((3, 2)))
    monkeypatch.setattr(np, "load", spy)
    read_table(tmp_path / "a.npy")
    read_table(tmp_path / "a.npz")
    assert calls == [False, False]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_with_header(tmp_path):
    path = write(tmp_path, "d.csv", "len,width\n1.5,2\n-3,4e1\n")
    X, names = read_table(path)
    assert names == ["len", "width"]
    assert X.dtype == np.float64
    np.testing.assert_array_equal(X, [[1.5, 2.0], [-3.0, 40.0]])


def test_csv_without_header(tmp_path):
    path = write(tmp_path, "d.csv", "1,2,3\n4,5,6\n")
    X, names = read_table(path)
    assert names == ["x0", "x1", "x2"]
    np.testing.assert_array_equal(X, [[1, 2, 3], [4, 5, 6]])


def test_csv_missing_values_are_nan(tmp_path):
    path = write(tmp_path, "d.csv", "a,b,c\n1,,3\nNA,2,nan\n")
    X, _ = read_table(path)
    np.testing.assert_array_equal(
        np.isnan(X), [[False, True, False], [True, False, True]]
    )
    assert X[0, 2] == 3 and X[1, 1] == 2


@pytest.mark.parametrize("suffix", [".tsv", ".tab"])
def test_tab_separated(tmp_path, suffix):
    path = write(tmp_path, "d" + suffix, "a b\tc\n1\t2\n3\t4\n")
    X, names = read_table(path)
    assert names == ["a b", "c"]
    np.testing.assert_array_equal(X, [[1, 2], [3, 4]])


def test_txt_whitespace_separated(tmp_path):
    path = write(tmp_path, "d.txt", "a  b\n1 \t 2\n\n3 4\n")
    X, names = read_table(path)
    assert names == ["a", "b"]
    np.testing.assert_array_equal(X, [[1, 2], [3, 4]])


def test_txt_comma_separated(tmp_path):
    path = write(tmp_path, "d.txt", "\n1,2\n3,4\n")
    X, names = read_table(path)
    assert names == ["x0", "x1"]
    np.testing.assert_array_equal(X, [[1, 2], [3, 4]])


@pytest.mark.parametrize("shape", [(5,), (5, 3)])
def test_npy(tmp_path, shape):
    data = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    np.save(tmp_path / "d.npy", data)
    X, names = read_table(tmp_path / "d.npy")
    expected = data.reshape(shape[0], -1)
    assert X.dtype == np.float64
    np.testing.assert_array_equal(X, expected)
    assert names == [f"x{j}" for j in range(expected.shape[1])]


def test_npz_single_array(tmp_path):
    data = np.random.default_rng(1).standard_normal((4, 2))
    np.savez(tmp_path / "d.npz", anything=data)
    X, _ = read_table(tmp_path / "d.npz")
    np.testing.assert_array_equal(X, data)


def test_npz_picks_array_named_X(tmp_path):
    data = np.random.default_rng(1).standard_normal((4, 2))
    np.savez(tmp_path / "d.npz", y=np.zeros(4), X=data)
    X, _ = read_table(tmp_path / "d.npz")
    np.testing.assert_array_equal(X, data)


def test_npz_ambiguous_lists_names(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.zeros(3), b=np.ones(3))
    with pytest.raises(ValueError, match="'a', 'b'"):
        read_table(tmp_path / "d.npz")


def test_npy_with_objects_is_refused(tmp_path):
    np.save(tmp_path / "d.npy", np.array([{}, {}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="d.npy"):
        read_table(tmp_path / "d.npy")


def test_columns_by_name_index_and_digit_string(tmp_path):
    path = write(tmp_path, "d.csv", "a,b,c\n1,2,3\n4,5,6\n")
    X, names = read_table(path, columns=["c", 0, "1"])
    assert names == ["c", "a", "b"]
    np.testing.assert_array_equal(X, [[3, 1, 2], [6, 4, 5]])


def test_digit_string_is_a_name_when_a_column_has_it(tmp_path):
    path = write(tmp_path, "d.csv", "a,0\n1,2\n3,4\n")
    X, names = read_table(path, columns=["0"])
    assert names == ["0"]
    np.testing.assert_array_equal(X, [[2], [4]])


def test_columns_on_numpy_file(tmp_path):
    np.save(tmp_path / "d.npy", np.arange(6.0).reshape(2, 3))
    X, names = read_table(tmp_path / "d.npy", columns=[2, "x0"])
    assert names == ["x2", "x0"]
    np.testing.assert_array_equal(X, [[2, 0], [5, 3]])


def test_unknown_columns_are_named_with_available_ones(tmp_path):
    path = write(tmp_path, "d.csv", "a,b\n1,2\n")
    with pytest.raises(
        ValueError, match="unknown columns: 'zz', 'yy'; available: 'a', 'b'"
    ):
        read_table(path, columns=["a", "zz", "yy"])


def test_column_index_out_of_range(tmp_path):
    path = write(tmp_path, "d.csv", "a,b\n1,2\n")
    with pytest.raises(ValueError, match="index 2 is out of range for 2 columns"):
        read_table(path, columns=[2])


def test_non_numeric_columns_are_all_named(tmp_path):
    text = "sp,sex,index,FL\nB,M,1,8.1\nO,F,2,8.8\n"
    path = write(tmp_path, "crabs.csv", text)
    with pytest.raises(ValueError, match="non-numeric columns: 'sp', 'sex' ") as info:
        read_table(path)
    assert "'FL'" not in str(info.value)
    X, names = read_table(path, columns=["index", "FL"])
    assert names == ["index", "FL"]
    np.testing.assert_array_equal(X, [[1, 8.1], [2, 8.8]])


def test_ragged_row_reports_line_number(tmp_path):
    # The blank line 3 still counts, so the short row is on line 4.
    path = write(tmp_path, "d.csv", "a,b\n1,2\n\n3\n5,6\n")
    with pytest.raises(ValueError, match="line 4 has 1 fields, expected 2"):
        read_table(path)


def test_ragged_row_in_whitespace_text(tmp_path):
    path = write(tmp_path, "d.txt", "1 2\n3 4 5\n")
    with pytest.raises(ValueError, match="line 2 has 3 fields"):
        read_table(path)


def test_empty_file(tmp_path):
    path = write(tmp_path, "d.csv", "")
    with pytest.raises(ValueError, match="empty"):
        read_table(path)


def test_header_only(tmp_path):
    path = write(tmp_path, "d.csv", "a,b\n")
    with pytest.raises(ValueError, match="no data rows"):
        read_table(path)


def test_missing_data_file_names_the_path(tmp_path):
    path = tmp_path / "absent.csv"
    with pytest.raises(ValueError, match="no such data file") as info:
        read_table(path)
    assert str(path) in str(info.value)


def test_unsupported_extension(tmp_path):
    path = write(tmp_path, "d.xlsx", "")
    with pytest.raises(ValueError, match="unsupported file type '.xlsx'"):
        read_table(path)


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    path = write(tmp_path, "d.parquet", "")
    # A None entry in sys.modules makes the import fail as if it were absent.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match="pip install pyarrow"):
        read_table(path)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "a": pa.array([1, None, 3], type=pa.int64()),
            "b": pa.array([0.5, 1.5, 2.5]),
            "sp": pa.array(["B", "O", "B"]),
        }
    )
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    X, names = read_table(path, columns=["b", "a"])
    assert names == ["b", "a"]
    np.testing.assert_array_equal(X, [[0.5, 1.0], [1.5, np.nan], [2.5, 3.0]])
    with pytest.raises(ValueError, match="non-numeric columns: 'sp'"):
        read_table(path)


def test_demo_data_matches_the_shipped_csv():
    X, names = load_demo_data()
    assert X.shape == (272, 2)
    assert X.dtype == np.float64
    assert names == ["eruptions", "waiting"]
    # An independent parse of the same file as the oracle.
    csv_path = Path(fastem.tables.__file__).parent / "data" / "faithful.csv"
    np.testing.assert_array_equal(X, np.loadtxt(csv_path, delimiter=",", skiprows=1))


# ---------------------------------------------------------------------------
# Where names come from; folders; encodings; csv's own errors
# ---------------------------------------------------------------------------


def test_load_table_says_whether_the_file_names_its_columns(tmp_path):
    named = load_table(write(tmp_path, "a.csv", "b,a\n1,2\n"), columns=["a"])
    assert named.names == ["a"] and named.named
    np.testing.assert_array_equal(named.X, [[2.0]])
    assert not load_table(write(tmp_path, "b.csv", "1,2\n3,4\n")).named
    assert not load_table(write(tmp_path, "c.txt", "1 2\n3 4\n")).named
    np.save(tmp_path / "d.npy", np.ones((2, 2)))
    assert not load_table(tmp_path / "d.npy").named


def test_unknown_columns_raise_a_value_error_that_lists_them(tmp_path):
    path = write(tmp_path, "d.csv", "a,b\n1,2\n")
    with pytest.raises(MissingColumnsError) as info:
        read_table(path, columns=["b", "z"])
    assert isinstance(info.value, ValueError)
    assert (info.value.missing, info.value.available, info.value.named) == (["z"], ["a", "b"],
                                                                            True)
    with pytest.raises(MissingColumnsError) as info:
        read_table(write(tmp_path, "e.csv", "1,2\n"), columns=["a"])
    assert info.value.named is False


def test_a_folder_is_named_as_a_folder(tmp_path):
    folder = tmp_path / "data.csv"
    folder.mkdir()
    with pytest.raises(ValueError, match="data.csv: is a folder, not a data file"):
        read_table(folder)


def test_utf8_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbfa,b\n1,2\n")
    X, names = read_table(path)
    assert names == ["a", "b"]
    np.testing.assert_array_equal(X, [[1, 2]])


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_is_named_with_the_file(tmp_path, encoding):
    path = tmp_path / "d.csv"
    # utf-16 writes a byte-order mark; the explicit-endian codecs do not, so add one.
    text = "a,b\n1,2\n"
    path.write_bytes(text.encode(encoding) if encoding == "utf-16"
                     else ("\ufeff" + text).encode(encoding))
    with pytest.raises(ValueError) as info:
        read_table(path)
    assert str(info.value) == f"{path}: the file is UTF-16 text, not UTF-8; save it as UTF-8"


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".txt"])
def test_latin1_is_named_with_the_file_and_the_offset_of_the_bad_byte(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    sep = "\t" if suffix == ".tsv" else ","
    data = f"a{sep}b\n1{sep}2\nna\u00efve{sep}3\n".encode("latin-1")
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        read_table(path)
    offset = data.index(b"\xef")
    assert str(info.value) == (f"{path}: not UTF-8 text (byte 0xef at offset {offset} is "
                               "invalid); save it as UTF-8")


def test_the_offset_is_exact_past_a_character_split_between_reads(tmp_path):
    # A two-byte character straddling the 1 MiB read boundary, then a bad byte.
    head = b"ab\n" + b"1\n" * ((2**20 - 4) // 2)
    assert len(head) == 2**20 - 1
    data = head + "\u00e9".encode() + b"\n" * 10 + b"\xff\n"
    path = tmp_path / "d.csv"
    path.write_bytes(data)
    offset = data.index(b"\xff")
    with pytest.raises(ValueError, match=rf"byte 0xff at offset {offset} "):
        read_table(path)


def test_a_truncated_character_at_the_end_is_reported(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"a\n1\n\xc3")
    with pytest.raises(ValueError, match=r"d.csv: not UTF-8 text \(byte 0xc3 at offset 4 "):
        read_table(path)


def test_csv_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n3," + "9" * 200_000 + "\n")
    with pytest.raises(ValueError, match=r"d.csv: line 3: field larger than field limit"):
        read_table(path)


def test_parquet_blocks_follow_the_row_groups_and_read_the_same_values(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from fastem.tables import ParquetBlocks

    rng = np.random.default_rng(0)
    n = 1_000
    ints = rng.integers(-5, 5, n)
    table = pa.table({
        "f": pa.array(rng.normal(size=n)),
        "i": pa.array(ints, mask=ints == 0, type=pa.int32()),
        "flag": pa.array(ints > 0),
        "name": pa.array(["r"] * n),
    })
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=300)
    blocks = ParquetBlocks(path, columns=["i", 0, "flag"], block_rows=200)
    assert blocks.names == ["i", "f", "flag"] and blocks.shape == (n, 3)
    sizes = [b.shape[0] for b in blocks()]
    # Never more than block_rows, and never across a row group's end (300 = 200 + 100).
    assert sizes[:2] == [200, 100] and sum(sizes) == n
    expected = np.column_stack([np.where(ints == 0, np.nan, ints), table["f"].to_numpy(),
                                ints > 0])
    np.testing.assert_array_equal(np.concatenate(list(blocks())), expected)
    np.testing.assert_array_equal(blocks.read(), expected)
    np.testing.assert_array_equal(read_table(path, columns=["i", "f", "flag"])[0], expected)
    with pytest.raises(ValueError, match="non-numeric columns: 'name'"):
        ParquetBlocks(path)
    with pytest.raises(ValueError, match="unknown columns: 'z'"):
        ParquetBlocks(path, columns=["z"])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="cannot read it as a Parquet file"):
        ParquetBlocks(tmp_path / "bad.parquet")
