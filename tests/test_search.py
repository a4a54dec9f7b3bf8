"""Bit-width search: mixing layers, exact E[BOPs], the Lagrangian, knapsack repair, budgets.

Fast by construction: most tests drive GumbelSearch directly on a model built once; the
end-to-end ones use the micro LM with a handful of steps.
"""

from __future__ import annotations

import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coqat.bitconfig import LayerBits
from coqat.config import load_space
from coqat.cost import CostModel, parse_budget
from coqat.errors import CoqatError
from coqat.targets import get_target
from coqat.quant import QuantConv2d, QuantLinear, fake_quant
from coqat.bitsearch import (Assignment, Decision, GumbelSearch, SearchConv2d, SearchLinear,
                          SearchProblem, SearchSettings, derive, parse_search_settings, repair,
                          run_search, to_search_model, uniform_at_budget)
from coqat.bitsearch import knapsack
from coqat.records import RunRecord
from coqat.rundir import RunDir
from coqat.workloads import get_workload
from conftest import LM_MICRO, assert_one_line_error, cli_json, run_cli, run_config

HALFWAY = "w4a4+0.5*(w8a8-w4a4)"


# ----- fixtures -------------------------------------------------------------------------
class Built:
    """A space's model, cost model and search problem, built once per module."""

    def __init__(self, ref: str, target: str | None = None):
        self.space = load_space(ref)
        self.workload = get_workload(self.space.workload_name,
                                     {k: v for k, v in self.space.workload.items()
                                      if k != "name"})
        torch.manual_seed(0)
        self.model = self.workload.build_model()
        self.cost = CostModel.from_model(self.model, self.workload.example_inputs())
        self.resolved = self.space.resolve(list(self.cost.layers), self.cost.tie_groups)
        self.problem = SearchProblem.build(self.resolved, self.cost, target=target)

    def budget(self, expr: str) -> int:
        return parse_budget(expr, self.cost, self.resolved.pinned)

    def search(self, expr: str, seed: int = 0, **settings) -> tuple[GumbelSearch, nn.Module]:
        model = copy.deepcopy(self.model)
        modules = to_search_model(model, self.problem)
        s = SearchSettings(**settings).validate()
        return GumbelSearch(self.problem, self.cost, modules, self.budget(expr), s, seed,
                            arch_steps=10), model

    def arch_steps(self, gs: GumbelSearch, model: nn.Module, n: int, start: int = 0) -> list[dict]:
        recs = []
        for i in range(start, start + n):
            batch = self.workload.get_batch("holdout", i, 4)
            recs.append(gs.arch_step(model, batch, self.workload.loss, i))
        return recs


@pytest.fixture(scope="module")
def micro() -> Built:
    return Built(LM_MICRO)


@pytest.fixture(scope="module")
def tiny() -> Built:
    return Built("lm-tiny")


# ----- mixing layers --------------------------------------------------------------------
@pytest.mark.parametrize("w_bits,a_bits", [(2, 4), (3, 6), (4, 4), (8, 8), (16, 4), (4, 16)])
def test_hard_sample_mixing_linear_equals_quantlinear_bit_for_bit(w_bits, a_bits):
    torch.manual_seed(1)
    base = nn.Linear(64, 48)
    x = torch.randn(3, 5, 64, requires_grad=True)
    ref = QuantLinear.from_float(copy.deepcopy(base), w_bits, a_bits)
    w_choices, a_choices = (2, 3, 4, 8, 16), (4, 6, 8, 16)
    mix = SearchLinear.from_float(copy.deepcopy(base), w_choices, a_choices)
    expected = ref(x)
    # an int mix (the weight step's hard sample) and a straight-through one-hot tensor
    for w_mix, a_mix in ((w_choices.index(w_bits), a_choices.index(a_bits)),
                         (F.one_hot(torch.tensor(w_choices.index(w_bits)), 5).float(),
                          F.one_hot(torch.tensor(a_choices.index(a_bits)), 4).float())):
        mix.set_mix(w_mix, a_mix)
        assert torch.equal(mix(x), expected)
    mix.set_mix(w_choices.index(w_bits), a_choices.index(a_bits))
    g_ref = torch.autograd.grad(ref(x).square().sum(), (ref.weight, x))
    g_mix = torch.autograd.grad(mix(x).square().sum(), (mix.weight, x))
    assert all(torch.equal(a, b) for a, b in zip(g_ref, g_mix))


