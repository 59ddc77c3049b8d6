"""SFT: packed conversations are kept apart (the same losses and gradients as alone), the
JSONL formats and their errors, the seeded packed stream, and a tiny model taught a format."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gemmakit.api import build_model
from gemmakit.config import get_config
from gemmakit.errors import DataError
from gemmakit.model.transformer import segment_positions
from gemmakit.training.conversations import (
    PackedRows,
    encode_conversations,
    pack,
    read_conversations,
)
from gemmakit.training.distributed import DistEnv
from gemmakit.training.losses import IGNORE

SMALL = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=2, head_dim=16, ffn_dim=64)


def small_model(preset: str):
    cfg = get_config(preset).replace(**SMALL)
    if cfg.sliding_window:
        cfg = cfg.replace(sliding_window=5)  # shorter than the conversations: windows matter
    return build_model(cfg, dtype=torch.float32, seed=1)


def test_segment_positions_restart_in_each_segment():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    want = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert torch.equal(segment_positions(seg), want)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2", "tiny-gemma3"])
def test_packed_row_gives_each_conversations_losses_and_gradients(preset):
    """Three conversations packed in one row (then padding) give, per conversation, the
    per-token losses and the gradients it gives alone: nothing leaks through attention or
    positions, on global and sliding-window layers alike."""
    model = small_model(preset)
    gen = torch.Generator().manual_seed(0)
    lengths = [13, 9, 17]
    convs = [torch.randint(4, 64, (n,), generator=gen) for n in lengths]
    targets = [torch.randint(4, 64, (n,), generator=gen) for n in lengths]
    T = sum(lengths) + 6
    tokens = torch.zeros(1, T, dtype=torch.long)
    seg = torch.zeros(1, T, dtype=torch.long)
    at = 0
    for k, c in enumerate(convs, 1):
        tokens[0, at : at + len(c)] = c
        seg[0, at : at + len(c)] = k
        at += len(c)

    def grads(loss):
        model.zero_grad()
        loss.backward(retain_graph=True)
        return [p.grad.clone() for p in model.parameters()]

    packed = model(tokens, segment_ids=seg)[0]  # [T, V]
    at = 0
    for c, t in zip(convs, targets):
        n = len(c)
        alone_logits = model(c[None])[0]
        alone = F.cross_entropy(alone_logits, t, reduction="none")
        inside = F.cross_entropy(packed[at : at + n], t, reduction="none")
        torch.testing.assert_close(inside, alone, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads(inside.sum()), grads(alone.sum())):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        at += n
    # Without the segments the later conversations do see the earlier ones.
    leaky = model(tokens)[0]
    assert not torch.allclose(leaky[13:22], packed[13:22], atol=1e-3)


# --- data: formats, errors, the packed stream ----------------------------------------------


class CharTokenizer:
    """One id per character (100 + code point mod 50) and Gemma's special ids."""

    def encode(self, text: str, bos: bool = True, special: bool = True) -> list[int]:
        return [2] * bos + [150 + ord(c) % 50 for c in text]

    def token_ids(self, default=None):
        from gemmakit.config import TokenIds

        return default or TokenIds()


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_prompt_completion_rows_equal_messages_rows_and_targets_are_model_turns(tmp_path):
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]
    rows = [
        {"messages": messages, "id": 7},  # extra fields are ignored
        {"prompt": messages[:2], "completion": "Yo"},
        {"prompt": "Be terse.\n\nHi", "completion": [messages[2]]},
        "",  # blank lines are skipped
    ]
    convs = read_conversations(write_jsonl(tmp_path / "c.jsonl", rows))
    assert [c.where for c in convs] == [f"{tmp_path / 'c.jsonl'}:{n}" for n in (1, 2, 3)]
    examples, stats = encode_conversations(convs, CharTokenizer(), None, 64, 256)
    for ex in examples[1:]:
        assert ex.tokens.tolist() == examples[0].tokens.tolist()
        assert ex.targets.tolist() == examples[0].targets.tolist()
    ex = examples[0]
    learned = [int(t) for t in ex.targets if t != IGNORE]
    assert learned == [150 + ord("Y") % 50, 150 + ord("o") % 50, 107]  # "Yo" <end_of_turn>
    assert stats.target_tokens == 9 and stats.truncated == 0


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", ":2: not valid JSON"),
        (json.dumps({"text": "hi"}), ":2: expected field 'messages'"),
        (json.dumps({"messages": "hi"}), ":2: field 'messages' must be a list"),
        (json.dumps({"prompt": 3, "completion": "a"}), ":2: field 'prompt' must be a string"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), ":2: messages[0]: unknown"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), ":2: no assistant"),
    ],
)
def test_bad_rows_are_errors_naming_file_line_and_field(tmp_path, line, message):
    good = {"prompt": "a", "completion": "b"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(DataError, match=f"bad.jsonl{message}".replace("[", r"\[")):
        encode_conversations(read_conversations(path), CharTokenizer(), None, 64, 256)


def test_token_outside_the_vocabulary_and_overlong_conversations(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a" * 30, "completion": "b"}])
    with pytest.raises(DataError, match=r"c.jsonl:1: token id \d+ is outside"):
        encode_conversations(read_conversations(path), CharTokenizer(), None, 64, 160)
    # Cut to 16 positions, nothing of the answer is left: dropped and counted.
    examples, stats = encode_conversations(read_conversations(path), CharTokenizer(), None, 16, 256)
    assert examples == [] and stats.truncated == stats.dropped == 1


def test_packing_fills_rows_without_overflow_and_keeps_every_example_once():
    lengths = [5, 9, 3, 7, 2, 8, 8, 1, 4, 6] * 5
    rows = pack(lengths, list(range(len(lengths))), 16)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 16 for r in rows)
    assert sum(lengths) / (16 * len(rows)) > 0.9


def _examples(n: int, seed: int = 0):
    import numpy as np

    from gemmakit.training.conversations import Example

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(3, 12))
        out.append(Example(rng.integers(4, 60, L), rng.integers(4, 60, L)))
    return out


