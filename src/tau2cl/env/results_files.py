"""Evaluation rollouts saved in tau2's own `Results` JSON format.

A file written here loads with `tau2.data_model.simulation.Results.load`, so tau2's own tools can
view it and re-score every simulation with `evaluate_simulation`. The run information tau2 records
(`Info`) is filled from tau2cl's side: the agent is the trained policy, the user is tau2cl's user
simulator, `max_steps` is the rollout's turn limit.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from importlib import metadata
from pathlib import Path

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.config import DEFAULT_MAX_ERRORS
from tau2.data_model.simulation import AgentInfo, Info, Results, SimulationRun, UserInfo
from tau2.data_model.tasks import Task

from tau2cl.env.domains import Domain

AGENT_IMPLEMENTATION = "tau2cl_policy"


def tau2cl_version() -> str:
    """What tau2 records as `git_commit`: the tau2cl package version."""
    try:
        return f"tau2cl {metadata.version('tau2cl')}"
    except metadata.PackageNotFoundError:
        return "tau2cl (not installed)"


def write_results(
    path: str | Path,
    domain: Domain,
    tasks: list[Task],
    simulations: list[SimulationRun],
    *,
    agent_model: str,
    user_name: str,
    seed: int | None,
    max_turns: int,
    max_errors: int = DEFAULT_MAX_ERRORS,
) -> None:
    """Write one domain's simulations as a tau2 Results file, atomically (temp file + rename)."""
    known = {task.id for task in tasks}
    missing = sorted({s.task_id for s in simulations} - known)
    if missing:
        raise ValueError(f"simulations of tasks not in `tasks`: {', '.join(missing)}")
    info = Info(
        git_commit=tau2cl_version(),
        num_trials=max(Counter(s.task_id for s in simulations).values(), default=1),
        max_steps=max_turns,
        max_errors=max_errors,
        user_info=UserInfo(implementation=user_name),
        agent_info=AgentInfo(implementation=AGENT_IMPLEMENTATION, llm=agent_model),
        environment_info=domain.base_environment(solo_mode=domain.solo_mode).get_info(),
        seed=seed,
    )
    results = Results(info=info, tasks=list(tasks), simulations=list(simulations))
    _save_atomically(results, Path(path))


def _save_atomically(results: Results, path: Path) -> None:
    """A reader never sees a half-written file: write beside it, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        results.save(Path(temp))  # tau2's own serialisation
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
