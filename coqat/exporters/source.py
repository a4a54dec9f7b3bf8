"""What an export reads: a QAT model, its bit configuration, and how to rebuild and
evaluate it. Two ways in:

    from_run(load_run(run_dir))                 a finished coqat run directory
    from_model(model, bitconfig, ...)           a model in memory, e.g. a Hugging Face
                                                causal LM (LlamaForCausalLM ...) whose
                                                quantized layers are nn.Linear named like
                                                model.layers.0.self_attn.q_proj

The adapters see only ``ExportSource``, so a run directory and an in-memory model export
through the same code. ``check_in_consumer`` evaluates a written export in its real consumer
(onnxruntime, transformers, torchao) next to coqat's own QAT model on the same batches.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from coqat.bitconfig import BitConfig
from coqat.errors import CoqatError

__all__ = ["ExportSource", "from_run", "from_model", "LogitsOf", "check_in_consumer",
           "hf_config_of", "is_hf", "HF_SIDE_FILES"]

# Files of a Hugging Face model folder that an HF-format export carries along unchanged.
HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                 "chat_template.jinja", "added_tokens.json")

# |exported - coqat| / max(1, |coqat|) within which an exact export's check passes: float32
# summation order differs between runtimes (logits agree to ~1e-5).
EXACT_TOLERANCE = 1e-4

Evaluate = Callable[[nn.Module, "int | None"], float]


@dataclass
class ExportSource:
    """A QAT model and everything an adapter needs around it (see the module docstring)."""

    model: nn.Module                        # the QAT model, eval mode; FQNs = bitconfig keys
    bitconfig: BitConfig
    label: str                              # the run directory or the model's name
    build_float: Callable[[], nn.Module]    # a fresh float model of the same architecture
    example_inputs: tuple[torch.Tensor, ...]
    bitconfig_doc: dict[str, Any]           # shipped as bitconfig.json
    workload_name: str = "model"
    path: Path | None = None                # run directory: default outputs go under it
    hf_config: dict[str, Any] | None = None  # config.json of an HF causal LM, else None
    hf_dir: Path | None = None              # HF folder whose tokenizer files ship along
    evaluate: Evaluate | None = None        # (model returning logits, max_batches) -> metric
    metric: str = "metric"
    higher_is_better: bool = False
    explain: str | None = None              # "<how> lists them all" in a refusal
    notes: list[str] = field(default_factory=list)

    def ops(self) -> dict[str, str]:
        from coqat.exporters.loading import layer_ops

        return layer_ops(self.model, self.bitconfig)

    def float_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def out_dir(self, out: str | Path | None, fmt: str) -> Path:
        if out is not None:
            return Path(out)
        if self.path is None:
            raise CoqatError(f"exporting {self.label} from memory needs an output directory; "
                             "pass out=DIR")
        from coqat.exporters.common import default_out_dir

        return default_out_dir(self.path, fmt)

    def bitconfig_json(self) -> str:
        return json.dumps(self.bitconfig_doc, indent=2) + "\n"


class LogitsOf(nn.Module):
    """Calls a model and returns a plain logits tensor: Hugging Face models return a
    ModelOutput (and build a KV cache unless told not to), coqat's evaluators and the ONNX
    exporter want one tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if is_hf(self.inner):
            return self.inner(input_ids, use_cache=False).logits
        out = self.inner(input_ids)
        return out.logits if hasattr(out, "logits") else out


def is_hf(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return callable(getattr(cfg, "to_dict", None)) and hasattr(cfg, "model_type")


def hf_config_of(model: nn.Module) -> dict[str, Any] | None:
    """config.json of a Hugging Face model (its own config), None for other models."""
    if not is_hf(model):
        return None
    doc = model.config.to_dict()
    doc.pop("quantization_config", None)
    doc.setdefault("architectures", [type(model).__name__])
    return doc


def lm_hf_config(config: Any) -> dict[str, Any]:
    """LlamaForCausalLM config fields for coqat's built-in byte-level Llama (``lm``; no
    tokenizer: ids are raw bytes 0..255)."""
    c = config
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.d_model,
        "intermediate_size": c.ffn_hidden, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "dtype": "float32", "bos_token_id": None, "eos_token_id": None,
    }


def from_run(loaded: Any) -> ExportSource:
    """The source of a run directory opened with ``coqat.exporters.loading.load_run``."""
    from coqat.exporters.loading import fresh_model

    wl = loaded.workload
    hf = hf_config_of(loaded.model)
    if hf is None and loaded.workload_name == "lm":
        hf = lm_hf_config(wl.config)
    doc = json.loads(loaded.run.file("bitconfig.json").read_text())  # validated by load_run
    path = Path(loaded.path)
    return ExportSource(
        model=loaded.model, bitconfig=loaded.bitconfig, label=str(path),
        build_float=lambda: fresh_model(wl), example_inputs=tuple(wl.example_inputs()),
        bitconfig_doc=doc, workload_name=loaded.workload_name, path=path, hf_config=hf,
        # a workload built from a Hugging Face folder names it here (tokenizer files)
        hf_dir=Path(wl.hf_dir) if getattr(wl, "hf_dir", None) else None,
        evaluate=lambda m, n: float(wl.evaluate(m, max_batches=n)[wl.metric]),
        metric=wl.metric, higher_is_better=wl.higher_is_better,
        explain="--explain",
        notes=list(loaded.notes))


