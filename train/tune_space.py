"""The search space of a tuning study (`cammsr tune --space S.yaml`), read and checked before the first trial.

    metric: ndcg@10                 # validation metric to maximise (default: the config's eval.metric)
    seed: 0                         # the sampler's (TPE) seed
    pruner: {kind: median, startup_trials: 5, warmup_rounds: 5}   # median | threshold (lower: x) | none
    fixed:                          # overrides applied to every trial
      eval.patience: 10
    params:                         # section.key (or a unique key) -> a distribution
      train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # float: float bounds (optional step or log)
      model.num_layers: {low: 1, high: 3}                 # int: int bounds (optional step)
      train.num_negatives: {choices: [128, 256, 512]}     # categorical

Every key must be a config key, and every bound, choice and fixed value must pass the config's validation on top
of the base config; the first that does not stops the study before any trial, naming it. The study owns
`eval.test` (always "never": a study never ranks the test split) and `data.path`, so neither may appear here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from train.config import Config, ConfigError, is_config_key, load_config, parse_overrides, read_yaml_mapping

_TOP_LEVEL = {"metric", "seed", "pruner", "fixed", "params"}
_PRUNERS = {"median": {"startup_trials", "warmup_rounds"}, "threshold": {"lower", "warmup_rounds"}, "none": set()}
_OWNED_BY_THE_STUDY = {"eval.test", "data.path"}


@dataclass(frozen=True)
class Param:
    key: str  # section.key
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def extremes(self) -> list:
        """The values whose validity stands for the whole range: the bounds, or every choice."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def distinct_values(self) -> int | None:
        """How many values the parameter can take; None for a continuous range."""
        if self.choices is not None:
            return len(set(map(json.dumps, self.choices)))
        integer = isinstance(self.low, int) and isinstance(self.high, int)
        step = self.step or (1 if integer else None)
        if step is None:
            return None
        return int(math.floor((self.high - self.low) / step + 1e-9)) + 1


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    metric: str
    seed: int
    pruner: dict
    fixed: dict = field(default_factory=dict)  # section.key -> value
    params: tuple[Param, ...] = ()

    def overrides(self, values: dict) -> list[str]:
        """`key=value` overrides of the fixed values and a trial's sampled `values` (JSON is valid YAML)."""
        return [f"{key}={json.dumps(value)}" for key, value in {**self.fixed, **values}.items()]

    def configurations(self) -> int | None:
        """How many distinct configurations the space holds; None when a parameter is continuous."""
        counts = [param.distinct_values() for param in self.params]
        return None if None in counts else math.prod(counts)

    def fingerprint_payload(self) -> dict:
        return {"metric": self.metric, "seed": self.seed, "pruner": self.pruner, "fixed": self.fixed,
                "params": [vars(p) for p in self.params]}


def _fail(path: Path, where: str, message: str) -> None:
    raise ConfigError(f"--space {path}: {where}: {message}")


def _param(path: Path, key: str, spec) -> Param:
    where = f"params.{key}"
    if not isinstance(spec, dict):
        _fail(path, where, f"expected a mapping (low/high[/log/step] or choices), got {spec!r}")
    unknown = set(spec) - {"low", "high", "log", "step", "choices"}
    if unknown:
        _fail(path, where, f"unknown field(s) {sorted(unknown)}; known: low, high, log, step, choices")
    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            _fail(path, where, "choices must be a non-empty list, alone")
        return Param(key, choices=tuple(spec["choices"]))
    if "low" not in spec or "high" not in spec:
        _fail(path, where, "needs low and high (or choices)")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
        _fail(path, where, f"low={low!r} and high={high!r} must be numbers with low < high")
    if spec.get("log") and low <= 0:
        _fail(path, where, f"log=true needs low > 0 (low={low!r})")
    return Param(key, low=low, high=high, log=bool(spec.get("log", False)), step=spec.get("step"))


def _pruner(path: Path, spec) -> dict:
    spec = {"kind": "median"} if spec is None else spec
    if not isinstance(spec, dict) or spec.get("kind") not in _PRUNERS:
        _fail(path, "pruner", f"expected a mapping with kind one of {sorted(_PRUNERS)}, got {spec!r}")
    unknown = set(spec) - {"kind"} - _PRUNERS[spec["kind"]]
    if unknown:
        _fail(path, "pruner", f"unknown field(s) {sorted(unknown)} for kind {spec['kind']!r}")
    if spec["kind"] == "threshold" and "lower" not in spec:
        _fail(path, "pruner", "kind 'threshold' needs lower (prune a trial whose metric falls below it)")
    return dict(spec)


def _resolved_key(path: Path, where: str, key: str) -> str:
    try:
        dotted = parse_overrides([f"{key}=0"])[0][0]
    except ConfigError as err:
        _fail(path, where, str(err))
    if not is_config_key(dotted):
        _fail(path, where, f"unknown key {dotted!r} (not a field of a config section)")
    if dotted in _OWNED_BY_THE_STUDY:
        _fail(path, where, f"{dotted} is set by the study (eval.test=never, data.path from --data)")
    return dotted


def load_space(path: Path | str, config: Path | str | None, data: str) -> tuple[SearchSpace, Config]:
    """The space of `path`, checked against the base `config` on `data`; also returns the base config."""
    path = Path(path)
    tree = read_yaml_mapping(path, "--space")
    unknown = set(tree) - _TOP_LEVEL
    if unknown:
        _fail(path, "top level", f"unknown key(s) {sorted(unknown)}; known: {sorted(_TOP_LEVEL)}")
    params_tree = tree.get("params") or {}
    if not isinstance(params_tree, dict) or not params_tree:
        _fail(path, "params", "needs at least one parameter")
    fixed_tree = tree.get("fixed") or {}
    if not isinstance(fixed_tree, dict):
        _fail(path, "fixed", "expected a mapping of key: value")
    fixed = {_resolved_key(path, f"fixed.{key}", key): value for key, value in fixed_tree.items()}
    params = tuple(_param(path, _resolved_key(path, f"params.{key}", key), spec) for key, spec in params_tree.items())
    base_overrides = [f"data.path={data}", "eval.test=never"]
    try:
        base = load_config(config, base_overrides + [f"{k}={json.dumps(v)}" for k, v in fixed.items()])
    except ConfigError as err:
        _fail(path, "fixed", str(err))
    space = SearchSpace(path, str(tree.get("metric", base.eval.metric)), int(tree.get("seed", 0)),
                        _pruner(path, tree.get("pruner")), fixed, params)
    metrics = {f"{m}@{k}" for m in ("ndcg", "mrr", "recall") for k in base.eval.ks}
    if space.metric not in metrics:
        _fail(path, "metric", f"{space.metric!r} is not one of {sorted(metrics)}")
    for param in params:
        for value in param.extremes():
            try:
                load_config(config, base_overrides + space.overrides({param.key: value}))
            except ConfigError as err:
                _fail(path, f"params.{param.key}", f"value {value!r} fails the config's validation: {err}")
    return space, base


__all__ = ["Param", "SearchSpace", "load_space"]
