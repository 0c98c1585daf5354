"""Numba kernels: small functions over arrays, one module per concern.

Nothing here compiles at import: every kernel is compiled lazily on its first
call (and cached on disk with ``cache=True``). Nor is Numba imported with
fastem: the modules that drive the kernels reach the kernel modules through
:func:`kernel_module`, which imports one on first use, so ``import fastem``
(and ``from fastem import GaussianMixture``) costs scikit-learn's import and
fastem's own, not Numba's (about 0.15 s). The few plain-Python helpers those
modules need at import are in :mod:`fastem._kernels.chunks` and
:mod:`fastem._kernels.blas`.
"""

from __future__ import annotations

import importlib
import types


class _KernelModule:
    """Stands for the kernel module ``fastem._kernels.<name>`` until first
    used; then every attribute is the module's own (the import system's
    per-module lock makes a first use from two threads safe)."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        self._name = name
        self._module = None

    def _load(self) -> types.ModuleType:
        module = self._module
        if module is None:
            module = importlib.import_module(f"{__name__}.{self._name}")
            self._module = module
        return module

    def __getattr__(self, attribute):
        return getattr(self._load(), attribute)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not imported yet"
        return f"<kernel module fastem._kernels.{self._name} ({state})>"


def kernel_module(name: str) -> _KernelModule:
    """The kernel module ``fastem._kernels.<name>``, imported (with Numba) on
    the first attribute access."""
    return _KernelModule(name)
