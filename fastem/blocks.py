"""Data that are not held in memory: memory-mapped arrays and streams of row blocks.

:class:`RowBlocks` presents such data as a sequence of row blocks, read
afresh for every pass; :class:`fastem.sources.BlockSource` streams them
through the statistics kernel once per EM iteration. What is held in
anonymous memory at any time is one block (and a sample for the
initialisation), never the N rows: the kernels read a memory-mapped block
in place, through the page cache.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator

import numpy as np

# Rows per block of a memory-mapped array: about 8 MiB of float64 per block,
# large enough that per-block overhead (a few kernel calls) is negligible.
BLOCK_BYTES = 8 << 20
# Rows of the random sample the initialisation of out-of-core data runs on.
INIT_SAMPLE_ROWS = 100_000


def is_out_of_core(X) -> bool:
    """Whether ``X`` is to be streamed: a memory-mapped array (``np.memmap``,
    ``np.load(..., mmap_mode=...)``), a :class:`RowBlocks` or a callable
    returning an iterator of blocks."""
    if isinstance(X, RowBlocks) or (callable(X) and not isinstance(X, np.ndarray)):
        return True
    if isinstance(X, np.memmap):
        return True
    base = getattr(X, "base", None)
    while base is not None:
        if isinstance(base, (np.memmap, mmap.mmap)):
            return True
        base = getattr(base, "base", None)
    return False


class RowBlocks:
    """Row blocks of a data set, validated as they are read.

    Parameters
    ----------
    data : array (memory-mapped) or callable
        A 2-D array, read in blocks of ``block_rows`` rows, or a callable
        that returns a fresh iterator over blocks, each a 2-D array or a pair
        ``(X_block, sample_weight_block)`` (one call per pass).
    sample_weight : array (N,) or None
        For an array: the rows' weights (may be memory-mapped too).
    block_rows : int, optional
        Rows per block of an array (default: about ``BLOCK_BYTES`` of data).

    After :meth:`survey`, ``n_samples``, ``n_features``, ``dtype``, the
    data's largest absolute coordinate and the factor that rescales the
    weights (to average 1 over the rows of positive weight, as for in-memory
    data) are known, and every block is checked: 2-D, numeric, finite, the
    same width, non-negative weights.
    """

    def __init__(self, data, sample_weight=None, block_rows: int | None = None):
        self._data = data
        self._weights = sample_weight
        if callable(data) and not isinstance(data, np.ndarray):
            if sample_weight is not None:
                raise ValueError("with a callable of blocks, give the weights in the blocks "
                                 "as (X_block, sample_weight_block) pairs")
        else:
            if np.ndim(data) != 2:
                raise ValueError(f"Expected a 2-D array, got an array of shape "
                                 f"{np.shape(data)}")
            if sample_weight is not None and np.shape(sample_weight) != (np.shape(data)[0],):
                raise ValueError(f"sample_weight.shape == {np.shape(sample_weight)}, "
                                 f"expected ({np.shape(data)[0]},)")
        self.block_rows = block_rows
        self.n_samples = self.n_features = None
        self.dtype = None
        self.largest = 0.0
        self.n_positive = None
        self.weight_factor = 1.0
        self.weighted = sample_weight is not None

    def _raw(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        data = self._data
        if callable(data) and not isinstance(data, np.ndarray):
            blocks: Iterable = data()
            for block in blocks:
                if isinstance(block, tuple):
                    if len(block) != 2:
                        raise ValueError("a block is an array or an (X, sample_weight) pair")
                    yield block[0], block[1]
                else:
                    yield block, None
            return
        n_samples, n_features = data.shape
        rows = self.block_rows or max(1024, BLOCK_BYTES // (8 * max(n_features, 1)))
        for start in range(0, n_samples, rows):
            weights = None if self._weights is None else self._weights[start:start + rows]
            yield data[start:start + rows], weights

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Blocks as the kernels take them: C-contiguous float32/float64 (a
        block of another layout or type is copied), weights float64 rescaled."""
        for X, w in self._raw():
            X = self._check_block(X)
            if w is not None:
                w = self._check_weights(w, X.shape[0]) * self.weight_factor
            yield X, w

    def _check_block(self, X) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"Expected 2-D blocks of rows, got a block of shape {X.shape}")
        if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)
                or X.dtype == np.bool_):
            raise ValueError(f"The data must be numeric, got a block of dtype {X.dtype}")
        dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.float64
        if self.dtype is not None and dtype != self.dtype:
            dtype = self.dtype
        if self.n_features is not None and X.shape[1] != self.n_features:
            raise ValueError(f"A block has {X.shape[1]} features, the first had "
                             f"{self.n_features}")
        return np.ascontiguousarray(X, dtype=dtype)

    @staticmethod
    def _check_weights(w, n_rows) -> np.ndarray:
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (n_rows,):
            raise ValueError(f"A block's sample_weight has shape {w.shape}, expected "
                             f"({n_rows},)")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("sample_weight must be finite and non-negative")
        return w

    def survey(self) -> RowBlocks:
        """One pass: shape, dtype, finiteness, extreme values and weight totals."""
        n_samples = 0
        largest = 0.0
        weight_max, positive = 0.0, 0
        first = True
        for X, w in self._raw():
            X = self._check_block(X)
            if first:
                self.n_features, self.dtype, first = X.shape[1], X.dtype, False
            if X.size:
                low, high = float(X.min()), float(X.max())
                if not (np.isfinite(low) and np.isfinite(high)):
                    raise ValueError("Input X contains infinity or NaN (in the rows from "
                                     f"{n_samples} on).")
                largest = max(largest, abs(low), abs(high))
            if w is not None:
                self.weighted = True
                w = self._check_weights(w, X.shape[0])
                weight_max = max(weight_max, float(w.max(initial=0.0)))
                positive += int(np.count_nonzero(w))
            n_samples += X.shape[0]
        if first:
            raise ValueError("The data have no blocks of rows")
        self.n_samples, self.largest = n_samples, largest
        self.n_positive = positive if self.weighted else n_samples
        if self.weighted:
            if not weight_max > 0:
                raise ValueError("sample_weight has only zero weights: at least one must be "
                                 "positive")
            # As check_sample_weight: weights / max, then to average 1 over the
            # rows of positive weight (a second, cheap pass for their sum).
            total = 0.0
            for _, w in self._raw():
                if w is not None:
                    total += float(np.sum(np.asarray(w, dtype=np.float64) / weight_max))
            self.weight_factor = positive / total / weight_max
        return self

    def column_variance(self, scale: float = 1.0) -> np.ndarray:
        """Weighted per-feature variance of ``scale`` times the rows (two passes)."""
        _, squares, weight = self._scatter(scale, full=False)
        return squares / weight

    def moments(self, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Weighted mean and covariance (denominator :math:`\\sum w - 1`, R's
        ``var`` for unit weights) of ``scale`` times the rows (two passes)."""
        mean, scatter, weight = self._scatter(scale, full=True)
        return mean, scatter / max(weight - 1.0, 1e-300)

    def _scatter(self, scale: float, full: bool):
        """Weighted mean, scatter around it (full matrix or diagonal) and total weight."""
        total, weight = np.zeros(self.n_features), 0.0
        for X, w in self:
            Z = np.asarray(X, dtype=np.float64) * scale
            total += Z.sum(axis=0) if w is None else w @ Z
            weight += Z.shape[0] if w is None else float(w.sum())
        mean = total / weight
        scatter = np.zeros((self.n_features,) * (2 if full else 1))
        for X, w in self:
            dev = np.asarray(X, dtype=np.float64) * scale - mean
            weighted = dev if w is None else w[:, None] * dev
            scatter += weighted.T @ dev if full else np.einsum("ij,ij->j", weighted, dev)
        return mean, scatter, weight

    def sample(self, n_rows: int, random_state) -> tuple[np.ndarray, np.ndarray | None]:
        """About ``n_rows`` rows drawn uniformly (each kept with probability
        ``n_rows / N``, block by block), with their weights: what the
        initialisation of out-of-core data runs on. All rows when N is smaller."""
        keep = min(1.0, n_rows / max(self.n_samples, 1))
        parts, weights = [], []
        for X, w in self:
            if keep < 1.0:
                mask = random_state.random_sample(X.shape[0]) < keep
                X = X[mask]
                w = None if w is None else w[mask]
            parts.append(np.array(X))
            if w is not None:
                weights.append(w)
        sample = np.ascontiguousarray(np.concatenate(parts))
        return sample, (np.concatenate(weights) if weights else None)


def blocks_of(data, sample_weight=None) -> RowBlocks:
    """:class:`RowBlocks` of ``data`` (or ``data`` itself if it is one), surveyed."""
    if isinstance(data, RowBlocks):
        if sample_weight is not None:
            raise ValueError("give the weights to RowBlocks, not to fit")
        return data.survey()
    return RowBlocks(data, sample_weight).survey()


__all__ = ["BLOCK_BYTES", "INIT_SAMPLE_ROWS", "RowBlocks", "blocks_of", "is_out_of_core"]
