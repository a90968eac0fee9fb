"""summary.json: the run's latest summary, replaced whole each time it is written."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from tau2cl.reporting.writers.jsonl import json_default


class SummaryFileWriter:
    """Writes a JSON file atomically (a temporary file, then a rename): no reader sees half of it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write_record(self, summary: Mapping[str, Any]) -> None:
        tmp_path = f"{self.path}.tmp"
        with open(tmp_path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=json_default)
            f.write("\n")
        os.replace(tmp_path, self.path)

    def close(self) -> None:
        """Nothing stays open between writes."""
