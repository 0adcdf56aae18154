"""Sampled losses in the trainer: negatives shared by the global batch and drawn per global step, or drawn per
scored target; sampled softmax and gBCE; 2 processes == 1 process (gloo, real launcher), the command trains with
them, and with as many uniform negatives as items the sampled softmax is close to the full softmax. Also: the fixed
evaluation subset (eval.max_users)."""
import json
import math
import re

import numpy as np
import pytest
import torch

from cammsr.scoring import full_softmax_cross_entropy, gbce_beta, gbce_loss, sampled_softmax_cross_entropy
from conftest import PY, ROOT, write_tiny_dataset
from test_train_distributed import TINY, _run, _train_cmd
from train.negatives import NegativeSampler, distinct_ids
from train.parity import compare

SAMPLED = ["model.loss_type=sampled_softmax", "train.num_negatives=16"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def test_negatives_are_drawn_per_step_from_the_distribution():
    counts = np.array([0, 100, 10, 0, 1, 50])
    sampler = NegativeSampler("popularity", 6, 20000, seed=3, counts=counts, exponent=0.75)
    draws = sampler.draw(7)
    again = NegativeSampler("popularity", 6, 20000, seed=3, counts=counts.copy(), exponent=0.75)  # another rank
    assert torch.equal(draws, again.draw(7)) and not torch.equal(draws, sampler.draw(8))
    q = np.where(counts > 0, counts.astype(float) ** 0.75, 0.0)
    q /= q.sum()
    frequency = np.bincount(draws.numpy(), minlength=6) / len(draws)
    assert frequency[0] == 0 and frequency[3] == 0  # padding and never-trained items are never drawn
    assert np.abs(frequency - q).max() < 0.01
    assert torch.allclose(sampler.log_q(torch.tensor([1, 4, 5])), torch.tensor(np.log(q[[1, 4, 5]])).float())
    uniform = NegativeSampler("uniform", 6, 1000, seed=3)
    ids = uniform.draw(0)
    assert ids.min() == 1 and ids.max() == 5 and uniform.log_q(ids) is None


def test_per_target_negatives_are_a_function_of_the_target_key():
    counts = np.array([0, 100, 10, 0, 1, 50])
    sampler = NegativeSampler("popularity", 6, 4000, seed=3, counts=counts)
    keys = torch.tensor([5, 17, 2, 99])
    draws = sampler.draw_per_target(7, keys)
    assert draws.shape == (4, 4000) and draws.dtype == torch.int64
    # another rank holding the same targets in another order draws the same ids for each of them
    other = NegativeSampler("popularity", 6, 4000, seed=3, counts=counts.copy())
    assert torch.equal(other.draw_per_target(7, keys.flip(0)), draws.flip(0))
    assert not torch.equal(draws, sampler.draw_per_target(8, keys))  # a new step, new draws
    assert not torch.equal(draws[0], draws[1])  # every target its own
    q = np.where(counts > 0, counts.astype(float) ** 0.75, 0.0)
    q /= q.sum()
    frequency = np.bincount(draws.reshape(-1).numpy(), minlength=6) / draws.numel()
    assert frequency[0] == 0 and frequency[3] == 0 and np.abs(frequency - q).max() < 0.01
    uniform = NegativeSampler("uniform", 101, 500, seed=1).draw_per_target(0, torch.arange(40))
    frequency = np.bincount(uniform.reshape(-1).numpy(), minlength=101) / uniform.numel()
    assert uniform.min() == 1 and uniform.max() == 100 and np.abs(frequency[1:] - 0.01).max() < 0.003


def test_per_target_draws_stay_what_earlier_versions_drew():
    """A run resumed by a newer version of the code draws what it drew before: the hash's values are pinned."""
    uniform = NegativeSampler("uniform", 12102, 6, seed=2020).draw_per_target(41, torch.tensor([0, 9, 131412]))
    assert uniform.tolist() == [[2294, 2679, 6557, 1572, 5720, 11772], [10009, 1560, 3762, 5633, 11044, 11149],
                                [538, 5451, 11824, 9679, 6594, 958]]
    counts = np.array([0, 100, 10, 0, 1, 50])
    popular = NegativeSampler("popularity", 6, 6, seed=3, counts=counts).draw_per_target(7, torch.tensor([5]))
    assert popular.tolist() == [[1, 5, 2, 5, 5, 1]]


@pytest.mark.parametrize("num_rows", [12, 5000])  # counted (rows <= 4 x ids) and sorted
def test_distinct_ids_are_torch_unique(num_rows):
    ids = torch.randint(0, num_rows, (600,), generator=torch.Generator().manual_seed(num_rows))
    expected = torch.unique(ids, return_inverse=True)
    got = distinct_ids(ids, num_rows)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, expected))


