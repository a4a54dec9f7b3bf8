"""Correctness and speed of coqat's low-bit kernels on a CUDA GPU, eager and compiled.

Every speed figure is a ratio against torch BF16 measured in the same run, both eager and
``torch.compile``d (the baseline a nanoGPT-style training run uses), with
``triton.testing.do_bench`` medians (L2 flushed between repetitions). Sections:

  env        device, driver and library versions
  exact      K1 against the torch reference at GPU shapes: code mismatch rate (the rotation
             contract allows one-step differences at float32 ties), max code difference,
             steps; bit-equality on grid inputs. K2 exactness of the FP8/INT8
             accumulation, K3 gradients vs the fake-quant module, K4 pack/unpack
  gemm       K2 at M=N=K=8192 (and more): cuBLAS BF16 vs FP8 exact/fast, Triton FP8/INT8
  k1         K1 bandwidth at 16384x8192 (H128 / H64 / no rotation), a sweep of launch
             configurations, vs x.clone(); the lm-30m activation shapes
  linear     forward of a linear incl. quantizing x and w, M=16384, K=N=8192, with the time
             split into quantizer and GEMM
  step       one QAT step of a linear (forward + v1 backward), eager and compiled, vs BF16
             eager and compiled, at the big shape and at the lm-30m shapes
  e2e        one training step of the lm-30m model (batch 64x512, bf16 autocast, fused
             AdamW): BF16 eager / compiled (= coqat's FP phase), QAT W4A4 on the kernels
             eager / compiled / compiled with CUDA graphs; GPU time split by kernel family

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

from coqat.kernels import linear_spec, lowbit_linear, use_kernels  # noqa: E402
from coqat.kernels import reference as ref  # noqa: E402

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
            if torch.cuda.is_available():
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

    if not torch.cuda.is_available():
        return {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                "python": platform.python_version(), "numpy": numpy.__version__}
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
def _k1_mismatch(x, q, config=None):
    """K1 vs the torch reference: how many codes differ (the contract allows one step at
    float32 ties), by how much at most, how many steps and mask bytes differ."""
    from coqat.kernels.triton_quant import quantize_rows_triton

    a = quantize_rows_triton(x, q, config=config)
    b = ref.quantize_ref(x, q)
    diff = (ref.integer_codes(a.codes, q.fmt).int() - ref.integer_codes(b.codes, q.fmt).int()).abs()
    out = {
        "codes_differ": int((diff > 0).sum()),
        "rate": float((diff > 0).sum()) / x.numel(),
        "max_code_diff": int(diff.max()),
        "steps_differ": int((a.step.view(torch.int32) != b.step.view(torch.int32)).sum()),
        "max_step_rel_diff": float(((a.step - b.step).abs() / b.step).max()),
        "mask_bytes_differ": int((a.mask_bits != b.mask_bits).sum()),
        "elements": x.numel(),
        "rows": x.shape[0],
    }
    if b.rowsum is not None:
        out["rowsums_differ"] = int((a.rowsum != b.rowsum).sum())
    g = (torch.round(x.float().clamp(-3.9, 3.9) * 64) / 64).to(x.dtype)  # exact float32 sums
    a, b = quantize_rows_triton(g, q, config=config), ref.quantize_ref(g, q)
    out["grid_inputs_bit_equal"] = bool(
        torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8))
        and torch.equal(a.step, b.step) and torch.equal(a.mask_bits, b.mask_bits))
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
    from coqat.quant import QuantLinear

    FIXED = gemm.GemmConfig(128, 128, 128, 8, 8, 4)
    torch.manual_seed(0)
    res = {}
    big = (4096, 8192) if args.quick else (16384, 8192)
    x = _rand_bf16(*big) * torch.rand(big[0], 1, device="cuda").to(torch.bfloat16)
    cases = [
        ("quest4_h128_bf16", x, 4, "quest", 128),
        ("quest2_h128_bf16", x, 2, "quest", 128),
        ("quest8_h128_int8corr", x, 8, "quest", 128),
        ("quest6_h64", x, 6, "quest", 64),
        ("rtn4_noH", x, 4, "rtn", 1),
        ("quest4_w_fp32_8192", torch.randn(8192, 8192, device="cuda") * 0.02, 4, "quest", 128),
        ("quest8_w_fp32_8192", torch.randn(8192, 8192, device="cuda") * 0.02, 8, "quest", 128),
        ("quest4_lm30m_640_fp32", torch.randn(32768, 640, device="cuda"), 4, "quest", 128),
        ("quest4_lm30m_1792_bf16", _rand_bf16(32768, 1792), 4, "quest", 128),
    ]
    for name, t, bits, method, block in cases:
        fmt = ref.lowbit_format(bits, bits, method)
        res[f"k1_{name}"] = _k1_mismatch(t, ref.RowQuantizer(bits, fmt, method, block))
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
            use_kernels(lin, path)
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
def _k1_time(t, bits, method, block, config=None, with_mask=True):
    from coqat.kernels.triton_quant import quantize_rows_triton

    fmt = ref.lowbit_format(bits, bits, method)
    q = ref.RowQuantizer(bits, fmt, method, block)
    quantize_rows_triton(t, q, with_mask, config=config)
    ms = bench(lambda: quantize_rows_triton(t, q, with_mask, config=config))
    # bytes moved: the input once, one code byte, one mask bit an element, one step a row
    nbytes = t.numel() * (t.element_size() + 1) + t.numel() // 8 + t.shape[0] * 4
    return {"ms": round(ms, 4), "TBps": round(nbytes / ms / 1e9, 3),
            "bytes_per_elem": round(nbytes / t.numel(), 3)}


K1_SWEEP = [(tile, warps, pps) for tile in (4096, 8192, 16384) for warps in (4, 8)
            for pps in (1, 2)]


@section("k1")
def k1_section(args):
    from coqat.kernels import triton_quant
    from coqat.kernels.triton_quant import QuantConfig

    out = {}
    m, k = 16384, 8192
    x = _rand_bf16(m, k)
    out["clone_ms"] = bench(lambda: x.clone())
    out["clone_TBps"] = round(2 * x.numel() * 2 / out["clone_ms"] / 1e9, 3)
    x6 = torch.randn(32768, 640, device="cuda")          # lm-30m: RMSNorm output, float32
    x17 = _rand_bf16(32768, 1792)                         # lm-30m: down_proj input, bf16
    sweep = {}
    for tile, warps, pps in K1_SWEEP:
        cfg = QuantConfig(tile, warps, pps)
        name = f"tile{tile}_w{warps}_pps{pps}"
        try:
            r = {"big": _k1_time(x, 4, "quest", 128, cfg)}
            r["x640_fp32"] = _k1_time(x6, 4, "quest", 128, cfg)
            r["x1792_bf16"] = _k1_time(x17, 4, "quest", 128, cfg)
            sweep[name] = r
        except Exception as e:  # a configuration that does not compile must not stop the sweep
            sweep[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    out["sweep"] = sweep
    ok = {n: r for n, r in sweep.items() if "error" not in r}
    # The default for later sections: the best total over the three shapes.
    best = min(ok, key=lambda n: sum(v["ms"] for v in ok[n].values()))
    tile, warps, pps = next(c for c in K1_SWEEP if f"tile{c[0]}_w{c[1]}_pps{c[2]}" == best)
    triton_quant.DEFAULT_CONFIG = QuantConfig(tile, warps, pps)
    out["best"] = {"config": best, **ok[best]}
    out["best_per_shape"] = {shape: min(ok, key=lambda n: ok[n][shape]["ms"])
                             for shape in ("big", "x640_fp32", "x1792_bf16")}
    out["quest4_h128"] = _k1_time(x, 4, "quest", 128)
    out["quest4_h128_fp32_weight_8192"] = _k1_time(torch.randn(8192, 8192, device="cuda"),
                                                   4, "quest", 128)
    out["quest8_h128_int8"] = _k1_time(x, 8, "quest", 128)
    out["quest4_h64"] = _k1_time(x, 4, "quest", 64)
    out["quest4_h32"] = _k1_time(x, 4, "quest", 32)
    out["quest4_noH"] = _k1_time(x, 4, "quest", 1)
    out["rtn4_noH"] = _k1_time(x, 4, "rtn", 1)
    # Where K1's time goes: without the mask, and the rotation alone (bf16 in, fp32 out)
    out["quest4_h128_no_mask"] = _k1_time(x, 4, "quest", 128, with_mask=False)
    from coqat.kernels.triton_rotate import hadamard_triton, masked_rotate_triton

    hadamard_triton(x, 128)
    ms = bench(lambda: hadamard_triton(x, 128))
    out["rotation_only_bf16_to_fp32"] = {"ms": round(ms, 4),
                                         "TBps": round(x.numel() * 6 / ms / 1e9, 3)}
    mbits = torch.randint(0, 256, (32768, 80), dtype=torch.uint8, device="cuda")
    g6 = _rand_bf16(32768, 640)
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        masked_rotate_triton(g6, mbits, 128, dt)
        ms = bench(lambda: masked_rotate_triton(g6, mbits, 128, dt))
        nbytes = g6.numel() * (2 + dt.itemsize) + mbits.numel()
        out[f"masked_rotate_32768x640_to_{name}"] = {"ms": round(ms, 4),
                                                     "TBps": round(nbytes / ms / 1e9, 3)}
    fmt = ref.lowbit_format(4, 4, "quest")
    q = ref.RowQuantizer(4, fmt, "quest", 128)
    out["torch_reference_ms"] = round(bench(lambda: ref.quantize_ref(x, q), rep=50), 3)
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
        name = ev.key.lower()
        if "quantize_rows" in name:
            fam = "K1 quantize"
        elif "masked_rotate" in name:
            fam = "bwd masked rotate"
        elif "dequantize" in name:
            fam = "bwd dequantize"
        elif "lowbit_gemm" in name or "f8f8bf16" in name or "e4m3" in name:
            fam = "FP8/INT8 GEMM"
        elif "gemm" in name or "nvjet" in name or "cutlass" in name or "sm90_xmma" in name:
            fam = "BF16 GEMM"
        elif "flash" in name or "attention" in name or "fmha" in name:
            fam = "attention"
        elif "adam" in name:
            fam = "optimizer"
        elif name.startswith("triton_"):
            fam = "Inductor fused kernels (norms, RoPE, SwiGLU, casts, loss)"
        else:
            fam = "other eager kernels"
        fams[fam] = fams.get(fam, 0.0) + t / 1e3 / n_steps
        total += t / 1e3 / n_steps
    return {"gpu_ms_per_step": round(total, 3), **{k: round(v, 3) for k, v in sorted(fams.items())}}


# -------------------------------------------------------------------------------- linear
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
    lin_c = torch.compile(F.linear)
    lin_c(x, w16)
    out["bf16_compiled_ms"] = bench(lambda: lin_c(x, w16))
    spec = linear_spec(4, 4, 128)
    with torch.no_grad():
        out["kernels_fwd_bf16_weight_ms"] = bench(lambda: lowbit_linear(x, w16, None, spec))

        def kern_autocast():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return lowbit_linear(x, w32, None, spec)

        def bf16_autocast():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return F.linear(x, w32)

        out["bf16_autocast_fp32_master_ms"] = bench(bf16_autocast)
        out["kernels_fwd_fp32_master_ms"] = bench(kern_autocast)
        qa = quantize_rows_triton(x, spec.act)
        qw16 = quantize_rows_triton(w16, spec.weight)
        out["part_k1_x_ms"] = bench(lambda: quantize_rows_triton(x, spec.act))
        out["part_k1_w_bf16_ms"] = bench(lambda: quantize_rows_triton(w16, spec.weight))
        out["part_k1_w_fp32_ms"] = bench(lambda: quantize_rows_triton(w32, spec.weight))
        out["part_gemm_ms"] = bench(lambda: gemm.lowbit_matmul_scaled_mm(qa, qw16, spec.fmt))
    out["speedup_vs_bf16_matmul"] = round(out["bf16_matmul_ms"] / out["kernels_fwd_bf16_weight_ms"], 3)
    out["speedup_vs_bf16_compiled"] = round(out["bf16_compiled_ms"] / out["kernels_fwd_bf16_weight_ms"], 3)
    out["speedup_autocast"] = round(
        out["bf16_autocast_fp32_master_ms"] / out["kernels_fwd_fp32_master_ms"], 3)
    out["quantizer_share"] = round(
        (out["part_k1_x_ms"] + out["part_k1_w_bf16_ms"]) / out["kernels_fwd_bf16_weight_ms"], 3)
    return out


def _step_times(m, k, n, compiled_too=True):
    """One QAT step of a linear (fwd + bwd w.r.t. x and W, fp32 master weight, bf16 autocast)."""
    r = {}
    x = _rand_bf16(m, k).requires_grad_(True)
    dy = _rand_bf16(m, n)
    w = (torch.randn(n, k, device="cuda") * 0.02).requires_grad_(True)
    spec = linear_spec(4, 4, 128)

    def step_of(fn):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fn(x, w)
            return torch.autograd.grad(y, (x, w), dy)

        return step

    def bf16(x_, w_):
        return F.linear(x_, w_)

    def kernels(x_, w_):
        return lowbit_linear(x_, w_, None, spec)

    r["bf16_ms"] = bench(step_of(bf16))
    r["kernels_ms"] = bench(step_of(kernels))
    if compiled_too:
        for name, fn, mode in (("bf16_compiled_ms", bf16, None),
                               ("kernels_compiled_ms", kernels, None),
                               ("bf16_cudagraphs_ms", bf16, "reduce-overhead"),
                               ("kernels_cudagraphs_ms", kernels, "reduce-overhead")):
            step = step_of(torch.compile(fn, mode=mode))
            step()
            step()
            r[name] = bench(step)
    r["speedup_vs_bf16"] = round(r["bf16_ms"] / r["kernels_ms"], 3)
    if compiled_too:
        r["compiled_speedup_vs_bf16_compiled"] = round(
            r["bf16_compiled_ms"] / r["kernels_compiled_ms"], 3)
        r["compiled_speedup_vs_bf16_eager"] = round(r["bf16_ms"] / r["kernels_compiled_ms"], 3)
        r["cudagraphs_speedup_vs_bf16_cudagraphs"] = round(
            r["bf16_cudagraphs_ms"] / r["kernels_cudagraphs_ms"], 3)
        r["cudagraphs_speedup_vs_bf16_compiled"] = round(
            r["bf16_compiled_ms"] / r["kernels_cudagraphs_ms"], 3)
        r["gpu_profile_bf16"] = _gpu_time_by_kernel(step_of(bf16))
        r["gpu_profile_kernels"] = _gpu_time_by_kernel(step_of(kernels))
    return r


@section("step")
def step_section(args):
    out = {}
    m = 4096 if args.quick else 16384
    out[f"{m}x8192x8192"] = _step_times(m, 8192, 8192)
    for k, n in ((640, 640), (640, 1792), (1792, 640)):
        out[f"32768x{k}x{n}"] = _step_times(32768, k, n)
    return out


# ----------------------------------------------------------------------------------- e2e
@section("e2e")
def e2e_section(args):
    import tomllib

    import coqat.kernels.linear as klinear
    import coqat.quant.modules as qmodules
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

    cast = qmodules.autocast_input

    def make(quantized, mode):
        # "qat_f32in": the quantizers read the RMSNorm's float32 outputs as they are (as
        # before 2026-12-07, when coqat.quant.autocast_input made them read the bf16 input
        # that F.linear multiplies); the same model otherwise: what that change saves
        qmodules.autocast_input = klinear.autocast_input = (
            (lambda x: x) if quantized == "f32in" else cast)
        torch.manual_seed(0)
        model = workload.build_model().cuda()
        if quantized:
            names = [n for n, mod in model.named_modules()
                     if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
            quantize_model(model, BitConfig({n: LayerBits(4, 4) for n in names}))
            use_kernels(model, "triton")
        net = model if mode == "eager" else torch.compile(
            model, mode="reduce-overhead" if mode == "cudagraphs" else None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = net(xb)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), yb.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return step

    losses = {}
    variants = [("bf16", False, "eager"), ("bf16", False, "compiled"),
                ("bf16", False, "cudagraphs"), ("qat", True, "compiled"),
                ("qat", True, "cudagraphs"), ("qat", True, "eager"),
                ("qat_f32in", "f32in", "cudagraphs")]
    for kind, quantized, mode in variants:
        name = f"{kind}_{mode}"
        try:
            t0 = time.time()
            step = make(quantized, mode)
            losses[name] = float(step())
            step()
            out[f"{name}_first_steps_s"] = round(time.time() - t0, 1)
            out[f"{name}_step_ms"] = round(bench(step, rep=300 if not args.quick else 100), 3)
            if mode != "cudagraphs":
                out[f"{name}_gpu_profile"] = _gpu_time_by_kernel(step)
        except Exception as e:  # one failing variant must not lose the others
            traceback.print_exc()
            out[f"{name}_error"] = f"{type(e).__name__}: {e}"[:500]
        torch.compiler.reset()
    qmodules.autocast_input = klinear.autocast_input = cast
    out["first_loss"] = losses
    tokens = batch * seq

    def ratio(a, b):
        if f"{a}_step_ms" in out and f"{b}_step_ms" in out:
            out[f"{b}_vs_{a}"] = round(out[f"{a}_step_ms"] / out[f"{b}_step_ms"], 3)

    ratio("bf16_eager", "bf16_compiled")          # the FP phase, compiled vs eager
    ratio("bf16_eager", "bf16_cudagraphs")        # ... as coqat's loop compiles it
    ratio("bf16_cudagraphs", "qat_cudagraphs")
    ratio("bf16_cudagraphs", "qat_f32in_cudagraphs")
    ratio("qat_f32in_cudagraphs", "qat_cudagraphs")
    for q in ("qat_compiled", "qat_cudagraphs", "qat_eager"):
        ratio("bf16_compiled", q)
        ratio("bf16_eager", q)
    for key in [k_ for k_ in out if k_.endswith("_step_ms")]:
        out[key.replace("_step_ms", "_tokens_per_s")] = round(tokens / out[key] * 1e3)
    return out


# ---------------------------------------------------------------------------------- loop
@section("loop")
def loop_section(args):
    """coqat's own training loop on lm-30m: FP phase then QAT W4A4 (kernels auto), compiled
    as ``TrainSettings.compile = "auto"`` does on CUDA vs eager; median step per phase."""
    import tomllib

    from coqat.bitconfig import BitConfig, LayerBits
    from coqat.config import TrainSettings
    from coqat.optim.schedules import Schedule
    from coqat.training.loop import TrainHooks, train
    from coqat.workloads import get_workload

    class StepClock(TrainHooks):
        def __init__(self):
            self.stamps = []

        def after_optimizer_step(self, ctx):
            self.stamps.append((ctx.phase, time.perf_counter()))

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with open(os.path.join(root, "search_spaces", "lm-30m.toml"), "rb") as f:
        spec = tomllib.load(f)["workload"]
    spec = {k: v for k, v in spec.items() if k != "name"}
    spec["corpus"] = ["stdlib", "torch"]          # on any machine with Python and torch
    workload = get_workload("lm", spec)
    steps, qat_start = (40, 20) if args.quick else (80, 40)
    out = {"steps": steps, "qat_start": qat_start}
    for compile_mode in ("auto", False):
        torch.manual_seed(0)
        model = workload.build_model()
        names = [n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        settings = TrainSettings(steps=steps, batch_size=64, warmup_steps=5, eval_every=10_000,
                                 eval_batches=1, final_eval_batches=1, log_every=10,
                                 checkpoint_every=10_000, compile=compile_mode).validate()
        clock = StepClock()
        t0 = time.perf_counter()
        final = train(model=model, workload=workload, settings=settings,
                      schedule=Schedule(steps, 5, qat_start=qat_start),
                      bitconfig=BitConfig({n: LayerBits(4, 4) for n in names}),
                      device=torch.device("cuda"), hooks=[clock], progress=False)
        name = "compiled" if compile_mode == "auto" else "eager"
        out[f"{name}_wall_s"] = round(time.perf_counter() - t0, 1)
        out[f"{name}_final_val_loss"] = final.get(workload.metric)
        for phase in ("fp", "qat"):
            times = [b[1] - a[1] for a, b in zip(clock.stamps, clock.stamps[1:])
                     if a[0] == b[0] == phase]
            times = sorted(times[5:])                 # the first steps compile
            out[f"{name}_{phase}_step_ms"] = round(times[len(times) // 2] * 1e3, 2)
        torch.compiler.reset()
    for phase in ("fp", "qat"):
        out[f"{phase}_compiled_vs_eager"] = round(
            out[f"eager_{phase}_step_ms"] / out[f"compiled_{phase}_step_ms"], 3)
    return out


# ----------------------------------------------------------------------------------- cpu
def _cpu_median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(sorted(times)[len(times) // 2], 2)


def _lm_tiny_step(workload, xb, yb, quantized: bool, compiled: bool = False):
    """One eager (or compiled) AdamW training step of a fresh lm-tiny model, FP or with every
    block Linear quantized to W4A4 (fake-quant path), as a function of no arguments."""
    from coqat.bitconfig import BitConfig, LayerBits
    from coqat.quant import quantize_model

    torch.manual_seed(0)
    model = workload.build_model()
    if quantized:
        names = [n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        quantize_model(model, BitConfig({n: LayerBits(4, 4) for n in names}))
    net = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        logits = net(xb)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _cpu_shared_operands(workload, xb, yb, rounds: int = 12, steps: int = 3) -> dict:
    """The eager lm-tiny W4A4 QAT step with q/k/v and gate/up sharing their quantized input
    (``coqat.quant.shared``, the default) vs each layer quantizing it again: one model, the
    two settings alternated in ``rounds`` rounds of ``steps`` steps, the paired ratio."""
    from coqat.quant import sharing

    step = _lm_tiny_step(workload, xb, yb, quantized=True)
    times = {False: [], True: []}
    for _ in range(rounds + 1):
        for share in (False, True):
            with sharing(share):
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                times[share].append((time.perf_counter() - t0) / steps * 1e3)
    ratios = sorted(a / b for a, b in zip(times[False][1:], times[True][1:]))  # round 0: warm-up
    return {"qat_unshared_step_ms": round(sorted(times[False][1:])[rounds // 2], 2),
            "qat_shared_step_ms": round(sorted(times[True][1:])[rounds // 2], 2),
            "qat_shared_speedup_median": round(ratios[rounds // 2], 3),
            "qat_shared_speedup_range": [round(ratios[0], 3), round(ratios[-1], 3)]}


@section("cpu")
def cpu_section(args):
    """The CPU (the demo's machine): one lm-tiny training step, eager vs torch.compile, FP and
    QAT W4A4 (fake-quant path); the QAT step with and without shared input operands; and the
    rotation before issue #15 (float64 matmul) vs now."""
    import tomllib

    from coqat.quant import hadamard_transform
    from coqat.quant.hadamard import hadamard_scale, sylvester_matrix
    from coqat.workloads import get_workload

    out = {"threads": torch.get_num_threads()}
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with open(os.path.join(root, "search_spaces", "lm-tiny.toml"), "rb") as f:
        space = tomllib.load(f)
    workload = get_workload("lm", {k: v for k, v in space["workload"].items()
                                   if k not in ("name", "corpus")})
    batch = space["train"]["batch_size"]
    idx = torch.randint(0, 256, (batch, workload.seq_len + 1),
                        generator=torch.Generator().manual_seed(0))
    xb, yb = idx[:, :-1], idx[:, 1:]
    for kind in ("fp", "qat"):
        for mode in ("eager", "compiled"):
            step = _lm_tiny_step(workload, xb, yb, kind == "qat", mode == "compiled")
            t0 = time.perf_counter()
            step()
            step()
            out[f"{kind}_{mode}_first_steps_s"] = round(time.perf_counter() - t0, 1)
            out[f"{kind}_{mode}_step_ms"] = _cpu_median_ms(step, 30)
            torch.compiler.reset()
        out[f"{kind}_compiled_vs_eager"] = round(
            out[f"{kind}_eager_step_ms"] / out[f"{kind}_compiled_step_ms"], 3)
    out.update(_cpu_shared_operands(workload, xb, yb))
    x = torch.randn(batch * workload.seq_len, 128)
    h64 = sylvester_matrix(128)

    def float64_rotation():
        return ((x.double().reshape(-1, 128) @ h64) * hadamard_scale(128)).float()

    out["rotation_2048x128_float64_ms"] = _cpu_median_ms(float64_rotation, 200)
    out["rotation_2048x128_float32_ms"] = _cpu_median_ms(lambda: hadamard_transform(x, 128), 200)
    return out


SECTIONS = [env, exact, gemm_section, k1_section, linear_section, step_section, e2e_section,
            loop_section, cpu_section]


def summary() -> str:
    lines = ["| figure | value |", "|---|---|"]

    def add(name, val):
        lines.append(f"| {name} | {val} |")

    k1 = RESULTS.get("k1", {})
    if "best" in k1:
        b = k1["best"]
        add("K1 H128 16384x8192 bf16 (best config)",
            f"{b['big']['TBps']} TB/s, {b['big']['ms']} ms ({b['config']})")
        add("K1 lm-30m 32768x640 fp32 / 32768x1792 bf16",
            f"{b['x640_fp32']['TBps']} / {b['x1792_bf16']['TBps']} TB/s")
    if "clone_TBps" in k1:
        add("x.clone() 16384x8192 bf16", f"{k1['clone_TBps']} TB/s")
    for key in ("quest4_noH", "quest4_h128_fp32_weight_8192"):
        if key in k1:
            add(f"K1 {key}", f"{k1[key]['TBps']} TB/s ({k1[key]['ms']} ms)")
    ex = RESULTS.get("exact", {})
    for key, r in ex.items():
        if key.startswith("k1_") and isinstance(r, dict) and "rate" in r:
            add(f"K1 mismatch {key[3:]}", f"rate {r['rate']:.2e}, max diff {r['max_code_diff']}, "
                f"grid bit-equal {r['grid_inputs_bit_equal']}")
    lin = RESULTS.get("linear", {})
    if "speedup_vs_bf16_matmul" in lin:
        add("linear fwd incl. K1(x), K1(w) vs BF16 (eager / compiled)",
            f"{lin['speedup_vs_bf16_matmul']}x / {lin['speedup_vs_bf16_compiled']}x "
            f"(quantizer share {lin['quantizer_share']})")
    for key, r in RESULTS.get("step", {}).items():
        if isinstance(r, dict) and "speedup_vs_bf16" in r:
            add(f"QAT step {key}: eager vs BF16 eager; compiled vs BF16 compiled; "
                "CUDA graphs vs BF16 CUDA graphs / compiled",
                f"{r['speedup_vs_bf16']}x; {r.get('compiled_speedup_vs_bf16_compiled')}x; "
                f"{r.get('cudagraphs_speedup_vs_bf16_cudagraphs')}x / "
                f"{r.get('cudagraphs_speedup_vs_bf16_compiled')}x")
    e = RESULTS.get("e2e", {})
    for key in ("bf16_compiled_vs_bf16_eager", "bf16_cudagraphs_vs_bf16_eager",
                "qat_cudagraphs_vs_bf16_cudagraphs", "qat_compiled_vs_bf16_compiled",
                "qat_cudagraphs_vs_bf16_compiled", "qat_compiled_vs_bf16_eager",
                "qat_eager_vs_bf16_eager", "qat_f32in_cudagraphs_vs_bf16_cudagraphs",
                "qat_cudagraphs_vs_qat_f32in_cudagraphs"):
        if key in e:
            add(f"lm-30m step {key}", f"{e[key]}x")
    for key in [k_ for k_ in e if k_.endswith("_step_ms")]:
        add(f"lm-30m {key}", e[key])
    for key, v in RESULTS.get("loop", {}).items():
        if key.endswith(("_ms", "_vs_eager", "_wall_s", "_loss")):
            add(f"coqat loop lm-30m {key}", v)
    for key, v in RESULTS.get("cpu", {}).items():
        if key.endswith(("_ms", "_vs_eager")):
            add(f"CPU lm-tiny {key}", v)
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
    wanted = set(args.sections.split(","))
    if not torch.cuda.is_available() and wanted - {"env", "cpu"}:
        print("benchmarks/kernels.py needs a CUDA GPU (only --sections env,cpu run without one)",
              file=sys.stderr)
        return 2
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
