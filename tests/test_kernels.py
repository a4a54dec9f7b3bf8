"""Tests for coqat.kernels: the torch reference, the Triton kernels (CPU interpreter), dispatch.

Three kinds of test live here:

- In-process CPU tests of ``coqat.kernels.reference`` against ``coqat.quant`` (the numerics
  definition) and against independent float64 arithmetic, of the kernel-path autograd
  (the custom ops, reference implementations) against the fake-quant module, of the
  rotation contract (codes of two float32 rotations differ rarely and by one step), and of
  ``--kernels`` dispatch and its errors.
- Triton kernels under the CPU interpreter. ``TRITON_INTERPRET=1`` must be set before
  Triton builds the kernels, so every interpreter check runs in ONE subprocess (this file
  run as a script); the other test files never see the variable. Shapes are small, per the
  interpreter rules of reference/kernels.md section 3. Inputs on a coarse grid (exact
  float32 sums) must give the reference's bits; general inputs may differ at quantizer
  ties only (``_tie_check``).
- GPU tests (the mismatch bound at GPU shapes, cuBLAS FP8, the module on CUDA); they skip
  cleanly without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coqat.bitconfig import BitConfig, LayerBits
from coqat.errors import CoqatError
from coqat.kernels import linear_spec, lowbit_linear, ops, use_kernels
from coqat.kernels import reference as ref
from coqat.quant import (
    QuantLinear,
    dequantize,
    hadamard_transform,
    quantize_model,
    quantize_rows,
)
from coqat.quant.hadamard import hadamard_scale, sylvester_matrix

HERE = Path(__file__).resolve()
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (float32 compared as int32, FP8 as uint8)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    if a.dtype == ref.FP8_DTYPE:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def _rows_with_range(rows: int, k: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Rows whose values span many binades (and include exact zeros): hard for rounding."""
    g = torch.Generator().manual_seed(seed)
    octaves = torch.randint(-12, 4, (rows, k), generator=g).float()
    x = torch.randn(rows, k, generator=g) * torch.exp2(octaves)
    x[:, ::17] = 0.0
    return (x * torch.rand(rows, 1, generator=g) * 4).to(dtype)


# ----------------------------------------------------------------------------------------
# Reference (CPU, in process)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("w,a,method,expect", [
    (4, 4, "quest", ("fp8", True, False)), (2, 3, "quest", ("fp8", True, False)),
    (4, 5, "quest", ("int8", True, False)), (6, 6, "quest", ("int8", True, False)),
    (8, 4, "quest", ("int8", False, True)), (5, 5, "rtn", ("fp8", False, False)),
    (6, 2, "rtn", ("int8", False, False)), (8, 8, "rtn", ("int8", False, False)),
])
def test_storage_format_follows_the_wider_operand(w, a, method, expect):
    fmt = ref.lowbit_format(w, a, method)
    assert (fmt.dtype, fmt.odd, fmt.correction) == expect


def test_a_16_bit_operand_has_no_lowbit_format():
    with pytest.raises(CoqatError, match="both operands quantized"):
        ref.lowbit_format(4, 16)
    with pytest.raises(CoqatError, match="reference path"):
        linear_spec(16, 4, 128)


@pytest.mark.parametrize("bits,method", [(2, "quest"), (3, "quest"), (4, "quest"), (5, "quest"),
                                         (6, "quest"), (8, "quest"), (4, "rtn"), (5, "rtn"),
                                         (8, "rtn")])
def test_every_code_is_stored_exactly_and_maps_back(bits, method):
    fmt = ref.lowbit_format(bits, bits, method)
    lo = -(2 ** (bits - 1)) + (method == "rtn")
    c = torch.arange(lo, 2 ** (bits - 1), dtype=torch.int16).to(torch.int8)
    stored = ref.store_codes(c, fmt)
    expect = (2 * c.float() + 1) if fmt.odd else c.float()
    assert torch.equal(stored.float(), expect)       # exact in FP8 / INT8: no rounding
    assert torch.equal(ref.integer_codes(stored, fmt), c)


@pytest.mark.parametrize("bits,method,block", [(4, "quest", 128), (8, "quest", 64),
                                               (3, "quest", 32), (4, "rtn", 1), (8, "rtn", 128)])
