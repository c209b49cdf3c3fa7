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
import jax.numpy as jnp
import numpy as np

from qsparse import checkpoints as ckpt
from qsparse import rundir, summaries, train

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
class _Progress:
    """A job being trained: epochs done, its last saved state, its metrics so far."""

    manager: ckpt.EpochCheckpoints
    epoch: int
    saved: train.TrainState
    history: list[dict]
    finished: bool


@dataclasses.dataclass(frozen=True)
class Slots:
    """The replicates as slots of the trainer: one unstacked state for a single replicate (the
    lone-run program), a leading replica axis otherwise."""

    n: int

    def stack(self, trees: list):
        return trees[0] if self.n == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

    def part(self, tree, r: int):
        """Slot r of a stacked pytree or metric (a list per slot)."""
        if self.n == 1:
            return tree
        return tree[r] if isinstance(tree, list) else jax.tree.map(lambda x: x[r], tree)


class RunProgress:
    """How far a whole run is: rounds finished of all, time spent, an estimate of the time left.

    Counted in epochs of every training (rounds' tickets and protocol 'paper''s searches), the
    estimate from this invocation's pace. With a terminal on stderr, a tqdm bar over those epochs
    (log lines printed above it); otherwise plain ``| rounds 3/21 | 0:04:12 elapsed, ~0:15:30
    left`` after each epoch's line.
    """

    def __init__(
        self, rounds: int, trainings: int, epochs: int, done_rounds: int, done: int, bar: bool
    ):
        self.rounds, self.done_rounds, self.epochs = rounds, done_rounds, epochs
        self.total, self.done = trainings * epochs, done * epochs
        self.start, self.this_run = time.monotonic(), 0
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, unit="epoch", dynamic_ncols=True)

    def trained(self, epochs: int) -> None:
        self.done += epochs
        self.this_run += epochs
        if self.bar is not None:
            self.bar.update(epochs)

    def finished(self, tag: str, untrained: int) -> None:
        """A training ended; ``untrained``: its epochs that will never run (a non-finite stop)."""
        self.total -= untrained
        self.done_rounds += tag == "round"
        self._refresh()

    def dropped(self, rounds: int, trainings: int) -> None:
        """A replicate stopped early: these rounds (and trainings) will not run."""
        self.rounds -= rounds
        self.total -= trainings * self.epochs
        self._refresh()

    def suffix(self) -> str:
        elapsed = time.monotonic() - self.start
        left = (self.total - self.done) * elapsed / self.this_run if self.this_run else math.nan
        eta = f"~{_clock(left)} left" if math.isfinite(left) else "time left unknown"
        return f" | rounds {self.done_rounds}/{self.rounds} | {_clock(elapsed)} elapsed, {eta}"

    def log(self, line: str, log: Callable[[str], None]) -> None:
        if self.bar is None:
            log(line)
        else:
            self.bar.write(line)
            self.bar.set_postfix_str(f"rounds {self.done_rounds}/{self.rounds}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _refresh(self) -> None:
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.set_postfix_str(f"rounds {self.done_rounds}/{self.rounds}")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclasses.dataclass
class Loop:
    """Trains jobs to the end of their rounds: ``epochs`` epochs each, on ``train_data``, evaluated
    on every split of ``eval_data`` every ``eval_every`` epochs and after the last."""

    trainer: train.Trainer
    train_data: Data
    eval_data: dict[str, Data]
    epochs: int
    replicates: int
    eval_every: int = 1
    log_every: int = 1
    checkpoint_every_secs: float = 0.0
    rewind_step: int = 0  # the step whose weights a capturing job saves
    log: Callable[[str], None] = print
    run_progress: RunProgress | None = None  # how far the whole run is, for the log

    def run(self, jobs: dict[int, Job]) -> dict[int, tuple[train.TrainState, list[dict]]]:
        """Train every job (at most one per replicate) to its end, together, each resuming from
        its own latest checkpoint; returns (final state, metrics history) per job."""
        slots = Slots(self.replicates)
        progress = {r: self._restore(r, job) for r, job in sorted(jobs.items())}
        live = [r for r in sorted(jobs) if not progress[r].finished]
        if not live:
            return {r: (p.saved, p.history) for r, p in progress.items()}
        state = slots.stack([progress[s if s in live else live[0]].saved for s in range(slots.n)])
        boards = {r: summaries.Writer(jobs[r].files.path, progress[r].epoch + 1) for r in live}
        try:
            return self._train(jobs, progress, live, state, slots, boards)
        finally:
            for board in boards.values():
                board.close()

    def _train(self, jobs, progress, live, state, slots, boards):
        """The epochs of :meth:`run`, until every live job has finished."""
        trainer, spec, run_progress = self.trainer, self.trainer.spec, self.run_progress
        last_save = time.monotonic()
        while live:
            t0 = time.perf_counter()
            keys = [
                jax.random.fold_in(jobs[s].data_key, progress[s].epoch)
                if s in live
                else jax.random.key(0)
                for s in range(slots.n)
            ]
            captures = {
                r: jobs[r].capture
                for r in live
                if self._captures(jobs[r].capture, progress[r].epoch)
            }
            state, metrics = self._epoch(state, slots, slots.stack(keys), captures)
            seconds = time.perf_counter() - t0
            params = trainer.fetch(state.params)
            rows = {}
            for r in live:
                epoch = progress[r].epoch + 1
                row = {
                    "epoch": epoch,
                    **{k: slots.part(v, r) for k, v in metrics.items()},
                    "seconds": seconds,
                    "images_per_sec": spec.steps * spec.batch_size / seconds,
                    "density_prunable": jobs[r].report["total"]["density_prunable"],
                }
                if not (math.isfinite(row["train_loss"]) and _all_finite(slots.part(params, r))):
                    row["nonfinite"] = True
                rows[r] = row
            due = [
                r
                for r in live
                if "nonfinite" not in rows[r]
                and (rows[r]["epoch"] % self.eval_every == 0 or rows[r]["epoch"] == self.epochs)
            ]
            if due:
                for split, data in self.eval_data.items():
                    result = trainer.evaluate(state, *data)
                    for r in due:
                        rows[r].update(
                            {f"{split}_{k}": slots.part(v, r) for k, v in result.items()}
                        )
            if run_progress is not None:
                run_progress.trained(len(live))
            for r in live:
                job, p, row = jobs[r], progress[r], rows[r]
                p.history.append(row)
                rundir.write_jsonl(job.files.metrics, p.history)
                summaries.epoch(boards[r], row)
                if row["epoch"] % self.log_every == 0 or "nonfinite" in row:
                    line = _progress_line(r, job.tag, job.level, self.epochs, row)
                    if run_progress is None:
                        self.log(line)
                    else:
                        run_progress.log(line + run_progress.suffix(), self.log)
                ckpt.fault_point("epoch_end")
            now = time.monotonic()
            savers = [
                r
                for r in live
                if "nonfinite" in rows[r]
                or now - last_save >= self.checkpoint_every_secs
                or rows[r]["epoch"] == self.epochs
            ]
            if savers:
                host = trainer.fetch(state)
                for r in savers:
                    progress[r].saved = slots.part(host, r)
                    progress[r].manager.save(
                        rows[r]["epoch"], progress[r].saved, progress[r].history
                    )
                last_save = now
            for r in list(live):
                progress[r].epoch += 1
                if "nonfinite" in rows[r]:
                    logger.warning(
                        "replicate %d %s %d: non-finite loss or weights in epoch %d; "
                        "the round stops",
                        r,
                        jobs[r].tag,
                        jobs[r].level,
                        rows[r]["epoch"],
                    )
                if "nonfinite" in rows[r] or progress[r].epoch == self.epochs:
                    live.remove(r)
                    boards.pop(r).close()
                    if run_progress is not None:
                        run_progress.finished(jobs[r].tag, self.epochs - progress[r].epoch)
        return {r: (p.saved, p.history) for r, p in progress.items()}

    def _restore(self, r: int, job: Job) -> _Progress:
        """Where a job stands: its latest epoch checkpoint, or its start."""
        manager = ckpt.EpochCheckpoints(job.files.ckpt)
        restored = manager.restore_latest(job.state)
        if restored is None:
            return _Progress(manager, 0, job.state, [], False)
        epoch, state, history = restored
        rundir.write_jsonl(
            job.files.metrics, history
        )  # the copy may be an epoch ahead of the checkpoint
        self.log(f"replicate {r} {job.tag} {job.level}: resuming after epoch {epoch}")
        # a round that diverged ends at its last checkpoint
        return _Progress(
            manager,
            epoch,
            state,
            history,
            bool(history[-1].get("nonfinite")) or epoch == self.epochs,
        )

    def _captures(self, capture: Path | None, epoch: int) -> bool:
        """Whether this epoch of the job holds its rewind point, still to be saved."""
        steps, k = self.trainer.spec.steps, self.rewind_step
        return (
            capture is not None
            and epoch * steps <= k < (epoch + 1) * steps
            and not capture.exists()
        )

    def _epoch(self, state, slots: Slots, keys, captures: dict[int, Path]):
        """One epoch of every slot; split at the rewind point when a job saves it now."""
        trainer, steps = self.trainer, self.trainer.spec.steps
        if not captures:
            return trainer.train_epoch(state, *self.train_data, keys)
        split = self.rewind_step % steps
        state, m1 = trainer.train_epoch(state, *self.train_data, keys, 0, split)
        params = trainer.fetch(state.params)
        for r, path in captures.items():
            ckpt.save_tree(path, slots.part(params, r))
        if split == 0:
            return trainer.train_epoch(state, *self.train_data, keys)
        state, m2 = trainer.train_epoch(state, *self.train_data, keys, split, steps)
        w1, w2 = split / steps, 1 - split / steps
        return state, {name: _mix(w1, m1[name], w2, m2[name]) for name in m1}


def _mix(w1: float, a, w2: float, b):
    """``w1 * a + w2 * b`` for floats or per-slot lists of floats."""
    if isinstance(a, list):
        return [w1 * x + w2 * y for x, y in zip(a, b)]
    return w1 * a + w2 * b


def _progress_line(r: int, tag: str, level: int, epochs: int, row: dict) -> str:
    parts = [
        f"rep {r} {tag} {level:2d}",
        f"density {100 * row['density_prunable']:6.2f}%",
        f"epoch {row['epoch']:3d}/{epochs}",
        f"loss {row['train_loss']:.4f}",
        f"train {100 * row['train_acc']:.2f}%",
    ]
    if "test_acc" in row:
        parts.append(f"test {100 * row['test_acc']:.2f}%")
    if "val_acc" in row:
        parts.append(f"val {100 * row['val_acc']:.2f}%")
    parts.append(f"{row['images_per_sec']:,.0f} img/s")
    return " | ".join(parts)


def _all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))
