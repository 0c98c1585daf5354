"""``GaussianMixture``: scikit-learn's estimator, fitted by fastem's EM driver.

The class validates input, chooses starting points and hands the in-memory
data (:class:`fastem.sources.InMemorySource`) and the maximum-likelihood
M-step (:class:`fastem.stats.MaximumLikelihood`) to the one EM driver
(:mod:`fastem.em`); all arithmetic over the data happens in the kernels.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from . import _threads, distributed, em, priors, reference
from . import io as model_files
from ._validation import check_means, check_precisions, check_sample_weight, check_weights
from .blocks import INIT_SAMPLE_ROWS, blocks_of, is_out_of_core
from .covariance import (
    COVARIANCE_TYPES,
    covariance_shape,
    covariances_from_precision_cholesky,
    n_free_parameters,
    precision_cholesky_from_precisions,
    precisions_from_cholesky,
    sample_components,
    to_canonical,
)
from .em import DegenerateDataWarning
from .initialization import (
    INIT_METHODS,
    ShortRunEM,
    initial_statistics,
    known_columns,
    scan_columns,
    short_run_statistics,
)
from .missing import MISSING_OPTIONS, MissingValueSource, mean_filled, observed_moments
from .missing import impute as impute_missing
from .missing import log_responsibilities as missing_log_responsibilities
from .priors import GaussianPrior, MaximumPosterior, data_moments, m_step_for
from .scaling import DataScale, largest_magnitude
from .sources import BlockSource, InMemorySource
from .stats import (
    GaussianParameters,
    MaximumLikelihood,
    log_densities,
    log_responsibilities,
    most_probable_components,
)

__all__ = ["DegenerateDataWarning", "GaussianMixture", "fitted_mixture"]


# EM iterations (at most) on the first batch of a mini-batch fit.
_FIRST_BATCH_ITERATIONS = 100


class EMMixture(DensityMixin, BaseEstimator):
    """What every mixture fitted by fastem's EM driver shares: the fit from a
    statistics source, predictions, sampling and model files.

    A subclass provides ``_fitting_m_step(moments, rescaled)`` (the M-step of
    the fit), ``_check_initial_parameters``, ``_initial_parameters``,
    ``_current_parameters`` and ``_adopt_parameters``; the E-step is the
    statistics kernel under the parameters it gives (see :mod:`fastem.em`).
    """

    # Features of GaussianMixture that other mixtures do not have.
    missing = "error"
    prior = None

    def _finite_rule(self):
        """What scikit-learn's validation accepts: NaN too with ``missing='em'``."""
        return "allow-nan" if self.missing == "em" else True

    def _validate_fit_data(self, X):
        r"""scikit-learn's validation of the data of ``fit``, and :math:`\max|X|`
        (NaN when X holds missing values ``missing='em'`` accepts).

        The finiteness check reads the two reductions that the data's scale
        (:class:`fastem.scaling.DataScale`) needs anyway; only data that fail
        it are checked again by scikit-learn, for its error message. A k-means
        start reads the columns' means along (:func:`~fastem.initialization.scan_columns`,
        returned, or None).
        """
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2,
                          order="C", ensure_all_finite=False)
        with _threads.limit(self.n_threads):
            scan = scan_columns(X) if self.init_params == "kmeans" else None
            largest = largest_magnitude(X) if scan is None else scan.largest
        if not math.isfinite(largest):
            X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2,
                              order="C", ensure_all_finite=self._finite_rule())
            if not math.isnan(largest):
                # Infinite (NaN checks out only with missing='em'): sklearn must have raised.
                raise ValueError("Input X contains infinity.")
        return X, largest, scan

    def _check_n_samples(self, n_samples):
        if n_samples < 2:
            raise ValueError(f"Found array with {n_samples} sample(s) while a minimum of 2 "
                             f"is required by {type(self).__name__}.")
        if n_samples < self.n_components:
            raise ValueError(
                "Expected n_samples >= n_components but got n_components = "
                f"{self.n_components}, n_samples = {n_samples}"
            )

    def _fit_source(self, source, n_features, dtype, rescaled, init_data, random_state=None,
                    start_with=None, moments=None, n_observed=None, init_known=None):
        """EM on ``source`` (data rescaled by ``rescaled``): ``n_init`` starts
        from ``init_data()`` (the rows and weights the initialisation runs on),
        or from ``start_with(random_state, user_init)`` when given, or the last
        fit with ``warm_start``. ``moments()`` gives the data's mean and
        covariance (as fitted) for a prior; ``n_observed`` is the average
        number of observed coordinates of a row (missing values), which the
        objective's rescaling shift counts; ``init_known`` what the caller read
        of ``init_data()``'s rows (:class:`~fastem.initialization.ColumnScan`)."""
        shape_of = np.empty((0, n_features))
        user_init = self._check_initial_parameters(shape_of)
        do_init = not (self.warm_start and hasattr(self, "converged_"))
        if not do_init:
            self._check_warm_start(shape_of)
        m_step = self._fitting_m_step(moments, rescaled)
        shift = rescaled.log_density_shift(n_features if n_observed is None else n_observed)
        if random_state is None:
            random_state = check_random_state(self.random_state)
        initial = []
        short_run = do_init and start_with is None and getattr(self, "init_params", "") == "em-em"

        def start(index):
            if not do_init:
                return rescaled.parameters_in(self._current_parameters())
            if start_with is not None:
                return start_with(random_state, user_init)
            if not initial:
                initial.append(init_data())
            X_init, weights = initial[0]
            candidate = {"candidate": index} if short_run else {}
            return self._initial_parameters(X_init, weights, random_state, user_init, rescaled,
                                            m_step, known=init_known, **candidate)

        with _threads.limit(self.n_threads), _threads.deferred_interrupts():
            if short_run:
                best, bounds = self._short_run_em(source, m_step, start)
            else:
                best, results = em.fit_em(
                    source, m_step, start, self.n_init if do_init else 1, self._monitor(),
                    self.max_iter, -np.inf if do_init else self.lower_bound_ - shift)
                bounds = [r.lower_bounds for r in results]
        self.init_lower_bounds_ = [[bound + shift for bound in b] for b in bounds]
        self._adopt(rescaled_result(best, rescaled, self.covariance_type, shift), dtype)
        return self

    def _short_run_em(self, source, m_step, start):
        """``init_params='em-em'``: short-run EM over ``n_init`` candidates
        (:class:`fastem.initialization.ShortRunEM`); the best of its finalists
        run to convergence, and every candidate's objectives as far as it ran."""
        search = ShortRunEM(source, m_step, [start(i) for i in range(self.n_init)], self.tol,
                            self.max_iter)
        finalists = search.results(search.finalists())
        monitor = self._monitor()
        for index, result in finalists.items():
            monitor.begin_start(index)
            monitor.end_start(result)
        chosen = list(finalists.values())
        return chosen[em.best_result(chosen)], search.lower_bounds()

    def _initialize_parameters(self, X, random_state, xp=None):
        """Initial parameters from ``init_params`` on ``X`` (scikit-learn's name)."""
        X = np.ascontiguousarray(X)
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)
        m_step = self._fitting_m_step(lambda: data_moments(X, None), DataScale())
        params = self._initial_parameters(X, None, check_random_state(random_state),
                                          self._check_initial_parameters(X), DataScale(),
                                          m_step)
        self._adopt_parameters(params, X.dtype)

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit, then return the most probable component of every row of ``X``."""
        return self.fit(X, y, sample_weight).predict(X)

    def _check_warm_start(self, X):
        """The last fit can start this one only if it has this fit's shapes."""
        fitted = (self.means_.shape, np.shape(self.precisions_cholesky_))
        wanted = ((self.n_components, X.shape[1]),
                  covariance_shape(self.covariance_type, self.n_components, X.shape[1]))
        # Shapes alone do not tell 'diag' from 'tied' when K equals D.
        fitted_type = getattr(self, "_fitted_covariance_type", self.covariance_type)
        if fitted != wanted or fitted_type != self.covariance_type:
            raise ValueError(
                f"warm_start=True starts from the last fit ({fitted_type!r}), whose means "
                f"have shape {fitted[0]} and precisions {fitted[1]}, but n_components="
                f"{self.n_components}, covariance_type={self.covariance_type!r} and "
                f"{X.shape[1]} features need {wanted[0]} and {wanted[1]}. Set "
                "warm_start=False to fit from a fresh start.")

    def _monitor(self) -> em.ConvergenceMonitor:
        return em.ConvergenceMonitor(self.tol, self.verbose, self.verbose_interval)

    def _adopt(self, result: em.EMResult, dtype):
        """Set the fitted attributes from the kept start's outcome."""
        if not result.converged and self.max_iter > 0:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
            )
        self._adopt_parameters(result.params, dtype)
        self._fitted_covariance_type = self.covariance_type
        self.converged_ = result.converged
        self.n_iter_ = result.n_iter
        self.lower_bound_ = result.lower_bound
        self.lower_bounds_ = result.lower_bounds

    def _estimate_weighted_log_prob(self, X, xp=None):
        r""":math:`\log\pi_k + \log\mathcal N(x_n\mid\mu_k,\Sigma_k)`."""
        log_prob_norm, log_resp = self._estimate_log_prob_resp(X)
        return log_resp + log_prob_norm[:, np.newaxis]

    def _estimate_log_prob_resp(self, X, xp=None):
        """``(log p(x_n), log r_nk)``, as scikit-learn's ``BaseMixture`` returns them."""
        X = np.ascontiguousarray(X)
        with _threads.limit(self.n_threads), _threads.deferred_interrupts():
            log_resp, log_norm = log_responsibilities(
                X if X.dtype in (np.float32, np.float64) else X.astype(np.float64),
                self._current_parameters(), self.covariance_type)
        return log_norm, log_resp

    def _e_step(self, X, xp=None):
        """``(mean log p(x), log r)``: scikit-learn's E-step."""
        log_prob_norm, log_resp = self._estimate_log_prob_resp(X)
        return float(np.mean(log_prob_norm)), log_resp

    # ------------------------------------------------------------ predict
    def _validated(self, X):
        check_is_fitted(self)
        return validate_data(self, X, dtype=[np.float64, np.float32], reset=False, order="C",
                             ensure_all_finite=self._finite_rule())

    def _complete_rows_pass(self, X, function):
        """``function(X, parameters, covariance_type)`` on validated ``X``, or None
        when X has missing values that EM with missing values must handle."""
        X = self._validated(X)
        if self.missing == "em" and np.isnan(X).any():
            return None, X
        with _threads.limit(self.n_threads), _threads.deferred_interrupts():
            return function(X, self._current_parameters(), self.covariance_type), X

    def _log_resp(self, X, probabilities=False):
        X = self._validated(X)
        with _threads.limit(self.n_threads), _threads.deferred_interrupts():
            if self.missing == "em" and np.isnan(X).any():
                # Marginal densities of the observed entries (fastem.missing).
                log_resp, log_norm = missing_log_responsibilities(
                    X, self._current_parameters(), self.covariance_type)
                if probabilities:
                    log_resp = np.exp(log_resp)
            else:
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
        if distributed.is_dask_array(X):
            return distributed.score_samples(self, X)
        log_norm, X = self._complete_rows_pass(X, log_densities)
        if log_norm is None:
            _, log_norm, _ = self._log_resp(X)
        # A row far from every component can have a log-density beyond the
        # float32 range: it is -inf in float32, as computed there.
        with np.errstate(over="ignore"):
            return log_norm.astype(X.dtype, copy=False)

    def score(self, X, y=None):
        """Average log-likelihood of the rows of ``X``."""
        return float(np.mean(self.score_samples(X)))

    def predict_proba(self, X):
        r"""Responsibilities :math:`r_{nk} = \pi_k\mathcal N(x_n\mid k)/p(x_n)`.

        Returns
        -------
        ndarray of shape (n_samples, n_components)
        """
        if distributed.is_dask_array(X):
            return distributed.predict_proba(self, X)
        resp, _, dtype = self._log_resp(X, probabilities=True)
        return resp.astype(dtype, copy=False)

    def predict(self, X):
        """Most probable component of each row."""
        if distributed.is_dask_array(X):
            return distributed.predict(self, X)
        labels, X = self._complete_rows_pass(X, most_probable_components)
        if labels is None:
            log_resp, _, _ = self._log_resp(X)
            labels = log_resp.argmax(axis=1)
        return labels

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
        counts = rng.multinomial(n_samples, np.asarray(self.weights_, dtype=np.float64))
        X = sample_components(rng, self.means_, self.covariances_, self.covariance_type, counts)
        labels = np.concatenate([np.full(c, k, dtype=np.int64) for k, c in enumerate(counts)])
        return X, labels

    # ------------------------------------------------------------- misc
    def save(self, path):
        """Save the fitted model to ``path`` (.npz with JSON metadata, no pickle)."""
        model_files.save_model(self, path)