def test_quantize_ref_is_quantize_rows_of_the_rotation(bits, method, block):
    x = _rows_with_range(6, 256)
    fmt = ref.lowbit_format(bits, bits, method)
    q = ref.quantize_ref(x, ref.RowQuantizer(bits, fmt, method, block))
    rot = hadamard_transform(x, block) if block > 1 else x
    res = quantize_rows(rot, bits, method)
    assert torch.equal(ref.integer_codes(q.codes, fmt), res.codes)
    assert _bits_equal(q.step, res.scale.reshape(-1))
    assert torch.equal(ref.unpack_mask_bits(q.mask_bits, 256), res.mask)
    if fmt.correction:
        assert torch.equal(q.rowsum, res.codes.to(torch.int32).sum(-1))
    else:
        assert q.rowsum is None


def test_mask_bits_layout_is_eight_elements_a_byte_low_bit_first():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 0] = mask[0, 7] = mask[0, 8] = True
    mask[1, 9] = True
    bits = ref.pack_mask_bits(mask)
    assert bits.tolist() == [[0x81, 0x01], [0x00, 0x02]]
    assert torch.equal(ref.unpack_mask_bits(bits, 10), mask)


@pytest.mark.parametrize("bits,method", [(4, "quest"), (8, "quest"), (6, "quest"), (4, "rtn")])
def test_dequantize_ref_is_bit_equal_to_quant_dequantize(bits, method):
    fmt = ref.lowbit_format(bits, bits, method)
    q = ref.quantize_ref(torch.randn(5, 128), ref.RowQuantizer(bits, fmt, method, 128))
    c = ref.integer_codes(q.codes, fmt)
    assert _bits_equal(ref.dequantize_ref(q, fmt, method), dequantize(c, q.step[:, None], method))


@pytest.mark.parametrize("w,a,method", [(4, 4, "quest"), (2, 3, "quest"), (5, 6, "quest"),
                                        (8, 8, "quest"), (4, 8, "quest"), (4, 4, "rtn"),
                                        (8, 6, "rtn")])
def test_lowbit_matmul_ref_is_the_product_of_the_dequantized_values(w, a, method):
    """The integer GEMM (incl. the 8-bit +1/2 correction) against float64 arithmetic on the
    values ``coqat.quant.dequantize`` defines."""
    torch.manual_seed(1)
    fmt = ref.lowbit_format(w, a, method)
    block = 128 if method == "quest" else 1
    qa = ref.quantize_ref(torch.randn(9, 256), ref.RowQuantizer(a, fmt, method, block))
    qw = ref.quantize_ref(torch.randn(7, 256), ref.RowQuantizer(w, fmt, method, block))
    va = dequantize(ref.integer_codes(qa.codes, fmt), qa.step[:, None], method).double()
    vw = dequantize(ref.integer_codes(qw.codes, fmt), qw.step[:, None], method).double()
    bias = torch.randn(7)
    exact = va @ vw.t() + bias.double()
    got = ref.lowbit_matmul_ref(qa, qw, fmt, bias, torch.float32)
    # four float32 roundings (int->float, two scales, bias), relative to the magnitudes
    bound = 4 * 2.0 ** -24 * (va.abs() @ vw.abs().t() + bias.double().abs())
    assert bool(((got.double() - exact).abs() <= bound).all())


