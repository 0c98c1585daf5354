"""The ``fastem`` command line: subcommands, outputs, progress and one-line errors.

Almost everything runs ``fastem.cli.main`` in-process on tiny files; a few
subprocess runs of ``python -m fastem`` prove that the entry point works.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

import fastem.cli
from fastem import __version__
from fastem.cli import main
from fastem.io import load_model, save_model
from fastem.selection import select_model
from fastem.tables import load_demo_data

# The tests' own calls of a named model on plain arrays.
pytestmark = pytest.mark.filterwarnings("ignore:X does not have valid feature names")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TABLE_ROW = re.compile(r"^\s*(\d+) (full|tied|diag|spherical)\s.*\s(\*?)(ok|failed.*)$")
REPO = Path(__file__).resolve().parents[1]


def blobs(n_per_blob=20, seed=0):
    """Three well separated 2-D clusters."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [6.0, 1.0], [1.0, 7.0]])
    return np.vstack([c + rng.normal(scale=0.7, size=(n_per_blob, 2)) for c in centres])


def write_csv(path, header, rows):
    lines = [header] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad input files, by name."""
    d = tmp_path_factory.mktemp("cli")
    X = blobs()
    sites = ["north", "south", "east"] * (len(X) // 3)
    paths = {
        "dir": d,
        "blobs": write_csv(d / "blobs.csv", "x,y", X.tolist()),
        "labelled": write_csv(d / "labelled.csv", "site,x,y",
                              [[s, *row] for s, row in zip(sites, X.tolist())]),
        "three_columns": write_csv(d / "three.csv", "x,y,z",
                                   np.column_stack([X, X[:, 0]]).tolist()),
        "ragged": d / "ragged.csv",
        "header_only": d / "header_only.csv",
        "empty": d / "empty.csv",
        "nan": d / "nan.csv",
        "tiny": write_csv(d / "tiny.csv", "x,y", X[:4].tolist()),
        "foreign_npz": d / "foreign.npz",
        "missing": d / "nope.csv",
    }
    paths["ragged"].write_text("x,y\n1,2\n3,4,5\n6,7\n")
    paths["header_only"].write_text("x,y\n")
    paths["empty"].write_text("")
    paths["nan"].write_text("x,y\n1,2\n3,\n5,6\n7,8\n")
    paths["utf16"] = d / "utf16.csv"
    paths["utf16"].write_text("x,y\n1,2\n3,4\n", encoding="utf-16")
    paths["latin1"] = d / "latin1.csv"
    paths["latin1"].write_bytes("x,y\n1,2\n3,\u00e9\n".encode("latin-1"))
    paths["bad_cell"] = write_csv(d / "bad_cell.csv", "x,y", [[1, 2], [3, "4.0.1"], [5, 6]])
    np.savez(paths["foreign_npz"], weights=np.ones(3))
    model = select_model(X, range(1, 4), random_state=0).best_model
    save_model(model, d / "model.npz")
    paths["model"] = d / "model.npz"
    paths["X"] = X
    return paths


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(stdout):
    """(K, covariance type, marked) of every table row in ``stdout``."""
    rows = []
    for line in stdout.splitlines():
        match = TABLE_ROW.match(line)
        if match:
            rows.append((int(match[1]), match[2], match[3] == "*"))
    return rows


def read_csv(text):
    lines = text.strip().splitlines()
    return lines[0].split(","), np.array([[float(v) for v in line.split(",")]
                                          for line in lines[1:]])


def assert_one_line_error(code, err, fragment):
    assert code == 2, f"exit status {code}, stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    assert lines[0].startswith("fastem: error: "), lines[0]
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def pretend_stderr_is_a_terminal(monkeypatch):
    """Make the stderr that capsys captures claim to be a terminal.

    Called in the test body: capsys installs its stream when the test starts,
    after the fixtures have been set up.
    """
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


# ---------------------------------------------------------------------------
# help, version, demo
# ---------------------------------------------------------------------------


def test_version_prints_the_package_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out == f"fastem {__version__}\n"


def test_help_lists_every_subcommand(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("demo", "fit", "predict", "score", "bench"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), f"{command} not in:\n{out}"


def test_demo_prints_36_rows_marks_the_bic_choice_and_writes_png_in_cwd(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "demo")
    assert code == 0, err
    assert err == ""
    rows = table_rows(out)
    assert len(rows) == 36, out
    assert {(k, c) for k, c, _ in rows} == {(k, c) for k in range(1, 10)
                                            for c in ("full", "tied", "diag", "spherical")}
    expected = select_model(load_demo_data()[0], range(1, 10), random_state=0).best_params
    assert [(k, c) for k, c, marked in rows if marked] == [expected]
    assert f"Chosen by BIC: K={expected[0]}, covariance '{expected[1]}'" in out
    for part in ("BIC", "weight", "mean", "covariance", "eruptions", "waiting"):
        assert part in out
    picture = tmp_path / "fastem-demo.png"
    assert picture.read_bytes().startswith(PNG_SIGNATURE)
    assert picture.stat().st_size > 10_000


def test_demo_without_matplotlib_notes_the_extra_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run(capsys, "demo", "--out-dir", tmp_path / "pictures")
    assert code == 0
    assert len(table_rows(out)) == 36
    assert len(err.strip().splitlines()) == 1 and "pip install fastem[plot]" in err, err
    assert not (tmp_path / "pictures" / "fastem-demo.png").exists()


# ---------------------------------------------------------------------------
# fit -> predict -> score
# ---------------------------------------------------------------------------


def test_fit_predict_score_round_trip_through_a_saved_model(files, tmp_path, capsys):
    model_path = tmp_path / "model.npz"
    code, out, err = run(capsys, "fit", files["blobs"], "-k", "1-3", "--out", model_path)
    assert code == 0, err
    assert len(table_rows(out)) == 12
    model = load_model(model_path)
    X = files["X"]

    code, out, err = run(capsys, "predict", model_path, files["blobs"])
    assert code == 0, err
    header, labels = read_csv(out)
    assert header == ["label"]
    np.testing.assert_array_equal(labels[:, 0], model.predict(X))

    labels_path = tmp_path / "labels.csv"
    code, out, _ = run(capsys, "predict", model_path, files["blobs"], "--out", labels_path)
    assert code == 0 and out == ""
    np.testing.assert_array_equal(read_csv(labels_path.read_text())[1][:, 0], model.predict(X))

    code, out, err = run(capsys, "score", model_path, files["blobs"])
    assert code == 0, err
    values = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines())
    loglik = model.score_samples(X)
    np.testing.assert_allclose(float(values["mean log-likelihood"]), loglik.mean(), rtol=1e-9)
    np.testing.assert_allclose(float(values["total log-likelihood"]), loglik.sum(), rtol=1e-9)
    np.testing.assert_allclose(float(values["BIC"]), model.bic(X), rtol=1e-9)
    np.testing.assert_allclose(float(values["AIC"]), model.aic(X), rtol=1e-9)
    assert int(values["rows"]) == len(X)


def test_fit_saves_the_chosen_cell_of_a_seeded_grid(files, tmp_path, capsys):
    model_path = tmp_path / "model.npz"
    code, out, _ = run(capsys, "fit", files["blobs"], "-k", "1-3", "--seed", "5",
                       "--out", model_path)
    assert code == 0
    expected = select_model(files["X"], range(1, 4), random_state=5)
    saved = load_model(model_path)
    assert (saved.n_components, saved.covariance_type) == expected.best_params
    np.testing.assert_array_equal(saved.means_, expected.best_model.means_)
    assert [(k, c) for k, c, marked in table_rows(out) if marked] == [expected.best_params]


def test_predict_proba_has_one_column_per_component_and_rows_summing_to_one(files, capsys):
    model = load_model(files["model"])
    code, out, err = run(capsys, "predict", files["model"], files["blobs"], "--proba")
    assert code == 0, err
    header, proba = read_csv(out)
    assert header == [f"p{k}" for k in range(model.n_components)]
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    # Written with repr, so the numbers read back exactly.
    np.testing.assert_array_equal(proba, model.predict_proba(files["X"]))


def test_fit_grid_options_choose_the_cells_and_the_criterion(files, capsys):
    code, out, _ = run(capsys, "fit", files["blobs"], "-k", "2,4", "--covariance", "full,diag",
                       "--criterion", "aic", "--n-init", "2")
    assert code == 0
    assert sorted((k, c) for k, c, _ in table_rows(out)) == [
        (2, "diag"), (2, "full"), (4, "diag"), (4, "full")]
    assert "Chosen by AIC" in out
    assert "n_init=2" in out

    code, out, _ = run(capsys, "fit", files["blobs"], "-k", "3", "--covariance", "all")
    assert code == 0
    assert [(k, c) for k, c, _ in table_rows(out)] == [
        (3, "full"), (3, "tied"), (3, "diag"), (3, "spherical")]


def test_fit_columns_pick_numeric_columns_by_name_or_index(files, capsys):
    by_name = run(capsys, "fit", files["labelled"], "-k", "1-2", "--columns", "x,y")
    by_index = run(capsys, "fit", files["labelled"], "-k", "1-2", "--columns", "1,2")
    plain = run(capsys, "fit", files["blobs"], "-k", "1-2")
    assert by_name[0] == by_index[0] == plain[0] == 0
    assert table_rows(by_name[1]) == table_rows(by_index[1]) == table_rows(plain[1])
    assert "(x, y)" in by_name[1]


def test_fit_plot_writes_a_png(files, tmp_path, capsys):
    picture = tmp_path / "fit.png"
    code, _, err = run(capsys, "fit", files["blobs"], "-k", "1-3", "--plot", picture)
    assert code == 0, err
    assert picture.read_bytes().startswith(PNG_SIGNATURE)


def test_fit_plot_without_matplotlib_fails_before_fitting(files, tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run(capsys, "fit", files["blobs"], "-k", "1-3", "--plot",
                         tmp_path / "fit.png")
    assert_one_line_error(code, err, "pip install fastem[plot]")
    assert out == ""


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

ERRORS = {
    "missing data file": (["fit", "{missing}"], "no such data file"),
    "ragged rows": (["fit", "{ragged}"], "line 3 has 3 fields"),
    "non-numeric column": (["fit", "{labelled}", "-k", "1-2"], "non-numeric columns: 'site'"),
    "header only": (["fit", "{header_only}"], "no data rows"),
    "empty file": (["fit", "{empty}"], "empty"),
    "missing value": (["fit", "{nan}", "-k", "1"], "first is data row 2"),
    "K larger than N": (["fit", "{tiny}", "-k", "1-6"], "has only 4 rows"),
    "bad -k zero": (["fit", "{blobs}", "-k", "0-3"], "bad -k value '0-3'"),
    "bad -k decreasing": (["fit", "{blobs}", "-k", "3-1"], "bad -k value"),
    "bad -k word": (["fit", "{blobs}", "-k", "three"], "bad -k value"),
    "bad -k open range": (["fit", "{blobs}", "-k", "2-"], "bad -k value"),
    "bad -k empty item": (["fit", "{blobs}", "-k", "1,,2"], "bad -k value"),
    "bad covariance": (["fit", "{blobs}", "--covariance", "full,banana"], "'banana'"),
    "unknown column": (["fit", "{blobs}", "--columns", "x,w"], "unknown columns: 'w'"),
    "out folder missing": (["fit", "{blobs}", "--out", "{dir}/no/such/m.npz"],
                           "does not exist"),
    "missing model file": (["predict", "{dir}/none.npz", "{blobs}"], "no such model file"),
    "csv as model": (["predict", "{blobs}", "{blobs}"], "not a fastem model file"),
    "foreign npz as model": (["score", "{foreign_npz}", "{blobs}"], "not a fastem model file"),
    "predict feature mismatch": (["predict", "{model}", "{three_columns}"],
                                 "has 3 columns but the model"),
    "score feature mismatch": (["score", "{model}", "{three_columns}"],
                               "has 3 columns but the model"),
    "proba feature mismatch": (["predict", "{model}", "{three_columns}", "--proba"],
                               "fitted on 2"),
    "predict out folder missing": (["predict", "{model}", "{blobs}", "--out",
                                    "{dir}/no/such/labels.csv"], "does not exist"),
    "data file is a folder": (["fit", "{dir}"], "is a folder, not a data file"),
    "model file is a folder": (["predict", "{dir}", "{blobs}"], "is a folder, not a model file"),
    "UTF-16 data": (["fit", "{utf16}"], "utf16.csv: the file is UTF-16 text, not UTF-8"),
    "Latin-1 data": (["fit", "{latin1}"], "latin1.csv: not UTF-8 text (byte 0xe9 at offset 10"),
    "non-numeric cell": (["fit", "{bad_cell}"], "non-numeric columns: 'y'"),
    "out is a folder": (["fit", "{blobs}", "--out", "{dir}"], "is a folder; give a file name"),
    "out is the current folder": (["fit", "{blobs}", "--out", "."], "--out .: is a folder"),
    "out under a file": (["fit", "{blobs}", "--out", "{blobs}/m.npz"], "is not a folder"),
    "plot is a folder": (["fit", "{blobs}", "--plot", "{dir}"], "no extension"),
    "plot without extension": (["fit", "{blobs}", "--plot", "{dir}/fit"], "no extension"),
    "plot of unknown type": (["fit", "{blobs}", "--plot", "{dir}/fit.xyz"],
                             "unknown picture type '.xyz'"),
    "out and plot the same": (["fit", "{blobs}", "--out", "{dir}/a.png", "--plot",
                               "{dir}/a.png"], "same file"),
    "predict out is a folder": (["predict", "{model}", "{blobs}", "--out", "{dir}"],
                                "is a folder"),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_bad_input_exits_2_with_one_error_line(case, files, capsys):
    template, fragment = ERRORS[case]
    args = [arg.format(**files) for arg in template]
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("args", [
    [], ["fit"], ["fit", "data.csv", "--criterion", "xyz"], ["frobnicate"],
    ["fit", "data.csv", "--n-init", "0"], ["fit", "data.csv", "--n-init", "-3"],
    ["fit", "data.csv", "--n-init", "2.5"], ["fit", "data.csv", "--seed", "-1"],
    ["fit", "data.csv", "--seed", str(2**32)], ["fit", "data.csv", "--seed", "x"],
    ["predict", "model.npz"],
], ids=["no command", "no data", "bad criterion", "unknown command", "n-init 0", "n-init -3",
        "n-init 2.5", "seed -1", "seed 2**32", "seed x", "no data to predict"])
def test_usage_errors_exit_2_with_usage_and_no_traceback(args, capsys):
    code, out, err = run(capsys, *args)
    assert code == 2
    assert err.startswith("usage: fastem"), err
    assert "error:" in err and "Traceback" not in err
    assert out == ""


# ---------------------------------------------------------------------------
# Column names: a saved model finds its columns by name
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def named_model(files, tmp_path_factory):
    """A model fitted by ``fastem fit`` on the x,y columns of blobs.csv."""
    path = tmp_path_factory.mktemp("named") / "model.npz"
    assert main(["fit", str(files["blobs"]), "-k", "3", "--covariance", "full",
                 "--out", str(path)]) == 0
    return path


def test_fit_on_a_header_saves_the_column_names_like_scikit_learn(named_model, capsys):
    capsys.readouterr()
    model = load_model(named_model)
    names = model.feature_names_in_
    assert isinstance(names, np.ndarray) and names.dtype == object, repr(names)
    assert names.tolist() == ["x", "y"] and all(type(n) is str for n in names)


def test_fit_keeps_the_names_and_order_of_the_chosen_columns(files, tmp_path, capsys):
    path = tmp_path / "model.npz"
    code, _, err = run(capsys, "fit", files["labelled"], "-k", "2", "--columns", "y,x",
                       "--out", path)
    assert code == 0, err
    assert load_model(path).feature_names_in_.tolist() == ["y", "x"]


def test_fit_on_headerless_data_saves_no_names_and_predicts_by_position(files, tmp_path,
                                                                         capsys):
    data = tmp_path / "plain.npy"
    np.save(data, files["X"])
    path = tmp_path / "model.npz"
    assert run(capsys, "fit", data, "-k", "3", "--out", path)[0] == 0
    model = load_model(path)
    assert not hasattr(model, "feature_names_in_")
    code, out, err = run(capsys, "predict", path, files["blobs"])
    assert code == 0 and err == "", err
    np.testing.assert_array_equal(read_csv(out)[1][:, 0], model.predict(files["X"]))


def test_predict_and_score_find_the_columns_by_name_in_any_order(files, named_model,
                                                                  tmp_path, capsys):
    X = files["X"]
    model = load_model(named_model)
    # Columns reordered, and an extra non-numeric one that must not be read.
    shuffled = write_csv(tmp_path / "shuffled.csv", "y,site,x",
                         [[y, "north", x] for x, y in X.tolist()])
    code, out, err = run(capsys, "predict", named_model, shuffled)
    assert code == 0 and err == "", err
    labels = read_csv(out)[1][:, 0]
    np.testing.assert_array_equal(labels, model.predict(X))
    assert len(np.unique(labels)) == 3

    code, out, err = run(capsys, "predict", named_model, shuffled, "--proba")
    assert code == 0 and err == "", err
    np.testing.assert_array_equal(read_csv(out)[1], model.predict_proba(X))

    code, out, err = run(capsys, "score", named_model, shuffled)
    assert code == 0 and err == "", err
    values = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines())
    np.testing.assert_allclose(float(values["total log-likelihood"]),
                               model.score_samples(X).sum(), rtol=1e-9)


@pytest.mark.parametrize("command", ["predict", "score"])
def test_a_file_without_a_model_column_is_refused_naming_it(command, files, named_model,
                                                            tmp_path, capsys):
    other = write_csv(tmp_path / "other.csv", "x,z,w", np.column_stack(
        [files["X"], files["X"][:, 0]]).tolist())
    code, out, err = run(capsys, command, named_model, other)
    assert_one_line_error(code, err, "other.csv lacks the column 'y'")
    assert "fitted on columns 'x', 'y'" in err and "'x', 'z', 'w'" in err, err
    assert out == ""


def test_a_headerless_file_is_refused_for_a_named_model_unless_columns_are_given(
        files, named_model, tmp_path, capsys):
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join(f"{x},{y}" for x, y in files["X"].tolist()) + "\n")
    code, _, err = run(capsys, "predict", named_model, plain)
    assert_one_line_error(code, err, "plain.csv does not name its columns")
    assert "'x', 'y'" in err

    code, out, err = run(capsys, "predict", named_model, plain, "--columns", "0,1")
    assert code == 0, err
    np.testing.assert_array_equal(read_csv(out)[1][:, 0],
                                  load_model(named_model).predict(files["X"]))


def test_columns_override_the_names_by_position_but_may_not_swap_them(files, named_model,
                                                                      tmp_path, capsys):
    X = files["X"]
    renamed = write_csv(tmp_path / "renamed.csv", "b,a", X.tolist())
    code, out, err = run(capsys, "predict", named_model, renamed, "--columns", "b,a")
    assert code == 0, err
    np.testing.assert_array_equal(read_csv(out)[1][:, 0], load_model(named_model).predict(X))

    code, _, err = run(capsys, "predict", named_model, files["blobs"], "--columns", "y,x")
    assert_one_line_error(code, err, "gives the column 'y' of")


def test_fit_with_out_refuses_repeated_column_names(files, tmp_path, capsys):
    twice = write_csv(tmp_path / "twice.csv", "x,x", files["X"].tolist())
    code, _, err = run(capsys, "fit", twice, "--out", tmp_path / "m.npz")
    assert_one_line_error(code, err, "several columns are named 'x'")
    assert not (tmp_path / "m.npz").exists()


# ---------------------------------------------------------------------------
# Output paths are checked before fitting
# ---------------------------------------------------------------------------


def forbid_fitting(monkeypatch):
    def select_model(*args, **kwargs):
        raise AssertionError("fitted before the arguments were checked")

    monkeypatch.setattr(fastem.cli, "select_model", select_model)


@pytest.mark.parametrize("option", ["--out", "--plot"])
@pytest.mark.parametrize("where", ["folder", "missing folder", "unwritable folder"])
def test_fit_refuses_an_output_it_cannot_write_before_fitting(option, where, files, tmp_path,
                                                              monkeypatch, capsys):
    forbid_fitting(monkeypatch)
    name = "out.npz" if option == "--out" else "out.png"
    if where == "folder":
        target, fragment = tmp_path, "is a folder" if option == "--out" else "no extension"
    elif where == "missing folder":
        target, fragment = tmp_path / "no" / name, "the folder"
    else:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o500)
        if os.access(folder, os.W_OK):  # root writes anywhere
            pytest.skip("this user can write in a read-only folder")
        target, fragment = folder / name, "cannot write in the folder"
    code, out, err = run(capsys, "fit", files["blobs"], option, target)
    assert_one_line_error(code, err, fragment)
    assert out == ""


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_fit_refuses_an_output_in_a_folder_nobody_can_write(files, monkeypatch, capsys):
    # /proc takes no new files, even from root.
    forbid_fitting(monkeypatch)
    code, out, err = run(capsys, "fit", files["blobs"], "--out", "/proc/model.npz")
    assert_one_line_error(code, err, "--out /proc/model.npz: cannot write in the folder /proc")
    assert out == ""


# ---------------------------------------------------------------------------
# Interrupted runs leave no partial file
# ---------------------------------------------------------------------------


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_during_the_fit_exits_130_with_one_line_and_no_file(files, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setattr(fastem.cli, "select_model", interrupt)
    code, _, err = run(capsys, "fit", files["blobs"], "--out", tmp_path / "m.npz",
                       "--plot", tmp_path / "fit.png")
    assert code == 130
    assert err == "fastem: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_writing_predictions_leaves_the_old_file_alone(files, tmp_path,
                                                                    monkeypatch, capsys):
    out = tmp_path / "labels.csv"
    out.write_text("old\n")

    def half_written(stream, header, rows):
        stream.write(header + "\n")
        stream.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(fastem.cli, "_write_csv", half_written)
    code, _, err = run(capsys, "predict", files["model"], files["blobs"], "--out", out)
    assert code == 130 and err == "fastem: interrupted\n"
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["labels.csv"]


def test_ctrl_c_while_drawing_leaves_no_picture(files, tmp_path, monkeypatch, capsys):
    import fastem.plotting

    def save_figure(figure, path):
        Path(path).write_bytes(PNG_SIGNATURE)
        raise KeyboardInterrupt

    monkeypatch.setattr(fastem.plotting, "save_figure", save_figure)
    code, _, err = run(capsys, "fit", files["blobs"], "-k", "1-2", "--out", tmp_path / "m.npz",
                       "--plot", tmp_path / "fit.png")
    assert code == 130 and err == "fastem: interrupted\n"
    # The model, written before the picture, is complete; the picture is not there.
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]
    load_model(tmp_path / "m.npz")


def test_predictions_written_to_a_file_replace_it_whole(files, tmp_path, capsys):
    out = tmp_path / "labels.csv"
    out.write_text("old\n" * 1000)
    assert run(capsys, "predict", files["model"], files["blobs"], "--out", out)[0] == 0
    header, labels = read_csv(out.read_text())
    assert header == ["label"] and len(labels) == len(files["X"])
    assert [p.name for p in tmp_path.iterdir()] == ["labels.csv"]


# ---------------------------------------------------------------------------
# Standard output closed early; warnings
# ---------------------------------------------------------------------------


class ClosedPipe:
    """A stdout whose reader has gone away."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass


