"""CAGE error feedback (coqat.optim.cage): schedule, update rules, scope, mixed bits, the
training-loop integration, resume, and the paper's toy quadratic.

Quantized values are checked against an independent numpy reference written here (QuEST:
dense float64 Sylvester Hadamard, RMS scale, midrise grid; RTN by hand), not against
coqat.quant itself.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from coqat.config import TrainSettings
from coqat.errors import CoqatError
from coqat.optim.cage import (
    MAX_LOGGED_LAYERS,
    cage_lambda,
    coupled_grad_,
    decoupled_update_,
    layer_errors,
)
from coqat.optim.schedules import Schedule
from coqat.quant import QuantLinear, quantize_model, quantized_modules
from coqat.training import runner
from coqat.training.cage import CageHooks
from coqat.training.distributed import DistEnv
from coqat.training.loop import StepContext, TrainHooks, build_optimizer
from conftest import DIGITS, ROOT, prepare_run, train_run


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def np_quest_full(w: np.ndarray, bits: int) -> np.ndarray:
    """QuEST Q(wH)H per row, float64 throughout (an independent reference, ~1e-6 close)."""
    alpha = {2: 1.4935346200015913, 3: 2.051068354131873, 4: 2.513930578568423,
             8: 3.884938678807525}[bits]
    n = w.shape[-1]
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    h = h / math.sqrt(n)
    r = w.astype(np.float64) @ h
    scale = alpha * np.sqrt(np.mean(r ** 2, axis=-1, keepdims=True)) + 1e-8
    step = 2 * scale / (2 ** bits - 1)
    k = np.round(np.clip(r, -scale, scale) / step + 0.5)
    return (k * step - step / 2) @ h.T


def ctx_for(model: nn.Module, step: int, lr: float, phase: str = "qat",
            optimizer: torch.optim.Optimizer | None = None) -> StepContext:
    settings = TrainSettings(lr=lr)
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    return StepContext(step=step, lr=lr, phase=phase, model=model, optimizer=opt,
                       schedule=Schedule(step + 1, 0, qat_start=0), settings=settings,
                       workload=None, device=torch.device("cpu"), dist=DistEnv())


def last_step_hooks(mode: str, lam: float, T: int = 10) -> tuple[CageHooks, int]:
    """Hooks over a QAT phase of T steps and the index of its last step (lambda_t = lam)."""
    return CageHooks(mode, lam=lam, silence=0.8, qat_start=0, qat_steps=T), T - 1


def rtn_layer(weight: list[list[float]], bits: int = 4) -> QuantLinear:
    layer = QuantLinear(len(weight[0]), len(weight), bias=False, w_bits=bits, a_bits=8,
                        method="rtn")
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return layer


# ----------------------------------------------------------------------------------------
# lambda schedule
# ----------------------------------------------------------------------------------------
def test_lambda_is_silent_through_the_first_share_of_the_qat_phase():
    # QAT phase = steps 100..199; r = (step - 99) / 100
    lams = [cage_lambda(s, 100, 100, 10.0, 0.8) for s in range(0, 300)]
    assert all(v == 0.0 for v in lams[:180])           # before QAT, and r <= 0.8
    assert lams[180] > 0.0                             # r = 0.81: first step after silence
    assert all(v == 0.0 for v in lams[200:])           # after the phase


def test_linear_ramp_reaches_lambda_exactly_at_the_last_qat_step():
    assert cage_lambda(199, 100, 100, 10.0, 0.8) == 10.0
    assert cage_lambda(180, 100, 100, 10.0, 0.8) == pytest.approx(10.0 * 0.01 / 0.2)
    assert cage_lambda(189, 100, 100, 10.0, 0.8) == pytest.approx(5.0)   # r = 0.9: half-way
    ramp = [cage_lambda(s, 100, 100, 10.0, 0.8) for s in range(180, 200)]
    assert all(b > a for a, b in zip(ramp, ramp[1:]))                  # strictly increasing


def test_constant_schedule_jumps_to_lambda_after_the_silence():
    vals = [cage_lambda(s, 0, 10, 3.0, 0.5, "constant") for s in range(10)]
    assert vals == [0.0] * 5 + [3.0] * 5
    assert [cage_lambda(s, 0, 4, 3.0, 0.0, "constant") for s in range(4)] == [3.0] * 4


def test_lambda_is_zero_without_a_qat_phase_and_bad_schedule_is_refused():
    assert cage_lambda(5, 10, 0, 10.0, 0.8) == 0.0
    with pytest.raises(CoqatError, match="linear or constant"):
        cage_lambda(0, 0, 10, 1.0, 0.5, "cosine")
    with pytest.raises(CoqatError, match="silence"):
        cage_lambda(0, 0, 10, 1.0, 1.0)
    with pytest.raises(CoqatError, match="cage-d"):
        CageHooks("sideways")
    with pytest.raises(CoqatError, match=">= 0"):
        CageHooks("decoupled", lam=-1.0)


def test_hooks_from_settings_follow_the_runs_qat_phase():
    s = Schedule(100, 10, qat_start=70, fused=True)
    h = CageHooks.from_settings(TrainSettings(optimizer="cage-c", cage_lambda=4.0,
                                              cage_silence=0.5), s)
    assert (h.mode, h.lam, h.silence, h.qat_start, h.qat_steps) == ("coupled", 4.0, 0.5, 70, 30)
    assert h.lambda_at(84) == 0.0 and h.lambda_at(85) > 0.0 and h.lambda_at(99) == 4.0
    fp_only = CageHooks.from_settings(TrainSettings(optimizer="cage-d"), Schedule(50, 5))
    assert all(fp_only.lambda_at(i) == 0.0 for i in range(50))


# ----------------------------------------------------------------------------------------
# update rules
# ----------------------------------------------------------------------------------------
def test_decoupled_update_matches_a_hand_computed_rtn_example():
    # 4-bit RTN, no rotation: row scale = absmax / 7.
    # row 0: absmax 0.7 -> scale 0.1;  [0.7, -0.33, 0.12, 0.0] -> Q = [0.7, -0.3, 0.1, 0.0]
    # row 1: absmax 1.4 -> scale 0.2;  [-1.4, 0.55, 0.26, -0.07] -> Q = [-1.4, 0.6, 0.2, 0.0]
    # lr = 0.1, lambda_t = 2:  p <- p - 0.2 (p - Q)
    layer = rtn_layer([[0.7, -0.33, 0.12, 0.0], [-1.4, 0.55, 0.26, -0.07]])
    hooks, last = last_step_hooks("decoupled", lam=2.0)
    hooks.after_optimizer_step(ctx_for(layer, last, lr=0.1))
    expected = torch.tensor([[0.7, -0.324, 0.116, 0.0], [-1.4, 0.56, 0.248, -0.056]])
    torch.testing.assert_close(layer.weight.detach(), expected, atol=1e-6, rtol=0)


def test_decoupled_update_uses_the_forward_quantizer_with_its_hadamard():
    torch.manual_seed(0)
    layer = QuantLinear(16, 3, bias=False, w_bits=3, a_bits=4)       # QuEST, block 16
    w0 = layer.weight.detach().clone()
    hooks, last = last_step_hooks("decoupled", lam=5.0)
    hooks.after_optimizer_step(ctx_for(layer, last, lr=0.02))
    q = np_quest_full(w0.numpy(), 3)
    expected = w0.numpy() - 0.02 * 5.0 * (w0.numpy() - q)
    np.testing.assert_allclose(layer.weight.detach().numpy(), expected, atol=1e-6, rtol=0)
    assert not np.allclose(q, w0.numpy(), atol=1e-3)                 # the pull was real


def test_update_rule_functions_agree_with_the_formulas():
    p = torch.tensor([1.0, -2.0, 0.5])
    q = torch.tensor([0.8, -2.5, 0.5])
    decoupled_update_(p, q, lr=0.1, lam_t=3.0)
    torch.testing.assert_close(p, torch.tensor([1.0 - 0.06, -2.0 - 0.15, 0.5]))
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    w.grad = torch.tensor([0.1, 0.1])
    coupled_grad_(w, torch.tensor([0.5, -1.0]), lam_t=2.0)
    torch.testing.assert_close(w.grad, torch.tensor([1.1, -1.9]))
    v = torch.tensor([1.0], requires_grad=True)                      # no task gradient
    coupled_grad_(v, torch.tensor([0.0]), lam_t=0.5)
    torch.testing.assert_close(v.grad, torch.tensor([0.5]))


def test_coupled_term_enters_adams_moments_unlike_plain_adamw():
    """One step from identical states: exp_avg differs by (1-b1) lam e and exp_avg_sq by
    (1-b2)((g + lam e)^2 - g^2), with e = w - Q(w) at the pre-step weights."""
    torch.manual_seed(1)
    x = torch.randn(8, 32)
    base = QuantLinear(32, 4, w_bits=2, a_bits=8)
    models = [base, QuantLinear.from_float(nn.Linear(32, 4), 2, 8)]
    models[1].load_state_dict(base.state_dict())
    settings = TrainSettings(lr=1e-2, weight_decay=0.1, grad_clip=1.0)
    opts = [build_optimizer(m, settings) for m in models]
    lam = 3.0
    hooks, last = last_step_hooks("coupled", lam=lam)
    e = (base.weight - base.project_weight()).detach().clone()
    grads = []
    for i, (m, opt) in enumerate(zip(models, opts)):
        m(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), settings.grad_clip)
        grads.append(m.weight.grad.detach().clone())
        if i == 0:
            hooks.before_optimizer_step(ctx_for(m, last, lr=1e-2, optimizer=opt))
            hooks.after_optimizer_step(ctx_for(m, last, lr=1e-2, optimizer=opt))  # no-op
        opt.step()
    torch.testing.assert_close(grads[0], grads[1])
    s_cage, s_plain = opts[0].state[models[0].weight], opts[1].state[models[1].weight]
    g = grads[1]
    torch.testing.assert_close(s_cage["exp_avg"] - s_plain["exp_avg"], 0.1 * lam * e,
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s_cage["exp_avg_sq"] - s_plain["exp_avg_sq"],
                               0.05 * ((g + lam * e) ** 2 - g ** 2), atol=1e-7, rtol=1e-4)
    # the bias is not a quantized weight: its moments are untouched
    torch.testing.assert_close(opts[0].state[models[0].bias]["exp_avg"],
                               opts[1].state[models[1].bias]["exp_avg"])


# ----------------------------------------------------------------------------------------
# scope and mixed bits
# ----------------------------------------------------------------------------------------
class _Mixed(nn.Module):
    """Embedding, norm, a w4a4 layer with bias, a w16a8 layer (float weight), a float head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.norm = nn.LayerNorm(16)
        self.q4 = QuantLinear(16, 16, bias=True, w_bits=4, a_bits=4)
        self.act_only = QuantLinear(16, 16, bias=False, w_bits=16, a_bits=8)
        self.head = nn.Linear(16, 10)


