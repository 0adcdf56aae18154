"""Ties never favour the target: all-equal scores give what a random ranking gets, in the metrics, in the
distributed evaluator (a real SASRec over a real dataset, its ID table zeroed) and in the per-user benchmark tool;
distinct scores give the plain metrics; tied recommendations are listed by ascending id."""
import math

import pytest
import torch

from benchmarks.per_user import ndcg_at_10_per_user
from cammsr import ModelConfig
from cammsr.factory import build_model
from cammsr.metrics import expected_metric, histogram_metric_sums, rank_tie_histogram, ranking_metric_sums
from cammsr.scoring import top_k_items
from conftest import write_tiny_dataset
from data_shards.reader import PreparedDataset
from train.data import LocalSequences
from train.embeddings import TorchItemTable
from train.evaluate import evaluate
from train.items import load_item_inputs


def _random_expectation(num_items: int, k: int, gain) -> float:
    return sum(gain(p) for p in range(1, min(k, num_items) + 1)) / num_items


def test_all_equal_scores_give_the_random_ranking_expectation_not_one():
    n = 50
    ranks, ties = torch.ones(4, dtype=torch.long), torch.full((4,), n)
    sums = ranking_metric_sums(ranks, (5, 10), ties=ties)
    assert sums["ndcg@10"].item() / 4 == pytest.approx(_random_expectation(n, 10, lambda p: 1 / math.log2(p + 1)))
    assert sums["mrr@5"].item() / 4 == pytest.approx(_random_expectation(n, 5, lambda p: 1 / p))
    assert sums["recall@10"].item() / 4 == pytest.approx(10 / n)


def test_distinct_scores_give_the_plain_metrics():
    ranks = torch.tensor([1, 3, 11, 5, 7])
    for k in (5, 10):
        plain = torch.where(ranks <= k, 1 / torch.log2(ranks.double() + 1), torch.zeros(5, dtype=torch.float64))
        assert torch.equal(expected_metric("ndcg", k, ranks), plain)
        assert torch.equal(expected_metric("ndcg", k, ranks, torch.ones(5, dtype=torch.long)), plain)


def test_a_tie_group_straddling_k_counts_its_positions_inside_k():
    # target tied with 3 others at positions 9..12: NDCG@10 = (g(9) + g(10)) / 4, Recall@10 = 2 / 4
    got = expected_metric("ndcg", 10, torch.tensor([9]), torch.tensor([4])).item()
    assert got == pytest.approx((1 / math.log2(10) + 1 / math.log2(11)) / 4)
    assert expected_metric("recall", 10, torch.tensor([9]), torch.tensor([4])).item() == 0.5


def test_histogram_sums_do_not_depend_on_how_rows_are_split():
    generator = torch.Generator().manual_seed(0)
    ranks = torch.randint(1, 30, (200,), generator=generator)
    ties = torch.randint(1, 5, (200,), generator=generator)
    whole = histogram_metric_sums(rank_tie_histogram(ranks, ties, 10), 200, (5, 10))
    parts = rank_tie_histogram(ranks[:77], ties[:77], 10) + rank_tie_histogram(ranks[77:], ties[77:], 10)
    split = histogram_metric_sums(parts, 200, (5, 10))
    assert {k: v.item() for k, v in whole.items()} == {k: v.item() for k, v in split.items()}
    direct = ranking_metric_sums(ranks, (5, 10), ties=ties)
    for name, value in direct.items():
        assert whole[name].item() == pytest.approx(value.item(), rel=1e-12)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data = PreparedDataset(write_tiny_dataset(tmp_path_factory.mktemp("ties") / "data"))
    cfg = ModelConfig(name="sasrec", hidden_size=8, max_seq_len=6, num_layers=1, num_heads=1, ffn_inner_size=16)
    torch.manual_seed(0)
    model = build_model(cfg)
    items = load_item_inputs(data, ("id",), False, torch.device("cpu"))
    return data, cfg, model, items


def _evaluate(tiny, weight, split="test", chunk_size=7, **options):
    data, cfg, model, items = tiny
    table = TorchItemTable(weight, "exact_sgd", 0.1, 1e-8, torch.device("cpu"))
    local = LocalSequences(data, 0, 1)
    return evaluate(model, table, items, local, split, cfg.max_seq_len, 16, (5, 10), torch.device("cpu"),
                    torch.float32, chunk_size=chunk_size, **options)


@pytest.mark.parametrize("exclude_history", [False, True])
@pytest.mark.parametrize("weights", ["tied", "distinct"])
def test_a_catalogue_of_one_chunk_ranks_as_one_of_many_chunks(tiny, weights, exclude_history):
    """One chunk is scored once (targets read and items counted on the same block), many chunks twice."""
    data = tiny[0]
    weight = (torch.zeros(data.num_items + 1, 8) if weights == "tied"
              else torch.randn(data.num_items + 1, 8, generator=torch.Generator().manual_seed(2)))
    one = _evaluate(tiny, weight, chunk_size=data.num_items + 1, exclude_history=exclude_history)
    assert one == _evaluate(tiny, weight, exclude_history=exclude_history)


