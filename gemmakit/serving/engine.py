"""The engine: one thread owns the model and decodes every running request in one batch.

Requests wait in a queue. Between decode steps, waiting ones are admitted (up to `max_batch`
rows), prefilled on their own one-row cache in chunks (at most `prefill_chunk` tokens per step,
so a long prompt does not stall the running batch for long), given their first token, and then
joined to the batch's cache (`batch.join`); a finished or cancelled one leaves it
(`batch.keep_rows`). Each row samples with its own settings and generator, so a request's
tokens do not depend on what else runs (greedy ones are identical to running alone).

Decode steps run the fused C step (`model.fast_decode`: the whole layer stack in one call, up
to 16 rows, each at its own position) whenever it applies to the model and the batch's cache,
else (another device, LoRA layers, more rows) the eager forward. It is the step `generate`
takes too, so greedy answers equal its; in float32 the two paths differ only in summation
order, in bfloat16 the fused one keeps activations in float32. Prefill is always eager.

Prefix cache: the one-row cache of every prefilled prompt, and of every answer as it leaves
the batch (prompt and generated tokens), is kept (least recently used first out, up to
`prefix_tokens` positions in all), as `generation.Session` keeps a conversation's; a new prompt
copies the positions of its longest common prefix with one of them and prefills only the rest,
so requests that share a system prompt, the next turn of a conversation (which re-sends the
earlier turns and answers), or the choices of one request (n > 1) prefill the shared part once.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gemmakit.generation import common_prefix, sample_next
from gemmakit.kernels.train_ops import argmax
from gemmakit.model.cache import KVCache
from gemmakit.model.fast_decode import FastDecoder, fast_decoder
from gemmakit.model.transformer import Gemma
from gemmakit.serving.batch import copy_prefix, grow, join, keep_rows, take_row

log = logging.getLogger("gemmakit.serve")

# What a request is told on each step: (token id or None, finish reason or None). Finish
# reasons: "stop" (a stop token, not passed on), "length" (max_tokens or the context),
# "abort" (the server is shutting down), "error" (a bug: logged with its traceback).
Emit = Callable[[int | None, str | None], None]


class QueueFull(Exception):
    """More requests are waiting than the engine queues."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()


@dataclass(eq=False)
class Job:
    """One sequence to generate: a prompt [T] and its settings; `emit` is called from the
    engine thread with each step's (token, finish)."""

    prompt: list[int]
    params: SamplingParams
    emit: Emit
    cancelled: bool = False
    reused: int = 0  # prompt tokens found in the prefix cache
    generated: int = 0
    sampled: list[int] = field(default_factory=list)  # every token drawn, a stop token too
    cache: KVCache | None = field(default=None, repr=False)  # while prefilling
    last: int = 0  # the last token, fed at the next decode step
    position: int = 0  # its RoPE position
    generator: torch.Generator | None = field(default=None, repr=False)


