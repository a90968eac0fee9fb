"""Where a stop returns to: the last boundary (a step, a supervised step, an evaluation) with its
random state, and what the run was doing, for the checkpoint a stop saves and the line it prints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tau2cl.distributed import all_reduce_max_
from tau2cl.errors import UserError
from tau2cl.recipe.checkpointer import Checkpointer
from tau2cl.runs.checkpoint import rng_state
from tau2cl.runs.interrupt import AllRanksStop, SignalWatch, StoppedWithCheckpoint


class StopBoundary:
    def __init__(self, signals: SignalWatch, generator: torch.Generator, checkpointer: Checkpointer,
                 before_stop: Callable[[], None]):
        self.signals = signals
        self.generator = generator
        self.checkpointer = checkpointer
        self.before_stop = before_stop  # closes the progress bar before the stop's lines
        self.rng: dict | None = None  # random state at the last boundary
        self.where = "before training"  # what the run is doing, for the stop line

    def mark(self, where: str) -> None:
        """Remember the random state a stop in the coming work returns to, and what that work is."""
        self.rng = rng_state(self.generator)
        self.where = where

    def stop_if_signalled(self, where: str, checkpoint: str | None = None) -> None:
        """At a step boundary: if any rank got SIGINT/SIGTERM, every rank saves and stops together
        (one all-reduce); `checkpoint` names the checkpoint to save (default: a step checkpoint)."""
        flag = torch.tensor([float(self.signals.signum or 0)], dtype=torch.float64)
        signum = int(all_reduce_max_(flag).item())
        if signum:
            self.mark(where)
            self.stop(AllRanksStop(signum, None), checkpoint)

    def stop(self, stop: AllRanksStop, checkpoint: str | None = None) -> None:
        """Every rank: save the last boundary's checkpoint, then end with the stop's own line."""
        self.before_stop()
        if checkpoint is None:
            path: Path = self.checkpointer.save_step(rng=self.rng)
        else:
            path = self.checkpointer.save(checkpoint, self.rng)
        if stop.signum is not None:
            raise StoppedWithCheckpoint(stop.signum, str(path), self.where)
        raise UserError(
            f"{stop.reason.rstrip('.')}; stopped {self.where}, checkpoint saved to {path}: fix the cause and "
            f"resume with --resume_from {path}."
        )
