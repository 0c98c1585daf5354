"""fastem.hmm: kernels against their twins, parity with hmmlearn, EM properties, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import COVARIANCE_TYPES, shared_csv
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from fastem import _threads, reference
from fastem._kernels import hmm as kernels
from fastem.hmm import (
    BaumWelch,
    GaussianHMM,
    SequenceSource,
    emission_log_densities,
    emission_probabilities,
    forward_backward_work,
    hmm_parameters,
    sequence_bounds,
    sequence_groups,
    shifted_probabilities,
)

TIGHT = 1e-12
LENGTHS = [200, 150, 250]
N_STATES, N_FEATURES = 3, 2
TRUE_MEANS = np.array([[0.0, 0.0], [4.0, 1.0], [-3.0, 3.0]])
TRUE_TRANSMAT = np.array([[0.90, 0.05, 0.05], [0.10, 0.80, 0.10], [0.05, 0.15, 0.80]])


def relative_error(actual, expected):
    """Largest difference relative to the largest expected entry."""
    actual, expected = np.asarray(actual, float), np.asarray(expected, float)
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-300))


def sample_hmm(lengths, seed=1):
    """Sequences from a 3-state, 2-feature Gaussian HMM with correlated noise."""
    rng = np.random.default_rng(seed)
    mix = np.array([[1.0, 0.3], [0.0, 0.8]])
    parts = []
    for n in lengths:
        z = [0]
        for _ in range(n - 1):
            z.append(rng.choice(N_STATES, p=TRUE_TRANSMAT[z[-1]]))
        parts.append(TRUE_MEANS[np.array(z)] + rng.normal(size=(n, N_FEATURES)) @ mix)
    return np.vstack(parts)


def start_covars(covariance_type, K=N_STATES, D=N_FEATURES):
    return {"diag": np.full((K, D), 1.5), "spherical": np.full(K, 1.5),
            "full": np.tile(np.eye(D) * 1.5 + 0.2, (K, 1, 1)),
            "tied": np.eye(D) * 1.5 + 0.2}[covariance_type]


START = dict(startprob=np.array([0.5, 0.3, 0.2]),
             transmat=np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]),
             means=TRUE_MEANS + np.random.default_rng(7).normal(scale=0.5, size=TRUE_MEANS.shape))


def with_start(model, covariance_type):
    """``model`` with the shared explicit start (init_params='' uses it)."""
    model.startprob_ = START["startprob"].copy()
    model.transmat_ = START["transmat"].copy()
    model.means_ = START["means"].copy()
    model.covars_ = start_covars(covariance_type)
    return model


@pytest.fixture(scope="module")
def data():
    return sample_hmm(LENGTHS)


@pytest.fixture(scope="module")
def hmmlearn_hmm():
    return pytest.importorskip("hmmlearn.hmm")


# ------------------------------------------------------------ (a) kernels vs twins
def random_lattice(lengths, K, seed=0, zeros=False):
    rng = np.random.default_rng(seed)
    L = rng.normal(scale=3.0, size=(sum(lengths), K)) - 5.0
    startprob = rng.dirichlet(np.ones(K))
    transmat = rng.dirichlet(np.ones(K), size=K)
    if zeros and K > 1:  # a left-right chain: forbidden transitions, log A = -inf
        transmat = np.triu(transmat)
        transmat /= transmat.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        return L, np.log(startprob), np.log(transmat)


def run_kernel(L, log_pi, log_A, lengths, method, mode, group_bounds, X=None, shift=None,
               full=False, strict=True):
    """One forward_backward call over all groups; its outputs by name."""
    K = L.shape[1]
    if method == kernels.SCALED:
        emission, offsets = shifted_probabilities(L)
    else:
        emission, offsets = L, np.empty(0)
    if X is None:
        X, shift = np.zeros((L.shape[0], 1)), np.zeros((K, 1))
    D = X.shape[1]
    n_groups = len(group_bounds) - 1
    slots = n_groups if mode == kernels.STATISTICS else 0
    out = dict(loglik=np.empty(len(lengths)), status=np.full(len(lengths), -1, dtype=np.int64),
               gamma=np.empty((L.shape[0] if mode == kernels.POSTERIORS else 0, K)),
               xi=np.full((n_groups, K, K), np.nan), start=np.full((n_groups, K), np.nan),
               nk=np.full((slots, K), np.nan), sx=np.full((slots, K, D), np.nan),
               sxx=np.full((slots, K, D, D if full else 1), np.nan))
    kernels.forward_backward(0, n_groups, np.asarray(group_bounds, dtype=np.int64),
                             sequence_bounds(lengths), emission, offsets, 0, log_pi, log_A, method,
                             mode, strict, X, shift, out["loglik"], out["status"], out["gamma"],
                             out["xi"], out["start"], out["nk"], out["sx"], out["sxx"])
    return out


KERNEL_CASES = [([5, 1, 17, 40, 2], 3, False), ([300], 4, False), ([1, 1, 1], 2, False),
                ([60, 33], 1, False), ([25, 8, 40], 3, True), ([70, 45], 5, False),
                ([40, 21], 9, True)]  # K = 9: the generic sweep (K <= 8: specialised)
METHODS = [kernels.SCALED, kernels.LOG]


@pytest.mark.parametrize("method", METHODS, ids=["scaled", "log"])
@pytest.mark.parametrize("lengths,K,zeros", KERNEL_CASES)
def test_forward_backward_matches_reference(lengths, K, zeros, method):
    L, log_pi, log_A = random_lattice(lengths, K, seed=len(lengths) + K, zeros=zeros)
    ref_ll, ref_gamma, ref_trans, ref_start, _ = reference.hmm_forward_backward(
        L, log_pi, log_A, lengths)
    # One group per sequence: every slot holds that sequence's counts.
    one_each = np.arange(len(lengths) + 1)
    out = run_kernel(L, log_pi, log_A, lengths, method, kernels.POSTERIORS, one_each)
    assert np.all(out["status"] == kernels.DONE)
    assert relative_error(out["loglik"], ref_ll) <= TIGHT
    assert relative_error(out["gamma"], ref_gamma) <= TIGHT
    assert relative_error(out["xi"].sum(axis=0), ref_trans) <= TIGHT
    assert relative_error(out["start"].sum(axis=0), ref_start) <= TIGHT
    np.testing.assert_allclose(out["gamma"].sum(axis=1), 1.0, rtol=1e-13)
    for s, n in enumerate(lengths):
        one = reference.hmm_forward_backward(
            L[sum(lengths[:s]):sum(lengths[:s + 1])], log_pi, log_A, [n])
        assert relative_error(out["xi"][s], one[2]) <= TIGHT if n > 1 else np.all(
            out["xi"][s] == 0)
    # The forward pass alone: the same log-likelihoods.
    forward = run_kernel(L, log_pi, log_A, lengths, method, kernels.FORWARD, one_each)
    np.testing.assert_array_equal(forward["loglik"], out["loglik"])
    # Groups as the source makes them: the same sums.
    grouped = run_kernel(L, log_pi, log_A, lengths, method, kernels.POSTERIORS,
                         sequence_groups(lengths))
    assert relative_error(grouped["xi"].sum(axis=0), ref_trans) <= TIGHT


@pytest.mark.parametrize("K", kernels.SPECIALISED_STATES)
def test_specialised_sweeps_give_the_generic_bits(K):
    # The sweep compiled with K a constant does the same operations in the same order.
    rng = np.random.default_rng(K)
    n, low, high = 50, 17, 50  # the top row is the last: beta = 1 there
    b = rng.random((n, K))
    A = rng.dirichlet(np.ones(K), size=K)
    inv_c = 1.0 / rng.uniform(0.2, 1.0, size=n)
    beta_high = rng.random(K)
    results = []
    for sweep in (kernels._sweep, kernels.SWEEPS[K]):
        beta = beta_high.copy()
        w, wT, betaT = np.empty(K), np.full((K, 40), np.nan), np.full((K, 40), np.nan)
        sweep(b, 0, 3, n, low, high, A, inv_c, beta, w, wT, betaT)
        results.append((wT, betaT, beta))
    for generic, special in zip(*results):
        np.testing.assert_array_equal(generic, special)


@pytest.mark.parametrize("full", [False, True], ids=["diagonal", "full"])
@pytest.mark.parametrize("method", METHODS, ids=["scaled", "log"])
@pytest.mark.parametrize("lengths,K,zeros", KERNEL_CASES)
def test_emission_statistics_match_reference(lengths, K, zeros, method, full):
    # The fused emission statistics against the twin's, taken from its gamma.
    L, log_pi, log_A = random_lattice(lengths, K, seed=len(lengths) + 2 * K, zeros=zeros)
    rng = np.random.default_rng(K)
    X = rng.normal(size=(sum(lengths), 3)) * [1.0, 10.0, 0.1] + [0.0, 50.0, -3.0]
    shift = X.mean(axis=0) + rng.normal(size=(K, 3))
    *_, (nk, sx, sxx) = reference.hmm_forward_backward(L, log_pi, log_A, lengths, X, shift,
                                                       full)
    posteriors = run_kernel(L, log_pi, log_A, lengths, method, kernels.POSTERIORS,
                            sequence_groups(lengths))
    for groups in (np.arange(len(lengths) + 1), sequence_groups(lengths)):
        out = run_kernel(L, log_pi, log_A, lengths, method, kernels.STATISTICS, groups, X,
                         shift, full)
        assert relative_error(out["nk"].sum(axis=0), nk) <= TIGHT
        assert relative_error(out["sx"].sum(axis=0), sx) <= TIGHT
        assert relative_error(out["sxx"].sum(axis=0), sxx) <= TIGHT
        if full:
            np.testing.assert_array_equal(out["sxx"], out["sxx"].transpose(0, 1, 3, 2))
    # Fitting writes no posteriors, and takes the same counts as predictions.
    np.testing.assert_array_equal(out["loglik"], posteriors["loglik"])
    np.testing.assert_array_equal(out["xi"], posteriors["xi"])
    np.testing.assert_array_equal(out["start"], posteriors["start"])


def underflowing_lattice():
    r"""Log-densities and parameters (K = 2) of four sequences; the scaled
    recursion underflows in the 1st and 3rd, the log-space one does not.

    * 1st: :math:`\pi = (1, 0)` and a first row that only state 1 explains
      within :math:`e^{-708}` (:math:`b_0 = (0, 1)`: :math:`c_0 = 0`);
    * 3rd: rows supporting only state 0, then only state 1, through
      :math:`A_{01} = 10^{-320}` (:math:`c_t = 10^{-320}`, subnormal);
    * 2nd and 4th: ordinary sequences.
    """
    rng = np.random.default_rng(11)
    far = np.array([-1000.0, 0.0])
    parts = [np.vstack([far, rng.normal(size=(6, 2))]),
             rng.normal(size=(9, 2)) - 3.0,
             np.vstack([np.tile(far[::-1], (5, 1)), np.tile(far, (7, 1))]),
             rng.normal(size=(4, 2))]
    with np.errstate(divide="ignore"):
        log_pi = np.log([1.0, 0.0])
    log_A = np.log([[1.0, 1e-320], [1e-320, 1.0]])
    return parts, log_pi, log_A


def test_scaled_recursion_falls_back_to_log_space():
    parts, log_pi, log_A = underflowing_lattice()
    L = np.vstack(parts)
    lengths = [len(p) for p in parts]
    groups = sequence_groups(lengths)
    scaled = run_kernel(L, log_pi, log_A, lengths, kernels.SCALED, kernels.POSTERIORS, groups)
    np.testing.assert_array_equal(scaled["status"], [kernels.REDO, kernels.DONE, kernels.REDO,
                                                     kernels.DONE])
    # Without strict (hmmlearn's 'scaling') a zero normaliser is probability zero.
    loose = run_kernel(L, log_pi, log_A, lengths, kernels.SCALED, kernels.FORWARD, groups,
                       strict=False)
    assert loose["loglik"][0] == -np.inf and np.all(np.isfinite(loose["loglik"][[1, 3]]))
    ref_ll, ref_gamma, ref_trans, ref_start, _ = reference.hmm_forward_backward(
        L, log_pi, log_A, lengths)
    assert np.all(np.isfinite(ref_ll))
    params = hmm_parameters(np.exp(log_pi), np.exp(log_A), np.zeros((2, 1)), np.ones((2, 1)),
                            "diag")
    X = np.random.default_rng(2).normal(size=(L.shape[0], 1))
    source = SequenceSource(X, lengths, "diag", "log")
    loglik, gamma, trans, start = source.forward_backward(params, log_emission=L)
    assert relative_error(loglik, ref_ll) <= TIGHT
    assert relative_error(gamma, ref_gamma) <= TIGHT
    assert relative_error(trans, ref_trans) <= TIGHT
    assert relative_error(start, ref_start) <= TIGHT
    # The emission statistics of the redone sequences too.
    *_, (nk, sx, sxx) = reference.hmm_forward_backward(L, log_pi, log_A, lengths, X,
                                                       params.means)
    out = source._run(params, kernels.STATISTICS, log_emission=L)
    assert relative_error(out["loglik"], ref_ll) <= TIGHT
    assert relative_error(out["trans"], ref_trans) <= TIGHT
    assert relative_error(out["nk"], nk) <= TIGHT
    assert relative_error(out["sx"], sx) <= TIGHT
    assert relative_error(out["sxx"], sxx) <= TIGHT
    with _threads.limit(1):
        np.testing.assert_array_equal(
            SequenceSource(X, lengths, "diag", "log").forward_backward(
                params, log_emission=L)[1], gamma)


@pytest.mark.parametrize("switch", [1e-100, 1e-300])
def test_small_normalisers_keep_the_log_likelihood(switch):
    # 29 switches between states through A_01 = A_10 = switch, each forced by
    # the data: normalisers about that small, whose product (1e-2900 or
    # 1e-8700) is far below float64's range (kept as a mantissa and an
    # exponent). Below K 2^-960 (1e-300) the strict pass redoes the sequence.
    far = np.array([-1000.0, 0.0])
    L = np.vstack([np.tile(far[::(-1) ** (b + 1)], (3, 1)) for b in range(30)])
    L += np.random.default_rng(4).normal(scale=0.1, size=L.shape)
    log_pi = np.log([0.5, 0.5])
    log_A = np.log([[1.0 - switch, switch], [switch, 1.0 - switch]])
    ref_ll, ref_gamma, ref_trans, ref_start, _ = reference.hmm_forward_backward(
        L, log_pi, log_A, [L.shape[0]])
    assert ref_ll[0] < -6000
    # The twin's exponents carry absolute errors of about |log p| eps (4e-12
    # relative on xi here; the kernel's is 1e-16, checked in 50 digits).
    loose = TIGHT * abs(ref_ll[0]) / 1000.0
    for strict in (True, False):
        out = run_kernel(L, log_pi, log_A, [L.shape[0]], kernels.SCALED, kernels.POSTERIORS,
                         [0, 1], strict=strict)
        if strict and switch < 2 * 2.0 ** -960:
            assert out["status"][0] == kernels.REDO
            continue
        assert out["status"][0] == kernels.DONE
        assert relative_error(out["loglik"], ref_ll) <= TIGHT
        assert relative_error(out["gamma"], ref_gamma) <= loose
        assert relative_error(out["xi"][0], ref_trans) <= loose


def test_small_normaliser_after_a_drifting_product():
    # 63 rows where an unreachable state has the largest density (c_t = 1/2:
    # the product of the normalisers drifts to 2^-63, just above its
    # renormalisation), then a switch through 1e-300: multiplied in directly
    # the product would be subnormal (3e-8 relative error in log p).
    ln2 = np.log(2.0)
    L = np.vstack([np.tile([-ln2, -1000.0, 0.0], (63, 1)),
                   np.tile([-1000.0, 0.0, -1000.0], (5, 1))])
    with np.errstate(divide="ignore"):
        log_pi = np.log([1.0, 0.0, 0.0])
        log_A = np.log([[1.0, 1e-300, 0.0], [1e-300, 1.0, 0.0], [0.0, 0.0, 1.0]])
    ref_ll = reference.hmm_forward_backward(L, log_pi, log_A, [L.shape[0]])[0]
    out = run_kernel(L, log_pi, log_A, [L.shape[0]], kernels.SCALED, kernels.FORWARD, [0, 1],
                     strict=False)
    assert relative_error(out["loglik"], ref_ll) <= TIGHT


def test_overflowing_backward_recursion_falls_back_to_log_space():
    # Two states that never switch; the first row rules state 1 out (b_0 =
    # (1, 0)), the next 1200 favour it by a factor 2: its scaled backward
    # variable reaches 2^1200 and overflows. Both implementations redo the
    # sequence in log space (whose forward pass, too, has ruled state 1 out).
    L = np.vstack([[0.0, -800.0], np.tile([-np.log(2.0), 0.0], (1200, 1))])
    log_pi = np.log([0.5, 0.5])
    with np.errstate(divide="ignore"):
        log_A = np.log(np.eye(2))
    lengths = [L.shape[0]]
    groups = sequence_groups(lengths)
    for strict in (True, False):
        scaled = run_kernel(L, log_pi, log_A, lengths, kernels.SCALED, kernels.POSTERIORS,
                            groups, strict=strict)
        assert scaled["status"][0] == kernels.REDO
    log = run_kernel(L, log_pi, log_A, lengths, kernels.LOG, kernels.POSTERIORS, groups)
    params = hmm_parameters(np.exp(log_pi), np.eye(2), np.zeros((2, 1)), np.ones((2, 1)), "diag")
    for implementation in ("log", "scaling"):
        source = SequenceSource(np.zeros((L.shape[0], 1)), None, "diag", implementation)
        loglik, gamma, trans, start = source.forward_backward(params, log_emission=L)
        np.testing.assert_array_equal(loglik, log["loglik"])
        np.testing.assert_array_equal(gamma, log["gamma"])
        np.testing.assert_array_equal(trans, log["xi"][0])
        assert np.all(np.isfinite(gamma))
    # Within a group, after ordinary sequences (whose sums the sweep had
    # added already): the group is summed again without it.
    rng = np.random.default_rng(5)
    ordinary = [rng.normal(size=(n, 2)) for n in (30, 50)]
    mixed = np.vstack([ordinary[0], L, ordinary[1]])
    lengths = [30, L.shape[0], 50]
    X = rng.normal(size=(mixed.shape[0], 2))
    shift = rng.normal(size=(2, 2))
    together = run_kernel(mixed, log_pi, log_A, lengths, kernels.SCALED, kernels.STATISTICS,
                          [0, 3], X, shift, True)
    np.testing.assert_array_equal(together["status"], [kernels.DONE, kernels.REDO, kernels.DONE])
    bounds = sequence_bounds(lengths)
    apart = [run_kernel(mixed[bounds[s]:bounds[s + 1]], log_pi, log_A, [lengths[s]],
                        kernels.SCALED, kernels.STATISTICS, [0, 1], X[bounds[s]:bounds[s + 1]],
                        shift, True) for s in (0, 2)]
    for name in ("xi", "start", "nk", "sx", "sxx"):
        assert relative_error(together[name], apart[0][name] + apart[1][name]) <= TIGHT


@pytest.mark.parametrize("lengths,K,zeros", KERNEL_CASES)
def test_viterbi_matches_reference(lengths, K, zeros):
    L, log_pi, log_A = random_lattice(lengths, K, seed=3 * K, zeros=zeros)
    ref_best, ref_path = reference.hmm_viterbi(L, log_pi, log_A, lengths)
    path = np.empty(L.shape[0], dtype=np.int64)
    best = np.empty(len(lengths))
    groups = sequence_groups(lengths)
    kernels.viterbi(0, len(groups) - 1, groups, sequence_bounds(lengths), L, log_pi, log_A,
                    path, best)
    np.testing.assert_array_equal(path, ref_path)
    assert relative_error(best, ref_best) <= TIGHT


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_emission_log_densities_match_reference(data, covariance_type):
    params = hmm_parameters(START["startprob"], START["transmat"], START["means"],
                            start_covars(covariance_type), covariance_type)
    L = emission_log_densities(data, params, covariance_type)
    expected = reference.log_gaussian_prob(data, params.means, params.precisions_cholesky,
                                           covariance_type)
    assert relative_error(L, expected) <= TIGHT


# ------------------------------------------------------------ (b) parity with hmmlearn
def fit_both(hmmlearn_hmm, X, lengths, covariance_type, implementation="log", n_iter=10,
             **kwargs):
    models = []
    for cls in (hmmlearn_hmm.GaussianHMM, GaussianHMM):
        model = cls(N_STATES, covariance_type, init_params="", n_iter=n_iter, tol=-np.inf,
                    implementation=implementation, **kwargs)
        models.append(with_start(model, covariance_type).fit(X, lengths))
    return models


def compact_covars(model, covariance_type):
    """hmmlearn 0.3.3 stores fitted spherical variances tiled to (K, D)."""
    covars = np.asarray(model._covars_)
    return covars[:, 0] if covariance_type == "spherical" and covars.ndim == 2 else covars


def assert_same_fit(theirs, ours, covariance_type, X, lengths):
    history, expected = np.array(ours.monitor_.history), np.array(theirs.monitor_.history)
    assert history.shape == expected.shape
    assert relative_error(history, expected) <= 1e-8
    assert abs(ours.score(X, lengths) - theirs.score(X, lengths)) <= 1e-8 * abs(
        theirs.score(X, lengths))
    np.testing.assert_allclose(ours.startprob_, theirs.startprob_, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(ours.transmat_, theirs.transmat_, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(ours.means_, theirs.means_, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(ours._covars_, compact_covars(theirs, covariance_type),
                               rtol=1e-7, atol=1e-10)
    np.testing.assert_array_equal(ours.predict(X, lengths), theirs.predict(X, lengths))
    np.testing.assert_allclose(ours.predict_proba(X, lengths), theirs.predict_proba(X, lengths),
                               atol=1e-8)
    ours_map, theirs_map = ours.decode(X, lengths, "map"), theirs.decode(X, lengths, "map")
    np.testing.assert_array_equal(ours_map[1], theirs_map[1])
    assert ours_map[0] == pytest.approx(theirs_map[0], rel=1e-10)
    ours_vit, theirs_vit = ours.decode(X, lengths), theirs.decode(X, lengths)
    assert ours_vit[0] == pytest.approx(theirs_vit[0], rel=1e-10)


@pytest.mark.parametrize("several", [False, True], ids=["one-sequence", "several"])
@pytest.mark.parametrize("implementation", ["log", "scaling"])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_parity_with_hmmlearn(hmmlearn_hmm, data, covariance_type, implementation, several):
    lengths = LENGTHS if several else None
    theirs, ours = fit_both(hmmlearn_hmm, data, lengths, covariance_type, implementation)
    assert ours.monitor_.iter == theirs.monitor_.iter == 10
    assert_same_fit(theirs, ours, covariance_type, data, lengths)
    assert ours.covars_.shape == (N_STATES, N_FEATURES, N_FEATURES)
    if covariance_type != "spherical":  # hmmlearn's fitted spherical covars_ is (K*D, D, D)
        np.testing.assert_allclose(ours.covars_, theirs.covars_, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_parity_with_hmmlearn_priors(hmmlearn_hmm, data, covariance_type):
    priors = dict(startprob_prior=2.0, transmat_prior=np.full((3, 3), 3.0) + np.eye(3),
                  means_prior=np.array([[0.5, 0.0], [3.0, 1.0], [-2.0, 2.0]]), means_weight=2.0,
                  covars_prior=0.5, covars_weight=4.0)
    theirs, ours = fit_both(hmmlearn_hmm, data, LENGTHS, covariance_type, **priors)
    assert_same_fit(theirs, ours, covariance_type, data, LENGTHS)


@pytest.mark.parametrize("params", ["mc", "stm", "st"])
def test_parity_with_hmmlearn_partial_updates(hmmlearn_hmm, data, params):
    theirs, ours = fit_both(hmmlearn_hmm, data, LENGTHS, "full", params=params)
    assert_same_fit(theirs, ours, "full", data, LENGTHS)
    for letter, name in zip("stmc", ("startprob_", "transmat_", "means_", "_covars_")):
        if letter not in params:
            expected = start_covars("full") if name == "_covars_" else START[name[:-1]]
            np.testing.assert_array_equal(getattr(ours, name), expected)


def test_covariances_without_means_update(data):
    # 'c' without 'm' (hmmlearn 0.3.3 divides by zeroed moments there): the
    # scatter around the kept means, with the prior.
    model = with_start(GaussianHMM(N_STATES, "full", init_params="", params="c", n_iter=1),
                       "full")
    gamma = model.predict_proba(data, LENGTHS)
    model.fit(data, LENGTHS)
    np.testing.assert_array_equal(model.means_, START["means"])
    for k in range(N_STATES):
        dev = data - START["means"][k]
        expected = (1e-2 + (gamma[:, k, None] * dev).T @ dev) / gamma[:, k].sum()
        assert relative_error(model._covars_[k], expected) <= 1e-12


def test_parity_with_hmmlearn_convergence_and_criteria(hmmlearn_hmm, data):
    models = []
    for cls in (hmmlearn_hmm.GaussianHMM, GaussianHMM):
        model = with_start(cls(N_STATES, "diag", init_params="", n_iter=200, tol=1e-4), "diag")
        models.append(model.fit(data, LENGTHS))
    theirs, ours = models
    assert ours.monitor_.iter == theirs.monitor_.iter < 200
    assert ours.monitor_.converged and ours.converged_
    assert_same_fit(theirs, ours, "diag", data, LENGTHS)
    assert ours.bic(data, LENGTHS) == pytest.approx(theirs.bic(data, LENGTHS), rel=1e-10)
    assert ours.aic(data, LENGTHS) == pytest.approx(theirs.aic(data, LENGTHS), rel=1e-10)


@pytest.mark.parametrize("covariance_type", ["diag", "full", "spherical"])
def test_sample_draws_as_hmmlearn(hmmlearn_hmm, covariance_type):
    models = [with_start(cls(N_STATES, covariance_type), covariance_type)
              for cls in (hmmlearn_hmm.GaussianHMM, GaussianHMM)]
    theirs, ours = (m.sample(50, random_state=3) for m in models)
    np.testing.assert_array_equal(ours[1], theirs[1])
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-12)
    assert ours[0].shape == (50, N_FEATURES)


# ------------------------------------------------------------ (c) properties
def test_log_likelihood_never_decreases(data):
    # Without priors EM increases the likelihood itself (covars_prior=0: maximum likelihood).
    model = GaussianHMM(3, "full", covars_prior=0.0, n_iter=40, tol=-np.inf, random_state=0)
    history = np.array(model.fit(data, LENGTHS).monitor_.history)
    assert len(history) == 40
    assert np.all(np.diff(history) >= -1e-10 * np.abs(history[1:]))


@pytest.mark.parametrize("implementation", ["log", "scaling"])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_statistics_add_over_sequences(data, covariance_type, implementation):
    params = hmm_parameters(START["startprob"], START["transmat"], START["means"],
                            start_covars(covariance_type), covariance_type)
    whole = SequenceSource(data, LENGTHS, covariance_type, implementation).statistics(params)
    bounds = sequence_bounds(LENGTHS)
    parts = [SequenceSource(np.ascontiguousarray(data[a:b]), None, covariance_type,
                            implementation).statistics(params)
             for a, b in zip(bounds[:-1], bounds[1:])]
    summed = parts[0] + parts[1] + parts[2]
    assert summed.n_sequences == whole.n_sequences == 3
    assert summed.loglik == pytest.approx(whole.loglik, rel=TIGHT)
    assert relative_error(summed.start, whole.start) <= TIGHT
    assert relative_error(summed.trans, whole.trans) <= TIGHT
    assert relative_error(summed.nk, whole.nk) <= TIGHT
    recentred = summed.emissions.recentre(whole.emissions.shift)
    # First moments around the whole's state means: zero, up to the rounding of sums of N |x|.
    scale = np.abs(data).max() * len(data)
    assert np.abs(recentred.sx - whole.emissions.sx).max() <= TIGHT * scale
    assert relative_error(recentred.sxx, whole.emissions.sxx) <= 1e-11
    m_step = BaumWelch(covariance_type)
    for ours, expected in zip(m_step(summed)[0], m_step(whole)[0]):
        assert relative_error(ours, expected) <= 1e-11


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("mode", [kernels.STATISTICS, kernels.POSTERIORS])
def test_group_by_group_emissions_give_the_whole_arrays_bits(covariance_type, mode):
    # The E-step computes each group's emissions just before its forward-backward;
    # the same kernel on the (T, K) emissions of all rows gives the same bits.
    lengths = [300] * 40
    X = sample_hmm([12_000], seed=6)
    assert len(sequence_groups(lengths)) - 1 >= 2
    source = SequenceSource(X, lengths, covariance_type, "log")
    params = hmm_parameters(START["startprob"], START["transmat"], START["means"],
                            start_covars(covariance_type), covariance_type)
    grouped = source._run(params, mode)
    whole = source._kernel(kernels.SCALED, mode, X, source.seq_bounds, source.group_bounds,
                           emission_probabilities(X, params, covariance_type), params,
                           N_STATES, forward_backward_work(12_000, N_STATES))
    for name in ("loglik", "status", "gamma", "trans", "start", "nk", "sx", "sxx"):
        if grouped[name] is None:
            assert whole[name] is None
            continue
        np.testing.assert_array_equal(grouped[name], whole[name], err_msg=name)


def test_threads_give_identical_bits():
    lengths = [300] * 40
    X = sample_hmm([12_000], seed=5)
    assert forward_backward_work(12_000, 3) > _threads.SERIAL_WORK
    assert len(sequence_groups(lengths)) - 1 >= 2
    fits = []
    for n_threads in (1, 2):
        with _threads.limit(n_threads):
            assert _threads.n_threads() == min(n_threads, _threads.default_threads())
        model = GaussianHMM(3, "full", n_iter=5, tol=-np.inf, random_state=0,
                            n_threads=n_threads)
        fits.append(model.fit(X, lengths))
        fits[-1].posteriors = model.predict_proba(X, lengths)
        fits[-1].path = model.predict(X, lengths)
    one, two = fits
    assert list(one.monitor_.history) == list(two.monitor_.history)
    for name in ("startprob_", "transmat_", "means_", "_covars_", "posteriors", "path"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))


def test_estimator_api(data):
    model = GaussianHMM(3, "tied", n_iter=5, random_state=0, n_init=2)
    assert clone(model).get_params() == model.get_params()
    with pytest.raises(NotFittedError):
        model.score(data)
    model.fit(data, LENGTHS)
    assert model.n_features == 2 and model.n_iter_ == len(model.monitor_.history)
    assert model.transmat_.shape == (3, 3) and model.covars_.shape == (3, 2, 2)
    np.testing.assert_allclose(model.transmat_.sum(axis=1), 1.0)
    log_prob, posteriors = model.score_samples(data, LENGTHS)
    assert log_prob == pytest.approx(model.score(data, LENGTHS), rel=1e-12)
    assert posteriors.shape == (600, 3)
    # Default start: uniform startprob, sticky transitions.
    start = GaussianHMM(3, n_iter=0, random_state=0).fit(data)
    np.testing.assert_array_equal(start.startprob_, np.full(3, 1 / 3))
    np.testing.assert_allclose(np.diag(start.transmat_), 0.9)


# ------------------------------------------------------------ (d) bad input
@pytest.mark.parametrize("case,message", [
    ("nan", "NaN"),
    ("sum", "lengths sum to"),
    ("zero", "lengths must be positive"),
    ("negative", "lengths must be positive"),
    ("states", "more states than observations"),
    ("letters", "unknown letter"),
    ("startprob", "startprob_"),
    ("means", "means_ must have shape"),
    ("covars", "positive"),
    ("impossible", "probability zero"),
])
def test_bad_input_is_a_clear_value_error(data, case, message):
    X, lengths, model = data.copy(), LENGTHS, GaussianHMM(3, n_iter=2, random_state=0)
    if case == "nan":
        X[5, 1] = np.nan
    elif case == "sum":
        lengths = [200, 150, 249]
    elif case == "zero":
        lengths = [200, 0, 400]
    elif case == "negative":
        lengths = [700, -100]
    elif case == "states":
        X, lengths = X[:2], None
    elif case == "letters":
        model.set_params(params="stmx")
    elif case == "startprob":
        model = with_start(GaussianHMM(3, init_params=""), "diag")
        model.startprob_ = np.array([0.5, 0.5, 0.5])
    elif case == "means":
        model = with_start(GaussianHMM(3, init_params=""), "diag")
        model.means_ = np.zeros((3, 5))
    elif case == "covars":
        with pytest.raises(ValueError, match=message):
            GaussianHMM(3).covars_ = -np.ones((3, 2))
        return
    elif case == "impossible":
        # A row beyond float64's range of squared distances: every state's density is 0.
        X[10] = 1e300
        model = with_start(GaussianHMM(3, init_params=""), "diag")
    with pytest.raises(ValueError, match=message):
        model.fit(X, lengths)


# ------------------------------------------------------------ (e) S&P 500 regimes
def test_sp500_calm_and_volatile_regimes():
    returns = shared_csv("sp500.csv") * 100.0  # per cent
    assert returns.shape == (2783,)
    model = GaussianHMM(2, "diag", n_iter=200, tol=1e-6, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(returns[:, None])
    variances = model._covars_[:, 0]
    calm, volatile = int(np.argmin(variances)), int(np.argmax(variances))
    assert variances[volatile] >= 2.0 * variances[calm]
    persistence = np.diag(model.transmat_)
    # Maximum likelihood (fastem and hmmlearn alike) keeps the calm regime 99.4 %
    # of days and the volatile one 89.5 %.
    assert persistence[calm] > 0.99
    assert persistence[volatile] > 0.85
    states = model.predict(returns[:, None])
    assert 0.02 < np.mean(states == volatile) < 0.5  # about 4 % of the days
    # The volatile days are the large moves.
    assert np.abs(returns[states == volatile]).mean() > 2 * np.abs(returns[states == calm]).mean()
