"""MAP EM: a conjugate prior on the means and covariances, and its M-step.

Following Fraley & Raftery (2007), "Bayesian regularization for normal
mixture estimation and model-based clustering" (R mclust's ``priorControl``),
each component's mean and covariance get a conjugate prior with
hyperparameters :math:`\\mu_P` (mean), :math:`\\kappa_P` (shrinkage),
:math:`\\nu_P` (degrees of freedom) and :math:`\\Lambda_P` (scale);
mixing proportions get none. EM then maximises the log posterior
:math:`\\log L(\\theta) + \\log p(\\theta)` and its M-step,
:class:`MaximumPosterior`, is the prior's mode given the statistics. With
:math:`\\bar y_k` the component's weighted mean, :math:`W_k` its scatter
around it and :math:`a_k = \\kappa_P N_k/(N_k + \\kappa_P)`:

.. math::

    \\mu_k = \\frac{N_k \\bar y_k + \\kappa_P \\mu_P}{N_k + \\kappa_P},\\qquad
    B_k = \\Lambda_P + W_k + a_k(\\bar y_k - \\mu_P)(\\bar y_k - \\mu_P)^T

* ``'full'`` (mclust VVV; :math:`\\mu_k|\\Sigma_k \\sim N(\\mu_P, \\Sigma_k/\\kappa_P)`,
  :math:`\\Sigma_k \\sim IW(\\nu_P, \\Lambda_P)`):
  :math:`\\Sigma_k = B_k / (\\nu_P + N_k + D + 2)`.
* ``'tied'`` (EEE; one :math:`\\Sigma \\sim IW(\\nu_P, \\Lambda_P)`):
  :math:`\\Sigma = (\\Lambda_P + \\sum_k (B_k - \\Lambda_P)) / (\\nu_P + N + D + K + 1)`.
* ``'diag'`` (VVI; per coordinate :math:`\\sigma^2_{kd} \\sim IG(\\nu_P/2, \\lambda_{P,d}/2)`):
  :math:`\\sigma^2_{kd} = B_{k,dd} / (\\nu_P + N_k + 3)`, with :math:`\\lambda_{P,d}` for
  :math:`\\Lambda_{P,dd}` (mclust's default: one scalar for every coordinate).
* ``'spherical'`` (VII; :math:`\\sigma^2_k \\sim IG(\\nu_P/2, \\varsigma_P/2)`):
  :math:`\\sigma^2_k = (\\varsigma_P + \\operatorname{tr}(B_k - \\Lambda_P))
  / (\\nu_P + (N_k + 1) D + 2)`.

``reg_covar`` is added to the diagonal afterwards, as in the
maximum-likelihood M-step; :math:`\\pi_k = N_k/N`. With :math:`\\kappa_P = 0`
the means' prior is flat and the denominators lose its share (1 per
component, :math:`D` for 'spherical').
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import multigammaln

from .covariance import COVARIANCE_KIND, from_canonical, to_canonical
from .stats import GaussianParameters, GaussianStatistics, MaximumLikelihood

# mclust's priorControl() defaults.
DEFAULT_SHRINKAGE = 0.01


@dataclass(frozen=True, eq=False)
class GaussianPrior:
    """Hyperparameters of the conjugate prior; None takes mclust's default.

    Parameters
    ----------
    mean : array (D,) or None
        :math:`\\mu_P`; default: the data's mean.
    shrinkage : float
        :math:`\\kappa_P \\ge 0`, the prior's weight on the mean in rows
        (0: no prior on the means); default 0.01.
    dof : float or None
        :math:`\\nu_P`, above :math:`D - 1` for 'full' and 'tied' (an
        inverse-Wishart), above 0 for 'diag' and 'spherical' (inverse-gamma);
        default :math:`D + 2`.
    scale : array or float or None
        :math:`\\Lambda_P`: a (D, D) matrix for 'full' and 'tied', a scalar or a
        (D,) diagonal (or a matrix, whose diagonal is used) for 'diag', a
        scalar for 'spherical'. Default, as mclust's ``defaultPrior``, from
        the data's covariance :math:`S` (denominator N - 1) and
        :math:`f = K^{-2/D}`: :math:`fS` for 'full' and 'tied' and the scalar
        :math:`f\\,\\mathrm{tr}(S)/D` for 'diag' and 'spherical'. When
        :math:`S` is singular (N <= D, a constant or collinear column), the
        diagonal of :math:`S` is used instead, as mclust does for N <= D, with
        zero variances raised to ``1e-6`` of the average variance.

    The data count as the rows of positive weight against the prior: sample
    weights are relative (see ``GaussianMixture.fit``), so integer weights fit
    as repeated rows do only without a prior. Equality is identity (the fields
    may be arrays).
    """

    mean: object = None
    shrinkage: float = DEFAULT_SHRINKAGE
    dof: float | None = None
    scale: object = None

    def resolved(self, data_mean, data_covariance, n_components: int,
                 covariance_type: str) -> ResolvedPrior:
        """The hyperparameters for data of this mean and covariance (N - 1)."""
        data_mean = np.asarray(data_mean, dtype=np.float64)
        n_features = data_mean.shape[0]
        mean = data_mean if self.mean is None else np.asarray(self.mean, dtype=np.float64)
        if mean.shape != (n_features,) or not np.all(np.isfinite(mean)):
            raise ValueError(f"prior mean must be a finite vector of {n_features} values, "
                             f"got shape {mean.shape}")
        shrinkage = float(self.shrinkage)
        if not (np.isfinite(shrinkage) and shrinkage >= 0):
            raise ValueError(f"prior shrinkage must be finite and >= 0, got {self.shrinkage}")
        if shrinkage == 0 and self.mean is not None:
            raise ValueError("a prior mean needs shrinkage > 0 (with shrinkage=0 the means "
                             "have no prior)")
        dof = float(n_features + 2 if self.dof is None else self.dof)
        wishart = covariance_type in ("full", "tied")
        least = n_features - 1 if wishart else 0
        if not (np.isfinite(dof) and dof > least):
            raise ValueError(f"prior dof must be finite and > {least} for covariance_type="
                             f"{covariance_type!r}, got {self.dof}")
        if self.scale is None:
            scale = _default_scale(data_covariance, n_components, covariance_type)
        else:
            scale = _check_scale(self.scale, covariance_type, n_features)
        return ResolvedPrior(mean, shrinkage, dof, np.asarray(scale, dtype=np.float64))


def _default_scale(data_covariance, n_components: int, covariance_type: str):
    """mclust's default scale, made positive definite for singular data."""
    cov = np.atleast_2d(np.asarray(data_covariance, dtype=np.float64))
    n_features = cov.shape[0]
    factor = float(n_components) ** (-2.0 / n_features)
    variances = np.diag(cov).copy()
    if not np.all(np.isfinite(cov)):
        raise ValueError("the data's covariance is not finite: cannot set the default prior")
    typical = float(np.mean(variances)) if np.any(variances > 0) else 1.0
    floored = np.maximum(variances, 1e-6 * typical)
    if covariance_type in ("full", "tied"):
        try:
            np.linalg.cholesky(cov)
            return factor * cov
        except np.linalg.LinAlgError:  # N <= D, a constant or collinear column
            return factor * np.diag(floored)
    # mclust: one scalar for every variance, 'diag' included.
    return factor * float(np.mean(floored))


