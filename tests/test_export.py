"""Export and deploy (issues #7, #13, #17): packing, qparams, ONNX QDQ, compressed-tensors,
torchao, json, the packed deploy model; each export loaded by its real consumer
(onnxruntime, transformers, torchao) and compared with coqat's metric; short one-line
refusals; no code from a run path; missing optional packages; one-line errors on bad run
directories.

Runs are trained in-process once per session (a few steps of lm-micro and digits) with
hand-picked mixed bits that cover every storage width and both quantizers.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coqat.bitconfig import FLOAT_BITS, BitConfig, LayerBits
from coqat.errors import CoqatError
from coqat.exporters import explain_export, export_run
from coqat.exporters.common import ExportRefused
from coqat.exporters.deploy import deploy, load_packed
from coqat.exporters.loading import fresh_model, load_run
from coqat.exporters.qparams import QPARAMS, dequantize_codes, read_qparams, weight_codes
from coqat.kernels.pack import (pack_codes, pack_int2, pack_int4, unpack_codes, unpack_int2,
                                unpack_int4)
from coqat.quant import quantized_modules
from coqat.quant.quantizers import dequantize
from coqat.training import runner
from conftest import (DIGITS, LM_MICRO, ROOT, assert_one_line_error, cli_json, prepare_run,
                      run_cli)

LM_TINY = str(ROOT / "search_spaces" / "lm-tiny.toml")

pytestmark = pytest.mark.filterwarnings("ignore")


# ------------------------------------------------------------------------- fixtures
def _train(root: Path, space: str, name: str, bits, quantizer: str = "quest",
           steps: int = 6) -> Path:
    """A finished run whose layer bits come from ``bits(fqn, default) -> LayerBits``."""
    prep = prepare_run(space, root, "w4a4", quantizer=quantizer, steps=steps, name=name,
                       qat_fraction=0.5)
    layers = {n: bits(n, lb) for n, lb in prep.bitconfig.layers.items()}
    prep.bitconfig = BitConfig(layers, prep.bitconfig.tie_groups)
    run, _ = runner.execute(prep)
    return run.path


def _untrained_run(root: Path, space: str, name: str, bits=lambda n, lb: lb) -> Path:
    """A run directory as ``runner.execute`` leaves it (header, weights, qparams), minus the
    training and its final full-split evaluation, which would cost most of these tests'
    time. For format numerics and sizes the weights' history does not matter; the trained
    fixtures above cover the training path."""
    from coqat.exporters.qparams import write_qparams
    from coqat.quant import quantize_model
    from coqat.rundir import RunDir

    prep = prepare_run(space, root, "w4a4")
    prep.bitconfig = BitConfig({n: bits(n, lb) for n, lb in prep.bitconfig.layers.items()},
                               prep.bitconfig.tie_groups)
    run = RunDir.create(root, name)
    runner.write_run_header(run, prep, "test")
    quantize_model(prep.model, prep.bitconfig)
    run.save_weights(prep.model.state_dict())
    write_qparams(run, prep.model, prep.bitconfig)
    return run.path


def _lm_mixed(n: str, lb: LayerBits) -> LayerBits:
    if n == "lm_head":
        return lb
    if ".mlp." in n:   # gate/up share an input: one a_bits
        return LayerBits(2 if "down" in n else 4, 8, "quest")
    if n.endswith("o_proj"):  # weight-only: the input is rotated, not quantized
        return LayerBits(8, FLOAT_BITS, "quest")
    return LayerBits(8, 4, "quest")


def _digits_mixed(n: str, lb: LayerBits) -> LayerBits:
    return {"conv1": LayerBits(8, 8, "quest"), "conv2": LayerBits(2, 4, "quest"),
            "fc": LayerBits(4, FLOAT_BITS, "rtn")}[n]


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export-runs")


@pytest.fixture(scope="session")
def lm_mixed(root) -> Path:
    """QuEST, lm-micro: q/k/v w8a4, o w8a16, gate/up w4a8, down w2a8 (int8/int4/int2)."""
    return _train(root, LM_MICRO, "lm-mixed", _lm_mixed)


@pytest.fixture(scope="session")
def lm_rtn(root) -> Path:
    """RTN weight-only, lm-micro: layer 0 at w8a16, layer 1 at w4a16 (vLLM / torchao exact)."""
    return _untrained_run(root, LM_MICRO, "lm-rtn", lambda n, lb: lb if n == "lm_head" else
                          LayerBits(8 if "layers.0" in n else 4, FLOAT_BITS, "rtn"))


@pytest.fixture(scope="session")
def lm_quest_a16(root) -> Path:
    """QuEST weight-only w4a16 (Hadamard-rotated weights, half-integer grid)."""
    return _untrained_run(root, LM_MICRO, "lm-quest-a16", lambda n, lb: lb if n == "lm_head"
                          else LayerBits(4, FLOAT_BITS, "quest"))


@pytest.fixture(scope="session")
def digits_mixed(root) -> Path:
    """Convs (QuEST w8a8, w2a4) and an RTN w4a16 Linear."""
    return _train(root, DIGITS, "digits-mixed", _digits_mixed)


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("exports"))
    return dst


def _edit_bits(run: Path, changes: dict[str, tuple[int, int]]) -> None:
    """Rewrite bitconfig.json's bits (and drop qparams, which no longer match)."""
    doc = json.loads((run / "bitconfig.json").read_text())
    for name, (w, a) in changes.items():
        entry = doc["layers"][name]
        entry["weight"] = None if w == FLOAT_BITS else {**(entry["weight"] or {}), "bits": w}
        entry["input_act"] = None if a == FLOAT_BITS else {**(entry["input_act"] or {}),
                                                           "bits": a}
    (run / "bitconfig.json").write_text(json.dumps(doc))
    (run / QPARAMS).unlink(missing_ok=True)


