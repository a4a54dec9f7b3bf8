"""Mixing layers for the bit-width search: shared master weights, one matmul per layer.

A ``SearchLinear`` / ``SearchConv2d`` holds the *same* weight and bias Parameters as the
float layer it replaces (state_dict keys, the FP-phase weights and the optimizer all carry
over), plus the candidate bit widths of its weight and of its input. Per forward it

1. rotates each operand ONCE along the reduction dim (the Hadamard block QuantLinear would
   use: QuEST's half form, both operands in the rotated basis); an input that several
   layers read (q/k/v, gate/up) once for all of them, and a hard choice's quantized input
   is shared too (``coqat.quant.shared``);
2. quantizes the rotated operand at each candidate width with ``ste_quantize`` (the
   reference quantizer, masked straight-through backward);
3. mixes those by the weights the search set on the module (``w_mix``, ``a_mix``);
4. runs ONE matmul / conv on the mixed operands.

No per-candidate weight copies are stored and no K-fold matmuls are run; the extra work of a
search step over a QAT step is K elementwise quantizations per operand.

A mix is either an ``int`` (a hard choice: only that candidate is computed, no gradient to
the architecture, bit-for-bit the QuantLinear / QuantConv2d forward at those bits) or a
tensor of K weights (soft Gumbel-softmax weights, or a straight-through one-hot whose
forward is exactly one-hot and whose backward is the soft sample's). Candidates with a
zero weight are still computed in the tensor case, because their gradient w.r.t. the
mixing weight is their own quantized value.
"""

from __future__ import annotations

import warnings
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.exc import TorchDynamoException

from coqat.bitconfig import FLOAT_BITS, BitConfig, check_bits
from coqat.errors import CoqatError
from coqat.quant import autocast_input, quantize_model
from coqat.quant.hadamard import hadamard_block_for, hadamard_transform
from coqat.quant.shared import shared_operand
from coqat.quant.quantizers import (
    QuantSpec,
    RowParams,
    _resolve_max_block,
    quantize_rows_from,
    quantize_rows_with,
    row_params,
    row_statistic,
    ste_quantize,
)

#: a hard choice (index into the candidates) or a weight per candidate
Mix = Union[int, torch.Tensor]


def _rotate(t: torch.Tensor, block: int) -> torch.Tensor:
    return hadamard_transform(t, block) if block > 1 else t


def mix_quantized(r: torch.Tensor, choices: tuple[int, ...], mix: Mix, method: str,
                  rows: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                  table: torch.Tensor | None = None,
                  fused_backend: str | None = None) -> torch.Tensor:
    """``sum_k mix[k] * Q_{choices[k]}(r)`` (``Q_16`` = identity) over an already-rotated
    ``r``; ``rows`` reshapes ``r`` into the rows that share a scale. An int ``mix``
    computes only that candidate (through ``ste_quantize``, as QuantLinear does).

    ``table``: the candidates' ``_candidate_table`` (built here when not given).
    ``fused_backend``: run the soft mix as two ``torch.compile``d functions (see
    ``_MixQuantFn``) on that backend; None runs it eagerly."""
    if isinstance(mix, int):
        bits = choices[mix]
        if bits == FLOAT_BITS:
            return r
        return ste_quantize(rows(r) if rows is not None else r, bits, method).reshape(r.shape)
    if mix.shape != (len(choices),):
        raise ValueError(f"mix has shape {tuple(mix.shape)}, expected ({len(choices)},)")
    if table is None:
        table = _candidate_table(tuple(choices), r.device)[0]
    floats = tuple(b == FLOAT_BITS for b in choices)
    return _MixQuantFn.apply(r, mix, table, floats, method, rows, fused_backend)


def _candidates(x: torch.Tensor, table: torch.Tensor, floats: tuple[bool, ...], method: str):
    """(values, mask) of float32 rows ``x`` at every candidate (a 16-bit one: ``x``, mask
    None); the row statistic is computed once, since it does not depend on the width."""
    stat = row_statistic(x, method)
    for k, is_float in enumerate(floats):
        if is_float:
            yield x, None
        else:
            res = quantize_rows_from(x, stat, RowParams(*table[:, k].unbind(0)), method,
                                     codes=False)
            yield res.values, res.mask


def _weighted_sum(y: torch.Tensor, values) -> torch.Tensor:
    """``sum_k y[k] * values[k]``, added in candidate order."""
    out = None
    for k, v in enumerate(values):
        out = y[k] * v if out is None else out + y[k] * v
    return out


