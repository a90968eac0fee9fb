"""What a resumed run may change: the flags in RESUME_MAY_CHANGE; any other difference is refused.

A checkpoint's state (weights, optimizer, schedule, strategy state, random streams, accuracy matrix)
only means something under the config that produced it, so a resume under another learning rate,
strategy, seed or batch would silently train something else while summary.json claimed the new
values. The comparison is pure: saved and current config dicts in, the differing flags out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], may_change: Iterable[str], defaults: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """(flag, saved value, current value) for every flag that differs and may not change.

    A flag missing from the saved config (a checkpoint older than the flag) counts as its default;
    a saved flag the current config no longer has is ignored.
    """
    allowed = set(may_change)
    out = []
    for name, value in current.items():
        if name in allowed:
            continue
        before = saved.get(name, defaults.get(name))
        if before != value:
            out.append((name, before, value))
    return out


def refusal(checkpoint: str, differences: list[tuple[str, Any, Any]]) -> str:
    """One sentence naming every differing flag with both values."""
    parts = "; ".join(f"--{name} {_show(old)} (now {_show(new)})" for name, old, new in differences)
    return (
        f"cannot resume from '{checkpoint}': it was trained with {parts}; resume with the saved values, "
        "or start a new run in another --log_dir."
    )


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)
