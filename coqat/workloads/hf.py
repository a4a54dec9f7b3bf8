"""Local Hugging Face models as coqat models: ``--model hf:PATH --data FILE``.

``hf:PATH`` names a local transformers model, never a Hub id (nothing is downloaded;
every load passes ``local_files_only=True``):

- a folder written by ``save_pretrained``: ``config.json``, weights (``model.safetensors``,
  a sharded ``model.safetensors.index.json`` or ``pytorch_model.bin``) and the tokenizer's
  files (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.txt``, ...);
- or one ``.gguf`` file (causal LMs only; needs the ``gguf`` package). Its weights are
  dequantized to float32 on load, so a 4-bit GGUF gives a float model that sits on a 4-bit
  grid, not the model before quantization.

Tasks. ``causal-lm`` (``*ForCausalLM``, ``*LMHeadModel``) or ``classifier``
(``*ForSequenceClassification``), read from ``config.json``'s ``architectures``; a base
model (e.g. ``BertModel``) becomes a classifier with a new head when its data has labels,
else a causal LM. ``task=`` overrides.

Data (``data``: files or folders of them, in the order given; a folder contributes its
``*.txt`` and ``*.jsonl`` files, sorted by name):

- ``.txt``: one document per paragraph (blocks separated by a blank line);
- ``.jsonl``: one JSON object per line, ``{"text": "..."}``; a classifier also needs
  ``"label"`` (an integer class id, or a string class name).

Each document goes to a split by the SHA-256 of its text (80% train, 10% holdout, 10% val),
so the same text always lands in the same split and duplicates never straddle splits.
A causal LM reads each split as one token stream (documents tokenized by the model's own
tokenizer without special tokens, joined by its end-of-sequence token) cut into windows of
``seq_len + 1`` tokens: inputs are the first ``seq_len``, targets the last ``seq_len``
(metric: ``val_loss``, mean cross-entropy per token in nats). A classifier truncates and
pads every text to ``seq_len`` tokens (metric: ``val_acc``). Batches hold ``batch_size``
samples; a split's last partial batch is dropped unless it is the split's only batch.
Training batches come in one fixed shuffled order (the same every epoch and every run), so
a resumed run sees the same batches. Classifier labels: integers are class ids; strings map
through the model's ``label2id`` when it names them all, else by sorted order.

GPT-2's ``transformers.pytorch_utils.Conv1D`` layers (a linear layer storing its weight as
``[in, out]``) are replaced on load by ``nn.Linear`` layers of the same name holding the
transposed weight (``[out, in]``), so they count in BOPs and quantize like any other layer.
An export of such a model (state dict, ONNX, compressed-tensors) therefore names the layers
``transformer.h.0.attn.c_attn`` etc. as in the checkpoint, but stores their weights in
``nn.Linear`` layout; to load them back into a stock GPT-2, transpose those weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from coqat.errors import CoqatError
from coqat.workloads.base import Workload
from coqat.workloads.sampling import check_split, epoch_indices, model_device, stable_seed
from coqat.workloads.user import UserModel

__all__ = ["HF_PREFIX", "TASKS", "hf_user_model", "load_pretrained", "load_gguf",
           "require_transformers", "convert_conv1d", "read_documents", "split_of_text",
           "lm_windows", "lm_loss", "classifier_loss", "accuracy", "TensorSplitsWorkload"]

HF_PREFIX = "hf:"
TASKS = ("causal-lm", "classifier")
#: share of documents per split, in the order the hash buckets are assigned
SPLIT_FRACTIONS = (("train", 0.8), ("holdout", 0.1), ("val", 0.1))
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt",
                   "vocab.json", "spiece.model")


# ----- optional dependencies -------------------------------------------------------------------
def require_transformers(extra: str = "hf") -> Any:
    """The ``transformers`` module, or a one-line error naming the extra that installs it."""
    try:
        import transformers  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError as e:
        raise CoqatError(f"Hugging Face models need the optional package"
                         f" {e.name or 'transformers'!r}; install it with pip install"
                         f" 'coqat[{extra}]'") from None
    return transformers


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CoqatError("loading a .gguf file needs the optional package 'gguf'; install it"
                         " with pip install 'coqat[gguf]'") from None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars while loading (coqat prints its
    own one-line messages), restoring the caller's settings afterwards."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# ----- the model folder --------------------------------------------------------------------------
def _ref(path: Path) -> str:
    return f"{HF_PREFIX}{path}"


def _read_config(folder: Path) -> dict[str, Any]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise CoqatError(f"{_ref(folder)}: no config.json in {folder}; it is not a Hugging Face"
                         " model folder (write one with model.save_pretrained(folder))")
    try:
        raw = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CoqatError(f"{_ref(folder)}: {cfg} is not valid JSON; save the model again with"
                         " model.save_pretrained(folder)") from None
    if not isinstance(raw, dict):
        raise CoqatError(f"{_ref(folder)}: {cfg} is not a JSON object; save the model again"
                         " with model.save_pretrained(folder)")
    return raw


def check_folder(path: str | os.PathLike) -> tuple[Path, dict[str, Any] | None]:
    """(path, config.json contents or None for a .gguf file), after checking that the
    files a load needs are there; each missing piece is a one-line error naming the fix."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CoqatError(f"{_ref(p)}: {p} does not exist; pass a local Hugging Face model folder"
                         " (config.json, weights, tokenizer files) or a .gguf file")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise CoqatError(f"{_ref(p)}: {p} is a file, not a model folder; pass the folder"
                             " that holds config.json (or a .gguf file)")
        return p, None
    config = _read_config(p)
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise CoqatError(f"{_ref(p)}: no weights in {p} (looked for {', '.join(WEIGHT_FILES)});"
                         " save them with model.save_pretrained(folder)")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise CoqatError(f"{_ref(p)}: no tokenizer in {p} (looked for"
                         f" {', '.join(TOKENIZER_FILES)}); save it with"
                         " tokenizer.save_pretrained(folder)")
    return p, config


