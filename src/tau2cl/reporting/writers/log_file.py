"""train.log: every console line, and the compact train lines the bar stands in for."""

from __future__ import annotations


class LogFileWriter:
    """Appends lines to a text file, line-buffered: a crash loses no finished line."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # a resumed run adds to it

    def write_line(self, text: str) -> None:
        self._file.write(text + "\n")

    def close(self) -> None:
        self._file.close()
