"""Distillation: the chunked KL equals the full-logits one (value and gradients; whole
vocabulary or top-k plus a rest bucket; soft-cap, temperature, masked positions), is zero for a
student equal to its teacher and keeps no logits for backward; a small student trained on a
pretrained teacher brings its held-out KL down; a killed run resumes exactly; the teacher never
enters a checkpoint; teacher and student must share a vocabulary."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import (
    CONSTANT_LR,
    ROOT,
    SMALL,
    kill_after_checkpoint,
    losses,
    tiny_recipe,
    write_recipe,
)

from gemmakit import load_model
from gemmakit.api import build_model
from gemmakit.cli import main as cli_main
from gemmakit.config import get_config
from gemmakit.errors import ConfigError, MissingFileError
from gemmakit.model.attention import soft_cap
from gemmakit.training import state
from gemmakit.training.distill import DistillLoss, chunked_kl, distill, kl_rows, load_teacher
from gemmakit.training.distributed import DistEnv
from gemmakit.training.loop import build_model_for
from gemmakit.training.pretrain import PretrainData, pretrain
from gemmakit.training.recipe import DistillSection, RecipeError, as_recipe

# --- the chunked KL against the full logits -------------------------------------------------


def naive_kl(hs, ws, ht, wt, cap_s, cap_t, temperature, top_k, mask):
    """T^2 * KL(teacher || student) from whole [N, V] logits, by autograd."""
    zs, zt = hs @ ws.T, ht @ wt.T
    if cap_s:
        zs = soft_cap(zs, cap_s)
    if cap_t:
        zt = soft_cap(zt, cap_t)
    lq = torch.log_softmax(zs / temperature, -1)
    lp = torch.log_softmax(zt / temperature, -1)
    if top_k is not None:  # k + 1 outcomes: the teacher's top k, then the rest
        top = lp.topk(top_k, -1).indices
        rest = torch.zeros_like(lp, dtype=torch.bool).scatter(1, top, True)
        lp = torch.cat([lp.gather(1, top), lp.masked_fill(rest, -torch.inf).logsumexp(-1, True)], 1)
        lq = torch.cat([lq.gather(1, top), lq.masked_fill(rest, -torch.inf).logsumexp(-1, True)], 1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return temperature**2 * (kl * mask).sum() / mask.sum()


CASES = [
    # (student soft-cap, teacher soft-cap, temperature, top_k)
    (None, None, 1.0, None),
    (None, None, 1.0, 5),
    (30.0, 3.0, 2.0, None),  # Gemma 2's final-logit soft-cap, tight enough to bite
    (4.0, None, 0.5, 8),
    (None, 5.0, 1.0, 49),  # a rest bucket of one token
]


@pytest.mark.parametrize("cap_s, cap_t, temperature, top_k", CASES)
def test_chunked_kl_equals_full_logits(cap_s, cap_t, temperature, top_k):
    g = torch.Generator().manual_seed(0)
    n, d, dt, v = 37, 8, 12, 50  # a teacher wider than its student; chunks of 8 leave 5
    f64 = dict(dtype=torch.float64, generator=g)
    hs = (torch.randn(n, d, **f64)).requires_grad_()
    ws = (torch.randn(v, d, **f64)).requires_grad_()
    ht, wt = torch.randn(n, dt, **f64), torch.randn(v, dt, **f64)
    mask = torch.rand(n, generator=g) > 0.2
    want = naive_kl(hs, ws, ht, wt, cap_s, cap_t, temperature, top_k, mask)
    want_grads = torch.autograd.grad(want, [hs, ws])
    got = chunked_kl(
        hs,
        ht,
        ws,
        wt,
        cap_s,
        cap_t,
        temperature=temperature,
        top_k=top_k,
        mask=mask,
        chunk_tokens=8,
    )
    grads = torch.autograd.grad(got, [hs, ws])
    assert want.item() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert hs.grad is None  # nothing accumulated by the chunked pass itself


def test_chunked_kl_float32_on_models():
    """Two models of different widths, a Gemma 2 soft-cap on the teacher: float32 within
    float32 rounding of the float64 full-logits KL."""
    student = build_model(get_config("tiny").replace(**SMALL), dtype=torch.float32, seed=1)
    teacher_cfg = get_config("tiny-gemma2").replace(vocab_size=256, d_model=96)
    teacher = build_model(teacher_cfg, dtype=torch.float32, seed=2, init_std=0.2)
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        hs = student(tokens, return_hidden=True).requires_grad_()
        ht = teacher(tokens, return_hidden=True)
    ws, wt = student.embedder.weight, teacher.embedder.weight
    mask = torch.ones(2, 24, dtype=torch.bool)
    got = chunked_kl(hs, ht, ws, wt, None, teacher_cfg.final_logit_softcap, chunk_tokens=10)
    g_hs, g_ws = torch.autograd.grad(got, [hs, ws])
    hs64 = hs.detach().double().flatten(0, 1).requires_grad_()
    ws64 = ws.detach().double().requires_grad_()
    want = naive_kl(
        hs64,
        ws64,
        ht.double().flatten(0, 1),
        wt.double(),
        None,
        teacher_cfg.final_logit_softcap,
        1.0,
        None,
        mask.flatten(),
    )
    w_hs, w_ws = torch.autograd.grad(want, [hs64, ws64])
    assert want.item() > 0.5
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_hs.double().flatten(0, 1), w_hs, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_ws.double(), w_ws, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("top_k", [None, 4])
def test_kl_of_a_model_to_itself_is_zero(top_k):
    model = build_model(get_config("tiny").replace(**SMALL), dtype=torch.float32, seed=3)
    tokens = torch.randint(0, 256, (2, 16))
    batch = {"tokens": tokens, "targets": tokens.roll(-1, 1)}
    section = DistillSection(teacher="unused", temperature=2.0, top_k=top_k)
    teacher = build_model(model.config, dtype=torch.float32, seed=3).requires_grad_(False)
    loss = DistillLoss(teacher, section)(model, batch)
    loss.backward()
    assert abs(loss.item()) < 1e-5
    assert model.embedder.weight.grad.abs().max() < 1e-5
    # and a different teacher is not at zero
    other = build_model(model.config, dtype=torch.float32, seed=4, init_std=0.2)
    assert DistillLoss(other, section)(model, batch).item() > 0.1


def test_kl_rows_top_k_bucket_by_hand():
    """Three tokens, top 1: the buckets are {a} and {b, c}."""
    student = torch.tensor([[0.0, 0.0, 0.0]])  # q = 1/3 each
    teacher = torch.tensor([[2.0, 1.0, 0.0]]).log()  # p = 2/3, 1/6, 1/6 (softmax of logs)
    teacher = teacher - teacher.logsumexp(-1, keepdim=True)
    kl, grad = kl_rows(student.clone(), teacher, top_k=1, want_grad=True)
    p, q = torch.tensor([2 / 3, 1 / 3]), torch.tensor([1 / 3, 2 / 3])
    torch.testing.assert_close(kl, (p * (p / q).log()).sum()[None])
    # q - p on the top token; q_v * (1 - p_rest / q_rest) on the others
    torch.testing.assert_close(grad, torch.tensor([[1 / 3 - 2 / 3, 1 / 6, 1 / 6]]))


def test_chunked_kl_keeps_no_logits_for_backward():
    hs = torch.randn(64, 16, requires_grad=True)
    ws = torch.randn(300, 16, requires_grad=True)
    loss = chunked_kl(hs, torch.randn(64, 24), ws, torch.randn(300, 24), chunk_tokens=16)
    node = loss.grad_fn
    while "ChunkedHeadLoss" not in type(node).__name__:
        node = node.next_functions[0][0]
    assert {tuple(t.shape) for t in node.saved_tensors} == {(64, 16), (300, 16)}


# --- runs --------------------------------------------------------------------------------

SEQ = {"seq_len": 32, "batch_size": 8, "micro_batch_size": 8, "loss_chunk_tokens": 0}
STUDENT = {  # a smaller model than the teacher (SMALL), on the same vocabulary
    "vocab_size": 256,
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 1,
    "head_dim": 16,
    "ffn_dim": 64,
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A SMALL model pretrained on the synthetic stream: it knows the counting rule."""
    run = tmp_path_factory.mktemp("teacher")
    recipe = tiny_recipe(
        run,
        training={**SEQ, "steps": 40},
        eval={"interval": 0},
        checkpoint={"interval": 0, "keep": 1},
    )
    return pretrain(recipe).checkpoint


