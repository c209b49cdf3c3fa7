"""Masked training: a TrainState with masks, and a whole epoch as one compiled call.

The masks are a field of the state; how the epoch applies them, and the per-device code of the
epoch, are in :mod:`qsparse.epoch`. It runs inside ``jax.jit(jax.shard_map(...))`` over a device
mesh of shape ``(replicate, data)`` that spans every process. Replicates are independent
trainings (own params, optimizer state, masks and data order): they are spread over the
``replicate`` axis, and the replicates that share a device run in one loop body. Along the
``data`` axis each device takes its slice of every global batch and gradients are averaged with
``pmean`` (an all-reduce, the only collective used). Explicit per-device code rather than
automatic sharding: with two forced host CPU devices, automatically sharded ``jit`` deadlocked in
an all-reduce rendezvous while per-device code did not (tests/test_devices.py guards it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qsparse import cpu
from qsparse import epoch as qepoch
from qsparse import masks as qmasks
from qsparse.config import OPTIMIZERS, SCHEDULES
from qsparse.epoch import EpochSpec, batch_stats, slot
from qsparse.epoch import stack as stack  # the trainer's shape of R states: train.stack

REPLICATE, DATA = "replicate", qepoch.DATA


class TrainState(train_state.TrainState):
    masks: Any = None


class BatchNormState(TrainState):
    """The state of a model with batch norm: its running statistics beside the params
    (:mod:`qsparse.epoch`). A subclass, so the state of every other model, and its checkpoints
    (runs written before batch norm existed included), keep their exact structure."""

    batch_stats: Any = None


def rewind_point(params, batch_stats=None) -> Any:
    """What a rewind point (or θ₀ with its statistics) holds: the params, and for a model with
    batch norm the batch statistics beside them (``{"params", "batch_stats"}``); runs of models
    without batch norm keep their params-only files."""
    return params if batch_stats is None else {"params": params, "batch_stats": batch_stats}


def zero_pruned() -> optax.GradientTransformationExtraArgs:
    """Zero the updates of pruned weights; takes the masks as the extra argument ``masks``."""

    def update(updates, state, params=None, *, masks, **extra):
        del params, extra
        return qmasks.apply(updates, masks), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(
    name: str,
    lr: float,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The paper's Adam (no weight decay, constant rate), or SGD with momentum; a recipe's L2
    weight decay (added to the gradient, as PyTorch's ``weight_decay``) and learning-rate
    ``schedule`` (:data:`qsparse.config.SCHEDULES`, over ``total_steps``) where asked. The
    defaults build exactly the optimizer (and optimizer state) qsparse always built."""
    rate = learning_rate(lr, schedule, warmup_steps, total_steps)
    if name == "adam":
        base = optax.adam(rate)
    elif name == "sgd":
        base = optax.sgd(rate, momentum=momentum, nesterov=nesterov)
    else:
        raise ValueError(f"unknown optimizer {name!r}; valid: {list(OPTIMIZERS)}")
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    return optax.chain(*decay, base, zero_pruned())


