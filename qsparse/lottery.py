"""Lottery-ticket iterative magnitude pruning: the protocols, read top to bottom.

Protocols (the paper, §4; :attr:`Config.protocol`):

* ``lottery`` (default, Frankle & Carbin / open_lth): round 0 trains the dense model from θ₀
  and keeps the rewind point θ_k (k = 0 for ``rewind='init'``). Round L prunes the trained
  weights of round L-1 (``prune_fraction`` of what remains), resets the survivors to θ_k and
  retrains for the same duration. Optimizer state is fresh each round unless
  ``optimizer_state='carry'``.
* ``paper`` (what the paper's code did): masks come from a *search* trajectory that never
  rewinds: prune, then keep training the same weights with one optimizer carried across
  rounds (after every round but the last, which nothing prunes). The reported accuracy of
  round L is a ticket trained from θ₀ with that mask. Unlike the paper's code, the tickets get
  their own optimizer (``optimizer_state`` applies) unless ``ticket_optimizer='search'``. The
  search's two ingredients can be taken apart: ``search_optimizer='fresh'`` prunes and continues
  with a new optimizer each round, ``search_weights='rewind'`` restarts from θ₀ each round with
  the carried optimizer.

Controls (:attr:`Config.control`): ``reinit`` trains each round's mask from new random weights,
``shuffle`` a random mask with the same per-layer counts (whole numbers under ``number``
grouping) from θ₀, drawn inside the previous round's mask so masks stay nested. With
``ticket_run`` the masks are that lottery run's, replicate by replicate and round by round
(Frankle & Carbin's controls, open_lth's branches); without it a control is its own IMP: its
round-L mask is pruned from its own round L-1 network (new weights / random masks at every
round), so only round 1 starts from the ticket's mask.

Each replicate's protocol (:meth:`Experiment._protocol`) is a generator that yields the
trainings it needs; :class:`qsparse.loop.Loop` trains those of all replicates together. Files
are named by :mod:`qsparse.rundir`.

Every stage is skipped when its output exists, and an interrupted round continues from its
latest checkpoint, computing exactly what an uninterrupted run would. A damaged file is reported
(a logging warning naming it) and recomputed from the last good state: θ₀ from the seed, masks
from the previous round, a round's final/, done.json and metrics.jsonl from its epoch
checkpoints, a damaged epoch checkpoint from the one before. Only a damaged ``rewind/`` or
``config.json`` stops the run. A round whose loss or weights become non-finite stops, with
``nonfinite: true`` in its metrics and status 'nonfinite' in done.json and the summary; its
replicate has no further rounds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Generator
from pathlib import Path

import jax

from qsparse import checkpoints as ckpt
from qsparse import loop, models, pruning, rundir, summaries, train
from qsparse import masks as qmasks
from qsparse.config import Config
from qsparse.experiment import (
    Experiment,
    check_run_dir,
    check_writable,
    create_run_dir,
    record_invocation,
    resolve,
)
from qsparse.progress import RunProgress

logger = logging.getLogger(__name__)


def run(
    config: Config,
    workdir: str | os.PathLike,
    *,
    run_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Run (or resume) an IMP experiment; returns its run directory."""
    config = resolve(config)
    if not rundir.is_writer():
        log = _silent  # one voice per run: process 0's
    run = rundir.Run(Path(run_dir) if run_dir is not None else Path(workdir) / config.run_name())
    check_writable(run.path)
    check_run_dir(run, config)
    experiment = Lottery(config, run, log)  # loads and validates everything; writes nothing
    create_run_dir(run)
    with ckpt.RunLock(run.lock):
        check_run_dir(run, config)  # again, now that no other process can write it
        rundir.write_json(run.config, config.to_json())
        if config.ticket_run:
            ticket = rundir.Run(Path(config.ticket_run))
            rundir.write_json(
                run.ticket, {"run": config.ticket_run, "config": rundir.read_json(ticket.config)}
            )
        summaries.config(run, config.to_json())
        info = record_invocation(run)
        log(
            f"run: {run.path} on {info['device_count']} {info['platform']} device(s)"
            + (f" in {info['process_count']} processes" if info["process_count"] > 1 else "")
            + (f", {info['cpu_conv']} convolutions" if info["cpu_conv"] else "")
        )
        experiment.replicates()
        rows = rundir.write_summary(run)
    diverged = [
        f"replicate {row['replicate']} round {row['round']}"
        for row in rows
        if row["status"] != "ok"
    ]
    log(f"done: {run.path}" + (f" (non-finite loss in {', '.join(diverged)})" if diverged else ""))
    return run.path


