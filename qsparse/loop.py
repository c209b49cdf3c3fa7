"""The epoch loop: trainings run to their end, together, with checkpoints and resume.

What the protocols of :mod:`qsparse.lottery` ask for is a *job*: train this state to the end of
a round, logging to these files. :class:`Loop` trains the jobs of all replicates together, one
compiled epoch at a time, slot r of the trainer always holding replicate r, so what a replicate
computes does not depend on which others train beside it (slots without a job compute and are
ignored). Around each epoch it evaluates on the cadence asked for, appends the metrics log,
checkpoints (every epoch, or at most every ``checkpoint_every_secs``), stops a job whose loss or
weights become non-finite, and saves the rewind point from the middle of an epoch by splitting
it there (a split epoch computes what a whole one does).

A job resumes from its latest epoch checkpoint: epoch keys are ``fold_in(data_key, epoch)``, so a
resumed job computes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from qsparse import checkpoints as ckpt
from qsparse import rundir, summaries, train
from qsparse.progress import RunProgress, epoch_line

logger = logging.getLogger(__name__)

Data = tuple[Any, Any]  # (images, labels) as placed by Trainer.put_data


@dataclasses.dataclass
class Job:
    """One training a replicate's protocol asks for: a round's ticket, or the paper's search."""

    state: train.TrainState  # where it starts (its shapes restore its checkpoints)
    files: rundir.Training
    data_key: jax.Array
    level: int
    report: dict  # the masks' density report
    capture: Path | None  # where to save the rewind point, if this training holds it
    tag: str = "round"


@dataclasses.dataclass
class _Training:
    """A job being trained: epochs done, its last saved state, its metrics so far."""

    job: Job
    manager: ckpt.EpochCheckpoints
    epoch: int
    saved: train.TrainState
    history: list[dict]
    finished: bool
    board: summaries.Writer | None = None  # its TensorBoard events while it trains