def learning_rate(
    lr: float, schedule: str, warmup_steps: int = 0, total_steps: int | None = None
) -> float | optax.Schedule:
    """``lr`` (constant) or an optax schedule peaking at ``lr``: ``warmup_cosine`` rises
    linearly for ``warmup_steps`` and decays to 0 by ``total_steps`` by a cosine; ``step``
    multiplies by 0.1 at half and at three quarters of ``total_steps`` (open_lth's ResNet-20
    recipe: 80 and 120 of 160 epochs)."""
    if schedule == "constant":
        return lr
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {list(SCHEDULES)}")
    if not total_steps or total_steps < 1:
        raise ValueError(f"schedule {schedule!r} needs total_steps >= 1, got {total_steps}")
    if schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1)
        )
    return optax.piecewise_constant_schedule(
        lr, {total_steps // 2: 0.1, (3 * total_steps) // 4: 0.1}
    )


def create_train_state(
    model: nn.Module, params, masks, tx: optax.GradientTransformation, batch_stats=None
) -> TrainState:
    """A fresh state (optimizer at step 0) of masked ``params``; ``batch_stats`` for a model with
    batch norm."""
    params = qmasks.apply(params, masks)
    fields = dict(apply_fn=model.apply, params=params, tx=tx, masks=masks)
    if batch_stats is None:
        state = TrainState.create(**fields)
    else:
        state = BatchNormState.create(**fields, batch_stats=batch_stats)
    # a strongly typed step: the weak-typed Python 0 would make the second call retrace
    return state.replace(step=jnp.zeros((), jnp.int32))


# ---------------------------------------------------------------------------------------------
# The trainer: shardings, compilation, host transfers
# ---------------------------------------------------------------------------------------------

REPLICATE_MODES = ("auto", "unroll", "vmap")


def replicate_mesh(replicates: int, devices: Sequence[jax.Device]) -> jax.sharding.Mesh:
    """A ``(replicate, data)`` mesh: ``gcd(R, n)`` groups of devices, each training ``R / groups``
    replicates data-parallel over its ``n / groups`` devices (R = 1: pure data parallelism;
    R a multiple of n: one device per group, no collectives)."""
    groups = math.gcd(replicates, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh(
        (groups, len(devices) // groups), (REPLICATE, DATA), axis_types=auto, devices=devices
    )


class Trainer:
    """Compiled epoch and evaluation for one (model, data shapes, batch) combination.

    Build it once per run and reuse it for every round: the compiled functions take the state
    (params, optimizer state, masks) and data as arguments, and ``trace_count`` counts how often
    the epoch was traced (tests assert it stays at one). Which device holds what is the
    trainer's business.

    It trains ``replicates`` = R independent replicates at once, R = 1 included: states go in
    and come out with a leading replicate axis (:func:`stack`; :func:`slot` takes replicate r
    out), ``key`` is an ``(R,)`` array of keys (one data order per replicate), and metrics come
    back as lists of R floats. ``devices`` (default: every device of every process) form a
    :func:`replicate_mesh`. Replicate r computes what a trainer of one replicate computes for
    ``(state_r, key_r)``: bit for bit where it has a device group to itself of the same size (the
    lone program runs there), to float rounding where it shares a loop body
    (``replicate_mode``: ``"unroll"``, R copies of the step, measured faster on CPU in
    results/bench_scaleout_cpu.md; ``"vmap"``, batched kernels; ``"auto"``, unroll on CPU and
    vmap elsewhere). :meth:`train_epoch` donates a state it returned earlier (its buffers become
    the new state's, as big_vision's ``donate_argnums``); a state built by the caller is copied
    to the devices and stays usable.

    ``compiler_options`` are XLA options for compiling the epoch: ``"auto"`` (default) asks
    :func:`qsparse.cpu.compiler_options`; ``None`` uses XLA's defaults; a dict is used as given.
    """

    def __init__(
        self,
        spec: EpochSpec,
        devices: Sequence[jax.Device] | None = None,
        eval_batch: int = 1000,
        replicates: int = 1,
        compiler_options: dict | str | None = "auto",
        replicate_mode: str = "auto",
    ):
        if replicates < 1:
            raise ValueError(f"replicates must be a positive number, got {replicates}")
        if replicate_mode not in REPLICATE_MODES:
            raise ValueError(
                f"replicate_mode {replicate_mode!r} is not one of {list(REPLICATE_MODES)}"
            )
        self.spec, self.replicates, self.eval_batch = spec, replicates, eval_batch
        self.compiler_options = compiler_options
        self.devices = list(devices or jax.devices())
        self.mesh = replicate_mesh(replicates, self.devices)
        groups, n_data = self.mesh.devices.shape
        if spec.batch_size % n_data:
            raise ValueError(
                f"batch size {spec.batch_size} is not divisible by the {n_data} devices "
                f"that train each replicate ({len(self.devices)} devices, {groups} replicate "
                "groups)"
            )
        self.platform = self.devices[0].platform
        if replicate_mode == "auto":
            replicate_mode = "unroll" if self.platform == "cpu" else "vmap"
        self.replicate_mode, self.n_data = replicate_mode, n_data
        self._local = replicates // groups  # replicates per device group (1: the lone program)
        self._replicated = NamedSharding(self.mesh, P())
        self._state_sharding = NamedSharding(self.mesh, P(REPLICATE))
        self.trace_count = 0
        self._epoch: Callable | None = None
        self._eval: Callable | None = None

    # -- placement -----------------------------------------------------------------------

    def _put(self, tree, sharding: NamedSharding):
        """Global arrays from host values that every process holds in full (multi-process safe)."""

        def put(x):
            if (
                isinstance(x, jax.Array)
                and isinstance(x.sharding, NamedSharding)
                and x.sharding.mesh == self.mesh
                and x.sharding.is_equivalent_to(sharding, x.ndim)
            ):
                return x  # already placed (an output of the previous call)
            a = np.asarray(x)
            return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

        return jax.tree.map(put, tree)

    def put_data(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
        """A split on every device once, instead of at every call."""
        return tuple(self._put(a, self._replicated) for a in arrays)

    def fetch(self, tree):
        """A pytree of host numpy arrays, complete on every process (all must call it together:
        parts held by other processes come through one all-reduce)."""
        leaves, treedef = jax.tree.flatten(tree)
        if all(
            not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated
            for x in leaves
        ):
            return jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
        return jax.tree.unflatten(treedef, [np.asarray(x) for x in self._all_gather(leaves)])

    def _all_gather(self, leaves):
        """Replica-sharded arrays made whole on every device with a psum (all-reduce only:
        gloo's reduce-scatter and all-gather are not trusted across processes)."""
        groups = self.mesh.devices.shape[0]

        def gather(*blocks):
            out = []
            for b in blocks:
                full = jnp.zeros((b.shape[0] * groups, *b.shape[1:]), b.dtype)
                full = jax.lax.dynamic_update_slice_in_dim(
                    full, b, jax.lax.axis_index(REPLICATE) * b.shape[0], 0
                )
                out.append(jax.lax.psum(full, REPLICATE))
            return out

        specs = tuple(x.sharding.spec if isinstance(x, jax.Array) else P() for x in leaves)
        f = jax.shard_map(gather, mesh=self.mesh, in_specs=specs, out_specs=P(), check_vma=False)
        return jax.jit(f)(*leaves)

    # -- compiled functions --------------------------------------------------------------

    def _options(self, state: TrainState, images) -> dict | None:
        if self.compiler_options != "auto":
            return self.compiler_options
        params, stats = slot((state.params, batch_stats(state)), 0)
        return cpu.compiler_options(
            self.platform, state.apply_fn, params, images.shape[1:], batch_stats=stats
        )

    def _keys(self, key) -> jax.Array:
        if jnp.shape(key) != (self.replicates,):
            raise ValueError(
                f"a trainer of {self.replicates} replicates needs {self.replicates} keys (an "
                f"array of shape ({self.replicates},)), got shape {jnp.shape(key)}"
            )
        return self._put(jax.random.key_data(key), self._state_sharding)

    def _compile(self, fn: Callable, in_specs: tuple, options=None, donate=()) -> Callable:
        """``fn`` (per-device code) as one compiled program over the mesh; state-shaped outputs."""
        s = P(REPLICATE)
        return jax.jit(
            jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=s, check_vma=False),
            compiler_options=options,
            donate_argnums=donate,
        )

    def _build_epoch(self, state, images) -> Callable:
        spec, n_data, mode = self.spec, self.n_data, self.replicate_mode
        local = None if self._local == 1 else self._local

        def epoch(state, images, labels, keys, start, stop):
            self.trace_count += 1
            return qepoch.train_epoch(
                spec, n_data, local, mode, state, images, labels, keys, start, stop
            )

        if local is None:
            epoch = qepoch.squeezed(epoch, stacked=(0, 3))

        def body(state, images, labels, key_data, start, stop):
            return epoch(state, images, labels, jax.random.wrap_key_data(key_data), start, stop)

        s = P(REPLICATE)
        options = self._options(state, images)
        # donated: a placed state's buffers become the new state's
        return self._compile(body, (s, P(), P(), s, P(), P()), options, donate=(0,))

    def train_epoch(
        self, state: TrainState, images, labels, key, start: int = 0, stop: int | None = None
    ):
        """Run steps [start, stop) of one epoch of every replicate; metrics as lists of floats,
        one per replicate. A ``state`` this trainer returned is donated: use the new one."""
        stop = self.spec.steps if stop is None else stop
        keys = self._keys(key)
        state = self._put(state, self._state_sharding)
        images, labels = self.put_data(images, labels)
        if self._epoch is None:
            self._epoch = self._build_epoch(state, images)
        bounds = self._put((np.int32(start), np.int32(stop)), self._replicated)
        state, metrics = self._epoch(state, images, labels, keys, *bounds)
        return state, {k: _to_floats(v) for k, v in self.fetch(metrics).items()}

    def evaluate(self, state: TrainState, images, labels) -> dict[str, list[float]]:
        """Loss and accuracy of every replicate on a whole split (lists, one per replicate)."""
        if images.shape[0] == 0:
            nan = [float("nan")] * self.replicates
            return {"loss": nan, "acc": nan}
        if self._eval is None:
            one = functools.partial(
                qepoch.evaluate, self.spec.mean, self.spec.std, self.eval_batch, self.n_data
            )
            if self._local == 1:
                evaluate = qepoch.squeezed(one, stacked=(0,))
            else:
                local, mode = self._local, self.replicate_mode

                def evaluate(state, images, labels):
                    return qepoch.per_replicate(
                        lambda s: one(s, images, labels), local, mode, state
                    )

            self._eval = self._compile(evaluate, (P(REPLICATE), P(), P()))
        state = self._put(state, self._state_sharding)
        images, labels = self.put_data(images, labels)
        return {k: _to_floats(v) for k, v in self.fetch(self._eval(state, images, labels)).items()}


def _to_floats(v) -> list[float]:
    return [float(x) for x in np.asarray(v)]


def epoch_spec(dataset, batch_size: int) -> EpochSpec:
    """The epoch of a :class:`qsparse.data.Dataset` (or anything with its fields) at
    ``batch_size``."""
    n = dataset.train_images.shape[0]
    if not 0 < batch_size <= n:
        raise ValueError(f"batch size {batch_size} must be in [1, {n}] (training examples)")
    return EpochSpec(
        batch_size, n // batch_size, tuple(dataset.mean), tuple(dataset.std), bool(dataset.augment)
    )
