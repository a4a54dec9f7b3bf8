"""The training step compiles whole: no graph breaks in the quantized and search modules.

``torch.compile`` splits a function at every graph break, and each break costs a return to
Python, unfused kernels and a CUDA-graph boundary. These tests fail on any break: they run
``fullgraph=True`` (which raises at a break) with the ``aot_eager`` backend, which traces the
forward AND the backward through AOTAutograd like Inductor does, without compiling C++, so
they run on the CPU. The GPU test does the same with the Triton kernels attached.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import LM_MICRO
from torch import nn

from coqat.bitconfig import BitConfig, LayerBits
from coqat.config import TrainSettings
from coqat.kernels import layer_spec, lowbit_linear, use_kernels
from coqat.quant import QuantLinear, quantize_model
from coqat.training.loop import compile_step
from coqat.workloads.lm import LlamaConfig, LlamaLM

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tiny_lm(seed: int = 0) -> LlamaLM:
    torch.manual_seed(seed)
    return LlamaLM(LlamaConfig(d_model=128, n_layers=2, n_heads=2, ffn_hidden=256,
                               max_seq_len=16))


def _quantized(model: nn.Module) -> nn.Module:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    return quantize_model(model, BitConfig({n: LayerBits(4, 4) for n in names}))


def _loss_and_grads(model: nn.Module, net, idx: torch.Tensor):
    logits = net(idx)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), idx.reshape(-1))
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss, grads


def _on_kernel_path(model: nn.Module) -> nn.Module:
    """Attach the kernel forward as ``use_kernels`` does on a GPU; on a CPU tensor the ops run
    their torch implementations, so this traces exactly what the GPU step traces."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel_forward = lambda mod, x, spec=layer_spec(m): lowbit_linear(
                x, mod.weight, mod.bias, spec)
    return model


@pytest.mark.parametrize("path", ["fake_quant", "kernels"])
def test_qat_step_compiles_without_graph_breaks_and_matches_eager(path):
    model = _quantized(_tiny_lm())
    if path == "kernels":
        _on_kernel_path(model)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_grads(model, model, idx)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_c, grads_c = _loss_and_grads(model, compiled, idx)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-5)
    for g_c, g in zip(grads_c, grads):
        torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["fake_quant", "kernels"])
def test_qat_model_under_autocast_traces_without_graph_breaks(path):
    """Under autocast the layers ask for the autocast dtype (``autocast_input``); what they
    ask must be traceable (torch.amp.is_autocast_available broke the graph at every
    quantized layer under torch 2.11)."""
    model = _quantized(_tiny_lm())
    if path == "kernels":
        _on_kernel_path(model)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(idx)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in
                                                explanation.break_reasons]


@pytest.mark.parametrize("autocast", [False, True])
def test_a_shared_input_is_quantized_once_in_the_compiled_graph(autocast):
    """q/k/v read one tensor: the compiled forward quantizes it once (plus each weight). The
    merge is the graph CSE of Inductor's partitioner, which this backend uses too; under
    autocast it merges the three casts of the input first."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    model = _on_kernel_path(_quantized(_tiny_lm()))
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 16, 128)

    def qkv(t):
        return attn.q_proj(t) + attn.k_proj(t) + attn.v_proj(t)

    backend = aot_autograd(fw_compiler=keep, partition_fn=min_cut_rematerialization_partition)
    compiled = torch.compile(qkv, backend=backend, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = compiled(x.requires_grad_())
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
    quantize_calls = [n for n in graphs[0].graph.nodes
                      if n.op == "call_function" and "quantize_rows" in str(n.target)]
    assert len(quantize_calls) == 4      # x once, and the three weights


@pytest.mark.parametrize("soft", [True, False])
def test_search_layers_compile_without_graph_breaks(soft):
    pytest.importorskip("fvcore")           # coqat.search needs it (absent on the GPU image)
    from coqat.bitsearch.relax import SearchConv2d, SearchLinear

    torch.manual_seed(0)
    lin = SearchLinear.from_float(nn.Linear(256, 64), (2, 4, 16), (4, 8), "quest")
    conv = SearchConv2d.from_float(nn.Conv2d(16, 8, 3), (2, 4), (4, 8), "quest")
    if soft:
        lin.set_mix(torch.softmax(torch.randn(3), 0), torch.softmax(torch.randn(2), 0))
        conv.set_mix(torch.softmax(torch.randn(2), 0), torch.softmax(torch.randn(2), 0))
    else:
        lin.set_mix(1, 0)
        conv.set_mix(0, 1)
    x, xc = torch.randn(8, 256), torch.randn(2, 16, 6, 6)
    for layer, inp in ((lin, x), (conv, xc)):
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        out = compiled(inp.clone().requires_grad_())
        out.sum().backward()
        torch.testing.assert_close(out, layer(inp), rtol=1e-5, atol=1e-5)


def test_hard_search_choices_do_not_recompile_and_match_eager():
    """The weight step draws a new int assignment every step: compiled, the choice is read
    from index buffers, so one graph serves them all, with the eager int path's values."""
    pytest.importorskip("fvcore")
    from torch._dynamo.testing import CompileCounterWithBackend

    from coqat.bitsearch.relax import SearchConv2d, SearchLinear

    torch.manual_seed(0)
    lin = SearchLinear.from_float(nn.Linear(256, 64), (2, 4, 16), (4, 8, 16), "quest")
    conv = SearchConv2d.from_float(nn.Conv2d(16, 8, 3), (2, 4), (4, 8), "rtn")
    for layer, inp, picks in ((lin, torch.randn(8, 256), [(0, 1), (2, 0), (1, 1), (0, 2)]),
                              (conv, torch.randn(2, 16, 6, 6), [(0, 1), (1, 0), (1, 1)])):
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(layer, backend=counter, fullgraph=True)
        for w, a in picks:
            layer.set_mix(w, a)
            x = inp.clone().requires_grad_()
            out = compiled(x)
            (g,) = torch.autograd.grad(out.sum(), x)
            x_e = inp.clone().requires_grad_()
            expect = layer(x_e)
            (g_e,) = torch.autograd.grad(expect.sum(), x_e)
            if layer.w_choices[w] != 16 or layer.a_choices[a] != 16:
                assert torch.equal(out, expect) and torch.equal(g, g_e)
        assert counter.frame_count == 1


