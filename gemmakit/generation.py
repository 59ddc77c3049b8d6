"""Batched generation with a KV cache: greedy, temperature, top-k, top-p, as the official
sampler does them, streaming one step at a time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from gemmakit.model.cache import KVCache
from gemmakit.model.transformer import Gemma


def sample_next(
    logits: torch.Tensor,
    temperature: float | None = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] from logits [B, V].

    temperature 0 (or None) is greedy. Otherwise probabilities are softmax(logits / T); top-p
    keeps the smallest set of most likely tokens whose mass reaches p (the token that crosses p
    stays), top-k keeps the k most likely, and the rest is renormalised before sampling.
    """
    if not temperature:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k is not None and top_k > 0:
        probs, index = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # sorted, descending
    else:
        probs, index = probs.sort(dim=-1, descending=True)
    if top_p is not None and top_p < 1.0:
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before > top_p, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs, 1, generator=generator)  # [B, 1] index into sorted
    return index.gather(-1, choice).squeeze(-1)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, T] and validity [B, T] with each prompt aligned to the right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        valid[i, T - len(p) :] = True
    return tokens.to(device), valid.to(device)


@torch.inference_mode()
def stream_generate(
    model: Gemma,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float | None = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] | None = None,
    seed: int | None = None,
) -> Iterator[list[int | None]]:
    """Yield, at each step, the new token of every prompt (None once a prompt has stopped).

    A prompt stops at a stop token (default: EOS and <end_of_turn>), which is not yielded.
    """
    cfg = model.config
    stops = (
        set(stop_tokens) if stop_tokens is not None else {cfg.tokens.eos, cfg.tokens.end_of_turn}
    )
    device = model.device
    tokens, valid = left_pad(prompts, cfg.tokens.pad, device)
    B, T = tokens.shape
    if max_new_tokens <= 0:
        return
    cache = KVCache(cfg, B, T + max_new_tokens, model.dtype, device)
    cache.key_valid[:, :T] = valid
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    logits = model(tokens, positions=positions, cache=cache, last_only=True)[:, -1]
    next_pos = positions[:, -1:] + 1
    done = [False] * B
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        emitted = nxt.tolist()  # one device-to-host copy per step
        out = [None if d or t in stops else t for t, d in zip(emitted, done)]
        done = [d or t in stops for t, d in zip(emitted, done)]
        yield out
        if all(done) or step == max_new_tokens - 1:
            return
        logits = model(nxt[:, None], positions=next_pos, cache=cache)[:, -1]
        next_pos = next_pos + 1


def generate(
    model: Gemma,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float | None = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt (a list of token-id lists, any lengths).

    Greedy by default; see `sample_next` for temperature, top_k and top_p; `seed` makes
    sampling repeatable. Stop tokens (default EOS and <end_of_turn>) end a prompt's output
    and are not included.
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in stream_generate(
        model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed
    ):
        for out, t in zip(outputs, step):
            if t is not None:
                out.append(t)
    return outputs
