"""Search spaces (TOML) and their validation.

A search space is declarative: which workload, how to train it, which bits each layer may
take, which layers are pinned, and which layers are tied. Example::

    name = "lm-tiny"
    description = "byte-level Llama on Wikipedia leads"

    [workload]              # passed to the workload; 'name' picks it from the registry
    name = "lm"
    d_model = 128

    [train]                 # TrainSettings fields
    steps = 400
    lr = 3e-3

    [[search.layers]]       # first matching pattern wins; fnmatch globs over module FQNs
    pattern = "model.layers.*"
    w_bits = [2, 3, 4, 6, 8]
    a_bits = [4, 6, 8]

    [search.pinned]         # fixed bits, never searched
    "lm_head" = "w16a16"

Every quantizable layer (Linear / Conv2d with MACs) must match a pattern or be pinned;
patterns that match nothing are errors too, so typos surface at once.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from coqat.bitconfig import FLOAT_BITS, QUANTIZERS, BitConfig, LayerBits, check_bits, parse_bits
from coqat.errors import CoqatError

#: the space used by ``coqat demo`` and by commands given no --space
DEFAULT_SPACE = "lm-tiny"


@dataclass
class TrainSettings:
    """How one training run goes. Every field can be set in ``[train]`` of a space."""

    steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1       # LR at the end of a decay, as a fraction of lr
    warmup_steps: int = 40
    decay_frac: float = 0.2         # share of a phase spent decaying the LR (WSD shape)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 16
    eval_batch_size: int = 32
    #: batches of the end-of-run evaluation (the reported metric); 0 = the whole split
    final_eval_batches: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    quantizer: str = "quest"
    #: share of the steps run with quantization on; "auto" = compute-optimal prediction
    qat_fraction: float | str = 1.0
    #: fuse the LR cool-down with QAT (None: fuse at >= 4 bits, as the study found)
    fuse_cooldown: bool | None = None
    optimizer: str = "adamw"        # adamw | cage-d | cage-c
    cage_lambda: float = 10.0
    cage_silence: float = 0.8
    cage_schedule: str = "linear"   # linear | constant
    #: matmul backend of quantized layers: auto (Triton on CUDA, torch reference on CPU),
    #: triton (fail if unavailable) or reference (always the torch reference)
    kernels: str = "auto"
    #: torch.compile the training step: "auto" (on CUDA, eager on the CPU), true or false
    compile: bool | str = "auto"

    def validate(self, where: str = "[train]") -> "TrainSettings":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise CoqatError(f"{where}: {msg}")

        for name in ("steps", "batch_size", "eval_every", "eval_batches", "eval_batch_size",
                     "log_every", "checkpoint_every"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{name} must be a positive integer (got {v!r})")
        need(isinstance(self.final_eval_batches, int) and self.final_eval_batches >= 0,
             f"final_eval_batches must be an integer >= 0, 0 = the whole split (got"
             f" {self.final_eval_batches!r})")
        need(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.steps,
             f"warmup_steps must be an integer in [0, steps) (got {self.warmup_steps!r})")
        need(self.lr > 0, f"lr must be > 0 (got {self.lr})")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        need(0 <= self.decay_frac <= 1, "decay_frac must be in [0, 1]")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        need(self.weight_decay >= 0 and self.grad_clip >= 0,
             "weight_decay and grad_clip must be >= 0")
        need(self.quantizer in QUANTIZERS,
             f"quantizer must be one of {', '.join(QUANTIZERS)} (got {self.quantizer!r})")
        if isinstance(self.qat_fraction, str):
            need(self.qat_fraction == "auto",
                 f"qat_fraction must be 'auto' or a number in [0, 1] (got {self.qat_fraction!r})")
        else:
            need(0 <= float(self.qat_fraction) <= 1,
                 f"qat_fraction must be 'auto' or a number in [0, 1] (got {self.qat_fraction!r})")
        need(self.optimizer in ("adamw", "cage-d", "cage-c"),
             f"optimizer must be adamw, cage-d or cage-c (got {self.optimizer!r})")
        need(self.cage_lambda >= 0, "cage_lambda must be >= 0")
        need(0 <= self.cage_silence < 1, "cage_silence must be in [0, 1)")
        need(self.cage_schedule in ("linear", "constant"),
             "cage_schedule must be 'linear' or 'constant'")
        need(self.kernels in ("auto", "triton", "reference"),
             f"kernels must be auto, triton or reference (got {self.kernels!r})")
        need(self.compile in ("auto", True, False),
             f"compile must be 'auto', true or false (got {self.compile!r})")
        return self

    def replace(self, **changes: Any) -> "TrainSettings":
        """A copy with command-line overrides (None = keep). A --steps shorter than the
        space's warm-up shrinks the warm-up to a tenth of the steps instead of failing."""
        changes = {k: v for k, v in changes.items() if v is not None}
        steps = changes.get("steps", self.steps)
        if "warmup_steps" not in changes and self.warmup_steps >= steps:
            changes["warmup_steps"] = steps // 10
        return dataclasses.replace(self, **changes).validate("options")


