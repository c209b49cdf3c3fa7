"""Masked training: a TrainState with masks, and a whole epoch as one compiled call.

The masks are an ordinary field of the state, hence an *argument* of the compiled epoch: one
compilation serves every pruning round (rigl's JAX code baked masks into the model and
recompiled per mask). They act three times per step:

1. forward: the loss sees ``where(mask, params, 0)``, so the quaternion component kernel is
   masked *before* it is expanded to the real block matrix, and pruned weights get zero
   gradient;
2. updates: :func:`zero_pruned` zeroes the optimizer's updates of pruned weights (stale Adam
   moments, carried optimizer state or weight decay would otherwise move them);
3. projection: the new params are masked again, so every saved checkpoint is exactly sparse.

An epoch is one ``lax.scan`` over batches inside ``pmap`` over the local devices (data parallel:
params replicated, each device takes its slice of every global batch, gradients averaged with
``pmean``). On this 2-core CPU, sharded ``jit`` deadlocked in 5 of 14 runs in an all-reduce
rendezvous while ``pmap`` never hung (shared/env.md §4), hence ``pmap``. With one device it is
the same code on a device axis of size 1.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from qsparse import data as qdata
from qsparse import masks as qmasks

AXIS = "devices"
OPTIMIZERS = ("adam", "sgd")


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


def create_train_state(model: nn.Module, params, masks, tx: optax.GradientTransformation) -> TrainState:
    params = qmasks.apply(params, masks)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, masks=masks)
    # a strongly typed step: the weak-typed Python 0 would make the second call retrace
    return state.replace(step=jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class EpochSpec:
    """Static facts that shape the compiled epoch (hashable: one compilation per spec)."""

    batch_size: int
    steps: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool


def _loss(params, masks, apply_fn, images, labels):
    logits = apply_fn({"params": qmasks.apply(params, masks)}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.sum(jnp.argmax(logits, -1) == labels)


def _batch(spec: EpochSpec, images, labels, order, aug_key, step):
    """This device's slice of global batch ``step``: gathered, augmented, normalised."""
    n_dev = jax.lax.psum(1, AXIS)
    per_device = spec.batch_size // n_dev
    start = jax.lax.axis_index(AXIS) * per_device
    idx = jax.lax.dynamic_slice_in_dim(order[step], start, per_device)
    x, y = images[idx], labels[idx]
    if spec.augment:
        # one key per *global* example, so the device split does not change the transform
        keys = jax.random.split(jax.random.fold_in(aug_key, step), spec.batch_size)
        x = qdata.augment(jax.lax.dynamic_slice_in_dim(keys, start, per_device), x)
    return qdata.normalize(x, spec.mean, spec.std), y


