"""Model-based agglomerative hierarchical clustering (Gaussian, unconstrained).

Starting from singletons, repeatedly merge the two clusters whose union
increases the classification criterion the least (Fraley 1998, "Algorithms
for model-based Gaussian hierarchical clustering"), here for unconstrained
covariances with a ridge that keeps small clusters well defined:

    f(c) = n_c log det(W_c / n_c + omega I),        cost(a, b) = f(a u b) - f(a) - f(b)

where W_c is the scatter matrix of cluster c. Merging only changes the
costs that involve the merged cluster, so each row keeps its cheapest
partner and only the affected rows are rescanned: O(n^2) cost evaluations of
O(D^3) each.

Twin: :func:`fastem.reference.hierarchical_merges`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, error_model="numpy")
def _log_det_ridge(n, W, omega, work):
    """log det(W / n + omega I) by Cholesky (W symmetric PSD, so always defined)."""
    d = W.shape[0]
    for i in range(d):
        for j in range(d):
            work[i, j] = W[i, j] / n
        work[i, i] += omega
    total = 0.0
    for j in range(d):
        s = work[j, j]
        for p in range(j):
            s -= work[j, p] * work[j, p]
        s = math.sqrt(max(s, 1e-300))
        work[j, j] = s
        total += 2.0 * math.log(s)
        for i in range(j + 1, d):
            t = work[i, j]
            for p in range(j):
                t -= work[i, p] * work[j, p]
            work[i, j] = t / s
    return total


@njit(cache=True, error_model="numpy")
def _merged_scatter(na, ma, Wa, nb, mb, Wb, out):
    """Scatter of the union: W_a + W_b + n_a n_b / (n_a + n_b) (m_a - m_b)(m_a - m_b)^T."""
    c = na * nb / (na + nb)
    d = ma.shape[0]
    for i in range(d):
        di = ma[i] - mb[i]
        for j in range(d):
            out[i, j] = Wa[i, j] + Wb[i, j] + c * di * (ma[j] - mb[j])


@njit(cache=True, error_model="numpy")
def _merge_cost(a, b, counts, means, scatter, own, omega, merged, work):
    _merged_scatter(counts[a], means[a], scatter[a], counts[b], means[b], scatter[b], merged)
    n = counts[a] + counts[b]
    return n * _log_det_ridge(n, merged, omega, work) - own[a] - own[b]


@njit(cache=True, error_model="numpy")
def _rescan(a, active, counts, means, scatter, own, omega, merged, work, best_cost,
            best_partner):
    """Cheapest partner of cluster ``a`` among the active ones (ties: lowest index)."""
    best_cost[a] = np.inf
    best_partner[a] = -1
    for b in range(active.shape[0]):
        if b != a and active[b]:
            cost = _merge_cost(a, b, counts, means, scatter, own, omega, merged, work)
            if cost < best_cost[a]:
                best_cost[a] = cost
                best_partner[a] = b


@njit(cache=True, error_model="numpy")
def hierarchical_merges(X, weights, omega):
    """Merge sequence of the model-based hierarchy of the rows of ``X``.

    Parameters
    ----------
    X : ndarray (n, D), float64
    weights : ndarray (n,), positive
        Row weights, the initial cluster sizes (a row of weight 3 is the
        cluster its three copies would form: copies merge first, at no cost).
    omega : float
        Ridge added to every cluster covariance (in X's squared units).

    Returns
    -------
    merges : ndarray (n - 1, 2) int64
        Step ``s`` merges cluster ``merges[s, 1]`` into ``merges[s, 0]``
        (``merges[s, 0] < merges[s, 1]``); clusters are named by their lowest
        original row.
    costs : ndarray (n - 1,)
        The criterion increase of each merge.
    """
    n, d = X.shape
    counts = weights.copy()
    means = X.copy()
    scatter = np.zeros((n, d, d))
    work = np.empty((d, d))
    merged = np.empty((d, d))
    own = np.empty(n)
    for i in range(n):
        own[i] = counts[i] * _log_det_ridge(counts[i], scatter[i], omega, work)
    active = np.ones(n, dtype=np.bool_)
    best_cost = np.empty(n)
    best_partner = np.empty(n, dtype=np.int64)
    for a in range(n):
        _rescan(a, active, counts, means, scatter, own, omega, merged, work, best_cost,
                best_partner)
    merges = np.empty((max(n - 1, 0), 2), dtype=np.int64)
    costs = np.empty(max(n - 1, 0))
    for step in range(n - 1):
        a = -1
        for i in range(n):
            if active[i] and (a < 0 or best_cost[i] < best_cost[a]):
                a = i
        b = best_partner[a]
        keep, gone = min(a, b), max(a, b)
        _merged_scatter(counts[keep], means[keep], scatter[keep], counts[gone], means[gone],
                        scatter[gone], merged)
        total = counts[keep] + counts[gone]
        for j in range(d):
            means[keep, j] = (counts[keep] * means[keep, j] + counts[gone] * means[gone, j]) / total
        scatter[keep] = merged
        counts[keep] = total
        own[keep] = total * _log_det_ridge(total, merged, omega, work)
        active[gone] = False
        merges[step, 0] = keep
        merges[step, 1] = gone
        costs[step] = best_cost[a]
        for i in range(n):
            if active[i] and (i == keep or best_partner[i] == keep or best_partner[i] == gone):
                _rescan(i, active, counts, means, scatter, own, omega, merged, work, best_cost,
                        best_partner)
            elif active[i]:
                # Only the cost to the merged cluster changed for this row.
                cost = _merge_cost(i, keep, counts, means, scatter, own, omega, merged, work)
                if cost < best_cost[i] or (cost == best_cost[i] and keep < best_partner[i]):
                    best_cost[i] = cost
                    best_partner[i] = keep
    return merges, costs
