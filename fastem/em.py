"""The one EM driver: starts, convergence, repairs, history.

EM is sufficient statistics. A *statistics source* turns the current
parameters into additive statistics and the objective's contribution (one
pass over the data, wherever the data lives); an *M-step* turns statistics
into parameters. This module is the only place that iterates::

    params ──► source.statistics(params) ──► stats ──► m_step(stats) ──► params
                        ▲                                                  │
                        └──────────── until the objective settles ◄────────┘

A source provides ``statistics(params) -> GaussianStatistics`` and may provide
``compiled_em(params, m_step, lower_bound, tol, max_iter)``, a whole loop in
compiled code that stops before any M-step needing repair (see
:class:`fastem.sources.InMemorySource`). An M-step provides ``__call__(stats)
-> (params, jitter)``, ``objective(stats, params)`` (of the statistics taken
under ``params``) and ``reseed(params, components, point, weight)`` (see
:class:`fastem.stats.MaximumLikelihood` and :class:`fastem.priors.MaximumPosterior`).
A variational M-step (:class:`fastem.variational.VariationalUpdate`) says
``objective_after_update`` (its bound is ``objective(stats, params, updated)``)
and ``keeps_empty_components`` (no re-seeding). Everything else here knows
nothing of Gaussians.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from time import perf_counter

import numpy as np

from . import _threads

# A component whose responsibility mass falls below this fraction of an
# average row's weight is treated as collapsed (see ``_repair``).
COLLAPSE_FRACTION = 1e-8


# scikit-learn's message for a covariance that is not positive definite with reg_covar=0.
ILL_DEFINED_COVARIANCE = (
    "Fitting the mixture model failed because some components have ill-defined empirical "
    "covariance (for instance caused by singleton or collapsed samples). Try to decrease "
    "the number of components, increase reg_covar, or scale the input data.")


class DegenerateDataWarning(UserWarning):
    """A component collapsed or a covariance needed extra diagonal loading."""


@dataclass
class EMResult:
    """Outcome of EM from one start.

    Attributes
    ----------
    params
        Parameters after the last M-step.
    lower_bound : float
        Objective of the last iteration (under the parameters entering it,
        scikit-learn's convention); -inf if no iteration ran.
    lower_bounds : list of float
        Objective per iteration.
    n_iter : int
    converged : bool
    """

    params: object
    lower_bound: float
    lower_bounds: list = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False


class ConvergenceMonitor:
    """Convergence test and progress report shared by every estimator.

    EM has converged when the objective changes by less than ``tol`` between
    iterations. With ``verbose`` >= 1 the monitor prints scikit-learn's
    progress lines (start, every ``verbose_interval`` iterations, end); with
    ``verbose`` >= 2 also the time per iteration and the change.
    """

    def __init__(self, tol: float, verbose: int = 0, verbose_interval: int = 10,
                 stream=None):
        self.tol = tol
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.stream = stream
        self._start_time = self._iter_time = perf_counter()

    @property
    def quiet(self) -> bool:
        return self.verbose < 1

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def begin_start(self, index: int) -> None:
        if not self.quiet:
            self._print(f"Initialization {index}")
            self._start_time = self._iter_time = perf_counter()

    def converged(self, n_iter: int, change: float, objective: float | None = None) -> bool:
        """Report iteration ``n_iter`` and say whether EM has converged.

        With ``verbose`` >= 2 the line is scikit-learn's, followed by the
        objective and the time per iteration since the last line (long fits,
        out-of-core and distributed ones especially, show their progress).
        """
        if not self.quiet and n_iter % self.verbose_interval == 0:
            if self.verbose == 1:
                self._print(f"  Iteration {n_iter}")
            else:
                now = perf_counter()
                lapse = now - self._iter_time
                extra = "" if objective is None else (
                    f"\t lower bound {objective:.5f}\t "
                    f"{1e3 * lapse / self.verbose_interval:.1f} ms/iter")
                self._print(f"  Iteration {n_iter}\t time lapse {lapse:.5f}s\t "
                            f"ll change {change:.5f}{extra}")
                self._iter_time = now
        return abs(change) < self.tol

    def end_start(self, result: EMResult) -> None:
        if self.quiet:
            return
        msg = "converged" if result.converged else "did not converge"
        if self.verbose == 1:
            self._print(f"Initialization {msg}.")
        else:
            self._print(f"Initialization {msg}. time lapse "
                        f"{perf_counter() - self._start_time:.5f}s\t lower bound "
                        f"{result.lower_bound:.5f}.")


def run_em(source, m_step, params, monitor: ConvergenceMonitor, max_iter: int,
           lower_bound: float = -np.inf) -> EMResult:
    """EM from ``params``: statistics, M-step, until the objective settles.

    The objective of iteration ``t`` is the M-step's objective of the
    statistics taken under the parameters entering it. When the source has a
    compiled loop (and the monitor is quiet), it runs first and hands over
    here at the first iteration that needs a repair.
    """
    lower_bounds: list[float] = []
    _threads.check_interrupt()
    if max_iter == 0:
        return EMResult(params, lower_bound)
    compiled = getattr(source, "compiled_em", None)
    if compiled is not None and monitor.quiet:
        outcome = compiled(params, m_step, lower_bound, monitor.tol, max_iter)
        if outcome is not None:
            params, lower_bounds, converged, handed_over = outcome
            if lower_bounds:
                lower_bound = lower_bounds[-1]
            if not handed_over:
                return EMResult(params, lower_bound, lower_bounds, len(lower_bounds), converged)
    return _python_em(source, m_step, params, monitor, max_iter, lower_bound, lower_bounds)


def _python_em(source, m_step, params, monitor, max_iter, lower_bound, lower_bounds):
    """The Python-driven loop (it owns the repairs), continuing ``lower_bounds``."""
    converged = False
    reseeded = None
    n_iter = len(lower_bounds)
    while n_iter < max_iter:
        _threads.check_interrupt()
        n_iter += 1
        previous = lower_bound
        stats = source.statistics(params)
        if getattr(m_step, "objective_after_update", False):
            # A variational bound takes the responsibilities of this E-step
            # and the parameters the update makes of them.
            updated, reseeded = _m_step_with_repairs(m_step, stats, reseeded)
            lower_bound = m_step.objective(stats, params, updated)
            params = updated
        else:
            lower_bound = m_step.objective(stats, params)
            params, reseeded = _m_step_with_repairs(m_step, stats, reseeded)
        lower_bounds.append(lower_bound)
        if monitor.converged(n_iter, lower_bound - previous, lower_bound):
            converged = True
            break
    return EMResult(params, lower_bound, lower_bounds, n_iter, converged)


def _m_step_with_repairs(m_step, stats, reseeded):
    """The M-step, and the policy for what it could not do cleanly.

    A covariance that needed diagonal loading warns (with ``reg_covar=0`` it
    is scikit-learn's ``ValueError`` instead); one that could not be
    made positive definite (non-finite statistics) is an error. A component
    that no row is responsible for any more is re-seeded once per start at
    the worst-explained row, with the weight of one average row; if it
    collapses again it is left empty (weight ~0), as scikit-learn does. Both
    warn with :class:`DegenerateDataWarning`.
    """
    params, jitter = m_step(stats)
    if np.any(jitter < 0):
        raise ValueError(_unrepresentable(stats, np.flatnonzero(jitter < 0)))
    if np.any(jitter > 0) and getattr(m_step, "reg_covar", None) == 0:
        # No regularisation asked for: scikit-learn's error, not a repair.
        raise ValueError(ILL_DEFINED_COVARIANCE)
    if np.any(jitter > 0):
        warnings.warn(
            f"covariance of component(s) {np.flatnonzero(jitter > 0).tolist()} was not "
            f"positive definite; added up to {jitter.max():.3g} to its diagonal. "
            "Increase reg_covar or check for duplicated or constant data.",
            DegenerateDataWarning, stacklevel=4,
        )
    if reseeded is None:
        reseeded = np.zeros(stats.nk.shape[0], dtype=bool)
    if getattr(m_step, "keeps_empty_components", False):
        # An emptied component is the prior's answer (variational EM prunes so).
        return params, reseeded
    collapsed = stats.nk < COLLAPSE_FRACTION * stats.weight / max(stats.count, 1.0)
    if np.any(collapsed):
        reseed = collapsed & ~reseeded
        if np.any(reseed) and np.any(~collapsed) and stats.worst_point is not None:
            params = m_step.reseed(params, reseed, stats.worst_point,
                                   1.0 / max(stats.count, 1.0))
            reseeded = reseeded | reseed
            action = "re-seeded at the worst-explained point"
        else:
            action = "left empty"
        warnings.warn(
            f"component(s) {np.flatnonzero(collapsed).tolist()} collapsed (no responsibility "
            f"mass) and were {action}. Consider fewer components.",
            DegenerateDataWarning, stacklevel=4,
        )
    return params, reseeded


def _unrepresentable(stats, components) -> str:
    """Why the M-step found no positive definite covariance (non-finite statistics)."""
    which = components.tolist()
    if not (np.all(np.isfinite(stats.sxx)) and np.all(np.isfinite(stats.sx))):
        # The data are finite (validated), so their squares overflowed.
        return (f"The scatter of component(s) {which} overflowed float64: the data are "
                "spread over more than about 1e154, beyond the float64 range of a "
                "covariance. Rescale the data (for example, standardise each column).")
    return (f"The covariance of component(s) {which} could not be made positive definite; "
            "the initial parameters or reg_covar are not finite or too extreme.")


def run_starts(source, m_step, starts: Sequence, monitor: ConvergenceMonitor,
               max_iter: int) -> list[EMResult]:
    """:func:`run_em` from each of ``starts``, in order.

    When the source has a compiled loop, the starts' loops run at once on the
    threads of :mod:`fastem._threads` (each is serial, so every result is the
    one the start gives alone); hand-overs then continue here, one by one.
    """
    compiled = getattr(source, "compiled_em", None)
    if (compiled is None or not monitor.quiet or max_iter == 0 or len(starts) < 2
            or _threads.n_threads() < 2):
        return [run_em(source, m_step, params, monitor, max_iter) for params in starts]
    outcomes = _threads.map_threads(
        lambda params: compiled(params, m_step, -np.inf, monitor.tol, max_iter), starts)
    results = []
    for params, outcome in zip(starts, outcomes):
        if outcome is None:
            results.append(run_em(source, m_step, params, monitor, max_iter))
            continue
        params, lower_bounds, converged, handed_over = outcome
        lower_bound = lower_bounds[-1] if lower_bounds else -np.inf
        if handed_over:
            results.append(_python_em(source, m_step, params, monitor, max_iter, lower_bound,
                                      lower_bounds))
        else:
            results.append(EMResult(params, lower_bound, lower_bounds, len(lower_bounds),
                                    converged))
    return results


def stepwise_update(source, m_step, params, running, step_size: float,
                    m_step_weight: float = 1.0):
    r"""One step of stepwise (online) EM (Cappé & Moulines 2009; Liang & Klein 2009).

    The statistics of the batch ``source`` under ``params``, per unit weight
    (:math:`\hat s = s_B / \sum_{n\in B} w_n`), are blended into the running
    statistics,

    .. math::

        \bar s_t = (1-\rho_t)\,\bar s_{t-1} + \rho_t\,\hat s_t,

    and the M-step (with the driver's repairs) turns them into parameters
    (the running statistics times ``m_step_weight``: a MAP M-step weighs its
    prior against that many rows). ``running`` None starts the sequence
    (:math:`\bar s_1 = \hat s_1`).

    Returns
    -------
    params, running, objective
        The new parameters, the running statistics and the batch's objective
        under ``params`` (its average log-likelihood).
    """
    _threads.check_interrupt()
    stats = source.statistics(params)
    # Per unit weight; the row count stays the batch's, for the repairs'
    # "average row" (weight / count).
    batch = replace(stats.scaled(1.0 / stats.weight), count=stats.count)
    if running is None:
        running = batch
    else:
        blended = running.scaled(1.0 - step_size) + batch.scaled(step_size)
        running = replace(blended, count=stats.count, worst_loglik=stats.worst_loglik,
                          worst_point=stats.worst_point)
    # A prior's M-step weighs the running statistics as ``m_step_weight`` rows.
    blended = running if m_step_weight == 1.0 else running.scaled(m_step_weight)
    new_params, _ = _m_step_with_repairs(m_step, blended, None)
    return new_params, running, m_step.objective(stats, params)


def best_result(results: Sequence[EMResult]) -> int:
    """Index of the start with the highest objective: the first of equals, and
    the last start while every objective is -inf (scikit-learn's rule)."""
    best = 0
    for i, result in enumerate(results):
        incumbent = results[best].lower_bound
        if result.lower_bound > incumbent or incumbent == -np.inf:
            best = i
    return best


def fit_em(source, m_step, start: Callable[[int], object], n_init: int,
           monitor: ConvergenceMonitor, max_iter: int,
           lower_bound: float = -np.inf) -> tuple[EMResult, list[EMResult]]:
    """EM from ``n_init`` starts; returns the best result and every start's.

    ``start(i)`` makes the i-th initial parameters. Starts are made in order
    from one random stream, so the first m starts of ``n_init = m + 1`` are
    those of ``n_init = m`` and more starts never give a worse fit.
    ``lower_bound`` is the objective entering the first start (a warm start
    continues from its previous value).
    """
    results = []
    for index in range(n_init):
        monitor.begin_start(index)
        result = run_em(source, m_step, start(index), monitor, max_iter,
                        lower_bound if index == 0 else -np.inf)
        monitor.end_start(result)
        results.append(result)
    return results[best_result(results)], results
