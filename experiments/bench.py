r"""Training-throughput benchmark of qsparse's masked train step on this machine.

    python -m experiments.bench                                   # everything (a few minutes on 2 cores)
    python -m experiments.bench --models=lenet300_100,conv4 --json=results/bench_cpu.json --markdown=results/bench_cpu.md

What it measures, all in one process:

* ``peak``: a large float32 matmul under ``jit`` (median of repeated calls): the machine's own
  matmul GFLOP/s, the yardstick for every model.
* for each model x algebra: the full masked train step of :class:`qsparse.train.Trainer` (the
  compiled epoch: batch gather, augmentation for CIFAR-shaped data, normalisation, forward,
  backward, masking, Adam) on synthetic data of the model's dataset shape, batch 60. One timed
  window is one compiled call of ``window_steps`` steps; the result is the median window after
  one warm-up window. The real and quaternion windows of a model are interleaved, so their
  ratio is measured under the same conditions. GFLOP/s use an analytic count: 3 x the forward
  FLOPs of every dot and convolution in the model (forward, input gradient, weight gradient).
* ``epochs``: whole LeNet-300-100 epochs on MNIST (60,000 training images) through the same
  Trainer, data handling included, and the projected wall time of a 40-epoch round.
* ``replicas``: R replicates trained at once (``Trainer(replicas=R)``) against one replicate,
  in total images/s, for each of ``--replica_models`` and of ``--replica_modes`` (how replicates
  that share a device run: ``unroll``, R copies of the step, or ``vmap``, batched kernels).

Prints a table and writes JSON / markdown when asked. Timings from a busy machine are not
comparable: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from qsparse import data as qdata
from qsparse import masks as qmasks
from qsparse import cpu, models, pruning, train
from qsparse.cpu import onednn
from qsparse.report import markdown_table

MODELS = ("lenet300_100", "conv2", "conv4", "conv6")
ALGEBRAS = ("real", "quat")
# steps per timed window: about a second each on 2 cores
WINDOW_STEPS = {"lenet300_100": 1000, "lenet12": 1000, "conv2": 8, "conv4": 5, "conv6": 4}
DATA = {"mnist": ((28, 28, 1), (0.1307,), (0.3081,), False),
        "cifar10": ((32, 32, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True)}


# ---------------------------------------------------------------------------------------------
# FLOPs


def _eqn_flops(eqn) -> int:
    name = eqn.primitive.name
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    if name == "conv_general_dilated":
        dn = eqn.params["dimension_numbers"]
        rhs = eqn.invars[1].aval.shape
        per_output = math.prod(rhs[d] for d in dn.rhs_spec[1:])  # input features (per group) x window
        return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
    return 0


def _jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        for sub in jex_core.jaxprs_in_params(eqn.params):  # nested jit, custom_jvp, ...
            total += _jaxpr_flops(sub)
    return total


def forward_flops(model, params, input_shape) -> int:
    """Multiply-adds x 2 of every dot and convolution in one example's forward pass."""
    closed = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(params, jnp.zeros((1, *input_shape)))
    return _jaxpr_flops(closed.jaxpr)


# ---------------------------------------------------------------------------------------------
# measurements


def _sync(tree):
    jax.block_until_ready(tree)
    return tree


def matmul_peak(n: int, repeats: int) -> dict[str, Any]:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    _sync(f(a, b))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _sync(f(a, b))
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    return {"n": n, "seconds": seconds, "gflops": 2 * n**3 / seconds / 1e9, "times": times}


