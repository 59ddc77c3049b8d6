"""Reward model: HF transformers' Gemma*ForSequenceClassification loads what gemmakit saves and
gives the same scores; `gemmakit reward` learns a preference only the pairs reveal; LoRA
checkpoints (PEFT, head as a module to save) and exact resume; bad rows name file and line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SMALL, preference_recipe, preference_task

from gemmakit.api import build_model
from gemmakit.checkpoint import save_hf
from gemmakit.config import get_config
from gemmakit.model.reward import RewardModel, load_reward_model, save_reward_model
from gemmakit.training.metrics import read_metrics
from gemmakit.training.reward import reward

SEQS = [[2, 5, 6, 7, 8, 9, 10], [2, 11, 12], [2, 40, 41, 42, 43]]


def small_config(preset: str):
    cfg = get_config(preset).replace(**SMALL)
    return cfg.replace(sliding_window=4) if cfg.sliding_window else cfg


def padded(seqs, pad: int = 0) -> torch.Tensor:
    ids = torch.full((len(seqs), max(map(len, seqs))), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids


@pytest.mark.parametrize(
    "preset, cls",
    [
        ("tiny", "GemmaForSequenceClassification"),
        ("tiny-gemma2", "Gemma2ForSequenceClassification"),
        ("tiny-gemma3", "Gemma3TextForSequenceClassification"),
    ],
)
def test_hf_sequence_classifier_loads_the_reward_model_with_the_same_scores(tmp_path, preset, cls):
    tf = pytest.importorskip("transformers")
    rm = RewardModel(build_model(small_config(preset), dtype=torch.float32, seed=1))
    torch.nn.init.normal_(rm.head.weight)
    save_reward_model(rm, tmp_path / "rm")
    hf = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(hf).__name__ == cls and hf.config.num_labels == 1
    ours = rm.score_ids(SEQS, batch_size=2)  # right-padded in two batches
    with torch.no_grad():
        theirs = hf(padded(SEQS, hf.config.pad_token_id)).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert len(set(ours.tolist())) == 3
    back = load_reward_model(tmp_path / "rm").score_ids(SEQS)
    torch.testing.assert_close(back, ours)


def test_reward_learns_a_preference_only_the_pairs_reveal(tmp_path):
    tok, valid = preference_task(tmp_path)
    recipe = preference_recipe(tmp_path, training={"steps": 20}, eval={"interval": 10})
    result = reward(recipe)
    accuracy = [m["accuracy"] for _, m in result.val_metrics]
    assert accuracy[-1] >= 0.8, accuracy
    logged = [r for r in read_metrics(tmp_path / "run") if "val_accuracy" in r]
    assert [r["val_accuracy"] for r in logged] == accuracy
    # The checkpoint scores held-out answers (as conversations) the way the pairs prefer.
    rm = load_reward_model(result.checkpoint)
    assert rm.tokenizer is not None
    chosen = rm.score(
        [
            [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["chosen"]},
            ]
            for r in valid
        ]
    )
    rejected = rm.score(
        [
            [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["rejected"]},
            ]
            for r in valid
        ]
    )
    wins = sum(c > r for c, r in zip(chosen, rejected)) / len(valid)
    assert wins >= 0.8
    assert isinstance(rm.score(["a plain text"])[0], float)


def test_lora_reward_resumes_exactly_and_saves_a_peft_adapter_with_the_head(tmp_path):
    preference_task(tmp_path, n_train=40, n_valid=8)
    base = tmp_path / "base"
    cfg = get_config("tiny").replace(**{**SMALL, "vocab_size": 512})
    save_hf(build_model(cfg, dtype=torch.float32, seed=3), base)

    def recipe(run):
        return preference_recipe(
            tmp_path,
            run_dir=str(tmp_path / run),
            model={"preset": None, "checkpoint": str(base), "config_overrides": {}},
            lora={"rank": 4, "alpha": 8},
            training={"steps": 4, "batch_size": 4, "micro_batch_size": 2},
            optimizer={"lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 0},  # a run may be cut
            eval={"interval": 2, "batches": 1},
            checkpoint={"interval": 2, "keep": 5},
        )

    straight = reward(recipe("a"))
    first = reward({**recipe("b"), "training": {**recipe("b")["training"], "steps": 2}})
    resumed = reward(recipe("b"), resume=True)
    assert first.losses + resumed.losses == straight.losses
    ckpt = straight.checkpoint
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    rm = load_reward_model(ckpt)
    assert rm.head.weight.abs().sum() > 0
    # PEFT puts the adapter and the head onto HF's classifier of the base: the same scores.
    peft = pytest.importorskip("peft")
    tf = pytest.importorskip("transformers")
    hf = tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    hf = peft.PeftModel.from_pretrained(hf, ckpt).eval()
    with torch.no_grad():
        theirs = hf(padded(SEQS)).logits[:, 0]
    torch.testing.assert_close(rm.score_ids(SEQS), theirs, rtol=1e-4, atol=1e-4)


def test_reward_command_reports_a_bad_row_in_one_line(tmp_path, capsys):
    from gemmakit.cli import main

    preference_task(tmp_path, n_train=10, n_valid=2)
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": "hi", "chosen": "x"}) + "\n")
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(preference_recipe(tmp_path)))  # JSON is YAML
    assert main(["reward", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gemmakit reward: error: ") and "train.jsonl:11: expected fields" in err
    assert "\n" not in err


def test_shipped_preference_recipes_parse():
    from helpers import ROOT

    from gemmakit.training.recipe import load_recipe

    for name in ("reward-tiny", "dpo-tiny", "reward-270m-lora", "dpo-270m-lora"):
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        assert recipe.data.train and recipe.data.valid
