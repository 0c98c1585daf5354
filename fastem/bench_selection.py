"""Model selection side by side: fastem, scikit-learn and (when installed) R's mclust.

For each small real data set the K = 1..9 x {full, tied, diag, spherical} grid
is fitted by

* fastem's :func:`~fastem.selection.select_model` with its defaults
  (short-run EM over ``DEFAULT_BUDGET`` candidates per cell, degenerate fits
  excluded);
* fastem's ``select_model(..., n_init=100, init_params="kmeans")``, every one
  of 100 k-means starts per cell run to convergence: the reference the
  defaults are measured against (one run);
* scikit-learn's ``GaussianMixture`` cell by cell with ``n_init`` = 1 and 20
  (its default k-means start), keeping the lowest ``bic``;
* mclust's ``mclustBIC`` (models VVV, EEE, VVI, VII = full, tied, diag,
  spherical, or V and E on one column; model-based hierarchical start, one
  per cell), through
  ``Rscript``, timed inside R so R's start-up is not counted.

Reported: the best cell, the BIC it reaches (scikit-learn's sign: lower is
better; mclust's values are negated), for fastem's defaults the gap to the
reference, and the seconds per grid (median of ``repeats`` runs after one
warm-up; the reference and scikit-learn ``n_init=20`` run once). All with
``random_state=0``. mclust is a benchmark peer only, never a dependency.

The data: Old Faithful, crabs (the five measurements) and galaxies (R's
``datasets`` and ``MASS``, shipped in ``fastem/data``); scikit-learn's iris as
it is (four lengths in cm) and wine and breast_cancer standardised (each
column to mean 0 and variance 1: their columns are in unrelated units, some
of them thousands of times larger than others).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import warnings
from importlib import resources
from pathlib import Path

import numpy as np

from .covariance import COVARIANCE_TYPES
from .selection import DEFAULT_BUDGET, select_model
from .tables import read_table

# name -> (where it is, columns, standardised)
DATASETS = {
    "faithful": ("fastem", None, False),
    "crabs": ("fastem", ["FL", "RW", "CL", "CW", "BD"], False),
    "galaxies": ("fastem", None, False),
    "iris": ("sklearn", None, False),
    "wine": ("sklearn", None, True),
    "breast_cancer": ("sklearn", None, True),
}
QUICK_DATASETS = ("faithful", "crabs")
# One-dimensional data have two models: V (full, diag and spherical alike) and E (tied).
MCLUST_MODELS = {"VVV": "full", "EEE": "tied", "VVI": "diag", "VII": "spherical",
                 "V": "full", "E": "tied"}
GRID = range(1, 10)
REFERENCE_STARTS = 100

_R_SCRIPT = """
suppressMessages(library(mclust))
X <- as.matrix(read.csv(commandArgs(TRUE)[1]))
models <- if (ncol(X) == 1) c("V", "E") else c("VVV", "EEE", "VVI", "VII")
invisible(mclustBIC(X, G = 1:9, modelNames = models, verbose = FALSE))
times <- numeric(0)
for (i in seq_len(as.integer(commandArgs(TRUE)[2]))) {
  times <- c(times, system.time(
    b <- mclustBIC(X, G = 1:9, modelNames = models, verbose = FALSE)
  )[["elapsed"]])
}
cat("SECONDS", median(times), "\\n")
for (m in colnames(b)) for (g in rownames(b)) cat("CELL", g, m, b[g, m], "\\n")
"""


def load_dataset(name):
    """``(X, names)`` of a data set of ``DATASETS`` (standardised where it says so)."""
    where, columns, standardised = DATASETS[name]
    if where == "fastem":
        source = resources.files("fastem") / "data" / f"{name}.csv"
        with resources.as_file(source) as path:
            X, names = read_table(path, columns=columns)
    else:
        from sklearn import datasets

        bunch = getattr(datasets, f"load_{name}")()
        X, names = np.asarray(bunch.data, dtype=np.float64), [str(n) for n in bunch.feature_names]
    if standardised:
        X = (X - X.mean(axis=0)) / X.std(axis=0)
    return X, names


def _median_seconds(run, repeats):
    """Median time of ``repeats`` runs after a warm-up (one cold run if repeats < 1)."""
    if repeats < 1:
        start = time.perf_counter()
        result = run()
        return time.perf_counter() - start, result
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def _fastem(X, repeats):
    seconds, result = _median_seconds(lambda: select_model(X, GRID, random_state=0), repeats)
    k, cov = result.best_params
    return dict(tool="fastem", settings=f"defaults (em-em, n_init={DEFAULT_BUDGET})",
                best=f"({k}, {cov})", bic=float(result.table["bic"][result.best_index]),
                seconds=seconds, table=result.format_table())


def _fastem_reference(X):
    seconds, result = _median_seconds(
        lambda: select_model(X, GRID, random_state=0, n_init=REFERENCE_STARTS,
                             init_params="kmeans"), 0)
    k, cov = result.best_params
    return dict(tool="fastem", settings=f"n_init={REFERENCE_STARTS} k-means",
                best=f"({k}, {cov})", bic=float(result.table["bic"][result.best_index]),
                seconds=seconds)


def _sklearn(X, n_init, repeats):
    from sklearn.mixture import GaussianMixture

    def grid():
        best = (np.inf, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k in GRID:
                for cov in COVARIANCE_TYPES:
                    bic = GaussianMixture(k, covariance_type=cov, n_init=n_init,
                                          random_state=0).fit(X).bic(X)
                    best = min(best, (bic, (k, cov)), key=lambda t: t[0])
        return best

    seconds, (bic, (k, cov)) = _median_seconds(grid, repeats)
    return dict(tool="scikit-learn", settings=f"n_init={n_init}", best=f"({k}, {cov})",
                bic=float(bic), seconds=seconds)


def _mclust(name, repeats, X=None, names=None):
    rscript = shutil.which("Rscript")
    if rscript is None:
        return None
    if X is None:
        X, names = load_dataset(name)
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / f"{name}.csv"
        np.savetxt(data, X, delimiter=",", header=",".join(names), comments="")
        try:
            out = subprocess.run([rscript, "-e", _R_SCRIPT, str(data), str(max(repeats, 1))],
                                 capture_output=True, text=True, timeout=600)
        except OSError:
            return None
    if out.returncode != 0:
        return dict(tool="mclust", settings="failed", best="-", bic=np.nan, seconds=np.nan,
                    table=out.stderr.strip().splitlines()[-1:] or [""])
    seconds, cells = np.nan, []
    for line in out.stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["SECONDS"]:
            seconds = float(parts[1])
        elif parts[:1] == ["CELL"] and parts[3] != "NA":
            cells.append((-float(parts[3]), int(parts[1]), MCLUST_MODELS[parts[2]]))
    bic, k, cov = min(cells)
    table = "\n".join(f"{k:>3} {cov:<10} {b:>12.3f}" for b, k, cov in sorted(
        cells, key=lambda c: (c[1], list(MCLUST_MODELS.values()).index(c[2]))))
    return dict(tool="mclust", settings="mclustBIC defaults", best=f"({k}, {cov})",
                bic=bic, seconds=seconds, table=table)


def run(datasets=tuple(DATASETS), repeats=3, sklearn_n_init=(1, 20), reference=False):
    """Rows ``{dataset, tool, settings, best, bic, seconds[, gap][, table]}`` for every
    data set; with ``reference``, fastem's defaults carry ``gap``, their BIC minus
    that of ``REFERENCE_STARTS`` k-means starts."""
    rows = []
    for name in datasets:
        X, names = load_dataset(name)
        ours = _fastem(X, repeats)
        found = [ours]
        if reference:
            found.append(_fastem_reference(X))
            ours["gap"] = ours["bic"] - found[-1]["bic"]
        found += [_sklearn(X, n, repeats if n == 1 else 0) for n in sklearn_n_init]
        peer = _mclust(name, repeats, X, names)
        if peer is not None:
            found.append(peer)
        for row in found:
            row["dataset"] = f"{name} ({X.shape[0]}x{X.shape[1]})"
        rows.extend(found)
    return rows


def format_rows(rows, tables=False):
    """The comparison as aligned text (and, with ``tables``, each tool's BIC table)."""
    head = (f"{'data':<22} {'tool':<13} {'settings':<24} {'best cell':<16} {'BIC':>10} "
            f"{'gap':>8} {'s/grid':>8}")
    lines = [head, "-" * len(head)]
    for row in rows:
        gap = f"{row['gap']:>8.2f}" if "gap" in row else f"{'':>8}"
        lines.append(f"{row['dataset']:<22} {row['tool']:<13} {row['settings']:<24} "
                     f"{row['best']:<16} {row['bic']:>10.2f} {gap} {row['seconds']:>8.3f}")
    if tables:
        for row in rows:
            if "table" in row:
                lines += ["", f"{row['dataset']} - {row['tool']}:", str(row["table"])]
    return "\n".join(lines)
