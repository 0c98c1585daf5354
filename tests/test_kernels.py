"""Every Numba kernel against its pure-NumPy twin in fastem.reference (float64, 1e-10)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import COVARIANCE_TYPES, make_mixture, random_parameters

from fastem import reference
from fastem._kernels.whiten import pooled_tied_statistics, whiten_rows
from fastem.initialization import column_mean, kmeans_plusplus_from_draws, lloyd
from fastem.stats import (
    GaussianParameters,
    e_step_statistics,
    label_statistics_of,
    log_responsibilities,
    m_step,
    whitened_statistics,
    whitening_of,
)

RTOL = 1e-10


def assert_close(actual, expected, rtol=RTOL, what="", scale=None):
    """Max error relative to the largest expected entry (or to ``scale``, for
    sums whose terms cancel)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if scale is None:
        scale = max(np.abs(expected).max(), 1e-300)
    err = np.abs(actual - expected).max() / scale
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


PROBLEMS = [
    # (n_samples, n_features, n_components): block edges, D=1, larger D
    (777, 3, 4),
    (256, 1, 2),
    (1000, 7, 3),
    (90, 40, 2),
    (2500, 30, 2),  # BLAS engine over several 1024-row blocks and chunks
]


@pytest.fixture(params=PROBLEMS, ids=lambda p: "N{}-D{}-K{}".format(*p))
def problem(request):
    n, d, k = request.param
    return make_mixture(n, d, k, seed=n + d), k


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_log_responsibilities_match_reference(problem, covariance_type):
    X, k = problem
    w, means, cov, pc = random_parameters(X, k, covariance_type)
    log_resp, log_norm = log_responsibilities(X, GaussianParameters(w, means, cov, pc),
                                              covariance_type)
    ref_norm, ref_resp = reference.log_responsibilities(X, w, means, pc, covariance_type)
    assert_close(log_norm, ref_norm, what="log p(x)")
    assert_close(np.exp(log_resp), np.exp(ref_resp), what="responsibilities")
    # Far components: the logs stay finite where the probabilities underflow.
    finite = np.isfinite(ref_resp)
    assert_close(log_resp[finite], ref_resp[finite], scale=np.abs(ref_resp[finite]).max() + 1,
                 what="log-responsibilities")
    resp, norm_again = log_responsibilities(X, GaussianParameters(w, means, cov, pc),
                                            covariance_type, probabilities=True)
    assert_close(resp, np.exp(ref_resp), what="responsibilities (probabilities=True)")
    np.testing.assert_array_equal(norm_again, log_norm)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_fused_statistics_match_reference(problem, covariance_type, weighted):
    X, k = problem
    sw = np.random.default_rng(1).uniform(0.0, 3.0, X.shape[0]) if weighted else None
    w, means, cov, pc = random_parameters(X, k, covariance_type)
    stats = e_step_statistics(X, sw, GaussianParameters(w, means, cov, pc), covariance_type)
    ref_norm, ref_resp = reference.log_responsibilities(X, w, means, pc, covariance_type)
    nk, sx, sxx = reference.sufficient_statistics(X, np.exp(ref_resp), means, covariance_type, sw)
    assert_close(stats.nk, nk, what="N_k")
    # s_k = sum r (x - mu_k) nearly cancels when mu_k is close to the weighted
    # mean: compare against the size of its terms, sum r |x - mu_k|.
    terms = np.sqrt(np.abs(sxx.reshape(k, X.shape[1], -1)).max() * nk.max())
    assert_close(stats.sx, sx, what="s_k", scale=terms)
    assert_close(stats.sxx.reshape(sxx.shape), sxx, what="S_k")
    expected_ll = ref_norm.sum() if sw is None else ref_norm @ sw
    assert_close(stats.loglik, expected_ll, what="log-likelihood")
    worst = np.argmin(np.where(sw == 0, np.inf, ref_norm) if weighted else ref_norm)
    np.testing.assert_array_equal(stats.worst_point, X[worst])


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_m_step_matches_two_pass_reference(problem, covariance_type):
    X, k = problem
    w, means, cov, pc = random_parameters(X, k, covariance_type, seed=3)
    stats = e_step_statistics(X, None, GaussianParameters(w, means, cov, pc), covariance_type)
    params, jitter = m_step(stats, 1e-6, covariance_type)
    _, ref_resp = reference.log_responsibilities(X, w, means, pc, covariance_type)
    nk, ref_means, ref_cov = reference.estimate_parameters(X, np.exp(ref_resp), 1e-6,
                                                          covariance_type)
    assert not np.any(jitter)
    assert_close(params.weights, nk / nk.sum(), what="weights")
    assert_close(params.means, ref_means, what="means")
    assert_close(params.covariances, ref_cov, what="covariances")
    assert_close(params.precisions_cholesky,
                 reference.precision_cholesky(ref_cov, covariance_type),
                 what="precision Cholesky")
    # The statistics-only reference M-step agrees as well.
    ref = reference.m_step(stats.nk, stats.sx, stats.sxx.reshape(
        (k,) + (X.shape[1],) * (2 if covariance_type in ("full", "tied") else 1)),
        stats.shift, 1e-6, covariance_type)
    assert_close(params.covariances, ref[2], what="reference m_step")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_label_statistics_match_reference(problem, covariance_type):
    X, k = problem
    rng = np.random.default_rng(5)
    labels = rng.integers(-1, k, size=X.shape[0])
    shift = rng.normal(size=(k, X.shape[1]))
    stats = label_statistics_of(X, None, labels, shift, covariance_type)
    nk, sx, sxx = reference.statistics_from_labels(X, labels, shift, k, covariance_type)
    assert_close(stats.nk, nk, what="N_k")
    assert_close(stats.sx, sx, what="s_k")
    assert_close(stats.sxx.reshape(sxx.shape), sxx, what="S_k")