def test_masked_rotate_ref_is_the_backward_of_rotate_then_mask():
    x = torch.randn(4, 256, requires_grad=True)
    mask = torch.rand(4, 256) > 0.4
    y = hadamard_transform(x, 128).masked_fill(~mask, 0.0)
    g = torch.randn(4, 256)
    (expect,) = torch.autograd.grad(y, x, g)
    got = ref.masked_rotate_ref(g, ref.pack_mask_bits(mask), 128, torch.float32)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("w,a,method,form,bias", [
    (4, 4, "quest", "half", True), (4, 4, "quest", "full", False), (2, 3, "quest", "half", True),
    (8, 8, "quest", "half", False), (6, 5, "quest", "half", True), (4, 8, "rtn", "half", True),
])
def test_kernel_path_matches_the_fake_quant_module(w, a, method, form, bias):
    """lowbit_linear (the custom ops' torch implementations) gives the module's output and
    gradients (x, W, b) to float32 rounding: same codes, same STE masks, same back-rotation."""
    torch.manual_seed(0)
    lin = QuantLinear(256, 48, bias=bias, w_bits=w, a_bits=a, method=method, form=form,
                      hadamard_block=128 if method == "quest" else None)
    x = torch.randn(3, 5, 256, requires_grad=True)
    g = torch.randn(3, 5, 48)
    y_mod = lin(x)
    grads_mod = torch.autograd.grad(y_mod, [x, lin.weight] + ([lin.bias] if bias else []), g)
    spec = linear_spec(w, a, lin.w_block, method)
    y = lowbit_linear(x, lin.weight, lin.bias, spec)
    grads = torch.autograd.grad(y, [x, lin.weight] + ([lin.bias] if bias else []), g)
    torch.testing.assert_close(y, y_mod, rtol=1e-5, atol=1e-5)
    for got, expect in zip(grads, grads_mod):
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_kernel_path_quantizes_the_autocast_input_as_the_module_does():
    """Under autocast both paths quantize the input cast to the autocast dtype (as F.linear
    casts it), so a float32 input gives the same codes as its bf16 rounding."""
    torch.manual_seed(1)
    lin = QuantLinear(256, 48, bias=False, w_bits=4, a_bits=4, hadamard_block=128)
    x = torch.randn(40, 256)
    spec = linear_spec(4, 4, lin.w_block, "quest")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32 = lowbit_linear(x, lin.weight, None, spec)
        y16 = lowbit_linear(x.to(torch.bfloat16), lin.weight, None, spec)
        y_mod = lin(x)
    assert y32.dtype == torch.bfloat16 and torch.equal(y32, y16)
    torch.testing.assert_close(y32.float(), y_mod.float(), rtol=2e-2, atol=2e-2)
    # the float32 input itself would give other codes, so the test can tell the two apart
    assert not torch.equal(ops.quantize(x, spec.act).codes,
                           ops.quantize(x.to(torch.bfloat16), spec.act).codes)


def _float32_sum_rotation(x: torch.Tensor, block: int) -> torch.Tensor:
    """A second conforming rotation: the +-1 sums accumulated in float32 (the BLAS's order),
    times the float32 scale. It differs from the exactly rounded reference in the last
    bits of most float32 rotations."""
    pm1 = sylvester_matrix(block).float()
    s = x.float().reshape(-1, block) @ pm1
    return (s * torch.tensor(hadamard_scale(block))).reshape(x.shape)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_of_two_conforming_rotations_differ_rarely_and_by_one_step(bits):
    """The rotation contract (coqat.quant.hadamard, DESIGN.md section 4): float32
    accumulation in any order moves a code only at a quantizer tie. Bound: <= 1e-5 of
    codes (measured ~7e-7 at 4 bits, ~4e-6 at 8 bits), and never by more than one step."""
    x = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(bits))
    x = x * torch.rand(4096, 1, generator=torch.Generator().manual_seed(bits + 1)) * 3
    a = hadamard_transform(x, 128)
    b = _float32_sum_rotation(x, 128)
    assert not torch.equal(a, b)
    diff = (quantize_rows(a, bits).codes.int() - quantize_rows(b, bits).codes.int()).abs()
    assert int(diff.max()) <= 1
    assert float((diff > 0).float().mean()) <= 1e-5


# ----------------------------------------------------------------------------------------
# Dispatch and errors
# ----------------------------------------------------------------------------------------
def test_auto_on_cpu_keeps_the_reference_numerics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(QuantLinear(128, 32, w_bits=4, a_bits=4))
    x = torch.randn(6, 128)
    expect = model(x)
    use_kernels(model, "auto")
    assert torch.equal(model(x), expect)


