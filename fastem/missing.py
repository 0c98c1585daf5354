"""Data with missing values: EM on the observed entries themselves.

Entries that are NaN are taken as missing at random. The E-step uses each
row's marginal density over its observed coordinates, and the statistics add
the conditional expectation of the missing coordinates and their conditional
covariance (Ghahramani & Jordan 1994; the kernel is
:mod:`fastem._kernels.missing`), so the M-step — any of them — sees the
expected complete-data statistics and EM maximises the observed-data
likelihood, which never decreases.

:class:`MissingPatterns` sorts the rows by their pattern of observed
coordinates once, so that each observed block is factorised once per pattern
and component; :class:`MissingValueSource` is the statistics source for the
EM driver; :func:`log_responsibilities` and :func:`impute` serve predictions
and imputation. Rows with every entry missing carry no information: they are
left out of the fit (and counted), and their predictions are the mixture
weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._kernels import kernel_module
from ._kernels.chunks import n_chunks_for
from ._threads import run_chunks
from .stats import GaussianParameters, GaussianStatistics

kernel = kernel_module("missing")

MISSING_OPTIONS = ("error", "em")


@dataclass(frozen=True)
class MissingPatterns:
    """Rows of a data set with NaN, sorted by their pattern of observed coordinates.

    Attributes
    ----------
    X : ndarray (n, D), float64
        The rows with at least one observed entry, in pattern order.
    rows : ndarray (n,) of int
        Their indices in the original data.
    pattern : ndarray (n,) of int32
        Each row's pattern (non-decreasing).
    observed : ndarray (P, D) of int32
        Per pattern, its observed coordinates (``n_observed[p]`` of them, in
        increasing order), then its missing ones.
    n_observed : ndarray (P,) of int32
    empty_rows : ndarray of int
        Rows with every entry missing (not in ``X``).
    """

    X: np.ndarray
    rows: np.ndarray
    pattern: np.ndarray
    observed: np.ndarray
    n_observed: np.ndarray
    empty_rows: np.ndarray

    @classmethod
    def of(cls, X) -> MissingPatterns:
        X = np.asarray(X, dtype=np.float64)
        missing = np.isnan(X)
        empty = missing.all(axis=1)
        kept = np.flatnonzero(~empty)
        keys, pattern = np.unique(missing[kept], axis=0, return_inverse=True)
        pattern = pattern.reshape(-1)
        order = np.argsort(pattern, kind="stable")
        n_features = X.shape[1]
        observed = np.empty((keys.shape[0], n_features), dtype=np.int32)
        for p, key in enumerate(keys):
            observed[p] = np.concatenate([np.flatnonzero(~key), np.flatnonzero(key)])
        rows = kept[order]
        return cls(np.ascontiguousarray(X[rows]), rows, pattern[order].astype(np.int32),
                   observed, (~keys).sum(axis=1).astype(np.int32), np.flatnonzero(empty))

    @property
    def n_patterns(self) -> int:
        return self.observed.shape[0]


def mean_filled(X) -> np.ndarray:
    """``X`` with every NaN set to its column's observed mean: what the
    starts (k-means, the hierarchy) of data with missing values run on.

    Raises ValueError when a column has no observed value.
    """
    observed = ~np.isnan(X)
    counts = observed.sum(axis=0)
    if np.any(counts == 0):
        raise ValueError(f"column(s) {np.flatnonzero(counts == 0).tolist()} of X have no "
                         "observed value")
    column_means = np.where(observed, X, 0.0).sum(axis=0, dtype=np.float64) / counts
    return np.where(observed, X, column_means.astype(X.dtype))


def observed_moments(X, sample_weight=None) -> tuple[np.ndarray, np.ndarray]:
    r"""Mean and covariance of data with NaN (for a prior's defaults): the
    observed mean of every column; off the diagonal the covariance of the
    mean-filled rows, on it every column's observed variance (denominator
    :math:`\sum w - 1`). Raising the diagonal keeps the matrix positive
    semi-definite; the filled rows alone would shrink each variance by about
    the column's observed fraction."""
    from .priors import data_moments

    X = np.asarray(X, dtype=np.float64)
    mean, cov = data_moments(mean_filled(X), sample_weight)
    observed = ~np.isnan(X)
    w = np.ones(X.shape[0]) if sample_weight is None else np.asarray(sample_weight, float)
    weights = np.where(observed, w[:, None], 0.0)
    totals = weights.sum(axis=0)
    squares = np.where(observed, (X - mean) ** 2, 0.0)
    variances = (weights * squares).sum(axis=0) / np.maximum(totals - 1.0, 1e-300)
    cov = cov.copy()
    cov[np.arange(X.shape[1]), np.arange(X.shape[1])] = np.maximum(np.diag(cov), variances)
    return mean, cov


