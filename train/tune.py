"""`cammsr tune`: a hyper-parameter study on validation only (Optuna), resumable, pruned, in parallel processes.

The study lives in DIR/study.db (SQLite through Optuna's RDB storage): a finished trial is never lost, and running
the same command again continues the study. A trial interrupted by a crash or a kill is marked failed and queued
again with the same parameters; it continues from the last checkpoint of its run directory
(DIR/trials/trial_NNNN, a normal run directory: config.yaml, metrics.json, TensorBoard events, checkpoints).
--trials counts distinct configurations: a proposal that repeats a finished trial's parameters takes that trial's
result without training and is not counted. Every trial trains with eval.test=never, so no test metric is computed
during a study. Trials read the base config from DIR/base.yaml, --config as resolved when the study started: an
edit of that file during the study changes no trial (and a later start with the edited file is refused). Each
validation round that may select the best epoch is reported to the pruner (median of the earlier trials at the same
round, or a threshold), which may stop a weak trial early. Rounds are counted from the end of a trial's ID warm-up
(train.id_warmup_epochs), so a trial that trains its content pathways from epoch 10 is judged after as many rounds
of them as one that trains them from epoch 0.
`--parallel P` runs P worker processes on the one study, each trial a world of one process with cores/P threads
(the cores this process may use: taskset and cpusets count).

After every trial: DIR/best.yaml (the best trial's config, ready for `cammsr train --config`) and DIR/trials.json
(every trial's state, value, parameters and validation rounds); at the end also DIR/plots/*.png (history, parameter
importance, validation curves).

`--ledger FILE` keeps the study outside DIR as well (trials.json's rows with the setup's fingerprint, rewritten after
every trial): a machine that lost DIR (or another one) starts a new DIR from the ledger's trials and goes on, and
trains the best trial's config again when it needs that trial's model. A ledger of another space, config or
dataset content is refused.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import multiprocessing
import os
import time
import warnings
from pathlib import Path

from data_shards.problems import DataError
from train.checkpoint import atomic_write_text
from train.config import ConfigError, load_config
from train.tune_space import SearchSpace, load_space

STUDY_NAME = "cammsr"
_COUNTED = ("COMPLETE", "PRUNED", "FAIL")  # a trial failed by an interruption is queued again and not counted


def _storage(study_dir: Path):
    import optuna
    return optuna.storages.RDBStorage(f"sqlite:///{study_dir / 'study.db'}",
                                      engine_kwargs={"connect_args": {"timeout": 300}})


def _pruner(spec: dict):
    import optuna
    if spec["kind"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(spec.get("startup_trials", 5)),
                                           n_warmup_steps=int(spec.get("warmup_rounds", 0)))
    if spec["kind"] == "threshold":
        return optuna.pruners.ThresholdPruner(lower=float(spec["lower"]),
                                              n_warmup_steps=int(spec.get("warmup_rounds", 0)))
    return optuna.pruners.NopPruner()


def _open_study(settings: dict, worker: int, storage=None):
    import numpy as np
    import optuna
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage or _storage(settings["study_dir"]),
                                direction="maximize", pruner=_pruner(settings["space"].pruner), load_if_exists=True)
    # a sampler stream of its own for each worker and each start: a stream seeded as at the study's first start
    # would propose the first trials' parameters again after every resume
    started = len(study.get_trials(deepcopy=False))
    seed = np.random.SeedSequence([settings["space"].seed, worker, started]).generate_state(1)[0]
    study.sampler = optuna.samplers.TPESampler(seed=int(seed))
    return study


def _configuration(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def _finished_configurations(study) -> dict:
    """The first finished trial of each distinct parameter set (what --trials counts): a trial interrupted by a kill
    continues as a new trial, and one that repeats a finished trial's parameters adds no configuration."""
    first = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name in _COUNTED and not trial.user_attrs.get("interrupted"):
            first.setdefault(_configuration(trial.params), trial)
    return first


def _counted(study) -> int:
    return len(_finished_configurations(study))


