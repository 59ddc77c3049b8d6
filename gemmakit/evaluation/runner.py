"""`ModelRunner`: the `LanguageModel` of the task framework over a gemmakit model.

Speed by design:
- log-likelihood requests are grouped by their context's tokens: each context is run once,
  its KV cache copied to one row per continuation (`KVCache.select_rows`), and only the
  continuations are run after it; logits (a 262k-wide projection for Gemma 3) are computed
  only where a continuation token is predicted, never over the context;
- requests are sorted by length before batching, so a batch holds rows of similar lengths;
- generation runs batched (`gemmakit.generation.stream_generate`), stops a row at its first
  stop sequence and ends the batch once every row has stopped; n samples of one prompt share
  one prefill (`KVCache.repeat_rows`).

Tokenization follows lm-evaluation-harness's HF backend, so the same request gives the same
ids: BOS always first; trailing whitespace of a context moves to its continuation; context and
context+continuation are each encoded whole (plain text, `special=False`) and the
continuation is the tokens after the context's; a request longer than the model's context
keeps its last tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gemmakit.api import load_model
from gemmakit.chat import encode_chat
from gemmakit.commands.common import check_device, check_vocab_fits
from gemmakit.dtypes import torch_dtype
from gemmakit.errors import UsageError
from gemmakit.evaluation.requests import Generate, Loglikelihood, LoglikelihoodResult, Rolling
from gemmakit.generation import check_sampling, left_pad, stream_generate
from gemmakit.model.cache import KVCache
from gemmakit.model.head import token_logprobs
from gemmakit.model.transformer import Gemma
from gemmakit.tokenizer import Tokenizer, load_tokenizer

# progress(kind, done, total): kind is "loglikelihood", "rolling" or "generate"
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TokenRequest:
    """log p(continuation | context) on token ids; context holds at least one id (BOS)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