def _lane_sums_of_one_hot(X, weights, labels, shift, full, n_chunks):
    """The loop engines' statistics pass with one-hot responsibilities,
    emulated in float64: per chunk (its rows in one pass block, below 1,024),
    lane ``row mod 8`` adds w d (one rounding) and (w d_i) d_j (a fused
    multiply-add, rounded once through fractions) in row order; the lanes are
    added as ``simd.vsum`` adds them (halves, in turn); chunks in order."""
    from fractions import Fraction

    from fastem._kernels.chunks import BLOCK_ROWS

    def fma(a, b, c):
        return float(Fraction(a) * Fraction(b) + Fraction(c))

    def tree(lanes):
        while len(lanes) > 1:
            half = len(lanes) // 2
            lanes = [lanes[i] + lanes[i + half] for i in range(half)]
        return lanes[0]

    k_count, n_features = shift.shape
    nk, sx = np.zeros(k_count), np.zeros((k_count, n_features))
    sxx = np.zeros((k_count, n_features, n_features))
    n_blocks = -(-X.shape[0] // BLOCK_ROWS)
    for c in range(n_chunks):
        first = c * n_blocks // n_chunks * BLOCK_ROWS
        last = min(X.shape[0], (c + 1) * n_blocks // n_chunks * BLOCK_ROWS)
        assert last - first <= 1024  # one pass block
        for k in range(k_count):
            a_nk = [0.0] * 8
            a_sx = [[0.0] * 8 for _ in range(n_features)]
            a_sxx = [[[0.0] * 8 for _ in range(n_features)] for _ in range(n_features)]
            for n in range(first, last):
                if labels[n] != k:
                    continue
                lane = (n - first) % 8
                d = X[n] - shift[k]
                wd = weights[n] * d
                a_nk[lane] += weights[n]
                for i in range(n_features):
                    a_sx[i][lane] += wd[i]
                    for j in range(i, n_features if full else i + 1):
                        a_sxx[i][j][lane] = fma(wd[i], d[j], a_sxx[i][j][lane])
            nk[k] += tree(a_nk)
            for i in range(n_features):
                sx[k, i] += tree(a_sx[i])
                for j in range(i, n_features if full else i + 1):
                    sxx[k, i, j] += tree(a_sxx[i][j])
    if full:
        lower = np.tril_indices(n_features, -1)
        sxx[:, lower[0], lower[1]] = sxx[:, lower[1], lower[0]]
        return nk, sx, sxx
    return nk, sx, np.diagonal(sxx, axis1=1, axis2=2)[:, :, None]


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_label_statistics_have_the_bits_of_one_hot_sums(covariance_type):
    # The loop engines' sums, lane by lane, for one-hot responsibilities, bit
    # for bit (emulated), with labels -1, zero weights and a component
    # without rows.
    from fastem.stats import statistics_chunks

    rng = np.random.default_rng(11)
    X = make_mixture(1300, 3, 3, seed=4)
    labels = rng.integers(-1, 3, size=X.shape[0]).astype(np.int32)  # 3 of 4: none for k=3
    weights = rng.uniform(0.0, 2.0, size=X.shape[0])
    weights[::9] = 0.0
    shift = rng.normal(size=(4, 3))
    stats = label_statistics_of(X, weights, labels, shift, covariance_type)
    n_chunks = statistics_chunks(X.shape[0], 4, 3, covariance_type)
    nk, sx, sxx = _lane_sums_of_one_hot(X, weights, labels, shift, covariance_type == "full",
                                        n_chunks)
    np.testing.assert_array_equal(stats.nk, nk)
    np.testing.assert_array_equal(stats.sx, sx)
    np.testing.assert_array_equal(stats.sxx, sxx)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("k", [2, 3, 6])
def test_weighted_label_statistics_match_reference(k, dtype):
    # Several blocks, rows of no component (-1), a component with no rows,
    # and sample weights.
    rng = np.random.default_rng(k)
    X = make_mixture(2600, 5, 3, seed=k).astype(dtype)
    labels = rng.integers(-1, k - 1, size=X.shape[0]).astype(np.int32)  # k - 1: empty
    weights = rng.uniform(0.0, 3.0, size=X.shape[0])
    shift = rng.normal(size=(k, X.shape[1]))
    stats = label_statistics_of(X, weights, labels, shift, "full")
    nk, sx, sxx = reference.statistics_from_labels(X.astype(np.float64), labels, shift, k,
                                                   "full", sample_weight=weights)
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    assert stats.nk[k - 1] == 0.0 and not np.any(stats.sxx[k - 1])
    assert_close(stats.nk, nk, rtol=rtol, what="N_k")
    assert_close(stats.sx, sx, rtol=rtol, what="s_k")
    assert_close(stats.sxx.reshape(sxx.shape), sxx, rtol=rtol, what="S_k")


@pytest.mark.parametrize("n", [1, 255, 256, 257, 3001])
@pytest.mark.parametrize("weighted", [False, True])
def test_draw_by_mass_matches_blocked_cumulative_search(n, weighted):
    from fastem.initialization import BLOCK_ROWS, draw_by_mass

    rng = np.random.default_rng(n)
    mass = rng.exponential(size=n) * (rng.uniform(size=n) < 0.7)  # with zero masses
    mass[-1] += 0.5
    weights = rng.uniform(0.0, 2.0, size=n) if weighted else np.empty(0)
    m = mass * weights if weighted else mass
    cumulative, total = reference.blocked_cumulative_mass(m)
    # Draws anywhere, at the exact cumulative values, and at both ends.
    fractions = np.concatenate([rng.uniform(size=40), cumulative[::97] / total, [0.0, 1 - 1e-17]])
    expected = np.minimum(np.searchsorted(cumulative, fractions * total, side="right"), n - 1)
    drawn = draw_by_mass(mass, weights, fractions)
    np.testing.assert_array_equal(drawn, expected)
    # With the block sums handed over by the pass that computed the masses.
    blocks = np.array([m[i:i + BLOCK_ROWS].cumsum()[-1] for i in range(0, n, BLOCK_ROWS)])
    drawn = draw_by_mass(mass, weights, fractions, blocks)
    np.testing.assert_array_equal(drawn, expected)
    # With a pending centre p: masses w min(mass, |s x - s p|^2) (distances
    # added feature by feature in order), float32 rows read in float64.
    X = (rng.normal(size=(n, 2)) * 2.0).astype(np.float32)
    pending = rng.normal(size=(1, 2))
    x = X.astype(np.float64) * 0.5
    distance = (x[:, 0] - pending[0, 0] * 0.5) ** 2 + (x[:, 1] - pending[0, 1] * 0.5) ** 2
    updated = np.minimum(mass, distance)
    m = updated * weights if weighted else updated
    cumulative, total = reference.blocked_cumulative_mass(m)
    expected = np.minimum(np.searchsorted(cumulative, fractions * total, side="right"), n - 1)
    blocks = np.array([m[i:i + BLOCK_ROWS].cumsum()[-1] for i in range(0, n, BLOCK_ROWS)])
    drawn = draw_by_mass(mass, weights, fractions, blocks, X, pending, 0.5)
    np.testing.assert_array_equal(drawn, expected)


@pytest.mark.parametrize("weighted", [False, True])
def test_kmeans_plusplus_matches_reference(problem, weighted):
    X, k = problem
    rng = np.random.default_rng(7)
    sw = rng.uniform(0.5, 2.0, X.shape[0]) if weighted else None
    uniforms = rng.uniform(size=(k - 1, 2 + int(np.log(k))))
    centers, idx = kmeans_plusplus_from_draws(X, k, uniforms, 11, sw)
    ref_centers, ref_idx = reference.kmeans_plusplus(X, k, uniforms, 11, sample_weight=sw)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(centers, ref_centers)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n_candidates, weighted, scale",
                         [(1, False, 1.0), (3, True, 1.0), (9, False, 0.125), (17, True, 4.0)])
def test_candidate_potentials_sum_each_candidate_as_the_scalar_loop(dtype, n_candidates,
                                                                     weighted, scale):
    # The kernel takes W candidates per vector; every lane must add the same
    # rounded terms in the same order as a plain loop over rows and features:
    # d = (((s x_0 - s c_0)^2 + (s x_1 - s c_1)^2) + ...), then
    # parts[c, t] = ((w_0 min(D_0, d_0) + w_1 min(D_1, d_1)) + ...) per chunk.
    from fastem._kernels import kmeans
    from fastem._kernels.chunks import BLOCK_ROWS
    rng = np.random.default_rng(n_candidates)
    n, n_features, n_chunks = 3 * BLOCK_ROWS + 17, 5, 3
    X = (rng.normal(size=(n, n_features)) * [1, 10, 0.1, 3, 1]).astype(dtype)
    weights = rng.uniform(0.1, 2.0, n) if weighted else np.empty(0)
    candidates = X[rng.integers(0, n, n_candidates)].astype(np.float64)
    closest = rng.uniform(0, 20, n)
    x = X.astype(np.float64) * scale
    w = weights if weighted else np.ones(n)

    def distance_to(centre):
        distance = np.zeros(n)
        for d in range(n_features):
            distance = distance + (x[:, d] - centre[d] * scale) ** 2
        return distance

    n_blocks = -(-n // BLOCK_ROWS)
    for n_pending in (0, 1):
        # A pending centre (lane 0) is first taken into closest.
        pending = X[rng.integers(0, n, n_pending)].astype(np.float64)
        targets = np.concatenate([pending, candidates])
        updated = closest.copy()
        parts = np.zeros((n_chunks, targets.shape[0]))
        block_parts = np.full((n_blocks, targets.shape[0]), np.nan)
        kmeans.candidate_potentials(0, n_chunks, n_chunks, X, weights, targets, n_pending,
                                    scale, updated, parts, block_parts)
        expected = np.minimum(closest, distance_to(pending[0])) if n_pending else closest
        np.testing.assert_array_equal(updated, expected)
        for c in range(n_chunks):
            rows = slice(c * n_blocks // n_chunks * BLOCK_ROWS,
                         min(n, (c + 1) * n_blocks // n_chunks * BLOCK_ROWS))
            for t in range(n_candidates):
                terms = w * np.minimum(expected, distance_to(candidates[t]))
                assert parts[c, n_pending + t] == np.cumsum(terms[rows])[-1], (c, t)
        # Block by block: the block masses update_closest would give for c_t.
        for t in range(n_candidates):
            terms = w * np.minimum(expected, distance_to(candidates[t]))
            blocks = [np.cumsum(terms[i:i + BLOCK_ROWS])[-1] for i in range(0, n, BLOCK_ROWS)]
            np.testing.assert_array_equal(block_parts[:, n_pending + t], blocks)


@pytest.mark.parametrize("shape", [(2, 2), (1000, 3), (4099, 10), (257, 64)])
def test_column_scan_reads_numpys_mean_and_the_largest_coordinate(shape):
    # One pass for the k-means start: X.mean(axis=0) bit for bit, the mean
    # squares and max|X|; None where a sum is not finite, for the usual means.
    from fastem.initialization import scan_columns

    rng = np.random.default_rng(shape[0])
    X = rng.standard_normal(shape) * 7 + 1e4
    X[shape[0] // 2, -1] = -3e4  # the largest magnitude, negative
    scan = scan_columns(X)
    np.testing.assert_array_equal(scan.mean, X.mean(axis=0))
    np.testing.assert_allclose(scan.mean_square, (X ** 2).mean(axis=0), rtol=1e-12)
    assert scan.largest == 3e4
    for bad in (np.nan, np.inf, -np.inf, 1e200):  # 1e200: the squares overflow
        Y = X.copy()
        Y[-1, 0] = bad
        assert scan_columns(Y) is None
    assert scan_columns(X.astype(np.float32)) is None
    assert scan_columns(np.asfortranarray(X)) is None


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(2, 2), (1000, 3), (4099, 10), (257, 64), (3, 500)])
def test_column_mean_has_numpys_bits(shape, dtype):
    # Lloyd centres the rows on X.mean(axis=0) as scikit-learn's k-means does;
    # the kernel's sums must give exactly NumPy's mean, not just a close one.
    X = (np.random.default_rng(3).standard_normal(shape) * 7 + 1e4).astype(dtype)
    mean = column_mean(X)
    assert mean.dtype == dtype
    np.testing.assert_array_equal(mean, X.mean(axis=0))
    # NumPy's own mean where the kernel's order would differ (one column: pairwise).
    np.testing.assert_array_equal(column_mean(X[:, :1].copy()), X[:, :1].mean(axis=0))


@pytest.mark.parametrize("case", ["separated", "offset", "tiny", "weighted", "stops_on_tol"])
def test_lloyd_tolerance_bound_changes_no_decision(case, monkeypatch):
    # Lloyd reads the variances (for tol) only once a shift comes near the
    # bound from the mean squares; every decision must be the exact rule's.
    import fastem.initialization as init

    if case == "separated":
        X = np.random.default_rng(3).normal(size=(3000, 4)) + 40.0 * np.repeat(np.eye(4), 750, 0)
    else:  # overlapping: Lloyd runs a dozen iterations, some with small shifts
        X = make_mixture(3000, 4, 4, seed=3)
    weights, tol = None, 1e-4
    if case == "offset":
        X = X + 1e6
    elif case == "tiny":
        X = X * 1e-200
    elif case == "weighted":
        weights = np.random.default_rng(0).uniform(0.5, 2.0, X.shape[0])
    elif case == "stops_on_tol":
        tol = 0.5
    seeds = X[[0, 800, 1600, 2400]]  # separated: one in each cluster
    exact_calls = []
    variance = init.column_variance
    monkeypatch.setattr(init, "column_variance",
                        lambda *a, **k: exact_calls.append(1) or variance(*a, **k))
    labels, centers, _, n_iter = lloyd(X, seeds, weights, tol=tol, inertia=False)
    calls = len(exact_calls)
    monkeypatch.setattr(init._LloydTolerance, "reached",
                        lambda self, shift: shift <= self._tol * variance(*self._args).mean())
    exact = lloyd(X, seeds, weights, tol=tol, inertia=False)
    np.testing.assert_array_equal(labels, exact[0])
    np.testing.assert_array_equal(centers, exact[1])
    assert n_iter == exact[3]
    if case == "separated":
        assert calls == 0  # the large shifts of the first iterations need no variance
    if case == "stops_on_tol":
        assert n_iter < lloyd(X, seeds, tol=0.0, inertia=False)[3]


def test_lloyd_matches_reference():
    X = make_mixture(900, 4, 5, seed=2)
    centers0 = X[[0, 10, 20, 30, 40]]
    labels, centers, inertia, n_iter = lloyd(X, centers0)
    ref_labels, ref_centers, ref_inertia, ref_iter = reference.lloyd(X, centers0)
    np.testing.assert_array_equal(labels, ref_labels)
    assert n_iter == ref_iter
    assert_close(centers, ref_centers, what="centres")
    assert_close(inertia, ref_inertia, what="inertia")


@pytest.mark.parametrize("tol", [1e-4, 0.0])  # stops on a small shift, or when settled
def test_lloyd_labels_and_inertia_are_those_of_its_final_centres(tol):
    X = make_mixture(2000, 3, 4, seed=9)
    labels, centers, inertia, n_iter = lloyd(X, X[[0, 1, 2, 3]], tol=tol)
    distances = ((X[:, None, :] - centers[None]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(labels, distances.argmin(axis=1))
    assert_close(inertia, distances.min(axis=1).sum(), what="inertia")
    if tol == 0.0:
        assert n_iter > 1
    # Without the inertia (as the fits run it): the same iterations, bit for bit.
    bare_labels, bare_centers, none, bare_iter = lloyd(X, X[[0, 1, 2, 3]], tol=tol,
                                                       inertia=False)
    assert none is None and bare_iter == n_iter
    np.testing.assert_array_equal(bare_labels, labels)
    np.testing.assert_array_equal(bare_centers, centers)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_column_moments_match_reference(weighted, dtype):
    from fastem.initialization import _column_moments, column_variance

    rng = np.random.default_rng(5)
    X = (rng.normal(size=(3000, 7)) * [1, 10, 0.1, 1e3, 1, 1, 1] + 50).astype(dtype)
    sw = rng.uniform(0.2, 3.0, 3000) if weighted else None
    centre = rng.normal(size=7)
    first, second = _column_moments(X, sw, centre, 0.25)
    ref_first, ref_second = reference.column_moments(X, centre, 0.25, sw)
    np.testing.assert_allclose(first, ref_first, rtol=1e-12)
    np.testing.assert_allclose(second, ref_second, rtol=1e-12)
    w = np.ones(3000) if sw is None else sw
    Z = X.astype(np.float64)
    mean = np.average(Z, axis=0, weights=w)
    expected = np.average((Z - mean) ** 2, axis=0, weights=w)
    np.testing.assert_allclose(column_variance(X, sw), expected, rtol=1e-10)
    np.testing.assert_allclose(column_variance(X, sw, 2.0, centre=2.0 * Z.mean(axis=0)),
                               4.0 * expected, rtol=1e-10)


def test_lloyd_refills_empty_clusters_like_reference():
    X = make_mixture(300, 2, 3, seed=4)
    far_away = X.max(axis=0) + 100.0
    centers0 = np.vstack([X[:2], far_away])  # the third centre starts empty
    labels, centers, _, _ = lloyd(X, centers0)
    ref_labels, ref_centers, _, _ = reference.lloyd(X, centers0)
    np.testing.assert_array_equal(labels, ref_labels)
    assert_close(centers, ref_centers, what="centres")
    assert np.bincount(labels, minlength=3).min() > 0


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_whole_fit_matches_reference(covariance_type):
    from fastem import GaussianMixture

    X = make_mixture(500, 3, 3, seed=9)
    w, means, cov, pc = random_parameters(X, 3, covariance_type, seed=2)
    ref = reference.em_fit(X, w, means, pc, covariance_type, tol=1e-6, max_iter=60)
    from conftest import precisions_from_cholesky

    gm = GaussianMixture(3, covariance_type=covariance_type, tol=1e-6, max_iter=60,
                         weights_init=w, means_init=means,
                         precisions_init=precisions_from_cholesky(pc, covariance_type))
    with np.errstate(all="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        gm.fit(X)
    assert gm.n_iter_ == ref["n_iter"]
    assert_close(gm.lower_bounds_, ref["lower_bounds"], what="lower bounds")
    assert_close(gm.means_, ref["means"], rtol=1e-9, what="means")
    assert_close(gm.covariances_, ref["covariances"], rtol=1e-9, what="covariances")
    assert_close(gm.weights_, ref["weights"], rtol=1e-9, what="weights")


def test_whiten_rows_matches_reference():
    X = make_mixture(700, 6, 3, seed=4) + 50.0
    _, _, _, pc = random_parameters(X, 3, "tied")
    centre = X.mean(axis=0) + 0.25
    out = np.empty_like(X)
    whiten_rows(0, 3, 3, X, centre, pc, out)
    assert_close(out, reference.whiten(X, centre, pc), what="whitened rows")
    # float32 rows: float64 accumulation, rounded once.
    X32 = X.astype(np.float32)
    out32 = np.empty_like(X32)
    whiten_rows(0, 1, 1, X32, centre, pc, out32)
    np.testing.assert_allclose(out32, reference.whiten(X32, centre, pc), rtol=1e-6, atol=1e-5)


def test_pooled_tied_statistics_kernel_matches_reference():
    rng = np.random.default_rng(2)
    k, d = 4, 5
    _, _, _, pc = random_parameters(make_mixture(300, d, k, seed=3), k, "tied")
    nk = rng.uniform(1.0, 50.0, k)
    sy, shift_y = rng.normal(size=(k, d)), rng.normal(size=(k, d))
    centre = rng.normal(size=d)
    total = rng.normal(size=(d, d))
    total = total @ total.T
    total = (0.5 * (total + total.T))[None]  # exactly symmetric, as the kernels' S_c
    got = pooled_tied_statistics(nk, sy, shift_y, pc, centre, total)
    want = reference.pooled_tied_statistics(nk, sy, shift_y, pc, centre, total)
    for name, a, b in zip(("sx", "shift", "pooled"), got, want):
        assert_close(a, b, what=name)
    np.testing.assert_array_equal(got[2][0], got[2][0].T)


@pytest.mark.parametrize("weighted", [False, True])
def test_whitened_statistics_match_reference(problem, weighted):
    """A tied model's statistics through whitened rows: the per-component
    reference statistics, their scatter summed, and the same M-step."""
    X, k = problem
    X = X + 20.0  # away from the origin: the centre must take care of it
    sw = np.random.default_rng(1).uniform(0.0, 3.0, X.shape[0]) if weighted else None
    w, means, cov, pc = random_parameters(X, k, "tied")
    params = GaussianParameters(w, means, cov, pc)
    stats = whitened_statistics(X, sw, params, whitening_of(X, sw))
    assert stats.is_pooled and stats.sxx.shape == (1, X.shape[1], X.shape[1])
    ref_norm, ref_resp = reference.log_responsibilities(X, w, means, pc, "tied")
    nk, sx, sxx = reference.sufficient_statistics(X, np.exp(ref_resp), stats.shift, "tied", sw)
    assert_close(stats.shift, means, what="shifts")
    assert_close(stats.nk, nk, what="N_k")
    terms = np.sqrt(np.abs(sxx).max() * nk.max())
    assert_close(stats.sx, sx, what="s_k", scale=terms)
    # The pooled scatter is a difference of the total scatter and the
    # components' terms: compared against the total's size.
    assert_close(stats.sxx[0], sxx.sum(axis=0), what="pooled S", scale=np.abs(sxx).sum(0).max()
                 * 1e2)
    expected_ll = ref_norm.sum() if sw is None else ref_norm @ sw
    assert_close(stats.loglik, expected_ll, what="log-likelihood")
    worst = np.argmin(np.where(sw == 0, np.inf, ref_norm) if weighted else ref_norm)
    np.testing.assert_array_equal(stats.worst_point, X[worst])
    params_w, _ = m_step(stats, 1e-6, "tied")
    _, ref_means, ref_cov = reference.estimate_parameters(X, np.exp(ref_resp), 1e-6, "tied", sw)
    assert_close(params_w.means, ref_means, what="means", rtol=1e-9)
    assert_close(params_w.covariances, ref_cov, what="tied covariance", rtol=1e-9)
    ref = reference.m_step(stats.nk, stats.sx, stats.sxx, stats.shift, 1e-6, "tied")
    assert_close(params_w.covariances, ref[2], what="reference m_step, pooled")


def test_whitened_float32_statistics_match_reference():
    X = make_mixture(900, 4, 3, seed=21)
    w, means, cov, pc = random_parameters(X, 3, "tied")
    X32 = X.astype(np.float32)
    stats = whitened_statistics(X32, None, GaussianParameters(w, means, cov, pc),
                                whitening_of(X32, None))
    X64 = X32.astype(np.float64)
    ref_norm, ref_resp = reference.log_responsibilities(X64, w, means, pc, "tied")
    nk, _, sxx = reference.sufficient_statistics(X64, np.exp(ref_resp), stats.shift, "tied")
    assert_close(stats.nk, nk, rtol=1e-5, what="N_k")
    assert_close(stats.sxx[0], sxx.sum(axis=0), rtol=1e-5, what="pooled S")
    assert_close(stats.loglik, ref_norm.sum(), rtol=1e-6, what="log-likelihood")


def test_pooled_statistics_add_and_recentre():
    """Pooled tied statistics of two halves add up to those of the whole,
    whatever their shifts, and a pooled and a per-component part add too."""
    X = make_mixture(400, 3, 2, seed=1)
    w, means, cov, pc = random_parameters(X, 2, "tied")
    params = GaussianParameters(w, means, cov, pc)

    def pooled(rows):
        rows = np.ascontiguousarray(rows)
        return whitened_statistics(rows, None, params, whitening_of(rows, None))

    whole = pooled(X)
    a, b = pooled(X[:150]), pooled(X[150:])
    per_component = e_step_statistics(np.ascontiguousarray(X[150:]), None, params, "tied")
    assert not per_component.is_pooled
    for other in (b.recentre(means + 1.0), per_component):
        both = a + other
        assert both.is_pooled
        assert_close(both.nk, whole.nk)
        assert_close(both.sx, whole.sx, scale=np.abs(whole.sxx).max())
        assert_close(both.sxx, whole.sxx)
        assert_close(m_step(both, 1e-6, "tied")[0].covariances,
                     m_step(whole, 1e-6, "tied")[0].covariances, rtol=1e-9)


def test_statistics_recentre_and_add():
    """Statistics of two halves, recentred and added, equal those of the whole."""
    X = make_mixture(400, 3, 2, seed=1)
    w, means, cov, pc = random_parameters(X, 2, "full")
    params = GaussianParameters(w, means, cov, pc)
    whole = e_step_statistics(X, None, params, "full")
    a = e_step_statistics(np.ascontiguousarray(X[:150]), None, params, "full")
    b = e_step_statistics(np.ascontiguousarray(X[150:]), None, params, "full")
    both = a + b.recentre(means + 1.0)  # a different shift is recentred on addition
    assert_close(both.nk, whole.nk)
    assert_close(both.sx, whole.sx)
    assert_close(both.sxx, whole.sxx)
    assert_close(both.loglik, whole.loglik)
    moved = whole.recentre(means - 3.0)
    assert_close(m_step(moved, 1e-6, "full")[0].covariances,
                 m_step(whole, 1e-6, "full")[0].covariances)


def test_chunk_ranges_split_differently_give_the_same_bits():
    """A pass run as one call or split at every chunk boundary writes the same slots:
    splitting work among threads changes who computes a chunk, never what."""
    from fastem import _threads
    from fastem.stats import GaussianParameters, e_step_statistics, log_responsibilities

    outs = []
    for X, covariance_type in ((make_mixture(3000, 3, 3, seed=12), "full"),
                               (make_mixture(3000, 30, 3, seed=13), "diag")):
        w, means, _, pc = random_parameters(X, 3, covariance_type)
        params = GaussianParameters(w, means, None, pc)
        runs = []
        for threads in (1, 2, 5):
            with _threads.limit(threads):
                saved = _threads.SERIAL_WORK
                _threads.SERIAL_WORK = 0  # split even this small problem
                try:
                    stats = e_step_statistics(X, None, params, covariance_type)
                    resp, norm = log_responsibilities(X, params, covariance_type,
                                                      probabilities=True)
                finally:
                    _threads.SERIAL_WORK = saved
            runs.append((stats.nk, stats.sx, stats.sxx, np.array(stats.loglik), resp, norm))
        outs.append(runs)
    for runs in outs:
        for other in runs[1:]:
            for u, v in zip(runs[0], other):
                np.testing.assert_array_equal(u, v)


def test_vectorised_exp_matches_numpy():
    from fastem._kernels._blocks import exp_nonpositive, exp_nonpositive32

    values = np.concatenate([-np.geomspace(1e-12, 800.0, 2000), [0.0, -np.inf, -708.5, -86.9]])
    offsets = np.zeros_like(values)
    out = np.empty_like(values)
    exp_nonpositive(values, offsets, out, np.empty(values.size, dtype=np.int64), values.size)
    expected = np.exp(values)
    normal = expected > 1e-300
    np.testing.assert_allclose(out[normal], expected[normal], rtol=4e-16)
    assert np.all(out[values < -708.0] == 0.0)
    v32 = values.astype(np.float32)
    out32 = np.empty_like(v32)
    exp_nonpositive32(v32, np.zeros_like(v32), out32, np.empty(v32.size, dtype=np.int32),
                      v32.size)
    expected32 = np.exp(v32.astype(np.float64))
    keep = expected32 > 1e-37
    np.testing.assert_allclose(out32[keep], expected32[keep], rtol=3e-7)
    assert np.all(out32[v32 < -87.0] == 0.0)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_statistics_match_reference(covariance_type):
    X = make_mixture(900, 4, 3, seed=21)
    w, means, cov, pc = random_parameters(X, 3, covariance_type)
    X32 = X.astype(np.float32)
    stats = e_step_statistics(X32, None, GaussianParameters(w, means, cov, pc), covariance_type)
    ref_norm, ref_resp = reference.log_responsibilities(X32.astype(np.float64), w, means, pc,
                                                        covariance_type)
    nk, _, sxx = reference.sufficient_statistics(X32.astype(np.float64), np.exp(ref_resp),
                                                 stats.shift, covariance_type)
    # float32 arithmetic: agreement to single precision, not 1e-10.
    assert_close(stats.nk, nk, rtol=1e-5, what="N_k")
    assert_close(stats.sxx.reshape(sxx.shape), sxx, rtol=1e-5, what="S_k")
    assert_close(stats.loglik, ref_norm.sum(), rtol=1e-6, what="log-likelihood")


def _separated_with_an_ambiguous_stretch(n_features=30, seed=3):
    """Six clusters: three far apart from everything (most responsibilities
    exactly zero) and three overlapping ones whose rows fill a contiguous
    stretch (blocks where half the responsibilities are non-zero)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=60.0, size=(6, n_features))
    centres[1:3] = centres[0] + rng.normal(scale=0.5, size=(2, n_features))
    labels = rng.integers(3, 6, size=3000)
    labels[1100:1700] = rng.integers(0, 3, size=600)
    X = centres[labels] + rng.normal(size=(labels.size, n_features))
    return X, np.eye(6)[labels]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_statistics_skipping_zero_responsibilities_match_reference(covariance_type, weighted,
                                                                   dtype):
    # The BLAS engines visit only non-zero responsibilities where a block has
    # few; blocks of the ambiguous stretch take the dense path. They compute
    # in float64 whatever X's type, so float32 rows match to 1e-10 as well.
    X, resp = _separated_with_an_ambiguous_stretch()
    X = X.astype(dtype).astype(np.float64)
    k = resp.shape[1]
    sw = np.random.default_rng(1).uniform(0.5, 2.0, X.shape[0]) if weighted else None
    nk, means, cov = reference.estimate_parameters(X, resp, 1e-6, covariance_type)
    pc = reference.precision_cholesky(cov, covariance_type)
    w = nk / nk.sum()
    stats = e_step_statistics(np.ascontiguousarray(X, dtype=dtype), sw,
                              GaussianParameters(w, means, cov, pc), covariance_type)
    ref_norm, ref_resp = reference.log_responsibilities(X, w, means, pc, covariance_type)
    ref_r = np.exp(ref_resp)
    block_density = [(ref_r[i:i + 256] != 0).mean() for i in range(0, X.shape[0], 256)]
    assert min(block_density) < 0.3 and max(block_density) > 0.4, block_density
    ref_nk, ref_sx, ref_sxx = reference.sufficient_statistics(X, ref_r, means, covariance_type,
                                                              sw)
    assert_close(stats.nk, ref_nk, what="N_k")
    terms = np.sqrt(np.abs(ref_sxx.reshape(k, X.shape[1], -1)).max() * ref_nk.max())
    assert_close(stats.sx, ref_sx, what="s_k", scale=terms)
    assert_close(stats.sxx.reshape(ref_sxx.shape), ref_sxx, what="S_k")
    assert_close(stats.loglik, ref_norm.sum() if sw is None else ref_norm @ sw,
                 what="log-likelihood")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n_features", [3, 26])  # the loop and the BLAS engines
def test_log_densities_and_labels_need_no_responsibility_array(covariance_type, dtype,
                                                                n_features):
    # score_samples' and predict's modes of the pass: the same log p(x) bits as
    # the pass that writes log-responsibilities, and the first largest
    # weighted log-density, also for a row too far for the operands.
    from fastem import GaussianMixture
    from fastem._kernels import estep
    from fastem.stats import (
        GaussianParameters,
        _run_pass,
        engine_for,
        kernel_operands,
        log_densities,
        most_probable_components,
        operand_dtype,
    )
    from fastem.stats import log_responsibilities as log_resp_of

    X = make_mixture(1500, n_features, 3, seed=4).astype(dtype)
    model = GaussianMixture(3, covariance_type=covariance_type, random_state=0,
                            max_iter=5).fit(X)
    X[7] = 1e200 if dtype == np.float64 else 1e25  # its squares overflow the operands
    params = GaussianParameters(model.weights_, model.means_, model.covariances_,
                                model.precisions_cholesky_)
    with np.errstate(over="ignore", invalid="ignore"):
        log_resp, log_norm = log_resp_of(X, params, covariance_type)
    engine = engine_for(n_features, covariance_type)
    means, prec, log_const, _ = kernel_operands(params, covariance_type,
                                                operand_dtype(engine, X.dtype))
    out, norms = np.empty((X.shape[0], 3)), np.empty(X.shape[0])
    _, far = _run_pass(engine, estep.MODE_LOG_RESP, X, None, np.empty(0, dtype=np.int32),
                       means, prec, log_const, 4, out, norms)
    if operand_dtype(engine, X.dtype) == X.dtype:
        # The far-row path is exercised (float32 data in float64 BLAS
        # operands cannot overflow).
        np.testing.assert_array_equal(far.rows, [7])
    np.testing.assert_array_equal(log_densities(X, params, covariance_type), log_norm)
    labels = most_probable_components(X, params, covariance_type)
    with np.errstate(over="ignore", invalid="ignore"):
        weighted = np.log(model.weights_) + reference.log_gaussian_prob(
            X.astype(np.float64), model.means_, model.precisions_cholesky_, covariance_type)
    ordinary = np.ones(X.shape[0], dtype=bool)
    ordinary[7] = False
    np.testing.assert_array_equal(labels[ordinary], weighted[ordinary].argmax(axis=1))
    assert labels[7] == log_resp[7].argmax()
    np.testing.assert_array_equal(model.predict(X), labels)


def test_predict_takes_the_first_of_tied_components():
    from fastem import GaussianMixture

    X = make_mixture(300, 2, 2, seed=1)
    model = GaussianMixture(2, random_state=0).fit(X)
    # Two identical components: every row is a tie, which goes to component 0.
    model.means_[1] = model.means_[0]
    model.covariances_[1] = model.covariances_[0]
    model.precisions_cholesky_[1] = model.precisions_cholesky_[0]
    model.weights_[:] = 0.5
    np.testing.assert_array_equal(model.predict(X), np.zeros(300, dtype=np.int64))
