"""The ``fastem`` command line (also ``python -m fastem``).

Subcommands
-----------
``demo``
    Fit the Old Faithful data shipped with fastem over the grid K = 1..9 x
    the four covariance types, choose by BIC, print the table and the chosen
    model, and draw ``fastem-demo.png``.
``fit DATA``
    The same for a data file, with the grid, criterion and columns chosen on
    the command line; optionally save the model and draw the picture.
``predict MODEL DATA``
    Labels, or responsibilities with ``--proba``, as CSV.
``score MODEL DATA``
    Mean and total log-likelihood, BIC and AIC of a saved model on data.
``bench ...``
    Everything after ``bench`` goes to :func:`fastem.bench.main`.

This module only parses, reports and draws: reading files is
:mod:`fastem.tables` and :mod:`fastem.io`, fitting is
:func:`fastem.selection.select_model`, pictures are :mod:`fastem.plotting`.

Exit status and errors
----------------------
Bad input of any kind (those modules report it as ``ValueError``) ends the
program with status 2 and one line on stderr that starts with
``fastem: error:``, before any fitting when the problem is in the arguments
(an output path that cannot be written, say); argparse's usage errors also
exit with 2. Warnings are one line each.

Ctrl-C
------
A command runs on a thread of its own while the main thread waits, so that
Ctrl-C is never raised inside the kernels' Python callbacks (see
:func:`_in_own_thread`). The command stops at its next check (after a grid
cell, a block of output rows, before renaming an output into place), or the
program leaves it after ``_STOP_GRACE_S`` seconds; either way it exits with
130 and one line on stderr, and without partial files.

Files
-----
Output files are written to a temporary file in the same folder and renamed
into place, so an interrupted or failed run leaves no partial file (and an
existing one as it was). ``fit`` on a table whose file names its columns gives
the model ``feature_names_in_``; ``predict`` and ``score`` then take the new
file's columns by those names, in the model's order, and refuse a file that
lacks one or names none; ``--columns`` overrides that, by position.

Standard output
---------------
A reader that goes away early (``fastem fit ... --out m.npz | head -1``) stops
the report, not the work: the files are still written, and the exit status is
1, as Python's documentation recommends for a broken pipe.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from . import __version__
from .blocks import INIT_SAMPLE_ROWS, RowBlocks
from .covariance import COVARIANCE_TYPES
from .io import load_model, save_model
from .missing import MISSING_OPTIONS
from .selection import CRITERIA, SelectionResult, select_model
from .tables import MissingColumnsError, ParquetBlocks, Table, load_demo_data, load_table

PROG = "fastem"
DEMO_PICTURE = "fastem-demo.png"
DEMO_COMPONENTS = range(1, 10)
DEMO_SEED = 0
PLOT_HINT = "pip install fastem[plot]"
# Follow select_model's default rather than restate it.
DEFAULT_N_INIT = inspect.signature(select_model).parameters["n_init"].default
# An HMM start runs to convergence (no short-run search): a few restarts.
DEFAULT_HMM_N_INIT = 5

_EXIT_INPUT_ERROR = 2
_EXIT_BROKEN_PIPE = 1
_EXIT_INTERRUPTED = 130
# NumPy's legacy seeding (which scikit-learn's random_state uses) takes 32 bits.
_MAX_SEED = 2**32 - 1
# How long an interrupted command may take to reach a point where it stops
# cleanly (the end of a grid cell, a block of output rows) before the program
# exits without it; a cell of a large data set can take longer.
_STOP_GRACE_S = 3.0
_CSV_ROWS_PER_CHECK = 4096

# Set by the main thread on Ctrl-C; the command's thread stops at its next check.
_interrupted = threading.Event()
# Temporary output files being written, removed if the program exits without
# the command (see main).
_pending_outputs: set[Path] = set()
_COMPONENTS_SPEC = re.compile(r"(\d+)(?:-(\d+))?")


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        0 on success, 2 for bad input or usage (one ``fastem: error:`` line
        on stderr), 1 when standard output was closed early (after writing
        the output files) or memory ran out, 130 when interrupted (one line on
        stderr, no partial output file); ``fastem bench`` returns what
        :func:`fastem.bench.main` returns.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    report = _Report(sys.stdout)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            # A named model is handed plain arrays whose columns have already
            # been matched to its names (_read_model_data).
            warnings.filterwarnings("ignore", message="X does not have valid feature names",
                                    category=UserWarning)
            status = _run(argv, report)
        # Inside the try, so that a reader gone away is noticed here rather
        # than by the interpreter at exit (Python's note on SIGPIPE).
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away while the output was the point
        # (``fastem predict ... | head``): stop quietly.
        _silence_stdout()
        return _EXIT_BROKEN_PIPE
    except (ValueError, OSError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return _EXIT_INPUT_ERROR
    except MemoryError:
        print(f"{PROG}: error: out of memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"{PROG}: interrupted", file=sys.stderr)
        if isinstance(exc, _Abandoned):
            # The command is inside a kernel call, which nothing can stop:
            # exit without it, and without its temporary files.
            for path in list(_pending_outputs):
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(_EXIT_INTERRUPTED)
        return _EXIT_INTERRUPTED
    return _EXIT_BROKEN_PIPE if report.broken and status == 0 else status


def _run(argv: list[str], report: _Report) -> int:
    # bench's options belong to fastem.bench, so they bypass this parser.
    if argv[:1] == ["bench"]:
        return _in_own_thread(_run_bench, argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else _EXIT_INPUT_ERROR
    return _in_own_thread(args.run, args, report)


class _Abandoned(KeyboardInterrupt):
    """Ctrl-C, and the command did not stop within ``_STOP_GRACE_S``."""


def _in_own_thread(function, *args):
    """``function(*args)`` run on a thread of its own: its result, or its exception.

    Python runs signal handlers in the main thread only, so Ctrl-C raises
    KeyboardInterrupt here, where the main thread waits, and never inside the
    work: Numba builds the arrays a kernel returns with a Python function
    (``numba.core.serialize._numba_unpickle``), and a KeyboardInterrupt raised
    in there turns into a SystemError traceback or a segmentation fault. The
    command stops at its next :func:`_stop_if_interrupted`.
    """
    outcome = {}
    # Not Thread.join: in Python 3.11 a join interrupted by Ctrl-C marks the
    # thread as stopped while it still runs.
    done = threading.Event()

    def work():
        try:
            outcome["result"] = function(*args)
        except BaseException as exc:  # handed over to the main thread
            outcome["error"] = exc
        finally:
            done.set()

    _interrupted.clear()
    worker = threading.Thread(target=work, name="fastem-command", daemon=True)
    try:
        # start() inside the try: it waits for the thread to begin, and under
        # load the command can already be writing when Ctrl-C arrives there.
        worker.start()
        done.wait()
    except KeyboardInterrupt:
        _interrupted.set()
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: wait no more
            done.wait(_STOP_GRACE_S)
        if not done.is_set():
            raise _Abandoned from None
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _stop_if_interrupted() -> None:
    """Where the command stops after Ctrl-C (an ordinary raise, in Python code)."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


