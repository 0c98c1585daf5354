"""Pure-NumPy reference implementation of EM for Gaussian mixtures.

Every Numba kernel in :mod:`fastem._kernels` has a twin here, written straight
from the equations and vectorised with NumPy. This module is

* the oracle of the test suite (kernels are compared against it to tight
  tolerances), and
* the baseline the benchmarks measure fastem's speed-up against.

It deliberately imports nothing from the rest of fastem, so a bug in the fast
path can never leak into the oracle. It favours clarity over memory: the
E-step materialises the ``(n_samples, n_components)`` responsibility matrix,
exactly as scikit-learn does.

Parameterisation (shared with scikit-learn and the fast path): each component
is stored by the upper-triangular Cholesky factor ``U`` of its precision
matrix, ``Lambda = U U^T``, so that the squared Mahalanobis distance is
``||(x - mu) U||^2`` and ``log det(Lambda) = 2 sum(log diag(U))``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import solve_triangular

from ._kernels.chunks import BLOCK_ROWS

__all__ = [
    "COVARIANCE_TYPES",
    "LOG_2PI",
    "em_fit",
    "estimate_parameters",
    "kmeans_plusplus",
    "lloyd",
    "log_gaussian_prob",
    "log_responsibilities",
    "m_step",
    "missing_value_statistics",
    "pooled_tied_statistics",
    "precision_cholesky",
    "statistics_from_labels",
    "sufficient_statistics",
    "whiten",
]

LOG_2PI = math.log(2.0 * math.pi)
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def _eps_nk(dtype=np.float64):
    # scikit-learn adds 10 machine epsilons to every N_k so that an empty
    # component gives finite means; we keep the same guard for parity.
    return 10.0 * np.finfo(dtype).eps


def _as_full_chol(precisions_cholesky, covariance_type, n_components, n_features):
    """Broadcast any covariance type's precision Cholesky to (K, D, D)."""
    pc = np.asarray(precisions_cholesky, dtype=np.float64)
    if covariance_type == "full":
        return pc
    if covariance_type == "tied":
        return np.broadcast_to(pc, (n_components, n_features, n_features))
    if covariance_type == "diag":
        return np.stack([np.diag(row) for row in pc])
    return np.stack([np.eye(n_features) * s for s in pc])


