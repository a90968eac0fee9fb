"""Checkpoints of a run: save (rank 0 writes, every rank takes part), rotate step checkpoints,
and resume from a verified one."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tau2cl.cl.context import Progress
from tau2cl.cl.strategies.base import CLStrategy
from tau2cl.config import RESUME_MAY_CHANGE, GRPOConfig
from tau2cl.distributed import DistInfo, all_gather_objects
from tau2cl.errors import UserError
from tau2cl.recipe.accuracy_matrix import AccuracyMatrix
from tau2cl.recipe.models import Models
from tau2cl.rl.optimization import ClippedStep
from tau2cl.rl.sft import SupervisedWarmStart
from tau2cl.runs.checkpoint import (
    CheckpointSaveError,
    count_lines,
    find_checkpoint,
    load_model_weights,
    load_state,
    non_finite_count,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_checkpoint_name,
    truncate_lines,
)
from tau2cl.runs.files import METRICS_FILE
from tau2cl.runs.resume_check import config_differences, refusal


@dataclass
class TrainingState:
    """Everything a checkpoint holds besides the weights, as live objects."""

    progress: Progress
    matrix: AccuracyMatrix  # with its held-out matrix under --heldout_eval
    optimizer: torch.optim.Optimizer  # the GRPO steps'
    sft: SupervisedWarmStart  # its optimizer while a domain's supervised steps are under way
    clipped_step: ClippedStep  # the skipped-update count
    strategy: CLStrategy
    generator: torch.Generator


def heldout_matrix_state(matrix: AccuracyMatrix) -> dict:
    """The checkpoint entries of the held-out matrix: none without one."""
    if matrix.heldout is None:
        return {}
    return {"heldout_reward_matrix": matrix.heldout.reward, "heldout_pass_matrix": matrix.heldout.pass_rate}


def load_heldout_matrix(matrix: AccuracyMatrix, saved: dict) -> None:
    """Put a checkpoint's held-out rows into the run's held-out matrix; a checkpoint without them (one
    saved without --heldout_eval, which a resume cannot turn on) leaves it as it is."""
    if matrix.heldout is not None and saved.get("heldout_reward_matrix") is not None:
        matrix.heldout.reward = saved["heldout_reward_matrix"]
        matrix.heldout.pass_rate = saved["heldout_pass_matrix"]


class Checkpointer:
    def __init__(self, config: Any, dist: DistInfo, models: Models, state: TrainingState):
        self.config = config
        self.dist = dist
        self.models = models
        self.state = state
        self.last: Path | None = None  # the newest complete checkpoint of this run
        self.step_checkpoints: list[Path] = []  # this run's, oldest first, for --save_total_limit
        self.wandb_run_id: str | None = None  # stored in every checkpoint once the tracker has one

    def save_step(self, rng: dict | None = None) -> Path:
        """A step checkpoint at the current global step; the oldest beyond --save_total_limit go."""
        path = self.save(step_checkpoint_name(self.state.progress.global_step), rng)
        if path in self.step_checkpoints:
            return path
        self.step_checkpoints.append(path)
        limit = self.config.save_total_limit
        while limit is not None and len(self.step_checkpoints) > limit:
            old = self.step_checkpoints.pop(0)
            if self.dist.is_main and old.exists():
                shutil.rmtree(old)
        return path

    def save(self, name: str, rng: dict | None = None) -> Path:
        """Save checkpoint `name` (rank 0 writes; all ranks take part); `rng` = this rank's random
        state to store (default: the current one). A failed write ends every rank with one line."""
        rng = all_gather_objects(rng if rng is not None else rng_state(self.state.generator))
        optimizer_state = self.models.training.optimizer_state(self.state.optimizer)  # a collective when sharded
        sft_state = self.state.sft.state_dict()  # likewise, while supervised steps are under way
        path = Path(self.config.log_dir) / name
        problem = None
        if self.dist.is_main:
            try:
                self._write(path, rng, optimizer_state, sft_state)
            except CheckpointSaveError as error:
                last = f"'{self.last}'" if self.last else "none"
                problem = (
                    f"{error}; the last complete checkpoint is {last}. Free space or fix the folder's "
                    "permissions, then resume from it."
                )
        problem = all_gather_objects(problem)[0]
        if problem:
            raise UserError(problem)
        self.last = path
        return path

    def _write(self, path: Path, rng: list, optimizer_state: dict, sft_state: dict | None) -> None:
        s = self.state
        state = {
            "metrics_lines": count_lines(Path(self.config.log_dir) / METRICS_FILE),
            "progress": s.progress.to_dict(),
            "reward_matrix": s.matrix.reward,
            "pass_matrix": s.matrix.pass_rate,
            **heldout_matrix_state(s.matrix),
            "optimizer": optimizer_state,
            "optimizer_sharded": self.models.training.sharded,
            "sft_optimizer": sft_state,
            "strategy": s.strategy.state_dict(),
            "rng": rng,
            "skipped_updates": s.clipped_step.skipped,
            "wandb_run_id": self.wandb_run_id,
            "config": self.config.to_dict(),
        }
        models = self.models
        model = models.policy.model if models.lora is None else models.lora  # LoRA: the adapter files
        save_checkpoint(path, model, models.policy.tokenizer, state)

    def restore(self, point: ResumePoint) -> None:
        """Load a checkpoint opened with `open_resume_point` into the run."""
        saved = point.saved
        self._load_weights(point.path, saved)
        s = self.state
        s.strategy.load_state_dict(saved["strategy"])
        s.sft.load_state_dict(saved.get("sft_optimizer"))
        s.progress.load(saved["progress"])
        s.matrix.reward, s.matrix.pass_rate = saved["reward_matrix"], saved["pass_matrix"]
        load_heldout_matrix(s.matrix, saved)
        s.clipped_step.skipped = saved["skipped_updates"]
        rng = saved["rng"]
        if self.dist.rank < len(rng):
            set_rng_state(s.generator, rng[self.dist.rank])
        self.last = point.path

    def _load_weights(self, ckpt: Path, saved: dict) -> None:
        models = self.models
        if models.lora is not None:
            models.lora.load_weights(ckpt)  # refuses non-finite adapters
        else:
            load_model_weights(models.policy.model, ckpt)  # refuses non-finite weights
        bad = non_finite_count(saved["optimizer"])
        if bad:
            raise UserError(f"checkpoint '{ckpt}' holds {bad} non-finite optimizer values; resume from an earlier checkpoint.")
        models.training.load_from_rollout_model()
        models.training.load_optimizer_state(self.state.optimizer, saved["optimizer"])


@dataclass
class ResumePoint:
    path: Path  # the checkpoint folder
    saved: dict  # its trainer state

    @property
    def wandb_run_id(self) -> str | None:
        return self.saved.get("wandb_run_id")


def open_resume_point(config: Any, dist: DistInfo, sharded: bool, path: str) -> ResumePoint:
    """The latest verified checkpoint found from `path`, checked against this run's flags; the
    metrics logged after it are dropped (no step twice). Before the tracker opens the run's files."""
    def skipped(line: str) -> None:
        if dist.is_main:
            print(f"tau2cl: {line}", file=sys.stderr)

    ckpt = find_checkpoint(path, skipped)
    saved = load_state(ckpt)
    _check_compatible(config, sharded, ckpt, saved)
    if dist.is_main:
        truncate_lines(Path(config.log_dir) / METRICS_FILE, saved["metrics_lines"])
    return ResumePoint(ckpt, saved)


def _check_compatible(run_config: Any, sharded: bool, ckpt: Path, saved: dict) -> None:
    config = saved.get("config")
    if not isinstance(config, dict):
        raise UserError(f"cannot resume from '{ckpt}': its trainer_state.pt holds no config.")
    # every flag's default stands in for a flag the checkpoint's run did not have yet
    differences = config_differences(config, run_config.to_dict(), RESUME_MAY_CHANGE, GRPOConfig().to_dict())
    if differences:
        raise UserError(refusal(str(ckpt), differences))
    if saved.get("optimizer_sharded", False) != sharded:
        raise UserError(
            f"cannot resume from '{ckpt}': its optimizer state was saved "
            f"{'with' if saved.get('optimizer_sharded') else 'without'} FSDP sharding; resume with "
            f"the --parallelism and process count it was trained with (it used --parallelism "
            f"{config.get('parallelism', 'ddp')})."
        )
