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
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from coqat.bitconfig import FLOAT_BITS, QUANTIZERS, BitConfig, LayerBits, check_bits, parse_bits
from coqat.errors import CoqatError

#: the space used by ``coqat demo`` and by commands given no --space
DEFAULT_SPACE = "lm-tiny"
#: matmul backends of quantized layers (``TrainSettings.kernels``)
KERNEL_CHOICES: tuple[str, ...] = ("auto", "triton", "reference")
#: optimizers of the training loop (``TrainSettings.optimizer``)
OPTIMIZERS: tuple[str, ...] = ("adamw", "cage-d", "cage-c")
#: per-layer scaling of the CAGE term (``TrainSettings.cage_scale``, see coqat.optim.cage)
CAGE_SCALES: tuple[str, ...] = ("none", "step")
#: the TrainSettings a branch may set differently from its parent run: they act only on
#: the optimizer steps after the branch point (``coqat train --branch-from``)
BRANCH_FREE_SETTINGS: tuple[str, ...] = ("optimizer", "cage_lambda", "cage_pull",
                                         "cage_silence", "cage_schedule", "cage_scale")


#: how a sensitivity table is obtained ([search] sensitivity_estimate, --estimate): measured
#: loss changes, or their second-order Fisher estimate (coqat.bitsearch.sensitivity)
SENSITIVITY_ESTIMATES: tuple[str, ...] = ("measured", "fisher")
#: how --method sensitivity reads its table before the knapsack (SearchSettings.sensitivity_clean)
SENSITIVITY_CLEAN: tuple[str, ...] = ("monotone", "none")

