"""``GaussianMixture``: scikit-learn's estimator, fitted by fastem's kernels.

The class validates input, chooses starting points and runs the EM driver;
all arithmetic over the data happens in :mod:`fastem.stats` (one fused pass
per iteration yielding sufficient statistics, then a tiny M-step).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from numbers import Integral, Real
from time import perf_counter

import numba
import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._kernels._blocks import n_chunks_for
from ._kernels.blas import blas_routines
from ._kernels.emloop import em_loop
from ._kernels.mstep import factor_covariance
from ._validation import (
    check_means,
    check_precisions,
    check_sample_weight,
    check_weights,
    covariances_from_precision_cholesky,
    precision_cholesky_from_precisions,
    precisions_from_cholesky,
)
from .initialization import INIT_METHODS, initial_statistics
from .stats import (
    COVARIANCE_KIND,
    COVARIANCE_TYPES,
    GaussianParameters,
    GaussianStatistics,
    e_step_statistics,
    from_canonical,
    log_responsibilities,
    m_step,
    to_canonical,
    weights_operand,
)

# A component whose responsibility mass falls below this fraction of an
# average row's weight is treated as collapsed (see ``_repair_collapsed``).
_COLLAPSE_FRACTION = 1e-8
# Below this much work per iteration (rows x K x (D+1)^2) the whole EM loop
# runs in compiled code: per-call overhead would otherwise dominate.
_COMPILED_LOOP_WORK = 2_000_000


class DegenerateDataWarning(UserWarning):
    """A component collapsed or a covariance needed extra diagonal loading."""


@contextmanager
def _numba_threads(n_threads):
    """Run the enclosed kernels on at most ``n_threads`` Numba threads."""
    if n_threads is None:
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


@functools.cache
def _start_pool(workers: int) -> ThreadPoolExecutor:
    """Threads that run the compiled EM loops of several starts at once."""
    return ThreadPoolExecutor(workers, thread_name_prefix="fastem-start")


# A forked child inherits the pool but not its threads: give it a fresh one.
os.register_at_fork(after_in_child=_start_pool.cache_clear)


def n_free_parameters(n_components: int, n_features: int, covariance_type: str) -> int:
    r"""Number of free parameters of a Gaussian mixture.

    Means :math:`KD`, weights :math:`K-1`, and covariances
    :math:`K D(D+1)/2` (full), :math:`D(D+1)/2` (tied), :math:`KD` (diag) or
    :math:`K` (spherical).
    """
    cov = {
        "full": n_components * n_features * (n_features + 1) // 2,
        "tied": n_features * (n_features + 1) // 2,
        "diag": n_components * n_features,
        "spherical": n_components,
    }[covariance_type]
    return int(cov + n_components * n_features + n_components - 1)


class GaussianMixture(DensityMixin, BaseEstimator):
    r"""Gaussian mixture model fitted by EM, a drop-in for scikit-learn's.

    Same parameters, attributes, methods and results as
    :class:`sklearn.mixture.GaussianMixture`; each EM iteration is one fused,
    multi-threaded pass over the data that accumulates the sufficient
    statistics :math:`N_k, \sum r x, \sum r x x^T` without forming the
    ``(n_samples, n_components)`` responsibility matrix.

    Parameters
    ----------
    n_components : int, default=1
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
    tol : float, default=1e-3
        Convergence threshold on the change of the per-sample average
        log-likelihood (the lower bound).
    reg_covar : float, default=1e-6
        Added to the diagonal of every covariance.
    max_iter : int, default=100
    n_init : int, default=1
        Number of starts; the one with the highest lower bound is kept.
    init_params : {'kmeans', 'k-means++', 'random', 'random_from_data', 'hierarchical'}, \
