"""Training entry point: `tau2cl train ...`, `python -m tau2cl.train ...` or `torchrun -m tau2cl.train ...`.

Parsing comes first and the trainer (torch, transformers, tau2) is imported only afterwards, so that
`--help` and a bad flag answer at once.
"""

from __future__ import annotations

import os
import sys

from tau2cl.config import parse_config
from tau2cl.errors import run_guarded


def main(argv: list[str] | None = None, prog: str = "tau2cl train") -> int:
    """Parse the flags and train; a UserError ends with one line on stderr and exit code 2."""

    def train() -> int:
        config = parse_config(argv, prog=prog)
        from tau2cl.runs.interrupt import StoppedWithCheckpoint
        from tau2cl.trainer import GRPOTrainer

        try:
            GRPOTrainer(config).train()
        except StoppedWithCheckpoint as stop:
            if os.environ.get("RANK", "0") == "0":
                print(
                    f"tau2cl: {stop}; checkpoint saved to {stop.checkpoint}. Resume with the same flags "
                    f"plus --resume_from {stop.checkpoint}",
                    file=sys.stderr,
                )
            return stop.exit_code
        return 0

    return run_guarded(train)


if __name__ == "__main__":
    sys.exit(main(prog="python -m tau2cl.train"))
