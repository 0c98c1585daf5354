"""Choosing the number of components and the covariance model (BIC / AIC / ICL).

R's mclust made this the everyday workflow: fit a grid of K x covariance
models, keep the best by an information criterion, look at the table and the
criterion curves. :func:`select_model` does that with fastem's kernels;
:class:`GaussianMixtureSelector` wraps it as a scikit-learn estimator.

Criteria follow scikit-learn's sign convention (lower is better):

.. math::

    \\mathrm{BIC} = -2\\log L + p\\log n,\\qquad
    \\mathrm{AIC} = -2\\log L + 2p,\\qquad
    \\mathrm{ICL} = \\mathrm{BIC} + 2\\,\\mathrm{EN},\\quad
    \\mathrm{EN} = -\\sum_n w_n\\sum_k r_{nk}\\log r_{nk}

mclust reports :math:`-\\mathrm{BIC}` and :math:`-\\mathrm{ICL}` (higher is
better) and its ICL uses the MAP classification in place of the soft
responsibilities; multiply by -1 to compare.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import NamedTuple

import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from . import _threads, em
from ._validation import check_sample_weight
from .blocks import INIT_SAMPLE_ROWS, blocks_of, is_out_of_core
from .covariance import COVARIANCE_TYPES, n_free_parameters, precisions_from_cholesky
from .initialization import (
    Hierarchy,
    ShortRunEM,
    candidate_kind,
    column_variance,
    kmeans_plusplus,
    lloyd,
    random_rows,
    seed_statistics,
)
from .missing import MISSING_OPTIONS, MissingValueSource, mean_filled, observed_moments
from .missing import log_responsibilities as missing_log_responsibilities
from .mixture import GaussianMixture, fitted_mixture, rescaled_result
from .priors import check_prior, data_moments, m_step_for
from .scaling import DataScale
from .sources import BlockSource, InMemorySource
from .stats import GaussianParameters, label_statistics_of, log_responsibilities

CRITERIA = ("bic", "aic", "icl")
SELECTION_INITS = ("em-em", "hierarchical", "kmeans", "k-means++")
# Candidate starts per cell of the default search (init_params='em-em'): see
# the README's measurements for the choice.
DEFAULT_BUDGET = 48
# With 'em-em', the first candidates (in order) that are run to convergence
# until one is not degenerate, whatever the short runs chose.
FALLBACK_CANDIDATES = 8
# With 'em-em', every cell is first searched with this many candidates, and
# only the cells within SEARCH_MARGIN (criterion units) of the best then
# with the whole budget. Measured: the cell that finally wins was at most 31
# behind after screening (crabs; galaxies 18, the other data sets 0), and 4
# screening candidates chose the same models as 8 for 10-20 % less time.
SCREEN_BUDGET = 4
SEARCH_MARGIN = 40.0
# A covariance eigenvalue within this factor of reg_covar marks a degenerate fit.
DEGENERATE_FACTOR = 10.0
# Fresh k-means starts tried for a cell whose shared starts all degenerated.
EXTRA_STARTS = 3
TABLE_DTYPE = np.dtype([
    ("n_components", np.int64),
    ("covariance_type", "U9"),
    ("log_likelihood", np.float64),
    ("n_parameters", np.int64),
    ("bic", np.float64),
    ("aic", np.float64),
    ("icl", np.float64),
    ("converged", bool),
    ("n_iter", np.int64),
    ("seconds", np.float64),
    ("status", "U80"),
])
_SLAB = 65536

ProgressCallback = Callable[[int, int, int, str, str], None]


@dataclass
class SelectionResult:
    """Outcome of :func:`select_model`.

    Attributes
    ----------
    best_model : GaussianMixture
        The fitted model with the lowest criterion.
    table : numpy structured array
        One row per (K, covariance type) cell, fields of ``TABLE_DTYPE``.
    criterion : str
    best_index : int
        Row of ``table`` holding ``best_model``.
    models : dict
        ``(K, covariance_type) -> GaussianMixture`` for every successful cell.
    """

    best_model: GaussianMixture
    table: np.ndarray
    criterion: str
    best_index: int
    models: dict = field(repr=False, default_factory=dict)

    @property
    def best_params(self) -> tuple[int, str]:
        row = self.table[self.best_index]
        return int(row["n_components"]), str(row["covariance_type"])

    def to_dataframe(self):
        """The table as a pandas DataFrame (requires pandas)."""
        import pandas as pd

        return pd.DataFrame({name: self.table[name] for name in self.table.dtype.names})

    def format_table(self) -> str:
        """The table as aligned text, best cell marked with '*'."""
        head = (f"{'K':>3} {'covariance':<10} {'log-lik':>12} {'params':>6} {'BIC':>12} "
                f"{'AIC':>12} {'ICL':>12} {'iter':>5} {'conv':>4} {'sec':>7}  status")
        lines = [head, "-" * len(head)]
        for i, row in enumerate(self.table):
            mark = "*" if i == self.best_index else " "
            lines.append(
                f"{row['n_components']:>3} {row['covariance_type']:<10} "
                f"{row['log_likelihood']:>12.3f} {row['n_parameters']:>6d} {row['bic']:>12.3f} "
                f"{row['aic']:>12.3f} {row['icl']:>12.3f} {row['n_iter']:>5d} "
                f"{'yes' if row['converged'] else 'no':>4} {row['seconds']:>7.3f} {mark}"
                f"{row['status']}"
            )
        return "\n".join(lines)


def classification_entropy(model: GaussianMixture, X, sample_weight=None) -> float:
    r"""Weighted entropy of the responsibilities, :math:`-\sum_n w_n\sum_k r_{nk}\log r_{nk}`.

    Computed in row slabs so no full (N, K) array is held.
    """
    X = validate_data(model, X, dtype=[np.float64, np.float32], reset=False, order="C")
    sample_weight = check_sample_weight(sample_weight, X.shape[0])
    return _loglik_and_entropy(model, _slabs(X, sample_weight))[1]


def _slabs(X, sample_weight):
    """(rows, weights) slabs of an in-memory data set (no full (N, K) array at once)."""
    return [(X[start:start + _SLAB],
             None if sample_weight is None else sample_weight[start:start + _SLAB])
            for start in range(0, X.shape[0], _SLAB)]


def _loglik_and_entropy(model: GaussianMixture, slabs) -> tuple[float, float]:
    """log L of the final parameters (not the lower bound of the last E-step)
    and the entropy of the responsibilities, in one pass over ``slabs``
    ((rows, weights) pairs, validated, C-contiguous: :func:`_slabs` or the
    blocks of streamed data)."""
    params = GaussianParameters(*(np.asarray(a, dtype=np.float64) for a in (
        model.weights_, model.means_, model.covariances_, model.precisions_cholesky_)))
    loglik = entropy = 0.0
    with _threads.limit(model.n_threads):
        for X, w in slabs:
            if np.isnan(X).any():  # missing values: marginal densities (fastem.missing)
                log_resp, log_norm = missing_log_responsibilities(X, params,
                                                                  model.covariance_type)
                proba = np.exp(log_resp)
            else:
                proba, log_norm = log_responsibilities(X, params, model.covariance_type,
                                                       probabilities=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                terms = np.where(proba > 0, proba * np.log(proba), 0.0).sum(axis=1)
            if w is None:
                loglik += log_norm.sum()
                entropy -= terms.sum()
            else:
                loglik += log_norm @ w
                entropy -= terms @ w
    return float(loglik), float(entropy)


def _kmeans_start(X, sample_weight, n_components, init_params, random_state):
    seeds, indices = kmeans_plusplus(X, n_components, random_state, sample_weight)
    if init_params == "k-means++":
        labels = np.full(X.shape[0], -1, dtype=np.int32)
        labels[indices] = np.arange(n_components)
        return labels, seeds
    labels, centers, _, _ = lloyd(X, seeds, sample_weight, inertia=False)
    return labels, centers


class _Seeds(NamedTuple):
    """A start that gives one seed row to each component (k-means++, random rows)."""

    rows: np.ndarray


class _Candidates:
    """The candidate starts of one K for short-run EM, made in order on demand.

    The first is the hierarchy cut at K (k-means without a hierarchy), the
    others follow ``initialization.CANDIDATE_KINDS``; all draw in turn from
    one stream, so the first candidates of any budget are the same starts.
    """

    def __init__(self, X, sample_weight, n_components, random_state, hierarchy):
        self.X, self.sample_weight, self.n_components = X, sample_weight, n_components
        self.random_state, self.hierarchy = random_state, hierarchy
        self.cumulative = None if sample_weight is None else np.cumsum(sample_weight)
        self.starts: list = []

    def take(self, budget: int) -> list:
        """The first ``budget`` candidates."""
        X, k = self.X, self.n_components
        while len(self.starts) < budget:
            kind = candidate_kind(len(self.starts),
                                  "kmeans" if self.hierarchy is None else "hierarchical")
            if kind == "hierarchical":
                start = _hierarchical_start(X, self.hierarchy, k)
            elif kind == "kmeans":
                start = _kmeans_start(X, self.sample_weight, k, kind, self.random_state)
            elif kind == "k-means++":
                start = _Seeds(kmeans_plusplus(X, k, self.random_state, self.sample_weight)[1])
            else:
                start = _Seeds(random_rows(X, k, self.random_state, self.cumulative))
            self.starts.append(start)
        return self.starts[:budget]


def _hierarchical_start(X, hierarchy, n_components):
    """Labels of the hierarchy cut at K (rows outside its subset: unassigned)."""
    labels = np.full(X.shape[0], -1, dtype=np.int32)
    labels[hierarchy.rows] = hierarchy.labels(n_components)
    return labels, hierarchy.centres(X, labels, n_components)


def _stream(base_seed: int, n_components: int, kind: int) -> np.random.RandomState:
    """The random stream of one K's starts (``kind`` 0) or extra starts (1)."""
    sequence = np.random.SeedSequence(base_seed, spawn_key=(n_components, kind))
    return np.random.RandomState(sequence.generate_state(4))