@pytest.mark.parametrize("mode", ["decoupled", "coupled"])
def test_only_quantized_weights_get_the_term(mode):
    torch.manual_seed(2)
    model = _Mixed()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    hooks, last = last_step_hooks(mode, lam=10.0)
    ctx = ctx_for(model, last, lr=0.05)
    hooks.before_optimizer_step(ctx)
    hooks.after_optimizer_step(ctx)
    touched = {n for n, p in model.named_parameters()
               if not torch.equal(p.detach(), before[n]) or p.grad.abs().sum() > 0}
    assert touched == {"q4.weight"}
    assert set(layer_errors(model)) == {"q4"}


def test_mixed_bits_pull_each_layer_toward_its_own_grid():
    torch.manual_seed(3)
    w = torch.randn(4, 32)
    model = nn.Sequential(QuantLinear(32, 4, w_bits=2, a_bits=8),
                          QuantLinear(32, 4, w_bits=8, a_bits=8))
    with torch.no_grad():
        for m in model:
            m.weight.copy_(w)
    lr, lam = 0.01, 10.0
    hooks, last = last_step_hooks("decoupled", lam=lam)
    hooks.after_optimizer_step(ctx_for(model, last, lr=lr))
    deltas = []
    for m, bits in zip(model, (2, 8)):
        expected = lr * lam * (w.numpy() - np_quest_full(w.numpy(), bits))
        delta = (w - m.weight.detach()).numpy()
        np.testing.assert_allclose(delta, expected, atol=1e-6, rtol=0)
        deltas.append(np.linalg.norm(delta))
    assert deltas[0] > 20 * deltas[1]             # 2-bit error >> 8-bit error
    rec = hooks.log_fields(ctx_for(model, last, lr=lr))
    assert rec["cage_lambda"] == lam
    assert rec["cage_pull_max_layer"] == "0"
    assert rec["cage_pull"]["0"] > 20 * rec["cage_pull"]["1"]
    assert rec["cage_pull_mean"] == pytest.approx(
        (rec["cage_pull"]["0"] + rec["cage_pull"]["1"]) / 2, rel=1e-3)