class _Report:
    """The report on standard output, which outlives the reader going away.

    When the reader closes the pipe (``fastem fit ... --out m.npz | head -1``)
    the rest of the report is dropped and :attr:`broken` is set, but the work
    goes on: the model is still fitted and saved.
    """

    def __init__(self, stream: TextIO):
        self._stream = stream
        self.broken = False

    def print(self, text: str = "") -> None:
        _stop_if_interrupted()
        if self.broken:
            return
        try:
            self._stream.write(text + "\n")
            # Line by line, so that a pipe shows progress at once and a closed
            # one is noticed here.
            self._stream.flush()
        except BrokenPipeError:
            self.broken = True
            _silence_stdout()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand but ``bench``'s options."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fast EM for Gaussian mixtures: choose K and the covariance model by "
                    "BIC/AIC/ICL, fit, predict and score from the shell.",
        epilog=f"Run '{PROG} demo' to see it work on the Old Faithful data.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", help="fit the bundled Old Faithful data and draw the result",
        description="Fit the Old Faithful geyser data shipped with fastem for K = 1..9 and "
                    "all four covariance types, choose by BIC, print the table and the "
                    f"chosen model and write {DEMO_PICTURE}.",
    )
    demo.add_argument("--out-dir", type=Path, default=Path("."), metavar="DIR",
                      help=f"folder for {DEMO_PICTURE} (default: the current folder)")
    _add_quiet(demo)
    demo.set_defaults(run=_demo)

    fit = commands.add_parser(
        "fit", help="choose and fit a mixture for a data file",
        description="Fit every (K, covariance type) cell of a grid to a data file, choose "
                    "the best by an information criterion, print the table and the chosen "
                    "model.",
    )
    _add_data(fit)
    fit.add_argument("-k", "--n-components", default="1-9", metavar="SPEC",
                     help="numbers of components to try: 3, 1-8 or 2,4,6 (default: 1-9)")
    fit.add_argument("--covariance", default="all", metavar="TYPES",
                     help=f"comma-separated covariance types among {', '.join(COVARIANCE_TYPES)},"
                          " or all (default: all)")
    fit.add_argument("--criterion", choices=CRITERIA, default="bic",
                     help="lower is better (default: bic)")
    fit.add_argument("--n-init", type=_positive_int, default=DEFAULT_N_INIT, metavar="N",
                     help=f"starts per K (default: {DEFAULT_N_INIT})")
    fit.add_argument("--seed", type=_seed, default=DEMO_SEED, metavar="S",
                     help=f"random seed of the starts, 0 to 2**32 - 1 (default: {DEMO_SEED})")
    _add_columns(fit)
    fit.add_argument("--missing", choices=MISSING_OPTIONS, default="error",
                     help="'em': empty fields, NA and NaN are missing values and every cell is "
                          "fitted to the observed entries (EM with missing values); 'error' "
                          "(default): refuse them")
    fit.add_argument("--out", type=Path, metavar="MODEL",
                     help="save the chosen model to this .npz file (with the column names, "
                          "when the data file has a header)")
    fit.add_argument("--plot", type=Path, metavar="PICTURE",
                     help=f"draw the criterion curves and the chosen model ({PLOT_HINT})")
    _add_quiet(fit)
    fit.set_defaults(run=_fit)

    predict = commands.add_parser(
        "predict", help="labels or responsibilities of a saved model, as CSV",
        description="Write the most probable component of every row (header 'label'), or "
                    "with --proba the responsibilities (header p0,p1,...), as CSV.",
    )
    _add_model(predict)
    _add_data(predict)
    predict.add_argument("--proba", action="store_true",
                         help="responsibilities, one column per component")
    _add_model_columns(predict)
    predict.add_argument("--out", type=Path, metavar="CSV",
                         help="write here instead of to standard output")
    predict.set_defaults(run=_predict)

    score = commands.add_parser(
        "score", help="log-likelihood, BIC and AIC of a saved model on data",
        description="Print the mean log-likelihood per row, the total log-likelihood, BIC "
                    "and AIC of a saved model on a data file.",
    )
    _add_model(score)
    _add_data(score)
    _add_model_columns(score)
    score.set_defaults(run=_score)

    impute = commands.add_parser(
        "impute", help="fill the missing values of a data file under a saved model",
        description="Write the data with every missing value (empty field, NA, NaN) replaced "
                    "by its conditional mean given the row's observed values under the "
                    "model, as CSV with the model's column names; with --draws M, M "
                    "multiple imputations drawn from the conditional distribution, "
                    "stacked, with a first column 'draw'.",
    )
    _add_model(impute)
    _add_data(impute)
    _add_model_columns(impute)
    impute.add_argument("--draws", type=_positive_int, metavar="M",
                        help="M multiple imputations instead of the conditional mean")
    impute.add_argument("--seed", type=_seed, default=DEMO_SEED, metavar="S",
                        help=f"random seed of the draws (default: {DEMO_SEED})")
    impute.add_argument("--out", type=Path, metavar="CSV",
                        help="write here instead of to standard output")
    impute.set_defaults(run=_impute)

    hmm = commands.add_parser(
        "hmm", help="hidden Markov models: fit sequences, decode their states",
        description="Gaussian hidden Markov models fitted by Baum-Welch (fastem.GaussianHMM).",
    )
    hmm_commands = hmm.add_subparsers(dest="hmm_command", metavar="HMM_COMMAND", required=True)
    hmm_fit = hmm_commands.add_parser(
        "fit", help="fit a hidden Markov model to the rows of a data file",
        description="Fit a Gaussian HMM for each number of states asked for, keep the one "
                    "of lowest BIC, print it and optionally save it and draw its decoded "
                    "states. Rows are observations in time order; with --sequence, "
                    "consecutive rows of equal value in that column form one sequence.",
    )
    _add_data(hmm_fit)
    hmm_fit.add_argument("-k", "--n-components", default="2", metavar="SPEC",
                         help="numbers of states to try: 3, 1-4 or 2,3 (default: 2)")
    hmm_fit.add_argument("--covariance", choices=COVARIANCE_TYPES, default="diag",
                         help="covariance type of the emissions (default: diag)")
    hmm_fit.add_argument("--n-iter", type=_positive_int, default=500, metavar="N",
                         help="most Baum-Welch iterations per start (default: 500)")
    hmm_fit.add_argument("--n-init", type=_positive_int, default=DEFAULT_HMM_N_INIT,
                         metavar="N",
                         help=f"starts per number of states (default: {DEFAULT_HMM_N_INIT})")
    hmm_fit.add_argument("--seed", type=_seed, default=DEMO_SEED, metavar="S",
                         help=f"random seed of the starts (default: {DEMO_SEED})")
    _add_sequence(hmm_fit)
    _add_columns(hmm_fit)
    hmm_fit.add_argument("--out", type=Path, metavar="MODEL",
                         help="save the chosen model to this .npz file")
    hmm_fit.add_argument("--plot", type=Path, metavar="PICTURE",
                         help=f"draw the first feature coloured by decoded state ({PLOT_HINT})")
    hmm_fit.set_defaults(run=_hmm_fit)
    hmm_decode = hmm_commands.add_parser(
        "decode", help="most probable states of a data file's rows under a saved model, as CSV",
        description="Write the decoded state of every row (header 'state'), by Viterbi or, "
                    "with --algorithm map, each row's most probable state.",
    )
    _add_model(hmm_decode)
    _add_data(hmm_decode)
    hmm_decode.add_argument("--algorithm", choices=("viterbi", "map"), default="viterbi",
                            help="decoder (default: viterbi)")
    _add_sequence(hmm_decode)
    _add_model_columns(hmm_decode)
    hmm_decode.add_argument("--out", type=Path, metavar="CSV",
                            help="write here instead of to standard output")
    hmm_decode.set_defaults(run=_hmm_decode)

    compile_ = commands.add_parser(
        "compile", help="compile and cache every kernel (for images and CI caches)",
        description="Compile every Numba kernel for float64 and float32 data and cache it on "
                    "disk (next to the package, or in NUMBA_CACHE_DIR), printing what was "
                    "compiled and how long it took. Run it when building a Docker image, a CI "
                    "cache or a cluster worker, so that first use compiles nothing.",
    )
    compile_.add_argument("--dtype", choices=("float64", "float32", "both"), default="both",
                          help="data precision to compile for (default: both)")
    compile_.set_defaults(run=_compile)

    # Listed for --help only: main() hands 'bench ...' to fastem.bench first.
    commands.add_parser("bench", help="benchmarks (arguments go to fastem.bench)",
                        add_help=False)
    return parser