#: --compile auto | on | off as TrainSettings.compile
COMPILE_FLAGS: dict[str, bool | str] = {"auto": "auto", "on": True, "off": False}

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
    #: CAGE's strength as the pull integral sum_t lr_t * lambda_t; when set, lambda is
    #: derived from it and the run's LR schedule (cage_lambda is then not used)
    cage_pull: float | None = None
    cage_silence: float = 0.8
    cage_schedule: str = "linear"   # linear | constant
    #: "step": each layer's CAGE term measured in its own grid steps (coqat.optim.cage)
    cage_scale: str = "none"
    #: matmul backend of quantized layers: auto (Triton on CUDA, torch reference on CPU),
    #: triton (fail if unavailable) or reference (always the torch reference)
    kernels: str = "auto"
    #: torch.compile the training step: "auto" (on CUDA, eager on the CPU), true or false
    #: (the command line's auto | on | off: COMPILE_FLAGS)
    compile: bool | str = "auto"

    def validate(self, where: str = "[train]") -> "TrainSettings":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise CoqatError(f"{where}: {msg}")

        for name in ("steps", "batch_size", "eval_every", "eval_batches", "eval_batch_size",
                     "log_every", "checkpoint_every"):
            need(_is_int(getattr(self, name), lo=1),
                 f"{name} must be a positive integer (got {getattr(self, name)!r})")
        need(_is_int(self.final_eval_batches, lo=0),
             f"final_eval_batches must be an integer >= 0, 0 = the whole split (got"
             f" {self.final_eval_batches!r})")
        need(_is_int(self.warmup_steps, lo=0) and self.warmup_steps < self.steps,
             f"warmup_steps must be an integer in [0, steps) (got {self.warmup_steps!r})")
        need(_is_number(self.lr) and self.lr > 0, f"lr must be a finite number > 0 (got"
                                                  f" {self.lr!r})")
        for name, lo, hi, hi_open in (("min_lr_ratio", 0, 1, False), ("decay_frac", 0, 1, False),
                                      ("beta1", 0, 1, True), ("beta2", 0, 1, True),
                                      ("cage_silence", 0, 1, True)):
            v = getattr(self, name)
            need(_is_number(v) and lo <= v and (v < hi if hi_open else v <= hi),
                 f"{name} must be a number in [{lo}, {hi}{')' if hi_open else ']'} (got {v!r})")
        for name in ("weight_decay", "grad_clip", "cage_lambda"):
            v = getattr(self, name)
            need(_is_number(v) and v >= 0, f"{name} must be a finite number >= 0 (got {v!r})")
        need(self.cage_pull is None or (_is_number(self.cage_pull) and self.cage_pull >= 0),
             f"cage_pull must be a finite number >= 0 (got {self.cage_pull!r})")
        need(self.cage_scale in CAGE_SCALES,
             f"cage_scale must be one of {', '.join(CAGE_SCALES)} (got {self.cage_scale!r})")
        need(self.quantizer in QUANTIZERS,
             f"quantizer must be one of {', '.join(QUANTIZERS)} (got {self.quantizer!r})")
        need(self.qat_fraction == "auto" or (_is_number(self.qat_fraction)
                                             and 0 <= self.qat_fraction <= 1),
             f"qat_fraction must be 'auto' or a number in [0, 1] (got {self.qat_fraction!r})")
        need(self.fuse_cooldown is None or isinstance(self.fuse_cooldown, bool),
             f"fuse_cooldown must be true or false (got {self.fuse_cooldown!r})")
        need(self.optimizer in OPTIMIZERS,
             f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        need(self.cage_schedule in ("linear", "constant"),
             f"cage_schedule must be 'linear' or 'constant' (got {self.cage_schedule!r})")
        need(self.kernels in KERNEL_CHOICES,
             f"kernels must be one of {', '.join(KERNEL_CHOICES)} (got {self.kernels!r})")
        need(self.compile in ("auto", True, False),
             f"compile must be 'auto', true or false (got {self.compile!r})")
        return self

    def replace(self, **changes: Any) -> "TrainSettings":
        """A copy with command-line overrides (None = keep). A --steps shorter than the
        space's warm-up shrinks the warm-up to a tenth of the steps instead of failing."""
        changes = {k: v for k, v in changes.items() if v is not None}
        _one_cage_strength(changes, "options")
        if "cage_lambda" in changes:       # a lambda given now replaces a pull set earlier
            changes["cage_pull"] = None
        steps = changes.get("steps", self.steps)
        if "warmup_steps" not in changes and self.warmup_steps >= steps:
            changes["warmup_steps"] = steps // 10
        return dataclasses.replace(self, **changes).validate("options")


def _one_cage_strength(values: Mapping[str, Any], where: str) -> None:
    """CAGE's strength is given as lambda or as the pull integral, not both."""
    if values.get("cage_lambda") is not None and values.get("cage_pull") is not None:
        raise CoqatError(f"{where}: give cage_lambda (--cage-lambda) or cage_pull"
                         " (--cage-pull), not both; the pull sets lambda from the LR schedule")


def _is_int(v: Any, lo: int, hi: int = 2**62) -> bool:
    """An int (not a bool) in [lo, hi]: TOML and JSON give bools and huge ints too."""
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: Any) -> bool:
    """A finite int or float (not a bool): rules out nan, inf and strings."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
        return common_pairs(self.candidates.values())


def common_pairs(rules: Iterable[LayerRule]) -> list[tuple[int, int]]:
    """The (w, a) pairs every rule allows, by w*a then w: the uniform configs of a space
    (``ResolvedSpace.uniform_candidates``; of the space's rules before a model resolves them)."""
    common: set[tuple[int, int]] | None = None
    for rule in rules:
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


# ----- search settings ------------------------------------------------------------------
RELAX_MODES = ("soft", "hard")
INIT_MODES = ("budget", "uniform")


@dataclass
class SearchSettings:
    """Search settings: the keys of a space's ``[search]`` table that drive the search engine.

    Example (every key optional; the values shown are the defaults)::

        [search]
        fp_steps = 400            # FP phase (cached per space+seed+settings); default: [train] steps
        search_steps = 200        # weight steps of the search phase; default: half of [train] steps
        weight_lr_scale = 0.1     # weight LR during the search, as a share of [train] lr (constant)
        arch_lr = 0.1             # SGD learning rate of the logits (on normalised gradients)
        arch_momentum = 0.0       # SGD momentum of the logits
        arch_every = 2            # one architecture step (on the holdout split) every N weight steps
        arch_batch_size = 8       # holdout batch of an arch step; default: half the [train] batch
                                  # (keeps a search step <= 1.5 x a QAT step, see benchmarks/)
        relax = "soft"            # "soft" Gumbel-softmax mixing, or "hard" (straight-through)
        tau_start = 1.0           # Gumbel-softmax temperature, annealed exponentially ...
        tau_end = 0.1             # ... from tau_start at the first to tau_end at the last arch step
        eta_mu = 0.2              # dual ascent rate of the Lagrange multiplier mu
        mu_init = 0.0             # starting mu
        init = "budget"           # start logits with E[BOPs] = budget ("uniform": all zero)
        fill = 0.97               # repair: use at least this share of the budget's searchable part
        trace_every = 5           # per-decision probabilities in the trace every N arch steps
        proxy_batches = 2         # Optuna/random proxy: holdout batches per evaluated config
        sensitivity_estimate = "measured"  # --method sensitivity: measured | fisher table
        sensitivity_clean = "monotone"     # each row made >= 0 and non-increasing in bits
                                           # before the knapsack ("none": the raw table)
        optuna_trials = 0         # cap on Optuna trials (0: no cap, only the time limit)
        optuna_seconds = 0.0      # Optuna's wall-clock (0: the Gumbel search's, measured)
        compile_arch = false      # with --compile on, compile the architecture step too (its
                                  # cold compile pays only after ~1100 steps on lm-30m);
                                  # false: eager, its soft mixes compiled on their own

    Why these choices: see ``coqat.bitsearch.gumbel`` (SGD for the logits so that mu's scale reaches
    the bits; a normalised constraint so that eta_mu means the same on every model).
    """

    fp_steps: int | None = None
    search_steps: int | None = None
    weight_lr_scale: float = 0.1
    arch_lr: float = 0.1
    arch_momentum: float = 0.0
    arch_every: int = 2
    arch_batch_size: int | None = None
    relax: str = "soft"
    tau_start: float = 1.0
    tau_end: float = 0.1
    eta_mu: float = 0.2
    mu_init: float = 0.0
    init: str = "budget"
    fill: float = 0.97
    trace_every: int = 5
    proxy_batches: int = 2
    sensitivity_estimate: str = "measured"
    sensitivity_clean: str = "monotone"
    optuna_trials: int = 0
    optuna_seconds: float = 0.0
    compile_arch: bool = False

    def validate(self, where: str = "[search]") -> "SearchSettings":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise CoqatError(f"{where}: {msg}")

        for name in ("fp_steps", "search_steps", "arch_batch_size"):
            v = getattr(self, name)
            need(v is None or _is_int(v, lo=1), f"{name} must be a positive integer (got {v!r})")
        need(self.sensitivity_estimate in SENSITIVITY_ESTIMATES,
             f"sensitivity_estimate must be 'measured' or 'fisher' (got"
             f" {self.sensitivity_estimate!r})")
        need(self.sensitivity_clean in SENSITIVITY_CLEAN,
             f"sensitivity_clean must be {' or '.join(repr(c) for c in SENSITIVITY_CLEAN)} (got"
             f" {self.sensitivity_clean!r})")
        need(isinstance(self.compile_arch, bool),
             f"compile_arch must be true or false (got {self.compile_arch!r})")
        for name in ("arch_every", "trace_every", "proxy_batches"):
            v = getattr(self, name)
            need(_is_int(v, lo=1), f"{name} must be a positive integer (got {v!r})")
        need(_is_int(self.optuna_trials, lo=0),
             f"optuna_trials must be a non-negative integer (got {self.optuna_trials!r})")
        for name in ("weight_lr_scale", "arch_lr", "tau_start", "tau_end", "eta_mu"):
            v = getattr(self, name)
            need(_is_number(v) and v > 0, f"{name} must be a finite number > 0 (got {v!r})")
        need(_is_number(self.arch_momentum) and 0 <= self.arch_momentum < 1,
             f"arch_momentum must be in [0, 1) (got {self.arch_momentum!r})")
        need(_is_number(self.mu_init) and self.mu_init >= 0,
             f"mu_init must be a finite number >= 0 (got {self.mu_init!r})")
        need(_is_number(self.fill) and 0 <= self.fill <= 1,
             f"fill must be in [0, 1] (got {self.fill!r})")
        need(_is_number(self.optuna_seconds) and self.optuna_seconds >= 0,
             f"optuna_seconds must be a finite number >= 0 (got {self.optuna_seconds!r})")
        need(self.relax in RELAX_MODES,
             f"relax must be {' or '.join(RELAX_MODES)} (got {self.relax!r})")
        need(self.tau_end <= self.tau_start, "tau_end must not exceed tau_start")
        need(self.init in INIT_MODES,
             f"init must be {' or '.join(INIT_MODES)} (got {self.init!r})")
        return self

    def replace(self, **changes: Any) -> "SearchSettings":
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes).validate("options")

    def resolved_arch_batch(self, train_batch: int) -> int:
        """The holdout batch of an architecture step (default: half the train batch)."""
        return self.arch_batch_size or max(1, train_batch // 2)

    def resolved_steps(self, train_steps: int) -> tuple[int, int]:
        """(fp_steps, search_steps) with the defaults filled in from [train] steps."""
        fp = self.fp_steps if self.fp_steps is not None else train_steps
        search = self.search_steps if self.search_steps is not None else max(1, train_steps // 2)
        return fp, search


def parse_search_settings(space: SearchSpace | Mapping[str, Any]) -> SearchSettings:
    """The search settings of a space (its leftover ``[search]`` keys), validated."""
    table = space.search if isinstance(space, SearchSpace) else dict(space)
    where = f"{space.path or space.name} [search]" if isinstance(space, SearchSpace) else \
        "[search]"
    fields = {f.name for f in dataclasses.fields(SearchSettings)}
    unknown = sorted(set(table) - fields)
    if unknown:
        raise CoqatError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: layers,"
                         f" pinned, ties, {', '.join(sorted(fields))}")
    try:
        return SearchSettings(**table).validate(where)
    except TypeError as e:  # pragma: no cover - unknown keys are caught above
        raise CoqatError(f"{where}: {e}") from None


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


#: the candidates of a user model's default space: every Linear/Conv2d searchable
USER_DEFAULT_RULE = {"pattern": "*", "w_bits": [2, 3, 4, 8], "a_bits": [4, 8]}


def space_for_workload(workload: Mapping[str, Any], name: str,
                       space: "str | Path | SearchSpace | None" = None) -> SearchSpace:
    """The search space of a user's own model: the given space file (its [train] and
    [search] tables; it must not name a workload of its own) or, without one, every
    Linear/Conv2d layer searchable over weights {2, 3, 4, 8} x activations {4, 8}."""
    if space is None:
        raw: dict[str, Any] = {"name": name, "search": {"layers": [dict(USER_DEFAULT_RULE)]}}
        path = None
    elif isinstance(space, SearchSpace):
        raw, path = dict(space.raw), space.path
    else:
        path = find_space(space)
        raw, path = dict(_read_toml(path)), path
    if "workload" in raw:
        raise CoqatError(f"{path or 'the space'}: with your own model the space must not have a"
                         " [workload] table (the model is the workload); remove it")
    raw["workload"] = dict(workload)
    raw.setdefault("name", name)
    return parse_space(raw, path)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise CoqatError(f"{path} is not valid TOML ({e}); fix the syntax at that line") from None
    except UnicodeDecodeError:
        raise CoqatError(f"{path} is not a UTF-8 text file; pass a TOML search space") from None
    except RecursionError:
        raise CoqatError(f"{path} is nested too deeply to be a search space") from None
    except OSError as e:
        raise CoqatError(f"cannot read {path} ({e.strerror}); pass a readable TOML file") \
            from None


def load_space(ref: str | Path) -> SearchSpace:
    path = find_space(ref)
    return parse_space(_read_toml(path), path)


def parse_space(raw: Any, path: Path | None = None) -> SearchSpace:
    where = str(path) if path else "search space"
    if not isinstance(raw, Mapping):
        raise CoqatError(f"{where}: a search space is a TOML table (got {type(raw).__name__})")
    unknown = sorted(str(k) for k in set(raw) - _TOP_KEYS)
    if unknown:
        raise CoqatError(f"{where}: unknown top-level key(s) {', '.join(unknown)};"
                         f" allowed: {', '.join(sorted(_TOP_KEYS))}")
    name = raw.get("name") or (path.stem if path else "space")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise CoqatError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-'"
                         " (it names run directories)")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise CoqatError(f"{where}: description must be a string")
    wl = raw.get("workload")
    if not isinstance(wl, Mapping) or not isinstance(wl.get("name"), str):
        raise CoqatError(f"{where}: needs a [workload] table with name = \"lm\" | \"fashion\" | ...")
    train = _parse_train(raw.get("train", {}), where)
    search = raw.get("search", {})
    if not isinstance(search, Mapping):
        raise CoqatError(f"{where}: [search] must be a table")
    search = dict(search)
    layers = search.pop("layers", [])
    if not isinstance(layers, list):
        raise CoqatError(f"{where}: [[search.layers]] must be an array of tables, each with"
                         " pattern, w_bits and a_bits")
    rules = [_parse_rule(r, where) for r in layers]
    pinned_table = search.pop("pinned", {})
    if not isinstance(pinned_table, Mapping):
        raise CoqatError(f"{where}: [search.pinned] must be a table of \"pattern\" = \"wNaM\"")
    pinned = {}
    for pat, bits in pinned_table.items():
        try:
            pinned[pat] = parse_bits(bits, train.quantizer)
        except CoqatError as e:
            raise CoqatError(f"{where}: [search.pinned] {pat!r}: {e}") from None
    ties = search.pop("ties", [])
    if not (isinstance(ties, list) and all(isinstance(t, list) and
                                           all(isinstance(x, str) for x in t) for t in ties)):
        raise CoqatError(f"{where}: [search] ties must be a list of lists of layer patterns")
    return SearchSpace(name=name, description=description, workload=dict(wl),
                       train=train, rules=rules, pinned=pinned, ties=ties, search=search,
                       path=path, raw=dict(raw))


