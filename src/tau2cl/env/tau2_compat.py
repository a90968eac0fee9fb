"""The one door to tau2-bench: import it quietly and read its results in any shape.

Importing tau2 makes litellm fetch a model price list over the network and makes tau2 log through
loguru at import time. Everything in tau2cl imports tau2 through this module so that both are
handled once, before the first tau2 import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from loguru import logger as _loguru  # noqa: E402

_loguru.remove()  # tau2 logs nothing unless set_tau2_verbosity(True) routes it
_handler_id: int | None = None


def set_tau2_verbosity(verbose: bool) -> None:
    """Route tau2's loguru records to stderr (warnings and up) when verbose, else drop them.

    Also quiets transformers' loading/saving progress bars and info logs unless verbose.
    """
    global _handler_id
    from transformers.utils import logging as hf_logging

    if verbose:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_warning()
    else:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    if _handler_id is not None:
        _loguru.remove(_handler_id)
        _handler_id = None
    if verbose:
        _handler_id = _loguru.add(sys.stderr, level="WARNING")


def as_list(value: Any) -> list:
    """Accept tau2 returns that are lists, dicts of items, single items or None; give a list.

    tau2 returns some collections as dicts keyed by name and others as lists depending on the
    call and version; consumers must not assume one shape (`.values()` on a list is an
    AttributeError).
    """
    if value is None:
        return []
    if isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, (str, bytes)):
        return [value]
    if isinstance(value, Iterable):
        return list(value)
    return [value]
