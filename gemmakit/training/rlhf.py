"""RLHF with RLOO (REINFORCE, leave-one-out baseline) on the shared loop: a batch stream that
samples k answers per prompt from the current policy and scores them, and a loss.

For answers y_1..y_k to a prompt x, sampled from the policy pi:

    R_i = reward(x, y_i) - beta * (log pi(y_i|x) - log pi_ref(y_i|x))     (sequence level)
    A_i = R_i - mean_{j != i} R_j                                           (no critic)
    loss = -mean_i A_i * sum_t log pi(y_i,t | x, y_i,<t)                    (A_i detached)

pi_ref is the starting model: with LoRA the same weights with the adapters switched off (no
second copy), without LoRA a frozen copy. Log-probabilities are taken at the sampling
temperature, so they are those of the distribution the answers came from (before top-k/top-p).

    recipe.data.train       JSONL files of prompts (`read_prompts`)
    recipe.data.tokenizer   the vocabulary (default: the model checkpoint's own)
    recipe.rlhf             reward model, k, beta, max_new_tokens, temperature, top_p, top_k
    recipe.lora             null: every weight trains; else adapters, base frozen

The batch stream samples global micro-batch g (micro-step s of rank r in a world of w: g =
s * w + r, the index its prompts come from) with a torch.Generator seeded from (seed, g),
using the weights of that moment (on-policy): a resumed run, which restores the weights,
samples the same answers as the uninterrupted one, and any split of a step over ranks and
micro-batches of the same size samples the same answers as one process. Each step logs the
mean reward, the KL to the reference, the policy's entropy, the answer length and the share
of answers cut at max_new_tokens.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from gemmakit.chat import encode_chat
from gemmakit.config import TokenIds
from gemmakit.errors import DataError
from gemmakit.model.lora import adapters_disabled
from gemmakit.model.reward import RewardModel, load_reward_model
from gemmakit.model.transformer import Gemma
from gemmakit.tokenizer import load_tokenizer
from gemmakit.training import distributed
from gemmakit.training.conversations import jsonl_rows
from gemmakit.training.distributed import DistEnv
from gemmakit.training.loop import (
    RunResult,
    build_model_for,
    compute_dtype,
    count_positions,
    train,
)
from gemmakit.training.losses import FLOPS, IGNORE, auto_chunk_tokens
from gemmakit.training.metrics import forward_flops
from gemmakit.training.recipe import Recipe, RecipeError, as_recipe
from gemmakit.training.rollouts import Rollouts, sample_answers
from gemmakit.training.sft import base_config, prepare_lora, tokenizer_file


class RewardFn(Protocol):
    """What scores the answers: a reward model, or a program (tests, verifiable rewards)."""

    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        """One score per sequence (prompt ids + answer ids, BOS first): [N] float."""
        ...


# --- the math ------------------------------------------------------------------------------


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """rewards [P * k] (k answers per prompt, consecutive) -> R_i - mean of the other k - 1."""
    r = rewards.reshape(-1, k)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    return (r - baseline).reshape(-1)


def token_logprobs(
    model: Gemma, tokens: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(target) [B, T], 0 where targets is IGNORE; entropy [B, T], detached) of
    softmax(logits / temperature), for tokens/targets [B, T].

    Logits exist only for positions with a target, one chunk at a time, and are recomputed
    in backward (checkpointed), so memory stays at one [chunk, V] block at a 256k vocabulary.
    """
    hidden = model(tokens, return_hidden=True)  # [B, T, D]
    where = targets != IGNORE
    h, t = hidden[where], targets[where]  # [N, D], [N]
    logp, ent = [], []
    for i in range(0, len(t), chunk):
        args = (model, h[i : i + chunk], t[i : i + chunk], temperature)
        if torch.is_grad_enabled():
            lp, e = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, e = _chunk_logprobs(*args)
        logp.append(lp)
        ent.append(e)
    out = hidden.new_zeros(targets.shape, dtype=torch.float32)
    entropy = torch.zeros_like(out)
    if logp:
        out = out.index_put((where,), torch.cat(logp))  # differentiable scatter
        entropy[where] = torch.cat(ent)
    return out, entropy


def _chunk_logprobs(model: Gemma, h: torch.Tensor, t: torch.Tensor, temperature: float):
    logp = torch.log_softmax(model.logits(h).float() / temperature, dim=-1)  # [C, V]
    entropy = -(logp.exp() * logp).sum(-1).detach()
    return logp.gather(-1, t[:, None])[:, 0], entropy


