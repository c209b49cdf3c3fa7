"""Export and the numpy runtime of the ResNets: residual blocks, strided and 1x1 convolutions,
average pool and batch norm in eval mode.

A tiny ResNet (two stages of one block, the second strided with a projection shortcut) with random
weights, random running statistics (not the initial ones) and about half its kernel weights
pruned: the exported file's logits are the JAX model's in eval mode, for real and quaternion
models and every batch-norm form, by every kernel path and by ONNX; batch norm is folded into
the convolution exactly where that keeps the kernel's structure (real models, ``shared``), and
folding leaves pruned weights exactly zero. A real tiny run's round exports and reproduces its
test accuracy.
"""

import json
import math

import jax
import numpy as np
import pytest
from test_deploy import assert_close, pruned, write
from test_deploy import images as random_images

from qsparse import augment, data, deploy, export, lottery, models, ops, resnets, rundir, train
from qsparse import masks as M
from qsparse.config import Config
from qsparse.deploy import onnx as qonnx

SHAPE = (8, 8, 3)  # CIFAR-shaped images at reduced size
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
TINY = {"stage_sizes": (1, 1), "widths": (8, 16), "stem": 8}
CASES = [
    ("real", "split", "basic"),
    ("real", "whiten", "basic"),
    ("quat", "split", "basic"),
    ("quat", "shared", "bottleneck"),
    ("quat", "whiten", "basic"),
]


def random_stats(path: str, shape: tuple, rng) -> np.ndarray:
    """Running statistics far from the initial ones: means ~ N(0, 0.3^2), variances in
    [0.5, 2], covariances ``A A^T / n + 0.5 I``."""
    if path.endswith("cov"):
        a = rng.standard_normal(shape)
        return (a @ a.transpose(0, 2, 1) / shape[-1] + 0.5 * np.eye(shape[-1])).astype(np.float32)
    if path.endswith("var"):
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    return (0.3 * rng.standard_normal(shape)).astype(np.float32)


def random_param(path: str, shape: tuple, rng) -> np.ndarray:
    """Kernels ~ N(0, 1/fan_in) (component kernels: fan-in of the n components), batch-norm
    scales and gammas around 1 with either sign, biases ~ N(0, 0.1^2)."""
    name = path.split("/")[-1]
    if name in M.KERNEL_NAMES:
        fan_in = math.prod(shape[1:-1]) * shape[0] if name != "kernel" else math.prod(shape[:-1])
        return (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)
    if name in ("scale", "gamma"):
        return (rng.choice([-1, 1], shape) * rng.uniform(0.5, 1.5, shape)).astype(np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def tiny(algebra: str, form: str, block: str = "basic", seed: int = 0):
    """(model, pruned params, masks, batch stats): about half of every kernel pruned."""
    model = resnets.create("resnet20", algebra, 8, bn_form=form, block=block, **TINY)
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), SHAPE))
    rng = np.random.default_rng(seed)

    def draw(tree, fn):
        return jax.tree_util.tree_map_with_path(lambda p, s: fn(M.path_str(p), s.shape, rng), tree)

    params = draw(shapes["params"], random_param)
    stats = draw(shapes["batch_stats"], random_stats)
    masks = jax.tree_util.tree_map_with_path(
        lambda p, a: (
            rng.random(a.shape) < 0.5
            if M.path_str(p).split("/")[-1] in M.KERNEL_NAMES
            else np.ones(a.shape, bool)
        ),
        params,
    )
    return model, M.apply(params, masks), masks, stats


def entries(model, params, masks, stats, fold: bool = True) -> dict:
    return export.export_entries(
        model,
        params,
        masks,
        input_shape=SHAPE,
        mean=MEAN,
        std=STD,
        batch_stats=stats,
        check_images=0,
        fold=fold,
    )


def images(n: int = 6, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), np.uint8)


def jax_logits(model, params, stats, x: np.ndarray) -> np.ndarray:
    variables = {"params": params, "batch_stats": stats}
    return np.asarray(model.apply(variables, augment.normalize(x, MEAN, STD), train=False))


def header_of(e: dict) -> dict:
    return json.loads(e[deploy.HEADER].tobytes())


# -- the runtime against JAX ---------------------------------------------------------------------