@dataclass(frozen=True)
class LayerRule:
    """Candidate bits for the layers whose FQN matches ``pattern`` (an fnmatch glob)."""

    pattern: str
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]


@dataclass
class SearchSpace:
    name: str
    description: str
    workload: dict[str, Any]
    train: TrainSettings
    rules: list[LayerRule]
    pinned: dict[str, LayerBits]          # FQN glob -> bits
    ties: list[list[str]]                 # extra activation tie groups (globs, expanded)
    search: dict[str, Any]                # remaining [search] settings (search algorithm)
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def workload_name(self) -> str:
        return self.workload["name"]

    def fingerprint(self) -> str:
        """SHA-256 of the canonical space content: runs of one space share it."""
        canon = json.dumps(self.raw, sort_keys=True, default=str)
        return hashlib.sha256(canon.encode()).hexdigest()

    # ----- resolution against a real model ----------------------------------------
    def resolve(self, layer_names: Sequence[str],
                auto_ties: Sequence[Sequence[str]] = ()) -> "ResolvedSpace":
        """Expand patterns over the model's quantizable layers (model order)."""
        names = list(layer_names)
        pinned: dict[str, LayerBits] = {}
        used_pin = {p: False for p in self.pinned}
        for n in names:
            for pat, bits in self.pinned.items():
                if fnmatch.fnmatchcase(n, pat):
                    pinned[n] = bits
                    used_pin[pat] = True
                    break
        candidates: dict[str, LayerRule] = {}
        used_rule = {r.pattern: False for r in self.rules}
        for n in names:
            if n in pinned:
                continue
            for r in self.rules:
                if fnmatch.fnmatchcase(n, r.pattern):
                    candidates[n] = r
                    used_rule[r.pattern] = True
                    break
        where = self.path or self.name
        dead = [p for p, u in {**used_pin, **used_rule}.items() if not u]
        if dead:
            raise CoqatError(
                f"{where}: layer pattern(s) {', '.join(repr(d) for d in dead)} match no layer"
                f" of the model; quantizable layers look like {names[0]!r}")
        unmatched = [n for n in names if n not in pinned and n not in candidates]
        if unmatched:
            more = f" (+{len(unmatched) - 3} more)" if len(unmatched) > 3 else ""
            raise CoqatError(
                f"{where}: layer(s) {', '.join(unmatched[:3])}{more} match no [[search.layers]]"
                " pattern and are not pinned; add a pattern (e.g. '*') or pin them")
        groups = [tuple(g) for g in auto_ties]
        for spec in self.ties:
            members = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in spec)]
            if len(members) < 2:
                raise CoqatError(f"{where}: tie group {spec} matches fewer than two layers")
            groups = _merge_groups(groups + [tuple(members)], names)
        return ResolvedSpace(self, names, candidates, pinned, groups)


@dataclass
class ResolvedSpace:
    space: SearchSpace
    layer_names: list[str]
    candidates: dict[str, LayerRule]      # searchable layer -> its rule
    pinned: dict[str, LayerBits]          # pinned layer -> bits
    tie_groups: list[tuple[str, ...]]

    def uniform(self, bits: LayerBits) -> BitConfig:
        """Uniform ``bits`` on every searchable layer; pinned layers keep their bits."""
        return BitConfig.uniform(self.layer_names, bits, self.pinned, self.tie_groups)

    def uniform_candidates(self) -> list[tuple[int, int]]:
        """(w, a) pairs that every searchable layer allows (uniform baselines come from these)."""
        common: set[tuple[int, int]] | None = None
        for rule in self.candidates.values():
            pairs = {(w, a) for w in rule.w_bits for a in rule.a_bits}
            common = pairs if common is None else common & pairs
        return sorted(common or set(), key=lambda p: (p[0] * p[1], p))


def _merge_groups(groups: list[tuple[str, ...]], order: Sequence[str]) -> list[tuple[str, ...]]:
    """Union overlapping groups (a layer reads one tensor, so it is in one group)."""
    merged: list[set[str]] = []
    for g in groups:
        s = set(g)
        hit = [m for m in merged if m & s]
        for m in hit:
            s |= m
            merged.remove(m)
        merged.append(s)
    pos = {n: i for i, n in enumerate(order)}
    out = [tuple(sorted(m, key=lambda n: pos.get(n, 1 << 30))) for m in merged if len(m) > 1]
    return sorted(out, key=lambda g: pos.get(g[0], 1 << 30))