def test_quant_never_imports_the_kernels():
    """The package direction of issue #12: kernels may import quant, never the reverse."""
    code = ("import sys, torch; import coqat.quant; from coqat.bitconfig import BitConfig, "
            "LayerBits; m = coqat.quant.quantize_model(torch.nn.Sequential(torch.nn.Linear("
            "128, 16)), BitConfig({'0': LayerBits(4, 4)})); m(torch.randn(2, 128)); "
            "assert not [n for n in sys.modules if n.startswith('coqat.kernels')]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=HERE.parent.parent, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_reconfiguring_a_layer_detaches_the_kernels():
    model = torch.nn.Sequential(QuantLinear(128, 32, w_bits=4, a_bits=4))
    model[0].kernel_forward = lambda module, x: None   # what use_kernels attaches on a GPU
    model[0].configure(8, 8)
    assert model[0].kernel_forward is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_kernels_triton_without_gpu_is_a_one_line_error():
    model = quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)),
                           BitConfig({"0": LayerBits(4, 4)}))
    with pytest.raises(CoqatError) as err:
        use_kernels(model, "triton")
    msg = str(err.value)
    assert "--kernels triton" in msg and "--kernels auto" in msg and "\n" not in msg
    assert model[0].kernel_forward is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cli_kernels_triton_without_gpu_exits_2(runs):
    from conftest import DIGITS, assert_one_line_error, run_cli

    proc = run_cli("train", "--space", DIGITS, "--bits", "w4a4", "--qat-fraction", "1",
                   "--steps", "2", "--kernels", "triton", "--out", str(runs), "-q")
    assert_one_line_error(proc, "--kernels triton", "CUDA")


def test_unknown_kernels_value_is_rejected():
    with pytest.raises(CoqatError, match="auto, triton, reference"):
        use_kernels(torch.nn.Sequential(torch.nn.Linear(8, 8)), "cuda")


def test_quantize_model_no_longer_picks_a_backend():
    with pytest.raises(CoqatError, match="use_kernels"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),
                       BitConfig({"0": LayerBits(4, 4)}), kernels="triton")


# ----------------------------------------------------------------------------------------
# Triton kernels under the CPU interpreter (one subprocess for all checks)
# ----------------------------------------------------------------------------------------
def _on_grid(x: torch.Tensor) -> torch.Tensor:
    """Multiples of 2^-6 below 4 in magnitude: bf16-exact, and every +-1 sum of <= 128 of
    them is exact in float32, so any rotation backend gives the reference's bits."""
    return (torch.round(x.clamp(-3.9, 3.9) * 64) / 64 + 0.0).to(x.dtype)


def _tie_check(got: ref.QuantizedRows, exp: ref.QuantizedRows, fmt) -> dict:
    """General inputs: codes may differ by one step at quantizer ties, rarely (bound 1e-3 on
    these few-thousand-element tiles); steps by the rotation's float32 summation error
    (at most ~block * 2^-24 relative to the largest rotated value, RTN's absmax)."""
    diff = (ref.integer_codes(got.codes, fmt).int() - ref.integer_codes(exp.codes, fmt).int()).abs()
    rel = ((got.step - exp.step).abs() / exp.step.abs().clamp_min(1e-30)).max()
    return {"one_step": int(diff.max()) <= 1, "rare": float((diff > 0).float().mean()) <= 1e-3,
            "step": float(rel) <= 2.0 ** -16}


def _exact_check(got: ref.QuantizedRows, exp: ref.QuantizedRows) -> dict:
    return {"codes": _bits_equal(got.codes, exp.codes), "step": _bits_equal(got.step, exp.step),
            "mask": torch.equal(got.mask_bits, exp.mask_bits),
            "rowsum": (got.rowsum is None and exp.rowsum is None)
            or torch.equal(got.rowsum, exp.rowsum)}


