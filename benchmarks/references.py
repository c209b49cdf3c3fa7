"""Same-run yardsticks: how fast plain code trains on this machine, beside qsparse's trainer.

A plain Flax Conv-4 train step (jit, no epoch loop, no masks), a bare scanned epoch of a plain
real MLP of LeNet-300-100's shape, and optionally PyTorch eager steps of Conv-4, LeNet-300-100
and ResNet-20, run by another interpreter (``experiments/torch_reference.py``; qsparse does not
depend on torch) in windows interleaved with qsparse's. Measured beside qsparse's numbers, so a
ratio to them survives a busy or drifting machine.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import timed

TORCH_SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "torch_reference.py"


class TorchReferenceError(RuntimeError):
    """The interpreter given for the PyTorch reference could not run it, or the script failed."""


class Conv4(nn.Module):
    """Conv-4 in plain Flax: no quaternions, no masks, the library's defaults."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in (64, 64, None, 128, 128, None):
            if width is None:
                x = nn.max_pool(x, (2, 2), (2, 2))
            else:
                x = nn.relu(nn.Conv(width, (3, 3))(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(10)(nn.relu(nn.Dense(256)(x)))


class MLP(nn.Module):
    """LeNet-300-100's shape (784-300-100-10) in plain Flax."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(300)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(nn.relu(nn.Dense(100)(x)))


def _make_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
    def step(p, o, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    return step


def bench_references(
    windows: int, log: Callable[[str], None], mlp_batches: int = 1000
) -> dict[str, Any]:
    """A plain Flax Conv-4 jit step (batch 60, one step per call) and a bare scanned epoch of a
    plain MLP on pre-normalised data (``mlp_batches`` batches of 60, in order; 1000 is MNIST's
    epoch): the least work each does."""
    out = {}
    model, tx = Conv4(), optax.adam(3e-4)
    x = jax.random.normal(jax.random.key(0), (60, 32, 32, 3))
    y = jnp.zeros((60,), jnp.int32)
    p = model.init(jax.random.key(1), x)["params"]
    o = tx.init(p)
    step = jax.jit(_make_step(model, tx), donate_argnums=(0, 1))

    def five_steps():
        nonlocal p, o
        for _ in range(5):
            p, o, loss = step(p, o, x, y)
        return loss

    seconds = statistics.median(timed(five_steps, windows)) / 5
    out["plain_flax_conv4_step"] = {"step_ms": 1e3 * seconds, "images_per_s": 60 / seconds}

    model, tx = MLP(), optax.adam(1.2e-3)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((mlp_batches, 60, 784), np.float32))
    ys = jnp.asarray(rng.integers(0, 10, (mlp_batches, 60)).astype(np.int32))
    p = model.init(jax.random.key(1), xs[0])["params"]
    o = tx.init(p)
    mlp_step = _make_step(model, tx)

    @jax.jit
    def epoch(p, o, xs, ys):
        def body(c, b):
            p, o, _ = mlp_step(*c, *b)
            return (p, o), None

        return jax.lax.scan(body, (p, o), (xs, ys))[0]

    def one_epoch():
        nonlocal p, o
        p, o = epoch(p, o, xs, ys)
        return p, o

    seconds = statistics.median(timed(one_epoch, max(3, windows // 2)))
    out["bare_mlp_epoch"] = {"epoch_s": seconds, "images_per_s": 60 * mlp_batches / seconds}
    log(
        f"  plain Flax Conv-4 jit step: {out['plain_flax_conv4_step']['images_per_s']:.0f} img/s; "
        f"bare scanned MLP epoch: {out['bare_mlp_epoch']['images_per_s']:,.0f} img/s"
    )
    return out


class TorchReference:
    """PyTorch eager train steps of Conv-4, LeNet-300-100 and ResNet-20, timed by ``python`` (an
    interpreter with torch) running ``experiments/torch_reference.py`` as a child process, one
    window at a time on request: :func:`benchmarks.throughput.bench_model` interleaves these
    windows with qsparse's, so the ratio of the two is measured under the same machine
    conditions (timed apart from qsparse's, PyTorch's ResNet-20 rate moved between 293 and 461
    images/s within one hour on the shared development CPU).

    Raises :class:`TorchReferenceError` (its message starts with ``python``) when ``python``
    cannot run or the script fails, e.g. for want of torch.
    """

    MODELS = ("conv4", "lenet300_100", "resnet20")

    def __init__(self, python: str):
        self.python = python
        self._stderr = tempfile.TemporaryFile("w+")  # a pipe nobody reads could fill and block
        try:
            self._child = subprocess.Popen(
                [python, str(TORCH_SCRIPT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                text=True,
            )
        except OSError as e:
            self._stderr.close()
            raise TorchReferenceError(f"{python} cannot run: {e}") from None
        self.info: dict[str, Any] = self._reply()

    def _reply(self) -> dict[str, Any]:
        line = self._child.stdout.readline()
        if not line:
            self._child.kill()
            status = self._child.wait()
            self._stderr.seek(0)
            lines = self._stderr.read().strip().splitlines()
            self.close()
            raise TorchReferenceError(
                f"{self.python} failed: {(lines or [f'status {status}'])[-1]}"
            )
        return json.loads(line)

    def window(self, model: str, steps: int) -> tuple[float, int]:
        """Wall seconds of ``steps`` eager train steps of ``model`` (one of :data:`MODELS`,
        warmed up the first time it is asked for), and its batch size."""
        try:
            self._child.stdin.write(f"{model} {steps}\n")
            self._child.stdin.flush()
        except BrokenPipeError:  # the child has died: _reply says why
            pass
        reply = self._reply()
        return reply["seconds"], reply["batch"]

    def close(self) -> None:
        """End the child process."""
        if not self._child.stdin.closed:
            with contextlib.suppress(BrokenPipeError):  # a child that died
                self._child.stdin.close()
        self._child.wait(timeout=60)
        self._child.stdout.close()
        self._stderr.close()
