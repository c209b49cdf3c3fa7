"""What every round of a run costs deployed: the ``deployment.json`` files, read and tabulated.

``python -m experiments.deployment`` (the measuring side, :mod:`benchmarks.deployment`) writes,
per run and replicate, ``<out>/<run>/replicate_<r>/deployment.json``: per finished round its
weights and parameters alive, the bytes of its exported file and of a dense float32 file, its
inference FLOPs (dense and sparse-effective) and the CPU latency of the dense JAX model, of the
numpy runtime on a dense export and on the sparse one. This module reads those files back with
numpy alone (no jax, no matplotlib), counts FLOPs from an export file's header, and writes the
Markdown table; :func:`qsparse.plots.deployment_figure` draws them.

FLOPs are 2 x multiply-adds of the dots and convolutions of one image's forward pass (biases,
ReLUs and pooling are not counted, as :func:`benchmarks.flops.forward_flops`). Dense: every
weight. Sparse-effective: only the surviving weights' multiply-adds; a surviving quaternion
component is 4 real multiply-adds (it appears 4 times in the real block matrix the layer
multiplies by), a convolution weight one per output position.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qsparse import ops, report, results, rundir

FILE = "deployment.json"
TABLE = "deployment.md"
FORMAT = "qsparse-deployment"
VERSION = 1
# Per-round fields every deployment.json row has (latencies: ``latency_<impl>_b<batch>_s``).
ROUND_FIELDS = (
    "round",
    "status",
    "density_prunable",
    "weights_remaining_pct",
    "weights_remaining_pct_of_real",
    "test_acc",
    "file",
    "file_bytes",
    "kernel_bytes",
    "dense_file_bytes",
    "weights_alive",
    "weights_total",
    "params_alive",
    "params_total",
    "flops_dense",
    "flops_sparse",
)
IMPLEMENTATIONS = {"jax": "dense JAX", "numpy": "dense numpy", "sparse": "sparse runtime"}
# The best dense path is the faster of these (records made before the numpy column: jax alone).
DENSE = ("jax", "numpy")

PathLike = str | os.PathLike


class DeploymentFileError(ValueError):
    """A deployment.json that cannot be read back; the message names it."""


def latency_field(impl: str, batch: int) -> str:
    """The row field of the median latency (seconds) of ``impl`` (jax | numpy | sparse) at
    ``batch``."""
    return f"latency_{impl}_b{batch}_s"


# -- counting ------------------------------------------------------------------------------------


def mask_counts(masks: dict[str, np.ndarray]) -> dict[str, int]:
    """Weights (kernel values, real components) and parameters (biases too) alive and in all."""
    kernels = [np.asarray(m, bool) for k, m in masks.items() if rundir.is_kernel(k)]
    every = [np.asarray(m, bool) for m in masks.values()]
    return {
        "weights_alive": int(sum(np.count_nonzero(m) for m in kernels)),
        "weights_total": int(sum(m.size for m in kernels)),
        "params_alive": int(sum(np.count_nonzero(m) for m in every)),
        "params_total": int(sum(m.size for m in every)),
    }


def header_flops(header: dict) -> dict[str, Any]:
    """Dense and sparse-effective FLOPs of one image through an export file's model.

    Walks the header's ``ops`` from its input shape: a convolution (SAME, stride 1) has
    H x W output positions, ``maxpool2x2`` halves H and W, ``flatten`` leaves one position. A
    layer's real matrix has ``prod(kernel_shape)`` entries (a component kernel's ``n
    prod(kernel_shape)``: in an n-dimensional algebra each stored value feeds n outputs), of which
    ``storage['alive']`` (times n) survive. Returns ``dense``, ``sparse`` and per layer
    ``layers``: name, positions, dense, sparse.
    """
    h, w, _ = header["input"]["shape"]
    layers, dense, sparse = [], 0, 0
    for entry in header["ops"]:
        op = ops.from_json(entry)
        if isinstance(op, ops.MaxPool2x2):
            h, w = h // 2, w // 2
        elif isinstance(op, ops.Flatten):
            h = w = 1
        elif isinstance(op, ops.Dense | ops.Conv):
            if isinstance(op, ops.Conv) and op.strides != (1, 1):
                raise ValueError(f"layer {op.name}: only stride 1 is counted")
            positions = h * w if isinstance(op, ops.Conv) else 1
            copies = 1 if op.kind == "real" else entry["kernel_shape"][0]
            total = copies * math.prod(entry["kernel_shape"])
            alive = copies * int(entry["storage"]["alive"])
            layer = {"name": op.name, "positions": positions}
            layer.update(dense=2 * positions * total, sparse=2 * positions * alive)
            layers.append(layer)
            dense += layer["dense"]
            sparse += layer["sparse"]
    return {"dense": dense, "sparse": sparse, "layers": layers}


# -- reading deployment.json files -----------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Deployment:
    """One deployment.json: a run's replicate, per finished round what it costs deployed.

    ``config`` holds the run's curve fields (as :class:`qsparse.results.Curve`), so
    :func:`qsparse.results.labels` and :func:`qsparse.results.by_pair` work on deployments.
    """

    path: Path
    record: dict[str, Any]
    config: dict[str, Any]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.record["rounds"]

    @property
    def run(self) -> str:
        return self.record["run"]

    @property
    def replicate(self) -> int:
        return self.record["replicate"]

    @property
    def model(self) -> str:
        return self.config["model"]

    @property
    def dataset(self) -> str:
        return self.config["dataset"]

    @property
    def algebra(self) -> str:
        return self.config["algebra"]

    @property
    def batches(self) -> list[int]:
        return list(self.record["batches"])

    def column(self, field: str) -> np.ndarray:
        """One field over the rounds, as floats (NaN where a row lacks it)."""
        return np.array([float(r.get(field, math.nan)) for r in self.rows], dtype=float)


def find_files(paths: Iterable[PathLike]) -> list[Path]:
    """deployment.json files among ``paths``: each is such a file or a folder holding them at
    any depth. FileNotFoundError naming a path that is neither or holds none."""
    found: list[Path] = []
    for top in map(Path, paths):
        if top.is_file():
            found.append(top)
            continue
        if not top.is_dir():
            raise FileNotFoundError(f"{top} is not a directory or a {FILE} file")
        files = sorted(top.rglob(FILE))
        if not files:
            raise FileNotFoundError(f"no {FILE} under {top} (python -m experiments.deployment)")
        found += files
    return list(dict.fromkeys(found))


def read(path: PathLike) -> Deployment:
    """One deployment.json, checked; :class:`DeploymentFileError` naming it otherwise."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DeploymentFileError(f"cannot read {path}: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DeploymentFileError(f"{path} is not a {FILE} (format {FORMAT!r})")
    if record.get("version") != VERSION:
        raise DeploymentFileError(f"{path} has version {record.get('version')!r}, not {VERSION}")
    rounds, config = record.get("rounds"), record.get("config")
    if not isinstance(rounds, list) or not isinstance(config, dict):
        raise DeploymentFileError(f"{path} lacks its rounds or config")
    for row in rounds:
        missing = set(ROUND_FIELDS) - set(row) if isinstance(row, dict) else ROUND_FIELDS
        if missing:
            raise DeploymentFileError(f"{path}: a round lacks {sorted(missing)}")
    return Deployment(path=path, record=record, config=results.curve_config(config))


