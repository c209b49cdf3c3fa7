"""The prune-rewind driver: rounds, rewind point, run directory, resume.

Protocols (paper.md §4, §8):

* ``lottery`` (default, Frankle & Carbin / open_lth): round 0 trains the dense model from θ₀
  and keeps the rewind point θ_k (k = 0 for ``rewind='init'``). Round L prunes the trained
  weights of round L-1 (``prune_fraction`` of what remains), resets the survivors to θ_k and
  retrains for the same duration. Optimizer state is fresh each round unless
  ``optimizer_state='carry'``.
* ``paper`` (what the paper's code did): masks come from a *search* trajectory that never
  rewinds: prune, then keep training the same weights with one optimizer carried across
  rounds. The reported accuracy of round L is a ticket trained from θ₀ with that mask. Unlike
  the paper's code, the tickets get their own optimizer (``optimizer_state`` applies).

Run directory (one per experiment; the name is readable plus a hash of the non-default config)::

    <run>/config.json                 resolved config; a different config here is refused
    <run>/runs.jsonl                  one line per invocation: versions, devices, git commit
    <run>/summary.json, summary.csv   one row per (replicate, round)
    <run>/replicate_<r>/init/         θ₀ (Orbax)          rewind/   θ_k when rewind != init
    <run>/replicate_<r>/round_<L>/    masks.npz, sparsity.json, metrics.jsonl, ckpt/epoch_<n>/
                                      (checkpoints with the metrics so far), final/ (trained
                                      state), search/ (protocol 'paper'), done.json (written last)

Replicates run in lockstep (:meth:`Experiment.replicates`): each one's protocol is a generator
that yields the trainings it needs, and the trainings of all replicates are trained together in
one compiled epoch, slot r always holding replicate r.

Every stage is skipped when its output exists, and an interrupted round continues from its
latest checkpoint: epoch keys are ``fold_in(data_key, epoch)``, so a resumed run computes
exactly what an uninterrupted one would. A damaged file is reported (a logging warning naming
it) and recomputed from the last good state: θ₀ from the seed, masks from the previous round,
a round's final/, done.json and metrics.jsonl from its epoch checkpoints, a damaged epoch
checkpoint from the one before. Only a damaged ``rewind/`` or ``config.json`` stops the run.
A round whose loss or weights become non-finite stops, with ``nonfinite: true`` in its metrics
and status 'nonfinite' in done.json and the summary; its replicate has no further rounds.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import logging
import math
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Generator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from qsparse import checkpoints as ckpt
from qsparse import data as qdata
from qsparse import masks as qmasks
from qsparse import models, pruning, train
from qsparse.cpu import onednn
from qsparse.config import ENCODINGS, Config, ConfigError, parse_rewind

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = (
    "replicate", "round", "status", "density_prunable", "weights_remaining_pct",
    "weights_remaining_pct_of_real", "test_acc", "val_acc", "train_acc", "train_loss", "epochs",
)
DONE_FIELDS = SUMMARY_FIELDS[2:]


def run(config: Config, workdir: str | os.PathLike, *, run_dir: str | os.PathLike | None = None,
        log: Callable[[str], None] = print) -> Path:
    """Run (or resume) an IMP experiment; returns its run directory."""
    config = config.resolve()
    if not ckpt.is_writer():
        log = _silent  # one voice per run: process 0's
    run_dir = Path(run_dir) if run_dir is not None else Path(workdir) / config.run_name()
    check_run_dir(run_dir, config)
    experiment = Experiment(config, run_dir, log)  # loads and validates everything; writes nothing
    with ckpt.RunLock(run_dir):
        check_run_dir(run_dir, config)  # again, now that no other process can write it
        ckpt.write_json(run_dir / "config.json", config.to_json())
        info = _record_invocation(run_dir)
        log(f"run: {run_dir} on {info['device_count']} {info['platform']} device(s)"
            + (f" in {info['process_count']} processes" if info["process_count"] > 1 else "")
            + (f", {info['cpu_conv']} convolutions" if info["cpu_conv"] else ""))
        experiment.replicates()
        rows = write_summary(run_dir)
    diverged = [f"replicate {row['replicate']} round {row['round']}" for row in rows if row["status"] != "ok"]
    log(f"done: {run_dir}" + (f" (non-finite loss in {', '.join(diverged)})" if diverged else ""))
    return run_dir


def check_run_dir(run_dir: Path, config: Config) -> None:
    """Refuse a directory that holds another experiment, before anything is written."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return
    try:
        old = Config.from_json(ckpt.read_json(path))
    except (TypeError, ValueError) as e:
        raise ckpt.CorruptFileError(f"{path} does not hold a config: {e}") from None
    if old.semantic() != config.semantic():
        diff = {k: (v, config.semantic()[k]) for k, v in old.semantic().items() if v != config.semantic()[k]}
        raise ConfigError(f"{run_dir} holds a run with a different config (stored vs requested: {diff}); "
                          "use another --workdir or run directory")