def _add_data(parser):
    parser.add_argument("data", type=Path, metavar="DATA",
                        help="data file: .csv, .tsv, .txt, .npy, .npz or .parquet")


def _add_model(parser):
    parser.add_argument("model", type=Path, metavar="MODEL",
                        help="model file written by 'fastem fit --out'")


def _add_columns(parser):
    parser.add_argument("--columns", metavar="A,B,C",
                        help="columns to use, by name or 0-based index (default: all)")


def _add_model_columns(parser):
    parser.add_argument("--columns", metavar="A,B,C",
                        help="the data's columns for the model's features, in their order, by "
                             "name or 0-based index (default: the columns the model was fitted "
                             "on, by name, or all columns for a model without names)")


def _add_sequence(parser):
    parser.add_argument("--sequence", metavar="COLUMN",
                        help="column (name or 0-based index) whose runs of equal values mark "
                             "the sequences; it is not a feature (default: one sequence)")


def _add_quiet(parser):
    parser.add_argument("--quiet", action="store_true",
                        help="no progress line (there is none either when stderr is not a "
                             "terminal)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    expected = f"expected an integer from 0 to 2**32 - 1, got {text!r}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(expected) from None
    if not 0 <= value <= _MAX_SEED:
        raise argparse.ArgumentTypeError(expected)
    return value


# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------


def _demo(args, report: _Report) -> int:
    X, names = load_demo_data()
    picture = args.out_dir / DEMO_PICTURE
    can_draw = _has_matplotlib()
    if can_draw:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        _check_output("--out-dir", picture)
    report.print(f"Old Faithful geyser: {X.shape[0]} eruptions x {X.shape[1]} columns "
                 f"({', '.join(names)})")
    result = _select(report, X, list(DEMO_COMPONENTS), COVARIANCE_TYPES, "bic",
                     DEFAULT_N_INIT, DEMO_SEED, args.quiet)
    _print_selection(report, result, names)
    if can_draw:
        _draw(result, X, names, picture)
        report.print(f"\nPicture: {picture}")
    else:
        print(f"{PROG}: note: no picture drawn; it needs matplotlib: {PLOT_HINT}",
              file=sys.stderr)
    return 0


def _fit(args, report: _Report) -> int:
    ranges = parse_components(args.n_components)
    covariance_types = parse_covariance_types(args.covariance)
    # Every argument is checked before the data is read and fitted.
    if args.plot is not None:
        if not _has_matplotlib():
            raise ValueError(f"--plot needs matplotlib: {PLOT_HINT}")
        _check_picture_type("--plot", args.plot)
    for option, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None:
            _check_output(option, path)
    if args.out is not None and args.plot is not None and (
            args.out.resolve() == args.plot.resolve()):
        raise ValueError(f"--out and --plot are the same file, {args.out}")
    table = _read_data(args.data, _parse_columns(args.columns), stream=True,
                       missing=args.missing == "em")
    X, names = table.X, table.names
    if table.named and args.out is not None:
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"{args.data}: several columns are named {_quoted(repeated)}; the "
                             "saved model finds its columns by name, so give each its own")
    largest = max(high for _, high in ranges)
    if largest > X.shape[0]:
        raise ValueError(f"-k asks for up to {largest} components but {args.data} has only "
                         f"{X.shape[0]} rows")
    ks = sorted({k for low, high in ranges for k in range(low, high + 1)})
    report.print(f"{args.data}: {X.shape[0]} rows x {X.shape[1]} columns ({', '.join(names)})")
    result = _select(report, X, ks, covariance_types, args.criterion, args.n_init, args.seed,
                     args.quiet, missing=args.missing)
    if table.named:
        # As scikit-learn names the features of a model fitted on a DataFrame:
        # predict and score find a new file's columns by these names.
        result.best_model.feature_names_in_ = np.asarray(names, dtype=object)
    written = []
    if args.out is not None:
        with _replaced_atomically(args.out) as tmp:
            save_model(result.best_model, tmp)
        written.append(f"Model saved to {args.out}")
    if args.plot is not None:
        _draw(result, X, names, args.plot)
        written.append(f"Picture: {args.plot}")
    _print_selection(report, result, names)
    if written:
        report.print("\n" + "\n".join(written))
    return 0


