"""Short-run EM (em-EM): nested candidates, budgets that never end worse, determinism."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import COVARIANCE_TYPES, make_mixture, shared_csv

from fastem import GaussianMixture, em
from fastem.initialization import (
    SHORT_RUN_ITERATIONS,
    ShortRunEM,
    random_rows,
    seed_statistics,
)
from fastem.selection import (
    SCREEN_BUDGET,
    SEARCH_MARGIN,
    TABLE_DTYPE,
    _Candidates,
    _initial_parameters,
    _stream,
    select_model,
)
from fastem.sources import BlockSource, InMemorySource
from fastem.stats import MaximumLikelihood, label_statistics_of
from fastem.tables import load_demo_data


def _crabs():
    return shared_csv("crabs.csv", ["FL", "RW", "CL", "CW", "BD"])


def _search(X, n_components, covariance_type, budget, seed=0, source=None):
    """A ShortRunEM over the first ``budget`` select_model candidates of one cell."""
    m_step = MaximumLikelihood(covariance_type, 1e-6)
    starts = _Candidates(X, None, n_components, _stream(seed, n_components, 0), None)
    initial = [_initial_parameters(X, None, s, m_step) for s in starts.take(budget)]
    source = InMemorySource(X, None, covariance_type) if source is None else source
    return ShortRunEM(source, m_step, initial, 1e-6, 500), initial


# ---------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------


def _as_arrays(start):
    return [np.asarray(part) for part in (start if isinstance(start, tuple) else (start,))]


def test_candidates_of_a_budget_begin_those_of_twice_the_budget():
    X = make_mixture(300, 3, 4, seed=1)
    small = _Candidates(X, None, 4, _stream(7, 4, 0), None).take(10)
    large = _Candidates(X, None, 4, _stream(7, 4, 0), None).take(20)
    assert len(small) == 10 and len(large) == 20
    for i, (a, b) in enumerate(zip(small, large)):
        assert type(a) is type(b), i
        for u, v in zip(_as_arrays(a), _as_arrays(b)):
            np.testing.assert_array_equal(u, v, err_msg=f"candidate {i}")


def test_gaussian_mixture_em_em_candidates_are_nested():
    # The first objective of a candidate is that of its initial parameters:
    # the first B candidates of budget 2B start where those of budget B do.
    X = make_mixture(300, 2, 3, seed=4)
    fits = [GaussianMixture(3, init_params="em-em", n_init=n, random_state=3).fit(X)
            for n in (6, 12)]
    first = [[bounds[0] for bounds in fit.init_lower_bounds_] for fit in fits]
    assert len(first[0]) == 6 and len(first[1]) == 12
    assert first[1][:6] == first[0]


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_seed_statistics_equal_those_of_the_seed_labels(covariance_type, weighted, dtype):
    X = make_mixture(200, 3, 2, seed=2, dtype=dtype)
    w = np.random.default_rng(0).uniform(0.5, 2.0, size=200) if weighted else None
    rows = np.array([5, 17, 150, 3])
    labels = np.full(200, -1, dtype=np.int32)
    labels[rows] = np.arange(4)
    fast = seed_statistics(X, w, rows, covariance_type)
    slow = label_statistics_of(X, w, labels, X[rows], covariance_type)
    for name in ("nk", "sx", "sxx", "shift"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name), err_msg=name)
    assert (fast.weight, fast.count) == (slow.weight, slow.count)


def test_random_rows_are_distinct_points_and_integer_weights_repeat_rows():
    X = np.repeat(make_mixture(30, 2, 2, seed=3), 3, axis=0)  # every point three times
    rows = random_rows(X, 12, np.random.RandomState(0))
    assert np.unique(X[rows], axis=0).shape[0] == 12, X[rows]
    base = make_mixture(40, 2, 2, seed=5)
    counts = np.random.default_rng(1).integers(1, 4, size=40)
    weighted = random_rows(base, 6, np.random.RandomState(2), np.cumsum(counts))
    repeated = random_rows(np.repeat(base, counts, axis=0), 6, np.random.RandomState(2))
    np.testing.assert_array_equal(base[weighted], np.repeat(base, counts, axis=0)[repeated])


def test_random_rows_skip_rows_of_zero_weight():
    X = make_mixture(50, 2, 2, seed=6)
    w = np.zeros(50)
    w[[3, 9, 20, 41]] = 1.0
    for seed in range(5):
        rows = random_rows(X, 3, np.random.RandomState(seed), np.cumsum(w))
        assert set(rows.tolist()) <= {3, 9, 20, 41}, rows


# ---------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
@pytest.mark.parametrize("compiled", [True, False])
def test_a_candidate_run_in_chunks_is_one_uninterrupted_run(covariance_type, compiled):
    X = make_mixture(400, 2, 3, seed=8)
    source = (InMemorySource(X, None, covariance_type) if compiled
              else BlockSource(_blocks(X), covariance_type))
    search, initial = _search(X, 3, covariance_type, 6, source=source)
    search.finalists()
    chunked = search.result(4)
    straight = em.run_em(source, search.m_step, initial[4], em.ConvergenceMonitor(1e-6), 500)
    assert chunked.n_iter == straight.n_iter and chunked.converged == straight.converged
    assert chunked.lower_bounds == straight.lower_bounds
    for a, b in zip(chunked.params, straight.params):
        np.testing.assert_array_equal(a, b)


def _blocks(X):
    from fastem.blocks import RowBlocks

    return RowBlocks(X, None, block_rows=150)


def test_finalists_of_a_budget_are_among_those_of_twice_the_budget():
    X = _crabs()
    for n_components, covariance_type in [(7, "tied"), (4, "full"), (6, "diag")]:
        search, _ = _search(X, n_components, covariance_type, 64)
        chosen = {budget: set(search.finalists(budget)) for budget in (4, 8, 16, 32, 64)}
        for budget in (4, 8, 16, 32):
            assert chosen[budget] <= chosen[2 * budget], (n_components, covariance_type,
                                                          budget, chosen)
        assert 0 in chosen[4], "the first candidate always runs to convergence"


def test_candidates_in_the_same_state_count_once():
    X = make_mixture(300, 2, 3, seed=9)
    m_step = MaximumLikelihood("full", 1e-6)
    starts = _Candidates(X, None, 3, _stream(1, 3, 0), None).take(3)
    a, b, c = (_initial_parameters(X, None, s, m_step) for s in starts)
    search = ShortRunEM(InMemorySource(X, None, "full"), m_step, [a, a, b, a, c], 1e-6, 500)
    # The copies of candidate 0 never win a halving: they are candidate 0.
    assert not {1, 3} & set(search.finalists())
    assert search._distinct([0, 1, 2, 3, 4], SHORT_RUN_ITERATIONS).count(0) == 1
    assert not {1, 3} & set(search._distinct([0, 1, 2, 3, 4], SHORT_RUN_ITERATIONS))


def test_search_with_no_iterations_keeps_the_first_start():
    X = make_mixture(100, 2, 2, seed=1)
    model = GaussianMixture(2, init_params="em-em", n_init=5, max_iter=0, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X)
    twin = GaussianMixture(2, init_params="kmeans", max_iter=0, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin.fit(X)
    np.testing.assert_array_equal(model.means_, twin.means_)


# ---------------------------------------------------------------------------
# select_model: budgets, determinism, threads
# ---------------------------------------------------------------------------


def _real(name):
    if name == "faithful":
        return load_demo_data()[0]
    return _crabs()


@pytest.mark.parametrize("name", ["faithful", "crabs"])
def test_twice_the_budget_never_chooses_a_worse_model_on_real_data(name):
    X = _real(name)
    budgets = (8, 16, 32, 64)
    results = [select_model(X, range(1, 10), random_state=0, n_init=b) for b in budgets]
    chosen = [float(r.table["bic"][r.best_index]) for r in results]
    for budget, fewer, more in zip(budgets, results, results[1:]):
        ok = (fewer.table["status"] == "ok") & (more.table["status"] == "ok")
        gain = more.table["log_likelihood"][ok] - fewer.table["log_likelihood"][ok]
        assert gain.min() >= -1e-8 * np.abs(fewer.table["log_likelihood"][ok]).max(), (
            f"{name}: a cell lost {-gain.min():.3g} of log-likelihood from budget {budget} "
            f"to {2 * budget}")
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(chosen, chosen[1:])), (
        f"{name}: chosen BIC by budget {dict(zip(budgets, chosen))}")


def test_only_cells_within_the_margin_get_the_whole_budget():
    X = _crabs()
    screened = select_model(X, range(1, 10), random_state=0, n_init=SCREEN_BUDGET)
    searched = select_model(X, range(1, 10), random_state=0, n_init=4 * SCREEN_BUDGET)
    best = screened.table["bic"][screened.table["status"] == "ok"].min()
    outside = (screened.table["status"] == "ok") & (screened.table["bic"] > best + SEARCH_MARGIN)
    assert outside.sum() > 20
    for name in ("log_likelihood", "bic", "n_iter"):
        np.testing.assert_array_equal(screened.table[name][outside],
                                      searched.table[name][outside], err_msg=name)


def test_same_seed_gives_the_same_table_and_one_or_two_threads_the_same_bits():
    X = _crabs()
    runs = [select_model(X, range(1, 10), random_state=5, n_init=24, n_threads=t)
            for t in (1, 2, 2)]
    for other in runs[1:]:
        for name in TABLE_DTYPE.names:
            if name != "seconds":
                np.testing.assert_array_equal(runs[0].table[name], other.table[name],
                                              err_msg=name)
        for key, model in runs[0].models.items():
            for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
                np.testing.assert_array_equal(getattr(model, name),
                                              getattr(other.models[key], name),
                                              err_msg=str((key, name)))
    different = select_model(X, range(1, 10), random_state=6, n_init=24)
    assert not np.array_equal(different.table["log_likelihood"], runs[0].table["log_likelihood"])


def test_selection_table_model_refits_from_its_start():
    # A cell's model keeps its candidate's start: refitting it reproduces the cell.
    X = make_mixture(300, 2, 3, seed=2)
    result = select_model(X, range(2, 4), ("full", "tied"), random_state=0, n_init=16)
    for key, model in result.models.items():
        refit = GaussianMixture(**model.get_params()).fit(X)
        assert refit.n_iter_ == model.n_iter_, key
        np.testing.assert_allclose(refit.means_, model.means_, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------
# GaussianMixture(init_params="em-em")
# ---------------------------------------------------------------------------


def test_em_em_with_one_candidate_is_kmeans():
    X = make_mixture(300, 2, 3, seed=3)
    a = GaussianMixture(3, init_params="em-em", n_init=1, random_state=0).fit(X)
    b = GaussianMixture(3, init_params="kmeans", n_init=1, random_state=0).fit(X)
    assert a.n_iter_ == b.n_iter_ and a.lower_bounds_ == b.lower_bounds_
    np.testing.assert_array_equal(a.means_, b.means_)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_em_em_reaches_at_least_its_kmeans_candidate(covariance_type):
    X = _crabs()
    kmeans = GaussianMixture(6, covariance_type=covariance_type, random_state=1, tol=1e-6,
                             max_iter=500).fit(X)
    searched = GaussianMixture(6, covariance_type=covariance_type, init_params="em-em",
                               n_init=32, random_state=1, tol=1e-6, max_iter=500).fit(X)
    assert searched.lower_bound_ >= kmeans.lower_bound_, (searched.lower_bound_,
                                                          kmeans.lower_bound_)
    assert searched.init_lower_bounds_[0] == kmeans.lower_bounds_


def test_em_em_beats_as_many_kmeans_starts_on_crabs():
    # Measured: (7, tied) on crabs, 40 candidates reach BIC 2841.28; 40 k-means
    # starts 2881.90 (random_state=0).
    X = _crabs()
    params = dict(covariance_type="tied", n_init=40, random_state=0, tol=1e-6, max_iter=500)
    searched = GaussianMixture(7, init_params="em-em", **params).fit(X)
    kmeans = GaussianMixture(7, init_params="kmeans", **params).fit(X)
    assert searched.bic(X) < kmeans.bic(X) - 10, (searched.bic(X), kmeans.bic(X))


def test_em_em_twice_the_budget_never_ends_lower():
    X = _crabs()
    bounds = [GaussianMixture(8, covariance_type="tied", init_params="em-em", n_init=n,
                              random_state=2, tol=1e-6, max_iter=500).fit(X).lower_bound_
              for n in (5, 10, 20, 40, 80)]
    assert all(b >= a for a, b in zip(bounds, bounds[1:])), bounds


def test_em_em_with_weights_streamed_data_missing_values_and_a_prior(tmp_path):
    X = make_mixture(400, 3, 3, seed=11)
    w = np.random.default_rng(0).uniform(0.5, 2.0, size=400)
    params = dict(init_params="em-em", n_init=12, random_state=0)
    weighted = GaussianMixture(3, **params).fit(X, sample_weight=w)
    path = tmp_path / "x.npy"
    np.save(path, X)
    streamed = GaussianMixture(3, **params).fit(np.load(path, mmap_mode="r"))
    in_memory = GaussianMixture(3, **params).fit(X)
    np.testing.assert_allclose(streamed.means_, in_memory.means_, rtol=1e-8, atol=1e-10)
    holes = X.copy()
    holes[np.random.default_rng(1).uniform(size=X.shape) < 0.1] = np.nan
    missing = GaussianMixture(3, missing="em", **params).fit(holes)
    prior = GaussianMixture(3, prior="default", **params).fit(X)
    for model in (weighted, missing, prior):
        assert np.isfinite(model.lower_bound_) and len(model.init_lower_bounds_) == 12


def test_em_em_refuses_batch_size():
    X = make_mixture(300, 2, 2, seed=0)
    with pytest.raises(ValueError, match="em-em"):
        GaussianMixture(2, init_params="em-em", batch_size=50).fit(X)


def test_a_search_runs_its_starts_in_the_compiled_loop_where_a_single_fit_would_not():
    # 4,000 x 9 components x 31^2 = 34.6M work per iteration: more than a
    # single fit on two threads runs compiled, less than one thread's bound.
    from fastem.sources import InMemorySource

    source = InMemorySource(np.zeros((4000, 30)), None, "full")
    assert source.compiled_loop_applies(9, threads=1)
    assert not source.compiled_loop_applies(9, threads=2)
    assert not InMemorySource(np.zeros((40_000, 30)), None, "full").compiled_loop_applies(
        9, threads=1)
