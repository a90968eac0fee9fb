"""The `tau2cl` command and `python -m tau2cl.train`: help, dispatch, and errors without tracebacks."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types

import pytest

from tau2cl import cli, train
from tau2cl.config import GROUPS, GRPOConfig
from tau2cl.errors import UserError


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=60, check=False
    )


# ----------------------------------------------------------------------------- subprocesses


def test_train_help_lists_every_flag_and_group():
    result = run_module("tau2cl", "train", "--help")
    assert result.returncode == 0, result.stderr
    for f in dataclasses.fields(GRPOConfig):
        assert f"--{f.name}" in result.stdout, f.name
    for title in GROUPS:
        assert f"\n{title}:\n" in result.stdout, title
    assert "--no-use_progress_bar" in result.stdout and "--no-verbose" in result.stdout
    assert "(default: 10)" in result.stdout  # defaults are shown


def test_top_level_help_lists_the_subcommands():
    result = run_module("tau2cl", "--help")
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "make-tiny-model" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch_size_per_gpu", "0"], "--batch_size_per_gpu must be at least 1, got 0."),
        (["--cl_algorithm", "magic"], "--cl_algorithm must be one of sequential, replay, ewc"),
        (["--task_order", "airline", "airline"], "--task_order lists 'airline' twice"),
        (["--num_samples_per_prompt", "1"], "--num_samples_per_prompt must be at least 2"),
        (["--learning_rate", "fast"], "--learning_rate expects a number, got 'fast'."),
        (["--bogus_flag"], "unrecognized arguments: --bogus_flag"),
        (["--config", "/nonexistent/run.yaml"], "cannot read config file /nonexistent/run.yaml"),
    ],
)
def test_train_module_reports_bad_values_in_one_line(args, message):
    result = run_module("tau2cl.train", *args)
    assert result.returncode == 2
    assert result.stderr.startswith("tau2cl: error: ")
    assert message in result.stderr
    assert result.stderr.count("\n") == 1  # one line, no usage dump
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required: COMMAND"),
        (["fly"], "invalid choice: 'fly'"),
        (["train", "--model_dtype", "int3"], "--model_dtype must be one of"),
        (["make-tiny-model"], "the following arguments are required: DIR"),
        (["make-tiny-model", "out", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    ],
)
def test_tau2cl_reports_usage_errors_in_one_line(args, message):
    result = run_module("tau2cl", *args)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_help_imports_no_heavy_library():
    code = (
        "import sys, tau2cl.cli, tau2cl.config, tau2cl.train; "
        "print(sorted(m for m in ('torch', 'transformers', 'tau2') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- in process


@pytest.fixture
def fake_trainer(monkeypatch):
    """A stand-in tau2cl.trainer module whose GRPOTrainer records its config and can raise."""
    record: dict = {"raise": None}

    class GRPOTrainer:
        def __init__(self, config):
            record["config"] = config

        def train(self):
            if record["raise"] is not None:
                raise record["raise"]

    monkeypatch.setitem(
        sys.modules, "tau2cl.trainer", types.SimpleNamespace(GRPOTrainer=GRPOTrainer)
    )
    return record


def test_train_main_builds_the_trainer_from_the_flags(fake_trainer):
    assert train.main(["--cl_algorithm", "replay", "--no-use_progress_bar"]) == 0
    config = fake_trainer["config"]
    assert (config.cl_algorithm, config.use_progress_bar) == ("replay", False)


def test_cli_train_delegates_to_train_main(fake_trainer):
    assert cli.main(["train", "--batch_size_per_gpu", "2", "--task_order", "retail"]) == 0
    assert fake_trainer["config"].batch_size_per_gpu == 2
    assert fake_trainer["config"].task_order == ["retail"]


def test_a_user_error_from_the_trainer_exits_2_with_one_line(fake_trainer, capsys):
    fake_trainer["raise"] = UserError("model folder 'x' does not exist; pass a hub id or a folder.")
    assert cli.main(["train"]) == 2
    assert capsys.readouterr().err == (
        "tau2cl: error: model folder 'x' does not exist; pass a hub id or a folder.\n"
    )


def test_ctrl_c_exits_130(fake_trainer, capsys):
    fake_trainer["raise"] = KeyboardInterrupt()
    assert train.main([]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_bug_in_the_trainer_still_raises(fake_trainer):
    fake_trainer["raise"] = RuntimeError("bug")
    with pytest.raises(RuntimeError, match="bug"):
        train.main([])


def test_make_tiny_model_calls_the_builder_and_prints_the_path(monkeypatch, tmp_path, capsys):
    calls = []

    def make_tiny_model(out_dir, seed=0):
        calls.append((out_dir, seed))
        return tmp_path / "tiny"

    monkeypatch.setitem(
        sys.modules, "tau2cl.agent.tiny_model", types.SimpleNamespace(make_tiny_model=make_tiny_model)
    )
    assert cli.main(["make-tiny-model", str(tmp_path / "tiny"), "--seed", "3"]) == 0
    assert calls == [(str(tmp_path / "tiny"), 3)]
    assert capsys.readouterr().out == f"{tmp_path / 'tiny'}\n"
    assert cli.main(["make-tiny-model", "elsewhere"]) == 0
    assert calls[-1] == ("elsewhere", 0)


def test_docs_flags_md_is_what_tau2cl_flags_generates():
    from pathlib import Path

    from tau2cl.flag_reference import flags_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "flags.md"
    assert doc.read_text(encoding="utf-8") == flags_markdown(), (
        "docs/flags.md is stale: regenerate it with `tau2cl flags --markdown > docs/flags.md`"
    )


def test_flags_markdown_has_a_row_per_field_with_its_default(capsys):
    from dataclasses import fields

    from tau2cl.config import GRPOConfig

    assert cli.main(["flags", "--markdown"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| `--")]
    assert [r.split("`")[1] for r in rows] == [f"--{f.name}" for f in fields(GRPOConfig)]
    assert "| `--learning_rate` | `1e-06` |" in out and "| `--kv_reuse` | `--kv_reuse` |" in out
    assert "| `--use_progress_bar` | none |" in out  # none: a bar on a terminal only
