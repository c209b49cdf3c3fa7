"""How far a whole run is, for the log: rounds finished, time spent, time left, epoch lines.

Kept apart from :mod:`qsparse.loop`, which trains: the loop reports each epoch here, and the
protocols of :mod:`qsparse.lottery` build the account of the run (what earlier invocations
finished) and hand it to the loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


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
        eta = f"~{clock(left)} left" if math.isfinite(left) else "time left unknown"
        return f" | rounds {self.done_rounds}/{self.rounds} | {clock(elapsed)} elapsed, {eta}"

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


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def epoch_line(r: int, tag: str, level: int, epochs: int, row: dict) -> str:
    """The log line of one epoch of replicate r's training (a row of its metrics log)."""
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
