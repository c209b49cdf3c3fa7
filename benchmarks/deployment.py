"""What every finished round of a run costs deployed: bytes, FLOPs and CPU latency.

:func:`account_run` goes over the finished rounds of one replicate of a run directory, exports
each (:func:`qsparse.export.export_round`, float32) and records per round (the fields of
:data:`qsparse.accounting.ROUND_FIELDS`):

* weights alive (kernel values, real components) and parameters alive (biases too), from the
  round's masks.npz;
* ``file_bytes``: the exported file's size on disk; ``kernel_bytes``: its kernels' payload;
  ``dense_file_bytes``: the size on disk of a dense float32 export of the same round: the same
  exporter with every weight kept (an all-ones mask, so every kernel is stored ``dense``),
  written, measured and deleted;
* ``flops_dense``: :func:`benchmarks.flops.forward_flops` of the model (per image);
  ``flops_sparse``: the surviving weights' multiply-adds x 2
  (:func:`qsparse.accounting.header_flops`, which must give ``flops_dense`` when counting every
  weight);
* latencies at each batch size (default 1 and 256) of the jit-compiled dense JAX model on the
  CPU (uint8 images in, normalisation included, ``block_until_ready``), of the runtime on the
  dense export (``numpy``: every layer a BLAS product, the best numpy path for dense weights)
  and of the runtime on the round's sparse export (``qsparse.deploy.load(file).predict``, the
  same uint8 images): untimed warm-up calls for at least :data:`SETTLE_S` seconds, then
  ``repeats`` timed calls; the median is
  ``latency_<jax|numpy|sparse>_b<batch>_s``, every timing is in ``timings_s``. The best dense
  path is the faster of ``jax`` and ``numpy``. One process, one run: the numbers describe this
  machine under its load then;
* the round's status and test accuracy, from its done.json. A finished round whose status is
  not ``ok`` (a non-finite loss: the replicate's last round) is not exported; it is listed in
  the record's ``skipped``.

Output, under the output folder: ``<run>/replicate_<r>/deployment.json`` (the record),
``deployment.md`` (its table) and ``round_<LL>.npz`` (the exported files), written to a
temporary folder first and renamed into place when complete.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import scipy

from benchmarks.flops import forward_flops
from benchmarks.harness import environment, load_average, timed
from qsparse import accounting, augment, deploy, export, files, rundir
from qsparse import masks as qmasks
from qsparse.data import DATASETS

BATCHES = (1, 256)
REPEATS = 7
SETTLE_S = 0.25
"""Seconds of untimed calls before each latency's timed ones. With one warm-up call, a sparse
LeNet-12 at batch 256 timed right after the JAX model took 16 ms in its first four calls and
0.1 ms after (the cores still held by XLA's threads, or numba's waking), in 33 of 1,110 series."""
DENSE_FILE = "float32, every weight kept: the same exporter with an all-ones mask, measured on disk"

Log = Callable[[str], None]


class AccountingError(ValueError):
    """Bad input (a run without finished rounds, an output that exists ...): the message names
    it."""


def target(out: str | os.PathLike, run_dir: str | os.PathLike, replicate: int = 0) -> Path:
    """The folder the record of ``run_dir``'s replicate goes to, under ``out``."""
    return Path(out) / Path(run_dir).name / f"replicate_{replicate}"


def check(
    run_dir: str | os.PathLike, out: str | os.PathLike, replicate: int = 0, overwrite: bool = False
) -> list[int]:
    """The finished rounds to account for; :class:`AccountingError` for bad input (nothing
    written): a run or replicate without finished rounds, an output folder that exists (without
    ``overwrite``) or cannot be written."""
    run = rundir.Run(Path(run_dir))
    try:
        export.find_round(run, replicate, None)
    except export.ExportError as e:
        raise AccountingError(str(e)) from None
    dest = target(out, run_dir, replicate)
    if dest.exists() and not dest.is_dir():
        raise AccountingError(f"cannot write {dest}: it is a file")
    if dest.exists() and not overwrite:
        raise AccountingError(f"{dest} exists; pass --overwrite to replace it")
    files.check_writable(dest, AccountingError, str(dest))
    return [rd.level for rd in run.replicate(replicate).rounds() if rd.done.exists()]


def _dense_jax(model, spec) -> Callable:
    """The JAX model from uint8 images to logits, jit-compiled (on the device of its params)."""

    @jax.jit
    def forward(params, images):
        return model.apply({"params": params}, augment.normalize(images, spec.mean, spec.std))

    return forward


def _dense_export(
    path: Path, model, params, spec, provenance: dict, images: dict[int, np.ndarray], repeats: int
) -> tuple[int, dict[str, list[float]]]:
    """Bytes on disk of a float32 export of ``params`` with every weight kept, and the runtime's
    timings on it at each batch (``latency_numpy_b<b>_s``); the file is deleted after."""
    entries = export.export_entries(
        model,
        params,
        qmasks.ones(params),
        input_shape=spec.image_shape,
        mean=spec.mean,
        std=spec.std,
        provenance=provenance,
        check_images=0,
    )
    try:
        size = deploy.save(path, entries)
        dense = deploy.load(path)
        timings = {
            accounting.latency_field("numpy", b): timed(
                lambda x=x: dense.predict(x, batch_size=len(x)), repeats, settle_s=SETTLE_S
            )
            for b, x in images.items()
        }
        return size, timings
    finally:
        path.unlink(missing_ok=True)


