"""Correctness and speed of coqat's low-bit kernels (K1-K4) on a CUDA GPU.

Every speed figure is a ratio against torch BF16 measured in the same run, with
``triton.testing.do_bench`` medians (L2 flushed between repetitions). Sections:

  env        device, driver and library versions
  exact      K1 codes/steps/masks vs the torch reference on GPU shapes (mismatch counts),
             K2 exactness of the FP8/INT8 accumulation, K3 gradients vs the fake-quant
             module, K4 pack/unpack vs the torch reference
  gemm       K2 at M=N=K=8192 (and 16384x8192x8192): cuBLAS BF16 vs FP8 exact/fast,
             Triton FP8/INT8, torch._int_mm
  k1         K1 bandwidth at 16384x8192 (H128 / H64 / no rotation; variants), vs x.clone()
  linear     forward of a linear incl. quantizing x and w, M=16384, K=N=8192, with the time
             split into quantizer and GEMM
  step       one QAT step of a linear (forward + v1 backward) vs BF16 and vs fake-quant
             (coqat's eager reference path and a torch.compile'd fake-quant), at the big
             shape and at the lm-30m shapes
  e2e        one training step of the lm-30m model (batch 64x512, bf16 autocast, AdamW):
             BF16 vs QAT on the kernels vs QAT on the reference path

Run on the GPU machine from the repository root::

    PYTHONPATH=. python benchmarks/kernels.py --out $OUT/kernels.json

It prints a markdown summary at the end and writes every number to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from coqat.kernels import reference as ref  # noqa: E402
from coqat.kernels.linear import linear_spec, lowbit_linear  # noqa: E402

RESULTS: dict = {}


def bench(fn, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` (do_bench flushes L2 between repetitions)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def section(name):
    def wrap(fn):
        def run(args):
            t0 = time.time()
            print(f"== {name}", flush=True)
            try:
                RESULTS[name] = fn(args)
            except Exception as e:  # keep going: one broken section must not lose the rest
                traceback.print_exc()
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}"}
            RESULTS.setdefault("_seconds", {})[name] = round(time.time() - t0, 1)
            torch.cuda.empty_cache()

        run.section_name = name
        return run

    return wrap


def _rand_bf16(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(torch.bfloat16)


@section("env")
def env(args):
    import numpy
    import triton

    p = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "sm_count": p.multi_processor_count,
        "capability": f"{p.major}.{p.minor}",
        "memory_gb": round(p.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


# ------------------------------------------------------------------------------ exactness
def _k1_mismatch(x, q, elems=None, config=None, **kw):
    from coqat.kernels.triton_quant import QUANT_CONFIG, quantize_rows_triton

    cfg = QUANT_CONFIG(x.shape[0], x.shape[1], q.block, elems=elems) if elems else config
    a = quantize_rows_triton(x, q, config=cfg, **kw)
    b = ref.quantize_ref(x, q)
    out = {
        "codes": int((a.codes.view(torch.uint8) != b.codes.view(torch.uint8)).sum()),
        "step": int((a.step.view(torch.int32) != b.step.view(torch.int32)).sum()),
        "mask_bytes": int((a.mask_bits != b.mask_bits).sum()),
        "elements": x.numel(),
        "rows": x.shape[0],
    }
    if b.rowsum is not None:
        out["rowsum"] = int((a.rowsum != b.rowsum).sum())
    return out


@section("exact")
def exact(args):
    from coqat.kernels import gemm, pack
    from coqat.kernels.triton_pack import (
        pack_int2_triton,
        pack_int4_triton,
        unpack_int2_triton,
        unpack_int4_triton,
    )
    from coqat.kernels.triton_quant import QuantConfig as QCfg
    from coqat.quant import QuantLinear

    FIXED = gemm.GemmConfig(128, 128, 128, 8, 8, 4)
    torch.manual_seed(0)
    res = {}
    big = (4096, 8192) if args.quick else (16384, 8192)
    x = _rand_bf16(*big) * torch.rand(big[0], 1, device="cuda").to(torch.bfloat16)
    cases = [
        ("quest4_h128_bf16", x, 4, "quest", 128, {}),
        ("quest4_h128_bf16_f2f", x, 4, "quest", 128, {"int_cvt": False}),
        ("quest4_h128_bf16_intcvt", x, 4, "quest", 128, {"int_cvt": True}),
        ("quest8_h128_intcvt", x, 8, "quest", 128, {"int_cvt": True}),
        ("quest4_h128_e32_intcvt", x, 4, "quest", 128, {"int_cvt": True, "elems": 32}),
        ("quest4_h128_e32_f2f", x, 4, "quest", 128, {"int_cvt": False, "elems": 32}),
        ("quest8_h128_e32", x, 8, "quest", 128, {"elems": 32}),
        ("quest4_h128_persist_pipe2", x, 4, "quest", 128, {"config": QCfg(1, 8192, 4, 64, 3, 2)}),
        (
            "quest4_h128_w8_persist_pipe2",
            x,
            4,
            "quest",
            128,
            {"config": QCfg(1, 8192, 8, 64, 2, 2)},
        ),
        ("quest4_h128_w8", x, 4, "quest", 128, {"config": QCfg(1, 8192, 8)}),
        ("quest4_h128_div_rn", x, 4, "quest", 128, {"markstein": False}),
        ("quest2_h128", x, 2, "quest", 128, {}),
        ("quest8_h128_int8corr", x, 8, "quest", 128, {}),
        ("quest6_h64", x, 6, "quest", 64, {}),
        ("rtn4_noH", x, 4, "rtn", 1, {}),
        ("quest4_w_fp32_8192", torch.randn(8192, 8192, device="cuda") * 0.02, 4, "quest", 128, {}),
        ("quest4_lm30m_640", _rand_bf16(32768, 640), 4, "quest", 128, {}),
        ("quest4_lm30m_1792_fp32", torch.randn(32768, 1792, device="cuda"), 4, "quest", 128, {}),
        (
            "quest4_w_fp32_intcvt",
            torch.randn(8192, 8192, device="cuda") * 0.02,
            4,
            "quest",
            128,
            {"int_cvt": True},
        ),
        (
            "quest4_w_fp32_f2f",
            torch.randn(8192, 8192, device="cuda") * 0.02,
            4,
            "quest",
            128,
            {"int_cvt": False},
        ),
    ]
    for name, t, bits, method, block, kw in cases:
        fmt = ref.lowbit_format(bits, bits, method)
        res[f"k1_{name}"] = _k1_mismatch(t, ref.RowQuantizer(bits, fmt, method, block), **kw)
    del x
    if args.k1_exact_only:
        return res

    # K2: accumulation exactness on worst-case (same-sign, largest) codes and random codes.
    for k in (4096, 8192, 16384):
        m = n = 256
        for kind in ("max15", "random"):
            if kind == "max15":
                a = torch.full((m, k), 15.0, device="cuda")
                w = torch.full((n, k), 15.0, device="cuda")
            else:
                a = (torch.randint(-8, 8, (m, k), device="cuda") * 2 + 1).float()
                w = (torch.randint(-8, 8, (n, k), device="cuda") * 2 + 1).float()
            exact_c = a.double() @ w.double().t()
            one = torch.ones((), device="cuda")
            for fast in (False, True):
                c = torch._scaled_mm(
                    a.to(ref.FP8_DTYPE),
                    w.to(ref.FP8_DTYPE).t(),
                    scale_a=one,
                    scale_b=one,
                    out_dtype=torch.float32,
                    use_fast_accum=fast,
                )
                res[f"k2_scaled_mm_K{k}_{kind}_fast{int(fast)}_wrong"] = int(
                    (c.double() != exact_c).sum()
                )
                res[f"k2_scaled_mm_K{k}_{kind}_fast{int(fast)}_max_rel_err"] = float(
                    ((c.double() - exact_c).abs() / exact_c.abs().clamp_min(1)).max()
                )
            qa = ref.QuantizedRows(
                a.to(ref.FP8_DTYPE), torch.full((m,), 2.0, device="cuda"), None, None
            )
            qw = ref.QuantizedRows(
                w.to(ref.FP8_DTYPE), torch.full((n,), 2.0, device="cuda"), None, None
            )
            fmt = ref.LowbitFormat("fp8", True, False)
            c = gemm.lowbit_matmul_triton(qa, qw, fmt, None, torch.float32, config=FIXED)
            res[f"k2_triton_fp8_K{k}_{kind}_wrong"] = int((c.double() != exact_c).sum())
    # K2 with real K1 codes: Triton (both dtypes) bit-equal to the reference contract.
    for bits in (4, 8):
        fmt = ref.lowbit_format(bits, bits, "quest")
        qa = ref.quantize_ref(_rand_bf16(1024, 4096), ref.RowQuantizer(bits, fmt))
        qw = ref.quantize_ref(torch.randn(768, 4096, device="cuda"), ref.RowQuantizer(bits, fmt))
        bias = torch.randn(768, device="cuda")
        r32 = ref.lowbit_matmul_ref(qa, qw, fmt, bias, torch.float32)
        t32 = gemm.lowbit_matmul_triton(qa, qw, fmt, bias, torch.float32, config=FIXED)
        res[f"k2_triton_w{bits}a{bits}_vs_ref_fp32_mismatch"] = int(
            (t32.view(torch.int32) != r32.view(torch.int32)).sum()
        )
        if gemm.scaled_mm_ok(qa, qw, fmt, torch.bfloat16):
            s = gemm.lowbit_matmul_scaled_mm(qa, qw, fmt, None)
            r16 = ref.lowbit_matmul_ref(qa, qw, fmt, None, torch.bfloat16)
            d = (s.float() - r16.float()).abs() / r16.float().abs().clamp_min(1e-30)
            res[f"k2_scaled_mm_w{bits}a{bits}_vs_ref_bf16"] = {
                "equal": int((s == r16).sum()),
                "total": s.numel(),
                "max_rel": float(d.max()),
            }

    # K3: the kernel path vs the fake-quant module, forward and all gradients.
    for wb, ab, method in ((4, 4, "quest"), (8, 8, "quest"), (4, 8, "quest"), (6, 6, "rtn")):
        lin = QuantLinear(
            1024, 512, bias=True, w_bits=wb, a_bits=ab, method=method, hadamard_block=128
        ).cuda()
        x = torch.randn(8, 256, 1024, device="cuda", requires_grad=True)
        out = {}
        grads = {}
        for path in ("reference", "triton"):
            lin.kernels = path
            x.grad = lin.weight.grad = lin.bias.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = lin(x)
            g = torch.randn(
                y.shape,
                device="cuda",
                dtype=y.dtype,
                generator=torch.Generator("cuda").manual_seed(1),
            )
            y.backward(g)
            grads[path] = (
                y.float(),
                x.grad.float(),
                lin.weight.grad.float(),
                lin.bias.grad.float(),
            )
        for i, nm in enumerate(("y", "dx", "dw", "db")):
            a_, b_ = grads["triton"][i], grads["reference"][i]
            out[nm] = float((a_ - b_).norm() / b_.norm())
        res[f"k3_w{wb}a{ab}_{method}_rel_err_vs_fakequant_bf16"] = out

    # K4
    c4 = torch.randint(-8, 8, (4096, 4097), dtype=torch.int8, device="cuda")
    c2 = torch.randint(-2, 2, (4096, 4097), dtype=torch.int8, device="cuda")
    p4, p2 = pack_int4_triton(c4), pack_int2_triton(c2)
    res["k4"] = {
        "int4_pack_equal": bool(torch.equal(p4, pack.pack_int4(c4))),
        "int2_pack_equal": bool(torch.equal(p2, pack.pack_int2(c2))),
        "int4_roundtrip": bool(torch.equal(unpack_int4_triton(p4, 4097), c4)),
        "int2_roundtrip": bool(torch.equal(unpack_int2_triton(p2, 4097), c2)),
    }
    return res


# ---------------------------------------------------------------------------------- gemm
def _codes(m, k, dtype, lo=-8, hi=8):
    v = torch.randint(lo, hi, (m, k), device="cuda") * 2 + 1
    return v.to(torch.float32).to(dtype) if dtype == ref.FP8_DTYPE else v.to(torch.int8)


@section("gemm")
def gemm_section(args):
    from coqat.kernels import gemm

    out = {}
    shapes = (
        [(8192, 8192, 8192)]
        if args.quick
        else [(8192, 8192, 8192), (16384, 8192, 8192), (32768, 640, 1792), (32768, 1792, 640)]
    )
    for m, n, k in shapes:
        r = {}
        flops = 2 * m * n * k
        a16, w16 = _rand_bf16(m, k), _rand_bf16(n, k)
        r["bf16_ms"] = bench(lambda: a16 @ w16.t())
        a8, w8 = _codes(m, k, ref.FP8_DTYPE), _codes(n, k, ref.FP8_DTYPE)
        sa = torch.rand(m, 1, device="cuda") + 0.5
        sw = torch.rand(1, n, device="cuda") + 0.5
        one = torch.ones((), device="cuda")
        for fast in (False, True):
            r[f"fp8_rowwise_{'fast' if fast else 'exact'}_ms"] = bench(
                lambda: torch._scaled_mm(
                    a8,
                    w8.t(),
                    scale_a=sa,
                    scale_b=sw,
                    out_dtype=torch.bfloat16,
                    use_fast_accum=fast,
                )
            )
            r[f"fp8_tensorwise_{'fast' if fast else 'exact'}_ms"] = bench(
                lambda: torch._scaled_mm(
                    a8,
                    w8.t(),
                    scale_a=one,
                    scale_b=one,
                    out_dtype=torch.bfloat16,
                    use_fast_accum=fast,
                )
            )
        fmt8 = ref.LowbitFormat("fp8", True, False)
        qa = ref.QuantizedRows(a8, sa.reshape(-1), None, None)
        qw = ref.QuantizedRows(w8, sw.reshape(-1), None, None)
        gemm.lowbit_matmul_triton(qa, qw, fmt8)  # autotune outside the timing
        r["triton_fp8_exact_ms"] = bench(lambda: gemm.lowbit_matmul_triton(qa, qw, fmt8))
        gemm.lowbit_matmul_triton(qa, qw, fmt8, fast_accum=True)
        r["triton_fp8_fast_ms"] = bench(
            lambda: gemm.lowbit_matmul_triton(qa, qw, fmt8, fast_accum=True)
        )
        ai, wi = _codes(m, k, torch.int8, -32, 32), _codes(n, k, torch.int8, -32, 32)
        fmti = ref.LowbitFormat("int8", True, False)
        qai = ref.QuantizedRows(ai, sa.reshape(-1), None, None)
        qwi = ref.QuantizedRows(wi, sw.reshape(-1), None, None)
        gemm.lowbit_matmul_triton(qai, qwi, fmti)
        r["triton_int8_ms"] = bench(lambda: gemm.lowbit_matmul_triton(qai, qwi, fmti))
        r["torch_int_mm_ms"] = bench(lambda: torch._int_mm(ai, wi.t()))
        for key in [k_ for k_ in list(r) if k_.endswith("_ms")]:
            r[key.replace("_ms", "_tflops")] = round(flops / r[key] / 1e9, 1)
            r[key.replace("_ms", "_vs_bf16")] = round(r["bf16_ms"] / r[key], 3)
        out[f"{m}x{n}x{k}"] = r
    return out


# ------------------------------------------------------------------------------------ k1
@section("k1")
def k1_section(args):
    from coqat.kernels.triton_quant import (
        QUANT_CONFIG,
        QuantConfig,
        quantize_rows_triton,
    )

    out = {}
    m, k = 16384, 8192
    x = _rand_bf16(m, k)
    out["clone_ms"] = bench(lambda: x.clone())
    out["clone_TBps"] = round(2 * x.numel() * 2 / out["clone_ms"] / 1e9, 3)

    def run(name, t, bits, method, block, **kw):
        fmt = ref.lowbit_format(bits, bits, method)
        q = ref.RowQuantizer(bits, fmt, method, block)
        quantize_rows_triton(t, q, **kw)
        ms = bench(lambda: quantize_rows_triton(t, q, **kw))
        nbytes = t.numel() * (t.element_size() + 1) + t.numel() // 8 + t.shape[0] * 4
        out[name] = {
            "ms": round(ms, 4),
            "TBps": round(nbytes / ms / 1e9, 3),
            "bytes_per_elem": round(nbytes / t.numel(), 3),
        }

    run("quest4_h128", x, 4, "quest", 128)
    sweep = {}
    variants = {
        "w4": QuantConfig(1, 8192, 4),
        "w8": QuantConfig(1, 8192, 8),
        "w4_persist3": QuantConfig(1, 8192, 4, 64, 3, 1),
        "w4_persist3_pipe2": QuantConfig(1, 8192, 4, 64, 3, 2),
        "w4_persist3_pipe3": QuantConfig(1, 8192, 4, 64, 3, 3),
        "w8_persist1_pipe2": QuantConfig(1, 8192, 8, 64, 1, 2),
        "w8_persist2_pipe2": QuantConfig(1, 8192, 8, 64, 2, 2),
    }
    for name, cfg in variants.items():
        for int_cvt in (False, True):
            full = f"quest4_h128_{name}_{'int' if int_cvt else 'f2f'}"
            try:
                run(full, x, 4, "quest", 128, int_cvt=int_cvt, config=cfg)
                sweep[full] = (out[full]["ms"], name, int_cvt)
            except Exception as e:  # a variant that does not compile must not stop the sweep
                out[full] = {"error": f"{type(e).__name__}: {e}"[:300]}
    best = min(sweep.values())
    out["best_variant"] = {"ms": best[0], "variant": best[1], "int_cvt": best[2]}
    x6 = _rand_bf16(32768, 640)
    for name in ("w4", "w8", "w4_persist3_pipe2", best[1]):
        base = variants[name]
        cfg = QUANT_CONFIG(32768, 640, 128)._replace(
            num_warps=QUANT_CONFIG(32768, 640, 128).num_warps * base.num_warps // 4,
            persist=base.persist,
            stages=base.stages,
        )
        run(f"lm30m_x640_{name}", x6, 4, "quest", 128, int_cvt=best[2], config=cfg)
    run("quest4_h128_div_rn", x, 4, "quest", 128, markstein=False)
    run("quest4_h8", x, 4, "quest", 8)
    run("quest4_h32", x, 4, "quest", 32)
    if not args.quick:
        run("quest8_h128_int8", x, 8, "quest", 128)
        run("quest4_h64", x, 4, "quest", 64)
        run("quest4_noH", x, 4, "quest", 1)
        run("rtn4_noH", x, 4, "rtn", 1)
        w = torch.randn(8192, 8192, device="cuda")
        run("weight_fp32_8192_quest4_h128", w, 4, "quest", 128)
        run("lm30m_x640_quest4", _rand_bf16(32768, 640), 4, "quest", 128)
        run("lm30m_x1792_quest4", _rand_bf16(32768, 1792), 4, "quest", 128)
    out["default_config"] = str(QUANT_CONFIG(m, k, 128))
    # Later sections use the fastest (bit-identical) variant of the sweep.
    from coqat.kernels import triton_quant

    bcfg = variants[best[1]]
    triton_quant.INT_CVT_DEFAULT = best[2]
    triton_quant.WARP_MULT_DEFAULT = bcfg.num_warps // 4
    triton_quant.PERSIST_DEFAULT = bcfg.persist
    triton_quant.STAGES_DEFAULT = bcfg.stages
    out["used_later"] = {"int_cvt": best[2], "variant": best[1]}
    # The torch reference quantizer on the same input (what the fake-quant path runs).
    fmt = ref.lowbit_format(4, 4, "quest")
    q = ref.RowQuantizer(4, fmt, "quest", 128)
    out["torch_reference_ms"] = round(bench(lambda: ref.quantize_ref(x, q), rep=50), 3)
    return out


# ---------------------------------------------------------------------------------- diag
_DIAG = {}


def _diag_kernels():
    """Micro-kernels that time one kind of instruction per element (built on first use)."""
    if _DIAG:
        return _DIAG
    import triton
    import triton.language as tl

    @triton.jit
    def convert_chain(x_ptr, out_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
        # 2*N conversions f32 <-> f64 per element (plus N DADD)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        y = tl.load(x_ptr + offs).to(tl.float32)
        for _ in tl.static_range(N):
            y = (y.to(tl.float64) + 1.0).to(tl.float32)
        tl.store(out_ptr + offs, y)

    @triton.jit
    def dadd_chain(x_ptr, out_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
        # 4*N DADD per element on 4 independent chains, 2 conversions
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        y = tl.load(x_ptr + offs).to(tl.float64)
        a = y
        b = y * 0.5
        c = y * 0.25
        d = y * 0.125
        for _ in tl.static_range(N):
            a = a + 1.0
            b = b + 1.0
            c = c + 1.0
            d = d + 1.0
        tl.store(out_ptr + offs, ((a + b) + (c + d)).to(tl.float32))

    @triton.jit
    def fadd_chain(x_ptr, out_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        y = tl.load(x_ptr + offs).to(tl.float32)
        a = y
        b = y * 0.5
        c = y * 0.25
        d = y * 0.125
        for _ in tl.static_range(N):
            a = a + 1.0
            b = b + 1.0
            c = c + 1.0
            d = d + 1.0
        tl.store(out_ptr + offs, (a + b) + (c + d))

    _DIAG.update(convert=convert_chain, dadd=dadd_chain, fadd=fadd_chain)
    return _DIAG


@section("diag")
def diag_section(args):
    """Instruction throughputs behind K1, and the CPU cost of launching the kernels."""
    from coqat.kernels.triton_quant import quantize_rows_triton

    out = {}
    k = _diag_kernels()
    n_el = 1 << 26
    x = _rand_bf16(n_el)
    y = torch.empty(n_el, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    clock = 1.98e9  # nvidia-smi max SM clock on this H100 (read at the start of the run)
    for name, n, per in (("convert", 16, 2 * 16), ("dadd", 16, 4 * 16), ("fadd", 64, 4 * 64)):
        fn = k[name]
        fn[(n_el // 1024,)](x, y, N=n, BLOCK=1024, num_warps=4)
        ms = bench(lambda: fn[(n_el // 1024,)](x, y, N=n, BLOCK=1024, num_warps=4))
        ops_per_clk_sm = n_el * per / (ms * 1e-3) / clock / sms
        out[f"{name}_ops_per_clk_per_sm"] = round(ops_per_clk_sm, 1)
    # CPU-side cost: a K1 launch on a tiny tensor, and a whole kernel-path linear fwd+bwd on a
    # tiny shape (both dominated by Python and launch overhead), against F.linear.
    spec = linear_spec(4, 4, 128)
    xs = _rand_bf16(128, 640)
    quantize_rows_triton(xs, spec.act)
    out["tiny_k1_us"] = round(bench(lambda: quantize_rows_triton(xs, spec.act)) * 1e3, 1)
    xg = xs.clone().requires_grad_(True)
    w = torch.randn(640, 640, device="cuda", requires_grad=True)
    dy = _rand_bf16(128, 640)

    def tiny(fn):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yv = fn()
            return torch.autograd.grad(yv, (xg, w), dy)

        return step

    out["tiny_step_kernels_us"] = round(
        bench(tiny(lambda: lowbit_linear(xg, w, None, spec))) * 1e3, 1
    )
    out["tiny_step_bf16_us"] = round(bench(tiny(lambda: F.linear(xg, w))) * 1e3, 1)
    import cProfile
    import io
    import pstats

    step = tiny(lambda: lowbit_linear(xg, w, None, spec))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        step()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    out["tiny_step_cprofile_top"] = buf.getvalue()[-6000:]
    print(buf.getvalue()[-6000:])
    return out


def _gpu_time_by_kernel(step, n_steps=3):
    """Device time per step from the profiler, total and per kernel family (ms)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n_steps):
            step()
        torch.cuda.synchronize()
    fams: dict = {}
    total = 0.0
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = ev.cuda_time_total
        if t <= 0 or ev.key.startswith("ProfilerStep"):
            continue
        name = ev.key
        if "quantize_rows" in name:
            fam = "K1 quantize"
        elif "masked_rotate" in name:
            fam = "bwd masked rotate"
        elif "dequantize" in name:
            fam = "bwd dequantize"
        elif "lowbit_gemm" in name or "f8f8bf16" in name or "e4m3" in name.lower():
            fam = "FP8/INT8 GEMM"
        elif "gemm" in name.lower() or "nvjet" in name.lower() or "cutlass" in name.lower():
            fam = "BF16 GEMM"
        elif "flash" in name.lower() or "attention" in name.lower() or "fmha" in name.lower():
            fam = "attention"
        else:
            fam = "other (elementwise, norms, optimizer, casts)"
        fams[fam] = fams.get(fam, 0.0) + t / 1e3 / n_steps
        total += t / 1e3 / n_steps
    return {"gpu_ms_per_step": round(total, 3), **{k: round(v, 3) for k, v in sorted(fams.items())}}