def _interp_k1() -> dict:
    from coqat.kernels.triton_quant import QuantConfig, quantize_rows_triton

    out = {}
    cases = [
        # name, rows, k, dtype, bits, method, block, config
        ("quest4_h128_bf16", 16, 256, torch.bfloat16, 4, "quest", 128, None),
        ("quest2_h128_fp16", 16, 256, torch.float16, 2, "quest", 128, None),
        ("quest3_h128_fp32", 16, 256, torch.float32, 3, "quest", 128, None),
        ("quest5_h128_int8odd", 16, 256, torch.float32, 5, "quest", 128, None),
        ("quest6_h64", 16, 256, torch.bfloat16, 6, "quest", 64, None),
        ("quest8_h128_int8_rowsum", 16, 256, torch.float32, 8, "quest", 128, None),
        ("quest4_h32_ragged_rows", 7, 96, torch.float32, 4, "quest", 32, None),
        ("quest4_h8_short_rows", 5, 24, torch.float32, 4, "quest", 8, None),
        ("quest4_noH", 8, 64, torch.float32, 4, "quest", 1, None),
        ("rtn4_noH", 8, 64, torch.bfloat16, 4, "rtn", 1, None),
        ("rtn8_h128", 8, 256, torch.float32, 8, "rtn", 128, None),
        ("padded_k640", 3, 640, torch.bfloat16, 4, "quest", 128, None),
        ("two_sweeps", 4, 2304, torch.float32, 4, "quest", 128, QuantConfig(tile_elems=2048)),
        ("two_sweeps_int8", 4, 2304, torch.bfloat16, 8, "quest", 128,
         QuantConfig(tile_elems=2048)),
        ("persistent_loop", 37, 640, torch.float32, 4, "quest", 128,
         QuantConfig(tile_elems=2048, grid=2)),    # 2 programs loop over 19 blocks of 2 rows
    ]
    for i, (name, rows, k, dtype, bits, method, block, cfg) in enumerate(cases):
        fmt = ref.lowbit_format(bits, bits, method)
        q = ref.RowQuantizer(bits, fmt, method, block)
        x = _on_grid(_rows_with_range(rows, k, torch.float32, seed=i)).to(dtype)
        out[f"k1_exact_{name}"] = _exact_check(quantize_rows_triton(x, q, config=cfg),
                                               ref.quantize_ref(x, q))
        x = _rows_with_range(rows, k, dtype, seed=100 + i)
        out[f"k1_ties_{name}"] = _tie_check(quantize_rows_triton(x, q, config=cfg),
                                            ref.quantize_ref(x, q), fmt)
    # The quantizer's RNE ties: rows built so that clipped/step + 1/2 lands on exact halves.
    x = torch.zeros(4, 128)
    x[:, 0] = 1.0
    x[:, 1:9] = torch.tensor([0.5, 1.5, -0.5, -2.5, 2.5, 3.5, -3.5, 0.25])
    fmt = ref.lowbit_format(4, 4, "quest")
    q = ref.RowQuantizer(4, fmt, "quest", 1)
    out["k1_rne_ties"] = _exact_check(quantize_rows_triton(x, q), ref.quantize_ref(x, q))
    return out


def _interp_rotation() -> dict:
    """The rotation on (interpreted) tensor cores vs hadamard_transform: bit-equal on grid
    inputs, within float32 summation error on general ones; the masked backward likewise."""
    from coqat.kernels.triton_rotate import hadamard_triton, masked_rotate_triton

    out = {}
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for block, k in ((128, 640), (64, 192), (32, 96), (8, 24)):
            x = _rows_with_range(16, k, torch.float32, seed=3).clamp(-60000, 60000)
            name = f"rotation_b{block}_k{k}_{str(dtype).split('.')[-1]}"
            xg = _on_grid(x).to(dtype)
            xw = x.to(dtype)
            got, exp = hadamard_triton(xw, block), hadamard_transform(xw, block)
            bound = 2 * block * 2.0 ** -24 * (hadamard_scale(block)
                                              * xw.float().abs().reshape(-1, block).sum(-1))
            err = (got - exp).abs().reshape(-1, block).amax(-1)
            out[name] = {"grid_bits": _bits_equal(hadamard_triton(xg, block),
                                                  hadamard_transform(xg, block)),
                         "general_bound": bool((err <= bound).all())}
    for m, k, block in ((16, 256, 128), (5, 640, 128), (7, 96, 32), (3, 40, 1)):
        g = _on_grid(torch.randn(m, k))
        bits = ref.pack_mask_bits(torch.rand(m, k) > 0.3)
        for dtype in (torch.float32, torch.bfloat16):
            got = masked_rotate_triton(g.to(dtype), bits, block, torch.float32)
            exp = ref.masked_rotate_ref(g.to(dtype), bits, block, torch.float32)
            out[f"masked_rotate_{m}x{k}_b{block}_{str(dtype).split('.')[-1]}"] = {
                "bits": _bits_equal(got, exp)}
    return out


