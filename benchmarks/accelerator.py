"""Lottery tickets (Conv-4, ResNet-18) on an accelerator, through the library's IMP
(:mod:`qsparse.lottery`), each model with its own recipe.

Synthetic CIFAR-shaped data stand in for the model's dataset (CIFAR-10 or CIFAR-100; no dataset
to fetch), so the accuracy is chance;
what the table shows is the machine: per algebra and round, the density, the fastest epoch, the
train loss, how often the compiled epoch was traced (once per run: every round reuses it) and
whether round 0 trained a second time, in a fresh run directory, ends bit for bit the same (what
an exact resume relies on).
"""

from __future__ import annotations

import collections
import dataclasses
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds

from qsparse import files, lottery, models, rundir
from qsparse.config import Config
from qsparse.data import DATASETS
from qsparse.report import markdown_table

HEADER = (
    "algebra",
    "round",
    "density (%)",
    "fastest epoch (s)",
    "images/s",
    "train loss",
    "acc, {:,} train images",
    "epoch traces",
    "epoch repeatable",
)
_TRACE = "/jax/core/compile/jaxpr_trace_duration"


def synthetic_cifar(data_dir: Path, name: str, n_images: int, n_test: int) -> None:
    """Random images and labels of dataset ``name`` (``cifar10`` or ``cifar100``) as the dataset
    cache that :func:`qsparse.data.load` reads before any archive; the test split is the first
    ``n_test`` training images."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, *DATASETS[name].image_shape), dtype=np.uint8)
    labels = rng.integers(0, DATASETS[name].num_classes, n_images).astype(np.int32)
    arrays = dict(
        train_images=images,
        train_labels=labels,
        test_images=images[:n_test],
        test_labels=labels[:n_test],
    )
    cache = data_dir / name / f"{name}-{tfds.builder_cls(name).VERSION}.npz"
    files.atomic_write(cache, lambda f: np.savez(f, **arrays))


@contextmanager
def traces() -> Iterator[collections.Counter]:
    """Traces per program while the block runs, and each program's longest trace (seconds)."""
    counts: collections.Counter = collections.Counter()
    longest: dict[str, float] = {}

    def listen(event: str, seconds: float, **info) -> None:
        if event == _TRACE:
            name = info.get("fun_name", "?")
            counts[name] += 1
            longest[name] = max(longest.get(name, 0.0), seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts, longest
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def epoch_traces(counts: collections.Counter, longest: dict[str, float]) -> int:
    """Traces of the epoch program: the longest to trace (a whole epoch of steps)."""
    return counts[max(longest, key=longest.get)]


def final_arrays(rd: rundir.Round) -> list[np.ndarray]:
    with ocp.StandardCheckpointer() as reader:
        return jax.tree.leaves(reader.restore(rd.final.absolute()))


def imp_table(
    rounds: int,
    epochs: int,
    n_images: int,
    algebras: tuple[str, ...] = ("real", "quat"),
    model: str = "conv4",
) -> str:
    """IMP of ``model`` with its recipe (the paper's models: 20 % pruned globally per round,
    rewound to θ₀; the ResNets: their optimizer, schedule, batch norm and pruning) in each of
    ``algebras``, on ``n_images`` synthetic images of its dataset: the Markdown table."""
    n_test = min(n_images, 1000)
    dataset = models.spec(model).dataset
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_cifar(Path(tmp) / "data", dataset, n_images, n_test)
        for algebra in algebras:
            config = Config(
                model=model,
                algebra=algebra,
                dataset=dataset,
                rounds=rounds,
                epochs=epochs,
                data_dir=str(Path(tmp) / "data"),
                eval_batch=n_test,
            )
            with traces() as (counts, longest):
                run = rundir.Run(lottery.run(config, Path(tmp) / "runs", log=_quiet))
            again = rundir.Run(
                lottery.run(dataclasses.replace(config, rounds=0), Path(tmp) / "again", log=_quiet)
            )
            first, second = (final_arrays(r.replicate(0).round(0)) for r in (run, again))
            repeatable = all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
            rows += _rows(run, algebra, n_images, epoch_traces(counts, longest), repeatable)
    header = [h.format(n_test) for h in HEADER]
    return (
        f"{model} IMP on {n_images:,} synthetic {dataset}-shaped images, {epochs} epochs per round "
        f"(accuracy is chance: the labels are random):\n\n" + markdown_table(header, rows)
    )


def _rows(run: rundir.Run, algebra: str, n_images: int, traced: int, repeatable: bool) -> list:
    out = []
    for row in rundir.summary_rows(run):
        rd = run.replicate(row["replicate"]).round(row["round"])
        fastest = min(epoch["seconds"] for epoch in rundir.read_jsonl(rd.metrics))
        out.append(
            (
                algebra,
                row["round"],
                f"{100 * row['density_prunable']:.1f}",
                f"{fastest:.2f}",
                f"{n_images / fastest:,.0f}",
                f"{row['train_loss']:.3f}",
                f"{row['test_acc']:.3f}",
                traced,
                "yes" if repeatable else "**no**",
            )
        )
    return out


def _quiet(line: str) -> None:
    del line