# -------------------------------------------------------------------------------- linear
def _fq_compiled():
    """A fast fake-quant QuEST (what QuEST/torchao-style QAT runs): bf16 Hadamard matmul +
    RMS scale + round, straight-through with the trust mask; torch.compile'd."""
    from coqat.quant.hadamard import sylvester_matrix
    from coqat.quant.quantizers import ALPHA

    h = (sylvester_matrix(128, "cuda") * 128**-0.5).to(torch.bfloat16)

    def fq(t, bits=4):
        r = (t.to(torch.bfloat16).reshape(-1, 128) @ h).reshape(t.shape).float()
        rms = r.pow(2).mean(-1, keepdim=True).sqrt()
        scale = ALPHA[bits] * rms + 1e-8
        step = 2 * scale / (2**bits - 1)
        k_ = torch.round(torch.clamp(r, -scale, scale) / step + 0.5)
        v = k_ * step - step / 2
        mask = (v - r).abs() <= ALPHA[bits] / (2**bits - 1) * rms
        g = r * mask
        return (g + (v - g).detach()).to(torch.bfloat16)

    def linear(x, w):
        return F.linear(fq(x), fq(w))

    return torch.compile(linear)


@section("linear")
def linear_section(args):
    from coqat.kernels import gemm
    from coqat.kernels.triton_quant import quantize_rows_triton

    out = {}
    m, k, n = (4096 if args.quick else 16384), 8192, 8192
    x = _rand_bf16(m, k)
    w32 = torch.randn(n, k, device="cuda") * 0.02
    w16 = w32.to(torch.bfloat16)
    out["bf16_matmul_ms"] = bench(lambda: F.linear(x, w16))

    def autocast_linear():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.linear(x, w32)

    out["bf16_autocast_fp32_master_ms"] = bench(autocast_linear)
    spec = linear_spec(4, 4, 128)
    with torch.no_grad():
        out["kernels_fwd_bf16_weight_ms"] = bench(lambda: lowbit_linear(x, w16, None, spec))

        def kern_autocast():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return lowbit_linear(x, w32, None, spec)

        out["kernels_fwd_fp32_master_ms"] = bench(kern_autocast)
        # Where the time goes.
        qa = quantize_rows_triton(x, spec.act)
        qw16 = quantize_rows_triton(w16, spec.weight)
        out["part_k1_x_ms"] = bench(lambda: quantize_rows_triton(x, spec.act))
        out["part_k1_w_bf16_ms"] = bench(lambda: quantize_rows_triton(w16, spec.weight))
        out["part_k1_w_fp32_ms"] = bench(lambda: quantize_rows_triton(w32, spec.weight))
        out["part_gemm_ms"] = bench(lambda: gemm.lowbit_matmul_scaled_mm(qa, qw16, spec.fmt))
        out["part_gemm_fast_ms"] = bench(
            lambda: gemm.lowbit_matmul_scaled_mm(qa, qw16, spec.fmt, None, True)
        )
    out["speedup_vs_bf16_matmul"] = round(
        out["bf16_matmul_ms"] / out["kernels_fwd_bf16_weight_ms"], 3
    )
    out["speedup_autocast"] = round(
        out["bf16_autocast_fp32_master_ms"] / out["kernels_fwd_fp32_master_ms"], 3
    )
    out["quantizer_share"] = round(
        (out["part_k1_x_ms"] + out["part_k1_w_bf16_ms"]) / out["kernels_fwd_bf16_weight_ms"], 3
    )
    return out