class Setup:
    """A Trainer, a masked state and synthetic data for one model and algebra."""

    def __init__(self, name: str, algebra: str, steps: int, replicas: int | None = None, seed: int = 0,
                 replica_mode: str = "auto"):
        spec = models.spec(name)
        shape, mean, std, augment = DATA[spec.dataset]
        self.model = models.create(name, algebra)
        params = models.init_params(self.model, jax.random.key(seed), shape)
        self.fwd_flops = forward_flops(self.model, params, shape)
        masks = pruning.prune(params, qmasks.ones(params), 0.2)  # a masked step, as in IMP round 1
        tx = train.make_optimizer("adam", spec.lr)
        state = train.create_train_state(self.model, params, masks, tx)
        self.images_per_call = steps * spec.batch_size * (replicas or 1)
        self.trainer = train.Trainer(train.EpochSpec(spec.batch_size, steps, mean, std, augment), replicas=replicas,
                                     replica_mode=replica_mode)
        if replicas is not None:
            state = train.stack_states([state] * replicas)
        self.state = state
        rng = np.random.default_rng(seed)
        n = steps * spec.batch_size
        self.data = self.trainer.put_data(rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                                          rng.integers(0, 10, n).astype(np.int32))
        self.replicas = replicas
        self.calls = 0
        self.windows: list[float] = []
        self.cpu: list[float] = []

    def key(self):
        self.calls += 1
        key = jax.random.key(self.calls)
        return key if self.replicas is None else jax.random.split(key, self.replicas)

    def first_call(self) -> float:
        t = time.perf_counter()
        self.state, _ = self.trainer.train_epoch(self.state, *self.data, self.key())
        return time.perf_counter() - t

    def window(self, record: bool = True) -> float:
        c, t = time.process_time(), time.perf_counter()
        self.state, _ = _sync(self.trainer.train_epoch(self.state, *self.data, self.key()))
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if record:
            self.windows.append(wall)
            self.cpu.append(cpu)
        return wall


def bench_model(name: str, algebras, windows: int, steps: int, peak: float, log,
                compare_xla_conv: bool = False) -> dict[str, Any]:
    """Per algebra; with ``compare_xla_conv`` the same steps with XLA's convolutions too, interleaved."""
    has_conv = _has_conv(name)
    backends = [onednn.cpu_conv() if has_conv else "none"]
    if has_conv and compare_xla_conv and backends[0] != "xla":
        backends.append("xla")
    setups, first = {}, {}
    for backend in backends:
        for algebra in algebras:
            with onednn.using("xla" if backend == "none" else backend):  # chosen when the epoch is traced
                s = setups[algebra, backend] = Setup(name, algebra, steps)
                first[algebra, backend] = s.first_call()
            s.window(record=False)  # warm-up
    for _ in range(windows):  # interleaved: ratios are measured under the same conditions
        for s in setups.values():
            s.window()
    out: dict[str, Any] = {}
    for (algebra, backend), s in setups.items():
        median = statistics.median(s.windows)
        img_s = s.images_per_call / median
        if backend != backends[0]:
            out[algebra][f"{backend}_conv_images_per_s"] = img_s
            out[algebra][f"speedup_over_{backend}_conv"] = out[algebra]["images_per_s"] / img_s
            log(f"  {name:13s} {algebra:4s} {1e3 * median / steps:9.2f} ms/step {img_s:10.0f} img/s with {backend} "
                f"convolutions: x{out[algebra][f'speedup_over_{backend}_conv']:.2f} for {backends[0]}")
            continue
        train_flops = 3 * s.fwd_flops
        out[algebra] = {
            "cpu_conv": backend,
            "first_call_s": first[algebra, backend],
            "compile_s": max(first[algebra, backend] - median, 0.0),
            "window_steps": steps,
            "windows_s": s.windows,
            "cpu_per_window_s": s.cpu,
            "step_ms": 1e3 * median / steps,
            "images_per_s": img_s,
            "forward_gflop_per_image": s.fwd_flops / 1e9,
            "train_gflop_per_image": train_flops / 1e9,
            "gflops": img_s * train_flops / 1e9,
            "peak_fraction": img_s * train_flops / 1e9 / peak,
        }
        log(f"  {name:13s} {algebra:4s} {out[algebra]['step_ms']:9.2f} ms/step {img_s:10.0f} img/s "
            f"{out[algebra]['gflops']:7.1f} GFLOP/s ({100 * out[algebra]['peak_fraction']:4.1f}% of peak) "
            f"compile {out[algebra]['compile_s']:5.1f} s")
    if "real" in out and "quat" in out:
        out["quat_real_time_ratio"] = out["quat"]["step_ms"] / out["real"]["step_ms"]
    return out


def _has_conv(name: str) -> bool:
    model = models.create(name)
    shape = DATA[models.spec(name).dataset][0]
    params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), shape))
    return cpu.has_conv(model.apply, params, shape)


# Conv-4's convolutions at batch 60: (spatial size, input channels, output channels)
CONV4_LAYERS = ((32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128))


