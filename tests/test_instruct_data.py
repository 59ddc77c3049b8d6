"""The generated instruction data: answers pass their own checkers, the held-out split is by
instruction combination, preference pairs break exactly one instruction, the shipped files are
what the code regenerates, and the `gemmakit instruct` commands and model evaluation."""

from __future__ import annotations

import json
import random

import pytest

from gemmakit.cli import main
from gemmakit.errors import UsageError
from gemmakit.instruct import evaluate as evaluate_mod
from gemmakit.instruct.generate import (
    CONFLICTS,
    FILES,
    GENERATED,
    compatible_pairs,
    data_dir,
    generate_data,
    make_example,
    make_pair,
    split_combinations,
    write_data,
)
from gemmakit.instruct.scoring import read_jsonl, row_instructions

SMALL = {"sft_train": 300, "eval": 40, "prefs_train": 150, "prefs_valid": 40}


@pytest.fixture(scope="module")
def shipped():
    return {name: read_jsonl(data_dir() / f"{name}.jsonl") for name in FILES}


def _combo(specs) -> frozenset[str]:
    return frozenset(s["id"] for s in specs)


def test_every_combination_generates_answers_that_pass_their_checkers():
    rng = random.Random(0)
    train, heldout = split_combinations()
    for combo in train + heldout:
        for _ in range(15):
            ex = make_example(rng, combo)  # asserts every checker itself
            assert {i.id for i in ex.instructions} == set(combo)
            assert all(i.check(ex.response) for i in ex.instructions)
            assert all(i.describe(0).split()[0] not in ("", "{") for i in ex.instructions)
            assert ex.prompt.startswith(ex.task.request)


def test_split_is_by_combination_and_every_instruction_is_trained():
    train, heldout = split_combinations()
    assert len(heldout) > 0 and not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(compatible_pairs()) | {(i,) for i in GENERATED}
    assert all(frozenset(p) not in CONFLICTS for p in heldout)
    for ins in GENERATED:
        assert (ins,) in train
        assert sum(ins in c for c in train if len(c) == 2) >= 2, ins
    assert split_combinations() == (train, heldout)  # deterministic
    assert split_combinations(seed=7)[1] != heldout


def test_shipped_files_keep_the_split_and_formats(shipped):
    train, heldout = split_combinations()
    held = {frozenset(p) for p in heldout}
    train_combos = {frozenset(c) for c in train}
    assert len(shipped["sft_train"]) >= 2000 and len(shipped["eval"]) >= 150
    assert len(shipped["prefs_train"]) >= 2000 and len(shipped["prefs_valid"]) >= 150
    for row in shipped["sft_train"]:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert _combo(row["instructions"]) in train_combos
    for row in shipped["prefs_train"]:
        assert _combo(row["instructions"]) in train_combos
    for row in shipped["sft_valid"] + shipped["prefs_valid"]:
        assert _combo(row["instructions"]) in held
    eval_combos = set()
    for row in shipped["eval"]:
        assert set(row) == {"key", "prompt", "instruction_id_list", "kwargs"}
        eval_combos.add(frozenset(row["instruction_id_list"]))
        assert len(row_instructions(row)) == len(row["instruction_id_list"])
    assert eval_combos == held  # every held-out pair is evaluated, nothing else
    train_prompts = {r["messages"][0]["content"] for r in shipped["sft_train"]}
    assert not train_prompts & {r["prompt"] for r in shipped["eval"]}
    # sft_valid holds the eval prompts with reference answers that pass the eval's checkers
    for row, ev in zip(shipped["sft_valid"], shipped["eval"]):
        assert row["messages"][0]["content"] == ev["prompt"]
        assert all(i.check(row["messages"][1]["content"]) for i in row_instructions(ev))


def test_bullet_counts_match_what_a_reader_sees(shipped):
    for row in shipped["sft_train"]:
        for spec in row["instructions"]:
            if spec["id"] == "detectable_format:number_bullet_lists":
                lines = row["messages"][1]["content"].split("\n")
                seen = sum(line.lstrip('"').startswith(("* ", "- ")) for line in lines)
                assert seen == spec["kwargs"]["num_bullets"], row


def test_answers_stay_short(shipped):
    from gemmakit.instruct.instructions import count_words

    lengths = [count_words(r["messages"][1]["content"]) for r in shipped["sft_train"]]
    assert max(lengths) <= 45 and sum(lengths) / len(lengths) < 20


def test_preference_pairs_break_exactly_one_instruction(shipped):
    broken = set()
    for row in shipped["prefs_train"][:500] + shipped["prefs_valid"]:
        checks = row_instructions(
            {
                "instruction_id_list": [s["id"] for s in row["instructions"]],
                "kwargs": [s["kwargs"] for s in row["instructions"]],
            }
        )
        assert row["chosen"] != row["rejected"]
        assert all(c.check(row["chosen"]) for c in checks)
        failing = [c.id for c in checks if not c.check(row["rejected"])]
        assert failing == [row["broken"]]
        broken.add(row["broken"])
    assert broken == set(GENERATED)  # every kind of instruction gets broken somewhere


