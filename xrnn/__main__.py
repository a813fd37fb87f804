"""``python -m xrnn``: the same as the ``xrnn`` command (see :mod:`xrnn.cli`)."""

import sys

from .cli import main

sys.exit(main())
