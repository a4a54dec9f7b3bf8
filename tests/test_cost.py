"""coqat.cost: fvcore MACs, BOPs conventions, tie groups, budgets.

The ResNet numbers are the published HAWQ-V3 figures DESIGN.md §4 pins the counter to.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coqat.bitconfig import BitConfig, LayerBits
from coqat.cost import (CostModel, count_macs, describe_budget, find_tie_groups, format_bops,
                        mean_wa, parse_budget)
from coqat.errors import CoqatError
from coqat.workloads.resnet import resnet18, resnet20

W4A4, W8A8 = LayerBits(4, 4), LayerBits(8, 8)
FIRST_LAST_W8A8 = {"conv1": W8A8, "fc": W8A8}


# ----- toy models ------------------------------------------------------------------------
class ToyAttention(nn.Module):
    """Llama-style attention: q/k/v/o projections around F.scaled_dot_product_attention."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 4):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class ToySwiGLU(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 40):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


@pytest.fixture(scope="module")
def r18() -> CostModel:
    return CostModel.from_model(resnet18(), (torch.randn(1, 3, 224, 224),))


# ----- MAC counting ----------------------------------------------------------------------
def test_resnet18_macs_match_published_1_8141_gmacs(r18):
    assert r18.total_macs == 1_814_073_344
    assert round(r18.total_macs / 1e9, 4) == 1.8141
    assert r18.attention == {}
    assert len(r18.layers) == 21  # 20 convs (incl. 3 downsample) + fc
    assert list(r18.layers)[0] == "conv1" and list(r18.layers)[-1] == "fc"
    fc = r18.layers["fc"]
    assert (fc.op, fc.macs, fc.params, fc.weight_shape, fc.reduction_dim) == (
        "Linear", 512_000, 513_000, (1000, 512), 512)
    conv = r18.layers["layer1.0.conv1"]
    assert (conv.op, conv.reduction_dim, conv.params) == ("Conv2d", 64, 64 * 64 * 9)


def test_resnet18_bops_fp32_w8a8_and_w4a4_with_first_last_pinned(r18):
    assert round(r18.fp32_bops() / 1e9, 1) == 1857.6
    assert round(r18.uniform_bops(W8A8) / 1e9, 1) == 116.1
    assert r18.uniform_bops(W4A4, FIRST_LAST_W8A8) == 34_714_419_200
    assert round(r18.uniform_bops(W4A4) / 1e9, 1) == 29.0


def test_resnet20_cifar_macs_match_0_0406_gmacs():
    cost = CostModel.from_model(resnet20(), (torch.randn(1, 3, 32, 32),))
    assert cost.total_macs == 40_551_040
    assert round(cost.total_macs / 1e9, 4) == 0.0406
    assert cost.tie_groups == []  # option-A shortcuts have no 1x1 conv to tie with


def test_ops_outside_bops_are_reported_not_dropped(r18):
    assert r18.excluded["batch_norm"] > 0
    assert r18.excluded["adaptive_avg_pool2d"] == 512 * 7 * 7
    assert r18.uncounted.get("aten::max_pool2d") == 1
    summary = r18.summary()
    assert summary["excluded_ops"] == r18.excluded
    assert summary["mac_counter"].startswith("fvcore ")
    json.dumps(summary)


def test_weight_matmuls_outside_linear_conv2d_are_excluded_with_a_warning():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)      # not a layer coqat quantizes
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            tied = F.linear(self.conv(x), self.proj.weight)  # functional call, same weight
            return self.proj(x) + tied

    with pytest.warns(UserWarning, match="not in BOPs"):
        cost = CostModel.from_model(Head(), (torch.randn(2, 4, 8),))
    assert {n: lc.macs for n, lc in cost.layers.items()} == {"proj": 2 * 4 * 8 * 8}
    assert cost.excluded == {"conv": 2 * 4 * 4 * 8, "linear": 2 * 4 * 8 * 8}