def test_packed_stream_resumes_exactly_and_any_split_reads_the_same_rows():
    stream = PackedRows(_examples(40), 24, seed=3)
    whole = [b for _, b in zip(range(12), stream.batches(4, 0))]  # several epochs
    later = stream.batches(4, 0, start=7)
    for k in range(7, 12):
        b = next(later)
        assert all(torch.equal(b[key], whole[k][key]) for key in whole[k])
    # Two ranks with 2 rows each read, together, the rows of one rank with 4.
    r0 = next(stream.batches(2, 0, rank=0, world_size=2, start=5))
    r1 = next(stream.batches(2, 0, rank=1, world_size=2, start=5))
    assert torch.equal(torch.cat([r0["tokens"], r1["tokens"]]), whole[5]["tokens"])
    # Another seed: another order; and every epoch holds each example exactly once.
    other = next(PackedRows(_examples(40), 24, seed=4).batches(4, 0))
    assert not torch.equal(other["tokens"], whole[0]["tokens"])
    assert sorted(i for r in stream.epoch_rows(1) for i in r) == list(range(40))
    seg = whole[0]["segment_ids"]
    assert (whole[0]["targets"][seg == 0] == IGNORE).all()  # padding learns nothing


# --- evidence: SFT teaches a tiny model a response format ----------------------------------

WORDS = (
    "red blue green black white pink gray brown gold teal navy lime plum rose sand jade ruby "
    "mint coal snow cat dog fox owl bee cow pig rat eel yak ant bat cod elk emu gnu hen ram koi "
    "ape"
).split()
TEMPLATES = [
    "Describe the {w}.",
    "Tell me about {w} please",
    "What is {w}?",
    "I like {w} a lot.",
    "{w} is here.",
    "Say something on {w}",
]


def format_task(tmp_path):
    """Prompts about a word; the answer format is `ANSWER: WORD` (upper-cased). Held out: 40
    (template, word) pairs never seen in training (every word is seen with other templates)."""
    import random

    from gemmakit.tokenizer import train_tokenizer

    def rows(pairs):
        return [
            {
                "messages": [
                    {"role": "user", "content": t.format(w=w)},
                    {"role": "assistant", "content": f"ANSWER: {w.upper()}"},
                ]
            }
            for t, w in pairs
        ]

    pairs = [(t, w) for t in TEMPLATES for w in WORDS]
    random.Random(0).shuffle(pairs)
    train, held = rows(pairs[40:]), rows(pairs[:40])
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "valid.jsonl", held)
    text = [m["content"] for r in train + held for m in r["messages"]]
    tok = train_tokenizer(text * 3, vocab_size=512, output=tmp_path / "tok")
    return tok, held


def exact_match(model, tok, held) -> float:
    from gemmakit.chat import encode_chat
    from gemmakit.generation import generate

    prompts = [
        encode_chat(
            tok, r["messages"][:1], add_generation_prompt=True, token_ids=model.config.tokens
        ).ids
        for r in held
    ]
    answers = [tok.decode(ids).strip() for ids in generate(model, prompts, 12)]
    return sum(a == r["messages"][1]["content"] for a, r in zip(answers, held)) / len(held)