def test_hooks_do_nothing_outside_the_qat_phase_or_in_the_silence():
    layer = rtn_layer([[0.7, -0.33, 0.12, 0.0]])
    w0 = layer.weight.detach().clone()
    hooks = CageHooks("decoupled", lam=10.0, silence=0.8, qat_start=0, qat_steps=10)
    hooks.after_optimizer_step(ctx_for(layer, 9, lr=0.1, phase="fp"))   # not in QAT
    hooks.after_optimizer_step(ctx_for(layer, 7, lr=0.1))               # r = 0.8: silent
    assert torch.equal(layer.weight.detach(), w0)
    assert hooks.log_fields(ctx_for(layer, 9, lr=0.1, phase="fp")) == {"cage_lambda": 0.0}


def test_log_line_drops_the_per_layer_dict_for_very_deep_models():
    model = nn.Sequential(*[QuantLinear(8, 8, w_bits=4, a_bits=4)
                            for _ in range(MAX_LOGGED_LAYERS + 1)])
    rec = CageHooks(qat_start=0, qat_steps=4).log_fields(ctx_for(model, 3, lr=0.1))
    assert "cage_pull" not in rec and {"cage_pull_mean", "cage_pull_max"} <= set(rec)


# ----------------------------------------------------------------------------------------
# the real training loop
# ----------------------------------------------------------------------------------------
def test_decoupled_cage_in_the_loop_is_adamw_then_the_pull(runs):
    """silence 0.9 over a 10-step QAT phase: lambda is non-zero only at the last step, so a
    cage-d run ends at AdamW's final weights minus lr_T * lambda * (w - Q(w))."""
    common = dict(bits="w3a4", steps=10, cage_silence=0.9, cage_lambda=20.0)
    plain_run, _ = train_run(DIGITS, runs, name="plain", **common)
    prep = prepare_run(DIGITS, runs, name="cage", optimizer="cage-d", **common)
    cage_run, _ = runner.execute(prep)
    plain, cage = plain_run.load_weights(), cage_run.load_weights()
    lr_last = prep.settings.lr * prep.schedule.lr_factor(9)
    model = prepare_run(DIGITS, runs, bits="w3a4").model
    model = quantize_model(model, prep.bitconfig)
    model.load_state_dict(plain)
    mods = dict(quantized_modules(model))
    assert mods
    for name, tensor in plain.items():
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and layer in mods:
            q = mods[layer].project_weight()
            expected = tensor - lr_last * 20.0 * (tensor - q)
            torch.testing.assert_close(cage[name], expected, atol=1e-6, rtol=1e-5)
            assert not torch.equal(cage[name], tensor)
        else:
            assert torch.equal(cage[name], tensor), name
    logs = list(cage_run.metrics("train"))
    assert logs[-1]["cage_lambda"] == 20.0 and logs[0]["cage_lambda"] == 0.0
    assert set(logs[-1]["cage_pull"]) == set(mods)


