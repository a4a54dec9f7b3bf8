"""Built-in workloads. Importing this package registers them; adding one is one file."""

from coqat.workloads.base import (SPLITS, Workload, get_workload, load_object, register,
                                  registry)

# Built-ins register themselves on import. Keep this list in sync with the files here.
from coqat.workloads import lm, fashion, digits  # noqa: E402,F401

__all__ = ["SPLITS", "Workload", "get_workload", "load_object", "register", "registry"]