def _check_scale(scale, covariance_type: str, n_features: int) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float64)
    if covariance_type in ("full", "tied"):
        ok = scale.shape == (n_features, n_features) and np.allclose(scale, scale.T)
        if ok:
            ok = bool(np.all(np.isfinite(scale))) and np.all(np.linalg.eigvalsh(scale) > 0)
        expected = f"a symmetric positive definite ({n_features}, {n_features}) matrix"
    elif covariance_type == "diag":
        if scale.shape == (n_features, n_features):
            scale = np.diag(scale).copy()
        ok = scale.shape in ((), (n_features,)) and bool(np.all(np.isfinite(scale)
                                                                & (scale > 0)))
        expected = f"a positive scalar or {n_features} positive values"
    else:
        ok = scale.ndim == 0 and bool(np.isfinite(scale) and scale > 0)
        expected = "a positive scalar"
    if not ok:
        raise ValueError(f"prior scale for covariance_type={covariance_type!r} must be "
                         f"{expected}, got an array of shape {scale.shape}")
    return scale


@dataclass(frozen=True)
class ResolvedPrior:
    """The prior's hyperparameters for one model: mean (D,), shrinkage, dof and
    scale (matrix, diagonal or scalar by covariance type)."""

    mean: np.ndarray
    shrinkage: float
    dof: float
    scale: np.ndarray

    def rescaled(self, factor: float) -> ResolvedPrior:
        """The prior of the data multiplied by ``factor`` (see :mod:`fastem.scaling`)."""
        return ResolvedPrior(self.mean * factor, self.shrinkage, self.dof,
                             self.scale * factor**2)


