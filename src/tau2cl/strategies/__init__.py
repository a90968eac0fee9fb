"""Continual-learning strategies, registered by name for `--cl_algorithm`."""

from tau2cl.strategies import ewc, replay, sequential  # noqa: F401  (registers)
from tau2cl.strategies.base import CLStrategy, build_strategy, registered_names

__all__ = ["CLStrategy", "build_strategy", "registered_names"]