def test_hard_sample_mixing_conv_equals_quantconv_bit_for_bit():
    torch.manual_seed(2)
    base = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.randn(2, 16, 6, 6)
    for w_bits, a_bits in ((2, 4), (4, 8), (8, 6)):
        ref = QuantConv2d.from_float(copy.deepcopy(base), w_bits, a_bits)
        mix = SearchConv2d.from_float(copy.deepcopy(base), (2, 4, 8), (4, 6, 8))
        mix.set_mix((2, 4, 8).index(w_bits), (4, 6, 8).index(a_bits))
        assert torch.equal(mix(x), ref(x))


def test_search_layers_reading_one_input_share_its_rotation_and_hard_operand(monkeypatch):
    """q/k/v as search layers: the input is rotated once for all three (soft mixes: each
    layer's own mix of it; hard choices of one width: one quantized operand), and the
    gradients equal those of separate operands up to float rounding."""
    import coqat.bitsearch.relax as relax
    from coqat.quant import sharing

    torch.manual_seed(4)
    layers = [SearchLinear.from_float(nn.Linear(64, 32, bias=False), (2, 4, 8), (4, 8))
              for _ in range(3)]
    x0 = torch.randn(6, 64)
    rotated, quantized = [], []
    real, real_q = relax.hadamard_transform, relax.ste_quantize
    monkeypatch.setattr(relax, "hadamard_transform",
                        lambda t, b: rotated.append(tuple(t.shape)) or real(t, b))
    monkeypatch.setattr(relax, "ste_quantize",
                        lambda t, *a: quantized.append(tuple(t.shape)) or real_q(t, *a))

    def run(share, mixes):
        x = x0.clone().requires_grad_(True)
        rotated.clear()
        quantized.clear()
        for m, (w_mix, a_mix) in zip(layers, mixes):
            m.set_mix(w_mix, a_mix)
        with sharing(share):
            loss = sum((m(x) * (i + 1)).square().sum() for i, m in enumerate(layers))
            leaves = [x] + [t for wm, am in mixes for t in (wm, am) if torch.is_tensor(t)]
            grads = torch.autograd.grad(loss, leaves)
        return loss.detach(), grads, (sum(s == (6, 64) for s in rotated),
                                      sum(s == (6, 64) for s in quantized))

    soft = [(torch.rand(3, requires_grad=True), torch.rand(2, requires_grad=True))
            for _ in range(3)]
    # (rotations, hard quantizations) of the input: separate vs shared
    for mixes, counts in ((soft, ((3, 0), (1, 0))), ([(0, 1), (2, 1), (1, 1)], ((3, 3), (1, 1)))):
        loss_sep, g_sep, n_sep = run(False, mixes)
        loss, g, n = run(True, mixes)
        assert (n_sep, n) == counts
        assert torch.equal(loss, loss_sep)
        for a, b in zip(g, g_sep):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_quant_error_is_the_perturbation_the_layer_output_sees():
    """One operand quantized, the other float: the output moves by exactly the layer applied
    to ``quant_error`` (linear in each operand), for Linear and Conv2d, weight and input."""
    torch.manual_seed(3)
    lin = SearchLinear.from_float(nn.Linear(64, 24, bias=False), (2, 4, 16), (3, 8, 16))
    conv = SearchConv2d.from_float(nn.Conv2d(16, 8, 3, padding=1, bias=False), (2, 16), (4, 16))
    cases = [(lin, torch.randn(4, 7, 64), F.linear), (conv, torch.randn(2, 16, 5, 5),
                                                       lambda x, w: conv._conv_forward(x, w, None))]
    for m, x, apply in cases:
        wf, af = len(m.w_choices) - 1, len(m.a_choices) - 1          # the float choices
        m.set_mix(wf, af)
        base = m(x)
        m.set_mix(0, af)
        e_w = m.quant_error("w", 0, m.weight.detach())
        torch.testing.assert_close(m(x) - base, apply(x, e_w), atol=2e-5, rtol=1e-4)
        m.set_mix(wf, 0)
        e_x = m.quant_error("a", 0, x)
        torch.testing.assert_close(m(x) - base, apply(e_x, m.weight.detach()), atol=2e-5,
                                   rtol=1e-4)
        assert not torch.any(m.quant_error("w", wf, m.weight.detach()))   # float: no error
        assert e_w.abs().max() > 0 and e_x.abs().max() > 0