def rloo_loss(
    model: Gemma,
    batch: dict,
    k: int,
    beta: float,
    temperature: float = 1.0,
    chunk_tokens: int = 0,
) -> dict[str, torch.Tensor]:
    """The RLOO loss of one micro-batch of answers (k per prompt, consecutive), with what the
    loop logs beside it.

    batch: {"tokens": [B, T] prompt + answer ids (right-padded), "targets": [B, T] the next
    id on answer tokens and IGNORE elsewhere, "scores": [B] reward model scores, "ref_logp":
    [B] log pi_ref of each answer, "truncated": [B] 1.0 where the answer hit the length
    limit}. Returns {"loss", "reward": mean score, "kl": mean log pi - log pi_ref of an answer,
    "entropy": mean per answer token, "answer_len": mean tokens, "truncated": share}.
    """
    chunk = chunk_tokens or auto_chunk_tokens(model.config.vocab_size)
    tok_logp, entropy = token_logprobs(model, batch["tokens"], batch["targets"], temperature, chunk)
    logp = tok_logp.sum(dim=1)  # [B] log pi(y_i | x)
    kl = logp.detach() - batch["ref_logp"]
    advantages = rloo_advantages(batch["scores"] - beta * kl, k)
    lengths = (batch["targets"] != IGNORE).sum(dim=1).float()  # [B] answer tokens
    return {
        "loss": -(advantages * logp).mean(),
        "reward": batch["scores"].mean(),
        "kl": kl.mean(),
        "entropy": entropy.sum() / lengths.sum().clamp(min=1),
        "answer_len": lengths.mean(),
        "truncated": batch["truncated"].float().mean(),
    }


# --- prompts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    messages: list[dict]  # ends with a user turn
    where: str  # "file:line", for errors


