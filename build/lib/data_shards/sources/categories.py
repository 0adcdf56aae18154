"""Turning a category field's text into hierarchical label paths."""
from __future__ import annotations

MISSING_CATEGORY_VALUES = {"", "unknown", "none", "nan", "null", "n/a"}


def parse_category_labels(value: str, label_sep: str | None, level_sep: str | None) -> list[list[str]]:
    """``"Makeup|Nails|Nail Polish"`` -> ``[["Makeup", "Nails", "Nail Polish"]]`` (level_sep "|");
    ``"Action Comedy"`` -> ``[["Action"], ["Comedy"]]`` (label_sep " "). Missing values give []."""
    labels = value.split(label_sep) if label_sep else [value]
    paths = []
    for label in labels:
        levels = label.split(level_sep) if level_sep else [label]
        path = [level.strip() for level in levels if level.strip()]
        if path and path[0].lower() not in MISSING_CATEGORY_VALUES and path not in paths:
            paths.append(path)
    return paths