class GaussianMixture(EMMixture):
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
        Number of starts; the one with the highest lower bound is kept. With
        ``init_params='em-em'``, the number of candidate starts of the
        short-run EM search (for example 40).
    init_params : {'kmeans', 'k-means++', 'random', 'random_from_data', 'hierarchical', \
'em-em'}, default='kmeans'
        'kmeans' runs Lloyd's k-means seeded by greedy k-means++;
        'hierarchical' cuts a model-based agglomerative hierarchy (Fraley
        1998) at ``n_components``, built on at most 1000 rows (a weighted
        random subset of larger data), which is deterministic when the data
        has at most that many rows. 'em-em' is short-run EM (Biernacki,
        Celeux & Govaert 2003; :class:`fastem.initialization.ShortRunEM`):
        ``n_init`` candidates (k-means first, from the draws of 'kmeans', then
        three starts at random rows for one k-means++ seeding, in turn) run a
        few iterations each; successive halving keeps the better half of the
        distinct ones and doubles their iterations until one is left, and
        the winners among the first ``n_init``, ``n_init/2``, ..., 1
        candidates run to convergence. The candidates of a budget begin with
        those of a smaller one and twice the budget never ends on a lower
        bound below that of the smaller budget; the first candidate always
        runs to convergence, so the fit is at least as good as 'kmeans' with
        ``n_init=1``. Not with ``batch_size``.
    weights_init, means_init, precisions_init : array-like, optional
        User-provided initial parameters (scikit-learn's shapes).
    random_state : int, RandomState instance or None
    warm_start : bool, default=False
    verbose : int, default=0
    verbose_interval : int, default=10
    n_threads : int or None, default=None
        Cap on the threads used by this estimator (None: ``FASTEM_NUM_THREADS``
        or the CPUs available). Results are bit-identical whatever the thread
        count.
    learning_offset : float >= 0, default=1.0
        :math:`t_0` of the step size :math:`\rho_t = (t + t_0)^{-\kappa}` of
        :meth:`partial_fit` (stepwise EM): larger values make the first steps smaller.
    learning_decay : float in (0.5, 1], default=0.7
        :math:`\kappa` of that step size, how quickly it shrinks: 1 averages all
        batches alike; values near 0.5 keep weighing recent batches more.
    batch_size : int or None, default=None
        With an int (smaller than the number of rows), ``fit`` of an in-memory
        array runs mini-batch EM first: ``n_epochs`` passes over the rows in a
        new random order each, one stepwise-EM step (as :meth:`partial_fit`)
        per batch of ``batch_size`` rows, after EM on the first batch from a
        start computed on a sample of about ``fastem.blocks.INIT_SAMPLE_ROWS``
        rows; full-batch EM then polishes the result for at most
        ``max_iter`` iterations (``max_iter=0``: none; ``n_iter_`` counts
        these). None: full-batch EM only.
    n_epochs : int, default=2
        Passes of mini-batch EM (with ``batch_size``).
    prior : None, 'default' or fastem.GaussianPrior, default=None
        None: maximum likelihood. Otherwise MAP EM under a conjugate prior on
        the means and covariances (Fraley & Raftery 2007, as R mclust's
        ``priorControl``; formulas in :mod:`fastem.priors`): 'default' takes
        mclust's defaults from the data (mean: the data's; shrinkage 0.01;
        dof D + 2; scale from the data's covariance divided by
        :math:`K^{2/D}`), a :class:`~fastem.priors.GaussianPrior` sets any of
        them. The objective (``lower_bound_``) is then the average log
        posterior; ``score``, ``bic`` and ``aic`` stay log-likelihoods at the
        MAP estimate, as in mclust. ``reg_covar`` is added on top (set it to 0
        for mclust's estimates). In-memory and streamed data and
        :meth:`partial_fit` (the prior resolved on the first batch, weighed
        against all rows seen); not with ``batch_size`` or Dask arrays.
    missing : {'error', 'em'}, default='error'
        'error': NaN in the data is an error (scikit-learn's behaviour).
        'em': NaN entries are missing at random and EM fits the observed
        entries themselves (:mod:`fastem.missing`): the E-step uses each
        row's marginal density over its observed coordinates and the
        statistics add the conditional means and covariances of the missing
        ones, so ``lower_bound_`` is the observed-data log-likelihood (which
        never decreases). The start (``init_params``) is computed on the rows
        with their missing entries set to their column's observed mean. Rows
        with nothing observed are ignored, with a warning. ``score_samples``,
        ``predict`` and ``predict_proba`` then accept NaN and marginalise, and
        :meth:`impute` fills the holes. In-memory arrays and :meth:`partial_fit`
        batches; not with ``batch_size``. Without any NaN the fit is the plain
        fit.

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
    prior_ : fastem.priors.ResolvedPrior or None
        The prior's hyperparameters as fitted (None without a prior).
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
        "init_params": [StrOptions(set(INIT_METHODS) | {"em-em"})],
        "weights_init": ["array-like", None],
        "means_init": ["array-like", None],
        "precisions_init": ["array-like", None],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
        "verbose": ["verbose"],
        "verbose_interval": [Interval(Integral, 1, None, closed="left")],
        "n_threads": [Interval(Integral, 1, None, closed="left"), None],
        "learning_offset": [Interval(Real, 0.0, None, closed="left")],
        "learning_decay": [Interval(Real, 0.5, 1.0, closed="right")],
        "batch_size": [Interval(Integral, 1, None, closed="left"), None],
        "n_epochs": [Interval(Integral, 1, None, closed="left")],
        "prior": [None, StrOptions({"default"}), GaussianPrior],
        "missing": [StrOptions(set(MISSING_OPTIONS))],
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
        learning_offset=1.0,
        learning_decay=0.7,
        batch_size=None,
        n_epochs=2,
        prior=None,
        missing="error",
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
        self.learning_offset = learning_offset
        self.learning_decay = learning_decay
        self.batch_size = batch_size
        self.n_epochs = n_epochs
        self.prior = prior
        self.missing = missing

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None, sample_weight=None):
        """Estimate the parameters with EM (``n_init`` starts, best kept).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), memory-mapped array, callable or dask array
            An in-memory array; a memory-mapped array, a ``fastem.blocks.RowBlocks``
            or a callable returning a fresh iterator of row blocks (streamed
            once per iteration, see :mod:`fastem.blocks`); or a ``dask.array``
            chunked by rows (EM passes on the workers, see
            :mod:`fastem.distributed`). ``batch_size`` applies to in-memory
            arrays only; the others always run full-batch EM.
        y : ignored
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative row weights; an integer weight fits as repeating the
            row would. Weights are relative: multiplying them all by a
            constant changes nothing (they are rescaled to average 1 over the
            rows of positive weight).

        Returns
        -------
        self
        """
        self._validate_params()
        # A fit starts any later partial_fit afresh.
        self._running = None
        if distributed.is_dask_array(X):
            self._refuse_prior("Dask arrays")
            return distributed.fit(self, X, sample_weight)
        if is_out_of_core(X):
            return self._fit_out_of_core(X, sample_weight)
        X, largest, scan = self._validate_fit_data(X)
        if math.isnan(largest):  # missing values, accepted only with missing='em'
            return self._fit_missing(X, sample_weight)
        self._check_n_samples(X.shape[0])
        sample_weight = check_sample_weight(sample_weight, X.shape[0])
        # Data whose squares would leave the float range are fitted rescaled
        # by a power of two (fastem.scaling); ordinary data as they are.
        rescaled = DataScale.of_largest(largest, X.dtype)
        X_fit = rescaled.data(X)
        source = InMemorySource(X_fit, sample_weight, self.covariance_type)
        start_with = None
        if self.batch_size is not None and self.batch_size < X.shape[0]:
            self._refuse_prior("batch_size")
            if self.init_params == "em-em":
                raise ValueError("init_params='em-em' is not supported with batch_size; "
                                 "use another init_params or batch_size=None")

            def start_with(random_state, user_init):
                return self._minibatch_epochs(X_fit, sample_weight, random_state, user_init,
                                              rescaled)
        return self._fit_source(source, X.shape[1], X.dtype, rescaled,
                                lambda: (X_fit, sample_weight), start_with=start_with,
                                moments=lambda: data_moments(X_fit, sample_weight),
                                init_known=known_columns(scan, largest, rescaled))

    def _minibatch_epochs(self, X, sample_weight, random_state, user_init, rescaled):
        """Mini-batch EM (``batch_size``, ``n_epochs``): stepwise EM over shuffled
        batches of ``X`` (rescaled by ``rescaled``), from a start on the first
        batch. Returns the parameters it ends with."""
        n_samples = X.shape[0]
        m_step = MaximumLikelihood(self.covariance_type, rescaled.reg_covar(self.reg_covar))
        params = running = None
        steps = 0
        for _ in range(self.n_epochs):
            order = random_state.permutation(n_samples)
            for first in range(0, n_samples, self.batch_size):
                # In row order within the batch: the same batch in any order
                # gives the same statistics, and memory is read forwards.
                rows = np.sort(order[first:first + self.batch_size])
                batch = np.ascontiguousarray(X[rows])
                weights = None if sample_weight is None else sample_weight[rows]
                source = InMemorySource(batch, weights, self.covariance_type)
                if params is None:
                    # The start on a sample of about INIT_SAMPLE_ROWS rows (as for
                    # out-of-core data: a batch alone gives a noisy start), then,
                    # as partial_fit's first call, EM on the first batch.
                    sample = np.sort(order[:max(self.batch_size, INIT_SAMPLE_ROWS)])
                    start = self._initial_parameters(
                        np.ascontiguousarray(X[sample]),
                        None if sample_weight is None else sample_weight[sample],
                        random_state, user_init, rescaled)
                    params = em.run_em(source, m_step, start, em.ConvergenceMonitor(self.tol),
                                       _FIRST_BATCH_ITERATIONS).params
                step_size = (steps + self.learning_offset) ** -self.learning_decay
                params, running, _ = em.stepwise_update(source, m_step, params, running,
                                                        step_size)
                steps += 1
        return params

    def _fit_out_of_core(self, X, sample_weight):
        """Fit streamed or memory-mapped data (:mod:`fastem.blocks`): EM passes
        over the row blocks; the initialisation runs on a random sample of
        about ``INIT_SAMPLE_ROWS`` rows."""
        blocks = blocks_of(X, sample_weight)
        self._check_n_samples(blocks.n_samples)
        self.n_features_in_ = blocks.n_features
        if hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        rescaled = DataScale.of_largest(blocks.largest, blocks.dtype)
        source = BlockSource(blocks, self.covariance_type, rescaled.scale)
        random_state = check_random_state(self.random_state)

        def init_data():
            sample, weights = blocks.sample(INIT_SAMPLE_ROWS, random_state)
            return rescaled.data(sample), weights

        return self._fit_source(source, blocks.n_features, blocks.dtype, rescaled, init_data,
                                random_state, moments=lambda: blocks.moments(rescaled.scale))

    def _batch_source(self, X, sample_weight):
        """The statistics source of an in-memory batch (rows with NaN: missing values)."""
        if self.missing == "em" and np.isnan(X).any():
            return MissingValueSource(X, sample_weight, self.covariance_type)
        return InMemorySource(X, sample_weight, self.covariance_type)

    def _fit_missing(self, X, sample_weight):
        """EM on the observed entries of ``X`` (:class:`fastem.missing.MissingValueSource`)."""
        if self.batch_size is not None and self.batch_size < X.shape[0]:
            raise ValueError("missing='em' is not supported with batch_size yet; "
                             "set batch_size=None")
        sample_weight = check_sample_weight(sample_weight, X.shape[0])
        filled = mean_filled(X)
        rescaled = DataScale.of(filled)
        X_fit = rescaled.data(X)
        source = MissingValueSource(X_fit, sample_weight, self.covariance_type)
        kept = source.patterns.rows
        n_empty = source.patterns.empty_rows.size
        if n_empty:
            warnings.warn(f"{n_empty} row(s) of X have every entry missing; they are ignored",
                          UserWarning, stacklevel=3)
        self._check_n_samples(kept.size if sample_weight is None
                              else int(np.count_nonzero(sample_weight[kept])))
        rows = np.sort(kept)
        init_rows = np.ascontiguousarray(rescaled.data(filled)[rows])
        init_weights = None if sample_weight is None else sample_weight[rows]
        return self._fit_source(
            source, X.shape[1], X.dtype, rescaled, lambda: (init_rows, init_weights),
            moments=lambda: observed_moments(rescaled.data(X[rows]), init_weights),
            n_observed=source.mean_observed)

    def _refuse_prior(self, what: str) -> None:
        if self.prior is not None:
            raise ValueError(f"prior={self.prior!r} is not supported with {what} yet; "
                             "fit the whole data with fit (in memory or streamed)")

    def partial_fit(self, X, y=None, sample_weight=None):
        r"""Update the model with one batch of rows by stepwise (online) EM.

        The first call on an unfitted model fits its batch with :meth:`fit`
        (``init_params``, ``n_init``, ``max_iter``). Every later call takes one
        step of stepwise EM (Cappé & Moulines 2009): the batch's statistics
        under the current parameters, per unit weight, are blended into
        running statistics with step size

        .. math::

            \rho_t = (t + t_0)^{-\kappa},\qquad t_0 = \texttt{learning\_offset},\quad
            \kappa = \texttt{learning\_decay} \in (0.5, 1],

        and the M-step turns them into the new parameters. ``t`` counts the
        batches since the running statistics started (the first call, or the
        first call after :meth:`fit` or loading a model, which starts them
        from its batch). ``lower_bound_`` is the batch's average
        log-likelihood under the parameters it was given; ``n_iter_`` counts
        steps.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored
        sample_weight : array-like of shape (n_samples,), optional

        Returns
        -------
        self
        """
        self._validate_params()
        if not hasattr(self, "converged_"):
            self.fit(X, sample_weight=sample_weight)
            X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False,
                              order="C", ensure_all_finite=self._finite_rule())
            sample_weight = check_sample_weight(sample_weight, X.shape[0])
            source = self._batch_source(X, sample_weight)
            self._running = source.statistics(self._current_parameters())
            self._seen = self._running.weight
            self._running = dataclasses.replace(
                self._running.scaled(1.0 / self._running.weight), count=self._running.count)
            self._steps = 1
            return self
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False, order="C",
                          ensure_all_finite=self._finite_rule())
        sample_weight = check_sample_weight(sample_weight, X.shape[0])
        running = getattr(self, "_running", None)
        steps = getattr(self, "_steps", 0) if running is not None else 0
        step_size = (steps + self.learning_offset) ** -self.learning_decay
        source = self._batch_source(X, sample_weight)
        batch_weight = getattr(source, "weight", None)
        if batch_weight is None:  # an InMemorySource: every row counts
            batch_weight = float(X.shape[0] if sample_weight is None else sample_weight.sum())
        prior = getattr(self, "prior_", None) if self.prior is not None else None
        if prior is None:
            m_step, m_step_weight = MaximumLikelihood(self.covariance_type, self.reg_covar), 1.0
        else:
            # The prior weighs against every row seen so far, not against one.
            m_step = MaximumPosterior(self.covariance_type, self.reg_covar, prior)
            m_step_weight = getattr(self, "_seen", 0.0) + batch_weight
        with _threads.limit(self.n_threads), _threads.deferred_interrupts():
            params, running, objective = em.stepwise_update(
                source, m_step, self._current_parameters(), running, step_size,
                m_step_weight=m_step_weight)
        self._set_parameters(tuple(np.asarray(p, dtype=X.dtype) for p in params))
        self._fitted_covariance_type = self.covariance_type
        self._running, self._steps = running, steps + 1
        self._seen = getattr(self, "_seen", 0.0) + batch_weight
        self.lower_bound_ = objective
        self.n_iter_ += 1
        self.lower_bounds_ = [*self.lower_bounds_, objective]
        return self

    def _fitting_m_step(self, moments, rescaled):
        """Maximum likelihood, or MAP EM under ``prior`` (and ``prior_`` set)."""
        m_step, self.prior_ = m_step_for(self.covariance_type, self.reg_covar, self.prior,
                                         self.n_components, moments, rescaled)
        return m_step

    def _adopt_parameters(self, params, dtype):
        self._set_parameters(tuple(np.asarray(p, dtype=dtype) for p in params))

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

    def _initial_parameters(self, X, sample_weight, random_state, user_init,
                            rescaled=DataScale(), m_step=None, candidate=0, known=None):
        """Initial parameters: from the chosen init, overridden by user values
        (given in the data's units, ``X`` being the data rescaled by ``rescaled``).
        The init's statistics go through ``m_step`` (default: maximum likelihood).
        With 'em-em', the start is that search's candidate number ``candidate``;
        ``known`` what the caller read of ``X`` (:class:`~fastem.initialization.ColumnScan`)."""
        needs_data_init = any(v is None for v in user_init.values())
        if needs_data_init:
            if self.init_params == "em-em":
                stats = short_run_statistics(X, sample_weight, self.n_components, candidate,
                                             self.covariance_type, random_state)
            else:
                stats = initial_statistics(X, sample_weight, self.n_components,
                                           self.init_params, self.covariance_type,
                                           random_state, known)
            if m_step is None:
                m_step = MaximumLikelihood(self.covariance_type, self.reg_covar)
            (weights, means, cov, prec_chol), jitter = m_step(stats)
            if self.reg_covar == 0 and np.any(jitter > 0):
                raise ValueError(em.ILL_DEFINED_COVARIANCE)
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
        user = rescaled.parameters_in(GaussianParameters(
            None, None if user_init["means"] is None else means,
            None if user_init["precisions"] is None else cov,
            None if user_init["precisions"] is None else prec_chol))
        return GaussianParameters(weights, means if user.means is None else user.means,
                                  cov if user.covariances is None else user.covariances,
                                  prec_chol if user.precisions_cholesky is None
                                  else user.precisions_cholesky)

    # --------------------------------------------------------- attributes
    def _current_parameters(self) -> GaussianParameters:
        return GaussianParameters(
            *(np.asarray(a, dtype=np.float64) for a in (
                self.weights_, self.means_, self.covariances_, self.precisions_cholesky_))
        )

    def _get_parameters(self):
        """``(weights_, means_, covariances_, precisions_cholesky_)``, as in scikit-learn."""
        return (self.weights_, self.means_, self.covariances_, self.precisions_cholesky_)

    def _set_parameters(self, params, xp=None):
        """Set ``(weights, means, covariances, precisions_cholesky)`` and derive
        ``precisions_`` (scikit-learn's signature; ``xp``, its array namespace,
        is NumPy here)."""
        weights, means, cov, prec_chol = params
        self.weights_, self.means_, self.covariances_ = weights, means, cov
        self.precisions_cholesky_ = prec_chol
        self.precisions_ = precisions_from_cholesky(prec_chol, self.covariance_type)

    # ----------------------------------- scikit-learn's private interface
    # Code in the wild builds and probes models through these; they keep
    # scikit-learn's signatures (``xp`` is accepted and NumPy is used).
    def _initialize(self, X, resp, xp=None):
        """Parameters from responsibilities ``resp`` (or the user's initial values)."""
        X = np.asarray(X)
        weights = means = covariances = None
        if resp is not None:
            weights, means, covariances = reference.estimate_parameters(
                X, resp, self.reg_covar, self.covariance_type)
            if self.weights_init is None:
                weights = weights / X.shape[0]
        dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.float64
        self.weights_ = np.asarray(weights if self.weights_init is None else self.weights_init,
                                   dtype=dtype)
        self.means_ = np.asarray(means if self.means_init is None else self.means_init,
                                 dtype=dtype)
        if self.precisions_init is None:
            self.covariances_ = np.asarray(covariances, dtype=dtype)
            prec_chol = _precision_cholesky_or_error(covariances, self.covariance_type)
        else:
            prec_chol = precision_cholesky_from_precisions(self.precisions_init,
                                                           self.covariance_type)
        self.precisions_cholesky_ = np.asarray(prec_chol, dtype=dtype)

    def _estimate_log_weights(self, xp=None):
        return np.log(self.weights_)

    def _estimate_log_prob(self, X, xp=None):
        r""":math:`\log\mathcal N(x_n\mid\mu_k,\Sigma_k)`, (n_samples, n_components)."""
        return self._estimate_weighted_log_prob(X) - self._estimate_log_weights()

    def _m_step(self, X, log_resp, xp=None):
        """scikit-learn's M-step from log-responsibilities."""
        X = np.asarray(X)
        weights, means, covariances = reference.estimate_parameters(
            X, np.exp(log_resp), self.reg_covar, self.covariance_type)
        self.weights_ = (weights / weights.sum()).astype(X.dtype, copy=False)
        self.means_ = means.astype(X.dtype, copy=False)
        self.covariances_ = np.asarray(covariances).astype(X.dtype, copy=False)
        self.precisions_cholesky_ = np.asarray(_precision_cholesky_or_error(
            covariances, self.covariance_type)).astype(X.dtype, copy=False)

    def _compute_lower_bound(self, _, log_prob_norm):
        return log_prob_norm

    def impute(self, X, n_draws=None, random_state=None):
        r"""Fill the NaN entries of ``X`` under the fitted mixture.

        Without ``n_draws``: conditional-mean imputation,

        .. math::

            \hat x_m = \sum_k r_k(x_o)\,\big(\mu_{k,m} + \Sigma_{k,mo}
            \Sigma_{k,oo}^{-1}(x_o - \mu_{k,o})\big),

        the components mixed by their posterior given the row's observed
        entries ``o``. With ``n_draws=m``: m multiple imputations, an array
        (m, n_samples, n_features), each drawing a component from that
        posterior and the missing entries from their conditional Gaussian
        (``random_state`` seeds them). A row with nothing observed gets the
        mixture's mean (or draws from the mixture).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), NaN where missing
        n_draws : int, optional
        random_state : int, RandomState instance or None

        Returns
        -------
        ndarray (n_samples, n_features), or (n_draws, n_samples, n_features)
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False, order="C",
                          ensure_all_finite="allow-nan")
        if n_draws is not None and (not isinstance(n_draws, Integral)
                                    or isinstance(n_draws, bool) or n_draws < 1):
            raise ValueError(f"n_draws must be a positive integer, got {n_draws!r}")
        with _threads.limit(self.n_threads), _threads.deferred_interrupts():
            filled = impute_missing(X, self._current_parameters(), self.covariance_type,
                                    n_draws, random_state)
        return filled.astype(X.dtype, copy=False)

    # -------------------------------------------------------- criteria
    def _n_parameters(self):
        return n_free_parameters(self.n_components, self.means_.shape[1], self.covariance_type)

    def bic(self, X):
        r"""Bayesian information criterion, :math:`-2\log L + p\log n` (lower is better).

        With ``missing='em'``, :math:`n` counts the rows with an observed entry."""
        log_likelihood, n_rows = self._total_log_likelihood(X)
        return -2 * log_likelihood + self._n_parameters() * math.log(n_rows)

    def aic(self, X):
        r"""Akaike information criterion, :math:`-2\log L + 2p` (lower is better)."""
        return -2 * self._total_log_likelihood(X)[0] + 2 * self._n_parameters()

    def _total_log_likelihood(self, X):
        r""":math:`\log L` of ``X`` and the number of rows that carry information."""
        if self.missing != "em":  # scikit-learn's arithmetic
            return self.score(X) * np.shape(X)[0], np.shape(X)[0]
        values = np.asarray(X, dtype=np.float64)
        n_rows = int(np.count_nonzero(~np.isnan(values).all(axis=1)))
        return float(np.sum(self.score_samples(X), dtype=np.float64)), n_rows

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # NaN are missing values with missing='em', an error otherwise.
        tags.input_tags.allow_nan = self.missing == "em"
        return tags


def _precision_cholesky_or_error(covariances, covariance_type):
    """Precision factors of covariances estimated from responsibilities, or
    scikit-learn's ``ValueError`` when one is not positive definite."""
    try:
        return reference.precision_cholesky(covariances, covariance_type)
    except np.linalg.LinAlgError:
        raise ValueError(em.ILL_DEFINED_COVARIANCE) from None


