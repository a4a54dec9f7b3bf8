"""A compact Llama-style byte-level decoder and the ``lm`` workload.

The model follows nanoGPT / gpt-fast: plain modules, one file, no framework. Module names
are exactly Hugging Face's ``LlamaForCausalLM`` names (``model.layers.0.self_attn.q_proj``,
``model.layers.0.mlp.gate_proj``, ``lm_head``, ...), so bit configurations and exported
weights line up with the HF ecosystem:

    LlamaLM
    ├── model: LlamaModel
    │   ├── embed_tokens: Embedding(vocab, d)
    │   ├── layers: ModuleList of LlamaDecoderLayer
    │   │   ├── input_layernorm: RMSNorm
    │   │   ├── self_attn: q_proj, k_proj, v_proj, o_proj   (Linear, no bias; RoPE; GQA)
    │   │   ├── post_attention_layernorm: RMSNorm
    │   │   └── mlp: gate_proj, up_proj, down_proj          (SwiGLU)
    │   ├── norm: RMSNorm
    │   └── rotary_emb: cos/sin tables (buffers, not saved)
    └── lm_head: Linear(d, vocab), untied

The workload trains it on an offline byte corpus (``coqat.workloads.corpus``) and reports
validation loss in nats per byte (and bits per byte).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from coqat.errors import CoqatError
from coqat.workloads import corpus as corpus_lib
from coqat.workloads.base import Workload, register
from coqat.workloads.sampling import check_split, model_device, rank_rows, stable_seed


#: a shape beyond this is a typo, not a model to train (it would not fit in any memory here)
MAX_PARAMS = 10**11


def default_ffn_hidden(d_model: int, multiple_of: int = 64) -> int:
    """Llama's SwiGLU width: 8/3 d (same MACs as a 4d GELU MLP), rounded up."""
    return multiple_of * math.ceil(8 * d_model / 3 / multiple_of)


@dataclass
class LlamaConfig:
    vocab_size: int = 256  # bytes
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (plain multi-head attention)
    ffn_hidden: int = 384
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                    "ffn_hidden", "max_seq_len"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CoqatError(f"lm: {key} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise CoqatError(f"lm: d_model {self.d_model} is not divisible by n_heads "
                             f"{self.n_heads}; pick n_heads that divides d_model")
        if self.head_dim % 2:
            raise CoqatError(f"lm: head dim d_model/n_heads = {self.head_dim} is odd; RoPE "
                             f"needs an even head dim, change d_model or n_heads")
        if self.n_heads % self.n_kv_heads:
            raise CoqatError(f"lm: n_heads {self.n_heads} is not a multiple of n_kv_heads "
                             f"{self.n_kv_heads}; pick n_kv_heads that divides n_heads")
        if not self.rope_theta > 0:
            raise CoqatError(f"lm: rope_theta must be > 0, got {self.rope_theta!r}")
        if self.param_count() > MAX_PARAMS:
            raise CoqatError(f"lm: this shape has {self.param_count():.3g} parameters, beyond"
                             f" what coqat builds ({MAX_PARAMS:.0e}); check d_model, n_layers"
                             " and ffn_hidden")

    def param_count(self) -> int:
        """Weights of the model this config builds (embeddings, attention, MLP, head)."""
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        per_layer = d * (2 * d + 2 * kv) + 3 * d * self.ffn_hidden + 2 * d
        return 2 * self.vocab_size * d + self.n_layers * per_layer + d

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalize in float32 so bf16 activations do not lose the mean square
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LlamaRotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE in HF's "rotate half" layout ([freqs, freqs])."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        # derived from the config: not saved in checkpoints
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.cos.shape[0]:
            raise CoqatError(f"lm: sequence length {seq_len} exceeds max_seq_len "
                             f"{self.cos.shape[0]}; raise seq_len in the workload spec")
        return self.cos[:seq_len], self.sin[:seq_len]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # GQA: each kv head serves a group of q heads
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary_emb(idx.shape[1])
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class LlamaLM(nn.Module):
    """Decoder-only LM: ``forward(idx [B,T] long) -> logits [B,T,vocab]``."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(_init_weights)
        # GPT-2's residual scaling: each block adds two projections to the stream
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=out_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(idx))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)


def count_params(model: nn.Module, non_embedding: bool = True) -> int:
    """Parameter count; ``non_embedding`` leaves out the token embedding and the output
    head (``lm_head``), the convention behind model sizes such as QuEST's "30M"."""
    params = {id(p): p for p in model.parameters()}  # shared tensors count once
    if non_embedding:
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        head = getattr(model, "lm_head", None)
        for m in embeddings + ([head] if isinstance(head, nn.Module) else []):
            for p in m.parameters():
                params.pop(id(p), None)
    return sum(p.numel() for p in params.values())


# ----- the workload ---------------------------------------------------------------------