def _predict(args, report: _Report) -> int:
    if args.out is not None:
        _check_output("--out", args.out)
    model = _load_model(args.model)
    X = _read_model_data(model, args)
    if args.proba:
        proba = model.predict_proba(X)
        header = ",".join(f"p{k}" for k in range(proba.shape[1]))
        # repr is the shortest text that reads back as the same float.
        body = (",".join(map(repr, row)) for row in proba.tolist())
    else:
        header = "label"
        body = map(str, model.predict(X).tolist())
    if args.out is None:
        # Not through the report: when the reader goes away there is nothing
        # left to do, and main() stops quietly.
        _write_csv(sys.stdout, header, body)
    else:
        with _replaced_atomically(args.out) as tmp, open(tmp, "x", newline="") as handle:
            _write_csv(handle, header, body)
    return 0


def _impute(args, report: _Report) -> int:
    if args.out is not None:
        _check_output("--out", args.out)
    model = _load_model(args.model)
    X = _read_model_data(model, args)
    names = getattr(model, "feature_names_in_", None)
    names = ([str(name) for name in names] if names is not None
             else [f"x{j}" for j in range(X.shape[1])])
    if args.draws is None:
        header = ",".join(names)
        body = (",".join(map(repr, row)) for row in model.impute(X).tolist())
    else:
        draws = model.impute(X, n_draws=args.draws, random_state=args.seed)
        header = ",".join(["draw", *names])
        body = (",".join([str(d), *map(repr, row)])
                for d in range(draws.shape[0]) for row in draws[d].tolist())
    if args.out is None:
        _write_csv(sys.stdout, header, body)
    else:
        with _replaced_atomically(args.out) as tmp, open(tmp, "x", newline="") as handle:
            _write_csv(handle, header, body)
    return 0


