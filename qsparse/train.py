"""Masked training: a TrainState with masks, and a whole epoch as one compiled call.

The masks are an ordinary field of the state, hence an *argument* of the compiled epoch: one
compilation serves every pruning round (rigl's JAX code baked masks into the model and
recompiled per mask). They act three times:

1. forward: the params are masked once when an epoch starts, so the loss always sees
   ``where(mask, params, 0)`` and the quaternion component kernel is masked *before* it is
   expanded to the real block matrix; the gradient of pruned weights is zeroed (the gradient of
   ``where(mask, params, 0)``, computed without a per-step copy of the masked kernels);
2. updates: :func:`zero_pruned` zeroes the optimizer's updates of pruned weights (stale Adam
   moments, carried optimizer state or weight decay would otherwise move them);
3. projection: the new params are masked again, so every saved checkpoint is exactly sparse.

An epoch is one ``lax.fori_loop`` over the batches ``start <= i < stop`` (a ``while`` loop with
dynamic bounds, so a full epoch, a rewind point inside an epoch and a resume share one
compilation), inside ``jax.jit(jax.shard_map(...))`` over a device mesh of shape
``(replicate, data)`` that spans every process. Replicates are independent trainings (own params,
optimizer state, masks and data order): they are spread over the ``replicate`` axis, and the
replicates that share a device run in one loop body. Along the ``data`` axis each device takes
its slice of every global batch and gradients are averaged with ``pmean`` (an all-reduce, the
only collective used). Explicit per-device code rather than automatic sharding: with two forced
host CPU devices, automatically sharded ``jit`` deadlocked in an all-reduce rendezvous while
per-device code did not (tests/test_devices.py guards it).
"""

from __future__ import annotations

import dataclasses
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

from qsparse import augment, cpu
from qsparse import masks as qmasks
from qsparse.config import OPTIMIZERS

REPLICATE, DATA = "replicate", "data"


class TrainState(train_state.TrainState):
    masks: Any = None


def zero_pruned() -> optax.GradientTransformationExtraArgs:
    """Zero the updates of pruned weights; takes the masks as the extra argument ``masks``."""

    def update(updates, state, params=None, *, masks, **extra):
        del params, extra
        return qmasks.apply(updates, masks), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(name: str, lr: float) -> optax.GradientTransformationExtraArgs:
    """The paper's Adam (no weight decay, constant rate), or SGD with momentum 0.9."""
    if name == "adam":
        base = optax.adam(lr)
    elif name == "sgd":
        base = optax.sgd(lr, momentum=0.9)
    else:
        raise ValueError(f"unknown optimizer {name!r}; valid: {list(OPTIMIZERS)}")
    return optax.chain(base, zero_pruned())


def create_train_state(
    model: nn.Module, params, masks, tx: optax.GradientTransformation
) -> TrainState:
    params = qmasks.apply(params, masks)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, masks=masks)
    # a strongly typed step: the weak-typed Python 0 would make the second call retrace
    return state.replace(step=jnp.zeros((), jnp.int32))


def stack(trees: Sequence) -> Any:
    """R pytrees of one structure (states, keys) -> one whose leaves have a leading replicate
    axis: the shape a :class:`Trainer` of R replicates takes, R = 1 included."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def slot(tree, r: int):
    """Replicate r of a stacked pytree: a state, or metrics (lists of one float per replicate)."""
    return jax.tree.map(lambda x: x[r], tree, is_leaf=lambda x: isinstance(x, list))


@dataclasses.dataclass(frozen=True)
class EpochSpec:
    """Static facts that shape the compiled epoch (hashable: one compilation per spec)."""

    batch_size: int
    steps: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool


# ---------------------------------------------------------------------------------------------
# The compiled epoch (per-device code, run inside shard_map)
# ---------------------------------------------------------------------------------------------


def _loss(params, apply_fn, images, labels):
    logits = apply_fn({"params": params}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.sum(jnp.argmax(logits, -1) == labels)


def _batch(spec: EpochSpec, n_data: int, images, labels, order, aug_key, step):
    """This device's slice of global batch ``step``: gathered, augmented, normalised."""
    per_device = spec.batch_size // n_data
    idx = order[step]
    if n_data > 1:
        start = jax.lax.axis_index(DATA) * per_device
        idx = jax.lax.dynamic_slice_in_dim(idx, start, per_device)
    x, y = images[idx], labels[idx]
    if spec.augment:
        # one key per *global* example, so the device split does not change the transform
        keys = jax.random.split(jax.random.fold_in(aug_key, step), spec.batch_size)
        if n_data > 1:
            keys = jax.lax.dynamic_slice_in_dim(keys, start, per_device)
        x = augment.augment(keys, x)
    return augment.normalize(x, spec.mean, spec.std), y


