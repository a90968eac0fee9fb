"""gold_state: the gold environment is built once per task, its hashes reused, keyed by the task's content."""

from __future__ import annotations

import pytest

from tau2cl.env import gold_state


class FakeEnvironment:
    """Counts how it is used; hashes depend on the golden actions applied to it."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []

    def set_state(self, **kwargs):
        self.calls.append("set_state")

    def make_tool_call(self, tool_name, **kwargs):
        self.calls.append(tool_name)

    def get_db_hash(self):
        return "agent:" + ",".join(self.calls)

    def get_user_db_hash(self):
        return None


@pytest.fixture
def built():
    gold_state.clear()
    environments = []

    def build(**kwargs):
        environments.append(FakeEnvironment(**kwargs))
        return environments[-1]

    yield build, environments
    gold_state.clear()


def evaluate_gold(construct, actions):
    """What tau2's evaluator does with the gold environment."""
    env = construct()
    env.set_state(initialization_data=None, initialization_actions=None, message_history=[])
    for name in actions:
        env.make_tool_call(tool_name=name, requestor="assistant")
    return env.get_db_hash(), env.get_user_db_hash()


def test_gold_environment_is_built_once_per_task(domains, built):
    build, environments = built
    task = domains["airline"].train_tasks[0]
    construct = gold_state.gold_aware_constructor(build, "airline", task)
    first = evaluate_gold(construct, ["book", "cancel"])
    assert first == ("agent:set_state,book,cancel", None)
    assert len(environments) == 1 and gold_state.recorded_count() == 1
    # a second evaluation of the same task builds nothing and reads the recorded hashes
    assert evaluate_gold(construct, ["book", "cancel"]) == first
    assert len(environments) == 1
    # the predicted environment (called with solo_mode) is always built afresh
    predicted = construct(solo_mode=False)
    assert predicted is environments[1] and predicted.kwargs == {"solo_mode": False}
    assert gold_state.recorded_count() == 1


def test_key_is_the_task_content_not_only_its_id(domains):
    task = domains["retail"].train_tasks[0]
    changed = task.model_copy(deep=True)
    assert gold_state.gold_key("retail", task) == gold_state.gold_key("retail", changed)
    changed.evaluation_criteria.actions[0].arguments["changed"] = 1
    assert gold_state.gold_key("retail", task) != gold_state.gold_key("retail", changed)
    assert gold_state.gold_key("airline", task) != gold_state.gold_key("retail", task)


def test_recorded_tasks_are_bounded_least_recently_used_first(monkeypatch, built):
    monkeypatch.setattr(gold_state, "MAX_TASKS", 2)
    keys = [("airline", str(i), "") for i in range(3)]
    gold_state.record(keys[0], ("a0", None))
    gold_state.record(keys[1], ("a1", None))
    assert gold_state.recorded(keys[0]) == ("a0", None)  # keys[0] is now the most recently used
    gold_state.record(keys[2], ("a2", None))
    assert gold_state.recorded(keys[1]) is None
    assert gold_state.recorded(keys[0]) == ("a0", None) and gold_state.recorded(keys[2]) == ("a2", None)
    assert gold_state.recorded_count() == 2
