"""`cammsr tune` on the trainer tests' tiny dataset: bad spaces stop before any trial, a parallel study writes its
best config and plots and never ranks test, a second run continues the study, an interrupted trial continues from
its checkpoint, an edit of the base config during a study changes no trial, a stopped study leaves its best config
and continues with new parameters, a repeated configuration is neither trained nor counted, a new study directory
goes on from the study's ledger, the pruner stops trials on their validation curve."""
import json
import os
import re
import signal
import subprocess
import time

import pytest
import yaml

from conftest import PY, ROOT, cpu_env, write_tiny_dataset
from train.config import ConfigError, load_config
from train.tune import _serialise_asks, run_study

BASE = {"model": {"name": "sasrec", "hidden_size": 8, "max_seq_len": 6, "num_layers": 1, "num_heads": 1,
                  "loss_type": "sampled_softmax"},
        "train": {"batch_size": 64, "precision": "fp32", "max_epochs": 3},
        "data": {"build_features": False}, "logging": {"tensorboard": False}}
SPACE = {"seed": 1, "pruner": {"kind": "median", "startup_trials": 1, "warmup_rounds": 1},
         "fixed": {"eval.patience": 0},
         "params": {"train.lr": {"low": 1e-3, "high": 3e-2, "log": True},
                    "model.hidden_dropout": {"low": 0.0, "high": 0.4, "step": 0.1},
                    "num_layers": {"low": 1, "high": 2},
                    "train.num_negatives": {"choices": [8, 16]}}}
NO_PRUNING = {"pruner:kind": "none", "pruner:startup_trials": None, "pruner:warmup_rounds": None}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


def _space(folder, **changes):
    space = json.loads(json.dumps(SPACE))
    for key, value in changes.items():
        section, _, name = key.partition(":")
        if value is None:
            space[section].pop(name)
        else:
            space[section][name] = value
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _wait_while_running(proc, condition, timeout_s: float) -> None:
    """Until condition() holds; the study's process must still run and the time last."""
    deadline = time.time() + timeout_s
    while not condition():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.stdout else ""
        time.sleep(0.05)


def _tune(dataset, config, space, study, *args, **popen):
    cmd = [PY, "-m", "launch.cli", "tune", "--data", str(dataset), "--config", str(config), "--space", str(space),
           "--study-dir", str(study), *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, **popen)
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _trials(study):
    return json.loads((study / "trials.json").read_text())


@pytest.mark.parametrize("changes, message", [
    ({"params:model.bogus": {"low": 0, "high": 1}}, "params.model.bogus: unknown key 'model.bogus'"),
    ({"params:model.hidden_dropout": {"low": 0.0, "high": 1.5}},
     "params.model.hidden_dropout: value 1.5 fails the config's validation"),
    ({"params:model.num_heads": {"choices": [1, 3]}}, "params.model.num_heads: value 3 fails"),
    ({"params:eval.test": {"choices": ["end"]}}, "eval.test is set by the study"),
    ({"fixed:train.lr": -1}, "fixed: train.lr=-1.0: must be > 0"),
    ({"pruner:kind": "hyperband"}, "pruner: expected a mapping with kind one of"),
])
def test_a_bad_space_stops_before_the_first_trial(dataset, base_config, tmp_path, changes, message):
    study = tmp_path / "study"
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        run_study(dataset, base_config, _space(tmp_path, **changes), study, 2, 1, "test")
    assert not study.exists()


