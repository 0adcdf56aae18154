"""Bad-input accounting: every skipped or repaired record is counted by kind, with examples.

Two policies exist and each call site picks one explicitly:
- ``ProblemLog.skip(kind, where, detail)`` keeps going and counts (the summary is printed and
  written into the manifest, so nothing disappears silently);
- ``raise DataError(...)`` stops with a message naming the file, line/field and value.
"""
from __future__ import annotations

from collections import Counter


class DataError(ValueError):
    """Input that cannot be turned into a dataset; the message names file, line/field and value."""


class ProblemLog:
    EXAMPLES_PER_KIND = 5

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def skip(self, kind: str, where: str, detail: str = "") -> None:
        self.counts[kind] += 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < self.EXAMPLES_PER_KIND:
            examples.append(f"{where}: {detail}" if detail else where)

    def merge(self, other: "ProblemLog") -> None:
        for kind, count in other.counts.items():
            self.counts[kind] += count
            room = self.EXAMPLES_PER_KIND - len(self.examples.setdefault(kind, []))
            self.examples[kind].extend(other.examples.get(kind, [])[:max(room, 0)])

    def as_dict(self) -> dict:
        return {kind: {"count": self.counts[kind], "examples": self.examples.get(kind, [])}
                for kind in sorted(self.counts)}

    def summary_lines(self) -> list[str]:
        if not self.counts:
            return ["no input problems found"]
        lines = []
        for kind in sorted(self.counts):
            examples = self.examples.get(kind)
            lines.append(f"{kind}: {self.counts[kind]}" + (f" (e.g. {examples[0]})" if examples else ""))
        return lines