def _interp_k2() -> dict:
    from coqat.kernels.gemm import GemmConfig, lowbit_matmul_triton

    out = {}
    for w, a, method, m, n, k, cfg in [
            (4, 4, "quest", 64, 96, 256, None), (2, 3, "quest", 40, 50, 128, None),
            (5, 6, "quest", 64, 32, 128, None),
            (8, 8, "quest", 48, 40, 96, GemmConfig(32, 32, 64, 2, 4, 1)),
            (4, 8, "quest", 33, 17, 256, None), (4, 4, "rtn", 64, 64, 96, None),
            (8, 6, "rtn", 32, 64, 128, None)]:
        torch.manual_seed(m + n + k)
        fmt = ref.lowbit_format(w, a, method)
        block = 32 if method == "quest" else 1
        qa = ref.quantize_ref(torch.randn(m, k), ref.RowQuantizer(a, fmt, method, block))
        qw = ref.quantize_ref(torch.randn(n, k), ref.RowQuantizer(w, fmt, method, block))
        bias = torch.randn(n)
        got = lowbit_matmul_triton(qa, qw, fmt, bias, torch.float32, config=cfg)
        exp = ref.lowbit_matmul_ref(qa, qw, fmt, bias, torch.float32)
        out[f"k2_w{w}a{a}_{method}_{fmt.dtype}_{m}x{n}x{k}"] = {"out": _bits_equal(got, exp)}
    return out


def _interp_k3() -> dict:
    from coqat.kernels.triton_backward import dequantize_triton

    out = {}
    for bits, method in ((4, "quest"), (8, "quest"), (6, "quest"), (4, "rtn")):
        fmt = ref.lowbit_format(bits, bits, method)
        q = ref.quantize_ref(torch.randn(9, 256), ref.RowQuantizer(bits, fmt, method, 128))
        out[f"k3_dequantize_{bits}_{method}"] = {
            "fp32": _bits_equal(dequantize_triton(q, fmt, method, torch.float32),
                                ref.dequantize_ref(q, fmt, method, torch.float32))}
    return out


def _interp_k4() -> dict:
    from coqat.kernels import pack
    from coqat.kernels.triton_pack import (
        pack_int2_triton,
        pack_int4_triton,
        unpack_int2_triton,
        unpack_int4_triton,
    )

    out = {}
    g = torch.Generator().manual_seed(0)
    for shape in ((5, 37), (3, 4, 64), (1, 1), (17, 130)):
        c4 = torch.randint(-8, 8, shape, dtype=torch.int8, generator=g)
        c2 = torch.randint(-2, 2, shape, dtype=torch.int8, generator=g)
        p4, p2 = pack_int4_triton(c4), pack_int2_triton(c2)
        n = shape[-1]
        out[f"k4_{'x'.join(map(str, shape))}"] = {
            "int4_bytes": torch.equal(p4, pack.pack_int4(c4)),
            "int2_bytes": torch.equal(p2, pack.pack_int2(c2)),
            "int4_back": torch.equal(unpack_int4_triton(p4, n), c4),
            "int2_back": torch.equal(unpack_int2_triton(p2, n), c2)}
    out["k4_worked_examples"] = {
        "int4": pack_int4_triton(torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)).tolist()
        == [[0xF1, 0x78]],
        "int2": pack_int2_triton(torch.tensor([[-2, -1, 0, 1]], dtype=torch.int8)).tolist()
        == [[0x4E]]}
    return out


def _interpreter_checks() -> dict:
    results = {}
    for part in (_interp_rotation, _interp_k1, _interp_k2, _interp_k3, _interp_k4):
        results.update(part())
    return results


@pytest.fixture(scope="module")
def interp_results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE), "--interpreter-checks"], env=env, check=False,
                          capture_output=True, text=True, timeout=900, cwd=HERE.parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_K1_CASES = ("quest4_h128_bf16", "quest2_h128_fp16", "quest3_h128_fp32", "quest5_h128_int8odd",
             "quest6_h64", "quest8_h128_int8_rowsum", "quest4_h32_ragged_rows",
             "quest4_h8_short_rows", "quest4_noH", "rtn4_noH", "rtn8_h128", "padded_k640",
             "two_sweeps", "two_sweeps_int8", "persistent_loop")
