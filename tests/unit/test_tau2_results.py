"""Results files are tau2's own: tau2 loads them and re-scores every simulation to the same reward."""

from __future__ import annotations

import json

import pytest

from tau2cl.env.domains import load_domain
from tau2cl.env.golden import golden_conversation
from tau2cl.env.results_files import AGENT_IMPLEMENTATION, write_results
from tau2cl.env.tau2_reward import compute_reward, make_simulation

# isort: split
from tau2.data_model.simulation import Results
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation


def scored_simulations(name: str, count: int) -> tuple:
    """Golden simulations of the first tasks, then one that misses a needed action (reward 0)."""
    domain = load_domain(name, max_tasks=count)
    tasks = domain.train_tasks
    simulations = []
    for trial, task in enumerate(tasks):
        messages, reason = golden_conversation(domain, task)
        result = compute_reward(domain, task, messages, reason)
        simulations.append(make_simulation(task, messages, reason, reward_info=result.reward_info, trial=trial))
    task = tasks[-1]
    for drop in reversed(range(len(task.evaluation_criteria.actions))):  # writes come last
        messages, reason = golden_conversation(domain, task, drop=drop)
        result = compute_reward(domain, task, messages, reason)
        if result.reward < 1.0:
            simulations.append(make_simulation(task, messages, reason, reward_info=result.reward_info))
            return domain, tasks, simulations
    raise AssertionError(f"no single dropped action of task {task.id} lowers its reward")


@pytest.mark.parametrize("name", ["retail", "telecom"])
def test_tau2_loads_the_file_and_rescores_to_the_recorded_reward(tmp_path, name):
    domain, tasks, simulations = scored_simulations(name, count=3)
    path = tmp_path / "eval" / f"{name}.json"
    write_results(path, domain, tasks, simulations, agent_model="tiny", user_name="scripted", seed=7, max_turns=12)

    results = Results.load(path)  # tau2's own reader
    assert Results.load(path).model_dump() == results.model_dump()
    assert [s.id for s in results.simulations] == [s.id for s in simulations]
    rewards = [s.reward_info.reward for s in results.simulations]
    assert rewards[:-1] == [1.0] * len(tasks) and rewards[-1] < 1.0
    by_id = {task.id: task for task in results.tasks}
    for simulation in results.simulations:
        rescored = evaluate_simulation(  # straight from tau2: its registry reads the DB from disk
            simulation=simulation,
            task=by_id[simulation.task_id],
            evaluation_type=EvaluationType.ALL,
            solo_mode=domain.solo_mode,
            domain=name,
        )
        assert rescored.reward == simulation.reward_info.reward
        assert rescored.model_dump() == simulation.reward_info.model_dump()


def test_run_information_describes_this_run(tmp_path):
    domain, tasks, simulations = scored_simulations("telecom", count=2)
    path = tmp_path / "telecom.json"
    write_results(path, domain, tasks, simulations, agent_model="Qwen/x", user_name="scripted", seed=None, max_turns=30)
    info = Results.load(path).info
    assert info.git_commit.startswith("tau2cl")
    assert (info.max_steps, info.seed, info.num_trials) == (30, None, 2)  # one task ran twice
    assert info.agent_info.implementation == AGENT_IMPLEMENTATION and info.agent_info.llm == "Qwen/x"
    assert info.user_info.implementation == "scripted"
    assert info.environment_info.domain_name == "telecom"
    assert info.environment_info.policy == domain.policy  # the solo policy the agent saw


def test_write_is_atomic_and_replaces_an_old_file(tmp_path):
    domain, tasks, simulations = scored_simulations("telecom", count=1)
    path = tmp_path / "telecom.json"
    path.write_text("old")
    write_results(path, domain, tasks, simulations, agent_model="m", user_name="u", seed=0, max_turns=5)
    assert json.loads(path.read_text())["info"]["seed"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["telecom.json"]  # no temp file left behind


def test_simulations_of_unknown_tasks_are_rejected(tmp_path):
    domain, tasks, simulations = scored_simulations("telecom", count=2)
    with pytest.raises(ValueError, match="not in `tasks`"):
        write_results(tmp_path / "x.json", domain, tasks[:1], simulations, agent_model="m", user_name="u", seed=0, max_turns=5)
