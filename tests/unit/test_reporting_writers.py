"""Each output writer of a run alone (reporting/writers/): what it writes, and nothing else."""

from __future__ import annotations

import inspect
import io
import json
import math
import re
import sys
import types

import pytest

from tau2cl.errors import UserError
from tau2cl.reporting.writers.console import ConsoleWriter
from tau2cl.reporting.writers.jsonl import JsonlWriter
from tau2cl.reporting.writers.log_file import LogFileWriter
from tau2cl.reporting.writers.summary_file import SummaryFileWriter
from tau2cl.reporting.writers.wandb_writer import (
    NullWandbWriter,
    WandbWriter,
    namespaced_numbers,
    open_wandb,
)

# ---------------------------------------------------------------- metrics.jsonl


def test_jsonl_writes_one_object_per_line_and_appends_on_reopening(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = JsonlWriter(str(path))
    first.write_record({"type": "train", "step": 1})
    assert path.read_text() == '{"type": "train", "step": 1}\n'  # on disk before close
    first.write_record({"type": "eval", "scores": {"airline": 0.5}})
    first.close()
    resumed = JsonlWriter(str(path))
    resumed.write_record({"type": "train", "step": 2})
    resumed.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"type": "train", "step": 1},
        {"type": "eval", "scores": {"airline": 0.5}},
        {"type": "train", "step": 2},
    ]


def test_jsonl_keeps_non_finite_numbers_and_turns_array_values_into_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(str(path))
    writer.write_record({"loss": float("nan"), "kl": float("inf"), "lr": np.float32(0.25),
                         "tokens": torch.tensor(3), "lengths": np.array([1, 2])})
    writer.close()
    line = path.read_text()
    assert line == '{"loss": NaN, "kl": Infinity, "lr": 0.25, "tokens": 3, "lengths": [1, 2]}\n'
    record = json.loads(line)
    assert math.isnan(record["loss"]) and record["kl"] == math.inf


def test_jsonl_refuses_a_value_json_cannot_hold(tmp_path):
    writer = JsonlWriter(str(tmp_path / "metrics.jsonl"))
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        writer.write_record({"figure": object()})
    writer.close()


# ---------------------------------------------------------------- train.log


def test_the_log_file_appends_lines_and_keeps_each_as_soon_as_written(tmp_path):
    path = tmp_path / "train.log"
    path.write_text("from the run before\n")
    writer = LogFileWriter(str(path))
    writer.write_line("\nTask 0: AIRLINE")
    assert path.read_text() == "from the run before\n\nTask 0: AIRLINE\n"
    writer.write_line("[TRAIN] Task 0 Step 1/2")
    writer.close()
    lines = path.read_text().splitlines()
    assert lines == ["from the run before", "", "Task 0: AIRLINE", "[TRAIN] Task 0 Step 1/2"]


# ---------------------------------------------------------------- summary.json


def test_the_summary_file_is_replaced_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    writer = SummaryFileWriter(str(path))
    writer.write_record({"task_order": ["airline"], "matrix": [[0.1], [0.5]]})
    writer.write_record({"task_order": ["airline", "retail"]})
    writer.close()
    assert path.read_text() == '{\n  "task_order": [\n    "airline",\n    "retail"\n  ]\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# ---------------------------------------------------------------- console


def test_the_console_without_a_bar_prints_each_line_once():
    stream = io.StringIO()
    console = ConsoleWriter(stream)
    console.write_line("[EVAL] Task 0 Step 1 | Reward: 0.500")
    console.write_line("\nTask 1: RETAIL")
    console.close()
    assert stream.getvalue() == "[EVAL] Task 0 Step 1 | Reward: 0.500\n\nTask 1: RETAIL\n"


def test_the_step_bar_fills_reports_when_full_and_a_line_prints_clear_of_it():
    stream = io.StringIO()
    console = ConsoleWriter(stream)
    console.open_bar("GRPO Task 0 (airline)", total=2, initial=0)
    assert console.move_bar("GRPO Task 0 (airline)", 1, 2, "loss: 1.0000, reward: 0.500, kl: 0.0100") is False
    console.write_line("checkpoint saved")
    assert console.move_bar("GRPO Task 0 (airline)", 2, 2, "loss: 0.5000, reward: 1.000, kl: 0.0200") is True
    assert console.close_bar() is True and console.close_bar() is False and console.bar is None
    segments = re.split(r"[\r\n]", stream.getvalue())
    assert "checkpoint saved" in segments
    full = r"GRPO Task 0 \(airline\): 100%\|.*\| 2/2 \[\d\d:\d\d<00:00, loss: 0\.5000, reward: 1\.000, kl: 0\.0200\]"
    assert re.search(full, stream.getvalue())


def test_a_resumed_bar_starts_from_the_steps_already_done():
    console = ConsoleWriter(io.StringIO())
    console.open_bar("GRPO Task 1 (retail)", total=3, initial=2)
    assert console.move_bar("GRPO Task 1 (retail)", 3, 3, "loss: 1.0000, reward: 0.500, kl: 0.0100") is True
    console.close()
    assert console.bar is None


