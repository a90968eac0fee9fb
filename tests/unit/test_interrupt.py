"""The first stop signal is a request; a second one ends the process at once."""

from __future__ import annotations

import os
import signal

import tau2cl.runs.interrupt as interrupt
from tau2cl.runs.interrupt import SignalWatch, StoppedWithCheckpoint


def test_first_signal_is_recorded_second_exits_immediately(monkeypatch):
    exits = []
    monkeypatch.setattr(interrupt.os, "_exit", lambda code: exits.append(code))
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN in a background job
    request = SignalWatch()
    request.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # handled, not a KeyboardInterrupt
        assert request.signum == signal.SIGINT and exits == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits == [128 + signal.SIGTERM]
    finally:
        request.uninstall()
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the handlers found are put back


def test_interrupted_run_reports_where_and_the_shell_exit_code():
    stop = StoppedWithCheckpoint(signal.SIGTERM, "runs/x/checkpoint_step_5", "at Task 1 (retail) step 2/3")
    assert stop.exit_code == 143
    assert str(stop) == "stopped by SIGTERM at Task 1 (retail) step 2/3"