def student_recipe(run_dir, teacher_dir, steps=40, **sections) -> dict:
    return tiny_recipe(
        run_dir,
        model={"config_overrides": STUDENT},
        training={**SEQ, "steps": steps, "seed": 1, **sections.pop("training", {})},
        eval={"interval": 0, "batches": 4},
        checkpoint={"interval": 0, "keep": 1, **sections.pop("checkpoint", {})},
        distill={"teacher": str(teacher_dir), **sections.pop("distill", {})},
        **sections,
    )


def held_out_kl(recipe: dict, model) -> float:
    """Mean KL to the teacher over the recipe's validation batches."""
    r = as_recipe(recipe)
    data = PretrainData(r)
    data.use_model(model)
    loss_fn = DistillLoss(load_teacher(r.distill, torch.float32), r.distill)
    with torch.no_grad():
        values = [
            loss_fn(model, b).item()
            for b in data.eval_batches(DistEnv(0, 1, 0, torch.device("cpu")))
        ]
    return sum(values) / len(values)


@pytest.mark.parametrize("top_k", [None, 8])
def test_distillation_brings_the_students_kl_down(tmp_path, teacher, top_k):
    recipe = student_recipe(tmp_path / "student", teacher, distill={"top_k": top_k})
    before = held_out_kl(recipe, build_model_for(as_recipe(recipe), None))
    result = distill(recipe)
    after = held_out_kl(recipe, load_model(result.checkpoint))
    assert result.steps == 40
    assert after < 0.3 * before, (before, after)
    # the student it reads back is the student, not the teacher
    assert load_model(result.checkpoint).config.d_model == STUDENT["d_model"]


