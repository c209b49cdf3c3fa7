"""Conv-4's convolutions one at a time, oneDNN's kernels against XLA's.

A model's step time mixes many kernels; timing each convolution and its two gradients alone
shows which of them a convolution backend wins or loses, at the shapes the trainer runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import jax

from benchmarks.harness import timed
from qsparse import cpu
from qsparse.cpu import onednn

# Conv-4's convolutions at batch 60: (spatial size, input channels, output channels)
CONV4_LAYERS = ((32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128))
OPS = ("forward", "input_grad", "kernel_grad")


def bench_layers(windows: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each Conv-4 convolution and its two gradients, as the trainer computes them
    (:func:`qsparse.cpu.conv2d`), with oneDNN's and with XLA's kernels, interleaved."""
    pad = ((1, 1), (1, 1))
    backends = ["onednn", "xla"] if onednn.available() else ["xla"]
    out = []
    for size, c_in, c_out in CONV4_LAYERS:
        x = jax.random.normal(jax.random.key(0), (60, size, size, c_in))
        w = jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out))
        dy = jax.random.normal(jax.random.key(2), (60, size, size, c_out))
        ops = {}
        for backend in backends:
            with onednn.using(backend):
                # new functions per backend: JAX caches traces by function, and the backend is
                # read when tracing
                def conv(x, w):
                    return cpu.conv2d(x, w, pad)

                fwd = jax.jit(conv)
                grad = jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy))
                # both used in this iteration only, so binding ``grad`` late is harmless
                dx = jax.jit(lambda x, w, dy: grad(x, w, dy)[0])  # noqa: B023
                dw = jax.jit(lambda x, w, dy: grad(x, w, dy)[1])  # noqa: B023
                for op, f, args in zip(OPS, (fwd, dx, dw), ((x, w), (x, w, dy), (x, w, dy))):
                    # the warm-up call compiles, under this backend
                    ops[backend, op] = timed(lambda f=f, args=args: f(*args), max(windows, 5))
        flops = 2 * 60 * size * size * c_in * c_out * 9
        row = {"layer": f"{size}x{size}x{c_in}->{c_out}", "gflop": flops / 1e9}
        for (backend, op), times in ops.items():
            row[f"{backend}_{op}_ms"] = 1e3 * statistics.median(times)
            row[f"{backend}_{op}_gflops"] = flops / statistics.median(times) / 1e9
        out.append(row)
        log(
            "  "
            + row["layer"]
            + ": "
            + "; ".join(
                f"{op} "
                + " / ".join(f"{b} {row[f'{b}_{op}_gflops']:.0f}" for b in backends)
                + " GFLOP/s"
                for op in OPS
            )
        )
    return out