def test_resumed_cage_run_ends_with_the_same_weights(runs):
    class InterruptAt(TrainHooks):
        name = "interrupt"

        def after_optimizer_step(self, ctx):
            if ctx.step + 1 == 30:
                os.kill(os.getpid(), signal.SIGINT)

    kw = dict(bits="w4a4", optimizer="cage-c", cage_silence=0.5)   # active from step 20 of 40
    full_run, full = train_run(DIGITS, runs, name="full", **kw)
    prep = prepare_run(DIGITS, runs, name="cut", **kw)
    with pytest.raises(CoqatError, match="resume with"):
        runner.execute(prep, hooks=[*runner.make_hooks(prep), InterruptAt()])
    cut = next(p for p in runs.iterdir() if p.name.startswith("cut"))
    run, resumed = runner.resume(cut, progress=False)
    a, b = full_run.load_weights(), run.load_weights()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert run.load_checkpoint()["hooks"]["cage"]["config"]["mode"] == "coupled"


def test_checkpoint_with_other_cage_settings_is_refused():
    h = CageHooks("decoupled", lam=10.0, qat_start=0, qat_steps=100)
    state = h.state_dict()
    CageHooks("decoupled", lam=10.0, qat_start=0, qat_steps=100).load_state_dict(state)
    with pytest.raises(CoqatError, match="CAGE settings"):
        CageHooks("coupled", lam=10.0, qat_start=0, qat_steps=100).load_state_dict(state)


