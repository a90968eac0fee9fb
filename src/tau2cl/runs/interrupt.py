"""Ctrl-C and scheduler preemption (SIGINT, SIGTERM) become a stop at the next step boundary.

The first signal only sets a flag; the trainer checks it between steps (all ranks agree through
one all-reduce), saves a checkpoint and exits. A second signal exits at once.
"""

from __future__ import annotations

import os
import signal
import threading

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Raised after the checkpoint of an interrupted run is saved."""

    def __init__(self, signum: int, checkpoint: str, where: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.where = where

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Holds the first stop signal received; a second one ends the process immediately."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
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
