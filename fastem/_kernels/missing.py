"""The statistics pass of data with missing values (NaN), by missingness pattern.

Rows arrive sorted by their pattern of observed coordinates. For a row with
observed coordinates ``o`` and missing ``m`` and a component with mean
:math:`\\mu` and covariance :math:`\\Sigma`, with :math:`L L^T = \\Sigma_{oo}`,

.. math::

    y = L^{-1}(x_o - \\mu_o),\\quad
    \\log p_k(x_o) = -\\tfrac12\\big(|o|\\log 2\\pi + \\log|\\Sigma_{oo}| + y^Ty\\big),

    \\hat x_m - \\mu_m = G y,\\quad G = \\Sigma_{mo}L^{-T},\\qquad
    C = \\operatorname{Cov}(x_m | x_o) = \\Sigma_{mm} - G G^T

(Ghahramani & Jordan 1994). :math:`L`, :math:`G` and :math:`C` depend on the
pattern and the component only: they are computed once per pattern and
component in each chunk, not once per row. The statistics of a row, around
the component's mean, are those of the completed row
:math:`\\hat x = (x_o, \\hat x_m)` plus :math:`C` in the missing block of the
second moments:

.. math::

    N_k \\mathrel{+}= r,\\quad s_k \\mathrel{+}= r(\\hat x - \\mu_k),\\quad
    S_k \\mathrel{+}= r\\big((\\hat x - \\mu_k)(\\hat x - \\mu_k)^T + C\\big).

Exact IEEE arithmetic (no fastmath): the same bits compiled or cached.
Chunks and their reduction order are those of every other pass
(:mod:`fastem._kernels._blocks`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._blocks import chunk_rows, helper
from .mstep import cholesky_lower

MODE_STATISTICS = 0
MODE_LOG_RESP = 1
MODE_IMPUTE = 2

_LOG_2PI = math.log(2.0 * math.pi)


@njit(cache=True, nogil=True, error_model="numpy")
def missing_pass(first_chunk, last_chunk, n_chunks, mode, X, weights, pattern, observed,
                 n_observed, means, cov, log_weights, nk, sx, sxx, loglik, worst,
                 worst_index, out, log_norm):
    """One pass over chunks ``[first_chunk, last_chunk)`` of pattern-sorted rows.

    ``pattern[i]`` is row i's pattern; ``observed[p, :n_observed[p]]`` are the
    pattern's observed coordinates and the rest of the row its missing ones.
    ``cov`` is (K, D, D) for every covariance type (diagonal matrices for
    'diag' and 'spherical'). ``mode``: statistics into the chunk slots
    ``nk, sx, sxx`` (around ``means``), ``loglik``, ``worst``/``worst_index``;
    log-responsibilities into ``out`` (N, K) and ``log_norm``; or the
    conditional-mean completion of each row into ``out`` (N, D).
    """
    n_samples, n_features = X.shape
    n_components = means.shape[0]
    weighted = weights.shape[0] > 0
    L = np.zeros((n_components, n_features, n_features))
    G = np.zeros((n_components, n_features, n_features))
    C = np.zeros((n_components, n_features, n_features))
    log_det = np.zeros(n_components)
    usable = np.zeros(n_components, dtype=np.bool_)
    A = np.empty((n_features, n_features))
    y = np.empty((n_components, n_features))
    log_dens = np.empty(n_components)
    e = np.empty(n_features)
    mass = np.zeros(n_components)
    for chunk in range(first_chunk, last_chunk):
        lo, hi = chunk_rows(chunk, n_chunks, n_samples)
        current = -1
        n_obs = 0
        for i in range(lo, hi):
            p = pattern[i]
            if p != current:
                if current >= 0 and mode == MODE_STATISTICS:
                    _add_conditional_covariance(sxx, chunk, mass, C, observed[current],
                                                n_obs, n_features)
                current = p
                n_obs = n_observed[p]
                _factor_pattern(cov, observed[p], n_obs, A, L, G, C, log_det, usable)
            obs = observed[p]
            n_mis = n_features - n_obs
            # Log-densities of the observed coordinates under every component.
            top = -np.inf
            for k in range(n_components):
                if not usable[k]:
                    log_dens[k] = -np.inf
                    continue
                maha = 0.0
                for a in range(n_obs):
                    value = X[i, obs[a]] - means[k, obs[a]]
                    for b in range(a):
                        value -= L[k, a, b] * y[k, b]
                    value /= L[k, a, a]
                    y[k, a] = value
                    maha += value * value
                log_dens[k] = log_weights[k] - 0.5 * (n_obs * _LOG_2PI + log_det[k] + maha)
                if log_dens[k] > top:
                    top = log_dens[k]
            total = 0.0
            for k in range(n_components):
                if log_dens[k] > -np.inf:
                    total += math.exp(log_dens[k] - top)
            lse = top + math.log(total) if top > -np.inf else -np.inf
            if mode == MODE_LOG_RESP:
                log_norm[i] = lse
                for k in range(n_components):
                    out[i, k] = log_dens[k] - lse
                continue
            if mode == MODE_IMPUTE:
                for a in range(n_obs):
                    out[i, obs[a]] = X[i, obs[a]]
                for a in range(n_mis):
                    out[i, obs[n_obs + a]] = 0.0
                for k in range(n_components):
                    r = math.exp(log_dens[k] - lse) if log_dens[k] > -np.inf else 0.0
                    if r == 0.0:
                        continue
                    for a in range(n_mis):
                        value = means[k, obs[n_obs + a]]
                        for b in range(n_obs):
                            value += G[k, a, b] * y[k, b]
                        out[i, obs[n_obs + a]] += r * value
                continue
            w = weights[i] if weighted else 1.0
            loglik[chunk] += w * lse
            if lse < worst[chunk]:
                worst[chunk] = lse
                worst_index[chunk] = i
            for k in range(n_components):
                if log_dens[k] == -np.inf:
                    continue
                r = w * math.exp(log_dens[k] - lse)
                if r == 0.0:
                    continue
                for a in range(n_obs):
                    e[obs[a]] = X[i, obs[a]] - means[k, obs[a]]
                for a in range(n_mis):
                    value = 0.0
                    for b in range(n_obs):
                        value += G[k, a, b] * y[k, b]
                    e[obs[n_obs + a]] = value
                nk[chunk, k] += r
                mass[k] += r
                for a in range(n_features):
                    sx[chunk, k, a] += r * e[a]
                    re = r * e[a]
                    for b in range(a + 1):
                        sxx[chunk, k, a, b] += re * e[b]
        if current >= 0 and mode == MODE_STATISTICS:
            _add_conditional_covariance(sxx, chunk, mass, C, observed[current], n_obs,
                                        n_features)
        if mode == MODE_STATISTICS:
            # Only the lower triangle was accumulated: mirror it.
            for k in range(n_components):
                for a in range(n_features):
                    for b in range(a):
                        sxx[chunk, k, b, a] = sxx[chunk, k, a, b]


@helper
def _factor_pattern(cov, obs, n_obs, A, L, G, C, log_det, usable):
    """L, G, C and log|Sigma_oo| of every component for one pattern."""
    n_components, n_features, _ = cov.shape
    n_mis = n_features - n_obs
    for k in range(n_components):
        for a in range(n_obs):
            for b in range(n_obs):
                A[a, b] = cov[k, obs[a], obs[b]]
        usable[k] = cholesky_lower(A[:n_obs, :n_obs], L[k, :n_obs, :n_obs])
        if not usable[k]:
            continue
        value = 0.0
        for a in range(n_obs):
            value += math.log(L[k, a, a])
        log_det[k] = 2.0 * value
        # G[a] = L^{-1} Sigma_{o, m_a}, by forward substitution.
        for a in range(n_mis):
            column = obs[n_obs + a]
            for b in range(n_obs):
                value = cov[k, obs[b], column]
                for c in range(b):
                    value -= L[k, b, c] * G[k, a, c]
                G[k, a, b] = value / L[k, b, b]
        for a in range(n_mis):
            for b in range(n_mis):
                value = cov[k, obs[n_obs + a], obs[n_obs + b]]
                for c in range(n_obs):
                    value -= G[k, a, c] * G[k, b, c]
                C[k, a, b] = value


@helper
def _add_conditional_covariance(sxx, chunk, mass, C, obs, n_obs, n_features):
    """Add (responsibility mass of the pattern) x C to the missing block; reset the mass."""
    n_components = mass.shape[0]
    n_mis = n_features - n_obs
    for k in range(n_components):
        if mass[k] != 0.0:
            for a in range(n_mis):
                row = obs[n_obs + a]
                for b in range(n_mis):
                    column = obs[n_obs + b]
                    if column <= row:
                        sxx[chunk, k, row, column] += mass[k] * C[k, a, b]
        mass[k] = 0.0
