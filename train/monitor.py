"""TensorBoard (rank 0), metrics.json and the console progress bars.

Tags: train/loss/{total,recommendation,mscl,category}, train/lr, perf/{samples,tokens,targets}_per_s, perf/step_time_s,
perf/{images,texts}_per_s and perf/stream/{read,decode,tokenize,encode}_s (stream mode),
memory/{rss_mb,cuda_max_allocated_mb}, valid/<metric>, test/<metric>, cammsr/modality_weight/<modality>
(mean) and /by_category (histogram over categories) and /<category>/<modality> (scalars, first
logging.max_category_scalars categories), cammsr/expert_usage/<group>/expert<k> (group: a modality, a FindRec
head, TAME's id_enrichment), and the resolved config (text).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from train.checkpoint import atomic_write_text


def progress_bar(total: int, desc: str, unit: str, enabled: bool, initial: int = 0) -> tqdm:
    """Rate and ETA on stderr, cleared when done; redrawn every second on a terminal, every 30 s into a log file."""
    interval = 1 if sys.stderr.isatty() else 30
    # tqdm's monitor thread redraws a bar idle for maxinterval (10 s by default), which overrides a longer mininterval
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                mininterval=interval, maxinterval=max(interval, 10), disable=not enabled)


class Monitor:
    def __init__(self, run_dir: Path, enabled: bool, is_main: bool):
        self.is_main = is_main
        self.writer = None
        if enabled and is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.process = psutil.Process(os.getpid())

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def memory(self, step: int) -> dict[str, float]:
        values = {"memory/rss_mb": self.process.memory_info().rss / 2 ** 20}
        if torch.cuda.is_available():
            values["memory/cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        self.scalars(values, step)
        return values

    def config_text(self, yaml_text: str) -> None:
        if self.writer is not None:
            self.writer.add_text("config", "```yaml\n" + yaml_text + "\n```", 0)

    def cammsr_signals(self, modality_sums, category_counts, expert_usage, modalities, expert_groups,
                       category_names, max_scalars: int, step: int) -> None:
        """modality_sums [C, M] (sum of weights over labelled positions), category_counts [C], expert_usage [G, K]
        for the routed groups `expert_groups` (the modalities for CAMMSR and HM4SR, FindRec's heads, TAME's ID
        enrichment)."""
        if self.writer is None:
            return
        if modality_sums is not None:
            seen = category_counts > 0
            means = modality_sums[seen] / category_counts[seen, None]
            overall = modality_sums.sum(0) / category_counts.sum().clamp_min(1)
            names = [n for n, s in zip(category_names, seen.tolist()) if s]
            for m, modality in enumerate(modalities):
                self.writer.add_scalar(f"cammsr/modality_weight/{modality}", float(overall[m]), step)
                if len(means):
                    self.writer.add_histogram(f"cammsr/modality_weight/by_category/{modality}", means[:, m], step)
                for c, name in enumerate(names[:max_scalars]):
                    self.writer.add_scalar(f"cammsr/modality_weight/{name}/{modality}", float(means[c, m]), step)
        if expert_usage is not None:
            for g, group in enumerate(expert_groups):
                for k in range(expert_usage.shape[1]):
                    self.writer.add_scalar(f"cammsr/expert_usage/{group}/expert{k}", float(expert_usage[g, k]), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_metrics(run_dir: Path, payload: dict) -> None:
    atomic_write_text(Path(run_dir) / "metrics.json", json.dumps(payload, indent=1, sort_keys=True))