def _step_times(m, k, n, args, with_compiled):
    from coqat.quant import QuantLinear

    r = {}
    x = _rand_bf16(m, k).requires_grad_(True)
    dy = _rand_bf16(m, n)
    lin = QuantLinear(k, n, bias=False, w_bits=4, a_bits=4, hadamard_block=128).cuda()
    w = lin.weight

    def bf16_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = F.linear(x, w)
        return torch.autograd.grad(y, (x, w), dy)

    def module_step(path):
        lin.kernels = path

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = lin(x)
            return torch.autograd.grad(y, (x, w), dy)

        return step

    r["bf16_ms"] = bench(bf16_step)
    r["kernels_ms"] = bench(module_step("triton"))
    r["fakequant_reference_ms"] = bench(module_step("reference"), rep=50)
    if with_compiled:
        try:
            lc = _fq_compiled()
            for _ in range(2):
                torch.autograd.grad(lc(x, w), (x, w), dy)
            r["fakequant_compiled_ms"] = bench(lambda: torch.autograd.grad(lc(x, w), (x, w), dy))
        except Exception as e:  # compile problems must not lose the rest
            r["fakequant_compiled_error"] = f"{type(e).__name__}: {e}"
    r["speedup_vs_bf16"] = round(r["bf16_ms"] / r["kernels_ms"], 3)
    r["speedup_vs_fakequant_reference"] = round(r["fakequant_reference_ms"] / r["kernels_ms"], 3)
    if "fakequant_compiled_ms" in r:
        r["speedup_vs_fakequant_compiled"] = round(r["fakequant_compiled_ms"] / r["kernels_ms"], 3)
        r["fakequant_compiled_vs_bf16"] = round(r["bf16_ms"] / r["fakequant_compiled_ms"], 3)
    return r