@pytest.mark.parametrize("exclude_history", [False, True])
@pytest.mark.parametrize("weights", ["tied", "distinct"])
def test_score_blocks_of_a_few_users_rank_as_one_block(tiny, weights, exclude_history, monkeypatch):
    """The catalogue chunk's scores are taken a few users at a time (history masks and target reads per block)."""
    data = tiny[0]
    weight = (torch.zeros(data.num_items + 1, 8) if weights == "tied"
              else torch.randn(data.num_items + 1, 8, generator=torch.Generator().manual_seed(3)))
    whole = _evaluate(tiny, weight, exclude_history=exclude_history)
    monkeypatch.setattr("train.evaluate._SCORE_BLOCK_ELEMENTS", 7 * 5)  # chunks of 7 items: blocks of 5 users
    assert _evaluate(tiny, weight, exclude_history=exclude_history) == whole


def test_the_evaluator_gives_a_model_scoring_every_item_alike_the_random_expectation(tiny):
    data = tiny[0]
    got = _evaluate(tiny, torch.zeros(data.num_items + 1, 8))  # every candidate row 0: every score is 0
    n = data.num_items
    assert got["count"] == data.num_users
    assert got["ndcg@10"] == pytest.approx(_random_expectation(n, 10, lambda p: 1 / math.log2(p + 1)), rel=1e-12)
    assert got["recall@5"] == pytest.approx(5 / n, rel=1e-12)


def test_the_evaluator_with_distinct_scores_counts_strictly_higher_items(tiny):
    data, cfg, model, items = tiny
    weight = torch.randn(data.num_items + 1, 8, generator=torch.Generator().manual_seed(1))
    got = _evaluate(tiny, weight)
    # the same users by hand: rank = 1 + items scoring strictly higher, plain NDCG@10
    from train.data import eval_batches
    gains = []
    model.eval()
    with torch.no_grad():
        for batch in eval_batches(LocalSequences(data, 0, 1), "test", cfg.max_seq_len, 16):
            from train.evaluate import last_position
            from train.step import model_inputs
            seq_emb = weight[batch.item_seq] * (batch.item_seq != 0)[..., None]
            user = last_position(model(*model_inputs(batch, seq_emb, items, torch.float32)), batch.seq_len)
            scores = user.flat_user_vectors() @ weight[1:].T
            target = scores.gather(1, (batch.targets - 1)[:, None])
            assert int((scores == target).sum()) == len(batch.targets)  # no ties among random rows
            rank = (scores > target).sum(dim=1) + 1
            gains += [1 / math.log2(r + 1) if r <= 10 else 0.0 for r in rank.tolist()]
    assert got["ndcg@10"] == pytest.approx(sum(gains) / len(gains), rel=1e-9)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_exclude_history_ranks_among_the_items_the_user_has_not_seen(tiny, split):
    """eval.exclude_history (RecBole's full sort, RecTools' filter_viewed): every item of the user's history before
    the target scores -inf, across catalogue chunks (chunk_size 7) and user batches (16); checked by hand."""
    data, cfg, model, items = tiny
    weight = torch.randn(data.num_items + 1, 8, generator=torch.Generator().manual_seed(1))
    got = _evaluate(tiny, weight, split, exclude_history=True)
    plain = _evaluate(tiny, weight, split)
    from train.data import eval_batches, eval_order
    from train.evaluate import last_position
    from train.step import model_inputs
    local = LocalSequences(data, 0, 1)
    drop = 2 if split == "valid" else 1
    order, gains = eval_order(local), []
    model.eval()
    with torch.no_grad():
        for b, batch in enumerate(eval_batches(local, split, cfg.max_seq_len, 16)):
            seq_emb = weight[batch.item_seq] * (batch.item_seq != 0)[..., None]
            user = last_position(model(*model_inputs(batch, seq_emb, items, torch.float32)), batch.seq_len)
            scores = user.flat_user_vectors() @ weight[1:].T
            for r, u in enumerate(order[16 * b:16 * b + len(batch.targets)]):
                history = local.flat[local.offsets[u]:local.offsets[u] + local.lengths[u] - drop]
                scores[r, torch.from_numpy(history) - 1] = float("-inf")
            target = scores.gather(1, (batch.targets - 1)[:, None])
            rank = (scores > target).sum(dim=1) + 1
            gains += [1 / math.log2(r + 1) if r <= 10 else 0.0 for r in rank.tolist()]
    assert got["ndcg@10"] == pytest.approx(sum(gains) / len(gains), rel=1e-9)
    assert got["ndcg@10"] > plain["ndcg@10"]  # seen items no longer crowd the top


def test_per_user_tool_counts_ties_as_the_evaluator():
    scores = torch.zeros(3, 40)
    scores[1, 5] = 1.0  # user 1: its target, item 6, alone on top
    scores[2, 0] = 1.0  # user 2: item 1 above its target, which ties with the 38 others
    targets = torch.tensor([3, 6, 7])
    got = ndcg_at_10_per_user(scores, targets)
    random = _random_expectation(40, 10, lambda p: 1 / math.log2(p + 1))
    assert got[0].item() == pytest.approx(random)
    assert got[1].item() == 1.0
    assert got[2].item() == pytest.approx(_random_expectation(39, 9, lambda p: 1 / math.log2(p + 2)))


def test_tied_recommendations_are_listed_by_ascending_id_across_chunks():
    user = torch.ones(1, 2)
    candidates = torch.zeros(12, 2)
    candidates[[9, 3, 6]] = 1.0  # three items tie at the top, spread over chunks of 4
    scores, ids = top_k_items(user, candidates, k=5, chunk_size=4)
    assert ids[0, :3].tolist() == [3, 6, 9]
    assert ids[0, 3:].tolist() == [1, 2]
    assert scores[0].tolist() == [2.0, 2.0, 2.0, 0.0, 0.0]
