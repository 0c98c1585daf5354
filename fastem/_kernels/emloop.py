"""Whole EM loops in compiled code, for data small enough that per-call overhead
dominates (a few hundred rows cost microseconds per iteration, not the tenths
of a millisecond a Python-driven iteration costs).

The loop is the same EM as the Python driver's: the serial compilation of the
statistics kernel (bit-identical to the parallel one) and the same M-step. It
stops *before* applying an M-step that needed repair (a collapsed component
or a covariance that was not positive definite) and hands over to the Python
driver, which owns those policies and their warnings.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .estep import gaussian_statistics_serial
from .mstep import m_step_canonical

_LOG_2PI = math.log(2.0 * math.pi)


@njit(cache=True)
def estep_operands(weights, prec_chol, kind, n_features):
    r"""Kernel operands from canonical 3-D precision Cholesky factors.

    Returns the precision operand ((K, D, D) factors or (K, D, 1) diagonal
    precisions) and :math:`\log\pi_k + \log\det U_k - \tfrac D2 \log 2\pi`.
    """
    n_components = weights.shape[0]
    full = kind <= 1
    prec = np.empty((n_components, n_features, n_features if full else 1))
    log_const = np.empty(n_components)
    for k in range(n_components):
        source = 0 if kind == 1 else k
        log_det = 0.0
        if full:
            prec[k] = prec_chol[source]
            for d in range(n_features):
                log_det += math.log(prec_chol[source, d, d])
        else:
            for d in range(n_features):
                u = prec_chol[k, 0 if kind == 3 else d, 0]
                prec[k, d, 0] = u * u
                log_det += math.log(u)
        log_const[k] = math.log(weights[k]) + log_det - 0.5 * n_features * _LOG_2PI
    return prec, log_const


@njit(cache=True)
def em_loop(X, sample_weight, weights, means, covariances, prec_chol, kind, reg_covar, tol,
            max_iter, lower_bound, collapse_below, n_chunks, trmm, syrk):
    """Run up to ``max_iter`` EM iterations (E-step statistics, M-step, test).

    Returns
    -------
    weights, means, covariances, prec_chol : the parameters after the last
        applied M-step (canonical 3-D shapes, see ``m_step_canonical``)
    lower_bounds : ndarray (n_iter,)
    converged : bool
    handed_over : bool
        True when iteration ``n_iter + 1`` needed a repair and was not applied.
    """
    n_features = X.shape[1]
    total_weight = X.shape[0] * 1.0 if sample_weight.shape[0] == 0 else sample_weight.sum()
    lower_bounds = np.empty(max_iter)
    n_iter = 0
    converged = False
    handed_over = False
    full = kind <= 1
    while n_iter < max_iter:
        prec, log_const = estep_operands(weights, prec_chol, kind, n_features)
        nk, sx, sxx, loglik, _, _ = gaussian_statistics_serial(
            X, sample_weight, means, prec, log_const, full, False, trmm, syrk, n_chunks)
        new = m_step_canonical(nk, sx, sxx, means, reg_covar, kind)
        if np.any(new[4] != 0.0) or np.any(nk < collapse_below):
            handed_over = True
            break
        previous = lower_bound
        lower_bound = loglik / total_weight
        weights, means, covariances, prec_chol = new[0], new[1], new[2], new[3]
        lower_bounds[n_iter] = lower_bound
        n_iter += 1
        if abs(lower_bound - previous) < tol:
            converged = True
            break
    return (weights, means, covariances, prec_chol, lower_bounds[:n_iter], converged,
            handed_over)
