"""Line reading shared by the file-based sources: line numbers, UTF-8 checks and a bad-line budget."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from data_shards.problems import DataError, ProblemLog

# A source tolerates a few malformed lines (skipped and counted); more than this fraction means the
# file is not what we think it is, and we stop rather than build a dataset from the remains.
MAX_BAD_LINE_FRACTION = 0.01


def read_lines(path: Path, problems: ProblemLog, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text without newline). Non-UTF-8 bytes are replaced and counted."""
    with open(path, "rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                           desc=f"reading {path.name}", leave=False) as bar:
        for number, raw in enumerate(handle, start=1):
            bar.update(len(raw))
            raw = raw.rstrip(b"\r\n")
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as err:
                problems.skip("text_not_utf8_replaced", f"{path}:{number}", str(err))
                text = raw.decode(encoding, errors="replace")
            yield number, text


class BadLineBudget:
    """Counts malformed lines of one file and stops once they exceed MAX_BAD_LINE_FRACTION."""

    def __init__(self, path: Path, problems: ProblemLog, kind: str) -> None:
        self.path, self.problems, self.kind = path, problems, kind
        self.lines = 0
        self.bad = 0

    def over(self, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
        """The non-blank lines, counted; once they run out, stop if too many were bad."""
        for number, line in lines:
            if line.strip():
                self.lines += 1
                yield number, line
        self.check()

    def bad_line(self, number: int, reason: str) -> None:
        self.bad += 1
        self.problems.skip(self.kind, f"{self.path}:{number}", reason)

    def check(self) -> None:
        if self.lines == 0:
            raise DataError(f"{self.path}: no data lines")
        if self.bad > MAX_BAD_LINE_FRACTION * self.lines:
            examples = "; ".join(self.problems.examples.get(self.kind, []))
            raise DataError(f"{self.path}: {self.bad} of {self.lines} lines are malformed "
                            f"(more than {MAX_BAD_LINE_FRACTION:.0%}); first: {examples}")
