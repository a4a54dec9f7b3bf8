"""Search-space TOML parsing and resolution; BitConfig and its JSON schema."""

from __future__ import annotations

import json

import pytest
import torch

from coqat.bitconfig import SCHEMA_ID, BitConfig, LayerBits, parse_bits, validate_document
from coqat.config import TrainSettings, load_space, parse_space, spaces_dir
from coqat.cost import CostModel
from coqat.errors import CoqatError
from coqat.workloads.resnet import fashion_resnet
from conftest import DIGITS


@pytest.mark.parametrize("name", ["lm-tiny", "lm-tiny-lowbit", "fashion-resnet", "lm-30m",
                                  "lm-2m"])
def test_shipped_spaces_load_and_resolve_against_their_models(name):
    from coqat.workloads import get_workload

    sp = load_space(name)
    wl = get_workload(sp.workload_name, {k: v for k, v in sp.workload.items() if k != "name"})
    model = wl.build_model()
    if name == "lm-30m":                       # count MACs on a short sequence only
        cost_layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        res = sp.resolve(cost_layers)
    else:
        cost = CostModel.from_model(model, wl.example_inputs())
        res = sp.resolve(list(cost.layers), cost.tie_groups)
        assert res.tie_groups, "the built-in models have tied consumers"
    assert res.candidates and res.pinned


def test_resolve_finds_ties_pins_and_uniform_candidates():
    sp = load_space("fashion-resnet")
    model = fashion_resnet()
    cost = CostModel.from_model(model, (torch.randn(1, 1, 28, 28),))
    res = sp.resolve(list(cost.layers), cost.tie_groups)
    assert res.pinned == {"conv1": LayerBits(8, 8), "fc": LayerBits(8, 8)}
    assert ("layer2.0.conv1", "layer2.0.downsample.0") in res.tie_groups
    cfg = res.uniform(LayerBits(4, 4))
    assert cfg["conv1"] == LayerBits(8, 8) and cfg["layer1.0.conv1"] == LayerBits(4, 4)
    assert (2, 4) in res.uniform_candidates() and (4, 4) in res.uniform_candidates()


def test_unmatched_layers_are_named(tmp_path):
    raw = {"workload": {"name": "digits"},
           "search": {"layers": [{"pattern": "conv*", "w_bits": [4], "a_bits": [4]}]}}
    sp = parse_space(raw)
    with pytest.raises(CoqatError, match="fc match no"):
        sp.resolve(["conv1", "conv2", "fc"])


def test_tie_override_merges_with_detected_groups():
    raw = {"workload": {"name": "digits"}, "search": {
        "layers": [{"pattern": "*", "w_bits": [4], "a_bits": [4]}],
        "ties": [["conv2", "fc"]]}}
    res = parse_space(raw).resolve(["conv1", "conv2", "fc"], [("conv1", "conv2")])
    assert res.tie_groups == [("conv1", "conv2", "fc")]


