"""Every benchmark in one process, in a fixed order, into one result dict (the JSON written).

One process, so that every number is taken under the same conditions as the yardsticks beside
it: the matmul peak first, then the references, the models, whole epochs and replicates.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import convolutions, harness, references, tables, throughput
from qsparse import models as qmodels
from qsparse import train

MODELS = ("lenet300_100", "conv2", "conv4", "conv6")


class OptionError(ValueError):
    """An option that cannot run; the message, ``field=value: why``, names the valid choices."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What to measure; the fields are ``experiments.bench``'s flags (``references`` and
    ``xla_conv`` are the negations of ``--no_references`` and ``--no_xla_conv``)."""

    models: Sequence[str] = MODELS
    algebras: Sequence[str] = qmodels.PAPER_ALGEBRAS
    windows: int = 7  # timed windows per measurement (median)
    window_steps: int | None = None  # steps per window (None: throughput.WINDOW_STEPS)
    peak_size: int = 2048
    epochs: int = 3  # timed whole MNIST epochs per algebra (0: skip)
    train_subset: int | None = None  # MNIST training images (None: all 60,000)
    data_dir: str | None = None
    synthetic_epochs: bool = False  # random MNIST-shaped data instead of MNIST
    replicates: int = 5  # R for the replicate benchmark (0: skip)
    replicate_models: Sequence[str] = ("lenet300_100",)
    replicate_modes: Sequence[str] = ("auto",)
    references: bool = True  # the plain Flax Conv-4 / bare MLP yardsticks
    torch_python: str | None = None  # an interpreter with torch: PyTorch eager yardsticks too
    layers: bool = False  # each Conv-4 convolution, oneDNN against XLA
    xla_conv: bool = True  # with oneDNN, time the models with XLA's convolutions too

    def __post_init__(self) -> None:
        for name in ("models", "algebras", "replicate_models", "replicate_modes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _choose("models", self.models, sorted(throughput.WINDOW_STEPS))
        _choose("algebras", self.algebras, qmodels.algebra_names())
        _choose("replicate_models", self.replicate_models, sorted(qmodels.PAPER_MODELS))
        _choose("replicate_modes", self.replicate_modes, list(train.REPLICATE_MODES))
        _at_least("windows", self.windows, 1)
        _at_least("window_steps", self.window_steps, 1)
        _at_least("peak_size", self.peak_size, 1)
        _at_least("epochs", self.epochs, 0)
        _at_least("train_subset", self.train_subset, 60, "one batch of 60")
        _at_least("replicates", self.replicates, 0)
        if self.torch_python is not None and shutil.which(self.torch_python) is None:
            raise OptionError(f"torch_python={self.torch_python}: no such executable")


def _choose(name: str, values: Sequence[str], valid: list[str]) -> None:
    unknown = [v for v in values if v not in valid]
    if unknown:
        raise OptionError(f"{name}={','.join(values)}: unknown {unknown}; valid: {valid}")


def _at_least(name: str, value: int | None, low: int, what: str = "") -> None:
    if value is not None and value < low:
        because = f" ({what})" if what else ""
        raise OptionError(f"{name}={value}: must be at least {low}{because}")


def run(options: Options = Options(), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run what ``options`` asks, logging a line per measurement; the result as JSON-able dict.

    Raises :class:`benchmarks.references.TorchReferenceError` if ``options.torch_python``
    cannot run the PyTorch reference.
    """
    o = options
    result: dict[str, Any] = {"environment": harness.environment()}
    log(f"matmul peak ({o.peak_size}² float32)")
    result["peak"] = harness.matmul_peak(o.peak_size, 7)
    peak = result["peak"]["gflops"]
    log(f"  {peak:.0f} GFLOP/s")
    if o.references:
        log("references")
        result["references"] = references.bench_references(o.windows, log)
    torch = references.TorchReference(o.torch_python) if o.torch_python else None
    if torch:
        result["torch"] = torch.info
        log(f"PyTorch {torch.info['torch']} eager ({torch.info['threads']} threads), interleaved")
    if o.layers:
        log("Conv-4 convolutions")
        result["layers"] = convolutions.bench_layers(o.windows, log)
    log("masked train step, the model's batch size (median window)")
    result["models"] = {}
    try:
        for name in o.models:
            steps = o.window_steps or throughput.WINDOW_STEPS[name]
            result["models"][name] = throughput.bench_model(
                name, o.algebras, o.windows, steps, peak, log, o.xla_conv, torch
            )
    finally:
        if torch:
            torch.close()
    if o.epochs:
        log("whole MNIST epochs")
        result["epochs"] = throughput.bench_epochs(
            o.algebras, o.epochs, o.data_dir, o.train_subset, log, o.synthetic_epochs
        )
    if o.replicates:
        log("replicates")
        result["replicas"] = [
            throughput.bench_replicates(
                name,
                o.algebras,
                o.replicates,
                o.windows,
                o.window_steps or throughput.WINDOW_STEPS[name] // 2,
                log,
                mode,
            )
            for name in o.replicate_models
            for mode in o.replicate_modes
        ]
    result["environment"]["load_after"] = harness.load_average()
    return result


def save(
    result: dict[str, Any], json_path: str | None = None, markdown_path: str | None = None
) -> str:
    """The Markdown report of ``result``; also written, with the JSON, where paths are given."""
    table = tables.markdown(result)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(table)
    return table
