"""Hand-checkable cases of the model's pieces, and the presets' parameter counts (Table 2)."""

from __future__ import annotations

import math

import pytest
import torch

import gemmakit
from gemmakit.cli import main as cli
from gemmakit.config import get_config
from gemmakit.model.layers import RMSNorm, apply_rope, rope_angles


@pytest.mark.parametrize(
    "preset, embedding, embedding_padded, non_embedding",
    [
        ("gemma-2b", 524_288_000, 524_550_144, 1_981_884_416),
        ("gemma-7b", 786_432_000, 786_825_216, 7_751_248_896),
    ],
)
def test_parameter_counts_equal_report_table_2(preset, embedding, embedding_padded, non_embedding):
    cfg = get_config(preset)
    assert cfg.embedding_params() == embedding
    assert cfg.embedding_params(padded=True) == embedding_padded
    assert cfg.non_embedding_params() == non_embedding
    with torch.device("meta"):
        model = gemmakit.model.Gemma(cfg)
    assert sum(p.numel() for p in model.parameters()) == embedding + non_embedding


def test_info_prints_table_1_and_2(capsys):
    assert cli(["info", "gemma-2b"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "2048",
        "8 / 1 (multi-query)",
        "32768",
        "524,550,144",
        "1,981,884,416",
        "524,288,000",
        "256128",
    ):
        assert expected in out


def test_rms_norm_zero_weight_gives_unit_rms_and_one_plus_w():
    x = torch.tensor([[3.0, -4.0]])
    norm = RMSNorm(2, eps=0.0)
    assert torch.allclose(norm(x), x / math.sqrt(12.5))
    with torch.no_grad():
        norm.weight.fill_(1.0)  # scale is 1 + w = 2
    assert torch.allclose(norm(x), 2 * x / math.sqrt(12.5))
    # computed in float32 and cast back: bf16 in, bf16 out
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_embedding_scale_is_rounded_to_the_activation_dtype():
    """An all-ones embedding table gives sqrt(d) after scaling; in bf16 sqrt(2048) is 45.25."""
    cfg = get_config("tiny").replace(d_model=2048, n_layers=0, vocab_size=8)
    for dtype, want in ((torch.float32, math.sqrt(2048)), (torch.bfloat16, 45.25)):
        model = gemmakit.build_model(cfg, dtype=dtype)
        with torch.no_grad():
            model.embedder.weight.fill_(1.0)
        h = model(torch.tensor([[1, 2]]), return_hidden=True)  # final norm of a constant row
        assert torch.allclose(h.float(), torch.ones_like(h.float()))  # rms-normalised
        x = model.embedder(torch.tensor([[1]])) * torch.tensor(2048**0.5, dtype=dtype)
        assert x.dtype == dtype and x[0, 0, 0].item() == pytest.approx(want)
        seen = {}
        model.final_norm.register_forward_hook(
            lambda m, a, o, seen=seen: seen.setdefault("x", a[0])
        )
        model(torch.tensor([[1]]))
        assert seen["x"].dtype == dtype and seen["x"][0, 0, 0].item() == pytest.approx(want)


def test_rope_is_identity_at_zero_and_depends_on_relative_position():
    H = 8
    q, k = torch.randn(1, 1, 1, H), torch.randn(1, 1, 1, H)

    def rot(x, pos):
        cos, sin = rope_angles(torch.tensor([[pos]]), H, 10_000.0)
        return apply_rope(x, cos, sin)

    assert torch.allclose(rot(q, 0), q)
    assert torch.allclose(rot(q, 7).norm(), q.norm())
    dot = lambda m, n: (rot(q, m) * rot(k, n)).sum()  # noqa: E731
    assert torch.allclose(dot(10, 3), dot(107, 100), atol=1e-5)
    assert not torch.allclose(dot(10, 3), dot(10, 4), atol=1e-3)


def test_rope_uses_rotate_half_layout():
    """First and second halves of head_dim are paired (not interleaved neighbours)."""
    H = 4
    cos, sin = rope_angles(torch.tensor([[1]]), H, 10_000.0)
    x = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    y = apply_rope(x, cos, sin)[0, 0, 0]
    assert y[0] == pytest.approx(math.cos(1.0)) and y[2] == pytest.approx(math.sin(1.0))
    assert y[1] == 0 and y[3] == 0


def test_query_head_uses_kv_head_n_div_group():
    """With 4 query heads on 2 KV heads, zeroing KV head 1 changes heads 2 and 3 only."""
    cfg = get_config("tiny").replace(n_heads=4, n_kv_heads=2, n_layers=1)
    model = gemmakit.build_model(cfg)
    attn = model.blocks[0].attn
    x = torch.randn(1, 5, cfg.d_model)
    cos, sin = rope_angles(torch.arange(5)[None], cfg.head_dim, cfg.rope_theta)
    outs = {}

    def capture(module, args):
        outs["o"] = args[0].view(1, 5, 4, cfg.head_dim)

    attn.o_proj.register_forward_pre_hook(capture)
    attn(x, cos, sin, None)
    before = outs["o"].clone()
    with torch.no_grad():
        attn.v_proj.weight[cfg.head_dim :] = 0  # KV head 1's values
    attn(x, cos, sin, None)
    after = outs["o"]
    assert torch.equal(before[:, :, :2], after[:, :, :2])
    assert torch.all(after[:, :, 2:] == 0)


def test_presets_of_later_generations():
    g2, g3 = get_config("gemma2-2b"), get_config("gemma3-270m")
    assert [g2.is_local(i) for i in range(4)] == [True, False, True, False]
    assert [i for i in range(18) if not g3.is_local(i)] == [5, 11, 17]
    assert get_config("gemma2-27b").query_scale == pytest.approx(144**-0.5)
    assert g3.tokens.start_of_turn == 105 and g3.tokens.end_of_turn == 106
