"""`gemmakit run`, the main job, end to end at a few steps."""

from __future__ import annotations

import json

from gemmakit.cli import main as cli


def test_run_writes_a_report_of_every_stage(tmp_path):
    out = tmp_path / "run"
    assert cli(["run", "--out", str(out), "--steps", "6", "--vocab-size", "1024"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tokenizer"]["round_trip_exact"] is True
    assert 0 < report["tokenizer"]["vocab_size"] <= 1024
    totals = report["data"]["totals"]
    assert 0 < totals["kept"] < totals["read"] and totals["train_tokens"] > 10_000
    assert any(k.startswith("decontaminate") for k in totals["dropped_by_reason"])
    p = report["pretrain"]
    assert p["steps"] == 6 and p["final_loss"] < p["first_loss"]
    assert set(report["memorization"]) == {"web", "math", "code"}
    assert all(m["documents"] > 0 for m in report["memorization"].values())
    assert (out / "report.html").read_text().count("<table>") >= 5
    # a second run into the same folder is refused, not mixed in
    assert cli(["run", "--out", str(out), "--steps", "6"]) == 2
