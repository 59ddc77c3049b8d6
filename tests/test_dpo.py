"""DPO: sequence log-probabilities as the full logits give them, the held-out margin moved the
right way, and the reference computed once (a resume reads the cached file) with exact resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import SMALL, preference_recipe, preference_task

from gemmakit.api import build_model
from gemmakit.config import get_config
from gemmakit.training import dpo as dpo_module
from gemmakit.training.dpo import REFERENCE_FILE, dpo, sequence_logps
from gemmakit.training.losses import IGNORE


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2"])  # gemma2: the final softcap
def test_sequence_logps_equal_the_full_logits_and_their_gradients(preset):
    model = build_model(get_config(preset).replace(**SMALL), dtype=torch.float32, seed=1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 256, (3, 10), generator=gen)
    targets = torch.randint(4, 256, (3, 10), generator=gen)
    targets[:, :4] = IGNORE  # the prompt
    targets[1, 7:] = IGNORE  # a shorter answer

    ours = sequence_logps(model, tokens, targets, chunk_tokens=5)
    g_ours = torch.autograd.grad(ours @ torch.tensor([1.0, -2.0, 0.5]), model.embedder.weight)
    logp = F.log_softmax(model(tokens).float(), -1)  # [B, T, V]
    valid = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    full = (picked * valid).sum(-1)
    g_full = torch.autograd.grad(full @ torch.tensor([1.0, -2.0, 0.5]), model.embedder.weight)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_ours[0], g_full[0], rtol=1e-4, atol=1e-5)


def test_dpo_moves_the_held_out_margin_the_right_way(tmp_path):
    preference_task(tmp_path)
    recipe = preference_recipe(
        tmp_path, training={"steps": 20}, eval={"interval": 10}, dpo={"beta": 0.1}
    )
    result = dpo(recipe)
    first, last = result.val_metrics[0][1], result.val_metrics[-1][1]
    # At step 0 the policy is the reference: every margin is 0.
    assert 0 < first["margin"] < last["margin"]
    assert last["chosen_reward"] > last["rejected_reward"]
    assert last["accuracy"] >= 0.8
    assert result.val_losses[-1][1] < result.val_losses[0][1] < 0.6931  # below log 2
    assert (tmp_path / "run" / REFERENCE_FILE).is_file()


def test_dpo_resume_reads_the_cached_reference_and_continues_exactly(tmp_path, monkeypatch):
    preference_task(tmp_path, n_train=16, n_valid=4)

    def recipe(run, steps):
        return preference_recipe(
            tmp_path,
            run_dir=str(tmp_path / run),
            lora={"rank": 4, "alpha": 8},
            training={"steps": steps, "batch_size": 4, "micro_batch_size": 2},
            optimizer={"lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 0},  # a run may be cut
            eval={"interval": 2, "batches": 1},
            checkpoint={"interval": 2, "keep": 5},
        )

    straight = dpo(recipe("a", 4))
    first = dpo(recipe("b", 2))
    calls = []
    real = dpo_module.reference_logps
    monkeypatch.setattr(dpo_module, "reference_logps", lambda *a: calls.append(1) or real(*a))
    resumed = dpo(recipe("b", 4), resume=True)
    assert calls == []  # read from RUN/reference_logps.pt
    assert first.losses + resumed.losses == straight.losses
    assert (straight.checkpoint / "adapter_config.json").is_file()