def _batch(loaded, n: int = 4):
    return loaded.workload.get_batch("val", 0, n)[0]


# ------------------------------------------------------------------------- packing
def test_int4_and_int2_packing_match_hand_computed_bytes():
    assert pack_int4(torch.tensor([1, -1], dtype=torch.int8)).tolist() == [0xF1]
    assert pack_int4(torch.tensor([-8, 7], dtype=torch.int8)).tolist() == [0x78]
    assert pack_int2(torch.tensor([-2, -1, 0, 1], dtype=torch.int8)).tolist() == [0x4E]
    # odd tails are padded with zero codes, per row
    assert pack_int4(torch.tensor([[7, 7, -1]], dtype=torch.int8)).tolist() == [[0x77, 0x0F]]


def _reference_pack(row: list[int], bits: int) -> list[int]:
    """Independent bit manipulation on Python ints: code i of a byte at bit i*bits."""
    per = 8 // bits
    out = []
    for j in range(0, len(row), per):
        byte = 0
        for t, c in enumerate(row[j:j + per]):
            byte |= (c % (1 << bits)) << (t * bits)   # % gives the two's complement field
        out.append(byte)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_unpack_round_trips_and_matches_an_independent_reference(bits):
    rng = random.Random(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for shape in [(1, 1), (3, 7), (2, 4, 9), (5, 64)]:
        codes = torch.tensor([rng.randint(lo, hi) for _ in range(int(np.prod(shape)))],
                             dtype=torch.int8).reshape(shape)
        packed = pack_codes(codes, bits)
        assert torch.equal(unpack_codes(packed, bits, shape[-1]), codes)
        store = 2 if bits == 2 else 4 if bits <= 4 else 8
        if store < 8:
            rows = codes.reshape(-1, shape[-1]).tolist()
            want = [_reference_pack(r, store) for r in rows]
            assert packed.reshape(len(rows), -1).tolist() == want


def test_packing_is_the_onnx_int4_and_int2_layout():
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    for bits, dtype, pack, unpack in ((4, onnx.TensorProto.INT4, pack_int4, unpack_int4),
                                      (2, onnx.TensorProto.INT2, pack_int2, unpack_int2)):
        codes = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=37).astype(np.int8)
        ours = pack(torch.from_numpy(codes))
        theirs = onnx.helper.make_tensor("t", dtype, [37], codes.tolist())  # onnx packs
        assert ours.tolist() == list(theirs.int32_data)
        raw = onnx.helper.make_tensor("t", dtype, [37], bytes(ours.numpy()), raw=True)
        assert numpy_helper.to_array(raw).astype(np.int8).tolist() == codes.tolist()
        assert unpack(ours, 37).tolist() == codes.tolist()


def test_packing_rejects_codes_outside_the_range():
    with pytest.raises(CoqatError, match="outside the 4-bit range"):
        pack_int4(torch.tensor([8], dtype=torch.int8))
    with pytest.raises(CoqatError, match="int8 codes"):
        pack_int2(torch.tensor([1], dtype=torch.int32))
    with pytest.raises(CoqatError, match="cannot hold"):
        unpack_int4(torch.zeros(2, dtype=torch.uint8), 7)