def full_covariances(params: GaussianParameters, covariance_type: str) -> np.ndarray:
    """Every component's covariance as a (K, D, D) matrix."""
    means = np.asarray(params.means, dtype=np.float64)
    n_components, n_features = means.shape
    cov = np.asarray(params.covariances, dtype=np.float64)
    if covariance_type == "full":
        return np.ascontiguousarray(cov)
    if covariance_type == "tied":
        return np.ascontiguousarray(np.broadcast_to(cov, (n_components, n_features, n_features)))
    diagonal = np.broadcast_to(cov[:, None] if covariance_type == "spherical" else cov,
                               (n_components, n_features))
    out = np.zeros((n_components, n_features, n_features))
    out[:, np.arange(n_features), np.arange(n_features)] = diagonal
    return out


def _pass(mode, patterns: MissingPatterns, weights, params, covariance_type, out):
    means = np.ascontiguousarray(params.means, dtype=np.float64)
    n_components, n_features = means.shape
    n_samples = patterns.X.shape[0]
    with np.errstate(divide="ignore"):
        log_weights = np.log(np.asarray(params.weights, dtype=np.float64))
    statistics = mode == kernel.MODE_STATISTICS
    n_chunks = n_chunks_for(n_samples, n_components * n_features * n_features)
    slots = (n_chunks, n_components) if statistics else (0, 0)
    nk = np.zeros(slots)
    sx = np.zeros(slots + ((n_features,) if statistics else (0,)))
    sxx = np.zeros(slots + ((n_features, n_features) if statistics else (0, 0)))
    loglik = np.zeros(n_chunks)
    worst = np.full(n_chunks, np.inf)
    worst_index = np.zeros(n_chunks, dtype=np.int64)
    log_norm = np.empty(n_samples if mode == kernel.MODE_LOG_RESP else 0)
    work = n_samples * n_components * (n_features + 1) ** 2
    run_chunks(kernel.missing_pass, n_chunks, work, n_chunks, mode, patterns.X,
               np.empty(0) if weights is None else weights, patterns.pattern,
               patterns.observed, patterns.n_observed, means,
               full_covariances(params, covariance_type), log_weights, nk, sx, sxx, loglik,
               worst, worst_index, out, log_norm)
    return nk, sx, sxx, loglik, worst, worst_index, log_norm


class MissingValueSource:
    """Statistics of data with missing values (NaN), for the EM driver.

    Parameters
    ----------
    X : ndarray (N, D) with NaN for missing entries
    sample_weight : ndarray (N,) or None
    covariance_type : str
        'full' and 'tied' keep the full second moments; 'diag' and
        'spherical' their diagonal (what those M-steps read).

    Attributes
    ----------
    patterns : MissingPatterns
    fill : ndarray (D,)
        The observed mean of every column: what the worst-explained row's
        missing entries are given when a collapsed component is re-seeded there.
    """

    def __init__(self, X, sample_weight, covariance_type: str):
        self.patterns = MissingPatterns.of(X)
        self.covariance_type = covariance_type
        rows = self.patterns.rows
        self.weights = None if sample_weight is None else np.ascontiguousarray(
            np.asarray(sample_weight, dtype=np.float64)[rows])
        observed = ~np.isnan(self.patterns.X)
        counts = observed.sum(axis=0)
        totals = np.where(observed, self.patterns.X, 0.0).sum(axis=0)
        self.fill = np.divide(totals, counts, out=np.zeros_like(totals), where=counts > 0)
        self.weight = float(rows.size if self.weights is None else self.weights.sum())
        counts = self.patterns.n_observed[self.patterns.pattern].astype(np.float64)
        # Average observed coordinates per row (weighted): the D of the
        # log-density shift of rescaled data (fastem.scaling).
        self.mean_observed = float(
            (counts.mean() if self.weights is None
             else counts @ self.weights / max(self.weight, 1e-300)) if rows.size else 0.0)

    def statistics(self, params: GaussianParameters) -> GaussianStatistics:
        nk, sx, sxx, loglik, worst, worst_index, _ = _pass(
            kernel.MODE_STATISTICS, self.patterns, self.weights, params,
            self.covariance_type, np.empty((0, 0)))
        # Chunk slots reduced in chunk order (fixed by the data's shape).
        nk, sx, sxx = nk.sum(axis=0), sx.sum(axis=0), sxx.sum(axis=0)
        if self.covariance_type in ("diag", "spherical"):
            sxx = np.ascontiguousarray(np.diagonal(sxx, axis1=1, axis2=2)[:, :, None])
        chunk = int(np.argmin(worst))
        point = self.patterns.X[worst_index[chunk]].copy()
        point[np.isnan(point)] = self.fill[np.isnan(point)]
        return GaussianStatistics(nk, sx, sxx, np.asarray(params.means, dtype=np.float64),
                                  float(loglik.sum()), self.weight, float(worst[chunk]),
                                  point, float(self.patterns.X.shape[0]))


