"""Supervised warm start: cross-entropy on the agent's tokens of golden demonstrations.

At the start of a domain, `SupervisedWarmStart.run` builds the demonstrations of the stage's domains
(one domain, or all of them for a strategy that trains them mixed; each train task's golden calls played through the rollout engine with the run's user, see
agent/demonstrations.py)), keeps those tau2 scores 1.0 on every rank, and takes
`sft_steps_per_task` steps. Each step draws batch_size_per_gpu demonstrations per rank (the same
draw on every rank, each rank its own shard) from shuffled passes over the demonstrations, so each
is drawn equally often (±1) whatever the number of steps, accumulates the token-mean cross-entropy over
gradient_accumulation_steps micro-batches (DDP/FSDP average the gradients on the last one) and
steps its own AdamW (constant --sft_learning_rate, betas SFT_BETAS, fresh for each domain, checkpointed while a
domain's supervised steps are under way so a run resumes mid-SFT).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from tau2cl.agent.demonstrations import DemoSettings, demonstrations
from tau2cl.agent.episode import Trajectory
from tau2cl.distributed import all_gather_objects, all_reduce_sum_
from tau2cl.env.domains import Domain
from tau2cl.rl.optimization import ClippedStep, accumulate, draw_from_passes, token_normalizer
from tau2cl.rl.update import TokenBatch, as_trained_forward, collate, micro_batches_by_length

SFT_SEED_TAG = "sft"  # keeps the demonstration draw apart from the GRPO task draw
SFT_BETAS = (0.9, 0.95)  # AdamW betas of the supervised steps, as is usual for language-model fine-tuning


def sft_loss(
    logprobs: torch.Tensor, hits: torch.Tensor, loss_mask: torch.Tensor, num_tokens_normalizer: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-sum negative log-likelihood / normalizer, and the sums behind loss and accuracy.

    logprobs, hits, loss_mask: (B, T). Returns (loss, {"nll_sum", "hits", "num_tokens"}).
    """
    mask = loss_mask.float()
    nll = -(logprobs * mask).sum()
    stats = {"nll_sum": float(nll.detach()), "hits": float((hits * mask).sum()), "num_tokens": float(mask.sum())}
    return nll / num_tokens_normalizer, stats


def draw_demos(seed: int, domain_idx: int, step: int, pool: list[int], per_rank: int, world: int, rank: int) -> list[int]:
    """This rank's shard of step `step`'s demonstrations (indices from `pool`), same draw on every rank."""
    return draw_from_passes(f"{seed}-{domain_idx}-{SFT_SEED_TAG}", pool, step, per_rank, world, rank)


