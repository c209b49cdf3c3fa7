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

An epoch is one ``lax.fori_loop`` over the batches ``start <= i < stop`` inside ``pmap`` over the
local devices (data parallel: params replicated, each device takes its slice of every global
batch, gradients averaged with ``pmean``). On this 2-core CPU, sharded ``jit`` deadlocked in 5 of
14 runs in an all-reduce rendezvous while ``pmap`` never hung (shared/env.md §4), hence ``pmap``.
With one device it is the same code on a device axis of size 1 (and no collectives).

Speed notes (measured, see results/bench_cpu.md):

* the loop runs exactly the steps of ``[start, stop)`` (a ``while`` loop with dynamic bounds)
  instead of a ``scan`` over every step with a ``lax.cond`` per step;
* XLA:CPU only lowers a convolution to its fast (Eigen) kernel when the convolution is in
  canonical form, and it does not canonicalise the gradient convolutions inside a loop: there
  they became naive loops, about 300x slower. The loss (and the evaluation) is therefore traced
  once and every stride-1 NHWC convolution in it is replaced by :func:`qsparse.layers.conv2d`,
  whose gradients are canonical forward convolutions (any model, including flax's ``nn.Conv``);
  on CPU, where the optional extension is built, conv2d and its gradients run on oneDNN's
  kernels (:mod:`qsparse.onednn`): Conv-4 steps about 1.5x faster;
* models without convolutions are compiled without YNNPACK fusions
  (:data:`DENSE_CPU_COMPILER_OPTIONS`): about 10 % faster for LeNet-300-100;
* ``Trainer(..., replicas=R)`` trains R independent replicates (own params, optimizer state,
  masks and data order) in one compiled epoch: R copies of the step in one loop body.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.extend import core as jex_core

from qsparse import data as qdata
from qsparse import layers as qlayers
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


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """R states of the same structure -> one state whose leaves have a leading replica axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack_states(state: TrainState) -> list[TrainState]:
    """Inverse of :func:`stack_states`."""
    n = jax.tree.leaves(state)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], state) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class EpochSpec:
    """Static facts that shape the compiled epoch (hashable: one compilation per spec)."""

    batch_size: int
    steps: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool


# ---------------------------------------------------------------------------------------------
# Convolutions whose gradients XLA:CPU runs fast inside loops
# ---------------------------------------------------------------------------------------------

_CONV_P = jex_core.primitives.conv_general_dilated_p
_JIT_P = jex_core.primitives.jit_p
_NHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _is_plain_conv2d(params, lhs_shape, rhs_shape) -> bool:
    """Stride 1, no dilation, no groups, NHWC x HWIO -> NHWC, padding that keeps gradients simple."""
    if len(lhs_shape) != 4 or params["dimension_numbers"] != _NHWC:
        return False
    if params["window_strides"] != (1, 1) or params["lhs_dilation"] != (1, 1) or params["rhs_dilation"] != (1, 1):
        return False
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return False
    return all(0 <= lo < k and 0 <= hi < k for (lo, hi), k in zip(params["padding"], rhs_shape[:2]))


def _eval_with_fast_convs(jaxpr, consts, *args):
    """Evaluate a jaxpr, replacing each plain 2-D convolution by :func:`qlayers.conv2d`."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        p = eqn.params
        if eqn.primitive is _CONV_P and _is_plain_conv2d(p, invals[0].shape, invals[1].shape):
            outvals = [qlayers.conv2d(*invals, p["padding"], p["precision"], p["preferred_element_type"])]
        elif eqn.primitive is _JIT_P:  # inline nested jits so the convolutions inside are seen too
            outvals = _eval_with_fast_convs(p["jaxpr"].jaxpr, p["jaxpr"].consts, *invals)
        else:
            bind_params = eqn.primitive.get_bind_params(p)
            subfuns = ()
            if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
                subfuns, bind_params = bind_params
            with eqn.ctx.manager:
                outvals = eqn.primitive.bind(*subfuns, *invals, **bind_params)
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        for v, x in zip(eqn.outvars, outvals):
            if not isinstance(v, jex_core.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def fast_convs(fn):
    """``fn`` with every stride-1 NHWC 2-D convolution computed by :func:`qsparse.layers.conv2d`.

    Same values; the difference is only in which kernels compute them and their gradients (see
    the module docstring). Other convolutions are left as they are.
    """

    def wrapped(*args):
        flat, in_tree = jax.tree.flatten(args)
        closed, out_shape = jax.make_jaxpr(lambda *f: fn(*jax.tree.unflatten(in_tree, f)), return_shape=True)(*flat)
        if not any(e.primitive in (_CONV_P, _JIT_P) for e in closed.jaxpr.eqns):
            return fn(*args)
        out = _eval_with_fast_convs(closed.jaxpr, closed.consts, *flat)
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return wrapped


# ---------------------------------------------------------------------------------------------
# The compiled epoch
# ---------------------------------------------------------------------------------------------


def _loss(params, apply_fn, images, labels):
    logits = fast_convs(lambda p, x: apply_fn({"params": p}, x))(params, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.sum(jnp.argmax(logits, -1) == labels)


def _batch(spec: EpochSpec, n_dev: int, images, labels, order, aug_key, step):
    """This device's slice of global batch ``step``: gathered, augmented, normalised."""
    per_device = spec.batch_size // n_dev
    idx = order[step]
    if n_dev > 1:
        start = jax.lax.axis_index(AXIS) * per_device
        idx = jax.lax.dynamic_slice_in_dim(idx, start, per_device)
    x, y = images[idx], labels[idx]
    if spec.augment:
        # one key per *global* example, so the device split does not change the transform
        keys = jax.random.split(jax.random.fold_in(aug_key, step), spec.batch_size)
        if n_dev > 1:
            keys = jax.lax.dynamic_slice_in_dim(keys, start, per_device)
        x = qdata.augment(keys, x)
    return qdata.normalize(x, spec.mean, spec.std), y


def _prepare(spec: EpochSpec, state: TrainState, n_images: int, key):
    """The epoch's data order and augmentation key; params exactly zero where pruned from here on
    (so the loss sees the masked params)."""
    order_key, aug_key = jax.random.split(key)
    order = jax.random.permutation(order_key, n_images)[: spec.steps * spec.batch_size]
    state = state.replace(params=qmasks.apply(state.params, state.masks))
    return state, order.reshape(spec.steps, spec.batch_size), aug_key


def _step(spec: EpochSpec, n_dev: int, images, labels, state: TrainState, order, aug_key, i):
    """One masked training step on global batch ``i``; returns the state, its loss and hits."""
    x, y = _batch(spec, n_dev, images, labels, order, aug_key, i)
    (loss, hits), grads = jax.value_and_grad(_loss, has_aux=True)(state.params, state.apply_fn, x, y)
    grads = qmasks.apply(grads, state.masks)  # the gradient of where(mask, params, 0)
    if n_dev > 1:
        grads = jax.lax.pmean(grads, AXIS)
        loss, hits = jax.lax.pmean(loss, AXIS), jax.lax.psum(hits, AXIS)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, masks=state.masks)
    params = qmasks.apply(optax.apply_updates(state.params, updates), state.masks)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss, hits


def _has_conv(jaxpr) -> bool:
    return any(e.primitive is _CONV_P or any(_has_conv(j) for j in jex_core.jaxprs_in_params(e.params))
               for e in jaxpr.eqns)


def model_has_conv(apply_fn, params, image_shape) -> bool:
    """Whether ``apply_fn`` (a flax ``apply``) runs a convolution on one image of ``image_shape``."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    return _has_conv(jax.make_jaxpr(lambda p, x: apply_fn({"params": p}, x))(params, x).jaxpr)


def _train_epoch(spec: EpochSpec, n_dev: int, replicas: int | None, state: TrainState, images, labels, key,
                 start, stop):
    """Steps ``start <= i < stop`` of the epoch whose data order and augmentation come from ``key``.

    Dynamic loop bounds keep one compilation for full epochs, a rewind point in the middle of an
    epoch, and a resume. With ``replicas``, every leaf of ``state`` and ``key`` has a leading
    replica axis and each replicate runs the same steps on its own state and data order.
    """
    prepare = functools.partial(_prepare, spec)
    step = functools.partial(_step, spec, n_dev, images, labels)
    if replicas is None:
        state, order, aug_key = prepare(state, images.shape[0], key)
        zero = ()
    else:
        # R independent copies of the step in one loop body (not vmap: batched matmuls were
        # slower on XLA:CPU, and vmapped convolutions become grouped convolutions, ~3x slower)
        parts = [prepare(jax.tree.map(lambda x, r=r: x[r], state), images.shape[0], key[r]) for r in range(replicas)]
        state, order, aug_key = (tuple(p[k] for p in parts) for k in range(3))
        single = step

        def step(states, orders, aug_keys, i):
            out = [single(s, o, a, i) for s, o, a in zip(states, orders, aug_keys)]
            return tuple(o[0] for o in out), jnp.stack([o[1] for o in out]), jnp.stack([o[2] for o in out])

        zero = (replicas,)

    def body(i, carry):
        state, loss_sum, correct = carry
        state, loss, hits = step(state, order, aug_key, i)
        return state, loss_sum + loss, correct + hits

    init = (state, jnp.zeros(zero, jnp.float32), jnp.zeros(zero, jnp.int32))
    state, loss_sum, correct = jax.lax.fori_loop(start, stop, body, init)
    if isinstance(state, tuple):
        state = stack_states(state)
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
        logits = fast_convs(lambda p, x: state.apply_fn({"params": p}, x))(params, qdata.normalize(sl(images), mean, std))
        y, w = sl(labels), sl(valid)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return (carry[0] + jnp.sum(jnp.where(w, loss, 0.0)), carry[1] + jnp.sum(w & (jnp.argmax(logits, -1) == y))), None

    (loss, correct), _ = jax.lax.scan(chunk, (jnp.zeros(()), jnp.zeros((), jnp.int32)), jnp.arange(chunks))
    return {"loss": loss / n, "acc": correct / n}


# XLA options for the compiled epoch of a model without convolutions, on CPU: no YNNPACK
# fusions. YNNPACK's kernel for the (60, 784) x (784, 300) forward matmul of LeNet-300-100 ran at
# about half the speed of XLA's own dot for the same FLOPs; without it a whole step was ~10 %
# faster (real and quaternion, interleaved A/B). Models with convolutions keep XLA's defaults
# (YNNPACK runs their convolutions; turning it off made Conv-4 ~7 % slower).
DENSE_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


class Trainer:
    """Compiled epoch and evaluation for one (model, data shapes, batch) combination.

    Build it once per run and reuse it for every round and replicate: the compiled functions
    take state (params, optimizer state, masks) and data as arguments. ``trace_count`` counts
    how often the epoch was traced (tests assert it stays at one).

    With ``replicas=R`` the trainer trains R independent replicates at once: states are stacked
    with :func:`stack_states` (every leaf gets a leading replica axis, before :meth:`replicate`
    adds the device axis), ``key`` is an ``(R,)`` array of keys (one data order per replicate),
    and metrics come back as lists of R floats. Replicate r computes what a single-replicate
    trainer computes for ``(state_r, key_r)``.

    ``compiler_options`` are XLA options for compiling the epoch: ``"auto"`` (default) uses
    :data:`DENSE_CPU_COMPILER_OPTIONS` for models without convolutions on CPU and XLA's defaults
    otherwise; ``None`` always uses the defaults; a dict is used as given.
    """

    def __init__(self, spec: EpochSpec, devices: list | None = None, eval_batch: int = 1000,
                 replicas: int | None = None, compiler_options: dict | str | None = "auto"):
        self.spec = spec
        self.compiler_options = compiler_options
        self._executables: dict = {}
        self.devices = devices or jax.local_devices()
        self.replicas = replicas
        n = len(self.devices)
        if spec.batch_size % n:
            raise ValueError(f"batch size {spec.batch_size} is not divisible by the {n} local devices")
        if replicas is not None and replicas < 1:
            raise ValueError(f"replicas must be a positive number, got {replicas}")
        self.trace_count = 0

        def epoch(state, images, labels, key, start, stop):
            self.trace_count += 1
            return _train_epoch(spec, n, replicas, state, images, labels, key, start, stop)

        self._epoch = jax.pmap(epoch, AXIS, in_axes=(0, None, None, None, None, None), devices=self.devices)
        evaluate = functools.partial(_evaluate, spec.mean, spec.std, eval_batch)
        if replicas is not None:
            evaluate = jax.vmap(evaluate, in_axes=(0, None, None))
        self._eval = jax.jit(evaluate)
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
        """Run steps [start, stop) of one epoch on a *replicated* state; metrics as floats
        (lists of floats with ``replicas``)."""
        stop = self.spec.steps if stop is None else stop
        if self.replicas is not None and jnp.shape(key) != (self.replicas,):
            raise ValueError(f"a trainer of {self.replicas} replicas needs {self.replicas} keys, got shape {jnp.shape(key)}")
        args = (state, images, labels, key, start, stop)
        state, metrics = self._executable(args)(*args)
        return state, {k: _to_float(v[0]) for k, v in metrics.items()}

    def _options(self, state: TrainState, images) -> dict | None:
        if self.compiler_options != "auto":
            return self.compiler_options
        if self.devices[0].platform != "cpu":
            return None
        params = jax.tree.map(lambda x: x[0] if self.replicas is None else x[0, 0], state.params)
        return None if model_has_conv(state.apply_fn, params, images.shape[1:]) else DENSE_CPU_COMPILER_OPTIONS

    def _executable(self, args):
        """The epoch compiled once per argument signature (pmap's own cache cannot take options)."""
        if self.compiler_options is None:
            return self._epoch
        leaves, tree = jax.tree.flatten(args)
        signature = (tree, tuple((jnp.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
        if signature not in self._executables:
            options = self._options(args[0], args[1])
            self._executables[signature] = (
                self._epoch.lower(*args).compile(compiler_options=options) if options else self._epoch)
        return self._executables[signature]

    def evaluate(self, state: TrainState, images, labels) -> dict[str, float]:
        """Loss and accuracy of an *unreplicated* state on a whole split (lists with ``replicas``)."""
        if images.shape[0] == 0:
            nan = float("nan") if self.replicas is None else [float("nan")] * self.replicas
            return {"loss": nan, "acc": nan}
        return {k: _to_float(v) for k, v in self._eval(state, images, labels).items()}


def _to_float(v):
    v = np.asarray(v)
    return float(v) if v.ndim == 0 else [float(x) for x in v]


def epoch_spec(dataset: "qdata.Dataset", batch_size: int) -> EpochSpec:
    n = dataset.train_images.shape[0]
    if not 0 < batch_size <= n:
        raise ValueError(f"batch size {batch_size} must be in [1, {n}] (training examples)")
    return EpochSpec(batch_size, n // batch_size, tuple(dataset.mean), tuple(dataset.std), bool(dataset.augment))
