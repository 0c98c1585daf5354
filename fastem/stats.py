"""Sufficient statistics of a Gaussian mixture and the M-step that reads them.

EM for a Gaussian mixture needs, per component, only

.. math::

    N_k = \\sum_n w_n r_{nk},\\quad
    s_k = \\sum_n w_n r_{nk}(x_n - c_k),\\quad
    S_k = \\sum_n w_n r_{nk}(x_n - c_k)(x_n - c_k)^T

(or the diagonal of :math:`S_k`), taken around a per-component shift
:math:`c_k`, plus the log-likelihood. Statistics of disjoint row sets taken
under the same parameters *add*: in-memory, chunked, out-of-core, online and
distributed fitting all produce :class:`GaussianStatistics` and hand them to
the one :func:`m_step`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ._kernels._blocks import n_chunks_for, pick
from ._kernels.blas import blas_routines, single_threaded_blas
from ._kernels.estep import gaussian_log_resp, gaussian_operands, gaussian_statistics
from ._kernels.labels import label_statistics
from ._kernels.mstep import m_step_canonical

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
# The kernels' code for each covariance type (see m_step_canonical).
COVARIANCE_KIND = {"full": 0, "tied": 1, "diag": 2, "spherical": 3}
_NO_WEIGHTS = np.empty(0)
# From this width on, full-covariance E-steps use the BLAS engine (dtrmm +
# dsyrk per block); below it the vectorised loops are faster.
BLAS_MIN_FEATURES = 24


def uses_full_scatter(covariance_type: str) -> bool:
    """'full' and 'tied' need the full scatter matrix; 'diag' and 'spherical' its diagonal."""
    return covariance_type in ("full", "tied")


class GaussianParameters(NamedTuple):
    """Parameters of a Gaussian mixture, in scikit-learn's shapes."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    precisions_cholesky: np.ndarray


@dataclass(frozen=True)
class GaussianStatistics:
    """Sufficient statistics of (a part of) a data set under fixed parameters.

    Attributes
    ----------
    nk : ndarray (K,)
        Weighted responsibility mass :math:`N_k`.
    sx : ndarray (K, D)
        :math:`s_k`, first moments around ``shift``.
    sxx : ndarray (K, D, D) or (K, D, 1)
        :math:`S_k`, second moments around ``shift`` (full or diagonal).
    shift : ndarray (K, D)
        The per-component centres :math:`c_k` the moments are taken around.
    loglik : float
        :math:`\\sum_n w_n \\log p(x_n)` under the parameters of the E-step.
    weight : float
        :math:`\\sum_n w_n`.
    worst_loglik, worst_point : float, ndarray (D,)
        The row with the lowest :math:`\\log p(x_n)` (where a collapsed
        component is re-seeded).
    """

    nk: np.ndarray
    sx: np.ndarray
    sxx: np.ndarray
    shift: np.ndarray
    loglik: float
    weight: float
    worst_loglik: float = np.inf
    worst_point: np.ndarray | None = None

    def __add__(self, other: GaussianStatistics) -> GaussianStatistics:
        if not isinstance(other, GaussianStatistics):
            return NotImplemented
        if self.shift.shape != other.shift.shape or self.sxx.shape != other.sxx.shape:
            raise ValueError("cannot add statistics of models of different shapes")
        if not np.array_equal(self.shift, other.shift):
            other = other.recentre(self.shift)
        worst = self if self.worst_loglik <= other.worst_loglik else other
        return GaussianStatistics(
            self.nk + other.nk,
            self.sx + other.sx,
            self.sxx + other.sxx,
            self.shift,
            self.loglik + other.loglik,
            self.weight + other.weight,
            worst.worst_loglik,
            worst.worst_point,
        )

    def recentre(self, shift: np.ndarray) -> GaussianStatistics:
        """The same statistics taken around another shift.

        With :math:`\\delta_k = c_k - c'_k`:
        :math:`s'_k = s_k + N_k\\delta_k` and
        :math:`S'_k = S_k + \\delta_k s_k^T + s_k\\delta_k^T + N_k\\delta_k\\delta_k^T`.
        """
        shift = np.asarray(shift, dtype=np.float64)
        delta = self.shift - shift
        nk = self.nk
        sx = self.sx + nk[:, None] * delta
        if self.sxx.shape[2] > 1:  # full scatter (for D = 1 both forms agree)
            outer = np.einsum("ki,kj->kij", delta, self.sx)
            sxx = self.sxx + outer + outer.transpose(0, 2, 1) + nk[:, None, None] * np.einsum(
                "ki,kj->kij", delta, delta
            )
        else:
            sxx = self.sxx + (2.0 * delta * self.sx + nk[:, None] * delta * delta)[:, :, None]
        return GaussianStatistics(nk, sx, sxx, shift, self.loglik, self.weight,
                                  self.worst_loglik, self.worst_point)


