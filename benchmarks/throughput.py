"""Images per second of qsparse's training: masked train steps, whole epochs, replicates at once.

Everything timed runs through :class:`qsparse.train.Trainer`, the code IMP trains with, and
compares like with like in one process: the windows of a model's algebras are interleaved
round-robin, each round starting one algebra later (and so are XLA's and oneDNN's convolutions,
or one replicate and R at once), so a ratio is measured under the same machine conditions even
when absolute speeds drift or other processes share the CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import Setup, dataset_of
from benchmarks.references import TorchReference
from qsparse import cpu, models, train
from qsparse import data as qdata
from qsparse import masks as qmasks
from qsparse.cpu import onednn
from qsparse.data import DATASETS

Log = Callable[[str], None]

# Steps per timed window, by model: enough that a window is long against timer resolution and
# dispatch, few enough that several windows per model stay cheap on a small CPU.
WINDOW_STEPS = {
    "lenet300_100": 1000,
    "lenet12": 1000,
    "conv2": 8,
    "conv4": 5,
    "conv6": 4,
    "resnet20": 2,
    "resnet18": 2,
}


def bench_model(
    name: str,
    algebras: Sequence[str],
    windows: int,
    steps: int,
    peak: float,
    log: Log,
    compare_xla_conv: bool = False,
    torch: TorchReference | None = None,
) -> dict[str, Any]:
    """The masked train step of ``name`` per algebra: median window, GFLOP/s, share of ``peak``,
    and the step-time ratios of :func:`time_ratios`.

    GFLOP/s count 3 x the forward FLOPs (forward, input gradient, weight gradient). With
    ``compare_xla_conv`` and oneDNN convolutions, the same steps with XLA's convolutions too.
    With ``torch``, PyTorch eager windows of the same model and step count join the interleaved
    windows (``torch_eager_*`` in the result; each algebra's ``over_torch_eager``).
    """
    has_conv = _has_conv(name)
    backends = [onednn.cpu_conv() if has_conv else "none"]
    if has_conv and compare_xla_conv and backends[0] != "xla":
        backends.append("xla")
    setups, first = {}, {}
    for backend in backends:
        for algebra in algebras:
            # the backend is chosen when the epoch is traced, in the first call
            with onednn.using("xla" if backend == "none" else backend):
                s = setups[algebra, backend] = Setup(name, algebra, steps)
                first[algebra, backend] = s.first_call()
            s.window(record=False)  # warm-up
    order: list[Any] = list(setups.values())
    eager = _TorchWindows(torch, name, steps) if torch and name in torch.MODELS else None
    if eager:
        order.append(eager)
    for w in range(windows):  # interleaved: ratios are measured under the same conditions
        for s in order[w % len(order) :] + order[: w % len(order)]:
            s.window()
    out: dict[str, Any] = {}
    for (algebra, backend), s in setups.items():
        median = statistics.median(s.windows)
        img_s = s.images_per_call / median
        if backend != backends[0]:
            r = out[algebra]
            r[f"{backend}_conv_images_per_s"] = img_s
            r[f"speedup_over_{backend}_conv"] = r["images_per_s"] / img_s
            log(
                f"  {name:13s} {algebra:9s} {1e3 * median / steps:9.2f} ms/step {img_s:10.0f} img/s"
                f" with {backend} convolutions: x{r[f'speedup_over_{backend}_conv']:.2f}"
                f" for {backends[0]}"
            )
            continue
        train_flops = 3 * s.fwd_flops
        r = out[algebra] = {
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
        log(
            f"  {name:13s} {algebra:9s} {r['step_ms']:9.2f} ms/step {img_s:10.0f} img/s "
            f"{r['gflops']:7.1f} GFLOP/s ({100 * r['peak_fraction']:4.1f}% of peak) "
            f"compile {r['compile_s']:5.1f} s"
        )
    if eager:
        out.update(eager.result())
        torch_rate = out["torch_eager_images_per_s"]
        log(f"  {name:13s} {'PyTorch':9s} {torch_rate:10.0f} img/s eager")
        for algebra in algebras:
            out[algebra]["over_torch_eager"] = out[algebra]["images_per_s"] / torch_rate
            log(f"  {name:13s} {algebra:9s} {out[algebra]['over_torch_eager']:9.2f} x PyTorch's")
    ratios = time_ratios(out)
    for algebra in out:
        if f"{algebra}_quat_time_ratio" in ratios:
            ratio = ratios[f"{algebra}_quat_time_ratio"]
            log(f"  {name:13s} {algebra:9s} {ratio:9.3f} x quat's step time")
    out.update(ratios)
    return out


class _TorchWindows:
    """PyTorch eager windows of a model, in the interface of :class:`Setup` that the
    interleaving loop uses."""

    def __init__(self, torch: TorchReference, name: str, steps: int):
        self.torch, self.name, self.steps = torch, name, steps
        self.windows: list[float] = []
        self.batch = torch.window(name, steps)[1]  # warm-up, untimed

    def window(self) -> float:
        seconds = self.torch.window(self.name, self.steps)[0]
        self.windows.append(seconds)
        return seconds

    def result(self) -> dict[str, Any]:
        """``torch_eager_*`` entries of a model's result: windows, step time, images/s."""
        median = statistics.median(self.windows)
        return {
            "torch_eager_windows_s": self.windows,
            "torch_eager_step_ms": 1e3 * median / self.steps,
            "torch_eager_images_per_s": self.batch * self.steps / median,
        }


def time_ratios(steps: dict[str, Any]) -> dict[str, float]:
    """Step-time ratios of :func:`bench_model`'s result ``steps`` (algebra -> ``step_ms``), all
    to the quaternion step: ``quat_real_time_ratio`` (quat / real, as results/ holds it) and
    ``<algebra>_quat_time_ratio`` (algebra / quat) for every other hypercomplex algebra."""
    if "quat" not in steps:
        return {}
    quat = steps["quat"]["step_ms"]
    out = {"quat_real_time_ratio": quat / steps["real"]["step_ms"]} if "real" in steps else {}
    for algebra, r in steps.items():
        if algebra not in ("real", "quat") and isinstance(r, dict):
            out[f"{algebra}_quat_time_ratio"] = r["step_ms"] / quat
    return out


def _has_conv(name: str) -> bool:
    model = models.create(name)
    shape = dataset_of(name).image_shape
    variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), shape))
    return cpu.has_conv(model.apply, variables["params"], shape, variables.get("batch_stats"))


