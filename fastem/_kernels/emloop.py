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
from numba import njit

from .estep import gaussian_operands, gaussian_statistics_serial
from .mstep import m_step_canonical


# nogil: model selection runs the loops of several starts at once from Python
# threads (the loop is serial and touches only its own arrays).
@njit(cache=True, nogil=True)
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
