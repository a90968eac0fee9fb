"""Errors a user can cause, and the one place that turns them into an exit code.

A bad flag, an unknown domain or a missing model is the user's to fix, so it ends with one clear
sentence on stderr and a non-zero exit, never a traceback. Bugs still raise normally so that they
show their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Callable

EXIT_USER_ERROR = 2  # the code argparse uses for its own usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class UserError(Exception):
    """Something the user can fix; str(error) is one sentence that says how."""


def run_guarded(command: Callable[[], int | None]) -> int:
    """Run a command; report a UserError or Ctrl-C as one line and return its exit code."""
    try:
        return command() or 0
    except UserError as error:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
            print(f"tau2cl: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("tau2cl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are UserErrors: one line, no usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see '{self.prog} --help').")