def test_parallel_study_best_config_plots_no_test_and_continuation(dataset, base_config, tmp_path):
    space, study = _space(tmp_path), tmp_path / "study"
    out = _tune(dataset, base_config, space, study, "--trials", "3", "--parallel", "2")
    assert "2 worker process(es)" in out and "test never computed" in out
    trials = _trials(study)
    counted = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(counted) == 3 and {t["state"] for t in trials} <= {"COMPLETE", "PRUNED"}  # the budget, not more
    for trial in trials:  # every trial is a normal run directory that never ranked the test split
        metrics = json.loads((study / "trials" / f"trial_{trial['number']:04d}" / "metrics.json").read_text())
        assert metrics["test"] is None and metrics["history"] and "test" not in metrics["history"][0]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = max(complete, key=lambda t: t["value"])
    best_cfg = load_config(study / "best.yaml")
    assert best_cfg.train.lr == pytest.approx(best["params"]["train.lr"])
    assert best_cfg.model.num_layers == best["params"]["model.num_layers"]
    assert best_cfg.train.num_negatives == best["params"]["train.num_negatives"]
    assert best_cfg.eval.test == "end" and best_cfg.eval.patience == 0  # a ready training config
    assert f"VALIDATION ndcg@10 {best['value']:.4f}" in (study / "best.yaml").read_text()
    spent = sum(t["epochs_run"] for t in counted)  # the budget: every finished trial's epochs
    assert f"{spent} epochs trained in all" in (study / "best.yaml").read_text() and f"{spent} epochs trained" in out
    for plot in ("history", "importance", "validation_curves"):
        assert (study / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same command with a larger budget continues the study: the finished trials stay as they were
    out = _tune(dataset, base_config, space, study, "--trials", str(len(counted) + 1))
    assert f"{len(counted)} of {len(counted) + 1} trials done" in out
    again = _trials(study)
    assert len(again) == len(trials) + 1 and again[:len(trials)] == trials
    # another space on the same study directory is refused
    with pytest.raises(ConfigError, match="holds a study of another data/config/space"):
        run_study(dataset, base_config, _space(tmp_path, **{"fixed:eval.patience": 2}), study, 9, 1, "test")


def test_an_interrupted_trial_continues_from_its_checkpoint(dataset, base_config, tmp_path):
    space = _space(tmp_path, **{"fixed:train.max_epochs": 40, **NO_PRUNING})
    study = tmp_path / "study"
    proc = _tune(dataset, base_config, space, study, "--trials", "1", start_new_session=True)
    checkpoints = study / "trials" / "trial_0000" / "checkpoints"
    _wait_while_running(proc, lambda: any(checkpoints.glob("ep0003*")), 120)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    out = _tune(dataset, base_config, space, study, "--trials", "1")
    assert "0 of 1 trials done, 1 interrupted trial(s) queued" in out
    assert "resumed from ep" in out
    first, second = _trials(study)
    assert first["state"] == "FAIL" and first["interrupted"]
    assert second["state"] == "COMPLETE" and second["resume_of"] == 0 and second["params"] == first["params"]
    metrics = json.loads((study / "trials" / "trial_0000" / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == list(range(40))  # continued, not restarted
    assert metrics["test"] is None
    header = (study / "best.yaml").read_text().splitlines()[1]
    assert ("1 complete, 0 pruned, 0 failed trials; 1 interrupted by a stop (each continues from its checkpoint as a "
            "new trial)") in header


def test_an_edit_of_the_config_during_a_study_changes_no_trial(dataset, tmp_path):
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(BASE))
    space, study = _space(tmp_path, **NO_PRUNING), tmp_path / "study"
    proc = _tune(dataset, config, space, study, "--trials", "2", start_new_session=True)
    _wait_while_running(proc, (study / "trials" / "trial_0000").is_dir, 180)
    edited = json.loads(json.dumps(BASE))
    edited["model"]["hidden_size"] = 16
    config.write_text(yaml.safe_dump(edited))
    assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]
    assert load_config(study / "base.yaml").model.hidden_size == 8
    for trial in _trials(study):
        assert load_config(study / "trials" / f"trial_{trial['number']:04d}" / "config.yaml").model.hidden_size == 8
    assert load_config(study / "best.yaml").model.hidden_size == 8
    with pytest.raises(ConfigError, match="holds a study of another data/config/space"):
        run_study(dataset, config, space, study, 3, 1, "test")


def test_a_stopped_study_leaves_its_best_config_and_continues_with_new_parameters(dataset, base_config, tmp_path):
    """trials.json and best.yaml follow every trial, so a study killed mid-way leaves its current best; each start
    draws from a sampler stream of its own (seeded as at the first start, a continued study would propose its first
    trials' parameters again)."""
    space, study = _space(tmp_path, **NO_PRUNING), tmp_path / "study"
    proc = _tune(dataset, base_config, space, study, "--trials", "2", start_new_session=True)
    _wait_while_running(proc, (study / "trials" / "trial_0001").is_dir, 180)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (first,) = _trials(study)
    assert first["state"] == "COMPLETE" and "Best trial #0 " in (study / "best.yaml").read_text()

    _tune(dataset, base_config, space, study, "--trials", "3")
    trials = _trials(study)
    assert [t["state"] for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"] and trials[2]["resume_of"] == 1
    assert len({json.dumps(t["params"], sort_keys=True) for t in trials if not t["interrupted"]}) == 3
    assert all(t["repeat_of"] is None for t in trials)


def test_a_repeated_configuration_is_not_trained_again_nor_counted(dataset, base_config, tmp_path):
    import optuna
    space = _space(tmp_path, **{"params:train.lr": None, "params:model.hidden_dropout": None,
                                "params:num_layers": None, **NO_PRUNING})  # two configurations: 8 or 16 negatives
    study = tmp_path / "study"
    _tune(dataset, base_config, space, study, "--trials", "1")
    (first,) = _trials(study)
    optuna_study = optuna.load_study(study_name="cammsr", storage=f"sqlite:///{study / 'study.db'}")
    optuna_study.enqueue_trial(first["params"])
    # trial 1 repeats trial 0 and is left running, as by a kill: its continuation is not trained
    optuna_study.ask().suggest_categorical("train.num_negatives", [8, 16])
    optuna_study.enqueue_trial(first["params"])  # trial 2 repeats it too (the continuation is queued after it)
    out = _tune(dataset, base_config, space, study, "--trials", "2")
    trials = _trials(study)
    assert trials[1]["interrupted"] and trials[2]["resume_of"] is None and trials[3]["resume_of"] == 1
    for repeated in trials[2:4]:
        assert repeated["repeat_of"] == 0 and repeated["value"] == first["value"] and repeated["epochs_run"] is None
    assert out.count("the parameters of trial 0: not trained again, not counted") >= 2
    assert not (study / "trials" / "trial_0001").exists() and not (study / "trials" / "trial_0002").exists()
    counted = [t for t in trials if t["repeat_of"] is None and not t["interrupted"]]
    assert sorted(t["params"]["train.num_negatives"] for t in counted) == [8, 16]
    assert "2 distinct configurations finished" in out
    assert "Best trial #1 " not in (study / "best.yaml").read_text()  # a repeat never stands for its config
    with pytest.raises(ConfigError, match="holds only 2 distinct configurations"):
        run_study(dataset, base_config, space, study, 3, 1, "test")


def test_tuned_accuracy_reads_the_chosen_runs_and_needs_equal_budgets(dataset, base_config, tmp_path):
    """benchmarks.tuned_accuracy: studies of unequal budgets are refused by name; equal ones give each chosen run's
    test (as training its best.yaml again gives) and the per-user paired difference to the first study's."""
    first, second = tmp_path / "first", tmp_path / "second"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _tune(dataset, base_config, _space(tmp_path / "a", **NO_PRUNING), first, "--trials", "1")
    other = _space(tmp_path / "b", **NO_PRUNING)
    other.write_text(other.read_text().replace("seed: 1\n", "seed: 7\n"))  # its own draws
    _tune(dataset, base_config, other, second, "--trials", "2")
    report = [PY, "-m", "benchmarks.tuned_accuracy", "--data", str(dataset), f"A={first}", f"B={second}",
              "--anchor", "0.1", "--anchor-name", "a public run"]
    refused = subprocess.run(report, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "different numbers of configurations (A 1, B 2)" in refused.stderr
    # a model tuned in two stages: its budget is the sum, its run the best on validation over both studies
    extra = tmp_path / "extra"
    (tmp_path / "c").mkdir()
    staged = _space(tmp_path / "c", **NO_PRUNING)
    staged.write_text(staged.read_text().replace("seed: 1\n", "seed: 3\n"))
    _tune(dataset, base_config, staged, extra, "--trials", "1")
    two_stages = subprocess.run(report[:5] + [f"A={second}", f"B={first},{extra}"], cwd=ROOT, env=cpu_env(),
                                capture_output=True, text=True, timeout=300)
    assert two_stages.returncode == 0, two_stages.stdout[-3000:] + two_stages.stderr[-3000:]
    stages = {study: _trials(study)[0] for study in (first, extra)}
    chosen = max(stages, key=lambda study: stages[study]["value"])
    epochs = sum(trial["epochs_run"] for trial in stages.values())
    assert re.search(rf"^\| B \| 2 / {epochs} \| {chosen.name}/trial_0000 \(\d+ / \d+\) \| "
                     rf"{stages[chosen]['value']:.4f} \|", two_stages.stdout, re.M), two_stages.stdout[-2000:]
    _tune(dataset, base_config, _space(tmp_path / "a", **NO_PRUNING), first, "--trials", "2")
    proc = subprocess.run(report, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {name: re.search(rf"^\| {name} \| 2 / (\d+) \| trial_\d{{4}} \(\d+ / \d+\) \| 0\.\d{{4}} \| "
                             rf"(0\.\d{{4}}) \| (\d\.\d{{3}}) \| (.*) \|$", proc.stdout, re.M) for name in "AB"}
    assert all(rows.values()), proc.stdout[-2000:]
    again = subprocess.run([PY, "-m", "train.command", "--data", str(dataset), "--run-dir", str(tmp_path / "again"),
                            "--config", str(second / "best.yaml")], cwd=ROOT, env=cpu_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    test = json.loads((tmp_path / "again" / "metrics.json").read_text())["test"]["ndcg@10"]
    assert rows["B"].group(2) == f"{test:.4f}" and rows["B"].group(3) == f"{test / 0.1:.3f}"
    epochs = sum(t["epochs_run"] for t in _trials(second) if t["state"] == "COMPLETE")
    assert rows["B"].group(1) == str(epochs) and rows["A"].group(4) == "-"
    difference = float(rows["B"].group(4).split()[0])
    assert abs(difference - (float(rows["B"].group(2)) - float(rows["A"].group(2)))) < 2e-4  # rounding of both
    alone = subprocess.run(report[:6] + report[7:], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                           timeout=300)  # A alone: its row against the anchor, no paired column
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert re.search(rf"^\| A \| 2 / \d+ \| .* \| {rows['A'].group(2)} \| {rows['A'].group(3)} \| - \|$", alone.stdout,
                     re.M), alone.stdout[-2000:]


def test_workers_ask_for_trials_one_at_a_time(tmp_path):
    """A queued trial (an interrupted one's continuation) must go to one worker, and SQLite ignores the row lock that
    Optuna's queue relies on: a worker's ask waits while another holds the study's ask lock."""
    import fcntl
    import threading

    import optuna
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    study.enqueue_trial({"x": 1.0})
    _serialise_asks(study, tmp_path / ".ask.lock")
    asked = []
    with open(tmp_path / ".ask.lock", "w") as other_worker:
        fcntl.flock(other_worker, fcntl.LOCK_EX)
        thread = threading.Thread(target=lambda: asked.append(study.ask()))
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not asked  # waiting for the other worker's ask
    thread.join(timeout=30)
    assert [trial.number for trial in asked] == [0] and asked[0].suggest_float("x", 0, 2) == 1.0


def test_a_study_goes_on_from_its_ledger_in_a_new_study_directory(dataset, base_config, tmp_path):
    """A machine that lost the study directory: a new one starts from the ledger's trials as they were (not trained
    again), trains the best trial's config again for its model, to the same validation value, and goes on."""
    space = _space(tmp_path, **NO_PRUNING)
    ledger, lost, new = tmp_path / "ledger.json", tmp_path / "lost", tmp_path / "new"
    _tune(dataset, base_config, space, lost, "--trials", "2", "--ledger", str(ledger))
    before = _trials(lost)
    assert json.loads(ledger.read_text())["trials"] == before

    out = _tune(dataset, base_config, space, new, "--trials", "2", "--ledger", str(ledger))
    assert "2 of 2 trials done (2 trials taken from the ledger" in out
    after = _trials(new)
    kept = ("number", "state", "value", "params", "epochs_run", "best_epoch", "validation_rounds")
    assert [{k: t[k] for k in kept} for t in after] == [{k: t[k] for k in kept} for t in before]
    best = max(before, key=lambda t: t["value"])
    other = next(t for t in before if t is not best)
    assert f"best trial #{best['number']} trained again: valid ndcg@10 {best['value']:.4f}" in out
    assert "the runs differ" not in out
    metrics = json.loads((new / "trials" / f"trial_{best['number']:04d}" / "metrics.json").read_text())
    assert metrics["valid"]["ndcg@10"] == pytest.approx(best["value"], abs=1e-9) and metrics["test"] is None
    assert not (new / "trials" / f"trial_{other['number']:04d}").exists()  # only the best one's model is needed

    _tune(dataset, base_config, space, new, "--trials", "3", "--ledger", str(ledger))
    grown = json.loads(ledger.read_text())["trials"]
    assert len(grown) == 3 and grown[2]["params"] not in (before[0]["params"], before[1]["params"])
    with pytest.raises(ConfigError, match="holds 3 trials, the study in its --study-dir only 2"):
        run_study(dataset, base_config, space, lost, 3, 1, "test", ledger)
    with pytest.raises(ConfigError, match="holds a study of another data/config/space"):
        run_study(dataset, base_config, _space(tmp_path, **{"fixed:eval.patience": 2}), tmp_path / "third", 3, 1,
                  "test", ledger)


@pytest.mark.parametrize("model, id_warmup_epochs", [("sasrec", 0), ("cammsr", 2)])
def test_the_pruner_stops_trials_on_their_validation_curve(dataset, base_config, tmp_path, model, id_warmup_epochs):
    """Rounds count from the end of the ID warm-up: with 2 warm-up epochs a trial is judged 2 epochs later."""
    space = _space(tmp_path, **{"pruner:kind": "threshold", "pruner:lower": 1.1, "pruner:startup_trials": None,
                                "pruner:warmup_rounds": 1, "fixed:model.name": model,
                                "fixed:train.id_warmup_epochs": id_warmup_epochs, "fixed:train.max_epochs": 6})
    study = tmp_path / "study"
    out = _tune(dataset, base_config, space, study, "--trials", "2")
    trials = _trials(study)
    assert [t["state"] for t in trials] == ["PRUNED", "PRUNED"]
    # round 0 is the pruner's warm-up, round 1 falls below 1.1: stopped
    assert all(t["epochs_run"] == id_warmup_epochs + 2 for t in trials)
    assert "no complete trial yet: no best config written" in out and not (study / "best.yaml").exists()


@pytest.mark.parametrize("space", sorted((ROOT / "configs" / "spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_shipped_spaces_pass_their_checks(space):
    """Every space under configs/spaces is valid on top of the config and data its header's command names."""
    from train.tune_space import load_space
    command = re.search(r"--data (\S+) --config (\S+) --space (\S+)", space.read_text())
    assert command and command.group(3) == f"configs/spaces/{space.name}", "the header's command runs this space"
    loaded, base = load_space(space, ROOT / command.group(2), command.group(1))
    assert loaded.params and base.eval.test == "never"
