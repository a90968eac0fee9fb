"""What a run's start decides from its files alone: a held or used log_dir, a resume its checkpoint's
flags refuse, a resume with nothing left to do; and the hub probe's name lookup, bounded in time."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest

from tau2cl.agent.model_source import reachable, resolve_within
from tau2cl.config import RESUME_MAY_CHANGE, GRPOConfig
from tau2cl.errors import UserError
from tau2cl.runs.checkpoint_files import read_listed_json, sha256_of
from tau2cl.runs.preflight import check_log_dir, check_resume, nothing_left, saved_run

DEFAULTS = GRPOConfig().to_dict()


def _checkpoint(folder, progress: dict, config: dict | None, manifest: bool = True):
    """A checkpoint folder as the start of a run reads it: progress.json, run_config.json, the manifest."""
    folder.mkdir(parents=True)
    (folder / "trainer_state.pt").write_bytes(b"not read here")
    (folder / "progress.json").write_text(json.dumps(progress))
    if config is not None:
        (folder / "run_config.json").write_text(json.dumps(config))
    if manifest:
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)} for p in folder.iterdir()}
        (folder / "manifest.json").write_text(json.dumps({"files": files}))
    return folder


def _config(**fields) -> dict:
    return GRPOConfig(model_name_or_path="tiny", task_order=["airline", "retail"], **fields).to_dict()


# ---- the log_dir -----------------------------------------------------------------------------
def test_a_used_log_dir_is_refused_and_a_new_one_is_not_created(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match=r"^log_dir '.*used' already holds a run \(metrics\.jsonl\); continue it"):
        check_log_dir(str(used), None, overwrite=False)
    check_log_dir(str(used), str(used), overwrite=False)  # resuming its own run
    check_log_dir(str(used), None, overwrite=True)  # cleared later, by the trainer, not here
    assert (used / "metrics.jsonl").exists()
    check_log_dir(str(tmp_path / "new"), None, overwrite=False)
    assert not (tmp_path / "new").exists()


def test_a_log_dir_under_a_file_is_refused_before_anything_is_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for log_dir in (blocker, blocker / "run", blocker / "run" / "deeper"):
        with pytest.raises(UserError, match=f"cannot write to log_dir '{log_dir}' \\(Not a directory\\)"):
            check_log_dir(str(log_dir), None, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and blocker.read_text() == ""
    check_log_dir(str(tmp_path / "new" / "run"), None, False)  # a new folder under a writable one
    assert not (tmp_path / "new").exists()


def test_overwriting_the_checkpoint_a_resume_names_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="would delete the checkpoint that --resume_from names"):
        check_log_dir(str(tmp_path), str(tmp_path / "checkpoint_task_0"), overwrite=True)


HOLD = "import sys, time; from tau2cl.runs.run_folder import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def test_a_log_dir_held_by_a_live_run_is_refused_and_free_once_it_ends(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by a live run \(pid {holder.pid} on "):
            check_log_dir(str(tmp_path), None, overwrite=False)
    finally:
        holder.kill()
        holder.wait()
    check_log_dir(str(tmp_path), None, overwrite=False)
    check_log_dir(str(tmp_path), None, overwrite=False)  # the check let go of the lock it took


# ---- a resume's checkpoint -------------------------------------------------------------------
def test_the_latest_complete_checkpoint_is_read_and_an_unfinished_save_skipped(tmp_path):
    _checkpoint(tmp_path / "checkpoint_task_0", {"global_step": 2, "stages_done": 2}, _config(seed=1))
    _checkpoint(tmp_path / "checkpoint_step_3", {"global_step": 3, "stages_done": 2}, _config(seed=2), manifest=False)
    saved = saved_run(str(tmp_path))
    assert saved.checkpoint == tmp_path / "checkpoint_task_0"
    assert saved.config["seed"] == 1 and saved.progress == {"global_step": 2, "stages_done": 2}
    assert saved_run(str(tmp_path / "checkpoint_task_0")).checkpoint == tmp_path / "checkpoint_task_0"


def test_a_path_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"^no checkpoint found at '.*'"):
        saved_run(str(tmp_path))


def test_a_changed_flag_is_refused_with_both_values_and_an_allowed_one_is_not(tmp_path):
    saved = saved_run(str(_checkpoint(tmp_path / "c", {"stages_done": 1}, _config(learning_rate=1e-5))))
    current = _config(learning_rate=3e-5, log_interval=7)  # log_interval may change on a resume
    with pytest.raises(UserError) as error:
        check_resume(saved, current, RESUME_MAY_CHANGE, DEFAULTS)
    assert str(error.value).startswith(f"cannot resume from '{tmp_path / 'c'}': it was trained with --learning_rate 1e-05 (now 3e-05);")
    assert "log_interval" not in str(error.value)
    check_resume(saved, _config(learning_rate=1e-5, log_interval=7), RESUME_MAY_CHANGE, DEFAULTS)


def test_a_checkpoint_without_its_flags_or_with_changed_ones_is_left_to_the_full_check(tmp_path):
    old = saved_run(str(_checkpoint(tmp_path / "old", {"stages_done": 3}, None)))
    assert old.config is None and nothing_left(old) is None
    check_resume(old, _config(learning_rate=3e-5), RESUME_MAY_CHANGE, DEFAULTS)  # no refusal from here
    edited = _checkpoint(tmp_path / "edited", {"stages_done": 1}, _config())
    (edited / "run_config.json").write_text(json.dumps(_config(seed=9)))  # differs from its manifest
    assert read_listed_json(edited, "run_config.json") is None and saved_run(str(edited)).config is None
    assert read_listed_json(edited, "progress.json") == {"stages_done": 1}


def test_nothing_is_left_once_every_row_of_the_matrix_is_filled(tmp_path):
    finished = saved_run(str(_checkpoint(tmp_path / "a" / "checkpoint_task_1", {"stages_done": 3}, _config())))
    assert nothing_left(finished) == (
        f"nothing left to do: checkpoint '{tmp_path / 'a' / 'checkpoint_task_1'}' is the end of its run (every "
        f"domain trained and evaluated: airline, retail); its results are in '{tmp_path / 'a'}'."
    )
    (tmp_path / "a" / "checkpoint_task_1" / "trainer_state.pt").write_bytes(b"damaged")
    assert nothing_left(finished) is None  # the resume falls back to the checkpoint before it
    # two domains: rows 0 (before training), 1 and 2; after the first domain one row is still missing
    halfway = saved_run(str(_checkpoint(tmp_path / "b" / "checkpoint_task_0", {"stages_done": 2}, _config())))
    assert nothing_left(halfway) is None


# ---- the hub probe's name lookup -------------------------------------------------------------
def test_a_name_lookup_that_hangs_is_given_up_at_its_deadline():
    release = threading.Event()

    def hanging(host, port, **kwargs):
        release.wait(30)  # a resolver with no DNS server to answer
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    try:
        assert resolve_within("huggingface.co", 443, 0.2, hanging) is None
        assert reachable("huggingface.co", 443, 0.2, hanging) is False
    finally:
        release.set()


def test_the_probe_connects_to_what_the_lookup_returns_and_a_failed_lookup_is_unreachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def local(host, port, **kwargs):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

        def unknown(host, port, **kwargs):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        assert resolve_within("hub.example", port, 2.0, local) == local("hub.example", port)
        assert reachable("hub.example", port, 2.0, local) is True
        assert resolve_within("hub.example", port, 2.0, unknown) is None
        assert reachable("hub.example", port, 2.0, unknown) is False