def bench_layers(windows: int, log) -> list[dict[str, Any]]:
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
                fwd = jax.jit(lambda x, w: cpu.conv2d(x, w, pad))
                grad = jax.jit(lambda x, w, dy: jax.vjp(lambda x, w: cpu.conv2d(x, w, pad), x, w)[1](dy))
                dx = jax.jit(lambda x, w, dy: grad(x, w, dy)[0])
                dw = jax.jit(lambda x, w, dy: grad(x, w, dy)[1])
                for op, f, args in (("forward", fwd, (x, w)), ("input_grad", dx, (x, w, dy)), ("kernel_grad", dw, (x, w, dy))):
                    _sync(f(*args))  # compile now, under this backend
                    ops[backend, op] = (f, args, [])
        for _ in range(max(windows, 5)):
            for f, args, times in ops.values():
                t = time.perf_counter()
                _sync(f(*args))
                times.append(time.perf_counter() - t)
        flops = 2 * 60 * size * size * c_in * c_out * 9
        row = {"layer": f"{size}x{size}x{c_in}->{c_out}", "gflop": flops / 1e9}
        for (backend, op), (_, _, times) in ops.items():
            row[f"{backend}_{op}_ms"] = 1e3 * statistics.median(times)
            row[f"{backend}_{op}_gflops"] = flops / statistics.median(times) / 1e9
        out.append(row)
        log("  " + row["layer"] + ": " + "; ".join(
            f"{op} " + " / ".join(f"{b} {row[f'{b}_{op}_gflops']:.0f}" for b in backends) + " GFLOP/s"
            for op in ("forward", "input_grad", "kernel_grad")))
    return out


def _synthetic_mnist(n: int) -> qdata.Dataset:
    rng = np.random.default_rng(0)
    images = lambda k: rng.integers(0, 256, (k, 28, 28, 1), dtype=np.uint8)  # noqa: E731
    labels = lambda k: rng.integers(0, 10, k).astype(np.int32)  # noqa: E731
    return qdata.Dataset("synthetic_mnist", 10, (0.1307,), (0.3081,), False, images(n), labels(n),
                         images(0), labels(0), images(1000), labels(1000))


def bench_epochs(algebras, epochs: int, data_dir: str | None, train_subset: int | None, log,
                 synthetic: bool = False) -> dict[str, Any]:
    """Whole LeNet-300-100 epochs on MNIST, real and quaternion interleaved."""
    if synthetic:  # same shapes and code path, no dataset needed (smoke tests)
        dataset = _synthetic_mnist(train_subset or 60000)
    else:
        dataset = qdata.load("mnist", data_dir=data_dir, train_subset=train_subset)
    spec = train.epoch_spec(dataset, 60)
    trainer = train.Trainer(spec)
    train_data = trainer.put_data(dataset.train_images, dataset.train_labels)
    test = (jnp.asarray(dataset.test_images), jnp.asarray(dataset.test_labels))
    runs = {}
    for algebra in algebras:
        model = models.create("lenet300_100", algebra)
        params = models.init_params(model, jax.random.key(0), dataset.train_images.shape[1:])
        state = train.create_train_state(model, params, qmasks.ones(params), train.make_optimizer("adam", 1.2e-3))
        t = time.perf_counter()
        state, _ = trainer.train_epoch(state, *train_data, jax.random.key(0))
        first = time.perf_counter() - t
        trainer.evaluate(state, *test)  # compiles the evaluation
        runs[algebra] = {"state": state, "first": first, "epochs": [], "eval": []}
    for e in range(epochs):
        for algebra, run in runs.items():
            t = time.perf_counter()
            run["state"], metrics = trainer.train_epoch(run["state"], *train_data, jax.random.key(e + 1))
            run["epochs"].append(time.perf_counter() - t)
            t = time.perf_counter()
            trainer.evaluate(run["state"], *test)
            run["eval"].append(time.perf_counter() - t)
            run["train_acc"] = metrics["train_acc"]
    out = {"dataset": dataset.name, "train_images": int(spec.steps * spec.batch_size), "epochs_timed": epochs}
    for algebra, run in runs.items():
        epoch_s = statistics.median(run["epochs"])
        eval_s = statistics.median(run["eval"])
        out[algebra] = {
            "first_epoch_s": run["first"], "epoch_s": epoch_s, "epochs_s": run["epochs"],
            "images_per_s": out["train_images"] / epoch_s, "eval_test_s": eval_s,
            "round_40_epochs_s": 40 * epoch_s, "round_40_epochs_with_eval_s": 40 * (epoch_s + eval_s),
            "train_acc_last": run["train_acc"],
        }
        log(f"  lenet300_100 {algebra:4s} MNIST epoch {epoch_s:6.3f} s = {out[algebra]['images_per_s']:8.0f} img/s; "
            f"40 epochs {40 * epoch_s:5.1f} s (+ test eval each epoch: {40 * (epoch_s + eval_s):5.1f} s)")
    return out