def task_of(config: Mapping[str, Any] | None) -> str | None:
    """causal-lm / classifier from config.json's architectures (None: a base model)."""
    if config is None:  # a GGUF file holds a causal LM
        return "causal-lm"
    for arch in config.get("architectures") or ():
        if not isinstance(arch, str):
            continue
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "classifier"
    return None


def convert_conv1d(model: nn.Module) -> int:
    """Replace every ``transformers`` ``Conv1D`` by an ``nn.Linear`` of the same name holding
    the transposed weight (same outputs); returns how many were replaced.

    Why: coqat's cost model and quantizer work on ``nn.Linear``/``nn.Conv2d`` leaves, and
    GPT-2 keeps all its projections in Conv1D (86% of its MACs); converted, they count and
    quantize like any other linear layer, under their checkpoint names.
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # no transformers: no Conv1D either
        return 0
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in targets:
        n_in, n_out = conv.weight.shape
        lin = nn.Linear(n_in, n_out, bias=conv.bias is not None, device="meta",
                        dtype=conv.weight.dtype)
        lin.weight = nn.Parameter(conv.weight.detach().t().contiguous(),
                                  requires_grad=conv.weight.requires_grad)
        if conv.bias is not None:
            lin.bias = conv.bias
        lin.train(conv.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
    return len(targets)


def _separate_tied(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                   local_metadata: Any) -> None:
    """State-dict post-hook: a tensor that shares storage with an earlier entry (tied input
    and output embeddings) is replaced by a copy. Run directories and exports are written
    with safetensors, which refuses shared tensors; loading writes both copies back into the
    one shared Parameter, so the tie survives a round trip."""
    seen: set[int] = set()
    for key, value in list(state_dict.items()):
        if not isinstance(value, torch.Tensor) or value.numel() == 0:
            continue
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            state_dict[key] = value.detach().clone()
        seen.add(ptr)


def _prepare(model: nn.Module) -> nn.Module:
    """A loaded model as coqat trains it: float32 master weights, no KV cache (training and
    MAC tracing need plain tensor outputs), Conv1D converted to nn.Linear, tied weights
    saved as separate tensors."""
    model = model.float()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    convert_conv1d(model)
    model.register_state_dict_post_hook(_separate_tied)
    return model


def load_gguf(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(float32 causal LM, its tokenizer) from one ``.gguf`` file, offline.

    transformers' own GGUF loading goes through ``accelerate``; this builds the model from
    the GGUF's config and loads the dequantized tensors with transformers' converter, which
    needs only ``gguf``.
    """
    transformers = require_transformers("gguf")
    _require_gguf()
    p = Path(path)
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError:
        raise CoqatError(f"this transformers ({transformers.__version__}) cannot read GGUF"
                         " files; install pip install 'coqat[gguf]'") from None
    with _quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(
                str(p.parent), gguf_file=p.name, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(p.parent), gguf_file=p.name, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_config(config)
            try:
                tensors = load_gguf_checkpoint(str(p), return_tensors=True,
                                               model_to_load=model)["tensors"]
            except TypeError:  # an older converter without model_to_load maps names itself
                tensors = load_gguf_checkpoint(str(p), return_tensors=True)["tensors"]
        except (OSError, ValueError, KeyError) as e:
            raise CoqatError(f"{_ref(p)}: cannot load this GGUF file ({_first_line(e)}); pass"
                             " a causal-LM .gguf that transformers supports") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")
            and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        what = sorted(set(missing) - tied)[:3] or sorted(unexpected)[:3]
        raise CoqatError(f"{_ref(p)}: the GGUF tensors do not match the model (e.g."
                         f" {', '.join(what)}); pass a .gguf that transformers supports")
    if tied:
        model.tie_weights()
    return _prepare(model), tokenizer


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(e).__name__)