def log_gaussian_prob(X, means, precisions_cholesky, covariance_type):
    r"""Log-density of every point under every component.

    .. math::

        \log \mathcal N(x_n \mid \mu_k, \Lambda_k^{-1}) =
        -\tfrac{D}{2}\log 2\pi + \sum_d \log U_{k,dd}
        - \tfrac12 \lVert (x_n - \mu_k) U_k \rVert^2

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    means : ndarray of shape (n_components, n_features)
    precisions_cholesky : ndarray
        (K, D, D) for 'full', (D, D) for 'tied', (K, D) for 'diag', (K,) for
        'spherical'.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}

    Returns
    -------
    log_prob : ndarray of shape (n_samples, n_components)
    """
    X = np.asarray(X, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    n_components, n_features = means.shape
    U = _as_full_chol(precisions_cholesky, covariance_type, n_components, n_features)
    log_det = np.log(np.diagonal(U, axis1=1, axis2=2)).sum(axis=1)
    log_prob = np.empty((X.shape[0], n_components))
    for k in range(n_components):
        y = (X - means[k]) @ U[k]
        log_prob[:, k] = -0.5 * np.einsum("ij,ij->i", y, y)
    return log_prob + log_det - 0.5 * n_features * LOG_2PI


def log_responsibilities(X, weights, means, precisions_cholesky, covariance_type):
    r"""E-step: per-point log-likelihood and log-responsibilities.

    .. math::

        \log p(x_n) = \operatorname{logsumexp}_k \big(\log \pi_k +
        \log\mathcal N(x_n\mid\mu_k,\Sigma_k)\big), \qquad
        \log r_{nk} = \log \pi_k + \log\mathcal N(x_n\mid\mu_k,\Sigma_k)
        - \log p(x_n)

    Returns
    -------
    log_prob_norm : ndarray of shape (n_samples,)
    log_resp : ndarray of shape (n_samples, n_components)
    """
    weighted = log_gaussian_prob(X, means, precisions_cholesky, covariance_type)
    weighted = weighted + np.log(np.asarray(weights, dtype=np.float64))
    top = weighted.max(axis=1, keepdims=True)
    log_prob_norm = top[:, 0] + np.log(np.exp(weighted - top).sum(axis=1))
    with np.errstate(under="ignore"):
        log_resp = weighted - log_prob_norm[:, None]
    return log_prob_norm, log_resp


def _second_moment_kind(covariance_type):
    return "full" if covariance_type in ("full", "tied") else "diag"


def sufficient_statistics(X, resp, shift, covariance_type, sample_weight=None):
    r"""Sufficient statistics of a weighted E-step, taken around a shift.

    With :math:`w_n` the sample weights and :math:`c_k` the per-component
    shift (fastem uses the current means, which keeps one-pass sums free of
    cancellation for data far from the origin):

    .. math::

        N_k = \sum_n w_n r_{nk},\quad
        s_k = \sum_n w_n r_{nk} (x_n - c_k),\quad
        S_k = \sum_n w_n r_{nk} (x_n - c_k)(x_n - c_k)^T

    ``S_k`` is the full matrix for 'full' and 'tied' and its diagonal for
    'diag' and 'spherical'.

    Returns
    -------
    nk : ndarray (K,)
    sx : ndarray (K, D)
    sxx : ndarray (K, D, D) or (K, D)
    """
    X = np.asarray(X, dtype=np.float64)
    R = np.asarray(resp, dtype=np.float64)
    if sample_weight is not None:
        R = R * np.asarray(sample_weight, dtype=np.float64)[:, None]
    n_components = R.shape[1]
    nk = R.sum(axis=0)
    sx = np.empty((n_components, X.shape[1]))
    full = _second_moment_kind(covariance_type) == "full"
    sxx = np.empty((n_components,) + ((X.shape[1],) * (2 if full else 1)))
    for k in range(n_components):
        diff = X - shift[k]
        weighted = diff * R[:, k : k + 1]
        sx[k] = weighted.sum(axis=0)
        sxx[k] = weighted.T @ diff if full else (weighted * diff).sum(axis=0)
    return nk, sx, sxx


def statistics_from_labels(X, labels, shift, n_components, covariance_type, sample_weight=None):
    """Sufficient statistics of a hard assignment (label -1: no component)."""
    labels = np.asarray(labels)
    resp = np.zeros((labels.shape[0], n_components))
    assigned = labels >= 0
    resp[np.flatnonzero(assigned), labels[assigned]] = 1.0
    return sufficient_statistics(X, resp, shift, covariance_type, sample_weight)


def precision_cholesky(covariances, covariance_type):
    r"""Upper Cholesky factor of the precision: :math:`U = (L^{-1})^T`, with
    :math:`\Sigma = L L^T`. Raises ``numpy.linalg.LinAlgError`` when a
    covariance is not positive definite."""
    covariances = np.asarray(covariances, dtype=np.float64)
    if covariance_type in ("diag", "spherical"):
        if np.any(covariances <= 0.0):
            raise np.linalg.LinAlgError("non-positive variance")
        return 1.0 / np.sqrt(covariances)
    stack = covariances[None] if covariance_type == "tied" else covariances
    out = np.empty_like(stack)
    for k, cov in enumerate(stack):
        L = np.linalg.cholesky(cov)
        out[k] = solve_triangular(L, np.eye(cov.shape[0]), lower=True).T
    return out[0] if covariance_type == "tied" else out


def m_step(nk, sx, sxx, shift, reg_covar, covariance_type):
    r"""M-step from sufficient statistics alone.

    With :math:`\tilde N_k = N_k + 10\epsilon` and :math:`d_k = s_k/\tilde N_k`:

    .. math::

        \pi_k = \tilde N_k / \textstyle\sum_j \tilde N_j,\quad
        \mu_k = c_k + d_k,\quad
        \Sigma_k = \big(S_k - d_k s_k^T - s_k d_k^T + N_k d_k d_k^T\big)
        / \tilde N_k + \lambda I

    'tied' pools the scatter, :math:`\Sigma = \sum_k(\cdot)/\sum_k \tilde N_k
    + \lambda I` (``sxx`` may then be given pooled, as (1, D, D)); 'spherical'
    averages the diagonal over features.

    Returns
    -------
    weights, means, covariances, precisions_cholesky
    """
    nk = np.asarray(nk, dtype=np.float64)
    nk_reg = nk + _eps_nk()
    d = sx / nk_reg[:, None]
    means = shift + d
    weights = nk_reg / nk_reg.sum()
    if sxx.ndim == 3:
        correction = (
            - np.einsum("ki,kj->kij", d, sx)
            - np.einsum("ki,kj->kij", sx, d)
            + nk[:, None, None] * np.einsum("ki,kj->kij", d, d)
        )
        n_features = sx.shape[1]
        if covariance_type == "tied":
            # sxx may be per component (K, D, D) or pooled (1, D, D).
            scatter = sxx.sum(axis=0) + correction.sum(axis=0)
            cov = scatter / nk_reg.sum() + reg_covar * np.eye(n_features)
        else:
            cov = (sxx + correction) / nk_reg[:, None, None] + reg_covar * np.eye(n_features)
    else:
        scatter = sxx - 2.0 * d * sx + nk[:, None] * d * d
        cov = scatter / nk_reg[:, None] + reg_covar
        if covariance_type == "spherical":
            cov = cov.mean(axis=1)
    return weights, means, cov, precision_cholesky(cov, covariance_type)


def estimate_parameters(X, resp, reg_covar, covariance_type, sample_weight=None):
    r"""Two-pass weighted maximum-likelihood estimate from responsibilities.

    .. math::

        \mu_k = \frac{\sum_n w_n r_{nk} x_n}{\tilde N_k},\quad
        \Sigma_k = \frac{\sum_n w_n r_{nk}(x_n-\mu_k)(x_n-\mu_k)^T}{\tilde N_k}
        + \lambda I

    Returns un-normalised weights :math:`\tilde N_k`, the means and the
    covariances, as scikit-learn's ``_estimate_gaussian_parameters`` does.
    """
    X = np.asarray(X, dtype=np.float64)
    R = np.asarray(resp, dtype=np.float64)
    if sample_weight is not None:
        R = R * np.asarray(sample_weight, dtype=np.float64)[:, None]
    nk = R.sum(axis=0) + _eps_nk()
    means = (R.T @ X) / nk[:, None]
    n_features = X.shape[1]
    if covariance_type in ("full", "tied"):
        scatter = np.empty((len(nk), n_features, n_features))
        for k in range(len(nk)):
            diff = X - means[k]
            scatter[k] = (R[:, k : k + 1] * diff).T @ diff
        if covariance_type == "tied":
            cov = scatter.sum(axis=0) / nk.sum() + reg_covar * np.eye(n_features)
        else:
            cov = scatter / nk[:, None, None] + reg_covar * np.eye(n_features)
    else:
        cov = np.empty((len(nk), n_features))
        for k in range(len(nk)):
            cov[k] = (R[:, k : k + 1] * (X - means[k]) ** 2).sum(axis=0) / nk[k]
        cov += reg_covar
        if covariance_type == "spherical":
            cov = cov.mean(axis=1)
    return nk, means, cov


def em_fit(
    X,
    weights,
    means,
    precisions_cholesky,
    covariance_type,
    *,
    tol=1e-3,
    reg_covar=1e-6,
    max_iter=100,
    sample_weight=None,
):
    """Run EM from given parameters, exactly as scikit-learn's loop does.

    Each iteration is an E-step under the current parameters (its mean
    log-likelihood is the iteration's lower bound) followed by an M-step;
    iteration stops when the lower bound changes by less than ``tol``.

    Returns
    -------
    dict with keys weights, means, covariances, precisions_cholesky,
    lower_bounds (list), n_iter, converged.
    """
    X = np.asarray(X, dtype=np.float64)
    sw = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    total = X.shape[0] if sw is None else sw.sum()
    params = dict(
        weights=np.asarray(weights, dtype=np.float64),
        means=np.asarray(means, dtype=np.float64),
        covariances=None,
        precisions_cholesky=np.asarray(precisions_cholesky, dtype=np.float64),
    )
    lower_bound = -np.inf
    lower_bounds = []
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        previous = lower_bound
        log_prob_norm, log_resp = log_responsibilities(
            X, params["weights"], params["means"], params["precisions_cholesky"], covariance_type
        )
        lower_bound = float(log_prob_norm @ sw / total if sw is not None else log_prob_norm.mean())
        nk, means, cov = estimate_parameters(
            X, np.exp(log_resp), reg_covar, covariance_type, sw
        )
        params.update(
            weights=nk / nk.sum(),
            means=means,
            covariances=cov,
            precisions_cholesky=precision_cholesky(cov, covariance_type),
        )
        lower_bounds.append(lower_bound)
        if abs(lower_bound - previous) < tol:
            converged = True
            break
    return dict(params, lower_bounds=lower_bounds, n_iter=n_iter, converged=converged)


def kmeans_plusplus(X, n_clusters, uniforms, first_index, n_local_trials=None, sample_weight=None):
    r"""Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, greedy variant).

    Each new centre is drawn among ``n_local_trials`` candidates sampled with
    probability proportional to :math:`w_n D(x_n)^2`, keeping the candidate
    that most reduces the potential :math:`\sum_n w_n D(x_n)^2`.

    Randomness is supplied by the caller so that the kernel and this twin
    consume identical draws: ``first_index`` is the first centre and
    ``uniforms`` an array of shape (n_clusters - 1, n_local_trials) in [0, 1).

    Returns
    -------
    centers : ndarray (n_clusters, D)
    indices : ndarray (n_clusters,)
    """
    X = np.asarray(X, dtype=np.float64)
    w = np.ones(X.shape[0]) if sample_weight is None else np.asarray(sample_weight, float)
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(n_clusters))
    indices = [int(first_index)]
    closest = ((X - X[first_index]) ** 2).sum(axis=1)
    for c in range(1, n_clusters):
        cumulative, total = blocked_cumulative_mass(w * closest)
        targets = np.asarray(uniforms[c - 1][:n_local_trials]) * total
        candidates = np.minimum(np.searchsorted(cumulative, targets, side="right"), X.shape[0] - 1)
        best_potential, best = np.inf, None
        for cand in candidates:
            trial = np.minimum(closest, ((X - X[cand]) ** 2).sum(axis=1))
            potential = (w * trial).sum()
            if potential < best_potential:
                best_potential, best, best_closest = potential, int(cand), trial
        indices.append(best)
        closest = best_closest
    indices = np.asarray(indices)
    return X[indices].copy(), indices


