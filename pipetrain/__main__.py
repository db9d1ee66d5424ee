"""``python -m pipetrain`` is the ``pipetrain`` command."""

from __future__ import annotations

import sys

from pipetrain.cli import main

__all__: list[str] = []

sys.exit(main())