def default_prior() -> GaussianPrior:
    """mclust's ``priorControl()``: every hyperparameter from the data."""
    return GaussianPrior()


def check_prior(prior) -> GaussianPrior | None:
    """The ``prior`` parameter as a :class:`GaussianPrior` (or None)."""
    if prior is None:
        return None
    if isinstance(prior, str) and prior == "default":
        return default_prior()
    if isinstance(prior, GaussianPrior):
        return prior
    raise ValueError(f"prior must be None, 'default' or a fastem.GaussianPrior, got {prior!r}")


def data_moments(X, sample_weight) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (denominator :math:`\\sum w - 1`, R's ``var`` for
    unit weights) of in-memory rows, in float64."""
    X = np.asarray(X, dtype=np.float64)
    if sample_weight is None:
        return X.mean(axis=0), np.atleast_2d(np.cov(X, rowvar=False))
    w = np.asarray(sample_weight, dtype=np.float64)
    mean = np.average(X, axis=0, weights=w)
    centred = X - mean
    cov = (centred * w[:, None]).T @ centred / max(w.sum() - 1.0, 1e-300)
    return mean, np.atleast_2d(cov)


def m_step_for(covariance_type: str, reg_covar: float, prior, n_components: int, moments,
               rescaled) -> tuple[MaximumLikelihood, ResolvedPrior | None]:
    """The M-step a fit runs, and the prior it resolved (None without one).

    ``prior`` is the estimator's parameter (None, 'default' or a
    :class:`GaussianPrior`); ``moments()`` gives the mean and covariance of
    the data as fitted, that is rescaled by ``rescaled``
    (:class:`fastem.scaling.DataScale`), and is called only for a prior. The
    resolved prior is in the data's units; the M-step works in the fitted ones.
    """
    prior = check_prior(prior)
    reg = rescaled.reg_covar(reg_covar)
    if prior is None:
        return MaximumLikelihood(covariance_type, reg), None
    mean, cov = moments()
    s = rescaled.scale
    resolved = prior.resolved(np.asarray(mean) / s, np.asarray(cov) / s**2, n_components,
                              covariance_type)
    return MaximumPosterior(covariance_type, reg, resolved.rescaled(s),
                            _log_jacobian(resolved, covariance_type, n_components,
                                          len(mean), s)), resolved


def _log_jacobian(prior: ResolvedPrior, covariance_type: str, n_components: int,
                  n_features: int, scale: float) -> float:
    """:math:`\\log|\\partial\\theta'/\\partial\\theta|` of the rescaling
    :math:`\\mu' = s\\mu`, :math:`\\Sigma' = s^2\\Sigma` over the parameters the
    prior is a density of: what turns the prior density of the rescaled
    parameters into that of the data's."""
    if scale == 1.0:
        return 0.0
    n_cov = {"full": n_components * n_features * (n_features + 1) // 2,
             "tied": n_features * (n_features + 1) // 2,
             "diag": n_components * n_features, "spherical": n_components}[covariance_type]
    n_means = n_components * n_features if prior.shrinkage > 0 else 0
    return (n_means + 2 * n_cov) * float(np.log(scale))