def blocked_cumulative_mass(mass, block=BLOCK_ROWS):
    r"""The cumulative sums k-means++ draws from, taken in blocks of ``block`` rows.

    With :math:`M_b` block b's sum (rows in order) and :math:`P_b = M_0 + \dots
    + M_{b-1}`, row i of block b gets :math:`P_b + (m_{b0} + \dots + m_i)`;
    returns those and the total :math:`P_B`. (Twin of
    :func:`fastem.initialization.draw_by_mass`, which finds a draw's block
    among the block sums that the pass over X adds in parallel.)
    """
    mass = np.asarray(mass, dtype=np.float64)
    n = mass.shape[0]
    n_blocks = -(-n // block)
    padded = np.zeros(n_blocks * block)
    padded[:n] = mass
    within = np.cumsum(padded.reshape(n_blocks, block), axis=1)  # each block in order
    running = np.cumsum(within[:, -1])
    prefix = np.concatenate([[0.0], running[:-1]])
    return (prefix[:, None] + within).reshape(-1)[:n], float(running[-1])


def column_moments(X, centre, scale=1.0, sample_weight=None):
    r"""Weighted first and second moments of each column of ``scale * X`` around
    ``centre`` (twin of :func:`fastem._kernels.kmeans.column_moments`, summed):
    :math:`\sum_n w_n (s x_{nd} - c_d)` and :math:`\sum_n w_n (s x_{nd} - c_d)^2`.
    """
    Z = np.asarray(X, dtype=np.float64) * scale - centre
    w = np.ones(Z.shape[0]) if sample_weight is None else np.asarray(sample_weight, float)
    return w @ Z, w @ (Z * Z)


def lloyd(X, centers, *, max_iter=300, tol=1e-4, sample_weight=None):
    r"""Lloyd's k-means from given centres, as scikit-learn's ``KMeans`` runs it.

    Rows are centred on the data's mean and compared to the centres by
    :math:`\lVert c\rVert^2 - 2 x^T c` (ties: the lowest index). An empty
    cluster takes over the row farthest from its centre, which leaves its old
    cluster. Stops when the labels no longer change or when the summed squared
    shift of the centres is at most ``tol * mean(var(X, axis=0))``.

    Returns
    -------
    labels : ndarray (N,), centers : ndarray (K, D), inertia : float, n_iter : int
    """
    X = np.asarray(X, dtype=np.float64)
    w = np.ones(X.shape[0]) if sample_weight is None else np.asarray(sample_weight, float)
    offset = X.mean(axis=0)
    Z = X - offset
    centers = np.array(centers, dtype=np.float64) - offset
    tol_abs = tol * np.var(X, axis=0).mean()

    def nearest(centers):
        d = (centers**2).sum(axis=1)[None, :] - 2.0 * (Z @ centers.T)
        return d.argmin(axis=1)

    labels = None
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        new_labels = nearest(centers)
        counts = np.bincount(new_labels, weights=w, minlength=len(centers))
        sums = np.zeros_like(centers)
        np.add.at(sums, new_labels, Z * w[:, None])
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            far = ((Z - centers[new_labels]) ** 2).sum(axis=1)
            for k, row in zip(empty, np.argsort(-far, kind="stable")):
                old = new_labels[row]
                sums[old] -= Z[row] * w[row]
                counts[old] -= w[row]
                sums[k] = Z[row] * w[row]
                counts[k] = w[row]
        new_centers = sums / counts[:, None]
        shift = ((new_centers - centers) ** 2).sum()
        strict = labels is not None and np.array_equal(labels, new_labels)
        labels, centers = new_labels, new_centers
        if strict or shift <= tol_abs:
            break
    labels = nearest(centers)
    inertia = float((w * ((Z - centers[labels]) ** 2).sum(axis=1)).sum())
    return labels, centers + offset, inertia, n_iter


def hierarchical_merges(X, weights, omega):
    r"""Model-based agglomerative hierarchy, naively (twin of the Numba kernel).

    Row ``i`` starts as a cluster of size ``weights[i]``. At every step all
    pairs of active clusters are scored by the increase of
    :math:`\sum_c n_c \log\det(W_c/n_c + \omega I)` and the cheapest pair is
    merged (ties: the lexicographically smallest pair of cluster names; a
    cluster is named by its lowest original row).

    Returns
    -------
    merges : ndarray (n - 1, 2), costs : ndarray (n - 1,)
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    eye = omega * np.eye(d)

    def f(count, scatter):
        return count * 2.0 * np.log(np.diag(np.linalg.cholesky(scatter / count + eye))).sum()

    clusters = {i: (float(weights[i]), X[i].copy(), np.zeros((d, d))) for i in range(n)}
    merges, costs = [], []
    while len(clusters) > 1:
        names = sorted(clusters)
        best = None
        for ai, a in enumerate(names):
            na, ma, Wa = clusters[a]
            for b in names[ai + 1:]:
                nb, mb, Wb = clusters[b]
                diff = ma - mb
                W = Wa + Wb + (na * nb / (na + nb)) * np.outer(diff, diff)
                cost = f(na + nb, W) - f(na, Wa) - f(nb, Wb)
                if best is None or cost < best[0]:
                    best = (cost, a, b, W)
        cost, a, b, W = best
        na, ma, _ = clusters[a]
        nb, mb, _ = clusters.pop(b)
        clusters[a] = (na + nb, (na * ma + nb * mb) / (na + nb), W)
        merges.append((a, b))
        costs.append(cost)
    return np.asarray(merges, dtype=np.int64).reshape(-1, 2), np.asarray(costs)


def missing_value_statistics(X, weights, means, covariances, sample_weight=None):
    r"""Statistics of data with NaN for missing entries, row by row (twin of
    :func:`fastem._kernels.missing.missing_pass`).

    For row :math:`x` with observed coordinates ``o`` and missing ``m``, and
    component k: :math:`\log p_k = \log N(x_o; \mu_o, \Sigma_{oo})`, the
    conditional mean :math:`\hat x_m = \mu_m + \Sigma_{mo}\Sigma_{oo}^{-1}(x_o - \mu_o)`
    and covariance :math:`C = \Sigma_{mm} - \Sigma_{mo}\Sigma_{oo}^{-1}\Sigma_{om}`;
    :math:`N_k = \sum r`, :math:`s_k = \sum r(\hat x - \mu_k)`,
    :math:`S_k = \sum r((\hat x - \mu_k)(\hat x - \mu_k)^T + C)` with C in the
    missing block. ``covariances`` is (K, D, D). Rows with nothing observed
    are skipped.

    Returns
    -------
    nk (K,), sx (K, D), sxx (K, D, D), loglik (float), log_norm (N,) and
    log_resp (N, K) (NaN for skipped rows).
    """
    X = np.asarray(X, dtype=np.float64)
    n_samples, n_features = X.shape
    n_components = means.shape[0]
    nk = np.zeros(n_components)
    sx = np.zeros((n_components, n_features))
    sxx = np.zeros((n_components, n_features, n_features))
    log_norm = np.full(n_samples, np.nan)
    log_resp = np.full((n_samples, n_components), np.nan)
    loglik = 0.0
    w = np.ones(n_samples) if sample_weight is None else np.asarray(sample_weight, float)
    for i in range(n_samples):
        o = ~np.isnan(X[i])
        m = ~o
        if not o.any():
            continue
        log_p = np.empty(n_components)
        completed = np.empty((n_components, n_features))
        conditional = []
        for k in range(n_components):
            S = covariances[k]
            S_oo = S[np.ix_(o, o)]
            diff = X[i, o] - means[k, o]
            _, logdet = np.linalg.slogdet(S_oo)
            solved = np.linalg.solve(S_oo, diff)
            log_p[k] = (np.log(weights[k]) - 0.5 * (o.sum() * np.log(2 * np.pi) + logdet
                                                     + diff @ solved))
            completed[k, o] = X[i, o]
            completed[k, m] = means[k, m] + S[np.ix_(m, o)] @ solved
            conditional.append(S[np.ix_(m, m)] - S[np.ix_(m, o)] @ np.linalg.solve(
                S_oo, S[np.ix_(o, m)]))
        top = log_p.max()
        lse = top + np.log(np.exp(log_p - top).sum())
        log_norm[i], log_resp[i] = lse, log_p - lse
        loglik += w[i] * lse
        for k in range(n_components):
            r = w[i] * np.exp(log_p[k] - lse)
            e = completed[k] - means[k]
            nk[k] += r
            sx[k] += r * e
            sxx[k] += r * np.outer(e, e)
            sxx[k][np.ix_(m, m)] += r * conditional[k]
    return nk, sx, sxx, loglik, log_norm, log_resp


def _hmm_sequences(lengths, n_rows):
    """Row offsets of the sequences (one sequence of all rows for None)."""
    lengths = np.asarray([n_rows] if lengths is None else lengths, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(lengths)])


def _hmm_logsumexp(a, axis=None):
    """log(sum(exp(a))) along ``axis``, shifted by the maximum (-inf for all -inf)."""
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - top), axis=axis, keepdims=True)) + top
    return float(out.reshape(())) if axis is None else np.squeeze(out, axis=axis)


def hmm_forward_backward(log_emission, log_startprob, log_transmat, lengths=None, X=None,
                         shift=None, full=False):
    r"""Forward–backward of an HMM in log space, sequence by sequence (twin of
    :func:`fastem._kernels.hmm.forward_backward`).

    .. math::

        \alpha_0(j) = \log\pi_j + L_0(j),\quad
        \alpha_t(j) = L_t(j) + \operatorname{logsumexp}_i\big(\alpha_{t-1}(i) + \log A_{ij}\big),

        \beta_{T-1}(i) = 0,\quad
        \beta_t(i) = \operatorname{logsumexp}_j\big(\log A_{ij} + L_{t+1}(j) + \beta_{t+1}(j)\big),

        \log p(x) = \operatorname{logsumexp}_j \alpha_{T-1}(j),\quad
        \gamma_t(i) = e^{\alpha_t(i) + \beta_t(i)
          - \operatorname{logsumexp}_k(\alpha_t(k) + \beta_t(k))},

        \xi_t(i, j) = e^{\alpha_t(i) + \log A_{ij} + L_{t+1}(j) + \beta_{t+1}(j) - \log p(x)}.

    With the rows ``X``, also the emission statistics of the posteriors
    around the shift :math:`c_k`, straight from :math:`\gamma` (the kernel
    adds them up as it goes):

    .. math::

        N_k = \sum_t\gamma_t(k),\quad
        s_k = \sum_t\gamma_t(k)(x_t - c_k),\quad
        S_k = \sum_t\gamma_t(k)(x_t - c_k)(x_t - c_k)^T

    (the full :math:`S_k` with ``full``, else its diagonal).

    Parameters
    ----------
    log_emission : ndarray (T, K)
        :math:`L_t(j) = \log p(x_t \mid z_t = j)`.
    log_startprob : ndarray (K,)
    log_transmat : ndarray (K, K)
    lengths : sequence of int or None
        Lengths of the sequences stored back to back in the rows.
    X : ndarray (T, D) or None
    shift : ndarray (K, D), with X
    full : bool

    Returns
    -------
    loglik : ndarray (S,)
        :math:`\log p(x^{(s)})` per sequence.
    gamma : ndarray (T, K)
        Posteriors :math:`p(z_t \mid x)`.
    trans : ndarray (K, K)
        :math:`\sum_s\sum_t \xi_t(i, j)`, the expected transition counts.
    start : ndarray (K,)
        :math:`\sum_s \gamma^{(s)}_0`, the expected start counts.
    emissions : tuple or None
        ``(nk, sx, sxx)``, (K,), (K, D) and (K, D, D) with ``full`` else
        (K, D, 1); None without ``X``.
    """
    L = np.asarray(log_emission, dtype=np.float64)
    log_pi = np.asarray(log_startprob, dtype=np.float64)
    log_A = np.asarray(log_transmat, dtype=np.float64)
    bounds = _hmm_sequences(lengths, L.shape[0])
    n_states = log_pi.shape[0]
    loglik = np.empty(bounds.shape[0] - 1)
    gamma = np.empty_like(L)
    trans = np.zeros((n_states, n_states))
    start = np.zeros(n_states)
    for s in range(bounds.shape[0] - 1):
        Ls = L[bounds[s]:bounds[s + 1]]
        n = Ls.shape[0]
        alpha = np.empty((n, n_states))
        beta = np.zeros((n, n_states))
        alpha[0] = log_pi + Ls[0]
        for t in range(1, n):
            alpha[t] = Ls[t] + _hmm_logsumexp(alpha[t - 1][:, None] + log_A, axis=0)
        for t in range(n - 2, -1, -1):
            beta[t] = _hmm_logsumexp(log_A + (Ls[t + 1] + beta[t + 1])[None, :], axis=1)
        loglik[s] = _hmm_logsumexp(alpha[-1])
        log_gamma = alpha + beta
        log_gamma -= _hmm_logsumexp(log_gamma, axis=1)[:, None]
        gamma[bounds[s]:bounds[s + 1]] = np.exp(log_gamma)
        start += gamma[bounds[s]]
        for t in range(n - 1):
            trans += np.exp(alpha[t][:, None] + log_A + (Ls[t + 1] + beta[t + 1])[None, :]
                            - loglik[s])
    if X is None:
        return loglik, gamma, trans, start, None
    X = np.asarray(X, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    nk = gamma.sum(axis=0)
    dev = X[:, None, :] - shift[None, :, :]  # (T, K, D)
    sx = np.einsum("tk,tkd->kd", gamma, dev)
    if full:
        sxx = np.einsum("tk,tkd,tke->kde", gamma, dev, dev)
    else:
        sxx = np.einsum("tk,tkd->kd", gamma, dev * dev)[:, :, None]
    return loglik, gamma, trans, start, (nk, sx, sxx)


def hmm_viterbi(log_emission, log_startprob, log_transmat, lengths=None):
    r"""Most probable state path of every sequence (twin of
    :func:`fastem._kernels.hmm.viterbi`).

    .. math::

        \delta_0(j) = \log\pi_j + L_0(j),\qquad
        \delta_t(j) = L_t(j) + \max_i\big(\delta_{t-1}(i) + \log A_{ij}\big),

    traced back from :math:`\arg\max_j\delta_{T-1}(j)` through the arg-maxes
    (the first of equal values).

    Returns
    -------
    logprob : ndarray (S,)
        :math:`\max_j\delta_{T-1}(j)` per sequence, the log-probability of
        the path and the sequence together.
    path : ndarray (T,) int64
    """
    L = np.asarray(log_emission, dtype=np.float64)
    log_pi = np.asarray(log_startprob, dtype=np.float64)
    log_A = np.asarray(log_transmat, dtype=np.float64)
    bounds = _hmm_sequences(lengths, L.shape[0])
    logprob = np.empty(bounds.shape[0] - 1)
    path = np.empty(L.shape[0], dtype=np.int64)
    for s in range(bounds.shape[0] - 1):
        Ls = L[bounds[s]:bounds[s + 1]]
        n = Ls.shape[0]
        delta = log_pi + Ls[0]
        back = np.zeros((n, log_pi.shape[0]), dtype=np.int64)
        for t in range(1, n):
            scores = delta[:, None] + log_A
            back[t] = np.argmax(scores, axis=0)
            delta = Ls[t] + np.max(scores, axis=0)
        state = int(np.argmax(delta))
        logprob[s] = delta[state]
        path[bounds[s + 1] - 1] = state
        for t in range(n - 1, 0, -1):
            state = int(back[t, state])
            path[bounds[s] + t - 1] = state
    return logprob, path


def whiten(X, centre, prec_chol):
    r"""Rows in the whitened space of a tied model: :math:`y = (x - c)\,U`.

    Twin of :func:`fastem._kernels.whiten.whiten_rows`.
    """
    return (np.asarray(X, dtype=np.float64) - centre) @ prec_chol


def pooled_tied_statistics(nk, sy, shift_y, prec_chol, centre, total_scatter):
    r"""First moments and pooled scatter of a tied model from whitened statistics.

    With :math:`s_k = s^{(y)}_k U^{-1}` and :math:`\delta_k = m_k U^{-1}`:

    .. math::

        \sum_k S_k = S_c - \sum_k\big(\delta_k s_k^T + s_k\delta_k^T
        + N_k\delta_k\delta_k^T\big)

    around the shifts :math:`c + \delta_k`. Twin of
    :func:`fastem._kernels.whiten.pooled_tied_statistics`.

    Returns
    -------
    sx (K, D), shift (K, D), pooled (1, D, D)
    """
    inverse = np.linalg.inv(prec_chol)
    sx = sy @ inverse
    delta = shift_y @ inverse
    outer = np.einsum("ki,kj->ij", delta, sx)
    pooled = (total_scatter[0] - outer - outer.T
              - np.einsum("k,ki,kj->ij", nk, delta, delta))
    return sx, centre + delta, pooled[None]
