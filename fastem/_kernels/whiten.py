r"""Whitened E-step for tied covariances: one shared precision factor, one transform.

With one upper precision factor :math:`U` for every component,

.. math::

    (x - \mu_k)\,U = y - m_k,\qquad y = (x - c)\,U,\quad m_k = (\mu_k - c)\,U,

so the rows are transformed once per iteration (:math:`D^2/2` multiply-adds
per row) and every component then costs :math:`D` per row in the whitened
space, where the tied model is a spherical one with unit variances. The full
engines pay :math:`D^2/2` per row *and component* for the triangular product
and as much again for the scatter. The tied M-step needs only the scatter
pooled over components, which follows from the total scatter around
:math:`c` (fixed for a fit) and the first moments:

.. math::

    \sum_k\sum_n w_n r_{nk}(x_n-\mu_k)(x_n-\mu_k)^T
    = S_c - \sum_k\big(\delta_k s_k^T + s_k\delta_k^T + N_k\delta_k\delta_k^T\big),

with :math:`S_c = \sum_n w_n (x_n-c)(x_n-c)^T`, :math:`\delta_k = \mu_k - c`
and :math:`s_k = \sum_n w_n r_{nk}(x_n-\mu_k)`, since every row's
responsibilities sum to one. This is scikit-learn's own tied estimate
(:math:`X^TX - \sum_k N_k\mu_k\mu_k^T`) taken around the data's mean
instead of the origin. Twins: :func:`fastem.reference.whiten` and
:func:`fastem.reference.pooled_tied_statistics`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._blocks import chunk_rows

_LOG_2PI = math.log(2.0 * math.pi)


# Rows transformed together: the products run along them (vectorised, with no
# reassociation: each row's sum is still taken in feature order).
_WHITEN_ROWS = 32


@njit(cache=True, error_model="numpy", nogil=True)
def whiten_rows(chunk_first, chunk_last, n_chunks, X, centre, U, Y):
    r"""``Y[n] = (X[n] - c) U`` for the rows of chunks ``[chunk_first, chunk_last)``.

    ``U`` (D, D) is upper triangular:
    :math:`y_{nj} = \sum_{i \le j} (x_{ni} - c_i) U_{ij}`, summed in order of
    :math:`i` in float64 and stored in ``Y``'s dtype (X's). A row's result
    does not depend on the rows around it, so the chunking never changes a
    bit.
    """
    n_samples, n_features = X.shape
    diff = np.empty((n_features, _WHITEN_ROWS))
    out = np.empty((n_features, _WHITEN_ROWS))
    for c in range(chunk_first, chunk_last):
        first, last = chunk_rows(c, n_chunks, n_samples)
        for start in range(first, last, _WHITEN_ROWS):
            n_rows = min(_WHITEN_ROWS, last - start)
            for r in range(n_rows):
                for i in range(n_features):
                    diff[i, r] = np.float64(X[start + r, i]) - centre[i]
            for j in range(n_features):
                acc = out[j]
                for r in range(n_rows):
                    acc[r] = 0.0
                for i in range(j + 1):
                    source = diff[i]
                    u = U[i, j]
                    for r in range(n_rows):
                        acc[r] += source[r] * u
            for r in range(n_rows):
                for j in range(n_features):
                    Y[start + r, j] = out[j, r]


@njit(cache=True, error_model="numpy")
def whitened_operands(weights, means, prec_chol, centre):
    r"""The means in the whitened space and the components' log-constants.

    Returns :math:`m_k = (\mu_k - c)U` (K, D) and
    :math:`\log\pi_k + \log\det U - \tfrac D2\log 2\pi` (K,), for
    ``prec_chol`` the canonical (1, D, D) tied factor.
    """
    n_components, n_features = means.shape
    shift = np.empty((n_components, n_features))
    whiten_rows(0, 1, 1, means, centre, prec_chol[0], shift)
    log_det = 0.0
    for d in range(n_features):
        log_det += math.log(prec_chol[0, d, d])
    log_const = np.empty(n_components)
    for k in range(n_components):
        log_const[k] = math.log(weights[k]) + log_det - 0.5 * n_features * _LOG_2PI
    return shift, log_const


@njit(cache=True, error_model="numpy")
def _times_inverse(v, U, out):
    """out = v U^{-1} (a row vector; forward substitution against U's columns)."""
    n = v.shape[0]
    for j in range(n):
        t = v[j]
        for i in range(j):
            t -= out[i] * U[i, j]
        out[j] = t / U[j, j]


@njit(cache=True, error_model="numpy")
def pooled_tied_statistics(nk, sy, shift_y, U, centre, total_scatter):
    r"""The tied M-step's statistics from those of the whitened data.

    ``sy`` (K, D) are :math:`\sum_n w_n r_{nk}(y_n - m_k)` around the whitened
    shifts ``shift_y`` (K, D); ``total_scatter`` (1, D, D) is :math:`S_c`.

    Returns
    -------
    sx : ndarray (K, D)
        :math:`s_k = (\sum_n w_n r_{nk}(y_n - m_k))\,U^{-1}`.
    shift : ndarray (K, D)
        :math:`\mu_k = c + m_k U^{-1}`, the centres ``sx`` is taken around.
    pooled : ndarray (1, D, D)
        :math:`S_c - \sum_k(\delta_k s_k^T + s_k\delta_k^T + N_k\delta_k\delta_k^T)`,
        :math:`\delta_k = m_k U^{-1}`: the scatter pooled over components.
    """
    n_components, n_features = sy.shape
    sx = np.empty((n_components, n_features))
    delta = np.empty((n_components, n_features))
    shift = np.empty((n_components, n_features))
    pooled = np.empty((1, n_features, n_features))
    for k in range(n_components):
        _times_inverse(sy[k], U, sx[k])
        _times_inverse(shift_y[k], U, delta[k])
        for d in range(n_features):
            shift[k, d] = centre[d] + delta[k, d]
    for i in range(n_features):
        for j in range(n_features):
            total = total_scatter[0, i, j]
            for k in range(n_components):
                # Each product written symmetric in (i, j): the result is
                # exactly symmetric.
                total -= (delta[k, i] * sx[k, j] + sx[k, i] * delta[k, j]
                          + nk[k] * (delta[k, i] * delta[k, j]))
            pooled[0, i, j] = total
    return sx, shift, pooled