def test_alpha_mixes_in_the_cross_entropy(tmp_path, teacher):
    """alpha 0 is pretraining (the same losses); alpha 0.5 lies between."""
    common = dict(training={"steps": 3}, optimizer=CONSTANT_LR)
    ce = pretrain(
        tiny_recipe(
            tmp_path / "ce",
            model={"config_overrides": STUDENT},
            training={**SEQ, "steps": 3, "seed": 1},
            eval={"interval": 0},
            optimizer=CONSTANT_LR,
        )
    )
    zero = distill(student_recipe(tmp_path / "a0", teacher, distill={"alpha": 0.0}, **common))
    torch.testing.assert_close(torch.tensor(zero.losses), torch.tensor(ce.losses))
    one = distill(student_recipe(tmp_path / "a1", teacher, **common))
    half = distill(student_recipe(tmp_path / "ah", teacher, distill={"alpha": 0.5}, **common))
    assert half.losses[0] == pytest.approx(0.5 * one.losses[0] + 0.5 * ce.losses[0], rel=1e-5)


def test_mfu_counts_the_teachers_forward(tmp_path, teacher):
    """MFU counts the student's training FLOPs and, when alpha > 0, the teacher's forward over
    the same windows (2 per teacher weight per token, its head at every target); with alpha 0
    the teacher does not run and is not counted."""
    from gemmakit.training.metrics import StepFlops, forward_flops, read_metrics

    T, rows = SEQ["seq_len"], SEQ["batch_size"]
    positions = rows * T  # pretraining windows: every position a token and a target
    student_cfg = get_config("tiny").replace(**{**SMALL, **STUDENT})
    student = StepFlops.of(build_model(student_cfg), T)(positions, positions)
    taught = forward_flops(load_model(teacher).config, positions, positions, T)
    assert taught > student / 3  # the teacher is the bigger model: not a rounding error
    for alpha, want in ((1.0, student + taught), (0.0, student)):
        run = tmp_path / f"a{alpha}"
        recipe = student_recipe(run, teacher, steps=2, distill={"alpha": alpha})
        distill({**recipe, "log": {**recipe["log"], "peak_flops": 1e12}})
        steps = [r for r in read_metrics(run) if "loss" in r]
        assert len(steps) == 2
        for r in steps:
            assert r["mfu"] * r["step_s"] * 1e12 == pytest.approx(want, rel=1e-9)


