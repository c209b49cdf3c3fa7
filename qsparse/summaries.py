"""TensorBoard event files of a run, beside its JSON files; ``tensorboard --logdir runs``.

* every training (a round's ticket; protocol 'paper''s search), in its folder beside
  metrics.jsonl: per epoch the losses and accuracies, images/s and the prunable density;
* every replicate, in ``replicate_<r>/``: per round the density of each prunable layer and the
  round's final accuracies and weights remaining, i.e. the IMP curve against the round;
* the run, in its directory: the resolved config as TensorBoard hparams (and as text).

Written by process 0 only (:func:`qsparse.rundir.is_writer`); the JSON files stay the record
that qsparse reads back, the event files are for looking.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams as hparams_summary

from qsparse import files, rundir

SKIPPED = ("epoch", "seconds", "nonfinite")  # a row's fields that are not curves
_files = itertools.count()


def _writer(logdir: Path, purge_step: int | None = None) -> SummaryWriter:
    """tensorboardX names files by the second and host only, and opens them with 'wb': the pid
    and a counter keep two writers of one folder (a resumed run, the config) apart."""
    suffix = f".{os.getpid()}.{next(_files)}"
    return SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=30, filename_suffix=suffix)


class Writer:
    """An event file in ``logdir``; on processes other than 0 every call does nothing.

    ``purge_step``: a resumed training's first epoch; TensorBoard drops events logged at or after
    it by the interrupted run, so a resumed curve has each epoch once.
    """

    def __init__(self, logdir: Path, purge_step: int | None = None):
        self._writer = None
        self._logdir = logdir
        if rundir.is_writer():
            try:
                self._writer = _writer(logdir, purge_step)
            except OSError as e:
                raise files.WriteError.at(e.filename or logdir, e) from e

    def scalars(self, values: dict[str, Any], step: int) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if number and math.isfinite(value):  # NaN: no validation split, or not evaluated
                self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flush and close the event file; a write the system refuses raises WriteError naming
        its folder, unless an error is already on its way up (closed in a ``finally``): that one
        came first and is the one to report."""
        if self._writer is None:
            return
        pending = sys.exc_info()[1]
        writer, self._writer = self._writer, None
        try:
            writer.close()
        except OSError as e:
            if pending is None:
                raise files.WriteError.at(self._logdir, e) from e


def epoch(writer: Writer, row: dict) -> None:
    """One metrics.jsonl row: ``train_loss`` as ``train/loss``, ``images_per_sec`` as is."""
    values = {}
    for key, value in row.items():
        if key in SKIPPED:
            continue
        split, _, name = key.partition("_")
        values[f"{split}/{name}" if split in ("train", "test", "val") else key] = value
    writer.scalars(values, row["epoch"])


def round_start(writer: Writer, level: int, report: dict) -> None:
    """A round's masks: each prunable layer's density (a density report of qsparse.masks)."""
    leaves = report["leaves"]
    values = {
        f"density/{name}": leaf["alive"] / leaf["total"]
        for name, leaf in leaves.items()
        if leaf["prunable"]
    }
    writer.scalars({**values, "density/prunable": report["total"]["density_prunable"]}, level)


def round_done(writer: Writer, level: int, done: dict) -> None:
    """A round's result (its done.json) against the round."""
    writer.scalars({f"round/{k}": v for k, v in done.items() if k != "status"}, level)


def config(run: rundir.Run, config_json: dict) -> None:
    """The resolved config as hparams (lists and None as text) and as a JSON text summary."""
    if not rundir.is_writer():
        return
    hparams = {
        k: v if isinstance(v, bool | int | float | str) else json.dumps(v)
        for k, v in config_json.items()
        if not (isinstance(v, float) and math.isnan(v))
    }
    try:
        with _writer(run.path) as writer:
            for summary in hparams_summary(hparams, {}):
                writer.file_writer.add_summary(summary)
            writer.add_text("config", f"```\n{json.dumps(config_json, indent=1)}\n```")
    except OSError as e:
        raise files.WriteError.at(run.path, e) from e