def _shared_starts(X, sample_weight, n_components, init_params, n_init, random_state,
                   hierarchy):
    """Hard assignments shared by every covariance type of one K.

    With 'hierarchical', the first start is the hierarchy cut at K and the
    others are k-means starts; seeding depends on K only, so it is done once
    per K and start and reused across covariance types.
    """
    starts = []
    if init_params == "hierarchical":
        starts.append(_hierarchical_start(X, hierarchy, n_components))
    while len(starts) < n_init:
        kind = "kmeans" if init_params == "hierarchical" else init_params
        starts.append(_kmeans_start(X, sample_weight, n_components, kind, random_state))
    return starts


def _initial_parameters(X, sample_weight, start, m_step):
    """Initial parameters of a start (labels and centres), by the cell's M-step."""
    if isinstance(start, _Seeds):
        stats = seed_statistics(X, sample_weight, start.rows, m_step.covariance_type)
    else:
        labels, centers = start
        stats = label_statistics_of(X, sample_weight, labels, centers, m_step.covariance_type)
    return m_step(stats)[0]


def degeneracy(model: GaussianMixture, n_samples: float, data_variance: np.ndarray) -> str:
    r"""Why a fitted mixture is degenerate, or '' when it is not.

    A component is degenerate when

    * its weight is below about one row (:math:`\pi_k n < 1`), or
    * its covariance has an eigenvalue within ``DEGENERATE_FACTOR`` of the
      ``reg_covar`` floor, i.e. :math:`\lambda_{min} \le` ``DEGENERATE_FACTOR``
      :math:`\cdot` reg_covar :math:`+ 10^{-8}\bar\sigma^2` with
      :math:`\bar\sigma^2` the data's mean per-feature variance: the
      component sits on (nearly) identical values in some direction, where
      the likelihood is unbounded and only the floor stops it. Such fits win
      BIC for the wrong reason (the singularity of the Gaussian likelihood).
    """
    small = np.flatnonzero(model.weights_ * n_samples < 1.0)
    if small.size:
        return f"component {int(small[0])} holds less than one row"
    floor = DEGENERATE_FACTOR * model.reg_covar + 1e-8 * float(np.mean(data_variance))
    cov = np.asarray(model.covariances_, dtype=np.float64)
    if model.covariance_type == "full":
        smallest = np.linalg.eigvalsh(cov)[:, 0]
    elif model.covariance_type == "tied":
        smallest = np.full(model.n_components, np.linalg.eigvalsh(cov)[0])
    elif model.covariance_type == "diag":
        smallest = cov.min(axis=1)
    else:
        smallest = cov
    bad = np.flatnonzero(smallest <= floor)
    if bad.size:
        return (f"component {int(bad[0])} variance {smallest[bad[0]]:.2g} "
                f"at the reg_covar floor")
    return ""