def _mix_values(x: torch.Tensor, y: torch.Tensor, table: torch.Tensor,
                floats: tuple[bool, ...], method: str) -> torch.Tensor:
    """``sum_k y[k] * Q_k(x)`` (the forward of a soft mix)."""
    return _weighted_sum(y, (v for v, _ in _candidates(x, table, floats, method)))


def _mix_grads(x: torch.Tensor, y: torch.Tensor, table: torch.Tensor,
               floats: tuple[bool, ...], method: str, g: torch.Tensor):
    """The backward of ``_mix_values`` at output gradient ``g``, the candidates recomputed:
    ``dL/dy[k] = <g, Q_k(x)>`` and ``dL/dx = (sum_k y[k] M_k) * g``."""
    grad_y, through = [], None
    for k, (v, m) in enumerate(_candidates(x, table, floats, method)):
        grad_y.append((v * g).sum())
        w = y[k] if m is None else y[k] * m.to(torch.float32)
        through = w if through is None else through + w
    return torch.stack(grad_y), through * g


_COMPILED: dict[tuple[str, str], Callable] = {}
_FAILED: set = set()      # backends that could not compile the soft mixes in this process


def _compiled(fn: Callable, backend: str) -> Callable:
    """``fn`` under ``torch.compile`` (dynamic shapes: one graph serves every layer's shape),
    built once per backend."""
    key = (fn.__name__, backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, backend=backend, dynamic=True, fullgraph=True)
    return _COMPILED[key]


def _run_fused(fn: Callable, backend, *args):
    """``fn(*args)`` compiled on ``backend``; where that backend cannot compile it, ``fn``
    eagerly (the same operations), with one warning per process: a compiler failure costs
    speed, not the search."""
    if backend not in _FAILED:
        try:
            return _compiled(fn, backend)(*args)
        except TorchDynamoException as err:
            _FAILED.add(backend)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            warnings.warn(f"coqat: the search's soft mixes could not be compiled"
                          f" ({type(err).__name__}: {first[:200]}); they run eagerly",
                          RuntimeWarning, stacklevel=2)
    return fn(*args)


class _MixQuantFn(torch.autograd.Function):
    """``sum_k y_k Q_k(r)`` with the masked straight-through backward of every candidate.

    One function instead of K quantize/multiply/add graph nodes. Eagerly (``backend``
    None) the forward keeps the K quantized copies and masks of this operand (freed after
    the backward), and the backward is one mat-vec for the mixing weights
    (``dL/dy_k = <g, Q_k(r)>``) and one for ``r`` (``dL/dr = (sum_k y_k M_k) * g``).
    Eager elementwise work is what made the architecture step 2x a weight step on a GPU
    (~20 kernels per candidate per operand per layer), so with a ``backend`` the forward
    and the backward are each one compiled function (``_mix_values``, ``_mix_grads``) that
    keeps nothing but ``r`` and recomputes the candidates in the backward. Both compute the
    same operations; a compiler may fuse the float32 steps (e.g. into FMAs), so the two
    paths agree to rounding, not bit for bit. That is only for the soft mixes of the
    architecture step: a hard choice never comes here.
    """

    @staticmethod
    def forward(ctx, r, y, table, floats, method, rows, backend):
        r32 = r.detach().to(torch.float32)
        x = rows(r32) if rows is not None else r32
        y32 = y.detach().to(torch.float32)
        ctx.in_dtype, ctx.y_dtype = r.dtype, y.dtype
        ctx.floats, ctx.method, ctx.backend = floats, method, backend
        if backend is not None:
            out = _run_fused(_mix_values, backend, x, y32, table, floats, method)
            ctx.save_for_backward(x, y32, table)
            return out.reshape(r.shape)
        values, masks = [], []
        for v, m in _candidates(x, table, floats, method):
            values.append(v.reshape(-1))
            masks.append(torch.ones(v.numel(), dtype=torch.bool, device=v.device)
                         if m is None else m.reshape(-1))
        ctx.save_for_backward(torch.stack(values), torch.stack(masks), y32)
        return _weighted_sum(y32, values).reshape(r.shape)

    @staticmethod
    def backward(ctx, grad):
        if ctx.backend is not None:
            x, y32, table = ctx.saved_tensors
            g = grad.to(torch.float32).reshape(x.shape)
            grad_y, grad_x = _run_fused(_mix_grads, ctx.backend, x, y32, table, ctx.floats,
                                        ctx.method, g)
            return (grad_x.reshape(grad.shape).to(ctx.in_dtype), grad_y.to(ctx.y_dtype),
                    None, None, None, None, None)
        q, masks, y32 = ctx.saved_tensors
        g = grad.reshape(-1).to(torch.float32)
        grad_y = (q @ g).to(ctx.y_dtype) if ctx.needs_input_grad[1] else None
        grad_r = None
        if ctx.needs_input_grad[0]:
            pass_through = y32 @ masks.to(torch.float32)
            grad_r = (pass_through * g).reshape(grad.shape).to(ctx.in_dtype)
        return grad_r, grad_y, None, None, None, None, None


