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

The sums over a group of rows are added row by row, in order (exact IEEE
arithmetic, so a cached and a fresh compilation give the same bits; see
:mod:`fastem._kernels._blocks`), and chunks and their reduction order are
those of every other pass.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._blocks import chunk_rows, exp_nonpositive, helper
from .mstep import cholesky_lower

MODE_STATISTICS = 0
MODE_LOG_RESP = 1
MODE_IMPUTE = 2

_LOG_2PI = math.log(2.0 * math.pi)


# Rows of one pattern handled together: loops over them vectorise.
RUN_ROWS = 64


@njit(cache=True, nogil=True, error_model="numpy")
def missing_pass(first_chunk, last_chunk, n_chunks, mode, X, weights, pattern, observed,
                 n_observed, means, cov, log_weights, nk, sx, sxx, loglik, worst,
                 worst_index, out, log_norm):
    r"""One pass over chunks ``[first_chunk, last_chunk)`` of pattern-sorted rows.

    ``pattern[i]`` is row i's pattern; ``observed[p, :n_observed[p]]`` are the
    pattern's observed coordinates and the rest of the row its missing ones.
    ``cov`` is (K, D, D) for every covariance type (diagonal matrices for
    'diag' and 'spherical'). ``mode``: statistics into the chunk slots
    ``nk, sx, sxx`` (around ``means``), ``loglik``, ``worst``/``worst_index``;
    log-responsibilities into ``out`` (N, K) and ``log_norm``; or the
    conditional-mean completion of each row into ``out`` (N, D).

    Rows are taken in groups of at most ``RUN_ROWS`` rows of one pattern, and
    per component only the observed coordinates are touched:
    :math:`d = x_o - \mu_o`, :math:`y = L^{-1}d` and the run's sums of
    :math:`r`, :math:`r d` and :math:`r d d^T`. The completed row's offset is
    :math:`e = (d, B d)` with :math:`B = \Sigma_{mo}\Sigma_{oo}^{-1}`, so when a
    run of rows of one pattern ends its sums become those of :math:`e` by
    :math:`B` (:func:`_flush_run`), plus the run's mass times :math:`C`.
    """
    n_samples, n_features = X.shape
    n_components = means.shape[0]
    weighted = weights.shape[0] > 0
    LinvT = np.zeros((n_components, n_features, n_features))   # L^{-T}
    B = np.zeros((n_components, n_features, n_features))
    C = np.zeros((n_components, n_features, n_features))
    mu = np.zeros((n_components, n_features))       # means, in the pattern's order
    log_det = np.zeros(n_components)
    usable = np.zeros(n_components, dtype=np.bool_)
    A = np.empty((n_features, n_features))
    L = np.empty((n_features, n_features))
    xo = np.empty((n_features, RUN_ROWS))           # observed values, coordinate-major
    d = np.empty((n_components, n_features, RUN_ROWS))
    y = np.empty((n_features, RUN_ROWS))
    maha = np.empty(RUN_ROWS)
    log_dens = np.empty((n_components, RUN_ROWS))
    lse = np.empty(RUN_ROWS)
    resp = np.empty(RUN_ROWS)
    top = np.empty(RUN_ROWS)
    totals = np.empty(RUN_ROWS)
    expo = np.empty(RUN_ROWS)
    bits = np.empty(RUN_ROWS, dtype=np.int64)
    row_d = np.empty(n_features)
    run_nk = np.zeros(n_components)
    run_sx = np.zeros((n_components, n_features))
    run_sxx = np.zeros((n_components, n_features, n_features))
    for chunk in range(first_chunk, last_chunk):
        lo, hi = chunk_rows(chunk, n_chunks, n_samples)
        current = -1
        n_obs = 0
        i = lo
        while i < hi:
            p = pattern[i]
            stop = i + 1
            while stop < hi and stop - i < RUN_ROWS and pattern[stop] == p:
                stop += 1
            n_rows = stop - i
            if p != current:
                if current >= 0 and mode == MODE_STATISTICS:
                    _flush_run(chunk, observed[current], n_obs, run_nk, run_sx, run_sxx, B, C,
                               nk, sx, sxx)
                current = p
                n_obs = n_observed[p]
                _factor_pattern(cov, means, observed[p], n_obs, A, L, LinvT, B, C, mu,
                                log_det, usable)
            obs = observed[p]
            n_mis = n_features - n_obs
            for a in range(n_obs):
                column = obs[a]
                for r in range(n_rows):
                    xo[a, r] = X[i + r, column]
            # Log-densities of the observed coordinates under every component.
            for r in range(n_rows):
                lse[r] = -np.inf
            for k in range(n_components):
                if not usable[k]:
                    for r in range(n_rows):
                        log_dens[k, r] = -np.inf
                    continue
                # Loops over the group's rows on 1-D views: contiguous, and
                # elementwise (they vectorise without reassociation).
                for a in range(n_obs):
                    centre = mu[k, a]
                    d_a, x_a, y_a = d[k, a], xo[a], y[a]
                    for r in range(n_rows):
                        d_a[r] = x_a[r] - centre
                        y_a[r] = 0.0
                # y = L^{-1} d, by columns of L^{-1} (rows of the stored L^{-T}).
                for b in range(n_obs):
                    d_b = d[k, b]
                    for a in range(b, n_obs):
                        coefficient = LinvT[k, b, a]
                        y_a = y[a]
                        for r in range(n_rows):
                            y_a[r] += coefficient * d_b[r]
                for r in range(n_rows):
                    maha[r] = 0.0
                for a in range(n_obs):
                    y_a = y[a]
                    for r in range(n_rows):
                        maha[r] += y_a[r] * y_a[r]
                constant = log_weights[k] - 0.5 * (n_obs * _LOG_2PI + log_det[k])
                for r in range(n_rows):
                    log_dens[k, r] = constant - 0.5 * maha[r]
                    if log_dens[k, r] > lse[r]:
                        lse[r] = log_dens[k, r]
            # log-sum-exp over the components, with the vectorisable exp.
            for r in range(n_rows):
                top[r] = lse[r]
                totals[r] = 0.0
            for k in range(n_components):
                exp_nonpositive(log_dens[k], top, expo, bits, n_rows)
                for r in range(n_rows):
                    totals[r] += expo[r]
            for r in range(n_rows):
                if top[r] > -np.inf:
                    lse[r] = top[r] + math.log(totals[r])
            if mode == MODE_LOG_RESP:
                for r in range(n_rows):
                    log_norm[i + r] = lse[r]
                    for k in range(n_components):
                        out[i + r, k] = log_dens[k, r] - lse[r]
            elif mode == MODE_IMPUTE:
                for r in range(n_rows):
                    for a in range(n_obs):
                        out[i + r, obs[a]] = xo[a, r]
                    for a in range(n_mis):
                        out[i + r, obs[n_obs + a]] = 0.0
                    if lse[r] == -np.inf:
                        continue
                    for k in range(n_components):
                        if log_dens[k, r] == -np.inf:
                            continue
                        weight = math.exp(log_dens[k, r] - lse[r])
                        if weight == 0.0:
                            continue
                        for a in range(n_mis):
                            value = mu[k, n_obs + a]
                            for b in range(n_obs):
                                value += B[k, a, b] * d[k, b, r]
                            out[i + r, obs[n_obs + a]] += weight * value
            else:
                for r in range(n_rows):
                    w = weights[i + r] if weighted else 1.0
                    loglik[chunk] += w * lse[r]
                    if lse[r] < worst[chunk]:
                        worst[chunk] = lse[r]
                        worst_index[chunk] = i + r
                for k in range(n_components):
                    if not usable[k]:
                        continue
                    exp_nonpositive(log_dens[k], lse, resp, bits, n_rows)
                    mass = 0.0
                    for r in range(n_rows):
                        if weighted:
                            resp[r] *= weights[i + r]
                        mass += resp[r]
                    if mass == 0.0:
                        continue
                    run_nk[k] += mass
                    # Row by row, in order (exact arithmetic, no reassociation):
                    # each update is elementwise over a contiguous row of d.
                    for r in range(n_rows):
                        weight = resp[r]
                        if weight == 0.0:
                            continue
                        for a in range(n_obs):
                            row_d[a] = d[k, a, r]
                        for a in range(n_obs):
                            ra = weight * row_d[a]
                            run_sx[k, a] += ra
                            target = run_sxx[k, a]
                            for b in range(a + 1):
                                target[b] += ra * row_d[b]
            i = stop
        if current >= 0 and mode == MODE_STATISTICS:
            _flush_run(chunk, observed[current], n_obs, run_nk, run_sx, run_sxx, B, C, nk,
                       sx, sxx)
        if mode == MODE_STATISTICS:
            # Only the lower triangle was accumulated: mirror it.
            for k in range(n_components):
                for a in range(n_features):
                    for b in range(a):
                        sxx[chunk, k, b, a] = sxx[chunk, k, a, b]