def _train_epoch(spec: EpochSpec, state: TrainState, images, labels, key, start, stop):
    """Steps ``start <= i < stop`` of the epoch whose data order and augmentation come from ``key``.

    Steps outside the range are skipped by ``lax.cond``; this keeps one compilation for full
    epochs, a rewind point in the middle of an epoch, and a resume.
    """
    order_key, aug_key = jax.random.split(key)
    order = jax.random.permutation(order_key, images.shape[0])[: spec.steps * spec.batch_size]
    order = order.reshape(spec.steps, spec.batch_size)

    def step(carry, i):
        state, loss_sum, correct = carry

        def run(state):
            x, y = _batch(spec, images, labels, order, aug_key, i)
            (loss, hits), grads = jax.value_and_grad(_loss, has_aux=True)(
                state.params, state.masks, state.apply_fn, x, y
            )
            grads = jax.lax.pmean(grads, AXIS)
            updates, opt_state = state.tx.update(grads, state.opt_state, state.params, masks=state.masks)
            params = qmasks.apply(optax.apply_updates(state.params, updates), state.masks)
            state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
            return state, jax.lax.pmean(loss, AXIS), jax.lax.psum(hits, AXIS)

        def skip(state):
            return state, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)

        state, loss, hits = jax.lax.cond((i >= start) & (i < stop), run, skip, state)
        return (state, loss_sum + loss, correct + hits), None

    init = (state, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (state, loss_sum, correct), _ = jax.lax.scan(step, init, jnp.arange(spec.steps))
    n = jnp.maximum(stop - start, 1)
    return state, {"train_loss": loss_sum / n, "train_acc": correct / (n * spec.batch_size)}


def _evaluate(mean, std, batch, state: TrainState, images, labels):
    n = images.shape[0]
    chunks = -(-n // batch)
    pad = chunks * batch - n
    images = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
    valid = jnp.arange(chunks * batch) < n
    params = qmasks.apply(state.params, state.masks)

    def chunk(carry, i):
        sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * batch, batch)  # noqa: E731
        logits = state.apply_fn({"params": params}, qdata.normalize(sl(images), mean, std))
        y, w = sl(labels), sl(valid)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return (carry[0] + jnp.sum(jnp.where(w, loss, 0.0)), carry[1] + jnp.sum(w & (jnp.argmax(logits, -1) == y))), None

    (loss, correct), _ = jax.lax.scan(chunk, (jnp.zeros(()), jnp.zeros((), jnp.int32)), jnp.arange(chunks))
    return {"loss": loss / n, "acc": correct / n}


class Trainer:
    """Compiled epoch and evaluation for one (model, data shapes, batch) combination.

    Build it once per run and reuse it for every round and replicate: the compiled functions
    take state (params, optimizer state, masks) and data as arguments. ``trace_count`` counts
    how often the epoch was traced (tests assert it stays at one).
    """

    def __init__(self, spec: EpochSpec, devices: list | None = None, eval_batch: int = 1000):
        self.spec = spec
        self.devices = devices or jax.local_devices()
        n = len(self.devices)
        if spec.batch_size % n:
            raise ValueError(f"batch size {spec.batch_size} is not divisible by the {n} local devices")
        self.trace_count = 0

        def epoch(state, images, labels, key, start, stop):
            self.trace_count += 1
            return _train_epoch(spec, state, images, labels, key, start, stop)

        self._epoch = jax.pmap(epoch, AXIS, in_axes=(0, None, None, None, None, None), devices=self.devices)
        self._eval = jax.jit(functools.partial(_evaluate, spec.mean, spec.std, eval_batch))
        # pmap outputs carry this sharding; inputs placed the same way hit the same compilation
        mesh = jax.sharding.Mesh(np.array(self.devices), (AXIS,))
        self._stacked = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
        self._copied = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def replicate(self, state: TrainState) -> TrainState:
        n = len(self.devices)
        return jax.device_put(jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), state), self._stacked)

    def put_data(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
        """Copy a split to every device once, instead of at every epoch call."""
        return tuple(jax.device_put(a, self._copied) for a in arrays)

    @staticmethod
    def unreplicate(state: TrainState) -> TrainState:
        return jax.tree.map(lambda x: x[0], state)

    def train_epoch(self, state: TrainState, images, labels, key, start: int = 0, stop: int | None = None):
        """Run steps [start, stop) of one epoch on a *replicated* state; metrics as floats."""
        stop = self.spec.steps if stop is None else stop
        state, metrics = self._epoch(state, images, labels, key, start, stop)
        return state, {k: float(v[0]) for k, v in metrics.items()}

    def evaluate(self, state: TrainState, images, labels) -> dict[str, float]:
        """Loss and accuracy of an *unreplicated* state on a whole split."""
        if images.shape[0] == 0:
            return {"loss": float("nan"), "acc": float("nan")}
        return {k: float(v) for k, v in self._eval(state, images, labels).items()}


def epoch_spec(dataset: "qdata.Dataset", batch_size: int) -> EpochSpec:
    n = dataset.train_images.shape[0]
    if not 0 < batch_size <= n:
        raise ValueError(f"batch size {batch_size} must be in [1, {n}] (training examples)")
    return EpochSpec(batch_size, n // batch_size, tuple(dataset.mean), tuple(dataset.std), bool(dataset.augment))

