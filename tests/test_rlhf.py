"""RLHF (RLOO): the advantage and loss by hand, the shared-prefix sampler against generate,
exact resume with the sampling RNG, and evidence that a programmatic reward rises while the
KL to the reference stays bounded, with full fine-tuning and with LoRA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gemmakit.api import build_model
from gemmakit.cli import main
from gemmakit.config import get_config
from gemmakit.errors import DataError
from gemmakit.generation import generate
from gemmakit.model.lora import LoRASpec, adapters_disabled, apply_lora
from gemmakit.model.reward import RewardModel, save_reward_model
from gemmakit.tokenizer import load_tokenizer, train_tokenizer
from gemmakit.training.losses import IGNORE
from gemmakit.training.metrics import read_metrics
from gemmakit.training.recipe import build_recipe, load_recipe
from gemmakit.training.rlhf import (
    load_reward,
    read_prompts,
    rlhf,
    rloo_advantages,
    rloo_loss,
    token_logprobs,
)
from gemmakit.training.rollouts import sample_answers

SMALL = {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 2, "head_dim": 32}


def small_model(seed: int = 0):
    cfg = get_config("tiny").replace(ffn_dim=128, **SMALL)
    return build_model(cfg, dtype=torch.float32, seed=seed)


# --- the math by hand ------------------------------------------------------------------------


def test_leave_one_out_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0])  # two prompts: k = 3
    # prompt 1: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5; prompt 2: 6 - 0 = 6 ...
    want = torch.tensor([-1.5, 0.0, 1.5, 6.0, -3.0, -3.0])
    torch.testing.assert_close(rloo_advantages(r, 3), want)


def test_rloo_loss_by_hand():
    """Two answers to one prompt (k=2): R_i = score_i - beta * (logp_i - ref_i), A_1 = R_1 -
    R_2 = -A_2, loss = -(A_1 logp_1 + A_2 logp_2) / 2, with logp summed over answer tokens
    only; the gradient is the advantage-weighted score function."""
    model = small_model()
    tokens = torch.tensor([[2, 10, 11, 12, 13], [2, 10, 11, 14, 0]])
    targets = torch.tensor([[IGNORE, IGNORE, 12, 13, 1], [IGNORE, IGNORE, 14, 1, IGNORE]])
    logits = model(tokens).float()
    lp = torch.log_softmax(logits, -1)
    valid = targets != IGNORE
    per_tok = torch.where(valid, lp.gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0.0)
    logp = per_tok.sum(1)
    ref = torch.tensor([-20.0, -13.0])
    scores = torch.tensor([1.0, 0.5])
    beta = 0.1
    R = scores - beta * (logp.detach() - ref)
    A = torch.stack([R[0] - R[1], R[1] - R[0]])
    want = -(A * logp).mean()
    batch = {"tokens": tokens, "targets": targets, "scores": scores, "ref_logp": ref}
    batch["truncated"] = torch.tensor([False, True])
    out = rloo_loss(model, batch, k=2, beta=beta, chunk_tokens=2)  # chunks of 2 positions
    got = out["loss"]
    assert out["answer_len"] == 2.5 and out["truncated"] == 0.5 and out["reward"] == 0.75
    torch.testing.assert_close(out["kl"], (logp.detach() - ref).mean())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_want = torch.autograd.grad(want, model.embedder.weight)[0]
    g_got = torch.autograd.grad(got, model.embedder.weight)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
    # entropy per answer token, at temperature 2 as well
    tok_lp, ent = token_logprobs(model, tokens, targets, 2.0, 3)
    lp2 = torch.log_softmax(logits / 2, -1)
    ent_want = -(lp2.exp() * lp2).sum(-1)
    torch.testing.assert_close(ent[valid], ent_want[valid], rtol=1e-5, atol=1e-5)
    assert (ent[~valid] == 0).all() and (tok_lp[~valid] == 0).all()


def test_lora_reference_is_the_base_with_adapters_off():
    model = small_model()
    tokens = torch.tensor([[2, 5, 6, 7, 8]])
    base = model(tokens)
    apply_lora(model, LoRASpec(rank=4, targets=("q_proj", "down_proj")))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    assert not torch.allclose(model(tokens), base, atol=1e-3)
    with adapters_disabled(model):
        torch.testing.assert_close(model(tokens), base)
    assert not torch.allclose(model(tokens), base, atol=1e-3)  # back on afterwards


# --- the sampler -----------------------------------------------------------------------------


def test_sampler_shares_the_prefill_and_matches_generate_greedily():
    model = small_model()
    prompts = [[2, 5, 6, 7], [2, 9], [2, 30, 31, 32, 33, 34]]
    ro = sample_answers(model, prompts, k=3, max_new_tokens=6, temperature=0.0, stop_tokens=[])
    plain = generate(model, [p for p in prompts for _ in range(3)], 6, stop_tokens=[])
    assert ro.answers == plain and ro.truncated == [True] * 9
    assert ro.sequences()[4] == prompts[1] + plain[4]
    # Sampling: a function of the generator's seed; a stop token is kept and ends the answer.
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = sample_answers(model, prompts, 4, 8, generator=gen(), stop_tokens=range(0, 512, 3))
    b = sample_answers(model, prompts, 4, 8, generator=gen(), stop_tokens=range(0, 512, 3))
    assert a.answers == b.answers and len(set(map(tuple, a.answers))) > 1
    for ans, cut in zip(a.answers, a.truncated):
        stops = [t % 3 == 0 for t in ans]
        assert not any(stops[:-1]) and cut == (not stops[-1]) and len(ans) <= 8


# --- the stage -------------------------------------------------------------------------------

TOPICS = "river sea stone cloud tree bird light wind snow fire road hill lake star".split()


def prompt_task(tmp_path):
    rows = [{"prompt": f"Tell me about the {w} and the {v}."} for w in TOPICS for v in TOPICS[:6]]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["prompt"] for r in rows] + [" ".join(TOPICS)] * 5
    train_tokenizer(texts * 3, vocab_size=512, output=tmp_path / "tok")


class CountReward:
    """The share of answer tokens whose id is a multiple of 4 (about 1/4 at random)."""

    def score_ids(self, sequences):
        out = []
        for s in sequences:
            # the answer follows the generation prompt "<start_of_turn>model\n"
            answer = s[_answer_start(s) :]
            out.append(sum(t % 4 == 0 for t in answer) / max(len(answer), 1))
        return torch.tensor(out)


def _answer_start(seq):
    last = max(i for i, t in enumerate(seq) if t == 106)  # the last <start_of_turn>
    return last + 3  # <start_of_turn> "model" "\n"


def rlhf_recipe(tmp_path, **sections) -> dict:
    recipe = {
        "run_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny", "config_overrides": {**SMALL, "ffn_dim": 128}},
        "data": {
            "train": [str(tmp_path / "prompts.jsonl")],
            "tokenizer": str(tmp_path / "tok.model"),
        },
        "rlhf": {"k": 4, "beta": 0.05, "max_new_tokens": 8, "temperature": 1.0},
        "training": {
            "steps": 4,
            "seq_len": 40,
            "batch_size": 16,
            "micro_batch_size": 8,
            "dtype": "float32",
        },
        "optimizer": {"lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 0, "weight_decay": 0.0},
        "checkpoint": {"interval": 2, "keep": 3},
        "log": {"progress": False, "tensorboard": False, "interval": 1},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values} if isinstance(values, dict) else values
    return recipe


@pytest.mark.parametrize("lora", [False, True])
def test_resume_gives_the_same_losses_and_samples(tmp_path, lora):
    """A run killed after step 2 and resumed gives steps 3-4 exactly as the uninterrupted
    run: the same sampled answers (rewards), the same losses; the reference (a frozen copy,
    rebuilt from the recipe on resume; or with LoRA the base) is the same."""
    prompt_task(tmp_path)
    recipe = rlhf_recipe(
        tmp_path, lora={"rank": 4, "targets": ["q_proj", "up_proj"]} if lora else None
    )
    recipe["optimizer"]["lr"] = recipe["optimizer"]["min_lr"] = 3e-2 if lora else 3e-3
    whole = rlhf(recipe, reward=CountReward())
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert {"reward", "kl", "entropy", "answer_len", "truncated"} <= set(records[-1])
    assert len(whole.losses) == 4
    shutil.rmtree(whole.checkpoint)  # "killed" before step 4's checkpoint ...
    shutil.rmtree(whole.checkpoint.parent / "step_0000003", ignore_errors=True)
    resumed = rlhf(recipe, resume=True, reward=CountReward())
    assert resumed.losses == whole.losses[2:]
    again = [r for r in read_metrics(tmp_path / "run") if "loss" in r][-2:]
    assert [r["reward"] for r in again] == [r["reward"] for r in records[2:]]


def test_rlhf_raises_the_reward_with_bounded_kl(tmp_path):
    """Point 7: under a programmatic reward (the share of answer tokens in a set of a quarter
    of the vocabulary), 60 RLOO steps of a random tiny model raise the mean reward from about
    0.25 by well over 0.2 while the KL to the starting model stays a few nats."""
    prompt_task(tmp_path)
    sections = dict(
        training={"steps": 60, "batch_size": 32, "micro_batch_size": 16},
        optimizer={"lr": 5e-3, "min_lr": 5e-3},
        checkpoint={"interval": 0},
    )
    rlhf(rlhf_recipe(tmp_path, **sections), reward=CountReward())
    rec = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    first = sum(r["reward"] for r in rec[:5]) / 5
    last = sum(r["reward"] for r in rec[-5:]) / 5
    print(f"reward {first:.3f} -> {last:.3f}; kl {[round(r['kl'], 2) for r in rec[-5:]]}")
    assert first < 0.3 and last > first + 0.2
    assert 0 < max(r["kl"] for r in rec) < 10.0
    assert all(0 <= r["truncated"] <= 1 and 0 < r["answer_len"] <= 8 for r in rec)


def test_rollout_flops_by_hand(tmp_path):
    """A rollout batch says what making it cost, for MFU: the prompt's prefill (3 tokens, one
    logit), the answer tokens fed back (all but each answer's last: 2 + 0), the reference's
    pass over the batch (rows of 5 and 3 tokens, 3 + 1 answer targets), and the reward's own
    figure when it gives one."""
    from gemmakit.training.metrics import forward_flops
    from gemmakit.training.recipe import as_recipe
    from gemmakit.training.rlhf import RLHFStage, _as_batch
    from gemmakit.training.rollouts import Rollouts

    class PricedReward(CountReward):
        def flops(self, sequences):
            return 1000.0 * sum(map(len, sequences))

    prompt_task(tmp_path)
    model = small_model()
    cfg = model.config
    recipe = as_recipe(rlhf_recipe(tmp_path, rlhf={"k": 2}))
    for reward, reward_flops in ((CountReward(), 0.0), (PricedReward(), 1000.0 * (6 + 4))):
        stage = RLHFStage(recipe, [[2, 5, 6]], reward)
        stage.adapt(model, None)
        rollouts = Rollouts([[2, 5, 6]], [[7, 8, 1], [9]], [False, True], 2)
        batch = _as_batch(rollouts, cfg.tokens.pad, model.device)
        T = batch["tokens"].shape[1]
        assert T == 5

        token, logit = forward_flops(cfg, 1, 0, T), forward_flops(cfg, 0, 1, T)
        sampling = (3 + 2) * token + (1 + 2) * logit
        reference = (5 + 3) * token + (3 + 1) * logit
        got = stage.rollout_flops(rollouts, batch, rollouts.sequences())
        assert got == pytest.approx(sampling + reference + reward_flops, rel=1e-12)


def test_prompt_rows_and_their_errors(tmp_path):
    rows = [
        {"prompt": "hi", "chosen": "a", "rejected": "b"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    got = read_prompts(path)
    assert [p.messages[-1]["content"] for p in got] == ["hi", "q", "u"]
    assert len(got[1].messages) == 1
    path.write_text(json.dumps({"completion": "x"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: expected field 'prompt'"):
        read_prompts(path)


def test_rlhf_command_with_a_reward_model(tmp_path, capsys):
    """`gemmakit rlhf RECIPE` end to end with rlhf.reward_model a saved reward model (random
    weights here): it scores the answers as conversations (closed turns get their "\\n"), and
    the run logs every metric and leaves a checkpoint."""
    prompt_task(tmp_path)
    backbone = small_model(seed=3)
    rm = RewardModel(backbone, torch.nn.Linear(64, 1, bias=False))
    save_reward_model(rm, tmp_path / "rm", extra_files={"tokenizer.model": tmp_path / "tok.model"})
    loaded = load_reward(
        build_recipe({**rlhf_recipe(tmp_path), "rlhf": {"reward_model": str(tmp_path / "rm")}}),
        load_tokenizer(tmp_path / "tok.model"),
        torch.device("cpu"),
    )
    seq = [2, 106, 40, 41, 107]  # ... <end_of_turn>
    newline = load_tokenizer(tmp_path / "tok.model").encode("\n", bos=False, special=False)
    want = rm.score_ids([seq + newline, [2, 106, 40]])
    torch.testing.assert_close(loaded.score_ids([seq, [2, 106, 40]]), want)
    recipe = rlhf_recipe(tmp_path, training={"steps": 2}, checkpoint={"interval": 0})
    recipe["rlhf"]["reward_model"] = str(tmp_path / "rm")
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    assert main(["rlhf", str(path)]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    rec = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(rec) == 2 and all(abs(r["reward"]) > 0 for r in rec)
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "tokenizer.model").is_file()
    # the shipped recipe parses; a bad k is an error naming the key
    assert load_recipe(Path(__file__).parents[1] / "recipes" / "rlhf-tiny.yaml").rlhf.k == 4
    assert main(["rlhf", str(path), "--set", "rlhf.k=1"]) == 2
    assert "rlhf.k must be >= 2" in capsys.readouterr().err


def test_two_processes_match_one(tmp_path):
    """`gemmakit rlhf` under torchrun, DDP over 2 CPU processes taking one micro-batch (2
    prompts x k=4 answers) each, gives one process's steps (2 micro-batches accumulated):
    answers are sampled with a generator seeded by the global micro-batch index, not the
    rank, so both sample the same answers and get the same rewards, losses and weights. Rank
    0 logs every per-step metric; the checkpoint loads with load_model."""
    from helpers import torchrun, write_recipe

    from gemmakit import load_model

    prompt_task(tmp_path)
    rm = RewardModel(small_model(seed=3), torch.nn.Linear(64, 1, bias=False))
    save_reward_model(rm, tmp_path / "rm", extra_files={"tokenizer.model": tmp_path / "tok.model"})
    recipe = rlhf_recipe(tmp_path, training={"steps": 2}, checkpoint={"interval": 2})
    recipe["rlhf"]["reward_model"] = str(tmp_path / "rm")
    single = rlhf(recipe)
    recipe["run_dir"] = str(tmp_path / "ddp")
    recipe["distributed"] = {"mode": "ddp"}
    out = torchrun("rlhf", write_recipe(tmp_path / "r.yaml", recipe))
    assert out.count("done: 2 steps") == 1  # printed by rank 0 alone
    records = [r for r in read_metrics(tmp_path / "ddp") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]  # rank 0 alone writes the log
    names = ["reward", "kl", "entropy", "answer_len", "truncated"]
    got = torch.tensor([[r["loss"]] + [r[k] for k in names] for r in records])
    want = torch.tensor(
        [[loss] + [m[k] for k in names] for loss, m in zip(single.losses, single.metrics)]
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len({r["reward"] for r in records}) == 2  # two different steps of samples
    a = load_model(tmp_path / "ddp" / "checkpoints" / "step_0000002").state_dict()
    b = load_model(single.checkpoint).state_dict()
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