def load(paths: Iterable[PathLike]) -> list[Deployment]:
    """Every deployment.json under ``paths``, ordered as :func:`qsparse.results.aggregate`
    orders curves (:func:`qsparse.results.order`: model, dataset, algebra, config), then run and
    replicate."""
    deployments = [read(p) for p in find_files(paths)]
    return sorted(deployments, key=lambda d: (*results.order(d), d.run, d.replicate))


def labels(deployments: Sequence[Deployment]) -> list[str]:
    """:func:`qsparse.results.labels` ('R', 'Q (grouping=quaternion)', ...); deployments of
    the same curve (replicates, seeds) get their run and replicate appended."""
    names = results.labels(deployments)  # duck-typed: .config and .algebra
    return [
        f"{n} [{d.run} r{d.replicate}]" if names.count(n) > 1 else n
        for n, d in zip(names, deployments)
    ]


@dataclasses.dataclass(frozen=True)
class Pooled:
    """One curve's replicates pooled, per round every replicate finished: the mean of ``x`` and
    of the test accuracy (%), and the accuracy's range (``low``, ``high``) over replicates."""

    label: str
    algebra: str
    replicates: int
    x: np.ndarray
    acc: np.ndarray
    low: np.ndarray
    high: np.ndarray


def pool(deployments: Sequence[Deployment], field: str) -> list[Pooled]:
    """The deployments of each curve (:func:`qsparse.results.labels`: replicates and runs of one
    configuration) as one :class:`Pooled` over ``field`` (a round field: ``file_bytes``, a
    latency). Only rounds that every replicate finished count: a round that some replicates
    never reached would average its survivors alone."""
    groups: dict[str, list[Deployment]] = {}
    for name, d in zip(results.labels(deployments), deployments):
        groups.setdefault(name, []).append(d)
    pooled = []
    for name, group in groups.items():
        rounds = set.intersection(*({int(r) for r in d.column("round")} for d in group))
        levels = sorted(rounds)
        xs, accs = [], []
        for d in group:
            at = {int(r): i for i, r in enumerate(d.column("round"))}
            keep = [at[level] for level in levels]
            xs.append(d.column(field)[keep])
            accs.append(100 * d.column("test_acc")[keep])
        x, acc = np.array(xs).reshape(len(group), -1), np.array(accs).reshape(len(group), -1)
        low, high = acc.min(0), acc.max(0)
        pooled.append(Pooled(name, group[0].algebra, len(group), x.mean(0), acc.mean(0), low, high))
    return pooled


