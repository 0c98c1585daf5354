"""M-step kernels: Gaussian parameters from sufficient statistics alone.

Tiny (K x D x D) work, compiled so that a whole EM iteration on small data
costs microseconds, not the milliseconds of NumPy call overhead. Both return
the canonical 3-D shapes: (K, D, D) or (1, D, D) for full and tied, (K, D, 1)
or (K, 1, 1) for diag and spherical. Twin:
:func:`fastem.reference.m_step`.

The Cholesky factorisation is written out here (rather than calling LAPACK)
so that a covariance that is not numerically positive definite is reported
by a flag instead of an exception, and is repaired by adding a growing
multiple of its mean variance to the diagonal ("jitter").
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._blocks import helper_inline

# sklearn's guard against empty components, kept for parity.
_NK_EPS = 10.0 * np.finfo(np.float64).eps
_JITTER_START = 1e-10
_JITTER_STEPS = 12


@helper_inline
def cholesky_lower(A, L):
    """Lower Cholesky factor of ``A`` into ``L``; False if not positive definite."""
    n = A.shape[0]
    for j in range(n):
        s = A[j, j]
        for p in range(j):
            s -= L[j, p] * L[j, p]
        if not s > 0.0:  # also catches NaN
            return False
        ljj = math.sqrt(s)
        L[j, j] = ljj
        for i in range(j + 1, n):
            t = A[i, j]
            for p in range(j):
                t -= L[i, p] * L[j, p]
            L[i, j] = t / ljj
        for i in range(j):
            L[i, j] = 0.0
    return True


@helper_inline
def precision_cholesky_from_lower(L, U):
    """U = (L^{-1})^T, upper triangular, by forward substitution."""
    n = L.shape[0]
    for i in range(n):
        for j in range(n):
            U[i, j] = 0.0
    for c in range(n):
        # Solve L z = e_c; z is column c of L^{-1}, i.e. row c of U.
        for i in range(c, n):
            t = 1.0 if i == c else 0.0
            for p in range(c, i):
                t -= L[i, p] * U[c, p]
            U[c, i] = t / L[i, i]


@njit(cache=True, error_model="numpy")
def factor_covariance(cov, L, U):
    """Factor ``cov`` (repairing it in place with jitter if needed).

    Returns the jitter added to the diagonal (0.0 when none was needed, -1.0
    when even the largest jitter failed, e.g. for non-finite input).
    """
    if cholesky_lower(cov, L):
        precision_cholesky_from_lower(L, U)
        return 0.0
    n = cov.shape[0]
    scale = 0.0
    for i in range(n):
        scale += abs(cov[i, i])
    scale = scale / n if scale > 0.0 else 1.0
    added = 0.0
    jitter = _JITTER_START * scale
    for _ in range(_JITTER_STEPS):
        for i in range(n):
            cov[i, i] += jitter - added
        added = jitter
        if cholesky_lower(cov, L):
            precision_cholesky_from_lower(L, U)
            return added
        jitter *= 10.0
    return -1.0


@helper_inline
def _weights_and_means(nk, sx, shift):
    n_components, n_features = sx.shape
    nk_reg = np.empty(n_components)
    total = 0.0
    for k in range(n_components):
        nk_reg[k] = nk[k] + _NK_EPS
        total += nk_reg[k]
    weights = np.empty(n_components)
    d = np.empty_like(sx)
    means = np.empty_like(sx)
    for k in range(n_components):
        weights[k] = nk_reg[k] / total
        for i in range(n_features):
            d[k, i] = sx[k, i] / nk_reg[k]
            means[k, i] = shift[k, i] + d[k, i]
    return nk_reg, total, weights, d, means


@njit(cache=True, error_model="numpy")
def m_step_full(nk, sx, sxx, shift, reg_covar, tied):
    r"""M-step for 'full' (and, pooled, 'tied') covariances.

    .. math::

        \Sigma_k = \big(S_k - d_k s_k^T - s_k d_k^T + N_k d_k d_k^T\big)
        / \tilde N_k + \lambda I, \qquad d_k = s_k / \tilde N_k

    ``sxx`` is (K, D, D), or for ``tied`` also the pooled :math:`\sum_k S_k`
    as (1, D, D).

    Returns
    -------
    weights (K,), means (K, D), covariances (K', D, D), precisions_cholesky
    (K', D, D), jitter (K',) — with K' = 1 when ``tied``.
    """
    n_components, n_features = sx.shape
    nk_reg, total, weights, d, means = _weights_and_means(nk, sx, shift)
    n_cov = 1 if tied else n_components
    cov = np.zeros((n_cov, n_features, n_features))
    for k in range(n_components):
        target = 0 if tied else k
        # A tied model's scatter may come pooled, (1, D, D) (see
        # fastem._kernels.whiten): it is added once, with component 0.
        own = k < sxx.shape[0]
        for i in range(n_features):
            for j in range(n_features):
                scatter = sxx[k, i, j] if own else 0.0
                cov[target, i, j] += (scatter - d[k, i] * sx[k, j] - sx[k, i] * d[k, j]
                                      + nk[k] * d[k, i] * d[k, j])
    L = np.empty((n_features, n_features))
    prec_chol = np.empty((n_cov, n_features, n_features))
    jitter = np.zeros(n_cov)
    for c in range(n_cov):
        denominator = total if tied else nk_reg[c]
        for i in range(n_features):
            for j in range(n_features):
                cov[c, i, j] /= denominator
        for i in range(n_features):
            cov[c, i, i] += reg_covar
        jitter[c] = factor_covariance(cov[c], L, prec_chol[c])
    return weights, means, cov, prec_chol, jitter


@njit(cache=True, error_model="numpy")
def m_step_diag(nk, sx, sxx, shift, reg_covar, spherical):
    r"""M-step for 'diag' (and, averaged over features, 'spherical') variances.

    .. math::

        \sigma^2_{kd} = \big(S_{kd} - 2 d_{kd} s_{kd} + N_k d_{kd}^2\big)
        / \tilde N_k + \lambda

    ``sxx`` is (K, D, 1). Returns weights, means, variances and precision
    Cholesky factors :math:`1/\sigma` in the canonical (K, D', 1) shape,
    D' = 1 when ``spherical``, and jitter (K,).
    """
    n_components, n_features = sx.shape
    nk_reg, _, weights, d, means = _weights_and_means(nk, sx, shift)
    width = 1 if spherical else n_features
    var = np.zeros((n_components, width, 1))
    for k in range(n_components):
        for i in range(n_features):
            v = (sxx[k, i, 0] - 2.0 * d[k, i] * sx[k, i] + nk[k] * d[k, i] * d[k, i]) / nk_reg[k]
            var[k, 0 if spherical else i, 0] += v + reg_covar
    if spherical:
        for k in range(n_components):
            var[k, 0, 0] /= n_features
    jitter = np.zeros(n_components)
    prec_chol = np.empty_like(var)
    for k in range(n_components):
        total = 0.0
        for i in range(width):
            total += var[k, i, 0]
        for i in range(width):
            if not var[k, i, 0] > 0.0:
                bump = _JITTER_START * max(1.0, abs(total))
                var[k, i, 0] = max(var[k, i, 0], 0.0) + bump
                jitter[k] = bump
            prec_chol[k, i, 0] = 1.0 / math.sqrt(var[k, i, 0])
    return weights, means, var, prec_chol, jitter
