"""The ready-made configs, the wrapper scripts, the quick smoke test end to end, and the README's truth.

The README's flag tables are compared with GRPOConfig itself, so a new, renamed or re-defaulted flag
fails here until the README says the same; `python tests/integration/test_configs_and_scripts.py`
prints the tables as they should read.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from tau2cl.config import GROUPS, GRPOConfig, field_type, load_config_file, parse_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SCRIPTS = ("run_single_gpu.sh", "run_quick_test.sh")
README = ROOT / "README.md"


def _registered() -> list[str]:
    from tau2cl.strategies import registered_names

    return registered_names()


def _script(name: str, *args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run a wrapper script with this interpreter (PYTHON), from `cwd`."""
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(ROOT / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ----------------------------------------------------------------------------- configs


def test_the_documented_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"quick_test.yaml", "sequential.yaml", "qwen2.5-3b-4gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_to_a_valid_config_with_a_registered_strategy(path):
    values = load_config_file(path)  # unknown keys would raise here
    config = parse_config(["--config", str(path)])
    assert isinstance(config, GRPOConfig)
    assert values, f"{path.name} sets nothing"
    for key, value in values.items():  # every value in the file reached the config
        assert getattr(config, key) == getattr(GRPOConfig.from_dict({key: value}), key), key
    assert config.cl_algorithm in _registered(), f"{path.name} names a strategy that does not exist"


def test_quick_test_config_is_the_small_offline_run():
    config = parse_config(["--config", str(ROOT / "configs" / "quick_test.yaml")])
    assert config.model_name_or_path == "tiny" and config.model_dtype == "float32"
    assert config.task_order == ["airline", "retail", "telecom"]
    assert (config.max_tasks_per_domain, config.num_steps_per_task) == (2, 2)
    assert (config.batch_size_per_gpu, config.num_samples_per_prompt) == (1, 2)
    assert config.kl_coef > 0  # the reference-model path runs too
    assert config.eval_interval == 0 and config.log_interval == 1


def test_command_line_flags_override_a_config_file():
    path = str(ROOT / "configs" / "quick_test.yaml")
    config = parse_config(["--config", path, "--num_steps_per_task", "3", "--task_order", "retail"])
    assert config.num_steps_per_task == 3 and config.task_order == ["retail"]
    assert config.model_name_or_path == "tiny"  # the rest still comes from the file


def test_4gpu_config_has_the_documented_settings():
    config = parse_config(["--config", str(ROOT / "configs" / "qwen2.5-3b-4gpu.yaml")])
    assert config.model_name_or_path == "Qwen/Qwen2.5-3B-Instruct"
    assert config.model_dtype == "bfloat16"
    assert (config.batch_size_per_gpu, config.num_steps_per_task) == (4, 100)
    assert config.use_progress_bar is True and config.log_interval == 10
    assert config.cl_algorithm == "replay"


# ----------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("name", [*SCRIPTS, ".ci/run"])
def test_script_is_strict_executable_bash(name):
    path = ROOT / name
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(path, os.X_OK), f"{name} is not executable"
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert syntax.returncode == 0, syntax.stderr


def test_run_single_gpu_without_alg_prints_usage_and_exits_2(tmp_path):
    result = _script("run_single_gpu.sh", cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: bash run_single_gpu.sh ALG" in result.stderr
    assert "ALG is missing" in result.stderr
    assert not (tmp_path / "runs").exists()  # no run was started


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_alg_prints_usage_and_valid_names_and_exits_2(name, tmp_path):
    log_dir = tmp_path / "must_not_exist"
    result = _script(name, "no_such_strategy", "--log_dir", str(log_dir), cwd=tmp_path)
    assert result.returncode == 2
    assert f"usage: bash {name}" in result.stderr
    assert "unknown ALG 'no_such_strategy'" in result.stderr
    for strategy in _registered():
        assert strategy in result.stderr
    assert not log_dir.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_the_registered_strategies(name, tmp_path):
    result = _script(name, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"usage: bash {name}" in result.stdout
    assert " ".join(_registered()) in result.stdout


# ----------------------------------------------------------------------------- the quick test


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`bash run_quick_test.sh --log_dir DIR`, as a user runs it: (log_dir, stdout)."""
    log_dir = tmp_path_factory.mktemp("quick") / "run"
    result = _script("run_quick_test.sh", "--log_dir", str(log_dir), cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return log_dir, result.stdout


@pytest.mark.slow
def test_quick_test_shows_every_part_of_the_output(quick_run):
    _, out = quick_run
    assert "Evaluation before training (Task -)" in out
    for i, domain in enumerate(("airline", "retail", "telecom")):
        assert f"Task {i}: {domain.upper()}" in out
        assert f"Training on 2 tasks from {domain} domain" in out
        assert re.search(
            rf"Task {i} \({domain}\): 100%\|.*\| 2/2 \[.*loss: .*, reward: .*, kl: .*\]", out
        )
        assert f"[EVAL] Task {i} Step 2 | Reward: " in out
        assert f"Backward Transfer Evaluation (after Task {i})" in out
        assert f"=== Transfer Metrics after Task {i} ===" in out
    for measure in ("backward_transfer", "average_performance", "forgetting", "forward_transfer"):
        assert f"  {measure}: " in out
    assert "Final Summary" in out and "=== Final Transfer Metrics ===" in out
    assert "after telecom" in out


@pytest.mark.slow
def test_quick_test_writes_the_run_files(quick_run):
    log_dir, _ = quick_run
    summary = json.loads((log_dir / "summary.json").read_text())
    matrix = summary["accuracy_matrix"]
    assert len(matrix) == 4 and all(len(row) == 3 for row in matrix)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for row in matrix for v in row)
    assert summary["task_order"] == ["airline", "retail", "telecom"]
    assert summary["stages_completed"] == 3 and summary["config"]["cl_algorithm"] == "sequential"
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    counts = {
        kind: sum(r["type"] == kind for r in records) for kind in ("train", "eval", "transfer")
    }
    assert counts == {"train": 6, "eval": 12, "transfer": 3}  # 3 domains x 2 steps; 4 stages x 3
    for i in range(3):
        assert (log_dir / f"checkpoint_task_{i}" / "trainer_state.pt").is_file()
    assert len(list((log_dir / "eval_results").glob("*.json"))) == 12


# ----------------------------------------------------------------------------- README


def _shown_default(f) -> str:
    base, _ = field_type(f.name)
    default = f.default_factory() if base is list else f.default
    if default is None:
        return "none"
    if base is list:
        return " ".join(default)
    if base is bool:
        return "true" if default else "false"
    return str(default)


def expected_flag_tables() -> str:
    """The README's flag tables as GRPOConfig defines them (groups in --help order)."""
    lines = []
    for group, about in GROUPS.items():
        lines += [
            f"#### {group}: {about}",
            "",
            "| flag | default | what it does |",
            "| --- | --- | --- |",
        ]
        for f in fields(GRPOConfig):
            if f.metadata["group"] != group:
                continue
            base, _ = field_type(f.name)
            flag = f"`--{f.name}`" + (f" / `--no-{f.name}`" if base is bool else "")
            help_text = f.metadata["help"].replace("|", "\\|")
            lines.append(f"| {flag} | `{_shown_default(f)}` | {help_text} |")
        lines.append("")
    return "\n".join(lines)


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_readme_flag_tables_match_the_config():
    section = _section(README.read_text(), "## Flags")
    tables = section[section.index("#### ") :].strip()
    assert tables == expected_flag_tables().strip(), (
        "README.md's flag tables differ from GRPOConfig; replace them with the output of "
        "`python tests/integration/test_configs_and_scripts.py`"
    )


def test_readme_names_only_real_flags():
    text = README.read_text()
    names = {f.name for f in fields(GRPOConfig)}
    known = names | {f"no-{n}" for n in names} | {"config", "help", "nproc_per_node", "file", "no-"}
    unknown = set(re.findall(r"--([a-zA-Z][\w-]*)", text)) - known
    assert not unknown, f"README.md names flags that do not exist: {sorted(unknown)}"


def test_readme_strategy_table_is_the_registry():
    section = _section(README.read_text(), "### Continual-learning strategies")
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    assert sorted(documented) == sorted(_registered())


def test_readme_test_command_is_what_ci_runs():
    assert "python -m pytest -q\n" in README.read_text()
    assert "-m pytest -q\n" in (ROOT / ".ci" / "run").read_text()


if __name__ == "__main__":
    print(expected_flag_tables())