# -- the table ----------------------------------------------------------------------------------


def _int(v: float) -> str:
    return f"{int(v):,}"


def _ms(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{1e3 * v:.3g}"


def _describe(name: str, d: Deployment) -> str:
    line = (
        f"- **{name}**: {d.run} replicate {d.replicate}, {d.record['repeats']} timed repeats, "
        f"{d.record.get('machine', {}).get('cpu', '?')}"
    )
    skipped = d.record.get("skipped") or []
    if skipped:
        line += "; not exported: " + ", ".join(
            f"round {s['round']} (status {s['status']})" for s in skipped
        )
    return line


def markdown(deployments: Sequence[Deployment]) -> str:
    """One table per (model, dataset): per curve and round, accuracy, weights, bytes, FLOPs and
    latencies (milliseconds, median of the file's repeats)."""
    parts = [
        "# Deployment: every round's size, FLOPs and CPU latency",
        "Per finished round: test accuracy (from the round's done.json), kernel weights alive "
        "(real components), parameters alive (biases included), the exported float32 file's "
        "bytes on disk and those of a dense float32 export of the same round (every weight kept), "
        "FLOPs per image (2 x multiply-adds; sparse: surviving weights only), and the median "
        "latency of one call at batch b of the jit-compiled dense JAX model, of the runtime "
        "(`qsparse.deploy`) on the dense export (numpy: every layer a BLAS product; — in records "
        "made before it was timed) and on the sparse export, in ms, on the CPU named below.",
    ]
    for (model, dataset), group in results.by_pair(deployments).items():
        names = labels(group)
        batches = sorted({b for d in group for b in d.batches})
        parts.append(f"## {model} / {dataset}")
        parts.append("\n".join(_describe(name, d) for name, d in zip(names, group)))
        header = [
            "curve",
            "round",
            "% left",
            "test acc",
            "weights alive",
            "params alive",
            "file B",
            "dense file B",
            "FLOPs dense",
            "FLOPs sparse",
        ]
        for b in batches:
            header += [f"JAX b{b} ms", f"numpy b{b} ms", f"sparse b{b} ms"]
        rows = []
        for name, d in zip(names, group):
            for r in d.rows:
                row = [
                    name,
                    r["round"],
                    f"{r['weights_remaining_pct']:.2f}",
                    f"{100 * r['test_acc']:.2f}",
                    _int(r["weights_alive"]),
                    _int(r["params_alive"]),
                    _int(r["file_bytes"]),
                    _int(r["dense_file_bytes"]),
                    _int(r["flops_dense"]),
                    _int(r["flops_sparse"]),
                ]
                for b in batches:
                    row += [
                        _ms(float(r.get(latency_field(i, b), math.nan))) for i in IMPLEMENTATIONS
                    ]
                rows.append(row)
        parts.append(report.markdown_table(header, rows))
        parts.append(
            f"Within 1 and 5 pp of dense accuracy (replicates pooled round by round): the smallest "
            f"file and the lowest batch-{min(batches)} latency of the sparse runtime."
        )
        parts.append(best_within_markdown(best_within(group, batch=min(batches)), min(batches)))
    return "\n\n".join(parts) + "\n"


# -- the answer: how small and how fast, at a given accuracy --------------------------------------


def best_dense(deployments: Sequence[Deployment], level: int, batch: int) -> float:
    """The best dense path's latency at ``batch`` on round ``level``: the faster of the dense
    implementations (:data:`DENSE`) each record timed, each the mean over ``deployments``."""
    rows = [r for d in deployments for r in d.rows if r["round"] == level]
    fields = [latency_field(impl, batch) for impl in DENSE]
    return min(float(np.mean([r[f] for r in rows])) for f in fields if all(f in r for r in rows))


def best_within(
    deployments: Sequence[Deployment], points: Sequence[float] = (1.0, 5.0), batch: int = 1
) -> list[dict[str, Any]]:
    """Per curve and per ``points`` (percentage points of test accuracy below its dense round 0):
    the round with the smallest file and the round with the lowest sparse-runtime latency at
    ``batch`` among the rounds whose accuracy is within that many points of dense.

    A curve's replicates are pooled round by round (means; rounds every replicate finished),
    as the accuracy curves of :mod:`qsparse.results` are.
    """
    names = results.labels(deployments)
    curves: dict[str, list[Deployment]] = {}
    for name, d in zip(names, deployments):
        curves.setdefault(name, []).append(d)
    sparse = latency_field("sparse", batch)
    out = []
    for name, group in curves.items():
        rounds = sorted(set.intersection(*({r["round"] for r in d.rows} for d in group)))

        def mean(field: str, level: int, group=group) -> float:
            values = [float(r[field]) for d in group for r in d.rows if r["round"] == level]
            return float(np.mean(values))

        table = {
            level: {
                "round": level,
                "test_acc": 100 * mean("test_acc", level),
                "weights_remaining_pct_of_real": mean("weights_remaining_pct_of_real", level),
                "file_bytes": mean("file_bytes", level),
                sparse: mean(sparse, level),
            }
            for level in rounds
        }
        dense = table[rounds[0]]
        for pp in points:
            ok = [t for t in table.values() if t["test_acc"] >= dense["test_acc"] - pp]
            out.append(
                {
                    "curve": name,
                    "model": group[0].model,
                    "dataset": group[0].dataset,
                    "replicates": len(group),
                    "within_pp": pp,
                    "dense": dense,
                    "dense_file_bytes": mean("dense_file_bytes", rounds[0]),
                    "best_dense_latency_s": best_dense(group, rounds[0], batch),
                    "smallest": min(ok, key=lambda t: t["file_bytes"]),
                    "fastest": min(ok, key=lambda t: t[sparse]),
                }
            )
    return out


def best_within_markdown(best: Sequence[dict[str, Any]], batch: int = 1) -> str:
    """:func:`best_within` as one table."""
    header = [
        "curve",
        "within",
        "dense acc",
        "smallest file: round",
        "% of R",
        "acc",
        "bytes",
        "x dense file",
        "fastest: round",
        "acc",
        f"sparse b{batch} ms",
        f"best dense b{batch} ms",
    ]
    sparse = latency_field("sparse", batch)
    rows = []
    for b in best:
        s, f = b["smallest"], b["fastest"]
        rows.append(
            [
                f"{b['curve']} ({b['model']}, n={b['replicates']})",
                f"{b['within_pp']:g} pp",
                f"{b['dense']['test_acc']:.2f}",
                s["round"],
                f"{s['weights_remaining_pct_of_real']:.2f}",
                f"{s['test_acc']:.2f}",
                _int(s["file_bytes"]),
                f"{b['dense_file_bytes'] / s['file_bytes']:.1f}",
                f["round"],
                f"{f['test_acc']:.2f}",
                _ms(f[sparse]),
                _ms(b["best_dense_latency_s"]),
            ]
        )
    return report.markdown_table(header, rows)