def rescaled_result(result: em.EMResult, rescaled: DataScale, covariance_type: str,
                    shift: float) -> em.EMResult:
    """A result of EM on rescaled data (:mod:`fastem.scaling`) in the data's units."""
    if rescaled.identity:
        return result
    return dataclasses.replace(
        result, params=rescaled.parameters_out(result.params, covariance_type),
        lower_bound=result.lower_bound + shift,
        lower_bounds=[bound + shift for bound in result.lower_bounds])


def fitted_mixture(result: em.EMResult, X, **params) -> GaussianMixture:
    """A fitted :class:`GaussianMixture` from the EM driver's result on ``X``.

    ``params`` are the constructor parameters. Model selection and other
    drivers of :mod:`fastem.em` build their models through this; the fitted
    arrays get ``X``'s dtype, as :meth:`GaussianMixture.fit` gives them.
    """
    model = GaussianMixture(**params)
    model.n_features_in_ = X.shape[1]
    model.init_lower_bounds_ = [result.lower_bounds]
    model._adopt(result, X.dtype)
    return model


def _saved_array_shapes(params, fitted):
    """Shapes of a saved GaussianMixture's arrays (the model file's consistency check)."""
    k, d = params["n_components"], fitted["n_features_in_"]
    if d < 1 or fitted["n_iter_"] < 0 or fitted["lower_bound_"] == float("inf"):
        raise ValueError(f"invalid fitted attributes n_features_in_={d}, "
                         f"n_iter_={fitted['n_iter_']}, lower_bound_={fitted['lower_bound_']}")
    cov_shape = covariance_shape(params["covariance_type"], k, d)
    return {
        "weights_": (k,), "means_": (k, d), "covariances_": cov_shape,
        "precisions_": cov_shape, "precisions_cholesky_": cov_shape,
        "weights_init": (k,), "means_init": (k, d), "precisions_init": cov_shape,
    }


