"""The training config: one typed tree (dataclasses), a YAML file + `key=value` overrides, validated once.

Sections: data, model (= cammsr.ModelConfig, its fields are the public model keys), train, embedding, eval, features,
categories, checkpoint, logging, distributed. Overrides: `section.key=value` or a bare `key=value` when the name is
unique across sections (`max_epochs=3`); `model=sasrec` is short for `model.name=sasrec`. Values are parsed as YAML.
Every error names the key (ConfigError, a ValueError).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from cammsr.config import ModelConfig
from train.category_labels import CATEGORY_SOURCES, NOISE_TYPES


class ConfigError(ValueError):
    """A bad configuration; the message names the key."""


@dataclass
class DataConfig:
    path: str = ""  # prepared dataset folder (`cammsr prepare --out`); `--data` sets it
    build_features: bool = True  # build missing text/image feature stores before training
    text_encoder: str = "default"
    image_encoder: str = "default"
    # Square input side of the image encoder; 0 = the encoder's own (224 for the default DINOv2). A multiple of
    # the patch size (14 for the default); below the pictures' own size it saves encoder time, not information.
    image_size: int = 0
    extract_batch_size: int = 64
    # Token-level stores (models that attend over token / patch states: model.name=tame): text tokens per item
    # ([CLS] included) and the side of the grid the image patches are average-pooled to (0: every patch).
    text_token_limit: int = 64
    image_token_grid: int = 4
    # Catalogue items beyond the dataset's (ids num_items+1 .. num_items+extra_items) with no interactions and no
    # features: they get ID rows, can be drawn as negatives and are ranked in evaluation. For scaling runs of
    # ID-only models (model.name=sasrec): a huge ID table without writing millions of item samples.
    extra_items: int = 0


@dataclass
class CategoriesConfig:
    # Which item category labels the models read (train.category_labels): "dataset" (every label an item has: the
    # paper's multi-label setting), "first_path" (one category path per item) or "virtual" (the paper's "none
    # category" setting: virtual_count k-means clusters of the items' frozen text/image features).
    source: str = "dataset"
    virtual_count: int = 20
    # The CAMMSR paper's noise study (Table V): this fraction of the labelled items gets its labels removed
    # ("removal") or replaced by another item's differing labels ("misleading"); label_seed draws them (and seeds
    # the virtual clusters).
    noise: float = 0.0
    noise_type: str = "removal"
    label_seed: int = 0


@dataclass
class FeaturesConfig:
    # cached: text/image features come from the feature stores (`cammsr extract`, built before training when
    # missing). stream: no store; each step's items are read from the shards by id, decoded and encoded inside the
    # training step, and evaluation encodes the catalogue once per round (train.media). Stream mode needs a sampled
    # loss with shared negatives: a full softmax would encode the whole catalogue every step.
    mode: str = "cached"
    image_decoder: str = "auto"  # stream mode: auto (DALI where installed) | dali | pil
    prefetch: int = 1  # stream mode: steps whose media are read/decoded/tokenized ahead, in a thread (0 = inline)
    encode_batch_size: int = 256  # stream mode: images per decode run and per encoder call; items per catalogue chunk
    decode_threads: int = 2  # stream mode: DALI's CPU threads
    # Which encoder parameters train with the recommender (train.encoder_tuning): frozen | top_layers | lora (both
    # stream mode only: the encoders run in the step) | side_adapter (a small network over the frozen backbone's
    # per-layer states, encoded once per run). tune_text / tune_image override it per modality ("" = tune).
    tune: str = "frozen"
    tune_text: str = ""
    tune_image: str = ""
    tune_layers: int = 1  # top_layers: how many of the last transformer blocks train
    lora_rank: int = 8
    lora_alpha: float = 16.0
    side_bottleneck: int = 64  # side_adapter: width of each layer's bottleneck adapter
    lr: float = 1e-4  # the encoders' parameter group (the recommender keeps train.lr)
    weight_decay: float = 0.0
    activation_checkpointing: bool = False  # recompute the trained encoders' blocks in backward (less memory)


@dataclass
class TrainConfig:
    batch_size: int = 1024  # GLOBAL batch per optimizer step over all ranks, in batch_unit
    # samples: rows (a prefix, or a window of all_positions mode). targets: scored positions, so that a step of
    # long windows and a step of short ones score about as many targets and every target weighs the same in an
    # epoch (all_positions mode; in prefix mode the two are the same).
    batch_unit: str = "samples"
    max_epochs: int = 200
    # CAMMSR only, not in the paper (0 = as written): the first N epochs train and score the ID modality alone
    # (content pathways and MSCL off), then every modality joins. Started together, the content pathways take the
    # easy part of the signal first and the pathways settle at a worse optimum together (BENCHMARKS.md).
    # Validation during these epochs is logged but never selects the best epoch or counts toward patience.
    id_warmup_epochs: int = 0
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamw | sgd (a client torch optimizer: nothing to compile)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    schedule: str = "constant"  # constant | linear | cosine (after warmup_steps of linear warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # floor of the linear/cosine decay, as a fraction of lr
    precision: str = "bf16"  # bf16 | fp32 | fp16 (fp16 is refused: loss scaling would scale the sparse grads)
    zero_stage: int = 0  # DeepSpeed ZeRO stage for the dense part, 0-3
    grad_clip: float = 0.0  # dense parameters only (DeepSpeed clipping does not see the sparse table)
    seed: int = 2020
    mscl_negatives: str = "global"  # global: negatives from the whole global batch; local: this rank's slice
    # by_length: each epoch's shuffled samples are sorted by history length, cut into global batches, and the
    # batches shuffled, so a batch costs its own histories' length instead of the longest in the dataset (Beauty:
    # a random batch of 1024 almost always holds a 50-item history while the median window is 3). random: plain.
    batching: str = "by_length"
    # model.loss_type=sampled_softmax | gbce: num_negatives item ids drawn with replacement, identically for every
    # world size (train.negatives). negative_sharing: "shared" = one set per GLOBAL step for every row of the
    # global batch (cheap: S rows looked up per step); "per_target" = each scored target its own S (as RecTools'
    # SASRec, the public benchmark's recipe: T x S rows per step). uniform: over all items 1..N; popularity:
    # count^negative_sampler_exponent over the training interactions (items never in a training part are never
    # drawn), with logQ correction (sampled softmax only). A negative equal to a row's target is removed there.
    num_negatives: int = 1024
    negative_sharing: str = "shared"  # shared | per_target
    negative_sampler: str = "uniform"  # uniform | popularity
    negative_sampler_exponent: float = 0.75


@dataclass
class EmbeddingConfig:
    backend: str = "torchrec"  # torchrec (DMP EmbeddingCollection) | torch (plain nn.Embedding, world size 1)
    sharding: str = "row_wise"  # row_wise | table_wise | column_wise (TorchRec planner constraint)
    # exact_rowwise_adagrad | exact_adagrad | exact_sgd (both backends) | adam (dense Adam like RecBole's item table:
    # backend torch only, fbgemm has no CPU Adam kernel)
    optimizer: str = "exact_rowwise_adagrad"
    lr: float = 0.05
    eps: float = 1e-8


@dataclass
class EvalConfig:
    every: int = 1  # validate every N epochs
    patience: int = 10  # validation rounds without improvement before stopping (0 = never stop early)
    metric: str = "ndcg@10"  # validation metric that selects the best epoch
    batch_size: int = 1024  # users per evaluation chunk (per rank)
    ks: tuple[int, ...] = (5, 10)
    # 0 = every user. N > 0: a fixed, seeded subset of N users (the same for every world size, split and round),
    # for catalogues where exact full ranking of every user is too slow (10M items); metrics count = N.
    max_users: int = 0
    # When the test split is ranked: "end" (once, after training, with the best validation checkpoint's weights),
    # "each_best" (after every validation round that improves the best, with the weights of then: the same
    # numbers, read during training) or "never" (tuning studies: test is not touched).
    test: str = "end"
    # Validate during train.id_warmup_epochs too (for the curve; those rounds never select the best epoch or count
    # toward patience, so false changes no result and saves their time).
    in_warmup: bool = True
    # Rank each target among the items its user has NOT interacted with before (RecBole's full-sort evaluator and
    # RecTools' filter_viewed do; the public SASRec benchmark's numbers are RecTools'). false: among all items.
    exclude_history: bool = False


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every_steps: int = 0  # extra mid-epoch checkpoints (0 = only at validation rounds)
    keep: int = 2  # most recent checkpoints kept (the best one is always kept)


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    every_steps: int = 20
    max_category_scalars: int = 32  # per-category modality-weight scalars (histograms cover all)
    progress: bool = True


@dataclass
class DistributedConfig:
    timeout_s: float = 120.0  # collective timeout: a dead rank fails the job within about this long
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    categories: CategoriesConfig = field(default_factory=CategoriesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> str:
        """Hash of everything that defines the run's maths (not logging, checkpointing, epochs cap, timeouts)."""
        tree = self.to_dict()
        for section in ("logging", "checkpoint", "distributed"):
            tree.pop(section)
        tree["train"].pop("max_epochs")
        tree["eval"].pop("batch_size")
        tree["eval"].pop("test")
        tree["eval"].pop("in_warmup")
        tree["data"].pop("path")
        tree["data"].pop("extract_batch_size")
        for speed_only in ("prefetch", "encode_batch_size", "decode_threads", "activation_checkpointing"):
            tree["features"].pop(speed_only)
        return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


_SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "embedding": EmbeddingConfig,
                  "eval": EvalConfig, "features": FeaturesConfig, "categories": CategoriesConfig,
                  "checkpoint": CheckpointConfig, "logging": LoggingConfig, "distributed": DistributedConfig}
_CHOICES = {
    ("train", "optimizer"): ("adam", "adamw", "sgd"),
    ("eval", "test"): ("end", "each_best", "never"),
    ("train", "schedule"): ("constant", "linear", "cosine"),
    ("train", "precision"): ("bf16", "fp32", "fp16"),
    ("train", "zero_stage"): (0, 1, 2, 3),
    ("train", "mscl_negatives"): ("global", "local"),
    ("train", "batching"): ("by_length", "random"),
    ("train", "batch_unit"): ("samples", "targets"),
    ("train", "negative_sampler"): ("uniform", "popularity"),
    ("train", "negative_sharing"): ("shared", "per_target"),
    ("embedding", "backend"): ("torchrec", "torch"),
    ("embedding", "sharding"): ("row_wise", "table_wise", "column_wise"),
    ("embedding", "optimizer"): ("exact_rowwise_adagrad", "exact_adagrad", "exact_sgd", "adam"),
    ("distributed", "backend"): ("auto", "gloo", "nccl"),
    ("features", "mode"): ("cached", "stream"),
    ("features", "image_decoder"): ("auto", "dali", "pil"),
    ("categories", "source"): CATEGORY_SOURCES,
    ("categories", "noise_type"): NOISE_TYPES,
}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_type(key: str, value, hint):
    """Value of `key` checked against a type hint; lists become tuples where the hint says tuple."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0])
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list, got {type(value).__name__}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(f"{key}={value!r}: expected {len(args)} values")
            items = [_check_type(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = [_check_type(f"{key}[{i}]", v, args[0]) if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else list(items)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true/false, got {type(value).__name__}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer, got {type(value).__name__}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number, got {type(value).__name__}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string, got {type(value).__name__}")
        return value
    return value


def _build_section(name: str, values: dict):
    cls = _SECTION_TYPES[name]
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown key {name}.{key} (known {name} keys: {', '.join(sorted(known))})")
    checked = {key: _check_type(f"{name}.{key}", value, hints[key]) for key, value in values.items()}
    try:
        return cls(**checked)
    except ValueError as err:  # ModelConfig validation names its field
        raise ConfigError(f"{name}: {err}") from err


def _merge(tree: dict, dotted: str, value) -> None:
    section, _, key = dotted.partition(".")
    tree.setdefault(section, {})
    if not isinstance(tree[section], dict):
        raise ConfigError(f"{section}: expected a mapping")
    tree[section][key] = value


def _resolve_override_key(key: str, value) -> tuple[str, object]:
    if "." in key:
        section = key.split(".", 1)[0]
        if section not in _SECTION_TYPES:
            raise ConfigError(f"unknown key {key} (sections: {', '.join(_SECTION_TYPES)})")
        return key, value
    if key == "model":
        return "model.name", value
    owners = [s for s, cls in _SECTION_TYPES.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if not owners:
        raise ConfigError(f"unknown key {key!r} in override {key}={value!r}")
    if len(owners) > 1:
        raise ConfigError(f"ambiguous key {key!r}: write one of {', '.join(f'{s}.{key}' for s in owners)}")
    return f"{owners[0]}.{key}", value


def is_config_key(dotted: str) -> bool:
    """Whether `section.key` names a field of a config section."""
    section, _, name = dotted.partition(".")
    return section in _SECTION_TYPES and name in {f.name for f in fields(_SECTION_TYPES[section])}


def parse_overrides(items: list[str]) -> list[tuple[str, object]]:
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({err})") from err
        parsed.append(_resolve_override_key(key.strip(), value))
    return parsed


def read_yaml_mapping(path: Path | str, flag: str) -> dict:
    """The mapping in the YAML file `path` ({} when empty); a missing file, bad YAML or a non-mapping stops with
    an error naming `flag` (the option that gave the path) and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{flag} {path}: not valid YAML ({err})") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{flag} {path}: expected a mapping")
    return tree