DEFAULT_SPEC: dict[str, Any] = {
    "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": None, "ffn_hidden": None,
    "seq_len": 128, "corpus": "auto", "rope_theta": 10000.0,
}


@register
class LMWorkload(Workload):
    """Byte-level language modelling on an offline corpus; metric: validation loss in nats
    per byte (lower is better). ``evaluate`` also gives ``val_bpb`` (bits per byte).

    Defaults are tiny (d 128, 4 layers, 4 heads, SwiGLU 384, 128-byte context: 853k
    non-embedding parameters) so that the CPU demo trains in minutes.
    """

    name = "lm"
    metric = "val_loss"
    higher_is_better = False
    spec_keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "seq_len",
                 "corpus", "rope_theta")

    def __init__(self, spec: Mapping[str, Any] | None = None, data_dir: str | None = None,
                 seed: int = 0):
        super().__init__(spec, data_dir=data_dir, seed=seed)
        s = {**DEFAULT_SPEC, **self.spec}
        d_model = s["d_model"]
        ffn = s["ffn_hidden"] if s["ffn_hidden"] is not None else (
            default_ffn_hidden(d_model) if isinstance(d_model, int) else d_model)
        rope_theta = s["rope_theta"]
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)):
            raise CoqatError(f"lm: rope_theta must be a number, got {rope_theta!r}")
        self.config = LlamaConfig(d_model=d_model, n_layers=s["n_layers"], n_heads=s["n_heads"],
                                  n_kv_heads=s["n_kv_heads"], ffn_hidden=ffn,
                                  max_seq_len=s["seq_len"], rope_theta=float(rope_theta))
        self.seq_len = self.config.max_seq_len
        self.corpus_spec = s["corpus"]
        corpus_lib.resolve_sources(self.corpus_spec)  # fail early on an unknown source name
        self._corpus: corpus_lib.Corpus | None = None

    @property
    def corpus(self) -> corpus_lib.Corpus:
        """Built on first use, so that counting MACs never reads the data."""
        if self._corpus is None:
            self._corpus = corpus_lib.build_corpus(self.corpus_spec)
        return self._corpus

    # ----- model -----
    def build_model(self) -> nn.Module:
        return LlamaLM(self.config)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, self.seq_len, dtype=torch.long),)

    def tokens_per_sample(self) -> int:
        return self.seq_len

    # ----- data -----
    def _split_data(self, split: str) -> np.ndarray:
        check_split(split)
        data = self.corpus.split(split)
        if data.size < self.seq_len + 2:
            raise CoqatError(f"lm: the {split} split of corpus {self.corpus_spec!r} has "
                             f"{data.size} bytes, fewer than seq_len+2 = {self.seq_len + 2}; "
                             f"use a larger corpus or a shorter seq_len")
        return data

    def get_batch(self, split: str, step: int, batch_size: int, rank: int = 0,
                  world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of seq_len+1 bytes; the global batch's offsets come from a
        generator seeded by (seed, split, step), and this rank takes its rows of it."""
        if step < 0:
            raise CoqatError(f"step must be >= 0, got {step}")
        lo, hi = rank_rows(batch_size, rank, world_size)
        data = self._split_data(split)
        gen = torch.Generator().manual_seed(stable_seed(self.seed, "lm", split, step))
        starts = torch.randint(0, data.size - self.seq_len, (batch_size,), generator=gen)
        starts = starts[lo:hi].numpy()
        windows = data[starts[:, None] + np.arange(self.seq_len + 1)]
        w = torch.from_numpy(windows.astype(np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    def evaluate(self, model: nn.Module, max_batches: int | None = None,
                 batch_size: int = 64, split: str = "val") -> dict[str, float]:
        """Mean cross-entropy per predicted byte over non-overlapping windows from the
        start of ``split`` (window i predicts bytes i*T+1 .. i*T+T)."""
        data = self._split_data(split)
        T = self.seq_len
        n_windows = (data.size - 1) // T
        if max_batches is not None:
            n_windows = min(n_windows, max_batches * batch_size)
        device = model_device(model)
        was_training = model.training
        model.eval()
        loss_sum, tokens = 0.0, 0
        try:
            with torch.no_grad():
                for first in range(0, n_windows, batch_size):
                    starts = np.arange(first, min(first + batch_size, n_windows)) * T
                    w = torch.from_numpy(data[starts[:, None] + np.arange(T + 1)].astype(np.int64))
                    x, y = w[:, :-1].to(device), w[:, 1:].to(device)
                    logits = model(x)
                    loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                y.reshape(-1), reduction="sum").item()
                    tokens += y.numel()
        finally:
            model.train(was_training)
        loss = loss_sum / max(tokens, 1)
        return {"val_loss": loss, "loss": loss, "val_bpb": loss / math.log(2),
                "tokens": tokens}

    def data_info(self) -> dict[str, Any]:
        return dict(self.corpus.info, seq_len=self.seq_len, unit="byte")
