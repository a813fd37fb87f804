"""NumPy fast path (placeholder until the benchmark shows what pays): the portable scans."""

from ..kernels import PORTABLE as SCANS  # noqa: F401
