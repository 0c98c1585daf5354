"""The ``fastem`` command line: subcommands, outputs, progress and one-line errors.

Almost everything runs ``fastem.cli.main`` in-process on tiny files; a few
subprocess runs of ``python -m fastem`` prove that the entry point works.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import fastem.cli
from fastem import __version__
from fastem.cli import main
from fastem.io import load_model, save_model
from fastem.selection import select_model
from fastem.tables import load_demo_data

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
                                    "{dir}/no/such/labels.csv"], "No such file or directory"),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_bad_input_exits_2_with_one_error_line(case, files, capsys):
    template, fragment = ERRORS[case]
    args = [arg.format(**files) for arg in template]
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("args", [
    [], ["fit"], ["fit", "data.csv", "--criterion", "xyz"], ["frobnicate"],
    ["fit", "data.csv", "--n-init", "0"], ["predict", "model.npz"],
], ids=["no command", "no data", "bad criterion", "unknown command", "n-init 0",
        "no data to predict"])
def test_usage_errors_exit_2_with_usage_and_no_traceback(args, capsys):
    code, out, err = run(capsys, *args)
    assert code == 2
    assert err.startswith("usage: fastem"), err
    assert "error:" in err and "Traceback" not in err
    assert out == ""


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
