"""torchrun entry point: ``torchrun --nproc-per-node N [--nnodes ...] -m pipetrain.executor plan.json [options]``.

Multi-node: run the same command on every node with ``--nnodes K --node-rank i`` (static) or
``--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID`` (elastic rendezvous); the total
process count must equal the plan's pp*dp. A rank that fails writes ``RUN_DIR/failures/rank{r}.txt``
and exits non-zero; torchrun then stops the others.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from pipetrain.errors import PipetrainError

__all__ = ["entry"]

#: substrings of errors that are a consequence of another rank failing
PEER_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "connection closed",
                "Timed out", "timed out", "Socket closed", "SIGTERM", "Read error", "ECONNRESET")


def entry(argv: list[str] | None = None) -> int:
    from pipetrain.executor.config import add_run_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="python -m pipetrain.executor", description="one torchrun worker of a pipetrain run")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(args.run_dir)
    try:
        from pipetrain.executor.worker import main

        return main(config_from_args(args))
    except KeyboardInterrupt:
        print(f"rank {rank}: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - every failure must be reported with the rank
        msg = f"{type(exc).__name__}: {exc}".strip()
        secondary = any(m in msg for m in PEER_MARKERS)
        line = msg.splitlines()[0] if msg else type(exc).__name__
        if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:  # several nodes: say which one this rank is on
            line = f"[node {os.environ.get('GROUP_RANK', '?')} at {os.environ.get('PIPETRAIN_NODE_ADDR', '?')}] {line}"
        try:
            fdir = run_dir / "failures"
            fdir.mkdir(parents=True, exist_ok=True)
            (fdir / f"rank{rank}.txt").write_text(("peer " if secondary else "root ") + line + "\n" + traceback.format_exc())
        except OSError:
            pass
        print(f"rank {rank} failed: {line}", file=sys.stderr)
        if not isinstance(exc, PipetrainError) and not secondary:
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(3 if secondary else 1)


if __name__ == "__main__":
    code = entry()
    sys.stdout.flush()
    sys.stderr.flush()
    # worker.main destroyed the process group; leaving through os._exit skips the interpreter's
    # teardown, where gloo's threads (with a device mesh's many groups) abort about one run in four
    os._exit(code)
