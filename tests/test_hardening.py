"""Hardening: extreme values, relative sample weights, interrupts, child
processes and argument validation (no traceback, no hang, no silently wrong
answer)."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from conftest import COVARIANCE_TYPES, make_mixture

from fastem import GaussianMixture, reference, selection
from fastem.initialization import distance_scale, kmeans_plusplus_from_draws
from fastem.selection import select_model


def _quiet_fit(model, X, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(X, **kwargs)


def _two_clusters(n=300, d=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    X[: n // 2] += 6.0
    return X


# ---------------------------------------------------------------- extreme values
def test_outlier_beyond_float64_squares_is_a_clear_error_for_one_component():
    X = _two_clusters()
    X[0] = 1e200  # its variance, about 1e397, is beyond float64
    with pytest.raises(ValueError, match="float64 range"):
        _quiet_fit(GaussianMixture(1), X)


def test_outlier_beyond_float64_squares_gets_its_own_component():
    X = _two_clusters()
    X[0] = 1e200
    model = _quiet_fit(GaussianMixture(3, random_state=0), X)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert np.all(np.isfinite(getattr(model, name)))
    labels = model.predict(X)
    assert np.sum(labels == labels[0]) == 1  # the outlier alone
    assert np.isclose(model.means_[labels[0]], 1e200, rtol=1e-12).all()


@pytest.mark.parametrize("n_samples", [300, 30_000])  # compiled and Python-driven loops
def test_data_spread_beyond_float64_covariances_is_a_clear_error(n_samples):
    X = make_mixture(n_samples=n_samples, n_features=2, n_components=2) * 1e155
    with pytest.raises(ValueError, match="float64 range.*Rescale"):
        _quiet_fit(GaussianMixture(2, random_state=0), X)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_data_near_the_float64_limit_fit_as_their_rescaled_copy(covariance_type):
    """X * 2**508 (about 8e152, variances about 1e306) is the same problem as X:
    the fit must be 2**508 times the fit of X (reg_covar is negligible there)."""
    X = make_mixture(n_samples=400, n_features=2, n_components=2, seed=1)
    scale = 2.0**508
    small = _quiet_fit(GaussianMixture(2, covariance_type=covariance_type, random_state=0,
                                       reg_covar=0.0), X)
    large = _quiet_fit(GaussianMixture(2, covariance_type=covariance_type, random_state=0,
                                       reg_covar=0.0), X * scale)
    np.testing.assert_allclose(large.weights_, small.weights_, rtol=1e-9)
    np.testing.assert_allclose(large.means_ / scale, small.means_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(large.covariances_ / scale**2, small.covariances_, rtol=1e-8,
                               atol=1e-12)


@pytest.mark.parametrize("n_rows", [3, 40_000, 200_001])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_largest_magnitude_sees_every_row_range(n_rows, dtype):
    # The fit's finiteness check and data scale read it: a NaN or an infinity
    # in any of its row ranges (first, last) must show, as must the extreme.
    from fastem.scaling import largest_magnitude

    X = np.random.default_rng(n_rows).normal(size=(n_rows, 3)).astype(dtype)
    X[n_rows // 2, 1] = -7e3
    assert largest_magnitude(X) == 7e3
    for row, bad in ((0, np.inf), (n_rows - 1, -np.inf), (n_rows - 1, np.nan)):
        Y = X.copy()
        Y[row, 2] = bad
        result = largest_magnitude(Y)
        assert np.isnan(result) if np.isnan(bad) else result == np.inf


def test_kmeans_on_extreme_data_chooses_as_on_the_rescaled_copy():
    X = _two_clusters(n=500, d=3)
    X[7] = 1e200
    rng = np.random.default_rng(3)
    uniforms = rng.uniform(size=(3, 3))
    scale = distance_scale(X)
    assert scale < 1.0 and np.log2(scale) == int(np.log2(scale))
    assert distance_scale(_two_clusters()) == 1.0
    _, fast = kmeans_plusplus_from_draws(X, 4, uniforms, 11)
    _, twin = reference.kmeans_plusplus(X * scale, 4, uniforms, 11)
    np.testing.assert_array_equal(fast, twin)
    assert 7 in fast  # the outlier is the farthest row: it becomes a centre


@pytest.mark.parametrize("n_features", [2, 30])  # loop and BLAS engines
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("dtype, far", [(np.float64, 1e155), (np.float64, 1e300),
                                        (np.float32, 1e20)])
def test_far_rows_get_the_limit_of_their_responsibilities(n_features, covariance_type, dtype,
                                                          far):
    X = _two_clusters(n=400, d=n_features).astype(dtype)
    model = _quiet_fit(GaussianMixture(2, covariance_type=covariance_type, random_state=0), X)
    batch = X[:6].copy()
    batch[0] = far
    batch[1, 0] = -far
    proba = model.predict_proba(batch)
    log_resp = model._log_resp(batch)[0]
    score = model.score_samples(batch)
    assert np.all(np.isfinite(proba)) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.exp(log_resp), proba, atol=1e-6)
    assert np.all(score[:2] < -1e30)  # beyond the range: -inf, or its float64 value
    # The other rows of the batch are untouched by the far ones (a batch of the
    # same shape: BLAS may round differently for another number of rows).
    np.testing.assert_array_equal(proba[2:], model.predict_proba(X[:6])[2:])
    np.testing.assert_array_equal(score[2:], model.score_samples(X[:6])[2:])


def test_far_row_goes_to_the_component_that_decays_slowest():
    # Component 1 is ten times wider along x: far along x, it explains the row.
    model = GaussianMixture(2, covariance_type="diag")
    model.weights_ = np.array([0.9, 0.1])
    model.means_ = np.array([[0.0, 0.0], [1.0, 0.0]])
    model.covariances_ = np.array([[1.0, 1.0], [100.0, 1.0]])
    model.precisions_cholesky_ = 1.0 / np.sqrt(model.covariances_)
    model.n_features_in_ = 2
    model.converged_ = True
    far = np.array([[1e200, 0.0], [0.0, 1e200], [0.0, 0.0]])
    proba = model.predict_proba(far)
    np.testing.assert_array_equal(proba[0], [0.0, 1.0])
    # Equal variances along y: the same decay, an exact tie shared evenly.
    np.testing.assert_array_equal(proba[1], [0.5, 0.5])
    assert proba[2, 0] > 0.9


@pytest.mark.parametrize("init_params", ["hierarchical", "em-em"])
def test_a_failing_cell_is_a_row_of_the_table(monkeypatch, init_params):
    X = _two_clusters()
    if init_params == "em-em":
        real_run = selection._ShortRunCell.run

        def failing_run(self, budget):
            if self.covariance_type == "tied" and self.n_components == 2:
                raise RuntimeError("simulated kernel failure")
            return real_run(self, budget)

        monkeypatch.setattr(selection._ShortRunCell, "run", failing_run)
    else:
        real = selection._fit_cell

        def fail_for_tied(X, sw, k, covariance_type, *args):
            if covariance_type == "tied" and k == 2:
                raise RuntimeError("simulated kernel failure")
            return real(X, sw, k, covariance_type, *args)

        monkeypatch.setattr(selection, "_fit_cell", fail_for_tied)
    result = select_model(X, n_components=[1, 2], covariance_types=["full", "tied"], n_init=1,
                          random_state=0, init_params=init_params)
    status = {(int(r["n_components"]), str(r["covariance_type"])): str(r["status"])
              for r in result.table}
    assert status[(2, "tied")].startswith("failed: simulated kernel failure")
    assert status[(2, "full")] == "ok"
    assert result.best_model.n_components == 2


# ------------------------------------------------------------------ sample weights
@pytest.mark.parametrize("factor", [1e-20, 1e-12, 1.0 / 300, 1e12])
def test_the_scale_of_sample_weights_changes_nothing(factor):
    X = _two_clusters()
    weights = np.random.default_rng(0).uniform(0.5, 2.0, size=X.shape[0])
    weights[:5] = 0.0
    base = _quiet_fit(GaussianMixture(2, random_state=0), X, sample_weight=weights)
    scaled = _quiet_fit(GaussianMixture(2, random_state=0), X, sample_weight=weights * factor)
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(scaled, name), getattr(base, name), rtol=1e-10,
                                   atol=1e-12)
    assert scaled.lower_bound_ == pytest.approx(base.lower_bound_, rel=1e-12)


def test_the_scale_of_sample_weights_changes_no_criterion_or_decision():
    X = _two_clusters()
    weights = np.random.default_rng(1).uniform(0.5, 2.0, size=X.shape[0])
    grid = dict(n_components=[1, 2, 3], covariance_types=["full", "spherical"], n_init=2,
                random_state=0)
    base = select_model(X, sample_weight=weights, **grid).table
    for factor in (1.0 / weights.sum(), 1e-18):
        table = select_model(X, sample_weight=weights * factor, **grid).table
        np.testing.assert_array_equal(table["status"], base["status"])
        for column in ("bic", "aic", "icl", "log_likelihood"):
            np.testing.assert_allclose(table[column], base[column], rtol=1e-9)


def test_bic_counts_the_rows_of_positive_weight():
    X = _two_clusters()
    weights = np.ones(X.shape[0])
    weights[:100] = 0.0
    result = select_model(X, n_components=[2], covariance_types=["full"], n_init=1,
                          random_state=0, sample_weight=weights)
    row = result.table[0]
    p = int(row["n_parameters"])
    assert row["bic"] == pytest.approx(-2 * row["log_likelihood"] + p * np.log(200), rel=1e-12)


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("change", [dict(covariance_type="diag"), dict(n_components=3),
                                    dict(covariance_type="tied")])
def test_warm_start_after_changing_the_model_is_a_clear_error(change):
    X = _two_clusters()  # D = 2 = K: 'diag' and 'tied' factors have the same shape
    model = _quiet_fit(GaussianMixture(2, warm_start=True, random_state=0), X)
    if change.get("covariance_type") == "tied":
        model = _quiet_fit(GaussianMixture(2, covariance_type="diag", warm_start=True,
                                           random_state=0), X)
    model.set_params(**change)
    with pytest.raises(ValueError, match="warm_start=True"):
        model.fit(X)


def test_warm_start_with_new_features_is_a_clear_error():
    model = _quiet_fit(GaussianMixture(2, warm_start=True, random_state=0), _two_clusters())
    with pytest.raises(ValueError, match="warm_start"):
        model.fit(_two_clusters(d=3))


@pytest.mark.parametrize("arguments, message", [
    (dict(n_components="12"), "'n_components' parameter of select_model"),
    (dict(n_components=[2.7]), "'n_components' parameter"),
    (dict(n_components=[0, 2]), "'n_components' parameter"),
    (dict(n_components=[True]), "'n_components' parameter"),
    (dict(n_components=[]), "'n_components' parameter"),
    (dict(tol=-1), "'tol' parameter of select_model"),
    (dict(tol=np.nan), "'tol' parameter"),
    (dict(reg_covar=np.nan), "'reg_covar' parameter"),
    (dict(reg_covar=-1.0), "'reg_covar' parameter"),
    (dict(max_iter=-5), "'max_iter' parameter"),
    (dict(n_init=0), "'n_init' parameter"),
    (dict(n_threads="abc"), "'n_threads' parameter"),
    (dict(criterion="bayes"), "'criterion' parameter"),
    (dict(covariance_types=["ful"]), "'covariance_types' parameter"),
    (dict(init_params="random"), "'init_params' parameter"),
])
def test_select_model_validates_its_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        select_model(_two_clusters(), **arguments)


def test_select_model_accepts_one_k():
    result = select_model(_two_clusters(), n_components=2, covariance_types="full", n_init=1,
                          random_state=0)
    assert result.table.shape == (1,) and result.best_model.n_components == 2


def test_select_model_keeps_feature_names():
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame(_two_clusters(), columns=["eruptions", "waiting"])
    result = select_model(frame, n_components=[1, 2], covariance_types=["full"], n_init=1,
                          random_state=0)
    for model in result.models.values():
        assert list(model.feature_names_in_) == ["eruptions", "waiting"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "X does not have valid feature names"
        result.best_model.predict(frame)


# ----------------------------------------------------------- interrupts and children
_INTERRUPTED = textwrap.dedent("""
    import os, signal, threading, time, warnings
    import numpy as np
    from fastem import GaussianMixture
    from fastem.selection import select_model
    warnings.simplefilter("ignore")
    X = np.random.default_rng(0).normal(size=({rows}, {columns}))
    {warm}  # compiled beforehand
    sent = []
    def interrupt():
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)
    threading.Timer(2.0, interrupt).start()
    try:
        {work}
    except KeyboardInterrupt:
        print(f"KeyboardInterrupt after {{time.perf_counter() - sent[0]:.3f}}")