def _best_trial(study):
    """The complete trial of the best value (the earliest of equal ones, not a repeat of it), or None."""
    complete = [t for t in _finished_configurations(study).values() if t.state.name == "COMPLETE"]
    return max(complete, key=lambda t: t.value) if complete else None


def _epochs_trained(trials) -> int:
    """The budget a study spent: every epoch its complete and pruned trials trained (a trial that continues an
    interrupted one counts the epochs before the interruption too)."""
    return sum(t.user_attrs.get("epochs_run") or 0 for t in trials if t.state.name in ("COMPLETE", "PRUNED"))


def study_progress(study_dir: Path) -> dict | None:
    """{"counted": finished trials as --trials counts them, "best": the best complete trial's value or None,
    "epochs": `_epochs_trained`} of the study in study_dir, read without running anything; None before it exists."""
    if not (study_dir / "study.db").is_file():
        return None
    import optuna
    study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(study_dir))
    best = _best_trial(study)
    return {"counted": _counted(study), "best": None if best is None else best.value,
            "epochs": _epochs_trained(study.get_trials(deepcopy=False))}


def best_trial_run(study_dir: Path) -> Path | None:
    """The run directory of the study's best trial (`_best_trial`, best.yaml's), None while no trial is complete."""
    if not (study_dir / "study.db").is_file():
        return None
    import optuna
    best = _best_trial(optuna.load_study(study_name=STUDY_NAME, storage=_storage(study_dir)))
    return None if best is None else _trial_run_dir(study_dir, best)


def _trial_run_dir(study_dir: Path, trial) -> Path:
    """A trial's run directory; the continuation of an interrupted trial trains on in the interrupted one's."""
    return study_dir / "trials" / f"trial_{int(trial.user_attrs.get('resume_of', trial.number)):04d}"


def trial_overrides(settings: dict, values: dict) -> list[str]:
    """A trial's config overrides: the study's own, the space's fixed values, the trial's sampled values."""
    space: SearchSpace = settings["space"]
    own = [f"data.path={settings['data']}", "eval.test=never", f"eval.metric={space.metric}"]
    if settings["parallel"] > 1:
        own.append("logging.progress=false")  # P interleaved progress bars say nothing
    return own + space.overrides(values)


def _objective(settings: dict):
    import optuna

    from train.loop import Trainer

    space: SearchSpace = settings["space"]

    def objective(trial) -> float:
        values = {param.key: param.suggest(trial) for param in space.params}
        # an interrupted trial is not finished, so its continuation matches only when it repeated a finished one
        earlier = _finished_configurations(trial.study).get(_configuration(values))
        if earlier is not None:  # the same config trains to the same result: not trained again, not counted
            trial.set_user_attr("repeat_of", earlier.number)
            if earlier.state.name == "COMPLETE":
                return earlier.value
            raise optuna.TrialPruned(f"repeats trial {earlier.number} ({earlier.state.name.lower()})")
        run_dir = _trial_run_dir(settings["study_dir"], trial)
        trial.set_user_attr("run_dir", str(run_dir))
        cfg = load_config(settings["config"], trial_overrides(settings, values))
        trainer = Trainer(cfg, run_dir, resume=(run_dir / "checkpoints").is_dir())
        candidates = [record["valid"][space.metric] for record in trainer.state["history"]
                      if not record.get("id_warmup")]
        for round_index, metric in enumerate(candidates):  # a resumed trial's earlier rounds, for the pruner
            trial.report(metric, round_index)

        def report(epoch: int, metric: float) -> None:
            round_index = len(candidates)
            candidates.append(metric)
            trial.report(metric, round_index)
            if trial.should_prune():
                raise optuna.TrialPruned(f"valid {space.metric} {metric:.4f} at epoch {epoch} (round {round_index})")

        trainer.on_validation = report
        try:
            trainer.train()
        finally:
            trial.set_user_attr("epochs_run", trainer.state["epoch"])
            trainer.release()
        if trainer.state["best_metric"] is None:
            raise RuntimeError(f"trial {trial.number}: no validation round selected a best epoch")
        trial.set_user_attr("best_epoch", trainer.state["best_epoch"])
        return float(trainer.state["best_metric"])

    return objective