class Experiment:
    """Everything shared by the replicates and rounds of one run: data, model, compiled steps."""

    def __init__(self, config: Config, run_dir: Path, log: Callable[[str], None]):
        self.config, self.run_dir, self.log = config, run_dir, log
        try:
            self.dataset = _load_dataset(config)
            self.spec = train.epoch_spec(self.dataset, config.batch_size)
            self.slots = _Slots(config.replicates)
            self.trainer = train.Trainer(self.spec, eval_batch=config.eval_batch,
                                         replicas=None if config.replicates == 1 else config.replicates)
        except qdata.DatasetUnavailableError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.model = models.create(config.model, config.algebra, self.dataset.num_classes, **config.model_overrides())
        self.input_shape = self.dataset.train_images.shape[1:]
        self.param_shapes = self._param_shapes()
        self.tx = train.make_optimizer(config.optimizer, config.lr)
        d = self.dataset
        self.train_data = self.trainer.put_data(d.train_images, d.train_labels)
        self.val_data = self.trainer.put_data(d.val_images, d.val_labels)
        self.test_data = self.trainer.put_data(d.test_images, d.test_labels)
        self.rewind_step = self._rewind_step()
        real = models.create(config.model, "real", d.num_classes, **config.width_overrides())
        self.real_total = models.count_params(_shapes(real, self.input_shape))
        self.rule = qmasks.PruneRule(prune_output=config.prune_output)

    def _param_shapes(self):
        """The parameters' shapes; a ConfigError naming the fitting encodings if the input does not fit."""
        cfg = self.config
        try:
            return _shapes(self.model, self.input_shape)
        except (ValueError, TypeError) as e:
            message = (f"model {cfg.model} ({cfg.algebra}) cannot take {cfg.dataset} images of shape "
                       f"{self.input_shape}: {e}")
        if cfg.algebra == "quat":
            fitting = []
            for encoding in ENCODINGS:
                overrides = {**cfg.model_overrides(), "encoding": encoding}
                try:
                    _shapes(models.create(cfg.model, "quat", self.dataset.num_classes, **overrides), self.input_shape)
                    fitting.append(encoding)
                except (ValueError, TypeError):
                    pass
            message += f"; encodings that fit: {fitting}"
        raise ConfigError(message)

    def _rewind_step(self) -> int:
        rewind = parse_rewind(self.config.rewind)
        if rewind is None:
            return 0
        amount, unit = rewind
        step = amount * self.spec.steps if unit == "ep" else amount
        total = self.config.epochs * self.spec.steps
        if step >= total:
            raise ConfigError(f"rewind={self.config.rewind} is step {step}, not before the end of training ({total} steps)")
        return step

    # -- the replicates, in lockstep -------------------------------------------------------

    def replicates(self) -> None:
        """Every replicate's protocol (:meth:`_protocol`), in lockstep: the trainings they ask for
        next are trained together, in one compiled epoch (:meth:`_train_jobs`)."""
        protocols = {r: self._protocol(r) for r in range(self.config.replicates)}
        jobs: dict[int, _Job] = {}
        for r in protocols:
            _advance(protocols, jobs, r, None)
        while jobs:
            results = self._train_jobs(jobs)
            for r in sorted(results):
                _advance(protocols, jobs, r, results[r])

    def _protocol(self, r: int) -> Generator[_Job, tuple, None]:
        """Replicate r's rounds, top to bottom; each ``yield`` hands a training to the scheduler
        and receives its (final state, metrics history)."""
        cfg = self.config
        rdir = self.run_dir / f"replicate_{r}"
        init_key, data_key, control_key = replicate_keys(cfg.seed, r)
        theta0 = self._theta0(rdir / "init", init_key)
        masks = qmasks.ones(theta0)
        prev_state = prev_search = None
        low_rounds = 0
        for level in range(cfg.rounds + 1):
            rd = rdir / f"round_{level:02d}"
            source = prev_search if cfg.protocol == "paper" else prev_state
            try:
                masks = self._masks(rd, level, source, masks, jax.random.fold_in(control_key, level))
            except pruning.LayerCollapseError as e:
                self.log(f"replicate {r}: stopping before round {level}: {e}")
                ckpt.write_json(rdir / "stopped.json", {"round": level, "reason": str(e)})
                return
            start = self._start_params(rdir, theta0, masks, init_key, level)
            opt_state = prev_state.opt_state if (cfg.optimizer_state == "carry" and prev_state is not None) else None
            state, done = yield from self._round(rd, r, level, start, masks, data_key, opt_state, rdir)
            if cfg.protocol == "paper":
                prev_search = yield from self._search(rd, r, level, state, prev_search, masks, data_key)
            prev_state = state
            if done["status"] != "ok":
                logger.warning("replicate %d: round %d ended with status %r (non-finite loss or weights); "
                               "no further rounds", r, level, done["status"])
                return
            low_rounds = low_rounds + 1 if done["test_acc"] < cfg.stop_accuracy else 0
            if low_rounds >= 2:
                self.log(f"replicate {r}: test accuracy below {cfg.stop_accuracy} twice; stopping (as the paper)")
                return

    def _theta0(self, path: Path, key):
        """θ₀, read back or (again, if damaged) computed from the replicate's init key."""
        if path.exists():
            try:
                return ckpt.load_tree(path, self.param_shapes)
            except ckpt.CorruptFileError as e:
                logger.warning("%s; computing it again from the seed", e)
        theta0 = models.init_params(self.model, key, self.input_shape)
        ckpt.save_tree(path, theta0)
        return theta0

    def _masks(self, rd: Path, level: int, source, masks, key):
        """The round's masks, read back or (again, if damaged) pruned from the previous round."""
        path = rd / "masks.npz"
        if path.exists():
            try:
                return ckpt.load_masks(path, masks)
            except ckpt.CorruptFileError as e:
                logger.warning("%s; computing them again from the previous round", e)
        new = masks
        if level > 0:
            cfg = self.config
            new = pruning.prune(
                source.params, masks, cfg.prune_fraction, method=cfg.pruning, grouping=cfg.grouping,
                rule=self.rule, layer_fractions=dict(cfg.layer_fractions) or None,
            )
            if cfg.control == "shuffle":
                new = pruning.shuffle(key, new, within=masks, grouping=cfg.grouping, rule=self.rule)
        ckpt.save_masks(rd / "masks.npz", new)
        return new

    def _start_params(self, rdir: Path, theta0, masks, init_key, level: int):
        if self.config.control == "reinit" and level > 0:
            return models.init_params(self.model, jax.random.fold_in(init_key, level), self.input_shape)
        if self.rewind_step and level > 0:
            return ckpt.load_tree(rdir / "rewind", theta0)
        return theta0

    # -- one round -------------------------------------------------------------------

    def _round(self, rd: Path, r: int, level: int, params, masks, data_key, opt_state, rdir: Path):
        like = train.create_train_state(self.model, params, masks, self.tx)
        finished = self._finished(rd, like)
        if finished is not None:
            return finished
        if opt_state is not None:
            like = like.replace(opt_state=opt_state)
        report = qmasks.density_report(masks, self.rule)
        ckpt.write_json(rd / "sparsity.json", report)
        capture = rdir / "rewind" if (level == 0 and self.rewind_step) else None
        state, history = yield _Job(like, rd / "ckpt", rd / "metrics.jsonl", data_key, level, report, capture)
        ckpt.save_tree(rd / "final", state)
        done = self._done(history, report)
        ckpt.write_json(rd / "done.json", done)
        ckpt.fault_point("round_end")
        return state, done

    def _finished(self, rd: Path, like):
        """(final state, done.json) of a finished round, or None: not finished, or damaged (then it
        is finished again from its epoch checkpoints, which rewrites all three files)."""
        if not (rd / "done.json").exists():
            return None
        try:
            done = ckpt.read_json(rd / "done.json")
            if not isinstance(done, dict) or not set(DONE_FIELDS) <= set(done):
                raise ckpt.CorruptFileError(f"{rd / 'done.json'} lacks some of the fields {list(DONE_FIELDS)}")
            if len(ckpt.read_jsonl(rd / "metrics.jsonl")) != done["epochs"]:
                raise ckpt.CorruptFileError(f"{rd / 'metrics.jsonl'} does not hold the round's {done['epochs']} epochs")
            return ckpt.load_tree(rd / "final", like), done
        except ckpt.CorruptFileError as e:
            logger.warning("%s; finishing the round again from its checkpoints", e)
            return None

    def _search(self, rd: Path, r: int, level: int, ticket, prev_search, masks, data_key):
        """Protocol 'paper': continue the never-rewound trajectory with its carried optimizer."""
        if level == 0:
            return ticket  # the dense run is both the first ticket and the search's start
            yield  # a generator all the same
        out = rd / "search"
        like = train.create_train_state(self.model, prev_search.params, masks, self.tx)
        like = like.replace(opt_state=prev_search.opt_state)
        if (out / "final").exists():
            try:
                return ckpt.load_tree(out / "final", like)
            except ckpt.CorruptFileError as e:
                logger.warning("%s; finishing the search again from its checkpoints", e)
        report = qmasks.density_report(masks, self.rule)
        state, _ = yield _Job(like, out / "ckpt", out / "metrics.jsonl", data_key, level, report, None, "search")
        ckpt.save_tree(out / "final", state)
        return state

    def _train_jobs(self, jobs: dict[int, _Job]) -> dict[int, tuple]:
        """Train every job (at most one per replicate) to the end of its round, together: slot r
        of the compiled epoch always holds replicate r, so what a replicate computes does not
        depend on which others train beside it (slots without a job compute and are ignored).
        Each job resumes from its own latest checkpoint; returns (final state, history) per job."""
        cfg, spec, trainer, slots = self.config, self.spec, self.trainer, self.slots
        progress = {r: self._restore(r, job) for r, job in sorted(jobs.items())}
        live = [r for r in sorted(jobs) if not progress[r].finished]
        if not live:
            return {r: (p.saved, p.history) for r, p in progress.items()}
        state = slots.stack([progress[s if s in live else live[0]].saved for s in range(slots.n)])
        last_save = time.monotonic()
        while live:
            t0 = time.perf_counter()
            keys = [jax.random.fold_in(jobs[s].data_key, progress[s].epoch) if s in live else jax.random.key(0)
                    for s in range(slots.n)]
            captures = {r: jobs[r].capture for r in live if self._captures(jobs[r].capture, progress[r].epoch)}
            state, metrics = self._epoch(state, slots.stack(keys), captures)
            seconds = time.perf_counter() - t0
            params = trainer.fetch(state.params)
            rows = {}
            for r in live:
                epoch = progress[r].epoch + 1
                row = {"epoch": epoch, **{k: slots.part(v, r) for k, v in metrics.items()}, "seconds": seconds,
                       "images_per_sec": spec.steps * spec.batch_size / seconds,
                       "density_prunable": jobs[r].report["total"]["density_prunable"]}
                if not (math.isfinite(row["train_loss"]) and _all_finite(slots.part(params, r))):
                    row["nonfinite"] = True
                rows[r] = row
            due = [r for r in live if "nonfinite" not in rows[r]
                   and (rows[r]["epoch"] % cfg.eval_every == 0 or rows[r]["epoch"] == cfg.epochs)]
            if due:
                splits = {"test": self.test_data} | ({"val": self.val_data} if self.val_data[0].shape[0] else {})
                for split, data in splits.items():
                    result = trainer.evaluate(state, *data)
                    for r in due:
                        rows[r].update({f"{split}_{k}": slots.part(v, r) for k, v in result.items()})
            for r in live:
                job, p, row = jobs[r], progress[r], rows[r]
                p.history.append(row)
                ckpt.write_jsonl(job.metrics_path, p.history)
                if row["epoch"] % cfg.log_every == 0 or "nonfinite" in row:
                    self.log(_progress(r, job.tag, job.level, cfg.epochs, row))
                ckpt.fault_point("epoch_end")
            now = time.monotonic()
            savers = [r for r in live if "nonfinite" in rows[r] or now - last_save >= cfg.checkpoint_every_secs
                      or rows[r]["epoch"] == cfg.epochs]
            if savers:
                host = trainer.fetch(state)
                for r in savers:
                    progress[r].saved = slots.part(host, r)
                    progress[r].manager.save(rows[r]["epoch"], progress[r].saved, progress[r].history)
                last_save = now
            for r in list(live):
                progress[r].epoch += 1
                if "nonfinite" in rows[r]:
                    logger.warning("replicate %d %s %d: non-finite loss or weights in epoch %d; the round stops",
                                   r, jobs[r].tag, jobs[r].level, rows[r]["epoch"])
                if "nonfinite" in rows[r] or progress[r].epoch == cfg.epochs:
                    live.remove(r)
        return {r: (p.saved, p.history) for r, p in progress.items()}

    def _restore(self, r: int, job: _Job) -> _Progress:
        """Where a job stands: its latest epoch checkpoint, or its start."""
        manager = ckpt.EpochCheckpoints(job.ckpt_dir)
        restored = manager.restore_latest(job.state)
        if restored is None:
            return _Progress(manager, 0, job.state, [], False)
        epoch, state, history = restored
        ckpt.write_jsonl(job.metrics_path, history)  # the copy may be an epoch ahead of the checkpoint
        self.log(f"replicate {r} {job.tag} {job.level}: resuming after epoch {epoch}")
        # a round that diverged ends at its last checkpoint
        return _Progress(manager, epoch, state, history, bool(history[-1].get("nonfinite")) or epoch == self.config.epochs)

    def _captures(self, capture: Path | None, epoch: int) -> bool:
        """Whether this epoch of the job holds its rewind point, still to be saved."""
        steps, k = self.spec.steps, self.rewind_step
        return capture is not None and epoch * steps <= k < (epoch + 1) * steps and not capture.exists()

    def _epoch(self, state, keys, captures: dict[int, Path]):
        """One epoch of every slot; split at the rewind point when a job saves it now (a split epoch
        computes what a whole one does)."""
        trainer, steps = self.trainer, self.spec.steps
        if not captures:
            return trainer.train_epoch(state, *self.train_data, keys)
        split = self.rewind_step % steps
        state, m1 = trainer.train_epoch(state, *self.train_data, keys, 0, split)
        params = trainer.fetch(state.params)
        for r, path in captures.items():
            ckpt.save_tree(path, self.slots.part(params, r))
        if split == 0:
            return trainer.train_epoch(state, *self.train_data, keys)
        state, m2 = trainer.train_epoch(state, *self.train_data, keys, split, steps)
        w1, w2 = split / steps, 1 - split / steps
        return state, {name: _mix(w1, m1[name], w2, m2[name]) for name in m1}

    def _done(self, history: list[dict], report: dict) -> dict:
        last = history[-1]
        total = report["total"]
        own = total["all_alive"] / total["all_total"]
        return {
            "status": "nonfinite" if last.get("nonfinite") else "ok",
            "density_prunable": total["density_prunable"],
            "weights_remaining_pct": 100 * own,
            "weights_remaining_pct_of_real": 100 * total["all_alive"] / self.real_total,
            "test_acc": last.get("test_acc", float("nan")),
            "val_acc": last.get("val_acc", float("nan")),
            "train_acc": last["train_acc"],
            "train_loss": last["train_loss"],
            "epochs": len(history),
        }