def _score(args, report: _Report) -> int:
    model = _load_model(args.model)
    X = _read_model_data(model, args)
    loglik = np.asarray(model.score_samples(X), dtype=np.float64)
    rows = [
        ("model", f"K={model.n_components}, covariance {model.covariance_type!r}"),
        ("rows", f"{X.shape[0]}"),
        ("mean log-likelihood", f"{loglik.mean():.10g}"),
        ("total log-likelihood", f"{loglik.sum():.10g}"),
        ("BIC", f"{model.bic(X):.10g}"),
        ("AIC", f"{model.aic(X):.10g}"),
    ]
    width = max(len(name) for name, _ in rows) + 2
    for name, value in rows:
        report.print(f"{name:<{width}}{value}")
    return 0


def _sequence_lengths(args) -> np.ndarray | None:
    """Lengths of the runs of equal values in the ``--sequence`` column (None without it)."""
    if args.sequence is None:
        return None
    ids = load_table(args.data, [args.sequence]).X[:, 0]
    if ids.size == 0:
        return None
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return np.diff(np.r_[starts, ids.size])


def _feature_columns(args) -> list[str] | None:
    """``--columns``, or every column but ``--sequence``."""
    columns = _parse_columns(args.columns)
    if columns is not None or args.sequence is None:
        if columns is not None and args.sequence is not None and args.sequence in columns:
            raise ValueError(f"--sequence {args.sequence} is also one of --columns")
        return columns
    names = load_table(args.data, None).names
    index = (int(args.sequence) if args.sequence.isdigit() and args.sequence not in names
             else names.index(args.sequence) if args.sequence in names else None)
    if index is None or index >= len(names):
        raise ValueError(f"{args.data} has no column {args.sequence!r} for --sequence")
    return [name for j, name in enumerate(names) if j != index]


def _hmm_fit(args, report: _Report) -> int:
    from .hmm import select_n_states

    ranges = parse_components(args.n_components)
    if args.plot is not None:
        if not _has_matplotlib():
            raise ValueError(f"--plot needs matplotlib: {PLOT_HINT}")
        _check_picture_type("--plot", args.plot)
    for option, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None:
            _check_output(option, path)
    table = _read_data(args.data, _feature_columns(args))
    X, names = np.asarray(table.X, dtype=np.float64), table.names
    lengths = _sequence_lengths(args)
    ks = sorted({k for low, high in ranges for k in range(low, high + 1)})
    if ks[-1] > X.shape[0]:
        raise ValueError(f"-k asks for up to {ks[-1]} states but {args.data} has only "
                         f"{X.shape[0]} rows")
    n_sequences = 1 if lengths is None else len(lengths)
    report.print(f"{args.data}: {X.shape[0]} rows x {X.shape[1]} columns ({', '.join(names)}),"
                 f" {_count(n_sequences, 'sequence')}")
    selection = select_n_states(X, lengths, ks, covariance_type=args.covariance,
                                n_iter=args.n_iter, tol=1e-6, n_init=args.n_init,
                                random_state=args.seed)
    for row in selection.table:
        report.print(f"  K={row['n_components']}: log-likelihood {row['log_likelihood']:.6g}, "
                     f"BIC {row['bic']:.6g}")
    model = selection.best
    k = model.n_components
    bic = next(row["bic"] for row in selection.table if row["n_components"] == k)
    if table.named:
        model.feature_names_in_ = np.asarray(names, dtype=object)
    report.print(f"Chosen by BIC: K={k} ({bic:.6g})")
    report.print("transition matrix:")
    for row in np.asarray(model.transmat_):
        report.print("  " + " ".join(f"{p:.4f}" for p in row))
    for state in range(k):
        report.print(f"state {state}: mean {np.round(model.means_[state], 6).tolist()}, "
                     f"variances {np.round(np.diagonal(model.covars_[state]), 6).tolist()}")
    if args.out is not None:
        with _replaced_atomically(args.out) as tmp:
            save_model(model, tmp)
        report.print(f"\nModel saved to {args.out}")
    if args.plot is not None:
        from .plotting import plot_states, save_figure

        save_figure(plot_states(model, X, lengths), args.plot)
        report.print(f"Picture: {args.plot}")
    return 0


