"""Direct preference optimization (Rafailov et al. 2023): the shared loop with the DPO loss.

  loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

with each log-probability summed over the answer's tokens only (its model turn, not the
prompt). The reference is the starting model, frozen: its log-probabilities of every pair are
computed once before training, kept in memory and in RUN/reference_logps.pt (a resume reads
them, never recomputes them). With LoRA the starting model is the base with its adapters off,
so the reference needs no second copy of the model. Logged: loss, the implicit rewards
beta * (log pi - log ref) of chosen and rejected answers, their margin and the accuracy
(margin > 0), on training and held-out pairs.

    recipe.data.train / valid / tokenizer    as for `gemmakit reward` (preference JSONL files)
    recipe.dpo.beta                          the implicit reward's scale
"""

from __future__ import annotations

import copy
import functools
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gemmakit.atomic import atomic_path
from gemmakit.model.transformer import Gemma
from gemmakit.tokenizer import load_tokenizer
from gemmakit.training import distributed
from gemmakit.training.loop import RunResult, build_model_for, compute_dtype, train
from gemmakit.training.losses import IGNORE, auto_chunk_tokens
from gemmakit.training.preferences import PreferenceData, collate_pairs
from gemmakit.training.recipe import Recipe, as_recipe
from gemmakit.training.sft import base_config, prepare_lora, tokenizer_file

REFERENCE_FILE = "reference_logps.pt"


def _chunk_logps(h, t, weight, softcap):
    logits = (h @ weight.t()).float()  # [C, V]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(1, t[:, None])[:, 0] - logits.logsumexp(-1)


def sequence_logps(
    model: Gemma, tokens: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 0
) -> torch.Tensor:
    """Summed log-probabilities [B] float32 of each row's targets (IGNORE: not counted):
    tokens, targets [B, T]. The logits exist one chunk of positions at a time, forward and
    backward (each chunk is recomputed in backward rather than kept), as in the chunked
    cross-entropy: never [B, T, V] at once."""
    hidden = model(tokens, return_hidden=True)  # [B, T, D]
    cfg = model.config
    chunk = chunk_tokens or auto_chunk_tokens(cfg.vocab_size)
    valid = targets != IGNORE
    rows = torch.arange(len(tokens), device=tokens.device)[:, None].expand_as(targets)[valid]
    h, t = hidden[valid], targets[valid]  # [N, D], [N]: answer positions only
    w, cap = model.embedder.weight, cfg.final_logit_softcap
    parts = [
        checkpoint(_chunk_logps, h[i : i + chunk], t[i : i + chunk], w, cap, use_reentrant=False)
        for i in range(0, len(t), chunk)
    ]
    per_token = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(len(tokens), dtype=torch.float32, device=tokens.device)
    return out.index_add(0, rows, per_token)


def dpo_loss(model: Gemma, batch: dict, beta: float, chunk_tokens: int = 0) -> dict:
    """The DPO loss of a batch from `collate_pairs` (m chosen rows, then m rejected) with
    "ref_logps" [2m]: {"loss", "chosen_reward", "rejected_reward", "margin", "accuracy"}."""
    logps = sequence_logps(model, batch["tokens"], batch["targets"], chunk_tokens)
    rewards = beta * (logps - batch["ref_logps"].float())  # [2m]
    m = len(rewards) // 2
    chosen, rejected = rewards[:m], rewards[m:]
    diff = chosen - rejected
    return {
        "loss": -F.logsigmoid(diff).mean(),
        "chosen_reward": chosen.detach().mean(),
        "rejected_reward": rejected.detach().mean(),
        "margin": diff.detach().mean(),
        "accuracy": (diff > 0).float().mean(),
    }


def _fingerprint(recipe: Recipe, data: PreferenceData) -> str:
    """What the reference log-probabilities depend on: the starting model and the pairs."""
    h = hashlib.sha256()
    m = recipe.model
    h.update(repr((m.preset, m.checkpoint, sorted(m.config_overrides.items()))).encode())
    h.update(repr((recipe.training.seed, recipe.training.dtype, m.init_std)).encode())
    for pair in [*data.train, *data.valid]:
        for side in (pair.chosen, pair.rejected):
            h.update(side.ids.tobytes())
            h.update(side.response.tobytes())
    return h.hexdigest()


@torch.no_grad()
def reference_logps(recipe: Recipe, data: PreferenceData, device: torch.device) -> dict:
    """{"train": [N, 2], "valid": [M, 2]} float32 (chosen, rejected) log-probabilities under
    the starting model, in the training compute dtype, batch by batch."""
    model = build_model_for(recipe, None).to(device).eval()
    dtype = compute_dtype(recipe.training.dtype, device)
    m, chunk = recipe.training.micro_batch_size, recipe.training.loss_chunk_tokens
    out = {}
    for split, pairs in (("train", data.train), ("valid", data.valid)):
        parts = []
        for i in range(0, len(pairs), m):
            batch = collate_pairs(pairs[i : i + m], data.pad_id)
            tokens, targets = batch["tokens"].to(device), batch["targets"].to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logps = sequence_logps(model, tokens, targets, chunk).cpu()
            parts.append(logps.view(2, -1).t())  # [m, 2]
        out[split] = torch.cat(parts) if parts else torch.zeros(0, 2)
    return out


def cached_reference(recipe: Recipe, data: PreferenceData, env) -> dict:
    """The reference log-probabilities from RUN/reference_logps.pt when it is for this model
    and these pairs, else computed (on rank 0) and written there; every rank gets them."""
    path = Path(recipe.run_dir) / REFERENCE_FILE
    key = _fingerprint(recipe, data)
    if env.is_main:
        cached = torch.load(path, weights_only=True) if path.is_file() else None
        if cached is None or cached.get("fingerprint") != key:
            cached = {"fingerprint": key, **reference_logps(recipe, data, env.device)}
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(cached, tmp)
            print(f"dpo: reference log-probabilities computed, cached in {path}", flush=True)
    distributed.barrier(env)
    return torch.load(path, weights_only=True)


def dpo(recipe: Recipe | dict | str | Path, resume: bool = False) -> RunResult:
    """Optimize the policy on preference pairs as the recipe says (a Recipe, a nested dict or
    a YAML path); works alone or under torchrun. Returns the loop's RunResult; its
    checkpoints are the policy's, as SFT's are (a full model, or with LoRA the adapter)."""
    recipe = copy.deepcopy(as_recipe(recipe))
    config = base_config(recipe)
    tok_path = tokenizer_file(recipe)
    recipe.data.tokenizer = str(tok_path)  # copied into every checkpoint
    data = PreferenceData(recipe, load_tokenizer(tok_path), config, recipe.dpo.valid_fraction)
    joined = torch.distributed.is_initialized()  # a caller's process group is left open
    env = distributed.init(recipe.training.device, recipe.distributed.backend)
    try:
        if env.is_main:
            print(data.summary("dpo"), flush=True)
        ref = cached_reference(recipe, data, env)

        def extra(indices: list[int], split: str) -> dict:
            rows = ref[split][indices]  # [m, 2]
            return {"ref_logps": torch.cat([rows[:, 0], rows[:, 1]])}

        data.extra = extra
        prepare = functools.partial(prepare_lora, recipe.lora) if recipe.lora else None
        loss_fn = functools.partial(
            dpo_loss, beta=recipe.dpo.beta, chunk_tokens=recipe.training.loss_chunk_tokens
        )
        make_eval = data.make_eval_batches if data.valid else None
        return train(
            recipe, loss_fn, data.make_batches, make_eval, resume, env, adapt_model=prepare
        )
    finally:
        if not joined:
            distributed.close()
