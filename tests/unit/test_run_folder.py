"""A log_dir holds one run: refused when it holds another's files, locked while a run lives."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tau2cl.errors import UserError
from tau2cl.runs.run_folder import RunLock, guard_log_dir, run_files, tidy_checkpoint_temporaries


def _old_run(folder):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("{}\n")
    (folder / "checkpoint_task_0").mkdir()
    (folder / "notes.txt").write_text("mine")  # not a run file: never touched


def test_a_folder_with_another_runs_files_is_refused_with_both_ways_out(tmp_path):
    _old_run(tmp_path / "run")
    with pytest.raises(UserError) as error:
        guard_log_dir(str(tmp_path / "run"), None, overwrite=False)
    message = str(error.value)
    assert "--resume_from" in message and "--overwrite_log_dir" in message and "\n" not in message
    guard_log_dir(str(tmp_path / "fresh"), None, overwrite=False)  # a new folder is fine


def test_overwrite_clears_only_the_run_files_and_resuming_inside_is_allowed(tmp_path):
    run = tmp_path / "run"
    _old_run(run)
    guard_log_dir(str(run), str(run / "checkpoint_task_0"), overwrite=False)  # resuming its own run
    with pytest.raises(UserError, match="would delete the checkpoint"):
        guard_log_dir(str(run), str(run), overwrite=True)
    guard_log_dir(str(run), None, overwrite=True)
    assert run_files(run) == [] and (run / "notes.txt").read_text() == "mine"


def test_resuming_from_elsewhere_into_a_used_folder_is_refused(tmp_path):
    _old_run(tmp_path / "run")
    with pytest.raises(UserError, match="already holds a run"):
        guard_log_dir(str(tmp_path / "run"), str(tmp_path / "other"), overwrite=False)


HOLD = "import sys, time; from tau2cl.runs.run_folder import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def test_a_live_run_holds_the_folder_and_a_dead_ones_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as error:
            RunLock(tmp_path).acquire()
        assert f"pid {holder.pid}" in str(error.value) and "in use by a live run" in str(error.value)
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path)  # the lock file is still there, its holder is dead: taken over
    lock.acquire()
    assert (tmp_path / ".tau2cl.lock").read_text().startswith(f"pid {__import__('os').getpid()}")
    with pytest.raises(UserError):
        RunLock(tmp_path).acquire()  # and now held by this process
    lock.release()
    RunLock(tmp_path).acquire()


def test_leftovers_of_a_killed_save_are_finished_or_removed(tmp_path):
    (tmp_path / "checkpoint_step_4.tmp").mkdir()  # a save that never finished
    (tmp_path / "checkpoint_step_2.old").mkdir()  # killed between the two renames: the only copy
    (tmp_path / "checkpoint_step_2.old" / "x").write_text("kept")
    (tmp_path / "checkpoint_task_0").mkdir()
    (tmp_path / "checkpoint_task_0.old").mkdir()  # superseded copy
    done = tidy_checkpoint_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_step_2", "checkpoint_task_0"]
    assert (tmp_path / "checkpoint_step_2" / "x").read_text() == "kept"
    assert len(done) == 3