@helper
def _flush_run(chunk, obs, n_obs, run_nk, run_sx, run_sxx, B, C, nk, sx, sxx):
    """Turn a run's sums over d (observed coordinates) into sums over the
    completed offset e = (d, B d) plus mass x C, add them to the chunk's slots
    in the data's order, and reset the run."""
    n_components, n_features = run_sx.shape
    n_mis = n_features - n_obs
    for k in range(n_components):
        mass = run_nk[k]
        if mass == 0.0:
            continue
        for a in range(n_obs):                      # mirror the run's d d^T
            for b in range(a):
                run_sxx[k, b, a] = run_sxx[k, a, b]
        nk[chunk, k] += mass
        for a in range(n_obs):
            sx[chunk, k, obs[a]] += run_sx[k, a]
            for b in range(a + 1):
                _add_lower(sxx, chunk, k, obs[a], obs[b], run_sxx[k, a, b])
        for a in range(n_mis):
            row = obs[n_obs + a]
            value = 0.0
            for b in range(n_obs):
                value += B[k, a, b] * run_sx[k, b]
            sx[chunk, k, row] += value
            # Sum of (B d) d^T: the missing-by-observed block.
            for c in range(n_obs):
                value = 0.0
                for b in range(n_obs):
                    value += B[k, a, b] * run_sxx[k, b, c]
                _add_lower(sxx, chunk, k, row, obs[c], value)
            # Sum of (B d)(B d)^T + mass C: the missing block.
            for a2 in range(a + 1):
                value = mass * C[k, a, a2]
                for b in range(n_obs):
                    partial = 0.0
                    for c in range(n_obs):
                        partial += run_sxx[k, b, c] * B[k, a2, c]
                    value += B[k, a, b] * partial
                _add_lower(sxx, chunk, k, row, obs[n_obs + a2], value)
        run_nk[k] = 0.0
        run_sx[k, :] = 0.0
        run_sxx[k, :, :] = 0.0


