r"""``BayesianGaussianMixture``: scikit-learn's variational mixture on fastem's driver.

The estimator resolves the priors, starts from the chosen initialisation and
hands the data (a statistics source) and the variational M-step
(:class:`fastem.variational.VariationalUpdate`) to the one EM driver
(:mod:`fastem.em`): the variational E-step is the statistics pass with
expected operands, so it runs in the same kernels as ``GaussianMixture``.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_array, check_is_fitted

from . import distributed
from ._validation import _check_shape, check_positive_definite, check_sample_weight
from .blocks import INIT_SAMPLE_ROWS, blocks_of, is_out_of_core
from .covariance import COVARIANCE_TYPES, precisions_from_cholesky
from .initialization import (
    initial_statistics,
    known_columns,
    responsibility_statistics,
)
from .mixture import EMMixture
from .priors import data_moments
from .scaling import DataScale
from .sources import BlockSource, InMemorySource
from .variational import (
    PRIOR_TYPES,
    VariationalParameters,
    VariationalPrior,
    VariationalUpdate,
    covariance_prior_of,
    expected_log_weights,
    expected_weights,
)

__all__ = ["BayesianGaussianMixture"]

# scikit-learn's initialisations (fastem's 'hierarchical' too).
_INIT_METHODS = ("kmeans", "k-means++", "random", "random_from_data", "hierarchical")


class BayesianGaussianMixture(EMMixture):
    r"""Variational Bayesian Gaussian mixture, a drop-in for scikit-learn's.

    Same parameters, attributes, methods and results as
    :class:`sklearn.mixture.BayesianGaussianMixture`: a Dirichlet-process
    (stick-breaking) or Dirichlet prior on the weights and a Gaussian–Wishart
    prior on each component, fitted by variational EM (formulas in
    :mod:`fastem.variational`). Each iteration is one fused pass of
    ``GaussianMixture``'s statistics kernel under the expected operands;
    components the data do not support keep weights near zero, so
    ``n_components`` is an upper bound on the components used (see
    :meth:`effective_n_components`).

    Parameters
    ----------
    n_components : int, default=1
        The most components the model may use.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
    tol : float, default=1e-3
        Convergence threshold on the change of the lower bound (a total over
        the rows, as in scikit-learn).
    reg_covar : float, default=1e-6
        Added to the diagonal of every component's weighted covariance.
    max_iter : int, default=100
    n_init : int, default=1
        Starts; the one with the highest lower bound is kept.
    init_params : {'kmeans', 'k-means++', 'random', 'random_from_data', 'hierarchical'}, \