# ------------------------------------------------------------------------- qparams
def test_qat_run_writes_qparams_that_match_its_weights(lm_mixed):
    tensors, doc = read_qparams(lm_mixed / QPARAMS)
    assert json.loads((lm_mixed / "bitconfig.json").read_text())["qparams"] == QPARAMS
    loaded = load_run(lm_mixed)          # check_qparams passes: steps recomputed == stored
    assert loaded.qparams_checked
    down = doc["layers"]["model.layers.0.mlp.down_proj"]
    assert (down["w_bits"], down["a_bits"], down["w_block"]) == (2, 8, 64)
    assert down["weight"]["grid"] == "half-integer"
    assert tensors["model.layers.0.mlp.down_proj.weight_step"].shape == (32,)
    assert "lm_head.weight_step" not in tensors


def test_weight_codes_dequantize_to_the_forward_weights_bit_for_bit(lm_mixed, digits_mixed):
    for run in (lm_mixed, digits_mixed):
        model = load_run(run).model
        for fqn, m in quantized_modules(model):
            if m.w_bits == FLOAT_BITS:
                continue
            lc = weight_codes(m, fqn)
            with torch.no_grad():
                want = m._weight_operand(unrotate=False)
            assert torch.equal(dequantize_codes(lc.codes, lc.step, lc.method), want), fqn


# ------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="session")
def onnx_lm(lm_mixed, root):
    return export_run(lm_mixed, "onnx", root / "onnx-lm")


@pytest.fixture(scope="session")
def onnx_digits(digits_mixed, root):
    return export_run(digits_mixed, "onnx", root / "onnx-digits")


