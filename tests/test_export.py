"""Export and deploy (issue #7): packing, qparams, ONNX QDQ, compressed-tensors, torchao,
json, the packed deploy model, and one-line errors on bad run directories.

Runs are trained in-process once per session (a few steps of lm-micro and digits) with
hand-picked mixed bits that cover every storage width and both quantizers.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from coqat.bitconfig import FLOAT_BITS, BitConfig, LayerBits
from coqat.errors import CoqatError
from coqat.exporters import export_run
from coqat.exporters.deploy import deploy, load_packed
from coqat.exporters.loading import fresh_model, load_run
from coqat.exporters.qparams import QPARAMS, dequantize_codes, read_qparams, weight_codes
from coqat.kernels.pack import (pack_codes, pack_int2, pack_int4, unpack_codes, unpack_int2,
                                unpack_int4)
from coqat.quant import quantized_modules
from coqat.quant.quantizers import dequantize
from coqat.training import runner
from conftest import DIGITS, LM_MICRO, assert_one_line_error, cli_json, prepare_run, run_cli

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


def test_onnx_refuses_bits_it_cannot_hold_listing_every_layer(digits_mixed, tmp_path):
    run = _copy_run(digits_mixed, tmp_path / "run")
    _edit_bits(run, {"conv1": (3, 8), "conv2": (6, 5)})
    with pytest.raises(CoqatError) as e:
        export_run(run, "onnx")
    msg = str(e.value)
    for needle in ("conv1: 3-bit weights", "conv2: 6-bit weights", "conv2: 5-bit activations",
                   "3 problems"):
        assert needle in msg, msg
    assert not (run / "exports").exists()                  # nothing half-written


# ------------------------------------------------------------------------- compressed-tensors
def test_compressed_tensors_config_validates_and_decompresses_to_coqat_weights(
        lm_rtn, lm_quest_a16, root):
    from compressed_tensors.quantization import QuantizationConfig

    from coqat.exporters.compressed import decompress_checkpoint

    for run, widened in ((lm_rtn, False), (lm_quest_a16, True)):
        res = export_run(run, "compressed-tensors", root / f"ct-{run.name}")
        assert res.exact and not res.approximations
        doc = json.loads((Path(res.out_dir) / "config.json").read_text())
        qdoc = doc["quantization_config"]
        QuantizationConfig.model_validate(
            {k: v for k, v in qdoc.items() if k not in ("version", "sparsity_config",
                                                        "transform_config")})
        assert qdoc["ignore"] == ["lm_head"]
        assert bool(qdoc["transform_config"]) == widened     # QuEST: Hadamard transform
        loaded = load_run(run)
        got = decompress_checkpoint(res.out_dir, loaded.workload.build_model())
        for fqn, m in quantized_modules(loaded.model):
            lc = weight_codes(m, fqn)
            want = dequantize(lc.codes, lc.step.reshape(-1, 1), lc.method)
            assert torch.equal(got[f"{fqn}.weight"], want), fqn
            assert res.details["store_bits"][fqn] == (8 if widened else m.w_bits)


def test_compressed_tensors_checkpoint_reproduces_coqat_logits_in_transformers(
        lm_rtn, lm_quest_a16, root):
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from transformers import LlamaConfig, LlamaForCausalLM

    from coqat.exporters.compressed import decompress_checkpoint

    # RTN: the directory loads as is with transformers' compressed-tensors integration
    res = export_run(lm_rtn, "compressed-tensors", root / "ct-hf-rtn")
    hf = LlamaForCausalLM.from_pretrained(res.out_dir).eval()
    loaded = load_run(lm_rtn)
    x = _batch(loaded)
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, loaded.model(x), rtol=0, atol=1e-5)
    # QuEST: compressed-tensors' own transform (online input rotation) on rotated weights
    res = export_run(lm_quest_a16, "compressed-tensors", root / "ct-hf-quest")
    doc = json.loads((Path(res.out_dir) / "config.json").read_text())
    cfg = LlamaConfig(**{k: v for k, v in doc.items()
                         if k not in ("quantization_config", "architectures", "model_type")})
    hf = LlamaForCausalLM(cfg).eval()
    apply_transform_config(hf, TransformConfig.model_validate(
        doc["quantization_config"]["transform_config"]))
    loaded = load_run(lm_quest_a16)
    state = decompress_checkpoint(res.out_dir, loaded.workload.build_model())
    from safetensors.torch import load_file

    rotations = {k: v for k, v in load_file(str(Path(res.out_dir) / "model.safetensors")).items()
                 if "hadamard" in k}                # the +-1 matrices vLLM loads
    state = {k: v for k, v in state.items() if k in hf.state_dict()} | rotations
    assert hf.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, loaded.model(x), rtol=0, atol=1e-5)


def test_compressed_tensors_refuses_what_vllm_cannot_serve_listing_every_violation(
        lm_mixed, digits_mixed):
    with pytest.raises(CoqatError) as e:
        export_run(lm_mixed, "compressed-tensors")
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj: 2-bit weights" in msg
    assert "model.layers.1.mlp.down_proj: 2-bit weights" in msg
    assert msg.count("4-bit activations") == 6              # q/k/v of both layers
    assert "QuEST 8-bit weights need 9-bit odd codes" in msg
    with pytest.raises(CoqatError, match="Llama-style"):
        export_run(digits_mixed, "compressed-tensors")


def test_compressed_tensors_refuses_unequal_fused_shards(lm_rtn, tmp_path):
    run = _copy_run(lm_rtn, tmp_path / "run")
    _edit_bits(run, {"model.layers.0.self_attn.k_proj": (4, 16)})
    with pytest.raises(CoqatError, match=r"tie group \(model.layers.0.self_attn.q_proj, "
                                         r"model.layers.0.self_attn.k_proj.*one scheme"):
        export_run(run, "compressed-tensors")


def test_compressed_tensors_approx_keeps_bits_and_lists_each_approximation(lm_quest_a16, root):
    res = export_run(lm_quest_a16, "compressed-tensors", root / "ct-approx", approx=True)
    assert not res.exact
    assert len(res.approximations) == 14                     # one per QuEST layer
    assert set(res.details["store_bits"].values()) == {4}
    manifest = json.loads((Path(res.out_dir) / "export.json").read_text())
    assert manifest["approximations"] == res.approximations


# ------------------------------------------------------------------------- torchao
def test_torchao_prepare_convert_reproduces_coqat_outputs(lm_rtn, root):
    from torchao.core.config import config_from_dict

    res = export_run(lm_rtn, "torchao", root / "ao")
    assert res.exact and res.details["exact_layers"] == 14
    out = Path(res.out_dir)
    cfg = config_from_dict(json.loads((out / "fqn_to_config.json").read_text()))
    assert cfg.fqn_to_config["lm_head"] is None
    assert cfg.fqn_to_config["model.layers.1.mlp.up_proj"].weight_dtype == torch.int4
    spec = importlib.util.spec_from_file_location("fqn_to_config", out / "fqn_to_config.py")
    shipped = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shipped)
    loaded = load_run(lm_rtn)
    model = fresh_model(loaded.workload)
    model.load_state_dict(loaded.float_state_dict())
    shipped.quantize_exact(model.eval())
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    x = _batch(loaded)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))


def test_torchao_refuses_quest_unless_approx_and_then_says_so(lm_quest_a16, root):
    with pytest.raises(CoqatError, match="14 problems.*QuEST w4"):
        export_run(lm_quest_a16, "torchao")
    res = export_run(lm_quest_a16, "torchao", root / "ao-approx", approx=True)
    assert not res.exact and len(res.approximations) == 14
    assert "Hadamard" in res.approximations[0]


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
                          "cannot export to compressed-tensors", "2-bit weights",
                          "--target vllm")


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
