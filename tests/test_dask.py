"""Dask arrays: EM over row chunks on a real LocalCluster (fastem.distributed.DaskSource),
lazy predictions, a worker killed mid-fit, data persisted once."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import COVARIANCE_TYPES, make_mixture

da = pytest.importorskip("dask.array")
dask_distributed = pytest.importorskip("distributed")

from fastem import GaussianMixture  # noqa: E402
from fastem import distributed as fastem_distributed  # noqa: E402


@pytest.fixture(scope="module")
def client():
    # Worker processes with nannies (a killed worker is replaced), loopback only.
    with dask_distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None,
                                       silence_logs=logging.CRITICAL) as cluster:
        with dask_distributed.Client(cluster) as client:
            yield client


@pytest.fixture(scope="module")
def data():
    X = make_mixture(n_samples=20_000, n_features=3, n_components=3, seed=5)
    weights = np.random.default_rng(1).uniform(0.2, 3.0, size=X.shape[0])
    return X, weights


def _fit(X, sample_weight=None, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GaussianMixture(**params).fit(X, sample_weight=sample_weight)


def _same_start(X, covariance_type, max_iter=10):
    init = _fit(X, n_components=3, covariance_type=covariance_type, random_state=0,
                max_iter=0)
    return dict(n_components=3, covariance_type=covariance_type, weights_init=init.weights_,
                means_init=init.means_, precisions_init=init.precisions_, tol=1e-9,
                max_iter=max_iter)


def _assert_same_fit(found, expected, rtol=1e-10, bound_rtol=1e-12):
    assert found.n_iter_ == expected.n_iter_
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_allclose(getattr(found, name), getattr(expected, name), rtol=rtol,
                                   atol=1e-12, err_msg=name)
        assert getattr(found, name).dtype == getattr(expected, name).dtype
    np.testing.assert_allclose(found.lower_bounds_, expected.lower_bounds_, rtol=bound_rtol)


# Uneven row chunks (one of a single row) and columns in two chunks (rechunked to rows).
UNEVEN = ((1, 6999, 1, 4000, 8999), (2, 1))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_dask_fit_equals_the_in_memory_fit_from_the_same_start(client, data, covariance_type):
    X, weights = data
    params = _same_start(X, covariance_type)
    expected = _fit(X, **params)
    _assert_same_fit(_fit(da.from_array(X, chunks=(3000, 3)), **params), expected)
    # Weighted, uneven chunks; the weights chunked otherwise than the rows.
    expected = _fit(X, sample_weight=weights, **params)
    found = _fit(da.from_array(X, chunks=UNEVEN),
                 sample_weight=da.from_array(weights, chunks=5000), **params)
    _assert_same_fit(found, expected)
    assert found.n_features_in_ == 3 and not hasattr(found, "feature_names_in_")


def test_weights_are_relative_and_may_be_an_array(client, data):
    X, weights = data
    params = _same_start(X, "diag", max_iter=5)
    expected = _fit(X, sample_weight=weights, **params)
    Xd = da.from_array(X, chunks=4000)
    _assert_same_fit(_fit(Xd, sample_weight=weights * 1e-3, **params), expected)
    # Integer weights fit as repeated rows would: zero weight drops a row.
    counts = np.random.default_rng(2).integers(0, 3, size=X.shape[0])
    _assert_same_fit(_fit(Xd, sample_weight=da.from_array(counts, chunks=4000), **params),
                     _fit(X, sample_weight=counts, **params))


def test_a_worker_killed_mid_fit_is_survived_with_the_same_result(client, data, monkeypatch):
    X, weights = data
    params = _same_start(X, "full")
    Xd = da.from_array(X, chunks=(2000, 3))
    wd = da.from_array(weights, chunks=2000)
    undisturbed = _fit(Xd, sample_weight=wd, **params)
    victim = sorted(client.scheduler_info()["workers"])[0]

    def arm():  # runs in the victim: its next chunk task kills its process
        import fastem.distributed

        def die(*args):
            os.kill(os.getpid(), signal.SIGKILL)

        fastem.distributed._block_statistics = die

    statistics = fastem_distributed.DaskSource.statistics
    calls = []

    def statistics_killing_a_worker(source, parameters):
        calls.append(None)
        if len(calls) == 3:
            # The victim dies inside a task of this pass, holding persisted
            # chunks; Dask reschedules, and the nanny starts a new worker.
            client.run(arm, workers=[victim])
        return statistics(source, parameters)

    monkeypatch.setattr(fastem_distributed.DaskSource, "statistics",
                        statistics_killing_a_worker)
    survived = _fit(Xd, sample_weight=wd, **params)
    assert len(calls) == params["max_iter"]
    assert victim not in client.scheduler_info()["workers"]
    # The reduction's order depends on the chunks only: the same bits.
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(survived, name), getattr(undisturbed, name))
    assert survived.lower_bounds_ == undisturbed.lower_bounds_
    _assert_same_fit(survived, _fit(X, sample_weight=weights, **params))
    client.wait_for_workers(2, timeout=60)


def test_data_are_persisted_once_not_recomputed_each_iteration(client, tmp_path):
    log = tmp_path / "chunks.log"
    n_chunks, rows = 6, 2500

    def generate(block):  # pickled by value: it runs on the workers
        index = int(block[0])
        with open(log, "a") as f:
            f.write(f"{index}\n")
        return make_chunk(index)

    make_chunk = _chunk_maker(rows)
    X = da.arange(n_chunks, chunks=1).map_blocks(
        generate, new_axis=1, chunks=((rows,) * n_chunks, (3,)), dtype=np.float64,
        meta=np.empty((0, 0)))
    model = _fit(X, n_components=3, random_state=0, tol=0.0, max_iter=8)
    assert model.n_iter_ == 8
    made = sorted(int(line) for line in log.read_text().split())
    assert made == list(range(n_chunks)), made


def _chunk_maker(rows):
    def make_chunk(index):
        return make_mixture(n_samples=rows, n_features=3, n_components=3, seed=index)
    return make_chunk


def test_predictions_are_lazy_and_equal_the_in_memory_ones(client, data):
    X, _ = data
    model = _fit(X, n_components=3, covariance_type="full", random_state=0)
    for Xd in (da.from_array(X, chunks=3000), da.from_array(X, chunks=UNEVEN)):
        labels, proba, scores = model.predict(Xd), model.predict_proba(Xd), model.score_samples(Xd)
        for lazy in (labels, proba, scores):
            assert isinstance(lazy, da.Array)
        labels, proba, scores = (lazy.compute() for lazy in (labels, proba, scores))
        assert labels.dtype == np.int64 and labels.shape == (X.shape[0],)
        np.testing.assert_array_equal(labels, model.predict(X))
        assert proba.dtype == np.float64 and proba.shape == (X.shape[0], 3)
        np.testing.assert_allclose(proba, model.predict_proba(X), rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(scores, model.score_samples(X), rtol=1e-12)
        assert model.score(Xd) == pytest.approx(model.score(X), rel=1e-12)
        assert model.bic(Xd) == pytest.approx(model.bic(X), rel=1e-12)
    lazy = fastem_distributed.log_resp_dask(model, da.from_array(X, chunks=3000))
    np.testing.assert_allclose(np.exp(lazy.compute()), model.predict_proba(X), rtol=1e-10,
                               atol=1e-300)
    # float32 data: float32 fits and predictions, as in memory.
    X32 = X.astype(np.float32)
    found = _fit(da.from_array(X32, chunks=5000), **_same_start(X32, "diag"))
    expected = _fit(X32, **_same_start(X32, "diag"))
    _assert_same_fit(found, expected, rtol=2e-6, bound_rtol=1e-7)
    assert found.predict_proba(da.from_array(X32, chunks=5000)).dtype == np.float32
    assert found.score_samples(da.from_array(X32, chunks=5000)).dtype == np.float32


def test_default_init_fits_as_in_memory_and_from_a_sample(client, data, monkeypatch):
    X, weights = data
    Xd = da.from_array(X, chunks=3000)
    # Fewer rows than INIT_SAMPLE_ROWS: the sample is every row, in order.
    whole = _fit(Xd, n_components=3, random_state=0)
    _assert_same_fit(whole, _fit(X, n_components=3, random_state=0))
    assert whole.converged_
    # A sample of about 3,000 rows: a start as good.
    monkeypatch.setattr(fastem_distributed, "INIT_SAMPLE_ROWS", 3000)
    sampled = _fit(Xd, sample_weight=da.from_array(weights, chunks=3000), n_components=3,
                   random_state=0)
    expected = _fit(X, sample_weight=weights, n_components=3, random_state=0)
    assert sampled.converged_
    assert sampled.lower_bound_ == pytest.approx(expected.lower_bound_, abs=1e-3)


def test_bad_dask_input_is_a_clear_error(client, data):
    X, weights = data
    model = GaussianMixture(n_components=3)
    bad = X.copy()
    bad[12_345, 1] = np.nan
    with pytest.raises(ValueError, match="infinity or NaN .in the rows from 12000"):
        model.fit(da.from_array(bad, chunks=3000))
    bad[12_345, 1] = np.inf
    with pytest.raises(ValueError, match="infinity or NaN"):
        model.fit(da.from_array(bad, chunks=3000))
    with pytest.raises(ValueError, match="2-D"):
        model.fit(da.from_array(X[:, 0], chunks=3000))
    with pytest.raises(ValueError, match="real numbers"):
        model.fit(da.from_array(X.astype(str), chunks=3000))
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        model.fit(da.from_array(X[:2], chunks=1))
    Xd = da.from_array(X, chunks=3000)
    with pytest.raises(ValueError, match="non-negative"):
        model.fit(Xd, sample_weight=da.from_array(-weights, chunks=3000))
    with pytest.raises(ValueError, match="only zero weights"):
        model.fit(Xd, sample_weight=np.zeros(X.shape[0]))
    with pytest.raises(ValueError, match="sample_weight.shape"):
        model.fit(Xd, sample_weight=da.from_array(weights[:-1], chunks=3000))
    model = _fit(Xd, n_components=3, random_state=0, max_iter=2)
    with pytest.raises(ValueError, match="X has 2 features, but GaussianMixture is expecting 3"):
        model.predict(da.from_array(X[:, :2], chunks=3000))
    # Predictions are lazy: a NaN is found when its chunk is computed.
    lazy = model.score_samples(da.from_array(bad, chunks=3000))
    with pytest.raises(ValueError, match="infinity or NaN"):
        lazy.compute()
    # Rows with unknown chunk sizes (from a boolean mask) fit as the selected rows.
    kept = X[:, 0] > np.median(X[:, 0])
    params = _same_start(X[kept], "spherical", max_iter=3)
    masked = da.from_array(X, chunks=3000)[da.from_array(kept, chunks=3000)]
    _assert_same_fit(_fit(masked, **params), _fit(X[kept], **params))


def test_a_dask_array_fits_without_a_cluster_too(data):
    import dask

    X, weights = data
    params = _same_start(X, "tied", max_iter=5)
    with dask.config.set(scheduler="synchronous"):
        found = _fit(da.from_array(X, chunks=5000), sample_weight=weights, **params)
    _assert_same_fit(found, _fit(X, sample_weight=weights, **params))


def test_fastem_does_not_import_dask_for_numpy_input():
    code = ("import sys, numpy as np, fastem\n"
            "X = np.random.default_rng(0).normal(size=(300, 2))\n"
            "m = fastem.GaussianMixture(2, random_state=0).fit(X)\n"
            "m.predict(X); m.score_samples(X)\n"
            "assert not [n for n in sys.modules if n.startswith('dask')], 'dask imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
