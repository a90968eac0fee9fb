"""The accuracy matrix and its evaluation stages.

Row 0 is the model before training, row i the model after the i-th domain; each row holds every
domain's mean reward (and pass rate) on the evaluated split. The stages fill it; strategies read it.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, replace
from typing import Any

import torch

from tau2cl.agent.engine import RolloutEngine
from tau2cl.cl.context import Progress
from tau2cl.cl.measures import transfer_metrics
from tau2cl.cl.strategies.base import CLStrategy
from tau2cl.distributed import DistInfo
from tau2cl.env.domains import Domain
from tau2cl.env.results_files import write_results
from tau2cl.env.rewards import RewardFn
from tau2cl.evaluation.floor import do_nothing_floor
from tau2cl.evaluation.runner import EvalSettings, evaluate_domain, results_path
from tau2cl.evaluation.stats import EvalSummary
from tau2cl.reporting.tracker import MetricsTracker
from tau2cl.rl.training_model import TrainingModel
from tau2cl.runs.interrupt import agreed

Matrix = list[list[float | None]]


@dataclass
class AccuracyMatrix:
    """R[stage][domain] for the reward and the pass rate; None where not evaluated yet."""

    reward: Matrix
    pass_rate: Matrix

    @classmethod
    def empty(cls, num_domains: int) -> AccuracyMatrix:
        rows = num_domains + 1
        return cls([[None] * num_domains for _ in range(rows)], [[None] * num_domains for _ in range(rows)])

    def fill(self, stage: int, order: list[str], summaries: dict[str, EvalSummary]) -> None:
        for j, name in enumerate(order):
            self.reward[stage][j] = summaries[name].reward_mean
            self.pass_rate[stage][j] = summaries[name].pass_rate

    def measures(self, stage: int) -> tuple[dict, dict]:
        """The CL measures after `stage` (rewards, pass rates); empty before the first domain ends."""
        if stage < 1:
            return {}, {}
        return transfer_metrics(self.reward, stage), transfer_metrics(self.pass_rate, stage)


def stage_label(stage: int) -> str:
    return "before_training" if stage == 0 else f"after_task{stage - 1}"


class EvaluationStages:
    """Greedy evaluations of the policy: the matrix's stages, mid-domain checks, a strategy's own
    figures, and the do-nothing floor (all ranks take part in each)."""

    def __init__(
        self, config: Any, dist: DistInfo, order: list[str], domains: dict[str, Domain], engine: RolloutEngine,
        training: TrainingModel, strategy: CLStrategy, reward_fn: RewardFn | None,
        generator: torch.Generator, tracker: MetricsTracker,
    ):
        self.config = config
        self.dist = dist
        self.order = order
        self.domains = domains
        self.engine = engine
        self.training = training
        self.strategy = strategy
        self.reward_fn = reward_fn
        self.generator = generator
        self.tracker = tracker
        self.matrix = AccuracyMatrix.empty(len(order))
        self.floor: dict[str, float] | None = None  # do-nothing reward per domain on the evaluated tasks
        self.context: Any = None  # the CLContext, for the strategy's evaluation weights; set once built

    def settings(self, max_tasks: int | None, split: str = "test") -> EvalSettings:
        cfg = self.config
        return EvalSettings(
            samples_per_task=cfg.eval_samples_per_task, max_tasks=max_tasks,
            episodes_per_batch=cfg.batch_size_per_gpu * cfg.num_samples_per_prompt,
            judge_model=cfg.judge_model, reward_timeout=cfg.reward_timeout, split=split,
        )

    def evaluate_domain(self, name: str, label: str) -> EvalSummary:
        """The policy (as the strategy has it evaluated) on a domain's evaluated split; its
        episodes go to a tau2 Results file under `label`."""
        cfg = self.config
        weights = self.strategy.evaluation_weights(self.context, name)
        with self.training.rollout_weights(weights):
            summary, records = evaluate_domain(
                self.engine, self.domains[name], self.settings(cfg.eval_max_tasks, cfg.eval_split),
                self.dist.rank, self.dist.world_size, self.reward_fn, self.generator, guard=agreed,
                on_progress=lambda done, total: self.tracker.eval_progress(label, name, done, total),
            )
        if self.dist.is_main:
            self._write_results(name, label, records)
        return summary

    def evaluate_tasks(self, name: str, tasks: list, label: str) -> float:
        """CLContext.evaluate: the mean trained reward of greedy runs on `tasks`; its random stream
        depends on --seed and `label` alone, not on the run's stream."""
        cfg = self.config
        engine = self.engine
        if engine.settings.temperature != 0:
            engine = RolloutEngine(engine.policy, engine.user, replace(engine.settings, temperature=0.0),
                                   engine.check_stop, engine.sampler)
        generator = torch.Generator(device=self.dist.device)
        generator.manual_seed(zlib.crc32(f"{cfg.seed}-{label}-{self.dist.rank}".encode()))
        summary, _ = evaluate_domain(
            engine, self.domains[name], self.settings(None), self.dist.rank, self.dist.world_size, self.reward_fn,
            generator, guard=agreed, tasks=tasks,
            on_progress=lambda done, total: self.tracker.eval_progress(label, name, done, total),
        )
        return summary.custom_reward_mean if self.reward_fn is not None else summary.reward_mean

    def run_stage(self, stage: int, progress: Progress) -> None:
        """Fill row `stage` of the matrix: every domain's evaluated split; log it and its measures."""
        if stage == 0:
            self.tracker.announce_initial_eval()  # the header comes before the work it announces
        summaries = {name: self.evaluate_domain(name, stage_label(stage)) for name in self.order}
        self.matrix.fill(stage, self.order, summaries)
        step = progress.global_step
        if stage == 0:
            self.tracker.log_initial_eval(step, summaries)
        else:
            domain_idx, current = stage - 1, self.order[stage - 1]
            for name, summary in summaries.items():
                self.tracker.log_eval(
                    domain_idx, self.config.num_steps_per_task, step, summary, current, echo=name == current,
                    stage=stage,
                )
            self.tracker.log_transfer(domain_idx, step, summaries, self.order[:stage],
                                      transfer_metrics(self.matrix.reward, stage))
        progress.stages_done = stage + 1

    def mid_domain(self, domain_idx: int, step: int, progress: Progress) -> None:
        """The current domain's evaluation every --eval_interval steps."""
        name = self.order[domain_idx]
        summary = self.evaluate_domain(name, f"task{domain_idx}_step{step}")
        self.tracker.log_eval(domain_idx, step, progress.global_step, summary, name)

    def compute_floor(self, policy: Any) -> None:
        """The do-nothing floor of every domain on the evaluated tasks (scripted user, tau2's evaluator)."""
        cfg = self.config
        t0 = time.perf_counter()
        self.floor = do_nothing_floor(policy, self.domains, cfg.eval_split, cfg.eval_max_tasks, cfg.user_max_turns)
        figures = " | ".join(f"{name} {value:.3f}" for name, value in self.floor.items())
        self.tracker.log_message(
            f"[FLOOR] do-nothing reward on the {cfg.eval_split} split: {figures} ({time.perf_counter() - t0:.1f}s)"
        )

    def summary(self, progress: Progress, skipped_updates: int) -> dict:
        """summary.json's contents as the run stands."""
        done = progress.stages_done - 1  # last filled row
        measures, pass_measures = self.matrix.measures(done)
        return {
            "task_order": self.order,
            "stages_completed": done,
            "accuracy_matrix": self.matrix.reward,
            "pass_rate_matrix": self.matrix.pass_rate,
            "matrix_rows": ["before_training"] + [f"after_{n}" for n in self.order],
            "eval_split": self.config.eval_split,
            "do_nothing_floor": self.floor,
            "final_measures": measures,
            "final_measures_pass_rate": pass_measures,
            "global_step": progress.global_step,
            "skipped_updates": skipped_updates,
            "config": self.config.to_dict(),
        }

    def _write_results(self, name: str, label: str, records: list) -> None:
        cfg = self.config
        domain = self.domains[name]
        tasks = {t.id: t for t in domain.tasks(cfg.eval_split)}
        used = [tasks[tid] for tid in dict.fromkeys(r.task_id for r in records)]
        write_results(
            results_path(cfg.log_dir, label, name), domain, used, [r.simulation for r in records],
            agent_model=cfg.model_name_or_path, user_name=self.engine.user.name,
            seed=cfg.seed, max_turns=cfg.max_turns,
        )