def test_soft_mixing_is_the_weighted_sum_of_quantized_operands_in_one_matmul():
    """Independent reference: fake_quant per candidate (rotated basis), mixed, one linear."""
    torch.manual_seed(3)
    base = nn.Linear(32, 16, bias=False)
    mix = SearchLinear.from_float(base, (2, 4, 8), (4, 8))
    assert mix.weight is base.weight and [n for n, _ in mix.named_parameters()] == ["weight"]
    yw = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    ya = torch.tensor([0.6, 0.4], requires_grad=True)
    mix.set_mix(yw, ya)
    x = torch.randn(4, 32)
    calls = []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.linear:
                calls.append(func)
            return func(*args, **(kwargs or {}))

    with Count():
        out = mix(x)
    assert len(calls) == 1                                   # one matmul, not K
    xq = sum(y * fake_quant(x, b, "quest", 32) for y, b in zip(ya, (4, 8)))
    wq = sum(y * fake_quant(base.weight, b, "quest", 32) for y, b in zip(yw, (2, 4, 8)))
    torch.testing.assert_close(out, F.linear(xq, wq), rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(out.sum(), (yw, ya))
    assert all(t.abs().sum() > 0 for t in g)                  # the mix weights get gradient


@pytest.mark.parametrize("method", ["quest", "rtn"])
def test_fused_soft_mix_matches_the_eager_one(monkeypatch, method):
    """The compiled soft mix (two graphs; the backward recomputes the candidates) against
    the eager one (which stores them): the same values and the same gradients to the
    operands and the mix weights, Linear and Conv2d, a 16-bit candidate among them; new mix
    weights reuse the graphs (they are data)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from coqat.bitsearch import relax

    monkeypatch.setattr(relax, "_COMPILED", {})
    counter = CompileCounterWithBackend("aot_eager")
    torch.manual_seed(4)
    layers = [(SearchLinear.from_float(nn.Linear(64, 24), (2, 4, 16), (3, 8, 16), method),
               torch.randn(3, 5, 64)),
              (SearchConv2d.from_float(nn.Conv2d(16, 8, 3, padding=1), (2, 8), (4, 6, 16),
                                       method), torch.randn(2, 16, 5, 5))]
    for m, x in layers:
        for trial in range(2):
            yw = torch.softmax(torch.randn(len(m.w_choices)), 0).requires_grad_()
            ya = torch.softmax(torch.randn(len(m.a_choices)), 0).requires_grad_()
            x = x.clone().requires_grad_()
            m.set_mix(yw, ya)
            runs, g = [], None
            for backend in (None, counter):
                relax.fuse_soft_mixes({"m": m}, backend)
                out = m(x)
                g = torch.randn_like(out) if g is None else g
                runs.append((out, *torch.autograd.grad(out, (x, m.weight, yw, ya), g)))
            for eager, fused in zip(*runs):
                torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
            if trial == 0:
                frames = counter.frame_count
        assert counter.frame_count == frames > 0        # the second mix compiled nothing
    relax.fuse_soft_mixes({"m": m}, None)


def test_a_backend_that_cannot_compile_the_soft_mixes_costs_speed_not_the_search(monkeypatch):
    """A compiler failure (here simulated) warns once and runs the same functions eagerly."""
    from torch._dynamo.exc import TorchDynamoException

    from coqat.bitsearch import relax

    def broken(fn, backend):
        def fail(*args):
            raise TorchDynamoException("no compiler for this\nsecond line")
        return fail

    monkeypatch.setattr(relax, "_compiled", broken)
    monkeypatch.setattr(relax, "_FAILED", set())
    torch.manual_seed(6)
    m = SearchLinear.from_float(nn.Linear(32, 16), (2, 4, 16), (4, 8))
    m.set_mix(torch.tensor([0.2, 0.5, 0.3], requires_grad=True),
              torch.tensor([0.6, 0.4], requires_grad=True))
    x = torch.randn(3, 32)
    expected = m(x)
    relax.fuse_soft_mixes({"m": m}, "some-backend")
    with pytest.warns(RuntimeWarning, match="could not be compiled.*no compiler for this\\)"):
        out = m(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.sum().backward()                         # the backward falls back too, silently
    assert relax._FAILED == {"some-backend"}


def test_search_model_shares_parameters_and_pins_fixed_layers(micro):
    model = copy.deepcopy(micro.model)
    before = {n: p for n, p in model.named_parameters()}
    mods = to_search_model(model, micro.problem)
    assert set(mods) == set(micro.problem.searchable)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert type(model.lm_head) is nn.Linear                  # pinned w16a16 stays float


# ----- problem and cost -----------------------------------------------------------------
def test_problem_bops_equal_cost_model_bops_and_ties_hold(tiny):
    p, rng = tiny.problem, np.random.default_rng(0)
    assert len(p.a_decisions) == 16 and len(p.w_decisions) == 28   # q/k/v and gate/up tied
    for _ in range(20):
        asg = Assignment(tuple(int(rng.choice(d.choices)) for d in p.w_decisions),
                         tuple(int(rng.choice(d.choices)) for d in p.a_decisions))
        cfg = p.config(asg)
        assert p.bops(asg) == tiny.cost.bops(cfg)
        assert cfg.violations_of_ties() == []
        assert p.assignment_of(cfg) == asg
    lo, hi = p.bops_range()
    assert lo == tiny.cost.bops(p.config(p.extreme(min)))
    assert hi == tiny.cost.uniform_bops(LayerBits(8, 8), tiny.resolved.pinned)


def test_expected_bops_is_the_exact_expectation(micro):
    gs, _ = micro.search("w4a4")
    torch.manual_seed(4)
    with torch.no_grad():
        for t in gs.parameters():
            t.copy_(torch.randn_like(t) * 2)
    p = micro.problem
    pw = [F.softmax(t, 0).tolist() for t in gs.w_logits]
    pa = [F.softmax(t, 0).tolist() for t in gs.a_logits]
    ref = float(micro.cost.attention_bops())       # sum over the joint (w, a) per layer
    for n in p.layer_names:
        if n in p.pinned:
            ref += micro.cost.layer_bops(n, p.pinned[n])
            continue
        wd, ad = p.layer_w[n], p.layer_a[n]
        for (pw_k, w), (pa_j, a) in itertools.product(
                zip(pw[wd], p.w_decisions[wd].choices), zip(pa[ad], p.a_decisions[ad].choices)):
            ref += p.macs[n] * pw_k * pa_j * w * a
    got = gs.expected_bops()
    assert got.dtype == torch.float64 and got.requires_grad
    assert math.isclose(float(got.detach()), ref, rel_tol=1e-12)


def test_target_vllm_restricts_candidates_and_ties_weights(tiny):
    p = SearchProblem.build(tiny.resolved, tiny.cost, target="vllm")
    assert {b for d in p.w_decisions for b in d.choices} == {4, 8}
    assert {b for d in p.a_decisions for b in d.choices} == {8}
    assert len(p.w_decisions) == 16                       # one weight decision per tie group
    gs = GumbelSearch(p, tiny.cost, to_search_model(copy.deepcopy(tiny.model), p),
                      parse_budget("w6a8", tiny.cost, tiny.resolved.pinned), SearchSettings(), 0)
    cfg = p.config(derive(gs, 0.97).assignment)
    get_target("vllm").check(cfg)                          # deployable, shards tied


def test_infeasible_budgets_name_the_feasible_range(tiny):
    p = tiny.problem
    lo, hi = p.bops_range()
    with pytest.raises(CoqatError, match=r"below the cheapest.*feasible budgets .* GBOPs"):
        p.check_budget(tiny.budget("w2a2"), "w2a2")
    with pytest.raises(CoqatError, match="above the most expensive"):
        p.check_budget(hi + 1)
    p.check_budget(lo)
    p.check_budget(hi)


def test_uniform_baseline_is_the_largest_uniform_not_above_budget(tiny):
    pairs = tiny.resolved.uniform_candidates()
    assert uniform_at_budget(tiny.problem, pairs, tiny.budget("w4a4"))[0] == (4, 4)
    # halfway between w4a4 and w8a8 is 40 bits^2 per MAC: w6a6 (36) is the largest below
    assert uniform_at_budget(tiny.problem, pairs, tiny.budget(HALFWAY))[0] == (6, 6)
    assert uniform_at_budget(tiny.problem, pairs, tiny.budget("w4a4") - 1)[0] == (3, 4)


# ----- knapsack repair ------------------------------------------------------------------
def _random_problem(rng) -> SearchProblem:
    n = int(rng.integers(2, 6))
    names = [f"l{i}" for i in range(n)]
    macs = {m: int(rng.integers(1, 7)) * 96 for m in names}
    bits = (2, 3, 4, 6, 8)
    pinned = {names[-1]: LayerBits(8, 8)} if rng.random() < 0.3 else {}
    free = [m for m in names if m not in pinned]
    groups, i = [], 0
    while i < len(free):                      # consecutive runs of 1..3 layers share a_bits
        k = int(rng.integers(1, 4))
        groups.append(tuple(free[i:i + k]))
        i += k
    tie_w = rng.random() < 0.3

    def subset() -> tuple[int, ...]:
        return tuple(sorted(rng.choice(bits, size=int(rng.integers(1, 4)), replace=False)))

    a_dec = [Decision("a", g, subset()) for g in groups]
    w_dec = [Decision("w", g, subset()) for g in groups] if tie_w else \
        [Decision("w", (m,), subset()) for m in free]
    fixed = int(rng.integers(0, 5000)) + sum(macs[m] * 64 for m in pinned)
    return SearchProblem(names, macs, pinned, w_dec, a_dec, fixed,
                         [g for g in groups if len(g) > 1])


def _brute_force(p, wv, av, budget, lo):
    best, best_under = None, None
    for w in itertools.product(*[range(len(d.choices)) for d in p.w_decisions]):
        for a in itertools.product(*[range(len(d.choices)) for d in p.a_decisions]):
            asg = Assignment(tuple(d.choices[k] for d, k in zip(p.w_decisions, w)),
                             tuple(d.choices[k] for d, k in zip(p.a_decisions, a)))
            b = p.bops(asg)
            if b > budget:
                continue
            v = sum(wv[i][k] for i, k in enumerate(w)) + sum(av[j][k] for j, k in enumerate(a))
            if best_under is None or v > best_under:
                best_under = v
            if b >= lo and (best is None or v > best):
                best = v
    return best, best_under


def test_knapsack_repair_is_optimal_against_brute_force():
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(60):
        p = _random_problem(rng)
        lo_b, hi_b = p.bops_range()
        budget = int(rng.integers(lo_b, hi_b + 1))
        lo = budget - int(rng.integers(0, max(1, (budget - p.fixed_bops) // 3)))
        wv = [rng.normal(size=len(d.choices)).tolist() for d in p.w_decisions]
        av = [rng.normal(size=len(d.choices)).tolist() for d in p.a_decisions]
        res = repair(p, wv, av, budget, lo=lo)
        best, best_under = _brute_force(p, wv, av, budget, lo)
        assert res.exact and res.bops <= budget and res.bops == p.bops(res.assignment)
        if best is not None:
            assert res.reached_lo and res.bops >= lo
            assert math.isclose(res.value, best, abs_tol=1e-9)
        else:
            assert not res.reached_lo and math.isclose(res.value, best_under, abs_tol=1e-9)
        checked += 1
    assert checked == 60


def test_coarse_knapsack_still_meets_the_budget(monkeypatch, tiny):
    """When costs are rounded up to a coarser unit the result stays within the budget."""
    monkeypatch.setattr(knapsack, "MAX_UNITS", 1000)     # lm-tiny needs 3328 exact units
    p = tiny.problem
    wv = [[0.0] * len(d.choices) for d in p.w_decisions]
    av = [[0.0] * len(d.choices) for d in p.a_decisions]
    b = tiny.budget("w4a4")
    res = repair(p, wv, av, b, lo=b - (b - p.fixed_bops) // 10)
    assert not res.exact and res.unit > 2097152 and res.bops <= b
    assert res.reached_lo and res.bops >= b - (b - p.fixed_bops) // 10


# ----- the Lagrangian -------------------------------------------------------------------
def test_penalty_pull_on_the_logits_is_linear_in_mu(micro):
    """search_anchors §12: with SGD the multiplier's scale reaches the bits (Adam would
    normalise it away). Same start, same model, batch and noise; only mu differs."""
    model = copy.deepcopy(micro.model)
    modules = to_search_model(model, micro.problem)
    budget = micro.budget("w4a4")
    searches, moved = [], []
    for mu in (0.0, 1.0, 2.0, 4.0):
        gs = GumbelSearch(micro.problem, micro.cost, modules, budget,
                          SearchSettings(eta_mu=1e-9), 0)
        gs.mu = mu
        micro.arch_steps(gs, model, 1)
        searches.append(gs)
        moved.append(torch.cat([t.detach().flatten() for t in gs.parameters()]))
    d1, d2, d4 = (moved[i] - moved[0] for i in (1, 2, 3))
    assert d1.abs().max() > 1e-3
    torch.testing.assert_close(d2, 2 * d1, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(d4, 4 * d1, rtol=1e-4, atol=1e-7)
    with torch.no_grad():                                    # and the pull lowers E[BOPs]
        e = [float(gs.expected_bops()) for gs in searches]
    assert e[3] < e[2] < e[1] < e[0]


def test_mu_rises_when_the_budget_is_tight(micro):
    gs, model = micro.search("w2a4+0.1*(w4a4-w2a4)", eta_mu=0.5, init="uniform")
    mus = [gs.mu]
    for i in range(4):
        rec = micro.arch_steps(gs, model, 1, start=i)[0]
        assert rec["constraint"] > 0                        # over budget the whole time
        mus.append(gs.mu)
    assert all(b > a for a, b in zip(mus, mus[1:])) and mus[-1] > 0.5


def test_mu_falls_to_zero_when_the_budget_is_loose(micro):
    hi = micro.problem.bops_range()[1]
    gs, model = micro.search("w8a8", mu_init=0.6, eta_mu=0.5, init="uniform")
    assert gs.budget == hi
    seen = []
    for i in range(8):
        micro.arch_steps(gs, model, 1, start=i)
        seen.append(gs.mu)
    assert seen[0] < 0.6 and seen[-1] == 0.0
    assert all(b <= a for a, b in zip(seen, seen[1:]))


def test_logits_move_in_the_first_steps(micro):
    gs, model = micro.search("w8a8", init="uniform")         # loose: mu stays 0
    micro.arch_steps(gs, model, 3)
    assert gs.mu == 0.0
    moved = max(float(t.detach().abs().max()) for t in gs.parameters())
    assert moved > 0.05                                      # the task alone moved them


def test_straight_through_mode_forward_is_a_hard_config(micro):
    gs, model = micro.search("w4a4", relax="hard")
    w_mix, a_mix = gs.sample(0, "arch", "st")
    for y in w_mix + a_mix:
        assert torch.equal(y.detach(), F.one_hot(y.detach().argmax(), y.numel()).float())
        assert y.requires_grad
    rec = micro.arch_steps(gs, model, 1)[0]
    assert math.isfinite(rec["holdout_loss"])


@pytest.mark.parametrize("expr", ["w3a3", "w4a4", HALFWAY])
def test_search_starts_on_the_budget(tiny, expr):
    """init = "budget": E[BOPs] = B at the start, so mu need not spike (and freeze the
    decisions at the cheapest bits) before the task gradient is heard."""
    gs, _ = tiny.search(expr)
    e = float(gs.expected_bops().detach())
    assert 0.999 * gs.budget <= e <= gs.budget
    first = [F.softmax(t.detach(), 0) for t in gs.w_logits]
    assert all(torch.allclose(p, first[0]) for p in first)   # same start for every layer


def test_temperature_anneals_from_start_to_end():
    from coqat.bitsearch import temperature

    taus = [temperature(k, 11, 1.0, 0.1) for k in range(11)]
    assert taus[0] == 1.0 and taus[-1] == pytest.approx(0.1)
    assert all(b < a for a, b in zip(taus, taus[1:]))
    assert taus[5] == pytest.approx(math.sqrt(0.1))          # geometric midpoint


# ----- budgets met: {w3a3, w4a4, halfway, w6a6} x 3 seeds on lm-tiny ----------------------
@pytest.mark.parametrize("expr", ["w3a3", "w4a4", HALFWAY, "w6a6"])
def test_searched_configs_meet_budgets_within_three_percent(tiny, expr):
    for seed in range(3):
        gs, model = tiny.search(expr, seed=seed, eta_mu=0.5)
        batch = tiny.workload.get_batch("holdout", seed, 2)
        for i in range(2):
            gs.arch_step(model, batch, tiny.workload.loss, i)
        d = derive(gs, 0.97)
        b = tiny.problem.bops(d.assignment)
        assert 0.97 * gs.budget <= b <= gs.budget
        free = gs.budget - tiny.problem.fixed_bops       # also on the searchable share alone
        assert b - tiny.problem.fixed_bops >= 0.97 * free
        cfg = tiny.problem.config(d.assignment)
        assert cfg.violations_of_ties() == []
        assert d.logprob_lost >= -1e-9                    # the argmax is the unconstrained max


# ----- settings and the pipeline ----------------------------------------------------------
def test_search_settings_reject_unknown_and_bad_keys():
    space = load_space(LM_MICRO)
    space.search = {"arch_lr": 0.1, "tau_start": 2.0}
    assert parse_search_settings(space).arch_lr == 0.1
    space.search = {"arch_rate": 0.1}
    with pytest.raises(CoqatError, match="unknown key.*arch_rate.*allowed"):
        parse_search_settings(space)
    space.search = {"relax": "gumbel"}
    with pytest.raises(CoqatError, match="relax must be soft or hard"):
        parse_search_settings(space)
    space.search = {"sensitivity_clean": "isotonic"}
    with pytest.raises(CoqatError, match="sensitivity_clean must be 'monotone' or 'none'"):
        parse_search_settings(space)
    space.search = {"compile_arch": "yes"}
    with pytest.raises(CoqatError, match="compile_arch must be true or false"):
        parse_search_settings(space)
    space.search = {"sensitivity_clean": "none", "compile_arch": True}
    s = parse_search_settings(space)
    assert (s.sensitivity_clean, s.compile_arch) == ("none", True)
    assert (SearchSettings().sensitivity_clean, SearchSettings().compile_arch) == \
        ("monotone", False)


def test_pipeline_writes_a_search_run_and_reuses_the_fp_phase(runs):
    cfg = run_config(LM_MICRO, runs, steps=4, seed=3, fp_steps=4, search_steps=4,
                     trace_every=1)
    run, rec = run_search(cfg, "w4a4", "gumbel")
    res = rec.search
    assert res.fp_phase["reused"] is False
    assert res.achieved_bops <= res.budget_bops and math.isfinite(rec.metric)
    doc = run.read_json("bitconfig.json")
    assert doc["meta"]["method"] == "gumbel" and doc["cost"]["total_bops"] == res.achieved_bops
    assert doc["cost"]["budget_bops"] == res.budget_bops
    trace = [json.loads(x) for x in run.file("search/trace.jsonl").read_text().splitlines()]
    assert [t["arch_step"] for t in trace] == [0, 1, 2]
    assert {"mu", "tau", "e_bops_over_budget", "probs"} <= set(trace[-1])
    assert run.read_json("final.json")["repair"]["layers_changed"] >= 0
    _, again = run_search(cfg.with_search(optuna_trials=3), "w4a4", "optuna", final_qat=False,
                          seconds=60)
    assert again.search.fp_phase["reused"] is True and again.metric is None
    assert again.search.optuna["trials"] == 3
    assert again.search.achieved_bops <= again.search.budget_bops
    assert RunRecord.read(RunDir(again.run_dir)).search.optuna["trials"] == 3


def _fp_phase_in_process(out: str, queue) -> None:
    from coqat.bitsearch.pipeline import load_or_train_fp, plan_search

    job = plan_search(run_config(LM_MICRO, out, steps=4, seed=5, fp_steps=4, search_steps=4),
                      "w4a4", "gumbel")
    queue.put(load_or_train_fp(job, lambda _msg: None)["reused"])


def test_concurrent_searches_train_a_shared_fp_phase_once(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fp_phase_in_process, args=(str(tmp_path), queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    reused = sorted(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert reused == [False, True]          # one trained it, the other waited and reused it
    caches = [d for d in (tmp_path / ".fp-cache").iterdir() if d.is_dir()]
    assert len(caches) == 1 and not list((tmp_path / ".fp-cache").glob("*.tmp-*"))


def test_cli_search_with_baselines_json(runs):
    res = cli_json("search", "--space", LM_MICRO, "--budget", HALFWAY, "--method", "random",
                   "--baselines", "uniform", "--steps", "3", "--out", str(runs))
    assert res["method"] == "random" and set(res["baselines"]) == {"uniform"}
    for r in (res, res["baselines"]["uniform"]):
        assert r["achieved_bops"] <= r["budget_bops"] and r["metric"] is not None
    assert res["searchable_over_budget"] >= 0.97
    assert res["baselines"]["uniform"]["uniform"] == "w6a6"


def test_cli_search_on_the_searchable_layers_shows_the_mean_wa(runs):
    """``--budget wa20``: the searchable layers' mean w*a at most 20; the table shows the
    budget's mean and the achieved one (uniform w3a6: 18 = the largest pair that fits)."""
    proc = run_cli("search", "--space", LM_MICRO, "--budget", "wa20", "--method", "uniform",
                   "--steps", "3", "--out", str(runs))
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "mean w*a <= 20" in out and "mean w*a" in out and " 18 " in out
    rec = json.loads(next(runs.glob("*/final.json")).read_text())
    assert rec["uniform"] == "w3a6" and rec["mean_wa"] == pytest.approx(18)
    assert rec["budget_mean_wa"] == pytest.approx(20)