class _CellFits:
    """One grid cell: its source and M-step, and the best fits seen so far.

    ``X`` (the rows the starts are computed on: the data, or a sample of
    streamed data whose ``source`` is given) and the starts are rescaled by
    ``rescaled`` (:mod:`fastem.scaling`); the models are in the data's units.
    ``moments()`` gives the data's mean and covariance (rescaled) for a prior.
    """

    def __init__(self, X, sample_weight, n_components, covariance_type, fit_kwargs, n_eff,
                 data_variance, rescaled=DataScale(), source=None, moments=None):
        if source is None:
            source = InMemorySource(X, sample_weight, covariance_type)
        if moments is None:
            def moments():
                return data_moments(X, sample_weight)
        self.X, self.sample_weight = X, sample_weight
        self.n_components, self.covariance_type = n_components, covariance_type
        self.fit_kwargs, self.n_eff, self.data_variance = fit_kwargs, n_eff, data_variance
        self.rescaled, self.source = rescaled, source
        self.m_step, self.resolved_prior = m_step_for(
            covariance_type, fit_kwargs["reg_covar"], fit_kwargs.get("prior"), n_components,
            moments, rescaled)
        # Rows with missing values have fewer coordinates to shift (fastem.missing).
        self.shift = rescaled.log_density_shift(getattr(source, "mean_observed", X.shape[1]))
        self.monitor = em.ConvergenceMonitor(fit_kwargs["tol"])
        self.best = self.best_degenerate = None
        self.reason = ""

    def initial(self, start):
        """The initial parameters of a start, by the cell's M-step."""
        return _initial_parameters(self.X, self.sample_weight, start, self.m_step)

    def consider(self, params, result) -> bool:
        """Keep the fit if it is the best so far; say whether it is sound."""
        rescaled, covariance_type = self.rescaled, self.covariance_type
        result = rescaled_result(result, rescaled, covariance_type, self.shift)
        params = rescaled.parameters_out(params, covariance_type)
        # The start is kept as the model's initial parameters: refitting the
        # model reproduces the cell.
        model = fitted_mixture(
            result, self.X, n_components=self.n_components, covariance_type=covariance_type,
            weights_init=params.weights, means_init=params.means,
            precisions_init=precisions_from_cholesky(params.precisions_cholesky,
                                                     covariance_type), **self.fit_kwargs)
        model.prior_ = self.resolved_prior
        why = degeneracy(model, self.n_eff, self.data_variance)
        if why:
            if (self.best_degenerate is None
                    or model.lower_bound_ > self.best_degenerate.lower_bound_):
                self.best_degenerate, self.reason = model, why
        elif self.best is None or model.lower_bound_ > self.best.lower_bound_:
            self.best = model
        return not why

    def outcome(self):
        """(model, reason): the best sound fit and '', else the best degenerate
        fit and why it is degenerate."""
        if self.best is not None:
            return self.best, ""
        return self.best_degenerate, self.reason


