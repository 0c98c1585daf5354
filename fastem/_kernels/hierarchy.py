"""Model-based agglomerative hierarchical clustering (Gaussian, unconstrained).

Starting from singletons, repeatedly merge the two clusters whose union
increases the classification criterion the least (Fraley 1998, "Algorithms
for model-based Gaussian hierarchical clustering"), here for unconstrained
covariances with a ridge that keeps small clusters well defined:

    f(c) = n_c log det(W_c / n_c + omega I),        cost(a, b) = f(a u b) - f(a) - f(b)

where W_c is the scatter matrix of cluster c. Merging only changes the
costs that involve the merged cluster, so each row keeps its cheapest
partner and only the affected rows are rescanned: O(n^2) cost evaluations.
An evaluation is a D x D Cholesky factorisation, O(D^3), unless the union
has few rows: W is then Y^T Y for its k centred (weighted) rows Y, and by
Sylvester's determinant identity

    det(W / n + omega I_D) = omega^D det(I_k + Y Y^T / (n omega)),

a k x k factorisation of the rows' Gram matrix, O(k^2 D). Most evaluations
are of that kind (early merges join few rows), which makes the hierarchy
of wide data about an order of magnitude faster.

Twin: :func:`fastem.reference.hierarchical_merges`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# From this width on, unions of at most D / 2 rows are scored by their Gram
# matrix (below it the D x D factorisation is as cheap).
FEW_ROWS_MIN_FEATURES = 8


@njit(cache=True, error_model="numpy")
def _log_det_ridge(n, W, omega, work):
    """log det(W / n + omega I) by Cholesky (W symmetric PSD, so always defined)."""
    d = W.shape[0]
    for i in range(d):
        for j in range(d):
            work[i, j] = W[i, j] / n
        work[i, i] += omega
    return _cholesky_log_det(work, d)


@njit(cache=True, error_model="numpy")
def _cholesky_log_det(A, k):
    """log det of the leading k x k block of ``A`` (symmetric; its lower triangle
    is overwritten by the Cholesky factor), pivots floored at 1e-300."""
    total = 0.0
    for j in range(k):
        s = A[j, j]
        for p in range(j):
            s -= A[j, p] * A[j, p]
        s = math.sqrt(max(s, 1e-300))
        A[j, j] = s
        total += 2.0 * math.log(s)
        for i in range(j + 1, k):
            t = A[i, j]
            for p in range(j):
                t -= A[i, p] * A[j, p]
            A[i, j] = t / s
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
def _log_det_few_rows(a, b, X, weights, counts, means, first, following, size, omega, rows,
                      gram):
    """log det(W / n + omega I) of the union of clusters ``a`` and ``b`` from its
    rows (``first``/``following``: each cluster's rows as a linked list), by
    Sylvester's identity (see the module docstring)."""
    d = X.shape[1]
    n = counts[a] + counts[b]
    k = 0
    for cluster in (a, b):
        i = first[cluster]
        while i >= 0:
            root = math.sqrt(weights[i])
            for j in range(d):
                mean_j = (counts[a] * means[a, j] + counts[b] * means[b, j]) / n
                rows[k, j] = root * (X[i, j] - mean_j)
            k += 1
            i = following[i]
    scale = 1.0 / (n * omega)
    for p in range(k):
        for q in range(p + 1):
            dot = 0.0
            for j in range(d):
                dot += rows[p, j] * rows[q, j]
            gram[p, q] = dot * scale + (1.0 if p == q else 0.0)
    # Positive definite: its eigenvalues are at least 1.
    return d * math.log(omega) + _cholesky_log_det(gram, k)


@njit(cache=True, error_model="numpy")
def _merge_cost(a, b, counts, means, scatter, own, omega, merged, work, X, weights, first,
                following, size, few, rows, gram):
    n = counts[a] + counts[b]
    if size[a] + size[b] <= few:
        log_det = _log_det_few_rows(a, b, X, weights, counts, means, first, following, size,
                                    omega, rows, gram)
    else:
        _merged_scatter(counts[a], means[a], scatter[a], counts[b], means[b], scatter[b],
                        merged)
        log_det = _log_det_ridge(n, merged, omega, work)
    return n * log_det - own[a] - own[b]


@njit(cache=True, error_model="numpy")
def _rescan(a, active, counts, means, scatter, own, omega, merged, work, best_cost,
            best_partner, X, weights, first, following, size, few, rows, gram):
    """Cheapest partner of cluster ``a`` among the active ones (ties: lowest index)."""
    best_cost[a] = np.inf
    best_partner[a] = -1
    for b in range(active.shape[0]):
        if b != a and active[b]:
            cost = _merge_cost(a, b, counts, means, scatter, own, omega, merged, work, X,
                               weights, first, following, size, few, rows, gram)
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
    # Each cluster's rows as a linked list, for unions of few rows, evaluated by
    # their Gram matrix when that is cheaper than the D x D factorisation.
    first = np.arange(n)
    following = np.full(n, -1)
    size = np.ones(n, dtype=np.int64)
    few = d // 2 if d >= FEW_ROWS_MIN_FEATURES else 0
    rows = np.empty((max(few, 1), d))
    gram = np.empty((max(few, 1), max(few, 1)))
    for a in range(n):
        _rescan(a, active, counts, means, scatter, own, omega, merged, work, best_cost,
                best_partner, X, weights, first, following, size, few, rows, gram)
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
        # The rows of ``gone`` join the list of ``keep``.
        last = first[keep]
        while following[last] >= 0:
            last = following[last]
        following[last] = first[gone]
        size[keep] += size[gone]
        merges[step, 0] = keep
        merges[step, 1] = gone
        costs[step] = best_cost[a]
        for i in range(n):
            if active[i] and (i == keep or best_partner[i] == keep or best_partner[i] == gone):
                _rescan(i, active, counts, means, scatter, own, omega, merged, work, best_cost,
                        best_partner, X, weights, first, following, size, few, rows, gram)
            elif active[i]:
                # Only the cost to the merged cluster changed for this row.
                cost = _merge_cost(i, keep, counts, means, scatter, own, omega, merged, work, X,
                                   weights, first, following, size, few, rows, gram)
                if cost < best_cost[i] or (cost == best_cost[i] and keep < best_partner[i]):
                    best_cost[i] = cost
                    best_partner[i] = keep
    return merges, costs
