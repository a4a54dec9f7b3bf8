"""The user's own model and data as a workload: the contract of ``--model file.py:factory``
and of the Python API's ``model=`` argument.

A user gives coqat a ``UserModel``: the network (a module, or a factory that builds one),
iterables of batches per split (a DataLoader, a list, anything that can be iterated more
than once), and optionally the loss and the metric::

    from coqat import UserModel

    def factory() -> UserModel:                     # in my_model.py
        return UserModel(model=MyNet(), train=train_loader, val=val_loader,
                         loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                         metric=lambda m, b: (m(b[0]).argmax(-1) == b[1]).float().mean(),
                         metric_name="val_acc", higher_is_better=True)

    coqat search --model my_model.py:factory --budget w4a4      # or from Python:
    coqat.search(model=factory(), budget="w4a4")

Batches are tuples/lists of tensors (``(inputs, targets)``) or dicts of tensors (Hugging Face
style). The batch size is the loader's. Without ``loss``, a tuple batch ``(x, y)`` is
trained with cross-entropy of ``model(x)`` against ``y`` (logits of any rank, classes last)
and a dict batch with ``model(**batch).loss``. Without ``metric`` the reported metric is
the mean validation loss (``val_loss``, lower is better); with one, it is the mean of
``metric(model, batch)`` over the validation batches.

Trust: the object lives in this process only. A run made with it records the file it came
from and the file's SHA-256; resuming or exporting that run needs the same file passed again
(``--model``), never a path read from the run directory.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from coqat.errors import CoqatError
from coqat.workloads.base import (SPLITS, Workload, batch_items, load_object,
                                  register_user_workload, to_device)

__all__ = ["UserModel", "UserWorkload", "load_user_model", "use_user_model", "USER_PREFIX",
           "to_device", "batch_items"]

USER_PREFIX = "user:"


@dataclass
class UserModel:
    """A model and its data, as a user hands them to coqat (see the module docstring)."""

    model: nn.Module | Callable[[], nn.Module]
    train: Iterable[Any]
    val: Iterable[Any]
    #: batches for the bit-width search's architecture steps (default: the train batches)
    holdout: Iterable[Any] | None = None
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None
    metric: Callable[[nn.Module, Any], Any] | None = None
    metric_name: str | None = None          # default: val_loss, or val_metric with a metric
    higher_is_better: bool | None = None    # default: False for the loss, True for a metric
    #: the model's positional inputs of a batch (for counting MACs and for the default
    #: loss); default: ``(batch[0],)`` for tuples, ``(batch["input_ids"],)`` for dicts
    inputs: Callable[[Any], tuple] | None = None
    name: str = "user"
    tokens_per_sample: int = 1              # e.g. the sequence length of an LM
    #: where it came from (set by load_user_model): "file.py:factory" and the file's sha256
    source: str | None = None
    sha256: str | None = None
    info: dict[str, Any] = field(default_factory=dict)   # provenance of the data

    def __post_init__(self) -> None:
        if not (isinstance(self.model, nn.Module) or callable(self.model)):
            raise CoqatError("UserModel.model must be a torch.nn.Module or a function that"
                             " returns one")
        for split in ("train", "val"):
            if not _iterable(getattr(self, split)):
                raise CoqatError(f"UserModel.{split} must be an iterable of batches (a"
                                 " DataLoader, a list, ...)")
        if self.holdout is not None and not _iterable(self.holdout):
            raise CoqatError("UserModel.holdout must be an iterable of batches or None")
        if not isinstance(self.name, str) or not self.name.replace("-", "").replace(
                "_", "").isalnum():
            raise CoqatError(f"UserModel.name {self.name!r} must be letters, digits, '-' or"
                             " '_' (it names run directories)")
        if self.metric is not None and self.higher_is_better is None:
            self.higher_is_better = True
        if self.metric_name is None:
            self.metric_name = "val_metric" if self.metric is not None else "val_loss"
        if self.higher_is_better is None:
            self.higher_is_better = False

    @property
    def workload_name(self) -> str:
        return USER_PREFIX + self.name

    def build(self) -> nn.Module:
        """A fresh model: the factory's, or a deep copy of the given module (so every phase
        starts from the same weights)."""
        if isinstance(self.model, nn.Module):
            return copy.deepcopy(self.model)
        m = self.model()
        if not isinstance(m, nn.Module):
            raise CoqatError(f"UserModel.model() returned {type(m).__name__}, not a"
                             " torch.nn.Module")
        return m


def _iterable(x: Any) -> bool:
    try:
        iter(x)
    except TypeError:
        return False
    return not isinstance(x, (str, bytes, torch.Tensor))


def _default_inputs(batch: Any) -> tuple:
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise CoqatError("a dict batch needs 'input_ids' (or give UserModel.inputs)")
        return (batch["input_ids"],)
    if isinstance(batch, (list, tuple)) and batch:
        return (batch[0],)
    if isinstance(batch, torch.Tensor):
        return (batch,)
    raise CoqatError(f"cannot find the model's inputs in a {type(batch).__name__} batch; give"
                     " UserModel.inputs")


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping):
        out = model(**batch)
        loss = getattr(out, "loss", None)
        if loss is None:
            raise CoqatError("the model's output for a dict batch has no .loss (add 'labels' to"
                             " the batch or give UserModel.loss)")
        return loss
    if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
        raise CoqatError("without UserModel.loss, a batch must be (inputs, targets) or a dict")
    x, y = batch
    logits = model(x)
    logits = getattr(logits, "logits", logits)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


# ----- the workload ---------------------------------------------------------------------------------
class UserWorkload(Workload):
    """A ``UserModel`` behind the ``Workload`` interface the loop, search and reports use.

    ``get_batch(split, step)`` is the ``step``-th batch of the split (cycling through the
    iterable, re-iterating it when it ends; under DDP rank r takes every world_size-th
    batch). A loader that iterates in the same order each time gives a bit-exact resume.
    """

    spec_keys = ("source", "sha256")

    def __init__(self, user: UserModel, spec: Mapping[str, Any] | None = None,
                 data_dir: str | None = None, seed: int = 0):
        self.user = user
        self.name = user.workload_name
        self.metric = user.metric_name
        self.higher_is_better = bool(user.higher_is_better)
        super().__init__(spec, data_dir=data_dir, seed=seed)
        recorded = self.spec.get("sha256")
        if recorded and user.sha256 and recorded != user.sha256:
            raise CoqatError(f"this run was made with {self.spec.get('source')} at sha256"
                             f" {recorded[:12]}, but the file given now has sha256"
                             f" {user.sha256[:12]}; pass the same file the run used")
        self._cursors: dict[str, tuple[int, Iterator]] = {}

    def build_model(self) -> nn.Module:
        return self.user.build()

    def _split(self, split: str) -> Iterable[Any]:
        if split not in SPLITS:
            raise CoqatError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        data = getattr(self.user, split)
        return self.user.train if data is None else data

    def _nth(self, split: str, n: int) -> Any:
        pos, it = self._cursors.get(split, (None, None))
        if pos is None or pos > n:         # a fresh pass (first use, or a resume back in time)
            pos, it = 0, iter(self._split(split))
        while True:
            try:
                batch = next(it)
            except StopIteration:
                if pos == 0:
                    raise CoqatError(f"the {split} data of {self.user.name} has no batches")
                it = iter(self._split(split))   # next epoch
                continue
            if pos == n:
                self._cursors[split] = (pos + 1, it)
                return batch
            pos += 1

    def get_batch(self, split: str, step: int, batch_size: int, rank: int = 0,
                  world_size: int = 1) -> Any:
        return self._nth(split, step * world_size + rank)

    def example_inputs(self) -> tuple:
        batch = self._nth("train", 0)
        inputs = (self.user.inputs or _default_inputs)(batch)
        return tuple(_first_row(t) for t in inputs)

    def forward_inputs(self, batch: Any) -> tuple:
        return (self.user.inputs or _default_inputs)(batch)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return (self.user.loss or _default_loss)(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, max_batches: int | None = None,
                 batch_size: int = 64, split: str = "val") -> dict[str, float]:
        device = next(itertools.chain(model.parameters(), [torch.zeros(0)])).device
        was_training = model.training
        model.eval()
        losses, metrics = [], []
        try:
            batches = self._split(split)
            if max_batches is not None:
                batches = itertools.islice(batches, max_batches)
            for batch in batches:
                batch = to_device(batch, device)
                losses.append(float(self.loss(model, batch)))
                if self.user.metric is not None:
                    metrics.append(float(self.user.metric(model, batch)))
        finally:
            model.train(was_training)
        if not losses:
            raise CoqatError(f"the {split} data of {self.user.name} has no batches")
        out = {"loss": sum(losses) / len(losses), "batches": len(losses)}
        out[self.metric] = sum(metrics) / len(metrics) if metrics else out["loss"]
        if not math.isfinite(out[self.metric]):
            raise CoqatError(f"the {self.metric} of {self.user.name} is not finite")
        return out

    def tokens_per_sample(self) -> int:
        return int(self.user.tokens_per_sample)

    def data_info(self) -> dict[str, Any]:
        return {"dataset": f"user data of {self.user.name}", "source": self.user.source,
                **self.user.info}


def _first_row(t: Any) -> Any:
    return t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t


# ----- loading and registering ----------------------------------------------------------------------
def use_user_model(user: UserModel) -> str:
    """Make ``user`` available to this process's runs; returns its workload name."""
    register_user_workload(user.workload_name,
                           lambda spec, data_dir, seed: UserWorkload(user, spec, data_dir, seed))
    return user.workload_name


def load_user_model(ref: str) -> UserModel:
    """Import ``file.py:factory`` (the user named it in this invocation), call the factory and
    return its UserModel with its provenance (file and SHA-256) set."""
    target = ref.rsplit(":", 1)[0]
    sha = None
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise CoqatError(f"model file {target} does not exist; pass path/to/file.py:factory")
        with open(target, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
    factory = load_object(ref)
    if not callable(factory):
        raise CoqatError(f"{ref} is not a function; it must return a coqat.UserModel")
    try:
        got = factory()
    except CoqatError:
        raise
    except Exception as e:
        raise CoqatError(f"calling {ref} failed: {type(e).__name__}: {e}") from None
    if not isinstance(got, UserModel):
        raise CoqatError(f"{ref} returned {type(got).__name__}; it must return a"
                         " coqat.UserModel(model=..., train=..., val=...)")
    got.source, got.sha256 = ref, sha
    return got
