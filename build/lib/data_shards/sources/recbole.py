"""RecBole atomic files: ``<name>.inter`` (user/item/timestamp) and optionally ``<name>.item``.

Headers name each column as ``field:type``. Tab separated, as RecBole writes them.
"""
from __future__ import annotations

from pathlib import Path

from data_shards.problems import DataError, ProblemLog
from data_shards.process import CATEGORY_TEXT_FIELD
from data_shards.raw import RawDataset, RawItem
from data_shards.sources.categories import parse_category_labels
from data_shards.sources.images import ImageFolder
from data_shards.sources.text_lines import BadLineBudget, read_lines

CATEGORY_FIELD_CANDIDATES = ("categories", "category", "genre", "genres", "class")
NON_TEXT_FIELD_HINTS = ("id", "asin", "poster", "url", "image", "img")
IMAGE_FOLDER_CANDIDATES = ("images", "posters")
HIERARCHY_SEP = "|"


def _one_file(folder: Path, suffix: str, required: bool) -> Path | None:
    found = sorted(folder.glob(f"*{suffix}"))
    if len(found) > 1:
        raise DataError(f"{folder}: expected one *{suffix} file, found {[p.name for p in found]}")
    if not found and required:
        raise DataError(f"{folder}: no *{suffix} file (RecBole atomic interaction file)")
    return found[0] if found else None


def _header(line: str, path: Path) -> list[tuple[str, str]]:
    columns = []
    for column in line.split("\t"):
        name, _, kind = column.partition(":")
        if not name or not kind:
            raise DataError(f"{path}:1: header column {column!r} is not 'field:type'")
        columns.append((name.strip(), kind.strip()))
    return columns


def _column(columns: list[tuple[str, str]], names: tuple[str, ...], path: Path) -> int:
    for index, (name, _) in enumerate(columns):
        if name in names:
            return index
    raise DataError(f"{path}: no column named {' or '.join(names)} in header {[n for n, _ in columns]}")


def _read_interactions(path: Path, problems: ProblemLog) -> tuple[list[str], list[str], list[float]]:
    users, items, timestamps = [], [], []
    budget = BadLineBudget(path, problems, "malformed_interaction_line")
    lines = read_lines(path, problems)
    _, header_line = next(lines, (1, ""))
    columns = _header(header_line, path)
    user_col = _column(columns, ("user_id",), path)
    item_col = _column(columns, ("item_id",), path)
    time_col = _column(columns, ("timestamp",), path)
    for number, line in budget.over(lines):
        fields = line.split("\t")
        if len(fields) != len(columns):
            budget.bad_line(number, f"{len(fields)} columns, header has {len(columns)}: {line[:80]!r}")
            continue
        try:
            timestamp = float(fields[time_col])
        except ValueError:
            budget.bad_line(number, f"timestamp {fields[time_col]!r} is not a number")
            continue
        if not fields[user_col] or not fields[item_col]:
            budget.bad_line(number, "empty user_id or item_id")
            continue
        users.append(fields[user_col])
        items.append(fields[item_col])
        timestamps.append(timestamp)
    return users, items, timestamps


def _default_text_fields(columns: list[tuple[str, str]], category_field: str | None) -> list[str]:
    return [name for name, kind in columns
            if kind in ("token", "token_seq") and name != category_field
            and not any(name.lower().endswith(hint) for hint in NON_TEXT_FIELD_HINTS)]


def _category_label_sep(values: list[str]) -> str | None:
    """RecBole token_seq fields are space separated, except '|'-joined hierarchical paths (one label)."""
    return None if any(HIERARCHY_SEP in value for value in values) else " "


def _read_catalogue(path: Path, problems: ProblemLog, text_fields: list[str] | None,
                    category_field: str | None, category_sep: str | None
                    ) -> tuple[dict[str, RawItem], list[str], dict]:
    lines = read_lines(path, problems)
    _, header_line = next(lines, (1, ""))
    columns = _header(header_line, path)
    names = [name for name, _ in columns]
    item_col = _column(columns, ("item_id",), path)
    if category_field is None:
        category_field = next((name for name in CATEGORY_FIELD_CANDIDATES if name in names), None)
    elif category_field not in names:
        raise DataError(f"{path}: --category-field {category_field!r} is not a column ({names})")
    if text_fields is None:
        text_fields = _default_text_fields(columns, category_field)
    for field in text_fields:
        if field not in names and field != CATEGORY_TEXT_FIELD:
            raise DataError(f"{path}: --text-fields names {field!r}, which is not a column ({names})")
    budget = BadLineBudget(path, problems, "malformed_item_line")
    rows: dict[str, list[str]] = {}
    for number, line in budget.over(lines):
        fields = line.split("\t")
        if len(fields) != len(columns):
            budget.bad_line(number, f"{len(fields)} columns, header has {len(columns)}")
            continue
        if fields[item_col] in rows:
            problems.skip("duplicate_item_line_ignored", f"{path}:{number}", f"item {fields[item_col]}")
            continue
        rows[fields[item_col]] = fields
    category_col = names.index(category_field) if category_field else None
    if category_sep is None and category_col is not None:
        category_sep = _category_label_sep([row[category_col] for row in rows.values()])
    catalogue = {}
    for item_id, fields in rows.items():
        categories = (parse_category_labels(fields[category_col], category_sep, HIERARCHY_SEP)
                      if category_col is not None else [])
        catalogue[item_id] = RawItem(
            original_id=item_id,
            text_fields={field: fields[names.index(field)].strip() for field in text_fields
                         if field != CATEGORY_TEXT_FIELD},
            categories=categories)
    options = {"text_fields": text_fields, "category_field": category_field,
               "category_sep": category_sep, "category_level_sep": HIERARCHY_SEP}
    return catalogue, text_fields, options


def _find_image_folder(folder: Path, images: Path | None) -> Path | None:
    if images is not None:
        return images
    return next((folder / name for name in IMAGE_FOLDER_CANDIDATES if (folder / name).is_dir()), None)


def read_recbole(folder: Path, images: Path | None = None, text_fields: list[str] | None = None,
                 category_field: str | None = None, category_sep: str | None = None) -> RawDataset:
    """Read ``folder/<name>.inter`` (+ ``<name>.item``); images from ``images`` (default: an
    ``images/`` or ``posters/`` subfolder if present) as ``<item_id>.jpg``/``.png``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--input {folder} is not a directory")
    problems = ProblemLog()
    inter_path = _one_file(folder, ".inter", required=True)
    item_path = _one_file(folder, ".item", required=False)
    users, items, timestamps = _read_interactions(inter_path, problems)
    if item_path is not None:
        catalogue, text_fields, options = _read_catalogue(item_path, problems, text_fields,
                                                          category_field, category_sep)
    else:
        catalogue, options = {}, {"text_fields": [], "category_field": None}
        text_fields = []
    image_folder = _find_image_folder(folder, images)
    return RawDataset(
        name=inter_path.stem, description=f"RecBole atomic files {inter_path.name}"
        + (f" + {item_path.name}" if item_path else "") + (f", images from {image_folder}" if image_folder else ""),
        users=users, items=items, timestamps=timestamps, catalogue=catalogue,
        load_image=ImageFolder(image_folder) if image_folder else None, problems=problems, text_fields=text_fields,
        source={"name": "recbole", "input": str(folder), "images": str(image_folder) if image_folder else None,
                **options})