def _fit_cell(X, sample_weight, n_components, covariance_type, starts, fit_kwargs,
              n_eff, data_variance, extra_starts, rescaled=DataScale(), source=None,
              moments=None):
    """Fit one grid cell from each start and keep the best non-degenerate fit.

    Returns (model, reason): reason is '' for a sound fit; otherwise every
    start (including up to ``len(extra_starts)`` fresh ones tried after the
    shared starts all degenerated) gave a degenerate fit, the best of which is
    returned with the reason. The other arguments are those of :class:`_CellFits`.
    """
    cell = _CellFits(X, sample_weight, n_components, covariance_type, fit_kwargs, n_eff,
                     data_variance, rescaled, source, moments)
    initial = [cell.initial(start) for start in starts]
    max_iter = fit_kwargs["max_iter"]
    with _threads.limit(fit_kwargs["n_threads"]):
        # The shared starts run together (in parallel on small data); fresh
        # ones only if every shared start degenerated, one at a time.
        for params, result in zip(initial, em.run_starts(cell.source, cell.m_step, initial,
                                                         cell.monitor, max_iter)):
            cell.consider(params, result)
        while cell.best is None and extra_starts:
            params = cell.initial(extra_starts.pop()())
            cell.consider(params, em.run_em(cell.source, cell.m_step, params, cell.monitor,
                                            max_iter))
    return cell.outcome()


