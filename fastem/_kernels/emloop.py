"""Whole EM loops in compiled code, for data small enough that per-call overhead
dominates (a few hundred rows cost microseconds per iteration, not the tenths
of a millisecond a Python-driven iteration costs).

The loop is the same EM as the Python driver's: the serial compilation of the
statistics kernel (same chunks and reduction order as the parallel one, so the
same sums up to a few ulps of code generation) and the same M-step. It
stops *before* applying an M-step that needed repair (a collapsed component
or a covariance that was not positive definite) and hands over to the Python
driver, which owns those policies and their warnings.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .estep import gaussian_operands, gaussian_statistics_serial
from .mstep import m_step_canonical


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
        prec, log_const = gaussian_operands(weights, prec_chol, kind, n_features)
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


@njit(cache=True, parallel=True)
def em_loop_starts(X, sample_weight, weights, means, covariances, prec_chol, kind, reg_covar, tol,
                   max_iter, collapse_below, n_chunks, trmm, syrk):
    """:func:`em_loop` from each of S starts, the starts shared out among threads.

    The starts' parameters are stacked on a leading axis (S, ...). Each start
    runs the serial loop on its own, so the results do not depend on the
    number of threads.

    Returns
    -------
    weights, means, covariances, prec_chol : stacked final parameters
    lower_bounds : ndarray (S, max_iter), valid up to ``n_iter[s]``
    n_iter : ndarray (S,) int64
    converged, handed_over : ndarray (S,) bool
    """
    n_starts = weights.shape[0]
    out_weights = np.empty_like(weights)
    out_means = np.empty_like(means)
    out_covariances = np.empty_like(covariances)
    out_prec_chol = np.empty_like(prec_chol)
    lower_bounds = np.full((n_starts, max_iter), np.nan)
    n_iter = np.zeros(n_starts, dtype=np.int64)
    converged = np.zeros(n_starts, dtype=np.bool_)
    handed_over = np.zeros(n_starts, dtype=np.bool_)
    for s in prange(n_starts):
        w, m, c, p, bounds, done, handed = em_loop(
            X, sample_weight, weights[s], means[s], covariances[s], prec_chol[s], kind,
            reg_covar, tol, max_iter, -np.inf, collapse_below, n_chunks, trmm, syrk)
        out_weights[s] = w
        out_means[s] = m
        out_covariances[s] = c
        out_prec_chol[s] = p
        lower_bounds[s, :bounds.shape[0]] = bounds
        n_iter[s] = bounds.shape[0]
        converged[s] = done
        handed_over[s] = handed
    return (out_weights, out_means, out_covariances, out_prec_chol, lower_bounds, n_iter,
            converged, handed_over)
