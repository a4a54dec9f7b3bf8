"""coqat: mixed-precision quantization-aware training under a BOPs budget.

The library is organised as DESIGN.md describes:

- ``coqat.config``     search-space TOML files and run configuration
- ``coqat.bitconfig``  the per-layer bit decision (JSON schema ``coqat.bitconfig/v1``)
- ``coqat.quant``      QuEST / RTN quantizers and quantized modules
- ``coqat.cost``       MACs (fvcore) and BOPs, budgets
- ``coqat.workloads``  built-in models and offline datasets
- ``coqat.train``      the one training loop, checkpoints, run directories
- ``coqat.optim``      CAGE and learning-rate / phase schedules
- ``coqat.search``     Gumbel-softmax bit-width search under a Lagrangian budget
- ``coqat.kernels``    fused low-bit kernels (Triton) and their torch reference
- ``coqat.report``     Pareto fronts, terminal and HTML reports
- ``coqat.export``     ONNX / compressed-tensors / torchao / JSON adapters
"""

__version__ = "0.1.0"

from coqat.errors import CoqatError  # noqa: E402

__all__ = ["CoqatError", "__version__"]