# The values of a loaded model: no garbage (negative weights, an indefinite
# covariance, a factor of another matrix) gets past load_model.
def _check_saved_mixture(model) -> None:
    """Refuse fitted values that are no Gaussian mixture's, up to rounding.

    Shapes and finiteness are checked before. All tolerances are multiples of
    the unit roundoff of the arrays' dtype: a fitted model is computed in
    float64 and stored in that dtype, so each stored value is off by at most
    half a unit, and each check allows for that rounding of its terms.
    """
    check_saved_gaussians(model)
    check_lower_bounds(model)
    _check_initial_arrays(model)


def check_saved_gaussians(model, extra_arrays=()) -> None:
    """The weights and Gaussians of a loaded mixture (and ``extra_arrays``, of the
    same dtype): see ``_check_saved_mixture``."""
    names = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_",
             *extra_arrays)
    dtypes = sorted({str(getattr(model, name).dtype) for name in names})
    if len(dtypes) > 1:
        raise ValueError(f"the fitted arrays mix the dtypes {', '.join(dtypes)}")
    unit = np.finfo(model.weights_.dtype).eps / 2
    _check_mixture_weights(model.weights_, unit)
    covariances, factors, precisions = (
        to_canonical(getattr(model, name), model.covariance_type)
        for name in ("covariances_", "precisions_cholesky_", "precisions_"))
    if model.covariance_type in ("full", "tied"):
        _check_dense_covariances(covariances, factors, precisions, unit,
                                 model.covariance_type == "tied")
    else:
        _check_diagonal_covariances(covariances[..., 0], factors[..., 0], precisions[..., 0],
                                    unit)


