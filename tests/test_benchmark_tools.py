"""The per-step and per-validation benchmark tools on a real (tiny) trainer: step_ops attributes every forward op
once, per model part and times the step; eval_time validates every user; accuracy_table reads a run's metrics; a
finished benchmark run is reused only for its own config; the resumable benchmark commands run and continue; the idle
check before a timing sees other processes' CPU and not its own children's."""
import json
import os
import re
import subprocess

import pytest

from conftest import PY, ROOT, cpu_env, write_tiny_dataset

TINY = ["model.hidden_size=8", "model.max_seq_len=6", "model.num_layers=1", "model.num_heads=1",
        "model.num_experts=2", "model.ffn_inner_size=16", "train.batch_size=32", "train.precision=fp32",
        "data.build_features=false", "embedding.backend=torch"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def test_the_idle_check_counts_other_processes_and_not_its_own_children():
    """A spinning process is this test's child (outside the tree of a second, sibling process): the sibling's
    measurement sees one more busy core than this process's, taken over the same seconds."""
    from benchmarks.machine import others_cpu_share
    spinner = subprocess.Popen([PY, "-c", "while True: pass"])
    try:
        sibling = subprocess.Popen([PY, "-c", "from benchmarks.machine import others_cpu_share; "
                                    "print(others_cpu_share(4.0))"], cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE,
                                   text=True)
        own = others_cpu_share(4.0)
        seen_by_sibling = float(sibling.communicate(timeout=60)[0])
    finally:
        spinner.kill()
        spinner.wait()
    assert seen_by_sibling - own > 0.6 / os.cpu_count()


def test_step_ops_counts_each_phase_and_attributes_the_forward_to_model_parts(data):
    proc = subprocess.run([PY, "-m", "benchmarks.step_ops", "--data", str(data), "--config", "configs/tiny.yaml",
                           "--steps", "2", "--warmup", "1", "--timed-steps", "25", *TINY], cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    total = int(re.search(r"cammsr \(modalities id\+text\+image\): ([\d,]+) top-level", out).group(1).replace(",", ""))
    phases = {m.group(1): int(m.group(2).replace(",", ""))
              for m in re.finditer(r"^  (forward|backward|optimizer)\s+([\d,]+)$", out, re.M)}
    assert set(phases) == {"forward", "backward", "optimizer"} and all(v > 0 for v in phases.values())
    assert abs(sum(phases.values()) - total) <= 2  # each printed rounded
    views = int(re.search(r"views \(host time, no kernel\): ([\d,]+)$", out, re.M).group(1).replace(",", ""))
    assert 0 < views < total
    parts = {m.group(1): int(m.group(2).replace(",", ""))
             for m in re.finditer(r"^    (\S.*?)\s+([\d,]+)$", out, re.M)}
    # three modality encoders (each reads its MSCL views in the same pass), the MoE, the category guidance, the
    # projections
    assert {"encoders.0", "encoders.1", "encoders.2", "moe", "category_guidance", "items"} <= set(parts)
    assert abs(sum(parts.values()) - phases["forward"]) <= len(parts)
    step_ms = float(re.search(r"^step time: ([\d.]+) ms wall \(mean of 25 unprofiled steps\)$", out, re.M).group(1))
    assert step_ms > 0  # 25 > the 20 steps of an epoch of this data: the timing runs on into the next epoch


def test_eval_time_validates_every_user_once(data):
    proc = subprocess.run([PY, "-m", "benchmarks.eval_time", "--data", str(data), "--config", "configs/tiny.yaml",
                           *TINY], cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = r"^cammsr: one validation of 81 users in [\d.]+ s \(ndcg@10 0\.\d{6}\)"
    assert re.search(line, proc.stdout, re.M), proc.stdout


def test_accuracy_table_reads_a_real_run_in_the_chosen_metrics_with_its_curve(data, tmp_path):
    run_dir = tmp_path / "run"
    trained = subprocess.run([PY, "-m", "launch.cli", "train", "--data", str(data), "--config", "configs/tiny.yaml",
                              "--run-dir", str(run_dir), *TINY, "train.max_epochs=2", "checkpoint.enabled=false",
                              "eval.test=each_best"],
                             cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=240)
    assert trained.returncode == 0, trained.stderr[-3000:]
    proc = subprocess.run([PY, "-m", "benchmarks.accuracy_table", "--paper", "beauty", "--metrics",
                           "ndcg@10,recall@10", "--curves", f"tiny CAMMSR={run_dir}"], cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    lines = proc.stdout.splitlines()
    assert "| model | NDCG@10 | Recall@10 | selection |" in lines
    assert "| CAMMSR (paper, Table III) | 0.0517 | - | as recorded |" in lines  # the paper has no Recall@10 here
    test = metrics["test"]
    row = next(line for line in lines if line.startswith("| tiny CAMMSR |"))
    assert row.startswith(f"| tiny CAMMSR | {test['ndcg@10']:.4f} | {test['recall@10']:.4f} | ")
    assert f"best epoch {metrics['best_epoch']}; epoch cap reached" in row
    curve = [f"{record['valid']['ndcg@10']:.4f}" for record in metrics["history"]]
    assert len(curve) == 2 and f"- tiny CAMMSR: {' '.join(curve)}" in lines

    unknown = subprocess.run([PY, "-m", "benchmarks.accuracy_table", "--metrics", "ndcg@11", f"x={run_dir}"],
                             cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert unknown.returncode != 0 and "no test ndcg@11" in unknown.stderr


def test_a_finished_run_is_reused_only_for_the_config_it_was_trained_from(data, tmp_path, monkeypatch):
    """A benchmark's finished run stands for its config: asked for another (a study whose best trial changed since),
    it is refused by name, not reused; the model fills its category levels from the data, which is no change."""
    from benchmarks.training_runs import train_or_resume
    monkeypatch.chdir(ROOT)
    run, overrides = tmp_path / "run", [*TINY, "train.max_epochs=1"]
    first = train_or_resume(str(data), "configs/tiny.yaml", run, overrides)
    assert first["test"] is not None and train_or_resume(str(data), "configs/tiny.yaml", run, overrides) == first
    with pytest.raises(SystemExit, match=rf"^{run} finished with another config than configs/tiny.yaml \(changed "
                                         r"keys: train\.lr: [\d.e-]+ -> 0\.05\): move it aside"):
        train_or_resume(str(data), "configs/tiny.yaml", run, [*overrides, "train.lr=0.05"])


def test_paper_study_settings_are_valid_configs():
    """Every setting the paper_studies command trains is a config the trainer accepts (no run starts with a typo)."""
    from benchmarks.paper_studies import ablation_settings, category_settings, noise_settings, pair_settings
    from train.config import load_config, validate
    noise = noise_settings([0.1, 0.3])
    assert list(noise) == ["CAMMSR", "removal 10%", "removal 30%", "misleading 10%", "misleading 30%", "w/o CG"]
    pairs = pair_settings(["id", "text", "image"])
    assert len(pairs) == 7 + 1 and "id-text + id-image + text-image" in pairs  # Table IV's subsets and w/o MSCL
    ablations = ablation_settings(["id", "text", "image"], [("text", "image"), ("id", "text"), ("id", "image")])
    assert list(ablations) == ["CAMMSR", "w/o CG", "w/o MSCL", "w/o T", "w/o V"]
    without_text = load_config(None, ablations["w/o T"]).model
    assert without_text.modalities == ("id", "image") and without_text.mscl_pairs == (("id", "image"),)
    for settings in (noise, category_settings([10, 20]), pairs, ablations):
        for overrides in settings.values():
            validate(load_config("configs/quickstart.yaml", overrides), world_size=1, cuda=False)
    assert load_config(None, pairs["id-image"]).model.mscl_pairs == (("id", "image"),)


def test_paper_study_and_model_comparison_run_and_continue(data, tmp_path):
    """The two resumable benchmark commands end to end on the tiny data: a second call reuses every finished run."""
    study = [PY, "-m", "benchmarks.paper_studies", "ablations", "--data", str(data), "--run-dir",
             str(tmp_path / "ablations"), *TINY, "model.modalities=[id,text]", "model.mscl_pairs=[[id,text]]",
             "max_epochs=1"]
    first = subprocess.run(study, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert re.search(r"^\| CAMMSR \| 0\.\d{4} \| 0\.\d{4} \| \+0\.0% \| - \|", first.stdout, re.M), first.stdout[-2000:]
    for name in ("w/o CG", "w/o MSCL", "w/o T"):  # each paired with the full model, per user
        row = re.search(rf"^\| {name} \| (0\.\d{{4}}) \| .* \| ([+-]0\.\d{{4}}) \[[+-]0\.\d{{4}}, [+-]0\.\d{{4}}\] \|",
                        first.stdout, re.M)
        assert row, first.stdout[-2000:]
    full = json.loads((tmp_path / "ablations" / "CAMMSR" / "metrics.json").read_text())["test"]["ndcg@10"]
    without_text = json.loads((tmp_path / "ablations" / "wo_T" / "metrics.json").read_text())["test"]["ndcg@10"]
    assert float(row.group(1)) == round(without_text, 4)
    assert abs(float(row.group(2)) - (without_text - full)) < 1e-4  # the paired mean is the difference of means
    again = subprocess.run(study, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert again.stdout.count("finished, reused") == 4 and again.stdout.endswith(first.stdout.split("\n\n")[-1])
    compare = [PY, "-m", "benchmarks.model_comparison", "--data", str(data), "--spaces", "configs/spaces/compare",
               "--trials", "1", "--models", "sasrec,findrec,cammsr", "--run-dir", str(tmp_path / "compare"),
               "--timing-epochs", "2", "--idle-wait-minutes", "0", "--ledgers", str(tmp_path / "ledgers"), *TINY,
               "model.modalities=[id,text]", "model.mscl_pairs=[[id,text]]", "max_epochs=1"]
    before = subprocess.run(compare + ["--status"], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                            timeout=120)
    assert before.returncode == 0 and "| SASRec | not started | - | - | not started |" in before.stdout, \
        before.stderr
    assert not (tmp_path / "compare").exists()  # --status runs and writes nothing
    proc = subprocess.run(compare, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = re.search(r"^\| SASRec \| (0\.\d{4}) \|.*\| ([+-]0\.\d{4}) \[.*\] \| (\d+\.\d) \|", proc.stdout, re.M)
    assert row, proc.stdout[-2000:]
    # test is read from the study's chosen run: what training its best.yaml again gives, without that training
    retrain = subprocess.run([PY, "-m", "train.command", "--data", str(data), "--run-dir", str(tmp_path / "again"),
                              "--config", str(tmp_path / "compare" / "sasrec" / "study" / "best.yaml")],
                             cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    sasrec = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert float(row.group(1)) == round(sasrec["test"]["ndcg@10"], 4)
    assert not (tmp_path / "compare" / "sasrec" / "final").exists()
    timing = json.loads((tmp_path / "compare" / "sasrec" / "timing" / "metrics.json").read_text())
    assert [r["epoch"] for r in timing["history"]] == [0, 1]  # the chosen config again, --timing-epochs long
    epochs = sorted(r["epoch_seconds"] for r in timing["history"])
    assert row.group(3) == f"{(epochs[0] + epochs[1]) / 2:.1f}"
    assert "| paper's synthetic NDCG@10 (its protocol) |" in proc.stdout
    assert re.search(r"^\| SASRec \|.*\| none \|$", proc.stdout, re.M)  # no paper reports the synthetic data
    assert re.search(r"^\| FindRec \| not run: .*FindRec reads all of", proc.stdout, re.M), proc.stdout[-2000:]
    for model in ("sasrec", "cammsr"):  # each study also kept in its ledger
        ledger = json.loads((tmp_path / "ledgers" / f"{model}.json").read_text())
        assert [t["state"] for t in ledger["trials"]] == ["COMPLETE"]
    assert not (tmp_path / "compare" / "findrec").exists()
    trials = json.loads((tmp_path / "compare" / "cammsr" / "study" / "trials.json").read_text())
    assert len(trials) == 1
    after = subprocess.run(compare + ["--status"], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                           timeout=120)
    study_best = max(t["value"] for t in trials)
    assert f"| CAMMSR | 1 of 1 | {study_best:.4f} | trial_0000: best epoch 0 of 1 |" in after.stdout, after.stdout
    assert re.search(r"^\| CAMMSR \|.*\| finished: \d+\.\d s/epoch \|$", after.stdout, re.M), after.stdout
    assert re.search(r"^\| FindRec \| not run: ", after.stdout, re.M)
    # the ablations of a finished study: its chosen run is the full model, read on test, not trained again
    chosen = re.search(r"^\| CAMMSR \| (0\.\d{4}) \|", proc.stdout, re.M).group(1)
    tuned = subprocess.run([PY, "-m", "benchmarks.paper_studies", "ablations", "--data", str(data), "--from-study",
                            str(tmp_path / "compare" / "cammsr" / "study"), "--run-dir", str(tmp_path / "tuned")],
                           cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    assert re.search(rf"^\| CAMMSR \| {re.escape(chosen)} \|", tuned.stdout, re.M), tuned.stdout[-2000:]
    assert not (tmp_path / "tuned" / "CAMMSR").exists() and (tmp_path / "tuned" / "wo_CG" / "metrics.json").is_file()
    assert re.search(r"^\| w/o MSCL \| 0\.\d{4} \| .* \| [+-]0\.\d{4} \[", tuned.stdout, re.M)


def test_text_encoder_accuracy_trains_both_encoders_and_pairs_them(tiny_encoders, tmp_path):
    """The default MiniLM store and another encoder's, built in a linked view of the dataset, both trained, paired."""
    data = write_tiny_dataset(tmp_path / "tiny")
    command = [PY, "-m", "benchmarks.text_encoder_accuracy", "--data", str(data), "--encoder", str(tiny_encoders[0]),
               "--run-dir", str(tmp_path / "runs"), *[o for o in TINY if not o.startswith("data.build_features")],
               "model.modalities=[id,text]", "model.mscl_pairs=[[id,text]]", "max_epochs=1"]
    proc = subprocess.run(command, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = tiny_encoders[0].name
    stores = {folder: json.loads((folder / "features" / "text" / "store.json").read_text())["encoder"]
              for folder in (data, tmp_path / "runs" / f"data_{name}")}
    assert "all-MiniLM-L6-v2" in stores[data] and name in stores[tmp_path / "runs" / f"data_{name}"]
    assert (tmp_path / "runs" / f"data_{name}" / "items").is_symlink()
    for split in ("valid", "test"):
        assert re.search(rf"^{split}: .* - default = [+-]0\.\d{{4}} \(SE 0\.\d{{4}}, bootstrap 95% ", proc.stdout, re.M)
    test = {run: json.loads((tmp_path / "runs" / run / "metrics.json").read_text())["test"]["ndcg@10"]
            for run in ("default", name)}
    assert f"test NDCG@10 {str(tiny_encoders[0])} {test[name]:.4f}, default {test['default']:.4f}" in proc.stdout
