"""The tiny training run the tests share: its settings in one dict, as a GRPOConfig or as flags.

Two domains of 2 tasks per split in the compact setting (a one-line policy, contexts of a few
hundred tokens), 2 steps each of one prompt with 2 samples of one short turn, one evaluated task,
no reference model, and a reward that varies within a group (tau2's is always 0 for the untrained
tiny model), so advantages and gradients are not zero and the weights move. A test passes only
what it does differently.

`reward_fns` lives in tests/integration: a run in this process needs that folder on sys.path
(pytest puts it there for the tests in it), a subprocess needs it on PYTHONPATH.

Importable as `tiny_run` from every test folder: pytest puts tests/ on sys.path for tests/conftest.py.
"""

from __future__ import annotations

from typing import Any

from tau2cl.config import GRPOConfig

TINY_RUN: dict[str, Any] = dict(
    model_name_or_path="tiny", model_dtype="float32",
    task_order=["airline", "retail"], max_tasks_per_domain=2, compact_domains=True,
    num_steps_per_task=2, batch_size_per_gpu=1, num_samples_per_prompt=2,
    max_new_tokens=8, max_turns=1,
    eval_interval=0, eval_max_tasks=1,
    kl_coef=0.0, reward_fn="reward_fns:first_reply_length",
    use_progress_bar=False,
)  # fmt: skip


def tiny_config(**overrides: Any) -> GRPOConfig:
    """The tiny run's GRPOConfig, with `overrides` (field name -> value) in place of its values."""
    return GRPOConfig(**{**TINY_RUN, **overrides})


def tiny_flags(**overrides: Any) -> list[str]:
    """The tiny run as `tau2cl train` flags: every field given, so it wins over earlier flags."""
    flags: list[str] = []
    for name, value in {**TINY_RUN, **overrides}.items():
        flags += _flag(name, value)
    return flags


def _flag(name: str, value: Any) -> list[str]:
    """One field on the command line: `--name`/`--no-name`, `--name a b`, `--name none`, `--name 3`."""
    if isinstance(value, bool):
        return [f"--{name}" if value else f"--no-{name}"]
    if isinstance(value, list):
        return [f"--{name}", *map(str, value)]
    return [f"--{name}", "none" if value is None else str(value)]
