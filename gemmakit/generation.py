"""Batched generation with a KV cache: greedy, temperature, top-k, top-p, as the official
sampler does them, streaming one step at a time; `Session` keeps the cache between calls."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from gemmakit.errors import UsageError
from gemmakit.kernels.train_ops import argmax
from gemmakit.model.cache import KVCache
from gemmakit.model.fast_decode import fast_decoder
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
        return argmax(logits)
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
        raise UsageError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        valid[i, T - len(p) :] = True
    return tokens.to(device), valid.to(device)


def check_sampling(
    max_new_tokens: int,
    temperature: float | None = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """Raise UsageError naming the option when one is out of range: max_new_tokens an integer
    >= 0, temperature finite and >= 0 (0 or None: greedy), top_k an integer >= 1, top_p in
    (0, 1], seed an integer (None for each: the default). `names` maps an argument's name to
    what the message calls it (the CLI: "top_p" -> "--top-p")."""
    names = names or {}

    def bad(arg: str, rule: str, value: object) -> UsageError:
        return UsageError(f"{names.get(arg, arg)} must be {rule}, got {value!r}")

    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise bad("max_new_tokens", "an integer >= 0", max_new_tokens)
    if temperature is not None and (
        not isinstance(temperature, numbers.Real)
        or isinstance(temperature, bool)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise bad("temperature", "a finite number >= 0", temperature)
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise bad("top_k", "an integer >= 1", top_k)
    if top_p is not None and (
        not isinstance(top_p, numbers.Real)
        or isinstance(top_p, bool)
        or not 0.0 < top_p <= 1.0  # also false for nan
    ):
        raise bad("top_p", "in (0, 1]", top_p)
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**64):
        raise bad("seed", "an integer that fits 64 bits", seed)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def fit_prompts(
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    context: int,
    used: int = 0,
    truncate: bool = False,
) -> tuple[list[list[int]], int]:
    """(prompts, max_new_tokens) that fit a `context`-token model after `used` positions.

    A prompt that leaves no room for one new token is refused (UsageError), or, with
    `truncate`, cut to its last tokens so that it and max_new_tokens fit (at least one prompt
    token is kept). Otherwise max_new_tokens is lowered to the room left: generation stops
    when the context is full."""
    room = context - used
    longest = max((len(p) for p in prompts), default=0)
    first = min(max_new_tokens, 1)  # the room one new token needs (none when none is asked)
    if truncate:
        keep = max(1, room - max_new_tokens)
        prompts = [list(p)[-keep:] for p in prompts]
    elif longest + first > room:
        where = f" after the {used} tokens already in the cache" if used else ""
        raise UsageError(
            f"a prompt of {longest} tokens does not fit the model's {context}-token context"
            f"{where} (room for {max(room - 1, 0)} prompt tokens and 1 new one); shorten it, "
            "or truncate it to its last tokens (--truncate, or truncate=True)"
        )
    longest = max((len(p) for p in prompts), default=0)
    if longest + first > room:
        raise UsageError(f"no room left in the model's {context}-token context")
    return [list(p) for p in prompts], min(max_new_tokens, room - longest)


def stream_generate(
    model: Gemma,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float | None = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] | None = None,
    seed: int | None = None,
    cache: KVCache | None = None,
    truncate: bool = False,
    fast: bool = True,
) -> Iterator[list[int | None]]:
    """Yield, at each step, the new token of every prompt (None once a prompt has stopped).

    A prompt stops at a stop token (default: EOS and <end_of_turn>), which is not yielded.
    With `cache` (batch B), the prompts continue the `cache.length` positions it holds: only
    they are prefilled, and the cache grows to fit. Afterwards it holds its old positions, the
    prompts and every yielded token fed back, which is all but the last one of each prompt
    (`cache.length` says how many, also after an interruption).

    Options are checked first (`check_sampling`; UsageError). Context (config.max_seq_len):
    a prompt that does not fit is refused, or with `truncate` cut to its last tokens so that
    it and max_new_tokens fit; generation stops when the context is full (`fit_prompts`).

    `fast`: decode steps run as one C call for the whole stack where it applies
    (`gemmakit.model.fast_decode`; the prefill stays one eager forward); False: every step
    is an eager forward.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token")
    used = cache.length if cache is not None else 0
    prompts, max_new_tokens = fit_prompts(
        prompts, max_new_tokens, model.config.max_seq_len, used, truncate
    )
    # checked above, before the first step: the generator below runs only when iterated
    return _stream(
        model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, cache, fast
    )