def _progress(settings: dict, started: float):
    from optuna.trial import TrialState

    def callback(study, trial) -> None:
        done = _counted(study)
        total = settings["trials"]
        value = "" if trial.value is None else f" valid {settings['space'].metric} {trial.value:.4f}"
        if "repeat_of" in trial.user_attrs:
            value += f" (the parameters of trial {trial.user_attrs['repeat_of']}: not trained again, not counted)"
        best = _best_trial(study)
        elapsed = time.time() - started
        rate = elapsed / max(done - settings["done_at_start"], 1)
        eta = max(total - done, 0) * rate / settings["parallel"]
        print(f"trial {trial.number} {trial.state.name.lower()}{value}; {done}/{total} trials done; best "
              + (f"#{best.number} {best.value:.4f}" if best else "none yet")
              + f"; {rate / 60:.1f} min/trial, ETA {eta / 60:.0f} min", flush=True)
        _write_results(study, settings)
        # trials other workers are training count too: a worker that started another one as the last ran out would
        # take the study past its budget (with 19 of 20 done and one running, a 21st configuration)
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if done + running >= total:
            study.stop()
    return callback


def _serialise_asks(study, lock_path: Path) -> None:
    """One `ask` at a time across the study's worker processes. A queued trial (an interrupted one's continuation)
    is popped by reading it WAITING, then setting it RUNNING under SELECT ... FOR UPDATE, which SQLite ignores: two
    workers could both pop it and train it at once in one run directory (seen with --parallel 2)."""
    ask = study.ask

    def locked_ask(*args, **kwargs):
        with open(lock_path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            return ask(*args, **kwargs)

    study.ask = locked_ask  # Study.optimize asks through the instance


def _worker(settings: dict, index: int) -> None:
    import optuna
    import torch

    from train.distributed import shutdown

    torch.set_num_threads(settings["threads"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(settings, index)
    _serialise_asks(study, settings["study_dir"] / ".ask.lock")
    if _counted(study) >= settings["trials"]:
        return
    try:
        study.optimize(_objective(settings), callbacks=[_progress(settings, time.time())], catch=(Exception,),
                       gc_after_trial=True)
    finally:
        shutdown(False)


def _setup_fingerprint(space: SearchSpace, base, data: str) -> str:
    """What the study's trials depend on: the space, the base config and the dataset's content (its shards, not its
    path, so that a study's ledger carries over to another machine's copy of the same data)."""
    from data_shards.reader import PreparedDataset
    from train.loop import data_fingerprint
    tree = base.to_dict()
    tree["data"].pop("path")
    payload = {"space": space.fingerprint_payload(), "base": tree,
               "data": data_fingerprint(PreparedDataset(data, verify=False))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _freeze_base_config(config: Path | None, study_dir: Path) -> Path:
    """DIR/base.yaml: the --config as the study (re)started, resolved; every trial reads it, so an edit of the
    --config file while the study runs cannot change its later trials (the next start with the edited file is
    refused by the setup's fingerprint)."""
    path = study_dir / "base.yaml"
    atomic_write_text(path, f"# The base config of the study in {study_dir}: --config {config} as resolved at the "
                            f"study's last start; its trials read this file\n" + load_config(config).to_yaml())
    return path


def _recover_interrupted(study, storage) -> int:
    """Trials left RUNNING by a killed study: marked failed (not counted) and queued again with their parameters
    and run directory, so they continue from their last checkpoint. Only called under the study's lock."""
    from optuna.trial import TrialState
    interrupted = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in interrupted:
        storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        origin = int(trial.user_attrs.get("resume_of", trial.number))
        study.enqueue_trial(trial.params, user_attrs={"resume_of": origin}, skip_if_exists=False)
    return len(interrupted)


def _plots(study, out: Path, metric: str) -> list[str]:
    """PNG plots of the study; one that cannot be drawn yet (e.g. importance with one trial) is named, not fatal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as oplt

    out.mkdir(parents=True, exist_ok=True)
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, draw in (("history", oplt.plot_optimization_history), ("importance", oplt.plot_param_importances),
                           ("validation_curves", oplt.plot_intermediate_values)):
            try:
                axes = draw(study)
            except (ValueError, RuntimeError) as err:
                notes.append(f"{name}.png not drawn: {err}")
                continue
            if name == "validation_curves":
                axes.set_xlabel("validation round (after any ID warm-up)")
                axes.set_ylabel(f"valid {metric}")
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
            plt.close(figure)
    return notes


def _trial_row(trial) -> dict:
    """One trial as trials.json and the ledger keep it: enough to add it to a new study as it was."""
    from optuna.distributions import distribution_to_json
    attrs = trial.user_attrs
    return {"number": trial.number, "state": trial.state.name, "value": trial.value, "params": trial.params,
            "epochs_run": attrs.get("epochs_run"), "best_epoch": attrs.get("best_epoch"),
            "run_dir": attrs.get("run_dir"), "interrupted": bool(attrs.get("interrupted")),
            "resume_of": attrs.get("resume_of"), "repeat_of": attrs.get("repeat_of"),
            "validation_rounds": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
            "distributions": {k: distribution_to_json(d) for k, d in trial.distributions.items()},
            "user_attrs": attrs}


def _ledger_trial(row: dict):
    """A ledger row as a finished trial for `study.add_trial`; a trial the ledger saw running was interrupted with
    its machine and becomes one (failed, not counted), as `_recover_interrupted` marks a killed study's."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState
    state = TrialState[row["state"]]
    attrs = dict(row["user_attrs"], from_ledger=True)
    if state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        state, attrs["interrupted"] = TrialState.FAIL, True
    return optuna.trial.create_trial(
        state=state, value=row["value"] if state == TrialState.COMPLETE else None, params=row["params"],
        distributions={k: json_to_distribution(d) for k, d in row["distributions"].items()}, user_attrs=attrs,
        intermediate_values={int(k): v for k, v in row["validation_rounds"].items()})


def _import_ledger(study, ledger: Path, fingerprint: str) -> int:
    """A new study directory starts from the ledger's trials (numbers, states, values, validation rounds and
    parameters as they were), so that the study goes on where the ledger's machine stopped; trials that were running
    there are queued again. A study directory that already holds trials must hold at least the ledger's."""
    if not ledger.is_file():
        return 0
    try:
        saved = json.loads(ledger.read_text())
        rows = sorted(saved["trials"], key=lambda row: row["number"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--ledger {ledger}: not a study ledger ({err})") from None
    if saved.get("setup_fingerprint") != fingerprint:
        raise ConfigError(f"--ledger {ledger} holds a study of another data/config/space "
                          f"({saved.get('setup_fingerprint')} != {fingerprint})")
    present = len(study.get_trials(deepcopy=False))
    if present:
        if present < len(rows):
            raise ConfigError(f"--ledger {ledger} holds {len(rows)} trials, the study in its --study-dir only "
                              f"{present}: continue from the ledger in a new --study-dir")
        return 0
    if [row["number"] for row in rows] != list(range(len(rows))):
        raise ConfigError(f"--ledger {ledger}: trial numbers are not 0..{len(rows) - 1}")
    for row in rows:
        trial = _ledger_trial(row)
        study.add_trial(trial)
        if row["state"] not in ("COMPLETE", "PRUNED", "FAIL"):
            origin = int(row["user_attrs"].get("resume_of", row["number"]))
            study.enqueue_trial(row["params"], user_attrs={"resume_of": origin}, skip_if_exists=False)
    return len(rows)


def _train_best_if_missing(study, settings: dict) -> None:
    """The best trial's model where the study came from a ledger (its run lives on another machine): its config is
    trained again in its own run directory, as the trial trained (validation only), and both values are printed. On
    one CPU process and the same thread count the run repeats the trial's curve exactly."""
    best = _best_trial(study)
    if best is None or not best.user_attrs.get("from_ledger"):
        return
    run_dir = _trial_run_dir(settings["study_dir"], best)
    cfg = load_config(settings["config"], trial_overrides(settings, best.params))
    if (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if metrics["stopped_early"] or metrics["epochs_run"] >= cfg.train.max_epochs:
            return
    import torch

    from train.loop import Trainer
    torch.set_num_threads(settings["threads"])
    print(f"best trial #{best.number}: its run is not in {run_dir} (the study came from a ledger): training its "
          "config again there", flush=True)
    trainer = Trainer(cfg, run_dir, resume=(run_dir / "checkpoints" / "latest").is_file())
    try:
        trainer.train()
    finally:
        trainer.release()
    again = trainer.state["best_metric"]
    print(f"best trial #{best.number} trained again: valid {settings['space'].metric} {again:.4f} at epoch "
          f"{trainer.state['best_epoch']} (the ledger's: {best.value:.4f} at epoch {best.user_attrs.get('best_epoch')})"
          + ("" if abs(again - best.value) < 1e-6 else "; the runs differ: another thread count or library version "
             "changed the arithmetic"), flush=True)


def ready_config(config, space: SearchSpace, params: dict):
    """A trial's parameters as a ready training config: the base, the space's fixed values, the parameters (test on)."""
    return load_config(config, [f"eval.metric={space.metric}"] + space.overrides(params))


def _write_results(study, settings: dict) -> dict:
    """DIR/trials.json and DIR/best.yaml as the study stands; rewritten after every trial (atomically, since parallel
    workers write them too), so a study stopped at any point leaves its current best config."""
    study_dir = settings["study_dir"]
    rows = [_trial_row(t) for t in study.get_trials(deepcopy=False)]
    atomic_write_text(study_dir / "trials.json", json.dumps(rows, indent=1))
    if settings["ledger"] is not None:
        atomic_write_text(settings["ledger"], json.dumps({"setup_fingerprint": settings["fingerprint"],
                                                          "command": settings["command"], "trials": rows}, indent=1))
    states = {s: sum(r["state"] == s and not r["interrupted"] for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
    interrupted = sum(r["interrupted"] for r in rows)
    epochs = _epochs_trained(study.get_trials(deepcopy=False))
    configurations = (f"{_counted(study)} distinct configurations finished; {states['COMPLETE']} complete, "
                      f"{states['PRUNED']} pruned, {states['FAIL']} failed trials"
                      + (f"; {interrupted} interrupted by a stop (each continues from its checkpoint as a new "
                         "trial)" if interrupted else ""))
    best = _best_trial(study)
    if best is not None:
        space: SearchSpace = settings["space"]
        cfg = ready_config(settings["config"], space, best.params)
        header = [f"# Best trial #{best.number} of the study in {study_dir} (cammsr tune), chosen on VALIDATION "
                  f"{space.metric} {best.value:.4f} (best epoch {best.user_attrs.get('best_epoch')}).",
                  f"# {configurations}, {epochs} epochs trained in all; command: {settings['command']}",
                  "# Its parameters: " + ", ".join(f"{k}={v}" for k, v in best.params.items())]
        atomic_write_text(study_dir / "best.yaml", "\n".join(header) + "\n" + cfg.to_yaml())
    return {"trials": len(rows), "configurations": configurations, "epochs": epochs, "best": best}


def _summarise(study, settings: dict) -> None:
    study_dir = settings["study_dir"]
    results = _write_results(study, settings)
    print(f"study {study_dir}: {results['trials']} trials ({results['configurations']}), {results['epochs']} epochs "
          f"trained -> {study_dir / 'trials.json'}")
    for note in _plots(study, study_dir / "plots", settings["space"].metric):
        print(f"  {note}")
    best = results["best"]
    if best is None:
        print("no complete trial yet: no best config written")
        return
    print(f"best: trial #{best.number}, valid {settings['space'].metric} {best.value:.4f}; {best.params} -> "
          f"{study_dir / 'best.yaml'}")


def run_study(data: Path, config: Path | None, space_path: Path, study_dir: Path, trials: int, parallel: int,
              command: str, ledger: Path | None = None) -> None:
    if not data.is_dir():
        raise DataError(f"--data {data}: no such folder")
    if trials < 1 or parallel < 1:
        raise ConfigError(f"--trials {trials} and --parallel {parallel} must be >= 1")
    space, base = load_space(space_path, config, str(data))  # every bad key/value stops here, before any trial
    configurations = space.configurations()
    if configurations is not None and trials > configurations:
        raise ConfigError(f"--trials {trials}: the space {space_path} holds only {configurations} distinct "
                          "configurations")
    import optuna
    study_dir.mkdir(parents=True, exist_ok=True)
    if ledger is not None:
        ledger.parent.mkdir(parents=True, exist_ok=True)
    lock = open(study_dir / ".tune.lock", "w")  # noqa: SIM115 -- held for the whole study
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"--study-dir {study_dir}: another `cammsr tune` is running on this study") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = {"data": str(data), "config": config, "space": space, "study_dir": study_dir, "trials": trials,
                "parallel": parallel, "threads": max(1, len(os.sched_getaffinity(0)) // parallel), "command": command,
                "ledger": ledger, "fingerprint": _setup_fingerprint(space, base, str(data))}
    storage = _storage(study_dir)
    study = _open_study(settings, 0, storage)
    fingerprint = settings["fingerprint"]
    stored = study.user_attrs.get("setup_fingerprint")
    if stored is None:
        study.set_user_attr("setup_fingerprint", fingerprint)
    elif stored != fingerprint:
        raise ConfigError(f"--study-dir {study_dir} holds a study of another data/config/space "
                          f"({stored} != {fingerprint}); pass a new --study-dir to start another study")
    settings["config"] = _freeze_base_config(config, study_dir)
    imported = 0 if ledger is None else _import_ledger(study, ledger, fingerprint)
    recovered = _recover_interrupted(study, storage)
    settings["done_at_start"] = _counted(study)
    print(f"study {study_dir}: {settings['done_at_start']} of {trials} trials done"
          + (f" ({imported} trials taken from the ledger {ledger})" if imported else "")
          + (f", {recovered} interrupted trial(s) queued to continue from their checkpoints" if recovered else "")
          + f"; {parallel} worker process(es) x {settings['threads']} threads; validation {space.metric}, "
          f"test never computed", flush=True)
    if parallel == 1:
        _worker(settings, 0)
    else:
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=_worker, args=(settings, index)) for index in range(parallel)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        failed = [w.exitcode for w in workers if w.exitcode]
        if failed:
            print(f"{len(failed)} worker process(es) exited with {failed}; the study keeps what they finished")
    _train_best_if_missing(study, settings)
    _summarise(study, settings)


def _run_tune(args) -> None:
    command = ("cammsr tune --data {} {}--space {} --study-dir {} --trials {} --parallel {}{}"
               .format(args.data, f"--config {args.config} " if args.config else "", args.space, args.study_dir,
                       args.trials, args.parallel, f" --ledger {args.ledger}" if args.ledger else ""))
    run_study(args.data, args.config, args.space, args.study_dir, args.trials, args.parallel, command, args.ledger)


def add_tune_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tune", help="hyper-parameter study on validation (Optuna): resumable, pruned, parallel trials",
        description="Search the space of --space (YAML: params, fixed, metric, pruner, seed; see train/tune_space.py) "
                    "on top of --config, selecting on validation only (test is never computed). The study is kept "
                    "in STUDY_DIR/study.db: the same command continues it after an interruption. Writes "
                    "STUDY_DIR/best.yaml, trials.json and plots/*.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="prepared dataset folder")
    parser.add_argument("--config", type=Path, help="base YAML config the space's values override")
    parser.add_argument("--space", required=True, type=Path, help="search space YAML")
    parser.add_argument("--study-dir", required=True, type=Path, help="where the study and its trials live")
    parser.add_argument("--trials", type=int, default=20,
                        help="distinct configurations the study should have finished in total")
    parser.add_argument("--parallel", type=int, default=1, help="worker processes running trials at once")
    parser.add_argument("--ledger", type=Path,
                        help="a JSON copy of the study kept outside STUDY_DIR (say, committed beside the project), "
                             "rewritten after every trial: a new STUDY_DIR, on this or another machine, starts from "
                             "its trials instead of from zero, and trains the best one's config again for its model")
    parser.set_defaults(run=_run_tune)
    return parser


__all__ = ["add_tune_command", "ready_config", "run_study", "trial_overrides"]
