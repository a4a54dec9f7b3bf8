"""Workloads: built-in models with their offline data, and the user's own (``UserModel``).

Importing this package registers the built-ins; adding one is one file.
"""

from coqat.workloads.base import (SPLITS, Workload, batch_items, get_workload, load_object,
                                  register, registry, to_device)

# Built-ins register themselves on import. Keep this list in sync with the files here.
from coqat.workloads import lm, fashion, digits  # noqa: E402,F401
# pretrained tracks (transformers is imported only when one is used)
from coqat.workloads import minilm, smollm2  # noqa: E402,F401
from coqat.workloads.user import UserModel, UserWorkload, load_user_model, use_user_model  # noqa: E402

__all__ = ["SPLITS", "UserModel", "UserWorkload", "Workload", "batch_items", "get_workload",
           "load_object", "load_user_model", "register", "registry", "to_device",
           "use_user_model"]
