"""The training sample plan: which (history, next item) pairs an epoch trains on, in each sequence mode; and the
evaluation batches (every user once, with the right history and target, in batches of similar lengths)."""
from collections import Counter

import numpy as np
import pytest

from data_shards.prepare import PrepareOptions, prepare
from data_shards.reader import PreparedDataset
from data_shards.sources.synthetic import generate_synthetic
from train.data import LocalSequences, TrainPlan, eval_batches

MAX_LEN = 5


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "plan"
    prepare(generate_synthetic(num_items=80, num_users=60, seed=3, with_images=False), out, PrepareOptions(k_core=1))
    sequences = LocalSequences(PreparedDataset(out), rank=0, world_size=1)
    assert sequences.train_lengths.max() > 2 * MAX_LEN + 1  # some users need several windows
    return sequences


def _training_parts(local) -> list[np.ndarray]:
    return [local.flat[local.offsets[u]:local.offsets[u] + local.train_lengths[u]] for u in range(len(local))]


def _rows(local, mode: str, by_length: bool, batch_unit: str = "samples"):
    """(history, targets) of every real sample of one epoch, as item-id arrays."""
    plan = TrainPlan(local, mode, MAX_LEN, global_batch=7, seed=0, rank=0, world_size=1, by_length=by_length,
                     batch_unit=batch_unit)
    for _, batch in plan.epoch_batches(epoch=0):
        seqs, lengths, targets = batch.item_seq.numpy(), batch.seq_len.numpy(), batch.targets.numpy()
        for row in np.flatnonzero(batch.real.numpy()):
            n = lengths[row]
            yield seqs[row, :n], (targets[row, :n] if targets.ndim == 2 else targets[row:row + 1])


def _contiguous_in_some_user(parts, run: np.ndarray) -> bool:
    return any(np.array_equal(items[b:b + len(run)], run) for items in parts for b in range(len(items) - len(run) + 1))


@pytest.mark.parametrize("by_length", [False, True])
def test_prefix_mode_trains_each_prefix_once_with_the_last_max_len_items(local, by_length):
    expected = Counter((tuple(items[max(0, i - MAX_LEN):i]), int(items[i]))
                       for items in _training_parts(local) for i in range(1, len(items)))
    got = Counter((tuple(history), int(target[0])) for history, target in _rows(local, "prefix", by_length))
    assert got == expected


@pytest.mark.parametrize("batch_unit", ["samples", "targets"])
@pytest.mark.parametrize("by_length", [False, True])
def test_all_positions_mode_trains_each_next_item_pair_exactly_once(local, by_length, batch_unit):
    parts = _training_parts(local)
    expected = Counter((int(items[i - 1]), int(items[i])) for items in parts for i in range(1, len(items)))
    got = Counter()
    for history, targets in _rows(local, "all_positions", by_length, batch_unit):
        assert np.array_equal(history[1:], targets[:-1])  # every position predicts the next one
        assert _contiguous_in_some_user(parts, np.append(history, targets[-1]))
        got.update(zip(history.tolist(), targets.tolist()))
    assert got == expected


def test_all_positions_windows_cost_one_pass_per_max_len_targets(local):
    prefix = TrainPlan(local, "prefix", MAX_LEN, 7, 0, 0, 1)
    windows = TrainPlan(local, "all_positions", MAX_LEN, 7, 0, 0, 1)
    pairs = np.maximum(local.train_lengths - 1, 0)
    assert prefix.num_samples == pairs.sum()
    assert windows.num_samples == (-(-pairs // MAX_LEN)).sum() < prefix.num_samples


def test_length_batching_cuts_padding_and_keeps_the_batch_order_random(local):
    def padding(plan, epoch):
        return sum(batch.item_seq.numel() - int(batch.seq_len.sum()) for _, batch in plan.epoch_batches(epoch))

    random = TrainPlan(local, "all_positions", MAX_LEN, 7, 0, 0, 1)
    grouped = TrainPlan(local, "all_positions", MAX_LEN, 7, 0, 0, 1, by_length=True)
    assert padding(grouped, 0) < 0.5 * padding(random, 0)
    widths = [[batch.item_seq.shape[1] for _, batch in grouped.epoch_batches(epoch)] for epoch in (0, 1)]
    assert widths[0] != sorted(widths[0]) and widths[0] != widths[1]


@pytest.mark.parametrize("by_length", [False, True])
def test_batches_of_targets_score_the_same_number_of_targets_whatever_the_window_lengths(local, by_length):
    budget = 12
    plan = TrainPlan(local, "all_positions", MAX_LEN, budget, 0, 0, 1, by_length=by_length, batch_unit="targets")
    counts = [batch.num_targets for _, batch in plan.epoch_batches(epoch=0)]
    assert sum(counts) == plan.num_targets == np.maximum(local.train_lengths - 1, 0).sum()
    assert len(counts) == plan.steps_per_epoch == -(-plan.num_targets // budget)
    # a batch is cut where the running count crosses a multiple of the budget: off by less than one window
    # (all but the epoch's last cut, which holds the remainder)
    assert all(abs(c - budget) < MAX_LEN for c in sorted(counts)[1:])
    windows = [int(batch.real.sum()) for _, batch in plan.epoch_batches(epoch=0)]
    assert len(set(windows)) > 1  # short windows come many to a batch, long ones few


def test_a_target_budget_smaller_than_a_window_is_refused(local):
    with pytest.raises(ValueError, match="cannot hold a window"):
        TrainPlan(local, "all_positions", MAX_LEN, MAX_LEN - 1, 0, 0, 1, batch_unit="targets")


@pytest.mark.parametrize("split, drop", [("valid", 2), ("test", 1)])
def test_evaluation_sees_every_user_once_with_its_history_in_batches_of_similar_lengths(local, split, drop):
    max_len, batch_size = 50, 8
    seen, widths, padding = {}, [], 0
    for batch in eval_batches(local, split, max_len, batch_size):
        seqs, lengths, targets = batch.item_seq.numpy(), batch.seq_len.numpy(), batch.targets.numpy()
        widths.append(seqs.shape[1])
        assert seqs.shape[1] == lengths.max()  # as wide as its longest history
        padding += seqs.size - lengths.sum()
        for row in range(len(lengths)):
            seen.setdefault((tuple(seqs[row, :lengths[row]]), int(targets[row])), 0)
            seen[(tuple(seqs[row, :lengths[row]]), int(targets[row]))] += 1
    expected = Counter()
    for u in range(len(local)):
        items = local.flat[local.offsets[u]:local.offsets[u] + local.lengths[u]]
        history = items[:-drop][-max_len:]
        expected[(tuple(history), int(items[-drop]))] += 1
    assert seen == dict(expected)
    assert widths == sorted(widths) and widths[0] < widths[-1]
    # in user-id order a batch is as wide as its longest history: far more padding
    id_order = 0
    for begin in range(0, len(local), batch_size):
        lengths = np.minimum(local.lengths[begin:begin + batch_size] - drop, max_len)
        id_order += len(lengths) * int(lengths.max()) - int(lengths.sum())
    assert padding < 0.5 * id_order