INTERP_CHECKS = (
    [f"rotation_b{b}_k{k}_{d}" for b, k in ((128, 640), (64, 192), (32, 96), (8, 24))
     for d in ("bfloat16", "float32", "float16")]
    + [f"masked_rotate_{s}_{d}" for s in ("16x256_b128", "5x640_b128", "7x96_b32", "3x40_b1")
       for d in ("float32", "bfloat16")]
    + [f"k1_{kind}_{n}" for n in _K1_CASES for kind in ("exact", "ties")] + ["k1_rne_ties"]
    + ["k2_w4a4_quest_fp8_64x96x256", "k2_w2a3_quest_fp8_40x50x128", "k2_w5a6_quest_int8_64x32x128",
       "k2_w8a8_quest_int8_48x40x96", "k2_w4a8_quest_int8_33x17x256", "k2_w4a4_rtn_fp8_64x64x96",
       "k2_w8a6_rtn_int8_32x64x128"]
    + [f"k3_dequantize_{b}" for b in ("4_quest", "8_quest", "6_quest", "4_rtn")]
    + ["k4_5x37", "k4_3x4x64", "k4_1x1", "k4_17x130", "k4_worked_examples"]
)


@pytest.mark.parametrize("check", INTERP_CHECKS)
def test_triton_kernel_matches_reference_under_interpreter(interp_results, check):
    """Rotation and K1 bit for bit on grid inputs and within the tie contract on general
    ones; K2 outputs bit for bit; K3 helpers; K4 bytes."""
    assert check in interp_results, sorted(interp_results)
    failed = {k: v for k, v in interp_results[check].items() if not v}
    assert not failed, f"{check}: {failed}"


def test_every_interpreter_check_is_asserted(interp_results):
    assert sorted(interp_results) == sorted(INTERP_CHECKS)


# ----------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ----------------------------------------------------------------------------------------
@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("bits,method,block,dtype", [(4, "quest", 128, torch.bfloat16),
                                                     (4, "quest", 128, torch.float32),
                                                     (8, "quest", 128, torch.float32),
                                                     (4, "rtn", 1, torch.bfloat16)])
def test_k1_on_gpu_meets_the_mismatch_bound(bits, method, block, dtype):
    """Codes equal the reference's except at float32 rounding ties: <= 1e-5 of codes, each
    by one step; masks may differ only where codes do or the step moved by float rounding."""
    from coqat.kernels.triton_quant import quantize_rows_triton

    g = torch.Generator("cuda").manual_seed(bits)
    x = (torch.randn(4096, 4096, device="cuda", generator=g)
         * torch.rand(4096, 1, device="cuda", generator=g)).to(dtype)
    fmt = ref.lowbit_format(bits, bits, method)
    q = ref.RowQuantizer(bits, fmt, method, block)
    got, exp = quantize_rows_triton(x, q), ref.quantize_ref(x, q)
    diff = (ref.integer_codes(got.codes, fmt).int() - ref.integer_codes(exp.codes, fmt).int()).abs()
    assert int(diff.max()) <= 1
    assert float((diff > 0).float().mean()) <= 1e-5
    rel = ((got.step - exp.step).abs() / exp.step).max()
    assert float(rel) <= 2.0 ** -21
    on_grid = _on_grid(x.float().cpu()).to(dtype).cuda()
    assert _exact_check(quantize_rows_triton(on_grid, q), ref.quantize_ref(on_grid, q)) == {
        "codes": True, "step": True, "mask": True, "rowsum": True}


@GPU
@pytest.mark.gpu
def test_module_on_gpu_kernels_matches_reference_path():
    torch.manual_seed(0)
    model = torch.nn.Sequential(QuantLinear(512, 256, w_bits=4, a_bits=4)).cuda()
    lin = model[0]
    x = torch.randn(4, 128, 512, device="cuda", requires_grad=True)
    outs = {}
    for path in ("reference", "triton"):
        use_kernels(model, path)
        x.grad = lin.weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = lin(x)
        y.float().square().mean().backward()
        outs[path] = (y.float(), x.grad.float(), lin.weight.grad.float())
    for got, exp in zip(outs["triton"], outs["reference"]):
        assert float((got - exp).norm() / exp.norm()) < 1e-2      # bf16 GEMM rounding


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    # Run by the interp_results fixture with TRITON_INTERPRET=1 (set before Triton loads).
    torch.set_num_threads(1)
    print(json.dumps(_interpreter_checks()))
