"""Out-of-core EM: memory-mapped arrays and streams of row blocks as statistics
sources of the one EM driver (fastem.sources.BlockSource)."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
from conftest import COVARIANCE_TYPES, make_mixture

from fastem import GaussianMixture
from fastem.blocks import RowBlocks, is_out_of_core


def _fit(data, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample_weight = params.pop("sample_weight", None)
        return GaussianMixture(**params).fit(data, sample_weight=sample_weight)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    X = make_mixture(n_samples=30_000, n_features=3, n_components=3, seed=5)
    weights = np.random.default_rng(1).uniform(0.2, 3.0, size=X.shape[0])
    folder = tmp_path_factory.mktemp("ooc")
    np.save(folder / "X.npy", X)
    np.save(folder / "w.npy", weights)
    return X, weights, folder


def _same_start(X, covariance_type):
    init = _fit(X, n_components=3, covariance_type=covariance_type, random_state=0, max_iter=0)
    return dict(n_components=3, covariance_type=covariance_type, weights_init=init.weights_,
                means_init=init.means_, precisions_init=init.precisions_, tol=1e-9,
                max_iter=40)


def _assert_same_fit(found, expected):
    assert found.n_iter_ == expected.n_iter_
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_allclose(getattr(found, name), getattr(expected, name), rtol=1e-10,
                                   atol=1e-12, err_msg=name)
    assert found.lower_bound_ == pytest.approx(expected.lower_bound_, rel=1e-12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_every_out_of_core_input_fits_as_the_array_from_the_same_start(saved, covariance_type,
                                                                       weighted):
    X, weights, folder = saved
    params = _same_start(X, covariance_type)
    w = weights if weighted else None
    expected = _fit(X, sample_weight=w, **params)
    mapped = np.load(folder / "X.npy", mmap_mode="r")
    mapped_w = np.load(folder / "w.npy", mmap_mode="r") if weighted else None
    assert is_out_of_core(mapped) and not is_out_of_core(X)

    def stream():  # a fresh iterator per pass, blocks of uneven sizes
        for start, stop in ((0, 1), (1, 7000), (7000, 7001), (7001, X.shape[0])):
            yield (X[start:stop], weights[start:stop]) if weighted else X[start:stop]

    inputs = {
        "np.load mmap": (mapped, mapped_w),
        "np.memmap blocks": (RowBlocks(np.memmap(folder / "X.npy", mode="r", dtype=np.float64,
                                                 offset=mapped.offset, shape=X.shape),
                                       mapped_w, block_rows=4096), None),
        "callable": (stream, None),
    }
    for name, (data, sample_weight) in inputs.items():
        found = _fit(data, sample_weight=sample_weight, **params)
        _assert_same_fit(found, expected)


def test_default_init_samples_the_rows(saved, monkeypatch):
    X, _, folder = saved
    mapped = np.load(folder / "X.npy", mmap_mode="r")
    # At most INIT_SAMPLE_ROWS rows: the sample is all of them, in order.
    whole = _fit(mapped, n_components=3, random_state=0)
    _assert_same_fit(whole, _fit(X, n_components=3, random_state=0))
    # A smaller sample: a good fit still, from a start drawn on about 3,000 rows.
    from fastem import mixture

    monkeypatch.setattr(mixture, "INIT_SAMPLE_ROWS", 3000)
    sampled = _fit(mapped, n_components=3, random_state=0, n_init=2)
    assert sampled.lower_bound_ == pytest.approx(whole.lower_bound_, abs=1e-3)
    assert sampled.n_features_in_ == 3 and not hasattr(sampled, "feature_names_in_")


def test_anonymous_memory_is_bounded_by_the_blocks_and_the_sample(tmp_path, monkeypatch):
    from fastem import blocks, mixture

    n_samples, n_features = 400_000, 8
    mapped = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float64,
                                       shape=(n_samples, n_features))
    rng = np.random.default_rng(0)
    for start in range(0, n_samples, 100_000):
        mapped[start:start + 100_000] = (rng.normal(size=(100_000, n_features))
                                         + 4.0 * rng.integers(0, 3, size=(100_000, 1)))
    mapped.flush()
    data = np.load(tmp_path / "big.npy", mmap_mode="r")
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 1 << 20)
    monkeypatch.setattr(mixture, "INIT_SAMPLE_ROWS", 20_000)
    _fit(data[:5000].copy(), n_components=3, random_state=0)  # compiled beforehand
    tracemalloc.start()
    try:
        model = _fit(data, n_components=3, random_state=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.all(np.isfinite(model.means_))
    # The data are 25.6 MB; a block is 1 MiB and the sample 1.3 MB (measured 3.2 MB in
    # all; reading the rows into memory, as before, peaked at 37 MB).
    assert peak < 8e6, peak


def test_bad_blocks_are_clear_errors(saved):
    X, _, _ = saved
    with_nan = X[:2000].copy()
    with_nan[1500, 1] = np.nan

    def blocks_of(*parts):
        return lambda: iter(parts)

    cases = [
        (blocks_of(X[:1000], with_nan[1000:]), "infinity or NaN.*from 1000"),
        (blocks_of(X[:1000], X[1000:2000, :2]), "2 features, the first had 3"),
        (blocks_of(X[:100].ravel()), "2-D blocks"),
        (blocks_of((X[:100], -np.ones(100))), "non-negative"),
        (blocks_of((X[:100], np.ones(99))), r"shape \(99,\), expected \(100,\)"),
        (blocks_of(), "no blocks"),
        (blocks_of(X[:2]), "n_samples >= n_components"),
        (blocks_of(X[:100].astype(str)), "numeric"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            _fit(data, n_components=3)


def test_warm_start_and_predictions_on_a_memory_map(saved):
    X, _, folder = saved
    mapped = np.load(folder / "X.npy", mmap_mode="r")
    model = _fit(mapped, n_components=3, random_state=0, max_iter=3, warm_start=True)
    first = model.n_iter_
    _fit_again = model.fit(mapped)
    assert _fit_again is model and model.n_iter_ >= 1 and first == 3
    np.testing.assert_array_equal(model.predict(mapped[:500]), model.predict(X[:500]))


def test_select_model_streams_memory_mapped_data(saved):
    from fastem.selection import select_model

    X, weights, folder = saved
    mapped = np.load(folder / "X.npy", mmap_mode="r")
    mapped_w = np.load(folder / "w.npy", mmap_mode="r")
    grid = dict(n_components=[2, 3], covariance_types=["full", "diag"], n_init=2,
                random_state=0)
    for data, w in ((mapped, None), (mapped, mapped_w)):
        streamed = select_model(data, sample_weight=w, **grid)
        in_memory = select_model(X, sample_weight=None if w is None else weights, **grid)
        # Fewer rows than INIT_SAMPLE_ROWS: the same starts; EM through the
        # Python-driven loop instead of the compiled one, so equal to rounding.
        np.testing.assert_array_equal(streamed.table["status"], in_memory.table["status"])
        for column in ("log_likelihood", "bic", "icl"):
            np.testing.assert_allclose(streamed.table[column], in_memory.table[column],
                                       rtol=1e-9)
        assert streamed.best_params == in_memory.best_params


def test_select_model_on_a_stream_of_blocks(saved, monkeypatch):
    from fastem import selection
    from fastem.selection import select_model

    X, _, _ = saved
    monkeypatch.setattr(selection, "INIT_SAMPLE_ROWS", 5000)
    result = select_model(lambda: (X[i:i + 4000] for i in range(0, X.shape[0], 4000)),
                          n_components=[1, 2, 3, 4], covariance_types=["full"], n_init=2,
                          random_state=0)
    assert result.best_params == (3, "full")
    assert result.best_model.n_features_in_ == 3


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_a_parquet_file_streamed_by_row_groups_fits_as_the_array(saved, tmp_path,
                                                                  covariance_type):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from fastem.tables import ParquetBlocks

    X = saved[0]
    table = pa.table({"a": X[:, 0], "label": np.arange(X.shape[0]) % 3, "b": X[:, 1],
                      "c": X[:, 2]})
    pq.write_table(table, tmp_path / "X.parquet", row_group_size=7_000)
    blocks = ParquetBlocks(tmp_path / "X.parquet", columns=["a", "b", "c"], block_rows=5_000)
    passes = [block.shape[0] for block in blocks()]
    assert sum(passes) == X.shape[0] and max(passes) <= 5_000 and len(passes) > 6
    params = _same_start(X, covariance_type)
    _assert_same_fit(_fit(blocks, **params), _fit(X, **params))