@pytest.mark.parametrize("algebra,form,block", CASES)
def test_runtime_gives_the_jax_models_eval_logits(tmp_path, algebra, form, block):
    """Every kernel path gives JAX's eval-mode logits; the batch norms fold exactly where the
    kernel keeps its structure (a real model, or ``shared``) and stay ops elsewhere."""
    model, params, masks, stats = tiny(algebra, form, block)
    x = images()
    ref = jax_logits(model, params, stats, x)
    path = tmp_path / "m.npz"
    deploy.save(path, entries(model, params, masks, stats))
    for kernels in deploy.KERNELS:
        assert_close(deploy.load(path, kernels=kernels).predict(x), ref)
    walked = list(ops.walk(deploy.read(path)[0]["ops"]))
    norms = [e["name"] for e in walked if e["op"] == "batchnorm"]
    convs = [e for e in walked if e["op"] == "conv"]
    folded = [e["folded"] for e in convs if e["folded"]]
    # the stem, 2 (basic) or 3 per block, a projection where the shape changes: both bottlenecks
    assert len(convs) == (9 if block == "bottleneck" else 6)
    if algebra == "real" or form == "shared":
        assert not norms and folded == [c["name"] + "_bn" for c in convs]
    else:
        assert not folded and norms == [c["name"] + "_bn" for c in convs]
    strided = {c["name"] for c in convs if c["strides"] == [2, 2]}
    middle = "conv1" if block == "basic" else "conv2"
    assert strided == {f"stage2_block1/{middle}", "stage2_block1/shortcut"}
    text = deploy.load(path).describe()
    assert text.count("folded in") == len(folded) and text.count("its own op") == len(norms)