""")
_INTERRUPTED_WORK = {
    # Large passes: delivered between kernel calls (about 0.2 s of work each).
    "large fit": dict(rows=1_500_000, columns=20,
                      warm="GaussianMixture(2, max_iter=1, random_state=0).fit(X[:5000])",
                      work="GaussianMixture(8, max_iter=10_000, tol=0.0).fit(X)"),
    # Kernels that return arrays (the compiled EM loop, the M-step) must not
    # turn Ctrl-C into a SystemError that the grid records as a failed cell.
    "selection": dict(rows=1000, columns=3,
                      warm="select_model(X[:200], n_components=[1, 2], n_init=1)",
                      work="select_model(X, range(1, 30), n_init=20, max_iter=1000, tol=0.0)"),
}


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("work", sorted(_INTERRUPTED_WORK))
def test_ctrl_c_is_a_prompt_keyboard_interrupt(work, threads):
    env = {**__import__("os").environ, "FASTEM_NUM_THREADS": threads}
    script = _INTERRUPTED.format(**_INTERRUPTED_WORK[work])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("KeyboardInterrupt after"), done.stdout + done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 5.0


def _fit_in_child(n_features):
    X = make_mixture(n_samples=20_000, n_features=n_features, n_components=2, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(GaussianMixture(2, random_state=0).fit(X).lower_bound_)


@pytest.mark.skipif(sys.platform != "linux", reason="fork is Linux's default start method")
def test_forked_pool_fits_after_a_parallel_fit_in_the_parent():
    from fastem import _threads

    # A fit large enough to run on the thread pool, with both engines.
    for n_features in (4, 30):
        X = make_mixture(n_samples=20_000, n_features=n_features, n_components=2, seed=2)
        with _threads.limit(2):
            _quiet_fit(GaussianMixture(2, random_state=0), X)
    expected = [_fit_in_child(d) for d in (4, 30)]
    pool = multiprocessing.get_context("fork").Pool(2)
    try:
        found = pool.map_async(_fit_in_child, [4, 30]).get(timeout=240)
    finally:
        pool.terminate()
        pool.join()
    assert found == expected
