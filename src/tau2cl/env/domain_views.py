"""Views of a loaded domain: chosen train and test tasks (`--task_ids`, `--test_task_ids`), the compact
setting (`--compact_domains`) and train tasks a strategy holds out of training (`without_train_tasks`).

`with_train_tasks` keeps a domain's train split to the tasks named by id, in the order given; the
test split is untouched. `with_test_tasks` does the same for the test split. `compact` is the
setting for small models and CPUs: the agent sees a one-line role description instead of the
domain's policy (5k-10k tokens of context become a few hundred) and only the tools the loaded tasks' golden actions call (in solo mode also tau2's `done`).
tau2's evaluator never reads the system prompt or the tool list, so every reward is tau2's as in
the full setting; what changes is the task the agent faces: without the policy it cannot know the
rules a full-setting agent must follow, and it cannot call a tool no golden action calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from tau2cl.env.domains import STOP_TOOL_NAME, Domain, official_split
from tau2cl.errors import UserError

COMPACT_POLICIES = {
    "airline": "You are an airline customer service agent. Help the user with the tools.",
    "retail": "You are a retail customer service agent. Help the user with the tools.",
    "telecom": "You are a telecom technical support agent. Help the user with the tools.",
}


def with_train_tasks(domain: Domain, task_ids: list[str]) -> Domain:
    """The domain whose train split is exactly these tasks of tau2's train split, in this order."""
    return dataclasses.replace(domain, train_tasks=_named_tasks(domain.name, "train", task_ids, "--task_ids"))


def with_test_tasks(domain: Domain, task_ids: list[str]) -> Domain:
    """The domain whose test split is exactly these tasks of tau2's test split, in this order."""
    return dataclasses.replace(domain, test_tasks=_named_tasks(domain.name, "test", task_ids, "--test_task_ids"))


def _named_tasks(name: str, split: str, task_ids: list[str], flag: str) -> list:
    by_id = {task.id: task for task in official_split(name, split)}
    missing = [t for t in task_ids if t not in by_id]
    if missing:
        raise UserError(
            f"{flag}: {name} has no {split} task {missing[0]!r} (its {split} split has "
            f"{len(by_id)} tasks; `tau2cl train {flag}` takes ids of tau2's {split} split)."
        )
    return [by_id[t] for t in task_ids]


def without_train_tasks(domain: Domain, task_ids: Collection[str]) -> Domain:
    """The domain without these train tasks (held out of training by a strategy); the rest in order."""
    if not task_ids:
        return domain
    return dataclasses.replace(domain, train_tasks=[t for t in domain.train_tasks if t.id not in task_ids])


def golden_tool_names(domain: Domain) -> set[str]:
    """Names of the tools the golden actions of the domain's loaded tasks call."""
    tasks = domain.train_tasks + domain.test_tasks
    return {a.name for t in tasks if t.evaluation_criteria for a in t.evaluation_criteria.actions or []}


def compact(domain: Domain) -> Domain:
    """The domain with a one-line policy and only the tools its loaded tasks' golden actions use."""
    keep = golden_tool_names(domain) | ({STOP_TOOL_NAME} if domain.solo_mode else set())
    schemas = [s for s in domain.tool_schemas if s["function"]["name"] in keep]
    return dataclasses.replace(
        domain,
        policy=COMPACT_POLICIES[domain.name],
        tool_schemas=schemas,
        tool_names=frozenset(s["function"]["name"] for s in schemas),
    )
