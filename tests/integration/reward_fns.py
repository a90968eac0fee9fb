"""Custom training rewards used by the end-to-end tests through `--reward_fn reward_fns:<name>`."""

from __future__ import annotations


def first_reply_length(domain: str, task, messages) -> float:
    """Length of the agent's first own message, scaled to [0, 1] (varies within a group)."""
    agent = [m for m in messages if getattr(m, "role", "") == "assistant" and getattr(m, "raw_data", None)]
    if not agent:
        return 0.0
    return min(1.0, len(agent[0].raw_data.get("text", "")) / 200)


CALLS = {"n": 0}


def fails_on_fourth_call(domain: str, task, messages) -> float:
    """first_reply_length, but the fourth call raises (a user reward function with a bug)."""
    CALLS["n"] += 1
    if CALLS["n"] == 4:
        raise ZeroDivisionError("division by zero")
    return first_reply_length(domain, task, messages)
def constant_on_task_zero(domain: str, task, messages) -> float:
    """0 on every task whose id is "0" (its groups never vary), else first_reply_length."""
    return 0.0 if task.id == "0" else first_reply_length(domain, task, messages)