def test_from_model_restores_training_flags_and_leaves_no_hooks():
    model = resnet20()
    model.train()
    model.layer1.eval()  # a mixed state must come back as it was
    CostModel.from_model(model, (torch.randn(2, 3, 32, 32),))
    assert model.training and not model.layer1.training and model.layer2.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_count_macs_exposes_per_layer_dict():
    counted = count_macs(ToySwiGLU(), (torch.randn(3, 7, 16),))
    assert counted.layers == {"gate": 21 * 16 * 40, "up": 21 * 16 * 40, "down": 21 * 40 * 16}


# ----- attention -------------------------------------------------------------------------
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_sdpa_counts_full_lxs_per_query_head_and_layers_tokens_in_out(heads, kv_heads):
    b, t, dim = 2, 6, 32
    model = ToyAttention(dim, heads, kv_heads)
    cost = CostModel.from_model(model, (torch.randn(b, t, dim),))
    e = dim // heads
    # QK^T + PV over every query head, full LxS although the mask is causal
    assert cost.attention == {"sdpa": b * heads * t * t * e + b * heads * t * t * e}
    tokens = b * t
    assert cost.layers["q"].macs == tokens * dim * heads * e
    assert cost.layers["k"].macs == tokens * dim * kv_heads * e
    assert cost.layers["v"].macs == tokens * dim * kv_heads * e
    assert cost.layers["o"].macs == tokens * heads * e * dim
    assert cost.total_macs == cost.layer_macs + cost.attention["sdpa"]