def sft_recipe(tmp_path, **sections) -> dict:
    recipe = {
        "run_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny", "config_overrides": {"vocab_size": 512}},
        "data": {
            "train": [str(tmp_path / "train.jsonl")],
            "valid": str(tmp_path / "valid.jsonl"),
            "tokenizer": str(tmp_path / "tok.model"),
        },
        "training": {"steps": 150, "seq_len": 128, "batch_size": 8, "micro_batch_size": 8},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 10, "weight_decay": 0.0},
        "eval": {"interval": 50, "batches": 2},
        "checkpoint": {"interval": 0},
        "log": {"progress": False, "tensorboard": False, "interval": 50},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values} if isinstance(values, dict) else values
    return recipe


def test_sft_teaches_a_tiny_model_an_answer_format(tmp_path):
    from gemmakit.api import load_model
    from gemmakit.training.sft import sft

    tok, held = format_task(tmp_path)
    recipe = sft_recipe(tmp_path, training={"dtype": "float32"})
    before = build_model(get_config("tiny").replace(vocab_size=512), dtype=torch.float32, seed=0)
    assert exact_match(before, tok, held) < 0.05
    result = sft(recipe)
    after = load_model(result.checkpoint, dtype=torch.float32)
    assert (result.checkpoint / "tokenizer.model").is_file()
    assert result.val_losses[-1][1] < 0.5 * result.val_losses[0][1]
    assert exact_match(after, tok, held) >= 0.7


