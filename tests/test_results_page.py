"""BENCHMARKS.md is drawn from the result records: the committed page is what the committed records give, a record
written by the writer shows up with its ratio and command, and a broken record is named."""
import json
import subprocess

import pytest

from benchmarks.results import read_records, write_record
from benchmarks.results_page import read_notes, render
from conftest import PY, ROOT, cpu_env


def test_the_committed_page_is_what_the_committed_records_give():
    proc = subprocess.run([PY, "-m", "benchmarks.results_page", "--check"], cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len((ROOT / "BENCHMARKS.md").read_text().splitlines()) < 300


def test_a_written_record_appears_in_the_headline_table_and_its_section(tmp_path):
    write_record("speed", area="Speed", claim="epoch", metric="s/epoch", ours=2.0, command="python -m x --y",
                 reference={"name": "peer", "value": 8.0}, higher_is_better=False, headline=True,
                 details={"steps": 129, "seconds per epoch": 0.8}, results_dir=tmp_path)
    write_record("accuracy", area="Accuracy", claim="ndcg", metric="test NDCG@10", ours=0.0525,
                 reference={"name": "paper", "value": 0.05}, command="cammsr train z", results_dir=tmp_path,
                 ranking="strict count, before")
    (tmp_path / "notes.md").write_text("## Speed\nOne line of context.\n")
    page = render(read_records(tmp_path), read_notes(tmp_path / "notes.md"))
    headline = page.split("## Headline claims")[1].split("\n## ")[0]
    assert "| epoch | s/epoch | **2.00** | 8.00 (peer) | 4.00x less |" in headline and "ndcg" not in headline
    assert "| 1 | ndcg [1] | test NDCG@10 | **0.0525** | 0.0500 (paper) | " in page and "[1] measured before" in page
    assert "One line of context." in page and "1. `python -m x --y`" in page and "| steps |" in page
    assert "| 129 | 0.8 |" in page  # a duration is not printed like a metric (0.8000)
    for number in (1, 2):
        write_record(f"pair_{number}", area="Pair", claim=f"model {number}", metric="test NDCG@10", ours=0.1,
                     command="python -m compare --both", results_dir=tmp_path)
    page = render(read_records(tmp_path), {})
    assert page.count("python -m compare --both") == 1 and "1-2. `python -m compare --both`" in page
    # areas follow the notes file's order; one without notes comes last
    page = render(read_records(tmp_path), read_notes_text(tmp_path, "## Speed\nFirst.\n## Accuracy\nSecond.\n"))
    assert page.index("## Speed") < page.index("## Accuracy") < page.index("## Pair")


def read_notes_text(folder, text: str) -> dict[str, str]:
    (folder / "notes.md").write_text(text)
    return read_notes(folder / "notes.md")


def test_a_record_without_a_field_is_named(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"id": "bad", "area": "A"}))
    with pytest.raises(ValueError, match=r"bad\.json: record without claim"):
        read_records(tmp_path)