class _PickedQuantFn(torch.autograd.Function):
    """``Q_b(r)`` for the candidate ``pick`` (a 0-dim index tensor) of a table of widths, with
    the masked straight-through backward; a 16-bit candidate passes ``r`` through.

    The compiled weight step's hard choice: the same values and masks as ``ste_quantize`` at
    that width (``quantize_rows_with`` on the same constants), but the width is data, so
    drawing another one does not recompile the step.
    """

    @staticmethod
    def forward(ctx, r, pick, table, is_float, method, rows):
        r32 = r.detach().to(torch.float32)
        q_in = rows(r32) if rows is not None else r32
        # index_select, not table[:, pick]: a tensor used as a Python index would be read
        # back to the host (and make the compiled graph depend on its value)
        params = torch.index_select(table, 1, pick.reshape(1)).reshape(-1)
        res = quantize_rows_with(q_in, RowParams(*params.unbind(0)), method)
        float_pick = torch.index_select(is_float, 0, pick.reshape(1)).reshape(())
        values = torch.where(float_pick, r32, res.values.reshape(r.shape))
        ctx.save_for_backward(res.mask.reshape(r.shape) | float_pick)
        ctx.in_dtype = r.dtype
        return values

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad.masked_fill(~mask, 0.0).to(ctx.in_dtype), None, None, None, None, None


def _candidate_table(choices: tuple[int, ...], device: torch.device):
    """RowParams of each candidate stacked to [4, K] (a 16-bit one gets 8-bit placeholders,
    never used), and which candidates are 16-bit."""
    like = torch.empty((), device=device)
    params = [row_params(b if b != FLOAT_BITS else 8, like) for b in choices]
    table = torch.stack([torch.stack(list(p)) for p in params], dim=1)
    return table, torch.tensor([b == FLOAT_BITS for b in choices], device=device)