# The tolerance of fit for the sum of weights_init (which a model fitted with
# max_iter=0 keeps as its weights_), by the itemsize of the weights.
_WEIGHT_SUM_TOLERANCE = {4: 1e-6, 8: 1e-8}


def _check_mixture_weights(weights: np.ndarray, unit: float) -> None:
    # A component may have weight 0 (given so in weights_init, with max_iter=0).
    if np.any(weights < 0):
        k = int(np.argmin(weights))
        raise ValueError(f"weights_ has the negative weight {float(weights[k])!r} "
                         f"(component {k}); mixture weights are non-negative")
    total = math.fsum(weights.tolist())
    tolerance = max(_WEIGHT_SUM_TOLERANCE[weights.dtype.itemsize], 4 * weights.size * unit)
    if not abs(total - 1.0) <= tolerance:
        raise ValueError(f"weights_ sum to {total!r}, not 1")


def _check_dense_covariances(covariances, factors, precisions, unit: float, tied: bool
                             ) -> None:
    """'full' and 'tied': (K, D, D) float64 stacks of covariances S, their
    precision factors U and precisions."""
    n_features = covariances.shape[-1]
    eye = np.eye(n_features)
    # Rounding bounds of D-term sums grow with D; fitted models stay below 3
    # units at D = 2 to 30 in float32 and float64, whatever the conditioning.
    slack = 8 * (n_features + 2) * unit
    for k, (cov, factor, precision) in enumerate(zip(covariances, factors, precisions)):
        what = "the tied covariance" if tied else f"component {k}"
        variances = np.diag(cov)
        if not np.all(variances > 0):
            raise ValueError(f"covariances_ of {what} is not positive definite: its "
                             f"diagonal has {float(variances.min())!r}")
        deviations = np.sqrt(variances)
        scale = np.outer(deviations, deviations)
        if not np.all(np.abs(cov - cov.T) <= slack * scale):
            raise ValueError(f"covariances_ of {what} is not symmetric")
        # Positive definite up to rounding: rounding a nearly singular float64
        # covariance to float32 can leave its correlation matrix a hair
        # indefinite, while the precision factor, rounded too, is still right.
        try:
            np.linalg.cholesky(cov / scale + slack * eye)
        except np.linalg.LinAlgError:
            raise ValueError(f"covariances_ of {what} is not positive definite") from None
        if np.any(np.tril(factor, -1) != 0) or not np.all(np.diag(factor) > 0):
            raise ValueError(f"precisions_cholesky_ of {what} is not upper triangular with "
                             "a positive diagonal")
        # U U^T is the inverse of S exactly when U^T S U = I; each entry of the
        # product may be off by the rounding of the terms summed into it.
        residual = factor.T @ cov @ factor - eye
        bound = slack * (np.abs(factor).T @ np.abs(cov) @ np.abs(factor))
        if not (np.all(np.isfinite(bound)) and np.all(np.abs(residual) <= bound)):
            raise ValueError(
                f"precisions_cholesky_ of {what} is not the precision factor of its "
                f"covariances_: U^T S U differs from the identity by up to "
                f"{np.max(np.abs(residual)):.3g}"
            )
        product = factor @ factor.T
        if not np.all(np.abs(precision - product) <= slack * (np.abs(factor) @ np.abs(factor).T)):
            raise ValueError(f"precisions_ of {what} is not precisions_cholesky_ times its "
                             "transpose")


