r"""Variational Bayesian EM for a Gaussian mixture: its parameters and M-step.

The model is scikit-learn's ``BayesianGaussianMixture`` (Bishop 2006, §10.2;
Blei & Jordan 2006 for the Dirichlet process): a Dirichlet (or stick-breaking
Dirichlet-process) prior on the weights and a Gaussian–Wishart prior on each
component's mean and precision. The variational posterior has the same form,
with parameters :math:`(\alpha_k \text{ or } (a_k, b_k),\ \beta_k,\ m_k,\
\nu_k,\ W_k)`.

The variational E-step is the statistics pass of maximum-likelihood EM with
*expected* operands: the responsibilities are
:math:`r_{nk} \propto \rho_{nk}` with

.. math::

    \log\rho_{nk} = \mathbb E[\log\pi_k] + \tfrac12\mathbb E[\log|\Lambda_k|]
    - \tfrac D2\log 2\pi - \tfrac D{2\beta_k}
    - \tfrac12\nu_k (x_n - m_k)^T W_k (x_n - m_k),

a Gaussian log-density with precision :math:`\nu_k W_k` (whose Cholesky factor
is ``precisions_cholesky_``) and a per-component constant
(:meth:`VariationalParameters.expected_log_terms`). So the same kernel gives
:math:`N_k`, :math:`\sum r x` and :math:`\sum r x x^T`, and
:class:`VariationalUpdate` turns them into the posterior's parameters. The
objective is scikit-learn's lower bound, whose responsibility entropy
:math:`-\sum_{nk} r_{nk}\log r_{nk}` also follows from the statistics:

.. math::

    \sum_{n,k} r_{nk}\log r_{nk} = \sum_k \Big(N_k c_k - \tfrac12
    \operatorname{tr}(\nu_k W_k S_k)\Big) - \sum_n \log\sum_k \rho_{nk},

with :math:`c_k` the constant above and :math:`S_k` the scatter around
:math:`m_k`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.special import betaln, digamma, gammaln

from .covariance import COVARIANCE_KIND, to_canonical
from .stats import GaussianStatistics

PRIOR_TYPES = ("dirichlet_process", "dirichlet_distribution")


class VariationalParameters(NamedTuple):
    """The variational posterior, in scikit-learn's attributes and shapes.

    ``weight_concentration`` is a pair of (K,) arrays (the Beta parameters of
    the stick-breaking weights) for a Dirichlet process and a (K,) array for a
    Dirichlet distribution; ``degrees_of_freedom`` is a scalar for 'tied';
    ``covariances`` is :math:`(\\nu_k W_k)^{-1}` and ``precisions_cholesky``
    its inverse's Cholesky factor.
    """

    weight_concentration: object
    mean_precision: np.ndarray
    means: np.ndarray
    degrees_of_freedom: object
    covariances: np.ndarray
    precisions_cholesky: np.ndarray

    @property
    def weights(self) -> np.ndarray:
        """The posterior mean weights (``weights_``)."""
        return expected_weights(self.weight_concentration)

    def expected_log_terms(self, n_features: int) -> np.ndarray:
        r"""Per component, what :math:`\log\rho_{nk}` adds to a Gaussian log-density
        of precision :math:`\nu_k W_k` with unit weight:

        .. math::

            \mathbb E[\log\pi_k] - \tfrac D2\log\nu_k
            + \tfrac12\Big(D\log 2 + \sum_{i=0}^{D-1}\psi\big(\tfrac{\nu_k - i}2\big)
            - \tfrac D{\beta_k}\Big)

        (scikit-learn's expression for every covariance type).
        """
        dof = np.asarray(self.degrees_of_freedom, dtype=np.float64)
        log_lambda = n_features * np.log(2.0) + np.sum(
            digamma(0.5 * (dof - np.arange(n_features)[:, None])), axis=0)
        return (expected_log_weights(self.weight_concentration)
                - 0.5 * n_features * np.log(dof)
                + 0.5 * (log_lambda - n_features / np.asarray(self.mean_precision)))


def expected_log_weights(weight_concentration) -> np.ndarray:
    r""":math:`\mathbb E[\log\pi_k]` under the variational posterior.

    Dirichlet: :math:`\psi(\alpha_k) - \psi(\sum_j\alpha_j)`. Stick-breaking,
    :math:`v_k \sim \mathrm{Beta}(a_k, b_k)`, :math:`\pi_k = v_k\prod_{j<k}(1-v_j)`:
    :math:`\psi(a_k) - \psi(a_k+b_k) + \sum_{j<k}\big(\psi(b_j) - \psi(a_j+b_j)\big)`.
    """
    if isinstance(weight_concentration, tuple):
        a, b = weight_concentration
        total = digamma(a + b)
        return digamma(a) - total + np.hstack((0.0, np.cumsum(digamma(b) - total)[:-1]))
    alpha = np.asarray(weight_concentration)
    return digamma(alpha) - digamma(np.sum(alpha))


def expected_weights(weight_concentration) -> np.ndarray:
    r"""Posterior mean weights: :math:`\alpha_k/\sum_j\alpha_j`, or for the stick
    breaking :math:`\frac{a_k}{a_k+b_k}\prod_{j<k}\frac{b_j}{a_j+b_j}`, normalised."""
    if isinstance(weight_concentration, tuple):
        a, b = weight_concentration
        total = a + b
        weights = a / total * np.hstack((1.0, np.cumprod(b / total)[:-1]))
        return weights / np.sum(weights)
    alpha = np.asarray(weight_concentration)
    return alpha / np.sum(alpha)


@dataclass(frozen=True, eq=False)
class VariationalPrior:
    """The prior's resolved hyperparameters (scikit-learn's ``*_prior_`` attributes).

    Attributes
    ----------
    weight_concentration_prior_type : {'dirichlet_process', 'dirichlet_distribution'}
    weight_concentration : float
        :math:`\\gamma` (the Beta's second parameter) or :math:`\\alpha_0`.
    mean_precision : float
        :math:`\\beta_0`.
    mean : ndarray (D,)
        :math:`m_0`.
    degrees_of_freedom : float
        :math:`\\nu_0 > D - 1`.
    covariance : ndarray
        :math:`W_0^{-1}`: (D, D) for 'full' and 'tied', (D,) for 'diag', a
        scalar for 'spherical'.
    """

    weight_concentration_prior_type: str
    weight_concentration: float
    mean_precision: float
    mean: np.ndarray
    degrees_of_freedom: float
    covariance: np.ndarray


class VariationalUpdate:
    r"""The variational M-step (scikit-learn's ``BayesianGaussianMixture._m_step``).

    From the statistics, with :math:`\tilde N_k = N_k + 10\epsilon`,
    :math:`\bar x_k` the weighted means and :math:`S_k` the weighted
    covariances plus ``reg_covar`` (those of maximum-likelihood EM):

    .. math::

        \alpha_k = \alpha_0 + \tilde N_k \quad\text{or}\quad
        (a_k, b_k) = \big(1 + \tilde N_k,\ \gamma + \textstyle\sum_{j>k}\tilde N_j\big),
        \qquad \beta_k = \beta_0 + \tilde N_k,\quad
        m_k = (\beta_0 m_0 + \tilde N_k\bar x_k)/\beta_k,

        \nu_k = \nu_0 + \tilde N_k,\quad
        \nu_k\,(\nu_k W_k)^{-1} = W_0^{-1} + \tilde N_k S_k
        + \frac{\beta_0\tilde N_k}{\beta_k}(\bar x_k - m_0)(\bar x_k - m_0)^T,

    'tied' pooling :math:`\nu = \nu_0 + \sum_k\tilde N_k/K` and the scatter,
    'diag' keeping the diagonal and 'spherical' its mean. Components keep
    their place when they empty (that is how the prior prunes them): the
    driver neither re-seeds nor warns.

    Its objective is scikit-learn's lower bound, taken with the
    responsibilities of the E-step and the parameters that this update
    produces from them (``objective_after_update``).
    """

    compiled_form = None                 # the Python driver runs it
    objective_after_update = True
    keeps_empty_components = True

    def __init__(self, covariance_type: str, reg_covar: float, prior: VariationalPrior):
        self.covariance_type = covariance_type
        self.reg_covar = float(reg_covar)
        self.prior = prior

    def __call__(self, stats: GaussianStatistics):
        prior = self.prior
        kind = COVARIANCE_KIND[self.covariance_type]
        n_components, n_features = stats.sx.shape
        nk = np.asarray(stats.nk, dtype=np.float64) + 10 * np.finfo(np.float64).eps
        centre = stats.sx / nk[:, None]
        xk = stats.shift + centre
        if prior.weight_concentration_prior_type == "dirichlet_process":
            concentration = (1.0 + nk, prior.weight_concentration
                             + np.hstack((np.cumsum(nk[::-1])[-2::-1], 0.0)))
        else:
            concentration = prior.weight_concentration + nk
        beta = prior.mean_precision + nk
        means = (prior.mean_precision * prior.mean + nk[:, None] * xk) / beta[:, None]
        diff = xk - prior.mean
        shrink = prior.mean_precision / beta
        if kind <= 1:
            # Scatter around the weighted mean: S - s d^T - d s^T + N d d^T.
            outer = np.einsum("ki,kj->kij", stats.sx, centre)
            correction = (stats.nk[:, None, None] * np.einsum("ki,kj->kij", centre, centre)
                          - outer - outer.transpose(0, 2, 1))
            eye = self.reg_covar * np.eye(n_features)
            if kind == 0:
                dof = prior.degrees_of_freedom + nk
                sk = (stats.sxx + correction) / nk[:, None, None] + eye
                cov = (prior.covariance + nk[:, None, None] * sk
                       + (nk * shrink)[:, None, None] * np.einsum("ki,kj->kij", diff, diff))
                cov = cov / dof[:, None, None]
            else:
                dof = prior.degrees_of_freedom + nk.sum() / n_components
                # The scatter summed over components (it may come pooled).
                sk = (stats.sxx.sum(axis=0) + correction.sum(axis=0)) / nk.sum() + eye
                cov = (prior.covariance + sk * nk.sum() / n_components
                       + prior.mean_precision / n_components
                       * ((nk / beta) * diff.T) @ diff) / dof
        else:
            diag = (stats.sxx[:, :, 0] - 2.0 * stats.sx * centre
                    + stats.nk[:, None] * centre**2) / nk[:, None] + self.reg_covar
            dof = prior.degrees_of_freedom + nk
            if kind == 2:
                cov = (prior.covariance + nk[:, None] * (diag + shrink[:, None] * diff**2)
                       ) / dof[:, None]
            else:
                cov = (prior.covariance + nk * (diag.mean(axis=1)
                                                + shrink * np.mean(diff**2, axis=1))) / dof
        cov = np.asarray(cov)
        jitter = np.zeros(n_components)
        try:
            if not np.all(np.isfinite(cov)):
                raise np.linalg.LinAlgError
            prec_chol = _precision_factors(cov, self.covariance_type)
        except np.linalg.LinAlgError:
            jitter[:] = -1.0
            prec_chol = np.full_like(cov, np.nan)
        return VariationalParameters(concentration, beta, means, dof, cov, prec_chol), jitter

    def objective(self, stats: GaussianStatistics, params: VariationalParameters,
                  updated: VariationalParameters) -> float:
        r"""scikit-learn's lower bound of the iteration whose E-step ran under
        ``params`` and gave ``stats``, and whose update gave ``updated``:

        .. math::

            -\sum_{nk} r_{nk}\log r_{nk} - \sum_k\log B(W_k, \nu_k)
            - \log C(\text{weights}) - \tfrac D2\sum_k\log\beta_k

        with :math:`\log B` the Wishart normaliser of :math:`\nu_k W_k / \nu_k`
        and :math:`\log C` the Dirichlet's (or the sum of the Betas' ``-betaln``).
        """
        return (self.entropy(stats, params) - self.log_wishart_norm(updated)
                - self.log_weight_norm(updated)
                - 0.5 * stats.sx.shape[1] * float(np.sum(np.log(updated.mean_precision))))

    def entropy(self, stats: GaussianStatistics, params: VariationalParameters) -> float:
        r""":math:`-\sum_n w_n\sum_k r_{nk}\log r_{nk}` of the E-step under ``params``,
        from its statistics (see the module's docstring)."""
        kind = COVARIANCE_KIND[self.covariance_type]
        n_features = stats.sx.shape[1]
        prec_chol = to_canonical(params.precisions_cholesky, self.covariance_type)
        if kind <= 1:
            precision = np.einsum("kij,klj->kil", prec_chol, prec_chol)
            if kind == 1:
                # One precision: only the scatter summed over components counts.
                mahalanobis = np.einsum("ij,ij->", precision[0], stats.sxx.sum(axis=0))
            else:
                mahalanobis = np.einsum("kij,kij->k", precision, stats.sxx)
        else:
            precision = np.broadcast_to(prec_chol[:, :, 0] ** 2, stats.sx.shape)
            mahalanobis = np.sum(precision * stats.sxx[:, :, 0], axis=1)
        constant = (_log_det_cholesky(prec_chol, kind, n_features)
                    - 0.5 * n_features * np.log(2 * np.pi)
                    + params.expected_log_terms(n_features))
        weighted_log_rho = float(np.sum(stats.nk * constant) - 0.5 * np.sum(mahalanobis))
        return stats.loglik - weighted_log_rho

    def log_wishart_norm(self, params: VariationalParameters) -> float:
        r""":math:`\sum_k \log B(W_k, \nu_k)`, with
        :math:`\log B = -\nu\log|L| - \tfrac{\nu D}2\log 2 - \log\Gamma_D(\nu/2)`
        for :math:`L` the Cholesky factor of :math:`W` (scikit-learn's
        expression, with its per-dimension gamma sum for every type; 'tied'
        counts its one Wishart K times)."""
        n_features = np.shape(params.means)[1]
        n_components = np.shape(params.means)[0]
        prec_chol = to_canonical(params.precisions_cholesky, self.covariance_type)
        kind = COVARIANCE_KIND[self.covariance_type]
        dof = np.asarray(params.degrees_of_freedom, dtype=np.float64)
        log_det = (_log_det_cholesky(prec_chol, kind, n_features)
                   - 0.5 * n_features * np.log(dof))
        norm = -(dof * log_det + dof * n_features * 0.5 * np.log(2.0)
                 + np.sum(gammaln(0.5 * (dof - np.arange(n_features)[:, None])), axis=0))
        if kind == 1:
            return float(n_components * np.sum(norm))
        return float(np.sum(norm))

    def log_weight_norm(self, params: VariationalParameters) -> float:
        """Log normaliser of the weights' posterior (Dirichlet, or the Betas)."""
        concentration = params.weight_concentration
        if isinstance(concentration, tuple):
            return float(-np.sum(betaln(concentration[0], concentration[1])))
        alpha = np.asarray(concentration)
        return float(gammaln(np.sum(alpha)) - np.sum(gammaln(alpha)))


def _precision_factors(covariances, covariance_type: str) -> np.ndarray:
    r"""Upper factors :math:`U = (L^{-1})^T` of the precisions, :math:`\Sigma = LL^T`,
    for a whole stack at once (one batched LAPACK call each, not one per component:
    per-call overhead dominates for small D). Raises ``LinAlgError`` when a
    covariance is not positive definite."""
    if covariance_type in ("diag", "spherical"):
        if np.any(covariances <= 0.0):
            raise np.linalg.LinAlgError("non-positive variance")
        return 1.0 / np.sqrt(covariances)
    stack = covariances[None] if covariance_type == "tied" else covariances
    lower = np.linalg.cholesky(stack)
    factors = np.linalg.solve(lower, np.broadcast_to(np.eye(stack.shape[-1]), stack.shape))
    factors = np.ascontiguousarray(factors.transpose(0, 2, 1))
    return factors[0] if covariance_type == "tied" else factors


def _log_det_cholesky(prec_chol, kind: int, n_features: int) -> np.ndarray:
    """:math:`\\log\\det U_k` of canonical precision factors ((K, D, D) or (K, D, 1))."""
    if kind <= 1:
        return np.sum(np.log(np.diagonal(prec_chol, axis1=1, axis2=2)), axis=1)
    log_det = np.sum(np.log(prec_chol[:, :, 0]), axis=1)
    return n_features * log_det if kind == 3 else log_det


def covariance_prior_of(data_covariance, covariance_type: str) -> np.ndarray:
    """scikit-learn's default ``covariance_prior_`` from the data's covariance (N - 1)."""
    cov = np.atleast_2d(np.asarray(data_covariance, dtype=np.float64))
    if covariance_type in ("full", "tied"):
        return cov
    if covariance_type == "diag":
        return np.diag(cov).copy()
    return np.float64(np.mean(np.diag(cov)))


__all__ = ["PRIOR_TYPES", "VariationalParameters", "VariationalPrior", "VariationalUpdate",
           "covariance_prior_of", "expected_log_weights", "expected_weights"]
