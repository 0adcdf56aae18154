import io
import os
import signal
import subprocess
import sys
import time
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


def write_tiny_encoders(folder: Path) -> tuple[Path, Path]:
    """Real transformers encoders with small configs and seeded random weights, saved as local model folders: a
    1-layer BERT (16-d, 32 positions, all-MiniLM-L6-v2's tokenizer) and a 1-layer DINOv2 (16-d, 32 px, 8-px
    patches). What `data.text_encoder` / `data.image_encoder` take as paths. Initialised wide (std 0.5): at
    transformers' default 0.02 a random BERT gives every text nearly the same [CLS] vector (per-dimension spread
    below fp16's resolution), which no model could learn from. No dropout, so that training them is deterministic."""
    import json

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, Dinov2Config, Dinov2Model

    from data_shards.features.dinov2_conversion import DEFAULT_PREPROCESSOR
    from data_shards.features.encoders import _default_text_path
    text_dir, image_dir = folder / "tiny-bert", folder / "tiny-dinov2"
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(_default_text_path()[0]), local_files_only=True)
    tokenizer.save_pretrained(str(text_dir))
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                         initializer_range=0.5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
              ).save_pretrained(str(text_dir))
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                             patch_size=8, image_size=32, initializer_range=0.5)).save_pretrained(str(image_dir))
    processor = dict(DEFAULT_PREPROCESSOR, size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    (image_dir / "preprocessor_config.json").write_text(json.dumps(processor))
    return text_dir, image_dir


def write_media_dataset(out: Path, num_items: int = 60, num_users: int = 81) -> Path:
    """A small synthetic dataset WITH images in its shards (a few items without one): for stream mode."""
    from data_shards.prepare import PrepareOptions, prepare
    from data_shards.sources.synthetic import generate_synthetic
    prepare(generate_synthetic(num_items=num_items, num_users=num_users, seed=1, with_images=True,
                               missing_image_rate=0.1), out, PrepareOptions(k_core=1))
    return out


# The trainer tests' tiny CAMMSR (fp32, no dropout, deterministic swap) with the sampled loss that stream mode and
# trained encoders need.
TINY_SAMPLED = ["train.precision=fp32", "train.eps=0.001", "model.hidden_size=8", "model.max_seq_len=6",
                "model.num_layers=1", "model.num_heads=1", "model.num_experts=2", "model.ffn_inner_size=16",
                "model.hidden_dropout=0.0", "model.attn_dropout=0.0", "model.mscl_swap_prob=1.0",
                "train.batch_size=64", "model.loss_type=sampled_softmax", "train.num_negatives=16"]


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    return write_tiny_encoders(tmp_path_factory.mktemp("encoders"))


@pytest.fixture(scope="module")
def media_dataset(tmp_path_factory):
    return write_media_dataset(tmp_path_factory.mktemp("data") / "media")


def encoder_overrides(encoders) -> list[str]:
    return [f"data.text_encoder={encoders[0]}", f"data.image_encoder={encoders[1]}"]


def kill_after_first_checkpoint(cmd: list[str], run_dir: Path, timeout: float = 240) -> None:
    """Start a training command and SIGKILL it as soon as its first checkpoint is complete."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (run_dir / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def random_sequences(batch: int, length: int, lengths=None, num_items: int = 20):
    """Left-aligned item sequences [batch, length] of ids 1..num_items, 0 after each row's length (given, or drawn),
    and the lengths: the model tests' inputs."""
    import torch
    seq_len = torch.tensor(lengths) if lengths is not None else torch.randint(1, length + 1, (batch,))
    item_seq = torch.randint(1, num_items + 1, (batch, length))
    item_seq[torch.arange(length)[None, :] >= seq_len[:, None]] = 0
    return item_seq, seq_len