def load_pretrained(path: str | os.PathLike, task: str | None = None,
                    num_labels: int | None = None,
                    label2id: Mapping[str, int] | None = None) -> tuple[nn.Module, Any, str]:
    """(float32 model, tokenizer, task) from a local folder or ``.gguf`` file.

    ``num_labels``/``label2id``: a classifier's classes; a checkpoint whose head has
    another number of classes gets a new head (initialized from torch's RNG)."""
    folder, config = check_folder(path)
    if task is not None and task not in TASKS:
        raise CoqatError(f"task {task!r} is not one of {', '.join(TASKS)}")
    task = task or task_of(config) or "causal-lm"
    if config is None:
        if task != "causal-lm":
            raise CoqatError(f"{_ref(folder)}: a .gguf file holds a causal LM; use a model folder"
                             " for a classifier")
        model, tokenizer = load_gguf(folder)
        return model, tokenizer, task
    transformers = require_transformers()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if task == "classifier" and num_labels is not None:
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
        if label2id:
            kwargs.update(label2id=dict(label2id), id2label={v: k for k, v in label2id.items()})
    auto = (transformers.AutoModelForCausalLM if task == "causal-lm"
            else transformers.AutoModelForSequenceClassification)
    with _quiet_transformers():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder),
                                                                   local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CoqatError(f"{_ref(folder)}: cannot load its tokenizer ({_first_line(e)}); save"
                             " it with tokenizer.save_pretrained(folder)") from None
        try:
            model = auto.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CoqatError(f"{_ref(folder)}: cannot load it as a {task} ({_first_line(e)});"
                             " check the folder's weights and config.json") from None
    if task == "classifier" and getattr(model.config, "pad_token_id", None) is None:
        # sequence classifiers of decoder models find the last real token by pad_token_id
        model.config.pad_token_id = _pad_id(tokenizer)
    return _prepare(model), tokenizer, task


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


# ----- documents ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    text: str
    label: Any = None
    where: str = ""          # file:line, for error messages


def _data_files(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise CoqatError("no data given; pass --data FILE (.txt or .jsonl)")
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in (".txt", ".jsonl")
                           and f.is_file())
            if not found:
                raise CoqatError(f"data folder {p} has no .txt or .jsonl files; put the text"
                                 " there or pass the files themselves")
            files.extend(found)
        elif not p.exists():
            raise CoqatError(f"data file {p} does not exist; pass a .txt or .jsonl file (or a"
                             " folder of them) with --data")
        elif p.suffix not in (".txt", ".jsonl"):
            raise CoqatError(f"data file {p} must end in .txt (paragraphs) or .jsonl (objects"
                             " with \"text\" and, for a classifier, \"label\")")
        else:
            files.append(p)
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CoqatError(f"data file {path} is not UTF-8 text; convert it to UTF-8") from None


