"""GRPOConfig: every training flag as a dataclass field with its default, help text and group.

The command line, `--config` files and `summary.json` are all built from these fields, so a flag
cannot exist in one place and be missing from another. `__post_init__` passes every value, whatever
its source, through the same coercion and validation.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any

from tau2cl.cl.strategies.registry import CL_ALGORITHMS, in_help_order
from tau2cl.config.coercion import coerce, hint_item_type, hint_type
from tau2cl.config.validation import validate
from tau2cl.constants import (
    ADVANTAGE_NORMALIZATIONS,
    DOMAIN_NAMES,
    LOG_RATIO_BOUND,
    USER_API_KEY_ENV,
)
from tau2cl.errors import UserError

MODEL_DTYPES = ("float32", "float16", "bfloat16", "auto")
FISHER_NORMALIZATIONS = ("mean", "max", "none")
REPLAY_SELECTIONS = ("uniform", "reward")
FUSION_MODES = ("endpoints", "wise")
PROGRESSIVE_INITS = ("fresh", "previous")
PARALLELISMS = ("ddp", "fsdp")
# LoRA's default targets: the attention and MLP projections of Qwen/Llama/Mistral-style decoders
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DOMAIN_RESTARTS = ("none", "warmup", "optimizer")
ROLLOUT_BACKENDS = ("hf", "vllm")
VLLM_TIS_CAP = 2.0  # truncated importance sampling's cap with vLLM rollouts unless --tis_cap says otherwise

# Flags a resumed run may change: how it reports, saves, evaluates mid-domain and waits. Every other
# flag must equal the checkpoint's, or the resume is refused (runs/resume_check.py).
RESUME_MAY_CHANGE = (
    "log_dir", "log_interval", "verbose", "use_progress_bar", "wandb_project", "wandb_run_name",
    "eval_interval", "save_interval", "save_total_limit", "resume_from", "overwrite_log_dir",
    "dist_timeout_minutes", "user_timeout", "user_max_retries", "user_api_base", "user_api_key",
    "reward_timeout", "gradient_checkpointing", "merge_lora_on_save",
)
EVAL_SPLITS = ("test", "train")

# Argument groups of `tau2cl train --help`, in the order they are shown.
GROUPS = {
    "model": "which model is trained and how it is loaded",
    "rollout": "how training episodes are sampled",
    "user simulator": "who plays the customer, and the judge of tau2's natural-language assertions",
    "grpo": "the GRPO objective",
    "optimization": "optimizer, batch and schedule",
    "continual learning": "the domain sequence and the strategy against forgetting",
    "evaluation": "test-split evaluation during and after each domain",
    "distributed": "training with several processes under torchrun",
    "logging": "console output, metrics files and wandb",
    "checkpointing": "saving and resuming",
}


def _option(
    default: Any,
    group: str,
    help: str,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
) -> Any:
    """A dataclass field with its help text and argument group in metadata (TRL style).

    A secret field (an API key) is left out of `repr` and written as none by `to_dict`, so no
    config dump (summary.json, checkpoints, wandb, logs) ever holds its value.
    """
    metadata: dict[str, Any] = {"group": group, "help": help, "secret": secret}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, repr=not secret, metadata=metadata)


def cl_algorithm_help() -> str:
    """`--cl_algorithm`'s help: every registered strategy with its registry summary."""
    described = "; ".join(f"{name} = {entry.summary}" for name, entry in in_help_order())
    return f"Strategy against forgetting: {described}."


