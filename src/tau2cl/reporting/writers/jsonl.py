"""metrics.jsonl: one JSON object per line, appended as the run goes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def json_default(value: Any) -> Any:
    """json's fallback: numpy scalars and 0-d tensors become Python numbers, arrays lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class JsonlWriter:
    """Appends records to a .jsonl file, line-buffered: a crash loses no finished record.

    Non-finite floats are written as json writes them (NaN, Infinity), so a diverged step still
    leaves its line.
    """

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # a resumed run adds to it

    def write_record(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record, default=json_default) + "\n")

    def close(self) -> None:
        self._file.close()