def bench_replicas(name: str, algebras, replicas: int, windows: int, steps: int, log,
                   replica_mode: str = "auto") -> dict[str, Any]:
    out = {"model": name, "replicas": replicas, "mode": replica_mode}
    for algebra in algebras:
        single = Setup(name, algebra, steps)
        many = Setup(name, algebra, steps, replicas=replicas, replica_mode=replica_mode)
        out["mode"] = many.trainer.replica_mode
        compile_single, compile_many = single.first_call(), many.first_call()
        single.window(record=False)
        many.window(record=False)
        for _ in range(windows):
            single.window()
            many.window()
        one = single.images_per_call / statistics.median(single.windows)
        together = many.images_per_call / statistics.median(many.windows)
        out[algebra] = {"single_images_per_s": one, "replicas_images_per_s": together, "factor": together / one,
                        "first_call_single_s": compile_single, "first_call_replicas_s": compile_many}
        log(f"  {name:13s} {algebra:4s} R={replicas} ({out['mode']}): {together:9.0f} img/s in total vs {one:9.0f} for one "
            f"replicate at a time: x{together / one:.2f}")
    return out


def torch_reference(python: str, windows: int, log) -> dict[str, Any]:
    """PyTorch eager Conv-4 and LeNet-300-100 steps, by ``python`` (an interpreter with torch)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
    try:
        done = subprocess.run([python, script, str(windows)], capture_output=True, text=True, timeout=1800)
    except OSError as e:
        raise SystemExit(f"error: --torch_python={python} cannot run: {e}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise SystemExit(f"error: --torch_python={python} failed: {last}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    log(f"  PyTorch {out['torch']} eager ({out['threads']} threads): Conv-4 {out['conv4_eager_images_per_s']:.0f} img/s, "
        f"LeNet-300-100 {out['lenet300_100_eager_images_per_s']:,.0f} img/s")
    return out


def bench_references(windows: int, log) -> dict[str, Any]:
    """Same-run yardsticks from the issue: a plain Flax Conv-4 train step (jit, no loop, no masks;
    about 260 img/s when the issue was written) and a bare scanned epoch of a plain real MLP of
    LeNet-300-100's shape on pre-normalised data (about 110,000 img/s then)."""
    import flax.linen as nn
    import optax

    class Conv4(nn.Module):
        @nn.compact
        def __call__(self, x):
            for width in (64, 64, None, 128, 128, None):
                x = nn.max_pool(x, (2, 2), (2, 2)) if width is None else nn.relu(nn.Conv(width, (3, 3))(x))
            x = x.reshape((x.shape[0], -1))
            x = nn.relu(nn.Dense(256)(x))
            return nn.Dense(10)(nn.relu(nn.Dense(256)(x)))

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(300)(x.reshape((x.shape[0], -1))))
            return nn.Dense(10)(nn.relu(nn.Dense(100)(x)))

    def make_step(model, tx):
        def step(p, o, x, y):
            loss, g = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                model.apply({"params": p}, x), y).mean())(p)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o, loss
        return step

    out = {}
    # plain Flax Conv-4, one jitted step per call (shared/env.md's benchmark)
    model, tx = Conv4(), optax.adam(3e-4)
    x = jax.random.normal(jax.random.key(0), (60, 32, 32, 3))
    y = jnp.zeros((60,), jnp.int32)
    p = model.init(jax.random.key(1), x)["params"]
    o = tx.init(p)
    step = jax.jit(make_step(model, tx), donate_argnums=(0, 1))
    for _ in range(3):
        p, o, loss = _sync(step(p, o, x, y))
    times = []
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(5):
            p, o, loss = step(p, o, x, y)
        _sync(loss)
        times.append((time.perf_counter() - t) / 5)
    out["plain_flax_conv4_step"] = {"step_ms": 1e3 * statistics.median(times), "images_per_s": 60 / statistics.median(times)}
    # bare scanned epoch of a plain MLP: batches in order, data already normalised floats
    model, tx = MLP(), optax.adam(1.2e-3)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((1000, 60, 784), np.float32))
    ys = jnp.asarray(rng.integers(0, 10, (1000, 60)).astype(np.int32))
    p = model.init(jax.random.key(1), xs[0])["params"]
    o = tx.init(p)
    mlp_step = make_step(model, tx)

    @jax.jit
    def epoch(p, o, xs, ys):
        def body(c, b):
            p, o, _ = mlp_step(*c, *b)
            return (p, o), None
        return jax.lax.scan(body, (p, o), (xs, ys))[0]

    p, o = _sync(epoch(p, o, xs, ys))
    times = []
    for _ in range(max(3, windows // 2)):
        t = time.perf_counter()
        p, o = _sync(epoch(p, o, xs, ys))
        times.append(time.perf_counter() - t)
    out["bare_mlp_epoch"] = {"epoch_s": statistics.median(times), "images_per_s": 60000 / statistics.median(times)}
    log(f"  plain Flax Conv-4 jit step: {out['plain_flax_conv4_step']['images_per_s']:.0f} img/s; "
        f"bare scanned MLP epoch: {out['bare_mlp_epoch']['images_per_s']:,.0f} img/s")
    return out


# ---------------------------------------------------------------------------------------------
# report


def markdown(result: dict[str, Any]) -> str:
    peak = result["peak"]["gflops"]
    rows = []
    for name, m in result["models"].items():
        for algebra in (a for a in ALGEBRAS if a in m):
            r = m[algebra]
            ratio = f"{m['quat_real_time_ratio']:.3f}" if algebra == "quat" and "quat_real_time_ratio" in m else ""
            xla = ((f"{r['xla_conv_images_per_s']:,.0f}", f"{r['speedup_over_xla_conv']:.2f}") if "xla_conv_images_per_s" in r
                   else ("", ""))
            rows.append((name, algebra, r["cpu_conv"], f"{r['compile_s']:.1f}", f"{r['step_ms']:.2f}", f"{r['images_per_s']:,.0f}",
                         f"{r['train_gflop_per_image']:.4f}", f"{r['gflops']:.1f}", f"{100 * r['peak_fraction']:.1f}", ratio, *xla))
    lines = [markdown_table(("model", "algebra", "convolutions", "compile (s)", "ms/step", "images/s", "GFLOP/image (train)",
                             "GFLOP/s", "% of matmul peak", "quat/real time", "images/s with XLA convolutions", "speed-up"), rows)]
    lines.append(f"\nMatmul peak: {peak:.0f} GFLOP/s ({result['peak']['n']}² float32 under jit, median).")
    if result.get("references"):
        ref = result["references"]
        lines.append(f"Same-run references: plain Flax Conv-4 jit step (no loop, no masks) "
                     f"{ref['plain_flax_conv4_step']['images_per_s']:.0f} img/s; bare scanned epoch of a plain real MLP "
                     f"784-300-100-10 on pre-normalised data {ref['bare_mlp_epoch']['images_per_s']:,.0f} img/s.")
    if result.get("torch"):
        t = result["torch"]
        lines.append(f"PyTorch {t['torch']} eager, same run, {t['threads']} threads (`experiments/torch_reference.py`): "
                     f"Conv-4 {t['conv4_eager_images_per_s']:.0f} img/s, LeNet-300-100 {t['lenet300_100_eager_images_per_s']:,.0f} img/s "
                     "(bare train steps, no data handling, no masks).")
    if result.get("layers"):
        backends = [b for b in ("onednn", "xla") if f"{b}_forward_gflops" in result["layers"][0]]
        ops = ("forward", "input_grad", "kernel_grad")
        lines += ["", "Conv-4's convolutions, batch 60, GFLOP/s (median; " + " / ".join(backends) + "):", "",
                  markdown_table(("layer", "GFLOP", "forward", "input gradient", "kernel gradient"),
                                 [(row["layer"], f"{row['gflop']:.2f}",
                                   *(" / ".join(f"{row[f'{b}_{op}_gflops']:.0f}" for b in backends) for op in ops))
                                  for row in result["layers"]])]
    if result.get("epochs"):
        e = result["epochs"]
        lines += ["", f"LeNet-300-100 on {e['dataset']}, whole epochs of {e['train_images']:,} images (median of {e['epochs_timed']}):", "",
                  markdown_table(("algebra", "epoch (s)", "images/s", "40 epochs (s)", "40 epochs + test eval each epoch (s)"),
                                 [(a, f"{e[a]['epoch_s']:.3f}", f"{e[a]['images_per_s']:,.0f}", f"{e[a]['round_40_epochs_s']:.1f}",
                                   f"{e[a]['round_40_epochs_with_eval_s']:.1f}") for a in ALGEBRAS if a in e])]
    if result.get("replicas"):
        lines += ["", "R replicates in one compiled epoch vs one at a time (total images/s):", "",
                  markdown_table(("model", "R", "replicates share a device by", "algebra", "one replicate", "R at once", "factor"),
                                 [(rep["model"], rep["replicas"], rep["mode"], a, f"{rep[a]['single_images_per_s']:,.0f}",
                                   f"{rep[a]['replicas_images_per_s']:,.0f}", f"{rep[a]['factor']:.2f}")
                                  for rep in result["replicas"] for a in ALGEBRAS if a in rep])]
    env = result["environment"]
    lines.append(f"\n{env.get('cpu', '?')}; CPU convolutions: {env.get('cpu_conv', 'xla')}. "
                 f"jax {env['jax']}, {env['cpu_count']} CPUs, devices {env['devices']}, XLA_FLAGS={env['xla_flags']!r}, "
                 f"load average before/after {env['load_before']} / {env['load_after']}.")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--algebras", default=",".join(ALGEBRAS))
    p.add_argument("--windows", type=int, default=7, help="timed windows per model and algebra (median)")
    p.add_argument("--window_steps", type=int, default=None, help="steps per window (default: per model, ~1 s)")
    p.add_argument("--peak_size", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=3, help="timed whole MNIST epochs per algebra (0: skip)")
    p.add_argument("--train_subset", type=int, default=None, help="MNIST training images (default: all 60,000)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--synthetic_epochs", action="store_true", help="random MNIST-shaped data instead of MNIST")
    p.add_argument("--replicas", type=int, default=5, help="R for the replicate benchmark (0: skip)")
    p.add_argument("--replica_models", default="lenet300_100", help="models for the replicate benchmark")
    p.add_argument("--replica_modes", default="auto",
                   help="how replicates sharing a device run: auto | unroll | vmap (comma-separated to compare)")
    p.add_argument("--no_references", action="store_true", help="skip the plain Flax Conv-4 / bare MLP yardsticks")
    p.add_argument("--torch_python", default=None,
                   help="a Python interpreter with torch: also time PyTorch eager Conv-4 / LeNet-300-100 in this run")
    p.add_argument("--layers", action="store_true", help="time each Conv-4 convolution, oneDNN vs XLA")
    p.add_argument("--no_xla_conv", action="store_true", help="with oneDNN, skip timing the models with XLA's convolutions too")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse(sys.argv[1:] if argv is None else argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    algebras = [a for a in args.algebras.split(",") if a]
    result: dict[str, Any] = {"environment": {
        "jax": jax.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "devices": [str(d) for d in jax.local_devices()], "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_conv": onednn.cpu_conv(), "cpu": _cpu_name(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_before": [round(x, 2) for x in os.getloadavg()],
    }}
    log(f"matmul peak ({args.peak_size}² float32)")
    result["peak"] = matmul_peak(args.peak_size, 7)
    log(f"  {result['peak']['gflops']:.0f} GFLOP/s")
    if not args.no_references:
        log("references")
        result["references"] = bench_references(args.windows, log)
    if args.torch_python:
        result["torch"] = torch_reference(args.torch_python, args.windows, log)
    if args.layers:
        log("Conv-4 convolutions")
        result["layers"] = bench_layers(args.windows, log)
    log("masked train step, batch 60 (median window)")
    result["models"] = {}
    for name in [m for m in args.models.split(",") if m]:
        steps = args.window_steps or WINDOW_STEPS[name]
        result["models"][name] = bench_model(name, algebras, args.windows, steps, result["peak"]["gflops"], log,
                                             not args.no_xla_conv)
    if args.epochs:
        log("whole MNIST epochs")
        result["epochs"] = bench_epochs(algebras, args.epochs, args.data_dir, args.train_subset, log, args.synthetic_epochs)
    if args.replicas:
        log("replicates")
        result["replicas"] = [
            bench_replicas(name, algebras, args.replicas, args.windows, args.window_steps or WINDOW_STEPS[name] // 2, log,
                           mode)
            for name in args.replica_models.split(",") if name for mode in args.replica_modes.split(",") if mode]
    result["environment"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    table = markdown(result)
    print("\n" + table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return result


if __name__ == "__main__":
    main()