class ModelRunner:
    """Answers Loglikelihood, Rolling and Generate requests with `model` and `tokenizer`.

    batch_size: rows per forward (continuations scored at once; prompts decoded at once).
    max_length: the longest input in tokens (default: the model's context, config.max_seq_len).
    chat: wrap each context / prompt as one user turn of Gemma's chat format, ending with the
    model turn's header, for instruction-tuned models.
    progress: called as progress(kind, done, total) after each batch.
    """

    def __init__(
        self,
        model: Gemma,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        chat: bool = False,
        progress: Progress | None = None,
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_seq_len
        if self.max_length < 2:
            raise UsageError(f"max_length must be >= 2, got {self.max_length}")
        self.chat = chat
        self.progress = progress
        self.tokens = tokenizer.token_ids(model.config.tokens)

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        dtype: str | torch.dtype | None = None,
        adapter: str | Path | None = None,
        tokenizer: str | Path | None = None,
        device: str | None = None,
        preset: str | None = None,
        **kwargs,
    ) -> ModelRunner:
        """A runner over the model `load_model` finds for `source` (an installed model such as
        gemma3-270m, a checkpoint path, a preset), as the CLI's --model/--checkpoint, --dtype
        (a name such as "float32", or a torch dtype), --adapter (a PEFT LoRA folder),
        --tokenizer (default: the checkpoint's own), --device and --preset give it. kwargs:
        the constructor's (batch_size, max_length, chat, progress)."""
        check_device(device)
        if isinstance(dtype, str):
            dtype = torch_dtype(dtype)
        model = load_model(source, dtype=dtype, device=device, config=preset, adapter=adapter)
        tok = load_tokenizer(tokenizer or source)
        check_vocab_fits(tok, model.config, tokenizer or source)
        return cls(model, tok, **kwargs)

    # ------------------------------------------------------------------------ tokenization

    def encode(self, text: str) -> list[int]:
        """Plain-text ids of `text`, no BOS."""
        return self.tokenizer.encode(text, bos=False, special=False)

    def prompt_ids(self, text: str) -> list[int]:
        """The ids a context or prompt starts with: BOS + text, or with `chat`, the text as a
        user turn followed by the model turn's header."""
        if self.chat:
            message = [{"role": "user", "content": text}]
            return encode_chat(self.tokenizer, message, True, self.config.tokens).ids
        return [self.tokens.bos, *self.encode(text)]

    def split(self, request: Loglikelihood) -> TokenRequest:
        """A request's (context, continuation) ids, as lm-eval's HF backend splits it (module
        docstring), left-truncated to max_length + 1 ids (the last is only predicted)."""
        context, continuation = request.context, request.continuation
        if self.chat:
            # a chat turn's text is stripped; the answer starts the model's turn
            ctx = self.prompt_ids(context)
            cont = self.encode(continuation.lstrip())
        else:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = self.prompt_ids(context)
            whole = self.prompt_ids(context + continuation)
            cont = whole[len(ctx) :]
        return self.fit(ctx, cont)

    def fit(self, context: Sequence[int], continuation: Sequence[int]) -> TokenRequest:
        """(context, continuation) cut to their last max_length + 1 ids, as lm-eval does;
        at least one context id is kept (a continuation longer than the model's context
        keeps its last max_length ids)."""
        full = [*context, *continuation]
        n_cont = min(len(continuation), self.max_length)
        full = full[-(self.max_length + 1) :]
        cut = len(full) - n_cont
        return TokenRequest(tuple(full[:cut]), tuple(full[cut:]))

    # ------------------------------------------------------------------------ log-likelihood

    def loglikelihood(self, requests: Sequence[Loglikelihood]) -> list[LoglikelihoodResult]:
        """log p(continuation | context) of each request, summed over its tokens, whether
        every continuation token is the argmax, and the continuation's length in tokens."""
        return self.score_tokens([self.split(r) for r in requests], "loglikelihood")

    def loglikelihood_rolling(self, requests: Sequence[Rolling]) -> list[float]:
        """log p(text) of each request: every token of the text after BOS, in disjoint windows
        of max_length tokens, each seeing the max_length tokens before it (lm-eval's rolling
        windows with context_len 1)."""
        pieces: list[TokenRequest] = []
        owner: list[int] = []
        for i, r in enumerate(requests):
            for ctx, cont in rolling_windows(self.encode(r.text), self.tokens.bos, self.max_length):
                pieces.append(TokenRequest(tuple(ctx), tuple(cont)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, res in zip(owner, self.score_tokens(pieces, "rolling")):
            totals[i] += res.logprob
        return totals

    @torch.inference_mode()
    def score_tokens(
        self, requests: Sequence[TokenRequest], kind: str = "loglikelihood"
    ) -> list[LoglikelihoodResult]:
        """The scores of requests on ids (each at most max_length + 1 ids long): contexts are
        shared (run once per batch) and batches sorted by length."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(requests):
            if not r.context:
                raise UsageError("a log-likelihood request needs at least one context token")
            groups.setdefault(r.context, []).append(i)
        # longest first: a batch that does not fit in memory fails at once, not at the end
        order = sorted(
            groups.items(),
            key=lambda g: -(len(g[0]) + max(len(requests[i].continuation) for i in g[1])),
        )
        results: list[LoglikelihoodResult | None] = [None] * len(requests)
        batch: list[tuple[tuple[int, ...], list[int]]] = []
        rows = done = 0
        self._report(kind, 0, len(requests))
        for context, members in order:
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                if rows + len(chunk) > self.batch_size:
                    done += self._score_batch(batch, requests, results)
                    self._report(kind, done, len(requests))
                    batch, rows = [], 0
                batch.append((context, chunk))
                rows += len(chunk)
        if batch:
            done += self._score_batch(batch, requests, results)
            self._report(kind, done, len(requests))
        return results  # type: ignore[return-value]

    def _score_batch(
        self,
        batch: list[tuple[tuple[int, ...], list[int]]],
        requests: Sequence[TokenRequest],
        results: list[LoglikelihoodResult | None],
    ) -> int:
        """Score one batch of (context, request indices) into `results`; returns how many."""
        model, device = self.model, self.model.device
        contexts = [c for c, _ in batch]
        row_group = [g for g, (_, members) in enumerate(batch) for _ in members]
        conts = [requests[i].continuation for _, members in batch for i in members]
        G, R = len(contexts), len(conts)
        Lk = max(len(c) for c in conts) - 1  # continuation ids fed after the context
        tokens, valid = left_pad(contexts, self.tokens.pad, device)
        Lc = tokens.shape[1]
        cache = KVCache(self.config, G, Lc + max(Lk, 0), model.dtype, device)
        cache.key_valid[:, :Lc] = valid
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        # the context's last position predicts each continuation's first token
        last = model(tokens, positions=positions, cache=cache, last_only=True, return_hidden=True)
        index = torch.tensor(row_group, dtype=torch.long, device=device)
        pieces = [last[:, -1].index_select(0, index)]  # [R, D]
        owners = list(range(R))  # the row each scored position belongs to
        targets = [cont[0] if cont else self.tokens.pad for cont in conts]
        if Lk > 0:
            cache.select_rows(index)
            fed = torch.full((R, Lk), self.tokens.pad, dtype=torch.long)
            for r, cont in enumerate(conts):
                if len(cont) > 1:
                    fed[r, : len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
            fed = fed.to(device)
            # RoPE positions continue from each context's real length (padding is not counted)
            ctx_len = valid.sum(-1).index_select(0, index)  # [R]
            pos = ctx_len[:, None] + torch.arange(Lk, device=device)[None, :]
            hidden = model(fed, positions=pos, cache=cache, return_hidden=True)  # [R, Lk, D]
            # only the positions that predict a continuation token are scored
            where = [(r, j) for r, cont in enumerate(conts) for j in range(len(cont) - 1)]
            rows_t = torch.tensor([r for r, _ in where], dtype=torch.long, device=device)
            cols_t = torch.tensor([j for _, j in where], dtype=torch.long, device=device)
            pieces.append(hidden[rows_t, cols_t])  # [N, D]
            owners += [r for r, _ in where]
            targets += [conts[r][j + 1] for r, j in where]
        token_lp, token_hit = token_logprobs(
            model, torch.cat(pieces), torch.tensor(targets, dtype=torch.long, device=device)
        )
        logp = [0.0] * R  # per row: the summed log-prob
        greedy = [True] * R
        scored = [bool(c) for c in conts] + [True] * (len(owners) - R)  # an empty one: nothing
        for r, lp_, hit, keep in zip(owners, token_lp.tolist(), token_hit.tolist(), scored):
            if keep:
                logp[r] += lp_
                greedy[r] = greedy[r] and hit
        r = 0
        for _, members in batch:
            for i in members:
                results[i] = LoglikelihoodResult(logp[r], greedy[r], len(conts[r]))
                r += 1
        return R

    # ------------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[Generate]) -> list[list[str]]:
        """`n` answers to each request. Greedy requests are batched (sorted by prompt length)
        and their one answer repeated n times; a sampled request draws its n answers from one
        shared prefill, with a generator seeded by its `seed`, so its answers do not depend on
        the other requests. Each answer is cut before the first of its stop sequences."""
        for r in requests:
            check_sampling(r.max_new_tokens, r.temperature, None, r.top_p, r.seed)
            if r.n < 1:
                raise UsageError(f"n must be >= 1, got {r.n}")
        prompts = [self._fit_prompt(r) for r in requests]
        answers: list[list[str]] = [[] for _ in requests]
        greedy = [i for i, r in enumerate(requests) if not r.temperature]
        greedy.sort(key=lambda i: -len(prompts[i]))
        done = 0
        self._report("generate", 0, len(requests))
        for s in range(0, len(greedy), self.batch_size):
            idx = greedy[s : s + self.batch_size]
            texts = self._decode_batch(
                [prompts[i] for i in idx], [requests[i] for i in idx], None, None
            )
            for i, text in zip(idx, texts):
                answers[i] = [text] * requests[i].n
            done += len(idx)
            self._report("generate", done, len(requests))
        for i, r in enumerate(requests):
            if r.temperature:
                answers[i] = self._sample(prompts[i], r)
                done += 1
                self._report("generate", done, len(requests))
        return answers

    def _fit_prompt(self, r: Generate) -> list[int]:
        """The prompt's ids, keeping its last tokens so that they and max_new_tokens fit."""
        ids = self.prompt_ids(r.prompt)
        keep = max(1, self.max_length - r.max_new_tokens)
        return ids[-keep:]

    def _sample(self, prompt: list[int], r: Generate) -> list[str]:
        """r.n sampled answers: the prompt (but its last id) prefilled once, its cache repeated
        for each group of up to batch_size answers."""
        out: list[str] = []
        for j, s in enumerate(range(0, r.n, self.batch_size)):
            n = min(self.batch_size, r.n - s)
            cache = None
            if len(prompt) > 1:
                cache = KVCache(
                    self.config, 1, len(prompt) - 1, self.model.dtype, self.model.device
                )
                with torch.inference_mode():
                    ids = torch.tensor([prompt[:-1]], dtype=torch.long, device=self.model.device)
                    self.model(ids, cache=cache)
                cache.repeat_rows(n)
            seed = r.seed + j  # each group of answers its own draws, the same on every run
            out += self._decode_batch([prompt[-1:]] * n, [r] * n, cache, seed)
        return out

    def _decode_batch(
        self,
        prompts: list[list[int]],
        requests: list[Generate],
        cache: KVCache | None,
        seed: int | None,
    ) -> list[str]:
        """Decode a batch; each row ends at a stop token, its max_new_tokens, or the first of
        its stop sequences (checked on its last tokens' text after each step)."""
        limits = [r.max_new_tokens for r in requests]
        r0 = requests[0]
        steps = stream_generate(
            self.model,
            prompts,
            max(limits),
            r0.temperature,
            None,
            r0.top_p if r0.top_p < 1.0 else None,
            seed=seed,
            cache=cache,
        )
        outs: list[list[int]] = [[] for _ in prompts]
        stopped = [limit == 0 for limit in limits]
        # a stop string of c characters lies within the last 4c + 4 tokens' text
        tail = [4 * max((len(s) for s in r.stop), default=0) + 4 for r in requests]
        for step in steps:
            for k, t in enumerate(step):
                if stopped[k]:
                    continue
                if t is None:
                    stopped[k] = True
                    continue
                outs[k].append(t)
                if len(outs[k]) >= limits[k]:
                    stopped[k] = True
                elif requests[k].stop:
                    text = self.tokenizer.decode(outs[k][-tail[k] :])
                    stopped[k] = any(s in text for s in requests[k].stop)
            if all(stopped):
                steps.close()
                break
        return [cut_at_stop(self.tokenizer.decode(o), r.stop) for o, r in zip(outs, requests)]

    def _report(self, kind: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(kind, done, total)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any of `stop`."""
    end = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if 0 <= at < end:
                end = at
    return text[:end]


def rolling_windows(
    tokens: Sequence[int], prefix: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score every token of `tokens` once: the first
    window predicts the first max_length tokens after `prefix`, each later one the next
    max_length tokens with the max_length tokens before them as input (lm-eval's
    get_rolling_token_windows with context_len 1, made disjoint)."""
    tokens = list(tokens)
    out: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return out
    first = min(max_length, len(tokens))
    out.append(([prefix], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        # input: tokens[end - max_length - 1 : end - 1]; its last n - 1 are the continuation's
        start = max(end - max_length - 1, 0)
        out.append((tokens[start:done], tokens[done:end]))
        done = end
    return out
