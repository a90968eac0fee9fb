"""The strategies `--cl_algorithm` can name: one table, light enough for the config to import.

Each name maps to the module and class that implement it; the class is imported only when a run
builds its strategy, so `--help` and config validation stay free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

STRATEGIES: dict[str, tuple[str, str]] = {
    "sequential": ("tau2cl.cl.strategies.sequential", "Sequential"),
    "replay": ("tau2cl.cl.strategies.replay", "Replay"),
    "ewc": ("tau2cl.cl.strategies.ewc", "EWC"),
    "online_ewc": ("tau2cl.cl.strategies.ewc", "OnlineEWC"),
    "adaptive_replay": ("tau2cl.cl.strategies.adaptive_replay", "AdaptiveReplay"),
    "fusion": ("tau2cl.cl.strategies.fusion", "Fusion"),
    "distill": ("tau2cl.cl.strategies.distill", "Distill"),
    "progressive": ("tau2cl.cl.strategies.progressive", "Progressive"),
    "adaptive_fusion": ("tau2cl.cl.strategies.adaptive_fusion", "AdaptiveFusion"),
    "ewc_pp": ("tau2cl.cl.strategies.ewc_pp", "EWCPlusPlus"),
}
CL_ALGORITHMS = tuple(STRATEGIES)
NEEDS_LORA = ("progressive",)  # strategies whose trained weights are LoRA adapters


def strategy_class(name: str) -> Any:
    """The class registered under `name` (KeyError for an unknown name)."""
    module, attr = STRATEGIES[name]
    return getattr(importlib.import_module(module), attr)