def read_documents(data: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[
        list[Document], list[Path]]:
    """(documents in file order, the files read) from ``.txt`` / ``.jsonl`` files."""
    files = _data_files(data)
    docs: list[Document] = []
    for path in files:
        text = _read_text(path)
        if path.suffix == ".txt":
            for i, para in enumerate(re.split(r"\n[ \t]*\n", text)):
                if para.strip():
                    docs.append(Document(para.strip(), None, f"{path} paragraph {i + 1}"))
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CoqatError(f"{where} is not valid JSON ({e.msg}); write one object per"
                                 " line, e.g. {\"text\": \"...\", \"label\": \"...\"}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CoqatError(f"{where} has no \"text\" string; write one object per line,"
                                 " e.g. {\"text\": \"...\", \"label\": \"...\"}")
            label = obj.get("label")
            if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
                raise CoqatError(f"{where}: \"label\" must be an integer class id or a string"
                                 f" class name (got {label!r})")
            if obj["text"].strip():
                docs.append(Document(obj["text"], label, where))
    if not docs:
        raise CoqatError(f"the data ({', '.join(map(str, files))}) holds no text; give .txt"
                         " paragraphs or .jsonl objects with \"text\"")
    return docs, files


def split_of_text(text: str, fractions: Sequence[tuple[str, float]] = SPLIT_FRACTIONS) -> str:
    """The split a document (or any key) belongs to: a pure function of its text."""
    u = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64
    cuts = itertools.accumulate(frac for _, frac in fractions)
    return next((name for (name, _), cut in zip(fractions, cuts) if u < cut), fractions[-1][0])


def _label_map(docs: Sequence[Document], model_config: Mapping[str, Any] | None
               ) -> tuple[dict[Any, int], int]:
    """(label -> class id, number of classes) for a classifier's documents."""
    unlabeled = next((d for d in docs if d.label is None), None)
    if unlabeled is not None:
        raise CoqatError(f"{unlabeled.where} has no \"label\"; a classifier needs .jsonl lines"
                         " like {\"text\": \"...\", \"label\": \"...\"}")
    labels = {d.label for d in docs}
    kinds = {type(v) for v in labels}
    if len(kinds) > 1:
        raise CoqatError("the labels mix integers and strings; use one kind (class ids or"
                         " class names)")
    trained = task_of(model_config) == "classifier"
    cfg_n = int((model_config or {}).get("num_labels") or
                len((model_config or {}).get("id2label") or {}) or 0)
    if kinds == {int}:
        if min(labels) < 0:
            raise CoqatError(f"label {min(labels)} is negative; integer labels are class ids"
                             " 0, 1, 2, ...")
        n = max(max(labels) + 1, cfg_n if trained else 0)
        return {v: v for v in sorted(labels)}, n
    known = (model_config or {}).get("label2id") or {}
    if trained and known and labels <= set(known):
        return {k: int(v) for k, v in known.items()}, max(cfg_n, len(known))
    ordered = sorted(labels)
    return {v: i for i, v in enumerate(ordered)}, len(ordered)


# ----- batches -----------------------------------------------------------------------------------
class Batches:
    """A split as a re-iterable list of dict batches over equal-length tensors (rows are
    samples), in a fixed order."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], batch_size: int,
                 order: torch.Tensor | None = None):
        self.tensors = dict(tensors)
        n = len(next(iter(self.tensors.values())))
        self.order = order if order is not None else torch.arange(n)
        full = n // batch_size
        # a partial last batch is dropped (equal batches keep the mean of batch means a
        # mean per sample), unless the split has no full batch at all
        self.bounds = [(i * batch_size, (i + 1) * batch_size) for i in range(full)] or \
            ([(0, n)] if n else [])

    def __len__(self) -> int:
        return len(self.bounds)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for lo, hi in self.bounds:
            idx = self.order[lo:hi]
            yield {k: v[idx] for k, v in self.tensors.items()}

    @property
    def samples(self) -> int:
        return sum(hi - lo for lo, hi in self.bounds)


def lm_windows(stream: np.ndarray | torch.Tensor, seq_len: int) -> dict[str, torch.Tensor]:
    """Non-overlapping windows of a token stream: ``input_ids`` [N, seq_len] and ``labels``
    [N, seq_len] (the next token of each input position)."""
    t = torch.as_tensor(np.asarray(stream, dtype=np.int64))
    n = max(0, (len(t) - 1) // seq_len)
    x = t[:n * seq_len].view(n, seq_len)
    y = t[1:n * seq_len + 1].view(n, seq_len)
    return {"input_ids": x.clone(), "labels": y.clone()}


def token_stream(tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
    """Texts tokenized without special tokens, joined by the end-of-sequence token."""
    sep = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(sep, int):
        sep = getattr(tokenizer, "sep_token_id", None)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    out: list[int] = []
    for i, doc in enumerate(ids):
        if i and isinstance(sep, int):
            out.append(sep)
        out.extend(doc)
    return np.asarray(out, dtype=np.int64)


def classifier_tensors(tokenizer: Any, texts: Sequence[str], labels: Sequence[int],
                       seq_len: int) -> dict[str, torch.Tensor]:
    """Texts truncated and padded to ``seq_len`` tokens, with their class ids."""
    if getattr(tokenizer, "pad_token", None) is None:
        # decoder tokenizers often have no pad token; padding positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    enc = tokenizer(list(texts), truncation=True, max_length=seq_len, padding="max_length",
                    return_tensors="pt")
    out = {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
    if "token_type_ids" in enc and bool(enc["token_type_ids"].any()):
        out["token_type_ids"] = enc["token_type_ids"].long()
    out["labels"] = torch.tensor(list(labels), dtype=torch.long)
    return out


# ----- losses and metrics (shared by hf: models and the pretrained workloads) -------------------
def _logits(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits


def _model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token) of a causal LM over a batch."""
    logits = _logits(model(input_ids=batch["input_ids"]))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                           batch["labels"].reshape(-1))


