"""The model-selection comparison runs and reports what each tool reached."""

from __future__ import annotations

import shutil

import numpy as np

from fastem import bench_selection


def test_comparison_rows_and_table():
    rows = bench_selection.run(datasets=("faithful",), repeats=1, sklearn_n_init=(1,))
    tools = [row["tool"] for row in rows]
    assert tools[:2] == ["fastem", "scikit-learn"]
    assert ("mclust" in tools) == (shutil.which("Rscript") is not None)
    by_tool = {row["tool"]: row for row in rows}
    # fastem's default grid reaches a BIC at least as good as scikit-learn's n_init=1.
    assert by_tool["fastem"]["bic"] <= by_tool["scikit-learn"]["bic"] + 1e-9
    for row in rows:
        assert row["dataset"].startswith("faithful (272x2)")
        assert np.isfinite(row["bic"]) and row["seconds"] > 0
    text = bench_selection.format_rows(rows, tables=True)
    assert "fastem" in text and "(3, tied)" in text


def test_shipped_data_sets():
    X, names = bench_selection.load_dataset("crabs")
    assert X.shape == (200, 5) and names == ["FL", "RW", "CL", "CW", "BD"]
    X, names = bench_selection.load_dataset("faithful")
    assert X.shape == (272, 2)
