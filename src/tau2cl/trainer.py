"""GRPOTrainer: the recipe of a run.

Setup (in __init__): the log_dir, the domains, the models, the user, the engines and the run's
parts (recipe/). train() = [the floor, evaluation stage 0] → for each domain: the strategy's
before_domain → the supervised warm start → GRPO steps (mid-domain evaluations, step checkpoints)
→ the strategy's after_domain → the evaluation stage → the domain's checkpoint; then the summary
and the report; cleanup in every case. Continual-learning behaviour lives in the strategy's hooks;
the trainer only calls them.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch

from tau2cl.agent.demonstrations import short_turn_limit_lines
from tau2cl.agent.engine import RolloutEngine, RolloutSettings
from tau2cl.agent.users.build import build_user
from tau2cl.cl.context import CLContext, Pending, Progress
from tau2cl.cl.strategies.base import CLStrategy, build_strategy
from tau2cl.config import GRPOConfig, parse_task_ids
from tau2cl.distributed import DistInfo, all_gather_objects, compute_cleanup, compute_init
from tau2cl.env import tau2_compat
from tau2cl.env.domain_views import compact, with_test_tasks, with_train_tasks, without_train_tasks
from tau2cl.env.domains import Domain, load_domain
from tau2cl.env.rewards import load_reward_fn
from tau2cl.errors import UserError
from tau2cl.recipe.accuracy_matrix import EvaluationStages
from tau2cl.recipe.checkpointer import Checkpointer, TrainingState, open_resume_point
from tau2cl.recipe.engine_sync import start_sampler
from tau2cl.recipe.grpo_step import GRPOStep
from tau2cl.recipe.models import load_models
from tau2cl.recipe.rollouts import Rollouts
from tau2cl.recipe.stop_boundary import StopBoundary
from tau2cl.reporting.report import write_report
from tau2cl.reporting.tracker import MetricsTracker
from tau2cl.rl.optimization import ClippedStep
from tau2cl.rl.sft import SupervisedWarmStart
from tau2cl.runs.checkpoint import domain_checkpoint_name, sft_checkpoint_name
from tau2cl.runs.interrupt import AllRanksStop, SignalWatch
from tau2cl.runs.run_folder import (
    RunLock,
    check_writable,
    guard_log_dir,
    tidy_checkpoint_temporaries,
)


class GRPOTrainer:
    """Trains a policy on `config.task_order` one domain after another."""

    def __init__(self, config: GRPOConfig):
        self.config = config
        self.dist: DistInfo = compute_init(timeout=timedelta(minutes=config.dist_timeout_minutes))
        tau2_compat.set_tau2_verbosity(config.verbose)
        self.order = list(config.task_order)
        self.lock = RunLock(config.log_dir)
        self._prepare_log_dir()
        self.signals = SignalWatch(announce=self.dist.is_main)
        self.strategy = build_strategy(config)  # before the domains: it may hold train tasks out
        self.domains: dict[str, Domain] = {n: self.load_domain(n) for n in self.order}
        self._check_batch_fits()
        self.models = load_models(config, self.dist)
        self.policy = self.models.policy
        self._check_context_fits()
        self.sampler, self.engine_sync = (
            start_sampler(config, self.models, self.dist.device.type == "cuda")
            if config.rollout_backend == "vllm" else (None, None)
        )
        self.user = build_user(config, reference=self.models.reference_policy, device=self.dist.device)
        self.generator = torch.Generator(device=self.dist.device)
        self.generator.manual_seed(config.seed * 1000 + self.dist.rank)
        train_engine, eval_engine = self._engines()
        self.progress = Progress()
        self.clipped_step = ClippedStep(self.models.training.params, config.max_grad_norm)
        self.sft = SupervisedWarmStart(config, self.dist, self.policy, self.models.training, self.user,
                                       self.clipped_step, self.models.compute_dtype)
        self.rollouts = Rollouts(train_engine, self.generator, self.domains, load_reward_fn(config.reward_fn),
                                 config, self.signals.check)
        resume = (open_resume_point(config, self.dist, self.models.training.sharded, config.resume_from)
                  if config.resume_from else None)
        self.tracker = MetricsTracker.from_config(config, is_main=self.dist.is_main,
                                                  wandb_run_id=resume and resume.wandb_run_id)
        if config.reward_fn is None:  # tau2's reward, which needs the conversation's stop
            for line in short_turn_limit_lines(self.domains, config.max_turns):
                self.tracker.log_message(line)
        self.grpo = GRPOStep(config, self.dist, self.models, self.rollouts, self.strategy, self.clipped_step,
                             self.tracker.log_message, self.engine_sync)
        self.evaluation = EvaluationStages(config, self.dist, self.order, self.domains, eval_engine,
                                           self.models.training, self.strategy, self.rollouts.reward_fn,
                                           self.generator, self.tracker)
        state = TrainingState(self.progress, self.evaluation.matrix, self.grpo.optimizer, self.sft,
                              self.clipped_step, self.strategy, self.generator)
        self.checkpointer = Checkpointer(config, self.dist, self.models, state)
        self.checkpointer.wandb_run_id = self.tracker.wandb_run_id
        self.boundary = StopBoundary(self.signals, self.generator, self.checkpointer, self.tracker.end_domain)
        if resume is not None:
            self.checkpointer.restore(resume)
        if self.models.lora is not None:
            self.tracker.log_message(self.models.lora.describe())
        self.cl_context = self._cl_context()
        self.evaluation.context = self.cl_context
        self.strategy.setup(self.cl_context)

    # ---- setup ------------------------------------------------------------------------------
    def _prepare_log_dir(self) -> None:
        """Rank 0 checks, locks and tidies the log_dir; every rank raises the same refusal."""
        cfg, problem = self.config, None
        if self.dist.is_main:
            try:
                check_writable(cfg.log_dir)
                self.lock.acquire()
                guard_log_dir(cfg.log_dir, cfg.resume_from, cfg.overwrite_log_dir)
                for line in tidy_checkpoint_temporaries(cfg.log_dir):
                    print(f"tau2cl: {line} (left by an interrupted checkpoint save)", file=sys.stderr)
            except UserError as error:
                problem = str(error)
        problem = all_gather_objects(problem)[0]
        if problem:
            self.lock.release()
            raise UserError(problem)

    def load_domain(self, name: str) -> Domain:
        """A domain in the setting the user can play (telecom's full setting needs an LLM user),
        without the train tasks the strategy holds out of training."""
        solo = None if self.config.user_model is None else False
        domain = load_domain(name, self.config.max_tasks_per_domain, solo_mode=solo)
        chosen = parse_task_ids(self.config.task_ids).get(name)
        domain = domain if chosen is None else with_train_tasks(domain, chosen)
        chosen_tests = parse_task_ids(self.config.test_task_ids, "--test_task_ids").get(name)
        domain = domain if chosen_tests is None else with_test_tasks(domain, chosen_tests)
        domain = compact(domain) if self.config.compact_domains else domain  # its tools cover held-out tasks too
        return without_train_tasks(domain, {t.id for t in self.strategy.held_out_tasks(domain)})

    def _check_batch_fits(self) -> None:
        for name, domain in self.domains.items():
            if self.config.batch_size_per_gpu > len(domain.train_tasks):
                raise UserError(
                    f"batch_size_per_gpu {self.config.batch_size_per_gpu} is larger than the {name} train split "
                    f"({len(domain.train_tasks)} tasks, after any the strategy holds out); lower it, raise "
                    f"max_tasks_per_domain or name more --task_ids."
                )

    def _check_context_fits(self) -> None:
        """Refuse a --max_context_tokens that leaves no room for a domain's prompt and one reply."""
        cfg = self.config
        for name, domain in self.domains.items():
            task = domain.train_tasks[0]
            prompt = len(self.policy.renderer.prompt_ids(domain.system_prompt(task), domain.tool_schemas, []))
            if prompt + cfg.max_new_tokens > cfg.max_context_tokens:
                raise UserError(
                    f"--max_context_tokens {cfg.max_context_tokens} leaves no room for the {name} prompt "
                    f"({prompt} tokens) plus --max_new_tokens {cfg.max_new_tokens}; raise it to at least "
                    f"{prompt + cfg.max_new_tokens}."
                )

    def _engines(self) -> tuple[RolloutEngine, RolloutEngine]:
        """The training engine (--temperature) and the evaluation engine (--eval_temperature)."""
        cfg = self.config
        common = dict(max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens,
                      max_context_tokens=cfg.max_context_tokens, top_p=cfg.top_p, kv_reuse=cfg.kv_reuse)
        return tuple(
            RolloutEngine(self.policy, self.user, RolloutSettings(temperature=t, **common), self.signals.check,
                          self.sampler)
            for t in (cfg.temperature, cfg.eval_temperature)
        )

    def _cl_context(self) -> CLContext:
        models = self.models
        return CLContext(
            config=self.config, dist=self.dist, order=self.order, domains=self.domains,
            params=models.training.params, progress=self.progress, rollout=self.rollouts.agreed_sample,
            episode_gradients=models.episode_gradients, snapshot_weights=models.snapshot_weights,
            load_weights=models.load_weights, accuracy_matrix=lambda: self.evaluation.matrix.reward,
            restart_optimizer=self.grpo.optimizer.state.clear,
            evaluate=self.evaluation.evaluate_tasks, log=self._log_strategy,
        )

    def _log_strategy(self, figures: dict, line: str) -> None:
        """CLContext.log: a `strategy` record in metrics.jsonl and a console line (rank 0)."""
        domain_idx = self.progress.domain_idx
        self.tracker.log_strategy(
            self.strategy.name, domain_idx, self.order[domain_idx], self.progress.global_step, figures, line
        )

    # ---- train ------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run the whole domain sequence; returns the summary written to summary.json."""
        self.signals.install()
        try:
            try:
                self.evaluation.compute_floor(self.policy)
                if self.progress.stages_done == 0:
                    self.boundary.mark("during the evaluation before training")
                    self._evaluate_stage(0)
                for domain_idx in range(self.progress.domain_idx, len(self.order)):
                    self._train_domain(domain_idx)
            except AllRanksStop as stop:
                self.boundary.stop(stop)
            return self._finish()
        finally:
            self.signals.uninstall()
            self.user.close()
            self.tracker.close()
            self.lock.release()
            if self.sampler is not None:
                self.sampler.close()
            compute_cleanup()

    def _train_domain(self, domain_idx: int) -> None:
        name = self.order[domain_idx]
        pool = [self.domains[n] for n in self.strategy.training_domains(self.order, domain_idx)]
        steps = self.config.num_steps_per_task
        progress = self.progress
        if progress.step == 0 and progress.sft_step == 0:
            self.strategy.before_domain(self.cl_context, domain_idx, name)
            if domain_idx > 0 and self.config.domain_restart == "optimizer":
                self.grpo.optimizer.state.clear()  # AdamW's moments start afresh with the domain
        self.tracker.start_domain(domain_idx, self.strategy.stage_name(self.order, domain_idx),
                                  sum(len(d.train_tasks) for d in pool), steps, progress.step, sft_step=progress.sft_step)
        if progress.step == 0:
            self._warm_start(domain_idx, pool)
        if progress.pending == Pending.MID_DOMAIN_EVAL:  # a stop interrupted it: redo it first
            self._mid_domain_eval(domain_idx, progress.step)
        for step in range(progress.step + 1, steps + 1):
            self.boundary.mark(f"at Task {domain_idx} ({name}) step {step - 1}/{steps}")
            stats = self.grpo.run(domain_idx, pool, step, progress, self.cl_context)
            progress.step = step
            progress.global_step += 1
            self.tracker.log_train(domain_idx, name, step, progress.global_step, stats)
            if self.config.eval_interval and step % self.config.eval_interval == 0 and step < steps:
                self._mid_domain_eval(domain_idx, step)
            if self.config.save_interval and step % self.config.save_interval == 0 and step < steps:
                self.checkpointer.save_step()
            self.boundary.stop_if_signalled(f"at Task {domain_idx} ({name}) step {step}/{steps}")
        self.tracker.end_domain()
        if progress.pending != Pending.STAGE_EVAL:
            self.boundary.mark(f"after Task {domain_idx} ({name}), in the {self.strategy.name} strategy's end-of-domain work")
            if type(self.strategy).after_domain is not CLStrategy.after_domain:
                self.tracker.log_message(f"{self.strategy.name}: end-of-domain work on {name} ...")
            self.strategy.after_domain(self.cl_context, domain_idx, name)
        progress.pending = Pending.STAGE_EVAL
        self.boundary.mark(f"during the evaluation after Task {domain_idx} ({name})")
        self._evaluate_stage(domain_idx + 1)
        progress.set(domain_idx=domain_idx + 1, step=0, sft_step=0, stages_done=domain_idx + 2, pending=Pending.NOTHING)
        self.checkpointer.save(domain_checkpoint_name(domain_idx))

    def _warm_start(self, domain_idx: int, pool: list[Domain]) -> None:
        """The stage's supervised steps; a stop between two of them saves a mid-warm-start checkpoint."""
        total = self.config.sft_steps_per_task

        def after_step(step: int) -> None:
            where = f"at Task {domain_idx} ({self.order[domain_idx]}) supervised step {step}/{total}"
            self.boundary.stop_if_signalled(where, sft_checkpoint_name(domain_idx, step))

        self.sft.run(domain_idx, pool, self.progress, self.tracker, after_step=after_step,
                     extra_loss=lambda: self.strategy.loss_terms(self.cl_context))

    def _mid_domain_eval(self, domain_idx: int, step: int) -> None:
        self.progress.pending = Pending.MID_DOMAIN_EVAL
        self.boundary.mark(f"during the evaluation at Task {domain_idx} ({self.order[domain_idx]}) step {step}")
        self.evaluation.mid_domain(domain_idx, step, self.progress)
        self.progress.pending = Pending.NOTHING

    def _evaluate_stage(self, stage: int) -> None:
        self.evaluation.run_stage(stage, self.progress)
        self.tracker.write_summary(self.summary())

    def summary(self) -> dict:
        return self.evaluation.summary(self.progress, self.clipped_step.skipped)

    # ---- cleanup ----------------------------------------------------------------------------
    def _finish(self) -> dict:
        summary = self.summary()
        self.tracker.log_final_summary(self.order, self.evaluation.matrix.reward, summary["final_measures"],
                                       self.config.eval_split, self.evaluation.floor)
        self.tracker.write_summary(summary)
        if self.dist.is_main:
            self._write_report()
        return summary

    def _write_report(self) -> None:
        """The transfer report (table + PNGs) beside the run files; a plotting failure only warns."""
        try:
            files = write_report(self.config.log_dir)
        except Exception as exc:  # the run's results are already on disk
            self.tracker.log_message(f"warning: could not write the transfer report: {exc}")
            return
        self.tracker.log_message(f"Report: {files.text}, {files.accuracy_matrix}, {files.learning_curves}")