def classifier_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    logits = _logits(model(**_model_inputs(batch)))
    return F.cross_entropy(logits.float(), batch["labels"])


def accuracy(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    logits = _logits(model(**_model_inputs(batch)))
    return (logits.argmax(-1) == batch["labels"]).float().mean()


def _inputs(batch: Mapping[str, torch.Tensor]) -> tuple:
    return (batch["input_ids"],)


# ----- hf:PATH as a UserModel --------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(model_path: Path, data_files: Sequence[Path], settings: str) -> str:
    """SHA-256 over the model's files, the data files and the settings that shape the
    batches: a run of an hf: model is resumed or exported only with the same inputs."""
    files = [model_path] if model_path.is_file() else sorted(
        f for f in model_path.rglob("*") if f.is_file() and ".cache" not in f.parts)
    h = hashlib.sha256(settings.encode())
    for f in [*files, *data_files]:
        h.update(f"{f.name}:{_file_sha256(f)}\n".encode())
    return h.hexdigest()


def _name_for(path: Path) -> str:
    stem = path.stem if path.is_file() else path.name
    return "hf-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-") or "model")


def _max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover (None: no limit known)."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CoqatError(f"{what} must be a positive integer (got {value!r})")
    return value


def hf_user_model(path: str | os.PathLike, data: str | os.PathLike | Sequence[str | os.PathLike],
                  task: str | None = None, seq_len: int | None = None,
                  batch_size: int | None = None, name: str | None = None) -> UserModel:
    """A local Hugging Face model and text files as a ``UserModel`` (see the module docstring).

    ``seq_len``: tokens per window (causal LM, default 256) or per text (classifier, default
    128), the default clipped to the model's positions (the CLI uses the defaults).
    ``batch_size``: samples per batch (default 16; the CLI and ``coqat.train`` pass the run's
    batch size). ``name``: the run-directory name (default ``hf-<folder name>``).
    """
    if data is None:
        raise CoqatError(f"{HF_PREFIX}{path} needs text data: pass --data FILE (.txt paragraphs,"
                         " or .jsonl with \"text\" and, for a classifier, \"label\")")
    # the files first: a typo in a path is reported before any slow import
    model_path, config = check_folder(path)
    batch_size = _positive(16 if batch_size is None else batch_size, "batch_size")
    docs, files = read_documents(data)
    require_transformers()
    if task is not None and task not in TASKS:
        raise CoqatError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if task is None:
        task = task_of(config) or ("classifier" if all(d.label is not None for d in docs)
                                   else "causal-lm")
    given = seq_len
    seq_len = _positive((256 if task == "causal-lm" else 128) if seq_len is None else seq_len,
                        "seq_len")
    ref = f"{HF_PREFIX}{model_path}"
    by_split: dict[str, list[Document]] = {s: [] for s, _ in SPLIT_FRACTIONS}
    for d in docs:
        by_split[split_of_text(d.text)].append(d)

    torch_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # a new classifier head is the same on every load
    try:
        if task == "classifier":
            label_ids, n_labels = _label_map(docs, config)
            names = {str(k): v for k, v in label_ids.items()} if all(
                isinstance(k, str) for k in label_ids) else None
            model, tokenizer, task = load_pretrained(model_path, task, n_labels, names)
        else:
            model, tokenizer, task = load_pretrained(model_path, task)
    finally:
        torch.random.set_rng_state(torch_state)

    limit = _max_positions(model)
    if limit is not None and seq_len > limit:
        if given is not None:
            raise CoqatError(f"seq_len {seq_len} is above the {limit} positions of {ref}; use"
                             f" at most {limit}")
        seq_len = limit  # the default is only a default: fit it to a small model
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for split, items in by_split.items():
        texts = [d.text for d in items]
        if task == "causal-lm":
            tensors[split] = lm_windows(token_stream(tokenizer, texts), seq_len)
        else:
            tensors[split] = classifier_tensors(tokenizer, texts,
                                                [label_ids[d.label] for d in items], seq_len)
    counts = {s: int(len(t["input_ids"])) for s, t in tensors.items()}
    for split in ("train", "val"):
        if counts[split] == 0:
            need = f"windows of {seq_len + 1} tokens" if task == "causal-lm" else "texts"
            raise CoqatError(
                f"the data gives no {split} {need} ({len(docs)} documents, {len(by_split[split])}"
                f" of them in {split} by the hash of their text); give more text (the {split}"
                f" split gets about 10% of the documents) or a smaller seq_len")
    gen = torch.Generator().manual_seed(stable_seed("hf", "train-order"))
    train = Batches(tensors["train"], batch_size,
                    torch.randperm(counts["train"], generator=gen))
    holdout = Batches(tensors["holdout"], batch_size) if counts["holdout"] else None
    val = Batches(tensors["val"], batch_size)
    info = {"model": str(model_path), "task": task, "seq_len": seq_len,
            "batch_size": batch_size, "data_files": [str(f) for f in files],
            "documents": {s: len(v) for s, v in by_split.items()},
            ("windows" if task == "causal-lm" else "texts"): counts,
            "split_rule": "SHA-256 of each document's text: 80% train, 10% holdout, 10% val"
                          + ("" if holdout else "; holdout empty, the search uses train")}
    if task == "classifier":
        info["labels"] = {str(k): v for k, v in label_ids.items()}
    user = UserModel(
        model=model, train=train, val=val, holdout=holdout, inputs=_inputs,
        loss=lm_loss if task == "causal-lm" else classifier_loss,
        metric=None if task == "causal-lm" else accuracy,
        metric_name="val_loss" if task == "causal-lm" else "val_acc",
        higher_is_better=task != "causal-lm",
        name=name or _name_for(model_path), tokens_per_sample=seq_len, info=info)
    # what a resumed run or an export must be given again (both options, in one string)
    user.source = f"{ref} --data {' --data '.join(str(f) for f in files)}"
    # the batch size is left out: export and deploy rebuild the model without knowing it
    user.sha256 = _fingerprint(model_path, files, f"{task}:{seq_len}")
    return user