def load_config(path: Path | str | None = None, overrides: list[str] | None = None,
                world_size: int | None = None, cuda: bool | None = None) -> Config:
    """YAML file (optional) + overrides -> validated Config. `world_size`/`cuda` default to the environment."""
    tree = {} if path is None else read_yaml_mapping(path, "--config")
    for section in tree:
        if section not in _SECTION_TYPES:
            raise ConfigError(f"unknown key {section!r} in {path} (sections: {', '.join(_SECTION_TYPES)})")
    for dotted, value in parse_overrides(overrides or []):
        _merge(tree, dotted, value)
    cfg = Config(**{name: _build_section(name, tree.get(name, {})) for name in _SECTION_TYPES})
    validate(cfg, world_size, cuda)
    return cfg


def in_id_warmup(cfg: Config, epoch: int) -> bool:
    """Whether (0-based) `epoch` trains CAMMSR's ID pathway alone (train.id_warmup_epochs)."""
    return cfg.model.name == "cammsr" and epoch < cfg.train.id_warmup_epochs


def validate(cfg: Config, world_size: int | None = None, cuda: bool | None = None) -> None:
    """Cross-field checks; names the key. Runs before any work."""
    import torch

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    if cuda is None:
        cuda = torch.cuda.is_available()
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key}={value!r}: must be one of {list(allowed)}")
    c = cfg.categories
    if not 0.0 <= c.noise < 1.0:
        raise ConfigError(f"categories.noise={c.noise!r}: must be in [0, 1)")
    if c.virtual_count < 2:
        raise ConfigError(f"categories.virtual_count={c.virtual_count!r}: must be >= 2")
    t = cfg.train
    positive = [("train.batch_size", t.batch_size), ("train.max_epochs", t.max_epochs), ("train.lr", t.lr),
                ("embedding.lr", cfg.embedding.lr), ("eval.every", cfg.eval.every),
                ("eval.batch_size", cfg.eval.batch_size), ("logging.every_steps", cfg.logging.every_steps),
                ("distributed.timeout_s", cfg.distributed.timeout_s), ("checkpoint.keep", cfg.checkpoint.keep)]
    for key, value in positive:
        if value <= 0:
            raise ConfigError(f"{key}={value!r}: must be > 0")
    for key, value in [("train.warmup_steps", t.warmup_steps), ("train.grad_clip", t.grad_clip),
                       ("train.weight_decay", t.weight_decay), ("eval.patience", cfg.eval.patience),
                       ("checkpoint.every_steps", cfg.checkpoint.every_steps), ("eval.max_users", cfg.eval.max_users),
                       ("data.extra_items", cfg.data.extra_items), ("data.image_size", cfg.data.image_size),
                       ("train.id_warmup_epochs", t.id_warmup_epochs), ("features.prefetch", cfg.features.prefetch),
                       ("train.negative_sampler_exponent", t.negative_sampler_exponent)]:
        if value < 0:
            raise ConfigError(f"{key}={value!r}: must be >= 0")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio!r}: must be in [0, 1]")
    if t.precision == "fp16":
        where = "on CPU (DeepSpeed has no fp16 on CPU)" if not cuda else \
            "with a sparse ID table (fp16 loss scaling would scale the fused sparse gradients)"
        raise ConfigError(f"train.precision='fp16' is not supported {where}; use bf16 or fp32")
    if t.zero_stage > 0 and t.optimizer == "sgd":
        raise ConfigError(f"train.optimizer='sgd' is not supported with train.zero_stage={t.zero_stage} "
                          "(DeepSpeed ZeRO accepts adam/adamw client optimizers); use adam/adamw or zero_stage=0")
    if t.batch_size < world_size:
        raise ConfigError(f"train.batch_size={t.batch_size}: the global batch must hold at least one sample "
                          f"per rank (world size {world_size})")
    if t.id_warmup_epochs and cfg.model.name == "cammsr":
        if t.id_warmup_epochs >= t.max_epochs:
            raise ConfigError(f"train.id_warmup_epochs={t.id_warmup_epochs}: must be < train.max_epochs="
                              f"{t.max_epochs} (the epochs after the warm-up select the model)")
        if "id" not in cfg.model.modalities:
            raise ConfigError(f"train.id_warmup_epochs={t.id_warmup_epochs}: needs the 'id' modality in "
                              f"model.modalities={list(cfg.model.modalities)}")
    if t.batch_unit == "targets" and cfg.model.sequence_mode == "all_positions" and \
            t.batch_size < cfg.model.max_seq_len:
        raise ConfigError(f"train.batch_size={t.batch_size} targets: must be >= model.max_seq_len="
                          f"{cfg.model.max_seq_len} with train.batch_unit='targets' (a window scores up to that many)")
    if cfg.embedding.backend == "torch" and world_size > 1:
        raise ConfigError(f"embedding.backend='torch' runs on one process only (world size {world_size}); "
                          "use embedding.backend=torchrec for several processes")
    if cfg.embedding.optimizer == "adam" and cfg.embedding.backend != "torch":
        raise ConfigError("embedding.optimizer='adam' needs embedding.backend=torch (TorchRec's fused tables have "
                          "no Adam kernel on CPU); use exact_rowwise_adagrad with torchrec")
    if cfg.model.loss_type != "full_softmax" and t.num_negatives < 1:
        raise ConfigError(f"train.num_negatives={t.num_negatives!r}: must be >= 1 with model.loss_type="
                          f"{cfg.model.loss_type!r}")
    if cfg.model.loss_type == "gbce" and t.negative_sampler != "uniform":
        raise ConfigError(f"train.negative_sampler={t.negative_sampler!r}: gBCE's calibration assumes uniform "
                          "negatives (model.loss_type='gbce'); use train.negative_sampler=uniform")
    if cfg.data.extra_items and cfg.model.name != "sasrec":
        raise ConfigError(f"data.extra_items={cfg.data.extra_items}: extra items have no text/image features or "
                          f"categories; use it with model.name=sasrec (got {cfg.model.name!r})")
    metrics = {f"{m}@{k}" for m in ("ndcg", "mrr", "recall") for k in cfg.eval.ks}
    if cfg.eval.metric not in metrics:
        raise ConfigError(f"eval.metric={cfg.eval.metric!r}: must be one of {sorted(metrics)} (from eval.ks)")
    if any(k < 1 for k in cfg.eval.ks) or not {5, 10} <= set(cfg.eval.ks):
        raise ConfigError(f"eval.ks={list(cfg.eval.ks)!r}: must include 5 and 10 (metrics.json reports them)")
    if cfg.eval.test == "end" and not cfg.checkpoint.enabled:
        raise ConfigError("eval.test='end' ranks the test split with the best checkpoint's weights, and "
                          "checkpoint.enabled=false writes none: set eval.test=each_best (test after each new best "
                          "validation) or eval.test=never")
    _validate_features(cfg)
    if cfg.distributed.backend == "nccl" and not cuda:
        raise ConfigError("distributed.backend='nccl' needs a GPU; use auto or gloo")