@section("step")
def step_section(args):
    from coqat.kernels.linear import _dequantize, _masked_rotate
    from coqat.kernels.triton_quant import quantize_rows_triton

    out = {}
    m = 4096 if args.quick else 16384
    out[f"{m}x8192x8192"] = _step_times(m, 8192, 8192, args, with_compiled=not args.quick)
    # backward parts at the big shape
    spec = linear_spec(4, 4, 128)
    x = _rand_bf16(m, 8192)
    qa = quantize_rows_triton(x, spec.act)
    g = _rand_bf16(m, 8192)
    out["part_dequant_x_ms"] = bench(lambda: _dequantize(qa, spec, torch.bfloat16))
    out["part_masked_rotate_dx_ms"] = bench(
        lambda: _masked_rotate(g, qa.mask_bits, spec, torch.bfloat16)
    )
    w = _rand_bf16(8192, 8192)
    out["part_bf16_grad_gemm_ms"] = bench(lambda: g @ w)
    if not args.quick:
        for k, n in ((640, 640), (640, 1792), (1792, 640)):
            out[f"32768x{k}x{n}"] = _step_times(32768, k, n, args, with_compiled=False)
    return out


@section("stepgpu")
def stepgpu_section(args):
    """GPU time (profiler) of one QAT step per linear: the kernels' cost without the CPU."""
    out = {}
    for m, k, n in ((16384, 8192, 8192), (32768, 640, 640), (32768, 640, 1792), (32768, 1792, 640)):
        x = _rand_bf16(m, k).requires_grad_(True)
        w = (torch.randn(n, k, device="cuda") * 0.02).requires_grad_(True)
        dy = _rand_bf16(m, n)
        spec = linear_spec(4, 4, 128)

        def step(fn):
            def run():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = fn()
                return torch.autograd.grad(y, (x, w), dy)

            return run

        out[f"{m}x{k}x{n}"] = {
            "bf16": _gpu_time_by_kernel(step(lambda: F.linear(x, w))),
            "kernels": _gpu_time_by_kernel(step(lambda: lowbit_linear(x, w, None, spec))),
        }
    return out


