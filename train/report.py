"""A run's report: PNG plots of the training curves, modality weights per category and expert usage,
read back from the run's TensorBoard events and metrics.json (nothing is logged twice)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

MODALITY_PREFIX = "cammsr/modality_weight/"
EXPERT_PREFIX = "cammsr/expert_usage/"


def _events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return events


def _last(events: EventAccumulator, tag: str) -> float:
    return events.Scalars(tag)[-1].value


def _training_curves(events: EventAccumulator, metrics: dict, path: Path) -> None:
    tags = events.Tags()["scalars"]
    figure, (losses, quality) = plt.subplots(1, 2, figsize=(11, 4))
    for tag in sorted(t for t in tags if t.startswith("train/loss/")):
        points = events.Scalars(tag)
        losses.plot([p.step for p in points], [p.value for p in points], label=tag.rsplit("/", 1)[1])
    losses.set(xlabel="step", ylabel="loss", title="training loss")
    losses.legend()
    history = metrics.get("history", [])
    for metric in ("ndcg@10", "mrr@10", "recall@10"):
        values = [(row["epoch"], row["valid"][metric]) for row in history if metric in row.get("valid", {})]
        if values:
            quality.plot(*zip(*values), marker="o", label=f"valid {metric}")
    if metrics.get("best_epoch") is not None:
        quality.axvline(metrics["best_epoch"], color="grey", linestyle="--", label="best epoch")
    quality.set(xlabel="epoch", title="validation")
    quality.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _modality_weights(events: EventAccumulator, path: Path) -> bool:
    """Stacked bars: the mean weight of each modality on the items of each category (last logged)."""
    per_category: dict[str, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        if not tag.startswith(MODALITY_PREFIX) or tag.count("/") < 3:
            continue
        category, modality = tag[len(MODALITY_PREFIX):].rsplit("/", 1)
        if category != "by_category":
            per_category.setdefault(category, {})[modality] = _last(events, tag)
    if not per_category:
        return False
    categories = sorted(per_category)
    modalities = sorted({m for weights in per_category.values() for m in weights})
    figure, axis = plt.subplots(figsize=(max(6, 0.45 * len(categories)), 4.5))
    bottom = np.zeros(len(categories))
    for modality in modalities:
        values = np.array([per_category[c].get(modality, 0.0) for c in categories])
        axis.bar(categories, values, bottom=bottom, label=modality)
        bottom += values
    axis.set(ylabel="mean modality weight w (Eq. 10)", title="category-guided modality weights")
    axis.tick_params(axis="x", rotation=75, labelsize=7)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _expert_usage(events: EventAccumulator, path: Path) -> bool:
    usage: dict[str, dict[int, float]] = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith(EXPERT_PREFIX):
            group, expert = tag[len(EXPERT_PREFIX):].split("/")
            usage.setdefault(group, {})[int(expert.removeprefix("expert"))] = _last(events, tag)
    if not usage:
        return False
    groups = sorted(usage)
    experts = sorted({k for row in usage.values() for k in row})
    matrix = np.array([[usage[g].get(k, 0.0) for k in experts] for g in groups])
    figure, axis = plt.subplots(figsize=(1.2 * len(experts) + 2, 0.8 * len(groups) + 1.5))
    image = axis.imshow(matrix, cmap="viridis", aspect="auto")
    axis.set_xticks(range(len(experts)), [f"expert {k}" for k in experts])
    axis.set_yticks(range(len(groups)), groups)
    for (row, column), value in np.ndenumerate(matrix):
        axis.text(column, row, f"{value:.2f}", ha="center", va="center", color="white", fontsize=8)
    axis.set_title("mean router weight per expert")
    figure.colorbar(image)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(run_dir: Path) -> list[Path]:
    """Write the plots into RUN/report/ and return their paths."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    events = _events(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    written = [out / "training_curves.png"]
    _training_curves(events, metrics, written[0])
    if _modality_weights(events, out / "modality_weights_by_category.png"):
        written.append(out / "modality_weights_by_category.png")
    if _expert_usage(events, out / "expert_usage.png"):
        written.append(out / "expert_usage.png")
    return written
