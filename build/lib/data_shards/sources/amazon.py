"""Raw Amazon review dumps: reviews JSON lines + metadata lines + a folder of images named by asin.

Reviews: one JSON object per line with ``reviewerID``, ``asin``, ``unixReviewTime``.
Metadata: one object per line with ``asin``, ``title``, ``brand`` and either ``categories``
(2014 dumps: a list of paths, written as Python literals) or ``category`` (2018 dumps: one path).
Files may be gzip-compressed. Image URLs (``imUrl``/``image``) are not fetched: images come from
``--images`` (``<asin>.jpg``/``.png``), as downloaded beforehand.
"""
from __future__ import annotations

import ast
import gzip
import json
import shutil
import tempfile
from pathlib import Path

from data_shards.problems import DataError, ProblemLog
from data_shards.raw import RawDataset, RawItem
from data_shards.sources.images import ImageFolder
from data_shards.sources.text_lines import BadLineBudget, read_lines

DEFAULT_TEXT_FIELDS = ["title", "categories", "brand"]


def _parse_record(line: str) -> dict:
    try:
        return json.loads(line)
    except ValueError:
        record = ast.literal_eval(line)  # the 2014 metadata dumps are Python literals
        if not isinstance(record, dict):
            raise ValueError("not an object")
        return record


def _find(folder: Path, kind: str) -> Path:
    names = sorted(p for p in folder.iterdir() if p.is_file() and ".json" in p.name)
    if kind == "metadata":
        found = [p for p in names if p.name.startswith("meta")]
    else:
        found = [p for p in names if not p.name.startswith("meta")]
    if len(found) != 1:
        raise DataError(f"{folder}: expected one {kind} JSON-lines file "
                        f"({'meta*.json[.gz]' if kind == 'metadata' else 'reviews*.json[.gz]'}), "
                        f"found {[p.name for p in found]}")
    return found[0]


def _records(path: Path, problems: ProblemLog, scratch: Path):
    if path.suffix == ".gz":
        plain = scratch / path.stem
        with gzip.open(path, "rb") as source, open(plain, "wb") as target:
            shutil.copyfileobj(source, target)
        path = plain
    budget = BadLineBudget(path, problems, f"malformed_{path.stem}_line")
    for number, line in budget.over(read_lines(path, problems)):
        try:
            yield number, _parse_record(line), budget
        except (ValueError, SyntaxError) as err:
            budget.bad_line(number, f"not a JSON/Python object ({err}): {line[:80]!r}")


def _category_paths(record: dict) -> list[list[str]]:
    if "categories" in record:
        paths = record["categories"] or []
    else:
        paths = [record.get("category") or []]
    return [[str(level).strip() for level in path if str(level).strip()] for path in paths if path]


def _strip_shared_root(catalogue: dict[str, RawItem]) -> None:
    """Dumps are per department ("Beauty"): a first level on every path says nothing."""
    roots = {path[0] for item in catalogue.values() for path in item.categories}
    if len(roots) == 1 and all(item.categories for item in catalogue.values()):
        for item in catalogue.values():
            item.categories = [path[1:] for path in item.categories if len(path) > 1]


def read_amazon(folder: Path, images: Path | None = None, text_fields: list[str] | None = None) -> RawDataset:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--input {folder} is not a directory")
    problems = ProblemLog()
    reviews_path, meta_path = _find(folder, "reviews"), _find(folder, "metadata")
    text_fields = text_fields or DEFAULT_TEXT_FIELDS
    users, items, timestamps = [], [], []
    catalogue: dict[str, RawItem] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for number, record, budget in _records(reviews_path, problems, Path(scratch)):
            try:
                user, item, when = str(record["reviewerID"]), str(record["asin"]), float(record["unixReviewTime"])
            except (KeyError, TypeError, ValueError) as err:
                budget.bad_line(number, f"missing or bad field {err}")
                continue
            users.append(user)
            items.append(item)
            timestamps.append(when)
        for number, record, budget in _records(meta_path, problems, Path(scratch)):
            asin = record.get("asin")
            if not asin:
                budget.bad_line(number, "no asin")
                continue
            catalogue[str(asin)] = RawItem(
                original_id=str(asin),
                text_fields={field: str(record.get(field) or "").strip() for field in text_fields
                             if field != "categories"},
                categories=_category_paths(record))
    _strip_shared_root(catalogue)
    return RawDataset(
        name=reviews_path.name.split(".json")[0],
        description=f"Amazon reviews {reviews_path.name} + {meta_path.name}"
                    + (f", images from {images}" if images else ""),
        users=users, items=items, timestamps=timestamps, catalogue=catalogue,
        load_image=ImageFolder(images) if images else None, problems=problems, text_fields=text_fields,
        source={"name": "amazon", "input": str(folder), "images": str(images) if images else None,
                "reviews": reviews_path.name, "metadata": meta_path.name, "text_fields": text_fields})