def _row_by_row(user, target_vectors, targets, table, index, ids):
    """The per-row loss as the mean of one-row shared losses: an independent reference for the indexed form."""
    return torch.stack([sampled_softmax_cross_entropy(user[r:r + 1], target_vectors[r:r + 1], targets[r:r + 1],
                                                      table[index[r]], ids[r]) for r in range(len(targets))]).mean()


def test_per_target_negatives_tiled_from_a_shared_set_give_the_shared_loss():
    generator = torch.Generator().manual_seed(2)
    candidates = torch.randn(31, 8, generator=generator)
    user = torch.randn(5, 8, generator=generator)
    targets = torch.tensor([3, 7, 7, 12, 30])
    shared = torch.tensor([7, 1, 2, 30, 9, 9])  # two rows hit a target: removed there
    tiled = shared.expand(5, -1)
    log_q = torch.log(torch.rand(6, generator=generator))
    one = sampled_softmax_cross_entropy(user, candidates[targets], targets, candidates[shared], shared, log_q)
    # the trainer's form, distinct rows + an index into them, by its two routes: the whole block of a table of no
    # more rows than negatives per row
    rows, index = torch.unique(tiled, return_inverse=True)
    each = sampled_softmax_cross_entropy(user, candidates[targets], targets, candidates[rows], tiled,
                                         log_q.expand(5, -1), negative_index=index)
    torch.testing.assert_close(one, each)
    # ... and the sparse route of a larger table (rows the index never points at)
    padded = torch.cat([candidates, torch.randn(100, 8, generator=generator)])
    indexed = sampled_softmax_cross_entropy(user, candidates[targets], targets, padded, tiled, log_q.expand(5, -1),
                                            negative_index=tiled)
    torch.testing.assert_close(one, indexed)
    wide = torch.randint(1, 31, (5, 400), generator=generator)
    rows, index = torch.unique(wide, return_inverse=True)
    by_rows = _row_by_row(user, candidates[targets], targets, candidates, wide, wide)
    by_index = sampled_softmax_cross_entropy(user, candidates[targets], targets, candidates[rows], wide,
                                             negative_index=index)
    torch.testing.assert_close(by_rows, by_index)
    table = torch.randn(2000, 8, generator=generator)
    few = torch.randint(0, 2000, (5, 6), generator=generator)
    torch.testing.assert_close(
        _row_by_row(user, candidates[targets], targets, table, few, few + 100),
        sampled_softmax_cross_entropy(user, candidates[targets], targets, table, few + 100, negative_index=few))


