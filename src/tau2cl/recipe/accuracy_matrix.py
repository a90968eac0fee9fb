"""The accuracy matrix and its evaluation stages.

Row 0 is the model before training, row i the model after the i-th domain; each row holds every
domain's mean reward (and pass rate) on the evaluated split. The stages fill it; strategies read it.
With --heldout_eval (and --eval_split train) every stage also evaluates each domain's test split,
filling a second, held-out matrix beside it (its episodes under the stage's label + "_heldout").
A run whose strategy mixes all domains in every stage reports only ACC (cl/measures.py) and names
its rows by part.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, replace
from typing import Any

import torch

from tau2cl.agent.engine import RolloutEngine
from tau2cl.cl.context import Progress
from tau2cl.cl.measures import reported_measures
from tau2cl.cl.strategies.base import CLStrategy
from tau2cl.cl.strategies.registry import STRATEGIES
from tau2cl.distributed import DistInfo
from tau2cl.env.domains import Domain
from tau2cl.env.results_files import write_results
from tau2cl.env.rewards import RewardFn
from tau2cl.evaluation.floor import do_nothing_floor
from tau2cl.evaluation.runner import EvalSettings, evaluate_domain, results_path
from tau2cl.evaluation.stats import EvalSummary
from tau2cl.reporting.formats import HeldoutResults, HeldoutStage
from tau2cl.reporting.tracker import MetricsTracker
from tau2cl.rl.training_model import TrainingModel
from tau2cl.runs.interrupt import agreed

Matrix = list[list[float | None]]
HELDOUT_SPLIT = "test"  # the split --heldout_eval evaluates beside --eval_split train
HELDOUT_LABEL_SUFFIX = "_heldout"  # its Results files: eval_results/<stage label>_heldout_<domain>.json


@dataclass
class AccuracyMatrix:
    """R[stage][domain] for the reward and the pass rate; None where not evaluated yet. `heldout`:
    the same stages on the held-out split (--heldout_eval), None without it."""

    reward: Matrix
    pass_rate: Matrix
    heldout: AccuracyMatrix | None = None

    @classmethod
    def empty(cls, num_domains: int, heldout: bool = False) -> AccuracyMatrix:
        rows = num_domains + 1
        return cls(
            [[None] * num_domains for _ in range(rows)], [[None] * num_domains for _ in range(rows)],
            cls.empty(num_domains) if heldout else None,
        )

    def fill(self, stage: int, order: list[str], summaries: dict[str, EvalSummary]) -> None:
        for j, name in enumerate(order):
            self.reward[stage][j] = summaries[name].reward_mean
            self.pass_rate[stage][j] = summaries[name].pass_rate

    def last_filled_row(self) -> int:
        """The last stage whose row is complete (rows fill in order); -1 before the first."""
        return max((i for i, row in enumerate(self.reward) if all(v is not None for v in row)), default=-1)

    def measures(self, stage: int, mixes_domains: bool = False) -> tuple[dict, dict]:
        """The CL measures a run reports after `stage` (rewards, pass rates); empty before the first
        domain ends. `mixes_domains`: only ACC (cl/measures.py reported_measures)."""
        if stage < 1:
            return {}, {}
        return (reported_measures(self.reward, stage, mixes_domains),
                reported_measures(self.pass_rate, stage, mixes_domains))


def stage_label(stage: int) -> str:
    return "before_training" if stage == 0 else f"after_task{stage - 1}"


def summary_row_labels(order: list[str], mixes_domains: bool) -> list[str]:
    """summary.json's `matrix_rows`: "before_training", "after_airline", ...; for a run whose stages
    mix all domains "after_part_1_of_3_all_domains", ..."""
    if mixes_domains:
        return ["before_training"] + [f"after_part_{i}_of_{len(order)}_all_domains" for i in range(1, len(order) + 1)]
    return ["before_training"] + [f"after_{n}" for n in order]


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
        self.mixes_domains = STRATEGIES[config.cl_algorithm].mixes_domains  # rows are parts of one stream
        self.matrix = AccuracyMatrix.empty(len(order), heldout=config.heldout_eval)
        self.floor: dict[str, float] | None = None  # do-nothing reward per domain on the evaluated tasks
        self.heldout_floor: dict[str, float] | None = None  # the same on the held-out tasks
        self.context: Any = None  # the CLContext, for the strategy's evaluation weights; set once built
        tracker.describe_matrix(
            mixes_domains=self.mixes_domains,
            heldout_results=self.heldout_results if config.heldout_eval else None,
        )

    def settings(self, max_tasks: int | None, split: str = "test") -> EvalSettings:
        cfg = self.config
        return EvalSettings(
            samples_per_task=cfg.eval_samples_per_task, max_tasks=max_tasks,
            episodes_per_batch=cfg.batch_size_per_gpu * cfg.num_samples_per_prompt,
            judge_model=cfg.judge_model, reward_timeout=cfg.reward_timeout, split=split,
        )

    def evaluate_domain(
        self, name: str, label: str, split: str | None = None, generator: torch.Generator | None = None
    ) -> EvalSummary:
        """The policy (as the strategy has it evaluated) on a domain's `split` (default: the
        evaluated split, --eval_split), capped by --eval_max_tasks, sampling from `generator`
        (default: the run's stream); its episodes go to a tau2 Results file under `label`."""
        cfg = self.config
        split = split or cfg.eval_split
        weights = self.strategy.evaluation_weights(self.context, name)
        with self.training.rollout_weights(weights):
            summary, records = evaluate_domain(
                self.engine, self.domains[name], self.settings(cfg.eval_max_tasks, split),
                self.dist.rank, self.dist.world_size, self.reward_fn, generator or self.generator, guard=agreed,
                on_progress=lambda done, total: self.tracker.eval_progress(label, name, done, total),
            )
        if self.dist.is_main:
            self._write_results(name, label, records, split)
        return summary

    def evaluate_tasks(self, name: str, tasks: list, label: str) -> float:
        """CLContext.evaluate: the mean trained reward of greedy runs on `tasks`; its random stream
        depends on --seed and `label` alone, not on the run's stream."""
        engine = self.engine
        if engine.settings.temperature != 0:
            engine = RolloutEngine(engine.policy, engine.user, replace(engine.settings, temperature=0.0),
                                   engine.check_stop, engine.sampler)
        summary, _ = evaluate_domain(
            engine, self.domains[name], self.settings(None), self.dist.rank, self.dist.world_size, self.reward_fn,
            self.labelled_generator(label), guard=agreed, tasks=tasks,
            on_progress=lambda done, total: self.tracker.eval_progress(label, name, done, total),
        )
        return summary.custom_reward_mean if self.reward_fn is not None else summary.reward_mean

    def labelled_generator(self, label: str) -> torch.Generator:
        """A random stream of its own that depends on --seed, `label` and the rank alone, so an
        evaluation drawing from it leaves the run's stream (and so its training) as it was."""
        generator = torch.Generator(device=self.dist.device)
        generator.manual_seed(zlib.crc32(f"{self.config.seed}-{label}-{self.dist.rank}".encode()))
        return generator

    def run_stage(self, stage: int, progress: Progress) -> None:
        """Fill row `stage` of the matrix: every domain's evaluated split, then (--heldout_eval) its
        held-out split; log them and their measures once both are done."""
        if stage == 0:
            self.tracker.announce_initial_eval()  # the header comes before the work it announces
        summaries = {name: self.evaluate_domain(name, stage_label(stage)) for name in self.order}
        heldout = self.matrix.heldout
        label = stage_label(stage) + HELDOUT_LABEL_SUFFIX
        heldout_summaries = None if heldout is None else {  # on a stream of its own: training is unchanged
            name: self.evaluate_domain(name, label, HELDOUT_SPLIT, self.labelled_generator(f"{label}-{name}"))
            for name in self.order
        }
        self.matrix.fill(stage, self.order, summaries)
        if heldout is not None:
            heldout.fill(stage, self.order, heldout_summaries)
        measures, _ = self.matrix.measures(stage, self.mixes_domains)
        heldout_stage = None if heldout is None else HeldoutStage(
            HELDOUT_SPLIT, heldout_summaries, heldout.measures(stage, self.mixes_domains)[0]
        )
        step, split = progress.global_step, self.config.eval_split
        if stage == 0:
            self.tracker.log_initial_eval(step, summaries, split, heldout_stage)
        else:
            self._log_stage(stage, step, summaries, heldout_summaries)
            self.tracker.log_transfer(stage - 1, step, summaries, self.seen(stage), measures, split, heldout_stage)
        progress.stages_done = stage + 1

    def seen(self, stage: int) -> list[str]:
        """The domains trained on by the end of `stage`: all of them in a run whose stages mix them."""
        return list(self.order) if self.mixes_domains else self.order[:stage]

    def _log_stage(self, stage: int, step: int, summaries: dict, heldout_summaries: dict | None) -> None:
        """Each domain's eval record of stage `stage` (>= 1); the current domain's [EVAL] lines."""
        domain_idx, current = stage - 1, self.order[stage - 1]
        steps = self.config.num_steps_per_task
        for name, summary in summaries.items():
            self.tracker.log_eval(domain_idx, steps, step, summary, current, echo=name == current, stage=stage,
                                  split=self.config.eval_split)
        for name, summary in (heldout_summaries or {}).items():
            self.tracker.log_eval(domain_idx, steps, step, summary, current, echo=name == current, stage=stage,
                                  split=HELDOUT_SPLIT, heldout=True)

    def mid_domain(self, domain_idx: int, step: int, progress: Progress) -> None:
        """The current domain's evaluation every --eval_interval steps."""
        name = self.order[domain_idx]
        summary = self.evaluate_domain(name, f"task{domain_idx}_step{step}")
        self.tracker.log_eval(domain_idx, step, progress.global_step, summary, name, split=self.config.eval_split)

    def compute_floor(self, policy: Any) -> None:
        """The do-nothing floor of every domain on the evaluated tasks (scripted user, tau2's
        evaluator); with --heldout_eval, on the held-out tasks too."""
        cfg = self.config
        self.floor = self._floor(policy, cfg.eval_split, "")
        if self.matrix.heldout is not None:
            self.heldout_floor = self._floor(policy, HELDOUT_SPLIT, " (held-out)")

    def _floor(self, policy: Any, split: str, note: str) -> dict[str, float]:
        cfg = self.config
        t0 = time.perf_counter()
        floor = do_nothing_floor(policy, self.domains, split, cfg.eval_max_tasks, cfg.user_max_turns)
        figures = " | ".join(f"{name} {value:.3f}" for name, value in floor.items())
        self.tracker.log_message(
            f"[FLOOR] do-nothing reward on the {split} split{note}: {figures} ({time.perf_counter() - t0:.1f}s)"
        )
        return floor

    def heldout_results(self) -> HeldoutResults:
        """The held-out matrix as it stands, its floor and its measures after its last filled row."""
        heldout = self.matrix.heldout
        measures, _ = heldout.measures(heldout.last_filled_row(), self.mixes_domains)
        return HeldoutResults(HELDOUT_SPLIT, heldout.reward, measures, self.heldout_floor)

    def summary(self, progress: Progress, skipped_updates: int) -> dict:
        """summary.json's contents as the run stands; the held-out entries are null without
        --heldout_eval."""
        done = progress.stages_done - 1  # last filled row
        measures, pass_measures = self.matrix.measures(done, self.mixes_domains)
        heldout = self.matrix.heldout
        heldout_measures, heldout_pass_measures = (None, None) if heldout is None else heldout.measures(
            done, self.mixes_domains
        )
        return {
            "task_order": self.order,
            "stages_completed": done,
            "accuracy_matrix": self.matrix.reward,
            "pass_rate_matrix": self.matrix.pass_rate,
            "matrix_rows": summary_row_labels(self.order, self.mixes_domains),
            "eval_split": self.config.eval_split,
            "do_nothing_floor": self.floor,
            "final_measures": measures,
            "final_measures_pass_rate": pass_measures,
            "heldout_accuracy_matrix": None if heldout is None else heldout.reward,
            "heldout_pass_rate_matrix": None if heldout is None else heldout.pass_rate,
            "heldout_do_nothing_floor": self.heldout_floor,
            "heldout_final_measures": heldout_measures,
            "heldout_final_measures_pass_rate": heldout_pass_measures,
            "global_step": progress.global_step,
            "skipped_updates": skipped_updates,
            "config": self.config.to_dict(),
        }

    def _write_results(self, name: str, label: str, records: list, split: str) -> None:
        cfg = self.config
        domain = self.domains[name]
        tasks = {t.id: t for t in domain.tasks(split)}
        used = [tasks[tid] for tid in dict.fromkeys(r.task_id for r in records)]
        write_results(
            results_path(cfg.log_dir, label, name), domain, used, [r.simulation for r in records],
            agent_model=cfg.model_name_or_path, user_name=self.engine.user.name,
            seed=cfg.seed, max_turns=cfg.max_turns,
        )