class MaximumPosterior(MaximumLikelihood):
    """The MAP M-step of a Gaussian mixture under a :class:`ResolvedPrior`.

    Its objective is the average log posterior
    :math:`(\\sum_n w_n \\log p(x_n) + \\log p(\\theta)) / \\sum_n w_n` under the
    parameters of the E-step (the prior's density normalised, so the
    objective is a true log posterior density per unit weight).

    Parameters
    ----------
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    reg_covar : float
        Added to the diagonal of every covariance after the MAP update.
    prior : ResolvedPrior
        In the units of the data as fitted.
    log_jacobian : float
        Added to the log prior density (see ``m_step_for``): the density of
        the parameters in the data's units when the fit runs rescaled.
    """

    def __init__(self, covariance_type: str, reg_covar: float, prior: ResolvedPrior,
                 log_jacobian: float = 0.0):
        super().__init__(covariance_type, reg_covar)
        self.prior = prior
        self.log_jacobian = float(log_jacobian)

    # Not the compiled EM loop (maximum likelihood only): the Python driver runs it.
    compiled_form = None

    def __call__(self, stats: GaussianStatistics):
        from ._kernels.mstep import factor_covariance

        prior = self.prior
        nk = np.asarray(stats.nk, dtype=np.float64)
        # Scikit-learn's guard against empty components, as in the ML M-step.
        nk_reg = nk + 10 * np.finfo(np.float64).eps
        n_components, n_features = stats.sx.shape
        centre = stats.sx / nk_reg[:, None]              # ybar_k - c_k
        ybar = stats.shift + centre
        kappa = prior.shrinkage
        means = (nk_reg[:, None] * ybar + kappa * prior.mean) / (nk_reg[:, None] + kappa)
        a = kappa * nk / (nk + kappa) if kappa > 0 else np.zeros_like(nk)
        offset = ybar - prior.mean
        weights = nk_reg / nk_reg.sum()
        kind = COVARIANCE_KIND[self.covariance_type]
        # The normal prior on the means adds |Sigma|^(-1/2) per component;
        # with kappa = 0 it is flat and adds nothing.
        normal = 1.0 if kappa > 0 else 0.0
        if kind <= 1:
            # W_k = S_k - s_k s_k^T / N_k (around c_k), and the shrinkage term.
            correction = (a[:, None, None] * np.einsum("ki,kj->kij", offset, offset)
                          - np.einsum("ki,kj->kij", stats.sx, centre))
            if kind == 0:
                cov = ((prior.scale + (stats.sxx + correction))
                       / (prior.dof + nk + n_features + 1 + normal)[:, None, None])
            else:
                # The scatter summed over components (it may come pooled).
                scatter = stats.sxx.sum(axis=0) + correction.sum(axis=0)
                cov = ((prior.scale + scatter)
                       / (prior.dof + nk.sum() + n_features + 1 + normal * n_components))[None]
            cov = 0.5 * (cov + cov.transpose(0, 2, 1))
            cov[:, np.arange(n_features), np.arange(n_features)] += self.reg_covar
            lower = np.empty((n_features, n_features))
            prec_chol = np.empty_like(cov)
            jitter = np.array([factor_covariance(c, lower, u) for c, u in zip(cov, prec_chol)])
        else:
            diag_scatter = (stats.sxx[:, :, 0] - stats.sx * centre + a[:, None] * offset**2)
            if kind == 2:
                var = (prior.scale + diag_scatter) / (prior.dof + nk + 2 + normal)[:, None]
            else:
                var = ((prior.scale + diag_scatter.sum(axis=1))
                       / (prior.dof + (nk + normal) * n_features + 2))[:, None]
            var = var + self.reg_covar
            jitter = np.where(np.all(np.isfinite(var) & (var > 0), axis=1), 0.0, -1.0)
            cov = var[:, :, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                prec_chol = 1.0 / np.sqrt(cov)
        return GaussianParameters(weights, means, from_canonical(cov, self.covariance_type),
                                  from_canonical(prec_chol, self.covariance_type)), jitter

    def log_prior(self, params: GaussianParameters) -> float:
        """:math:`\\log p(\\theta)`: the normalised prior density at ``params``."""
        return log_prior_density(self.prior, params, self.covariance_type) + self.log_jacobian

    def objective(self, stats: GaussianStatistics, params: GaussianParameters = None
                  ) -> float:
        prior_term = 0.0 if params is None else self.log_prior(params)
        return (stats.loglik + prior_term) / stats.weight


def log_prior_density(prior: ResolvedPrior, params: GaussianParameters,
                      covariance_type: str) -> float:
    """Log density of the conjugate prior at ``params`` (normalised).

    'full': per component :math:`\\log N(\\mu_k; \\mu_P, \\Sigma_k/\\kappa_P) +
    \\log IW(\\Sigma_k; \\nu_P, \\Lambda_P)`; 'tied': the normal terms of every
    component and one inverse-Wishart; 'diag' and 'spherical': the normal
    terms and an inverse-gamma :math:`IG(\\nu_P/2, \\Lambda_P/2)` per variance
    (per coordinate for 'diag'). With :math:`\\kappa_P = 0` the means have a
    flat (improper) prior and contribute nothing.
    """
    kind = COVARIANCE_KIND[covariance_type]
    means = np.asarray(params.means, dtype=np.float64)
    n_components, n_features = means.shape
    cov = to_canonical(params.covariances, covariance_type)
    kappa, nu, scale = prior.shrinkage, prior.dof, prior.scale
    total = 0.0
    offsets = means - prior.mean
    if kind <= 1:
        for c in cov:
            _, logdet = np.linalg.slogdet(c)
            total += (0.5 * nu * np.linalg.slogdet(scale)[1] - 0.5 * nu * n_features * np.log(2)
                      - multigammaln(0.5 * nu, n_features)
                      - 0.5 * (nu + n_features + 1) * logdet
                      - 0.5 * np.trace(np.linalg.solve(c, scale)))
        if kappa > 0:
            for k in range(n_components):
                c = cov[0 if kind == 1 else k]
                _, logdet = np.linalg.slogdet(c)
                total += (-0.5 * n_features * np.log(2 * np.pi / kappa) - 0.5 * logdet
                          - 0.5 * kappa * offsets[k] @ np.linalg.solve(c, offsets[k]))
        return float(total)
    var = cov[:, :, 0]                       # (K, D) or (K, 1)
    shape, rate = 0.5 * nu, 0.5 * scale      # inverse-gamma per variance
    ig = (shape * np.log(rate) - _lgamma(shape) - (shape + 1) * np.log(var) - rate / var)
    total += float(ig.sum())
    if kappa > 0:
        full_var = np.broadcast_to(var, means.shape)
        total += float(np.sum(-0.5 * np.log(2 * np.pi * full_var / kappa)
                              - 0.5 * kappa * offsets**2 / full_var))
    return total


# Model files (fastem.io): the prior parameter and the fitted prior as JSON.
def _to_json(value):
    return None if value is None else np.asarray(value, dtype=np.float64).tolist()


def _from_json(value, what: str, ndim: tuple[int, ...]):
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"invalid {what} {value!r:.60}") from None
    if array.ndim not in ndim or not np.all(np.isfinite(array)):
        raise ValueError(f"invalid {what}: expected a finite array of {ndim} dimensions")
    return array if array.ndim else float(array)


