"""Row blocks and chunks: the shapes every kernel's pass is cut into.

Plain Python (no Numba), so that the modules driving the kernels can size
their passes without importing Numba (see :mod:`fastem._kernels`).
"""

from __future__ import annotations

BLOCK_ROWS = 256
# Partial sums are cheap for small K*D*D but not for K=20, D=100; cap the
# memory they take (in float64 entries) while keeping enough chunks to
# balance the load over the threads.
_MAX_CHUNKS = 64
_PARTIAL_BUDGET = 4_000_000


def n_chunks_for(n_samples: int, partial_size: int) -> int:
    """Number of row chunks for ``n_samples`` rows and a partial-sum size.

    Depends on the data's shape only (never on the thread count), so the
    reduction order, and hence the result, is the same on any machine.
    """
    n_blocks = max(1, -(-n_samples // BLOCK_ROWS))
    by_memory = max(1, _PARTIAL_BUDGET // max(1, partial_size))
    return int(min(n_blocks, _MAX_CHUNKS, by_memory))
