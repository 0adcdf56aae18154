"""The shipped tuned configs are what their studies chose: each one's values are the best trial of its committed
ledger (benchmarks/studies) on top of the study's base config, and its header names that trial's validation number
and the study's command."""
import json

import pytest

from conftest import ROOT
from train.config import load_config
from train.tune_space import load_space

TUNED = {  # shipped config -> (the study's ledger, space, base config)
    "beauty_sasrec.yaml": ("beauty_sasrec.json", "beauty_sasrec.yaml", "beauty_recbole.yaml"),
}


@pytest.mark.parametrize("shipped", sorted(TUNED))
def test_a_tuned_config_is_its_study_best_trial(shipped):
    ledger_name, space_name, base_name = TUNED[shipped]
    ledger = json.loads((ROOT / "benchmarks" / "studies" / ledger_name).read_text())
    finished = [row for row in ledger["trials"] if row["state"] == "COMPLETE" and row["repeat_of"] is None]
    best = max(finished, key=lambda row: row["value"])
    space, _ = load_space(ROOT / "configs" / "spaces" / space_name, ROOT / "configs" / base_name, "data")
    chosen = load_config(ROOT / "configs" / base_name, [f"eval.metric={space.metric}"] + space.overrides(best["params"]))
    assert load_config(ROOT / "configs" / shipped).to_dict() == chosen.to_dict()
    header = (ROOT / "configs" / shipped).read_text()
    assert f"valid NDCG@10 {best['value']:.4f}" in header and f"trial {best['number']}" in header
    for part in (f"--config configs/{base_name}", f"--space configs/spaces/{space_name}",
                 f"--ledger benchmarks/studies/{ledger_name}"):
        assert part in ledger["command"] and part in header