def _hmm_decode(args, report: _Report) -> int:
    if args.out is not None:
        _check_output("--out", args.out)
    model = _load_model(args.model)
    if not hasattr(model, "transmat_"):
        raise ValueError(f"{args.model} holds a {type(model).__name__}, not a hidden Markov "
                         "model")
    columns = args.columns
    if columns is None and args.sequence is not None and getattr(
            model, "feature_names_in_", None) is None:
        args.columns = ",".join(_feature_columns(args))
    X = _read_model_data(model, args)
    args.columns = columns
    lengths = _sequence_lengths(args)
    _, states = model.decode(X, lengths, algorithm=args.algorithm)
    body = map(str, np.asarray(states).tolist())
    if args.out is None:
        _write_csv(sys.stdout, "state", body)
    else:
        with _replaced_atomically(args.out) as tmp, open(tmp, "x", newline="") as handle:
            _write_csv(handle, "state", body)
    return 0


def _compile(args, report: _Report) -> int:
    from .compilation import compile_kernels

    dtypes = ("float64", "float32") if args.dtype == "both" else (args.dtype,)
    start = time.perf_counter()
    seconds = compile_kernels(dtypes, report=report.print)
    report.print(f"{len(seconds)} kernels compiled in {sum(seconds.values()):.1f} s "
                 f"({time.perf_counter() - start:.1f} s in all); cache: {_numba_cache_dir()}")
    return 0


def _numba_cache_dir() -> str:
    import numba

    return numba.config.CACHE_DIR or "next to the installed package (__pycache__)"


def _run_bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("fastem.bench")
    except ModuleNotFoundError as exc:
        if exc.name == "fastem.bench":
            raise ValueError("benchmarks are not available: this installation of fastem "
                             "has no fastem.bench module") from None
        raise ValueError(f"fastem bench needs the {exc.name!r} package, which is not "
                         "installed: pip install fastem[bench]") from None
    status = bench.main(argv)
    return 0 if status is None else int(status)


# ---------------------------------------------------------------------------
# Parsing option values
# ---------------------------------------------------------------------------


def parse_components(spec: str) -> list[tuple[int, int]]:
    """The K ranges of a ``-k`` spec: ``3``, ``1-8``, ``2,4,6`` or a mix (``1-3,6``).

    Returns
    -------
    list of (int, int)
        Inclusive ``(low, high)`` bounds, one per comma-separated part; they
        are not expanded here, so a huge bound costs nothing until it has been
        checked against the data.

    Raises
    ------
    ValueError
        Unless every part is a positive integer or an increasing range of them.
    """
    ranges = []
    for part in spec.split(","):
        match = _COMPONENTS_SPEC.fullmatch(part.strip())
        low = high = 0
        if match is not None:
            low = int(match[1])
            high = int(match[2] or match[1])
        if low < 1 or high < low:
            raise ValueError(f"bad -k value {spec!r}: expected a positive integer (3), an "
                             "increasing range (1-8) or a comma-separated list (2,4,6)")
        ranges.append((low, high))
    return ranges


def parse_covariance_types(spec: str) -> tuple[str, ...]:
    """Covariance types of a ``--covariance`` value: ``all`` or a comma-separated list."""
    if spec.strip().lower() == "all":
        return COVARIANCE_TYPES
    types = [part.strip().lower() for part in spec.split(",")]
    unknown = [t for t in types if t not in COVARIANCE_TYPES]
    if unknown:
        raise ValueError(f"bad --covariance value {spec!r}: unknown type(s) "
                         f"{', '.join(repr(t) for t in unknown)}; choose from "
                         f"{', '.join(COVARIANCE_TYPES)} or all")
    return tuple(dict.fromkeys(types))


def _parse_columns(spec: str | None) -> list[str] | None:
    if spec is None:
        return None
    columns = [part.strip() for part in spec.split(",")]
    if not all(columns):
        raise ValueError(f"bad --columns value {spec!r}: expected names or indices "
                         "separated by commas")
    return columns


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def _read_data(path: Path, columns: list[str] | None, stream: bool = False,
               missing: bool = False) -> Table:
    """``load_table``, refusing missing and non-finite values with the row that has one
    (with ``missing``, only infinities: NaN and empty fields are missing values,
    and the data are read into memory).

    With ``stream``, a Parquet file of more than ``_STREAM_BYTES`` of data is
    not read but streamed by row groups (``X`` is a
    :class:`~fastem.tables.ParquetBlocks`), as a fit streams a memory-mapped
    ``.npy``. Smaller ones are read: decoding them again on every EM pass
    would cost more than the pass.
    """
    blocks = None
    if stream and not missing and path.suffix.lower() == ".parquet":
        blocks = ParquetBlocks(path, columns)
        if 8 * blocks.shape[0] * blocks.shape[1] <= _STREAM_BYTES:
            blocks = None
    if blocks is not None:
        table = Table(blocks, blocks.names, True)
        slabs = blocks()
    else:
        table = load_table(path, columns)
        if missing:
            # EM with missing values runs in memory (a memory map is read).
            table = table._replace(X=np.array(table.X, dtype=np.float64))
        # In slabs: a memory-mapped .npy is never read whole into memory.
        slabs = (table.X[start:start + _CHECK_ROWS]
                 for start in range(0, table.X.shape[0], _CHECK_ROWS))
    n_bad, first, start = 0, None, 0
    for slab in slabs:
        bad = (np.isinf(slab) if missing else ~np.isfinite(slab)).any(axis=1)
        if bad.any():
            n_bad += int(bad.sum())
            first = start + int(np.argmax(bad)) if first is None else first
        start += slab.shape[0]
    if n_bad and missing:
        raise ValueError(f"{path}: {n_bad} of {table.X.shape[0]} rows have infinite values "
                         f"(the first is data row {first + 1}); remove them first")
    if n_bad:
        raise ValueError(f"{path}: {n_bad} of {table.X.shape[0]} rows have missing "
                         f"or non-finite values (the first is data row {first + 1}); "
                         "fit them with --missing em, or remove or fill them first")
    return table


