"""Instruction following of a model: greedy answers in the chat format, scored as IFEval."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from gemmakit.chat import encode_chat
from gemmakit.generation import generate
from gemmakit.instruct.scoring import score


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers to `prompts`, each sent as one user turn of Gemma's chat format, in
    batches of prompts of similar length (sorted by length, so less padding); the answers come
    back in the order of `prompts`."""
    encoded = [
        encode_chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True).ids
        for p in prompts
    ]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        outputs = generate(model, [encoded[i] for i in chunk], max_new_tokens)
        for i, ids in zip(chunk, outputs):
            answers[i] = tokenizer.decode(ids)
    return answers


def evaluate_instruction_following(
    model,
    tokenizer,
    eval_rows: Sequence[Mapping[str, Any]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Generate a greedy answer to each eval row's prompt (IFEval's input format) and score it.

    Returns `scoring.score`'s dict (prompt/instruction-level strict and loose accuracy,
    per-instruction breakdown, per-sample results with the responses) plus "seconds" (the
    generation's wall time) and "max_new_tokens".
    """
    t0 = time.perf_counter()
    responses = generate_responses(
        model, tokenizer, [r["prompt"] for r in eval_rows], max_new_tokens, batch_size
    )
    seconds = time.perf_counter() - t0
    return {**score(eval_rows, responses), "seconds": seconds, "max_new_tokens": max_new_tokens}
