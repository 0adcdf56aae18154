"""Negatives of the sampled softmax: S item ids per GLOBAL step, shared by every row of the global batch.

Every rank draws the same ids for a step from a generator seeded with (seed, global step), so N processes compute
what one process computes on the same global batch, and a resumed run draws what the uninterrupted one drew.
Draws are with replacement (duplicates are kept: with logQ correction that is the unbiased estimator).

- uniform: ids 1..N with probability 1/N each (the logQ correction is a constant and is left out);
- popularity: q(i) proportional to count(i)^exponent, counts = occurrences in the training parts of all users
  (summed over ranks, so every rank holds the same distribution); items never in a training part have q = 0
  and are never drawn. log q of the negatives AND of the targets is subtracted from their logits (logQ).
"""

from __future__ import annotations

import numpy as np
import torch

from train.data import LocalSequences
from train.distributed import all_reduce_sum

_STREAM = 0x6E6567  # separates these draws from every other generator seeded with the run's seed


def training_counts(local: LocalSequences, num_rows: int) -> np.ndarray:
    """Occurrences of each item id in the training parts (all but the last two items) of ALL users' histories,
    int64 [num_rows]; a collective when the process group has several ranks."""
    starts = np.repeat(local.offsets[:-1], local.lengths)
    position = np.arange(len(local.flat)) - starts
    in_train = position < np.repeat(local.lengths - 2, local.lengths)
    counts = torch.from_numpy(np.bincount(local.flat[in_train], minlength=num_rows).astype(np.int64))
    return all_reduce_sum(counts).numpy()


class NegativeSampler:
    def __init__(self, kind: str, num_rows: int, num_negatives: int, seed: int, counts: np.ndarray | None = None,
                 exponent: float = 0.75):
        """num_rows = N + 1 (row 0 is padding, never drawn)."""
        self.kind, self.num_rows, self.num_negatives, self.seed = kind, num_rows, num_negatives, seed
        self.exponent = exponent
        self._cdf = self._log_weight = None
        if kind == "popularity":
            if counts is None or len(counts) != num_rows:
                raise ValueError("the popularity sampler needs one training count per table row")
            weight = counts.astype(np.float64) ** exponent
            weight[counts == 0] = 0.0  # also for exponent 0: an item never trained on is never drawn
            weight[0] = 0.0
            self._cdf = np.cumsum(weight)
            if self._cdf[-1] <= 0:
                raise ValueError("the popularity sampler found no training interactions")
            self._last = int(np.flatnonzero(weight)[-1])
            with np.errstate(divide="ignore"):
                log_q = np.log(weight) - np.log(self._cdf[-1])
            self._log_weight = torch.from_numpy(log_q.astype(np.float32))
        elif kind != "uniform":
            raise ValueError(f"unknown negative sampler {kind!r}")

    def describe(self) -> str:
        how = "uniform" if self.kind == "uniform" else f"popularity (count^{self.exponent:g}, logQ-corrected)"
        return f"sampled softmax, {self.num_negatives} shared negatives per global step, {how}"

    def draw(self, global_step: int) -> torch.Tensor:
        """The step's negative ids [S] (int64, CPU), identical on every rank and for every world size."""
        rng = np.random.default_rng([self.seed, _STREAM, global_step])
        if self._cdf is None:
            ids = rng.integers(1, self.num_rows, size=self.num_negatives)
        else:
            ids = np.searchsorted(self._cdf, rng.random(self.num_negatives) * self._cdf[-1], side="right")
            ids = np.minimum(ids, self._last)  # u * total rounded up to total (measure zero)
        return torch.from_numpy(ids.astype(np.int64))

    def log_q(self, ids: torch.Tensor) -> torch.Tensor | None:
        """log sampling probability of each id (None for uniform: a constant cancels in the softmax)."""
        if self._log_weight is None:
            return None
        return self._log_weight[ids.cpu()].to(ids.device)