def test_per_target_scores_have_the_gradients_of_the_gathered_dot_products():
    """The sparse route's own backward against autograd through an explicit gather: repeated and unsorted
    negatives in a row, rows no negative reads, and accidental hits (-inf, no gradient)."""
    generator = torch.Generator().manual_seed(5)
    table = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    user = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    targets = torch.tensor([3, 9, 9, 17])
    index = torch.tensor([[5, 3, 5, 30], [9, 1, 0, 0], [2, 2, 2, 2], [39, 17, 8, 5]])
    ids = index + 0  # the index is the id here: row 0's 3, row 1's 9 and row 3's 17 are accidental hits
    grads = []
    for route in ("sparse", "gather"):
        u, t = user.clone().requires_grad_(), table.clone().requires_grad_()
        if route == "sparse":
            loss = sampled_softmax_cross_entropy(u, t[targets], targets, t, ids, negative_index=index)
        else:
            loss = _row_by_row(u, t[targets], targets, t, index, ids)
        loss.backward()
        grads.append((loss.detach(), u.grad, t.grad))
    for sparse, gathered in zip(*grads):
        torch.testing.assert_close(sparse, gathered)
    assert grads[0][2][[4, 6, 7, 10]].abs().sum() == 0  # never read, not a target


def test_gbce_matches_its_definition():
    """gSASRec's loss: -(beta log sigma(s+) + sum_j log(1 - sigma(s_j))) / (S + 1) per row; beta from alpha, t."""
    assert gbce_beta(0.01, 0.0) == pytest.approx(1.0) and gbce_beta(0.01, 1.0) == pytest.approx(0.01)
    generator = torch.Generator().manual_seed(4)
    candidates = torch.randn(21, 6, generator=generator)
    user = torch.randn(3, 6, generator=generator)
    targets = torch.tensor([2, 5, 9])
    negatives = torch.tensor([[5, 1, 7], [5, 3, 4], [8, 8, 1]])  # row 1's first negative is its target
    beta = gbce_beta(3 / 19, 0.75)
    got = gbce_loss(user, candidates[targets], targets, candidates, negatives, beta, negative_index=negatives)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    rows = []
    for r in range(3):
        positive = float(user[r] @ candidates[targets[r]])
        term = beta * math.log(sigmoid(positive))
        term += sum(math.log(1 - sigmoid(float(user[r] @ candidates[n]))) for n in negatives[r] if n != targets[r])
        rows.append(-term / 4)
    assert got.item() == pytest.approx(sum(rows) / 3, rel=1e-5)


def test_uniform_with_as_many_negatives_as_items_approximates_full_softmax():
    """S = N - 1 uniform draws estimate the full partition function (logits spread ~1 here)."""
    generator = torch.Generator().manual_seed(0)
    num_items, dim = 400, 16
    candidates = torch.randn(num_items + 1, dim, generator=generator) * 0.5
    user = torch.randn(64, dim, generator=generator) * 0.5
    targets = torch.randint(1, num_items + 1, (64,), generator=generator)
    full = float(full_softmax_cross_entropy(user, candidates, targets, 65536))
    sampler = NegativeSampler("uniform", num_items + 1, num_items - 1, seed=0)
    sampled = np.mean([float(sampled_softmax_cross_entropy(user, candidates[targets], targets,
                                                           candidates[ids], ids))
                       for ids in map(sampler.draw, range(20))])
    assert abs(sampled - full) / full < 0.02, (sampled, full)
    few = NegativeSampler("uniform", num_items + 1, 16, seed=0).draw(0)
    assert float(sampled_softmax_cross_entropy(user, candidates[targets], targets, candidates[few], few)) < 0.6 * full


