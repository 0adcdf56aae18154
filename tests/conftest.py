import io
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable


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


def cpu_env() -> dict:
    """Environment of a CPU training subprocess: DeepSpeed on CPU, one thread, no inherited rank variables."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"),
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def write_tiny_dataset(out: Path) -> Path:
    """The trainer tests' toy: 81 users (odd), 60 items, 3-level categories, random text (12-d) and image (10-d)
    feature stores (train with data.build_features=false to keep them)."""
    import numpy as np
    from data_shards.features.store import write_store
    from data_shards.prepare import PrepareOptions, prepare
    from data_shards.reader import PreparedDataset
    from data_shards.sources.synthetic import generate_synthetic
    prepare(generate_synthetic(num_items=60, num_users=81, seed=1, with_images=False), out, PrepareOptions(k_core=1))
    data = PreparedDataset(out)
    rng = np.random.default_rng(0)
    ids = np.arange(1, data.num_items + 1)
    for modality, dim in (("text", 12), ("image", 10)):
        write_store(data, modality, ids, rng.standard_normal((len(ids), dim)).astype(np.float32),
                    {"encoder": "random test vectors"})
    return out
