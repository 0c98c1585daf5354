"""Dask arrays: EM over row chunks on a cluster, with the one driver (:mod:`fastem.em`).

:class:`DaskSource` is a statistics source whose pass maps the statistics
kernel (:func:`fastem.stats.e_step_statistics`) over the row chunks where
they live, on the workers, and tree-reduces the chunks' statistics (they add,
:class:`~fastem.stats.GaussianStatistics`) in chunk order; only the sum
reaches the client, where the driver takes the M-step. From the same initial
parameters the fit is the in-memory fit up to the order of the additions
(tested to 1e-10), and the reduction order depends on the chunks alone, so
which worker computed what never changes a bit of it (a worker that dies
mid-fit has its tasks rescheduled by Dask, with the same result).

:func:`fit` validates and persists the data once: chunks become C-contiguous
float32/float64 as in-memory validation makes them, columns one chunk; one
pass on the cluster checks finiteness and finds the largest coordinate (for
:mod:`fastem.scaling`) and the weights' totals. The start (``init_params``)
is computed on the client from a uniform random sample of about
:data:`fastem.blocks.INIT_SAMPLE_ROWS` rows gathered from the workers (each
row kept with probability ``INIT_SAMPLE_ROWS / N``; all rows when N is
smaller, so small data start exactly as in memory), as for out-of-core data;
k-means|| is not used. :func:`predict`, :func:`predict_proba` and
:func:`score_samples` return lazy Dask arrays mapped over the row chunks.

A task runs the kernels on one thread (:func:`fastem._threads.limit`): Dask's
parallelism is its tasks, one per worker thread, as Dask's nannies also hold
BLAS and OpenMP to one thread each.

This module imports Dask only when it is given a Dask array, so ``import
fastem`` stays as cheap without Dask installed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from . import _threads
from .blocks import INIT_SAMPLE_ROWS
from .scaling import DataScale
from .stats import GaussianParameters, GaussianStatistics, e_step_statistics, log_responsibilities

if TYPE_CHECKING:
    import dask.array

# Statistics of at most this many chunks (or partial sums) are added by one
# task of the tree reduction: a tree of depth log_8(chunks).
TREE_FAN_IN = 8


def is_dask_array(X) -> bool:
    """Whether ``X`` is a :class:`dask.array.Array` (Dask is imported only if
    ``X``'s type comes from a module of Dask)."""
    if not type(X).__module__.startswith("dask"):
        return False
    import dask.array

    return isinstance(X, dask.array.Array)


# ------------------------------------------------------------ on the workers
def _kernel_dtype(dtype) -> np.dtype:
    """The dtype the kernels take for data of ``dtype``: float32 and float64 as
    they are, other numeric types as float64 (as ``validate_data`` casts)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise ValueError(f"The data must be real numbers, got a Dask array of dtype {dtype}")
    return dtype if dtype in (np.float32, np.float64) else np.dtype(np.float64)


def _kernel_block(X, dtype) -> np.ndarray:
    """A chunk as the kernels take it: a C-contiguous ndarray of ``dtype``."""
    return np.ascontiguousarray(np.asarray(X), dtype=dtype)


def _survey_block(X) -> tuple[bool, float]:
    """Whether a chunk is finite, and its largest absolute coordinate."""
    if X.size == 0:
        return True, 0.0
    low, high = float(X.min()), float(X.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        return False, math.inf
    return True, max(abs(low), abs(high))


def _survey_weights(w) -> tuple[bool, bool, float, int]:
    """A chunk of weights: finite, non-negative, largest, rows of positive weight."""
    if w.size == 0:
        return True, True, 0.0, 0
    return (bool(np.all(np.isfinite(w))), not bool(np.any(w < 0)), float(w.max()),
            int(np.count_nonzero(w)))


def _sum_relative_weights(w, largest: float) -> float:
    return float(np.sum(w / largest))


def _relative_weights(w, largest: float, factor: float) -> np.ndarray:
    # As check_sample_weight: by the largest first, then to average 1 over the
    # rows of positive weight.
    return np.ascontiguousarray((w / largest) * factor)


def _block_statistics(X, sample_weight, params, covariance_type: str, scale: float
                      ) -> GaussianStatistics:
    """One chunk's statistics under ``params`` (the kernel, on one thread)."""
    X = np.ascontiguousarray(X)
    if scale != 1.0:
        X = X * X.dtype.type(scale)
    with _threads.limit(1):
        return e_step_statistics(X, sample_weight, GaussianParameters(*params),
                                 covariance_type)


def _sum_statistics(*parts: GaussianStatistics) -> GaussianStatistics:
    """The sum of statistics, in the order given (so the reduction's order is fixed)."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _sample_rows(X, rows, w):
    return np.array(X[rows]), None if w is None else np.array(w[rows])


def _block_predictions(X, params, covariance_type: str, what: str, data_dtype
                       ) -> np.ndarray:
    """One chunk's predictions as the in-memory methods give them (``what``):
    'labels' (int64), 'proba' and 'score' (in the data's dtype) or 'log_resp'
    (float64)."""
    X = _kernel_block(X, data_dtype)
    if X.shape[0] == 0:
        n_components = params[0].shape[0]
        shape = (0,) if what in ("labels", "score") else (0, n_components)
        return np.empty(shape, dtype=_prediction_dtype(what, data_dtype))
    if not _survey_block(X)[0]:
        raise ValueError("Input X contains infinity or NaN.")
    with _threads.limit(1):
        log_resp, log_norm = log_responsibilities(X, GaussianParameters(*params),
                                                  covariance_type,
                                                  probabilities=what == "proba")
    if what == "labels":
        return log_resp.argmax(axis=1).astype(np.int64, copy=False)
    if what == "log_resp":
        return log_resp
    if what == "proba":
        return log_resp.astype(data_dtype, copy=False)
    # A row far from every component can have a log-density beyond the float32
    # range: it is -inf in float32, as in memory.
    with np.errstate(over="ignore"):
        return log_norm.astype(data_dtype, copy=False)


def _prediction_dtype(what: str, data_dtype) -> np.dtype:
    return np.dtype({"labels": np.int64, "log_resp": np.float64}.get(what, data_dtype))


# -------------------------------------------------------------- the source
def _tree_sum(parts: list):
    """A Delayed sum of Delayed statistics, :data:`TREE_FAN_IN` at a time, in order."""
    import dask

    while len(parts) > 1:
        parts = [dask.delayed(_sum_statistics)(*parts[i:i + TREE_FAN_IN])
                 for i in range(0, len(parts), TREE_FAN_IN)]
    return parts[0]


class DaskSource:
    """Row chunks of a persisted Dask array, each pass a map over the chunks
    on the workers and a tree reduction of their statistics.

    Parameters
    ----------
    X : dask.array.Array (N, D)
        Validated and persisted: C-contiguous float32/float64 chunks, one
        chunk of columns, known row chunk sizes.
    sample_weight : dask.array.Array (N,) or None
        Float64 weights chunked as X's rows (persisted, already relative).
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    scale : float
        A power of two every chunk is multiplied by (see :mod:`fastem.scaling`).
    """

    def __init__(self, X: dask.array.Array, sample_weight: dask.array.Array | None,
                 covariance_type: str, scale: float = 1.0):
        self.X = X
        self.sample_weight = sample_weight
        self.covariance_type = covariance_type
        self.scale = scale
        self.n_samples, self.n_features = X.shape
        blocks = X.to_delayed().ravel().tolist()
        weights = ([None] * len(blocks) if sample_weight is None
                   else sample_weight.to_delayed().ravel().tolist())
        # Chunks without rows add nothing and the kernel needs at least one row.
        self._chunks = [(rows, x, w) for rows, x, w in zip(X.chunks[0], blocks, weights)
                        if rows > 0]

    def statistics(self, params: GaussianParameters) -> GaussianStatistics:
        """The sum of every chunk's statistics under ``params`` (one pass on the workers)."""
        import dask

        params = tuple(np.asarray(p, dtype=np.float64) for p in params)
        parts = [dask.delayed(_block_statistics)(x, w, params, self.covariance_type,
                                                 self.scale)
                 for _, x, w in self._chunks]
        (total,) = dask.compute(_tree_sum(parts))
        return total

    def sample(self, n_rows: int, random_state) -> tuple[np.ndarray, np.ndarray | None]:
        """About ``n_rows`` rows drawn uniformly (each kept with probability
        ``n_rows / N``), with their weights, gathered to the client: what the
        initialisation runs on. All rows when N is smaller (and then no random
        draw is made, as for in-memory data)."""
        import dask

        keep = min(1.0, n_rows / max(self.n_samples, 1))
        picks = []
        for rows, x, w in self._chunks:
            chosen = (np.arange(rows) if keep >= 1.0
                      else np.flatnonzero(random_state.random_sample(rows) < keep))
            picks.append(dask.delayed(_sample_rows, nout=2)(x, chosen, w))
        gathered = dask.compute(*picks)
        sample = np.ascontiguousarray(np.concatenate([x for x, _ in gathered]))
        if self.sample_weight is None:
            return sample, None
        return sample, np.ascontiguousarray(np.concatenate([w for _, w in gathered]))


# ---------------------------------------------------------------- fitting
def _validated(X) -> tuple[dask.array.Array, np.dtype]:
    """X as the kernels take it (lazily): 2-D, one chunk of columns,
    C-contiguous float32/float64 chunks."""
    if X.ndim != 2:
        raise ValueError(f"Expected a 2-D Dask array, got an array of shape {X.shape}")
    dtype = _kernel_dtype(X.dtype)
    if math.isnan(X.shape[1]):
        raise ValueError("The Dask array's number of columns is unknown")
    if len(X.chunks[1]) > 1:
        # Statistics need whole rows: chunks of rows, never of columns.
        X = X.rechunk({1: -1})
    return X.map_blocks(_kernel_block, dtype, dtype=dtype,
                        meta=np.empty((0, 0), dtype=dtype)), dtype


def _aligned_weights(sample_weight, X) -> dask.array.Array | None:
    """The weights as a float64 Dask array chunked as X's rows (None: none)."""
    if sample_weight is None:
        return None
    import dask.array as da

    if not is_dask_array(sample_weight):
        sample_weight = np.asarray(sample_weight)
        if sample_weight.shape != (X.shape[0],):
            raise ValueError(f"sample_weight.shape == {sample_weight.shape}, expected "
                             f"({X.shape[0]},)")
        sample_weight = da.from_array(sample_weight, chunks=(X.chunks[0],))
    elif sample_weight.ndim == 1 and math.isnan(sample_weight.shape[0]):
        sample_weight = sample_weight.compute_chunk_sizes()
    if sample_weight.shape != (X.shape[0],):
        raise ValueError(f"sample_weight.shape == {sample_weight.shape}, expected "
                         f"({X.shape[0]},)")
    if sample_weight.dtype.kind not in "biuf":
        raise ValueError(f"sample_weight must be real numbers, got dtype {sample_weight.dtype}")
    if sample_weight.chunks[0] != X.chunks[0]:
        sample_weight = sample_weight.rechunk((X.chunks[0],))
    return sample_weight.map_blocks(_kernel_block, np.float64, dtype=np.float64,
                                    meta=np.empty(0))


def fit(model, X: dask.array.Array, sample_weight=None):
    """Fit ``model`` (a :class:`fastem.GaussianMixture`) to the Dask array ``X``.

    ``X`` is validated, persisted on the cluster once and surveyed in one
    pass; EM then runs through :meth:`GaussianMixture._fit_source` with a
    :class:`DaskSource`, starting from a random sample of the rows (see the
    module's docstring). ``sample_weight`` is None, or a Dask array (or an
    array-like) of one weight per row; weights are relative, as in memory.

    Returns
    -------
    model
    """
    import dask

    X, dtype = _validated(X)
    if not math.isnan(X.shape[0]):
        model._check_n_samples(X.shape[0])
    (X,) = dask.persist(X)
    if any(math.isnan(c) for c in X.chunks[0]):
        X = X.compute_chunk_sizes()
        model._check_n_samples(X.shape[0])
    n_samples, n_features = X.shape
    weights = _aligned_weights(sample_weight, X)
    if weights is not None:
        (weights,) = dask.persist(weights)

    blocks = X.to_delayed().ravel().tolist()
    surveys = [dask.delayed(_survey_block)(x) for x in blocks]
    if weights is not None:
        surveys += [dask.delayed(_survey_weights)(w) for w in weights.to_delayed().ravel()]
    surveys = dask.compute(*surveys)
    row_surveys, weight_surveys = surveys[:len(blocks)], surveys[len(blocks):]
    for index, (finite, _) in enumerate(row_surveys):
        if not finite:
            first = sum(X.chunks[0][:index])
            raise ValueError(f"Input X contains infinity or NaN (in the rows from {first} on).")
    largest = max(large for _, large in row_surveys)
    if weights is not None:
        weights = _relative(weights, weight_surveys)

    model.n_features_in_ = n_features
    if hasattr(model, "feature_names_in_"):
        del model.feature_names_in_
    rescaled = DataScale.of_largest(largest, dtype)
    source = DaskSource(X, weights, model.covariance_type, rescaled.scale)
    random_state = check_random_state(model.random_state)

    def init_data():
        sample, sample_weight = source.sample(INIT_SAMPLE_ROWS, random_state)
        return rescaled.data(sample), sample_weight

    return model._fit_source(source, n_features, dtype, rescaled, init_data, random_state)


def _relative(weights: dask.array.Array, surveys) -> dask.array.Array:
    """Weights rescaled to average 1 over the rows of positive weight (as
    :func:`fastem._validation.check_sample_weight`), persisted."""
    import dask

    if not all(finite for finite, _, _, _ in surveys):
        raise ValueError("Input sample_weight contains infinity or NaN.")
    if not all(non_negative for _, non_negative, _, _ in surveys):
        raise ValueError("sample_weight must be non-negative")
    largest = max(large for _, _, large, _ in surveys)
    if not largest > 0:
        raise ValueError("sample_weight has only zero weights: at least one must be positive")
    positive = sum(count for _, _, _, count in surveys)
    sums = dask.compute(*[dask.delayed(_sum_relative_weights)(w, largest)
                          for w in weights.to_delayed().ravel()])
    factor = positive / math.fsum(sums)
    (relative,) = dask.persist(weights.map_blocks(_relative_weights, largest, factor,
                                                  dtype=np.float64, meta=np.empty(0)))
    return relative


# ------------------------------------------------------------ predictions
def _predictions(model, X, what: str) -> dask.array.Array:
    """A lazy map of :func:`_block_predictions` over X's row chunks (shape and
    width are checked now, finiteness when the chunks are computed)."""
    check_is_fitted(model)
    if X.ndim != 2:
        raise ValueError(f"Expected a 2-D Dask array, got an array of shape {X.shape}")
    data_dtype = _kernel_dtype(X.dtype)
    if X.shape[1] != model.n_features_in_:
        raise ValueError(f"X has {X.shape[1]} features, but {type(model).__name__} is "
                         f"expecting {model.n_features_in_} features as input.")
    if len(X.chunks[1]) > 1:
        X = X.rechunk({1: -1})
    params = tuple(model._current_parameters())
    out_dtype = _prediction_dtype(what, data_dtype)
    kwargs = dict(params=params, covariance_type=model.covariance_type, what=what,
                  data_dtype=data_dtype, dtype=out_dtype)
    if what in ("labels", "score"):
        return X.map_blocks(_block_predictions, drop_axis=1, chunks=(X.chunks[0],),
                            meta=np.empty(0, dtype=out_dtype), **kwargs)
    return X.map_blocks(_block_predictions, chunks=(X.chunks[0], (params[0].shape[0],)),
                        meta=np.empty((0, 0), dtype=out_dtype), **kwargs)


def log_resp_dask(model, X: dask.array.Array, probabilities: bool = False
                  ) -> dask.array.Array:
    """Lazy (N, K) responsibilities of a fitted model on a Dask array: their
    logarithms, or with ``probabilities`` the responsibilities themselves."""
    if probabilities:
        return _predictions(model, X, "proba")
    return _predictions(model, X, "log_resp")


def predict(model, X: dask.array.Array) -> dask.array.Array:
    """Lazy int64 labels (N,): the most probable component of each row."""
    return _predictions(model, X, "labels")


def predict_proba(model, X: dask.array.Array) -> dask.array.Array:
    """Lazy (N, K) responsibilities, in X's float dtype."""
    return _predictions(model, X, "proba")


def score_samples(model, X: dask.array.Array) -> dask.array.Array:
    """Lazy (N,) log-densities :math:`\\log p(x_n)`, in X's float dtype."""
    return _predictions(model, X, "score")