def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a JSONL file: rows {"prompt": str | messages} (other fields, such as a
    preference file's "chosen"/"rejected", are ignored) or {"messages": [...]} whose trailing
    assistant message, if any, is dropped. A bad row is a DataError naming file and line."""
    rows = jsonl_rows(path, "prompts")
    return [Prompt(_prompt_messages(row, where), where) for row, where in rows]


def _prompt_messages(row: object, where: str) -> list[dict]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "prompt" in row:
        value = row["prompt"]
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if isinstance(value, list):
            return value
        raise DataError(f"{where}: field 'prompt' must be a string or a list of messages")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty list of messages")
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") in ("assistant", "model"):
            messages = messages[:-1]
        return messages
    raise DataError(
        f"{where}: expected field 'prompt' or 'messages' (found: "
        f"{', '.join(map(repr, row)) or 'none'})"
    )


def encode_prompts(
    prompts: Sequence[Prompt], tokenizer, token_ids: TokenIds, max_len: int, vocab_size: int
) -> tuple[list[list[int]], int]:
    """(ids of each prompt that fits in max_len tokens, ending with the generation prompt
    <start_of_turn>model\\n; how many were longer and left out)."""
    out, dropped = [], 0
    for p in prompts:
        try:
            ids = encode_chat(
                tokenizer, p.messages, add_generation_prompt=True, token_ids=token_ids
            ).ids
        except DataError as e:
            raise DataError(f"{p.where}: {e}") from None
        if max(ids) >= vocab_size:
            raise DataError(
                f"{p.where}: token id {max(ids)} is outside the model's vocabulary of "
                f"{vocab_size} (does the tokenizer match the model?)"
            )
        if len(ids) > max_len:
            dropped += 1
            continue
        out.append(ids)
    return out, dropped


# --- the stage -------------------------------------------------------------------------------


class RLHFStage:
    """The batch stream and the loss of an RLOO run, sharing the model the loop trains
    (learned through adapt_model)."""

    def __init__(self, recipe: Recipe, prompts: list[list[int]], reward: RewardFn) -> None:
        h, t = recipe.rlhf, recipe.training
        if t.micro_batch_size % h.k:
            raise RecipeError(
                f"recipe: training.micro_batch_size={t.micro_batch_size} must be a multiple of "
                f"rlhf.k={h.k} (it counts answers: prompts x k)"
            )
        if not prompts:
            raise DataError("rlhf: no prompt fits training.seq_len - rlhf.max_new_tokens")
        self.recipe, self.prompts, self.reward = recipe, prompts, reward
        self.model: Gemma | None = None
        self.reference: Gemma | None = None  # a frozen copy, without LoRA

    # -- set-up, called by the loop on the model it builds
    def adapt(self, model: Gemma, resume_from: Path | None) -> None:
        r = self.recipe
        if r.lora is not None:
            prepare_lora(r.lora, model, resume_from)
        elif model.device.type != "meta":
            # The starting model: this one on a fresh run, rebuilt from the recipe on resume.
            ref = copy.deepcopy(model) if resume_from is None else build_model_for(r, None)
            self.reference = ref.requires_grad_(False).eval()
        self.model = model  # on every rank; under FSDP the shell is built last

    def loss(self, model: Gemma, batch: dict) -> dict[str, torch.Tensor]:
        h = self.recipe.rlhf
        chunk = self.recipe.training.loss_chunk_tokens
        return rloo_loss(model, batch, h.k, h.beta, h.temperature, chunk)

    # -- the batch stream
    def make_batches(self, env: DistEnv, start: int) -> Iterator[dict]:
        """This rank's micro-batches from micro-step `start` on; each is sampled when asked
        for, with the weights the policy has then."""
        t, k = self.recipe.training, self.recipe.rlhf.k
        per_rank = t.micro_batch_size // k  # prompts per micro-batch on this rank
        step = start
        while True:
            g = step * env.world_size + env.rank  # global micro-batch: the same in any split
            prompts = [self.prompts[i] for i in self._order(g * per_rank, per_rank)]
            yield self.rollout_batch(prompts, self._generator(g))
            step += 1

    def _order(self, first: int, n: int) -> list[int]:
        """Prompt indices first..first+n-1 of the stream: epoch after epoch, each a seeded
        permutation (a function of the seed and the epoch alone)."""
        out, N = [], len(self.prompts)
        for g in range(first, first + n):
            epoch = g // N
            perm = _permutation(self.recipe.training.seed, epoch, N)
            out.append(int(perm[g % N]))
        return out

    def _generator(self, micro_batch: int) -> torch.Generator:
        seed = np.random.SeedSequence([self.recipe.training.seed, 3, micro_batch])
        return torch.Generator(device=self._device()).manual_seed(int(seed.generate_state(1)[0]))

    def _device(self) -> torch.device:
        return self.model.device

    def rollout_batch(self, prompts: list[list[int]], generator: torch.Generator) -> dict:
        """Sample k answers to each prompt with the current policy, score them, and take the
        reference's log-probabilities: the loss's batch (see `rloo_loss`)."""
        h = self.recipe.rlhf
        model = self.model
        was_training = model.training
        model.eval()  # no adapter dropout while sampling
        try:
            with torch.no_grad(), self._autocast():
                rollouts = sample_answers(
                    model,
                    prompts,
                    h.k,
                    h.max_new_tokens,
                    h.temperature,
                    h.top_k,
                    h.top_p,
                    generator=generator,
                )
                batch = _as_batch(rollouts, model.config.tokens.pad, model.device)
                with self._reference() as ref:
                    ref_logp, _ = token_logprobs(
                        ref, batch["tokens"], batch["targets"], h.temperature, self._chunk()
                    )
                batch["ref_logp"] = ref_logp.sum(dim=1)
                sequences = rollouts.sequences()
                scores = self.reward.score_ids(sequences)
                batch[FLOPS] = self.rollout_flops(rollouts, batch, sequences)
        finally:
            model.train(was_training)
        batch["scores"] = torch.as_tensor(scores, dtype=torch.float32).reshape(-1).to(model.device)
        batch["truncated"] = torch.tensor(rollouts.truncated, device=model.device)
        return batch

    def rollout_flops(self, rollouts: Rollouts, batch: dict, sequences: list[list[int]]) -> float:
        """Model FLOPs of making the batch (the loop's MFU counts them with the loss's): the
        prompts' prefill (one logit each), every answer token but the last fed back to the
        policy, the reference's pass over the batch, and the reward's on the scored
        `sequences`, when it says (a `flops(sequences)` method; a program scoring answers has
        none)."""
        cfg, seq_len = self.model.config, batch["tokens"].shape[1]
        fed = sum(max(len(a) - 1, 0) for a in rollouts.answers)
        prompt_tokens = sum(len(p) for p in rollouts.prompts)
        flops = forward_flops(cfg, prompt_tokens + fed, len(rollouts.prompts) + fed, seq_len)
        tokens, logits = count_positions(batch)
        flops += forward_flops(cfg, tokens, logits, seq_len)
        reward_flops = getattr(self.reward, "flops", None)
        return flops + (reward_flops(sequences) if reward_flops else 0.0)

    @contextlib.contextmanager
    def _reference(self) -> Iterator[Gemma]:
        if self.reference is None:  # LoRA: the base is the reference
            with adapters_disabled(self.model):
                yield self.model
            return
        self.reference.to(self.model.device)
        yield self.reference

    def _autocast(self):
        device = self.model.device
        dtype = compute_dtype(self.recipe.training.dtype, device)
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def _chunk(self) -> int:
        t = self.recipe.training
        return t.loss_chunk_tokens or auto_chunk_tokens(self.model.config.vocab_size)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 2, epoch]).permutation(n)


def _as_batch(rollouts: Rollouts, pad: int, device: torch.device) -> dict:
    """tokens [B, T] = prompt + answer, right-padded; targets [B, T] the next id where it is
    an answer token, else IGNORE; lengths [B] the tokens of each row."""
    seqs = rollouts.sequences()
    T = max(len(s) for s in seqs) - 1
    tokens = torch.full((len(seqs), T), pad, dtype=torch.long)
    targets = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for i, s in enumerate(seqs):
        p = len(rollouts.prompts[i // rollouts.k])
        s = torch.as_tensor(s, dtype=torch.long)
        tokens[i, : len(s) - 1] = s[:-1]
        targets[i, p - 1 : len(s) - 1] = s[p:]
    lengths = torch.tensor([len(s) - 1 for s in seqs])
    return {"tokens": tokens.to(device), "targets": targets.to(device), "lengths": lengths}


# --- the run ---------------------------------------------------------------------------------


class ChatReward:
    """A reward model scoring sampled answers as it was trained on them: an answer that ended
    its turn gets the "\n" that `encode_chat` puts after <end_of_turn>, so the score is read
    at the same token as in the preference pairs."""

    def __init__(self, model: RewardModel, newline: list[int], batch_size: int = 8) -> None:
        self.model, self.newline, self.batch_size = model, newline, batch_size
        self.end_of_turn = model.config.tokens.end_of_turn

    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        return self.model.score_ids(self._closed(sequences), self.batch_size)

    def flops(self, sequences: list[list[int]]) -> float:
        """Model FLOPs of scoring the sequences (the reward model's forward over their tokens;
        its one-row score head is left out)."""
        closed = self._closed(sequences)
        longest = max((len(s) for s in closed), default=0)
        return forward_flops(self.model.config, sum(map(len, closed)), 0, longest)

    def _closed(self, sequences: list[list[int]]) -> list[list[int]]:
        return [s + self.newline if s[-1] == self.end_of_turn else s for s in sequences]


def load_reward(recipe: Recipe, tokenizer, device: torch.device) -> ChatReward:
    """The reward model named by rlhf.reward_model (a `gemmakit reward` checkpoint), frozen,
    on `device`; it must share the policy's vocabulary."""
    path = recipe.rlhf.reward_model
    if not path:
        raise RecipeError("recipe: set rlhf.reward_model (a folder written by gemmakit reward)")
    rm = load_reward_model(path, dtype=torch.float32, device=device).requires_grad_(False)
    newline = tokenizer.encode("\n", bos=False, special=False)
    return ChatReward(rm, newline, recipe.training.micro_batch_size)


def rlhf(
    recipe: Recipe | dict | str | Path, resume: bool = False, reward: RewardFn | None = None
) -> RunResult:
    """Improve the policy with RLOO as the recipe says (a Recipe, a nested dict or a YAML
    path). `reward` replaces rlhf.reward_model (a program scoring the answers). Returns the
    loop's RunResult; metrics.jsonl holds each step's reward, kl, entropy, answer_len and
    truncated."""
    recipe = copy.deepcopy(as_recipe(recipe))
    h, t = recipe.rlhf, recipe.training
    config = base_config(recipe)
    tok_path = tokenizer_file(recipe)
    recipe.data.tokenizer = str(tok_path)  # copied into every checkpoint
    if h.max_new_tokens >= t.seq_len:
        raise RecipeError(
            f"recipe: rlhf.max_new_tokens={h.max_new_tokens} leaves no room for a prompt in "
            f"training.seq_len={t.seq_len}"
        )
    prompts = [p for f in recipe.data.train for p in read_prompts(f)]
    tokenizer = load_tokenizer(tok_path)
    ids, dropped = encode_prompts(
        prompts,
        tokenizer,
        config.tokens,
        t.seq_len - h.max_new_tokens,
        config.vocab_size,
    )
    joined = torch.distributed.is_initialized()  # a caller's process group is left open
    env = distributed.init(t.device, recipe.distributed.backend)
    try:
        if env.distributed and recipe.distributed.mode == "fsdp":
            raise RecipeError("recipe: rlhf samples with the whole model: distributed.mode=ddp")
        if reward is None:
            reward = load_reward(recipe, tokenizer, env.device)
        stage = RLHFStage(recipe, ids, reward)
        if env.is_main:
            print(
                f"rlhf data: {len(ids)} prompts ({dropped} longer than "
                f"{t.seq_len - h.max_new_tokens} tokens left out), k={h.k} answers each, "
                f"{t.batch_size // h.k} prompts per step",
                flush=True,
            )
        return train(
            recipe,
            stage.loss,
            stage.make_batches,
            None,
            resume,
            env,
            adapt_model=stage.adapt,
        )
    finally:
        if not joined:
            distributed.close()
