"""One GRPO step: sample → score → resample → advantages → update.

The step owns the run's AdamW, its learning-rate schedule and the clipped optimizer step (shared
with the warm start, which counts skipped updates in the same place). Forward, loss, backward and
step read in `update`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import torch

from tau2cl.agent.episode import RolloutRequest, Trajectory
from tau2cl.cl.context import CLContext, Progress
from tau2cl.cl.strategies.base import CLStrategy
from tau2cl.distributed import DistInfo, all_gather_objects
from tau2cl.env.domains import Domain
from tau2cl.recipe.engine_sync import EngineSync
from tau2cl.recipe.models import Models
from tau2cl.recipe.rollouts import Rollouts, out_of_memory_names_the_knobs
from tau2cl.rl.dynamic_sampling import resample_zero_variance
from tau2cl.rl.grpo import group_advantages, logprob_gap, zero_std_group_fraction
from tau2cl.rl.lora import adapters_disabled
from tau2cl.rl.optimization import ClippedStep, draw_shard, token_normalizer
from tau2cl.rl.schedule import learning_rate
from tau2cl.rl.teacher import weights_in_place
from tau2cl.rl.update import (
    LossSettings,
    accumulate_gradients,
    collate,
    micro_batches_by_length,
    recompute_old_logprobs,
    reference_logprobs,
)


class GRPOStep:
    """The domain's GRPO steps; `run` is one of them (all ranks take part)."""

    def __init__(
        self, config: Any, dist: DistInfo, models: Models, rollouts: Rollouts, strategy: CLStrategy,
        clipped_step: ClippedStep, log_message: Callable[[str], None], engine_sync: EngineSync | None = None,
    ):
        self.config = config
        self.dist = dist
        self.models = models
        self.rollouts = rollouts
        self.strategy = strategy
        self.clipped_step = clipped_step
        self.log_message = log_message
        self.engine_sync = engine_sync  # a sampler with its own weights (vLLM): its pushes are logged
        self.optimizer = torch.optim.AdamW(
            models.training.params, lr=config.learning_rate, weight_decay=config.weight_decay
        )

    def run(self, domain_idx: int, pool: list[Domain], step: int, progress: Progress, context: CLContext) -> dict:
        """Step `step` of stage `domain_idx`, on the train tasks of the domains in `pool`; returns
        its statistics (the same on every rank)."""
        cfg = self.config
        t0 = time.perf_counter()
        requests = self.strategy.augment_batch(context, self.requests(domain_idx, pool, step))
        sampled_at: list[float] = []
        trajectories = self.rollouts.agreed_scored(requests, sampled_at)
        t1 = sampled_at[0]
        resampled: dict = {}
        if cfg.dynamic_sampling:
            trajectories, resampled = self._resample(domain_idx, step, trajectories)
        t2 = time.perf_counter()
        rewards = torch.tensor([t.train_reward for t in trajectories])
        advantages = group_advantages(rewards, cfg.num_samples_per_prompt, cfg.advantage_normalization)
        self.strategy.after_rollout(context, trajectories)
        with out_of_memory_names_the_knobs("the update"):
            stats = self.update(trajectories, advantages.tolist(), progress,
                                extra_loss=lambda: self.strategy.loss_terms(context),
                                teacher=self.strategy.teacher_weights(context))
        self.strategy.after_update(context, step)
        t3 = time.perf_counter()
        if self.engine_sync is not None:  # the pushes since the last step's record, this update's included
            stats.update(self.engine_sync.take())
        stats.update(self.episode_stats(trajectories, rewards, advantages))
        stats.update(resampled)
        stats.update(self.strategy.step_metrics(context, trajectories))
        # disjoint parts: the reference model's log-probs (time_ref, timed in update) are not update time
        stats.update(time_rollout=t1 - t0, time_reward=t2 - t1, time_update=t3 - t2 - stats["time_ref"])
        return stats

    def requests(self, domain_idx: int, pool: list[Domain], step: int) -> list[RolloutRequest]:
        """This rank's disjoint shard of the step's tasks, drawn from the train tasks of every domain
        in `pool` together, each repeated num_samples_per_prompt times."""
        cfg = self.config
        tasks = [(domain, task) for domain in pool for task in domain.train_tasks]
        mine = draw_shard(f"{cfg.seed}-{domain_idx}-{step}", range(len(tasks)),
                          cfg.batch_size_per_gpu, self.dist.world_size, self.dist.rank)
        return [
            RolloutRequest(*tasks[i], group=g)
            for g, i in enumerate(mine)
            for _ in range(cfg.num_samples_per_prompt)
        ]

    def _resample(self, domain_idx: int, step: int, trajectories: list[Trajectory]) -> tuple[list[Trajectory], dict]:
        """Dynamic sampling: zero-variance groups replaced by fresh tasks' groups (all ranks together)."""
        cfg = self.config
        rng = random.Random(f"{cfg.seed}-{domain_idx}-{step}-resample-{self.dist.rank}")
        batch, report = resample_zero_variance(
            trajectories, cfg.num_samples_per_prompt, self.rollouts.domains, self.rollouts.agreed_scored,
            cfg.max_resample_rounds, rng,
        )
        message = report.exhausted_message(cfg.max_resample_rounds)
        if message:
            self.log_message(message)
        return batch, report.stats()

    def update(
        self, trajectories: list[Trajectory], advantages: list[float], progress: Progress,
        extra_loss: Callable[[], dict[str, torch.Tensor]] | None = None, teacher: dict | None = None,
    ) -> dict:
        """The optimizer steps on a scored batch: old, reference and teacher log-probs, then
        num_updates_per_batch rounds of forward, loss, backward and the clipped step."""
        if self.engine_sync is not None:  # vLLM's sleep mode: its GPU memory goes to the update
            self.engine_sync.before_update()
        cfg, models = self.config, self.models
        policy_model = models.policy.model
        batch = collate(
            [t.token_ids for t in trajectories], [t.loss_mask for t in trajectories],
            [t.sampling_logprobs for t in trajectories], advantages,
            models.policy.tokenizer.pad_token_id, self.dist.device,
        )
        micro = micro_batches_by_length([len(t.token_ids) for t in trajectories], cfg.gradient_accumulation_steps,
                                        groups=[t.domain for t in trajectories])
        gap: dict = {}
        if cfg.importance_cap is not None or cfg.rollout_backend == "vllm":
            recompute_old_logprobs(policy_model, batch, micro, cfg.temperature, models.compute_dtype)
            gap = logprob_gap_across_ranks(batch.old_logprobs, batch.sampling_logprobs, batch.loss_mask)
        t0 = time.perf_counter()
        if models.reference is not None and cfg.kl_coef > 0:
            with adapters_disabled(models.lora):
                batch.ref_logprobs = reference_logprobs(
                    models.reference, batch, micro, cfg.temperature, models.compute_dtype, cfg.shared_prefix_update
                )
        if teacher is not None:  # the rollout model holds full weights on every rank, even under FSDP
            with weights_in_place(policy_model, teacher):
                batch.teacher_logprobs = reference_logprobs(
                    policy_model, batch, micro, cfg.temperature, models.compute_dtype, cfg.shared_prefix_update
                )
        time_ref = time.perf_counter() - t0
        normalizer = token_normalizer(batch.num_tokens, self.dist.world_size)
        settings = LossSettings(cfg.temperature, cfg.clip_range, cfg.upper_clip_range, cfg.kl_coef,
                                models.compute_dtype, cfg.dual_clip, cfg.importance_cap, cfg.shared_prefix_update,
                                cfg.distill_coef)
        models.training.module.train()
        lr = self.learning_rate(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stats: dict = {}
        for _ in range(cfg.num_updates_per_batch):
            # DDP/FSDP average the gradients over ranks in the last micro-batch's backward
            stats = accumulate_gradients(models.training.module, batch, micro, settings, normalizer, extra_loss)
            stats["grad_norm"] = self.clipped_step(self.optimizer)
        models.training.refresh_rollout_model()
        stats = token_weighted_across_ranks(stats)
        stats["lr"] = lr  # the learning rate this step used
        stats["time_ref"] = time_ref
        stats["skipped_updates"] = self.clipped_step.skipped
        stats.update(gap)
        return stats

    def learning_rate(self, progress: Progress) -> float:
        """Warm-up from the run's start, or from each domain's with --domain_restart warmup/optimizer."""
        cfg = self.config
        restart = cfg.domain_restart != "none"
        return learning_rate(cfg.learning_rate, cfg.warmup_steps, progress.step if restart else progress.global_step)

    def episode_stats(self, trajectories: list[Trajectory], rewards: torch.Tensor, advantages: torch.Tensor) -> dict:
        """Reward, advantage, tool accuracy and length figures over every rank's episodes."""
        local = [(t.train_reward, t.reward, t.tool_accuracy, t.num_generated_tokens, t.assistant_turns, abs(a))
                 for t, a in zip(trajectories, advantages.tolist(), strict=True)]
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
            "advantage_abs_mean": sum(r[5] for r in rows) / len(rows),
            "num_episodes": len(rows),
        }


def token_weighted_across_ranks(stats: dict) -> dict:
    """Combine per-rank loss statistics: token-weighted means; the loss is the mean over ranks."""
    parts = all_gather_objects(stats)
    if len(parts) == 1:
        return stats
    total = sum(p["num_tokens"] for p in parts) or 1.0
    out = {k: sum(p[k] * p["num_tokens"] for p in parts) / total
           for k in stats if k not in ("num_tokens", "loss", "grad_norm")}
    out["loss"] = sum(p["loss"] for p in parts) / len(parts)
    out["grad_norm"] = stats.get("grad_norm", 0.0)
    out["num_tokens"] = total
    return out


def logprob_gap_across_ranks(trainer: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """|trainer log-prob − sampler log-prob| over every rank's sampled tokens: its mean and max."""
    total, count, largest = logprob_gap(trainer, sampler, mask)
    parts = all_gather_objects((total, count, largest))
    tokens = sum(c for _, c, _ in parts)
    return {
        "logprob_gap_mean": sum(t for t, _, _ in parts) / max(tokens, 1),
        "logprob_gap_max": max(m for _, _, m in parts),
    }