class _SearchLayer:
    """What SearchLinear and SearchConv2d share (a mixin, like coqat.quant's _QuantLayer).

    Under ``torch.compile`` a hard choice (int mixes, the search's weight steps) runs through
    ``_PickedQuantFn`` on the index buffers ``w_pick`` / ``a_pick``: a compiled step traces
    the choice as data and is not recompiled for every assignment drawn. Eagerly (and for
    soft mixes) the forward is the one described in the module docstring.
    """

    w_choices: tuple[int, ...]
    a_choices: tuple[int, ...]
    method: str
    block: int
    w_mix: Mix | None
    a_mix: Mix | None

    def setup(self, w_choices, a_choices, method: str, hadamard_block: int | None) -> None:
        for b in (*w_choices, *a_choices):
            check_bits(b)
        if not w_choices or not a_choices:
            raise CoqatError("a search layer needs at least one weight and one activation"
                             " candidate")
        QuantSpec(8, method, hadamard_block)  # validates method and block
        self.w_choices, self.a_choices = tuple(w_choices), tuple(a_choices)
        self.method = method
        self.block = self._rotation_block(_resolve_max_block(method, hadamard_block))
        self.w_mix = self.a_mix = None
        self.hard = False
        self.fused_backend: str | None = None      # see fuse_soft_mixes
        dev = self.weight.device
        for kind, choices in (("w", self.w_choices), ("a", self.a_choices)):
            table, is_float = _candidate_table(choices, dev)
            self.register_buffer(f"{kind}_table", table, persistent=False)
            self.register_buffer(f"{kind}_is_float", is_float, persistent=False)
            self.register_buffer(f"{kind}_pick", torch.zeros((), dtype=torch.long, device=dev),
                                 persistent=False)

    def _rotation_block(self, max_block: int) -> int:
        raise NotImplementedError

    def set_mix(self, w_mix: Mix, a_mix: Mix) -> None:
        self.w_mix, self.a_mix = w_mix, a_mix
        self.hard = isinstance(w_mix, int) and isinstance(a_mix, int)
        if self.hard:          # what a compiled forward reads (see the class docstring)
            self.w_pick.fill_(w_mix)
            self.a_pick.fill_(a_mix)

    def _compiled_hard(self) -> bool:
        return self.hard and torch.compiler.is_compiling()

    def _picked(self, t: torch.Tensor, kind: str,
                rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The operand at the hard choice held in the ``{kind}_pick`` buffer."""
        r = _rotate(t, self.block)
        q = _PickedQuantFn.apply(r, getattr(self, f"{kind}_pick"), getattr(self, f"{kind}_table"),
                                 getattr(self, f"{kind}_is_float"), self.method, rows)
        return q.to(t.dtype)

    def _mixes(self) -> tuple[Mix, Mix]:
        if self.w_mix is None or self.a_mix is None:
            raise RuntimeError("search layer used before the search set its mixing weights")
        return self.w_mix, self.a_mix

    def _is_float(self, w_mix: Mix, a_mix: Mix) -> bool:
        """A hard w16a16 choice: the plain float layer (as QuantLinear does, no rotation)."""
        return isinstance(w_mix, int) and isinstance(a_mix, int) and \
            self.w_choices[w_mix] == FLOAT_BITS and self.a_choices[a_mix] == FLOAT_BITS

    def _operand(self, t: torch.Tensor, kind: str, mix: Mix,
                 rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        return self._mixed(_rotate(t, self.block), kind, mix, rows)

    def _mixed(self, r: torch.Tensor, kind: str, mix: Mix,
               rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The rotated operand ``r`` quantized at ``mix``, in ``r``'s dtype."""
        choices = self.w_choices if kind == "w" else self.a_choices
        return mix_quantized(r, choices, mix, self.method, rows,
                             table=getattr(self, f"{kind}_table"),
                             fused_backend=self.fused_backend).to(r.dtype)

    def _input_operand(self, x: torch.Tensor, a_mix: Mix,
                       layout: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
                       ) -> torch.Tensor:
        """The input operand at ``a_mix`` (as ``_operand``), rows last after ``layout``.

        Layers that read the same ``x`` share its rotation, and a hard choice's quantized
        operand too (``coqat.quant.shared``); a soft mix is this layer's own."""
        name = type(self).__name__
        r = shared_operand(x, (name, "rotated", self.block),
                           lambda: _rotate(layout(autocast_input(x)), self.block))
        if not isinstance(a_mix, int):
            return self._mixed(r, "a", a_mix)
        return shared_operand(x, (name, self.a_choices[a_mix], self.block, self.method),
                              lambda: self._mixed(r, "a", a_mix))

    def quant_error(self, kind: str, index: int, t: torch.Tensor) -> torch.Tensor:
        """Q(t) - t in the original basis, ``t`` the weight (``kind`` "w") or an input of
        this layer ("a") quantized at choice ``index`` exactly as the forward does (rotated,
        quantized, rotated back): the perturbation the layer's output sees. No gradient."""
        choices = self.w_choices if kind == "w" else self.a_choices
        if choices[index] == FLOAT_BITS:
            return torch.zeros_like(t)
        with torch.no_grad():
            return self._error(kind, choices, index, t)

    def _error(self, kind: str, choices, index: int, t: torch.Tensor) -> torch.Tensor:
        q = self._operand(t, kind, index)
        return _rotate(q, self.block) - t

    def _search_repr(self) -> str:
        return (f"w_choices={list(self.w_choices)}, a_choices={list(self.a_choices)}, "
                f"method={self.method}, block={self.block}")


class SearchLinear(_SearchLayer, nn.Linear):
    """nn.Linear whose weight and input are mixtures of their quantized candidates."""

    @classmethod
    def from_float(cls, module: nn.Linear, w_choices, a_choices, method: str = "quest",
                   hadamard_block: int | None = None) -> "SearchLinear":
        """Wrap ``module`` reusing its Parameters (no copies)."""
        if not isinstance(module, nn.Linear):
            raise CoqatError(f"SearchLinear needs an nn.Linear, got {type(module).__name__}")
        m = cls(module.in_features, module.out_features, module.bias is not None,
                device="meta", dtype=module.weight.dtype)
        m.weight, m.bias = module.weight, module.bias
        m.setup(w_choices, a_choices, method, hadamard_block)
        return m.train(module.training)

    def _rotation_block(self, max_block: int) -> int:
        return hadamard_block_for(self.in_features, max_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled_hard():
            x = autocast_input(x)
            return F.linear(self._picked(x, "a"), self._picked(self.weight, "w"), self.bias)
        w_mix, a_mix = self._mixes()
        if self._is_float(w_mix, a_mix):
            return F.linear(autocast_input(x), self.weight, self.bias)
        return F.linear(self._input_operand(x, a_mix), self._operand(self.weight, "w", w_mix),
                        self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._search_repr()}"


class SearchConv2d(_SearchLayer, nn.Conv2d):
    """nn.Conv2d version; the operand layout follows QuantConv2d (rotation over input
    channels, one weight scale per output channel, one activation scale per pixel)."""

    @classmethod
    def from_float(cls, module: nn.Conv2d, w_choices, a_choices, method: str = "quest",
                   hadamard_block: int | None = None) -> "SearchConv2d":
        if not isinstance(module, nn.Conv2d):
            raise CoqatError(f"SearchConv2d needs an nn.Conv2d, got {type(module).__name__}")
        m = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                module.padding, module.dilation, module.groups, module.bias is not None,
                module.padding_mode, device="meta", dtype=module.weight.dtype)
        m.weight, m.bias = module.weight, module.bias
        m.setup(w_choices, a_choices, method, hadamard_block)
        return m.train(module.training)

    def _rotation_block(self, max_block: int) -> int:
        return hadamard_block_for(self.in_channels, max_block) if self.groups == 1 else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.permute(0, 2, 3, 1)
        per_channel = lambda r: r.reshape(r.shape[0], -1)  # noqa: E731
        if self._compiled_hard():
            xq = self._picked(autocast_input(x).movedim(-3, -1), "a").movedim(-1, -3)
            wq = self._picked(w, "w", rows=per_channel)
        else:
            w_mix, a_mix = self._mixes()
            if self._is_float(w_mix, a_mix):
                return self._conv_forward(autocast_input(x), self.weight, self.bias)
            xq = self._input_operand(x, a_mix, layout=lambda t: t.movedim(-3, -1))
            xq = xq.movedim(-1, -3)
            wq = self._operand(w, "w", w_mix, rows=per_channel)
        return self._conv_forward(xq.contiguous(), wq.permute(0, 3, 1, 2).contiguous(),
                                  self.bias)

    def _error(self, kind: str, choices, index: int, t: torch.Tensor) -> torch.Tensor:
        if kind == "w":                      # the forward's layout: [out, kh, kw, in] rows
            w = t.permute(0, 2, 3, 1)
            q = self._operand(w, kind, index, rows=lambda r: r.reshape(r.shape[0], -1))
            return (_rotate(q, self.block) - w).permute(0, 3, 1, 2)
        x = t.movedim(-3, -1)                # one row per pixel, channels last
        return (_rotate(self._operand(x, kind, index), self.block) - x).movedim(-1, -3)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._search_repr()}"