def test_a_closed_stdout_still_saves_the_model_and_exits_1_quietly(files, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    path = tmp_path / "m.npz"
    assert main(["fit", str(files["blobs"]), "-k", "1-3", "--out", str(path)]) == 1
    assert capsys.readouterr().err == ""
    expected = select_model(files["X"], range(1, 4), random_state=0).best_params
    saved = load_model(path)
    assert (saved.n_components, saved.covariance_type) == expected


def test_warnings_are_one_line_each(files, monkeypatch, capsys):
    real = fastem.cli.select_model

    def warning_select_model(*args, **kwargs):
        warnings.warn("something odd\n  on two lines", RuntimeWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastem.cli, "select_model", warning_select_model)
    code, _, err = run(capsys, "fit", files["blobs"], "-k", "1-2")
    assert code == 0
    assert err == "fastem: warning: something odd on two lines\n"


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------


def test_progress_goes_to_stderr_on_one_rewritten_line(files, monkeypatch, capsys):
    pretend_stderr_is_a_terminal(monkeypatch)
    code, out, err = run(capsys, "fit", files["blobs"], "-k", "1-2")
    assert code == 0
    assert "\n" not in err, f"progress must stay on one line: {err!r}"
    statuses = re.findall(r"\rfastem: cell (\d+)/8  K=(\d)  (\w+)\s+ok", err)
    assert [int(cell) for cell, _, _ in statuses] == list(range(1, 9)), repr(err)
    assert err.endswith("\r") and err.rsplit("\r", 2)[1].strip() == "", \
        f"the progress line must be wiped at the end: {err[-80:]!r}"
    assert "\r" not in out and "cell 1/8" not in out


def test_quiet_prints_no_progress_even_on_a_terminal(files, monkeypatch, capsys):
    pretend_stderr_is_a_terminal(monkeypatch)
    assert sys.stderr.isatty()
    code, _, err = run(capsys, "fit", files["blobs"], "-k", "1-2", "--quiet")
    assert code == 0
    assert err == ""


def test_no_progress_when_stderr_is_not_a_terminal(files, capsys):
    code, _, err = run(capsys, "fit", files["blobs"], "-k", "1-2")
    assert code == 0
    assert err == ""


# ---------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------


def test_bench_forwards_its_arguments_untouched(monkeypatch, capsys):
    received = []
    fake = types.ModuleType("fastem.bench")
    fake.main = lambda argv: received.append(argv) or 3
    monkeypatch.setitem(sys.modules, "fastem.bench", fake)
    code, _, _ = run(capsys, "bench", "--profile", "fast", "-k", "3", "--help")
    assert code == 3
    assert received == [["--profile", "fast", "-k", "3", "--help"]]


def test_bench_without_its_module_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastem.bench", None)
    code, _, err = run(capsys, "bench", "--profile", "fast")
    assert_one_line_error(code, err, "fastem.bench")


def test_bench_missing_a_dependency_exits_2_naming_it(monkeypatch, capsys):
    def import_module(name):
        raise ModuleNotFoundError("No module named 'asv'", name="asv")

    monkeypatch.setattr(fastem.cli, "importlib", types.SimpleNamespace(
        import_module=import_module))
    code, _, err = run(capsys, "bench")
    assert_one_line_error(code, err, "'asv'")


# ---------------------------------------------------------------------------
# The real entry point
# ---------------------------------------------------------------------------


def run_module(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "fastem", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300, check=False)


def test_python_m_fastem_version(tmp_path):
    proc = run_module("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fastem {__version__}"


def test_python_m_fastem_demo_writes_the_picture(tmp_path):
    proc = run_module("demo", "--out-dir", "pictures", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(table_rows(proc.stdout)) == 36
    assert proc.stderr == ""
    assert (tmp_path / "pictures" / "fastem-demo.png").read_bytes().startswith(PNG_SIGNATURE)


def test_python_m_fastem_error_is_one_line_and_status_2(tmp_path):
    proc = run_module("fit", "missing.csv", cwd=tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, "missing.csv: no such data file")


def start_module(*args, cwd, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "fastem", *map(str, args)], cwd=cwd,
                            env=env, **kwargs)


def test_sigint_during_a_fit_exits_130_quietly_without_the_model(tmp_path):
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(c, 1.0, size=(10_000, 3)) for c in (0.0, 4.0, 8.0)])
    data = write_csv(tmp_path / "big.csv", "a,b,c", X.round(4).tolist())
    proc = start_module("fit", data, "-k", "1-9", "--out", "m.npz", "--plot", "fit.png",
                        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The report is flushed line by line: once this line is out, the grid is fitting.
        for line in proc.stdout:
            if line.startswith("Choosing K"):
                break
        time.sleep(0.5)
        assert proc.poll() is None, "the fit ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err == "fastem: interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.csv"]


def test_fit_through_a_pipe_closed_at_once_still_saves_the_model(files, tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader at all: the first write fails
    try:
        proc = start_module("fit", files["blobs"], "-k", "1-3", "--out", "m.npz",
                            cwd=tmp_path, stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert err == ""
    assert load_model(tmp_path / "m.npz").feature_names_in_.tolist() == ["x", "y"]


def test_fit_piped_to_head_still_saves_the_model(files, tmp_path):
    command = (f"{sys.executable} -m fastem fit {files['blobs']} -k 1-4 --out m.npz "
               "| head -1")
    proc = subprocess.run(["sh", "-c", command], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300, check=False)
    assert proc.stdout == f"{files['blobs']}: 60 rows x 2 columns (x, y)\n", proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    load_model(tmp_path / "m.npz")


def test_predict_into_a_pipe_closed_early_exits_1_quietly(files, tmp_path):
    proc = start_module("predict", files["model"], files["blobs"], cwd=tmp_path,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "label\n"
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) in (0, 1), err  # 0 if it wrote everything before the close
    assert err == ""


# A command stuck where it cannot check for Ctrl-C (like a long kernel call),
# holding a temporary output file.
STUCK_COMMAND = """
import sys, time
import fastem.cli as cli

cli._STOP_GRACE_S = 0.2

def stuck(args, report):
    with cli._replaced_atomically(args.out) as tmp:
        tmp.write_bytes(b"partial")
        print("writing", flush=True)
        time.sleep(60)

cli._fit = stuck
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigint_leaves_a_command_that_does_not_stop_and_removes_its_files(files, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", STUCK_COMMAND, "fit", str(files["blobs"]),
                             "--out", "m.npz"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout.readline() == "writing\n"
        assert len(list(tmp_path.iterdir())) == 1  # the temporary file
        start = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err == "fastem: interrupted\n"
    assert time.perf_counter() - start < 10
    assert list(tmp_path.iterdir()) == []


def test_fit_streams_a_large_parquet_file_and_chooses_as_from_csv(files, tmp_path, monkeypatch,
                                                                  capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    X = files["X"]
    path = tmp_path / "blobs.parquet"
    pq.write_table(pa.table({"x": X[:, 0], "y": X[:, 1]}), path, row_group_size=25)
    _, from_csv, _ = run(capsys, "fit", files["blobs"], "-k", "1-3", "--covariance", "full,diag")
    monkeypatch.setattr(fastem.cli, "_STREAM_BYTES", 0)  # every Parquet file is "large"
    streamed = []
    real_select = fastem.cli.select_model

    def spy(X, *args, **kwargs):
        streamed.append(isinstance(X, fastem.tables.ParquetBlocks))
        return real_select(X, *args, **kwargs)

    monkeypatch.setattr(fastem.cli, "select_model", spy)
    code, out, err = run(capsys, "fit", path, "-k", "1-3", "--covariance", "full,diag",
                         "--out", tmp_path / "m.npz", "--plot", tmp_path / "p.png")
    assert code == 0, err
    assert streamed == [True]
    assert table_rows(out) == table_rows(from_csv)
    assert load_model(tmp_path / "m.npz").feature_names_in_.tolist() == ["x", "y"]
    assert (tmp_path / "p.png").stat().st_size > 0
    pq.write_table(pa.table({"x": pa.array([1.0, 2.0, None, 4.0]), "y": [1.0] * 4}),
                   tmp_path / "null.parquet", row_group_size=2)
    code, _, err = run(capsys, "fit", tmp_path / "null.parquet", "-k", "1")
    assert_one_line_error(code, err, "1 of 4 rows have missing or non-finite values "
                                     "(the first is data row 3)")


def test_fit_with_missing_em_then_impute_predict_and_score(files, tmp_path, capsys):
    X = files["X"]
    rng = np.random.default_rng(0)
    holes = rng.random(X.shape) < 0.2
    holes[3] = True  # a row with nothing observed
    lines = ["x,y"] + [",".join("" if hole else repr(v) for v, hole in zip(row, mask))
                       for row, mask in zip(X.tolist(), holes)]
    data = tmp_path / "holes.csv"
    data.write_text("\n".join(lines) + "\n")
    code, _, err = run(capsys, "fit", data, "-k", "1-2")
    assert_one_line_error(code, err, "fit them with --missing em")
    code, out, err = run(capsys, "fit", data, "-k", "1-3", "--covariance", "full,diag",
                         "--missing", "em", "--out", tmp_path / "m.npz")
    assert code == 0, err
    assert "every entry missing" in err
    model = load_model(tmp_path / "m.npz")
    assert model.missing == "em" and model.feature_names_in_.tolist() == ["x", "y"]
    code, out, err = run(capsys, "impute", tmp_path / "m.npz", data)
    assert code == 0, err
    header, *rows = out.strip().split("\n")
    filled = np.array([[float(v) for v in row.split(",")] for row in rows])
    assert header == "x,y" and filled.shape == X.shape and np.all(np.isfinite(filled))
    np.testing.assert_array_equal(filled[~holes], X[~holes])
    with_nan = np.where(holes, np.nan, X)
    np.testing.assert_allclose(filled, model.impute(with_nan), rtol=1e-15)
    code, out, err = run(capsys, "impute", tmp_path / "m.npz", data, "--draws", "3",
                         "--out", tmp_path / "draws.csv")
    assert code == 0, err
    draws = (tmp_path / "draws.csv").read_text().strip().split("\n")
    assert draws[0] == "draw,x,y" and len(draws) == 1 + 3 * len(X)
    assert [row.split(",")[0] for row in draws[1::len(X)]] == ["0", "1", "2"]
    code, out, err = run(capsys, "score", tmp_path / "m.npz", data)
    assert code == 0, err
    assert f"{model.score(with_nan):.10g}" in out


# ---------------------------------------------------------------------------
# hmm fit | decode
# ---------------------------------------------------------------------------


def _regime_file(tmp_path, with_sequences=False):
    """Two sequences alternating calm and volatile stretches, as CSV."""
    rng = np.random.default_rng(3)
    rows = []
    for sequence in (1, 2):
        for scale in (1.0, 6.0, 1.0, 6.0, 1.0):
            for value in rng.normal(scale=scale, size=60):
                rows.append((sequence, float(value)))
    path = tmp_path / "regimes.csv"
    header = "sequence,ret" if with_sequences else "ret"
    path.write_text(header + "\n" + "\n".join(
        (f"{s},{v!r}" if with_sequences else f"{v!r}") for s, v in rows) + "\n")
    return path, np.array([v for _, v in rows])


def test_hmm_fit_chooses_states_by_bic_saves_and_decode_reproduces_them(tmp_path, capsys):
    from fastem import GaussianHMM

    data, values = _regime_file(tmp_path, with_sequences=True)
    model_path = tmp_path / "hmm.npz"
    code, out, err = run(capsys, "hmm", "fit", data, "-k", "1-3", "--sequence", "sequence",
                         "--n-init", "2", "--out", model_path)
    assert code == 0, err
    assert "2 sequences" in out
    chosen = int(re.search(r"Chosen by BIC: K=(\d+)", out)[1])
    assert chosen == 2
    model = load_model(model_path)
    assert isinstance(model, GaussianHMM) and model.n_components == 2
    code, out, err = run(capsys, "hmm", "decode", model_path, data, "--sequence", "sequence")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "state"
    states = np.array([int(v) for v in lines[1:]])
    expected = model.predict(values[:, None], [300, 300])
    np.testing.assert_array_equal(states, expected)
    volatile = np.argmax(model.covars_[:, 0, 0])
    # The volatile stretches are rows 60-119 and 180-239 of each sequence.
    marked = np.zeros(600, dtype=bool)
    for first in (60, 180, 360, 480):
        marked[first:first + 60] = True
    assert np.mean((states == volatile) == marked) > 0.9


def test_hmm_decode_refuses_a_mixture_model(files, capsys):
    code, _, err = run(capsys, "hmm", "decode", files["model"], files["blobs"])
    assert_one_line_error(code, err, "not a hidden Markov model")


def test_hmm_fit_without_sequences_draws_states_and_decode_by_map(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data, values = _regime_file(tmp_path)
    model_path, picture = tmp_path / "hmm.npz", tmp_path / "states.png"
    code, out, err = run(capsys, "hmm", "fit", data, "-k", "2", "--covariance", "spherical",
                         "--out", model_path, "--plot", picture)
    assert code == 0, err
    assert "1 sequence" in out and "Chosen by BIC: K=2" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_model(model_path)
    assert model.covariance_type == "spherical" and list(model.feature_names_in_) == ["ret"]
    out_csv = tmp_path / "states.csv"
    code, _, err = run(capsys, "hmm", "decode", model_path, data, "--algorithm", "map",
                       "--out", out_csv)
    assert code == 0, err
    states = np.loadtxt(out_csv, skiprows=1, dtype=int)
    np.testing.assert_array_equal(states, model.decode(values[:, None], algorithm="map")[1])


@pytest.mark.parametrize("extra, fragment", [
    (["-k", "700"], "asks for up to 700 states"),
    (["--sequence", "nope"], "no column 'nope'"),
    (["--sequence", "sequence", "--columns", "sequence,ret"], "also one of --columns"),
])
def test_hmm_fit_refuses_bad_requests_in_one_line(tmp_path, capsys, extra, fragment):
    data, _ = _regime_file(tmp_path, with_sequences=True)
    code, _, err = run(capsys, "hmm", "fit", data, *extra)
    assert_one_line_error(code, err, fragment)


def test_hmm_fit_defaults_to_a_few_restarts_not_the_selection_budget():
    from fastem.cli import build_parser

    args = build_parser().parse_args(["hmm", "fit", "data.csv"])
    assert args.n_init == 5
