"""`cammsr recommend` on finished tiny runs (real training subprocesses, bf16): K distinct titled items outside the
history, the same scores and ranks as evaluation (also for a 2-process ZeRO-3 run loaded by one process), unknown
ids named, checkpoint choice, and the command quickstart prints."""
import json
import os
import shlex
import subprocess

import pytest
import torch

from conftest import PY, ROOT, cpu_env, write_tiny_dataset
from data_shards.reader import PreparedDataset
from launch.cli import main as cli_main

TRAIN = ["model.hidden_size=8", "model.max_seq_len=6", "model.num_layers=1", "model.num_heads=1",
         "model.num_experts=2", "model.ffn_inner_size=16", "train.batch_size=128", "train.precision=bf16",
         "max_epochs=3", "eval.patience=0", "logging.tensorboard=false", "data.build_features=false"]


def _train(cmd: list) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The quickstart's layout: ROOT/data (the tiny dataset) and ROOT/cammsr (a 1-process ZeRO-0 run)."""
    root = tmp_path_factory.mktemp("qs")
    write_tiny_dataset(root / "data")
    _train([PY, "-m", "train.command", "--data", str(root / "data"), "--run-dir", str(root / "cammsr"), *TRAIN])
    return root


@pytest.fixture(scope="module")
def zero3_run(root):
    """2 processes, ZeRO-3, column-wise ID table: nothing of it is laid out as one process would lay it out."""
    run = root / "zero3"
    _train([str(ROOT / "launch" / "single_node.sh"), "--nproc", "2", "--python", PY, "--", "--data", str(root / "data"),
            "--run-dir", str(run), *TRAIN, "train.zero_stage=3", "embedding.sharding=column_wise"])
    return run


def _recommend_with_notes(capsys, *args) -> tuple[dict, str]:
    capsys.readouterr()
    assert cli_main(["recommend", *map(str, args), "--json"]) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def _recommend(capsys, *args) -> dict:
    return _recommend_with_notes(capsys, *args)[0]


def _users(root) -> list:
    return list(PreparedDataset(root / "data", verify=False).user_sequences())


def test_top_k_distinct_titled_items_outside_the_history(root, capsys):
    data = PreparedDataset(root / "data", verify=False)
    items = {item.item_id: item for item in data.items()}
    history = [items[int(i)].original_id for i in _users(root)[0].items[:4]]
    got = _recommend(capsys, "--run", root / "cammsr", "--history", ",".join(history), "--k", 7)
    recs = got["recommendations"]
    assert [r["rank"] for r in recs] == list(range(1, 8))
    assert len({r["item_id"] for r in recs}) == 7 and not {r["item_id"] for r in recs} & set(history)
    for r in recs + got["history"]:
        assert r["title"] and r["title"] == items[r["internal_id"]].text_fields["title"]
        assert r["item_id"] == items[r["internal_id"]].original_id
    assert [h["item_id"] for h in got["history"]] == history
    assert all(a["score"] >= b["score"] for a, b in zip(recs, recs[1:]))
    # the table: history first, then the ranked items with their titles
    assert cli_main(["recommend", "--run", str(root / "cammsr"), "--history", ",".join(history), "--k", "7"]) == 0
    out = capsys.readouterr().out
    assert out.index(got["history"][0]["title"]) < out.index(recs[0]["title"]) < out.index(recs[-1]["title"])
    # a history longer than max_seq_len (6): the last 6 are read (said so), --include-history keeps them
    long = [items[i].original_id for i in range(1, 10)]
    got, notes = _recommend_with_notes(capsys, "--run", root / "cammsr", "--history", ",".join(long), "--k", 60,
                                       "--include-history")
    assert [h["used"] for h in got["history"]] == [False] * 3 + [True] * 6
    assert "the model reads the last 6" in notes
    assert len(got["recommendations"]) == 60 and set(long) <= {r["item_id"] for r in got["recommendations"]}