# ----------------------------------------------------------------------------------- e2e
@section("e2e")
def e2e_section(args):
    import tomllib

    from coqat.bitconfig import BitConfig, LayerBits
    from coqat.quant import quantize_model
    from coqat.workloads import get_workload

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with open(os.path.join(root, "search_spaces", "lm-30m.toml"), "rb") as f:
        spec = tomllib.load(f)["workload"]
    spec = {k: v for k, v in spec.items() if k != "name"}
    workload = get_workload("lm", spec)
    batch, seq = (16 if args.quick else 64), spec["seq_len"]
    gen = torch.Generator("cuda").manual_seed(0)
    idx = torch.randint(0, 256, (batch, seq + 1), device="cuda", generator=gen)
    xb, yb = idx[:, :-1], idx[:, 1:]
    out = {"batch": batch, "seq_len": seq}

    def make(mode):
        torch.manual_seed(0)
        model = workload.build_model().cuda()
        if mode != "bf16":
            names = [
                n
                for n, mod in model.named_modules()
                if isinstance(mod, torch.nn.Linear) and n != "lm_head"
            ]
            cfg = BitConfig({n: LayerBits(4, 4) for n in names})
            quantize_model(model, cfg, kernels="triton" if mode == "kernels" else "reference")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(xb)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), yb.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return step

    losses = {}
    for mode in ("bf16", "kernels", "reference"):
        step = make(mode)
        losses[mode] = float(step())
        out[f"{mode}_step_ms"] = round(bench(step, rep=500 if not args.quick else 200), 3)
        if mode != "reference":
            out[f"{mode}_gpu_profile"] = _gpu_time_by_kernel(step)
    out["first_loss"] = losses
    out["speedup_kernels_vs_bf16"] = round(out["bf16_step_ms"] / out["kernels_step_ms"], 3)
    out["speedup_kernels_vs_reference"] = round(
        out["reference_step_ms"] / out["kernels_step_ms"], 3
    )
    tokens = batch * seq
    for mode in ("bf16", "kernels", "reference"):
        out[f"{mode}_tokens_per_s"] = round(tokens / out[f"{mode}_step_ms"] * 1e3)
    return out