def test_teacher_is_not_in_the_checkpoint(tmp_path, teacher):
    result = distill(student_recipe(tmp_path / "s", teacher, steps=2))
    saved = state.read_train_state(result.checkpoint)
    assert saved["loss_params"] == {}
    student = load_model(result.checkpoint)
    names = set(student.state_dict())
    assert names == set(build_model(student.config).state_dict())
    # the optimizer holds state for the student's parameters only
    trained = {f"model.{n}" for n, _ in student.named_parameters()}
    assert set(saved["optimizer"]["state"]) == trained
    frozen = load_teacher(DistillSection(teacher=str(teacher)), torch.float32)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_vocabulary_mismatch_and_missing_teacher(tmp_path, teacher):
    recipe = student_recipe(tmp_path / "s", teacher)
    recipe["model"]["config_overrides"] = dict(STUDENT, vocab_size=300)
    with pytest.raises(ConfigError, match="share a tokenizer"):
        distill(recipe)
    with pytest.raises(MissingFileError, match="distill.teacher"):
        distill(student_recipe(tmp_path / "t", tmp_path / "no-such-teacher"))
    with pytest.raises(RecipeError, match="no distill section"):
        distill(tiny_recipe(tmp_path / "u"))
    with pytest.raises(RecipeError, match="distill.alpha"):
        as_recipe(student_recipe(tmp_path / "v", teacher, distill={"alpha": 1.5}))
    with pytest.raises(RecipeError, match="distill needs teacher"):
        as_recipe(tiny_recipe(tmp_path / "w", distill={"temperature": 2.0}))


def test_cli_user_error_is_one_line(tmp_path, teacher, capsys):
    path = write_recipe(tmp_path / "r.yaml", student_recipe(tmp_path / "s", teacher))
    code = cli_main(["distill", str(path), "--set", "distill.top_k=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "distill.top_k" in err[0]


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path, teacher):
    steps = 30
    sections = dict(checkpoint={"interval": 10, "keep": 1}, distill={"top_k": 8})
    torch.set_num_threads(1)  # the same threads as the subprocess, so the same float sums
    try:
        whole = distill(student_recipe(tmp_path / "whole", teacher, steps, **sections))
        cut = student_recipe(tmp_path / "cut", teacher, steps, **sections)
        path = write_recipe(tmp_path / "r.yaml", cut)
        cmd = [sys.executable, "-m", "gemmakit.cli", "distill", str(path)]
        kill_after_checkpoint(cmd, tmp_path / "cut", 10)
        assert 10 <= len(losses(tmp_path / "cut")) < steps
        resumed = distill(cut, resume=True)
    finally:
        torch.set_num_threads(2)
    assert resumed.steps == steps and len(resumed.losses) < steps
    got = losses(tmp_path / "cut")
    assert len(got) == steps
    torch.testing.assert_close(torch.tensor(got), torch.tensor(whole.losses), rtol=1e-5, atol=0)


def test_shipped_recipe_runs_from_the_cli(tmp_path, teacher, capsys):
    small = "{vocab_size: 256, d_model: 32, n_layers: 1, n_heads: 2, head_dim: 16, ffn_dim: 64}"
    sets = [
        f"distill.teacher={teacher}",
        f"run_dir={tmp_path / 'run'}",
        "data.synthetic=true",
        f"model.config_overrides={small}",
        "training.steps=2",
        "training.seq_len=16",
        "training.batch_size=4",
        "training.micro_batch_size=4",
        "log.progress=false",
        "log.tensorboard=false",
        "log.peak_flops=1e12",
    ]
    args = ["distill", str(ROOT / "recipes" / "distill-tiny.yaml")] + [
        a for s in sets for a in ("--set", s)
    ]
    assert cli_main(args) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert load_model(tmp_path / "run" / "checkpoints" / "step_0000002").config.d_model == 32
