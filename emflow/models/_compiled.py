"""Which path a model's E-step takes: its compiled (numba) kernel module, or NumPy.

Each model module with a compiled kernel keeps its own ``KERNEL`` setting ("auto": the
kernel when numba imports, else NumPy; "numpy": never the kernel; "numba": the kernel, an
ImportError without numba) and asks :func:`compiled_kernel` for the module.
"""

from __future__ import annotations

import importlib

__all__ = ["compiled_kernel"]


def compiled_kernel(setting: str, module: str):
    """The kernel module ``emflow.models.<module>`` under ``setting``, or ``None`` for NumPy."""
    if setting == "numpy":
        return None
    try:
        return importlib.import_module(f"{__package__}.{module}")
    except (ImportError, RuntimeError):  # RuntimeError: numba found no writable cache directory
        if setting == "numba":
            raise
        return None
