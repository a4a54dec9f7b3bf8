"""Quantized Linear / Conv2d modules and the by-name model transformation.

``QuantLinear`` and ``QuantConv2d`` are drop-in subclasses of ``nn.Linear`` / ``nn.Conv2d``
that fake-quantize their weight and their input activation on every forward, from the
float master weight. They hold the *same* Parameter objects as the module they replace, so
state_dict keys and optimizer references survive ``quantize_model``.

Where the rotation goes. A matmul contracts the reduction dim K, and for an orthonormal H,
``(x H)(w H)^T = x w^T``. So:

- form "half" (QuEST's HalfHadamard, the inference-kernel form): when either operand is
  quantized, BOTH are rotated along K by the same H, the quantized ones are quantized in
  the rotated basis, and the product is taken there; no rotation back is needed.
- form "full": each quantized operand becomes ``Q(tH) H`` (back in the original basis);
  unquantized operands are untouched.

The two forms compute the same product up to float rounding; "half" is cheaper.

For Conv2d the reduction runs over (Cin, kh, kw). Rotating only the input-channel dim, by
the same H for the activation and for every (kh, kw) tap of the weight, keeps
``conv(x H, w H) = conv(x, w)`` (zero padding rotates to zero padding). Grouped convs mix
channels only inside a group, so they are not rotated (block 1). Scales: activations get
one per spatial position (over channels), weights one per output channel (over
Cin * kh * kw, after rotation).

Dtypes: the quantizers compute in float32; each quantized operand is cast back to the dtype
of the tensor it came from, so the module's dtype behaviour matches plain nn.Linear/Conv2d
(and autocast keeps working). Under autocast the input is first cast to the autocast dtype
(``autocast_input``), as the float layer casts it before its product: what is quantized is
what the float layer would have multiplied. On the GPU this halves what the quantizer reads
of a float32 input (lm-30m's RMSNorm outputs), and the norm writes bf16.

Layers that read the same input with the same activation settings (q/k/v, gate/up) take one
shared quantized operand (``coqat.quant.shared``): computed once, one backward node.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from coqat.bitconfig import FLOAT_BITS, BitConfig, check_bits
from coqat.errors import CoqatError
from coqat.quant.hadamard import hadamard_block_for, hadamard_transform
from coqat.quant.quantizers import QuantSpec, _check_form, _resolve_max_block, ste_quantize
from coqat.quant.shared import shared_operand

__all__ = ["QuantLinear", "QuantConv2d", "quantize_model", "dequantize_model", "quantized_modules",
           "autocast_input"]


# Optimizer steps taken in this process. It is part of the key of the cached Q(weight) that
# evaluation uses: the fused AdamW kernel (what coqat trains with on CUDA) updates the
# parameters in place WITHOUT bumping their version counters, so a key of versions alone
# served evaluations the Q(weight) of the first one (found on fashion-resnet on the GPU:
# val_acc 0.35 for w4a4 where the CPU gives 0.905).
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a float linear or conv takes it under autocast: a float32 (or float16/bf16)
    input cast to the autocast dtype of its device; unchanged outside autocast, and for
    float64 or integer inputs (autocast leaves those alone too)."""
    dev = x.device.type
    # Only the device types torch.compile can ask about without a graph break (Dynamo does
    # not trace torch.amp.is_autocast_available).
    if (dev in ("cuda", "cpu") and x.is_floating_point() and x.dtype != torch.float64
            and torch.is_autocast_enabled(dev)):
        return x.to(torch.get_autocast_dtype(dev))
    return x


def _rotate(t: torch.Tensor, block: int) -> torch.Tensor:
    return hadamard_transform(t, block) if block > 1 else t