def test_compile_setting_is_validated_and_auto_stays_eager_on_the_cpu():
    net = nn.Linear(4, 4)
    assert compile_step(net, TrainSettings(), torch.device("cpu")) is net
    assert compile_step(net, TrainSettings(compile=False), torch.device("cuda")) is net
    assert compile_step(net, TrainSettings(compile=True), torch.device("cpu")) is not net
    with pytest.raises(Exception, match="compile must be"):
        TrainSettings(compile="yes").validate()


@GPU
@pytest.mark.gpu
def test_qat_step_on_the_triton_kernels_compiles_without_graph_breaks():
    model = _quantized(_tiny_lm()).cuda()
    use_kernels(model, "triton")
    idx = torch.randint(0, 256, (4, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(idx)
        assert explanation.graph_break_count == 0, [str(b.reason) for b in
                                                    explanation.break_reasons]
        loss, grads = _loss_and_grads(model, model, idx)
        compiled = torch.compile(model, fullgraph=True)          # Inductor, as training runs
        loss_c, grads_c = _loss_and_grads(model, compiled, idx)
    assert abs(float(loss_c) - float(loss)) < 2e-2 * abs(float(loss)), (float(loss_c), float(loss))
    # Inductor rounds the bf16/fp32 work around the kernels differently, which moves some
    # 4-bit codes at their ties: on an H200 single small gradients differed by up to 20%
    # and all of them together by 6%. A wrong graph (a dropped or merged term) is O(1).
    flat = torch.cat([g.float().flatten() for g in grads])
    flat_c = torch.cat([g.float().flatten() for g in grads_c])
    assert float((flat_c - flat).norm() / flat.norm()) < 0.15


@GPU
@pytest.mark.gpu
def test_compiled_qat_run_on_cuda_graphs_trains_from_empty_constant_caches(tmp_path):
    """``coqat train`` on one GPU compiles with CUDA graphs. The kernels' +-1 tiles are
    cached at their first use, which is then the graph's warm-up run; made there by the
    calling thread they landed in the graph's pool and failed torch's check ("tensor(s) in
    the cudagraph pool not tracked as outputs": every compiled QAT run in a fresh process,
    on an H100)."""
    import math

    from coqat import api
    from coqat.kernels.triton_rotate import hadamard_tile
    from coqat.quant.hadamard import _pm1_matrix

    hadamard_tile.cache_clear()
    _pm1_matrix.cache_clear()
    rec = api.train(LM_MICRO, "w4a4", out=str(tmp_path), steps=6, device="cuda",
                    compile=True, eval_every=3, checkpoint_every=6, progress=False)
    assert hadamard_tile.cache_info().currsize > 0       # the kernels made their tiles
    assert rec.metric is not None and math.isfinite(rec.metric)


@GPU
@pytest.mark.gpu
def test_soft_mixes_compiled_by_inductor_match_the_eager_ones():
    """The architecture step's default on CUDA: soft mixes as two Inductor graphs. Inductor
    may contract the quantizer's float32 steps into FMAs, which moves a code at a rounding
    tie by one step; a wrong graph (a dropped candidate, a lost mask) is O(1)."""
    from coqat.bitsearch.relax import SearchLinear, fuse_soft_mixes

    torch.manual_seed(5)
    m = SearchLinear.from_float(nn.Linear(640, 1792), (2, 3, 4, 8), (4, 6, 8)).cuda()
    x = torch.randn(8, 256, 640, device="cuda")
    yw = torch.softmax(torch.randn(4, device="cuda"), 0).requires_grad_()
    ya = torch.softmax(torch.randn(3, device="cuda"), 0).requires_grad_()
    m.set_mix(yw, ya)
    runs, g = [], None
    for backend in (None, "inductor"):
        fuse_soft_mixes({"m": m}, backend)
        xx = x.clone().requires_grad_()
        out = m(xx)
        g = torch.randn_like(out) if g is None else g
        runs.append((out, *torch.autograd.grad(out, (xx, m.weight, yw, ya), g)))
    fuse_soft_mixes({"m": m}, None)
    for eager, fused in zip(*runs):
        rel = float((fused - eager).float().norm() / eager.float().norm())
        assert rel < 1e-3, rel


def test_cli_compile_flag_reaches_the_run_config_and_bad_values_exit_2(tmp_path):
    from conftest import DIGITS, assert_one_line_error, cli_json, run_cli

    proc = run_cli("train", "--space", DIGITS, "--steps", "2", "--compile", "maybe",
                   "--out", str(tmp_path), "-q")
    assert_one_line_error(proc, "--compile 'maybe'", "auto, on or off")
    rec = cli_json("train", "--space", DIGITS, "--steps", "2", "--compile", "off",
                   "--out", str(tmp_path))
    config = json.loads((Path(rec["run_dir"]) / "config.json").read_text())
    assert config["settings"]["compile"] is False


def test_compiled_steps_use_cuda_graphs_unless_a_hook_runs_the_model_between_them(
        monkeypatch):
    from coqat.bitsearch.gumbel import GumbelSearchHooks
    from coqat.training.hooks import TrainHooks

    modes = []
    monkeypatch.setattr(torch, "compile", lambda net, mode=None, **kw: modes.append(mode) or net)
    on = TrainSettings(compile=True)
    for graphs in (True, False):
        compile_step(nn.Linear(4, 4), on, torch.device("cuda"), graphs=graphs)
    compile_step(nn.Linear(4, 4), on, torch.device("cpu"))
    assert modes == ["reduce-overhead", None, None]
    assert TrainHooks.cuda_graphs and not GumbelSearchHooks.cuda_graphs


@pytest.mark.parametrize("compile_arch", [False, True])
@pytest.mark.parametrize("choice", ["auto", True, False])
def test_search_and_its_fp_phase_follow_the_compile_choice(monkeypatch, tmp_path, choice,
                                                          compile_arch):
    """--compile reaches every phase of a search: the FP phase and the final QAT compile
    with CUDA graphs where they apply, the Gumbel weight steps without (the architecture
    step runs the model between them). The architecture step compiles its own model only
    with ``[search] compile_arch = true``: by default it runs eagerly."""
    pytest.importorskip("fvcore")
    from coqat.bitsearch import GumbelSearchHooks, relax, run_search
    from coqat.training import loop
    from conftest import LM_MICRO, run_config

    monkeypatch.setattr(relax, "_COMPILED", {})
    steps, compiled, arch_nets = [], [], []
    real_compile_step = loop.compile_step
    real_on_start = GumbelSearchHooks.on_start

    def record_step(net, settings, device, graphs=True):
        steps.append((settings.compile, graphs))
        return real_compile_step(net, settings.replace(compile=False), device)

    def record_arch_net(self, ctx):
        real_on_start(self, ctx)
        arch_nets.append(self.arch_net)

    monkeypatch.setattr(loop, "compile_step", record_step)
    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiled.append(net) or net)
    monkeypatch.setattr(GumbelSearchHooks, "on_start", record_arch_net)
    cfg = run_config(LM_MICRO, tmp_path, steps=2, seed=0, fp_steps=2, search_steps=2,
                     compile=choice, compile_arch=compile_arch)
    assert cfg.fp_phase(5).train.compile == choice
    run_search(cfg, "w4a4", "gumbel")
    assert steps == [(choice, True), (choice, False), (choice, True)]   # FP, search, QAT
    arch_compiled = choice is True and compile_arch               # "auto" is eager on the CPU
    # compile on and the architecture step eager: only its two soft-mix functions compile
    mixes = [relax._mix_values, relax._mix_grads] if choice is True and not compile_arch else []
    assert compiled == ([compiled[0]] if arch_compiled else mixes)
    if arch_compiled:
        assert isinstance(compiled[0], nn.Module)
    assert len(arch_nets) == 1 and (arch_nets[0] is not None) == arch_compiled


def test_the_architecture_step_compiles_once_for_every_soft_sample(monkeypatch, tmp_path):
    """With compile on, the architecture step is eager unless ``compile_arch`` is set. Set,
    every architecture step draws new soft mixes: they are inputs of the compiled graph, so
    one graph serves them all, and the logits move as the eager step moves them."""
    pytest.importorskip("fvcore")
    import copy
    from types import SimpleNamespace

    from torch._dynamo.testing import CompileCounterWithBackend

    from coqat.bitsearch import GumbelSearch, GumbelSearchHooks, SearchSettings, to_search_model
    from coqat.bitsearch.pipeline import plan_search
    from conftest import LM_MICRO, run_config

    from coqat.bitsearch import relax

    job = plan_search(run_config(LM_MICRO, tmp_path), "w4a4")    # builds, trains nothing
    prep, problem, wl = job.fp_prep, job.problem, job.fp_prep.workload
    counter = CompileCounterWithBackend("aot_eager")
    real_compile = torch.compile
    monkeypatch.setattr(relax, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile",
                        lambda net, **kw: real_compile(net, **{**kw, "backend": counter}))
    logits = []
    for compile_arch in (False, True):
        model = copy.deepcopy(prep.model)
        settings = SearchSettings(arch_every=1, compile_arch=compile_arch).validate()
        gs = GumbelSearch(problem, prep.cost, to_search_model(model, problem),
                          job.budget.bops, settings, 0, arch_steps=4)
        hooks = GumbelSearchHooks(gs, total_steps=10, arch_batch_size=4)
        ctx = SimpleNamespace(step=0, model=model, settings=TrainSettings(compile=True),
                              device=torch.device("cpu"), workload=wl, loss=0.0,
                              dist=SimpleNamespace(rank=0, world_size=1))
        hooks.on_start(ctx)
        assert (hooks.arch_net is not None) == compile_arch
        before = counter.frame_count
        for i in range(3):                     # three architecture steps (arch_every = 1)
            ctx.step = i
            hooks.after_optimizer_step(ctx)
            if i == 0:
                first = counter.frame_count
        assert gs.k == 3
        # eager step: its soft mixes compiled, a few graphs (one per operand layout and
        # candidate set, not per layer or step); compiled step: one graph for the model
        assert counter.frame_count == first and (first - before == 1 if compile_arch
                                                 else 2 <= first - before <= 8)
        logits.append(torch.cat([t.detach() for t in gs.parameters()]))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    net, x = hooks.arch_net, wl.get_batch("holdout", 0, 4)
    for i in range(2):                   # hard samples: one more graph, whatever is drawn
        gs.apply(gs.sample(i, "weights", "hard"))
        wl.loss(net, x)
    assert counter.frame_count == first + 1


def test_search_step_benchmark_times_both_step_kinds_on_the_cpu():
    """benchmarks/search_steps.py end to end at toy size (aot_eager compiles nothing)."""
    pytest.importorskip("fvcore")
    import importlib.util

    from conftest import LM_MICRO

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "search_steps.py"
    spec = importlib.util.spec_from_file_location("search_steps", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)           # it takes benchmarks/ off sys.path again itself
    res = mod.measure(LM_MICRO, "w4a4", 1, "aot_eager", say=lambda _: None)
    for kind in ("weight", "arch"):
        assert res[f"eager_{kind}_ms"] > 0 and res[f"compiled_{kind}_ms"] > 0
        assert res[f"compiled_{kind}_first_s"] > 0
    assert res["fused_arch_ms"] > 0 and res["fused_arch_first_s"] > 0
    assert res["arch_steps_in_search"] >= 1 and res["decisions"] > 0
    quick = mod.measure(LM_MICRO, "w4a4", 1, "aot_eager", compiled_arch=False,
                        arch_only=True, say=lambda _: None)
    assert quick["fused_arch_ms"] > 0 and quick["eager_arch_ms"] > 0
    assert "compiled_arch_ms" not in quick and "eager_weight_ms" not in quick


def test_compile_time_benchmark_runs_both_variants_in_fresh_processes(tmp_path):
    """benchmarks/compile_time.py end to end at toy size: each (phase, variant) row comes
    from its own process, and the two variants train the same model to the same loss."""
    pytest.importorskip("fvcore")
    import json
    import subprocess
    import sys

    from conftest import LM_MICRO

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "ct.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "compile_time.py"), "--space",
                    str(LM_MICRO), "--device", "cpu", "--backend", "aot_eager", "--steps", "1",
                    "--phases", "qat-mixed", "--json", str(out)], check=True,
                   capture_output=True, cwd=root)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["phase"], r["variant"]) for r in rows] == [("qat-mixed", "whole"),
                                                          ("qat-mixed", "regional")]
    whole, regional = rows
    assert "error" not in whole and "error" not in regional
    assert whole["step_ms"] > 0 and regional["first_3_steps_s"] > 0
    assert abs(whole["last_loss"] - regional["last_loss"]) < 1e-4
