"""The shipped tuned configs are what their studies chose: each one's values are the best trial of its committed
ledger (benchmarks/studies) on top of the study's base config, and its header names that trial's validation number
and the study's command."""
import json

import pytest

from conftest import ROOT
from train.config import load_config
from train.tune import ready_config
from train.tune_space import load_space

TUNED = {  # shipped config -> (the study's ledger, space, base config)
    "beauty.yaml": ("beauty_cammsr.json", "beauty_cammsr.yaml", "beauty_recbole.yaml"),
    "beauty_sasrec.yaml": ("beauty_sasrec.json", "beauty_sasrec.yaml", "beauty_recbole.yaml"),
}


def _flat(tree: dict) -> dict:
    return {(section, key): value for section, values in tree.items() for key, value in values.items()}


@pytest.mark.parametrize("shipped", sorted(TUNED))
def test_a_tuned_config_is_its_study_best_trial(shipped):
    ledger_name, space_name, base_name = TUNED[shipped]
    ledger = json.loads((ROOT / "benchmarks" / "studies" / ledger_name).read_text())
    finished = [row for row in ledger["trials"] if row["state"] == "COMPLETE" and row["repeat_of"] is None]
    best = max(finished, key=lambda row: row["value"])
    space, _ = load_space(ROOT / "configs" / "spaces" / space_name, ROOT / "configs" / base_name, "data")
    chosen = ready_config(ROOT / "configs" / base_name, space, best["params"])
    shipped_values, chosen_values = _flat(load_config(ROOT / "configs" / shipped).to_dict()), _flat(chosen.to_dict())
    assert shipped_values.keys() == chosen_values.keys()
    for key, value in chosen_values.items():  # Optuna's stepped floats: 0.30000000000000004 is written 0.3
        assert shipped_values[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
    header = (ROOT / "configs" / shipped).read_text()
    assert f"valid NDCG@10 {best['value']:.4f}" in header and f"trial {best['number']}" in header
    for part in (f"--config configs/{base_name}", f"--space configs/spaces/{space_name}",
                 f"--ledger benchmarks/studies/{ledger_name}"):
        assert part in ledger["command"] and part in header