@dataclasses.dataclass
class _Job:
    """One training a replicate's protocol asks for: a round's ticket, or the paper's search."""

    state: train.TrainState
    ckpt_dir: Path
    metrics_path: Path
    data_key: jax.Array
    level: int
    report: dict
    capture: Path | None
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
class _Slots:
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


def _advance(protocols: dict, jobs: dict, r: int, result) -> None:
    """Resume replicate r's protocol with ``result``; record the job it asks for next, if any."""
    try:
        jobs[r] = protocols[r].send(result)
    except StopIteration:
        jobs.pop(r, None)


def _mix(w1: float, a, w2: float, b):
    """``w1 * a + w2 * b`` for floats or per-slot lists of floats."""
    if isinstance(a, list):
        return [w1 * x + w2 * y for x, y in zip(a, b)]
    return w1 * a + w2 * b


def _load_dataset(config: Config) -> qdata.Dataset:
    """The dataset, built by process 0 first: the others then read its cache instead of
    building the same files at the same time."""
    load = functools.partial(
        qdata.load, config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir,
        validation_size=config.validation_size, seed=config.seed, train_subset=config.train_subset,
        test_subset=config.test_subset)
    dataset = load() if ckpt.is_writer() else None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("qsparse: dataset ready")
    return dataset if dataset is not None else load()