def synthetic_mnist(n: int) -> qdata.Dataset:
    """Random images of MNIST's shape and normalisation: the epoch code path, no dataset needed."""
    spec = DATASETS["mnist"]
    rng = np.random.default_rng(0)

    def images(k: int) -> np.ndarray:
        return rng.integers(0, 256, (k, *spec.image_shape), dtype=np.uint8)

    def labels(k: int) -> np.ndarray:
        return rng.integers(0, spec.num_classes, k).astype(np.int32)

    return qdata.Dataset(
        "synthetic_mnist",
        spec.num_classes,
        spec.mean,
        spec.std,
        spec.augment,
        images(n),
        labels(n),
        images(0),
        labels(0),
        images(1000),
        labels(1000),
    )


def bench_epochs(
    algebras: Sequence[str],
    epochs: int,
    data_dir: str | None,
    train_subset: int | None,
    log: Log,
    synthetic: bool = False,
) -> dict[str, Any]:
    """Whole LeNet-300-100 epochs on MNIST, data handling included, real and quaternion
    interleaved; and the projected wall time of a 40-epoch IMP round."""
    if synthetic:
        dataset = synthetic_mnist(train_subset or 60000)
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
        tx = train.make_optimizer("adam", 1.2e-3)
        state = train.stack([train.create_train_state(model, params, qmasks.ones(params), tx)])
        t = time.perf_counter()
        state, _ = trainer.train_epoch(state, *train_data, train.stack([jax.random.key(0)]))
        first = time.perf_counter() - t
        trainer.evaluate(state, *test)  # compiles the evaluation
        runs[algebra] = {"state": state, "first": first, "epochs": [], "eval": []}
    for e in range(epochs):
        for run in runs.values():
            t = time.perf_counter()
            run["state"], metrics = trainer.train_epoch(
                run["state"], *train_data, train.stack([jax.random.key(e + 1)])
            )
            run["epochs"].append(time.perf_counter() - t)
            t = time.perf_counter()
            trainer.evaluate(run["state"], *test)
            run["eval"].append(time.perf_counter() - t)
            run["train_acc"] = metrics["train_acc"][0]
    out: dict[str, Any] = {
        "dataset": dataset.name,
        "train_images": int(spec.steps * spec.batch_size),
        "epochs_timed": epochs,
    }
    for algebra, run in runs.items():
        epoch_s = statistics.median(run["epochs"])
        eval_s = statistics.median(run["eval"])
        out[algebra] = {
            "first_epoch_s": run["first"],
            "epoch_s": epoch_s,
            "epochs_s": run["epochs"],
            "images_per_s": out["train_images"] / epoch_s,
            "eval_test_s": eval_s,
            "round_40_epochs_s": 40 * epoch_s,
            "round_40_epochs_with_eval_s": 40 * (epoch_s + eval_s),
            "train_acc_last": run["train_acc"],
        }
        log(
            f"  lenet300_100 {algebra:9s} MNIST epoch {epoch_s:6.3f} s = "
            f"{out[algebra]['images_per_s']:8.0f} img/s; 40 epochs {40 * epoch_s:5.1f} s "
            f"(+ test eval each epoch: {40 * (epoch_s + eval_s):5.1f} s)"
        )
    return out


def bench_replicates(
    name: str,
    algebras: Sequence[str],
    replicates: int,
    windows: int,
    steps: int,
    log: Log,
    replicate_mode: str = "auto",
) -> dict[str, Any]:
    """R replicates in one compiled epoch (``Trainer(replicates=R)``) against one at a time, in
    total images/s: what training IMP's replicates together buys on this machine. (The result's
    keys keep the names ``replicas`` and ``replicas_images_per_s`` that results/ holds.)"""
    out: dict[str, Any] = {"model": name, "replicas": replicates, "mode": replicate_mode}
    for algebra in algebras:
        single = Setup(name, algebra, steps)
        many = Setup(name, algebra, steps, replicates=replicates, replicate_mode=replicate_mode)
        out["mode"] = many.trainer.replicate_mode
        compile_single, compile_many = single.first_call(), many.first_call()
        single.window(record=False)
        many.window(record=False)
        for _ in range(windows):
            single.window()
            many.window()
        one = single.images_per_call / statistics.median(single.windows)
        together = many.images_per_call / statistics.median(many.windows)
        out[algebra] = {
            "single_images_per_s": one,
            "replicas_images_per_s": together,
            "factor": together / one,
            "first_call_single_s": compile_single,
            "first_call_replicas_s": compile_many,
        }
        log(
            f"  {name:13s} {algebra:9s} R={replicates} ({out['mode']}): {together:9.0f} img/s in "
            f"total vs {one:9.0f} for one replicate at a time: x{together / one:.2f}"
        )
    return out
