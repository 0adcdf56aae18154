"""The shipped tuned configs are what their studies chose: each one's values are the best trial over its committed
ledgers (benchmarks/studies; a recipe tuned in stages has one per study) on top of the studies' base config, and its
header names that trial's validation number and every study's command."""
import json

import pytest

from conftest import ROOT
from train.config import load_config
from train.tune import ready_config
from train.tune_space import load_space

TUNED = {  # shipped config -> (the studies' base config, [(a study's ledger, its space), ...])
    "beauty.yaml": ("beauty_recbole.yaml", [("beauty_cammsr.json", "beauty_cammsr.yaml"),
                                            ("beauty_cammsr_horizon.json", "beauty_cammsr_horizon.yaml")]),
    "beauty_sasrec.yaml": ("beauty_recbole.yaml", [("beauty_sasrec.json", "beauty_sasrec.yaml"),
                                                   ("beauty_sasrec_horizon.json", "beauty_sasrec_horizon.yaml")]),
}


def _flat(tree: dict) -> dict:
    return {(section, key): value for section, values in tree.items() for key, value in values.items()}


@pytest.mark.parametrize("shipped", sorted(TUNED))
def test_a_tuned_config_is_its_studies_best_trial(shipped):
    base_name, studies = TUNED[shipped]
    header = (ROOT / "configs" / shipped).read_text()
    candidates = []
    for ledger_name, space_name in studies:
        ledger = json.loads((ROOT / "benchmarks" / "studies" / ledger_name).read_text())
        for part in (f"--config configs/{base_name}", f"--space configs/spaces/{space_name}",
                     f"--ledger benchmarks/studies/{ledger_name}"):
            assert part in ledger["command"] and part in header
        candidates += [(row, space_name) for row in ledger["trials"]
                       if row["state"] == "COMPLETE" and row["repeat_of"] is None]
    best, space_name = max(candidates, key=lambda candidate: candidate[0]["value"])
    space, _ = load_space(ROOT / "configs" / "spaces" / space_name, ROOT / "configs" / base_name, "data")
    chosen = ready_config(ROOT / "configs" / base_name, space, best["params"])
    shipped_values, chosen_values = _flat(load_config(ROOT / "configs" / shipped).to_dict()), _flat(chosen.to_dict())
    assert shipped_values.keys() == chosen_values.keys()
    for key, value in chosen_values.items():  # Optuna's stepped floats: 0.30000000000000004 is written 0.3
        assert shipped_values[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
    assert f"valid NDCG@10 {best['value']:.4f}" in header and f"trial {best['number']}" in header