def _parse_train(table: Any, where: str) -> TrainSettings:
    if not isinstance(table, Mapping):
        raise CoqatError(f"{where}: [train] must be a table")
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    _one_cage_strength(table, f"{where} [train]")
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


# ----- one run's configuration ------------------------------------------------------------
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
MAX_SEED = 2**32 - 1


@dataclass
class Runtime:
    """Where a run executes and where it writes. None of it changes the run's numbers
    except ``seed`` (model init, data order, search sampling); ``stop_at`` ends the same
    trajectory early, ``branch_from`` continues another run's (see ``coqat.training.branch``)
    and ``init_from`` starts from another run's trained weights (``coqat.training.warmstart``)."""

    seed: int = 0
    device: str = "auto"            # auto (CUDA if present) | cpu | cuda | cuda:N
    data_dir: str | None = None     # another copy of a dataset (Fashion-MNIST)
    out: str = "runs"               # root of run directories
    name: str | None = None         # run name (default: derived from space, bits, seed)
    progress: bool = True           # progress bars and one-line phase notes
    #: stop after this many optimizer steps (schedules still span ``steps``); the run keeps
    #: its checkpoint there for branches
    stop_at: int | None = None
    #: the run directory this run branches from (its checkpoint is the starting point)
    branch_from: str | None = None
    #: a finished float run whose final weights the model starts from (a warm start,
    #: coqat.training.warmstart); the rest of the run is its own
    init_from: str | None = None

    def validate(self, where: str = "runtime") -> "Runtime":
        if not _is_int(self.seed, lo=0, hi=MAX_SEED):
            raise CoqatError(f"{where}: seed must be an integer in [0, {MAX_SEED}] (got"
                             f" {self.seed!r})")
        if not (isinstance(self.device, str) and _DEVICE_RE.match(self.device)):
            raise CoqatError(f"{where}: device must be auto, cpu, cuda or cuda:N (got"
                             f" {self.device!r})")
        if self.stop_at is not None and not _is_int(self.stop_at, lo=1):
            raise CoqatError(f"{where}: stop_at must be a positive integer (got"
                             f" {self.stop_at!r})")
        for name in ("data_dir", "name", "branch_from", "init_from"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise CoqatError(f"{where}: {name} must be a non-empty string (got {v!r})")
        if not isinstance(self.out, str) or not self.out.strip():
            raise CoqatError(f"{where}: out must be a directory path (got {self.out!r})")
        if self.branch_from is not None and self.init_from is not None:
            raise CoqatError(f"{where}: a branch starts from its parent's checkpoint; give"
                             " branch_from or init_from, not both")
        if self.name is not None and ("/" in self.name or self.name in (".", "..")):
            raise CoqatError(f"{where}: name {self.name!r} must be a plain name, not a path;"
                             " use out for the directory")
        return self


@dataclass
class RunConfig:
    """One run's configuration, parsed and validated once: the search space, its training
    and search settings with the caller's overrides applied, and the runtime.

    Every entry point builds one (the CLI from its options, the Python API from keyword
    arguments, a resumed run from its ``config.json``), and nothing downstream re-reads
    options from anywhere else::

        cfg = RunConfig.build("lm-tiny", train={"steps": 100, "optimizer": "cage-d"},
                              search={"search_steps": 50}, runtime=Runtime(seed=1))
    """

    space: SearchSpace
    train: TrainSettings
    search: SearchSettings
    runtime: Runtime

    @classmethod
    def build(cls, space: "str | Path | SearchSpace", train: Mapping[str, Any] | None = None,
              search: Mapping[str, Any] | None = None,
              runtime: "Runtime | Mapping[str, Any] | None" = None) -> "RunConfig":
        """The space's settings with ``train`` / ``search`` overrides (None values = keep
        the space's); every value is validated here."""
        sp = space if isinstance(space, SearchSpace) else load_space(space)
        t = _replace_checked(sp.train, train, "train")
        s = _replace_checked(parse_search_settings(sp), search, "search")
        if isinstance(runtime, Runtime):
            rt = dataclasses.replace(runtime)
        else:
            rt = _construct_checked(Runtime, runtime or {}, "runtime")
        return cls(sp, t, s, rt.validate())

    @classmethod
    def from_options(cls, space: "str | Path | SearchSpace", **options: Any) -> "RunConfig":
        """Flat keyword options routed by name to the train, search and runtime parts (their
        field names are disjoint): ``RunConfig.from_options("lm-tiny", steps=100, seed=1,
        search_steps=50)``. None values keep the space's setting."""
        parts: dict[str, dict[str, Any]] = {"train": {}, "search": {}, "runtime": {}}
        owners = {f.name: part for part, kind in (("train", TrainSettings),
                                                  ("search", SearchSettings),
                                                  ("runtime", Runtime))
                  for f in dataclasses.fields(kind)}
        unknown = sorted(k for k in options if k not in owners)
        if unknown:
            raise CoqatError(f"unknown option(s) {', '.join(unknown)}; options are the fields"
                             " of TrainSettings, SearchSettings and Runtime")
        for k, v in options.items():
            if v is not None:
                parts[owners[k]][k] = v
        return cls.build(space, **parts)

    def with_train(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, train=_replace_checked(self.train, changes, "train"))

    def with_search(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, search=_replace_checked(self.search, changes, "search"))

    def with_runtime(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime,
                                                                     **changes).validate())

    def fp_phase(self, steps: int) -> "RunConfig":
        """The configuration of a search's FP phase: the space's training settings with
        ``steps`` and this run's lr, batch size and compile choice. Options that only act on
        quantized training (quantizer, QAT fraction, optimizer, kernels) stay at the space's
        values, so every search of one space and seed shares one cached FP phase."""
        t = self.space.train.replace(steps=steps, lr=self.train.lr,
                                     batch_size=self.train.batch_size,
                                     compile=self.train.compile)
        return dataclasses.replace(self, train=t)

    def to_dict(self) -> dict[str, Any]:
        """The ``settings`` / ``search_settings`` / ``runtime`` sections of ``config.json``."""
        return {"settings": dataclasses.asdict(self.train),
                "search_settings": dataclasses.asdict(self.search),
                "runtime": dataclasses.asdict(self.runtime)}

    @classmethod
    def from_dict(cls, space: SearchSpace, doc: Mapping[str, Any],
                  where: str = "config.json") -> "RunConfig":
        """Rebuild from :meth:`to_dict` output (a run's ``config.json``), validating it."""
        def table(key: str) -> Mapping[str, Any]:
            v = doc.get(key)
            if v is None:
                return {}
            if not isinstance(v, Mapping):
                raise CoqatError(f"{where}: '{key}' must be a JSON object (got"
                                 f" {type(v).__name__})")
            return v

        t = _construct_checked(TrainSettings, table("settings"), f"{where} settings")
        s = _construct_checked(SearchSettings, table("search_settings"),
                               f"{where} search_settings")
        rt = _construct_checked(Runtime, table("runtime"), f"{where} runtime")
        return cls(space, t.validate(f"{where} settings"), s.validate(f"{where} search"),
                   rt.validate(f"{where} runtime"))


