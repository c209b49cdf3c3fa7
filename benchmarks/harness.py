"""What every measurement shares: timed windows of a compiled epoch, the matmul peak, the machine.

A window is one compiled call of the Trainer's epoch, so Python dispatch is paid once per window
and not once per step; the median window after a warm-up is the measurement.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.flops import forward_flops
from qsparse import masks as qmasks
from qsparse import models, pruning, train
from qsparse.cpu import onednn
from qsparse.data import DATASETS, DatasetSpec

T = TypeVar("T")


def sync(tree: T) -> T:
    """``tree`` once every array in it is computed: timings must not end at dispatch."""
    jax.block_until_ready(tree)
    return tree


def timed(
    fn: Callable[[], object], repeats: int, warmup: int = 1, settle_s: float = 0.0
) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (compiling,
    filling caches), the untimed calls going on until ``settle_s`` seconds have passed (threads
    that another library left spinning, or its own asleep, can hold the first calls of a fast
    function back by milliseconds); every result is waited for (:func:`sync`). Take the median."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: at least one timed call")
    start, calls = time.perf_counter(), 0
    while calls < warmup or time.perf_counter() - start < settle_s:
        sync(fn())
        calls += 1
    return timeit.Timer(lambda: sync(fn())).repeat(repeats, number=1)


def dataset_of(model: str) -> DatasetSpec:
    """Shape and normalisation of the dataset the paper trains ``model`` on."""
    return DATASETS[models.spec(model).dataset]


def matmul_peak(n: int, repeats: int) -> dict[str, Any]:
    """GFLOP/s of an ``n`` x ``n`` float32 matmul under ``jit`` (median): the yardstick."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    times = timed(lambda: f(a, b), repeats)
    seconds = statistics.median(times)
    return {"n": n, "seconds": seconds, "gflops": 2 * n**3 / seconds / 1e9, "times": times}


def memory_bandwidth(mib: int, repeats: int) -> dict[str, Any]:
    """GB/s of a copy between two float32 arrays of ``mib`` MiB each (read plus written bytes,
    median), the other yardstick: what a call that must move its bytes can reach at best."""
    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    times = timed(lambda: np.copyto(dst, src), repeats)
    seconds = statistics.median(times)
    return {"mib": mib, "seconds": seconds, "gbs": 2 * src.nbytes / seconds / 1e9, "times": times}


class Setup:
    """A Trainer, a masked state and synthetic data for one model and algebra, at the model's
    batch size and with its optimizer.

    The state is masked (20 % pruned, as after IMP's first round) so the step timed is the one
    IMP runs; the data are random images of the model's dataset shape, so no dataset is needed.
    """

    def __init__(
        self,
        name: str,
        algebra: str,
        steps: int,
        replicates: int = 1,
        seed: int = 0,
        replicate_mode: str = "auto",
    ):
        spec = models.spec(name)
        data = dataset_of(name)
        shape = data.image_shape
        self.model = models.create(name, algebra)
        variables = models.init_variables(self.model, jax.random.key(seed), shape)
        params, stats = variables["params"], variables.get("batch_stats")
        self.fwd_flops = forward_flops(self.model, params, shape, stats)
        masks = pruning.prune(params, qmasks.ones(params), 0.2)
        recipe = spec.recipe  # the model's optimizer (Adam for the paper's), at a constant rate
        tx = train.make_optimizer(
            recipe.get("optimizer", "adam"),
            spec.lr,
            momentum=recipe.get("momentum", 0.9),
            nesterov=recipe.get("nesterov", False),
            weight_decay=recipe.get("weight_decay", 0.0),
        )
        state = train.create_train_state(self.model, params, masks, tx, batch_stats=stats)
        self.images_per_call = steps * spec.batch_size * replicates
        epoch = train.EpochSpec(spec.batch_size, steps, data.mean, data.std, data.augment)
        self.trainer = train.Trainer(epoch, replicates=replicates, replicate_mode=replicate_mode)
        self.state = train.stack([state] * replicates)
        rng = np.random.default_rng(seed)
        n = steps * spec.batch_size
        self.data = self.trainer.put_data(
            rng.integers(0, 256, (n, *shape), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int32),
        )
        self.replicates = replicates
        self.calls = 0
        self.windows: list[float] = []
        self.cpu: list[float] = []

    def key(self) -> jax.Array:
        """A fresh key per call (one per replicate): each window trains on new augmentations."""
        self.calls += 1
        key = jax.random.key(self.calls)
        return jax.random.split(key, self.replicates)

    def first_call(self) -> float:
        """Seconds of the first epoch call: compilation plus one window."""
        t = time.perf_counter()
        self.state, _ = self.trainer.train_epoch(self.state, *self.data, self.key())
        return time.perf_counter() - t

    def window(self, record: bool = True) -> float:
        """Wall seconds of one compiled epoch call; recorded (with its CPU time) if ``record``."""
        c, t = time.process_time(), time.perf_counter()
        self.state, _ = sync(self.trainer.train_epoch(self.state, *self.data, self.key()))
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if record:
            self.windows.append(wall)
            self.cpu.append(cpu)
        return wall


def load_average() -> list[float]:
    """The 1/5/15-minute load average: timings from a busy machine are not comparable."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_name() -> str:
    """The CPU's model name, so a result says which machine it describes."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """What a result depends on besides the code: versions, CPUs, devices, flags, load."""
    return {
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "devices": [str(d) for d in jax.local_devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_conv": onednn.cpu_conv(),
        "cpu": cpu_name(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_before": load_average(),
    }