default='kmeans'
        'kmeans' runs Lloyd's k-means seeded by greedy k-means++;
        'hierarchical' cuts a model-based agglomerative hierarchy (Fraley
        1998) at ``n_components``, built on at most 1000 rows (a weighted
        random subset of larger data), which is deterministic when the data
        has at most that many rows.
    weights_init, means_init, precisions_init : array-like, optional
        User-provided initial parameters (scikit-learn's shapes).
    random_state : int, RandomState instance or None
    warm_start : bool, default=False
    verbose : int, default=0
    verbose_interval : int, default=10
    n_threads : int or None, default=None
        Cap on the Numba threads used by this estimator (None: Numba's setting).
        Results are bit-identical whatever the thread count.

    Attributes
    ----------
    weights_, means_, covariances_, precisions_, precisions_cholesky_ : ndarray
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
    lower_bounds_ : list of float
        Lower bound per iteration of the best start.
    init_lower_bounds_ : list of list of float
        Lower bound per iteration of every start (fastem only).
    n_features_in_ : int
    feature_names_in_ : ndarray of str
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "covariance_type": [StrOptions(set(COVARIANCE_TYPES))],
        "tol": [Interval(Real, 0.0, None, closed="left")],
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "init_params": [StrOptions(set(INIT_METHODS))],
        "weights_init": ["array-like", None],
        "means_init": ["array-like", None],
        "precisions_init": ["array-like", None],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
        "verbose": ["verbose"],
        "verbose_interval": [Interval(Integral, 1, None, closed="left")],
        "n_threads": [Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(
        self,
        n_components=1,
        *,
        covariance_type="full",
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="kmeans",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        random_state=None,
        warm_start=False,
        verbose=0,
        verbose_interval=10,
        n_threads=None,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.n_threads = n_threads

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None, sample_weight=None):
        """Estimate the parameters with EM (``n_init`` starts, best kept).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative row weights; an integer weight is equivalent to
            repeating the row.

        Returns
        -------
        self
        """
        self._validate_params()
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2,
                          order="C")
        if X.shape[0] < self.n_components:
            raise ValueError(
                "Expected n_samples >= n_components but got n_components = "
                f"{self.n_components}, n_samples = {X.shape[0]}"
            )
        sample_weight = check_sample_weight(sample_weight, X.shape[0])
        user_init = self._check_initial_parameters(X)
        with _numba_threads(self.n_threads):
            self._fit_em(X, sample_weight, user_init)
        return self

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit, then return the most probable component of every row of ``X``."""
        return self.fit(X, y, sample_weight).predict(X)

    def _check_initial_parameters(self, X):
        n_features = X.shape[1]
        K = self.n_components
        return dict(
            weights=None if self.weights_init is None else check_weights(self.weights_init, K),
            means=None if self.means_init is None else check_means(self.means_init, K,
                                                                   n_features),
            precisions=None if self.precisions_init is None else check_precisions(
                self.precisions_init, self.covariance_type, K, n_features),
        )

    def _fit_prevalidated(self, X, sample_weight, initial: GaussianParameters):
        """Fit from ``initial`` on input already validated by the caller.

        Model selection fits hundreds of cells on one validated array; this
        skips re-validating it (and the initial parameters it built) each time.
        """
        self.n_features_in_ = X.shape[1]
        with _numba_threads(self.n_threads):
            self._fit_em(X, sample_weight, None, initial)
        return self

    def _fit_em(self, X, sample_weight, user_init, initial=None):
        do_init = not (self.warm_start and hasattr(self, "converged_"))
        n_init = self.n_init if do_init else 1
        random_state = check_random_state(self.random_state)
        best = None
        max_lower_bound = -np.inf
        self.init_lower_bounds_ = []
        for init in range(n_init):
            self._print_init_begin(init)
            if initial is not None:
                params, lower_bound = initial, -np.inf
            elif do_init:
                params = self._initial_parameters(X, sample_weight, random_state, user_init)
                lower_bound = -np.inf
            else:
                params = self._current_parameters()
                lower_bound = self.lower_bound_
            if self.max_iter == 0:
                best = (params, 0, [], False)
                continue
            params, lower_bound, lower_bounds, n_iter, converged = self.run_em(
                X, sample_weight, params, lower_bound
            )
            self.init_lower_bounds_.append(lower_bounds)
            self._print_init_end(lower_bound, converged)
            if lower_bound > max_lower_bound or max_lower_bound == -np.inf:
                max_lower_bound = lower_bound
                best = (params, n_iter, lower_bounds, converged)
        self._adopt_fit(X, *best, max_lower_bound)

    def _adopt_fit(self, X, params, n_iter, lower_bounds, converged, lower_bound):
        """Set the fitted attributes from the kept start's outcome."""
        if not converged and self.max_iter > 0:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
            )
        self._set_parameters(params, X.dtype)
        self.converged_ = converged
        self.n_iter_ = n_iter
        self.lower_bound_ = lower_bound
        self.lower_bounds_ = lower_bounds

    def _fit_starts_prevalidated(self, X, sample_weight, starts, models):
        """Fit ``models[i]`` from ``starts[i]`` (GaussianParameters) on validated input.

        The models must share this estimator's settings and differ only in
        their initial parameters. On small data the compiled EM loops of the
        starts run at once (see :meth:`_run_em_starts`), with the same results
        as fitting each alone; otherwise the starts are fitted one after the
        other.
        """
        with _numba_threads(self.n_threads):
            outcomes = self._run_em_starts(X, sample_weight, starts)
        for model, (params, lower_bound, lower_bounds, n_iter, converged) in zip(models,
                                                                                outcomes):
            model.n_features_in_ = X.shape[1]
            model.init_lower_bounds_ = [lower_bounds]
            model._adopt_fit(X, params, n_iter, lower_bounds, converged, lower_bound)
        return models

    def run_em(self, X, sample_weight, params: GaussianParameters, lower_bound=-np.inf):
        """The EM loop from ``params``: E-step statistics, M-step, until converged.

        The lower bound of iteration ``t`` is the average log-likelihood under
        the parameters entering that iteration (scikit-learn's convention);
        iteration stops when it changes by less than ``tol``. On small data the
        iterations run in compiled code until one needs a repair (see
        ``_repair_collapsed``); the Python loop below takes over from there.

        Returns
        -------
        params, lower_bound, lower_bounds (list), n_iter, converged
        """
        lower_bounds = []
        if self._compiled_loop_applies(X):
            params, lower_bounds, converged, handed_over = self._run_compiled_em(
                X, sample_weight, params, lower_bound)
            if lower_bounds:
                lower_bound = lower_bounds[-1]
            if not handed_over:
                return params, lower_bound, lower_bounds, len(lower_bounds), converged
        return self._run_python_em(X, sample_weight, params, lower_bound, lower_bounds)

    def _run_em_starts(self, X, sample_weight, starts):
        """:meth:`run_em` from each of ``starts``: a list of its return values.

        On small data the compiled loops of the starts run at once from up to
        ``numba.get_num_threads()`` Python threads (the loop releases the
        GIL); each is the same serial computation as alone, so the results do
        not depend on the thread count. Hand-overs continue here, in turn.
        """
        workers = min(len(starts), numba.get_num_threads())
        if workers < 2 or self.max_iter == 0 or not self._compiled_loop_applies(X):
            return [self.run_em(X, sample_weight, params) for params in starts]
        compiled = list(_start_pool(workers).map(
            lambda params: self._run_compiled_em(X, sample_weight, params, -np.inf), starts))
        outcomes = []
        for params, lower_bounds, converged, handed_over in compiled:
            lower_bound = lower_bounds[-1] if lower_bounds else -np.inf
            if handed_over:
                outcomes.append(self._run_python_em(X, sample_weight, params, lower_bound,
                                                    lower_bounds))
            else:
                outcomes.append((params, lower_bound, lower_bounds, len(lower_bounds), converged))
        return outcomes

    def _run_python_em(self, X, sample_weight, params, lower_bound, lower_bounds):
        """The Python-driven EM loop (it owns the repairs), continuing ``lower_bounds``."""
        converged = False
        reseeded = np.zeros(self.n_components, dtype=bool)
        n_iter = len(lower_bounds)
        while n_iter < self.max_iter:
            n_iter += 1
            previous = lower_bound
            stats = e_step_statistics(X, sample_weight, params, self.covariance_type)
            lower_bound = stats.loglik / stats.weight
            params = self._m_step(stats, X.shape[0], reseeded)
            lower_bounds.append(lower_bound)
            change = lower_bound - previous
            self._print_iter_end(n_iter, change)
            if abs(change) < self.tol:
                converged = True
                break
        return params, lower_bound, lower_bounds, n_iter, converged

    def _compiled_loop_applies(self, X):
        n_samples, n_features = X.shape
        work = n_samples * self.n_components * (n_features + 1) ** 2
        return self.verbose == 0 and work <= _COMPILED_LOOP_WORK

    def _run_compiled_em(self, X, sample_weight, params, lower_bound):
        trmm, syrk = blas_routines()
        sw = weights_operand(sample_weight)
        weight = X.shape[0] if sample_weight is None else sample_weight.sum()
        kind = COVARIANCE_KIND[self.covariance_type]
        covariances = (np.zeros_like(params.precisions_cholesky) if params.covariances is None
                       else params.covariances)
        full = kind <= 1
        n_chunks = n_chunks_for(X.shape[0], self.n_components * X.shape[1]
                                * (X.shape[1] if full else 1))
        weights, means, cov, prec_chol, lower_bounds, converged, handed_over = em_loop(
            X, sw, np.asarray(params.weights, dtype=np.float64),
            np.ascontiguousarray(params.means, dtype=np.float64),
            to_canonical(covariances, self.covariance_type),
            to_canonical(params.precisions_cholesky, self.covariance_type),
            kind, float(self.reg_covar), float(self.tol), int(self.max_iter), float(lower_bound),
            _COLLAPSE_FRACTION * weight / X.shape[0], n_chunks, trmm, syrk)
        cov, prec_chol = from_canonical(cov, prec_chol, self.covariance_type)
        params = GaussianParameters(np.asarray(weights, dtype=np.float64),
                                    np.asarray(means, dtype=np.float64),
                                    np.asarray(cov, dtype=np.float64),
                                    np.asarray(prec_chol, dtype=np.float64))
        return params, lower_bounds.tolist(), bool(converged), bool(handed_over)

    def _m_step(self, stats: GaussianStatistics, n_samples, reseeded):
        params, jitter = m_step(stats, self.reg_covar, self.covariance_type)
        if np.any(jitter < 0):
            raise ValueError(
                "A covariance could not be made positive definite; the data or the "
                "initial parameters contain non-finite values."
            )
        if np.any(jitter > 0):
            warnings.warn(
                f"covariance of component(s) {np.flatnonzero(jitter > 0).tolist()} was not "
                f"positive definite; added up to {jitter.max():.3g} to its diagonal. "
                "Increase reg_covar or check for duplicated or constant data.",
                DegenerateDataWarning,
            )
        collapsed = stats.nk < _COLLAPSE_FRACTION * stats.weight / n_samples
        if np.any(collapsed):
            params = self._repair_collapsed(params, stats, collapsed, reseeded, n_samples)
        return params

    def _repair_collapsed(self, params, stats, collapsed, reseeded, n_samples):
        """Policy for components that no row is responsible for any more.

        The first time a component collapses within a start, it is re-seeded
        at the worst-explained row, with the average covariance of the live
        components and the weight of one average row. If it collapses again it
        is left empty (weight ~0: it no longer affects the fit), as
        scikit-learn does. Either way a ``DegenerateDataWarning`` is issued.
        """
        reseed = collapsed & ~reseeded
        live = ~collapsed
        if np.any(reseed) and np.any(live) and stats.worst_point is not None:
            weights, means, cov, prec_chol = (np.array(p, dtype=np.float64) for p in params)
            means[reseed] = stats.worst_point
            if self.covariance_type != "tied":
                typical = np.average(cov[live], axis=0, weights=weights[live])
                cov[reseed] = typical
                prec_chol[reseed] = _precision_cholesky_of(typical, self.covariance_type)
            weights[reseed] = 1.0 / n_samples
            weights /= weights.sum()
            reseeded |= reseed
            params = GaussianParameters(weights, means, cov, prec_chol)
            action = "re-seeded at the worst-explained point"
        else:
            action = "left empty"
        warnings.warn(
            f"component(s) {np.flatnonzero(collapsed).tolist()} collapsed (no responsibility "
            f"mass) and were {action}. Consider fewer components.",
            DegenerateDataWarning,
        )
        return params

    def _initial_parameters(self, X, sample_weight, random_state, user_init):
        """Initial parameters: from the chosen init, overridden by user values."""
        needs_data_init = any(v is None for v in user_init.values())
        if needs_data_init:
            stats = initial_statistics(X, sample_weight, self.n_components, self.init_params,
                                       self.covariance_type, random_state)
            weights, means, cov, prec_chol = m_step(stats, self.reg_covar,
                                                    self.covariance_type)[0]
        else:
            weights = means = cov = prec_chol = None
        if user_init["weights"] is not None:
            weights = np.asarray(user_init["weights"], dtype=np.float64)
        if user_init["means"] is not None:
            means = np.asarray(user_init["means"], dtype=np.float64)
        if user_init["precisions"] is not None:
            prec_chol = precision_cholesky_from_precisions(user_init["precisions"],
                                                           self.covariance_type)
            cov = covariances_from_precision_cholesky(prec_chol, self.covariance_type)
        return GaussianParameters(weights, means, cov, prec_chol)

    # --------------------------------------------------------- attributes
    def _current_parameters(self):
        return GaussianParameters(
            *(np.asarray(a, dtype=np.float64) for a in (
                self.weights_, self.means_, self.covariances_, self.precisions_cholesky_))
        )

    def _set_parameters(self, params: GaussianParameters, dtype):
        weights, means, cov, prec_chol = (np.asarray(p, dtype=dtype) for p in params)
        self.weights_, self.means_, self.covariances_ = weights, means, cov
        self.precisions_cholesky_ = prec_chol
        self.precisions_ = precisions_from_cholesky(prec_chol, self.covariance_type)

    # ------------------------------------------------------------ predict
    def _log_resp(self, X, probabilities=False):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False, order="C")
        with _numba_threads(self.n_threads):
            log_resp, log_norm = log_responsibilities(X, self._current_parameters(),
                                                      self.covariance_type,
                                                      probabilities=probabilities)
        return log_resp, log_norm, X.dtype

    def score_samples(self, X):
        r"""Log-likelihood of each row, :math:`\log\sum_k\pi_k\mathcal N(x\mid\mu_k,\Sigma_k)`.

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        _, log_norm, dtype = self._log_resp(X)
        return log_norm.astype(dtype, copy=False)

    def score(self, X, y=None):
        """Average log-likelihood of the rows of ``X``."""
        return float(np.mean(self.score_samples(X)))

    def predict_proba(self, X):
        r"""Responsibilities :math:`r_{nk} = \pi_k\mathcal N(x_n\mid k)/p(x_n)`.

        Returns
        -------
        ndarray of shape (n_samples, n_components)
        """
        resp, _, dtype = self._log_resp(X, probabilities=True)
        return resp.astype(dtype, copy=False)

    def predict(self, X):
        """Most probable component of each row."""
        log_resp, _, _ = self._log_resp(X)
        return log_resp.argmax(axis=1)

    def sample(self, n_samples=1):
        """Draw ``n_samples`` rows from the fitted mixture.

        Returns
        -------
        X : ndarray (n_samples, n_features)
        y : ndarray (n_samples,) component labels
        """
        check_is_fitted(self)
        if n_samples < 1:
            raise ValueError(
                f"Invalid value for 'n_samples': {n_samples}. The sampling requires at "
                "least one sample."
            )
        rng = check_random_state(self.random_state)
        n_features = self.means_.shape[1]
        counts = rng.multinomial(n_samples, np.asarray(self.weights_, dtype=np.float64))
        parts = []
        for k, (mean, count) in enumerate(zip(self.means_, counts)):
            if self.covariance_type == "full":
                parts.append(rng.multivariate_normal(mean, self.covariances_[k], int(count)))
            elif self.covariance_type == "tied":
                parts.append(rng.multivariate_normal(mean, self.covariances_, int(count)))
            else:
                scale = np.sqrt(self.covariances_[k])
                parts.append(mean + rng.standard_normal(size=(count, n_features)) * scale)
        labels = np.concatenate([np.full(c, k, dtype=np.int64) for k, c in enumerate(counts)])
        return np.vstack(parts).astype(np.float64), labels

    # -------------------------------------------------------- criteria
    def _n_parameters(self):
        return n_free_parameters(self.n_components, self.means_.shape[1], self.covariance_type)

    def bic(self, X):
        r"""Bayesian information criterion, :math:`-2\log L + p\log n` (lower is better)."""
        return -2 * self.score(X) * X.shape[0] + self._n_parameters() * math.log(X.shape[0])

    def aic(self, X):
        r"""Akaike information criterion, :math:`-2\log L + 2p` (lower is better)."""
        return -2 * self.score(X) * X.shape[0] + 2 * self._n_parameters()

    # ------------------------------------------------------------- misc
    def save(self, path):
        """Save the fitted model to ``path`` (.npz with JSON metadata, no pickle)."""
        from .io import save_model

        save_model(self, path)

    def _print_init_begin(self, init):
        if self.verbose >= 1:
            print(f"Initialization {init}")
            self._init_time = self._iter_time = perf_counter()

    def _print_iter_end(self, n_iter, change):
        if self.verbose >= 1 and n_iter % self.verbose_interval == 0:
            if self.verbose == 1:
                print(f"  Iteration {n_iter}")
            else:
                now = perf_counter()
                print(f"  Iteration {n_iter}\t time lapse {now - self._iter_time:.5f}s\t "
                      f"ll change {change:.5f}")
                self._iter_time = now

    def _print_init_end(self, lower_bound, converged):
        if self.verbose >= 1:
            msg = "converged" if converged else "did not converge"
            if self.verbose == 1:
                print(f"Initialization {msg}.")
            else:
                print(f"Initialization {msg}. time lapse {perf_counter() - self._init_time:.5f}s"
                      f"\t lower bound {lower_bound:.5f}.")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


def _precision_cholesky_of(covariance, covariance_type):
    if covariance_type in ("diag", "spherical"):
        return 1.0 / np.sqrt(covariance)
    lower = np.empty_like(covariance)
    upper = np.empty_like(covariance)
    factor_covariance(covariance.copy(), lower, upper)
    return upper
