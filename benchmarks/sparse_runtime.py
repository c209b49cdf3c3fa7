"""What the numpy runtime's paths cost on pruned models, against dense BLAS and the machine's limit.

``python -m experiments.bench_deploy`` times, on export files or on synthetic pruned models
(random weights, pruned layer by layer to each density, whole numbers for hypercomplex models),
``Model.predict`` on random uint8 images (preprocessing included) by each path of
:func:`qsparse.deploy.load`:

* ``dense``: every kernel rebuilt whole, numpy/BLAS (``kernels="dense"``);
* ``scipy``: scipy's CSR products, numba hidden (what the runtime does without the ``fast``
  extra, and did before its kernels);
* ``numba``: the compiled kernels for every layer (``kernels="bsr"``: blocks per stored number
  where the algebra allows, CSR otherwise);
* ``auto``: the default, dense or sparse per layer and batch;
* ``jax`` (synthetic models only): the JAX model of the same weights, jit-compiled, on the same
  uint8 images (normalisation included, numpy images in, logits out).

``best dense`` is the faster of ``dense`` and ``jax``; ``auto / best`` how many times faster
``auto`` runs than it (the runtime's goals are stated against it: docs/deployment.md).

Each as the median of ``repeats`` calls after two warm-up calls (the paths' calls timed in turn,
in :data:`WINDOWS` rounds), in ms and images/s, and against the limit: the longer of the
surviving weights' multiply-adds (a hypercomplex weight counting as the real multiply-adds it
feeds, a convolution weight once per output position) at the machine's float32 matmul rate
(:func:`benchmarks.harness.matmul_peak`, jit JAX) and the bytes a call must move (the stored
kernels, the images and the logits; a layer's input and output activations) at its copy
bandwidth (:func:`benchmarks.harness.memory_bandwidth`), both measured in the same run. With
``layers``, every layer of the model's top level is timed alone too, by each path, on the input
a forward gives it (:meth:`qsparse.deploy.runtime.Model.layer_calls`; conversions between
layouts not included). Timings mean something only on an otherwise idle machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np

from benchmarks.harness import (
    cpu_name,
    dataset_of,
    load_average,
    matmul_peak,
    memory_bandwidth,
    timed,
)
from qsparse import augment, deploy, export, models, pruning
from qsparse import masks as M
from qsparse.deploy import kernels, planes

IMPLS = ("dense", "scipy", "numba", "auto", "jax")
SMALL = {  # widths for a quick check that the benchmark runs (not a measurement)
    "lenet300_100": dict(features=(24, 12)),
    "conv4": dict(stages=((8, 8), (8, 8)), dense_features=(16, 16)),
}


@dataclasses.dataclass(frozen=True)
class Options:
    """What to time (``files``: export files timed as they are, beside the synthetic models)."""

    models: tuple[str, ...] = ("lenet300_100", "conv4")
    algebras: tuple[str, ...] = ("real", "quat")
    densities: tuple[float, ...] = (1.0, 0.2, 0.05, 0.02)
    batches: tuple[int, ...] = (1, 256)
    threads: tuple[int | None, ...] = (None,)
    repeats: int = 20
    peak_size: int = 1024
    files: tuple[str, ...] = ()
    small: bool = False
    layers: bool = False
    bandwidth_mib: int = 256

    def check(self) -> None:
        """ValueError naming the first bad setting and the valid choices."""
        known = {"models": list(models.PAPER_MODELS), "algebras": models.algebra_names()}
        if self.small:
            known["models"] = list(SMALL)
        for field, valid in known.items():
            for value in getattr(self, field):
                if value not in valid:
                    raise ValueError(f"{field}: {value!r} is not valid; choose from {valid}")
        if not all(0 < d <= 1 for d in self.densities):
            raise ValueError(f"densities: {list(self.densities)}; each must be in (0, 1]")
        sizes = (self.repeats, self.peak_size, self.bandwidth_mib)
        if min(self.batches, default=1) < 1 or min(sizes) < 1:
            raise ValueError("batches, repeats, peak_size and bandwidth_mib must be at least 1")
        for threads in self.threads:
            kernels.set_threads(threads)
        for f in self.files:
            if not Path(f).is_file():
                raise ValueError(f"files: {f} is not a file")


def random_params(model, image_shape, seed: int = 0) -> dict:
    """Params of ``model`` drawn with numpy (kernels ~ N(0, 1/fan_in)): any values time alike,
    and the models' initialisers would compile for seconds each."""
    shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), image_shape))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        scale = 0.1 if M.path_str(path).endswith("bias") else 1 / math.sqrt(math.prod(s.shape[:-1]))
        return (scale * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def synthetic_file(
    path: Path, name: str, algebra: str, density: float, small: bool = False, seed: int = 0
) -> Path:
    """An export file of model ``name`` in ``algebra`` with random weights pruned layer by layer
    to ``density`` (whole numbers for hypercomplex layers); ``small``: :data:`SMALL` widths."""
    return synthetic(path, name, algebra, density, small, seed)[0]


def synthetic(
    path: Path, name: str, algebra: str, density: float, small: bool = False, seed: int = 0
) -> tuple[Path, Callable]:
    """:func:`synthetic_file` and the jit JAX forward of the same weights (uint8 images in)."""
    model = models.create(name, algebra, 10, **(SMALL[name] if small else {}))
    spec = dataset_of(name)
    params = random_params(model, spec.image_shape, seed)
    masks = M.ones(params)
    if density < 1:
        masks = pruning.prune(  # a tiny layer may lose every weight: it still times
            params, masks, 1 - density, method="layerwise", grouping="number", allow_empty=True
        )
    entries = export.export_entries(
        model,
        M.apply(params, masks),
        masks,
        input_shape=spec.image_shape,
        mean=spec.mean,
        std=spec.std,
        check_images=0,
    )
    deploy.save(path, entries, overwrite=True)
    weights = jax.device_put(M.apply(params, masks))

    @jax.jit
    def forward(weights, images):  # weights an argument: XLA sees no constants to fold
        return model.apply({"params": weights}, augment.normalize(images, spec.mean, spec.std))

    return path, lambda images: forward(weights, images).block_until_ready()


@contextlib.contextmanager
def numba_hidden() -> Iterator[None]:
    """Models loaded inside take the runtime's fallback, as where numba is not installed."""
    available = kernels.AVAILABLE
    kernels.AVAILABLE = False
    try:
        yield
    finally:
        kernels.AVAILABLE = available


def load(path: Path, impl: str, threads: int | None) -> deploy.Model:
    """The file's model computing by ``impl`` (:data:`IMPLS`)."""
    if impl == "scipy":
        with numba_hidden():
            return deploy.load(path, kernels="csr", threads=threads)
    choice = {"dense": "dense", "numba": "bsr", "auto": "auto"}[impl]
    return deploy.load(path, kernels=choice, threads=threads)


def multiply_adds(model: deploy.Model) -> tuple[float, float]:
    """(dense, surviving) real multiply-adds per image of a model loaded with sparse paths."""
    dense = surviving = 0.0
    for layer in model.layers:
        m, k = deploy.matrices.real_shape(layer.structure, layer.shape)
        dense += m * k * layer.columns
        surviving += m * k * layer.columns * layer.density
    return dense, surviving


WINDOWS = 5  # rounds in which every path's calls are timed in turn


def median_seconds(calls: dict, repeats: int) -> dict:
    """The median wall time of ``repeats`` calls of each function in ``calls``, after two
    warm-up calls each: in :data:`WINDOWS` rounds, each function's calls timed in a window of
    their own in turn, so that the machine's drift (its rates moved by a third within minutes on
    the development machine) reaches every path alike. Each window starts with an untimed call:
    the call right after another path's ran up to twice as slow (BLAS's and numba's threads
    still spinning for the cores)."""
    times: dict = {name: [] for name in calls}
    for w in range(WINDOWS):
        for name, fn in calls.items():
            times[name] += timed(fn, max(1, repeats // WINDOWS), warmup=3 if w == 0 else 1)
    return {name: statistics.median(t) for name, t in times.items()}


def limit(macs: float, nbytes: float, limits: dict) -> tuple[float, str]:
    """(seconds, bound) at best for ``macs`` multiply-adds and ``nbytes`` bytes moved: the
    longer of the two at the measured rates (``limits``: ``gflops``, ``gbs``)."""
    flops_s, bytes_s = 2 * macs / limits["gflops"] / 1e9, nbytes / limits["gbs"] / 1e9
    return (flops_s, "flops") if flops_s >= bytes_s else (bytes_s, "bytes")


def _row(
    label: dict, impl: str, seconds: float, batch: int, macs: float, nbytes: float, limits: dict
) -> dict:
    best, bound = limit(macs * batch, nbytes, limits)
    return {
        **label,
        "batch": batch,
        "impl": impl,
        "ms": 1e3 * seconds,
        "images_per_s": batch / seconds,
        "macs": macs,
        "gmacs_per_s": macs * batch / seconds / 1e9,
        "of_peak": 2 * macs * batch / seconds / 1e9 / limits["gflops"],
        "bytes": nbytes,
        "limit_ms": 1e3 * best,
        "bound": bound,
        "of_limit": best / seconds,
    }


def _activation_bytes(x) -> int:
    """An activation's bytes (planes: their positions, rings included)."""
    if isinstance(x, planes.Planes):
        return x.data.shape[0] * x.n * (x.h + 2) * (x.w + 2) * x.data.itemsize
    return x.nbytes


def time_layers(
    models_: dict, images: np.ndarray, options: Options, label: dict, limits: dict
) -> list[dict]:
    """One row per layer (the model's top level) and implementation: each layer alone."""
    calls, rows = {}, []
    for impl, model in models_.items():
        for layer, x, call in model.layer_calls(images):
            calls.setdefault(layer.name, {})[impl] = (layer, x, call)
    for name, by_impl in calls.items():
        seconds = median_seconds({impl: c for impl, (*_, c) in by_impl.items()}, options.repeats)
        for impl, (layer, x, call) in by_impl.items():
            m, k = deploy.matrices.real_shape(layer.structure, layer.shape)
            macs = m * k * layer.columns * layer.storage["alive"] / layer.storage["total"]
            moved = _activation_bytes(x) + _activation_bytes(call())
            nbytes = layer.storage["bytes"] + layer.bias.nbytes + moved
            head = {**label, "layer": name}
            rows.append(_row(head, impl, seconds[impl], len(images), macs, nbytes, limits))
    return rows


def time_file(
    path: Path, options: Options, limits: dict, label: dict, jax_forward=None
) -> list[dict]:
    """One row per implementation, batch and thread count for the model in ``path`` (``jax``
    where ``jax_forward`` is given); with ``options.layers`` one per layer too."""
    impls = [i for i in IMPLS if i != "jax" and (i != "numba" or kernels.AVAILABLE)]
    reference = load(path, "numba" if kernels.AVAILABLE else "scipy", None)
    dense_macs, macs = multiply_adds(reference)
    header, _ = deploy.read(path)
    alive = sum(op["storage"]["alive"] for op in header["ops"] if "storage" in op)
    total = sum(op["storage"]["total"] for op in header["ops"] if "storage" in op)
    rng = np.random.default_rng(0)
    rows = []
    for threads in options.threads:
        models_ = {impl: load(path, impl, threads) for impl in impls}
        head = {**label, "density": alive / total, "threads": kernels.set_threads(threads)}
        for batch in options.batches:
            images = rng.integers(0, 256, (batch, *reference.input_shape), np.uint8)
            calls = {
                impl: functools.partial(model.predict, images, batch_size=batch)
                for impl, model in models_.items()
            }
            if jax_forward is not None:
                calls["jax"] = functools.partial(jax_forward, images)
            nbytes = header["bytes"]["kernels"] + images.nbytes + 4 * batch * reference.num_classes
            for impl, seconds in median_seconds(calls, options.repeats).items():
                row = _row(head, impl, seconds, batch, macs, nbytes, limits)
                rows.append({**row, "dense_macs": dense_macs})
            if options.layers:
                rows += time_layers(models_, images, options, head, limits)
    return rows


def run(options: Options) -> dict:
    """Every file and synthetic model of ``options``, timed: ``{"machine", "peak", "rows"}``."""
    peak = matmul_peak(options.peak_size, repeats=5)
    bandwidth = memory_bandwidth(options.bandwidth_mib, repeats=5)
    limits = {"gflops": peak["gflops"], "gbs": bandwidth["gbs"]}
    machine = {"cpu": cpu_name(), "load_before": load_average(), "numba": kernels.AVAILABLE}
    rows = []
    for f in options.files:
        rows += time_file(Path(f), options, limits, {"model": Path(f).name, "algebra": ""})
    with tempfile.TemporaryDirectory() as tmp:
        for name in options.models:
            for algebra in options.algebras:
                for density in options.densities:
                    path = Path(tmp) / f"{name}_{algebra}_{density}.npz"
                    _, forward = synthetic(path, name, algebra, density, options.small)
                    label = {"model": name, "algebra": algebra}
                    rows += time_file(path, options, limits, label, forward)
    machine["load_after"] = load_average()
    return {
        "machine": machine,
        "peak_gflops": peak["gflops"],
        "bandwidth_gbs": bandwidth["gbs"],
        "rows": rows,
    }


def table(result: dict) -> str:
    """The rows as Markdown, one line per model (then per layer, where timed), density, batch
    and thread count, the paths side by side: ms, images/s, and the limit's time as a percentage
    of theirs; then the limit (ms, and whether multiply-adds or bytes bound it), the best dense
    path's ms and how many times faster ``auto`` is (a layer's best dense path: ``dense``)."""
    m = result["machine"]
    lines = [
        f"CPU {m['cpu']}, numba {m['numba']}, float32 matmul peak "
        f"{result['peak_gflops']:.1f} GFLOP/s, copy bandwidth {result['bandwidth_gbs']:.1f} GB/s, "
        f"load {m['load_before']} -> {m['load_after']}",
    ]
    keys = ("model", "algebra", "density", "batch", "threads")
    for layers in (False, True):
        rows = [r for r in result["rows"] if ("layer" in r) == layers]
        if not rows:
            continue
        head = "| model | algebra | " + ("layer | " if layers else "")
        lines += [
            "",
            head
            + "density | batch | threads | "
            + " | ".join(f"{i} ms | {i} img/s | {i} % limit" for i in IMPLS)
            + " | limit ms | bound | best dense ms | auto / best |",
            "|---" * (9 + layers + 3 * len(IMPLS)) + "|",
        ]
        groups: dict[tuple, dict[str, dict]] = {}
        for row in rows:
            key = tuple(row[k] for k in keys) + ((row["layer"],) if layers else ())
            groups.setdefault(key, {})[row["impl"]] = row
        for key, by_impl in groups.items():
            model, algebra, density, batch, threads = key[:5]
            cells = [
                f"{r['ms']:.3f} | {r['images_per_s']:.0f} | {100 * r['of_limit']:.1f}"
                if (r := by_impl.get(i))
                else "- | - | -"
                for i in IMPLS
            ]
            best = min(by_impl[i]["ms"] for i in ("dense", "jax") if i in by_impl)
            auto = by_impl["auto"]
            cells.append(f"{auto['limit_ms']:.4f} | {auto['bound']}")
            cells.append(f"{best:.3f} | {best / auto['ms']:.2f}x")
            layer = f"{key[5]} | " if layers else ""
            lines.append(
                f"| {model} | {algebra} | {layer}{density:.1%} | {batch} | {threads} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)