@pytest.mark.parametrize("raw,needle", [
    ({"workload": {"name": "lm"}, "extra": 1}, "unknown top-level"),
    ({"train": {}}, "[workload]"),
    ({"workload": {"name": "lm"}, "train": {"steps": 0}}, "steps must be a positive"),
    ({"workload": {"name": "lm"}, "train": {"qat_fraction": 2}}, "qat_fraction"),
    ({"workload": {"name": "lm"}, "train": {"quantizer": "lsq"}}, "quantizer"),
    ({"workload": {"name": "lm"}, "search": {"layers": [{"pattern": "*", "w_bits": [7],
                                                          "a_bits": [4]}]}}, "not supported"),
    ({"workload": {"name": "lm"}, "search": {"layers": [{"pattern": "*", "w_bits": []}]}},
     "non-empty list"),
    ({"workload": {"name": "lm"}, "search": {"pinned": {"lm_head": "w4"}}}, "wNaM"),
])
def test_malformed_spaces_are_one_line_errors(raw, needle):
    with pytest.raises(CoqatError) as e:
        parse_space(raw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_short_steps_shrink_the_warmup_instead_of_failing():
    s = TrainSettings(steps=400, warmup_steps=40).replace(steps=5)
    assert s.steps == 5 and s.warmup_steps == 0


def test_space_fingerprint_changes_with_content():
    a = load_space(DIGITS)
    b = parse_space({**a.raw, "train": {**a.raw["train"], "lr": 0.5}})
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == load_space(DIGITS).fingerprint()
    assert (spaces_dir() / "lm-tiny.toml").is_file()


# ----- BitConfig ----------------------------------------------------------------------------
def test_parse_bits_forms():
    assert parse_bits("w4a8") == LayerBits(4, 8)
    assert parse_bits("FP").is_float and parse_bits("w16a16").is_float
    for bad in ("w4", "4", "w4a4x", "w3a7"):
        with pytest.raises(CoqatError):
            parse_bits(bad)


def test_bitconfig_json_round_trip_validates_and_carries_costs(tmp_path):
    model = fashion_resnet()
    cost = CostModel.from_model(model, (torch.randn(1, 1, 28, 28),))
    cfg = cost.uniform_config(LayerBits(4, 4), {"conv1": LayerBits(8, 8), "fc": LayerBits(8, 8)})
    cfg.layers["layer3.0.conv2"] = LayerBits(2, 4)
    cfg.meta["budget_bops"] = cost.bops(cfg) + 1
    path = cfg.save(tmp_path / "b.json", cost, {"workload": "fashion"})
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA_ID
    assert list(doc["layers"]) == list(cost.layers)            # model order
    assert doc["layers"]["layer3.0.conv2"]["bops"] == cost.layers["layer3.0.conv2"].macs * 8
    assert doc["layers"]["layer1.0.conv1"]["hadamard_block"] == 16
    assert doc["cost"]["total_bops"] == cost.bops(cfg) and doc["cost"]["achieved_over_budget"] < 1
    back = BitConfig.load(path)
    assert back.layers == cfg.layers and back.tie_groups == cfg.tie_groups
    assert back.summary() == "mixed"


def test_uniform_config_with_pinned_layers_is_labelled_by_its_uniform_bits(tmp_path):
    cost = CostModel.from_model(fashion_resnet(), (torch.randn(1, 1, 28, 28),))
    cfg = cost.uniform_config(LayerBits(4, 4), {"conv1": LayerBits(8, 8), "fc": LayerBits(8, 8)})
    assert cfg.summary() == "w4a4"                       # the pinned 8-bit ends don't count
    back = BitConfig.load(cfg.save(tmp_path / "b.json", cost))
    assert back.summary() == "w4a4"                      # the pins travel in meta
    back.layers["layer2.0.conv1"] = LayerBits(2, 4)
    assert back.summary() == "mixed"
    space = load_space("fashion-resnet")
    resolved = space.resolve(list(cost.layers), cost.tie_groups)
    assert resolved.uniform(LayerBits(3, 3)).summary() == "w3a3"


def test_schema_rejects_bad_documents():
    good = {"schema": SCHEMA_ID, "layers": {"fc": {"weight": {"bits": 4},
                                                   "input_act": {"bits": 8}}}}
    validate_document(good)
    with pytest.raises(CoqatError, match="coqat.bitconfig/v1"):
        validate_document({**good, "schema": "coqat.bitconfig/v2"})
    bad_bits = json.loads(json.dumps(good))
    bad_bits["layers"]["fc"]["weight"]["bits"] = 7
    with pytest.raises(CoqatError, match="layers/fc/weight/bits"):
        validate_document(bad_bits)
    with pytest.raises(CoqatError, match="input_act"):
        validate_document({"schema": SCHEMA_ID, "layers": {"fc": {"weight": None}}})


def test_tie_violations_are_listed():
    cfg = BitConfig({"a": LayerBits(4, 4), "b": LayerBits(4, 8)}, [("a", "b")])
    assert cfg.violations_of_ties() and "a=a4" in cfg.violations_of_ties()[0]