def run_config_from_json(doc: Any, where: str = "config.json") -> RunConfig:
    """The RunConfig a run directory's ``config.json`` records (space, settings, runtime),
    validated; a damaged file is a one-line error naming it."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("space"), Mapping):
        raise CoqatError(f"{where} has no 'space' section; the run directory is damaged or"
                         " was not written by coqat")
    space_path = doc.get("space_path")
    space = parse_space(doc["space"], Path(space_path) if isinstance(space_path, str) else None)
    if "runtime" not in doc and isinstance(doc.get("options"), Mapping):
        # written before RunConfig: the runtime was part of the CLI-level 'options'
        opts = doc["options"]
        doc = {**doc, "runtime": {k: opts[k] for k in ("seed", "device", "data_dir", "out",
                                                      "name", "progress") if k in opts}}
    return RunConfig.from_dict(space, doc, where)


def _check_keys(cls: type, keys: Any, where: str) -> None:
    """Unknown keys of a settings dataclass: a one-line error listing the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(keys) - known)
    if unknown:
        raise CoqatError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed:"
                         f" {', '.join(sorted(known))}")


def _construct_checked(cls: type, values: Mapping[str, Any], where: str) -> Any:
    _check_keys(cls, values, where)
    return cls(**values)


def _replace_checked(obj: Any, changes: Mapping[str, Any] | None, where: str) -> Any:
    """``obj.replace(**changes)`` (None values = keep) after checking the keys."""
    changes = {k: v for k, v in dict(changes or {}).items() if v is not None}
    _check_keys(type(obj), changes, where)
    return obj.replace(**changes)


def bits_from_cli(text: str, quantizer: str) -> LayerBits | None:
    """``--bits`` values: wNaM or fp (returns LayerBits), or None for a path to a JSON file."""
    t = text.strip()
    if t.endswith(".json") or Path(t).is_file():
        return None
    return parse_bits(t, quantizer)


__all__ = ["BRANCH_FREE_SETTINGS", "CAGE_SCALES", "DEFAULT_SPACE", "FLOAT_BITS",
           "KERNEL_CHOICES", "OPTIMIZERS", "LayerRule",
           "ResolvedSpace", "RunConfig", "Runtime", "SearchSettings", "SearchSpace",
           "TrainSettings", "bits_from_cli", "find_space", "load_space",
           "parse_search_settings", "parse_space", "run_config_from_json", "space_for_workload",
           "spaces_dir"]