# ----- loading ------------------------------------------------------------------------
_TOP_KEYS = {"name", "description", "workload", "train", "search"}
_SEARCH_KEYS = {"layers", "pinned", "ties"}


def spaces_dir() -> Path:
    """Where the shipped spaces live: ``search_spaces/`` next to the package."""
    here = Path(__file__).resolve().parent.parent / "search_spaces"
    return here


def find_space(ref: str | Path) -> Path:
    """A path to a TOML file, or the name of a shipped space ('lm-tiny')."""
    p = Path(ref)
    if p.is_file():
        return p
    shipped = spaces_dir() / f"{ref}.toml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(x.stem for x in spaces_dir().glob("*.toml")))
    raise CoqatError(f"search space {str(ref)!r} not found; pass a TOML file or one of: {known}")


def load_space(ref: str | Path) -> SearchSpace:
    path = find_space(ref)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise CoqatError(f"{path} is not valid TOML ({e}); fix the syntax at that line") from None
    except UnicodeDecodeError:
        raise CoqatError(f"{path} is not a UTF-8 text file; pass a TOML search space") from None
    return parse_space(raw, path)


def parse_space(raw: Mapping[str, Any], path: Path | None = None) -> SearchSpace:
    where = str(path) if path else "search space"
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise CoqatError(f"{where}: unknown top-level key(s) {', '.join(unknown)};"
                         f" allowed: {', '.join(sorted(_TOP_KEYS))}")
    name = raw.get("name") or (path.stem if path else "space")
    wl = raw.get("workload")
    if not isinstance(wl, Mapping) or not isinstance(wl.get("name"), str):
        raise CoqatError(f"{where}: needs a [workload] table with name = \"lm\" | \"fashion\" | ...")
    train = _parse_train(raw.get("train", {}), where)
    search = dict(raw.get("search", {}))
    rules = [_parse_rule(r, where) for r in search.pop("layers", [])]
    pinned = {}
    for pat, bits in dict(search.pop("pinned", {})).items():
        try:
            pinned[pat] = parse_bits(bits, train.quantizer)
        except CoqatError as e:
            raise CoqatError(f"{where}: [search.pinned] {pat!r}: {e}") from None
    ties = search.pop("ties", [])
    if not (isinstance(ties, list) and all(isinstance(t, list) for t in ties)):
        raise CoqatError(f"{where}: [search] ties must be a list of lists of layer patterns")
    return SearchSpace(name=name, description=raw.get("description", ""), workload=dict(wl),
                       train=train, rules=rules, pinned=pinned, ties=ties, search=search,
                       path=path, raw=dict(raw))


def _parse_train(table: Any, where: str) -> TrainSettings:
    if not isinstance(table, Mapping):
        raise CoqatError(f"{where}: [train] must be a table")
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(table) - fields)
    if unknown:
        raise CoqatError(f"{where}: [train] has unknown key(s) {', '.join(unknown)};"
                         f" allowed: {', '.join(sorted(fields))}")
    try:
        return TrainSettings(**table).validate(f"{where} [train]")
    except TypeError as e:
        raise CoqatError(f"{where}: [train]: {e}") from None


def _parse_rule(r: Any, where: str) -> LayerRule:
    if not isinstance(r, Mapping) or "pattern" not in r:
        raise CoqatError(f"{where}: each [[search.layers]] needs pattern, w_bits and a_bits")
    extra = sorted(set(r) - {"pattern", "w_bits", "a_bits"})
    if extra:
        raise CoqatError(f"{where}: [[search.layers]] {r.get('pattern')!r} has unknown key(s)"
                         f" {', '.join(extra)}")

    def bits_list(key: str) -> tuple[int, ...]:
        v = r.get(key)
        if not isinstance(v, list) or not v:
            raise CoqatError(f"{where}: [[search.layers]] {r['pattern']!r}: {key} must be a"
                             " non-empty list like [2, 4, 8]")
        try:
            return tuple(sorted({check_bits(b, key) for b in v}))
        except CoqatError as e:
            raise CoqatError(f"{where}: [[search.layers]] {r['pattern']!r}: {e}") from None

    return LayerRule(str(r["pattern"]), bits_list("w_bits"), bits_list("a_bits"))


def bits_from_cli(text: str, quantizer: str) -> LayerBits | None:
    """``--bits`` values: wNaM or fp (returns LayerBits), or None for a path to a JSON file."""
    t = text.strip()
    if t.endswith(".json") or Path(t).is_file():
        return None
    return parse_bits(t, quantizer)


__all__ = ["DEFAULT_SPACE", "FLOAT_BITS", "LayerRule", "ResolvedSpace", "SearchSpace",
           "TrainSettings", "bits_from_cli", "find_space", "load_space", "parse_space",
           "spaces_dir"]