def test_make_pair_on_a_fresh_example():
    rng = random.Random(3)
    ex = make_example(
        rng, ("change_case:english_lowercase", "detectable_format:number_bullet_lists")
    )
    rejected, broken = make_pair(ex, rng)
    ins = next(i for i in ex.instructions if i.id == broken)
    assert ins.check(ex.response) and not ins.check(rejected)


def test_generation_is_deterministic_and_seeded():
    a = generate_data(sizes=SMALL)
    assert a == generate_data(sizes=SMALL)
    assert a["sft_train"] != generate_data(seed=99, sizes=SMALL)["sft_train"]


def test_regenerating_gives_the_shipped_files_byte_for_byte(tmp_path):
    write_data(tmp_path)
    for name in FILES:
        shipped = (data_dir() / f"{name}.jsonl").read_bytes()
        assert (tmp_path / f"{name}.jsonl").read_bytes() == shipped, name
    total = sum((data_dir() / f"{n}.jsonl").stat().st_size for n in FILES)
    assert total < 5 * 2**20


def test_cli_write_refuses_to_overwrite(tmp_path, capsys, monkeypatch):
    import gemmakit.instruct.generate as gen

    monkeypatch.setattr(gen, "SIZES", SMALL)
    assert main(["instruct", "write", str(tmp_path)]) == 0
    assert "sft_train.jsonl  300 rows" in capsys.readouterr().out
    before = (tmp_path / "eval.jsonl").read_bytes()
    assert main(["instruct", "write", str(tmp_path)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    with pytest.raises(UsageError):
        write_data(tmp_path)
    (tmp_path / "eval.jsonl").write_text("changed\n")
    assert main(["instruct", "write", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "eval.jsonl").read_bytes() == before


def test_cli_score(tmp_path, capsys, shipped):
    evals = shipped["eval"][:20]
    refs = [r["messages"][1]["content"] for r in shipped["sft_valid"][:20]]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    # references by key, except half given by prompt and made lowercase-free of instructions
    resp = [{"key": r["key"], "response": a} for r, a in zip(evals[:10], refs[:10])]
    resp += [{"prompt": r["prompt"], "response": "x"} for r in evals[10:]]
    (tmp_path / "resp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in resp))
    out = tmp_path / "scores.json"
    code = main(
        [
            "instruct",
            "score",
            "--eval",
            str(tmp_path / "eval.jsonl"),
            "--responses",
            str(tmp_path / "resp.jsonl"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "prompt-level" in text and "instruction-level" in text
    result = json.loads(out.read_text())
    assert result["prompts"] == 20
    # the references follow everything; "x" follows at most the instructions it cannot break
    assert all(all(s["strict"]) for s in result["samples"][:10])
    assert result["prompt_strict"] < 1.0 and result["prompt_strict"] >= 0.5
    (tmp_path / "bad.jsonl").write_text('{"key": 1, "prompt": "p"\n')
    assert (
        main(
            [
                "instruct",
                "score",
                "--eval",
                str(tmp_path / "bad.jsonl"),
                "--responses",
                str(tmp_path / "resp.jsonl"),
            ]
        )
        == 2
    )
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err


class CharTokenizer:
    """One id per ASCII character (1000 + code point), Gemma's control ids elsewhere."""

    def encode(self, text: str, bos: bool = True, special: bool = True) -> list[int]:
        return [2] * bos + [1000 + ord(c) for c in text if ord(c) < 128]

    def decode(self, ids) -> str:
        return "".join(chr(i - 1000) for i in ids if 1000 <= i < 1128)

    def token_ids(self, default=None):
        from gemmakit.config import TokenIds

        return default or TokenIds()


def test_evaluate_keeps_the_order_of_prompts(monkeypatch, shipped):
    rows = shipped["eval"][:7]
    refs = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in shipped["sft_valid"]}
    tok = CharTokenizer()
    calls = []

    def fake_generate(model, prompts, max_new_tokens):
        calls.append(len(prompts))
        # answer each prompt with its reference: find it from the prompt's ids
        out = []
        for ids in prompts:
            text = tok.decode(ids)
            prompt = next(p for p in refs if p in text)
            out.append(tok.encode(refs[prompt], bos=False))
        return out

    monkeypatch.setattr("gemmakit.instruct.evaluate.generate", fake_generate)
    result = evaluate_mod.evaluate_instruction_following(None, tok, rows, 16, batch_size=3)
    assert calls == [3, 3, 1]
    assert [s["response"] for s in result["samples"]] == [refs[r["prompt"]] for r in rows]
    assert result["prompt_strict"] == 1.0 and result["instruction_loose"] == 1.0


def test_evaluate_runs_a_tiny_model(shipped):
    import torch

    from gemmakit.api import build_model
    from gemmakit.config import get_config

    torch.manual_seed(0)
    model = build_model(get_config("tiny"))
    rows = shipped["eval"][:4]
    result = evaluate_mod.evaluate_instruction_following(
        model, CharTokenizer(), rows, max_new_tokens=5, batch_size=2
    )
    assert result["prompts"] == 4 and result["seconds"] > 0
    assert all(
        isinstance(s["response"], str) and len(s["response"]) <= 5 for s in result["samples"]
    )
    assert 0.0 <= result["prompt_strict"] <= result["prompt_loose"] <= 1.0