def leaf(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return np.asarray(tree)


@pytest.mark.parametrize("algebra,form", [("real", "split"), ("quat", "shared")])
def test_folding_scales_whole_channels_and_keeps_pruned_weights_zero(algebra, form):
    """A folded kernel is the kernel times gamma / sqrt(var + eps) of its output channel, stored
    at the mask's positions (pruned weights exactly zero), and its bias beta - mean * that."""
    model, params, masks, stats = tiny(algebra, form)
    folded = entries(model, params, masks, stats)
    plain = entries(model, params, masks, stats, fold=False)
    plain_ops = {e.get("name"): e for e in ops.walk(header_of(plain)["ops"])}
    kernel_name = ops.kernel_name(algebra)
    n = 1 if algebra == "real" else 4
    for entry in ops.walk(header_of(folded)["ops"]):
        if entry["op"] != "conv":
            continue
        name, shape = entry["name"], tuple(entry["kernel_shape"])
        kernel, mask = leaf(params, f"{name}/{kernel_name}"), leaf(masks, f"{name}/{kernel_name}")
        scale = leaf(params, f"{name}_bn/scale") / np.sqrt(leaf(stats, f"{name}_bn/var") + 1e-5)
        parts = {
            k: folded[f"{name}/{k}"] for k in ("values", "positions") if f"{name}/{k}" in folded
        }
        positions, values = deploy.decode_kernel(entry["storage"], shape, parts, "float32")
        stored = deploy.dense_kernel(entry["storage"], shape, positions, values)
        assert np.all(stored[~mask] == 0) and entry["storage"]["alive"] == mask.sum()
        np.testing.assert_allclose(stored, np.where(mask, kernel * scale, 0), rtol=1e-6)
        assert entry["storage"] == plain_ops[name]["storage"]  # the same positions
        if "positions" in parts:
            assert np.array_equal(parts["positions"], plain[f"{name}/positions"])
        mean = leaf(stats, f"{name}_bn/mean")
        bias = leaf(params, f"{name}_bn/bias") - mean * np.tile(scale, n)
        np.testing.assert_allclose(folded[f"{name}/bias"], bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algebra,form", [("real", "split"), ("quat", "whiten")])
def test_onnx_graph_gives_the_runtimes_logits(tmp_path, algebra, form):
    """Folded convolutions, batch norm ops (``whiten`` as a 1x1 convolution), residual additions,
    strided convolutions and the average pool in ONNX, by onnxruntime."""
    model, params, masks, stats = tiny(algebra, form)
    path = tmp_path / "m.npz"
    deploy.save(path, entries(model, params, masks, stats))
    x = images()
    graph = qonnx.to_onnx(path)
    types = {node.op_type for node in graph.graph.node}
    assert {"Add", "GlobalAveragePool", "Conv"} <= types
    assert_close(qonnx.run(graph, x), deploy.load(path).predict(x))


def test_bad_batch_norm_input_is_refused_in_one_line():
    model, params, masks, stats = tiny("quat", "split")
    with pytest.raises(ValueError, match="needs batch_stats"):
        entries(model, params, masks, None)
    with pytest.raises(ValueError, match=r"unknown batch norm form 'batch'; valid: \['split'"):
        ops.from_json({"op": "batchnorm", "name": "b", "form": "batch", "n": 4})
    with pytest.raises(ValueError, match="padding 'SAME' with strides \\[2, 2\\]"):
        ops.from_json({"op": "conv", "name": "c", "kind": "real", "strides": [2, 2]})


def test_version_2_files_load_and_run_as_written(tmp_path, monkeypatch):
    """A paper model's file as version 2 wrote it (no ``bias`` or ``folded`` on its convolutions,
    no batch-norm bytes) loads and gives the logits of the version-3 file of the same round."""
    model, params, masks, spec, _ = pruned("conv2", "quat", "element")
    now = write(tmp_path / "v3.npz", model, params, masks, spec)
    header, arrays = deploy.read(now)
    for entry in header["ops"]:
        for field in ("bias", "folded") if entry["op"] == "conv" else ():
            del entry[field]
    del header["bytes"]["batchnorm"]
    monkeypatch.setattr(deploy.format, "VERSION", 2)
    old = {k: v for k, v in header.items() if k not in ("format", "version", "arrays", "sha256")}
    deploy.save(tmp_path / "v2.npz", deploy.pack(old, arrays))
    assert deploy.read(tmp_path / "v2.npz")[0]["version"] == 2
    x = random_images(spec)
    np.testing.assert_array_equal(
        deploy.load(tmp_path / "v2.npz").predict(x), deploy.load(now).predict(x)
    )


# -- a real run's round -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(mnist_dir, tmp_path_factory):
    """The dense round of a one-block quaternion ResNet (split batch norm: its own ops) on MNIST,
    registered as a model while the module runs."""
    layout = {"block": "basic", "stage_sizes": (1,), "widths": (8,), "stem": 8}
    spec = models.Spec(resnets.ResNet, layout, "mnist", 1, 50, 0.05, resnets.RECIPES["resnet20"][4])
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.REGISTRY, "tiny_resnet", spec)
        config = Config(
            model="tiny_resnet",
            algebra="quat",
            data_dir=str(mnist_dir),
            rounds=0,
            epochs=1,
            train_subset=200,
            test_subset=100,
            rewind="1it",  # the recipe's 1ep is the whole of this one epoch
        )
        yield lottery.run(config, tmp_path_factory.mktemp("work"), log=lambda s: None), config


def test_a_runs_round_exports_with_its_batch_statistics(tiny_run, mnist_dir, tmp_path):
    """The round's trained running statistics (not the initial ones) go into the file, which
    passes the export check and reproduces the run's test accuracy."""
    run_dir, config = tiny_run
    header = export.export_round(run_dir, tmp_path / "m.npz")
    assert header["version"] == deploy.VERSION == 3 and header["check"]["max_rel_diff"] < 1e-4
    run = rundir.Run(run_dir)
    _, model, final, _, done = export.load_state(run, run.replicate(0).round(0))
    stats = train.batch_stats(final)
    initial = models.init_batch_stats(model, data.DATASETS["mnist"].image_shape)
    moved = [not np.allclose(a, b) for a, b in zip(*map(jax.tree.leaves, (stats, initial)))]
    assert all(moved)
    split = ("seed", "validation_size", "train_subset", "test_subset")  # the run's test images
    ds = data.load("mnist", data_dir=mnist_dir, **{k: getattr(config, k) for k in split})
    logits = deploy.load(tmp_path / "m.npz").predict(ds.test_images)
    assert_close(logits, jax_logits_of(model, final.params, stats, ds))
    accuracy = float(np.mean(logits.argmax(1) == ds.test_labels))
    assert abs(accuracy - done["test_acc"]) <= 1 / len(ds.test_labels)  # an exact tie at most


def jax_logits_of(model, params, stats, ds) -> np.ndarray:
    x = augment.normalize(ds.test_images, ds.mean, ds.std)
    return np.asarray(model.apply({"params": params, "batch_stats": stats}, x, train=False))