class Lottery(Experiment):
    """The IMP protocols of an experiment, one generator per replicate."""

    # -- the replicates, in lockstep -------------------------------------------------------

    def replicates(self) -> None:
        """Every replicate's protocol (:meth:`_protocol`), in lockstep: the trainings they ask for
        next are trained together, in one compiled epoch (:meth:`qsparse.loop.Loop.run`)."""
        self._progress = self._run_progress()
        self._boards: dict[Path, summaries.Writer] = {}
        epochs = dataclasses.replace(self.loop, progress=self._progress)  # told of each epoch
        try:
            protocols = {r: self._protocol(r) for r in range(self.config.replicates)}
            jobs: dict[int, loop.Job] = {}
            for r in protocols:
                _advance(protocols, jobs, r, None)
            while jobs:
                results = epochs.run(jobs)
                for r in sorted(results):
                    _advance(protocols, jobs, r, results[r])
        finally:
            self._progress.close()
            for board in self._boards.values():
                board.close()

    def _run_progress(self) -> RunProgress:
        """The whole run's progress, counting what earlier invocations finished."""
        cfg = self.config
        searches = self._searches(0)
        rounds = [rd for rep in self.run.replicates() for rd in rep.rounds()]
        done_rounds = sum(rd.done.exists() for rd in rounds)
        # a run of an earlier qsparse may hold a search of its last round too, which is not counted
        done_searches = sum(rd.search.final.exists() for rd in rounds if rd.level < cfg.rounds)
        return RunProgress(
            rounds=cfg.replicates * (cfg.rounds + 1),
            trainings=cfg.replicates * (cfg.rounds + 1 + searches),
            epochs=cfg.epochs,
            done_rounds=done_rounds,
            done=done_rounds + done_searches,
            bar=self.log is not _silent and sys.stderr.isatty(),
        )

    def _searches(self, first: int) -> int:
        """How many searches protocol 'paper' trains from round ``first`` on: one after each
        round's ticket but the dense one (its own start) and the last (no round prunes it)."""
        if self.config.protocol != "paper":
            return 0
        return max(self.config.rounds - max(first, 1), 0)

    def _stopped(self, first: int, first_search: int) -> None:
        """Replicate stopped early: rounds ``first``.. and searches ``first_search``.. will not
        run."""
        rounds = self.config.rounds + 1 - first
        self._progress.dropped(rounds, rounds + self._searches(first_search))

    def _board(self, rd: rundir.Round) -> summaries.Writer:
        """The TensorBoard events of ``rd``'s replicate: its curves against the round."""
        path = rd.path.parent
        if path not in self._boards:
            self._boards[path] = summaries.Writer(path)
        return self._boards[path]

    def _protocol(self, r: int) -> Generator[loop.Job, tuple, None]:
        """Replicate r's rounds, top to bottom; each ``yield`` hands a training to the loop and
        receives its (final state, metrics history)."""
        cfg = self.config
        rep = self.run.replicate(r)
        init_key, data_key, control_key = replicate_keys(cfg.seed, r)
        theta0 = self._theta0(rep.init, init_key)
        masks = qmasks.ones(theta0)
        prev_state = prev_search = None
        low_rounds = 0
        for level in range(cfg.rounds + 1):
            rd = rep.round(level)
            source = prev_search if cfg.protocol == "paper" else prev_state
            try:
                masks = self._masks(rd, source, masks, jax.random.fold_in(control_key, level))
            except (pruning.LayerCollapseError, TicketEnded) as e:
                self.log(f"replicate {r}: stopping before round {level}: {e}")
                rundir.write_json(rep.stopped, {"round": level, "reason": str(e)})
                self._stopped(level, level)
                return
            start = self._start(rep, theta0, init_key, level)
            opt_state = self._ticket_opt_state(prev_state, prev_search)
            capture = rep.rewind if (level == 0 and self.loop.rewind_step) else None
            state, done = yield from self._ticket(rd, start, masks, data_key, opt_state, capture)
            prev_state = state
            if done["status"] != "ok":
                logger.warning(
                    "replicate %d: round %d ended with status %r (non-finite loss or weights); "
                    "no further rounds",
                    r,
                    level,
                    done["status"],
                )
                self._stopped(level + 1, level)
                return
            low_rounds = low_rounds + 1 if done["test_acc"] < cfg.stop_accuracy else 0
            if low_rounds >= 2:
                self.log(
                    f"replicate {r}: test accuracy below {cfg.stop_accuracy} twice; "
                    "stopping (as the paper)"
                )
                self._stopped(level + 1, level)
                return
            if cfg.protocol == "paper" and level < cfg.rounds:
                prev_search = yield from self._search(
                    rd, state, prev_search, masks, data_key, theta0
                )

    def _theta0(self, path: Path, key):
        """θ₀, read back or (again, if damaged) computed from the replicate's init key."""
        if path.exists():
            try:
                return ckpt.load_tree(path, self.param_shapes)
            except rundir.CorruptFileError as e:
                logger.warning("%s; computing it again from the seed", e)
        theta0 = models.init_params(self.model, key, self.input_shape)
        ckpt.save_tree(path, theta0)
        return theta0

    def _masks(self, rd: rundir.Round, source, masks, key):
        """The round's masks, read back or (again, if damaged) pruned from the previous round."""
        if rd.masks.exists():
            try:
                return ckpt.load_masks(rd.masks, masks)
            except rundir.CorruptFileError as e:
                logger.warning("%s; computing them again from the previous round", e)
        cfg, new = self.config, masks
        if rd.level > 0 and cfg.ticket_run:
            new = self._ticket_masks(rd, masks)
            if cfg.control == "shuffle":
                new = pruning.shuffle(key, new, within=masks, grouping=cfg.grouping, rule=self.rule)
        elif rd.level > 0:
            new = pruning.prune(
                source.params,
                masks,
                cfg.prune_fraction,
                method=cfg.pruning,
                grouping=cfg.grouping,
                rule=self.rule,
                layer_fractions=dict(cfg.layer_fractions) or None,
            )
            if cfg.control == "shuffle":
                new = pruning.shuffle(key, new, within=masks, grouping=cfg.grouping, rule=self.rule)
        ckpt.save_masks(rd.masks, new)
        return new

    def _ticket_masks(self, rd: rundir.Round, like):
        """Round ``rd``'s masks in the ticket run (same replicate, same level)."""
        ticket = rundir.Run(Path(self.config.ticket_run))
        path = ticket.replicate(rundir.Replicate(rd.path.parent).index).round(rd.level).masks
        if not path.exists():
            raise TicketEnded(f"the ticket run {ticket.path} has no round {rd.level} ({path})")
        return ckpt.load_masks(path, like)

    def _start(self, rep: rundir.Replicate, theta0, init_key, level: int) -> tuple:
        """(params, batch statistics) round ``level``'s ticket starts from: θ₀, the rewind point
        or (control) new weights; the statistics are None for a model without batch norm, and
        the initial ones but at a rewind point."""
        if self.config.control == "reinit" and level > 0:
            key = jax.random.fold_in(init_key, level)
            return models.init_params(self.model, key, self.input_shape), self.stats0
        if self.loop.rewind_step and level > 0:
            point = ckpt.load_tree(rep.rewind, train.rewind_point(theta0, self.stats0))
            if self.stats0 is None:
                return point, None
            return point["params"], point["batch_stats"]
        return theta0, self.stats0

    # -- one round -------------------------------------------------------------------

    def _ticket(self, rd: rundir.Round, start, masks, data_key, opt_state, capture: Path | None):
        """Train the round's ticket from ``start`` (params, batch statistics) unless finished
        before; returns (final state, done.json)."""
        params, stats = start
        like = train.create_train_state(self.model, params, masks, self.tx, batch_stats=stats)
        finished = self._finished(rd, like)
        if finished is not None:
            return finished
        if opt_state is not None:
            like = like.replace(opt_state=opt_state)
        report = qmasks.density_report(masks, self.rule)
        rundir.write_json(rd.sparsity, report)
        state, history = yield loop.Job(like, rd, data_key, rd.level, report, capture)
        ckpt.save_tree(rd.final, state)
        done = self._done(history, report)
        rundir.write_json(rd.done, done)
        summaries.round_start(self._board(rd), rd.level, report)
        summaries.round_done(self._board(rd), rd.level, done)
        ckpt.fault_point("round_end")
        return state, done

    def _finished(self, rd: rundir.Round, like):
        """(final state, done.json) of a finished round, or None: not finished, or damaged (then it
        is finished again from its epoch checkpoints, which rewrites all three files)."""
        if not rd.done.exists():
            return None
        try:
            done = rundir.read_done(rd)
            return ckpt.load_tree(rd.final, like), done
        except rundir.CorruptFileError as e:
            logger.warning("%s; finishing the round again from its checkpoints", e)
            return None

    def _ticket_opt_state(self, prev_state, prev_search):
        """The optimizer state a ticket starts with: None (fresh), the previous round's
        (``optimizer_state='carry'``) or the search's that pruned its mask
        (``ticket_optimizer='search'``)."""
        cfg = self.config
        if cfg.optimizer_state == "carry" and prev_state is not None:
            return prev_state.opt_state
        if cfg.ticket_optimizer == "search" and prev_search is not None:
            return prev_search.opt_state
        return None

    def _search(self, rd: rundir.Round, ticket, prev_search, masks, data_key, theta0):
        """Protocol 'paper': continue the never-rewound trajectory with its carried optimizer
        (or, by ``search_weights`` / ``search_optimizer``, restart from θ₀ / a new optimizer)."""
        if rd.level == 0:
            return ticket  # the dense run is both the first ticket and the search's start
            yield  # a generator all the same
        cfg = self.config
        if cfg.search_weights == "continue":
            start, stats = prev_search.params, train.batch_stats(prev_search)
        else:
            start, stats = theta0, self.stats0
        like = train.create_train_state(self.model, start, masks, self.tx, batch_stats=stats)
        if cfg.search_optimizer == "carry":
            like = like.replace(opt_state=prev_search.opt_state)
        if rd.search.final.exists():
            try:
                return ckpt.load_tree(rd.search.final, like)
            except rundir.CorruptFileError as e:
                logger.warning("%s; finishing the search again from its checkpoints", e)
        report = qmasks.density_report(masks, self.rule)
        state, _ = yield loop.Job(like, rd.search, data_key, rd.level, report, None, "search")
        ckpt.save_tree(rd.search.final, state)
        return state

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


class TicketEnded(Exception):
    """A control's ticket run has no masks for the next round: its replicate ended before it."""


def _advance(protocols: dict, jobs: dict, r: int, result) -> None:
    """Resume replicate r's protocol with ``result``; record the job it asks for next, if any."""
    try:
        jobs[r] = protocols[r].send(result)
    except StopIteration:
        jobs.pop(r, None)


def _silent(message: str) -> None:
    del message


def replicate_keys(seed: int, replicate: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init, data order, control) keys of a replicate: split once, so the streams are
    independent."""
    return tuple(jax.random.split(jax.random.fold_in(jax.random.key(seed), replicate), 3))
