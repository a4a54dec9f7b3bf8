"""The Workload contract: a model, its data and its metric, offline.

Every built-in workload (``lm``, ``fashion``, ``digits``) is one file that subclasses
``Workload`` and registers itself with ``@register``. The training loop, the search and the
reports only talk to this interface.

Data access is *step-indexed*: ``get_batch(split, step, ...)`` is a pure function of
(seed, split, step, rank), so a resumed run sees exactly the batches it would have seen,
and two DDP ranks see disjoint slices of one global batch, with no sampler state to save.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from coqat.errors import CoqatError

#: Splits every workload provides. ``holdout`` is carved out of the training data and is
#: never used for weight updates: the bit-width search trains its architecture
#: parameters on it. ``val`` is what metrics are reported on.
SPLITS = ("train", "holdout", "val")

_REGISTRY: dict[str, type["Workload"]] = {}


def register(cls: type["Workload"]) -> type["Workload"]:
    """Class decorator: make a workload available by its ``name``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute 'name'")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> Mapping[str, type["Workload"]]:
    return dict(_REGISTRY)


#: user workloads of this process: name ("user:NAME") -> constructor(spec, data_dir, seed).
#: Filled only by code the user runs in this invocation (the --model option, the Python API).
_USER: dict[str, Callable[..., "Workload"]] = {}


def register_user_workload(name: str, make: Callable[..., "Workload"]) -> None:
    _USER[name] = make


class Workload(ABC):
    """A model + offline data + metric.

    Subclasses set the class attributes and implement the abstract methods.
    ``spec`` is the ``[workload]`` table of the search-space TOML (already parsed).
    """

    name: ClassVar[str] = ""
    #: name of the headline metric in the dict returned by ``evaluate``
    metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = False
    #: keys accepted in ``spec`` (besides 'name'); anything else is an error
    spec_keys: ClassVar[tuple[str, ...]] = ()
    #: the model is built with pretrained weights (the pretrained tracks), not initialised
    pretrained: ClassVar[bool] = False

    def __init__(self, spec: Mapping[str, Any] | None = None, data_dir: str | None = None,
                 seed: int = 0):
        self.spec = dict(spec or {})
        self.data_dir = data_dir
        self.seed = int(seed)
        unknown = sorted(set(self.spec) - set(self.spec_keys) - {"name"})
        if unknown:
            allowed = ", ".join(self.spec_keys) or "(none)"
            raise CoqatError(
                f"workload '{self.name}' does not take {', '.join(unknown)}; allowed keys: {allowed}")

    # ----- model -------------------------------------------------------------------
    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh float model (deterministic given torch's current RNG state)."""

    @abstractmethod
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Inputs for one sample (batch 1), used to count MACs."""

    # ----- data ----------------------------------------------------------------------
    @abstractmethod
    def get_batch(self, split: str, step: int, batch_size: int, rank: int = 0,
                  world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step`` of ``split`` for this rank: its share (batch_size // world_size
        rows) of the global batch, on the CPU (the loop moves it). Deterministic in
        (self.seed, split, step, rank)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss (mean over the batch)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, max_batches: int | None = None,
                 batch_size: int = 64, split: str = "val") -> dict[str, float]:
        """Metrics on a fixed, deterministic pass over ``split``, run on the model's device;
        includes ``self.metric`` and ``loss``. ``max_batches`` caps the work (None: all)."""

    def tokens_per_sample(self) -> int:
        """Training tokens in one sample (sequence length for LMs, 1 for images): turns
        steps x batch into the token budget D of the QAT-fraction planner."""
        return 1

    def data_info(self) -> dict[str, Any]:
        """Provenance of the data (source, sizes, SHA-256); written into every run."""
        return {}


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, tuple/list or dict of them, nested) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_items(batch: Any) -> int:
    """Training items in a batch, for throughput: targets (tuple) or tokens (dict)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, Mapping):
        for key in ("labels", "input_ids"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key].numel()
        return 0
    if isinstance(batch, (list, tuple)) and batch:
        return batch_items(batch[-1])
    return 0


def get_workload(name: Any, spec: Mapping[str, Any] | None = None,
                 data_dir: str | None = None, seed: int = 0) -> Workload:
    """Instantiate a registered workload by name.

    Names come from data files (a space's ``[workload]``, a run's ``config.json``, a sweep's
    manifest), so they are looked up, never imported: a name can only pick a workload that
    is already registered in this process (the built-ins, or one the user's own code
    registered).
    """
    if isinstance(name, str) and name in _USER:
        return _USER[name](spec, data_dir, seed)
    if isinstance(name, str) and name.startswith("user:"):
        source = (spec or {}).get("source")
        how = f"--model {source}" if source else "the same model object (model=...)"
        raise CoqatError(f"this run used your own model {name[5:]!r}; coqat does not import it"
                         f" from the run's files: pass it again with {how}")
    if not isinstance(name, str) or name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        if isinstance(name, str) and ":" in name:
            raise CoqatError(f"workload {name!r} names code to import, and coqat never imports"
                             " what a data file names; pass your model on the command line"
                             " (--model file.py:factory) or register it from Python; known"
                             f" workloads: {known}")
        raise CoqatError(f"unknown workload {name!r}; known workloads: {known}")
    return _REGISTRY[name](spec, data_dir=data_dir, seed=seed)


def load_object(ref: str) -> Any:
    """Load ``path/to/file.py:name`` or ``package.module:name`` (a user model factory)."""
    import importlib
    import importlib.util
    import os

    if ":" not in ref:
        raise CoqatError(f"{ref!r} must look like path/to/file.py:factory or package.module:factory")
    target, attr = ref.rsplit(":", 1)
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise CoqatError(f"model file {target} does not exist")
        mod_name = "coqat_user_" + os.path.splitext(os.path.basename(target))[0]
        spec = importlib.util.spec_from_file_location(mod_name, target)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as e:  # the user's file failed to import: say so in one line
            raise CoqatError(f"importing {target} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise CoqatError(f"cannot import {target}: {e}") from None
    if not hasattr(module, attr):
        raise CoqatError(f"{target} has no attribute {attr!r}")
    return getattr(module, attr)


ModelFactory = Callable[[], nn.Module]