def weights_operand(sample_weight):
    """Sample weights as kernels take them: an empty array stands for unit weights."""
    return _NO_WEIGHTS if sample_weight is None else sample_weight


def kernel_operands(params: GaussianParameters, covariance_type: str, dtype=np.float64):
    """Means, precision operand, per-component log-constant and kernel flavour.

    The log-constant is :math:`\\log\\pi_k + \\log\\det U_k - \\tfrac D2\\log 2\\pi`.
    Full and tied models pass (K, D, D) precision Cholesky factors; diagonal
    and spherical models pass (K, D, 1) precisions :math:`1/\\sigma^2` (one
    kernel signature serves both flavours). Computed by the same compiled
    function as in the compiled EM loop (see ``gaussian_operands``).
    """
    means = np.ascontiguousarray(params.means, dtype=dtype)
    kind = COVARIANCE_KIND[covariance_type]
    prec, log_const = gaussian_operands(
        np.ascontiguousarray(params.weights, dtype=np.float64),
        to_canonical(params.precisions_cholesky, covariance_type), kind, means.shape[1])
    return means, prec.astype(dtype, copy=False), log_const, kind <= 1


def uses_blas(n_features: int, covariance_type: str) -> bool:
    """Whether the fused pass runs the BLAS engine for this model shape."""
    return n_features >= BLAS_MIN_FEATURES


def e_step_statistics(X, sample_weight, params: GaussianParameters, covariance_type: str
                      ) -> GaussianStatistics:
    """One fused pass over ``X``: E-step under ``params`` and its statistics.

    ``X`` must be C-contiguous float32/float64 and ``sample_weight`` None or a
    float64 vector; validation happens at the estimator boundary. The loop
    engine computes in X's precision (statistics are always accumulated in
    float64); the BLAS engine in float64.
    """
    blas = uses_blas(X.shape[1], covariance_type)
    dtype = np.float64 if blas else X.dtype
    means, prec, log_const, full = kernel_operands(params, covariance_type, dtype)
    n_components, n_features = means.shape
    partial = n_components * n_features * (n_features if full else 1)
    n_chunks = n_chunks_for(X.shape[0], partial)
    trmm, syrk = blas_routines()
    args = (X, weights_operand(sample_weight), means, prec, log_const, full, blas,
            trmm, syrk, n_chunks)
    with single_threaded_blas() if blas else contextlib.nullcontext():
        nk, sx, sxx, loglik, worst_loglik, worst = gaussian_statistics(*args)
    weight = float(X.shape[0] if sample_weight is None else sample_weight.sum())
    return GaussianStatistics(nk, sx, sxx, means.astype(np.float64), float(loglik), weight,
                              float(worst_loglik), np.asarray(X[worst], dtype=np.float64))


