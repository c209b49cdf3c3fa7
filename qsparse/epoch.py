"""The compiled epoch's per-device code: masked training steps in one loop, and evaluation.

The masks are an ordinary field of the state, hence an *argument* of the compiled epoch: one
compilation serves every pruning round (rigl's JAX code baked masks into the model and
recompiled per mask). They act three times:

1. forward: the params are masked once when an epoch starts, so the loss always sees
   ``where(mask, params, 0)`` and the quaternion component kernel is masked *before* it is
   expanded to the real block matrix; the gradient of pruned weights is zeroed (the gradient of
   ``where(mask, params, 0)``, computed without a per-step copy of the masked kernels);
2. updates: :func:`qsparse.train.zero_pruned` zeroes the optimizer's updates of pruned weights
   (stale Adam moments, carried optimizer state or weight decay would otherwise move them);
3. projection: the new params are masked again, so every saved checkpoint is exactly sparse.

An epoch is one ``lax.fori_loop`` over the batches ``start <= i < stop`` (a ``while`` loop with
dynamic bounds, so a full epoch, a rewind point inside an epoch and a resume share one
compilation). This is the code one device runs inside :class:`qsparse.train.Trainer`'s
``shard_map``: along the ``data`` axis it takes its slice of every global batch and averages
gradients with ``pmean``; the replicates it holds share the loop body.

A model with batch norm (a ``batch_stats`` collection, held by
:class:`qsparse.train.BatchNormState`) is called with ``train=True`` in training, normalising
with the statistics of the batch (of each device's slice of it) and updating its running
averages, which are averaged over the ``data`` axis after every step (with equal slices, the
mean of the devices' means is the batch's mean; the variances average the devices' own, as
unsynchronised batch norm does). Evaluation calls it in eval mode (the running averages). The
statistics are never masked, pruned or optimised.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from qsparse import augment
from qsparse import masks as qmasks

if TYPE_CHECKING:
    from qsparse.train import TrainState

DATA = "data"


def stack(trees: Sequence) -> Any:
    """R pytrees of one structure (states, keys) -> one whose leaves have a leading replicate
    axis: the shape a :class:`qsparse.train.Trainer` of R replicates takes, R = 1 included."""
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


def batch_stats(state: TrainState) -> Any:
    """A state's batch statistics; None for a model without batch norm."""
    return getattr(state, "batch_stats", None)


def variables(params, batch_stats=None) -> dict:
    """The flax variables of a model: its params, and its batch statistics if it has any."""
    if batch_stats is None:
        return {"params": params}
    return {"params": params, "batch_stats": batch_stats}


def _loss(params, batch_stats, apply_fn, images, labels):
    """Mean loss, (hits, the updated batch statistics: None for a model without batch norm)."""
    if batch_stats is None:
        logits = apply_fn(variables(params), images)
    else:
        logits, updated = apply_fn(
            variables(params, batch_stats), images, train=True, mutable=["batch_stats"]
        )
        batch_stats = updated["batch_stats"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (jnp.sum(jnp.argmax(logits, -1) == labels), batch_stats)


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
    stats = batch_stats(state)
    (loss, (hits, stats)), grads = jax.value_and_grad(_loss, has_aux=True)(
        state.params, stats, state.apply_fn, x, y
    )
    grads = qmasks.apply(grads, state.masks)  # the gradient of where(mask, params, 0)
    if n_data > 1:
        # each device normalised with its own slice's statistics; the running averages are
        # averaged, so every device of the replicate holds the same ones
        grads, stats = jax.lax.pmean((grads, stats), DATA)
        loss, hits = jax.lax.pmean(loss, DATA), jax.lax.psum(hits, DATA)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, masks=state.masks)
    params = qmasks.apply(optax.apply_updates(state.params, updates), state.masks)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if stats is not None:
        state = state.replace(batch_stats=stats)
    return state, loss, hits


def train_epoch(
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


def evaluate(mean, std, batch: int, n_data: int, state: TrainState, images, labels):
    """Loss and accuracy on a whole split; the chunks of ``batch`` examples are dealt round-robin
    over the ``data`` axis and the sums all-reduced."""
    n = images.shape[0]
    rounds = -(-n // (batch * n_data))
    pad = rounds * n_data * batch - n
    images = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
    valid = jnp.arange(images.shape[0]) < n
    params = qmasks.apply(state.params, state.masks)
    stats = batch_stats(state)
    device = jax.lax.axis_index(DATA) if n_data > 1 else 0

    def chunk(carry, i):
        sl = lambda a: jax.lax.dynamic_slice_in_dim(a, (i * n_data + device) * batch, batch)  # noqa: E731
        x = augment.normalize(sl(images), mean, std)
        logits = state.apply_fn(variables(params, stats), x)  # eval mode
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


def squeezed(fn: Callable, stacked: tuple[int, ...]) -> Callable:
    """``fn`` for a device group that holds one replicate: the replicate axis (size 1) is dropped
    from the ``stacked`` arguments and put back on every output, so the group runs the lone-run
    program."""

    def wrapped(*args):
        args = [jax.tree.map(lambda x: x[0], a) if i in stacked else a for i, a in enumerate(args)]
        return jax.tree.map(lambda x: x[None], fn(*args))

    return wrapped


def per_replicate(fn: Callable, local: int, mode: str, *stacked):
    """``fn`` on each of the ``local`` replicates of leading-axis-stacked arguments, results
    stacked again."""
    if mode == "vmap":
        return jax.vmap(fn)(*stacked)
    return stack([fn(*slot(stacked, r)) for r in range(local)])