class PrefixCache:
    """One-row caches of prefilled prompts, newest last, at most `budget` positions in all."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: list[tuple[list[int], KVCache]] = []

    def lookup(self, prompt: Sequence[int]) -> tuple[int, KVCache | None]:
        """(n, cache): the most tokens of `prompt` (all but its last: its logits are needed)
        that a stored cache holds, and that cache; (0, None) when none shares any."""
        best, found = 0, None
        for i, (ids, _) in enumerate(self.entries):
            n = min(common_prefix(ids, prompt), len(prompt) - 1)
            if n > best:
                best, found = n, i
        if found is None:
            return 0, None
        self.entries.append(self.entries.pop(found))  # most recently used
        return best, self.entries[-1][1]

    def add(self, prompt: list[int], cache: KVCache) -> None:
        if len(prompt) > self.budget:
            return
        self.entries = [e for e in self.entries if e[0] != prompt]
        self.entries.append((prompt, cache))
        while sum(len(ids) for ids, _ in self.entries) > self.budget:
            self.entries.pop(0)


class Engine:
    """Owns `model` in its own thread (`start`); `submit` queues jobs from any thread."""

    def __init__(
        self,
        model: Gemma,
        max_batch: int = 16,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        prefix_tokens: int = 4096,
        fast: bool = True,
    ) -> None:
        self.model = model
        self.config = model.config
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefix = PrefixCache(prefix_tokens)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._prefilling: list[Job] = []
        self._running: list[Job] = []  # row i of self._batch is self._running[i]
        self._batch: KVCache | None = None
        self.fast = fast  # False: every decode step is an eager forward
        # the fused step for self._batch, looked up again only when the batch cache is a new
        # one (a row joined or left), not at every step: (the cache it was looked up for,
        # weakly: a batch that is gone is not kept in memory, decoder)
        self._decoder: tuple[weakref.ref | None, FastDecoder | None] = (None, None)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="gemmakit-engine", daemon=True)
        self.steps = 0  # decode steps run (for tests and /health)
        self.most_rows = 0  # the largest batch decoded
        self.fused_steps = 0  # decode steps that ran the fused C step
        self.cancelled = 0  # jobs dropped because their client went away

    # --- any thread ---------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue `jobs` (all or none): QueueFull when the queue has no room for them all,
        EngineClosed after `shutdown`."""
        with self._cond:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            room = self.config.max_seq_len
            for job in jobs:
                job.params = _capped(job.params, room - len(job.prompt))
                if job.params.seed is not None:
                    job.generator = torch.Generator(device=self.model.device)
                    job.generator.manual_seed(job.params.seed)
            self._waiting.extend(jobs)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop `job` (its client is gone): it leaves the batch at the next step, unseen."""
        job.cancelled = True
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        """Take no new jobs; the thread ends every queued and running one with finish
        "abort" after its current step, and stops. Returns at once."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """`close`, then wait up to `timeout` s for the thread to stop."""
        self.close()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def load(self) -> dict[str, int]:
        with self._cond:
            return {
                "waiting": len(self._waiting),
                "running": len(self._running) + len(self._prefilling),
            }

    # --- the engine thread --------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._closed or self._waiting or self._prefilling or self._running):
                        self._cond.wait()
                    if self._closed:
                        jobs = [*self._waiting, *self._prefilling, *self._running]
                        self._waiting.clear()
                        self._prefilling, self._running, self._batch = [], [], None
                        break
                    busy = len(self._prefilling) + len(self._running)
                    while self._waiting and busy < self.max_batch:
                        self._prefilling.append(self._waiting.popleft())
                        busy += 1
                try:
                    self._step()
                except Exception:  # a bug: fail what runs, keep serving the next requests
                    log.exception("engine step failed")
                    for job in [*self._prefilling, *self._running]:
                        _emit(job, None, "error")
                    self._prefilling, self._running, self._batch = [], [], None
        for job in jobs:
            if not job.cancelled:
                _emit(job, None, "abort")

    def _step(self) -> None:
        prefilling = len(self._prefilling)
        self._prefilling = [j for j in self._prefilling if not j.cancelled]
        gone = [i for i, j in enumerate(self._running) if j.cancelled]
        self.cancelled += prefilling - len(self._prefilling) + len(gone)
        if gone:
            self._leave(gone)
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            job = self._prefilling[0]
            logits, used = self._prefill(job, budget)
            budget -= used
            if logits is not None:
                self._prefilling.pop(0)
                self._started(job, logits)
        if self._running:
            self._decode()

    def _prefill(self, job: Job, budget: int) -> tuple[torch.Tensor | None, int]:
        """Prefill up to `budget` more prompt tokens of `job` into its own cache; the logits
        [1, V] after its last prompt token once all are in, else None; and the tokens used."""
        cfg, T = self.config, len(job.prompt)
        if job.cache is None:
            n, found = self.prefix.lookup(job.prompt)
            if found is not None:
                job.cache = copy_prefix(cfg, found, n, T)
            else:
                job.cache = KVCache(cfg, 1, T, self.model.dtype, self.model.device)
            job.reused = n
        start = job.cache.length
        chunk = job.prompt[start : start + budget]
        tokens = torch.tensor([chunk], dtype=torch.long, device=self.model.device)
        logits = self.model(tokens, cache=job.cache, last_only=True)[:, -1]
        return (logits if job.cache.length == T else None), len(chunk)

    def _started(self, job: Job, logits: torch.Tensor) -> None:
        """The first token of a prefilled `job`; then it joins the batch unless finished."""
        cache, job.cache = job.cache, None
        self.prefix.add(job.prompt, cache)
        token = self._sample([job], logits)[0]
        job.position = len(job.prompt) - 1  # _advance moves it to the new token's
        if self._advance(job, token):
            return
        self._batch = join(self.config, self._batch, cache, spare=64)
        self._running.append(job)

    def _decode(self) -> None:
        jobs, device = self._running, self.model.device
        tokens = torch.tensor([[j.last] for j in jobs], dtype=torch.long, device=device)
        positions = torch.tensor([[j.position] for j in jobs], dtype=torch.long, device=device)
        grow(self._batch, self._batch.length + 1)
        decoder = self._fast_decoder()
        if decoder is not None:
            greedy = not any(j.params.temperature for j in jobs)  # only argmaxes wanted
            logits = decoder.step(tokens, positions, self._batch, greedy=greedy)
            self.fused_steps += 1
        else:
            logits = self.model(tokens, positions=positions, cache=self._batch)[:, -1]
        self.steps += 1
        self.most_rows = max(self.most_rows, len(jobs))
        finished = [
            i
            for i, (j, t) in enumerate(zip(jobs, self._sample(jobs, logits)))
            if self._advance(j, t)
        ]
        if finished:
            self._leave(finished)

    def _fast_decoder(self) -> FastDecoder | None:
        """The fused step for the current batch cache, or None (eager) where it does not
        apply: another device or dtype, LoRA layers, more rows than it takes, `fast` off."""
        if not self.fast:
            return None
        ref, decoder = self._decoder
        if ref is None or ref() is not self._batch:
            decoder = fast_decoder(self.model, self._batch)
            self._decoder = (weakref.ref(self._batch), decoder)
        return decoder

    def _sample(self, jobs: Sequence[Job], logits: torch.Tensor) -> list[int]:
        """Each row's next token [B] from logits [B, V], with its own job's settings."""
        out = argmax(logits)
        for i, job in enumerate(jobs):
            p = job.params
            if p.temperature:
                out[i] = sample_next(
                    logits[i : i + 1], p.temperature, p.top_k, p.top_p, job.generator
                )[0]
        return out.tolist()

    def _advance(self, job: Job, token: int) -> bool:
        """Tell `job` its new token; True when it has finished."""
        job.position += 1  # also the number of positions in the cache: all but `last`
        job.last = token
        job.sampled.append(token)
        if token in job.params.stop_ids:
            _emit(job, None, "stop")
            return True
        job.generated += 1
        done = job.generated >= job.params.max_tokens
        _emit(job, token, "length" if done else None)
        return done

    def _leave(self, rows: list[int]) -> None:
        """Drop `rows` from the batch, keeping each one's cache for prompts that continue it."""
        for i in rows:
            job = self._running[i]
            n = job.position
            if 0 < n <= self.prefix.budget:
                ids = (job.prompt + job.sampled)[:n]
                self.prefix.add(ids, take_row(self.config, self._batch, i, n))
        gone = set(rows)
        keep = [i for i in range(len(self._running)) if i not in gone]
        self._batch = keep_rows(self.config, self._batch, keep)
        self._running = [self._running[i] for i in keep]


def _capped(params: SamplingParams, room: int) -> SamplingParams:
    """`params` with max_tokens no more than the context's `room` after the prompt."""
    if params.max_tokens <= room:
        return params
    return SamplingParams(**{**params.__dict__, "max_tokens": max(room, 1)})


def _emit(job: Job, token: int | None, finish: str | None) -> None:
    try:
        job.emit(token, finish)
    except Exception:  # the receiving side is gone (its event loop closed): nothing to tell
        log.debug("dropped an event for a finished request", exc_info=True)
