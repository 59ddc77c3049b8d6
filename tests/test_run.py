"""`gemmakit run`, the main job, end to end at a few steps."""

from __future__ import annotations

import json
import math

from gemmakit.cli import main as cli


def test_run_writes_a_report_of_every_stage(tmp_path):
    out = tmp_path / "run"
    args = ["--steps", "6", "--vocab-size", "1024", "--sft-steps", "8", "--reward-steps", "3"]
    args += ["--rlhf-steps", "2", "--eval-limit", "16"]
    assert cli(["run", "--out", str(out), *args]) == 0
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

    # instruction tuning: SFT from the pretrained model, a reward model, RLHF from SFT
    sft = report["sft"]
    assert sft["steps"] == 8 and len(sft["losses"]) == 8
    assert all(math.isfinite(x) for x in sft["losses"])
    assert sft["final_loss"] < sft["first_loss"] and sft["val_losses"]
    rm = report["reward"]
    assert rm["steps"] == 3 and 0.0 <= rm["val_accuracy"] <= 1.0
    rl = report["rlhf"]
    assert rl["steps"] == 2 and len(rl["rewards"]) == 2 and math.isfinite(rl["final_kl"])
    assert report["sft"]["checkpoint"] != report["rlhf"]["checkpoint"]

    # the three models' instruction-following scores, side by side
    ev = report["instruct_eval"]
    assert ev["prompts"] == 16 and set(ev["models"]) == {"pretrain", "sft", "rlhf"}
    for m in ev["models"].values():
        for key in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
            assert 0.0 <= m[key] <= 1.0
        assert m["prompt_strict"] <= m["prompt_loose"]
    assert (out / "instruct_eval" / "sft.json").exists() and ev["verdict"]
    assert set(report["seconds"]) >= {"pretrain", "sft", "reward", "rlhf", "instruct_eval"}

    page = (out / "report.html").read_text()
    assert page.count("<table>") >= 9
    for heading in ("Instruction tuning", "Reward model", "RLHF", "Instruction following"):
        assert heading in page
    # a second run into the same folder is refused, not mixed in
    assert cli(["run", "--out", str(out), "--steps", "6"]) == 2


def test_run_refuses_a_step_count_below_one(tmp_path):
    for flag in ("--steps", "--sft-steps", "--reward-steps", "--rlhf-steps", "--eval-limit"):
        assert cli(["run", "--out", str(tmp_path / "a"), flag, "0"]) == 2
    assert not (tmp_path / "a").exists()