# ----- built-in pretrained workloads: tensors per split -------------------------------------------
_TENSOR_CACHE: dict[tuple[str, str, int], dict[str, Any]] = {}


class TensorSplitsWorkload(Workload):
    """A workload whose splits are dicts of equal-length tensors (rows = samples), with a
    pretrained model: step-indexed batches (per-epoch permutations, ``epoch_indices``) and a
    fixed in-order evaluation pass. Subclasses build ``tensor_splits()`` and the model."""

    task: str = "causal-lm"     # or "classifier": picks the loss and the metric
    spec_keys = ("seq_len",)
    default_seq_len: int = 128
    max_seq_len: int = 512      # the model's positions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # the task fixes the metric: loss per token for an LM, accuracy for a classifier
        cls.metric = "val_loss" if cls.task == "causal-lm" else "val_acc"
        cls.higher_is_better = cls.task != "causal-lm"

    def __init__(self, spec: Mapping[str, Any] | None = None, data_dir: str | None = None,
                 seed: int = 0):
        super().__init__(spec, data_dir=data_dir, seed=seed)
        self.seq_len = _positive(self.spec.get("seq_len", self.default_seq_len),
                                 f"workload '{self.name}': seq_len")
        if self.seq_len > self.max_seq_len:
            raise CoqatError(f"workload '{self.name}': seq_len {self.seq_len} is above the"
                             f" model's {self.max_seq_len} positions; use at most"
                             f" {self.max_seq_len}")

    def model_source(self) -> Path:
        """The checkpoint's path (a one-line error with the install command if missing)."""
        raise NotImplementedError

    def load_data(self) -> dict[str, Any]:
        """Tokenize the data: ``{"tensors": {split: {name: tensor}}, ...provenance}``."""
        raise NotImplementedError

    def data(self) -> dict[str, Any]:
        """``load_data()``, once per process for each checkpoint and seq_len (tokenizing
        takes seconds and every phase of a search reads the same tensors)."""
        key = (self.name, str(self.model_source()), self.seq_len)
        if key not in _TENSOR_CACHE:
            _TENSOR_CACHE[key] = self.load_data()
        return _TENSOR_CACHE[key]

    def tensor_splits(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.data()["tensors"]

    def _split(self, split: str) -> dict[str, torch.Tensor]:
        check_split(split)
        data = self.tensor_splits()[split]
        if not len(data["input_ids"]):
            raise CoqatError(f"the {split} split of {self.name} is empty")
        return data

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (self._split("train")["input_ids"][:1],)

    def get_batch(self, split: str, step: int, batch_size: int, rank: int = 0,
                  world_size: int = 1) -> dict[str, torch.Tensor]:
        data = self._split(split)
        idx = epoch_indices(len(data["input_ids"]), self.seed, f"{self.name}:{split}", step,
                            batch_size, rank, world_size)
        return {k: v[idx] for k, v in data.items()}

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return (lm_loss if self.task == "causal-lm" else classifier_loss)(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, max_batches: int | None = None,
                 batch_size: int = 64, split: str = "val") -> dict[str, float]:
        data = self._split(split)
        n = len(data["input_ids"])
        if max_batches is not None:
            n = min(n, max_batches * batch_size)
        device = model_device(model)
        was_training = model.training
        model.eval()
        loss_sum, correct, weight = 0.0, 0, 0
        try:
            for lo in range(0, n, batch_size):
                batch = {k: v[lo:min(lo + batch_size, n)].to(device) for k, v in data.items()}
                rows = len(batch["input_ids"])
                if self.task == "causal-lm":
                    tokens = batch["labels"].numel()
                    loss_sum += float(lm_loss(model, batch)) * tokens
                    weight += tokens
                else:
                    logits = _logits(model(**_model_inputs(batch)))
                    loss_sum += float(F.cross_entropy(logits.float(), batch["labels"],
                                                      reduction="sum"))
                    correct += int((logits.argmax(-1) == batch["labels"]).sum())
                    weight += rows
        finally:
            model.train(was_training)
        loss = loss_sum / max(weight, 1)
        if not math.isfinite(loss):
            raise CoqatError(f"the {split} loss of {self.name} is not finite; lower the lr")
        if self.task == "causal-lm":
            return {"val_loss": loss, "loss": loss, "tokens": weight}
        return {"val_acc": correct / max(weight, 1), "loss": loss, "samples": weight}

    def tokens_per_sample(self) -> int:
        return int(self._split("train")["input_ids"].shape[1])

