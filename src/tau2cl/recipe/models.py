"""The run's models: the policy (rollout copy and trained copy), its LoRA adapters, and the frozen
reference; loaded once at setup, with the weight operations strategies and checkpoints use."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tau2cl.agent.episode import Trajectory
from tau2cl.agent.policy import DTYPES, Policy, load_model, load_tokenizer
from tau2cl.constants import REFERENCE_USER
from tau2cl.distributed import DistInfo
from tau2cl.rl.lora import LoraPolicy, adapters_disabled, add_lora, base_dtype
from tau2cl.rl.training_model import TrainingModel
from tau2cl.rl.update import backward_each
from tau2cl.rl.weights import trainable_weights


@dataclass
class Models:
    policy: Policy  # the rollout copy: sampling, evaluation, checkpoints
    training: TrainingModel  # the copy the update trains (the rollout copy itself unless sharded)
    reference: Any  # frozen: the KL penalty's and the reference user's (LoRA: the policy's own base)
    lora: LoraPolicy | None
    compute_dtype: torch.dtype | None  # the autocast dtype (None: plain fp32)
    shared_prefix_update: bool = False

    @torch.no_grad()
    def snapshot_weights(self) -> dict[str, torch.Tensor]:
        """A detached fp32 copy of the trained weights by name."""
        return {n: p.detach().float().clone() for n, p in trainable_weights(self.policy.model).items()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Make `weights` the policy's, in the rollout copy and the trained copy."""
        self.training.load_weights(weights)

    def reference_policy(self) -> Policy:
        """The reference model behind a Policy, so it can sample the user's turns."""
        return Policy(
            self.reference, self.policy.tokenizer, compute_dtype=self.compute_dtype,
            weights=lambda: adapters_disabled(self.lora),
        )

    def episode_gradients(self, trajectories: list[Trajectory]) -> Iterator[Trajectory]:
        """CLContext.episode_gradients: the batch's common prompt prefix runs once (--shared_prefix_update)."""
        kept = [t for t in trajectories if t.num_generated_tokens > 0]
        sequences = [(t.token_ids, t.loss_mask) for t in kept]
        for i in backward_each(self.policy.model, sequences, self.compute_dtype, self.shared_prefix_update):
            yield kept[i]


def load_models(config: Any, dist: DistInfo) -> Models:
    """The policy (fp32 master weights, or LoRA adapters over a frozen base), its trained copy and
    the reference model the run needs."""
    compute_dtype = compute_dtype_for(config.model_dtype, dist)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.model_name_or_path)
    # fp32 master weights: bf16/fp16 runs compute under autocast, so small updates are kept;
    # with LoRA the base is frozen in --model_dtype and only the (fp32) adapters train
    model = load_model(config.model_name_or_path, base_dtype(config), dist.device, config.gradient_checkpointing)
    lora = add_lora(model, config, tokenizer)
    model = model if lora is None else lora.lm
    model.train()
    policy = Policy(model, tokenizer, compute_dtype=compute_dtype)
    reference = _load_reference(config, dist, policy, lora, compute_dtype)
    training = TrainingModel(policy.model, dist, config.parallelism)
    return Models(policy, training, reference, lora, compute_dtype, config.shared_prefix_update)


def _load_reference(config: Any, dist: DistInfo, policy: Policy, lora: LoraPolicy | None,
                    compute_dtype: torch.dtype | None) -> Any:
    """The frozen reference model: for the KL penalty, and as the user with --user_model reference."""
    if config.kl_coef <= 0 and config.user_model != REFERENCE_USER:
        return None
    if lora is not None:  # the policy's own base, run with the adapters off
        return policy.model
    dtype = config.model_dtype if config.model_dtype != "auto" and compute_dtype else "float32"
    model = load_model(config.model_name_or_path, dtype, dist.device)
    model.eval().requires_grad_(False)
    return model


def compute_dtype_for(name: str, dist: DistInfo) -> torch.dtype | None:
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