@helper
def _add_lower(sxx, chunk, k, row, column, value):
    """Add to the lower triangle of the chunk's second moments (data order)."""
    if column > row:
        row, column = column, row
    sxx[chunk, k, row, column] += value


@helper
def _factor_pattern(cov, means, obs, n_obs, A, L, LinvT, B, C, mu, log_det, usable):
    r"""Per component, for one pattern: the means in the pattern's order,
    :math:`L^{-T}` (:math:`LL^T = \Sigma_{oo}`), :math:`\log|\Sigma_{oo}|`,
    :math:`B = \Sigma_{mo}\Sigma_{oo}^{-1}` and :math:`C = \Sigma_{mm} - B\Sigma_{om}`."""
    n_components, n_features, _ = cov.shape
    n_mis = n_features - n_obs
    g = np.empty(n_features)
    for k in range(n_components):
        for a in range(n_features):
            mu[k, a] = means[k, obs[a]]
        for a in range(n_obs):
            for b in range(n_obs):
                A[a, b] = cov[k, obs[a], obs[b]]
        usable[k] = cholesky_lower(A[:n_obs, :n_obs], L[:n_obs, :n_obs])
        if not usable[k]:
            continue
        value = 0.0
        for a in range(n_obs):
            value += math.log(L[a, a])
        log_det[k] = 2.0 * value
        # L^{-1} (stored transposed), column by column: forward substitution
        # on the unit vectors.
        for c in range(n_obs):
            for a in range(n_obs):
                if a < c:
                    LinvT[k, c, a] = 0.0
                    continue
                value = 1.0 if a == c else 0.0
                for b in range(c, a):
                    value -= L[a, b] * LinvT[k, c, b]
                LinvT[k, c, a] = value / L[a, a]
        for a in range(n_mis):
            column = obs[n_obs + a]
            # g = L^{-1} Sigma_{o, m_a}; B[a] = L^{-T} g.
            for b in range(n_obs):
                value = 0.0
                for c in range(b + 1):
                    value += LinvT[k, c, b] * cov[k, obs[c], column]
                g[b] = value
            for b in range(n_obs):
                value = 0.0
                for c in range(b, n_obs):
                    value += LinvT[k, b, c] * g[c]
                B[k, a, b] = value
        for a in range(n_mis):
            for a2 in range(n_mis):
                value = cov[k, obs[n_obs + a], obs[n_obs + a2]]
                for b in range(n_obs):
                    value -= B[k, a, b] * cov[k, obs[b], obs[n_obs + a2]]
                C[k, a, a2] = value