@dataclass
class GRPOConfig:
    """Everything a training run needs; see `tau2cl train --help` for each field."""

    # --- model ---
    model_name_or_path: str = _option(
        "Qwen/Qwen2.5-3B-Instruct",
        "model",
        "Model to train: a Hugging Face hub id, a local folder, a .gguf file, or 'tiny' for the "
        "built-in tiny test model.",
    )
    model_dtype: str = _option(
        "bfloat16",
        "model",
        "Compute dtype. The trained weights are always fp32 masters; with float16 or bfloat16 "
        "(best on recent GPUs) every forward runs under autocast in that dtype, with float32 or "
        "auto in plain fp32. It is also the dtype the frozen reference model (KL penalty, "
        "--user_model reference) and a local --user_model on GPU are loaded in (auto: fp32).",
        MODEL_DTYPES,
    )
    gradient_checkpointing: bool = _option(
        False,
        "model",
        "Recompute activations in the backward pass: much less memory for about a third more "
        "compute.",
    )
    lora_r: int = _option(
        0,
        "model",
        "LoRA rank: 0 trains every weight (full fine-tuning, with fp32 master weights, gradients "
        "and AdamW state for all of them); r > 0 freezes the base weights in --model_dtype and "
        "trains rank-r adapters (fp32) on --lora_target_modules through PEFT, so gradients and "
        "optimizer state shrink to the adapters' size (under 1% of a 3-7B model at r=16) and "
        "the reference model is the same base with the adapters turned off (no second copy). "
        "See docs/memory.md for when to choose it.",
    )
    lora_alpha: float = _option(
        32.0, "model", "LoRA: scale alpha; the adapters' update is multiplied by alpha / r."
    )
    lora_dropout: float = _option(
        0.0,
        "model",
        "LoRA: dropout on the adapters' input during the update, in [0, 1). Above 0 the update's "
        "forward no longer matches the rollout's exactly (the first ratio is not 1).",
    )
    lora_target_modules: list[str] = _option(
        LORA_TARGET_MODULES,
        "model",
        "LoRA: names of the linear layers that get adapters (the last part of a module's name); "
        "the default covers attention and MLP of Qwen/Llama-style models.",
    )

    # --- rollout ---
    temperature: float = _option(
        1.0,
        "rollout",
        "Sampling temperature of training rollouts; must be > 0 so that the samples of a group "
        "differ.",
    )
    top_p: float = _option(
        1.0, "rollout", "Nucleus-sampling mass of training rollouts, in (0, 1]; 1 turns it off."
    )
    max_new_tokens: int = _option(
        512, "rollout", "Most tokens the model may generate in one assistant turn."
    )
    max_turns: int = _option(
        20, "rollout", "Most assistant turns in one episode before it is cut off."
    )
    max_context_tokens: int = _option(
        16384,
        "rollout",
        "Most tokens in an episode's context; the episode ends when its context would exceed it.",
    )
    kv_reuse: bool = _option(
        True,
        "rollout",
        "Keep each episode's KV cache across its turns, so a turn prefills only the tokens added "
        "since the last sampled one (tool results, user replies); costs one cache per live "
        "episode in memory. --no-kv_reuse re-prefills the whole context every turn (for "
        "debugging and ablations; same samples).",
    )
    rollout_backend: str = _option(
        "hf",
        "rollout",
        "Which engine samples the episodes (training, evaluation, strategies' own rollouts): hf = "
        "the project's own engine (exact, runs everywhere, each episode's KV cache kept across "
        "turns); vllm = a vLLM engine in each rank's own process (paged KV cache, prefix caching), "
        "given the trained weights after every update. Episodes, rewards and the update are the "
        "same either way; vLLM's log-probs differ slightly from the trainer's, so the update "
        "recomputes them and --tis_cap defaults to 2. Needs the vllm package "
        "(pip install -e '.[vllm]'; CPUs: scripts/install_vllm_cpu.sh) and --top_p 1.",
        choices=ROLLOUT_BACKENDS,
    )
    vllm_gpu_memory_utilization: float = _option(
        0.3,
        "rollout",
        "With --rollout_backend vllm on a GPU: the share of the GPU's memory vLLM may take for its "
        "copy of the weights and its KV cache; the trainer's weights, gradients and optimizer "
        "need the rest (docs/performance.md has the split for Qwen2.5-3B). Ignored on CPUs.",
    )
    vllm_cpu_kv_cache_gib: int = _option(
        1,
        "rollout",
        "With --rollout_backend vllm on CPUs: GiB of memory for vLLM's KV cache (per rank). It "
        "must hold at least one --max_context_tokens context.",
    )
    vllm_sleep_mode: bool = _option(
        False,
        "rollout",
        "With --rollout_backend vllm on CUDA: put the engine to sleep during each update (its KV "
        "cache freed, its weights moved to CPU memory) and wake it for the next rollouts, so the "
        "update has the memory; costs the copies each step. CUDA only (refused on CPUs).",
    )

    # --- user simulator ---
    user_model: str | None = _option(
        None,
        "user simulator",
        "Who plays the customer. none = the scripted user (offline, free, replays the task's "
        "instructions); reference = the frozen reference model with tau2's user prompt (no extra "
        "weights when kl_coef > 0; with kl_coef 0 the reference is loaded for the user alone); a hub id, local folder or .gguf file = that "
        "model, run locally and batched like the agent (one more model in memory); "
        "litellm:<model> = tau2's own user simulator through litellm, e.g. litellm:gpt-4.1-mini "
        "(one API call per user turn) or litellm:openai/<served-name> with --user_api_base for a "
        "local inference server. Any LLM user runs telecom in tau2's full (non-solo) setting.",
    )
    user_api_base: str | None = _option(
        None,
        "user simulator",
        "litellm user: base URL of an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 "
        "(vLLM, SGLang, llama.cpp server); none uses the provider's default.",
    )
    user_api_key: str | None = _option(
        None,
        "user simulator",
        f"litellm user: API key; none reads ${USER_API_KEY_ENV}, then the provider's own variable "
        "(e.g. OPENAI_API_KEY). Never written to logs, checkpoints or config dumps.",
        secret=True,
    )
    user_temperature: float = _option(
        0.0, "user simulator", "Sampling temperature of an LLM user; 0 is greedy (tau2's default)."
    )
    user_max_new_tokens: int = _option(
        256, "user simulator", "Most tokens an LLM user may generate in one turn."
    )
    user_timeout: float = _option(
        60.0, "user simulator", "litellm user: seconds one API call may take before it is retried."
    )
    user_max_retries: int = _option(
        3,
        "user simulator",
        "litellm user: retries of a failed or timed-out call, with exponential backoff; a turn "
        "that still fails ends only its episode (user_error, reward 0).",
    )
    user_max_turns: int = _option(
        8, "user simulator", "Scripted user replies before the user ends the conversation."
    )
    judge_model: str | None = _option(
        None,
        "user simulator",
        "litellm model that judges tau2's natural-language assertions in tasks whose reward basis "
        "uses them (reached through litellm's environment variables, e.g. OPENAI_API_KEY); a failed "
        "judge call scores its episode 0. None: such a task stops the run with a message.",
    )

    # --- grpo ---
    num_samples_per_prompt: int = _option(
        4,
        "grpo",
        "Episodes sampled per task (the GRPO group size); at least 2, since advantages compare "
        "the samples of a group.",
    )
    kl_coef: float = _option(
        0.04,
        "grpo",
        "Weight of the KL penalty to the frozen reference model; 0 loads no reference model.",
    )
    clip_range: float = _option(
        0.2, "grpo", "Importance ratios are clipped to [1 - clip_range, 1 + clip_range_high]."
    )
    clip_range_high: float | None = _option(
        None,
        "grpo",
        "Upper clip range; none means the same as clip_range (DAPO's clip-higher uses 0.28).",
    )
    dual_clip: float | None = _option(
        None,
        "grpo",
        "Dual clip C (> 1): a token with negative advantage A has its policy loss capped at "
        "C * |A|, so a sample whose ratio ran away (stale, or scored in another precision) cannot "
        "dominate the step; verl uses 3.0. None turns it off. Free. Log-ratios are always "
        f"clamped to ±{LOG_RATIO_BOUND:g} before exp; `dual_clip_frac` and `log_ratio_clamp_frac` count the tokens "
        "either guard caught.",
    )
    tis_cap: float | None = _option(
        None,
        "grpo",
        "Truncated importance sampling (>= 1): the update recomputes the batch's log-probs with "
        "its own forward before the first step and weights each token's policy loss by "
        "min(exp(recomputed - sampled), tis_cap), correcting for rollouts scored in another "
        "dtype or kernel than the update (typical cap 2). Costs one extra no-grad forward per "
        "batch. Unset: 2 with --rollout_backend vllm, off with hf; 0 turns it off (the sampled "
        "log-probs are the PPO ratio's old policy).",
    )
    num_updates_per_batch: int = _option(
        1,
        "grpo",
        "Optimisation passes over each rollout batch; 1 is on-policy, more reuse the samples.",
    )
    advantage_normalization: str = _option(
        "std",
        "grpo",
        "How a group's rewards become advantages: std = (r - mean) / (std + eps) as in GRPO; "
        "mean = r - mean only, as in Dr. GRPO.",
        ADVANTAGE_NORMALIZATIONS,
    )
    dynamic_sampling: bool = _option(
        False,
        "grpo",
        "DAPO-style dynamic sampling: groups whose rewards are all equal (zero advantage, no "
        "gradient) are dropped and fresh train tasks of the same domain rolled out in their place, "
        "for up to max_resample_rounds extra rounds; each round costs the rollouts of the groups "
        "it replaces. Logs the zero-variance share before and after and the extra episodes.",
    )
    max_resample_rounds: int = _option(
        2,
        "grpo",
        "Dynamic sampling: extra rollout rounds per step at most; all ranks run the same number "
        "of rounds (a round runs while any rank still has a zero-variance group).",
    )
    reward_fn: str = _option(
        "tau2",
        "grpo",
        "Reward: tau2 = tau2's own evaluator; or a module:function import path, called as "
        "fn(domain, task, messages) -> float. A call that raises, returns something other than a "
        "finite number or outlasts reward_timeout stops the run with one line naming the function, "
        "the task and the value, after a checkpoint at the last step boundary.",
    )
    reward_timeout: float | None = _option(
        300.0,
        "grpo",
        "Seconds one call of a custom reward_fn may take before the run stops (the call runs in a "
        "helper thread, so a stop signal is still honoured while it runs); none waits forever.",
    )

    # --- optimization ---
    batch_size_per_gpu: int = _option(
        4, "optimization", "Tasks per rank per step; each is sampled num_samples_per_prompt times."
    )
    shared_prefix_update: bool = _option(
        True,
        "optimization",
        "Run the common prefix of each micro-batch's rows (system prompt, policy, tool schemas: "
        "most of every tau2 row) once in the update's and the reference's forward, and the "
        "episodes' common prefix once in the EWC Fisher's per-episode gradients, and attend "
        "every row's suffix to it; same gradients, far fewer FLOPs. Off under gradient "
        "checkpointing (which turns caches off). --no-shared_prefix_update runs every row whole.",
    )
    gradient_accumulation_steps: int = _option(
        1, "optimization", "Micro-batches whose gradients are accumulated into one optimizer step."
    )
    num_steps_per_task: int = _option(
        100,
        "optimization",
        "GRPO steps on each domain of task_order; 0 (with --sft_steps_per_task) trains by "
        "supervised steps only, the plain sequential-SFT baseline.",
    )
    sft_steps_per_task: int = _option(
        0,
        "optimization",
        "Supervised warm-start steps at the start of each domain, before its GRPO steps: "
        "cross-entropy on the agent's tokens of the domain's golden demonstrations (each train "
        "task's golden calls played through the rollout engine with the run's user; those tau2 "
        "scores 1.0 are kept). Each step trains on batch_size_per_gpu demonstrations per rank, "
        "drawn in shuffled passes over them (each as often as any other, ±1), "
        "and costs one forward and backward over them (no sampling); 0 = none.",
    )
    sft_learning_rate: float | None = _option(
        None,
        "optimization",
        "Learning rate of the supervised warm-start steps (constant, AdamW with its own state, "
        "fresh for each domain); none uses learning_rate.",
    )
    learning_rate: float = _option(1e-6, "optimization", "Peak AdamW learning rate.")
    weight_decay: float = _option(0.0, "optimization", "AdamW weight decay.")
    warmup_steps: int = _option(
        10, "optimization", "Steps of linear learning-rate warmup from 0 to learning_rate."
    )
    domain_restart: str = _option(
        "warmup",
        "optimization",
        "What starts afresh with each domain: none = one warmup at the start of the run and AdamW's "
        "moments carried across domains; warmup = the warmup restarts with every domain (AdamW's "
        "moments carried); optimizer = the warmup restarts and AdamW's moments are reset, as if each "
        "domain were a new run from the current weights.",
        DOMAIN_RESTARTS,
    )
    max_grad_norm: float = _option(
        1.0, "optimization", "Gradients are clipped to this global norm."
    )
    seed: int = _option(42, "optimization", "Random seed of task sampling and generation.")

    # --- continual learning ---
    cl_algorithm: str = _option(
        "sequential",
        "continual learning",
        cl_algorithm_help(),
        CL_ALGORITHMS,
    )
    replay_buffer_size: int = _option(
        100,
        "continual learning",
        "replay, adaptive_replay: tasks kept per earlier domain (reservoir sampling over the tasks trained on).",
    )
    replay_ratio: float = _option(
        0.25,
        "continual learning",
        "replay, adaptive_replay: share of each batch's tasks drawn from earlier domains, rounded up (any nonzero "
        "ratio replays at least one task once an earlier domain exists); in [0, 1].",
    )
    replay_selection: str = _option(
        "uniform",
        "continual learning",
        "replay, adaptive_replay: which buffered tasks to replay: uniform = any, equally likely; reward = "
        "proportional to the reward they earned when trained on (revisits what was learned).",
        REPLAY_SELECTIONS,
    )
    ewc_lambda: float = _option(
        100.0,
        "continual learning",
        "EWC: strength λ of the penalty (λ/2) Σ F (θ − θ*)², added to the loss at every step.",
    )
    ewc_fisher_samples: int = _option(
        16,
        "continual learning",
        "EWC: sampled episodes (over all ranks) on a domain's train tasks used to estimate its "
        "diagonal Fisher after the domain; each costs one rollout and one backward pass.",
    )
    ewc_fisher_normalization: str = _option(
        "mean",
        "continual learning",
        "EWC: scale of each new Fisher: mean = divide by its mean (λ then means the same for any "
        "model size), max = divide by its maximum, none = raw squared gradients.",
        FISHER_NORMALIZATIONS,
    )
    ewc_gamma: float = _option(
        0.9,
        "continual learning",
        "online_ewc: decay γ of the running Fisher, F ← γF + F_new, in [0, 1].",
    )
    ewc_pp_alpha: float = _option(
        0.5,
        "continual learning",
        "ewc_pp: weight α of each new Fisher in the moving average F ← α·F_new + (1 − α)·F, in (0, 1] "
        "(1: only the latest estimate counts).",
    )
    ewc_pp_interval: int = _option(
        10,
        "continual learning",
        "ewc_pp: training steps between Fisher updates; each update backpropagates the "
        "log-likelihood of each of the step's episodes alone (unbatched: 2-3× the step's own update "
        "on the tiny model on CPU), so the interval sets the overhead.",
    )
    adaptive_replay_floor: float = _option(
        0.05,
        "continual learning",
        "adaptive_replay: share weight every earlier domain keeps on top of its forgetting (an "
        "earlier domain's share is forgetting + floor, normalised); > 0 keeps replaying domains "
        "that have not been forgotten yet.",
    )
    fusion_mode: str = _option(
        "endpoints",
        "continual learning",
        "fusion: how the weights are merged at each domain's end: endpoints = the mean of the "
        "weights reached at the end of every domain so far (one extra fp32 copy of the weights); "
        "wise = WiSE-FT, (1 − α)·weights at the domain's start + α·weights at its end, "
        "α = --fusion_alpha (one extra copy).",
        FUSION_MODES,
    )
    fusion_alpha: float = _option(
        0.5,
        "continual learning",
        "fusion with --fusion_mode wise: weight α of the domain's end weights, in [0, 1] (1: no "
        "merge; 0: undo the domain).",
    )
    distill_coef: float = _option(
        0.1,
        "continual learning",
        "distill: weight of the KL penalty, per generated token, towards the frozen teacher (the "
        "policy at the current domain's start; the first domain has no teacher), added to the GRPO "
        "loss like --kl_coef's; 0 turns it off. Costs one no-grad forward of the step's batch and "
        "one copy of the trained weights (with LoRA, of the adapters).",
    )
    progressive_init: str = _option(
        "fresh",
        "continual learning",
        "progressive: where each new domain's adapter starts: fresh = the adapters' initialisation "
        "(B = 0, so it adds nothing until trained); previous = the previous domain's final adapter "
        "(forward transfer). Costs nothing either way.",
        PROGRESSIVE_INITS,
    )
    fusion_alpha_grid: list[float] = _option(
        [0.25, 0.5, 0.75, 1.0],
        "continual learning",
        "adaptive_fusion: the α values tried at each domain's end, each in [0, 1] (WiSE-FT weight of "
        "the domain's end weights; 1 keeps them, 0 undoes the domain); the one with the highest mean "
        "reward on the held-out tasks of the domains learned so far is kept (ties: the largest α). "
        "Each value costs one greedy evaluation of those tasks.",
    )
    fusion_holdout_tasks: int = _option(
        1,
        "continual learning",
        "adaptive_fusion: train tasks per domain held out of training to choose α on: the last ones "
        "of its train split (as --max_tasks_per_domain or --task_ids leave it); training never samples them.",
    )
    task_order: list[str] = _option(
        list(DOMAIN_NAMES),
        "continual learning",
        "Domains to learn, in order: names from airline, retail, telecom, separated by spaces or "
        "commas, each at most once.",
    )
    max_tasks_per_domain: int | None = _option(
        None,
        "continual learning",
        "Cap on the tasks of each split (train and test) of each domain; none uses them all.",
    )
    task_ids: list[str] = _option(
        [],
        "continual learning",
        "Train tasks to use, as DOMAIN:TASK_ID entries of tau2's train split (e.g. airline:27 "
        "airline:9): a domain named here trains (and evaluates, with --eval_split train) on exactly "
        "these tasks; the others keep their split, capped by --max_tasks_per_domain. Entries of "
        "domains outside --task_order are unused.",
    )
    test_task_ids: list[str] = _option(
        [],
        "continual learning",
        "Held-out tasks to evaluate, as DOMAIN:TASK_ID entries of tau2's test split (e.g. airline:19 "
        "retail:90): a domain named here evaluates (with --eval_split test, or --heldout_eval) exactly "
        "these tasks; the others keep their split, capped by --max_tasks_per_domain. Entries of "
        "domains outside --task_order are unused.",
    )
    compact_domains: bool = _option(
        False,
        "continual learning",
        "The compact setting for small models and CPUs: the agent sees a one-line role description "
        "instead of the domain's policy and only the tools the loaded tasks' golden actions call "
        "(contexts of a few hundred tokens instead of 5k-10k). Rewards are tau2's as always; the "
        "task is easier than the full setting's, so its figures are not comparable with it.",
    )

    # --- evaluation ---
    eval_interval: int = _option(
        50,
        "evaluation",
        "Training steps between in-domain evaluations; 0 evaluates only at the end of each domain.",
    )
    eval_temperature: float = _option(
        0.0, "evaluation", "Sampling temperature of evaluation; 0 is greedy."
    )
    eval_samples_per_task: int = _option(
        1, "evaluation", "Runs per test task; more than 1 also reports tau2's pass^k."
    )
    eval_split: str = _option(
        "test",
        "evaluation",
        "Split every evaluation runs on: test = held-out tasks; train = the tasks trained on "
        "(shows what training learned, not how it generalises).",
        EVAL_SPLITS,
    )
    eval_max_tasks: int | None = _option(
        None,
        "evaluation",
        "Cap on the tasks per domain used for evaluation (of --eval_split); none uses the whole split.",
    )
    heldout_eval: bool = _option(
        False,
        "evaluation",
        "With --eval_split train: every stage evaluation (before training and after each domain) also "
        "runs each domain's test split (capped by --eval_max_tasks, same greedy settings), filling a "
        "second, held-out accuracy matrix with its own do-nothing floor and measures beside the "
        "train-split one, to show whether what was learned carries to unseen tasks. Costs one more "
        "evaluation of every domain per stage.",
    )

    # --- distributed ---
    parallelism: str = _option(
        "ddp",
        "distributed",
        "How the policy is trained across torchrun processes: ddp = every process holds the "
        "whole model and gradients are averaged (DistributedDataParallel); fsdp = PyTorch FSDP2 "
        "(fully_shard) shards parameters, gradients and optimizer state across processes, for "
        "models whose weights plus optimizer state do not fit one GPU, while rollouts use a full "
        "copy of the weights gathered after every update. Ignored in a single process.",
        PARALLELISMS,
    )
    dist_timeout_minutes: float = _option(
        30.0,
        "distributed",
        "Minutes a collective may wait for the other processes before the run fails (a rank "
        "that died or hangs ends the job instead of blocking it forever).",
    )

    # --- logging ---
    log_dir: str = _option(
        "runs/tau2cl",
        "logging",
        "Folder for metrics.jsonl, summary.json, checkpoints and tau2 results files.",
    )
    log_interval: int = _option(10, "logging", "Training steps between compact log lines.")
    verbose: bool = _option(
        False, "logging", "Print detailed logs (per-step details and tau2's own warnings)."
    )
    use_progress_bar: bool | None = _option(
        None,
        "logging",
        "Show a tqdm progress bar on rank 0: each domain's supervised and GRPO steps with the last "
        "step's figures, in place of the [TRAIN] lines. None: a bar when stdout is a terminal, plain "
        "lines when it is a file or a pipe (a scheduler's log); --use_progress_bar or "
        "--no-use_progress_bar (true or false in a --config file) decides it whatever stdout is.",
    )
    wandb_project: str | None = _option(
        None, "logging", "Weights & Biases project to log to; none turns wandb off."
    )
    wandb_run_name: str | None = _option(
        None, "logging", "Weights & Biases run name; none lets wandb choose one."
    )

    # --- checkpointing ---
    save_interval: int = _option(
        0,
        "checkpointing",
        "Training steps between step checkpoints; 0 saves only at the end of each domain "
        "(checkpoint_task_{i}).",
    )
    save_total_limit: int | None = _option(
        None,
        "checkpointing",
        "Step checkpoints to keep (the oldest are deleted); domain-end checkpoints are always "
        "kept. None keeps every one.",
    )
    merge_lora_on_save: bool = _option(
        False,
        "checkpointing",
        "LoRA: every checkpoint also gets a merged/ folder with the adapters folded into the base "
        "weights (W + alpha/r * B A, in --model_dtype), a plain model that from_pretrained and "
        "inference servers load (with progressive: the adapter of the domain trained last). Costs "
        "one model's size of disk per checkpoint and of CPU memory while it is written.",
    )
    resume_from: str | None = _option(
        None,
        "checkpointing",
        "Checkpoint folder, or a log_dir (its latest complete checkpoint), to resume from at the "
        "domain and step it was saved; every flag not meant to change on resume must equal the "
        "checkpoint's. None starts afresh.",
    )
    overwrite_log_dir: bool = _option(
        False,
        "checkpointing",
        "Delete the files of an earlier run in log_dir (metrics, logs, summary, checkpoints, eval "
        "results, report) before starting; without it such a log_dir is refused.",
    )

    def __post_init__(self) -> None:
        hints = _field_hints()
        for f in fields(self):
            setattr(self, f.name, coerce(f.name, hints[f.name], getattr(self, f.name)))
        validate(self)

    @property
    def importance_cap(self) -> float | None:
        """Truncated importance sampling's cap in use: --tis_cap, or VLLM_TIS_CAP with vLLM
        rollouts when it is unset; --tis_cap 0 turns it off."""
        cap = self.tis_cap
        if cap is None:
            return VLLM_TIS_CAP if self.rollout_backend == "vllm" else None
        return cap or None

    @property
    def upper_clip_range(self) -> float:
        """clip_range_high, or clip_range when it is unset (symmetric clipping)."""
        return self.clip_range if self.clip_range_high is None else self.clip_range_high

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, as plain JSON types (lists copied; secret fields as None)."""
        return {f.name: None if f.metadata["secret"] else _copy(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GRPOConfig:
        """Build from field names; unknown names are a UserError rather than silently ignored."""
        if not isinstance(values, Mapping):
            raise UserError(
                f"a config must be a mapping of field names, got {type(values).__name__}."
            )
        unknown = sorted(set(values) - set(field_names()))
        if unknown:
            raise UserError(
                f"unknown config key(s) {', '.join(map(repr, unknown))}; "
                "the valid keys are the flags of 'tau2cl train --help' without the dashes."
            )
        return cls(**values)


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


@cache
def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(GRPOConfig))


@cache
def _field_hints() -> dict[str, Any]:
    return typing.get_type_hints(GRPOConfig)


@cache
def field_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a field: `int | None` → (int, True), `list[str]` → (list, False)."""
    return hint_type(_field_hints()[name])


@cache
def list_item_type(name: str) -> type:
    """The item type of a list field: `list[float]` → float."""
    return hint_item_type(_field_hints()[name])