@pytest.mark.parametrize("budget,needle", [("w2a2", "below the cheapest"),
                                           ("fp32", "above the most expensive")])
def test_cli_infeasible_budget_is_a_one_line_error(runs, budget, needle):
    proc = run_cli("search", "--space", LM_MICRO, "--budget", budget, "--out", str(runs))
    assert_one_line_error(proc, needle, "GBOPs", "feasible budgets")
    assert not runs.exists() or not any(runs.iterdir())       # nothing written


def test_cli_unknown_method_is_a_one_line_error(runs):
    proc = run_cli("search", "--space", LM_MICRO, "--budget", "w4a4", "--method", "grid")
    assert_one_line_error(proc, "unknown search method", "gumbel")


@pytest.mark.parametrize("method", ["gumbel", "uniform"])
def test_search_quantizer_option_reaches_every_layer_of_the_final_config(runs, method):
    """Issue #17: ``coqat search --quantizer rtn`` was silently QuEST. The chosen config, the
    model the final QAT trained and the record all carry the quantizer asked for."""
    cfg = run_config(LM_MICRO, runs, steps=2, seed=1, fp_steps=2, search_steps=2,
                     quantizer="rtn")
    run, rec = run_search(cfg, "w4a4", method)
    doc = run.read_json("bitconfig.json")
    quantized = [lb for lb in doc["layers"].values() if lb["status"] != "float"]
    assert quantized and {lb["quantizer"] for lb in quantized} == {"rtn"}
    assert math.isfinite(rec.metric)