def _validate_features(cfg: Config) -> None:
    from train.encoder_tuning import TUNE_MODES
    f = cfg.features
    for key, value in (("features.encode_batch_size", f.encode_batch_size), ("features.decode_threads",
                                                                            f.decode_threads),
                       ("features.tune_layers", f.tune_layers), ("features.lora_rank", f.lora_rank),
                       ("features.lora_alpha", f.lora_alpha), ("features.side_bottleneck", f.side_bottleneck),
                       ("features.lr", f.lr)):
        if value <= 0:
            raise ConfigError(f"{key}={value!r}: must be > 0")
    if f.weight_decay < 0:
        raise ConfigError(f"features.weight_decay={f.weight_decay!r}: must be >= 0")
    for key in ("tune", "tune_text", "tune_image"):
        value = getattr(f, key)
        if value not in TUNE_MODES and not (key != "tune" and value == ""):
            raise ConfigError(f"features.{key}={value!r}: must be one of {list(TUNE_MODES)}"
                              + ("" if key == "tune" else " or '' (= features.tune)"))
    for modality in ("text", "image"):
        mode = getattr(f, f"tune_{modality}") or f.tune
        if mode in ("top_layers", "lora") and f.mode != "stream":
            raise ConfigError(f"features.tune_{modality}={mode!r} trains the {modality} encoder inside the step: it "
                              "needs features.mode=stream (cached mode never runs the encoder)")
    adapted = [m for m in ("text", "image") if (getattr(f, f"tune_{m}") or f.tune) == "side_adapter"]
    if cfg.model.reads_tokens and (f.mode == "stream" or adapted):
        raise ConfigError(f"model.name={cfg.model.name!r} reads token / patch states from token-level feature stores "
                          "(features.mode=cached, features.tune=frozen): stream mode and side adapters feed pooled "
                          "vectors")
    if cfg.data.text_token_limit < 2 or cfg.data.image_token_grid < 0:
        raise ConfigError(f"data.text_token_limit={cfg.data.text_token_limit!r} must be >= 2 and "
                          f"data.image_token_grid={cfg.data.image_token_grid!r} >= 0")
    if f.mode != "stream" and not adapted:
        return
    why = "features.mode='stream'" if f.mode == "stream" else f"a side adapter ({', '.join(adapted)})"
    if cfg.model.loss_type == "full_softmax":
        raise ConfigError(f"{why} with model.loss_type='full_softmax': a full softmax scores every item, so every "
                          "step would encode the whole catalogue; set model.loss_type=sampled_softmax (or gbce) and "
                          "train.num_negatives" + (", or features.mode=cached" if f.mode == "stream" else ""))
    if cfg.train.negative_sharing != "shared":
        raise ConfigError(f"{why} with train.negative_sharing={cfg.train.negative_sharing!r}: each target's own "
                          "negatives would encode up to targets x num_negatives items per step; set "
                          "train.negative_sharing=shared")
