"""Differentiable bit-width search: Gumbel-softmax over each decision, Lagrangian on E[BOPs].

State: one logit vector per decision (``SearchProblem``: weight bits per layer, activation
bits per tie group), the Lagrange multiplier ``mu`` and an SGD optimizer for the logits. The
logits are NOT parameters of the model, so the training loop's AdamW never sees them.

One search step, driven through the training loop's hooks:

- **weight step** (the loop's own step, on the *train* split): every decision draws a hard
  sample from its categorical ``softmax(logits)`` (Gumbel-max), the mixing layers compute
  only that candidate, and AdamW updates the shared weights. The weights so learn to serve
  the configurations the search currently favours; this step costs what a QAT step costs.
- **architecture step** (every ``arch_every`` weight steps, on the *holdout* split, which
  never updates weights): a relaxed sample ``y = softmax((logits + g) / tau)`` per decision
  (``relax = "hard"``: the straight-through one-hot with the soft sample's gradient) mixes
  every candidate, and the logits descend (normalised, see below)

      L = task_loss(holdout) + mu * c,    c = (E[BOPs] - B) / (B - F)

  where E[BOPs] = sum_l MACs_l E[w_l] E[a_l] + F is exact under the independent
  categoricals (``CostModel.expected_bops``), B the budget and F the BOPs no decision moves
  (attention, pinned layers). ``c`` is ``E[BOPs]/B - 1`` rescaled by ``B/(B-F)``: the same
  constraint (zero at the same point, same sign), but its size is the relative excess of
  the *searchable* part, so one ``eta_mu`` fits models whose BOPs are mostly fixed (lm-tiny:
  75% of W4A4 is attention and the float lm_head) and models where everything is searched.
- **dual ascent** after each architecture step: ``mu <- max(0, mu + eta_mu * c)``.

Why SGD, and on normalised gradients. Adam divides each logit's step by a running RMS of
*its own* gradient, so once the penalty dominates, the step no longer grows with ``mu`` and
the multiplier stops steering the bits (search_anchors.md §12, HGQ2 #12). We use plain SGD
on ``g_task / s_task + mu * g_cost / s_cost``, where ``s_task`` and ``s_cost`` are running
RMS values of each term's gradient over ALL logits (EMA, ``GRAD_SCALE_BETA``). Measured on
lm-tiny from FP weights, the raw task gradient per logit is ~1e-4 and the constraint's
~1e-2, so an unnormalised multiplier would have to settle near 0.01 and any fixed
``eta_mu``/``arch_lr`` would only fit one model. Normalised, ``mu`` is dimensionless
(``mu = 1``: the budget pulls as hard as the task) and the defaults transfer. The scales
are shared by all logits and do not depend on ``mu``, so the budget's pull on each logit is
exactly ``arch_lr * mu * g_cost / s_cost``: linear in ``mu`` (a test pins it), with the
layers' relative pulls (MACs x bits) intact. In Lagrangian terms the logits descend
``task / s_task + mu * c / s_cost``: the same constraint, with a positive rescaling of the
multiplier.

Temperature: ``tau_k = tau_start * (tau_end / tau_start) ** (k / (K - 1))`` over the K
architecture steps (exponential annealing): early samples are soft, so every candidate gets
gradient; late samples are near one-hot, so the loss the logits see is the loss of
configurations that can be deployed.

Derivation (``derive``): argmax per decision, then the knapsack repair valued by the
learned log-probabilities, so the final BOPs are <= B exactly.

Where it runs. The logits, the multiplier, the Gumbel noise and E[BOPs] live on the CPU
whatever the model's device: they are a few hundred numbers, and a hard sample drawn there
is a Python int at once (on a GPU every ``argmax`` would be a host sync per decision per
step). A soft sample goes to the model's device in one copy (``_to_device``); the gradient
comes back the same way. With ``--compile`` on (the CUDA default) the weight steps are
compiled by the loop, without CUDA graphs (the architecture step runs the model between two
of them). By default the architecture step runs eagerly: its cold compile (146 s on lm-30m
on an H200) pays only after ~1100 steps, and the lm-30m search has 500
(reports/search_steps.json); only its soft mixes are compiled then (two small graphs,
``relax.fuse_soft_mixes``), which removes most of its eager elementwise work.
``[search] compile_arch = true`` compiles the whole step through its own ``torch.compile``
of the model: a mix is data to that graph, so every soft sample reuses it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from coqat.cost import CostModel
from coqat.bitsearch.knapsack import RepairResult, repair, total_value
from coqat.bitsearch.problem import Assignment, SearchProblem
from coqat.bitsearch.relax import Mix, fuse_soft_mixes, set_assignment
from coqat.config import SearchSettings
from coqat.training.hooks import StepContext, TrainHooks
from coqat.training.loop import autocast, compile_enabled
from coqat.workloads.base import to_device
from coqat.workloads.sampling import stable_seed


#: EMA factor of the running gradient scales that normalise the two terms of the Lagrangian
GRAD_SCALE_BETA = 0.9


def temperature(k: int, total: int, start: float, end: float) -> float:
    """Exponentially annealed temperature of architecture step ``k`` of ``total``."""
    if total <= 1:
        return end
    frac = min(max(k / (total - 1), 0.0), 1.0)
    return start * (end / start) ** frac


def gumbel_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard Gumbel noise from a generator seeded by ``seed`` (same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    u = u.clamp(1e-12, 1 - 1e-12)
    return (-torch.log(-torch.log(u))).to(torch.float32)


class GumbelSearch:
    """Logits, multiplier and optimizer of one search (state, hence a class)."""

    def __init__(self, problem: SearchProblem, cost: CostModel, modules: dict[str, nn.Module],
                 budget: int, settings: SearchSettings, seed: int,
                 device: torch.device | str = "cpu", arch_steps: int = 1):
        self.problem, self.cost, self.modules = problem, cost, modules
        self.budget, self.settings, self.seed = int(budget), settings, int(seed)
        self.device = torch.device(device)
        self.free = self.budget - problem.fixed_bops      # B - F, > 0 for a feasible budget
        if self.free <= 0:
            raise ValueError("budget does not exceed the fixed BOPs")
        # the search's own state is on the CPU; ``device`` is the model's (module docstring)
        self.w_logits = [nn.Parameter(torch.zeros(len(d.choices)))
                         for d in problem.w_decisions]
        self.a_logits = [nn.Parameter(torch.zeros(len(d.choices)))
                         for d in problem.a_decisions]
        self.optimizer = torch.optim.SGD(self.parameters(), lr=settings.arch_lr,
                                         momentum=settings.arch_momentum)
        self.mu = float(settings.mu_init)
        self.arch_steps = max(1, int(arch_steps))
        self.k = 0                                        # architecture steps done
        self._ema: dict[str, float] = {}                  # running gradient scales
        self._bits_w = [torch.tensor(d.choices, dtype=torch.float64)
                        for d in problem.w_decisions]
        self._bits_a = [torch.tensor(d.choices, dtype=torch.float64)
                        for d in problem.a_decisions]
        if settings.init == "budget":
            self._start_on_budget()

    def _start_on_budget(self) -> None:
        """Logits ``-lam * bits / max_bits`` for every decision, ``lam`` bisected so that
        E[BOPs] = B: every layer starts with the same bit distribution, exactly on the
        budget. From uniform logits E[BOPs] sits far from B (lm-tiny at w4a4: 1.18 B), mu
        then has to spike, and the penalty pushes every layer down at once before the
        task gradient is heard; the decisions it freezes are the cost's, not the task's."""
        top = float(max(max(d.choices) for d in self.problem.decisions))

        def set_lam(lam: float) -> float:
            with torch.no_grad():
                for t, b in zip(self.parameters(), self._bits_w + self._bits_a):
                    t.copy_((-lam * b / top).to(t.dtype))
                return float(self.expected_bops())

        lo, hi = -60.0, 60.0                      # E[BOPs] falls as lam grows
        for _ in range(60):
            mid = (lo + hi) / 2
            if set_lam(mid) > self.budget:
                lo = mid
            else:
                hi = mid
        set_lam(hi)                               # the side at or under the budget

    def parameters(self) -> list[nn.Parameter]:
        return self.w_logits + self.a_logits

    # ----- distributions -------------------------------------------------------------
    def probs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return ([F.softmax(t, dim=0) for t in self.w_logits],
                [F.softmax(t, dim=0) for t in self.a_logits])

    def log_probs(self) -> tuple[list[list[float]], list[list[float]]]:
        with torch.no_grad():
            return ([F.log_softmax(t, 0).double().tolist() for t in self.w_logits],
                    [F.log_softmax(t, 0).double().tolist() for t in self.a_logits])

    def expected_bops(self) -> torch.Tensor:
        """E[BOPs] under the current categoricals, differentiable (float64)."""
        pw, pa = self.probs()
        ew = [(p.double() * b).sum() for p, b in zip(pw, self._bits_w)]
        ea = [(p.double() * b).sum() for p, b in zip(pa, self._bits_a)]
        expected: dict[str, Any] = {}
        for n in self.problem.layer_names:
            if n in self.problem.pinned:
                b = self.problem.pinned[n]
                expected[n] = float(b.w_bits * b.a_bits)
            else:
                expected[n] = ew[self.problem.layer_w[n]] * ea[self.problem.layer_a[n]]
        return self.cost.expected_bops(expected)

    def constraint(self, e_bops: torch.Tensor) -> torch.Tensor:
        """c = (E[BOPs] - B) / (B - F): > 0 over budget, < 0 under."""
        return (e_bops - self.budget) / self.free

    def argmax(self) -> Assignment:
        return Assignment(
            tuple(d.choices[int(t.argmax())] for d, t in zip(self.problem.w_decisions,
                                                             self.w_logits)),
            tuple(d.choices[int(t.argmax())] for d, t in zip(self.problem.a_decisions,
                                                             self.a_logits)))

    def temperature(self) -> float:
        s = self.settings
        return temperature(self.k, self.arch_steps, s.tau_start, s.tau_end)

    # ----- sampling and mixing ---------------------------------------------------------
    def _noise(self, i: int, kind: str, n: int, step: int, purpose: str) -> torch.Tensor:
        return gumbel_noise((n,), stable_seed(self.seed, "gumbel", purpose, step, kind, i))

    def sample(self, step: int, purpose: str, mode: str) -> tuple[list[Mix], list[Mix]]:
        """One sample per decision. ``mode``: "hard" (an index drawn from softmax(logits),
        no gradient), "soft" (Gumbel-softmax weights at the current temperature) or "st"
        (exact one-hot forward, soft backward)."""
        tau = self.temperature()
        out: tuple[list[Mix], list[Mix]] = ([], [])
        for kind, logits, dst in (("w", self.w_logits, out[0]), ("a", self.a_logits, out[1])):
            for i, t in enumerate(logits):
                g = self._noise(i, kind, t.numel(), step, purpose)
                if mode == "hard":
                    dst.append(int(torch.argmax(t.detach() + g)))
                    continue
                y = F.softmax((t + g) / tau, dim=0)
                if mode == "st":
                    hard = F.one_hot(torch.argmax(y.detach()), t.numel()).to(y.dtype)
                    y = hard + (y - y.detach())   # forward exactly one-hot
                dst.append(y)
        return out

    def _to_device(self, mixes: list[Mix]) -> list[Mix]:
        """The tensor mixes on the model's device, moved in one copy (ints stay ints)."""
        soft = [m for m in mixes if isinstance(m, torch.Tensor)]
        if not soft or self.device.type == "cpu":
            return mixes
        moved = iter(torch.cat(soft).to(self.device).split([m.numel() for m in soft]))
        return [next(moved) if isinstance(m, torch.Tensor) else m for m in mixes]

    def apply(self, mixes: tuple[list[Mix], list[Mix]]) -> None:
        n_w = len(mixes[0])
        both = self._to_device(list(mixes[0]) + list(mixes[1]))
        w_mix, a_mix = both[:n_w], both[n_w:]
        for n, m in self.modules.items():
            m.set_mix(w_mix[self.problem.layer_w[n]], a_mix[self.problem.layer_a[n]])

    def apply_assignment(self, asg: Assignment) -> None:
        """Hard mixing at ``asg``: the model computes exactly that configuration."""
        set_assignment(self.modules, self.problem, asg)

    # ----- one architecture step ---------------------------------------------------------
    def arch_step(self, model: nn.Module, batch: tuple[torch.Tensor, ...], loss_fn: Callable,
                  step: int) -> dict[str, Any]:
        """Descend the logits on ``batch`` (holdout), then move mu by dual ascent."""
        tau = self.temperature()
        mode = "st" if self.settings.relax == "hard" else "soft"
        self.apply(self.sample(step, "arch", mode))
        with autocast(self.device):
            task = loss_fn(model, batch)
        e_bops = self.expected_bops()
        c = self.constraint(e_bops)
        params = self.parameters()
        g_task = torch.autograd.grad(task.float(), params)
        g_cost = torch.autograd.grad(c.float(), params)
        s_task = self._scale("task", g_task)
        s_cost = self._scale("cost", g_cost)
        for p, gt, gc in zip(params, g_task, g_cost):
            p.grad = gt / s_task + self.mu * (gc / s_cost)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        c_val = float(c.detach())
        self.mu = max(0.0, self.mu + self.settings.eta_mu * c_val)
        self.k += 1
        return {"arch_step": self.k, "tau": tau, "holdout_loss": float(task.detach()),
                "task_grad_scale": s_task, "cost_grad_scale": s_cost,
                "constraint": c_val, "e_bops": float(e_bops.detach()),
                "e_bops_over_budget": float(e_bops.detach()) / self.budget}

    def _scale(self, key: str, grads) -> float:
        """Running RMS of a gradient over all logits (EMA, bias-corrected)."""
        rms = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads)
                        / max(1, sum(g.numel() for g in grads)))
        beta = GRAD_SCALE_BETA
        avg = beta * self._ema.get(key, 0.0) + (1 - beta) * rms
        self._ema[key] = avg
        return max(avg / (1 - beta ** (self.k + 1)), 1e-12)

    # ----- reporting ---------------------------------------------------------------------
    def entropy(self) -> float:
        """Mean entropy (nats) of the decisions' categoricals: 0 = all decided."""
        with torch.no_grad():
            pw, pa = self.probs()
        hs = [float(-(p * torch.log(p.clamp_min(1e-30))).sum()) for p in pw + pa]
        return sum(hs) / max(len(hs), 1)

    def prob_table(self) -> dict[str, list[float]]:
        with torch.no_grad():
            pw, pa = self.probs()
        ds = self.problem.w_decisions + self.problem.a_decisions
        return {d.name: [round(float(x), 5) for x in p] for d, p in zip(ds, pw + pa)}

    def state_dict(self) -> dict[str, Any]:
        return {"w": [t.detach().cpu() for t in self.w_logits],
                "a": [t.detach().cpu() for t in self.a_logits], "mu": self.mu, "k": self.k,
                "grad_scales": dict(self._ema),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for t, v in zip(self.parameters(), list(state["w"]) + list(state["a"])):
                t.copy_(v.to(t.device))
        self.mu, self.k = float(state["mu"]), int(state["k"])
        self._ema = dict(state.get("grad_scales", {}))
        self.optimizer.load_state_dict(state["optimizer"])


@dataclass
class Derived:
    """What the search hands on: the repaired assignment and how it was reached."""

    argmax: Assignment
    argmax_bops: int
    repaired: RepairResult
    layers_changed: int
    logprob_lost: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def assignment(self) -> Assignment:
        return self.repaired.assignment


def derive(search: GumbelSearch, fill: float) -> Derived:
    """Argmax per decision, then the knapsack repair (values = learned log-probabilities)
    into ``[F + fill * (B - F), B]``."""
    p = search.problem
    wv, av = search.log_probs()
    top = search.argmax()
    lo = p.fixed_bops + math.ceil(fill * search.free)
    fixed = repair(p, wv, av, search.budget, lo=lo)
    return Derived(argmax=top, argmax_bops=p.bops(top), repaired=fixed,
                   layers_changed=p.distance(top, fixed.assignment),
                   logprob_lost=total_value(p, top, wv, av) - fixed.value)


class GumbelSearchHooks(TrainHooks):
    """Drives a GumbelSearch from the training loop (see the module docstring)."""

    name = "gumbel_search"
    cuda_graphs = False     # the architecture step runs the model between two weight steps

    def __init__(self, search: GumbelSearch, total_steps: int, arch_batch_size: int,
                 trace: Callable[[dict[str, Any]], None] | None = None,
                 progress: Callable[[dict[str, Any]], None] | None = None):
        self.search, self.total_steps = search, int(total_steps)
        self.arch_batch_size = int(arch_batch_size)
        self.trace, self.progress = trace, progress
        self.last: dict[str, Any] = {}
        self.t_arch = 0.0
        self.arch_net: nn.Module | None = None

    def on_start(self, ctx: StepContext) -> None:
        # by default the architecture step runs eagerly: its cold compile (146 s on lm-30m on
        # an H200) pays only after ~1100 steps, and the lm-30m search has 500. With
        # `[search] compile_arch = true` it has its own compiled model (no CUDA graphs: see
        # the class field); one graph serves every soft sample, since a mix is an input to it
        compile_on = compile_enabled(ctx.settings, ctx.device)
        compile_arch = self.search.settings.compile_arch and compile_on
        self.arch_net = torch.compile(ctx.model) if compile_arch else None
        # an eager architecture step still compiles its soft mixes: two small graphs that
        # compile in seconds and fuse the per-candidate quantizations (relax._MixQuantFn)
        fuse_soft_mixes(self.search.modules, "inductor" if compile_on and not compile_arch
                        else None)
        self.search.apply(self.search.sample(ctx.step, "weights", "hard"))
        if self.trace is not None:
            with torch.no_grad():
                e_bops = float(self.search.expected_bops())
            self.trace({"kind": "search", "step": ctx.step, "arch_step": 0, "mu": self.search.mu,
                        "tau": self.search.temperature(), "entropy": self.search.entropy(),
                        "e_bops_over_budget": e_bops / self.search.budget,
                        "probs": self.search.prob_table()})

    def after_optimizer_step(self, ctx: StepContext) -> None:
        s = self.search
        done = ctx.step + 1
        if done % s.settings.arch_every == 0 or done == self.total_steps:
            t0 = time.perf_counter()
            batch = to_device(ctx.workload.get_batch(
                "holdout", ctx.step, self.arch_batch_size, ctx.dist.rank, ctx.dist.world_size),
                ctx.device)
            net = self.arch_net if self.arch_net is not None else ctx.model
            rec = s.arch_step(net, batch, ctx.workload.loss, ctx.step)
            self.t_arch += time.perf_counter() - t0
            rec.update({"kind": "search", "step": done, "mu": s.mu, "train_loss": ctx.loss,
                        "entropy": s.entropy(),
                        "argmax_bops_over_budget": s.problem.bops(s.argmax()) / s.budget})
            if s.k % s.settings.trace_every == 0 or done == self.total_steps:
                rec["probs"] = s.prob_table()
            self.last = rec
            if self.trace is not None:
                self.trace(rec)
            if self.progress is not None:
                self.progress(rec)
        if done >= self.total_steps:
            s.apply_assignment(s.argmax())   # the loop's final evaluation sees the argmax
        else:
            s.apply(s.sample(done, "weights", "hard"))

    def log_fields(self, ctx: StepContext) -> dict[str, Any]:
        keys = ("mu", "tau", "e_bops_over_budget", "holdout_loss")
        return {k: self.last[k] for k in keys if k in self.last}

    def state_dict(self) -> dict[str, Any]:
        return self.search.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.search.load_state_dict(state)