def log_responsibilities(X, params: GaussianParameters, covariance_type: str):
    """Per-row log p(x_obs) and (N, K) log-responsibilities of data with NaN.

    A row with nothing observed has log p = 0 and the mixture weights as
    responsibilities.
    """
    patterns = MissingPatterns.of(X)
    n_components = np.shape(params.weights)[0]
    out = np.empty((patterns.X.shape[0], n_components))
    *_, log_norm = _pass(kernel.MODE_LOG_RESP, patterns, None, params, covariance_type, out)
    log_resp = np.empty((np.shape(X)[0], n_components))
    norm = np.zeros(np.shape(X)[0])
    log_resp[patterns.rows], norm[patterns.rows] = out, log_norm
    with np.errstate(divide="ignore"):
        log_resp[patterns.empty_rows] = np.log(np.asarray(params.weights, dtype=np.float64))
    return log_resp, norm


def impute(X, params: GaussianParameters, covariance_type: str, n_draws: int | None = None,
           random_state=None) -> np.ndarray:
    r"""Fill the NaN entries of ``X`` under a fitted mixture.

    Without ``n_draws``: the conditional mean
    :math:`E[x_m | x_o] = \sum_k r_k(x_o)\,(\mu_{k,m}
    + \Sigma_{k,mo}\Sigma_{k,oo}^{-1}(x_o - \mu_{k,o}))`,
    the components mixed by their posterior given the observed entries.
    With ``n_draws = m``: an (m, N, D) array of m multiple imputations, each
    drawing a component from the posterior and then
    :math:`x_m \sim N(\hat x_{k,m}, \Sigma_{k,mm} - \Sigma_{k,mo}\Sigma_{k,oo}^{-1}\Sigma_{k,om})`.
    """
    X = np.asarray(X, dtype=np.float64)
    patterns = MissingPatterns.of(X)
    filled = X.copy()
    if n_draws is None:
        out = np.empty_like(patterns.X)
        _pass(kernel.MODE_IMPUTE, patterns, None, params, covariance_type, out)
        filled[patterns.rows] = out
        filled[patterns.empty_rows] = np.asarray(params.weights) @ np.asarray(params.means)
        return filled
    return _draws(X, patterns, params, covariance_type, int(n_draws), random_state)


def _draws(X, patterns: MissingPatterns, params, covariance_type, n_draws, random_state):
    from sklearn.utils import check_random_state

    rng = check_random_state(random_state)
    log_resp, _ = log_responsibilities(X, params, covariance_type)
    resp = np.exp(log_resp)
    means = np.asarray(params.means, dtype=np.float64)
    cov = full_covariances(params, covariance_type)
    n_components = means.shape[0]
    draws = np.repeat(X[None], n_draws, axis=0)
    missing = np.isnan(X)
    # Row by row is fine here: imputation is not the hot path of a fit.
    for i in np.flatnonzero(missing.any(axis=1)):
        m, o = missing[i], ~missing[i]
        cumulative = np.cumsum(resp[i])
        for d in range(n_draws):
            k = min(int(np.searchsorted(cumulative, rng.random_sample() * cumulative[-1])),
                    n_components - 1)
            S = cov[k]
            if o.any():
                gain = np.linalg.solve(S[np.ix_(o, o)], S[np.ix_(o, m)]).T
                centre = means[k, m] + gain @ (X[i, o] - means[k, o])
                spread = S[np.ix_(m, m)] - gain @ S[np.ix_(o, m)]
            else:
                centre, spread = means[k, m], S[np.ix_(m, m)]
            draws[d, i, m] = rng.multivariate_normal(centre, 0.5 * (spread + spread.T))
    return draws


__all__ = ["MISSING_OPTIONS", "MissingPatterns", "MissingValueSource", "full_covariances",
           "impute", "log_responsibilities", "mean_filled", "observed_moments"]