_CHECK_ROWS = 1 << 16
# Parquet data beyond this (as float64) are streamed by row groups in a fit.
_STREAM_BYTES = 1 << 30


def _load_model(path: Path):
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a model file")
    return load_model(path)


def _read_model_data(model, args) -> np.ndarray:
    """The data's columns for the model's features, in the model's order.

    A model with feature names takes the columns of those names, wherever they
    are in the file; ``--columns`` picks them by position instead, and a model
    without names takes the columns as they come.
    """
    names = getattr(model, "feature_names_in_", None)
    columns = _parse_columns(args.columns)
    missing = getattr(model, "missing", "error") == "em" or args.command == "impute"
    if names is None or columns is not None:
        table = _read_data(args.data, columns, missing=missing)
        if table.X.shape[1] != model.n_features_in_:
            raise ValueError(f"{args.data} has {_count(table.X.shape[1], 'column')} but the "
                             f"model in {args.model} was fitted on {model.n_features_in_}; "
                             "pick them with --columns")
        if names is not None and table.named:
            _check_columns_order(args, table.names, [str(name) for name in names])
        return table.X
    names = [str(name) for name in names]
    fitted_on = f"the model in {args.model} was fitted on columns {_quoted(names)}"
    unnamed = (f"{args.data} does not name its columns, but {fitted_on}; add a header row "
               "naming them, or give the file's columns in the model's order with --columns")
    try:
        table = _read_data(args.data, names, missing=missing)
    except MissingColumnsError as exc:
        if not exc.named:
            raise ValueError(unnamed) from None
        lacks = "the column" if len(exc.missing) == 1 else "the columns"
        raise ValueError(f"{args.data} lacks {lacks} {_quoted(exc.missing)}: {fitted_on}, "
                         f"and the file has {_quoted(exc.available)}; rename them, or give "
                         "the file's columns in the model's order with --columns") from None
    if not table.named:
        raise ValueError(unnamed)
    return table.X


def _check_columns_order(args, chosen: list[str], names: list[str]) -> None:
    """Refuse ``--columns`` that hand a model's named column to another feature."""
    for column, name in zip(chosen, names):
        if column != name and column in names:
            raise ValueError(f"--columns {args.columns} gives the column {column!r} of "
                             f"{args.data} to the model's feature {name!r}; list the columns "
                             f"in the model's order ({', '.join(names)}), or leave out "
                             "--columns to match them by name")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _write_csv(stream: TextIO, header: str, rows) -> None:
    stream.write(header + "\n")
    block = []
    for row in rows:
        block.append(row + "\n")
        if len(block) == _CSV_ROWS_PER_CHECK:
            _stop_if_interrupted()
            stream.writelines(block)
            block.clear()
    stream.writelines(block)


# ---------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------


def _check_output(option: str, path: Path) -> None:
    """Refuse, before any work, an output file that could not be written."""
    folder = path.parent
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder; give a file name")
    if not folder.is_dir():
        if folder.exists():
            raise ValueError(f"{option} {path}: {folder} is not a folder")
        raise ValueError(f"{option} {path}: the folder {folder} does not exist")
    try:
        # What writing will do: create a file in that folder (then rename it).
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot write in the folder {folder}: "
                         f"{exc.strerror or exc}") from None


def _check_picture_type(option: str, path: Path) -> None:
    # matplotlib would append ".png" to a name without an extension, and
    # refuse an unknown one only after the fit.
    from matplotlib.backend_bases import FigureCanvasBase

    types = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in types:
        problem = (f"unknown picture type {path.suffix!r}" if path.suffix else
                   "no extension to give the picture's type")
        raise ValueError(f"{option} {path}: {problem}; use one of "
                         f"{', '.join('.' + t for t in sorted(types))}")


