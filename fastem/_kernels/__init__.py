"""Numba kernels: small functions over arrays, one module per concern.

Nothing here compiles at import: every kernel is compiled lazily on its first
call (and cached on disk with ``cache=True``).
"""
