"""GRPOTrainer: the domain sequence, GRPO steps, the evaluation matrix, checkpoints and reports.

Life cycle: setup (in __init__) → train() = [evaluate stage 0] → for each domain: steps →
evaluate every domain (stage i+1) → checkpoint → final summary → cleanup. Continual-learning
behaviour lives in the strategy's hooks; the trainer only calls them.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from tau2cl.agent.engine import RolloutEngine, RolloutSettings
from tau2cl.agent.episode import RolloutRequest, Trajectory
from tau2cl.agent.policy import DTYPES, Policy, load_model, load_tokenizer
from tau2cl.agent.users.build import build_user
from tau2cl.cl.context import CLContext, Progress
from tau2cl.cl.measures import transfer_metrics
from tau2cl.cl.strategies.base import CLStrategy, build_strategy
from tau2cl.config import REFERENCE_USER, RESUME_MAY_CHANGE, GRPOConfig, parse_task_ids
from tau2cl.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_max_,
    all_reduce_sum_,
    as_local_tensor,
    compute_cleanup,
    compute_init,
)
from tau2cl.env import tau2_compat
from tau2cl.env.domain_views import compact, with_train_tasks, without_train_tasks
from tau2cl.env.domains import Domain, load_domain
from tau2cl.env.results_files import write_results
from tau2cl.errors import UserError
from tau2cl.evaluation.floor import do_nothing_floor
from tau2cl.evaluation.runner import EvalSettings, evaluate_domain, results_path
from tau2cl.evaluation.stats import EvalSummary
from tau2cl.reporting.report import write_report
from tau2cl.reporting.tracker import MetricsTracker
from tau2cl.rl.dynamic_sampling import resample_zero_variance
from tau2cl.rl.grpo import group_advantages, zero_std_group_fraction
from tau2cl.rl.lora import adapters_disabled, add_lora, base_dtype
from tau2cl.rl.rewards import load_reward_fn, score_trajectories
from tau2cl.rl.schedule import learning_rate
from tau2cl.rl.sft import SupervisedWarmStart
from tau2cl.rl.teacher import weights_in_place
from tau2cl.rl.training_model import TrainingModel
from tau2cl.rl.update import (
    LossSettings,
    accumulate_gradients,
    backward_each,
    collate,
    micro_batches_by_length,
    recompute_old_logprobs,
    reference_logprobs,
)
from tau2cl.runs.checkpoint import (
    CheckpointSaveError,
    check_writable,
    count_lines,
    domain_checkpoint_name,
    find_checkpoint,
    load_model_weights,
    load_state,
    non_finite_count,
    rng_state,
    save_checkpoint,
    set_rng_state,
    sft_checkpoint_name,
    step_checkpoint_name,
    truncate_lines,
)
from tau2cl.runs.files import METRICS_FILE
from tau2cl.runs.interrupt import RunStop, StopRequest, TrainingInterrupted, agreed
from tau2cl.runs.resume_check import config_differences, refusal
from tau2cl.runs.run_folder import RunLock, guard_log_dir, tidy_checkpoint_temporaries


class GRPOTrainer:
    """Trains a policy on `config.task_order` one domain after another."""

    def __init__(self, config: GRPOConfig):
        self.config = config
        self.dist: DistInfo = compute_init(timeout=timedelta(minutes=config.dist_timeout_minutes))
        tau2_compat.set_tau2_verbosity(config.verbose)
        self.order = list(config.task_order)
        self.lock = RunLock(config.log_dir)
        self._prepare_log_dir()
        self.stop_request = StopRequest(announce=self.dist.is_main)
        self.last_checkpoint: Path | None = None  # the newest complete checkpoint of this run
        self._boundary_rng = None  # random state at the last boundary a stop returns to
        self._where = "before training"  # what the run is doing, for the stop line
        self.strategy = build_strategy(config)  # before the domains: it may hold train tasks out
        self.domains: dict[str, Domain] = {n: self._load_domain(n) for n in self.order}
        self._check_batch_fits()
        self.compute_dtype = _compute_dtype(config.model_dtype, self.dist)
        self.policy = self._load_policy()
        self._check_context_fits()
        self.reference = self._load_reference()
        self.training = TrainingModel(self.policy.model, self.dist, config.parallelism)
        self.params = self.training.params
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        user = build_user(config, reference=self._reference_policy, device=self.dist.device)
        self.user = user
        common = dict(max_turns=config.max_turns, max_new_tokens=config.max_new_tokens,
                      max_context_tokens=config.max_context_tokens, top_p=config.top_p,
                      kv_reuse=config.kv_reuse)
        check = self.stop_request.check
        self.train_engine = RolloutEngine(self.policy, user, RolloutSettings(temperature=config.temperature, **common), check)
        self.eval_engine = RolloutEngine(
            self.policy, user, RolloutSettings(temperature=config.eval_temperature, **common), check
        )
        self.reward_fn = load_reward_fn(config.reward_fn)
        self.sft = SupervisedWarmStart(config, self.dist, self.policy, self.training, user, self.compute_dtype)
        self.generator = torch.Generator(device=self.dist.device)
        self.generator.manual_seed(config.seed * 1000 + self.dist.rank)
        self.progress = Progress()
        T = len(self.order)
        self.reward_matrix: list[list[float | None]] = [[None] * T for _ in range(T + 1)]
        self.pass_matrix: list[list[float | None]] = [[None] * T for _ in range(T + 1)]
        self.skipped_updates = 0
        self.floor: dict[str, float] | None = None  # do-nothing reward per domain on the evaluated tasks
        wandb_id = None
        if config.resume_from:
            wandb_id = self._resume(config.resume_from)
        self.saved_step_checkpoints: list[Path] = []
        self.tracker = MetricsTracker.from_config(config, is_main=self.dist.is_main, wandb_run_id=wandb_id)
        if self.lora is not None:
            self.tracker.log_message(self.lora.describe())
        self.cl_context = CLContext(
            config=config, dist=self.dist, order=self.order, domains=self.domains, params=self.params,
            progress=self.progress, rollout=lambda requests: agreed(lambda: self.train_engine.run(requests, self.generator)),
            episode_gradients=self._episode_gradients, snapshot_weights=self._snapshot_weights,
            load_weights=self._load_weights, accuracy_matrix=lambda: self.reward_matrix,
            restart_optimizer=lambda: self.optimizer.state.clear(),
            evaluate=self._evaluate_tasks, log=self._log_strategy,
        )
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

    def _load_policy(self) -> Policy:
        torch.manual_seed(self.config.seed)
        tokenizer = load_tokenizer(self.config.model_name_or_path)
        # fp32 master weights: bf16/fp16 runs compute under autocast, so small updates are kept;
        # with LoRA the base is frozen in --model_dtype and only the (fp32) adapters train
        model = load_model(
            self.config.model_name_or_path, base_dtype(self.config), self.dist.device, self.config.gradient_checkpointing
        )
        self.lora = add_lora(model, self.config, tokenizer)
        model = model if self.lora is None else self.lora.lm
        model.train()
        return Policy(model, tokenizer, compute_dtype=self.compute_dtype)

    def _load_domain(self, name: str) -> Domain:
        """A domain in the setting the user can play (telecom's full setting needs an LLM user),
        without the train tasks the strategy holds out of training."""
        solo = None if self.config.user_model is None else False
        domain = load_domain(name, self.config.max_tasks_per_domain, solo_mode=solo)
        chosen = parse_task_ids(self.config.task_ids).get(name)
        domain = domain if chosen is None else with_train_tasks(domain, chosen)
        domain = compact(domain) if self.config.compact_domains else domain  # its tools cover held-out tasks too
        return without_train_tasks(domain, {t.id for t in self.strategy.held_out_tasks(domain)})

    def _load_reference(self) -> Any:
        """The frozen reference model: for the KL penalty, and as the user with --user_model reference."""
        if self.config.kl_coef <= 0 and self.config.user_model != REFERENCE_USER:
            return None
        if self.lora is not None:  # the policy's own base, run with the adapters off
            return self.policy.model
        dtype = self.config.model_dtype if self.config.model_dtype != "auto" and self.compute_dtype else "float32"
        model = load_model(self.config.model_name_or_path, dtype, self.dist.device)
        model.eval().requires_grad_(False)
        return model

    def _episode_gradients(self, trajectories: list[Trajectory]) -> Iterator[Trajectory]:
        """CLContext.episode_gradients: the batch's common prompt prefix runs once (--shared_prefix_update)."""
        kept = [t for t in trajectories if t.num_generated_tokens > 0]
        sequences = [(t.token_ids, t.loss_mask) for t in kept]
        for i in backward_each(self.policy.model, sequences, self.compute_dtype, self.config.shared_prefix_update):
            yield kept[i]

    def _trainable_weights(self) -> dict[str, torch.Tensor]:
        """The rollout model's trained parameters by name (full tensors on every rank)."""
        return {n: p for n, p in self.policy.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def _snapshot_weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().clone() for n, p in self._trainable_weights().items()}

    @torch.no_grad()
    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Make `weights` the policy's: into the rollout model, then into the trained copy."""
        params = self._trainable_weights()
        if set(weights) != set(params):
            raise ValueError("load_weights needs exactly the trainable parameters, by name")
        for name, value in weights.items():
            params[name].copy_(value)
        self.training.load_from_rollout_model()

    def _reference_policy(self) -> Policy:
        """The reference model behind a Policy, so it can sample the user's turns."""
        return Policy(
            self.reference, self.policy.tokenizer, compute_dtype=self.compute_dtype,
            weights=lambda: adapters_disabled(self.lora),
        )

    # ---- public API -------------------------------------------------------------------------
    def train(self) -> dict:
        """Run the whole domain sequence; returns the summary written to summary.json."""
        self.stop_request.install()
        try:
            try:
                self._compute_floor()
                if self.progress.stages_done == 0:
                    self._boundary_rng = rng_state(self.generator)
                    self._where = "during the evaluation before training"
                    self._evaluate_stage(0)
                for task_idx in range(self.progress.task_idx, len(self.order)):
                    self._train_domain(task_idx)
            except RunStop as stop:
                self._stop_at_boundary(stop)
            return self._finish()
        finally:
            self.stop_request.uninstall()
            self.user.close()
            self.tracker.close()
            self.lock.release()
            compute_cleanup()

    def evaluate_task(self, domain_name: str, label: str | None = None) -> EvalSummary:
        """Evaluate the current policy on a domain's test split (all ranks take part)."""
        if domain_name not in self.domains:
            self.domains[domain_name] = self._load_domain(domain_name)
        settings = EvalSettings(
            samples_per_task=self.config.eval_samples_per_task,
            max_tasks=self.config.eval_max_tasks,
            episodes_per_batch=self.config.batch_size_per_gpu * self.config.num_samples_per_prompt,
            judge_model=self.config.judge_model,
            reward_timeout=self.config.reward_timeout,
            split=self.config.eval_split,
        )
        weights = self.strategy.evaluation_weights(self.cl_context, domain_name)
        with self.training.rollout_weights(weights):
            summary, records = evaluate_domain(
                self.eval_engine, self.domains[domain_name], settings, self.dist.rank, self.dist.world_size,
                self.reward_fn, self.generator, guard=agreed,
                on_progress=lambda done, total: self.tracker.eval_progress(label or "eval", domain_name, done, total),
            )
        if self.dist.is_main and label is not None:
            self._write_eval_results(domain_name, label, records)
        return summary

    def _evaluate_tasks(self, domain_name: str, tasks: list, label: str) -> float:
        """CLContext.evaluate: the mean trained reward of greedy runs on `tasks` (all ranks take
        part); its random stream comes from the seed and `label` alone, not the run's."""
        cfg = self.config
        engine = self.eval_engine
        if engine.settings.temperature != 0:
            engine = RolloutEngine(self.policy, self.user, replace(engine.settings, temperature=0.0), engine.check_stop)
        settings = EvalSettings(
            samples_per_task=cfg.eval_samples_per_task, max_tasks=None,
            episodes_per_batch=cfg.batch_size_per_gpu * cfg.num_samples_per_prompt,
            judge_model=cfg.judge_model, reward_timeout=cfg.reward_timeout,
        )
        generator = torch.Generator(device=self.dist.device)
        generator.manual_seed(zlib.crc32(f"{cfg.seed}-{label}-{self.dist.rank}".encode()))
        summary, _ = evaluate_domain(
            engine, self.domains[domain_name], settings, self.dist.rank, self.dist.world_size, self.reward_fn,
            generator, guard=agreed, tasks=tasks,
            on_progress=lambda done, total: self.tracker.eval_progress(label, domain_name, done, total),
        )
        return summary.custom_reward_mean if self.reward_fn is not None else summary.reward_mean

    def _log_strategy(self, figures: dict, line: str) -> None:
        """CLContext.log: a `strategy` record in metrics.jsonl and a console line (rank 0)."""
        task_idx = self.progress.task_idx
        self.tracker.log_strategy(
            self.strategy.name, task_idx, self.order[task_idx], self.progress.global_step, figures, line
        )

    # ---- the domain loop --------------------------------------------------------------------
    def _train_domain(self, task_idx: int) -> None:
        name = self.order[task_idx]
        domain = self.domains[name]
        steps = self.config.num_steps_per_task
        if self.progress.step == 0 and self.progress.sft_step == 0:
            self.strategy.before_domain(self.cl_context, task_idx, name)
            if task_idx > 0 and self.config.domain_restart == "optimizer":
                self.optimizer.state.clear()  # AdamW's moments start afresh with the domain
        self.tracker.start_domain(task_idx, name, len(domain.train_tasks), steps, self.progress.step)
        if self.progress.step == 0:
            self.sft.run(task_idx, domain, self.progress, self.tracker,
                         after_step=lambda s: self._stop_if_requested(task_idx, name, s, sft=True),
                         extra_loss=lambda: self.strategy.loss_terms(self.cl_context))
        if self.progress.pending == "eval":  # a stop interrupted it: redo it first
            self._mid_domain_eval(task_idx, name, self.progress.step)
        for step in range(self.progress.step + 1, steps + 1):
            self._at_boundary(f"at Task {task_idx} ({name}) step {step - 1}/{steps}")
            stats = self._train_step(task_idx, domain, step)
            self.progress.step = step
            self.progress.global_step += 1
            self.tracker.log_train(task_idx, name, step, self.progress.global_step, stats)
            if self.config.eval_interval and step % self.config.eval_interval == 0 and step < steps:
                self._mid_domain_eval(task_idx, name, step)
            if self.config.save_interval and step % self.config.save_interval == 0 and step < steps:
                self._save_step_checkpoint()
            self._stop_if_requested(task_idx, name, step)
        self.tracker.end_domain()
        if self.progress.pending != "stage":
            self._at_boundary(f"after Task {task_idx} ({name}), in the {self.strategy.name} strategy's end-of-domain work")
            if type(self.strategy).after_domain is not CLStrategy.after_domain:
                self.tracker.log_message(f"{self.strategy.name}: end-of-domain work on {name} ...")
            self.strategy.after_domain(self.cl_context, task_idx, name)
        self.progress.pending = "stage"
        self._at_boundary(f"during the evaluation after Task {task_idx} ({name})")
        self._evaluate_stage(task_idx + 1)
        self.progress.set(task_idx=task_idx + 1, step=0, sft_step=0, stages_done=task_idx + 2, pending="")
        self._save(domain_checkpoint_name(task_idx))

    def _mid_domain_eval(self, task_idx: int, name: str, step: int) -> None:
        self.progress.pending = "eval"
        self._at_boundary(f"during the evaluation at Task {task_idx} ({name}) step {step}")
        summary = self.evaluate_task(name, label=f"task{task_idx}_step{step}")
        self.tracker.log_eval(task_idx, step, self.progress.global_step, summary, name)
        self.progress.pending = ""

    def _at_boundary(self, where: str) -> None:
        """Remember the random state a stop in the coming work returns to, and what that work is."""
        self._boundary_rng = rng_state(self.generator)
        self._where = where

    def _train_step(self, task_idx: int, domain: Domain, step: int) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        requests = self.strategy.augment_batch(self.cl_context, self._step_requests(task_idx, domain, step))
        times: list[float] = []

        def rollout_and_score() -> list[Trajectory]:  # rank-local: a stop or a reward fault leaves it
            with _out_of_memory_names_the_knobs("rollout"):
                out = self.train_engine.run(requests, self.generator)
            times.append(time.perf_counter())
            self._score(out)
            return out

        trajectories = agreed(rollout_and_score)
        t1 = times[0]
        resampled: dict = {}
        if cfg.dynamic_sampling:
            trajectories, resampled = self._resample(task_idx, step, trajectories)
        t2 = time.perf_counter()
        rewards = torch.tensor([t.train_reward for t in trajectories])
        advantages = group_advantages(rewards, cfg.num_samples_per_prompt, cfg.advantage_normalization)
        self.strategy.after_rollout(self.cl_context, trajectories)
        with _out_of_memory_names_the_knobs("the update"):
            stats = self._update(trajectories, advantages.tolist())
        self.strategy.after_update(self.cl_context, step)
        t3 = time.perf_counter()
        stats.update(self._episode_stats(trajectories, rewards))
        stats.update(resampled)
        stats.update(self.strategy.step_metrics(self.cl_context, trajectories))
        # disjoint parts: the reference model's log-probs (time_ref, timed in _update) are not update time
        stats.update(time_rollout=t1 - t0, time_reward=t2 - t1, time_update=t3 - t2 - stats["time_ref"])
        return stats

    def _step_requests(self, task_idx: int, domain: Domain, step: int) -> list[RolloutRequest]:
        """This rank's disjoint shard of the step's tasks, each repeated num_samples_per_prompt times."""
        cfg = self.config
        per_rank, world = cfg.batch_size_per_gpu, self.dist.world_size
        rng = random.Random(f"{cfg.seed}-{task_idx}-{step}")  # same on every rank; no state to resume
        pool = list(range(len(domain.train_tasks)))
        picks: list[int] = []
        while len(picks) < per_rank * world:
            picks += rng.sample(pool, min(len(pool), per_rank * world - len(picks)))
        mine = picks[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank]
        return [
            RolloutRequest(domain, domain.train_tasks[i], group=g)
            for g, i in enumerate(mine)
            for _ in range(cfg.num_samples_per_prompt)
        ]

    def _score(self, trajectories: list[Trajectory]) -> None:
        """tau2's reward (and the custom one) of finished episodes; rank-local, stoppable."""
        cfg = self.config
        score_trajectories(
            trajectories, self.domains, self.reward_fn, cfg.judge_model, cfg.reward_timeout, self.stop_request.check
        )

    def _resample(self, task_idx: int, step: int, trajectories: list[Trajectory]) -> tuple[list[Trajectory], dict]:
        """Dynamic sampling: zero-variance groups replaced by fresh tasks' groups (all ranks together)."""
        cfg = self.config

        def rollout(requests: list[RolloutRequest]) -> list[Trajectory]:
            def work() -> list[Trajectory]:
                fresh = self.train_engine.run(requests, self.generator)
                self._score(fresh)
                return fresh

            return agreed(work)

        rng = random.Random(f"{cfg.seed}-{task_idx}-{step}-resample-{self.dist.rank}")
        batch, report = resample_zero_variance(
            trajectories, cfg.num_samples_per_prompt, self.domains, rollout, cfg.max_resample_rounds, rng
        )
        message = report.exhausted_message(cfg.max_resample_rounds)
        if message:
            self.tracker.log_message(message)
        return batch, report.stats()

    # ---- the update -------------------------------------------------------------------------
    def _update(self, trajectories: list[Trajectory], advantages: list[float]) -> dict:
        cfg = self.config
        batch = collate(
            [t.token_ids for t in trajectories], [t.loss_mask for t in trajectories],
            [t.sampling_logprobs for t in trajectories], advantages,
            self.policy.tokenizer.pad_token_id, self.dist.device,
        )
        micro = micro_batches_by_length([len(t.token_ids) for t in trajectories], cfg.gradient_accumulation_steps,
                                        groups=[t.domain for t in trajectories])
        if cfg.tis_cap is not None:
            recompute_old_logprobs(self.policy.model, batch, micro, cfg.temperature, self.compute_dtype)
        t0 = time.perf_counter()
        if self.reference is not None and cfg.kl_coef > 0:
            with adapters_disabled(self.lora):
                batch.ref_logprobs = reference_logprobs(
                    self.reference, batch, micro, cfg.temperature, self.compute_dtype, cfg.shared_prefix_update
                )
        teacher = self.strategy.teacher_weights(self.cl_context)
        if teacher is not None:  # the rollout model holds full weights on every rank, even under FSDP
            with weights_in_place(self.policy.model, teacher):
                batch.teacher_logprobs = reference_logprobs(
                    self.policy.model, batch, micro, cfg.temperature, self.compute_dtype, cfg.shared_prefix_update
                )
        time_ref = time.perf_counter() - t0
        global_tokens = float(all_reduce_sum_(torch.tensor([batch.num_tokens], dtype=torch.float64)).item())
        settings = LossSettings(cfg.temperature, cfg.clip_range, cfg.upper_clip_range, cfg.kl_coef,
                                self.compute_dtype, cfg.dual_clip, cfg.tis_cap, cfg.shared_prefix_update,
                                cfg.distill_coef)
        self.training.module.train()
        restart = cfg.domain_restart != "none"
        lr = learning_rate(cfg.learning_rate, cfg.warmup_steps, self.progress.step if restart else self.progress.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stats: dict = {}
        for _ in range(cfg.num_updates_per_batch):
            # DDP/FSDP average the gradients over ranks in the last micro-batch's backward
            stats = accumulate_gradients(
                self.training.module, batch, micro, settings, max(global_tokens, 1.0) / self.dist.world_size,
                extra_loss=lambda: self.strategy.loss_terms(self.cl_context),
            )
            grad_norm = as_local_tensor(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
            if torch.isfinite(grad_norm):
                self.optimizer.step()
            else:
                self.skipped_updates += 1
            self.optimizer.zero_grad(set_to_none=True)
            stats["grad_norm"] = float(grad_norm)
        self.training.refresh_rollout_model()
        stats = _token_weighted_across_ranks(stats)
        stats["lr"] = lr  # the learning rate this step used
        stats["time_ref"] = time_ref
        stats["skipped_updates"] = self.skipped_updates
        return stats

    def _episode_stats(self, trajectories: list[Trajectory], rewards: torch.Tensor) -> dict:
        local = [(t.train_reward, t.reward, t.tool_accuracy, t.num_generated_tokens, t.assistant_turns) for t in trajectories]
        rows = [r for part in all_gather_objects(local) for r in part]
        train_r = torch.tensor([r[0] for r in rows], dtype=torch.float64)
        tool = [r[2] for r in rows if r[2] is not None]
        groups = len(trajectories) // self.config.num_samples_per_prompt
        zero_std = all_gather_objects((zero_std_group_fraction(rewards, self.config.num_samples_per_prompt), groups))
        return {
            "reward_mean": float(train_r.mean()),
            "reward_std": float(train_r.std(unbiased=False)),
            "tau2_reward_mean": sum(r[1] for r in rows) / len(rows),
            "tool_accuracy": sum(tool) / len(tool) if tool else None,
            "completion_tokens_mean": sum(r[3] for r in rows) / len(rows),
            "turns_mean": sum(r[4] for r in rows) / len(rows),
            "frac_reward_zero_std": sum(f * n for f, n in zero_std) / max(1, sum(n for _, n in zero_std)),
            "num_episodes": len(rows),
        }

    # ---- evaluation stages ------------------------------------------------------------------
    def _evaluate_stage(self, stage: int) -> None:
        """Fill row `stage` of the accuracy matrix: every domain's test split."""
        label = "before_training" if stage == 0 else f"after_task{stage - 1}"
        if stage == 0:
            self.tracker.announce_initial_eval()  # the header comes before the work it announces
        summaries = {name: self.evaluate_task(name, label=label) for name in self.order}
        for j, name in enumerate(self.order):
            self.reward_matrix[stage][j] = summaries[name].reward_mean
            self.pass_matrix[stage][j] = summaries[name].pass_rate
        step = self.progress.global_step
        if stage == 0:
            self.tracker.log_initial_eval(step, summaries)
        else:
            task_idx, current = stage - 1, self.order[stage - 1]
            for name, summary in summaries.items():
                self.tracker.log_eval(
                    task_idx, self.config.num_steps_per_task, step, summary, current, echo=name == current, stage=stage
                )
            measures = transfer_metrics(self.reward_matrix, stage)
            self.tracker.log_transfer(task_idx, step, summaries, self.order[:stage], measures)
        self.progress.stages_done = stage + 1
        self.tracker.write_summary(self._summary())

    def _compute_floor(self) -> None:
        """The do-nothing floor of every domain on the evaluated tasks (scripted user, tau2's evaluator)."""
        cfg = self.config
        t0 = time.perf_counter()
        self.floor = do_nothing_floor(self.policy, self.domains, cfg.eval_split, cfg.eval_max_tasks, cfg.user_max_turns)
        figures = " | ".join(f"{name} {value:.3f}" for name, value in self.floor.items())
        self.tracker.log_message(
            f"[FLOOR] do-nothing reward on the {cfg.eval_split} split: {figures} ({time.perf_counter() - t0:.1f}s)"
        )

    def _finish(self) -> dict:
        summary = self._summary()
        self.tracker.log_final_summary(self.order, self.reward_matrix, summary["final_measures"],
                                       self.config.eval_split, self.floor)
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

    def _summary(self) -> dict:
        done = self.progress.stages_done - 1  # last filled row
        measures = transfer_metrics(self.reward_matrix, done) if done >= 1 else {}
        pass_measures = transfer_metrics(self.pass_matrix, done) if done >= 1 else {}
        return {
            "task_order": self.order,
            "stages_completed": done,
            "accuracy_matrix": self.reward_matrix,
            "pass_rate_matrix": self.pass_matrix,
            "matrix_rows": ["before_training"] + [f"after_{n}" for n in self.order],
            "eval_split": self.config.eval_split,
            "do_nothing_floor": self.floor,
            "final_measures": measures,
            "final_measures_pass_rate": pass_measures,
            "global_step": self.progress.global_step,
            "skipped_updates": self.skipped_updates,
            "config": self.config.to_dict(),
        }

    def _write_eval_results(self, domain_name: str, label: str, records: list) -> None:
        cfg = self.config
        domain = self.domains[domain_name]
        tasks = {t.id: t for t in domain.tasks(cfg.eval_split)}
        used = [tasks[tid] for tid in dict.fromkeys(r.task_id for r in records)]
        write_results(
            results_path(cfg.log_dir, label, domain_name), domain, used, [r.simulation for r in records],
            agent_model=cfg.model_name_or_path, user_name=self.eval_engine.user.name,
            seed=cfg.seed, max_turns=cfg.max_turns,
        )

    # ---- interruption -----------------------------------------------------------------------
    def _stop_if_requested(self, task_idx: int, name: str, step: int, sft: bool = False) -> None:
        """At a (supervised) step boundary: if any rank got SIGINT/SIGTERM, all save and stop together."""
        flag = torch.tensor([float(self.stop_request.signum or 0)], dtype=torch.float64)
        signum = int(all_reduce_max_(flag).item())
        if not signum:
            return
        cfg = self.config
        what, total = ("supervised step", cfg.sft_steps_per_task) if sft else ("step", cfg.num_steps_per_task)
        self._at_boundary(f"at Task {task_idx} ({name}) {what} {step}/{total}")
        self._stop_at_boundary(RunStop(signum, None), sft_checkpoint_name(task_idx, step) if sft else None)

    def _stop_at_boundary(self, stop: RunStop, checkpoint: str | None = None) -> None:
        """Every rank: save the last boundary's checkpoint (a step checkpoint unless `checkpoint`
        names another), then end with the stop's own line."""
        self.tracker.end_domain()
        if checkpoint is None:
            path = self._save_step_checkpoint(rng=self._boundary_rng)
        else:
            path = self._save(checkpoint, self._boundary_rng)
        if stop.signum is not None:
            raise TrainingInterrupted(stop.signum, str(path), self._where)
        raise UserError(
            f"{stop.reason.rstrip('.')}; stopped {self._where}, checkpoint saved to {path}: fix the cause and "
            f"resume with --resume_from {path}."
        )

    # ---- checkpoints ------------------------------------------------------------------------
    def _save_step_checkpoint(self, rng: dict | None = None) -> Path:
        path = self._save(step_checkpoint_name(self.progress.global_step), rng)
        if path in self.saved_step_checkpoints:
            return path
        self.saved_step_checkpoints.append(path)
        limit = self.config.save_total_limit
        while limit is not None and len(self.saved_step_checkpoints) > limit:
            old = self.saved_step_checkpoints.pop(0)
            if self.dist.is_main and old.exists():
                shutil.rmtree(old)
        return path

    def _save(self, name: str, rng: dict | None = None) -> Path:
        """Save a checkpoint (rank 0 writes; all ranks take part); `rng` = this rank's random state
        to store (default: the current one). A failed write ends every rank with one line."""
        rng = all_gather_objects(rng if rng is not None else rng_state(self.generator))
        optimizer_state = self.training.optimizer_state(self.optimizer)  # a collective when sharded
        sft_state = self.sft.state_dict()  # likewise, while supervised steps are under way
        path = Path(self.config.log_dir) / name
        problem = None
        if self.dist.is_main:
            try:
                self._write_checkpoint(path, rng, optimizer_state, sft_state)
            except CheckpointSaveError as error:
                last = f"'{self.last_checkpoint}'" if self.last_checkpoint else "none"
                problem = (
                    f"{error}; the last complete checkpoint is {last}. Free space or fix the folder's "
                    "permissions, then resume from it."
                )
        problem = all_gather_objects(problem)[0]
        if problem:
            raise UserError(problem)
        self.last_checkpoint = path
        return path

    def _write_checkpoint(self, path: Path, rng: list, optimizer_state: dict, sft_state: dict | None) -> None:
        state = {
            "metrics_lines": count_lines(Path(self.config.log_dir) / METRICS_FILE),
            "progress": vars(self.progress).copy(),
            "reward_matrix": self.reward_matrix,
            "pass_matrix": self.pass_matrix,
            "optimizer": optimizer_state,
            "optimizer_sharded": self.training.sharded,
            "sft_optimizer": sft_state,
            "strategy": self.strategy.state_dict(),
            "rng": rng,
            "skipped_updates": self.skipped_updates,
            "wandb_run_id": self.tracker.wandb_run_id,
            "config": self.config.to_dict(),
        }
        model = self.policy.model if self.lora is None else self.lora  # LoRA: the adapter files
        save_checkpoint(path, model, self.policy.tokenizer, state)

    def _resume(self, path: str) -> str | None:
        def skipped(line: str) -> None:
            if self.dist.is_main:
                print(f"tau2cl: {line}", file=sys.stderr)

        ckpt = find_checkpoint(path, skipped)
        state = load_state(ckpt)
        saved = state.get("config")
        if not isinstance(saved, dict):
            raise UserError(f"cannot resume from '{ckpt}': its trainer_state.pt holds no config.")
        differences = config_differences(
            saved, self.config.to_dict(), RESUME_MAY_CHANGE, _defaults()
        )
        if differences:
            raise UserError(refusal(str(ckpt), differences))
        if state.get("optimizer_sharded", False) != self.training.sharded:
            raise UserError(
                f"cannot resume from '{ckpt}': its optimizer state was saved "
                f"{'with' if state.get('optimizer_sharded') else 'without'} FSDP sharding; resume with "
                f"the --parallelism and process count it was trained with (it used --parallelism "
                f"{saved.get('parallelism', 'ddp')})."
            )
        if self.dist.is_main:  # drop what was logged after the checkpoint: no step twice
            truncate_lines(Path(self.config.log_dir) / METRICS_FILE, state["metrics_lines"])
        if self.lora is not None:
            self.lora.load_weights(ckpt)  # refuses non-finite adapters
        else:
            load_model_weights(self.policy.model, ckpt)  # refuses non-finite weights
        bad = non_finite_count(state["optimizer"])
        if bad:
            raise UserError(f"checkpoint '{ckpt}' holds {bad} non-finite optimizer values; resume from an earlier checkpoint.")
        self.training.load_from_rollout_model()
        self.training.load_optimizer_state(self.optimizer, state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        self.sft.load_state_dict(state.get("sft_optimizer"))
        self.progress.set(**state["progress"])
        self.reward_matrix, self.pass_matrix = state["reward_matrix"], state["pass_matrix"]
        self.skipped_updates = state["skipped_updates"]
        rng = state["rng"]
        if self.dist.rank < len(rng):
            set_rng_state(self.generator, rng[self.dist.rank])
        self.last_checkpoint = ckpt
        return state.get("wandb_run_id")


@contextlib.contextmanager
def _out_of_memory_names_the_knobs(phase: str):
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        knobs = (
            "--batch_size_per_gpu, --num_samples_per_prompt, --max_new_tokens or --max_context_tokens"
            if phase == "rollout"
            else "--gradient_accumulation_steps (raise it), --gradient_checkpointing or --batch_size_per_gpu"
        )
        raise UserError(f"out of GPU memory during {phase}; lower the load with {knobs}.") from None


def _defaults() -> dict:
    """Every flag's default, for checkpoints saved before a flag existed."""
    return GRPOConfig().to_dict()


def _compute_dtype(name: str, dist: DistInfo) -> torch.dtype | None:
    """The autocast dtype for forward passes (None = plain fp32).

    Without a GPU, bfloat16 and float16 compute several times slower than float32 (CPUs emulate
    them), so a CPU run computes in float32 and says so once.
    """
    if name not in ("bfloat16", "float16"):
        return None
    if dist.device.type == "cpu":
        if dist.is_main:
            print(f"tau2cl: no GPU: computing in float32 instead of --model_dtype {name}, which is several times "
                  "slower on a CPU.", file=sys.stderr)
        return None
    return DTYPES[name]


def _token_weighted_across_ranks(stats: dict) -> dict:
    """Combine per-rank loss statistics: token-weighted means; the loss is the mean over ranks."""
    parts = all_gather_objects(stats)
    if len(parts) == 1:
        return stats
    total = sum(p["num_tokens"] for p in parts) or 1.0
    out = {k: sum(p[k] * p["num_tokens"] for p in parts) / total for k in stats if k not in ("num_tokens", "loss", "grad_norm")}
    out["loss"] = sum(p["loss"] for p in parts) / len(parts)
    out["grad_norm"] = stats.get("grad_norm", 0.0)
    out["num_tokens"] = total
    return out


