"""GRPOTrainer: the domain sequence, GRPO steps, the evaluation matrix, checkpoints and reports.

Life cycle: setup (in __init__) → train() = [evaluate stage 0] → for each domain: steps →
evaluate every domain (stage i+1) → checkpoint → final summary → cleanup. Continual-learning
behaviour lives in the strategy's hooks; the trainer only calls them.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
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
from tau2cl.cl.strategies.base import build_strategy
from tau2cl.config import REFERENCE_USER, GRPOConfig
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
from tau2cl.env.domains import Domain, load_domain
from tau2cl.env.results_files import write_results
from tau2cl.errors import UserError
from tau2cl.evaluation.runner import EvalSettings, evaluate_domain, results_path
from tau2cl.evaluation.stats import EvalSummary
from tau2cl.reporting.report import write_report
from tau2cl.reporting.tracker import MetricsTracker
from tau2cl.rl.grpo import group_advantages, zero_std_group_fraction
from tau2cl.rl.rewards import load_reward_fn, score_trajectories
from tau2cl.rl.training_model import TrainingModel
from tau2cl.rl.update import (
    LossSettings,
    accumulate_gradients,
    collate,
    micro_batches_by_length,
    reference_logprobs,
    sequence_logprobs,
)
from tau2cl.runs.checkpoint import (
    check_writable,
    count_lines,
    domain_checkpoint_name,
    find_checkpoint,
    load_model_weights,
    load_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_checkpoint_name,
    truncate_lines,
)
from tau2cl.runs.files import METRICS_FILE
from tau2cl.runs.interrupt import StopRequest, TrainingInterrupted


class GRPOTrainer:
    """Trains a policy on `config.task_order` one domain after another."""

    def __init__(self, config: GRPOConfig):
        self.config = config
        self.dist: DistInfo = compute_init(timeout=timedelta(minutes=config.dist_timeout_minutes))
        tau2_compat.set_tau2_verbosity(config.verbose)
        self.order = list(config.task_order)
        if self.dist.is_main:
            check_writable(config.log_dir)
        self.stop_request = StopRequest()
        self.domains: dict[str, Domain] = {n: self._load_domain(n) for n in self.order}
        self._check_batch_fits()
        self.compute_dtype = _compute_dtype(config.model_dtype)
        self.policy = self._load_policy()
        self.reference = self._load_reference()
        self.training = TrainingModel(self.policy.model, self.dist, config.parallelism)
        self.params = self.training.params
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        )
        user = build_user(config, reference=self._reference_policy, device=self.dist.device)
        self.user = user
        common = dict(max_turns=config.max_turns, max_new_tokens=config.max_new_tokens,
                      max_context_tokens=config.max_context_tokens, top_p=config.top_p,
                      kv_reuse=config.kv_reuse)
        self.train_engine = RolloutEngine(self.policy, user, RolloutSettings(temperature=config.temperature, **common))
        self.eval_engine = RolloutEngine(self.policy, user, RolloutSettings(temperature=config.eval_temperature, **common))
        self.reward_fn = load_reward_fn(config.reward_fn)
        self.strategy = build_strategy(config)
        self.generator = torch.Generator(device=self.dist.device)
        self.generator.manual_seed(config.seed * 1000 + self.dist.rank)
        self.progress = Progress()
        T = len(self.order)
        self.reward_matrix: list[list[float | None]] = [[None] * T for _ in range(T + 1)]
        self.pass_matrix: list[list[float | None]] = [[None] * T for _ in range(T + 1)]
        self.skipped_updates = 0
        wandb_id = None
        if config.resume_from:
            wandb_id = self._resume(config.resume_from)
        self.saved_step_checkpoints: list[Path] = []
        self.tracker = MetricsTracker.from_config(config, is_main=self.dist.is_main, wandb_run_id=wandb_id)
        self.cl_context = CLContext(
            config=config, dist=self.dist, order=self.order, domains=self.domains, params=self.params,
            progress=self.progress, rollout=lambda requests: self.train_engine.run(requests, self.generator),
            generated_logprob=self._generated_logprob,
        )
        self.strategy.setup(self.cl_context)

    # ---- setup ------------------------------------------------------------------------------
    def _check_batch_fits(self) -> None:
        for name, domain in self.domains.items():
            if self.config.batch_size_per_gpu > len(domain.train_tasks):
                raise UserError(
                    f"batch_size_per_gpu {self.config.batch_size_per_gpu} is larger than the {name} train split "
                    f"({len(domain.train_tasks)} tasks); lower it or raise max_tasks_per_domain."
                )

    def _load_policy(self) -> Policy:
        torch.manual_seed(self.config.seed)
        tokenizer = load_tokenizer(self.config.model_name_or_path)
        # fp32 master weights: bf16/fp16 runs compute under autocast, so small updates are kept
        model = load_model(self.config.model_name_or_path, "float32", self.dist.device, self.config.gradient_checkpointing)
        model.train()
        return Policy(model, tokenizer, compute_dtype=self.compute_dtype)

    def _load_domain(self, name: str) -> Domain:
        """A domain in the setting the user can play: telecom's full setting needs an LLM user."""
        solo = None if self.config.user_model is None else False
        return load_domain(name, self.config.max_tasks_per_domain, solo_mode=solo)

    def _load_reference(self) -> Any:
        """The frozen reference model: for the KL penalty, and as the user with --user_model reference."""
        if self.config.kl_coef <= 0 and self.config.user_model != REFERENCE_USER:
            return None
        dtype = self.config.model_dtype if self.config.model_dtype != "auto" else "float32"
        model = load_model(self.config.model_name_or_path, dtype, self.dist.device)
        model.eval().requires_grad_(False)
        return model

    def _generated_logprob(self, traj: Trajectory) -> torch.Tensor:
        """Sum of the current policy's log-probs of the tokens `traj`'s policy generated."""
        device = self.dist.device
        ids = torch.tensor([traj.token_ids], device=device)  # (1, T)
        mask = torch.tensor([traj.loss_mask], device=device, dtype=torch.bool)
        mask[:, 0] = False
        return sequence_logprobs(self.policy.model, ids, torch.ones_like(ids), mask, 1.0, self.compute_dtype).sum()

    def _reference_policy(self) -> Policy:
        """The reference model behind a Policy, so it can sample the user's turns."""
        return Policy(self.reference, self.policy.tokenizer, compute_dtype=self.compute_dtype)

    # ---- public API -------------------------------------------------------------------------
    def train(self) -> dict:
        """Run the whole domain sequence; returns the summary written to summary.json."""
        self.stop_request.install()
        try:
            if self.progress.stages_done == 0:
                self._evaluate_stage(0)
            for task_idx in range(self.progress.task_idx, len(self.order)):
                self._train_domain(task_idx)
            return self._finish()
        finally:
            self.stop_request.uninstall()
            self.user.close()
            self.tracker.close()
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
        )
        summary, records = evaluate_domain(
            self.eval_engine, self.domains[domain_name], settings, self.dist.rank, self.dist.world_size,
            self.reward_fn, self.generator,
        )
        if self.dist.is_main and label is not None:
            self._write_eval_results(domain_name, label, records)
        return summary

    # ---- the domain loop --------------------------------------------------------------------
    def _train_domain(self, task_idx: int) -> None:
        name = self.order[task_idx]
        domain = self.domains[name]
        steps = self.config.num_steps_per_task
        if self.progress.step == 0:
            self.strategy.before_domain(self.cl_context, task_idx, name)
        self.tracker.start_domain(task_idx, name, len(domain.train_tasks), steps, self.progress.step)
        for step in range(self.progress.step + 1, steps + 1):
            stats = self._train_step(task_idx, domain, step)
            self.progress.step = step
            self.progress.global_step += 1
            self.tracker.log_train(task_idx, name, step, self.progress.global_step, stats)
            if self.config.eval_interval and step % self.config.eval_interval == 0 and step < steps:
                summary = self.evaluate_task(name, label=f"task{task_idx}_step{step}")
                self.tracker.log_eval(task_idx, step, self.progress.global_step, summary, name)
            if self.config.save_interval and step % self.config.save_interval == 0 and step < steps:
                self._save_step_checkpoint()
            self._stop_if_requested(task_idx, name, step)
        self.tracker.end_domain()
        self.strategy.after_domain(self.cl_context, task_idx, name)
        self._evaluate_stage(task_idx + 1)
        self.progress.set(task_idx=task_idx + 1, step=0, stages_done=task_idx + 2)
        self._save(domain_checkpoint_name(task_idx))

    def _train_step(self, task_idx: int, domain: Domain, step: int) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        requests = self.strategy.augment_batch(self.cl_context, self._step_requests(task_idx, domain, step))
        with _out_of_memory_names_the_knobs("rollout"):
            trajectories = self.train_engine.run(requests, self.generator)
        t1 = time.perf_counter()
        score_trajectories(trajectories, self.domains, self.reward_fn, self.config.judge_model)
        t2 = time.perf_counter()
        rewards = torch.tensor([t.train_reward for t in trajectories])
        advantages = group_advantages(rewards, cfg.num_samples_per_prompt, cfg.advantage_normalization)
        self.strategy.after_rollout(self.cl_context, trajectories)
        with _out_of_memory_names_the_knobs("the update"):
            stats = self._update(trajectories, advantages.tolist())
        self.strategy.after_update(self.cl_context, step)
        t3 = time.perf_counter()
        stats.update(self._episode_stats(trajectories, rewards))
        stats.update(self.strategy.step_metrics(self.cl_context, trajectories))
        # disjoint parts: the reference model's log-probs (time_ref, timed in _update) are not update time
        stats.update(time_rollout=t1 - t0, time_reward=t2 - t1, time_update=t3 - t2 - stats["time_ref"],
                     lr=self.scheduler.get_last_lr()[0])
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
        t0 = time.perf_counter()
        if self.reference is not None and cfg.kl_coef > 0:
            batch.ref_logprobs = reference_logprobs(
                self.reference, batch, micro, cfg.temperature, self.compute_dtype, cfg.shared_prefix_update
            )
        time_ref = time.perf_counter() - t0
        global_tokens = float(all_reduce_sum_(torch.tensor([batch.num_tokens], dtype=torch.float64)).item())
        settings = LossSettings(cfg.temperature, cfg.clip_range, cfg.upper_clip_range, cfg.kl_coef, self.compute_dtype,
                                cfg.shared_prefix_update)
        self.training.module.train()
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
        self.scheduler.step()
        self.training.refresh_rollout_model()
        stats = _token_weighted_across_ranks(stats)
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

    def _finish(self) -> dict:
        summary = self._summary()
        self.tracker.log_final_summary(self.order, self.reward_matrix, summary["final_measures"])
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
            "final_measures": measures,
            "final_measures_pass_rate": pass_measures,
            "global_step": self.progress.global_step,
            "skipped_updates": self.skipped_updates,
            "config": self.config.to_dict(),
        }

    def _write_eval_results(self, domain_name: str, label: str, records: list) -> None:
        cfg = self.config
        domain = self.domains[domain_name]
        tasks = {t.id: t for t in domain.tasks("test")}
        used = [tasks[tid] for tid in dict.fromkeys(r.task_id for r in records)]
        write_results(
            results_path(cfg.log_dir, label, domain_name), domain, used, [r.simulation for r in records],
            agent_model=cfg.model_name_or_path, user_name=self.eval_engine.user.name,
            seed=cfg.seed, max_turns=cfg.max_turns,
        )

    # ---- interruption -----------------------------------------------------------------------
    def _stop_if_requested(self, task_idx: int, name: str, step: int) -> None:
        """At a step boundary: if any rank got SIGINT/SIGTERM, all save and stop together."""
        flag = torch.tensor([float(self.stop_request.signum or 0)], dtype=torch.float64)
        signum = int(all_reduce_max_(flag).item())
        if not signum:
            return
        self.tracker.end_domain()
        path = self._save_step_checkpoint()
        where = f"at Task {task_idx} ({name}) step {step}/{self.config.num_steps_per_task}"
        raise TrainingInterrupted(signum, str(path), where)

    # ---- checkpoints ------------------------------------------------------------------------
    def _save_step_checkpoint(self) -> Path:
        path = self._save(step_checkpoint_name(self.progress.global_step))
        if path in self.saved_step_checkpoints:
            return path
        self.saved_step_checkpoints.append(path)
        limit = self.config.save_total_limit
        while limit is not None and len(self.saved_step_checkpoints) > limit:
            old = self.saved_step_checkpoints.pop(0)
            if self.dist.is_main and old.exists():
                shutil.rmtree(old)
        return path

    def _save(self, name: str) -> Path:
        rng = all_gather_objects(rng_state(self.generator))
        optimizer_state = self.training.optimizer_state(self.optimizer)  # a collective when sharded
        path = Path(self.config.log_dir) / name
        if not self.dist.is_main:
            return path
        state = {
            "metrics_lines": count_lines(Path(self.config.log_dir) / METRICS_FILE),
            "progress": vars(self.progress).copy(),
            "reward_matrix": self.reward_matrix,
            "pass_matrix": self.pass_matrix,
            "optimizer": optimizer_state,
            "optimizer_sharded": self.training.sharded,
            "scheduler": self.scheduler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "rng": rng,
            "skipped_updates": self.skipped_updates,
            "wandb_run_id": self.tracker.wandb_run_id,
            "config": self.config.to_dict(),
        }
        return save_checkpoint(path, self.policy.model, self.policy.tokenizer, state)

    def _resume(self, path: str) -> str | None:
        ckpt = find_checkpoint(path)
        state = load_state(ckpt)
        saved = state["config"]
        for key in ("task_order", "model_name_or_path", "num_samples_per_prompt"):
            if saved[key] != getattr(self.config, key):
                raise UserError(
                    f"cannot resume from '{ckpt}': it was trained with {key} {saved[key]!r}, "
                    f"not {getattr(self.config, key)!r}."
                )
        if state.get("optimizer_sharded", False) != self.training.sharded:
            raise UserError(
                f"cannot resume from '{ckpt}': its optimizer state was saved "
                f"{'with' if state.get('optimizer_sharded') else 'without'} FSDP sharding; resume with "
                f"the --parallelism and process count it was trained with (it used --parallelism "
                f"{saved.get('parallelism', 'ddp')})."
            )
        if self.dist.is_main:  # drop what was logged after the checkpoint: no step twice
            truncate_lines(Path(self.config.log_dir) / METRICS_FILE, state["metrics_lines"])
        load_model_weights(self.policy.model, ckpt)
        self.training.load_from_rollout_model()
        self.training.load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.strategy.load_state_dict(state["strategy"])
        self.progress.set(**state["progress"])
        self.reward_matrix, self.pass_matrix = state["reward_matrix"], state["pass_matrix"]
        self.skipped_updates = state["skipped_updates"]
        rng = state["rng"]
        if self.dist.rank < len(rng):
            set_rng_state(self.generator, rng[self.dist.rank])
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


def _compute_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype for forward passes (None = plain fp32)."""
    return DTYPES.get(name) if name in ("bfloat16", "float16") else None


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