def test_attention_is_a_pseudo_layer_of_its_owner_at_16x16():
    model = nn.Sequential()
    model.add_module("attn", ToyAttention())
    cost = CostModel.from_model(model, (torch.randn(1, 5, 32),))
    assert list(cost.attention) == ["attn.sdpa"]
    cfg = cost.uniform_config(W4A4)
    assert "attn.sdpa" not in cfg.layers
    assert cost.attention_bops() == cost.attention["attn.sdpa"] * 16 * 16
    assert cost.bops(cfg) == cost.layer_macs * 16 + cost.attention_bops()
    assert cost.fp32_bops() == cost.total_macs * 32 * 32
    rows = cost.rows(cfg)
    # a pseudo-layer follows the last layer of its owner module
    assert [r["name"] for r in rows] == ["attn.q", "attn.k", "attn.v", "attn.o", "attn.sdpa"]
    att = rows[4]
    assert (att["op"], att["params"], att["w_bits"], att["a_bits"]) == ("attention", 0, 16, 16)
    assert sum(r["bops"] for r in rows) == cost.bops(cfg)
    assert sum(r["macs_share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["bops_share"] for r in rows) == pytest.approx(1.0)


def test_manual_attention_matmuls_count_with_broadcasting():
    class Manual(nn.Module):
        def forward(self, q, k):
            scores = torch.matmul(q, k.transpose(-1, -2))         # (2,4,5,8)@(2,4,8,5)
            mixed = torch.einsum("bhls,bhsd->bhld", scores, k)    # (2,4,5,5),(2,4,5,8)
            return torch.matmul(torch.ones(5, 5), mixed)          # broadcast (5,5)@(2,4,5,8)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Manual()
            self.proj = nn.Linear(8, 8)

        def forward(self, q, k):
            return self.proj(self.inner(q, k))

    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    cost = CostModel.from_model(Outer(), (q, k))
    per = 2 * 4 * 5 * 5 * 8
    assert cost.attention == {"inner.matmul": 2 * per, "inner.einsum": per}
    assert cost.input_shapes == [[2, 4, 5, 8], [2, 4, 5, 8]]


# ----- tie groups ------------------------------------------------------------------------
def test_resnet18_ties_each_downsampling_blocks_conv1_with_its_downsample(r18):
    assert r18.tie_groups == [
        ("layer2.0.conv1", "layer2.0.downsample.0"),
        ("layer3.0.conv1", "layer3.0.downsample.0"),
        ("layer4.0.conv1", "layer4.0.downsample.0"),
    ]


def test_qkv_projections_and_swiglu_gate_up_are_tied():
    attn = find_tie_groups(ToyAttention(), (torch.randn(1, 4, 32),))
    assert attn == [("q", "k", "v")]
    mlp = find_tie_groups(ToySwiGLU(), (torch.randn(1, 4, 16),))
    assert mlp == [("gate", "up")]


def test_uniform_config_carries_ties_and_refuses_pins_that_split_a_group():
    cost = CostModel.from_model(ToyAttention(), (torch.randn(1, 4, 32),))
    cfg = cost.uniform_config(W4A4, {"o": W8A8})
    assert cfg.tie_groups == [("q", "k", "v")] and cfg.layers["o"] == W8A8
    assert cost.uniform_config(W4A4, {"q": LayerBits(8, 4)}).layers["q"].w_bits == 8
    with pytest.raises(CoqatError, match="tie group"):
        cost.uniform_config(W4A4, {"q": W8A8})
    with pytest.raises(CoqatError, match="not Linear/Conv2d layers"):
        cost.uniform_config(W4A4, {"nope": W8A8})


# ----- bops() and expected_bops() ----------------------------------------------------------
def test_bops_rejects_configs_missing_layers_or_naming_unknown_ones(r18):
    full = r18.uniform_config(W8A8)
    partial = BitConfig({n: b for n, b in full.layers.items() if n != "fc"})
    with pytest.raises(CoqatError, match=r"lacks 1 .*fc") as missing:
        r18.bops(partial)
    extra = BitConfig({**full.layers, "head.proj": W8A8})
    with pytest.raises(CoqatError, match=r"does not have: head\.proj") as unknown:
        r18.bops(extra)
    empty = BitConfig({})
    with pytest.raises(CoqatError, match=r"lacks 21 .*\(\+18 more\)"):
        r18.bops(empty)
    for e in (missing, unknown):
        assert "\n" not in str(e.value)


def test_float_layers_count_16_bits_per_operand(r18):
    cfg = r18.uniform_config(LayerBits(16, 16))
    assert r18.bops(cfg) == r18.total_macs * 256
    assert r18.layer_bops("fc", LayerBits(4, 16)) == 512_000 * 64


def test_expected_bops_is_differentiable_and_matches_bops_for_one_hot(r18):
    choices = torch.tensor([4.0 * 4.0, 8.0 * 8.0], dtype=torch.float64)
    names = list(r18.layers)
    logits = torch.zeros(len(names), 2, dtype=torch.float64, requires_grad=True)
    probs = logits.softmax(-1)
    expected = r18.expected_bops({n: probs[i] @ choices for i, n in enumerate(names)})
    expected.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # midway between all-w4a4 and all-w8a8
    assert expected.item() == pytest.approx((r18.uniform_bops(W4A4) + r18.uniform_bops(W8A8)) / 2)

    pick_8 = {"conv1", "fc", "layer3.0.conv1", "layer3.0.downsample.0"}
    one_hot = {n: torch.tensor([0.0, 1.0] if n in pick_8 else [1.0, 0.0], dtype=torch.float64)
               for n in names}
    exp = r18.expected_bops({n: p @ choices for n, p in one_hot.items()})
    cfg = BitConfig({n: (W8A8 if n in pick_8 else W4A4) for n in names}, r18.tie_groups)
    assert exp.item() == r18.bops(cfg)
    assert r18.expected_bops({n: 16.0 for n in names}).item() == r18.uniform_bops(W4A4)
    with pytest.raises(CoqatError, match="expected_wa lacks"):
        r18.expected_bops({"fc": 16.0})


def test_expected_bops_includes_attention_at_16x16():
    cost = CostModel.from_model(ToyAttention(), (torch.randn(1, 4, 32),))
    e = cost.expected_bops({n: torch.tensor(64.0, requires_grad=True) for n in cost.layers})
    assert e.item() == cost.uniform_bops(W8A8) == cost.layer_macs * 64 + cost.attention_bops()


# ----- budgets ---------------------------------------------------------------------------
@pytest.mark.parametrize("expr,expected", [
    ("w4a4", 34_714_419_200),
    ("W4A4", 34_714_419_200),
    ("34.7G", 34_700_000_000),
    ("34.7 g", 34_700_000_000),
    ("1.5t", 1_500_000_000_000),
    ("250M", 250_000_000),
    ("2k", 2_000),
    ("0.02", 37_152_222_085),           # fraction of FP32: floor(0.02 * 1857611104256)
    ("1", 1_857_611_104_256),
    ("1/50", 37_152_222_085),           # plain-number expressions read the same way
    ("1e11", 100_000_000_000),          # bare number > 1: absolute BOPs
    ("0.5*w8a8", 58_050_347_008),
    ("0.5*w4a4+0.5*w8a8", 75_407_556_608),
    ("w4a4+0.5*(w8a8-w4a4)", 75_407_556_608),
    ("w4a4+0.25*(w8a8-w4a4)", 55_060_987_904),
    ("w8a8/2", 58_050_347_008),
    ("fp32/16", 116_100_694_016),
    ("w4a4 + 1G", 35_714_419_200),
])
def test_parse_budget_forms_on_resnet18_with_first_last_pinned(r18, expr, expected):
    assert parse_budget(expr, r18, FIRST_LAST_W8A8) == expected


def test_parse_budget_w4a4_depends_on_pinned_layers(r18):
    assert round(parse_budget("w4a4", r18, FIRST_LAST_W8A8) / 1e9, 1) == 34.7
    assert round(parse_budget("w4a4", r18) / 1e9, 1) == 29.0
    # pins do not move a bare number
    assert parse_budget("34.7G", r18) == parse_budget("34.7G", r18, FIRST_LAST_W8A8)


@pytest.mark.parametrize("expr,problem", [
    ("w4a", "not a term"),
    ("w7a7", "unsupported bits"),
    ("abc", "not a term"),
    ("1/0", "divides by zero"),
    ("", "empty"),
    ("   ", "empty"),
    ("0", "must be positive"),
    ("w4a4-w8a8", "must be positive"),
    ("w4a4*w8a8", "multiplies two BOPs"),
    ("1G/w4a4", "divides by a BOPs"),
    ("2**40", "Pow is not allowed"),
    ("w4a4 w8a8", "not a valid expression"),
    ("0.5*", "not a valid expression"),
    ("__import__('os')", "Call is not allowed"),
    ("w4a4.real", "Attribute is not allowed"),
    ("'1G'", "not a number"),
    ("1e400", "out of range"),
    ("12X", "not a valid expression"),
])
def test_parse_budget_rejects_malformed_with_one_line_error(r18, expr, problem):
    with pytest.raises(CoqatError) as err:
        parse_budget(expr, r18)
    msg = str(err.value)
    assert problem in msg
    assert "accepted forms" in msg and "w4a4" in msg
    assert "\n" not in msg


def test_mean_wa_budget_is_the_quantized_layers_mean(r18):
    # waX is linear in X and passes through every square uniform point, pins kept
    for w in (2, 3, 4, 8):
        assert parse_budget(f"wa{w * w}", r18, FIRST_LAST_W8A8) == \
            parse_budget(f"w{w}a{w}", r18, FIRST_LAST_W8A8)
    assert parse_budget("wa8", r18, FIRST_LAST_W8A8) == parse_budget("w2a4", r18, FIRST_LAST_W8A8)
    lo, hi = (parse_budget(e, r18, FIRST_LAST_W8A8) for e in ("w2a3", "w3a3"))
    assert parse_budget("wa7.5", r18, FIRST_LAST_W8A8) == (lo + hi) // 2
    assert parse_budget("0.5*wa16 + 2G", r18) == parse_budget("0.5*w4a4", r18) + 2 * 10**9
    assert mean_wa(parse_budget("w3a4", r18, FIRST_LAST_W8A8), r18, FIRST_LAST_W8A8) == 12
    with pytest.raises(CoqatError, match="waX"):
        parse_budget("wa", r18)
    with pytest.raises(CoqatError, match="must be positive"):
        parse_budget("wa0-w2a2", r18)


def test_describe_and_format_bops(r18):
    bops = parse_budget("w4a4", r18, FIRST_LAST_W8A8)
    assert format_bops(bops) == "34.71 G"
    assert describe_budget("w4a4", bops, r18) == "w4a4 = 34.71 GBOPs (1.87% of FP32)"
    assert format_bops(r18.fp32_bops()) == "1.86 T"
    assert format_bops(999) == "999"
    assert format_bops(2_500_000) == "2.50 M"
