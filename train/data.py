"""User sequences -> per-rank batches of tensors.

Each rank reads only its users from the shards (`user_sequences(rank, world)`: every user on exactly one rank).
The order of training samples is a seeded permutation of the GLOBAL sample index (users by id, then position),
the same for every world size: global batch b is samples [b*G, (b+1)*G) of that order, and each rank takes the
ones it owns. So 1 process and N processes see the same global batches; every rank runs the same number of steps
and a rank's slice is padded with masked samples (target 0) to the largest slice of that batch (no duplicates).

Sample modes (`model.sequence_mode`): "prefix" (RecBole, the paper's protocol): every prefix of a user's training
part predicts its next item, truncated to the last max_seq_len items. "all_positions": the training part cut from its
end into windows of max_seq_len targets, one sample per window, every position predicting the next item; so every
(prefix, next item) pair of the prefix protocol is a target exactly once per epoch (with up to max_seq_len items of
context, fewer at the start of a window), at the cost of one causal pass per window instead of one per prefix.
Leave-one-out: last item = test target, second to last = validation target, earlier = training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data_shards.problems import DataError
from data_shards.reader import PreparedDataset
from train.distributed import all_gather_objects


@dataclass
class Batch:
    item_seq: torch.Tensor  # [B, L] long, left-aligned, 0 = padding
    seq_len: torch.Tensor  # [B] long (>= 1; padding samples have a dummy length-1 sequence)
    targets: torch.Tensor  # [B] (prefix) or [B, L] (all_positions), 0 = ignore
    real: torch.Tensor  # [B] bool: False for padding samples
    # [B] long, training batches only: each row's index in the global sample order (-1 for padding rows), the
    # same for every world size (what keys per-target negatives)
    samples: torch.Tensor | None = None
    # [B, L] float64: the interaction timestamps (seconds, as in the shards) of item_seq, 0 at padding; what
    # time-aware models (HM4SR) read. None where no times are known (a history typed into `recommend`).
    time_seq: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(None if t is None else t.to(device, non_blocking=True)
                       for t in (self.item_seq, self.seq_len, self.targets, self.real, self.samples,
                                 self.time_seq)))

    def target_keys(self, max_len: int) -> torch.Tensor:
        """A world-size-independent key of each scored target (targets > 0), in `targets.reshape(-1)` order:
        sample index (prefix rows) or sample index * max_len + position (all_positions windows)."""
        scored = self.targets > 0
        if self.targets.dim() == 1:
            return self.samples[scored]
        positions = torch.arange(self.targets.shape[1], device=self.targets.device)
        return (self.samples[:, None] * max_len + positions[None, :])[scored]

    @property
    def num_targets(self) -> int:
        return int((self.targets > 0).sum())


class LocalSequences:
    """This rank's users: concatenated item arrays and their timestamps with offsets (all interactions, val/test
    included)."""

    def __init__(self, data: PreparedDataset, rank: int, world_size: int):
        users, arrays, times = [], [], []
        sequences = list(data.user_sequences(rank, world_size))
        for seq in sequences:
            if len(seq.items) < 3:
                raise DataError(f"user {seq.user_id} ({seq.original_id}) has {len(seq.items)} interactions; "
                                "leave-one-out needs 3")
            users.append(seq.user_id)
            arrays.append(seq.items)
            times.append(seq.timestamps)
        order = np.argsort(np.asarray(users, dtype=np.int64), kind="stable")
        self.user_ids = np.asarray(users, dtype=np.int64)[order]
        arrays, times = [arrays[i] for i in order], [times[i] for i in order]
        self.lengths = np.asarray([len(a) for a in arrays], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        self.flat_times = np.concatenate(times).astype(np.float64) if times else np.zeros(0, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def train_lengths(self) -> np.ndarray:
        return self.lengths - 2


def _windows(flat: np.ndarray, ends: np.ndarray, lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Rows of flat[end - length : end], left-aligned into [R, W] with 0 padding, where W is the longest row
    (at most max_len): a batch of short histories costs what its longest history costs, not max_len."""
    width = int(min(max_len, max(int(lengths.max(initial=0)), 1)))
    cols = np.arange(width)[None, :]
    idx = ends[:, None] - lengths[:, None] + cols
    valid = cols < lengths[:, None]
    return np.where(valid, flat[np.clip(idx, 0, max(len(flat) - 1, 0))], 0)


