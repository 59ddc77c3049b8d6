"""k sampled answers to each of a batch of prompts, for RLHF: one prefill per prompt (its KV
cache then repeated k times), then one batched decode of all prompts x k answers.

Unlike `generate`, each answer keeps the stop token that ended it (the policy chose it, so
its log-probability is trained too), and the randomness comes from a caller's
torch.Generator, so a run can make it a function of (seed, step) for exact resume.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from gemmakit.generation import check_sampling, fit_prompts, left_pad, sample_next
from gemmakit.model.cache import KVCache
from gemmakit.model.transformer import Gemma


@dataclass
class Rollouts:
    """answers[i * k + j]: the j-th answer to prompts[i] (its stop token included when it
    stopped); truncated[i * k + j]: it reached max_new_tokens without a stop token."""

    prompts: list[list[int]]
    answers: list[list[int]]
    truncated: list[bool]
    k: int

    def sequences(self) -> list[list[int]]:
        """prompt + answer of every answer, in answer order."""
        return [self.prompts[i // self.k] + a for i, a in enumerate(self.answers)]


@torch.inference_mode()
def sample_answers(
    model: Gemma,
    prompts: Sequence[Sequence[int]],
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] | None = None,
    generator: torch.Generator | None = None,
) -> Rollouts:
    """k answers to each prompt (ids lists, BOS first), sampled as `sample_next` does.

    Stop tokens default to EOS and <end_of_turn>. A prompt that does not fit the model's
    context with one new token is refused (UsageError); max_new_tokens is lowered to the room
    left (`fit_prompts`). generator: on the model's device (None: torch's global RNG).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    cfg = model.config
    stops = (
        set(stop_tokens) if stop_tokens is not None else {cfg.tokens.eos, cfg.tokens.end_of_turn}
    )
    prompts, max_new_tokens = fit_prompts(prompts, max_new_tokens, cfg.max_seq_len)
    answers: list[list[int]] = [[] for _ in range(len(prompts) * k)]
    done = [False] * len(answers)
    if max_new_tokens == 0:
        return Rollouts(prompts, answers, [False] * len(answers), k)
    device = model.device
    tokens, valid = left_pad(prompts, cfg.tokens.pad, device)
    T = tokens.shape[1]
    cache = KVCache(cfg, len(prompts), T + max_new_tokens, model.dtype, device)
    cache.key_valid[:, :T] = valid
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # real tokens only, as generate
    logits = model(tokens, positions=positions, cache=cache, last_only=True)[:, -1]
    cache.repeat_rows(k)
    logits = logits.repeat_interleave(k, dim=0)
    next_pos = positions[:, -1:].repeat_interleave(k, dim=0) + 1
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        for i, t in enumerate(nxt.tolist()):  # one device-to-host copy per step
            if not done[i]:
                answers[i].append(t)
                done[i] = t in stops
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], positions=next_pos, cache=cache)[:, -1]
        next_pos = next_pos + 1
    truncated = [not d for d in done]
    return Rollouts(prompts, answers, truncated, k)