def from_model(model: nn.Module, bitconfig: BitConfig, *, name: str = "model",
               example_inputs: tuple[torch.Tensor, ...] | None = None,
               evaluate: Evaluate | None = None, metric: str = "loss",
               higher_is_better: bool = False, hf_dir: str | Path | None = None
               ) -> ExportSource:
    """The source of a model in memory.

    ``model`` is the QAT model (coqat's quantized layers in place); a model whose listed
    layers are still plain nn.Linear / nn.Conv2d is quantized per ``bitconfig`` on a copy.
    For a Hugging Face causal LM the export keys tensors by its own state_dict names and
    writes its own config; ``hf_dir`` (the folder it came from) supplies tokenizer files.
    ``evaluate(model, max_batches) -> metric`` runs a model that returns logits; without it
    an export cannot measure how far an approximation moves the metric (it says so).
    ``example_inputs`` default to token ids of shape (2, 16) for an HF model: a batch of 2,
    because torch.export specializes a dimension whose example size is 1.
    """
    from coqat.quant import quantize_model
    from coqat.quant.modules import QuantConv2d, QuantLinear

    if not isinstance(model, nn.Module) or not isinstance(bitconfig, BitConfig):
        raise CoqatError("from_model needs an nn.Module and a coqat BitConfig")
    pending = [n for n, lb in bitconfig.quantized().items()
               if not isinstance(_submodule(model, n), (QuantLinear, QuantConv2d))]
    if pending:
        model = quantize_model(copy.deepcopy(model), bitconfig, form="half",
                               kernels="reference")
    model.eval()
    hf = hf_config_of(model)
    if example_inputs is None:
        if hf is None:
            raise CoqatError(f"{name} is not a Hugging Face model; pass example_inputs")
        example_inputs = (torch.zeros(2, 16, dtype=torch.long),)

    def build_float() -> nn.Module:
        from coqat.quant import dequantize_model

        return dequantize_model(copy.deepcopy(model))

    return ExportSource(
        model=model, bitconfig=bitconfig, label=name, build_float=build_float,
        example_inputs=tuple(example_inputs), bitconfig_doc=bitconfig.to_dict(),
        workload_name=type(model).__name__, hf_config=hf,
        hf_dir=Path(hf_dir) if hf_dir is not None else None, evaluate=evaluate,
        metric=metric, higher_is_better=higher_is_better,
        explain="ExportRefused.problems")


def _submodule(model: nn.Module, fqn: str) -> nn.Module:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        raise CoqatError(f"bitconfig layer {fqn!r} is not a module of the model; use the "
                         "bitconfig made for this model") from None


def check_in_consumer(source: ExportSource, consumer: str, build: Callable[[], nn.Module],
                      batches: int, exact: bool) -> dict[str, Any]:
    """Evaluate the written export (``build()`` loads it the way a user would) and coqat's
    QAT model on the same ``batches`` batches; the record goes into the result's details.

    Without an evaluator or with ``batches == 0`` nothing is measured (the record says so).
    """
    if source.evaluate is None or batches <= 0:
        why = "no evaluation data" if source.evaluate is None else "check_batches = 0"
        return {"consumer": consumer, "measured": False, "why": why}
    from coqat.exporters.common import quiet_stderr

    ref = source.evaluate(LogitsOf(source.model), batches)
    with quiet_stderr():  # transformers' progress bars (decompressing, dispatching)
        exported = build()
        got = source.evaluate(LogitsOf(exported), batches)
    gap = got - ref
    worse = gap < 0 if source.higher_is_better else gap > 0
    within = abs(gap) <= EXACT_TOLERANCE * max(1.0, abs(ref))
    return {"consumer": consumer, "measured": True, "metric": source.metric,
            "exported": got, "coqat": ref, "gap": gap, "worse": bool(worse and not within),
            "batches": batches, "tolerance": EXACT_TOLERANCE, "within_tolerance": within,
            "expected_exact": exact}


def check_note(check: dict[str, Any]) -> str:
    """One line for the result's notes."""
    if not check.get("measured"):
        return f"not checked in {check['consumer']} ({check['why']})"
    verdict = "matches" if check["within_tolerance"] else "differs from"
    return (f"checked in {check['consumer']}: {check['metric']} {check['exported']:.4f} "
            f"{verdict} coqat's {check['coqat']:.4f} (gap {check['gap']:+.3g}, "
            f"{check['batches']} batches)")