def _prepare(spec: EpochSpec, n_images: int, state: TrainState, key):
    """The epoch's data order and augmentation key; params exactly zero where pruned from here on
    (so the loss sees the masked params)."""
    order_key, aug_key = jax.random.split(key)
    order = jax.random.permutation(order_key, n_images)[: spec.steps * spec.batch_size]
    state = state.replace(params=qmasks.apply(state.params, state.masks))
    return state, order.reshape(spec.steps, spec.batch_size), aug_key


def _step(spec: EpochSpec, n_data: int, images, labels, state: TrainState, order, aug_key, i):
    """One masked training step on global batch ``i``; returns the state, its loss and hits."""
    x, y = _batch(spec, n_data, images, labels, order, aug_key, i)
    (loss, hits), grads = jax.value_and_grad(_loss, has_aux=True)(
        state.params, state.apply_fn, x, y
    )
    grads = qmasks.apply(grads, state.masks)  # the gradient of where(mask, params, 0)
    if n_data > 1:
        grads = jax.lax.pmean(grads, DATA)
        loss, hits = jax.lax.pmean(loss, DATA), jax.lax.psum(hits, DATA)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, masks=state.masks)
    params = qmasks.apply(optax.apply_updates(state.params, updates), state.masks)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss, hits


def _train_epoch(
    spec: EpochSpec,
    n_data: int,
    local: int | None,
    mode: str,
    state: TrainState,
    images,
    labels,
    key,
    start,
    stop,
):
    """Steps ``start <= i < stop`` of the epoch whose data order and augmentation come from ``key``.

    ``local`` is None for one state (the lone program), or the number of replicates stacked on
    this device (leading axis of every leaf of ``state`` and ``key``); ``mode`` says how they
    share the loop body: ``"unroll"`` (R copies of the step) or ``"vmap"``.
    """
    prepare = functools.partial(_prepare, spec, images.shape[0])
    step = functools.partial(_step, spec, n_data, images, labels)
    zero = () if local is None else (local,)
    if local is None:
        state, order, aug_key = prepare(state, key)
    elif mode == "vmap":
        state, order, aug_key = jax.vmap(prepare)(state, key)
        step = jax.vmap(step, in_axes=(0, 0, 0, None))
    else:
        parts = [prepare(slot(state, r), key[r]) for r in range(local)]
        state, order, aug_key = (tuple(p[k] for p in parts) for k in range(3))
        single = step

        def step(states, orders, aug_keys, i):
            out = [single(s, o, a, i) for s, o, a in zip(states, orders, aug_keys)]
            return (
                tuple(o[0] for o in out),
                jnp.stack([o[1] for o in out]),
                jnp.stack([o[2] for o in out]),
            )

    def body(i, carry):
        state, loss_sum, correct = carry
        state, loss, hits = step(state, order, aug_key, i)
        return state, loss_sum + loss, correct + hits

    init = (state, jnp.zeros(zero, jnp.float32), jnp.zeros(zero, jnp.int32))
    state, loss_sum, correct = jax.lax.fori_loop(start, stop, body, init)
    if isinstance(state, tuple):
        state = stack(state)
    n = jnp.maximum(stop - start, 1)
    return state, {"train_loss": loss_sum / n, "train_acc": correct / (n * spec.batch_size)}


