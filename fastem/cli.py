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
:mod:`fastem.io`, fitting is :func:`fastem.selection.select_model`, pictures
are :mod:`fastem.plotting`. Bad input of any kind (those modules report it as
``ValueError``) ends the program with status 2 and one line on stderr that
starts with ``fastem: error:``; argparse's usage errors also exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from . import __version__
from .covariance import COVARIANCE_TYPES
from .io import load_model, save_model
from .selection import CRITERIA, SelectionResult, select_model
from .tables import load_demo_data, read_table

PROG = "fastem"
DEMO_PICTURE = "fastem-demo.png"
DEMO_COMPONENTS = range(1, 10)
DEMO_SEED = 0
PLOT_HINT = "pip install fastem[plot]"
# Follow select_model's default rather than restate it.
DEFAULT_N_INIT = inspect.signature(select_model).parameters["n_init"].default

_EXIT_INPUT_ERROR = 2
_EXIT_INTERRUPTED = 130
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
        on stderr), 130 when interrupted; ``fastem bench`` returns what
        :func:`fastem.bench.main` returns.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # bench's options belong to fastem.bench, so they bypass this parser.
        if argv[:1] == ["bench"]:
            return _run_bench(argv[1:])
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help, --version and usage errors
            return exc.code if isinstance(exc.code, int) else _EXIT_INPUT_ERROR
        return args.run(args)
    except BrokenPipeError:
        # The reader went away (``fastem predict ... | head``): stop quietly,
        # and keep Python from complaining when it flushes stdout at exit.
        _silence_stdout()
        return 1
    except (ValueError, OSError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return _EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return _EXIT_INTERRUPTED


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
    fit.add_argument("--seed", type=int, default=DEMO_SEED, metavar="S",
                     help=f"random seed of the starts (default: {DEMO_SEED})")
    _add_columns(fit)
    fit.add_argument("--out", type=Path, metavar="MODEL",
                     help="save the chosen model to this .npz file")
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
    _add_columns(predict)
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
    _add_columns(score)
    score.set_defaults(run=_score)

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


# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------


def _demo(args) -> int:
    X, names = load_demo_data()
    picture = args.out_dir / DEMO_PICTURE
    can_draw = _has_matplotlib()
    if can_draw:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"Old Faithful geyser: {X.shape[0]} eruptions x {X.shape[1]} columns "
          f"({', '.join(names)})")
    result = _select(X, list(DEMO_COMPONENTS), COVARIANCE_TYPES, "bic", DEFAULT_N_INIT,
                     DEMO_SEED, args.quiet)
    _print_selection(result, names)
    if can_draw:
        _draw(result, X, names, picture)
        print(f"\nPicture: {picture}")
    else:
        print(f"{PROG}: note: no picture drawn; it needs matplotlib: {PLOT_HINT}",
              file=sys.stderr)
    return 0


def _fit(args) -> int:
    ranges = parse_components(args.n_components)
    covariance_types = parse_covariance_types(args.covariance)
    for option, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None and not path.resolve().parent.is_dir():
            raise ValueError(f"{option} {path}: the folder {path.parent} does not exist")
    if args.plot is not None and not _has_matplotlib():
        raise ValueError(f"--plot needs matplotlib: {PLOT_HINT}")
    X, names = _read_data(args.data, args.columns)
    largest = max(high for _, high in ranges)
    if largest > X.shape[0]:
        raise ValueError(f"-k asks for up to {largest} components but {args.data} has only "
                         f"{X.shape[0]} rows")
    ks = sorted({k for low, high in ranges for k in range(low, high + 1)})
    print(f"{args.data}: {X.shape[0]} rows x {X.shape[1]} columns ({', '.join(names)})")
    result = _select(X, ks, covariance_types, args.criterion, args.n_init, args.seed,
                     args.quiet)
    _print_selection(result, names)
    written = []
    if args.out is not None:
        save_model(result.best_model, args.out)
        written.append(f"Model saved to {args.out}")
    if args.plot is not None:
        _draw(result, X, names, args.plot)
        written.append(f"Picture: {args.plot}")
    if written:
        print("\n" + "\n".join(written))
    return 0


def _predict(args) -> int:
    model = load_model(args.model)
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
        _write_csv(sys.stdout, header, body)
    else:
        with open(args.out, "w", newline="") as handle:
            _write_csv(handle, header, body)
    return 0


def _score(args) -> int:
    model = load_model(args.model)
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
        print(f"{name:<{width}}{value}")
    return 0


def _compile(args) -> int:
    from .compilation import compile_kernels

    dtypes = ("float64", "float32") if args.dtype == "both" else (args.dtype,)
    start = time.perf_counter()
    seconds = compile_kernels(dtypes, report=print)
    print(f"{len(seconds)} kernels compiled in {sum(seconds.values()):.1f} s "
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


def _read_data(path: Path, columns: str | None) -> tuple[np.ndarray, list[str]]:
    """``read_table``, refusing missing and non-finite values with the row that has one."""
    X, names = read_table(path, _parse_columns(columns))
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} of {X.shape[0]} rows have missing or "
                         f"non-finite values (the first is data row {np.argmax(bad) + 1}); "
                         "remove or fill them first")
    return X, names


def _read_model_data(model, args) -> np.ndarray:
    X, _ = _read_data(args.data, args.columns)
    if X.shape[1] != model.n_features_in_:
        raise ValueError(f"{args.data} has {_count(X.shape[1], 'column')} but the model in "
                         f"{args.model} was fitted on {model.n_features_in_}; pick them with "
                         "--columns")
    return X


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _write_csv(stream: TextIO, header: str, rows) -> None:
    stream.write(header + "\n")
    stream.writelines(row + "\n" for row in rows)


# ---------------------------------------------------------------------------
# Fitting and reporting
# ---------------------------------------------------------------------------


def _select(X, ks, covariance_types, criterion, n_init, seed, quiet) -> SelectionResult:
    print(f"Choosing K = {_describe_ks(ks)} and the covariance type "
          f"({', '.join(covariance_types)}) by {criterion.upper()}; "
          f"n_init={n_init}, random_state={seed}")
    print()
    n_cells = len(ks) * len(covariance_types)
    progress = None
    if not quiet and sys.stderr is not None and sys.stderr.isatty():
        progress = ProgressLine(sys.stderr, n_cells)
    try:
        return select_model(X, ks, covariance_types, criterion, n_init=n_init,
                            random_state=seed, progress=progress)
    finally:
        if progress is not None:
            progress.close()


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


def _print_selection(result: SelectionResult, names: list[str]) -> None:
    print(result.format_table())
    print()
    print(describe_choice(result, names))


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
    plot_mixture(result.best_model, X, ax=right)
    right.set_title(f"chosen model: K={k}, {covariance_type} covariance")
    # plot_mixture names plain-array features x0, x1; the file has real names.
    if X.shape[1] <= 2:
        right.set_xlabel(names[0])
    if X.shape[1] == 2:
        right.set_ylabel(names[1])
    save_figure(figure, path)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