def account_round(
    run: rundir.Run,
    level: int,
    folder: Path,
    *,
    replicate: int,
    images: dict[int, np.ndarray],
    repeats: int,
    cache: dict,
) -> dict[str, Any]:
    """One round's row (see the module docstring); its export written to ``folder``."""
    rd = run.replicate(replicate).round(level)
    name = f"round_{level:02d}.npz"
    header = export.export_round(run.path, folder / name, replicate=replicate, round=level)
    config, model, params, masks, done = export.load_round(run, rd)
    spec = DATASETS[config.dataset]
    row: dict[str, Any] = {"round": level, "file": name}
    row.update({k: done[k] for k in accounting.ROUND_FIELDS if k in done})
    row["file_bytes"] = (folder / name).stat().st_size
    row["kernel_bytes"] = header["bytes"]["kernels"]
    row["dense_file_bytes"], timings = _dense_export(
        folder / f".dense_{name}", model, params, spec, header["provenance"], images, repeats
    )
    row.update(accounting.mask_counts(rundir.load_masks(rd)))
    if "flops_dense" not in cache:
        cache["flops_dense"] = forward_flops(model, params, spec.image_shape)
        cache["forward"] = _dense_jax(model, spec)
    flops = accounting.header_flops(header)
    if flops["dense"] != cache["flops_dense"]:
        raise RuntimeError(
            f"FLOPs counted from the export header ({flops['dense']}) differ from the model's "
            f"jaxpr ({cache['flops_dense']}): the sparse count cannot be trusted"
        )
    row["flops_dense"], row["flops_sparse"] = cache["flops_dense"], flops["sparse"]
    cpu = jax.devices("cpu")[0]
    on_cpu = jax.device_put(params, cpu)  # committed: the jit runs on the CPU
    forward = cache["forward"]
    sparse = deploy.load(folder / name)
    for b, x in images.items():
        timings[accounting.latency_field("jax", b)] = timed(
            lambda x=x: forward(on_cpu, x), repeats, settle_s=SETTLE_S
        )
        timings[accounting.latency_field("sparse", b)] = timed(
            lambda x=x: sparse.predict(x, batch_size=len(x)), repeats, settle_s=SETTLE_S
        )
    row.update({k: statistics.median(v) for k, v in timings.items()})
    row["timings_s"] = timings
    return row


def account_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    replicate: int = 0,
    repeats: int = REPEATS,
    batches: Sequence[int] = BATCHES,
    overwrite: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    """Account for every finished round of ``run_dir``'s replicate; write the record, its table
    and the exported files to :func:`target` (``out/<run>/replicate_<r>``); return the record.

    Raises :class:`AccountingError` for bad input, before anything is written, and
    :class:`qsparse.rundir.CorruptFileError` for a damaged run file.
    """
    if repeats < 1:
        raise AccountingError(f"repeats={repeats}: at least one timed call")
    if not batches or any(int(b) < 1 for b in batches):
        raise AccountingError(f"batches={list(batches)}: positive batch sizes")
    levels = check(run_dir, out, replicate, overwrite)
    run = rundir.Run(Path(run_dir))
    config = rundir.read_json(run.config)
    spec = DATASETS[config["dataset"]]
    rng = np.random.default_rng(0)
    images = {int(b): rng.integers(0, 256, (int(b), *spec.image_shape), np.uint8) for b in batches}
    with files.atomic_dir(target(out, run_dir, replicate)) as staging:
        machine = environment()
        rows, skipped = _account_rounds(run, levels, staging, replicate, images, repeats, log)
        machine.update(
            load_after=load_average(), numpy=np.__version__, scipy=scipy.__version__, device="cpu"
        )
        record = {
            "format": accounting.FORMAT,
            "version": accounting.VERSION,
            "run": run.path.name,
            "run_dir": str(run.path.absolute()),
            "replicate": replicate,
            "config": config,
            "batches": [int(b) for b in batches],
            "repeats": repeats,
            "dense_file": DENSE_FILE,
            "machine": machine,
            "qsparse_commit": rundir.provenance()["git_commit"],
            "rounds": rows,
            "skipped": skipped,
        }
        rundir.write_json(staging / accounting.FILE, record)
        table = accounting.markdown([accounting.read(staging / accounting.FILE)])
        rundir.write_text(staging / accounting.TABLE, table)
    return record


def _account_rounds(
    run: rundir.Run,
    levels: Sequence[int],
    folder: Path,
    replicate: int,
    images: dict[int, np.ndarray],
    repeats: int,
    log: Log,
) -> tuple[list[dict], list[dict]]:
    """(rows, skipped): :func:`account_round` of each round whose status is ``ok``; the others (a
    non-finite loss: the replicate's last round, nothing to deploy) with their status."""
    rows, skipped, cache = [], [], {}
    for level in levels:
        status = rundir.read_json(run.replicate(replicate).round(level).done).get("status")
        if status != "ok":
            skipped.append({"round": level, "status": status})
            log(f"{run.path.name} r{replicate} round {level}: skipped (status {status!r})")
            continue
        row = account_round(
            run, level, folder, replicate=replicate, images=images, repeats=repeats, cache=cache
        )
        rows.append(row)
        log(_line(run.path.name, replicate, row, [int(b) for b in images]))
    return rows, skipped


def _line(run: str, replicate: int, row: dict, batches: Sequence[int]) -> str:
    lat = ", ".join(
        f"b{b} {1e3 * row[accounting.latency_field('jax', b)]:.3g}/"
        f"{1e3 * row[accounting.latency_field('sparse', b)]:.3g} ms"
        for b in batches
    )
    return (
        f"{run} r{replicate} round {row['round']}: {row['weights_remaining_pct']:.2f}% left, "
        f"test_acc {row['test_acc']:.4f}, {row['file_bytes']:,} B "
        f"(dense {row['dense_file_bytes']:,} B), "
        f"{row['flops_sparse']:,}/{row['flops_dense']:,} FLOPs, JAX/sparse {lat}"
    )