def _evaluate(mean, std, batch: int, n_data: int, state: TrainState, images, labels):
    """Loss and accuracy on a whole split; the chunks of ``batch`` examples are dealt round-robin
    over the ``data`` axis and the sums all-reduced."""
    n = images.shape[0]
    rounds = -(-n // (batch * n_data))
    pad = rounds * n_data * batch - n
    images = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
    valid = jnp.arange(images.shape[0]) < n
    params = qmasks.apply(state.params, state.masks)
    device = jax.lax.axis_index(DATA) if n_data > 1 else 0

    def chunk(carry, i):
        sl = lambda a: jax.lax.dynamic_slice_in_dim(a, (i * n_data + device) * batch, batch)  # noqa: E731
        logits = state.apply_fn({"params": params}, augment.normalize(sl(images), mean, std))
        y, w = sl(labels), sl(valid)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return (
            carry[0] + jnp.sum(jnp.where(w, loss, 0.0)),
            carry[1] + jnp.sum(w & (jnp.argmax(logits, -1) == y)),
        ), None

    (loss, correct), _ = jax.lax.scan(
        chunk, (jnp.zeros(()), jnp.zeros((), jnp.int32)), jnp.arange(rounds)
    )
    if n_data > 1:
        loss, correct = jax.lax.psum(loss, DATA), jax.lax.psum(correct, DATA)
    return {"loss": loss / n, "acc": correct / n}


def _squeezed(fn: Callable, stacked: tuple[int, ...]) -> Callable:
    """``fn`` for a device group that holds one replicate: the replicate axis (size 1) is dropped
    from the ``stacked`` arguments and put back on every output, so the group runs the lone-run
    program."""

    def wrapped(*args):
        args = [jax.tree.map(lambda x: x[0], a) if i in stacked else a for i, a in enumerate(args)]
        return jax.tree.map(lambda x: x[None], fn(*args))

    return wrapped


def _per_replicate(fn: Callable, local: int, mode: str, *stacked):
    """``fn`` on each of the ``local`` replicates of leading-axis-stacked arguments, results
    stacked again."""
    if mode == "vmap":
        return jax.vmap(fn)(*stacked)
    return stack([fn(*slot(stacked, r)) for r in range(local)])


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
    vmap elsewhere). The state given to :meth:`train_epoch` is donated to it: use the returned
    one.

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
        params = slot(state.params, 0)
        return cpu.compiler_options(self.platform, state.apply_fn, params, images.shape[1:])

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
            return _train_epoch(spec, n_data, local, mode, state, images, labels, keys, start, stop)

        if local is None:
            epoch = _squeezed(epoch, stacked=(0, 3))

        def body(state, images, labels, key_data, start, stop):
            return epoch(state, images, labels, jax.random.wrap_key_data(key_data), start, stop)

        s = P(REPLICATE)
        options = self._options(state, images)
        # the state is donated: its buffers become the new state's (the caller keeps no copy)
        return self._compile(body, (s, P(), P(), s, P(), P()), options, donate=(0,))

    def train_epoch(
        self, state: TrainState, images, labels, key, start: int = 0, stop: int | None = None
    ):
        """Run steps [start, stop) of one epoch of every replicate; metrics as lists of floats,
        one per replicate. ``state`` is donated: use the returned state, not it."""
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
                _evaluate, self.spec.mean, self.spec.std, self.eval_batch, self.n_data
            )
            if self._local == 1:
                evaluate = _squeezed(one, stacked=(0,))
            else:
                local, mode = self._local, self.replicate_mode

                def evaluate(state, images, labels):
                    return _per_replicate(lambda s: one(s, images, labels), local, mode, state)

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