def label_statistics_of(X, sample_weight, labels, shift, covariance_type) -> GaussianStatistics:
    """Statistics of a hard assignment of rows to components (label -1: none)."""
    # The moments are taken around the shift as the kernel sees it (in X's
    # precision), so that is the shift recorded.
    shift = np.ascontiguousarray(shift, dtype=X.dtype)
    n_components, n_features = shift.shape
    full = uses_full_scatter(covariance_type)
    n_chunks = n_chunks_for(X.shape[0], n_components * n_features * (n_features if full else 1))
    nk, sx, sxx = pick(label_statistics, X.shape[0] * n_components * (n_features + 1) ** 2)(
        X, weights_operand(sample_weight), np.asarray(labels, dtype=np.int32), shift,
        full, n_chunks,
    )
    weight = float(X.shape[0] if sample_weight is None else sample_weight.sum())
    return GaussianStatistics(nk, sx, sxx, shift.astype(np.float64), np.nan, weight)


def m_step(stats: GaussianStatistics, reg_covar: float, covariance_type: str):
    """Maximise the expected complete-data log-likelihood given the statistics.

    .. math::

        \\pi_k = \\tilde N_k/\\textstyle\\sum_j\\tilde N_j,\\quad
        \\mu_k = c_k + s_k/\\tilde N_k,\\quad
        \\Sigma_k = \\frac{S_k - d_k s_k^T - s_k d_k^T + N_k d_k d_k^T}{\\tilde N_k}
        + \\lambda I

    with :math:`\\tilde N_k = N_k + 10\\epsilon` (scikit-learn's guard) and
    :math:`d_k = s_k/\\tilde N_k`; 'tied' pools the numerators over
    components, 'diag' keeps the diagonal and 'spherical' its mean.

    Returns
    -------
    params : GaussianParameters
    jitter : ndarray
        Extra diagonal loading that was needed to make each covariance
        positive definite (0 where none was; -1 where it could not be made so).
    """
    weights, means, cov, prec_chol, jitter = m_step_canonical(
        stats.nk, np.ascontiguousarray(stats.sx), np.ascontiguousarray(stats.sxx),
        np.ascontiguousarray(stats.shift), float(reg_covar), COVARIANCE_KIND[covariance_type])
    return GaussianParameters(weights, means, *from_canonical(cov, prec_chol, covariance_type)
                              ), jitter


def to_canonical(array, covariance_type: str) -> np.ndarray:
    """scikit-learn's covariance-shaped array as the kernels' 3-D form."""
    array = np.asarray(array, dtype=np.float64)
    if covariance_type == "full":
        return np.ascontiguousarray(array)
    if covariance_type == "tied":
        return np.ascontiguousarray(array[None])
    if covariance_type == "diag":
        return np.ascontiguousarray(array[:, :, None])
    return np.ascontiguousarray(array[:, None, None])


def from_canonical(cov, prec_chol, covariance_type: str):
    """The kernels' 3-D covariances and factors in scikit-learn's shapes."""
    if covariance_type == "full":
        return cov, prec_chol
    if covariance_type == "tied":
        return cov[0], prec_chol[0]
    if covariance_type == "diag":
        return cov[:, :, 0], prec_chol[:, :, 0]
    return cov[:, 0, 0], prec_chol[:, 0, 0]


def log_responsibilities(X, params: GaussianParameters, covariance_type: str, *,
                         probabilities: bool = False):
    r"""Per-row log p(x) and (N, K) log-responsibilities (for predictions).

    Returns
    -------
    log_resp : ndarray (N, K), float64
        :math:`\log r_{nk}`; with ``probabilities``, :math:`r_{nk}` itself
        (responsibilities below :math:`e^{-708}` of a row's largest are 0).
    log_norm : ndarray (N,), float64
        :math:`\log p(x_n)`.
    """
    blas = uses_blas(X.shape[1], covariance_type)
    means, prec, log_const, full = kernel_operands(params, covariance_type,
                                                   np.float64 if blas else X.dtype)
    log_resp = np.empty((X.shape[0], means.shape[0]))
    log_norm = np.empty(X.shape[0])
    work = X.shape[0] * means.shape[0] * (X.shape[1] + 1) ** 2
    args = (X, means, prec, log_const, full, blas, blas_routines()[0], n_chunks_for(X.shape[0], 1),
            probabilities, log_resp, log_norm)
    with single_threaded_blas() if blas else contextlib.nullcontext():
        pick(gaussian_log_resp, work)(*args)
    return log_resp, log_norm
