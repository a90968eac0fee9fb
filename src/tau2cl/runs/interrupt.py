"""Ctrl-C and scheduler preemption (SIGINT, SIGTERM) become a stop within seconds, wherever the run is.

The first signal sets a flag and prints one line (rank 0) saying what will happen. Work that
touches no other process (rollouts, reward calls, the episodes of an evaluation, a Fisher's
rollouts) checks the flag between turns and gives up at once (`LocalStop`); it runs inside
`agreed`, which then gathers every rank's outcome, so all ranks leave the phase together
(`AllRanksStop`) and save the checkpoint of the last boundary. Between steps the trainer also checks the
flag with one all-reduce. A second signal exits at once, without saving.

A UserError raised inside such work (a custom reward function that fails, a task that needs a
judge) takes the same path: all ranks stop, the boundary checkpoint is saved, one line says why.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

from tau2cl.distributed import all_gather_objects
from tau2cl.errors import UserError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CLEAR_LINE = b"\r\x1b[K"  # back to the line's start, then erase it (a terminal's control codes)
T = TypeVar("T")


class LocalStop(Exception):
    """One rank's rank-local work gives up at a safe point: a stop signal has arrived."""


class AllRanksStop(Exception):
    """Every rank leaves the current phase together: a stop signal (`signum`) or a fault (`reason`)."""

    def __init__(self, signum: int | None, reason: str | None):
        super().__init__(reason or f"signal {signum}")
        self.signum = signum
        self.reason = reason


def agreed(work: Callable[[], T]) -> T:
    """Run rank-local `work` (no collectives inside); then all ranks agree whether to go on.

    One all-gather of a small object per call: if any rank was stopped by a signal or failed with a
    UserError, every rank raises the same AllRanksStop (a fault's message wins over a signal).
    """
    outcome: tuple[str, object] | None = None
    result = None
    try:
        result = work()
    except LocalStop as stop:
        outcome = ("signal", stop.args[0])
    except UserError as error:
        outcome = ("fault", str(error))
    outcomes = [o for o in all_gather_objects(outcome) if o is not None]
    faults = [detail for kind, detail in outcomes if kind == "fault"]
    if faults:
        raise AllRanksStop(None, str(faults[0]))
    if outcomes:
        raise AllRanksStop(int(outcomes[0][1]), None)
    return result  # type: ignore[return-value]


class StoppedWithCheckpoint(Exception):
    """The run ends after a stop signal, its checkpoint saved: the exit status and the resume line."""

    def __init__(self, signum: int, checkpoint: str, where: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.where = where

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalWatch:
    """Watches for SIGINT/SIGTERM: holds the first one received; a second ends the process at once."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce  # print the one acknowledgement line (rank 0 only)
        self._line_start = b""  # what the acknowledgement starts with, chosen at install
        self._previous: dict[int, object] = {}

    def check(self) -> None:
        """Raise LocalStop once a stop signal has arrived (called at safe points of rank-local work)."""
        if self.signum is not None:
            raise LocalStop(self.signum)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._line_start = line_start(2)
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)  # second signal: no checkpoint, no cleanup
        self.signum = signum
        if self.announce:  # os.write: safe inside a signal handler, unlike print
            os.write(2, self._line_start + acknowledgement(signum).encode() + b"\n")


def line_start(fd: int) -> bytes:
    """The acknowledgement's start on `fd`. On a terminal the cursor may sit at the end of a progress
    bar (or of the ^C the terminal echoed): the line is cleared so the message has it alone, and the
    bar is redrawn below at its next step. In a file or a pipe: nothing."""
    try:
        return CLEAR_LINE if os.isatty(fd) else b""
    except OSError:
        return b""


def acknowledgement(signum: int) -> str:
    """The line printed as soon as the first stop signal arrives."""
    return (
        f"tau2cl: {signal.Signals(signum).name} received: stopping within seconds at the next safe point "
        "and saving a checkpoint to resume from (send it again to exit at once without saving)."
    )