_PRIOR_FIELDS = ("mean", "shrinkage", "dof", "scale")
_FIELD_DIMS = {"mean": (1,), "shrinkage": (0,), "dof": (0,), "scale": (0, 1, 2)}


def encode_prior_param(prior):
    """The ``prior`` parameter as JSON: None, 'default' or a dict of its fields."""
    if prior is None or isinstance(prior, str):
        return prior
    return {"GaussianPrior": {name: _to_json(getattr(prior, name)) for name in _PRIOR_FIELDS}}


def decode_prior_param(value):
    if value is None or isinstance(value, str):
        return value
    fields = value.get("GaussianPrior") if isinstance(value, dict) and len(value) == 1 else None
    if not isinstance(fields, dict) or set(fields) != set(_PRIOR_FIELDS):
        raise ValueError(f"invalid prior parameter {value!r:.80}")
    return GaussianPrior(**{name: _from_json(fields[name], f"prior {name}", _FIELD_DIMS[name])
                            for name in _PRIOR_FIELDS})


def encode_resolved_prior(prior):
    """The fitted ``prior_`` as JSON: None or a dict of its fields."""
    if prior is None:
        return None
    return {name: _to_json(getattr(prior, name)) for name in _PRIOR_FIELDS}


def decode_resolved_prior(value):
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(_PRIOR_FIELDS) or any(
            value[name] is None for name in _PRIOR_FIELDS):
        raise ValueError(f"invalid fitted prior_ {value!r:.80}")
    fields = {name: _from_json(value[name], f"prior_ {name}", _FIELD_DIMS[name])
              for name in _PRIOR_FIELDS}
    return ResolvedPrior(fields["mean"], fields["shrinkage"], fields["dof"],
                         np.asarray(fields["scale"]))


def _lgamma(x: float) -> float:
    from math import lgamma

    return lgamma(x)


__all__ = ["DEFAULT_SHRINKAGE", "GaussianPrior", "MaximumPosterior", "ResolvedPrior",
           "check_prior", "data_moments", "default_prior", "log_prior_density", "m_step_for"]