@torch.inference_mode()
def _stream(
    model: Gemma,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    stop_tokens: Iterable[int] | None,
    seed: int | None,
    cache: KVCache | None,
    fast: bool = True,
) -> Iterator[list[int | None]]:
    cfg = model.config
    stops = (
        set(stop_tokens) if stop_tokens is not None else {cfg.tokens.eos, cfg.tokens.end_of_turn}
    )
    device = model.device
    tokens, valid = left_pad(prompts, cfg.tokens.pad, device)
    B, T = tokens.shape
    if max_new_tokens <= 0:
        return
    if cache is None:
        cache = KVCache(cfg, B, T + max_new_tokens, model.dtype, device)
    elif cache.key_valid.shape[0] != B:
        raise UsageError(f"a KV cache of batch {cache.key_valid.shape[0]} for {B} prompts")
    start = cache.length
    cache.reserve(start + T + max_new_tokens)
    cache.key_valid[:, start:] = True  # what an interrupted call may have left is no longer used
    cache.key_valid[:, start : start + T] = valid
    # RoPE positions count real tokens only, on from those already in the cache
    before = cache.key_valid[:, :start].sum(-1, keepdim=True)
    positions = (before + valid.long().cumsum(-1) - 1).clamp(min=0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))

    logits = model(tokens, positions=positions, cache=cache, last_only=True)[:, -1]
    next_pos = positions[:, -1:] + 1
    decoder = fast_decoder(model, cache) if fast and max_new_tokens > 1 else None
    done = [False] * B
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        emitted = nxt.tolist()  # one device-to-host copy per step
        out = [None if d or t in stops else t for t, d in zip(emitted, done)]
        done = [d or t in stops for t, d in zip(emitted, done)]
        yield out
        if all(done) or step == max_new_tokens - 1:
            return
        if decoder is not None:  # the whole stack in one C call
            logits = decoder.step(nxt, next_pos, cache, greedy=not temperature)
        else:
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
    cache: KVCache | None = None,
    truncate: bool = False,
    fast: bool = True,
) -> list[list[int]]:
    """The new token ids of each prompt (a list of token-id lists, any lengths).

    Greedy by default; see `sample_next` for temperature, top_k and top_p; `seed` makes
    sampling repeatable. Stop tokens (default EOS and <end_of_turn>) end a prompt's output
    and are not included. `cache`, `truncate`, `fast` and the context limit: see
    `stream_generate`.
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in stream_generate(
        model,
        prompts,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        stop_tokens,
        seed,
        cache,
        truncate,
        fast,
    ):
        for out, t in zip(outputs, step):
            if t is not None:
                out.append(t)
    return outputs


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Session:
    """One token sequence that grows across calls (a chat), decoded with one KV cache.

    Each `stream` is given the whole prompt (e.g. the conversation re-encoded with
    `encode_chat`); only what follows its longest common prefix with the tokens already in
    the cache is prefilled. So whatever ended the previous answer (a stop token, max tokens,
    Ctrl-C) or however its text re-encodes, the model sees exactly the ids of the prompt.
    """

    def __init__(self, model: Gemma) -> None:
        self.model = model
        self.cache = KVCache(model.config, 1, 0, model.dtype, model.device)
        self.reused = 0  # prompt tokens the last `stream` found in the cache
        self._fed: list[int] = []  # its first cache.length ids are those in the cache
        self._active: Iterator[list[int | None]] | None = None

    @property
    def ids(self) -> list[int]:
        """The token ids whose keys and values the cache holds, in order."""
        return self._fed[: self.cache.length]

    def reset(self) -> None:
        """Forget everything (the buffers are kept for the next conversation)."""
        self._close()
        self.cache.truncate(0)
        self._fed = []

    def stream(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        temperature: float | None = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: Iterable[int] | None = None,
        seed: int | None = None,
    ) -> Iterator[list[int | None]]:
        """`stream_generate` of the one prompt (ids [T]), reusing the cache: yields [token]
        per step, [None] once stopped. A new call ends the stream of the previous one."""
        if not prompt:
            raise UsageError("the prompt needs at least one token")
        check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        _, max_new_tokens = fit_prompts([prompt], max_new_tokens, self.model.config.max_seq_len)
        self._close()
        # At least one token is prefilled: its logits give the first new token.
        keep = min(common_prefix(self.ids, prompt), len(prompt) - 1)
        self.cache.truncate(keep)
        self._fed = list(prompt)
        self.reused = keep
        # Grow by doubling (up to the context), not by a few tokens each turn.
        needed = len(prompt) + max_new_tokens
        doubled = min(2 * self.cache.max_len, self.model.config.max_seq_len)
        self.cache.reserve(max(needed, doubled))
        steps = stream_generate(
            self.model,
            [prompt[keep:]],
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            stop_tokens,
            seed,
            cache=self.cache,
        )
        self._active = self._record(steps)
        return self._active

    def _record(self, steps: Iterator[list[int | None]]) -> Iterator[list[int | None]]:
        for step in steps:
            if step[0] is not None:
                self._fed.append(step[0])  # before it is yielded, and so before it is fed
            yield step

    def _close(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None