def _check_diagonal_covariances(variances, factors, precisions, unit: float) -> None:
    """'diag' and 'spherical': (K, D) and (K, 1) float64 arrays of variances,
    their precision factors 1/sqrt(variance) and precisions 1/variance."""
    slack = 16 * unit
    checks = (
        (variances > 0, "covariances_ of component {} is not positive"),
        (factors > 0, "precisions_cholesky_ of component {} is not positive"),
        # (U v) U, so that neither product under- or overflows where the result does not.
        (np.abs(factors * variances * factors - 1) <= slack,
         "precisions_cholesky_ of component {} is not 1 / sqrt(covariances_)"),
        (np.abs(precisions - factors * factors) <= slack * factors * factors,
         "precisions_ of component {} is not precisions_cholesky_ squared"),
    )
    for valid, message in checks:
        if not np.all(valid):
            raise ValueError(message.format(int(np.flatnonzero(~np.all(valid, axis=1))[0])))


def check_lower_bounds(model) -> None:
    # The EM driver records one lower bound per iteration and reports the last.
    bounds, n_iter = model.lower_bounds_, model.n_iter_
    if len(bounds) != n_iter:
        raise ValueError(f"lower_bounds_ has {len(bounds)} values, but n_iter_ is {n_iter}")
    if bounds and bounds[-1] != model.lower_bound_:
        raise ValueError(f"lower_bound_ is {float(model.lower_bound_)!r}, but the last of "
                         f"lower_bounds_ is {bounds[-1]!r}")


