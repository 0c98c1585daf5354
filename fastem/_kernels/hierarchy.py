"""Model-based agglomerative hierarchical clustering (Gaussian, unconstrained).

Starting from singletons, repeatedly merge the two clusters whose union
increases the classification criterion the least (Fraley 1998, "Algorithms
for model-based Gaussian hierarchical clustering"), here for unconstrained
covariances with a ridge that keeps small clusters well defined:

    f(c) = n_c log det(W_c / n_c + omega I),        cost(a, b) = f(a u b) - f(a) - f(b)

where W_c is the scatter matrix of cluster c. Every pair's cost is kept in
an n x n matrix (n is at most a thousand rows, see
``initialization.HIERARCHY_MAX_ROWS``): a merge changes only the costs that
involve the merged cluster, one evaluation per active cluster, and each row's
cheapest partner is found again from its stored row. The union of clusters a
and b has the scatter W_a + W_b + v v^T, v = sqrt(n_a n_b / n) (m_a - m_b),
and its log-determinant is computed by whichever of these costs least:

* two single rows: W = v v^T has rank one, a closed form (the first n^2 / 2);
* a union of at most D / 2 rows: W = Y^T Y for the k rows Y of the clusters'
  centred (weighted) rows and v, and by Sylvester's determinant identity
  det(W / n + omega I_D) = omega^D det(I_k + Y Y^T / (n omega)), a k x k
  factorisation (most early merges). The merged cluster's rows and their
  Gram matrix are formed once per merge;
* a cluster of s <= D / 3 - 1 rows joining the larger merged cluster: a
  rank-(s + 1) update of the merged cluster's factorisation by the matrix
  determinant lemma, O(s D^2) (most late merges: a big cluster against the
  rows not yet absorbed);
* otherwise the D x D Cholesky factorisation, O(D^3).

On 569 rows of 30 columns that takes 0.1 s; rescanning with factorisations
took 2.0 s.

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
def _log_det_two_rows(xa, na, xb, nb, omega):
    """log det(W / n + omega I) of two single rows of weights n_a and n_b:
    W = c (x_a - x_b)(x_a - x_b)^T with c = n_a n_b / n is of rank one, so

        log det = D log(omega) + log(1 + c |x_a - x_b|^2 / (n omega)).
    """
    n = na + nb
    squared = 0.0
    for j in range(xa.shape[0]):
        squared += (xa[j] - xb[j]) ** 2
    return xa.shape[0] * math.log(omega) + math.log1p(na * nb / n * squared / (n * omega))


@njit(cache=True, error_model="numpy")
def _centred_rows(cluster, X, weights, means, first, following, out):
    """sqrt(w_i) (x_i - m) for the rows of ``cluster`` (its linked list) into
    ``out``; returns how many."""
    k = 0
    i = first[cluster]
    while i >= 0:
        root = math.sqrt(weights[i])
        for j in range(X.shape[1]):
            out[k, j] = root * (X[i, j] - means[cluster, j])
        k += 1
        i = following[i]
    return k


@njit(cache=True, error_model="numpy")
def _dot(x, y):
    total = 0.0
    for j in range(x.shape[0]):
        total += x[j] * y[j]
    return total


@njit(cache=True, error_model="numpy")
def _log_det_by_rows(a, b, a_rows, a_count, a_gram, X, weights, counts, means, first,
                     following, size, omega, rows, gram):
    """log det(W / n + omega I) of the union of clusters ``a`` and ``b`` by
    Sylvester's identity, Y's rows being a's centred rows (``a_rows[:a_count]``,
    whose Gram matrix is ``a_gram``), b's centred rows (none for a single row)
    and v (see the module docstring)."""
    d = X.shape[1]
    n = counts[a] + counts[b]
    scale = 1.0 / (n * omega)
    b_count = _centred_rows(b, X, weights, means, first, following, rows) if size[b] > 1 else 0
    c = math.sqrt(counts[a] * counts[b] / n)
    for j in range(d):
        rows[b_count, j] = c * (means[a, j] - means[b, j])
    for p in range(a_count):
        for q in range(p + 1):
            gram[p, q] = a_gram[p, q] * scale
        gram[p, p] += 1.0
    for p in range(b_count + 1):
        row = a_count + p
        for q in range(a_count):
            gram[row, q] = _dot(rows[p], a_rows[q]) * scale
        for q in range(p + 1):
            gram[row, a_count + q] = _dot(rows[p], rows[q]) * scale
        gram[row, row] += 1.0
    # Positive definite: its eigenvalues are at least 1.
    return d * math.log(omega) + _cholesky_log_det(gram, a_count + b_count + 1)


@njit(cache=True, error_model="numpy")
def _forward_solve(L, u, z):
    """z = L^{-1} u for the lower-triangular ``L``."""
    for i in range(L.shape[0]):
        t = u[i]
        for p in range(i):
            t -= L[i, p] * z[p]
        z[i] = t / L[i, i]


@njit(cache=True, error_model="numpy")
def _log_det_update(small, big, factor, log_det_factor, X, weights, counts, means, first,
                    following, size, column, rows, gram):
    """log det(W / n + omega I) of the union of a small cluster and a big one
    whose ``A = W_big / n + omega I`` has the Cholesky factor ``factor`` (lower
    triangle) and log-determinant ``log_det_factor``.

    The union's scatter is W_big + U U^T, U's columns being v and the small
    cluster's centred rows (none for a single row), so by the matrix
    determinant lemma

        log det(A + U U^T / n) = log det A + log det(I + Z^T Z),   Z = L^{-1} U / sqrt(n).
    """
    d = X.shape[1]
    n = counts[small] + counts[big]
    root_n = math.sqrt(n)
    k = _centred_rows(small, X, weights, means, first, following, rows) if size[small] > 1 else 0
    c = math.sqrt(counts[small] * counts[big] / n)
    for j in range(d):
        rows[k, j] = c * (means[big, j] - means[small, j])
    k += 1
    for p in range(k):
        for j in range(d):
            column[j] = rows[p, j] / root_n
        _forward_solve(factor, column, rows[p])
    for p in range(k):
        for q in range(p + 1):
            gram[p, q] = _dot(rows[p], rows[q]) + (1.0 if p == q else 0.0)
    return log_det_factor + _cholesky_log_det(gram, k)


@njit(cache=True, error_model="numpy")
def _best_in_row(a, active, cost, best_cost, best_partner):
    """Cheapest partner of cluster ``a`` among the active ones (ties: lowest index)."""
    best_cost[a] = np.inf
    best_partner[a] = -1
    row = cost[a]
    for b in range(active.shape[0]):
        if b != a and active[b] and row[b] < best_cost[a]:
            best_cost[a] = row[b]
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
    # A single row's scatter is 0: f = n_c D log(omega).
    own = counts * (d * math.log(omega))
    active = np.ones(n, dtype=np.bool_)
    best_cost = np.empty(n)
    best_partner = np.empty(n, dtype=np.int64)
    # Each cluster's rows as a linked list, for scoring unions by their rows.
    first = np.arange(n)
    following = np.full(n, -1)
    size = np.ones(n, dtype=np.int64)
    few = d // 2 if d >= FEW_ROWS_MIN_FEATURES else 0
    # A cluster of s rows joins a large one by a rank-(s + 1) update when that
    # costs less than a factorisation: (s + 1) D^2 / 2 against D^3 / 6.
    update_rows = d // 3 - 1
    scratch = max(few, update_rows) + 1
    rows = np.empty((scratch, d))
    gram = np.empty((scratch, scratch))
    keep_rows = np.empty((scratch, d))
    keep_gram = np.empty((scratch, scratch))
    column = np.empty(d)
    # Factors of W_keep / n + omega I for the union sizes n met in one step.
    n_factors = 8
    factors = np.empty((n_factors, d, d))
    factor_count = np.empty(n_factors)
    factor_log_det = np.empty(n_factors)
    cost = np.empty((n, n))
    for a in range(n):
        for b in range(a + 1, n):
            total = counts[a] + counts[b]
            cost[a, b] = (total * _log_det_two_rows(means[a], counts[a], means[b], counts[b],
                                                    omega) - own[a] - own[b])
            cost[b, a] = cost[a, b]
    for a in range(n):
        _best_in_row(a, active, cost, best_cost, best_partner)
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
        # Only the costs to the merged cluster changed.
        keep_count = 0
        if size[keep] < few:
            keep_count = _centred_rows(keep, X, weights, means, first, following, keep_rows)
            for p in range(keep_count):
                for q in range(p + 1):
                    keep_gram[p, q] = _dot(keep_rows[p], keep_rows[q])
        factors_held = 0
        for i in range(n):
            if not active[i] or i == keep:
                continue
            union = counts[i] + counts[keep]
            if size[i] + size[keep] <= few:
                log_det = _log_det_by_rows(keep, i, keep_rows, keep_count, keep_gram, X,
                                           weights, counts, means, first, following, size,
                                           omega, rows, gram)
            elif size[i] <= update_rows and size[i] < size[keep]:
                slot = -1
                for f in range(factors_held):
                    if factor_count[f] == union:
                        slot = f
                if slot < 0:
                    slot = factors_held % n_factors
                    factors_held = min(factors_held + 1, n_factors)
                    factor = factors[slot]
                    for p in range(d):
                        for q in range(d):
                            factor[p, q] = scatter[keep, p, q] / union
                        factor[p, p] += omega
                    factor_log_det[slot] = _cholesky_log_det(factor, d)
                    factor_count[slot] = union
                log_det = _log_det_update(i, keep, factors[slot], factor_log_det[slot], X,
                                          weights, counts, means, first, following, size,
                                          column, rows, gram)
            else:
                _merged_scatter(counts[keep], means[keep], scatter[keep], counts[i], means[i],
                                scatter[i], merged)
                log_det = _log_det_ridge(union, merged, omega, work)
            cost[i, keep] = union * log_det - own[min(i, keep)] - own[max(i, keep)]
            cost[keep, i] = cost[i, keep]
        for i in range(n):
            if not active[i]:
                continue
            if i == keep or best_partner[i] == keep or best_partner[i] == gone:
                _best_in_row(i, active, cost, best_cost, best_partner)
            elif cost[i, keep] < best_cost[i] or (cost[i, keep] == best_cost[i]
                                                   and keep < best_partner[i]):
                best_cost[i] = cost[i, keep]
                best_partner[i] = keep
    return merges, costs
