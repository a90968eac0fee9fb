"""Evaluations show their episodes as they finish: a bar on rank 0, or compact lines without it."""

from __future__ import annotations

import io

from tau2cl.reporting.tracker import MetricsTracker


def _tracker(tmp_path, **kwargs):
    stream = io.StringIO()
    return MetricsTracker(str(tmp_path / "run"), {}, stream=stream, **kwargs), stream


def test_compact_lines_announce_the_evaluation_before_its_first_episode(tmp_path):
    tracker, stream = _tracker(tmp_path, use_progress_bar=False)
    for done in (0, 4, 6):
        tracker.eval_progress("before_training", "airline", done, 6)
    tracker.close()
    assert stream.getvalue().splitlines() == [
        "[EVAL] airline (before_training): 0/6 episodes",
        "[EVAL] airline (before_training): 4/6 episodes",
        "[EVAL] airline (before_training): 6/6 episodes",
    ]
    assert "[EVAL] airline (before_training): 0/6 episodes" in (tmp_path / "run" / "train.log").read_text()


def test_the_bar_counts_episodes_and_closes_itself_at_the_end(tmp_path):
    tracker, stream = _tracker(tmp_path, use_progress_bar=True)
    tracker.eval_progress("after_task0", "retail", 0, 4)
    tracker.eval_progress("after_task0", "retail", 2, 4)
    assert tracker._console.eval_bar is not None and tracker._console.eval_bar.n == 2
    tracker.eval_progress("after_task0", "retail", 4, 4)
    assert tracker._console.eval_bar is None
    assert "Eval retail (after_task0)" in stream.getvalue() and "2/4 episodes" in stream.getvalue()
    tracker.close()


def test_other_ranks_show_nothing(tmp_path):
    tracker, stream = _tracker(tmp_path, use_progress_bar=False, is_main=False)
    tracker.eval_progress("before_training", "airline", 0, 6)
    assert stream.getvalue() == ""
