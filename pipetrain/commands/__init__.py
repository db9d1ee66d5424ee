"""One module per CLI subcommand: ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

__all__: list[str] = []
