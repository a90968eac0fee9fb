"""User code and tools that fail: named in one line, never a silent substitute; stops leave together."""

from __future__ import annotations

import signal
import time
from types import SimpleNamespace

import pytest

from tau2cl.env.rewards import RewardFnError, checked_reward
from tau2cl.errors import UserError
from tau2cl.rl.schedule import learning_rate
from tau2cl.runs.interrupt import AllRanksStop, LocalStop, SignalWatch, agreed

TASK = SimpleNamespace(id="7")


def flaky(domain, task, messages):
    raise ValueError("bad reward")


def as_text(domain, task, messages):
    return "0.5"


def infinite(domain, task, messages):
    return float("inf")


def slow(domain, task, messages):
    time.sleep(5)
    return 1.0


@pytest.mark.parametrize(
    "fn, expected",
    [
        (flaky, "reward_fn test_faults:flaky on airline task 7 raised ValueError: bad reward."),
        (as_text, "reward_fn test_faults:as_text on airline task 7 returned '0.5', not a number."),
        (infinite, "reward_fn test_faults:infinite on airline task 7 returned inf, not a finite number."),
        (lambda d, t, m: None, "returned None, not a number."),
        (lambda d, t, m: float("nan"), "returned nan, not a finite number."),
        (lambda d, t, m: True, "returned True, not a number."),
    ],
)
def test_each_reward_fault_is_one_line_naming_function_task_and_value(fn, expected):
    with pytest.raises(RewardFnError) as error:
        checked_reward(fn, "airline", TASK, [])
    assert str(error.value).endswith(expected)
    assert isinstance(error.value, UserError)


def test_a_good_reward_passes_through_as_a_float_with_or_without_a_timeout():
    assert checked_reward(lambda d, t, m: 1, "airline", TASK, []) == 1.0
    assert checked_reward(lambda d, t, m: 0.25, "airline", TASK, [], timeout=5.0) == 0.25


def test_a_hung_reward_call_times_out_and_a_stop_request_interrupts_it():
    start = time.perf_counter()
    with pytest.raises(RewardFnError, match="did not return within --reward_timeout 0.4 s"):
        checked_reward(slow, "airline", TASK, [], timeout=0.4)
    assert time.perf_counter() - start < 2
    request = SignalWatch(announce=False)
    request.signum = signal.SIGTERM
    with pytest.raises(LocalStop):
        checked_reward(slow, "airline", TASK, [], timeout=None, check_stop=request.check)


def test_all_ranks_leave_a_phase_together_a_fault_naming_its_cause():
    assert agreed(lambda: 3) == 3
    request = SignalWatch(announce=False)
    request.signum = signal.SIGTERM

    with pytest.raises(AllRanksStop) as stop:
        agreed(request.check)
    assert (stop.value.signum, stop.value.reason) == (signal.SIGTERM, None)

    def fault():
        raise RewardFnError("reward_fn m:f on airline task 7 raised ValueError: x.")

    with pytest.raises(AllRanksStop) as stop:
        agreed(fault)
    assert stop.value.signum is None and stop.value.reason.startswith("reward_fn m:f")


def test_an_environment_that_raises_becomes_that_calls_tool_error():
    from tau2.data_model.message import ToolCall

    from tau2cl.agent.engine import _execute

    class Broken:
        def get_response(self, call):
            raise KeyError("db row")

    episode = SimpleNamespace(env=Broken(), env_calls=[])
    result = _execute(episode, ToolCall(id="call_1_0", name="get_user", arguments={}, requestor="assistant"))
    assert (result.error, result.id, result.role) == (True, "call_1_0", "tool")
    assert result.content == "Error: KeyError: 'db row'"
    assert [record[:2] for record in episode.env_calls] == [("call_1_0", "get_user")]  # logged like any call


def test_the_learning_rate_warms_up_linearly_then_holds():
    # peak 1e-3, 4 warmup steps: steps done 0,1,2,3,9 -> 1/4, 2/4, 3/4, 1, 1 of the peak
    assert [learning_rate(1e-3, 4, s) for s in (0, 1, 2, 3, 9)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], abs=1e-15)
    assert learning_rate(1e-3, 0, 0) == 1e-3
