"""The one place xrnn's version is written.

``pyproject.toml`` reads it for the package metadata (``[tool.setuptools.dynamic]``),
``xrnn.__version__`` and the CLI's ``--version`` re-export it, and every checkpoint
records it in its header (``xrnn_version``). Keep it free of imports: setuptools reads
it without importing xrnn.
"""

__version__ = "0.1.0"