class _QuantLayer:
    """State and operand handling shared by QuantLinear and QuantConv2d (a mixin)."""

    w_bits: int
    a_bits: int
    method: str
    form: str
    hadamard_block: int
    trust: float | None
    clip_ratio: float
    w_block: int
    a_block: int

    def configure(self, w_bits: int, a_bits: int, method: str = "quest",
                  hadamard_block: int | None = None, form: str = "half",
                  trust: float | None = None, clip_ratio: float = 1.0) -> "_QuantLayer":
        """Set (or change) bits and quantizer options; records the Hadamard blocks used.

        ``hadamard_block`` is the largest block allowed (None: 128 for QuEST, none for RTN).
        ``w_block`` / ``a_block`` are the blocks actually applied to each operand, 1 = none.
        """
        check_bits(w_bits, "weight bits")
        check_bits(a_bits, "activation bits")
        QuantSpec(w_bits, method, hadamard_block, trust, clip_ratio)  # validates the options
        _check_form(form)
        self.w_bits, self.a_bits, self.method, self.form = w_bits, a_bits, method, form
        self.hadamard_block = _resolve_max_block(method, hadamard_block)
        self.trust, self.clip_ratio = trust, clip_ratio
        # A backend attached to the old configuration would compute the wrong layer.
        self.__dict__.pop("kernel_forward", None)
        block = self._rotation_block(self.hadamard_block)
        if form == "half":
            self.w_block = self.a_block = block if self.is_quantized else 1
        else:
            self.w_block = block if w_bits != FLOAT_BITS else 1
            self.a_block = block if a_bits != FLOAT_BITS else 1
        return self

    def _rotation_block(self, max_block: int) -> int:
        raise NotImplementedError

    @property
    def is_quantized(self) -> bool:
        return self.w_bits != FLOAT_BITS or self.a_bits != FLOAT_BITS

    def _operand(self, t: torch.Tensor, bits: int, block: int, unrotate: bool,
                 rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Rotate ``t`` along its last dim, quantize its rows if ``bits`` < 16, maybe rotate back.

        ``rows`` reshapes the rotated tensor into the rows that share a scale (default: the
        last dim is the row).
        """
        r = _rotate(t, block)
        if bits != FLOAT_BITS:
            shape = r.shape
            q_in = rows(r) if rows is not None else r
            r = ste_quantize(q_in, bits, self.method, self.trust, self.clip_ratio).reshape(shape)
            if unrotate:
                r = _rotate(r, block)
        return r.to(t.dtype)

    def _weight_operand(self, unrotate: bool) -> torch.Tensor:
        raise NotImplementedError

    def _input_operand(self, x: torch.Tensor, unrotate: bool,
                       compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``compute(autocast_input(x))``, shared with the other layers that read the same
        ``x`` with the same activation settings (``coqat.quant.shared``)."""
        key = (type(self).__name__, self.a_bits, self.a_block, unrotate, self.method,
               self.trust, self.clip_ratio)
        return shared_operand(x, key, lambda: compute(autocast_input(x)))

    def _forward_weight(self, unrotate: bool) -> torch.Tensor:
        """Q(weight) for the forward pass. Without autograd (evaluation) it is cached and
        recomputed when the weight may have changed: the key holds the tensor's version
        (bumped by in-place updates such as load_state_dict) and the count of optimizer
        steps taken in this process (the fused optimizers do not bump versions), and
        ``train()`` drops the cache (writes through ``.data`` bump nothing)."""
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return self._weight_operand(unrotate)
        key = (self.weight._version, _OPTIMIZER_STEPS[0], self.weight.data_ptr(),
               self.weight.device, unrotate, self.w_bits, self.w_block, self.method,
               self.form, self.trust, self.clip_ratio)
        cached = self.__dict__.get("_wq_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._weight_operand(unrotate).detach())
            self.__dict__["_wq_cache"] = cached   # a plain attribute: never in state_dict
        return cached[1]

    def train(self, mode: bool = True):
        self.__dict__.pop("_wq_cache", None)
        return super().train(mode)

    def project_weight(self) -> torch.Tensor:
        """Q(weight) in the original basis, no gradient: same bits, block and scales as forward.

        CAGE's error feedback uses ``weight - project_weight()``. Returns ``self.weight``
        itself when the weight is not quantized.
        """
        if self.w_bits == FLOAT_BITS:
            return self.weight
        with torch.no_grad():
            return self._weight_operand(unrotate=True).detach()

    def weight_error(self) -> float:
        """Relative projection error ||w - Q(w)|| / ||w|| (0.0 for an unquantized weight)."""
        with torch.no_grad():
            w = self.weight.detach().to(torch.float32)
            norm = torch.linalg.vector_norm(w)
            if self.w_bits == FLOAT_BITS or norm == 0:
                return 0.0
            return float(torch.linalg.vector_norm(w - self.project_weight().to(torch.float32)) / norm)

    def _quant_repr(self) -> str:
        return (f"w_bits={self.w_bits}, a_bits={self.a_bits}, method={self.method}, "
                f"form={self.form}, w_block={self.w_block}, a_block={self.a_block}")


class QuantLinear(_QuantLayer, nn.Linear):
    """nn.Linear with fake-quantized weight (per output row) and input (per token).

    Rotation along K = in_features with block ``hadamard_block_for(in_features, max)``.

    ``kernel_forward`` is the hook a faster backend plugs into: a function
    ``(module, x) -> output or None`` that ``coqat.kernels.use_kernels`` sets; None (the
    default, and after every ``configure``) or a None result runs the fake-quant forward
    below, the numerics definition. This package never imports the kernels.
    """

    kernel_forward: Callable[["QuantLinear", torch.Tensor], torch.Tensor | None] | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None, *, w_bits: int = FLOAT_BITS, a_bits: int = FLOAT_BITS,
                 method: str = "quest", hadamard_block: int | None = None, form: str = "half",
                 trust: float | None = None, clip_ratio: float = 1.0) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self.configure(w_bits, a_bits, method, hadamard_block, form, trust, clip_ratio)

    @classmethod
    def from_float(cls, module: nn.Linear, w_bits: int, a_bits: int, method: str = "quest",
                   hadamard_block: int | None = None, form: str = "half",
                   trust: float | None = None, clip_ratio: float = 1.0) -> "QuantLinear":
        """Wrap ``module``, reusing its weight and bias Parameters (no copies, no re-init).

        A QuantLinear passed in is re-configured in place and returned. Hooks registered on
        the original module are not carried over.
        """
        if isinstance(module, cls):
            return module.configure(w_bits, a_bits, method, hadamard_block, form, trust, clip_ratio)
        if not isinstance(module, nn.Linear):
            raise CoqatError(f"QuantLinear.from_float needs an nn.Linear, got {type(module).__name__}")
        q = cls(module.in_features, module.out_features, module.bias is not None, device="meta",
                dtype=module.weight.dtype, w_bits=w_bits, a_bits=a_bits, method=method,
                hadamard_block=hadamard_block, form=form, trust=trust, clip_ratio=clip_ratio)
        q.weight = module.weight
        q.bias = module.bias
        return q.train(module.training)

    def to_float(self) -> nn.Linear:
        """A plain nn.Linear holding the same Parameters."""
        m = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                      device="meta", dtype=self.weight.dtype)
        m.weight, m.bias = self.weight, self.bias
        return m.train(self.training)

    def _rotation_block(self, max_block: int) -> int:
        return hadamard_block_for(self.in_features, max_block)

    def _weight_operand(self, unrotate: bool) -> torch.Tensor:
        return self._operand(self.weight, self.w_bits, self.w_block, unrotate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_quantized:
            return F.linear(x, self.weight, self.bias)
        if self.kernel_forward is not None:
            y = self.kernel_forward(self, autocast_input(x))
            if y is not None:
                return y
        unrotate = self.form == "full"
        xq = self._input_operand(
            x, unrotate, lambda t: self._operand(t, self.a_bits, self.a_block, unrotate))
        return F.linear(xq, self._forward_weight(unrotate), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._quant_repr()}"


class QuantConv2d(_QuantLayer, nn.Conv2d):
    """nn.Conv2d with fake-quantized weight (per output channel) and input (per pixel).

    Rotation along the input-channel dim with block ``hadamard_block_for(in_channels, max)``
    for ``groups == 1``; grouped convs are not rotated.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, w_bits: int = FLOAT_BITS, a_bits: int = FLOAT_BITS,
                 method: str = "quest", hadamard_block: int | None = None, form: str = "half",
                 trust: float | None = None, clip_ratio: float = 1.0) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, bias, padding_mode, device, dtype)
        self.configure(w_bits, a_bits, method, hadamard_block, form, trust, clip_ratio)

    @classmethod
    def from_float(cls, module: nn.Conv2d, w_bits: int, a_bits: int, method: str = "quest",
                   hadamard_block: int | None = None, form: str = "half",
                   trust: float | None = None, clip_ratio: float = 1.0) -> "QuantConv2d":
        """Wrap ``module``, reusing its weight and bias Parameters (no copies, no re-init).

        A QuantConv2d passed in is re-configured in place and returned. Hooks registered on
        the original module are not carried over.
        """
        if isinstance(module, cls):
            return module.configure(w_bits, a_bits, method, hadamard_block, form, trust, clip_ratio)
        if not isinstance(module, nn.Conv2d):
            raise CoqatError(f"QuantConv2d.from_float needs an nn.Conv2d, got {type(module).__name__}")
        q = cls(**_conv_args(module), device="meta", dtype=module.weight.dtype,
                w_bits=w_bits, a_bits=a_bits, method=method, hadamard_block=hadamard_block,
                form=form, trust=trust, clip_ratio=clip_ratio)
        q.weight = module.weight
        q.bias = module.bias
        return q.train(module.training)

    def to_float(self) -> nn.Conv2d:
        """A plain nn.Conv2d holding the same Parameters."""
        m = nn.Conv2d(**_conv_args(self), device="meta", dtype=self.weight.dtype)
        m.weight, m.bias = self.weight, self.bias
        return m.train(self.training)

    def _rotation_block(self, max_block: int) -> int:
        return hadamard_block_for(self.in_channels, max_block) if self.groups == 1 else 1

    def _weight_operand(self, unrotate: bool) -> torch.Tensor:
        # (Cout, Cin, kh, kw) -> (Cout, kh, kw, Cin): rotate Cin at every tap, then one row
        # of kh*kw*Cin values per output channel for the scale.
        w = self.weight.permute(0, 2, 3, 1)
        q = self._operand(w, self.w_bits, self.w_block, unrotate,
                          rows=lambda r: r.reshape(r.shape[0], -1))
        return q.permute(0, 3, 1, 2).contiguous()

    def _activation_operand(self, x: torch.Tensor, unrotate: bool) -> torch.Tensor:
        # (N, C, H, W) -> (N, H, W, C): one row of C channels per spatial position.
        q = self._operand(x.movedim(-3, -1), self.a_bits, self.a_block, unrotate)
        return q.movedim(-1, -3).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_quantized:
            return self._conv_forward(x, self.weight, self.bias)
        unrotate = self.form == "full"
        xq = self._input_operand(x, unrotate, lambda t: self._activation_operand(t, unrotate))
        return self._conv_forward(xq, self._forward_weight(unrotate), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._quant_repr()}"


def _conv_args(m: nn.Conv2d) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels,
                kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                padding_mode=m.padding_mode)


_QUANT_TYPES = (QuantLinear, QuantConv2d)


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``fqn``; returns the (possibly new) root."""
    if fqn == "":
        return new
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return model


def quantize_model(model: nn.Module, bitconfig: BitConfig, method: str | None = None,
                   hadamard_block: int | None = None, form: str = "half",
                   trust: float | None = None, clip_ratio: float = 1.0,
                   kernels: str | None = None) -> nn.Module:
    """Swap the layers named in ``bitconfig`` for their quantized versions, in place.

    Each FQN with non-float bits must name an ``nn.Linear`` or ``nn.Conv2d``; it becomes a
    QuantLinear / QuantConv2d that reuses the same Parameters (state_dict keys and optimizer
    references are unchanged). ``method`` overrides each layer's ``LayerBits.quantizer``.
    Layers that are already quantized are re-configured, never wrapped twice (a w16a16
    entry on one makes it a pass-through). Every entry is checked before anything changes,
    so on error the model is untouched. Returns the model (a new root only if ``""``, the
    root itself, is a listed Linear/Conv2d).

    The quantized layers run the fake-quant forward of this package (the numerics
    definition); ``coqat.kernels.use_kernels(model, ...)`` moves them onto the kernels.
    ``kernels`` is accepted for callers written before that split, only as None or
    "reference" (what this function always gives).
    """
    _check_form(form)
    if kernels not in (None, "reference"):
        raise CoqatError("quantize_model no longer picks the matmul backend; call "
                         "coqat.kernels.use_kernels(model, kernels) after it")
    plan = []
    for fqn, lb in bitconfig.layers.items():
        try:
            mod = model.get_submodule(fqn)
        except AttributeError:
            raise CoqatError(
                f"bitconfig layer {fqn!r} is not a module of the model; fix the name "
                f"(see model.named_modules()) or use the bitconfig made for this model") from None
        if lb.is_float and not isinstance(mod, _QUANT_TYPES):
            continue
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            raise CoqatError(
                f"bitconfig layer {fqn!r} is a {type(mod).__name__}, and only nn.Linear and "
                f"nn.Conv2d can be quantized; set it to w16a16 or drop it from the bitconfig")
        m = method or lb.quantizer
        QuantSpec(lb.w_bits, m, hadamard_block, trust, clip_ratio)  # validate before mutating
        plan.append((fqn, mod, lb, m))
    for fqn, mod, lb, m in plan:
        cls = QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear
        new = cls.from_float(mod, lb.w_bits, lb.a_bits, m, hadamard_block, form, trust, clip_ratio)
        if new is not mod:
            model = _replace(model, fqn, new)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every QuantLinear / QuantConv2d back to a plain module with the same Parameters.

    In place; returns the model (a new root only if the root itself was a Quant module).
    """
    swapped: dict[int, nn.Module] = {}
    for fqn, mod in list(model.named_modules(remove_duplicate=False)):
        if isinstance(mod, _QUANT_TYPES):
            new = swapped.setdefault(id(mod), mod.to_float())
            model = _replace(model, fqn, new)
    return model


def quantized_modules(model: nn.Module, include_float: bool = False) -> list[tuple[str, nn.Module]]:
    """``(fqn, module)`` of the QuantLinear / QuantConv2d layers, in model order.

    Layers configured as w16a16 (pass-through) are left out unless ``include_float``.
    """
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, _QUANT_TYPES) and (include_float or m.is_quantized)]