def test_cage_under_two_process_ddp_keeps_the_ranks_identical(tmp_path):
    """torchrun, 2 CPU processes: CAGE runs on every rank after the all-reduced step; the
    loop compares the ranks' weight digests at the end and fails if they differ."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "coqat", "train", "--space", DIGITS, "--bits", "w4a4",
           "--optimizer", "cage-d", "--cage-silence", "0.5", "--steps", "10",
           "--out", str(tmp_path / "ddp"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["eval"]["ddp_world_size"] == 2
    (run_dir,) = list((tmp_path / "ddp").iterdir())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["cage_lambda"] for r in lines if r["kind"] == "train"][-1] == 10.0


# ----------------------------------------------------------------------------------------
# toy quadratic (reference/cage.md section 4)
# ----------------------------------------------------------------------------------------
GRID_STEP = 6.0 / 15.0         # fixed 4-bit midrise grid on [-3, 3]: levels (k - 1/2) * step


def grid_q(x: torch.Tensor) -> torch.Tensor:
    return torch.round(torch.clamp(x, -3.0, 3.0) / GRID_STEP + 0.5) * GRID_STEP - GRID_STEP / 2


def run_toy(kappa: float, method: str, lam: float, seeds: int = 5, d: int = 256,
            steps: int = 8000, silence: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) = 1/2 sum h (x - x*)^2, h = linspace(1, kappa), STE gradient h (Q(x) - x*).

    Seeds are rows of one tensor (the problem is separable, the optimizers elementwise).
    Uses the same update-rule functions as CageHooks and torch's own SGD / AdamW.
    Returns (excess f(Q(x_T)) - f(Q(x*)), share of coordinates on the wrong grid point)
    per seed.
    """
    g = torch.Generator().manual_seed(int(kappa))
    h = torch.linspace(1.0, kappa, d, dtype=torch.float64)
    xs = torch.randn(seeds, d, generator=g, dtype=torch.float64)
    x = torch.full((seeds, d), 1e-3, dtype=torch.float64, requires_grad=True)
    sgd = method.startswith("sgd")
    lr = 1.0 / kappa if sgd else 1e-2
    opt = (torch.optim.SGD([x], lr=lr) if sgd else
           torch.optim.AdamW([x], lr=lr, betas=(0.9, 0.999), weight_decay=0.0))
    for t in range(steps):
        lam_t = cage_lambda(t, 0, steps, lam, silence)
        with torch.no_grad():
            q = grid_q(x)
            x.grad = h * (q - xs)
            if method in ("sgd-cage", "adam-cage-c"):
                coupled_grad_(x, q, lam_t)
        opt.step()
        if method == "adam-cage-d":
            decoupled_update_(x, grid_q(x.detach()), lr, lam_t)
    with torch.no_grad():
        def f(z):
            return 0.5 * (h * (z - xs) ** 2).sum(-1)

        qt, qs = grid_q(x), grid_q(xs)
        return f(qt) - f(qs), (qt != qs).double().mean(-1)


@pytest.mark.parametrize("kappa", [1.0, 10.0, 100.0])
def test_toy_quadratic_ste_misses_the_grid_optimum_and_cage_finds_it(kappa):
    ex_sgd, wrong_sgd = run_toy(kappa, "sgd", 0.0)
    ex_adam, wrong_adam = run_toy(kappa, "adam", 0.0)
    assert wrong_sgd.min() >= 0.15 and wrong_adam.min() >= 0.15          # (a)
    ex_cage_sgd, wrong_cage_sgd = run_toy(kappa, "sgd-cage", kappa)     # lambda = max h
    assert ex_cage_sgd.max() < 1e-6 and wrong_cage_sgd.max() == 0.0      # (b)
    ex_c, _ = run_toy(kappa, "adam-cage-c", kappa)
    ex_d, _ = run_toy(kappa, "adam-cage-d", 10.0)
    assert ex_c.mean() < 0.05 * ex_adam.mean()                           # (c)
    assert ex_d.mean() < 0.05 * ex_adam.mean()