SEARCH_TYPES = (SearchLinear, SearchConv2d)


def fuse_soft_mixes(modules: dict[str, _SearchLayer], backend: str | None = "inductor") -> None:
    """Run the soft mixes of ``modules`` (the architecture step's) as compiled functions on
    ``backend`` (None: eagerly again); see ``_MixQuantFn``. Hard choices are unaffected."""
    for m in modules.values():
        m.fused_backend = backend


def set_assignment(modules: dict[str, _SearchLayer], problem, asg) -> None:
    """Hard mixing at assignment ``asg``: the model then computes exactly that config."""
    for n, m in modules.items():
        w, a = problem.bits_of(asg, n)
        m.set_mix(m.w_choices.index(w), m.a_choices.index(a))


def to_search_model(model: nn.Module, problem, method: str | None = None,
                    hadamard_block: int | None = None) -> dict[str, _SearchLayer]:
    """Swap the problem's searchable layers for mixing layers (in place, by FQN) and its
    pinned layers for their fixed quantized versions; returns FQN -> mixing layer.

    Parameters are shared, never copied: optimizer state and the FP weights carry over.
    """
    method = method or problem.quantizer
    pins = {n: b for n, b in problem.pinned.items() if not b.is_float}
    if pins:
        quantize_model(model, BitConfig(pins), method=method, hadamard_block=hadamard_block)
    out: dict[str, _SearchLayer] = {}
    for n in problem.searchable:
        mod = model.get_submodule(n)
        wd = problem.w_decisions[problem.layer_w[n]]
        ad = problem.a_decisions[problem.layer_a[n]]
        if isinstance(mod, nn.Conv2d):
            new = SearchConv2d.from_float(mod, wd.choices, ad.choices, method, hadamard_block)
        elif isinstance(mod, nn.Linear):
            new = SearchLinear.from_float(mod, wd.choices, ad.choices, method, hadamard_block)
        else:
            raise CoqatError(f"searchable layer {n!r} is a {type(mod).__name__}; only"
                             " nn.Linear and nn.Conv2d can be searched")
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        out[n] = new
    return out