def test_the_next_step_advances_the_bar_and_anything_else_redraws_it_from_there():
    console = ConsoleWriter(io.StringIO())
    console.open_bar("SFT Task 0 (airline)", total=10, initial=0, timed=False)
    first = console.bar
    console.move_bar("SFT Task 0 (airline)", 1, 10, "loss: 8.0000, token acc: 0.0%", timed=False)
    assert console.bar is first and (first.n, first.initial) == (1, 0)
    console.move_bar("SFT Task 0 (airline)", 4, 10, "loss: 4.0000, token acc: 50.0%", timed=False)  # a jump
    jumped = console.bar
    assert jumped is not first and (jumped.n, jumped.initial, jumped.postfix) == (4, 4, "loss: 4.0000, token acc: 50.0%")
    console.move_bar("GRPO Task 0 (airline)", 5, 10, "loss: 0.1000, reward: 1.000, kl: 0.0000")  # a new phase
    assert console.bar is not jumped and (console.bar.desc, console.bar.n, console.bar.initial) == ("GRPO Task 0 (airline)", 5, 5)
    assert not first.leave and not jumped.leave  # a replaced bar is cleared, not kept on a line of its own
    console.close()


def test_a_relabelled_bar_takes_the_old_bars_line():
    stream = io.StringIO()
    console = ConsoleWriter(stream)
    console.open_bar("SFT Task 0 (airline)", total=4, initial=0, timed=False)
    console.move_bar("SFT Task 0 (airline)", 1, 4, "loss: 8.0000, token acc: 0.0%", timed=False)
    console.relabel_bar("GRPO Task 0 (airline)", 1, 4)
    console.close()
    out = stream.getvalue()
    assert "\n" not in out.rstrip("\n") and out.endswith("\n")  # one line, redrawn with \r, ended once
    assert re.search(r"\rGRPO Task 0 \(airline\):  25%\|.*\| 1/4 \[\d\d:\d\d<\?\]\n$", out)


def test_the_eval_bar_counts_episodes_restarts_at_zero_and_closes_when_done():
    stream = io.StringIO()
    console = ConsoleWriter(stream)
    console.show_eval_progress("Eval airline (before_training)", 0, 4)
    console.show_eval_progress("Eval airline (before_training)", 3, 4)
    assert console.eval_bar.n == 3
    console.show_eval_progress("Eval retail (before_training)", 0, 2)  # a new evaluation: a new bar
    assert (console.eval_bar.n, console.eval_bar.total) == (0, 2)
    console.show_eval_progress("Eval retail (before_training)", 2, 2)
    assert console.eval_bar is None
    assert "Eval airline (before_training)" in stream.getvalue() and "3/4 episodes" in stream.getvalue()


# ---------------------------------------------------------------- wandb


class FakeRun:
    id = "run42"

    def __init__(self):
        self.logged: list[tuple[dict, int]] = []
        self.summary: dict = {}
        self.finished = False

    def log(self, data, step=None):
        self.logged.append((data, step))

    def finish(self):
        self.finished = True


def test_namespaced_numbers_keep_only_numbers():
    figures = {"loss": 2.5, "num_tokens": 12, "tool_accuracy": None, "strategy": "ewc", "seen": ["airline"]}
    assert namespaced_numbers("train", figures) == {"train/loss": 2.5, "train/num_tokens": 12}


def test_the_wandb_writer_logs_namespaced_numbers_at_the_given_step_and_finishes_the_run():
    run = FakeRun()
    writer = WandbWriter(run)
    writer.write_record("eval/airline", {"reward_mean": 0.5, "tool_accuracy": None}, 7)
    writer.write_summary("final", {"forgetting": 0.25, "forward_transfer": None})
    writer.close()
    assert writer.run_id == "run42"
    assert run.logged == [({"eval/airline/reward_mean": 0.5}, 7)]
    assert run.summary == {"final/forgetting": 0.25}
    assert run.finished


def test_the_wandb_stand_in_takes_every_call_of_the_writer_and_records_nothing():
    def public(cls):
        return {name: inspect.signature(fn) for name, fn in vars(cls).items() if inspect.isfunction(fn)
                and not name.startswith("_")}

    assert public(NullWandbWriter) == public(WandbWriter)  # a caller never needs to know which it has
    writer = NullWandbWriter()
    writer.write_record("train", {"loss": 1.0}, 1)
    writer.write_summary("final", {"forgetting": 0.0})
    writer.close()
    assert writer.run_id is None and vars(writer) == {}


def test_open_wandb_starts_a_resumable_run_under_the_log_dir(tmp_path, monkeypatch):
    started = []
    fake = types.SimpleNamespace(init=lambda **kwargs: started.append(kwargs) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    writer = open_wandb("proj", "name", "abc", {"seed": 0}, str(tmp_path))
    assert started == [{"project": "proj", "name": "name", "id": "abc", "resume": "allow",
                        "config": {"seed": 0}, "dir": str(tmp_path)}]
    assert writer.run_id == "run42"


def test_open_wandb_without_wandb_installed_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(UserError, match="wandb is not installed"):
        open_wandb("proj", None, None, {}, str(tmp_path))
