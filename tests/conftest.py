import io
from pathlib import Path

import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """A folder of ../shared/data, or a clean skip where this checkout has no shared data."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is not present (real datasets live outside the repository)")
    return path


def jpeg_bytes(colour=(200, 30, 30), size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_recbole(folder: Path, interactions: list[tuple], items: list[tuple] | None = None,
                  name: str = "toy") -> Path:
    """interactions: (user, item, timestamp); items: (item_id, title, brand, categories)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    lines += [f"{u}\t{i}\t{t}" for u, i, t in interactions]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    if items is not None:
        lines = ["item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq"]
        lines += ["\t".join(map(str, row)) for row in items]
        (folder / f"{name}.item").write_text("\n".join(lines) + "\n")
    return folder


def toy_interactions(num_users: int = 6, num_items: int = 8, length: int = 6) -> list[tuple]:
    """Every user sees `length` items cyclically: each item gets enough interactions for a 3-core."""
    rows = []
    for user in range(num_users):
        for step in range(length):
            rows.append((f"u{user}", f"i{(user + step) % num_items}", 1000 + 10 * step))
    return rows


def toy_items(num_items: int = 8) -> list[tuple]:
    return [(f"i{k}", f"Red widget {k}", f"Brand{k % 2}", f"Tools|Widgets|Size{k % 3}")
            for k in range(num_items)]
