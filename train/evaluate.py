"""Exact distributed full ranking: every rank ranks ITS users (each user on one rank) against all items; what is
combined across ranks is integer: a histogram of (rank, tie count) pairs of the users ranked within max(ks), and the
user count. Metric sums are computed from that histogram in a fixed order, so the result is bit-identical for every
world size (summing float metric sums across ranks would differ in the last bits with the summation order). No
padded duplicates: ranks that run out of users run masked dummy chunks (so ZeRO-3's per-forward collectives stay in
step) which count for nothing.

Memory is O(users x d + chunk): the user vectors of this rank's users are computed first (sequence rows looked up in
the ID table), then the catalogue is read `chunk_size` item ids at a time (`table.rows`, a collective with the same
chunks on every rank) and scored against them; the full table is never held. Two passes over the chunks: the
first reads each target's score from the same matmul that scores the other items, the second counts the items
scoring strictly higher and those scoring equal (cammsr.metrics: tied items count as in a random order).
`exclude_history` (eval.exclude_history) ranks each target among the items its user has not interacted with
before it, as RecBole's full-sort evaluator and RecTools' filter_viewed do: history items score -inf in both passes
(a target that repeats a history item therefore ranks at the end).
`eval.max_users` picks a fixed subset of users (`evaluation_users`) where ranking every user against 10M items would
take too long.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from cammsr.base import ModelOutput
from cammsr.metrics import histogram_metric_sums, rank_tie_histogram, sums_to_means
from cammsr.scoring import count_higher_and_tied
from train.data import Batch, LocalSequences, eval_batches, eval_order
from train.distributed import all_gather_objects, all_reduce_sum
from train.monitor import progress_bar
from train.step import model_inputs

_SUBSET_STREAM = 0x6576616C  # the evaluation subset's generator, apart from every other draw of the run's seed
# users x items scored at once: 8 MB of fp32 scores, small enough to stay in a CPU's cache while they are masked, read
# and counted (a block of one user batch, 1,024 users x Beauty's 12,101 items, is 50 MB)
_SCORE_BLOCK_ELEMENTS = 1 << 21


def last_position(output: ModelOutput, seq_len: torch.Tensor) -> ModelOutput:
    """All-positions outputs ([B, L, M, d]) read at the last valid position, like prefix outputs ([B, M, d])."""
    if output.user_vectors.dim() == 3:
        return output
    rows = torch.arange(seq_len.shape[0], device=seq_len.device)
    offset = None if output.score_offset is None else output.score_offset[rows, seq_len - 1]
    return ModelOutput(user_vectors=output.user_vectors[rows, seq_len - 1], valid=output.valid, score_offset=offset)


def evaluation_users(local: LocalSequences, max_users: int, seed: int) -> np.ndarray | None:
    """Indices into `local` of this rank's evaluated users: all (None) when max_users is 0 or covers everyone,
    else this rank's part of one seeded subset of max_users user ids, the same for every world size."""
    if max_users <= 0:
        return None
    every = np.sort(np.concatenate(all_gather_objects(local.user_ids)))
    if max_users >= len(every):
        return None
    chosen = np.random.default_rng([seed, _SUBSET_STREAM]).choice(every, size=max_users, replace=False)
    return np.flatnonzero(np.isin(local.user_ids, chosen))


def _dummy(max_len: int) -> Batch:
    seq = torch.zeros(1, max_len, dtype=torch.long)
    seq[0, 0] = 1
    return Batch(seq, torch.ones(1, dtype=torch.long), torch.ones(1, dtype=torch.long),
                 torch.zeros(1, dtype=torch.bool), time_seq=torch.zeros(1, max_len, dtype=torch.float64))


def history_pairs(local: LocalSequences, split: str, users: np.ndarray | None, device) -> tuple:
    """(row, item id) of every history item of the evaluated users, rows in evaluation order (`eval_order`, so
    ascending): what exclude_history masks. The history is everything before the split's target."""
    drop = 2 if split == "valid" else 1
    order = eval_order(local, users)
    lengths = local.lengths[order] - drop
    rows = np.repeat(np.arange(len(order)), lengths)
    starts = np.repeat(local.offsets[order], lengths)
    within = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    items = local.flat[starts + within]
    return torch.from_numpy(rows).to(device), torch.from_numpy(items.astype(np.int64)).to(device)


