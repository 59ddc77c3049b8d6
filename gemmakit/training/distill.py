"""The distillation stage (Gemma 2 and 3): a student learns a frozen teacher's next-token
distributions instead of the one-hot next token.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE,
the KL over the whole vocabulary, or (top_k) over the teacher's k likeliest tokens plus one
bucket holding the rest of the teacher's mass and the student's mass on those same tokens (what
Gemma's teams store to save space). The batch stream is pretraining's (token shards or the
synthetic stream); the loss is `DistillLoss`, handed to the shared loop like every stage.

Memory is bounded like the chunked cross-entropy: both models give their final hidden states,
and the logits of both are made one chunk of positions at a time, the gradient for the
student's hidden states and tied embedding taken in the same pass (losses.chunked_head_loss).
The teacher is held by the loss object, not registered in the LossModule: the optimizer, DDP/
FSDP and checkpoints never see it (each rank holds a whole copy, in the compute dtype).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import torch

from gemmakit.api import load_model
from gemmakit.errors import ConfigError, GemmakitError
from gemmakit.model.attention import soft_cap
from gemmakit.model.transformer import Gemma
from gemmakit.training import distributed
from gemmakit.training.distributed import DistEnv
from gemmakit.training.loop import BatchFn, RunResult, compute_dtype, count_positions, train
from gemmakit.training.losses import (
    FLOPS,
    IGNORE,
    auto_chunk_tokens,
    chunked_cross_entropy,
    chunked_head_loss,
)
from gemmakit.training.metrics import forward_flops
from gemmakit.training.pretrain import PretrainData
from gemmakit.training.recipe import DistillSection, Recipe, RecipeError, as_recipe


def distill(recipe: Recipe | dict | str | Path, resume: bool = False) -> RunResult:
    """Train the recipe's model (the student) on the teacher in recipe.distill over the
    recipe's token stream. Works alone or under torchrun; returns what train returns."""
    recipe = as_recipe(recipe)
    if recipe.distill is None:
        raise RecipeError("recipe: no distill section (distill.teacher names the teacher)")
    data = PretrainData(recipe)  # opens the shard folders now: a wrong path fails at once
    joined = torch.distributed.is_initialized()  # a caller's process group is left open
    env = distributed.init(recipe.training.device, recipe.distributed.backend)
    try:
        dtype = compute_dtype(recipe.training.dtype, env.device)
        teacher = load_teacher(recipe.distill, dtype, env.device)
        loss_fn = DistillLoss(teacher, recipe.distill, recipe.training.loss_chunk_tokens)

        def adapt(model: Gemma, resume_from: Path | None = None) -> None:
            loss_fn.check_student(model, recipe)
            data.use_model(model)

        evals = data.eval_batches if data.has_validation else None
        batches = functools.partial(_with_teacher_flops, data.batches, loss_fn, recipe)
        return train(recipe, loss_fn, batches, evals, resume, env, adapt_model=adapt)
    finally:
        if not joined:
            distributed.close()


def _with_teacher_flops(
    batches: BatchFn, loss_fn: DistillLoss, recipe: Recipe, env: DistEnv, start: int
) -> Iterator[dict]:
    """The token stream's micro-batches, each saying the FLOPs of the teacher's forward pass on
    it (the loop's MFU counts them; none when alpha is 0 and the teacher does not run)."""
    seq_len = recipe.training.seq_len
    for batch in batches(env, start):
        if loss_fn.alpha > 0:
            tokens, logits = count_positions(batch)
            flops = forward_flops(loss_fn.teacher.config, tokens, logits, seq_len)
            batch = {**batch, FLOPS: batch.get(FLOPS, 0.0) + flops}
        yield batch


