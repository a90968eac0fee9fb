"""The checks a config passes before a run starts: each bad value or combination is one sentence.

`validate` runs them in a fixed order and raises a UserError, saying how to fix it, for the first
value that fails. What a strategy needs (LoRA, DDP) is read from its registry entry.
"""

from __future__ import annotations

import re
import typing
from dataclasses import fields
from typing import Any

from tau2cl.cl.strategies.registry import STRATEGIES
from tau2cl.constants import DOMAIN_NAMES, LITELLM_PREFIX
from tau2cl.errors import UserError

_AT_LEAST_ONE = (
    "max_new_tokens",
    "max_turns",
    "max_context_tokens",
    "user_max_turns",
    "user_max_new_tokens",
    "num_updates_per_batch",
    "batch_size_per_gpu",
    "gradient_accumulation_steps",
    "replay_buffer_size",
    "ewc_fisher_samples",
    "ewc_pp_interval",
    "fusion_holdout_tasks",
    "eval_samples_per_task",
    "log_interval",
    "max_tasks_per_domain",
    "eval_max_tasks",
    "save_total_limit",
)
_NON_NEGATIVE = (
    "kl_coef",
    "distill_coef",
    "ewc_lambda",
    "learning_rate",
    "weight_decay",
    "warmup_steps",
    "eval_interval",
    "num_steps_per_task",
    "sft_steps_per_task",
    "sft_learning_rate",
    "max_resample_rounds",
    "save_interval",
    "eval_temperature",
    "user_temperature",
    "user_max_retries",
)
_POSITIVE = (
    "clip_range", "clip_range_high", "max_grad_norm", "dist_timeout_minutes", "user_timeout", "reward_timeout"
)
_NON_EMPTY = ("model_name_or_path", "log_dir")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def validate(config: Any) -> None:
    """Raise a UserError, one sentence that says how to fix it, for the first bad value of `config`
    (a GRPOConfig whose fields already have their types)."""
    for f in fields(config):
        value, choices = getattr(config, f.name), f.metadata.get("choices")
        if choices is not None and value not in choices:
            _fail(f"--{f.name} must be one of {', '.join(choices)}, got {value!r}.")
    for name in _AT_LEAST_ONE:
        _check(config, name, lambda v: v >= 1, "must be at least 1")
    for name in _NON_NEGATIVE:
        _check(config, name, lambda v: v >= 0, "must be 0 or more")
    for name in _POSITIVE:
        _check(config, name, lambda v: v > 0, "must be greater than 0")
    for name in _NON_EMPTY:
        _check(config, name, lambda v: v.strip() != "", "must not be empty")
    _check(
        config,
        "num_samples_per_prompt",
        lambda v: v >= 2,
        "must be at least 2, because GRPO compares the samples of one task with each other",
    )
    _check(
        config,
        "temperature",
        lambda v: v > 0,
        "must be greater than 0, because training needs samples that differ (greedy decoding "
        "is for --eval_temperature 0)",
    )
    _check(config, "top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
    _check(config, "dual_clip", lambda v: v > 1, "must be greater than 1 (or none to turn it off)")
    _check(config, "tis_cap", lambda v: v == 0 or v >= 1, "must be at least 1 (or 0 to turn it off)")
    _validate_vllm(config)
    _validate_lora(config)
    _check(config, "replay_ratio", lambda v: 0 <= v <= 1, "must be between 0 and 1")
    _check(config, "ewc_gamma", lambda v: 0 <= v <= 1, "must be between 0 and 1")
    _check(config, "fusion_alpha", lambda v: 0 <= v <= 1, "must be between 0 and 1")
    _check(config, "fusion_alpha_grid", lambda v: v and all(0 <= a <= 1 for a in v), "needs values between 0 and 1")
    _check(config, "ewc_pp_alpha", lambda v: 0 < v <= 1, "must be in (0, 1]")
    _check(config, "adaptive_replay_floor", lambda v: v >= 0, "must be >= 0")
    _check(
        config,
        "reward_fn",
        lambda v: v == "tau2" or _IMPORT_PATH.match(v) is not None,
        "must be tau2 or a module:function import path such as my_pkg.rewards:score",
    )
    _validate_task_order(config.task_order)
    _validate_task_ids(config)
    if config.heldout_eval and config.eval_split == "test":
        _fail("--heldout_eval needs --eval_split train: with --eval_split test every evaluation already runs on the held-out test split.")
    if config.num_steps_per_task == 0 and config.sft_steps_per_task == 0:
        _fail("--num_steps_per_task must be at least 1 unless --sft_steps_per_task is set (no training otherwise).")
    _validate_strategy_parallelism(config)
    _validate_user(config)


def _validate_lora(config: Any) -> None:
    _check(config, "lora_r", lambda v: v >= 0, "must be 0 (full fine-tuning) or more")
    _check(config, "lora_alpha", lambda v: v > 0, "must be greater than 0")
    _check(config, "lora_dropout", lambda v: 0 <= v < 1, "must be in [0, 1)")
    if config.lora_r > 0 and not config.lora_target_modules:
        _fail("--lora_target_modules needs at least one module name, e.g. q_proj v_proj.")
    if config.merge_lora_on_save and config.lora_r == 0:
        _fail("--merge_lora_on_save needs --lora_r > 0: a full fine-tuning checkpoint is already a plain model.")
    strategy = STRATEGIES[config.cl_algorithm]
    if strategy.needs_lora and config.lora_r == 0:
        _fail(f"--cl_algorithm {config.cl_algorithm} needs --lora_r > 0: {strategy.lora_reason}.")


def _validate_strategy_parallelism(config: Any) -> None:
    strategy = STRATEGIES[config.cl_algorithm]
    if config.parallelism == "fsdp" and not strategy.works_with_fsdp:
        _fail(f"--cl_algorithm {config.cl_algorithm} needs --parallelism ddp: {strategy.fsdp_reason}.")


def _validate_user(config: Any) -> None:
    model = config.user_model
    if model is not None and not model.strip():
        _fail("--user_model must not be empty; leave it out for the scripted user.")
    litellm = model is not None and model.startswith(LITELLM_PREFIX)
    if litellm and not model[len(LITELLM_PREFIX) :].strip():
        _fail("--user_model litellm: needs a model name, e.g. litellm:gpt-4.1-mini.")
    for name in ("user_api_base", "user_api_key"):
        if getattr(config, name) is not None and not litellm:
            _fail(f"--{name} is only used by a litellm user; set --user_model litellm:<model>.")


def _validate_vllm(config: Any) -> None:
    _check(config, "vllm_gpu_memory_utilization", lambda v: 0 < v < 1, "must be between 0 and 1")
    _check(config, "vllm_cpu_kv_cache_gib", lambda v: v >= 1, "must be at least 1")
    if config.rollout_backend != "vllm":
        if config.vllm_sleep_mode:
            _fail("--vllm_sleep_mode needs --rollout_backend vllm.")
        return
    if config.top_p != 1:
        _fail(
            f"--rollout_backend vllm needs --top_p 1, got {config.top_p!r}: vLLM's log-probs under a "
            "nucleus are renormalised over it and the trainer's are not, so the importance ratio "
            "would compare different distributions."
        )


def _check(config: Any, name: str, ok: typing.Callable[[Any], bool], rule: str) -> None:
    value = getattr(config, name)
    if value is not None and not ok(value):
        _fail(f"--{name} {rule}, got {value!r}.")


def _validate_task_order(order: list[str]) -> None:
    if not order:
        _fail(f"--task_order needs at least one domain from {', '.join(DOMAIN_NAMES)}.")
    for i, name in enumerate(order):
        if name not in DOMAIN_NAMES:
            _fail(
                f"unknown domain {name!r} in --task_order; choose from {', '.join(DOMAIN_NAMES)}."
            )
        if name in order[:i]:
            _fail(f"--task_order lists {name!r} twice; give each domain at most once.")


def parse_task_ids(entries: list[str], flag: str = "--task_ids") -> dict[str, list[str]]:
    """`["airline:27", "airline:9", "retail:3"]` → {"airline": ["27", "9"], "retail": ["3"]}."""
    chosen: dict[str, list[str]] = {}
    for entry in entries:
        domain, sep, task_id = entry.partition(":")
        if not sep or not domain or not task_id:
            _fail(f"{flag} entries are DOMAIN:TASK_ID (e.g. airline:27), got {entry!r}.")
        if domain not in DOMAIN_NAMES:
            _fail(f"unknown domain {domain!r} in {flag}; choose from {', '.join(DOMAIN_NAMES)}.")
        ids = chosen.setdefault(domain, [])
        if task_id in ids:
            _fail(f"{flag} names {entry!r} twice; give each task at most once.")
        ids.append(task_id)
    return chosen


def _validate_task_ids(config: Any) -> None:
    """Well-formed entries; those of domains outside --task_order are unused (a config file's ids
    stay valid when the command line narrows the order)."""
    parse_task_ids(config.task_ids)
    parse_task_ids(config.test_task_ids, "--test_task_ids")


def _fail(message: str) -> typing.NoReturn:
    raise UserError(message)