def test_onnx_file_passes_the_full_checker_with_the_configured_types(onnx_lm, onnx_digits):
    import onnx

    for res in (onnx_lm, onnx_digits):
        model = onnx.load(str(Path(res.out_dir) / "model.onnx"))
        onnx.checker.check_model(model, full_check=True)
        assert res.details["opset"] == 25                  # 2-bit tensors present
        assert not [n for n in model.graph.node if n.domain == "coqat"]
    model = onnx.load(str(Path(onnx_lm.out_dir) / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    T = onnx.TensorProto
    for layer, dtype in (("model.layers.0.self_attn.q_proj", T.INT8),
                         ("model.layers.0.mlp.up_proj", T.INT4),
                         ("model.layers.1.mlp.down_proj", T.INT2)):
        codes = inits[f"{layer}.weight_codes"]
        assert codes.data_type == dtype
        assert inits[f"{layer}.weight_zero_point"].data_type == dtype   # QuEST: zp = -1
        nodes = [n for n in model.graph.node
                 if any(p.key == "coqat.layer" and p.value == layer for p in n.metadata_props)]
        ops = [n.op_type for n in nodes]
        assert "QuantizeLinear" in ops and "Sub" in ops       # activation Q/DQ, half step
        assert any(n.op_type == "MatMul" and any("hadamard" in i for i in n.input)
                   or n.op_type == "Cast" and any("hadamard" in i for i in n.input)
                   for n in nodes)                             # explicit rotation
    assert "lm_head.weight_codes" not in inits


def _ort_vs_coqat(res, run, n=8):
    from coqat.exporters.onnx_export import OrtModule, ort_session

    loaded = load_run(run)
    x = _batch(loaded, n)
    with torch.no_grad():
        ref = loaded.model(x)
    errs = []
    for optimize in (False, True):
        out = OrtModule(ort_session(Path(res.out_dir) / "model.onnx", optimize=optimize))(x)
        errs.append(float((out - ref).abs().max() / ref.abs().max()))
    return errs


def test_onnxruntime_matches_coqat_with_and_without_optimizations(onnx_lm, lm_mixed,
                                                                  onnx_digits, digits_mixed):
    for res, run in ((onnx_lm, lm_mixed), (onnx_digits, digits_mixed)):
        unoptimized, optimized = _ort_vs_coqat(res, run)
        assert unoptimized <= 1e-4, (run, unoptimized)
        assert optimized <= 1e-4, (run, optimized)


def test_rtn_layers_fuse_into_matmulnbits_and_stay_exact_at_accuracy_level_1(
        onnx_digits, digits_mixed, tmp_path):
    import onnx
    import onnxruntime as ort

    from coqat.exporters.onnx_export import OrtModule

    loaded = load_run(digits_mixed)
    x = _batch(loaded, 8)
    with torch.no_grad():
        ref = loaded.model(x)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(Path(onnx_digits.out_dir) / "model.onnx"), so,
                                providers=["CPUExecutionProvider"])
    out = OrtModule(sess)(x)
    fused = [n for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node
             if n.op_type == "MatMulNBits"]
    assert len(fused) == 1                                 # fc: RTN w4, DQ -> MatMul
    assert {a.i for a in fused[0].attribute if a.name == "accuracy_level"} == {1}
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_onnx_refusal_is_one_short_line_with_the_decisive_problem_a_count_and_the_fix(
        digits_mixed, tmp_path):
    run = _copy_run(digits_mixed, tmp_path / "run")
    _edit_bits(run, {"conv1": (3, 8), "conv2": (6, 5)})
    with pytest.raises(ExportRefused) as e:
        export_run(run, "onnx")
    msg = str(e.value)
    assert msg.startswith("cannot export to onnx: layer conv1 has 3-bit weights (onnx serves "
                          "2, 4, 8, 16 = float) and 2 more problems; fix: "), msg
    assert "--target onnx" in msg and msg.endswith("; --explain lists them all"), msg
    assert len(msg) < 300 and "\n" not in msg
    assert e.value.problems == explain_export(run, "onnx") == [
        "layer conv1 has 3-bit weights (onnx serves 2, 4, 8, 16 = float)",
        "layer conv2 has 6-bit weights (onnx serves 2, 4, 8, 16 = float)",
        "layer conv2 has 5-bit activations (onnx serves 2, 4, 8, 16 = float)"]
    assert not (run / "exports").exists()                  # nothing half-written


def test_the_demo_configuration_exports_to_onnx_and_onnxruntime_matches_coqat(tmp_path):
    """lm-tiny (the demo's model) with the bits a `--target onnx` search can pick: weights
    2/4/8, activations 4/8, tied inputs sharing one activation width; a few QAT steps."""
    space = tmp_path / "lm-tiny-short.toml"
    space.write_text(Path(LM_TINY).read_text()
                     .replace("eval_batch_size = 32", "eval_batch_size = 16")
                     .replace("checkpoint_every = 100", "checkpoint_every = 100\n"
                              "final_eval_batches = 2"))
    spec = importlib.util.spec_from_file_location(
        "export_consumers", ROOT / "benchmarks" / "export_consumers.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)         # the configuration its report measures
    run = _train(tmp_path / "runs", str(space), "demo-onnx", report.demo_bits, steps=4)
    loaded = load_run(run)
    used = {(lb.w_bits, lb.a_bits) for lb in loaded.bitconfig.quantized().values()}
    assert {w for w, _ in used} == {2, 4, 8} and {a for _, a in used} == {4, 8}
    res = export_run(run, "onnx", tmp_path / "onnx")
    check = res.details["check"]
    assert check["measured"] and check["within_tolerance"], check
    # the user's way: onnxruntime with its default optimizations, the run's own evaluation
    from coqat.exporters.onnx_export import OrtModule, ort_session

    ort = OrtModule(ort_session(Path(res.out_dir) / "model.onnx", optimize=True))
    wl = loaded.workload
    got = wl.evaluate(ort, max_batches=2, batch_size=16)[wl.metric]
    final = json.loads((run / "final.json").read_text())["metric"]
    assert got == pytest.approx(final, abs=1e-4), (got, final)


# ------------------------------------------------------------------------- compressed-tensors
@pytest.fixture(scope="session")
def lm_rtn_a8(root) -> Path:
    """RTN, trained: q/k/v w8a8 (int-quantized), o w4a16, gate/up w4a8, down w8a16."""
    def bits(n: str, lb: LayerBits) -> LayerBits:
        if n == "lm_head":
            return lb
        if n.endswith(("o_proj", "down_proj")):
            return LayerBits(4 if n.endswith("o_proj") else 8, FLOAT_BITS, "rtn")
        return LayerBits(4 if ".mlp." in n else 8, 8, "rtn")

    return _train(root, LM_MICRO, "lm-rtn-a8", bits, quantizer="rtn")


def _metric(loaded, model, batches: int = 2) -> float:
    """The run's own metric of ``model`` (coqat's, or one a consumer loaded) on ``batches``."""
    from coqat.exporters.source import LogitsOf

    wl = loaded.workload
    return wl.evaluate(LogitsOf(model), max_batches=batches)[wl.metric]


def _from_pretrained(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_compressed_tensors_of_a_weight_only_rtn_run_loads_in_transformers_exactly(
        lm_rtn, root):
    from compressed_tensors.quantization import QuantizationConfig

    from coqat.exporters.compressed import decompress_checkpoint

    res = export_run(lm_rtn, "compressed-tensors", root / "ct-rtn")
    assert res.exact and not res.approximations
    qdoc = json.loads((Path(res.out_dir) / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate({k: v for k, v in qdoc.items()
                                       if k not in ("version", "sparsity_config")})
    assert qdoc["ignore"] == ["lm_head"] and "transform_config" not in qdoc
    loaded = load_run(lm_rtn)
    got = decompress_checkpoint(res.out_dir, loaded.workload.build_model())
    for fqn, m in quantized_modules(loaded.model):
        lc = weight_codes(m, fqn)
        assert torch.equal(got[f"{fqn}.weight"], dequantize(lc.codes, lc.step.reshape(-1, 1),
                                                             lc.method)), fqn
        assert res.details["store_bits"][fqn] == m.w_bits
    hf = _from_pretrained(res.out_dir)                       # as a user loads it
    x = _batch(loaded)
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, loaded.model(x), rtol=0, atol=1e-5)
    assert res.details["check"]["within_tolerance"] and res.details["check"]["measured"]


def test_compressed_tensors_of_a_trained_rtn_w8a8_run_matches_coqat_in_transformers(
        lm_rtn_a8, root):
    """Stated tolerance: |loss(transformers) - loss(coqat)| <= 1e-3 nats (measured 6e-6). The
    stored scheme is coqat's; transformers scales int8 activations by absmax/127.5 where
    coqat (and vLLM) use absmax/127, so the export says it is not exact there and reports
    the gap."""
    res = export_run(lm_rtn_a8, "compressed-tensors", root / "ct-rtn-a8")
    assert not res.approximations and not res.exact
    assert any("absmax/127.5" in n for n in res.notes)
    qdoc = json.loads((Path(res.out_dir) / "config.json").read_text())["quantization_config"]
    schemes = {(g["weights"]["num_bits"], g["input_activations"] is not None, g["format"])
               for g in qdoc["config_groups"].values()}
    assert schemes == {(8, True, "int-quantized"), (4, False, "pack-quantized"),
                       (4, True, "pack-quantized"), (8, False, "pack-quantized")}
    loaded = load_run(lm_rtn_a8)
    hf = _from_pretrained(res.out_dir)
    ours, theirs = _metric(loaded, loaded.model, 4), _metric(loaded, hf, 4)
    assert abs(theirs - ours) <= 1e-3, (theirs, ours)
    check = res.details["check"]                             # what the export reported
    assert check["coqat"] == _metric(loaded, loaded.model)
    assert check["exported"] == pytest.approx(_metric(loaded, hf), abs=1e-7)


def test_compressed_tensors_refuses_quest_in_one_line_then_approximates_with_the_measured_gap(
        lm_mixed, root):
    with pytest.raises(ExportRefused) as e:
        export_run(lm_mixed, "compressed-tensors")
    msg = str(e.value)
    assert msg.startswith("cannot export to compressed-tensors: layer "
                          "model.layers.0.self_attn.q_proj: quest weights are Hadamard-rotated")
    problems = explain_export(lm_mixed, "compressed-tensors")
    assert e.value.problems == problems and len(problems) == 14 + 6 + 6  # rotated; a4; QuEST a8
    assert f"and {len(problems) - 1} more problems; fix: " in msg
    assert "--quantizer rtn --target vllm" in msg and "--approx" in msg and len(msg) < 300
    assert explain_export(lm_mixed, "compressed-tensors", approx=True) == []
    res = export_run(lm_mixed, "compressed-tensors", root / "ct-approx", approx=True)
    assert not res.exact and len(res.approximations) == 14
    assert all("weight error" in a for a in res.approximations)
    assert res.details["store_bits"]["model.layers.0.mlp.down_proj"] == 4   # w2 -> int4
    manifest = json.loads((Path(res.out_dir) / "export.json").read_text())
    assert manifest["approximations"] == res.approximations
    # the stated gap is the one a user gets from transformers
    loaded = load_run(lm_mixed)
    check = res.details["check"]
    assert check["exported"] == pytest.approx(_metric(loaded, _from_pretrained(res.out_dir)),
                                              abs=1e-7)
    assert check["gap"] == pytest.approx(check["exported"] - _metric(loaded, loaded.model))


def test_compressed_tensors_refuses_models_that_are_not_causal_lms(digits_mixed):
    with pytest.raises(ExportRefused, match=r"\(workload digits\) is not a Hugging Face "
                                            r"style causal LM.*fix: use --format onnx"):
        export_run(digits_mixed, "compressed-tensors", approx=True)


def test_compressed_tensors_stores_unequal_fused_shards_at_one_width_only_with_approx(
        lm_rtn, tmp_path):
    from coqat.exporters.compressed import decompress_checkpoint

    run = _copy_run(lm_rtn, tmp_path / "run")
    _edit_bits(run, {"model.layers.0.self_attn.k_proj": (4, 16)})
    with pytest.raises(ExportRefused, match=r"layer model.layers.0.self_attn.k_proj: fused "
                                            r"with q_proj, v_proj at int8"):
        export_run(run, "compressed-tensors")
    res = export_run(run, "compressed-tensors", tmp_path / "ct", approx=True)
    assert res.details["store_bits"]["model.layers.0.self_attn.k_proj"] == 8
    loaded = load_run(run)
    k = loaded.model.get_submodule("model.layers.0.self_attn.k_proj")
    lc = weight_codes(k, "k")
    got = decompress_checkpoint(res.out_dir, loaded.workload.build_model())
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"],    # w4 codes, int8 box
                       dequantize(lc.codes, lc.step.reshape(-1, 1), "rtn"))


def test_exports_are_written_with_the_umask_modes(lm_rtn, tmp_path):
    import os

    old = os.umask(0o027)
    try:
        res = export_run(lm_rtn, "compressed-tensors", tmp_path / "ct", check_batches=0)
    finally:
        os.umask(old)
    out = Path(res.out_dir)
    assert out.stat().st_mode & 0o777 == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes


# ------------------------------------------------------------------------- torchao
def _shipped(out: Path):
    spec = importlib.util.spec_from_file_location("fqn_to_config_test", out / "fqn_to_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchao_model(run: Path, out: Path):
    """The float model with the run's weights, quantized by the shipped quantize_exact."""
    loaded = load_run(run)
    model = fresh_model(loaded.workload)
    model.load_state_dict(loaded.float_state_dict())
    _shipped(out).quantize_exact(model.eval())
    return loaded, model


def test_torchao_prepare_convert_reproduces_coqat_outputs(lm_rtn, root):
    from torchao.core.config import config_from_dict

    res = export_run(lm_rtn, "torchao", root / "ao")
    assert res.exact and res.details["exact_layers"] == 14
    out = Path(res.out_dir)
    cfg = config_from_dict(json.loads((out / "fqn_to_config.json").read_text()))
    assert cfg.fqn_to_config["lm_head"] is None
    assert cfg.fqn_to_config["model.layers.1.mlp.up_proj"].weight_dtype == torch.int4
    loaded, model = _torchao_model(lm_rtn, out)
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    x = _batch(loaded)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))


def test_torchao_export_of_a_mixed_rtn_run_is_exact(root):
    """Per-layer intx weights (2, 3, 4, 5, 6, 8 bits), float activations, one float layer:
    what a `--quantizer rtn --target torchao` search at a16 picks."""
    widths = iter([2, 3, 4, 5, 6, 8] * 3)

    def bits(n: str, lb: LayerBits) -> LayerBits:
        if n in ("lm_head", "model.layers.1.self_attn.o_proj"):
            return LayerBits(FLOAT_BITS, FLOAT_BITS, "rtn")
        return LayerBits(next(widths), FLOAT_BITS, "rtn")

    run = _train(root, LM_MICRO, "lm-rtn-mixed", bits, quantizer="rtn")
    res = export_run(run, "torchao", root / "ao-mixed")
    assert res.exact and res.details["exact_layers"] == res.details["quantized_layers"] == 13
    loaded, model = _torchao_model(run, Path(res.out_dir))
    assert model.model.layers[0].self_attn.k_proj.weight.target_dtype == torch.int3
    x = _batch(loaded)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    check = res.details["check"]
    assert check["within_tolerance"] and check["gap"] == 0.0
    assert check["coqat"] == _metric(loaded, loaded.model)


def test_torchao_refuses_quest_unless_approx_and_then_says_so(lm_quest_a16, root):
    with pytest.raises(ExportRefused, match="Hadamard-rotated.*and 13 more problems"):
        export_run(lm_quest_a16, "torchao")
    res = export_run(lm_quest_a16, "torchao", root / "ao-approx", approx=True)
    assert not res.exact and len(res.approximations) == 14
    assert "Hadamard" in res.approximations[0] and "weight error" in res.approximations[0]
    loaded, model = _torchao_model(lm_quest_a16, Path(res.out_dir))
    assert res.details["check"]["exported"] == pytest.approx(_metric(loaded, model), abs=1e-7)


def test_torchao_export_never_runs_code_from_the_run_path(lm_rtn, tmp_path, monkeypatch):
    """A run directory named to close the generated module's docstring and run a payload
    (issue #13): the shipped module is a constant; nothing of the run is pasted into it."""
    from coqat.exporters.torchao_export import PYTHON_SOURCE

    monkeypatch.chdir(tmp_path)
    run = _copy_run(lm_rtn, tmp_path / 'x"""; __import__("pathlib").Path("SENTINEL").touch(); """')
    res = export_run(run, "torchao", tmp_path / "ao")
    out = Path(res.out_dir)
    assert (out / "fqn_to_config.py").read_text() == PYTHON_SOURCE
    _torchao_model(run, out)                                  # the user imports and runs it
    assert not (tmp_path / "SENTINEL").exists()


# ------------------------------------------------------------------------- dependencies
def test_a_missing_optional_dependency_is_a_one_line_error_naming_the_extra(
        lm_rtn, digits_mixed, tmp_path, monkeypatch):
    calls = {"onnx": lambda: export_run(digits_mixed, "onnx", tmp_path / "o"),
             "compressed_tensors": lambda: export_run(lm_rtn, "compressed-tensors",
                                                      tmp_path / "c"),
             "torchao": lambda: export_run(lm_rtn, "torchao", tmp_path / "t"),
             "onnxruntime": lambda: deploy(digits_mixed, "onnx", tmp_path / "d",
                                           max_batches=1)}
    for module, call in calls.items():
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)          # import raises ImportError
            with pytest.raises(CoqatError) as e:
                call()
        msg = str(e.value)
        assert module.replace("_", "-") in msg and "install coqat[export]" in msg, msg
        assert "\n" not in msg
    assert not any(tmp_path.iterdir())                    # nothing written


def test_an_installed_package_that_fails_to_import_is_not_called_missing(tmp_path,
                                                                         monkeypatch):
    """A shadowed or broken dependency (benchmarks/kernels.py shadowed HF's `kernels` and
    broke transformers) must not be reported as 'not installed'."""
    from coqat.exporters.common import require

    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import coqat_no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CoqatError, match=r"needs brokenpkg, which is installed but fails to "
                                         r"import .*coqat_no_such_module_xyz"):
        require("onnx", "brokenpkg")