class _ShortRunCell(_CellFits):
    """A grid cell searched by short-run EM (:class:`~fastem.initialization.ShortRunEM`)
    over the candidates of its K, for budgets that may grow between calls.

    For a budget it runs to convergence the search's finalists and the first
    candidates, in order, up to the first that is not degenerate (at most
    ``FALLBACK_CANDIDATES``); both sets only grow with the budget, and every
    fit met so far competes, so a larger budget never ends on a worse fit.
    """

    def __init__(self, candidates: _Candidates, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.candidates = candidates
        self.initial_params: list = []
        self.search = ShortRunEM(self.source, self.m_step, [], self.fit_kwargs["tol"],
                                 self.fit_kwargs["max_iter"])
        self.sound: dict = {}

    def run(self, budget: int):
        """(model, reason) after searching the first ``budget`` candidates (made
        by the caller beforehand: the candidates of a K are shared by threads)."""
        new = [self.initial(start) for start in
               self.candidates.starts[len(self.initial_params):budget]]
        self.initial_params += new
        self.search.extend(new)
        budget = len(self.initial_params)
        search, sound = self.search, self.sound
        with _threads.limit(self.fit_kwargs["n_threads"]):
            for i, result in search.results(search.finalists(budget)).items():
                if i not in sound:
                    sound[i] = self.consider(self.initial_params[i], result)
            for i in range(min(budget, FALLBACK_CANDIDATES)):
                if i not in sound:
                    sound[i] = self.consider(self.initial_params[i], search.result(i))
                if sound[i]:
                    break
        return self.outcome()


@_threads.interruptible
def select_model(
    X,
    n_components: Iterable[int] = range(1, 10),
    covariance_types: Sequence[str] = COVARIANCE_TYPES,
    criterion: str = "bic",
    *,
    n_init: int = DEFAULT_BUDGET,
    init_params: str = "em-em",
    random_state=None,
    sample_weight=None,
    reg_covar: float = 1e-6,
    tol: float = 1e-6,
    max_iter: int = 500,
    n_threads: int | None = None,
    progress: ProgressCallback | None = None,
    prior=None,
    missing: str = "error",
) -> SelectionResult:
    """Fit every (K, covariance type) cell and choose the best by ``criterion``.

    Parameters
    ----------
    X : array-like (n_samples, n_features)
    n_components : int or iterable of int
        Candidate numbers of components (an int alone: that one K).
    covariance_types : sequence of {'full', 'tied', 'diag', 'spherical'}
    criterion : {'bic', 'aic', 'icl'}
        Lower is better (see the module docstring for the formulas).
    n_init : int, default ``DEFAULT_BUDGET`` (48)
        With 'em-em', the budget: candidate starts per cell; otherwise starts
        per cell, each run to convergence. The best non-degenerate fit is
        kept. The starts of one K are shared by all its covariance types, and
        the starts of a budget begin with those of a smaller one.
    init_params : {'em-em', 'hierarchical', 'kmeans', 'k-means++'}
        'em-em' (default): short-run EM (Biernacki, Celeux & Govaert 2003;
        :class:`~fastem.initialization.ShortRunEM`). The candidates of a K
        are the hierarchy cut at K (see 'hierarchical'), then three starts
        at random rows (distinct points, drawn in proportion to the weights)
        for one k-means++ seeding, in turn. In each cell every candidate
        runs 5 EM iterations; successive halving keeps the better half of
        the distinct candidates by log-likelihood and doubles their
        iterations until one is left, and the winners among the first
        ``n_init``, ``n_init/2``, ..., 1 candidates run to convergence (so
        twice the budget never chooses a worse model), as do the first
        candidates, in order, up to the first that is not degenerate (at
        most ``FALLBACK_CANDIDATES``). Every cell is first searched with
        ``SCREEN_BUDGET`` (4) candidates; the cells whose criterion is then
        within ``SEARCH_MARGIN`` (40) of the best are searched with all
        ``n_init``. 'hierarchical': the first start cuts one model-based
        hierarchy (built once for the whole grid, on at most
        ``initialization.HIERARCHY_MAX_ROWS`` rows) at K, the others are
        k-means starts (Lloyd from k-means++ seeds). 'kmeans' and
        'k-means++': every start is of that kind.
    random_state, sample_weight, reg_covar, tol, max_iter, n_threads
        As for :class:`~fastem.GaussianMixture` (weights are relative: BIC's
        :math:`n` is the number of rows of positive weight, and the
        log-likelihood is that of weights rescaled to average 1 over them); ``tol`` defaults to 1e-6
        (not 1e-3) because cells and starts are compared by their
        likelihood, which a loose tolerance leaves short of the optimum.
    progress : callable, optional
        Called as ``progress(cell, n_cells, K, covariance_type, status)``
        after every cell.
    prior : None, 'default' or fastem.GaussianPrior
        As for :class:`~fastem.GaussianMixture`: every cell is fitted by MAP
        EM under this prior (its defaults resolved per cell, as mclust's
        ``defaultPrior`` depends on K and the model), and the criteria use the
        log-likelihood at the MAP estimate, as mclust's do.
    missing : {'error', 'em'}
        As for :class:`~fastem.GaussianMixture`: with 'em', NaN entries are
        missing at random, every cell is fitted to the observed entries and
        the criteria use the observed-data log-likelihood; parameters are
        counted as usual and :math:`n` is the number of rows with an observed
        entry (rows with none are left out, with a warning). The starts run
        on the data with each missing entry set to its column's mean.

    Returns
    -------
    SelectionResult
        A cell that cannot be fitted (for example K larger than the number of
        rows) is reported in the table with its reason and NaN criteria. A
        cell whose every start ends degenerate (see :func:`degeneracy`) is
        reported with status 'degenerate: ...' and its criteria, and cannot
        be chosen, as mclust reports singular fits as missing.
    """
    ks, covariance_types, criterion = _check_grid(
        n_components, covariance_types, criterion, n_init=n_init, init_params=init_params,
        reg_covar=reg_covar, tol=tol, max_iter=max_iter, n_threads=n_threads)
    shape_of = GaussianMixture()
    rng = check_random_state(random_state)
    if is_out_of_core(X):
        # Streamed or memory-mapped: EM passes over the row blocks, the starts
        # on a random sample of about INIT_SAMPLE_ROWS rows (as GaussianMixture.fit).
        blocks = blocks_of(X, sample_weight)
        rescaled = DataScale.of_largest(blocks.largest, blocks.dtype)
        sample, sample_weight = blocks.sample(INIT_SAMPLE_ROWS, rng)
        X = rescaled.data(sample)
        n_rows, n_eff = blocks.n_samples, blocks.n_positive
        shape_of.n_features_in_ = blocks.n_features
        data_variance = blocks.column_variance(rescaled.scale) / rescaled.scale**2
        scored = blocks

        def moments():
            return blocks.moments(rescaled.scale)

        def source_for(covariance_type):
            return BlockSource(blocks, covariance_type, rescaled.scale)
    else:
        # Validated as an estimator would be: DataFrame column names are kept and
        # given to every fitted model (feature_names_in_).
        if missing not in MISSING_OPTIONS:
            raise ValueError(f"missing must be one of {MISSING_OPTIONS}, got {missing!r}")
        X = validate_data(shape_of, X, dtype=[np.float64, np.float32], order="C",
                          ensure_min_samples=2, reset=True,
                          ensure_all_finite="allow-nan" if missing == "em" else True)
        sample_weight = check_sample_weight(sample_weight, X.shape[0])
        with_holes = None
        if missing == "em" and np.isnan(X).any():
            empty = np.isnan(X).all(axis=1)
            if empty.any():
                warnings.warn(f"{int(empty.sum())} row(s) of X have every entry missing; "
                              "they are ignored", UserWarning, stacklevel=2)
                X = np.ascontiguousarray(X[~empty])
                sample_weight = check_sample_weight(
                    None if sample_weight is None else sample_weight[~empty], X.shape[0])
            # EM on the observed entries; starts, hierarchy and moments on the
            # mean-filled rows.
            with_holes, X = X, mean_filled(X)
        # Fitted rescaled by a power of two when the data's squares would leave
        # the float range (fastem.scaling); the models are in the data's units.
        rescaled = DataScale.of(X)
        scored = _slabs(X if with_holes is None else with_holes, sample_weight)
        X = rescaled.data(X)
        n_rows = X.shape[0]
        # Weights are relative (see check_sample_weight): n is the rows that count.
        n_eff = n_rows if sample_weight is None else int(np.count_nonzero(sample_weight))
        data_variance = column_variance(X, sample_weight) / rescaled.scale**2
        in_memory, in_memory_weight = X, sample_weight
        if with_holes is not None:
            # The observed entries' variances, not the mean-filled rows'.
            _, observed_cov = observed_moments(with_holes, sample_weight)
            data_variance = np.diag(observed_cov).copy()

        def moments():
            if with_holes is not None:
                return observed_moments(rescaled.data(with_holes), in_memory_weight)
            return data_moments(in_memory, in_memory_weight)

        def source_for(covariance_type):
            if with_holes is not None:
                return MissingValueSource(rescaled.data(with_holes), in_memory_weight,
                                          covariance_type)
            return InMemorySource(in_memory, in_memory_weight, covariance_type)
    if n_rows < 2:
        raise ValueError(f"Found array with {n_rows} sample(s) while a minimum of 2 is "
                         "required by select_model.")
    check_prior(prior)
    fit_kwargs = dict(reg_covar=reg_covar, tol=tol, max_iter=max_iter, n_threads=n_threads,
                      prior=prior, missing=missing)
    moments = functools.lru_cache(maxsize=1)(moments)
    hierarchy = None
    if init_params in ("hierarchical", "em-em") and X.shape[0] >= 2:
        hierarchy = Hierarchy(X, sample_weight, rng)

    # Every K draws its starts from a stream of its own, and its extra starts
    # from another: the starts of n_init = m + 1 begin with those of n_init = m,
    # so more starts never choose a worse model (with 'em-em', twice as many;
    # see ShortRunEM.finalists).
    base_seed = int(rng.randint(np.iinfo(np.int32).max))
    short_run = init_params == "em-em"
    fitted_ks = [k for k in ks if k <= min(n_rows, X.shape[0])]
    cells = [(k, covariance_type) for k in ks for covariance_type in covariance_types]
    searches, candidates, starts_of, extra_of = {}, {}, {}, {}
    for k in fitted_ks:
        if short_run:
            candidates[k] = _Candidates(X, sample_weight, k, _stream(base_seed, k, 0),
                                        hierarchy)
            continue
        starts_of[k] = _shared_starts(X, sample_weight, k, init_params, int(n_init),
                                      _stream(base_seed, k, 0), hierarchy)
        extra_stream = _stream(base_seed, k, 1)
        extra_of[k] = [functools.partial(_kmeans_start, X, sample_weight, k, "kmeans",
                                         extra_stream) for _ in range(EXTRA_STARTS)]
    seconds = dict.fromkeys(cells, 0.0)

    def fit_cell(cell, budget=None):
        """The table row of one cell and its model (None if it failed); with
        short-run EM, after searching ``budget`` candidates."""
        k, covariance_type = cell
        _threads.check_interrupt()
        t0 = time.perf_counter()
        row = np.zeros((), dtype=TABLE_DTYPE)
        row["n_components"], row["covariance_type"] = k, covariance_type
        row["n_parameters"] = n_free_parameters(k, X.shape[1], covariance_type)
        model = None
        if k not in fitted_ks:
            _fail(row, f"failed: K={k} exceeds the {n_rows} rows")
        else:
            try:
                if short_run:
                    model, reason = searches[cell].run(budget)
                else:
                    model, reason = _fit_cell(
                        X, sample_weight, k, covariance_type, starts_of[k], fit_kwargs, n_eff,
                        data_variance, extra_of[k], rescaled, source_for(covariance_type),
                        moments)
            except Exception as exc:  # a failed cell is a row of the table, not a crash
                _fail(row, f"failed: {exc}"[:80])
                model = None
            else:
                for name in ("n_features_in_", "feature_names_in_"):
                    if hasattr(shape_of, name):
                        setattr(model, name, getattr(shape_of, name))
                _score(row, model, scored, n_eff)
                if reason:
                    row["status"] = f"degenerate: {reason}"[:80]
        seconds[cell] += time.perf_counter() - t0
        row["seconds"] = seconds[cell]
        return row, model

    def fit_cells(chosen, budget=None):
        """``{cell: (row, model)}``; with short-run EM, small cells run at once,
        one per thread (a cell's own chunks are too short to share), each
        computed as it would be alone."""
        if short_run:
            for k in dict.fromkeys(k for k, _ in chosen if k in candidates):
                candidates[k].take(budget)  # here, not in the threads sharing them
        pooled = [cell for cell in chosen if short_run and _threads.n_threads() > 1
                  and cell[0] in fitted_ks and _small(source_for(cell[1]), cell[0])]
        # Largest K first, so that the threads finish together rather than
        # one running the largest cell alone at the end.
        pooled.sort(key=lambda cell: -cell[0])
        done = dict(zip(pooled, _threads.map_threads(lambda c: fit_cell(c, budget), pooled)))
        for cell in chosen:
            if cell not in done:
                done[cell] = fit_cell(cell, budget)
        return done

    with warnings.catch_warnings(), _threads.limit(n_threads):
        warnings.simplefilter("ignore")
        if short_run:
            for cell in cells:
                if cell[0] in fitted_ks:
                    searches[cell] = _ShortRunCell(
                        candidates[cell[0]], X, sample_weight, cell[0], cell[1], fit_kwargs,
                        n_eff, data_variance, rescaled, source_for(cell[1]), moments)
        # Short-run EM first searches every cell with a small budget, then
        # with the whole budget the cells within SEARCH_MARGIN of the best:
        # the others cannot win unless a search improves them by more than
        # the margin, which the measurements never saw (see the README).
        first = min(int(n_init), SCREEN_BUDGET) if short_run else None
        done = fit_cells(cells, first)
        if progress is not None:
            for index, cell in enumerate(cells):
                progress(index + 1, len(cells), cell[0], cell[1], str(done[cell][0]["status"]))
        if short_run and int(n_init) > first:
            sound = [cell for cell in cells if done[cell][0]["status"] == "ok"]
            if sound:
                best_so_far = min(float(done[cell][0][criterion]) for cell in sound)
                contenders = [cell for cell in sound if float(done[cell][0][criterion])
                              <= best_so_far + SEARCH_MARGIN]
                for cell in set(searches) - set(contenders):
                    del searches[cell]  # their candidates' parameters are not needed
                done.update(fit_cells(contenders, int(n_init)))
    searches.clear()
    rows = [done[cell][0] for cell in cells]
    models = {cell: done[cell][1] for cell in cells if done[cell][1] is not None}
    table = np.array(rows, dtype=TABLE_DTYPE)
    scores = np.where(table["status"] == "ok", table[criterion], np.inf)
    if not np.isfinite(scores).any():
        raise ValueError("no cell of the grid could be fitted without failing or degenerating:\n"
                         + "\n".join(sorted(set(table["status"]))))
    best_index = int(np.argmin(scores))
    best = models[(int(table["n_components"][best_index]),
                   str(table["covariance_type"][best_index]))]
    return SelectionResult(best, table, criterion, best_index, models)


def _small(source, n_components) -> bool:
    """Whether a cell's EM runs in the compiled loop on a thread of its own
    (in-memory data, little work): such cells run side by side."""
    applies = getattr(source, "compiled_loop_applies", None)
    return bool(applies is not None and applies(n_components, threads=1))


def _check_grid(n_components, covariance_types, criterion, **fit_arguments):
    """Validate select_model's arguments (scikit-learn's rules and messages).

    Returns the candidate K (a positive int alone means that one K), the
    covariance types and the criterion, lower-cased.
    """
    def invalid(name, expected, got):
        return ValueError(f"The {name!r} parameter of select_model must be {expected}. "
                          f"Got {got!r} instead.")

    def is_count(value):
        return isinstance(value, Integral) and not isinstance(value, bool) and value >= 1

    if is_count(n_components):
        ks = [int(n_components)]
    elif isinstance(n_components, (str, bytes)) or not isinstance(n_components, Iterable):
        raise invalid("n_components", "a positive int or an iterable of positive ints",
                      n_components)
    else:
        ks = list(n_components)
        if not ks or not all(is_count(k) for k in ks):
            raise invalid("n_components", "a positive int or an iterable of positive ints",
                          ks)
        ks = [int(k) for k in ks]
    if isinstance(covariance_types, str):
        covariance_types = (covariance_types,)
    covariance_types = tuple(covariance_types)
    if not covariance_types or any(c not in COVARIANCE_TYPES for c in covariance_types):
        raise invalid("covariance_types", f"a non-empty subset of {COVARIANCE_TYPES}",
                      list(covariance_types))
    if not isinstance(criterion, str) or criterion.lower() not in CRITERIA:
        raise invalid("criterion", f"one of {CRITERIA}", criterion)
    if fit_arguments["init_params"] not in SELECTION_INITS:
        raise invalid("init_params", f"one of {SELECTION_INITS}", fit_arguments["init_params"])
    # The estimator's own constraints for what select_model passes on to it.
    try:
        GaussianMixture(**{name: value for name, value in fit_arguments.items()
                           if name != "init_params"})._validate_params()
    except ValueError as exc:
        raise ValueError(str(exc).replace("of GaussianMixture", "of select_model")) from None
    return ks, covariance_types, criterion.lower()


def _fail(row, status):
    for name in ("log_likelihood", "bic", "aic", "icl"):
        row[name] = np.nan
    row["status"] = status


def _score(row, model, slabs, n_eff):
    loglik, entropy = _loglik_and_entropy(model, slabs)
    p = row["n_parameters"]
    row["log_likelihood"] = loglik
    row["bic"] = -2.0 * loglik + p * math.log(n_eff)
    row["aic"] = -2.0 * loglik + 2.0 * p
    row["icl"] = row["bic"] + 2.0 * entropy
    row["converged"] = model.converged_
    row["n_iter"] = model.n_iter_
    row["status"] = "ok"


class GaussianMixtureSelector(DensityMixin, BaseEstimator):
    """Estimator form of :func:`select_model`, usable in a Pipeline.

    ``fit`` runs the grid and keeps the chosen model as ``best_estimator_``;
    ``predict``, ``predict_proba``, ``score_samples``, ``score`` and
    ``sample`` delegate to it.

    Attributes
    ----------
    best_estimator_ : GaussianMixture
    n_components_, covariance_type_ : the chosen cell
    table_ : numpy structured array (see :data:`TABLE_DTYPE`)
    """

    def __init__(self, n_components=range(1, 10), covariance_types=COVARIANCE_TYPES,
                 criterion="bic", *, n_init=DEFAULT_BUDGET, init_params="em-em",
                 random_state=None,
                 reg_covar=1e-6, tol=1e-6, max_iter=500, n_threads=None, prior=None,
                 missing="error"):
        self.n_components = n_components
        self.covariance_types = covariance_types
        self.criterion = criterion
        self.n_init = n_init
        self.init_params = init_params
        self.random_state = random_state
        self.reg_covar = reg_covar
        self.tol = tol
        self.max_iter = max_iter
        self.n_threads = n_threads
        self.prior = prior
        self.missing = missing

    def fit(self, X, y=None, sample_weight=None):
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2,
                          ensure_all_finite="allow-nan" if self.missing == "em" else True)
        result = select_model(
            X, self.n_components, self.covariance_types, self.criterion, n_init=self.n_init,
            init_params=self.init_params, random_state=self.random_state,
            sample_weight=sample_weight, reg_covar=self.reg_covar, tol=self.tol,
            max_iter=self.max_iter, n_threads=self.n_threads, prior=self.prior,
            missing=self.missing,
        )
        self.best_estimator_ = result.best_model
        self.n_components_, self.covariance_type_ = result.best_params
        self.table_ = result.table
        return self

    def _best(self, X):
        check_is_fitted(self)
        validate_data(self, X, reset=False)
        return self.best_estimator_

    def predict(self, X):
        return self._best(X).predict(X)

    def predict_proba(self, X):
        return self._best(X).predict_proba(X)

    def score_samples(self, X):
        return self._best(X).score_samples(X)

    def score(self, X, y=None):
        return self._best(X).score(X)

    def bic(self, X):
        return self._best(X).bic(X)

    def sample(self, n_samples=1):
        check_is_fitted(self)
        return self.best_estimator_.sample(n_samples)
