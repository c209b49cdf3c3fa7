"""Benchmarks: training throughput of qsparse's masked train step (``python -m experiments.bench``)
and what a pruned model costs deployed (``python -m experiments.deployment``).

Timings only mean something against a yardstick taken in the same process, so every run measures
the machine's own matmul peak and, optionally, plain Flax and PyTorch train steps beside
qsparse's. Modules:

* :mod:`benchmarks.flops`: analytic FLOPs of a model's forward pass, from its jaxpr.
* :mod:`benchmarks.harness`: timed windows of a compiled epoch, matmul peak, machine facts.
* :mod:`benchmarks.throughput`: masked train steps per model, whole epochs, replicates at once.
* :mod:`benchmarks.convolutions`: Conv-4's convolutions one by one, oneDNN against XLA.
* :mod:`benchmarks.references`: same-run yardsticks (plain Flax, PyTorch eager).
* :mod:`benchmarks.tables`: the Markdown report of a result.
* :mod:`benchmarks.suite`: :class:`Options` and :func:`run`, everything in one process.
* :mod:`benchmarks.deployment`: every round of a run exported, its bytes, FLOPs and latency.
* :mod:`benchmarks.accelerator`: Conv-4 lottery tickets through :mod:`qsparse.lottery` on
  synthetic data, for ``python -m experiments.accelerator_check`` on a GPU or TPU.
"""

from benchmarks.suite import OptionError, Options, run, save

__all__ = ["OptionError", "Options", "run", "save"]
