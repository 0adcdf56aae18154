"""Config tree: YAML + overrides, validation that names the key, refusal before any work."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path, [], world_size=1, cuda=False)
    assert cfg.model.name in ("cammsr", "sasrec") and cfg.train.batch_size > 0


def test_overrides_and_aliases():
    cfg = load_config(ROOT / "configs" / "ml100k.yaml", ["model=sasrec", "max_epochs=3", "train.lr=2e-3",
                                                         "model.mscl_pairs=[[id, text]]", "eval.ks=[5, 10, 20]"],
                      world_size=1, cuda=False)
    assert cfg.model.name == "sasrec" and cfg.train.max_epochs == 3 and cfg.train.lr == 2e-3
    assert cfg.model.mscl_pairs == (("id", "text"),) and cfg.eval.ks == (5, 10, 20)
    assert "max_epochs: 3" in cfg.to_yaml()
    same = load_config(ROOT / "configs" / "ml100k.yaml", ["model=sasrec", "max_epochs=9", "train.lr=2e-3",
                                                          "model.mscl_pairs=[[id, text]]", "eval.ks=[5, 10, 20]"])
    assert same.fingerprint() == cfg.fingerprint()  # the epoch cap does not change the run's maths
    assert load_config(None, ["train.lr=1e-2"]).fingerprint() != cfg.fingerprint()


@pytest.mark.parametrize("override, key", [
    (["train.lrr=1"], "train.lrr"),
    (["nonsense=1"], "nonsense"),
    (["train.batch_size=big"], "train.batch_size"),
    (["train.batch_size=1.5"], "train.batch_size"),
    (["model.use_dyt=3"], "model.use_dyt"),
    (["train.precision=fp16"], "train.precision"),
    (["train.zero_stage=2", "train.optimizer=sgd"], "train.optimizer"),
    (["train.zero_stage=5"], "train.zero_stage"),
    (["embedding.sharding=diagonal"], "embedding.sharding"),
    (["embedding.optimizer=adam"], "embedding.optimizer"),  # no Adam kernel for the TorchRec table on CPU
    (["model.num_heads=3"], "num_heads"),
    (["lr=0.1"], "train.lr"),  # ambiguous: train.lr or embedding.lr
    (["eval.metric=ndcg@20"], "eval.metric"),
    (["model.loss_type=sampled_softmax", "train.num_negatives=0"], "train.num_negatives"),
    (["train.negative_sampler=zipf"], "train.negative_sampler"),
    (["train.negative_sampler_exponent=-1"], "train.negative_sampler_exponent"),
    (["eval.max_users=-5"], "eval.max_users"),
    (["data.extra_items=100"], "data.extra_items"),  # CAMMSR has no features for extra items
    (["train.batch_unit=tokens"], "train.batch_unit"),
    (["train.batch_unit=targets", "model.sequence_mode=all_positions", "model.router_causal=true",
      "train.batch_size=20"], "train.batch_size"),
    (["train.id_warmup_epochs=-1"], "train.id_warmup_epochs"),
    (["train.id_warmup_epochs=5", "train.max_epochs=5"], "train.id_warmup_epochs"),
    (["train.id_warmup_epochs=2", "model.modalities=[text]", "model.mscl_pairs=[]"], "train.id_warmup_epochs"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override, world_size=1, cuda=False)


def test_sampled_softmax_keys():
    cfg = load_config(None, ["model=sasrec", "model.loss_type=sampled_softmax", "train.num_negatives=256",
                             "train.negative_sampler=popularity", "eval.max_users=1000", "data.extra_items=10"],
                      world_size=2, cuda=False)
    assert (cfg.train.num_negatives, cfg.train.negative_sampler, cfg.train.negative_sampler_exponent) == \
        (256, "popularity", 0.75)
    assert cfg.eval.max_users == 1000 and cfg.data.extra_items == 10


def test_torch_backend_is_single_process_only():
    with pytest.raises(ConfigError, match="embedding.backend"):
        load_config(None, ["embedding.backend=torch"], world_size=2, cuda=False)


def test_unknown_section_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="trian"):
        load_config(path)


def test_command_stops_before_any_work(tmp_path):
    """The CLI refuses a bad config with exit code 2 and a message naming the key, without touching the run dir."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "train.command", "--data", str(tmp_path), "--run-dir",
                           str(tmp_path / "run"), "train.precision=fp16"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "train.precision" in proc.stderr
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - start < 30


def test_overrides_may_stand_between_and_after_the_options():
    """`--config C a=1 --run-dir R b=2` keeps both overrides in order (argparse alone rejected b=2)."""
    from launch.arguments import parse_with_overrides
    from launch.cli import build_parser
    args = parse_with_overrides(build_parser(), ["train", "--config", "c.yaml", "model.name=sasrec", "--run-dir",
                                                 "R", "train.max_epochs=2", "--resume", "train.max_epochs=3"])
    assert args.overrides == ["model.name=sasrec", "train.max_epochs=2", "train.max_epochs=3"]
    assert args.resume and str(args.run_dir) == "R"


@pytest.mark.parametrize("argv, named", [
    (["train", "--run-dir", "R", "a=1", "--run_dir", "S"], "--run_dir"),  # an unknown option
    (["train", "--run-dir", "R", "a=1", "--resume", "max_epochs"], "max_epochs"),  # a word without '='
    (["prepare", "--source", "synthetic", "--out", "o", "a=1"], "a=1"),  # a command without overrides
])
def test_leftover_arguments_that_are_not_overrides_are_refused_by_name(argv, named, capsys):
    from launch.arguments import parse_with_overrides
    from launch.cli import build_parser
    with pytest.raises(SystemExit) as stop:
        parse_with_overrides(build_parser(), argv)
    assert stop.value.code == 2
    assert f"unrecognized arguments: {named}" in capsys.readouterr().err


def test_missing_feature_store_without_build_is_refused(tmp_path):
    from conftest import toy_interactions, toy_items, write_recbole
    from data_shards.prepare import PrepareOptions, prepare
    from data_shards.sources.recbole import read_recbole

    folder = write_recbole(tmp_path / "raw", toy_interactions(), toy_items())
    prepare(read_recbole(folder), tmp_path / "data", PrepareOptions(k_core=1))
    proc = subprocess.run([sys.executable, "-m", "train.command", "--data", str(tmp_path / "data"), "--run-dir",
                           str(tmp_path / "run"), "data.build_features=false"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cammsr extract" in proc.stderr and "feature store" in proc.stderr


def test_a_checkpoint_predating_a_key_still_matches_while_the_key_holds_its_default():
    from train.checkpoint import config_changes
    current = load_config(None, ["train.lr=0.002"]).to_dict()
    saved = load_config(None, ["train.lr=0.002"]).to_dict()
    del saved["model"]["init_method"]  # a key added after the checkpoint was written
    assert config_changes(saved, current) == []
    changed = load_config(None, ["train.lr=0.002", "model.init_method=normal"]).to_dict()
    assert config_changes(saved, changed) == ["model.init_method: None -> 'normal'"]
    assert config_changes(saved, load_config(None, ["train.lr=0.003"]).to_dict()) == ["train.lr: 0.002 -> 0.003"]