@pytest.mark.parametrize("recipe", [
    ["model.loss_type=sampled_softmax", "train.negative_sampler=popularity"],
    ["model.loss_type=gbce", "train.negative_sharing=per_target", "model.sequence_mode=all_positions",
     "model.router_causal=true"],
], ids=["shared-popularity-softmax", "per-target-gbce-all-positions"])
def test_sampled_two_processes_equal_one_process(dataset, tmp_path, recipe):
    """CAMMSR (ID + text + image rows of the same ids), evaluation on a fixed subset of 30 users: losses, ID table,
    dense weights within 1e-5 and identical metrics; shared popularity negatives with logQ, and per-target
    negatives (keyed by the target's place in the global sample order, so a target draws the same ids on any
    rank) with gBCE."""
    overrides = [*TINY, "train.num_negatives=16", *recipe, "eval.max_users=30"]
    dumps = {}
    for nproc in (1, 2):
        out = tmp_path / f"sampled{nproc}.pt"
        _run([str(ROOT / "launch" / "single_node.sh"), "--nproc", str(nproc), "--python", PY, "--module",
              "train.parity", "--", "--data", str(dataset), "--out", str(out), "--steps", "3", "--stages", "1",
              *overrides])
        dumps[nproc] = torch.load(out, weights_only=False)
    assert dumps[2][1]["world_size"] == 2
    assert compare(dumps[1], dumps[2], 1e-5) == []
    assert dumps[2][1]["metrics_before"]["valid"]["count"] == 30


# Trains SASRec a few epochs with the full softmax, then scores one batch both ways without stepping.
_SAME_STATE = """
import json, sys
from pathlib import Path
import numpy as np, torch
from train.config import load_config
from train.loop import Trainer
from train.negatives import NegativeSampler
cfg = load_config(None, ["data.path=" + sys.argv[1], "logging.tensorboard=false", "checkpoint.enabled=false",
                         "eval.test=never", "train.zero_stage=0", "model=sasrec", "train.lr=0.01", *sys.argv[3:]])
trainer = Trainer(cfg, Path(sys.argv[2]))
for epoch in range(3):
    for _, batch in trainer.plan.epoch_batches(epoch):
        trainer.train_step(batch)
batch = next(trainer.plan.epoch_batches(3))[1].to(trainer.env.device)
with torch.no_grad():
    full = trainer.losses(batch)[0].recommendation.item()
    n = trainer.num_items
    trainer.sampler = NegativeSampler("uniform", n + 1, n - 1, cfg.train.seed)
    sampled = []
    for step in range(20):
        trainer.state["global_step"] = step
        sampled.append(trainer.losses(batch)[0].recommendation.item())
print("RESULT", json.dumps({"full": full, "sampled": float(np.mean(sampled))}))
trainer.close()
"""


def test_trainer_sampled_loss_with_all_items_matches_full_softmax(dataset, tmp_path):
    """Trainer wiring (lookup of the needed ids, target/negative rows, scaling), on a trained model whose logits
    are spread: N - 1 uniform negatives per step give the full-softmax loss of the same batch within 2%."""
    proc = _run([PY, "-c", _SAME_STATE, str(dataset), str(tmp_path / "run"), *TINY])
    got = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert got["full"] < 3.9  # trained: below ln(60) = 4.09, so a wrong target row would show
    assert abs(got["sampled"] - got["full"]) / got["full"] < 0.02, got


@pytest.mark.parametrize("recipe, described", [
    (SAMPLED, "sampled softmax, 16 negatives shared per global step, uniform"),
    (["model.loss_type=gbce", "train.num_negatives=16", "train.negative_sharing=per_target"],
     "gbce, 16 negatives per scored target, uniform"),
], ids=["shared-softmax", "per-target-gbce"])
def test_cammsr_train_with_sampled_losses_learns(dataset, tmp_path, recipe, described):
    """`cammsr train` (SASRec, uniform negatives): the epoch loss goes down and evaluation runs on the subset."""
    run_dir = tmp_path / "run"
    proc = _run(_train_cmd(dataset, run_dir, "model=sasrec", *recipe, "train.lr=0.01", "model.hidden_dropout=0.0",
                           "model.attn_dropout=0.0", "eval.max_users=40"))
    epoch_losses = [float(x) for x in re.findall(r"epoch \d+: loss ([0-9.]+)", proc.stdout)]
    assert len(epoch_losses) == 4, proc.stdout[-2000:]
    assert epoch_losses[-1] < epoch_losses[0] - 0.05, epoch_losses
    assert described in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["valid"]["count"] == 40 and metrics["test"]["count"] == 40