@dataclasses.dataclass
class Loop:
    """Trains jobs to the end of their rounds: ``epochs`` epochs each, on ``train_data``, evaluated
    on every split of ``eval_data`` every ``eval_every`` epochs and after the last; the whole
    run's ``progress`` told of every epoch, if given."""

    trainer: train.Trainer
    train_data: Data
    eval_data: dict[str, Data]
    epochs: int
    eval_every: int = 1
    log_every: int = 1
    checkpoint_every_secs: float = 0.0
    rewind_step: int = 0  # the step whose weights a capturing job saves
    log: Callable[[str], None] = print
    progress: RunProgress | None = None

    def run(self, jobs: dict[int, Job]) -> dict[int, tuple[train.TrainState, list[dict]]]:
        """Train every job (at most one per replicate) to its end, together, each resuming from
        its own latest checkpoint; returns (final state, metrics history) per job."""
        trainings = {r: self._restore(r, job) for r, job in sorted(jobs.items())}
        live = {r: t for r, t in trainings.items() if not t.finished}
        if live:
            first = next(iter(live.values()))
            slots = range(self.trainer.replicates)  # a slot without a job computes, ignored
            state = train.stack([live.get(s, first).saved for s in slots])
            for t in live.values():
                t.board = summaries.Writer(t.job.files.path, t.epoch + 1)
            try:
                self._train(live, state)
            finally:
                for t in live.values():
                    t.board.close()
        return {r: (t.saved, t.history) for r, t in trainings.items()}

    def _train(self, live: dict[int, _Training], state) -> None:
        """The epochs of :meth:`run`, until every live job has finished."""
        last_save = time.monotonic()
        while live:
            t0 = time.perf_counter()
            state, metrics = self._epoch(state, live)
            rows = self._epoch_rows(live, state, metrics, time.perf_counter() - t0)
            self._evaluate_due(state, rows)
            self._record(live, rows)
            last_save = self._save_due(state, live, rows, last_save)
            self._retire(live, rows)

    def _restore(self, r: int, job: Job) -> _Training:
        """Where a job stands: its latest epoch checkpoint, or its start."""
        manager = ckpt.EpochCheckpoints(job.files.ckpt)
        restored = manager.restore_latest(job.state)
        if restored is None:
            return _Training(job, manager, 0, job.state, [], False)
        epoch, state, history = restored
        # the metrics log may be an epoch ahead of the checkpoint
        rundir.write_jsonl(job.files.metrics, history)
        self.log(f"replicate {r} {job.tag} {job.level}: resuming after epoch {epoch}")
        # a round that diverged ends at its last checkpoint
        finished = bool(history[-1].get("nonfinite")) or epoch == self.epochs
        return _Training(job, manager, epoch, state, history, finished)

    def _epoch(self, state, live: dict[int, _Training]):
        """One epoch of every slot; split at the rewind point when a job saves it now."""
        trainer, steps, data = self.trainer, self.trainer.spec.steps, self.train_data
        keys = train.stack(
            [
                jax.random.fold_in(live[s].job.data_key, live[s].epoch)
                if s in live
                else jax.random.key(0)
                for s in range(trainer.replicates)
            ]
        )
        captures = {r: t.job.capture for r, t in live.items() if self._captures(t)}
        if not captures:
            return trainer.train_epoch(state, *data, keys)
        split = self.rewind_step % steps
        state, m1 = trainer.train_epoch(state, *data, keys, 0, split)
        point = trainer.fetch(train.rewind_point(state.params, train.batch_stats(state)))
        for r, path in captures.items():
            ckpt.save_tree(path, train.slot(point, r))
        if split == 0:
            return trainer.train_epoch(state, *data, keys)
        state, m2 = trainer.train_epoch(state, *data, keys, split, steps)
        w1, w2 = split / steps, 1 - split / steps
        return state, {k: [w1 * a + w2 * b for a, b in zip(m1[k], m2[k])] for k in m1}

    def _captures(self, t: _Training) -> bool:
        """Whether this epoch of the job holds its rewind point, still to be saved."""
        steps, k, capture = self.trainer.spec.steps, self.rewind_step, t.job.capture
        return (
            capture is not None
            and t.epoch * steps <= k < (t.epoch + 1) * steps
            and not capture.exists()
        )

    def _epoch_rows(self, live: dict[int, _Training], state, metrics, seconds: float) -> dict:
        """Each live job's row of its metrics log for this epoch, marked if it became non-finite."""
        spec = self.trainer.spec
        params = self.trainer.fetch(state.params)
        rows = {}
        for r, t in live.items():
            row = {
                "epoch": t.epoch + 1,
                **train.slot(metrics, r),
                "seconds": seconds,
                "images_per_sec": spec.steps * spec.batch_size / seconds,
                "density_prunable": t.job.report["total"]["density_prunable"],
            }
            if not (math.isfinite(row["train_loss"]) and _all_finite(train.slot(params, r))):
                row["nonfinite"] = True
            rows[r] = row
        return rows

    def _evaluate_due(self, state, rows: dict[int, dict]) -> None:
        """Every split's metrics for the finite rows due (each ``eval_every`` epochs, the last)."""
        due = [
            r
            for r, row in rows.items()
            if "nonfinite" not in row
            and (row["epoch"] % self.eval_every == 0 or row["epoch"] == self.epochs)
        ]
        if not due:
            return
        for split, data in self.eval_data.items():
            result = self.trainer.evaluate(state, *data)
            for r in due:
                rows[r].update({f"{split}_{k}": v for k, v in train.slot(result, r).items()})

    def _record(self, live: dict[int, _Training], rows: dict[int, dict]) -> None:
        """Each row onto its job's metrics log and TensorBoard events, and (every ``log_every``
        epochs, or non-finite) into the log."""
        if self.progress is not None:
            self.progress.trained(len(live))
        for r, t in live.items():
            row = rows[r]
            t.history.append(row)
            rundir.write_jsonl(t.job.files.metrics, t.history)
            summaries.epoch(t.board, row)
            if row["epoch"] % self.log_every == 0 or "nonfinite" in row:
                line = epoch_line(r, t.job.tag, t.job.level, self.epochs, row)
                if self.progress is None:
                    self.log(line)
                else:
                    self.progress.log(line + self.progress.suffix(), self.log)
            ckpt.fault_point("epoch_end")

    def _save_due(self, state, live: dict[int, _Training], rows: dict, last_save: float) -> float:
        """Checkpoint the jobs due (``checkpoint_every_secs`` passed, their last epoch, or
        non-finite); returns when checkpoints were last saved."""
        now = time.monotonic()
        savers = [
            r
            for r, row in rows.items()
            if "nonfinite" in row
            or now - last_save >= self.checkpoint_every_secs
            or row["epoch"] == self.epochs
        ]
        if not savers:
            return last_save
        host = self.trainer.fetch(state)
        for r in savers:
            t = live[r]
            t.saved = train.slot(host, r)
            t.manager.save(rows[r]["epoch"], t.saved, t.history)
        return now

    def _retire(self, live: dict[int, _Training], rows: dict[int, dict]) -> None:
        """Count the epoch done; jobs at their end, or non-finite, leave the loop."""
        for r, t in list(live.items()):
            t.epoch += 1
            nonfinite = "nonfinite" in rows[r]
            if nonfinite:
                logger.warning(
                    "replicate %d %s %d: non-finite loss or weights in epoch %d; the round stops",
                    r,
                    t.job.tag,
                    t.job.level,
                    rows[r]["epoch"],
                )
            if nonfinite or t.epoch == self.epochs:
                del live[r]
                t.board.close()
                if self.progress is not None:
                    self.progress.finished(t.job.tag, self.epochs - t.epoch)


def _all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))