def _silent(message: str) -> None:
    del message


def replicate_keys(seed: int, replicate: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init, data order, control) keys of a replicate: split once, so each stream is independent."""
    return tuple(jax.random.split(jax.random.fold_in(jax.random.key(seed), replicate), 3))


def _progress(r: int, tag: str, level: int, epochs: int, row: dict) -> str:
    parts = [f"rep {r} {tag} {level:2d}", f"density {100 * row['density_prunable']:6.2f}%",
             f"epoch {row['epoch']:3d}/{epochs}", f"loss {row['train_loss']:.4f}", f"train {100 * row['train_acc']:.2f}%"]
    if "test_acc" in row:
        parts.append(f"test {100 * row['test_acc']:.2f}%")
    if "val_acc" in row:
        parts.append(f"val {100 * row['val_acc']:.2f}%")
    parts.append(f"{row['images_per_sec']:,.0f} img/s")
    return " | ".join(parts)


def _shapes(model, input_shape):
    return jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), input_shape))


def _all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def read_summary(run_dir: Path) -> list[dict]:
    """One row per finished (replicate, round), from the rounds' done.json files."""
    rows = []
    for rdir in sorted(Path(run_dir).glob("replicate_*"), key=lambda p: int(p.name.split("_")[1])):
        for rd in sorted(rdir.glob("round_*")):
            if (rd / "done.json").exists():
                done = ckpt.read_json(rd / "done.json")
                rows.append({"replicate": int(rdir.name.split("_")[1]), "round": int(rd.name.split("_")[1]), **done})
    return rows


def write_summary(run_dir: Path) -> list[dict]:
    rows = read_summary(run_dir)
    ckpt.write_json(Path(run_dir) / "summary.json", rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    ckpt.write_text(Path(run_dir) / "summary.csv", buf.getvalue())
    return rows


def _record_invocation(run_dir: Path) -> dict:
    """Versions, devices, which CPU convolutions run (oneDNN or XLA), and the qsparse commit (and whether its sources differ from it) of this
    invocation, appended to runs.jsonl."""
    packages = {}
    for name in ("qsparse", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "numpy"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no", ".")
    devices = jax.devices()
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "packages": packages, "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(), "host": platform.node(),
        "device_kind": devices[0].device_kind, "platform": devices[0].platform, "device_count": len(devices),
        "process_count": jax.process_count(),
        "cpu_conv": onednn.cpu_conv() if devices[0].platform == "cpu" else None,
    }
    path = run_dir / "runs.jsonl"
    previous = path.read_text() if path.exists() else ""
    ckpt.write_text(path, previous + json.dumps(entry) + "\n")
    return entry


def _git(*args: str) -> str | None:
    """Output of a read-only git command in the qsparse source folder; None outside a checkout."""
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
