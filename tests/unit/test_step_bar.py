"""The step bar of a domain: its supervised steps then its GRPO steps, the phase in its label, the last
step's figures after it; where a resumed run starts it; and when a run draws a bar at all."""

from __future__ import annotations

import io
import re
import types

from tau2cl.reporting.tracker import MetricsTracker, is_terminal
from tau2cl.reporting.writers.console import BAR_FORMAT, UNTIMED_BAR_FORMAT

GRPO_STATS = {"loss": 2.1234, "reward_mean": 0.456, "reward_std": 0.12, "kl": 0.0123}


def sft_stats(step: int) -> dict:
    """Made-up figures of supervised step `step`: the loss halves and the accuracy grows 20 points a step."""
    return {"loss": 8.0 / 2**step, "token_accuracy": 0.2 * step, "time_step": 0.5}


class TerminalStream(io.StringIO):
    """A console stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def make_tracker(tmp_path, stream=None, **kwargs) -> tuple[MetricsTracker, io.StringIO]:
    stream = io.StringIO() if stream is None else stream
    kwargs.setdefault("use_progress_bar", True)
    tracker = MetricsTracker(str(tmp_path / "run"), {}, stream=stream, **kwargs)
    return tracker, stream


def bar_state(tracker: MetricsTracker) -> tuple[str, int, int, str]:
    """(label, steps counted, total, figures) of the live step bar."""
    bar = tracker._console.bar
    return bar.desc, bar.n, bar.total, bar.postfix


def test_the_bar_counts_the_supervised_steps_then_the_grpo_steps(tmp_path):
    tracker, _ = make_tracker(tmp_path, sft_steps=3)
    tracker.start_domain(0, "airline", 80, num_steps=2)
    assert bar_state(tracker)[:3] == ("SFT Task 0 (airline)", 0, 5)
    seen = []
    for step in (1, 2, 3):
        tracker.log_sft(0, "airline", step, 3, 0, sft_stats(step))
        seen.append(bar_state(tracker))
    assert seen == [
        ("SFT Task 0 (airline)", 1, 5, "loss: 4.0000, token acc: 20.0%"),
        ("SFT Task 0 (airline)", 2, 5, "loss: 2.0000, token acc: 40.0%"),
        ("GRPO Task 0 (airline)", 3, 5, None),  # the last supervised step hands the bar to GRPO
    ]
    tracker.log_train(0, "airline", 1, 1, GRPO_STATS)
    assert bar_state(tracker) == ("GRPO Task 0 (airline)", 4, 5, "loss: 2.1234, reward: 0.456, kl: 0.0123")
    tracker.log_train(0, "airline", 2, 2, GRPO_STATS)
    assert tracker._console.bar is None  # full: closed, so the domain's [EVAL] prints below it
    tracker.close()


def test_the_warm_start_shows_no_remaining_time_and_grpo_does(tmp_path):
    tracker, _ = make_tracker(tmp_path, sft_steps=2)
    tracker.start_domain(1, "retail", 60, num_steps=4)
    tracker.log_sft(1, "retail", 1, 2, 0, sft_stats(1))
    bar = tracker._console.bar
    assert bar.bar_format == UNTIMED_BAR_FORMAT
    assert re.fullmatch(
        r"SFT Task 1 \(retail\):  17%\|.*\| 1/6 \[\d\d:\d\d, loss: 4\.0000, token acc: 20\.0%\]", str(bar)
    )
    tracker.log_sft(1, "retail", 2, 2, 0, sft_stats(2))
    tracker.log_train(1, "retail", 1, 1, GRPO_STATS)
    bar = tracker._console.bar
    assert bar.bar_format == BAR_FORMAT
    assert re.fullmatch(
        r"GRPO Task 1 \(retail\):  50%\|.*\| 3/6 \[\d\d:\d\d<\d\d:\d\d, loss: 2\.1234, reward: 0\.456, kl: 0\.0123\]",
        str(bar),
    )
    tracker.close()


def test_a_resumed_domain_starts_the_bar_from_the_steps_already_done(tmp_path):
    tracker, _ = make_tracker(tmp_path, sft_steps=60)
    tracker.start_domain(2, "telecom", 10, num_steps=100, start_step=7)  # after the warm start
    assert bar_state(tracker)[:3] == ("GRPO Task 2 (telecom)", 67, 160)
    tracker.start_domain(2, "telecom", 10, num_steps=100, sft_step=25)  # in the warm start
    assert bar_state(tracker)[:3] == ("SFT Task 2 (telecom)", 25, 160)
    tracker.close()


def test_the_bar_catches_up_with_steps_it_did_not_see(tmp_path):
    tracker, _ = make_tracker(tmp_path, sft_steps=60)
    tracker.start_domain(0, "airline", 80, num_steps=100)  # resumed mid-warm-start, not told where
    tracker.log_sft(0, "airline", 26, 60, 0, sft_stats(1))
    assert bar_state(tracker)[:3] == ("SFT Task 0 (airline)", 26, 160)
    assert tracker._console.bar.initial == 26  # its rate counts only the steps it sees
    tracker.start_domain(1, "retail", 60, num_steps=100)  # a warm start skipped (no demonstration)
    tracker.log_train(1, "retail", 1, 101, GRPO_STATS)
    assert bar_state(tracker)[:3] == ("GRPO Task 1 (retail)", 61, 160)
    tracker.close()


def test_without_a_warm_start_the_bar_counts_grpo_steps_only(tmp_path):
    tracker, stream = make_tracker(tmp_path)
    tracker.start_domain(0, "airline", 80, num_steps=2)
    tracker.log_train(0, "airline", 1, 1, GRPO_STATS)
    assert bar_state(tracker)[:3] == ("GRPO Task 0 (airline)", 1, 2)
    tracker.log_train(0, "airline", 2, 2, GRPO_STATS)
    tracker.close()
    assert re.search(r"GRPO Task 0 \(airline\): 100%\|.*\| 2/2 \[", stream.getvalue())


def test_a_domain_of_supervised_steps_only_ends_its_bar_full(tmp_path):
    tracker, stream = make_tracker(tmp_path, sft_steps=2)
    tracker.start_domain(0, "airline", 80, num_steps=0)
    tracker.log_sft(0, "airline", 1, 2, 0, sft_stats(1))
    tracker.log_sft(0, "airline", 2, 2, 0, sft_stats(2))
    assert tracker._console.bar is None
    tracker.close()
    assert re.search(r"SFT Task 0 \(airline\): 100%\|.*\| 2/2 \[\d\d:\d\d, loss: 2\.0000, token acc: 40\.0%\]\n",
                     stream.getvalue())
    assert "GRPO" not in stream.getvalue()


def test_the_sft_lines_are_printed_with_or_without_the_bar(tmp_path):
    outputs = []
    for use_progress_bar in (True, False):
        tracker, stream = make_tracker(tmp_path / str(use_progress_bar), sft_steps=2, log_interval=1,
                                       use_progress_bar=use_progress_bar)
        tracker.start_domain(0, "airline", 80, num_steps=1)
        for step in (1, 2):
            tracker.log_sft(0, "airline", step, 2, 0, sft_stats(step))
        tracker.close()
        outputs.append(re.split(r"[\r\n]", stream.getvalue()))
    line = "[SFT] Task 0 Step 2/2 | loss: 2.0000 | token acc: 40.0% | 0.5s"
    assert all(line in segments for segments in outputs)


# ---------------------------------------------------------------- when there is a bar


def test_by_default_a_bar_is_drawn_on_a_terminal_and_lines_are_printed_elsewhere(tmp_path):
    on_terminal, _ = make_tracker(tmp_path / "tty", TerminalStream(), use_progress_bar=None)
    in_a_file, stream = make_tracker(tmp_path / "file", use_progress_bar=None)
    assert (on_terminal.use_progress_bar, in_a_file.use_progress_bar) == (True, False)
    in_a_file.start_domain(0, "airline", 80, num_steps=1)
    in_a_file.log_train(0, "airline", 1, 1, GRPO_STATS)
    in_a_file.close()
    on_terminal.close()
    assert "\r" not in stream.getvalue()
    assert "[TRAIN] Task 0 Step 1/1 | loss: 2.1234 | reward: 0.456±0.120 | kl: 0.0123" in stream.getvalue()


def test_a_flag_given_decides_whatever_the_stream(tmp_path):
    forced, stream = make_tracker(tmp_path / "on", use_progress_bar=True)
    refused, _ = make_tracker(tmp_path / "off", TerminalStream(), use_progress_bar=False)
    assert (forced.use_progress_bar, refused.use_progress_bar) == (True, False)
    forced.close()
    refused.close()


def test_is_terminal_reads_the_stream_and_survives_one_without_isatty(tmp_path):
    assert is_terminal(TerminalStream()) and not is_terminal(io.StringIO())
    assert not is_terminal(types.SimpleNamespace())  # no isatty at all
    closed = io.StringIO()
    closed.close()
    assert not is_terminal(closed)  # isatty on a closed stream raises ValueError
    with open(tmp_path / "log.txt", "w") as f:
        assert not is_terminal(f)


def test_from_config_takes_the_warm_start_length_and_the_tri_state_flag(tmp_path):
    config = types.SimpleNamespace(
        log_dir=str(tmp_path / "run"), use_progress_bar=None, sft_steps_per_task=60, log_interval=10,
        verbose=False, wandb_project=None, wandb_run_name=None, to_dict=lambda: {},
    )
    tracker = MetricsTracker.from_config(config, is_main=True, stream=TerminalStream())
    assert (tracker.use_progress_bar, tracker.sft_steps) == (True, 60)
    tracker.close()


def test_the_flag_has_three_values_from_the_command_line_and_config_files(tmp_path):
    from tau2cl.config import RESUME_MAY_CHANGE, parse_config

    assert parse_config([]).use_progress_bar is None
    assert (parse_config(["--use_progress_bar"]).use_progress_bar,
            parse_config(["--no-use_progress_bar"]).use_progress_bar) == (True, False)
    path = tmp_path / "run.yaml"
    for text, value in (("true", True), ("false", False), ("none", None), ("null", None)):
        path.write_text(f"use_progress_bar: {text}\n")
        assert parse_config(["--config", str(path)]).use_progress_bar is value
    path.write_text("use_progress_bar: true\n")
    assert parse_config(["--config", str(path), "--no-use_progress_bar"]).use_progress_bar is False
    assert "use_progress_bar" in RESUME_MAY_CHANGE  # a resumed run may draw it or not