@pytest.mark.parametrize("which", ["cammsr", "zero3"])
def test_same_ranking_as_evaluation(root, zero3_run, which, capsys):
    """The loaded checkpoint reproduces the run's own test/valid metrics exactly, and each user's top-1 from the
    command is the argmax, with the same score up to float rounding, of the evaluation path's scores for that
    user's test history."""
    from train.data import LocalSequences, eval_batches, eval_order
    from train.embeddings import TorchItemTable
    from train.evaluate import last_position
    from train.recommend import RunRecommender
    from train.step import model_inputs
    run = root / which
    rendezvous = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    rec = RunRecommender(run)
    # its one-process group is gone with its address: a process started next picks its own port
    assert {key: os.environ.get(key) for key in rendezvous} == rendezvous
    latest = json.loads((run / "checkpoints" / "latest").read_text())["tag"]
    assert rec.tag == json.loads((run / "checkpoints" / latest / "trainer.json").read_text())["best_tag"]
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("valid", "test"):
        assert rec.evaluate(split) == metrics[split], split
    cfg, local = rec.cfg, LocalSequences(rec.data, 0, 1)
    table = TorchItemTable(rec.id_rows, "exact_sgd", 0.1, 1e-8, rec.device)
    with rec.as_trained(), torch.no_grad():
        batch = next(eval_batches(local, "test", cfg.model.max_seq_len, cfg.eval.batch_size))
        seq_emb, _ = table.lookup(batch.item_seq)
        output = last_position(rec.model(*model_inputs(batch, seq_emb, rec.items, rec.dtype)), batch.seq_len)
    scores = output.flat_user_vectors().float() @ rec.candidates.flatten(1)[1:].T
    if output.score_offset is not None:
        scores = scores + output.flat_score_offset().float()[:, None]
    order = eval_order(local)
    for row in (0, 7, 40):
        user = order[row]
        history = local.flat[local.offsets[user]:local.offsets[user] + local.lengths[user] - 1]
        got = _recommend(capsys, "--run", run, "--internal-ids", "--history", ",".join(map(str, history)),
                         "--include-history", "--k", 3)["recommendations"][0]
        assert got["internal_id"] == int(scores[row].argmax()) + 1
        # evaluation batches are as wide as their longest history: another width, another float summation order
        assert got["score"] == pytest.approx(float(scores[row].max()), rel=1e-6, abs=1e-6)


def test_unknown_id_stops_naming_it(root, capsys):
    known = PreparedDataset(root / "data", verify=False)
    first = next(known.items()).original_id
    history = f"{first},NO-SUCH-ITEM,{first[:-1]}"
    assert cli_main(["recommend", "--run", str(root / "cammsr"), "--history", history]) == 2
    err = capsys.readouterr().err
    assert "NO-SUCH-ITEM" in err and repr(first[:-1]) in err and "close:" in err
    assert cli_main(["recommend", "--run", str(root / "cammsr"), "--internal-ids", "--history", "3,999"]) == 2
    assert "'999'" in capsys.readouterr().err


def test_checkpoint_latest_best_and_tag(root, capsys):
    checkpoints = root / "cammsr" / "checkpoints"
    latest = json.loads((checkpoints / "latest").read_text())["tag"]
    best = json.loads((checkpoints / latest / "trainer.json").read_text())["best_tag"]
    args = ["--run", root / "cammsr", "--history", "1,2,3", "--internal-ids"]
    assert _recommend(capsys, *args, "--checkpoint", "latest")["checkpoint"] == latest
    assert _recommend(capsys, *args)["checkpoint"] == best
    assert _recommend(capsys, *args, "--checkpoint", best)["checkpoint"] == best
    assert cli_main(["recommend", *map(str, args), "--checkpoint", "ep9999-st0000000"]) == 2
    assert latest in capsys.readouterr().err  # the complete checkpoints are listed


def test_quickstart_prints_a_working_command(root, capsys):
    from launch.quickstart import _recommend_command
    args = shlex.split(_recommend_command(root))
    args = args[args.index("recommend"):]
    assert args[args.index("--run") + 1] == str(root / "cammsr")
    assert cli_main(args) == 0
    assert "top 10 (history items excluded)" in capsys.readouterr().out


