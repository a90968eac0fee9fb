"""tau2cl: continual-learning GRPO training of tool-use agents on the tau2-bench domains.

`from tau2cl import GRPOConfig, GRPOTrainer`; the trainer (and torch, transformers, tau2) is
imported only when first used, so the command line's `--help` stays instant.
"""

from __future__ import annotations

from typing import Any

from tau2cl.config import GRPOConfig
from tau2cl.env import tau2_compat  # noqa: F401  (before any tau2 import: no network, quiet logs)

__all__ = ["GRPOConfig", "GRPOTrainer"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "GRPOTrainer":
        from tau2cl.trainer import GRPOTrainer

        return GRPOTrainer
    raise AttributeError(f"module 'tau2cl' has no attribute {name!r}")
