"""The strategies `--cl_algorithm` can name: one table, light enough for the config to import.

Each name maps to a `StrategyEntry`: the module and class that implement it (the class is imported
only when a run builds its strategy, so `--help` and config validation stay free of torch), the
one-line summary `--help` shows, and the facts the config checks a run against (whether the strategy
needs LoRA adapters, whether it can run under FSDP).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StrategyEntry:
    """One registered strategy: where its class lives, what it does, what a run needs for it.

    A limit comes with its reason, which ends the message that refuses a run breaking it.
    """

    module: str
    class_name: str
    summary: str  # what it does and costs, as `--cl_algorithm`'s help describes it
    needs_lora: bool = False  # its trained weights are LoRA adapters: --lora_r must be > 0
    lora_reason: str = ""
    works_with_fsdp: bool = True  # False: --parallelism fsdp is refused
    fsdp_reason: str = ""
    # True: every stage trains on all domains mixed, so the run has no domain order; its matrix rows
    # are points along one mixed stream, and only ACC (not BWT, FWT or forgetting) means something
    mixes_domains: bool = False

    def __post_init__(self) -> None:
        if self.needs_lora and not self.lora_reason:
            raise ValueError(f"{self.class_name} needs LoRA: give the lora_reason that a refused run is told.")
        if not self.works_with_fsdp and not self.fsdp_reason:
            raise ValueError(f"{self.class_name} cannot run under FSDP: give the fsdp_reason that a refused run is told.")


_FISHER_REASON = "its Fisher comes from per-episode gradients of the whole model, which FSDP shards across processes"

STRATEGIES: dict[str, StrategyEntry] = {
    "sequential": StrategyEntry(
        "tau2cl.cl.strategies.sequential", "Sequential", "plain fine-tuning, one domain after another"
    ),
    "replay": StrategyEntry(
        "tau2cl.cl.strategies.replay",
        "Replay",
        "part of each batch is earlier domains' tasks, each run in its own domain's environment (costs that "
        "share of the batch's rollouts)",
    ),
    "ewc": StrategyEntry(
        "tau2cl.cl.strategies.ewc",
        "EWC",
        "Elastic Weight Consolidation, a Fisher-weighted pull towards the weights after each earlier domain "
        "(2 extra copies of the weights per domain)",
        works_with_fsdp=False,
        fsdp_reason=_FISHER_REASON,
    ),
    "online_ewc": StrategyEntry(
        "tau2cl.cl.strategies.ewc",
        "OnlineEWC",
        "one running Fisher and anchor (2 extra copies in all)",
        works_with_fsdp=False,
        fsdp_reason=_FISHER_REASON,
    ),
    "adaptive_replay": StrategyEntry(
        "tau2cl.cl.strategies.adaptive_replay",
        "AdaptiveReplay",
        "replay whose share per earlier domain follows the forgetting measured in the accuracy matrix "
        "(replay's cost)",
    ),
    "fusion": StrategyEntry(
        "tau2cl.cl.strategies.fusion",
        "Fusion",
        "at each domain's end the weights become a merge (--fusion_mode; one extra copy)",
    ),
    "distill": StrategyEntry(
        "tau2cl.cl.strategies.distill",
        "Distill",
        "from the second domain on, a KL penalty (--distill_coef) towards the policy as it was when the "
        "domain began (one extra copy of the trained weights, one no-grad forward per step)",
    ),
    "progressive": StrategyEntry(
        "tau2cl.cl.strategies.progressive",
        "Progressive",
        "a new LoRA adapter for each domain, earlier ones frozen, domain j evaluated with adapter j (needs "
        "--lora_r > 0; one adapter copy per domain)",
        needs_lora=True,
        lora_reason="it trains a LoRA adapter for each domain",
    ),
    "adaptive_fusion": StrategyEntry(
        "tau2cl.cl.strategies.adaptive_fusion",
        "AdaptiveFusion",
        "WiSE-FT whose α is chosen at each domain's end from --fusion_alpha_grid by the reward on held-out "
        "train tasks (2 extra copies, one greedy evaluation of the held-out tasks per grid point)",
    ),
    "ewc_pp": StrategyEntry(
        "tau2cl.cl.strategies.ewc_pp",
        "EWCPlusPlus",
        "EWC++, a moving-average Fisher updated from the training steps' own episodes (3 extra copies, no "
        "extra rollouts)",
        works_with_fsdp=False,
        fsdp_reason=_FISHER_REASON,
    ),
    "joint": StrategyEntry(
        "tau2cl.cl.strategies.joint",
        "Joint",
        "multi-task training, the upper bound the others are read against: every stage's warm start and "
        "GRPO steps draw from all domains' tasks mixed, with the same step budget (no extra cost)",
        mixes_domains=True,
    ),
}
CL_ALGORITHMS = tuple(STRATEGIES)  # the choices of --cl_algorithm, in the order they were registered
NEEDS_LORA = tuple(name for name, entry in STRATEGIES.items() if entry.needs_lora)

# The order in which `--cl_algorithm`'s help describes the strategies; a registered name missing here
# is described after these.
HELP_ORDER = (
    "sequential", "replay", "ewc", "online_ewc", "adaptive_replay", "fusion", "adaptive_fusion", "ewc_pp",
    "distill", "progressive", "joint",
)


def in_help_order() -> list[tuple[str, StrategyEntry]]:
    """Every registered strategy with its entry, in HELP_ORDER, then any others in registration order."""
    names = [n for n in HELP_ORDER if n in STRATEGIES] + [n for n in STRATEGIES if n not in HELP_ORDER]
    return [(name, STRATEGIES[name]) for name in names]


def strategy_class(name: str) -> Any:
    """The class registered under `name` (KeyError for an unknown name)."""
    entry = STRATEGIES[name]
    return getattr(importlib.import_module(entry.module), entry.class_name)
