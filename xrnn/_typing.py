"""Type aliases for xrnn's annotations. Imports no array library.

``Array``
    An array of any Array API library xrnn runs on: a NumPy ``ndarray``, a CuPy
    array, a torch ``Tensor`` (through array-api-compat) or an array-api-strict
    array. The standard defines no static type that all of them satisfy, so to a
    type checker this is ``Any``: the name says what is meant, and the docstrings
    give shapes, dtypes and the device. Host-only values that are always NumPy
    (corpus ids, checkpoint tensors) are annotated ``numpy.ndarray`` instead.
``ArrayNamespace``
    An Array API namespace (``Device.xp``: array-api-compat's NumPy or CuPy
    wrapper, torch's, or ``array_api_strict``), also ``Any`` to type checkers.
"""

from __future__ import annotations

from typing import Any, TypeAlias

__all__ = ["Array", "ArrayNamespace"]

Array: TypeAlias = Any
ArrayNamespace: TypeAlias = Any