@section("k1once")
def k1once_section(args):
    """A few launches of the default K1 at 16384x8192 (for ncu to profile)."""
    from coqat.kernels.triton_quant import quantize_rows_triton

    x = _rand_bf16(16384, 8192)
    fmt = ref.lowbit_format(4, 4, "quest")
    q = ref.RowQuantizer(4, fmt, "quest", 128)
    for _ in range(3):
        quantize_rows_triton(x, q)
    torch.cuda.synchronize()
    return {}


SECTIONS = [
    env,
    exact,
    gemm_section,
    k1_section,
    diag_section,
    linear_section,
    step_section,
    stepgpu_section,
    e2e_section,
    k1once_section,
]


def summary() -> str:
    lines = ["| figure | value |", "|---|---|"]

    def add(name, val):
        lines.append(f"| {name} | {val} |")

    g = RESULTS.get("gemm", {}).get("8192x8192x8192", {})
    for key in (
        "fp8_rowwise_exact",
        "fp8_rowwise_fast",
        "fp8_tensorwise_exact",
        "triton_fp8_exact",
        "triton_int8",
        "torch_int_mm",
    ):
        if f"{key}_vs_bf16" in g:
            add(
                f"K2 {key} 8192^3 vs BF16",
                f"{g[f'{key}_vs_bf16']}x ({g[f'{key}_tflops']} TF/s; BF16 {g['bf16_tflops']})",
            )
    k1 = RESULTS.get("k1", {})
    for key in ("quest4_h128", "quest4_h128_div_rn", "quest4_noH", "quest4_h64"):
        if key in k1:
            add(f"K1 {key} 16384x8192", f"{k1[key]['TBps']} TB/s ({k1[key]['ms']} ms)")
    if "clone_TBps" in k1:
        add("x.clone() 16384x8192 bf16", f"{k1['clone_TBps']} TB/s")
    lin = RESULTS.get("linear", {})
    if "speedup_vs_bf16_matmul" in lin:
        add(
            "linear fwd incl. K1(x), K1(w) vs BF16",
            f"{lin['speedup_vs_bf16_matmul']}x (quantizer share {lin['quantizer_share']})",
        )
    st = RESULTS.get("step", {})
    for key, r in st.items():
        if isinstance(r, dict) and "speedup_vs_bf16" in r:
            extra = (
                f", vs compiled fake-quant {r['speedup_vs_fakequant_compiled']}x"
                if "speedup_vs_fakequant_compiled" in r
                else ""
            )
            add(
                f"QAT step {key} vs BF16",
                f"{r['speedup_vs_bf16']}x (vs coqat fake-quant "
                f"{r['speedup_vs_fakequant_reference']}x{extra})",
            )
    e = RESULTS.get("e2e", {})
    if "speedup_kernels_vs_bf16" in e:
        add(
            "lm-30m QAT step vs BF16 step",
            f"{e['speedup_kernels_vs_bf16']}x ({e['kernels_step_ms']} vs {e['bf16_step_ms']} ms)",
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="kernels.json", help="where to write every number (JSON)")
    p.add_argument(
        "--sections",
        default=",".join(s.section_name for s in SECTIONS),
        help="comma-separated subset of: " + ", ".join(s.section_name for s in SECTIONS),
    )
    p.add_argument("--quick", action="store_true", help="smaller shapes, fewer variants")
    p.add_argument(
        "--k1-exact-only",
        action="store_true",
        help="in the exact section, check K1 only (K2-K4 checks skipped)",
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    wanted = set(args.sections.split(","))
    for s in SECTIONS:
        if s.section_name in wanted:
            s(args)
            with open(args.out, "w") as f:  # after every section: a timeout keeps what ran
                json.dump(RESULTS, f, indent=2)
    print(json.dumps(RESULTS, indent=1))
    print(summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
