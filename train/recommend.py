"""A finished run as a recommender in ONE process: its config, dataset, feature tables and one checkpoint, scoring
a history the way evaluation scores a user (model.eval(), the same model inputs, the last position's user vector
against every item candidate, built in the same item chunks).

Any world size and ZeRO stage loads at world size 1: the ID table through torch.distributed.checkpoint, which
reshards (a single-process group exists only while the table is read); the dense weights from the DeepSpeed
files, ZeRO 0-2 exactly as the engine's module held them (compute dtype), ZeRO-3 consolidated from every rank's
fp32 partition and cast as the engine casts (parameters to the compute dtype, buffers kept).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from cammsr.factory import build_model
from data_shards.problems import DataError
from data_shards.reader import ItemRecord, PreparedDataset
from train.checkpoint import config_changes
from train.config import Config, ConfigError, in_id_warmup, load_config


def item_title(item: ItemRecord) -> str:
    """The title-like text field ('title', 'movie_title', ...), else the first sentence of the item text."""
    fields = item.text_fields or {}
    for name in sorted(fields, key=lambda n: (n != "title", n)):
        if "title" in name.lower() and str(fields[name]).strip():
            return str(fields[name]).strip()
    return item.text.split(". ")[0].strip()


@dataclass
class Catalogue:
    """Original ids and titles by internal id (index 0 is padding); ids past the dataset's items (data.extra_items,
    ID-only scale runs) have neither."""

    original_ids: list[str]
    titles: list[str]
    extra_items: int = 0

    @classmethod
    def read(cls, data: PreparedDataset, extra_items: int = 0) -> "Catalogue":
        original, titles = [""] * (data.num_items + 1), [""] * (data.num_items + 1)
        for item in data.items():
            original[item.item_id], titles[item.item_id] = item.original_id, item_title(item)
        return cls(original, titles, extra_items)

    @property
    def last_id(self) -> int:
        return len(self.original_ids) - 1 + self.extra_items

    def describe(self, item_id: int) -> tuple[str, str]:
        """(original id, title) of an internal id."""
        if item_id < len(self.original_ids):
            return self.original_ids[item_id], self.titles[item_id]
        return f"extra-{item_id}", "(extra item: no metadata)"

    def resolve(self, ids: list[str], internal: bool = False) -> list[int]:
        """Internal ids of `ids` (original ids, or internal 1..N with internal=True); unknown ids stop with an error
        naming every one of them, with close matches."""
        if internal:
            bad = [i for i in ids if not (i.isdigit() and 1 <= int(i) <= self.last_id)]
            if bad:
                raise DataError(f"unknown internal item id(s) {', '.join(map(repr, bad))}: internal ids are "
                                f"1..{self.last_id}")
            return [int(i) for i in ids]
        index = {original: number for number, original in enumerate(self.original_ids) if number}
        unknown = [i for i in ids if i not in index]
        if unknown:
            named = []
            for name in unknown:
                close = difflib.get_close_matches(name, index, n=3)
                named.append(repr(name) + (f" (close: {', '.join(close)})" if close else ""))
            raise DataError(f"unknown item id(s) {'; '.join(named)}: not among the dataset's {len(index):,} original "
                            "item ids (--internal-ids reads internal 1..N ids)")
        return [index[i] for i in ids]


def checkpoint_folder(run_dir: Path, which: str) -> tuple[Path, dict]:
    """(folder, trainer state) of 'latest', 'best' (the run's best_tag) or a tag; complete checkpoints only."""
    root = Path(run_dir) / "checkpoints"
    try:
        latest = json.loads((root / "latest").read_text())["tag"]
    except (OSError, ValueError, KeyError):
        raise DataError(f"{run_dir}: no complete checkpoint ({root / 'latest'} is missing: checkpoint.enabled=false, "
                        "or the run stopped before its first validation)") from None
    tag = latest if which in ("latest", "best") else which
    if which == "best":
        tag = json.loads((root / latest / "trainer.json").read_text()).get("best_tag")
        if tag is None:
            raise DataError(f"{run_dir}: no best checkpoint yet (no validation round); use --checkpoint latest")
    folder = root / tag
    if not (folder / "trainer.json").is_file():  # written last: a folder without it is an interrupted save
        tags = sorted(p.name for p in root.iterdir() if (p / "trainer.json").is_file())
        raise DataError(f"{folder}: no complete checkpoint {tag!r} (complete: {', '.join(tags) or 'none'})")
    return folder, json.loads((folder / "trainer.json").read_text())


def _trained_in_id_warmup(state: dict, cfg: Config) -> bool:
    """Whether every step before this checkpoint ran in the ID warm-up (train.id_warmup_epochs)."""
    last_epoch_trained = state["epoch"] - 1 if state.get("step_in_epoch", 0) == 0 else state["epoch"]
    return in_id_warmup(cfg, last_epoch_trained)


def dense_state(engine_dir: Path) -> dict[str, torch.Tensor]:
    """The model's state dict from a DeepSpeed checkpoint written at any world size (see the module docstring)."""
    plain = engine_dir / "mp_rank_00_model_states.pt"
    if plain.is_file():  # ZeRO 0-2: the module as the engine held it, written once
        return torch.load(plain, map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with contextlib.redirect_stdout(sys.stderr):  # it reports progress on stdout, which may be --json
        return get_fp32_state_dict_from_zero_checkpoint(str(engine_dir.parent), tag=engine_dir.name)


@contextlib.contextmanager
def _single_process_group(timeout_s: float):
    """A world of one for the TorchRec table (an existing world of one is reused and left alone)."""
    import torch.distributed as dist
    from train.distributed import init_distributed, read_env, shutdown
    if read_env()[1] > 1 or (dist.is_initialized() and dist.get_world_size() > 1):
        raise ConfigError("recommend runs as ONE process: start it without torchrun/srun/deepspeed")
    owned = not dist.is_initialized()
    env = init_distributed(timeout_s, "auto")
    try:
        yield env.device
    finally:
        if owned:
            shutdown(wait_for_peers=False)


@contextlib.contextmanager
def _quiet_libraries():
    """TorchRec's planner and DCP warn about their own APIs on every table build; a one-shot command needs none."""
    loggers = [logging.getLogger(name) for name in ("torchrec", "torch.fx._symbolic_trace")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _table_rows(cfg: Config, num_rows: int, sparse_dir: Path) -> tuple[torch.Tensor, torch.device]:
    """(every row of the checkpoint's ID table, device), read into a world-of-one table of the run's backend."""
    import torch.distributed.checkpoint as dcp
    from train.embeddings import build_item_table
    e = cfg.embedding
    with _single_process_group(cfg.distributed.timeout_s) as device, _quiet_libraries():
        table = build_item_table(num_rows - 1, cfg.model.hidden_size, e.backend, e.sharding, e.optimizer, e.lr, e.eps,
                                 cfg.train.seed + 1, cfg.model.init_method, device)
        sparse = {"sparse": table.sharded_state()}
        dcp.load(sparse, checkpoint_id=str(sparse_dir))
        table.load_sharded_state(sparse["sparse"])
        return table.all_rows(), device


@contextlib.contextmanager
def _linear_as_trained(zero_stage: int):
    """A ZeRO-3 engine replaces torch.nn.functional.linear process-wide with DeepSpeed's (matmul, then bias: other
    rounding in bf16), so that run evaluated every linear layer that way; do the same while scoring."""
    if zero_stage != 3:
        yield
        return
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    original = torch.nn.functional.linear
    torch.nn.functional.linear = zero3_linear_wrap
    try:
        yield
    finally:
        torch.nn.functional.linear = original


class RunRecommender:
    """The model of one checkpoint (eval mode, compute dtype) and its item candidates [rows, M, d]."""

    def __init__(self, run_dir: Path | str, checkpoint: str = "best", data_path: Path | str | None = None):
        from train.engine import _lift_scalar_parameters, compute_dtype, select_deepspeed_accelerator
        from train.items import load_item_inputs
        from train.loop import data_fingerprint
        from train.media import MediaStream, computed_modalities
        from train.trained_modules import RecommenderWithEncoders
        select_deepspeed_accelerator()
        self.run_dir = run_dir = Path(run_dir)
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise DataError(f"{run_dir} is not a training run: no config.yaml (written by `cammsr train`)")
        overrides = ["distributed.backend=auto"] + ([f"data.path={data_path}"] if data_path is not None else [])
        self.cfg = cfg = load_config(config_path, overrides, world_size=1)
        self.folder, self.state = checkpoint_folder(run_dir, checkpoint)
        if not Path(cfg.data.path).is_dir():
            raise DataError(f"dataset {cfg.data.path} (data.path of {config_path}) not found: pass --data DIR if it "
                            "moved")
        self.data = data = PreparedDataset(cfg.data.path, verify=False)
        if self.state["data_fingerprint"] != data_fingerprint(data):
            raise DataError(f"{data.root} is not the dataset {run_dir} was trained on (fingerprint "
                            f"{data_fingerprint(data)}, the checkpoint's {self.state['data_fingerprint']})")
        changed = (config_changes(self.state["config"], cfg.to_dict())
                   if self.state["config_fingerprint"] != cfg.fingerprint() else [])
        if changed:
            raise ConfigError(f"{config_path}, as this code reads it, is not the config of {self.folder}; changed "
                              "keys: " + "; ".join(changed[:10]))
        model_cfg = cfg.model
        self.extra_items = getattr(cfg.data, "extra_items", 0)  # ID rows past the dataset's items (scale runs)
        self.num_rows = data.num_items + self.extra_items + 1
        uses = model_cfg.used_modalities  # as the Trainer
        need_categories = model_cfg.reads_categories
        self.dtype = dtype = compute_dtype(cfg.train)
        id_rows, self.device = _table_rows(cfg, self.num_rows, self.folder / "sparse")
        computed = computed_modalities(cfg, uses)
        stored = tuple(m for m in ("text", "image") if m in uses and m not in computed)
        items = load_item_inputs(data, stored, need_categories, self.device, cfg.categories,
                                 model_cfg.reads_tokens)
        media = (MediaStream(data, computed, cfg.data, cfg.features, self.device, 0, 1, cfg.train.seed + 2)
                 if computed else None)
        dims = [media.dim(m) if media is not None and m in media.paths else getattr(items, f"{m}_dim")
                for m in ("text", "image")]
        model = build_model(model_cfg, items.num_categories, *dims)
        trained = {} if media is None else media.trained_modules()
        module = RecommenderWithEncoders(model, trained) if trained else model
        _lift_scalar_parameters(module)  # the engine's checkpoints hold 0-dim parameters with shape [1]
        for param in module.parameters():  # DeepSpeed casts parameters only
            param.data = param.data.to(dtype)
        try:
            # frozen encoder weights are not in the checkpoint (their own files are); everything else must be
            missing = module.load_state_dict(dense_state(self.folder / "engine" / "state"), strict=not trained)[0]
            frozen = {name for name, param in module.named_parameters() if not param.requires_grad}
            if set(missing) - frozen - {name for name, _ in module.named_buffers()}:
                raise RuntimeError(f"missing keys {sorted(set(missing) - frozen)[:5]}")
        except RuntimeError as err:
            raise DataError(f"{self.folder}: the dense weights do not fit the model rebuilt from {config_path} and "
                            f"the dataset's feature stores ({str(err).strip().splitlines()[0]} ...)") from err
        if media is not None:
            module.to(self.device)
            media.fit_side_states(progress=True)
            items = media.catalogue(items, progress=True)  # with the encoders as trained
            media.close()
        self.items = items
        if _trained_in_id_warmup(self.state, cfg):
            model.set_id_only(True)  # a checkpoint of the ID warm-up: the content pathways were not trained yet
        self.model = model.to(self.device).eval()
        self.id_rows = id_rows.to(self.device)
        self.candidates = self._candidates(self.id_rows)

    @torch.no_grad()
    def _candidates(self, id_rows: torch.Tensor) -> torch.Tensor:
        """Item candidates of rows 1.. in evaluation's chunks (score_chunk_size ids each); row 0 stays zero."""
        chunk, items, dtype = self.cfg.model.score_chunk_size, self.items, self.dtype
        parts = []
        with self.as_trained():
            for start in range(1, self.num_rows, chunk):
                end = min(start + chunk, self.num_rows)
                features = (None if t is None else t[start:end].to(dtype) for t in (items.text, items.image))
                parts.append(self.model.item_candidates(id_rows[start:end].to(dtype), *features).float())
        return torch.cat([torch.zeros_like(parts[0][:1]), *parts])

    def as_trained(self):
        """Context in which this model computes as it did inside its training process (see _linear_as_trained)."""
        return _linear_as_trained(self.cfg.train.zero_stage)

    @property
    def max_len(self) -> int:
        return self.cfg.model.max_seq_len

    @property
    def tag(self) -> str:
        return self.folder.name

    @torch.no_grad()
    def user_output(self, history: list[int], times: list[float] | None = None):
        """The model's output at the last position after `history` (internal ids, oldest first; the last
        max_seq_len are read) with its interaction `times` (Unix seconds, one per item; time-aware models need
        them). The sequence is as wide as the history, as in an evaluation batch of one user."""
        return self.same_width_outputs([history], None if times is None else [times])

    @torch.no_grad()
    def same_width_outputs(self, histories: list[list[int]], times: list[list[float]] | None = None):
        """`user_output` of many users in one forward pass: their last max_seq_len items must be equally many, so
        each row is computed exactly as that user alone would be (no padding)."""
        from train.data import Batch
        from train.evaluate import last_position
        from train.step import model_inputs
        if times is None and self.cfg.model.needs_times:
            raise DataError(f"model {self.cfg.model.name} reads the interaction times: give one Unix time per "
                            "history item (--times)")
        for history, when in zip(histories, times or [None] * len(histories)):
            if not history:
                raise DataError("the history is empty: give at least one item")
            if when is not None and len(when) != len(history):
                raise DataError(f"{len(when)} times for a history of {len(history)} items: give one time per item")
        recent = [history[-self.max_len:] for history in histories]
        if len({len(r) for r in recent}) != 1:
            raise ValueError(f"histories of {sorted({len(r) for r in recent})} recent items: give one width")
        seq = torch.tensor(recent, dtype=torch.long)
        time_seq = None if times is None else torch.tensor([t[-self.max_len:] for t in times], dtype=torch.float64)
        users = len(recent)
        batch = Batch(seq, torch.full((users,), seq.shape[1]), torch.zeros(users, dtype=torch.long),
                      torch.ones(users, dtype=torch.bool), time_seq=time_seq).to(self.device)
        seq_emb = self.id_rows[batch.item_seq] * (batch.item_seq != 0)[..., None]  # the table's lookup
        with self.as_trained():
            output = self.model(*model_inputs(batch, seq_emb, self.items, self.dtype))
        return last_position(output, batch.seq_len)

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """This checkpoint's metrics on `split`, ranked as the run's own training process ranks them (its evaluator,
        users, protocol and ties): a finished run's test at its best validation round, read without training it
        again. One process; the run directory is only read."""
        from train.data import LocalSequences
        from train.embeddings import TorchItemTable
        from train.evaluate import evaluate, evaluation_users
        cfg, local = self.cfg, LocalSequences(self.data, 0, 1)
        table = TorchItemTable(self.id_rows, "exact_sgd", 0.1, 1e-8, self.device)  # read only: never stepped
        with self.as_trained():
            return evaluate(self.model, table, self.items, local, split, cfg.model.max_seq_len, cfg.eval.batch_size,
                            tuple(cfg.eval.ks), self.device, self.dtype,
                            users=evaluation_users(local, cfg.eval.max_users, cfg.train.seed),
                            chunk_size=cfg.model.score_chunk_size, exclude_history=cfg.eval.exclude_history)

    @torch.no_grad()
    def top_k(self, history: list[int], k: int, exclude: set[int] = frozenset(),
              times: list[float] | None = None) -> list[tuple[int, float]]:
        """Best k (item id, score) after `history` (see user_output), never an id in `exclude`."""
        wanted = min(self.num_rows - 1, k + len(exclude))
        scores, ids = self.model.recommend(self.user_output(history, times), self.candidates, wanted)
        ranked = [(int(i), float(s)) for i, s in zip(ids[0].tolist(), scores[0].tolist()) if int(i) not in exclude]
        return ranked[:k]


__all__ = ["Catalogue", "RunRecommender", "checkpoint_folder", "dense_state", "item_title"]