def accumulate_sft_gradients(
    model: torch.nn.Module,
    batch: TokenBatch,
    micro_batches: list[list[int]],
    num_tokens_normalizer: float,
    compute_dtype: torch.dtype | None = None,
    extra_loss: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Backward the cross-entropy over micro-batches, plus `extra_loss` terms (a CL penalty) once,
    on the last one; returns this rank's summed statistics and the terms' values."""
    forward = as_trained_forward(model)

    def loss_of(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        mb = batch.rows(rows)
        logprobs, hits = forward(mb.input_ids, mb.attention_mask, mb.loss_mask, 1.0, compute_dtype, with_hits=True)
        return sft_loss(logprobs, hits, mb.loss_mask, num_tokens_normalizer)

    per_micro_batch, terms, _ = accumulate(forward, micro_batches, loss_of, extra_loss)
    totals = {key: sum(stats[key] for stats in per_micro_batch) for key in ("nll_sum", "hits", "num_tokens")}
    return totals, terms


class SupervisedWarmStart:
    """The supervised steps at the start of each domain (see the module's doc)."""

    def __init__(self, config: Any, dist: Any, policy: Any, training: Any, user: Any, clipped_step: ClippedStep,
                 compute_dtype=None):
        self.config = config
        self.clipped_step = clipped_step  # the run's: skipped updates are counted with the GRPO steps'
        self.dist = dist
        self.policy = policy
        self.training = training
        self.user = user
        self.compute_dtype = compute_dtype
        self.optimizer: torch.optim.Optimizer | None = None
        self._saved_optimizer: dict | None = None  # from a mid-SFT checkpoint, loaded on resume

    @property
    def learning_rate(self) -> float:
        cfg = self.config
        return cfg.learning_rate if cfg.sft_learning_rate is None else cfg.sft_learning_rate

    def run(
        self, domain_idx: int, pool: list[Domain], progress: Any, tracker: Any, after_step: Callable[[int], None],
        extra_loss: Callable[[], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """The stage's remaining supervised steps (from progress.sft_step + 1) on the demonstrations
        of the domains in `pool` (the stage's domain first); `extra_loss` gives the strategy's
        penalty terms, added to every step's loss as to a GRPO step's."""
        total = self.config.sft_steps_per_task
        if progress.sft_step >= total:
            return
        t0 = time.perf_counter()
        demos = [demo for domain in pool for demo in self.usable_demonstrations(domain)]
        where = f"Task {domain_idx} ({'+'.join(d.name for d in pool)})"
        tasks = sum(len(d.train_tasks) for d in pool)
        tracker.log_message(
            f"[SFT] {where}: {len(demos)} of {tasks} golden "
            f"demonstrations score 1.0 ({time.perf_counter() - t0:.1f}s); {total} supervised steps"
        )
        if not demos:
            tracker.log_message(f"[SFT] {where}: no usable demonstration; skipped")
            progress.sft_step = total
            return
        self.optimizer = torch.optim.AdamW(
            self.training.params, lr=self.learning_rate, betas=SFT_BETAS, weight_decay=self.config.weight_decay
        )
        if self._saved_optimizer is not None and progress.sft_step > 0:
            self.training.load_optimizer_state(self.optimizer, self._saved_optimizer)
        self._saved_optimizer = None
        for step in range(progress.sft_step + 1, total + 1):
            stats = self.step(domain_idx, step, demos, extra_loss)
            progress.sft_step = step
            tracker.log_sft(domain_idx, pool[0].name, step, total, progress.global_step, stats)
            after_step(step)
        self.optimizer = None  # the domain's GRPO steps use the run's own optimizer

    def usable_demonstrations(self, domain: Domain) -> list[Trajectory]:
        """The domain's demonstrations that tau2 scores 1.0 on every rank (the same list everywhere)."""
        settings = DemoSettings(max_context_tokens=self.config.max_context_tokens, judge_model=self.config.judge_model)
        demos = demonstrations(self.policy, self.user, domain, domain.train_tasks, settings)
        good = {d.task_id for d in demos if d.reward == 1.0}
        for part in all_gather_objects(sorted(good)):
            good &= set(part)
        return [d for d in demos if d.task_id in good]

    def step(
        self, domain_idx: int, step: int, demos: list[Trajectory],
        extra_loss: Callable[[], dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, float]:
        cfg, dist = self.config, self.dist
        t0 = time.perf_counter()
        mine = [demos[i] for i in draw_demos(cfg.seed, domain_idx, step, list(range(len(demos))),
                                             cfg.batch_size_per_gpu, dist.world_size, dist.rank)]
        batch = collate(
            [d.token_ids for d in mine], [d.loss_mask for d in mine], [[0.0] * len(d.token_ids) for d in mine],
            [0.0] * len(mine), self.policy.tokenizer.pad_token_id, dist.device,
        )
        micro = micro_batches_by_length([len(d.token_ids) for d in mine], cfg.gradient_accumulation_steps)
        normalizer = token_normalizer(batch.num_tokens, dist.world_size)
        self.training.module.train()
        local, terms = accumulate_sft_gradients(
            self.training.module, batch, micro, normalizer, self.compute_dtype, extra_loss,
        )
        grad_norm = self.clipped_step(self.optimizer)
        self.training.refresh_rollout_model()
        sums = all_reduce_sum_(torch.tensor([local["nll_sum"], local["hits"], local["num_tokens"]], dtype=torch.float64))
        tokens = max(float(sums[2]), 1.0)
        return {
            "loss": float(sums[0]) / tokens,
            "token_accuracy": float(sums[1]) / tokens,
            "num_tokens": float(sums[2]),
            "grad_norm": grad_norm,
            "lr": self.learning_rate,
            "time_step": time.perf_counter() - t0,
            **terms,  # the same on every rank: penalties are computed from the whole trained weights
        }

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        """The optimizer state while a domain's supervised steps are under way (a collective under FSDP)."""
        return None if self.optimizer is None else self.training.optimizer_state(self.optimizer)

    def load_state_dict(self, state: dict | None) -> None:
        self._saved_optimizer = state
