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


def test_the_acknowledgement_clears_a_terminal_line_first_and_nothing_else(monkeypatch):
    written = []
    monkeypatch.setattr(interrupt, "line_start", lambda fd: interrupt.CLEAR_LINE if fd == 2 else b"?")
    monkeypatch.setattr(interrupt.os, "write", lambda fd, data: written.append((fd, data)) or len(data))
    request = SignalWatch()
    request.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        request.uninstall()
    ack = interrupt.acknowledgement(signal.SIGTERM).encode()
    assert written == [(2, b"\r\x1b[K" + ack + b"\n")]  # a bar on the cursor's line gives the line up


def test_the_line_is_cleared_on_a_terminal_only():
    main, follower = os.openpty()
    read, write = os.pipe()
    try:
        assert interrupt.line_start(follower) == b"\r\x1b[K"
        assert interrupt.line_start(write) == b""  # a pipe or a file (a scheduler's log) stays clean
    finally:
        for fd in (main, follower, read, write):
            os.close(fd)
    assert interrupt.line_start(write) == b""  # a closed descriptor: nothing either