# ------------------------------------------------------------------------- json + CLI
def test_json_export_via_cli_copies_the_validated_config_and_a_layer_table(digits_mixed,
                                                                            tmp_path):
    rep = cli_json("export", str(digits_mixed), "--format", "json", "--out", str(tmp_path / "j"))
    assert rep["exact"] and set(rep["files"]) == {"bitconfig.json", "qparams.safetensors",
                                                  "layers.tsv"}
    BitConfig.load(tmp_path / "j" / "bitconfig.json")
    rows = (tmp_path / "j" / "layers.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:4] == ["layer", "op", "w_bits", "a_bits"]
    assert rows[2].split("\t")[:4] == ["conv2", "Conv2d", "2", "4"]


# ------------------------------------------------------------------------- deploy
def test_packed_deploy_model_is_bit_identical_and_reports_metric_and_size(lm_mixed,
                                                                           digits_mixed):
    for run in (lm_mixed, digits_mixed):
        rep = deploy(run, "packed", max_batches=2)
        assert rep.metric == rep.reference_metric
        assert rep.bytes == Path(rep.file).stat().st_size and rep.size_ratio < 1
        loaded = load_run(run)
        packed = load_packed(rep.file, fresh_model(loaded.workload))
        x = _batch(loaded)
        with torch.no_grad():
            assert torch.equal(packed(x), loaded.model(x))
    # int2 codes really are four per byte on disk
    from safetensors import safe_open

    with safe_open(rep.file, framework="pt") as f:
        conv2 = f.get_tensor("conv2.weight_packed")
    assert conv2.dtype == torch.uint8 and conv2.shape == (16, 8 * 9 // 4)


def test_w4a4_packed_file_of_an_lm_tiny_like_model_is_at_most_0_3x_fp32(tmp_path):
    space = tmp_path / "lm-4x64.toml"   # lm-tiny's shape at half the width
    space.write_text(Path(LM_MICRO).read_text().replace("d_model = 32", "d_model = 64")
                     .replace("n_layers = 2", "n_layers = 4").replace("ffn_hidden = 64",
                                                                       "ffn_hidden = 192"))
    run = _untrained_run(tmp_path / "runs", str(space), "w4a4")  # lm_head stays float
    rep = cli_json("deploy", str(run), "--max-batches", "1")
    assert rep["size_ratio"] <= 0.3, rep
    assert rep["metric"] == rep["reference_metric"] and rep["final_metric"] is None


def test_deploy_through_onnxruntime_reports_the_same_metric(onnx_digits, digits_mixed):
    rep = deploy(digits_mixed, "onnx", out=Path(onnx_digits.out_dir).parent / "deploy-onnx",
                 max_batches=2)
    assert rep.file.endswith("model.onnx")
    assert rep.metric == pytest.approx(rep.reference_metric, rel=1e-4)


# ------------------------------------------------------------------------- bad input
def test_missing_files_are_one_line_errors(digits_mixed, tmp_path):
    run = _copy_run(digits_mixed, tmp_path / "run")
    (run / "model.safetensors").unlink()
    assert_one_line_error(run_cli("export", str(run), "--format", "json"),
                          "model.safetensors is missing")
    assert_one_line_error(run_cli("deploy", str(tmp_path / "nope")), "does not exist")


def test_a_schema_version_we_do_not_read_is_a_one_line_error(digits_mixed, tmp_path):
    run = _copy_run(digits_mixed, tmp_path / "run")
    doc = json.loads((run / "bitconfig.json").read_text())
    doc["schema"] = "coqat.bitconfig/v9"
    (run / "bitconfig.json").write_text(json.dumps(doc))
    assert_one_line_error(run_cli("export", str(run), "--format", "onnx"),
                          "coqat.bitconfig/v9", "not one this coqat reads")


def test_bits_a_target_cannot_serve_are_a_one_line_error(lm_mixed):
    assert_one_line_error(run_cli("export", str(lm_mixed), "--format", "compressed-tensors"),
                          "cannot export to compressed-tensors", "Hadamard-rotated",
                          "more problems", "--target vllm", "--explain")


def test_a_checkpoint_that_does_not_match_the_config_is_a_one_line_error(digits_mixed,
                                                                         lm_mixed, tmp_path):
    run = _copy_run(digits_mixed, tmp_path / "run")
    shutil.copyfile(lm_mixed / "model.safetensors", run / "model.safetensors")
    assert_one_line_error(run_cli("deploy", str(run)), "does not match the model")
    # weights changed after training: qparams.safetensors catches it
    run2 = _copy_run(digits_mixed, tmp_path / "run2")
    from safetensors.torch import load_file, save_file

    state = load_file(str(run2 / "model.safetensors"))
    state["fc.weight"] = state["fc.weight"] * 1.5
    save_file(state, str(run2 / "model.safetensors"))
    assert_one_line_error(run_cli("export", str(run2), "--format", "json"),
                          "qparams.safetensors does not match model.safetensors")


def test_weight_codes_of_a_module_on_any_device_come_back_on_the_cpu():
    """The codes and steps every export and qparams.safetensors use are the CPU's (exactly
    rounded rotation) whatever device the module is on; here the CPU, below on a GPU."""
    from coqat.quant import QuantLinear

    torch.manual_seed(0)
    m = QuantLinear.from_float(torch.nn.Linear(64, 8), 4, 4, "quest")
    lc = weight_codes(m, "m")
    assert lc.codes.device.type == "cpu" and lc.step.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_run_trained_on_a_gpu_exports_its_config(tmp_path):
    """A QAT run on CUDA writes qparams.safetensors from its weights; the export (on the
    CPU) recomputes and checks them. Before the steps were computed on the CPU, the GPU's
    float32 rotation sums made the check fail on every GPU run (the lm-2m demo, 2026-12-07)."""
    from coqat import api

    rec = api.train(LM_MICRO, "w4a4", out=str(tmp_path), steps=4, device="cuda",
                    eval_every=4, checkpoint_every=4, progress=False)
    out = api.export(rec.run_dir, "json")
    assert (Path(out.out_dir) / "bitconfig.json").is_file()
    model = load_run(rec.run_dir).model            # loads and checks the qparams again
    _, m = quantized_modules(model)[0]
    assert weight_codes(m.cuda(), "m").step.device.type == "cpu"
