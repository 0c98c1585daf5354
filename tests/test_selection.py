"""fastem.selection: exact criteria, scikit-learn's choices, failures, the estimator form."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
from conftest import COVARIANCE_TYPES, make_mixture, shared_csv
from scipy.special import entr
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from fastem import em
from fastem.covariance import n_free_parameters
from fastem.selection import TABLE_DTYPE, GaussianMixtureSelector, select_model
from fastem.sources import InMemorySource
from fastem.stats import MaximumLikelihood
from fastem.tables import load_demo_data

CRITERION_FIELDS = ("log_likelihood", "bic", "aic", "icl")


@pytest.fixture(scope="module")
def grid():
    """A K = 1..4 x all-covariance grid on a small three-component sample."""
    X = make_mixture(300, 2, 3, seed=2)
    return X, select_model(X, range(1, 5), random_state=0)


def cells(result):
    """(row, fitted model) of every successful cell."""
    for row in result.table:
        key = (int(row["n_components"]), str(row["covariance_type"]))
        if key in result.models:
            yield row, result.models[key]


def sklearn_twin(model, X):
    """scikit-learn's GaussianMixture fitted from a cell model's own initial parameters.

    select_model builds every cell model with ``weights_init``, ``means_init``
    and ``precisions_init`` set, so passing the same values (and tolerances)
    to scikit-learn reproduces the fit.
    """
    params = model.get_params()
    twin = SklearnGaussianMixture(
        model.n_components, covariance_type=model.covariance_type,
        weights_init=params["weights_init"], means_init=params["means_init"],
        precisions_init=params["precisions_init"], tol=model.tol, max_iter=model.max_iter,
        reg_covar=model.reg_covar,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return twin.fit(X)


def entropy(proba, sample_weight=None):
    """-sum_n w_n sum_k r_nk log r_nk, from responsibilities."""
    per_row = entr(np.asarray(proba, dtype=np.float64)).sum(axis=1)
    return float(per_row.sum() if sample_weight is None else per_row @ sample_weight)


# ---------------------------------------------------------------------------
# Free parameters
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("n_features", [1, 2, 3, 7])
@pytest.mark.parametrize("n_components", [1, 2, 5])
def test_free_parameter_count_matches_closed_form(n_components, n_features, covariance_type):
    K, D = n_components, n_features
    closed_form = {
        "full": K * (D + D * (D + 1) // 2 + 1) - 1,
        "tied": K * D + D * (D + 1) // 2 + K - 1,
        "diag": 2 * K * D + K - 1,
        "spherical": K * D + K + K - 1,
    }[covariance_type]
    assert n_free_parameters(K, D, covariance_type) == closed_form


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_free_parameter_count_matches_sklearn_fitted_model(covariance_type):
    X = make_mixture(200, 4, 3, seed=1)
    result = select_model(X, [3], [covariance_type], random_state=0)
    model = result.models[(3, covariance_type)]
    expected = sklearn_twin(model, X)._n_parameters()
    assert n_free_parameters(3, 4, covariance_type) == expected
    assert model._n_parameters() == expected
    assert result.table["n_parameters"][0] == expected


# ---------------------------------------------------------------------------
# Criteria
# ---------------------------------------------------------------------------


def test_table_criteria_equal_the_cell_models_own(grid):
    X, result = grid
    n = X.shape[0]
    for row, model in cells(result):
        cell = (row["n_components"], row["covariance_type"])
        np.testing.assert_allclose(row["bic"], model.bic(X), rtol=1e-10, err_msg=str(cell))
        np.testing.assert_allclose(row["aic"], model.aic(X), rtol=1e-10, err_msg=str(cell))
        np.testing.assert_allclose(row["log_likelihood"], model.score(X) * n, rtol=1e-10,
                                   err_msg=str(cell))
        assert row["n_iter"] == model.n_iter_ and row["converged"] == model.converged_


def test_table_criteria_equal_sklearn_fitted_from_the_same_start(grid):
    X, result = grid
    assert len(result.models) == 16
    for row, model in cells(result):
        twin = sklearn_twin(model, X)
        cell = (row["n_components"], row["covariance_type"])
        np.testing.assert_allclose(row["bic"], twin.bic(X), rtol=1e-8, err_msg=str(cell))
        np.testing.assert_allclose(row["aic"], twin.aic(X), rtol=1e-8, err_msg=str(cell))
        assert row["n_iter"] == twin.n_iter_, cell


def test_icl_is_bic_plus_twice_the_responsibility_entropy(grid):
    X, result = grid
    for row, model in cells(result):
        expected = row["bic"] + 2 * entropy(model.predict_proba(X))
        np.testing.assert_allclose(row["icl"], expected, rtol=1e-10,
                                   err_msg=str((row["n_components"], row["covariance_type"])))
        if row["n_components"] == 1:
            assert row["icl"] == row["bic"]


def test_weighted_icl_uses_the_weighted_entropy():
    X = make_mixture(150, 2, 3, seed=4)
    weights = np.random.default_rng(0).uniform(0.2, 3.0, size=X.shape[0])
    result = select_model(X, [2, 3], ["full", "diag"], random_state=0, sample_weight=weights)
    # Weights are relative: they count as rescaled to average 1 over the rows.
    weights = weights * (X.shape[0] / weights.sum())
    for row, model in cells(result):
        loglik = float(model.score_samples(X) @ weights)
        p = row["n_parameters"]
        bic = -2 * loglik + p * math.log(X.shape[0])
        np.testing.assert_allclose(row["log_likelihood"], loglik, rtol=1e-10)
        np.testing.assert_allclose(row["bic"], bic, rtol=1e-10)
        np.testing.assert_allclose(row["aic"], -2 * loglik + 2 * p, rtol=1e-10)
        np.testing.assert_allclose(row["icl"], bic + 2 * entropy(model.predict_proba(X),
                                                                 weights), rtol=1e-10)


def test_old_faithful_bic_choice_agrees_with_sklearn():
    X = shared_csv("faithful.csv")
    result = select_model(X, range(1, 10), random_state=0)
    assert len(result.models) == 36
    sklearn_bic = {key: sklearn_twin(model, X).bic(X) for key, model in result.models.items()}
    sklearn_choice = min(sklearn_bic, key=sklearn_bic.get)
    assert result.best_params == sklearn_choice, (
        f"fastem chose {result.best_params} (BIC {result.table['bic'][result.best_index]:.6f}),"
        f" scikit-learn {sklearn_choice} (BIC {sklearn_bic[sklearn_choice]:.6f})")
    assert result.best_model is result.models[sklearn_choice]


@pytest.mark.parametrize("criterion", ["bic", "aic", "icl"])
def test_best_cell_has_the_lowest_criterion(grid, criterion):
    X, _ = grid
    result = select_model(X, range(1, 5), random_state=0, criterion=criterion)
    values = result.table[criterion]
    assert result.best_index == int(np.nanargmin(values))
    assert result.criterion == criterion
    assert result.best_params == (int(result.table["n_components"][result.best_index]),
                                  str(result.table["covariance_type"][result.best_index]))


# ---------------------------------------------------------------------------
# Failures and bad arguments
# ---------------------------------------------------------------------------


def test_cell_with_more_components_than_rows_fails_without_stopping_the_grid():
    X = make_mixture(8, 2, 2, seed=0)
    calls = []
    result = select_model(X, [1, 9, 2], ["full", "spherical"], random_state=0,
                          progress=lambda *args: calls.append(args))
    table = result.table
    failed = table["n_components"] == 9
    assert failed.sum() == 2
    for row in table[failed]:
        assert str(row["status"]).startswith("failed"), row["status"]
        for name in CRITERION_FIELDS:
            assert np.isnan(row[name]), (name, row[name])
    # The cells after the failed ones were still fitted (two components on
    # eight rows may legitimately end degenerate, but not failed).
    assert not any(str(s).startswith("failed") for s in table["status"][~failed])
    assert [(k, c) for k, c in result.models] == [(1, "full"), (1, "spherical"),
                                                 (2, "full"), (2, "spherical")]
    assert result.best_params[0] != 9
    assert [call[:4] for call in calls] == [
        (1, 6, 1, "full"), (2, 6, 1, "spherical"), (3, 6, 9, "full"),
        (4, 6, 9, "spherical"), (5, 6, 2, "full"), (6, 6, 2, "spherical")]
    assert [call[4] for call in calls] == [str(s) for s in table["status"]]


def test_grid_where_every_cell_fails_raises():
    X = make_mixture(5, 2, 2, seed=0)
    with pytest.raises(ValueError, match="no cell of the grid could be fitted"):
        select_model(X, [6, 7], random_state=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"criterion": "bic2"}, "criterion"),
    ({"criterion": "likelihood"}, "criterion"),
    ({"covariance_types": ("full", "banana")}, "covariance_types"),
    ({"covariance_types": ()}, "covariance_types"),
    ({"n_components": []}, "n_components"),
    ({"n_components": [0, 1]}, "n_components"),
    ({"n_init": 0}, "n_init"),
    ({"init_params": "random"}, "init_params"),
], ids=["criterion", "criterion-word", "covariance", "no-covariance", "no-K", "zero-K",
        "n_init", "init"])
def test_bad_arguments_raise_value_error(grid, kwargs, message):
    X, _ = grid
    with pytest.raises(ValueError, match=message):
        select_model(X, **kwargs)


# ---------------------------------------------------------------------------
# Weights, determinism, presentation
# ---------------------------------------------------------------------------


def test_integer_weights_give_the_fits_of_repeated_rows():
    # The starts coincide: k-means++ draws the first centre with probability
    # proportional to the weight and the candidates from the cumulative sum of
    # w * D^2, whose steps are the same over the repeated rows, so the same
    # uniforms pick the same points; Lloyd's k-means and EM then see the same
    # sums. The criteria differ by the rule for weights (relative: the data
    # count as their 120 rows, not as the 240 repeated ones).
    X = make_mixture(120, 2, 3, seed=1)
    counts = np.random.default_rng(0).integers(1, 4, size=X.shape[0])
    grid = dict(n_components=range(1, 4), covariance_types=["full", "diag"], random_state=0)
    weighted = select_model(X, sample_weight=counts, **grid)
    repeated = select_model(np.repeat(X, counts, axis=0), **grid)
    for key, model in weighted.models.items():
        twin = repeated.models[key]
        for name in ("weights_", "means_", "covariances_"):
            np.testing.assert_allclose(getattr(model, name), getattr(twin, name), rtol=1e-6,
                                       atol=1e-9, err_msg=str((key, name)))
    share = X.shape[0] / counts.sum()
    np.testing.assert_allclose(weighted.table["log_likelihood"],
                               share * repeated.table["log_likelihood"], rtol=1e-6)
    p = weighted.table["n_parameters"]
    np.testing.assert_allclose(
        weighted.table["bic"], -2 * weighted.table["log_likelihood"] + p * np.log(X.shape[0]),
        rtol=1e-10)


def test_same_random_state_gives_the_same_table(grid):
    X, first = grid
    second = select_model(X, range(1, 5), random_state=0)
    for name in TABLE_DTYPE.names:
        if name != "seconds":
            np.testing.assert_array_equal(first.table[name], second.table[name], err_msg=name)


def test_format_table_has_one_line_per_cell_and_marks_the_best(grid):
    _, result = grid
    lines = result.format_table().splitlines()
    assert len(lines) == 2 + len(result.table)
    marked = [i for i, line in enumerate(lines[2:]) if "*" in line]
    assert marked == [result.best_index]
    k, covariance_type = result.best_params
    assert lines[2 + result.best_index].split()[:2] == [str(k), covariance_type]


def test_to_dataframe_holds_the_table():
    pd = pytest.importorskip("pandas")
    X = make_mixture(100, 2, 2, seed=3)
    result = select_model(X, [1, 2], random_state=0)
    frame = result.to_dataframe()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == list(TABLE_DTYPE.names)
    for name in TABLE_DTYPE.names:
        np.testing.assert_array_equal(frame[name].to_numpy(), result.table[name])


# ---------------------------------------------------------------------------
# GaussianMixtureSelector
# ---------------------------------------------------------------------------


def test_selector_in_a_pipeline_with_a_scaler():
    X = make_mixture(240, 3, 3, seed=5) * np.array([1.0, 50.0, 0.02])
    pipe = Pipeline([("scale", StandardScaler()),
                     ("gmm", GaussianMixtureSelector(n_components=range(1, 5),
                                                     random_state=0))])
    labels = pipe.fit(X).predict(X)
    selector = pipe.named_steps["gmm"]
    Z = pipe.named_steps["scale"].transform(X)
    np.testing.assert_array_equal(labels, selector.best_estimator_.predict(Z))
    np.testing.assert_array_equal(pipe.predict_proba(X), selector.best_estimator_.predict_proba(Z))
    np.testing.assert_array_equal(pipe.score_samples(X), selector.best_estimator_.score_samples(Z))
    direct = select_model(Z, range(1, 5), random_state=0)
    assert (selector.n_components_, selector.covariance_type_) == direct.best_params
    np.testing.assert_array_equal(selector.table_["bic"], direct.table["bic"])


def test_selector_clones_unfitted_with_the_same_parameters_and_refits_identically():
    X = make_mixture(200, 2, 3, seed=6)
    selector = GaussianMixtureSelector(n_components=[1, 2, 3], covariance_types=("full", "diag"),
                                       criterion="icl", random_state=0).fit(X)
    twin = clone(selector)
    assert twin.get_params() == selector.get_params()
    with pytest.raises(NotFittedError):
        twin.predict(X)
    twin.fit(X)
    assert (twin.n_components_, twin.covariance_type_) == (selector.n_components_,
                                                           selector.covariance_type_)
    np.testing.assert_array_equal(twin.predict(X), selector.predict(X))

    pipe = clone(Pipeline([("scale", StandardScaler()), ("gmm", selector)]))
    pipe.set_params(gmm__criterion="aic")
    assert pipe.named_steps["gmm"].criterion == "aic"
    assert not hasattr(pipe.named_steps["gmm"], "best_estimator_")


def test_selector_predict_equals_best_estimator_predict():
    X = make_mixture(200, 2, 3, seed=7)
    selector = GaussianMixtureSelector(n_components=range(1, 5), random_state=0).fit(X)
    best = selector.best_estimator_
    np.testing.assert_array_equal(selector.predict(X), best.predict(X))
    assert selector.score(X) == best.score(X)
    assert selector.bic(X) == best.bic(X)
    with pytest.raises(ValueError, match="features"):
        selector.predict(X[:, :1])


def test_grid_is_the_same_on_one_and_two_threads():
    # A cell's starts run at once from several threads; each runs the same
    # serial loop, so the table cannot depend on the thread count.
    X = make_mixture(300, 2, 3, seed=5)
    one, two = (select_model(X, range(1, 5), random_state=0, n_threads=t) for t in (1, 2))
    for name in TABLE_DTYPE.names:
        if name != "seconds":
            np.testing.assert_array_equal(one.table[name], two.table[name], err_msg=name)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_starts_fitted_together_match_fits_one_by_one(covariance_type):
    from fastem import GaussianMixture
    from fastem.stats import GaussianParameters

    X = make_mixture(400, 2, 3, seed=6)
    rng = np.random.default_rng(0)
    starts = []
    for i in range(4):
        means = X[rng.choice(X.shape[0], 3, replace=False)].copy()
        if i == 3:
            means[2] = 1e3  # no row near it: collapses, the Python loop takes over
        reference = GaussianMixture(3, covariance_type=covariance_type, means_init=means,
                                    max_iter=0, random_state=i).fit(X)
        starts.append(GaussianParameters(np.full(3, 1 / 3), means, reference.covariances_,
                                         reference.precisions_cholesky_))
    source = InMemorySource(X, None, covariance_type)
    m_step = MaximumLikelihood(covariance_type, 1e-6)
    monitor = em.ConvergenceMonitor(1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        together = em.run_starts(source, m_step, starts, monitor, 200)
        alone = [em.run_em(source, m_step, start, monitor, 200) for start in starts]
    assert together[3].n_iter > 0 and np.all(np.abs(together[3].params.means) < 100), \
        "not repaired"
    for a, b in zip(together, alone):
        # The same compiled loop, only run from several threads: bit for bit.
        assert a.n_iter == b.n_iter and a.converged == b.converged
        assert a.lower_bounds == b.lower_bounds
        for u, v in zip(a.params, b.params):
            np.testing.assert_array_equal(u, v)


def test_tied_starts_side_by_side_keep_their_own_whitened_rows():
    """A tied model's starts run at once on one source (compiled loops on two
    threads), each transforming the rows under its own parameters: bit for
    bit the fits one by one."""
    from fastem.initialization import seed_statistics

    X = make_mixture(1500, 26, 3, seed=11)  # wide: the whitened rows
    rng = np.random.default_rng(1)
    source = InMemorySource(X, None, "tied")
    assert source._whitens(3) and source.compiled_loop_applies(3)
    m_step = MaximumLikelihood("tied", 1e-6)
    starts = []
    for _ in range(2):
        rows = rng.choice(X.shape[0], 3, replace=False)
        starts.append(m_step(seed_statistics(X, None, rows, "tied"))[0])
    monitor = em.ConvergenceMonitor(0.0)
    together = em.run_starts(source, m_step, starts, monitor, 60)
    alone = [em.run_em(source, m_step, start, monitor, 60) for start in starts]
    assert together[0].lower_bounds != together[1].lower_bounds
    for a, b in zip(together, alone):
        assert a.lower_bounds == b.lower_bounds
        for u, v in zip(a.params, b.params):
            np.testing.assert_array_equal(u, v)


def _fit_two_starts(_=None):
    from fastem import GaussianMixture
    from fastem.stats import GaussianParameters

    X = make_mixture(300, 2, 2, seed=9)
    fitted = GaussianMixture(2, max_iter=0, means_init=X[:2], random_state=0).fit(X)
    start = GaussianParameters(fitted.weights_, fitted.means_, fitted.covariances_,
                               fitted.precisions_cholesky_)
    results = em.run_starts(InMemorySource(X, None, "full"), MaximumLikelihood("full", 1e-6),
                            [start, start], em.ConvergenceMonitor(1e-3), 100)
    return [r.lower_bound for r in results]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_starts_run_together_in_a_forked_child():
    # The child inherits the parent's thread pool object but not its threads;
    # without a fresh pool it would wait forever.
    import multiprocessing

    parent = _fit_two_starts()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(_fit_two_starts).get(timeout=120)
    assert child == parent


def _nested_runs(X, n_inits, **params):
    results = [select_model(X, n_init=n, random_state=0, **params) for n in n_inits]
    return results


@pytest.mark.parametrize("data", ["faithful", "crabs"])
def test_more_starts_never_choose_a_worse_model_on_real_data(data):
    if data == "faithful":
        X = load_demo_data()[0]
        params = dict(n_components=range(1, 6))
    else:
        X = shared_csv("crabs.csv", ["FL", "RW", "CL", "CW", "BD"])
        params = dict(n_components=range(1, 5), init_params="kmeans")
    results = _nested_runs(X, [1, 2, 4, 6], **params)
    chosen = [result.table[result.criterion].min() for result in results]
    # The starts of n_init = m + 1 begin with those of n_init = m: every cell's
    # log-likelihood, and so the chosen criterion, can only improve.
    for fewer, more in zip(results, results[1:]):
        ok = (fewer.table["status"] == "ok") & (more.table["status"] == "ok")
        assert np.all(more.table["log_likelihood"][ok]
                      >= fewer.table["log_likelihood"][ok] - 1e-6 * np.abs(
                          fewer.table["log_likelihood"][ok]))
    assert all(b <= a + 1e-6 * abs(a) for a, b in zip(chosen, chosen[1:]))