def _recommend_path_ndcg(root, histories: list[list[int]], targets: list[int], exclude_history: bool = False,
                         run: str = "cammsr") -> float:
    """Mean NDCG@10 of the targets' places in `cammsr recommend`'s full ranked lists (one user per pass;
    a trained model's scores are distinct, so a place is a rank); with exclude_history, lists without the user's
    history items, where a target that repeats one is not placed (NDCG 0)."""
    import math
    from train.recommend import RunRecommender
    recommender = RunRecommender(root / run)
    everything = recommender.num_rows - 1
    gains = []
    for history, target in zip(histories, targets):
        ranked = [item for item, _ in recommender.top_k(history, everything, set(history) if exclude_history
                                                                else frozenset())]
        place = ranked.index(target) + 1 if target in ranked else everything
        gains.append(1 / math.log2(place + 1) if place <= 10 else 0.0)
    return sum(gains) / len(gains)


def test_modality_score_subsets_sum_to_the_models_own_ranking(root):
    """benchmarks.modality_scores: the sum over all modalities ranks validation exactly as the recommend path does."""
    from benchmarks.modality_scores import subset_scores
    from train.recommend import RunRecommender
    results = subset_scores(root / "cammsr", root / "data")
    modalities = RunRecommender(root / "cammsr").cfg.model.modalities
    assert len(results) == 2 ** len(modalities) - 1
    sequences = [s.items for s in _users(root)]
    expected = _recommend_path_ndcg(root, [list(s[:-2]) for s in sequences], [s[-2] for s in sequences])
    assert results[" + ".join(modalities)][0] == pytest.approx(expected, abs=1e-9)


def test_paired_comparison_reproduces_the_runs_metric_and_a_run_against_itself_is_zero(root):
    """benchmarks.paired_comparison: per-user NDCG@10 averages to the recommend path's, and A - A is exactly 0."""
    from benchmarks.paired_comparison import paired_difference, per_user_ndcg
    sequences = [s.items for s in _users(root)]
    per_user = per_user_ndcg(root / "cammsr", root / "data", "test")
    expected = _recommend_path_ndcg(root, [list(s[:-1]) for s in sequences], [s[-1] for s in sequences])
    assert per_user.shape == (len(sequences),) and per_user.mean() == pytest.approx(expected, abs=1e-9)
    same = paired_difference(per_user, per_user, resamples=200)
    assert same["mean"] == 0 and same["se"] == 0 and same["ci95"] == (0.0, 0.0)
    shifted = paired_difference(per_user + 0.01, per_user, resamples=200)
    assert shifted["mean"] == pytest.approx(0.01) and shifted["share_not_above"] == 0


def test_paired_comparison_ranks_as_the_run_does_without_history_items(root):
    """A run that evaluates with eval.exclude_history is scored per user the same way, and is not paired with a run
    that ranks every item."""
    from benchmarks.paired_comparison import per_user_ndcg
    run = root / "cammsr_unseen"
    _train([PY, "-m", "train.command", "--data", str(root / "data"), "--run-dir", str(run), *TRAIN,
            "eval.exclude_history=true"])
    sequences = [s.items for s in _users(root)]
    per_user = per_user_ndcg(run, root / "data", "test")
    expected = _recommend_path_ndcg(root, [list(s[:-1]) for s in sequences], [s[-1] for s in sequences],
                                    exclude_history=True, run="cammsr_unseen")
    assert per_user.mean() == pytest.approx(expected, abs=1e-9)
    evaluator = json.loads((run / "metrics.json").read_text())["test"]["ndcg@10"]
    assert per_user.mean() == pytest.approx(evaluator, abs=1e-6)
    proc = subprocess.run([PY, "-m", "benchmarks.paired_comparison", "--data", str(root / "data"), "--split", "test",
                           str(run), str(root / "cammsr")], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "the runs rank differently (eval.exclude_history" in proc.stderr

