"""The wandb run, and a do-nothing stand-in with the same methods for when wandb is off.

Only numbers reach wandb, each under a namespace ("train/loss"); None and text are left out.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from tau2cl.errors import UserError


def namespaced_numbers(namespace: str, figures: Mapping[str, Any]) -> dict[str, Any]:
    """{"loss": 2.1, "note": "x"} under "train" -> {"train/loss": 2.1}."""
    return {f"{namespace}/{k}": v for k, v in figures.items() if isinstance(v, numbers.Real)}


class WandbWriter:
    """Logs figures to a started wandb run at the run's monotone step."""

    def __init__(self, run: Any) -> None:
        self._run = run
        self.run_id: str | None = run.id

    def write_record(self, namespace: str, figures: Mapping[str, Any], step: int) -> None:
        self._run.log(namespaced_numbers(namespace, figures), step=step)

    def write_summary(self, namespace: str, figures: Mapping[str, Any]) -> None:
        """Figures of the whole run, shown on the run's overview rather than as a curve."""
        self._run.summary.update(namespaced_numbers(namespace, figures))

    def close(self) -> None:
        self._run.finish()


class NullWandbWriter:
    """Stands in for WandbWriter when wandb is off or on other ranks, so callers never branch."""

    run_id: str | None = None

    def write_record(self, namespace: str, figures: Mapping[str, Any], step: int) -> None:
        pass

    def write_summary(self, namespace: str, figures: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def open_wandb(
    project: str, name: str | None, run_id: str | None, config: dict, log_dir: str
) -> WandbWriter:
    """Start (or, given the id of an earlier run, continue) a wandb run writing under log_dir."""
    try:
        import wandb  # imported here: no import cost when wandb is off
    except ImportError as error:
        raise UserError(
            "wandb_project is set but wandb is not installed; pip install wandb or unset it."
        ) from error
    # resume="allow": a resumed run passes its old id and continues the same wandb run.
    run = wandb.init(project=project, name=name, id=run_id, resume="allow", config=config, dir=log_dir)
    return WandbWriter(run)