def test_sft_command_reports_a_bad_row_in_one_line(tmp_path, capsys):
    from pathlib import Path

    from gemmakit.cli import main
    from gemmakit.training.recipe import load_recipe

    format_task(tmp_path)
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": "hi", "answer": "x"}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(sft_recipe(tmp_path)))  # JSON is YAML
    assert main(["sft", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gemmakit sft: error: ") and "train.jsonl:201: expected field" in err
    assert "\n" not in err
    for name in ("sft-tiny.yaml", "sft-270m-lora.yaml"):  # the shipped recipes parse
        r = load_recipe(Path(__file__).parents[1] / "recipes" / name)
        assert (r.lora is None) == (name == "sft-tiny.yaml")


# --- exact resume after SIGKILL, any split of a step, torchrun (DDP) ------------------------

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": ["q_proj", "v_proj", "up_proj"]}
# Dropout masks are drawn per micro-batch (and per rank): another split draws others.
NO_DROPOUT = {**LORA, "dropout": 0.0}


def small_sft_recipe(tmp_path, run: str, steps: int, **sections) -> dict:
    """LoRA (with adapter dropout: the RNG must resume too) on the format task, small enough
    that a step takes a few ms on one core; rows of 64 positions hold 2-4 conversations."""
    base = dict(
        run_dir=str(tmp_path / run),
        lora=LORA,
        training={"steps": steps, "seq_len": 64, "batch_size": 4, "micro_batch_size": 4},
        optimizer={"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2},
        eval={"interval": 0},
        checkpoint={"interval": 10, "keep": 1},
        log={"interval": 1},
    )
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values} if isinstance(values, dict) else values
    recipe = sft_recipe(tmp_path, **base)
    recipe["training"]["dtype"] = "float32"
    return recipe


def test_a_step_split_into_micro_batches_gives_the_whole_batchs_losses(tmp_path):
    """Rows hold different numbers of target tokens: the loss is the mean over the step's
    targets (LOSS_TERMS), not a mean of micro-batch means, so 2 micro-batches of 2 rows give
    the losses of one micro-batch of 4 (a mean of means is ~1e-4 off: this catches it)."""
    from gemmakit.training.sft import sft

    format_task(tmp_path)
    whole = sft(small_sft_recipe(tmp_path, "whole", 6, lora=NO_DROPOUT))
    split = sft(
        small_sft_recipe(tmp_path, "split", 6, lora=NO_DROPOUT, training={"micro_batch_size": 2})
    )
    torch.testing.assert_close(
        torch.tensor(split.losses), torch.tensor(whole.losses), rtol=1e-5, atol=0
    )


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    """`gemmakit sft` with LoRA killed with SIGKILL after its first checkpoint and resumed
    gives every step's loss of the uninterrupted run (the adapter, AdamW's state, the data
    position and the dropout RNG all come back)."""
    import sys

    from helpers import kill_after_checkpoint, losses, write_recipe

    from gemmakit.training.sft import sft

    format_task(tmp_path)
    steps = 20
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same threads as the subprocess, so the same float sums
    try:
        whole = sft(small_sft_recipe(tmp_path, "whole", steps))
        cut = small_sft_recipe(tmp_path, "cut", steps)
        path = write_recipe(tmp_path / "r.yaml", cut)
        kill_after_checkpoint(
            [sys.executable, "-m", "gemmakit.cli", "sft", str(path)], tmp_path / "cut", 10
        )
        assert 10 <= len(losses(tmp_path / "cut")) < steps
        resumed = sft(cut, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert resumed.steps == steps and len(resumed.losses) < steps
    got = losses(tmp_path / "cut")
    assert len(got) == steps
    torch.testing.assert_close(torch.tensor(got), torch.tensor(whole.losses), rtol=1e-5, atol=0)
    assert (resumed.checkpoint / "adapter_model.safetensors").is_file()


def test_two_processes_match_one(tmp_path):
    """`gemmakit sft` with LoRA under torchrun, DDP over 2 CPU processes with 2 rows each,
    gives one process's per-step losses (4 rows a micro-batch), held-out losses and adapter.
    eval.batches counts micro-batches over all ranks, so 4 of 2 rows are the single run's 2
    of 4 rows."""
    from helpers import losses, torchrun, write_recipe
    from safetensors.torch import load_file

    from gemmakit.training.metrics import read_metrics
    from gemmakit.training.sft import sft

    format_task(tmp_path)
    sections = dict(lora=NO_DROPOUT, eval={"interval": 2, "batches": 2}, checkpoint={"interval": 4})
    single = sft(small_sft_recipe(tmp_path, "one", 4, **sections))
    ddp = small_sft_recipe(tmp_path, "ddp", 4, **sections)
    ddp["training"]["micro_batch_size"] = 2
    ddp["eval"]["batches"] = 4
    ddp["distributed"] = {"mode": "ddp"}
    torchrun("sft", write_recipe(tmp_path / "r.yaml", ddp))
    got = torch.tensor(losses(tmp_path / "ddp"))
    torch.testing.assert_close(got, torch.tensor(single.losses), rtol=1e-5, atol=0)
    val = [r["val_loss"] for r in read_metrics(tmp_path / "ddp") if "val_loss" in r]
    want = torch.tensor([v for _, v in single.val_losses])
    torch.testing.assert_close(torch.tensor(val), want, rtol=1e-5, atol=0)
    name = "checkpoints/step_0000004/adapter_model.safetensors"
    a, b = load_file(tmp_path / "ddp" / name), load_file(tmp_path / "one" / name)
    assert set(a) == set(b) and len(a) == 2 * 3 * get_config("tiny").n_layers  # A, B; 3 targets
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_logged_tokens_per_s_and_mfu_count_real_tokens_and_flops_done(tmp_path):
    """tokens_per_s counts the step's tokens, not its padded positions (rows here are ~83%
    full), and MFU the FLOPs of those tokens and of the target positions' logits (StepFlops)
    over the given peak."""
    from gemmakit.model.lora import LoRASpec, apply_lora
    from gemmakit.tokenizer import load_tokenizer
    from gemmakit.training.loop import count_positions
    from gemmakit.training.metrics import StepFlops, read_metrics
    from gemmakit.training.recipe import as_recipe
    from gemmakit.training.sft import SFTData, base_config, sft

    format_task(tmp_path)
    recipe = small_sft_recipe(tmp_path, "run", 3, log={"peak_flops": 1e12})
    sft(recipe)
    r = as_recipe(recipe)
    config = base_config(r)
    data = SFTData(r, load_tokenizer(tmp_path / "tok.model"), config)
    model = build_model(config, dtype=torch.float32)
    apply_lora(model, LoRASpec(4, 8.0, 0.0, tuple(LORA["targets"])))
    flops = StepFlops.of(model, 64)
    steps = [x for x in read_metrics(tmp_path / "run") if "loss" in x]
    for rec, batch in zip(steps, data.make_batches(DistEnv(0, 1, 0, torch.device("cpu")), 0)):
        tokens, logits = count_positions(batch)
        assert 0 < logits < tokens < 4 * 64
        assert rec["tokens_per_s"] * rec["step_s"] == pytest.approx(tokens, rel=1e-9)
        assert rec["mfu"] * rec["step_s"] * 1e12 == pytest.approx(flops(tokens, logits), rel=1e-9)