def _check_initial_arrays(model) -> None:
    """The initial arrays as fit checks them (fit would refuse them)."""
    n_components, n_features = model.n_components, model.n_features_in_
    checks = {
        "weights_init": lambda value: check_weights(value, n_components),
        "means_init": lambda value: check_means(value, n_components, n_features),
        "precisions_init": lambda value: check_precisions(value, model.covariance_type,
                                                          n_components, n_features),
    }
    for name, check in checks.items():
        value = getattr(model, name)
        if value is not None:
            try:
                check(value)
            except ValueError as exc:
                raise ValueError(f"the parameter {name} is not one fit accepts: {exc}") from exc


model_files.register_model_format(model_files.ModelFormat(
    name="fastem.GaussianMixture",
    # 2: every constructor parameter is stored (1 left out a RandomState random_state).
    # 3: learning_offset and learning_decay (partial_fit), batch_size and n_epochs.
    # 4: prior (MAP EM) and the fitted prior_, missing (EM with missing values).
    version=4,
    estimator=GaussianMixture,
    fitted_arrays=("weights_", "means_", "covariances_", "precisions_",
                   "precisions_cholesky_"),
    fitted_lists=("lower_bounds_",),
    fitted_scalars={"converged_": bool, "n_iter_": int, "lower_bound_": float,
                    "n_features_in_": int},
    array_params=("weights_init", "means_init", "precisions_init"),
    array_shapes=_saved_array_shapes,
    param_codecs={"prior": model_files.JSONCodec(priors.encode_prior_param,
                                                 priors.decode_prior_param)},
    fitted_codecs={"prior_": model_files.JSONCodec(priors.encode_resolved_prior,
                                                   priors.decode_resolved_prior)},
    check_fitted=_check_saved_mixture,
))
