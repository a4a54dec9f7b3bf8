"""One quantized operand for the layers that read the same input (q/k/v, gate/up).

In a transformer block three projections read one normed activation (q, k, v) and two
read the next one (gate, up). A quantized layer turns its input into the operand
``Q(x H)`` (rotate, quantize); when siblings use the same settings that operand is the same
tensor for all of them. ``shared_operand`` lets the first layer compute it and the others
take the very same tensor object:

- the forward rotates and quantizes the input once instead of once per layer;
- the backward gets one node for it: autograd adds the layers' gradients w.r.t. the
  operand first and then runs one masked straight-through step and one rotation back,
  where separate operands ran three and summed after. The two are the same mathematics
  (the mask and the rotation are linear in the gradient); float rounding differs.

The table remembers the most recent input tensor only, with one entry per setting used on
it: a hit needs the same tensor object, unchanged since (its version counter), the same
setting, grad mode and autocast state. An entry that is part of an autograd graph is
dropped as soon as the backward has passed through it, so a later forward never builds on
a spent graph; the others (evaluation) go when the input is freed. Inference tensors
(no version counter) are not shared. Under ``torch.compile`` nothing is kept: there the graph's
common-subexpression pass merges the identical forward computations (the backward ones
stay separate).

``sharing(False)`` turns it off (a context manager), for comparisons and debugging.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable, Hashable, Iterator

import torch

__all__ = ["shared_operand", "sharing"]


class _Table:
    """The operands computed from the latest input, per key. One table for the process
    (the backward of a CUDA tensor runs its hooks on autograd's device thread), guarded by
    a lock; sharing across threads is harmless, since a hit needs the same tensor."""

    def __init__(self) -> None:
        self.lock = threading.RLock()     # re-entered by _input_gone, see there
        self.enabled = True
        self.input: weakref.ref | None = None
        self.version = -1
        self.operands: dict[Hashable, torch.Tensor] = {}


_TABLE = _Table()


@contextlib.contextmanager
def sharing(enabled: bool) -> Iterator[None]:
    """Turn operand sharing on or off inside the block, then restore it."""
    before = _TABLE.enabled
    _set(enabled)
    try:
        yield
    finally:
        _set(before)


def _set(enabled: bool) -> None:
    with _TABLE.lock:
        _TABLE.enabled = enabled
        _restart(_TABLE)


def _restart(table: _Table, x: torch.Tensor | None = None) -> None:
    """Empty the table; with ``x``, for that input from now on."""
    table.input = None if x is None else weakref.ref(x, _input_gone)
    table.version = -1 if x is None else x._version
    table.operands = {}


def _state(x: torch.Tensor) -> tuple:
    """What a computed operand depends on besides the input and its settings."""
    dev = x.device.type
    autocast = ((torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
                if dev in ("cuda", "cpu") else None)
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast


def shared_operand(x: torch.Tensor, key: Hashable,
                   compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``, or the tensor it returned for this very ``x`` and ``key`` last time.

    ``x`` is the input as the layer received it (before any cast), ``compute`` builds the
    operand from it, and ``key`` names everything else the operand depends on: the layer
    kind, bits, rotation block, quantizer options (grad mode and autocast are added here).
    """
    if not _TABLE.enabled or torch.compiler.is_compiling() or x.is_inference():
        return compute()          # (an inference tensor has no version counter to check)
    key = (key, _state(x))
    with _TABLE.lock:
        if _TABLE.input is None or _TABLE.input() is not x or _TABLE.version != x._version:
            _restart(_TABLE, x)
        out = _TABLE.operands.get(key)
    if out is not None:
        return out
    out = compute()
    if out is x:                  # nothing computed (a float input, no rotation)
        return out
    with _TABLE.lock:
        if _TABLE.input is not None and _TABLE.input() is x:
            _TABLE.operands[key] = out
    if out.requires_grad:
        ref = weakref.ref(out)
        out.register_hook(lambda grad: _forget(key, ref))
    return out


def _input_gone(ref: weakref.ref, table: _Table = _TABLE, restart=_restart) -> None:
    """The latest input was freed: its operands (those of an evaluation, which no backward
    drops) go with it. Runs wherever the input's last reference goes, possibly inside
    ``shared_operand`` while it holds the (re-entrant) lock, or at interpreter exit (what
    it uses is bound here, not looked up)."""
    with table.lock:
        if table.input is ref:
            restart(table)


def _forget(key: Hashable, ref: weakref.ref) -> None:
    """The backward reached this operand: its graph is spent, so it is no longer shared."""
    with _TABLE.lock:
        if _TABLE.operands.get(key) is ref() is not None:
            del _TABLE.operands[key]
