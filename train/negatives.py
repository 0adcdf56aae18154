"""Negatives of the sampled losses (sampled softmax, gBCE): S item ids per GLOBAL step shared by every row of the
global batch (`draw`), or S ids of each scored target's own (`draw_per_target`, as RecTools' SASRec draws them).

Shared: every rank draws the same ids for a step from a generator seeded with (seed, global step). Per target: the
ids are a counter-based hash of (seed, global step, the target's global key, j), the key being the target's
position in the epoch's global sample order, so the draws of a target do not depend on which rank holds it. Either
way N processes compute what one process computes on the same global batch, and a resumed run draws what the
uninterrupted one drew. Draws are with replacement (duplicates are kept: with logQ correction that is the
unbiased estimator).

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


def _splitmix64_(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array, in place (wrapping arithmetic): a fast, well-mixed counter-based
    hash. In place because a step hashes T x S counters twice (Beauty: 524,288): temporaries cost more than the
    arithmetic."""
    shifted = x >> np.uint64(30)
    x ^= shifted
    x *= np.uint64(0xBF58476D1CE4E5B9)
    np.right_shift(x, np.uint64(27), out=shifted)
    x ^= shifted
    x *= np.uint64(0x94D049BB133111EB)
    np.right_shift(x, np.uint64(31), out=shifted)
    x ^= shifted
    return x


def _uniform_per_key(seed: int, step: int, keys: np.ndarray, count: int) -> np.ndarray:
    """[len(keys), count] floats in [0, 1), a pure function of (seed, step, key, column)."""
    base = _splitmix64_(np.array([seed, _STREAM, step], dtype=np.uint64)).sum(dtype=np.uint64)
    bits = keys.astype(np.uint64)[:, None] * np.uint64(count) + np.arange(count, dtype=np.uint64)[None, :]
    bits ^= base
    _splitmix64_(bits)
    bits += base
    _splitmix64_(bits)
    bits >>= np.uint64(11)
    uniform = bits.astype(np.float64)
    uniform *= 2.0 ** -53
    return uniform


def distinct_ids(ids: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(ids, return_inverse=True) for ids in [0, num_rows): (the sorted distinct ids, each id's index
    among them). A step's targets and per-target negatives (Beauty: ~525,000 draws over 12,102 rows) are counted
    into a table of num_rows flags instead of sorted, 5x faster; a catalogue much larger than the draws is sorted."""
    if num_rows > 4 * ids.numel():
        return torch.unique(ids, return_inverse=True)
    present = torch.bincount(ids, minlength=num_rows) > 0
    return present.nonzero().squeeze(1), (present.cumsum(0) - 1)[ids]


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

    def describe(self, per_target: bool = False) -> str:
        how = "uniform" if self.kind == "uniform" else f"popularity (count^{self.exponent:g}, logQ-corrected)"
        where = "per scored target" if per_target else "shared per global step"
        return f"{self.num_negatives} negatives {where}, {how}"

    def draw(self, global_step: int) -> torch.Tensor:
        """The step's negative ids [S] (int64, CPU), identical on every rank and for every world size."""
        rng = np.random.default_rng([self.seed, _STREAM, global_step])
        if self._cdf is None:
            return torch.from_numpy(rng.integers(1, self.num_rows, size=self.num_negatives).astype(np.int64))
        return self._from_uniform(rng.random(self.num_negatives))

    def draw_per_target(self, global_step: int, keys: torch.Tensor) -> torch.Tensor:
        """Negative ids [T, S] (int64, CPU) of the targets whose global keys are `keys` [T]."""
        uniform = _uniform_per_key(self.seed, global_step, keys.cpu().numpy(), self.num_negatives)
        if self._cdf is None:
            ids = 1 + np.minimum((uniform * (self.num_rows - 1)).astype(np.int64), self.num_rows - 2)
            return torch.from_numpy(ids)
        return self._from_uniform(uniform)

    def _from_uniform(self, uniform: np.ndarray) -> torch.Tensor:
        """Popularity draws by inverting the CDF at `uniform` (any shape)."""
        ids = np.searchsorted(self._cdf, uniform * self._cdf[-1], side="right")
        ids = np.minimum(ids, self._last)  # u * total rounded up to total (measure zero)
        return torch.from_numpy(ids.astype(np.int64))

    def log_q(self, ids: torch.Tensor) -> torch.Tensor | None:
        """log sampling probability of each id (None for uniform: a constant cancels in the softmax)."""
        if self._log_weight is None:
            return None
        return self._log_weight[ids.cpu()].to(ids.device)