def _mask_history(scores: torch.Tensor, pairs: tuple, rows: slice, start: int, end: int) -> None:
    """-inf where the block scores[rows, start:end] holds a user's history item."""
    row, item = pairs
    bounds = torch.tensor([rows.start, rows.start + scores.shape[0]], device=row.device)
    low, high = torch.searchsorted(row, bounds).tolist()  # rows are ascending: this block's pairs are one slice
    row, item = row[low:high], item[low:high]
    inside = (item >= start) & (item < end)
    scores[row[inside] - rows.start, item[inside] - start] = float("-inf")


def _item_chunks(num_rows: int, chunk_size: int):
    for start in range(1, num_rows, chunk_size):
        yield start, min(start + chunk_size, num_rows)


@torch.no_grad()
def evaluate(model, table, items, local: LocalSequences, split: str, max_len: int, batch_size: int,
             ks: tuple[int, ...], device: torch.device, dtype: torch.dtype, users: np.ndarray | None = None,
             chunk_size: int = 65536, progress: bool = False, exclude_history: bool = False) -> dict[str, float]:
    """{"ndcg@5": ..., "mrr@10": ..., "recall@10": ..., "count": users} for `split` ("valid" | "test");
    `progress` shows a bar over the user batches and catalogue chunks."""
    was_training = model.training
    model.eval()
    num_local = len(local) if users is None else len(users)
    chunks = torch.tensor([-(-num_local // batch_size)], dtype=torch.long, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(chunks, op=torch.distributed.ReduceOp.MAX)
    batches = list(eval_batches(local, split, max_len, batch_size, users))
    batches += [_dummy(max_len)] * (int(chunks) - len(batches))
    spans = list(_item_chunks(table.num_rows, chunk_size))
    # a catalogue of one chunk is scored once: its targets' scores are read from the block the counts are taken on
    passes = (("read", "count"),) if len(spans) == 1 else (("read",), ("count",))
    bar = progress_bar(len(batches) + len(passes) * len(spans), split, "chunk", progress)

    # 1. user vectors [U, M * d] (fp32), targets [U] and score offsets of this rank's real users
    vectors, targets, offsets = [], [], []
    for batch in batches:
        batch = batch.to(device)
        seq_emb, _ = table.lookup(batch.item_seq, torch.zeros(0, dtype=torch.long, device=device))
        output = last_position(model(*model_inputs(batch, seq_emb, items, dtype)), batch.seq_len)
        vectors.append(output.flat_user_vectors()[batch.real].float())
        targets.append(batch.targets[batch.real])
        offset = output.flat_score_offset()
        offsets.append(None if offset is None else offset[batch.real].float())
        bar.update()
    user, target = torch.cat(vectors), torch.cat(targets)
    offset = None if offsets[0] is None else torch.cat(offsets)
    history = history_pairs(local, split, users, device) if exclude_history else None

    # 2. the catalogue, chunk by chunk: the targets' scores are read, then higher-scoring and tied items counted
    target_score = torch.zeros(user.shape[0], device=device)
    greater = torch.zeros(user.shape[0], dtype=torch.long, device=device)
    equal = torch.zeros(user.shape[0], dtype=torch.long, device=device)
    with torch.autocast(device_type=device.type, enabled=False):
        for steps in passes:
            for start, end in spans:
                ids = torch.arange(start, end, device=device)
                features = (None if t is None else t[start:end].to(dtype) for t in (items.text, items.image))
                rows = model.item_candidates(table.rows(ids).to(dtype), *features).flatten(1).float()
                block = max(1, _SCORE_BLOCK_ELEMENTS // rows.shape[0])
                for begin in range(0, user.shape[0], block):
                    part = slice(begin, begin + block)
                    scores = user[part] @ rows.T
                    if offset is not None:
                        scores = scores + offset[part, None]
                    if history is not None:
                        _mask_history(scores, history, part, start, end)
                    if "read" in steps:
                        inside = (target[part] >= start) & (target[part] < end)
                        column = (target[part] - start).clamp(0, end - start - 1)
                        target_score[part] = torch.where(inside, scores.gather(1, column[:, None]).squeeze(1),
                                                         target_score[part])
                    if "count" in steps:
                        higher, tied = count_higher_and_tied(scores, target_score[part])
                        greater[part] += higher
                        equal[part] += tied
                bar.update()
    bar.close()
    local = rank_tie_histogram(greater + 1, equal.clamp_min(1), max(ks))
    histogram = sum(all_gather_objects(local), Counter())
    count = torch.tensor([user.shape[0]], dtype=torch.long, device=device)
    all_reduce_sum(count)
    model.train(was_training)
    means = sums_to_means(histogram_metric_sums(histogram, int(count), ks))
    means["count"] = int(count)
    return means


__all__ = ["evaluate", "evaluation_users", "last_position"]