@contextlib.contextmanager
def _replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``, renamed to ``path`` when the block ends well.

    Nobody sees a half-written file, and a failed or interrupted write leaves
    no file behind (an existing one as it was). The temporary name keeps the
    extension, from which matplotlib takes a picture's format.
    """
    _stop_if_interrupted()
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    _pending_outputs.add(tmp)
    try:
        yield tmp
        _stop_if_interrupted()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _pending_outputs.discard(tmp)


# ---------------------------------------------------------------------------
# Fitting and reporting
# ---------------------------------------------------------------------------


def _select(report: _Report, X, ks, covariance_types, criterion, n_init, seed,
            quiet, missing="error") -> SelectionResult:
    report.print(f"Choosing K = {_describe_ks(ks)} and the covariance type "
                 f"({', '.join(covariance_types)}) by {criterion.upper()}; "
                 f"n_init={n_init}, random_state={seed}")
    report.print()
    n_cells = len(ks) * len(covariance_types)
    line = None
    if not quiet and sys.stderr is not None and sys.stderr.isatty():
        line = ProgressLine(sys.stderr, n_cells)

    def progress(*cell) -> None:
        _stop_if_interrupted()
        if line is not None:
            line(*cell)

    try:
        return select_model(X, ks, covariance_types, criterion, n_init=n_init,
                            random_state=seed, progress=progress, missing=missing)
    finally:
        if line is not None:
            line.close()


def _describe_ks(ks: list[int]) -> str:
    if len(ks) > 2 and ks == list(range(ks[0], ks[-1] + 1)):
        return f"{ks[0]}..{ks[-1]}"
    return ", ".join(map(str, ks))


class ProgressLine:
    """Grid progress on one line of a terminal, rewritten in place with ``\\r``.

    An instance is the ``progress`` callback of :func:`select_model`; call
    :meth:`close` to wipe the line before anything else is printed.
    """

    def __init__(self, stream: TextIO, n_cells: int):
        self._stream = stream
        self._width = 0
        # A fresh install compiles the Numba kernels during the first cells,
        # which can take a minute: say so before the first cell reports.
        self._show(f"fitting {n_cells} cells (a first run also compiles the kernels)")

    def __call__(self, cell: int, n_cells: int, n_components: int, covariance_type: str,
                 status: str) -> None:
        self._show(f"cell {cell}/{n_cells}  K={n_components}  {covariance_type:<9} {status}")

    def close(self) -> None:
        self._stream.write("\r" + " " * self._width + "\r")
        self._stream.flush()

    def _show(self, text: str) -> None:
        # A line longer than the terminal would wrap, and \r only rewinds the last row.
        line = f"{PROG}: {text}"[:max(shutil.get_terminal_size().columns - 1, 20)]
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()
        self._width = len(line)


def _print_selection(report: _Report, result: SelectionResult, names: list[str]) -> None:
    report.print(result.format_table())
    report.print()
    report.print(describe_choice(result, names))


def describe_choice(result: SelectionResult, names: Sequence[str]) -> str:
    """The chosen cell's criteria and parameters, as text.

    Parameters
    ----------
    result : SelectionResult
    names : sequence of str
        Feature names, for the column headings.
    """
    row = result.table[result.best_index]
    model = result.best_model
    k, covariance_type = result.best_params
    iterations = "converged" if row["converged"] else "not converged"
    lines = [
        (f"Chosen by {result.criterion.upper()}: K={k}, covariance {covariance_type!r} "
         "(marked * in the table)"),
        (f"  BIC {row['bic']:.3f}   AIC {row['aic']:.3f}   ICL {row['icl']:.3f}   "
         f"log-likelihood {row['log_likelihood']:.3f}"),
        (f"  {row['n_parameters']} free parameters, {iterations} after {row['n_iter']} "
         "EM iterations"),
        "",
    ]
    width = max(12, *(len(name) + 2 for name in names))
    label_width = 14
    heading = " " * label_width + "".join(f"{name:>{width}}" for name in names)

    def numbers(label, values):
        return f"  {label:<{label_width - 2}}" + "".join(f"{v:>{width}.6g}" for v in values)

    def matrix(label, rows):
        return [numbers(label if i == 0 else "", r) for i, r in enumerate(rows)]

    covariances = np.asarray(model.covariances_, dtype=np.float64)
    for j in range(k):
        lines += [f"component {j}: weight {model.weights_[j]:.4f}", heading,
                  numbers("mean", model.means_[j])]
        if covariance_type == "full":
            lines += matrix("covariance", covariances[j])
        elif covariance_type == "diag":
            lines.append(numbers("variance", covariances[j]))
        elif covariance_type == "spherical":
            lines.append(numbers("variance", [covariances[j]]) + "  (every feature)")
    if covariance_type == "tied":
        lines += ["covariance shared by all components:", heading]
        lines += matrix("covariance", covariances)
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _draw(result: SelectionResult, X: np.ndarray, names: list[str], path: Path) -> None:
    """Write the criterion curves and the chosen model side by side (needs matplotlib)."""
    # A Figure with an Agg canvas of its own never involves pyplot or a window,
    # whatever backend the user's matplotlib is configured for.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .plotting import plot_criterion, plot_mixture, save_figure

    figure = Figure(figsize=(12.8, 5.2), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    k, covariance_type = result.best_params
    plot_criterion(result.table, result.criterion, result.best_params, ax=left)
    left.set_title(f"{result.criterion.upper()} of every cell (lower is better)")
    if not isinstance(X, np.ndarray):
        # Streamed data: the picture shows a random sample of the rows.
        X, _ = RowBlocks(X).survey().sample(INIT_SAMPLE_ROWS, np.random.RandomState(0))
    # Rows with missing values are not drawn (their place is unknown).
    X = X[~np.isnan(X).any(axis=1)]
    plot_mixture(result.best_model, X, ax=right)
    right.set_title(f"chosen model: K={k}, {covariance_type} covariance")
    # plot_mixture names plain-array features x0, x1; the file has real names.
    if X.shape[1] <= 2:
        right.set_xlabel(names[0])
    if X.shape[1] == 2:
        right.set_ylabel(names[1])
    with _replaced_atomically(path) as tmp:
        save_figure(figure, tmp)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command line: one line, without the source."""
    text = " ".join(str(message).split()) or category.__name__
    print(f"{PROG}: warning: {text}", file=sys.stderr)


def _quoted(items) -> str:
    return ", ".join(repr(str(item)) for item in items)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