default='kmeans'
        The initial responsibilities (fastem's k-means, as in ``GaussianMixture``).
    weight_concentration_prior_type : {'dirichlet_process', 'dirichlet_distribution'}, \
default='dirichlet_process'
    weight_concentration_prior : float > 0 or None, default=None
        :math:`\gamma` (or :math:`\alpha_0`); None: ``1 / n_components``.
        Smaller values put the mass on fewer components.
    mean_precision_prior : float > 0 or None, default=None
        :math:`\beta_0`; None: 1.
    mean_prior : array-like (n_features,) or None, default=None
        :math:`m_0`; None: the data's mean.
    degrees_of_freedom_prior : float or None, default=None
        :math:`\nu_0 > D - 1`; None: ``n_features``.
    covariance_prior : float or array-like or None, default=None
        :math:`W_0^{-1}`: (D, D) for 'full' and 'tied', (D,) for 'diag', a
        float for 'spherical'; None: from the data's covariance.
    random_state : int, RandomState instance or None
    warm_start : bool, default=False
        Continue from the last fit (``n_init`` ignored).
    verbose : int, default=0
    verbose_interval : int, default=10
    n_threads : int or None, default=None
        Cap on the threads (fastem only); results do not depend on it.

    Attributes
    ----------
    weights_, means_, covariances_, precisions_, precisions_cholesky_ : ndarray
    weight_concentration_ : tuple of two ndarray or ndarray
    mean_precision_ : ndarray (n_components,)
    degrees_of_freedom_ : ndarray (n_components,) or float ('tied')
    weight_concentration_prior_, mean_precision_prior_, mean_prior_,
    degrees_of_freedom_prior_, covariance_prior_ : the priors as fitted
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
    lower_bounds_ : list of float
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
        "init_params": [StrOptions(set(_INIT_METHODS))],
        "weight_concentration_prior_type": [StrOptions(set(PRIOR_TYPES))],
        "weight_concentration_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "mean_precision_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "mean_prior": [None, "array-like"],
        "degrees_of_freedom_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "covariance_prior": [None, "array-like", Interval(Real, 0.0, None, closed="neither")],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
        "verbose": ["verbose"],
        "verbose_interval": [Interval(Integral, 1, None, closed="left")],
        "n_threads": [Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(
        self,
        *,
        n_components=1,
        covariance_type="full",
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="kmeans",
        weight_concentration_prior_type="dirichlet_process",
        weight_concentration_prior=None,
        mean_precision_prior=None,
        mean_prior=None,
        degrees_of_freedom_prior=None,
        covariance_prior=None,
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
        self.weight_concentration_prior_type = weight_concentration_prior_type
        self.weight_concentration_prior = weight_concentration_prior
        self.mean_precision_prior = mean_precision_prior
        self.mean_prior = mean_prior
        self.degrees_of_freedom_prior = degrees_of_freedom_prior
        self.covariance_prior = covariance_prior
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.n_threads = n_threads

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None, sample_weight=None):
        """Fit the variational posterior by variational EM (``n_init`` starts, best kept).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), memory-mapped array or callable
            An in-memory array, or data streamed by row blocks (see
            :mod:`fastem.blocks`; the start then runs on a sample of about
            ``fastem.blocks.INIT_SAMPLE_ROWS`` rows).
        y : ignored
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative row weights (fastem only), relative as in
            ``GaussianMixture.fit``: they rescale to average 1 over the rows of
            positive weight, so the prior weighs against that many rows.

        Returns
        -------
        self
        """
        self._validate_params()
        if distributed.is_dask_array(X):
            raise ValueError("BayesianGaussianMixture does not fit Dask arrays yet; "
                             "use GaussianMixture, or fit a memory-mapped file")
        if is_out_of_core(X):
            return self._fit_out_of_core(X, sample_weight)
        X, largest, scan = self._validate_fit_data(X)
        self._check_n_samples(X.shape[0])
        sample_weight = check_sample_weight(sample_weight, X.shape[0])
        rescaled = self._check_scale(DataScale.of_largest(largest, X.dtype))
        source = InMemorySource(X, sample_weight, self.covariance_type)
        return self._fit_source(source, X.shape[1], X.dtype, rescaled,
                                lambda: (X, sample_weight),
                                moments=lambda: data_moments(X, sample_weight),
                                init_known=known_columns(scan, largest, rescaled))

    def _fit_out_of_core(self, X, sample_weight):
        blocks = blocks_of(X, sample_weight)
        self._check_n_samples(blocks.n_samples)
        self.n_features_in_ = blocks.n_features
        if hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        rescaled = self._check_scale(DataScale.of_largest(blocks.largest, blocks.dtype))
        source = BlockSource(blocks, self.covariance_type)
        random_state = check_random_state(self.random_state)
        return self._fit_source(
            source, blocks.n_features, blocks.dtype, rescaled,
            lambda: blocks.sample(INIT_SAMPLE_ROWS, random_state), random_state,
            moments=lambda: blocks.moments(1.0))

    @staticmethod
    def _check_scale(rescaled: DataScale) -> DataScale:
        # The variational bound has no simple shift under rescaling.
        if not rescaled.identity:
            raise ValueError("the data's squares leave the float range; rescale the data "
                             "(for example, standardise each column) before fitting a "
                             "BayesianGaussianMixture")
        return rescaled

    def _fitting_m_step(self, moments, rescaled):
        """The variational update under the priors, resolved (``*_prior_``) from the data."""
        mean, cov = moments()
        self._check_priors(np.asarray(mean, dtype=np.float64), cov)
        return VariationalUpdate(self.covariance_type, self.reg_covar, self._prior())

    def _check_priors(self, data_mean, data_covariance):
        """Resolve and check the priors as scikit-learn's ``_check_parameters`` does."""
        n_features = data_mean.shape[0]
        self.weight_concentration_prior_ = (1.0 / self.n_components
                                            if self.weight_concentration_prior is None
                                            else self.weight_concentration_prior)
        self.mean_precision_prior_ = (1.0 if self.mean_precision_prior is None
                                      else self.mean_precision_prior)
        if self.mean_prior is None:
            self.mean_prior_ = data_mean
        else:
            self.mean_prior_ = check_array(self.mean_prior, dtype=[np.float64, np.float32],
                                           ensure_2d=False)
            _check_shape(self.mean_prior_, (n_features,), "means")
        if self.degrees_of_freedom_prior is None:
            self.degrees_of_freedom_prior_ = n_features
        elif self.degrees_of_freedom_prior > n_features - 1.0:
            self.degrees_of_freedom_prior_ = self.degrees_of_freedom_prior
        else:
            raise ValueError(
                "The parameter 'degrees_of_freedom_prior' should be greater than "
                f"{n_features - 1}, but got {self.degrees_of_freedom_prior:.3f}.")
        self.covariance_prior_ = self._check_covariance_prior(data_covariance, n_features)

    def _check_covariance_prior(self, data_covariance, n_features):
        covariance_type = self.covariance_type
        if self.covariance_prior is None:
            return covariance_prior_of(data_covariance, covariance_type)
        if covariance_type == "spherical":
            return self.covariance_prior
        prior = check_array(self.covariance_prior, dtype=[np.float64, np.float32],
                            ensure_2d=False)
        full = covariance_type in ("full", "tied")
        _check_shape(prior, (n_features, n_features) if full else (n_features,),
                     f"{covariance_type} covariance_prior")
        if full:
            check_positive_definite(prior[None], covariance_type)
        elif np.any(prior <= 0.0):
            raise ValueError(f"'{covariance_type} precision' should be positive")
        return prior

    def _prior(self) -> VariationalPrior:
        return VariationalPrior(
            self.weight_concentration_prior_type, float(self.weight_concentration_prior_),
            float(self.mean_precision_prior_), np.asarray(self.mean_prior_, dtype=np.float64),
            float(self.degrees_of_freedom_prior_),
            np.asarray(self.covariance_prior_, dtype=np.float64))

    def _check_initial_parameters(self, X):
        return {}

    def _initial_parameters(self, X, sample_weight, random_state, user_init,
                            rescaled=DataScale(), m_step=None, known=None):
        """The variational update of the initial responsibilities (``init_params``);
        ``known`` is what the caller read of ``X`` (:class:`~fastem.initialization.ColumnScan`)."""
        stats = initial_statistics(X, sample_weight, self.n_components, self.init_params,
                                   self.covariance_type, random_state, known)
        params, jitter = m_step(stats)
        if np.any(jitter < 0):
            raise ValueError("the initial posterior's covariances are not positive definite; "
                             "check covariance_prior and the data for non-finite values")
        return params

    # --------------------------------------------------------- attributes
    def _current_parameters(self) -> VariationalParameters:
        concentration = self.weight_concentration_
        if isinstance(concentration, tuple):
            concentration = tuple(np.asarray(c, dtype=np.float64) for c in concentration)
        else:
            concentration = np.asarray(concentration, dtype=np.float64)
        return VariationalParameters(
            concentration, *(np.asarray(a, dtype=np.float64) for a in (
                self.mean_precision_, self.means_, self.degrees_of_freedom_,
                self.covariances_, self.precisions_cholesky_)))

    def _adopt_parameters(self, params: VariationalParameters, dtype):
        concentration = params.weight_concentration
        if isinstance(concentration, tuple):
            concentration = tuple(np.asarray(c, dtype=dtype) for c in concentration)
        else:
            concentration = np.asarray(concentration, dtype=dtype)
        dof = params.degrees_of_freedom
        dof = dtype.type(dof) if np.ndim(dof) == 0 else np.asarray(dof, dtype=dtype)
        self._set_parameters((concentration, *(np.asarray(a, dtype=dtype) for a in (
            params.mean_precision, params.means)), dof,
            *(np.asarray(a, dtype=dtype) for a in (params.covariances,
                                                   params.precisions_cholesky))))

    def _get_parameters(self):
        """scikit-learn's six: ``(weight_concentration_, mean_precision_, means_,
        degrees_of_freedom_, covariances_, precisions_cholesky_)``."""
        return (self.weight_concentration_, self.mean_precision_, self.means_,
                self.degrees_of_freedom_, self.covariances_, self.precisions_cholesky_)

    def _set_parameters(self, params, xp=None):
        """Set scikit-learn's six parameters and derive ``weights_`` and ``precisions_``."""
        (self.weight_concentration_, self.mean_precision_, self.means_,
         self.degrees_of_freedom_, self.covariances_, self.precisions_cholesky_) = params
        weights = expected_weights(self.weight_concentration_)
        self.weights_ = weights.astype(np.asarray(self.means_).dtype, copy=False)
        self.precisions_ = precisions_from_cholesky(self.precisions_cholesky_,
                                                    self.covariance_type)

    def effective_n_components(self, threshold: float = 0.01) -> int:
        """Components whose weight is at least ``threshold`` (what the data use)."""
        check_is_fitted(self)
        return int(np.count_nonzero(np.asarray(self.weights_) >= threshold))

    # ----------------------------------- scikit-learn's private interface
    def _check_parameters(self, X, xp=None):
        """Resolve the priors from ``X`` (scikit-learn's name)."""
        X = np.asarray(X)
        self._check_priors(*data_moments(X, None))

    def _initialize(self, X, resp, xp=None):
        """The posterior from responsibilities ``resp``."""
        self._m_step(X, np.log(np.maximum(resp, np.finfo(np.float64).tiny)), xp)

    def _m_step(self, X, log_resp, xp=None):
        """The variational update from log-responsibilities."""
        X = np.asarray(X)
        stats = responsibility_statistics(np.asarray(X, dtype=np.float64), None,
                                          np.exp(log_resp), self.covariance_type)
        params, _ = VariationalUpdate(self.covariance_type, self.reg_covar, self._prior())(stats)
        dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.dtype(np.float64)
        self._adopt_parameters(params, dtype)

    def _estimate_log_weights(self, xp=None):
        r""":math:`\mathbb E[\log\pi_k]`."""
        return expected_log_weights(self._current_parameters().weight_concentration)

    def _estimate_log_prob(self, X, xp=None):
        r""":math:`\log\rho_{nk} - \mathbb E[\log\pi_k]` (see :mod:`fastem.variational`)."""
        return self._estimate_weighted_log_prob(X) - self._estimate_log_weights()

    def _compute_lower_bound(self, log_resp, log_prob_norm):
        """scikit-learn's lower bound of responsibilities ``log_resp`` under the
        current (updated) parameters."""
        update = VariationalUpdate(self.covariance_type, self.reg_covar, self._prior())
        params = self._current_parameters()
        with np.errstate(under="ignore"):
            entropy = -float(np.sum(np.exp(log_resp) * log_resp))
        return (entropy - update.log_wishart_norm(params) - update.log_weight_norm(params)
                - 0.5 * params.means.shape[1] * float(np.sum(np.log(params.mean_precision))))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


# ----------------------------------------------------------- model files
def _floats_to_json(value):
    return None if value is None else np.asarray(value, dtype=np.float64).tolist()


def _floats_from_json(what: str, ndims: tuple[int, ...]):
    def decode(value):
        if value is None:
            raise ValueError(f"the fitted attribute {what} is missing")
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"invalid {what} {value!r:.60}") from None
        if array.ndim not in ndims or not np.all(np.isfinite(array)):
            raise ValueError(f"invalid {what}: expected finite numbers in {ndims} dimensions")
        return np.float64(array) if array.ndim == 0 else array
    return decode


def _encode_concentration(value):
    if isinstance(value, tuple):
        return {"stick_breaking": [_floats_to_json(part) for part in value]}
    return {"dirichlet": _floats_to_json(value)}


def _decode_concentration(value):
    vector = _floats_from_json("weight_concentration_", (1,))
    if isinstance(value, dict) and len(value) == 1:
        if isinstance(value.get("stick_breaking"), list) and len(value["stick_breaking"]) == 2:
            return tuple(vector(part) for part in value["stick_breaking"])
        if "dirichlet" in value:
            return vector(value["dirichlet"])
    raise ValueError(f"invalid weight_concentration_ {value!r:.80}")


def _saved_array_shapes(params, fitted):
    from .covariance import covariance_shape

    k, d = params["n_components"], fitted["n_features_in_"]
    if d < 1 or fitted["n_iter_"] < 0 or fitted["lower_bound_"] == float("inf"):
        raise ValueError(f"invalid fitted attributes n_features_in_={d}, "
                         f"n_iter_={fitted['n_iter_']}, lower_bound_={fitted['lower_bound_']}")
    cov_shape = covariance_shape(params["covariance_type"], k, d)
    prior_shape = {"full": (d, d), "tied": (d, d), "diag": (d,), "spherical": ()}
    return {
        "weights_": (k,), "means_": (k, d), "covariances_": cov_shape,
        "precisions_": cov_shape, "precisions_cholesky_": cov_shape, "mean_precision_": (k,),
        "mean_prior": (d,), "covariance_prior": prior_shape[params["covariance_type"]],
    }


def _check_saved_model(model) -> None:
    """Refuse a loaded posterior that no fit gives (see ``_check_saved_mixture``)."""
    from .mixture import check_lower_bounds, check_saved_gaussians

    check_saved_gaussians(model, ("mean_precision_",))
    check_lower_bounds(model)
    n_components, n_features = model.means_.shape
    concentration = model.weight_concentration_
    stick = isinstance(concentration, tuple)
    if stick != (model.weight_concentration_prior_type == "dirichlet_process"):
        raise ValueError("weight_concentration_ does not match "
                         f"weight_concentration_prior_type={model.weight_concentration_prior_type!r}")
    parts = concentration if stick else (concentration,)
    if any(np.shape(part) != (n_components,) or np.any(np.asarray(part) <= 0)
           for part in parts):
        raise ValueError(f"weight_concentration_ must hold {n_components} positive values "
                         "per part")
    dof = np.asarray(model.degrees_of_freedom_)
    wanted = () if model.covariance_type == "tied" else (n_components,)
    if dof.shape != wanted or np.any(dof <= n_features - 1):
        raise ValueError(f"degrees_of_freedom_ must have shape {wanted} and exceed "
                         f"{n_features - 1}")
    if np.any(model.mean_precision_ <= 0):
        raise ValueError("mean_precision_ must be positive")
    expected = expected_weights(tuple(np.asarray(p, dtype=np.float64) for p in parts)
                                if stick else np.asarray(concentration, dtype=np.float64))
    unit = np.finfo(model.weights_.dtype).eps
    if not np.all(np.abs(expected - model.weights_) <= 8 * n_components * unit):
        raise ValueError("weights_ are not the posterior mean of weight_concentration_")
    if model.mean_prior_.shape != (n_features,):
        raise ValueError(f"mean_prior_ must have shape ({n_features},)")


def _register_model_format():
    from . import io as model_files

    def codec(name, ndims):
        return model_files.JSONCodec(_floats_to_json, _floats_from_json(name, ndims))

    model_files.register_model_format(model_files.ModelFormat(
        name="fastem.BayesianGaussianMixture",
        version=1,
        estimator=BayesianGaussianMixture,
        fitted_arrays=("weights_", "means_", "covariances_", "precisions_",
                       "precisions_cholesky_", "mean_precision_"),
        fitted_lists=("lower_bounds_",),
        fitted_scalars={"converged_": bool, "n_iter_": int, "lower_bound_": float,
                        "n_features_in_": int},
        array_params=("mean_prior", "covariance_prior"),
        array_shapes=_saved_array_shapes,
        fitted_codecs={
            "weight_concentration_": model_files.JSONCodec(_encode_concentration,
                                                           _decode_concentration),
            "degrees_of_freedom_": codec("degrees_of_freedom_", (0, 1)),
            "weight_concentration_prior_": codec("weight_concentration_prior_", (0,)),
            "mean_precision_prior_": codec("mean_precision_prior_", (0,)),
            "mean_prior_": codec("mean_prior_", (1,)),
            "degrees_of_freedom_prior_": codec("degrees_of_freedom_prior_", (0,)),
            "covariance_prior_": codec("covariance_prior_", (0, 1, 2)),
        },
        check_fitted=_check_saved_model,
    ))


_register_model_format()