class TrainPlan:
    """The global sample order per epoch and this rank's share of each global batch (optionally batches of
    similar history lengths: `by_length`).

    `batch_unit` says what `global_batch` counts: "samples" (rows), or "targets" (scored positions: a window of
    all_positions mode counts its length; a prefix sample counts 1). A batch of targets is cut from the epoch's
    order where the running target count crosses a multiple of `global_batch`, so every step scores about the same
    number of targets however long its windows are, and every target weighs the same in the epoch's loss."""

    def __init__(self, local: LocalSequences, mode: str, max_len: int, global_batch: int, seed: int,
                 rank: int, world_size: int, by_length: bool = False, batch_unit: str = "samples"):
        if batch_unit == "targets" and mode == "all_positions" and global_batch < max_len:
            raise ValueError(f"a batch of {global_batch} targets cannot hold a window of {max_len} targets")
        self.local, self.mode, self.max_len, self.by_length = local, mode, max_len, by_length
        self.global_batch, self.seed, self.rank, self.world = global_batch, seed, rank, world_size
        pairs = np.maximum(local.train_lengths - 1, 0)
        counts = pairs if mode == "prefix" else -(-pairs // max_len)
        gathered = all_gather_objects((local.user_ids, counts, pairs))
        user_ids = np.concatenate([g[0] for g in gathered])
        all_counts = np.concatenate([g[1] for g in gathered])
        all_pairs = np.concatenate([g[2] for g in gathered])
        owners = np.concatenate([np.full(len(g[0]), r, dtype=np.int64) for r, g in enumerate(gathered)])
        local_index = np.concatenate([np.arange(len(g[0]), dtype=np.int64) for g in gathered])
        order = np.argsort(user_ids, kind="stable")  # global sample index: users by id, then position
        all_counts, all_pairs = all_counts[order], all_pairs[order]
        owners, local_index = owners[order], local_index[order]
        if len(np.unique(user_ids)) != len(user_ids):
            raise DataError("a user appears on two ranks: the user split is not a partition")
        self.num_users = len(user_ids)
        self.num_samples = int(all_counts.sum())
        if self.num_samples == 0:
            raise DataError("no training samples: every user's training part is shorter than 2 items")
        self.sample_owner = np.repeat(owners, all_counts)
        self.sample_local_user = np.repeat(local_index, all_counts)
        starts = np.concatenate([[0], np.cumsum(all_counts)[:-1]])
        self.sample_position = np.arange(self.num_samples) - np.repeat(starts, all_counts)
        if mode == "prefix":  # history length of each sample: what its row costs
            self.sample_length = np.minimum(self.sample_position + 1, max_len)
        else:
            self.sample_length = np.minimum(np.repeat(all_pairs, all_counts) - self.sample_position * max_len,
                                            max_len)
        self.sample_targets = self.sample_length if mode == "all_positions" else np.ones_like(self.sample_length)
        self.sample_units = self.sample_targets if batch_unit == "targets" else np.ones_like(self.sample_length)
        self.num_targets = int(self.sample_targets.sum())
        # every batch is non-empty: consecutive cumulative counts differ by at most max_len <= global_batch
        self.steps_per_epoch = -(-int(self.sample_units.sum()) // global_batch)

    def epoch_batches(self, epoch: int, start_step: int = 0):
        """Yield (step, Batch) of this rank for `epoch`, from `start_step` (resume inside an epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.num_samples)
        if self.by_length:  # similar lengths share a batch; the batches' order stays random
            perm = perm[np.argsort(self.sample_length[perm], kind="stable")]
        batch_index = (np.cumsum(self.sample_units[perm]) - 1) // self.global_batch
        if self.by_length:
            batch_index = rng.permutation(self.steps_per_epoch)[batch_index]
            regroup = np.argsort(batch_index, kind="stable")
            perm, batch_index = perm[regroup], batch_index[regroup]
        owner = self.sample_owner[perm]
        sizes = np.zeros((self.world, self.steps_per_epoch), dtype=np.int64)
        np.add.at(sizes, (owner, batch_index), 1)
        width = np.maximum(sizes.max(axis=0), 1)  # every rank holds at least one (masked) sample
        mine = owner == self.rank
        my_samples, my_batches = perm[mine], batch_index[mine]
        bounds = np.searchsorted(my_batches, np.arange(self.steps_per_epoch + 1))
        for step in range(start_step, self.steps_per_epoch):
            chosen = my_samples[bounds[step]:bounds[step + 1]]
            yield step, self._build(chosen, int(width[step]))

    def _build(self, samples: np.ndarray, width: int) -> Batch:
        local, L = self.local, self.max_len
        users = self.sample_local_user[samples]
        start = local.offsets[users]
        if self.mode == "prefix":
            target_pos = self.sample_position[samples] + 1  # index within the training part
            lengths = np.minimum(target_pos, L)
            seqs = _windows(local.flat, start + target_pos, lengths, L)
            times = _windows(local.flat_times, start + target_pos, lengths, L)
            targets = local.flat[start + target_pos]
        else:  # window w (0 = latest) predicts training items (hi - length, hi], hi = train_len - 1 - w * L
            last_target = local.train_lengths[users] - 1 - self.sample_position[samples] * L
            lengths = np.minimum(last_target, L)
            seqs = _windows(local.flat, start + last_target, lengths, L)
            times = _windows(local.flat_times, start + last_target, lengths, L)
            targets = _windows(local.flat, start + last_target + 1, lengths, L)
        pad = width - len(samples)
        real = np.concatenate([np.ones(len(samples), bool), np.zeros(pad, bool)])
        keys = np.concatenate([samples, np.full(pad, -1)]).astype(np.int64)
        if pad:
            dummy = np.zeros((pad, seqs.shape[1]), dtype=np.int64)
            dummy[:, 0] = 1  # a valid length-1 sequence (keeps attention finite); its target is ignored
            seqs = np.concatenate([seqs, dummy])
            times = np.concatenate([times, np.zeros(dummy.shape, dtype=np.float64)])
            lengths = np.concatenate([lengths, np.ones(pad, dtype=np.int64)])
            target_pad = np.zeros((pad,) + targets.shape[1:], dtype=np.int64)
            targets = np.concatenate([targets, target_pad])
        return Batch(torch.from_numpy(seqs), torch.from_numpy(lengths.astype(np.int64)),
                     torch.from_numpy(targets.astype(np.int64)), torch.from_numpy(real), torch.from_numpy(keys),
                     torch.from_numpy(times))


def eval_order(local: LocalSequences, users: np.ndarray | None = None) -> np.ndarray:
    """Indices into `local` (all, or `users`) in evaluation order: by sequence length, so that a batch of short
    histories is as wide as its longest one instead of max_len (Beauty: median history 6, a batch of 1024 users
    in id order almost always holds one of 50)."""
    chosen = np.arange(len(local)) if users is None else np.asarray(users, dtype=np.int64)
    return chosen[np.argsort(local.lengths[chosen], kind="stable")]


def eval_batches(local: LocalSequences, split: str, max_len: int, batch_size: int, users: np.ndarray | None = None):
    """This rank's users for `split` ("valid": history = items[:-2], target items[-2]; "test": items[:-1], items[-1])
    in `eval_order`; `users`: indices into `local` to evaluate (all when None)."""
    drop = 2 if split == "valid" else 1
    chosen = eval_order(local, users)
    for begin in range(0, len(chosen), batch_size):
        users = chosen[begin:begin + batch_size]
        hist_end = local.offsets[users] + local.lengths[users] - drop
        hist_len = np.minimum(local.lengths[users] - drop, max_len)
        seqs = _windows(local.flat, hist_end, hist_len, max_len)
        times = _windows(local.flat_times, hist_end, hist_len, max_len)
        targets = local.flat[hist_end]
        yield Batch(torch.from_numpy(seqs), torch.from_numpy(hist_len.astype(np.int64)),
                    torch.from_numpy(targets.astype(np.int64)), torch.ones(len(users), dtype=torch.bool),
                    time_seq=torch.from_numpy(times))