def load_teacher(
    section: DistillSection, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Gemma:
    """The frozen teacher: weights in `dtype` (the run's compute dtype: it runs under the
    same autocast), eval mode, no gradients."""
    try:
        teacher = load_model(section.teacher, dtype=dtype, device=device)
    except GemmakitError as e:
        raise type(e)(f"distill.teacher: {e}") from None
    return teacher.eval().requires_grad_(False)


class DistillLoss:
    """loss_fn(student, batch) for the loop: alpha * KL to the teacher + (1 - alpha) * CE.

    batch: {"tokens": [B, T] int64, "targets": [B, T] int64 (IGNORE: a position without
    loss)}. Deliberately not an nn.Module, so the LossModule does not register the teacher:
    it is never optimized, sharded or saved. It follows the batch to its device.
    """

    def __init__(self, teacher: Gemma, section: DistillSection, chunk_tokens: int = 0) -> None:
        self.teacher = teacher
        self.temperature = section.temperature
        self.alpha = section.alpha
        self.top_k = section.top_k
        self.chunk_tokens = chunk_tokens  # 0: auto
        self.source = section.teacher

    def check_student(self, model: Gemma, recipe: Recipe) -> None:
        """The two models must share a vocabulary, and the teacher must see the windows."""
        s, t = model.config, self.teacher.config
        if s.vocab_size != t.vocab_size:
            raise ConfigError(
                f"distill.teacher: {self.source} has a vocabulary of {t.vocab_size} tokens "
                f"and the student ({s.name}) {s.vocab_size}: teacher and student must share "
                f"a tokenizer"
            )
        if recipe.training.seq_len > t.max_seq_len:
            raise RecipeError(
                f"recipe: training.seq_len={recipe.training.seq_len} is beyond the teacher's "
                f"context of {t.max_seq_len} tokens ({self.source})"
            )

    def __call__(self, model: Gemma, batch: dict) -> torch.Tensor:
        tokens, targets = batch["tokens"], batch["targets"]
        hidden = model(tokens, return_hidden=True)  # [B, T, D]
        cfg = model.config
        weight = model.embedder.weight
        loss = torch.zeros((), device=hidden.device)
        if self.alpha > 0:
            if self.teacher.device != tokens.device:
                self.teacher.to(tokens.device)
            with torch.no_grad():
                teacher_hidden = self.teacher(tokens, return_hidden=True)  # [B, T, Dt]
            kl = chunked_kl(
                hidden,
                teacher_hidden,
                weight,
                self.teacher.embedder.weight,
                cfg.final_logit_softcap,
                self.teacher.config.final_logit_softcap,
                temperature=self.temperature,
                top_k=self.top_k,
                mask=targets != IGNORE,
                chunk_tokens=self.chunk_tokens or kl_chunk_tokens(cfg.vocab_size),
            )
            loss = loss + self.alpha * kl
        if self.alpha < 1:
            chunk = self.chunk_tokens or auto_chunk_tokens(cfg.vocab_size)
            ce = chunked_cross_entropy(hidden, targets, weight, cfg.final_logit_softcap, chunk)
            loss = loss + (1 - self.alpha) * ce
        return loss


def kl_chunk_tokens(vocab_size: int) -> int:
    """Positions per chunk: a chunk holds about four [chunk, V] float32 buffers (both models'
    log-probabilities, the teacher's probabilities or a copy for the rest bucket, and the
    transient of a logsumexp), so a quarter of the cross-entropy's chunk."""
    return max(16, auto_chunk_tokens(vocab_size) // 4)


def chunked_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    mask: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Mean over the masked positions of T^2 * KL(teacher || student) between the softmaxes
    of logits / T, never holding more than one chunk of either model's logits.

    student_hidden [..., D] and teacher_hidden [..., Dt]: final-normed hidden states of the
    same positions; *_weight [V, D] / [V, Dt]: each model's tied embedding; *_softcap: each
    model's final-logit soft-cap (Gemma 2) or None; top_k: None for the whole vocabulary, k
    for the teacher's top k plus one bucket for the rest; mask [...] bool: positions that
    count (default all). Gradients flow to student_hidden and student_weight only; they and
    the value equal the full-logits computation's.
    """
    h = student_hidden.reshape(-1, student_hidden.shape[-1])  # [N, D]
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])  # [N, Dt]
    if h.shape[0] != ht.shape[0]:
        raise ValueError(f"student has {h.shape[0]} positions but the teacher {ht.shape[0]}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"vocabularies differ: student {student_weight.shape[0]}, "
            f"teacher {teacher_weight.shape[0]}"
        )
    if mask is None:
        mask = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    mask = mask.reshape(-1)
    teacher = _TeacherChunks(ht, teacher_weight.detach(), teacher_softcap, mask, temperature, top_k)
    total = chunked_head_loss(h, student_weight, student_softcap, chunk_tokens, teacher)
    return total / mask.sum().clamp(min=1)


class _TeacherChunks:
    """chunk_loss for chunked_head_loss: the teacher's logits for the same rows, then the KL
    of each row and its gradient wrt the student's logits."""

    def __init__(self, hidden, weight, softcap, mask, temperature, top_k) -> None:
        self.hidden, self.weight, self.softcap = hidden, weight, softcap
        self.mask, self.temperature, self.top_k = mask, temperature, top_k

    def __call__(self, student: torch.Tensor, rows: slice, want_grad: bool):
        dtype = student.dtype  # the autocast dtype, as the student's own head
        if self.weight.dtype != dtype:
            self.weight = self.weight.to(dtype)  # once per call of chunked_kl
        teacher = self.hidden[rows].to(dtype) @ self.weight.t()  # [C, V]
        if self.softcap is not None:
            teacher = soft_cap(teacher, self.softcap)
        kl, grad = kl_rows(student, teacher, self.temperature, self.top_k, want_grad)
        keep = self.mask[rows]
        if grad is not None and not bool(keep.all()):
            grad.mul_(keep[:, None])
        return torch.where(keep, kl, 0.0).sum(), grad


def kl_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    want_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """student, teacher logits [C, V] -> (T^2 * KL(p || q) per row [C], with p and q the
    softmaxes of teacher / T and student / T; with want_grad its gradient wrt the student's
    logits [C, V], else None). Computed in float32 (or float64 for float64 logits); both
    logits tensors may be overwritten.

    With top_k the distributions are over k + 1 outcomes: the teacher's k likeliest tokens and
    one bucket for all others, p_rest = 1 - sum of p over the top k (likewise q_rest). The
    gradient is then T * (q - p~), p~ being p on the top k and q * p_rest / q_rest elsewhere:
    the teacher's remaining mass spread as the student spreads its own.
    """
    acc = torch.promote_types(student.dtype, torch.float32)
    log_q = _log_softmax_(student.detach().to(acc), temperature)
    log_p = _log_softmax_(teacher.detach().to(acc), temperature)
    t2 = temperature * temperature
    if top_k is None or top_k >= log_p.shape[-1]:
        p = log_p.exp()
        kl = log_p.sub_(log_q).mul_(p).sum(-1)  # in place: no more [C, V] buffers
        if not want_grad:
            return t2 * kl, None
        grad = log_q.exp_().sub_(p)  # q - p
        return t2 * kl, grad.mul_(temperature)
    top = log_p.topk(top_k, dim=-1).indices  # [C, k]
    lp_top, lq_top = log_p.gather(1, top), log_q.gather(1, top)
    # the rest buckets; in place, so both hold -inf on the top k from here on
    lp_rest = log_p.scatter_(1, top, -torch.inf).logsumexp(-1)  # [C]
    lq_rest = log_q.scatter_(1, top, -torch.inf).logsumexp(-1)
    del log_p
    kl = (lp_top.exp() * (lp_top - lq_top)).sum(-1) + lp_rest.exp() * (lp_rest - lq_rest)
    if not want_grad:
        return t2 * kl, None
    grad = log_q.exp()  # q off the top k, 0 on it
    # q_v * p_rest / q_rest off the top k, in log space (no factor overflows)
    spread = log_q.add_((lp_rest - lq_rest)[:, None]).exp_()
    grad.sub_(spread).scatter_(1, top, lq_top.exp() - lp_top.exp())
    return t2 * kl, grad.mul_(temperature)


def _log_softmax_(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) over the last dim, in place."""
    if temperature != 1.0:
        logits.div_(temperature)
    return logits.sub_(logits.logsumexp(-1, keepdim=True))
