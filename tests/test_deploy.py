"""Export of pruned models (experiments.export) and their numpy runtime (qsparse.deploy).

Every paper architecture, real and quaternion, both groupings, at small widths, and LeNet-12 and
Conv-2 in every other algebra (and in a table registered here, that the runtime never sees
registered): the exported file's predict on raw uint8 images gives the JAX model's logits
(float32: within 1e-5 of the largest logit), sparse and dense; files written by format version 1
load and give the logits that version's runtime gave; float16/bfloat16 files are smaller and
close; the storage chooser takes the smallest layout and counts its bytes exactly; damaged files
are refused by name; the command exports a real (tiny) run's last round, reproduces its test
accuracy, and refuses bad input with one line, status 2 and nothing written.
"""

import errno
import functools
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import export as export_cli
from qsparse import algebras, augment, data, deploy, export, lottery, models, pruning, rundir
from qsparse import masks as M
from qsparse.config import Config
from qsparse.deploy import kernels as deploy_kernels
from qsparse.deploy.__main__ import main as deploy_main

REPO = Path(__file__).resolve().parents[1]
MNIST, CIFAR = data.DATASETS["mnist"], data.DATASETS["cifar10"]
SMALL = {  # widths small enough for a fast test; the paper's layer structure
    "lenet300_100": dict(features=(16, 8)),
    "lenet12": {},
    "conv2": dict(stages=((8, 8),), dense_features=(16, 16)),
    "conv4": dict(stages=((8, 8), (8, 8)), dense_features=(16, 16)),
    "conv6": dict(stages=((8, 8), (8, 8), (8, 8)), dense_features=(16, 16)),
}
CASES = [(n, a, g) for n in SMALL for a in models.PAPER_ALGEBRAS for g in ("element", "quaternion")]
OTHER_ALGEBRAS = [a for a in models.algebra_names() if a not in models.PAPER_ALGEBRAS]
FIXTURES = REPO / "tests" / "fixtures" / "deploy_v1"
HASH_SEED = 7  # the hashed models' tying seed (not the default, so that the file must carry it)


def assert_close(out, ref, rtol=1e-5):
    """Within ``rtol`` of the largest logit: float32 sums of thousands of terms cancel, so a
    logit near 0 has no relative accuracy of its own (in JAX either)."""
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


@functools.cache
def jax_model(name: str, algebra: str):
    """(model, random params: kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.01), spec, jitted apply).

    Drawn with numpy from the parameter shapes: the models' own initialisers would compile for
    seconds per model, and any values do.
    """
    seed = {"hash_seed": HASH_SEED} if algebras.get(algebra).kind == "hashed" else {}
    model = models.create(name, algebra, 10, **SMALL[name], **seed)
    spec = MNIST if name.startswith("lenet") else CIFAR
    shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), spec.image_shape))
    rng = np.random.default_rng(len(name) + len(algebra))

    def draw(path, s):
        if M.path_str(path).endswith("bias"):
            return 0.1 * rng.standard_normal(s.shape, np.float32)
        fan_in = math.prod(s.shape[1:-1]) * 4 if M.is_quaternion(path) else math.prod(s.shape[:-1])
        return rng.standard_normal(s.shape, np.float32) / np.float32(math.sqrt(fan_in))

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    return model, params, spec, jax.jit(model.apply)


def pruned(name: str, algebra: str, grouping: str, fraction: float = 0.8):
    model, params, spec, apply = jax_model(name, algebra)
    masks = pruning.prune(params, M.ones(params), fraction, method="layerwise", grouping=grouping)
    return model, M.apply(params, masks), masks, spec, apply


def images(spec, n: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *spec.image_shape), np.uint8)


def jax_logits(apply, params, spec, x: np.ndarray) -> np.ndarray:
    return np.asarray(apply({"params": params}, augment.normalize(x, spec.mean, spec.std)))


def write(path: Path, model, params, masks, spec, dtype="float32") -> Path:
    entries = export.export_entries(
        model,
        params,
        masks,
        input_shape=spec.image_shape,
        mean=spec.mean,
        std=spec.std,
        dtype=dtype,
        check_images=0,
    )
    deploy.save(path, entries)
    return path


def layer_ops(header: dict) -> list[dict]:
    return [op for op in header["ops"] if "storage" in op]


# -- the runtime against JAX ---------------------------------------------------------------------


def test_export_is_deterministic_and_states_the_models_ops(tmp_path):
    """The same model and params give the same entries, byte for byte; the header's ops are the
    documented Conv-2 of a quaternion model (docs/deployment.md), with kernel shapes."""
    model, params, masks, spec, _ = pruned("conv2", "quat", "quaternion")
    first, second = (
        export.export_entries(
            model, params, masks, input_shape=spec.image_shape, mean=spec.mean, std=spec.std
        )
        for _ in range(2)
    )
    assert list(first) == list(second)
    for key in first:
        assert (
            first[key].dtype == second[key].dtype and first[key].tobytes() == second[key].tobytes()
        )
    header = json.loads(first[deploy.HEADER].tobytes())
    conv = {"op": "conv", "kind": "quat", "hash_seed": 0, "padding": "SAME", "strides": [1, 1]}
    conv.update(bias=True, folded="")
    dense = {"op": "dense", "hash_seed": 0}
    assert [
        {k: v for k, v in op.items() if k not in ("kernel_shape", "storage")}
        for op in header["ops"]
    ] == [
        {"op": "encode", "encoding": "rgb_gray", "n": 4},
        {**conv, "name": "QConv_0"},
        {"op": "relu"},
        {**conv, "name": "QConv_1"},
        {"op": "relu"},
        {"op": "maxpool2x2"},
        {"op": "flatten", "layout": "blocked", "n": 4},
        {**dense, "kind": "quat", "name": "QDense_0"},
        {"op": "relu"},
        {**dense, "kind": "quat", "name": "QDense_1"},
        {"op": "relu"},
        {**dense, "kind": "real", "name": "output"},
    ]
    hamilton = [  # e_i e_j of (1, i, j, k), as signed basis indices
        [(1, 0), (1, 1), (1, 2), (1, 3)],
        [(1, 1), (-1, 0), (1, 3), (-1, 2)],
        [(1, 2), (-1, 3), (-1, 0), (1, 1)],
        [(1, 3), (1, 2), (-1, 1), (-1, 0)],
    ]
    table = np.zeros((4, 4, 4))
    for i, row in enumerate(hamilton):
        for j, (sign, k) in enumerate(row):
            table[i, j, k] = sign
    assert header["version"] == 3
    assert header["algebras"] == {"quat": {"kind": "table", "n": 4, "table": table.tolist()}}
    shapes = {op["name"]: op["kernel_shape"] for op in header["ops"] if "name" in op}
    assert shapes == {
        "QConv_0": [4, 3, 3, 1, 2],
        "QConv_1": [4, 3, 3, 2, 2],
        "QDense_0": [4, 512, 4],
        "QDense_1": [4, 4, 4],
        "output": [16, 10],
    }


@pytest.mark.parametrize("name,algebra,grouping", CASES)
def test_predict_equals_the_jax_model(tmp_path, name, algebra, grouping):
    model, params, masks, spec, apply = pruned(name, algebra, grouping)
    alive, total = M.count(masks)
    assert 0.1 <= alive / total <= 0.3
    path = write(tmp_path / "m.npz", model, params, masks, spec)
    x = images(spec)
    ref = jax_logits(apply, params, spec, x)
    for kernels in deploy.KERNELS:
        model_np = deploy.load(path, kernels=kernels)
        assert_close(model_np.predict(x), ref)
    assert_close(model_np.predict(x, batch_size=3), ref)  # batches are independent
    header, arrays = deploy.read(path)
    for op in layer_ops(header):
        stored = sum(a.nbytes for k, a in arrays.items() if k.startswith(op["name"] + "/"))
        assert stored - arrays[op["name"] + "/bias"].nbytes == op["storage"]["bytes"]
        if op["kind"] == "quat":  # whole quaternions pruned -> quaternion blocks
            assert op["storage"]["layout"] == ("nblock" if grouping == "quaternion" else "element")
    assert {op["op"] for op in header["ops"]} >= {"dense", "relu"}


@pytest.mark.parametrize("algebra", models.PAPER_ALGEBRAS)
def test_dense_convolutions_by_a_few_images_at_a_time_equal_the_jax_model(
    tmp_path, monkeypatch, algebra
):
    """The dense convolution multiplies the patches of a few images at a time: split down to
    one image a product, the logits are JAX's."""
    model, params, masks, spec, apply = pruned("conv4", algebra, "element")
    path = write(tmp_path / "m.npz", model, params, masks, spec)
    x = images(spec, n=5)
    monkeypatch.setattr(deploy.runtime, "PATCH_BYTES", 1)
    assert_close(deploy.load(path, kernels="dense").predict(x), jax_logits(apply, params, spec, x))


@pytest.mark.parametrize("algebra", models.PAPER_ALGEBRAS)
def test_a_first_convolution_of_few_taps_and_a_small_layer_follow_numba(
    tmp_path, monkeypatch, algebra
):
    """Conv-4 as global pruning leaves a trained one: its first convolution (27 or 36 taps)
    whole, its small output layer at 50 % (over numba's break-evens), its large dense layer at 1 %,
    the rest at 10 %. auto puts
    the first convolution on planes like the next one and the output layer on its sparse product
    like the dense layers before it, and says why; so from 8 images (planes) no call mixes
    BLAS and numba even where every BLAS product would be threaded. With the next convolution
    dense the first stays dense too. The logits are JAX's for 3 images (dense convolutions) and
    9 (planes)."""
    pytest.importorskip("numba")  # planes need numba
    model, params, spec, apply = jax_model("conv4", algebra)
    rng = np.random.default_rng(4)

    def mask(path, p, rest=0.1):
        layer, name = M.path_str(path).split("/")
        if "kernel" not in name or layer in ("Conv_0", "QConv_0"):
            return np.ones(p.shape, bool)
        density = {"output": 0.5, "Dense_0": 0.01, "QDense_0": 0.01}.get(layer, rest)
        return rng.random(p.shape) < density

    monkeypatch.setattr(deploy.runtime, "BLAS_THREADED", 1)  # as if every product were large
    masks = jax.tree_util.tree_map_with_path(mask, params)
    params = M.apply(params, masks)
    m = deploy.load(write(tmp_path / "m.npz", model, params, masks, spec))
    first, second, output = m.layers[0], m.layers[1], m.layers[-1]
    assert first.direct and first.density == 1.0 and second.direct
    assert first.why().endswith("36 taps or fewer before a convolution on planes: numba")
    assert output.density > max(deploy.runtime.BREAK_EVEN["numba"]) and output.small
    assert not output.uses_dense(300) and "beside layers run by numba" in output.why()
    assert not any(m.mixes_engines(n) for n in (8, 9, 64, 300)) and m.mixes_engines(3)
    for n in (3, 9):
        x = images(spec, n=n, seed=n)
        assert_close(m.predict(x), jax_logits(apply, params, spec, x))
    masks = jax.tree_util.tree_map_with_path(functools.partial(mask, rest=1.0), params)
    dense = deploy.load(write(tmp_path / "d.npz", model, params, masks, spec))
    assert not any(layer.direct for layer in dense.layers) and dense.layers[-1].uses_dense(300)


def test_a_batch_mixing_blas_and_numba_runs_numba_on_one_thread(tmp_path, monkeypatch):
    """The first layer under its break-even, the others dense: where one call runs numba's
    parallel kernels and BLAS products OpenBLAS threads, numba gets one thread (OpenBLAS's
    threads, spinning after their products, fought numba's for the cores: 10x slower on 2
    cores); the caller's setting comes back; the logits are JAX's. All-sparse, numba keeps its
    threads."""
    numba = pytest.importorskip("numba")  # the fast extra; the runtime falls back without it
    model, params, spec, apply = jax_model("lenet300_100", "real")
    rng = np.random.default_rng(0)

    def mask(path, p):
        sparse = M.path_str(path) == "Dense_0/kernel"
        return rng.random(p.shape) < 0.05 if sparse else np.ones(p.shape, bool)

    masks = jax.tree_util.tree_map_with_path(mask, params)
    params = M.apply(params, masks)
    path = write(tmp_path / "m.npz", model, params, masks, spec)
    seen, inner = [], deploy_kernels.csr_matmul

    def spy(*args):
        seen.append(numba.get_num_threads())
        return inner(*args)

    monkeypatch.setattr(deploy_kernels, "csr_matmul", spy)
    before, x = numba.get_num_threads(), images(spec, n=20)
    # these widths' BLAS products are too small for OpenBLAS to thread (20 x 16 x 8 multiply-adds)
    assert not deploy.load(path).mixes_engines(20)
    monkeypatch.setattr(deploy.runtime, "BLAS_THREADED", 20 * 16 * 8)  # as if they were not
    mixed = deploy.load(path)
    assert mixed.mixes_engines(20) and not mixed.mixes_engines(1)
    assert "batches of 20+ images mix BLAS and numba" in mixed.describe()
    assert_close(mixed.predict(x), jax_logits(apply, params, spec, x))
    assert seen and set(seen) == {1} and numba.get_num_threads() == before
    seen.clear()
    assert_close(deploy.load(path, kernels="bsr").predict(x), jax_logits(apply, params, spec, x))
    assert seen and set(seen) == {before}


def check_every_path(path: Path, x: np.ndarray, ref: np.ndarray) -> dict[str, list[str]]:
    """Each ``kernels`` choice of the runtime gives ``ref``; returns the paths its layers took
    (as :meth:`deploy.Model.describe` states them)."""
    paths = {}
    for kernels in deploy.KERNELS:
        model_np = deploy.load(path, kernels=kernels)
        assert_close(model_np.predict(x), ref)
        paths[kernels] = [layer.path for layer in model_np.layers]
        described = model_np.describe().splitlines()
        for layer in model_np.layers:
            (line,) = [line for line in described if line.split()[:1] == [layer.name]]
            assert line.endswith(f", {layer.path}")
    return paths


@pytest.mark.parametrize("name", ["lenet12", "conv2"])
@pytest.mark.parametrize("algebra", OTHER_ALGEBRAS)
def test_every_algebra_exports_and_runs_as_in_jax(tmp_path, name, algebra):
    """Each algebra's file carries what its layers need (the table, the PHM layers' rules, the
    hashed layers' seed) and runs as the JAX model by every path, both groupings."""
    kind = algebras.get(algebra).kind
    for grouping in ("element", "number"):
        model, params, masks, spec, apply = pruned(name, algebra, grouping)
        path = write(tmp_path / f"{grouping}.npz", model, params, masks, spec)
        x = images(spec)
        paths = check_every_path(path, x, jax_logits(apply, params, spec, x))
        header, arrays = deploy.read(path)
        assert header["algebras"][algebra]["kind"] == kind
        if kind == "table":
            np.testing.assert_array_equal(
                header["algebras"][algebra]["table"], algebras.get(algebra).table
            )
        for op in layer_ops(header)[:-1]:  # the hidden layers, in the algebra
            layer = op["name"]
            assert op["kind"] == algebra and op["kernel_shape"][0] == algebras.get(algebra).n
            assert op["storage"]["layout"] == ("nblock" if grouping == "number" else "element")
            assert op["hash_seed"] == (HASH_SEED if kind == "hashed" else 0)
            if kind == "phm":  # the learned rules, stored whole
                np.testing.assert_array_equal(
                    arrays[f"{layer}/phm_rules"], params[layer]["phm_rules"]
                )
            else:
                assert f"{layer}/phm_rules" not in arrays
        layers = len(layer_ops(header))  # convolutions and dense layers alike
        assert paths["dense"] == ["dense"] * layers and paths["csr"] == ["csr"] * layers
        signed = (
            kind == "table" and algebras.get(algebra).signed_blocks and deploy_kernels.AVAILABLE
        )
        blocks = grouping == "number" and kind != "hashed"  # bsr: stored blocks, a table
        hidden = "bsr" if blocks else "hyper" if signed else "csr"
        assert paths["bsr"] == [hidden] * (layers - 1) + ["csr"]  # the output layer is real


DUAL = "dual_numbers_of_test_deploy"


def test_a_registered_table_runs_where_it_is_not_registered(tmp_path, monkeypatch):
    """Dual numbers (e^2 = 0: blocks that are no single signed component), registered for the
    export only: the file carries their table and runs once the registry has forgotten them."""
    table = np.zeros((2, 2, 2), np.float32)
    table[0, 0, 0] = table[0, 1, 1] = table[1, 0, 1] = 1  # 1 1 = 1, 1 e = e 1 = e, e e = 0
    with monkeypatch.context() as m:
        m.setattr(algebras, "_REGISTRY", dict(algebras._REGISTRY))
        algebras.register(algebras.Algebra(DUAL, ("r", "e"), table.copy()))
        model, params, masks, spec, apply = pruned("lenet12", DUAL, "number")
        path = write(tmp_path / "dual.npz", model, params, masks, spec)
        x = images(spec)
        ref = jax_logits(apply, params, spec, x)
    assert DUAL not in algebras.names()
    header, _ = deploy.read(path)
    assert header["algebras"] == {DUAL: {"kind": "table", "n": 2, "table": table.tolist()}}
    paths = check_every_path(path, x, ref)
    assert paths["bsr"] == ["bsr", "csr"]


def test_a_layer_whose_algebra_the_file_lacks_is_refused(tmp_path):
    model, params, masks, spec, _ = pruned("lenet12", "phm4", "element")
    header, arrays = deploy.read(write(tmp_path / "m.npz", model, params, masks, spec))
    no_rules = {k: v for k, v in arrays.items() if not k.endswith("phm_rules")}
    no_algebra = {**header, "algebras": {}}
    for name, (h, a), message in [
        ("no_rules", (header, no_rules), "layer HyperDense_0: its phm_rules are missing"),
        ("no_algebra", (no_algebra, arrays), "algebra 'phm4' is not among the file's algebras"),
    ]:
        entries = deploy.pack({k: v for k, v in h.items() if k not in ("arrays", "sha256")}, a)
        deploy.save(tmp_path / f"{name}.npz", entries)
        with pytest.raises(deploy.ExportFileError, match=message):
            deploy.load(tmp_path / f"{name}.npz")


def fixture_images(shape: tuple[int, ...], n: int = 4) -> np.ndarray:
    """The version-1 fixtures' images (tests/fixtures/deploy_v1/README.md)."""
    i = np.arange(n * math.prod(shape), dtype=np.int64)
    return ((i * i * 7 + i * 31) % 256).astype(np.uint8).reshape(n, *shape)


@pytest.mark.parametrize(
    "stem,spec", [("lenet12_quat_quaternion", MNIST), ("conv2_quat_element_bfloat16", CIFAR)]
)
def test_version_1_files_load_and_give_their_logits(stem, spec):
    """Files written by format version 1 (a committed fixture) load, read as version 2 states
    them, and give the logits the version-1 runtime gave, by every path."""
    path = FIXTURES / f"{stem}.npz"
    header, _ = deploy.read(path)
    assert header["version"] == 1 and header["algebras"]["quat"]["n"] == 4
    layouts = {op["storage"]["layout"] for op in layer_ops(header)}
    assert layouts == ({"nblock", "element"} if "quaternion" in stem else {"element"})
    x = fixture_images(spec.image_shape)
    with np.load(FIXTURES / "logits.npz") as logits:
        for choice in deploy.KERNELS:  # auto (newer than version 1) picks among the others
            model_np = deploy.load(path, kernels=choice)
            ref = logits[f"{stem}/{'dense' if choice == 'auto' else choice}"]
            assert_close(model_np.predict(x), ref)
    assert model_np.describe().startswith("qsparse-deploy v1,")


def test_predict_takes_grayscale_without_channel_axis_and_checks_shapes(tmp_path):
    model, params, masks, spec, apply = pruned("lenet12", "quat", "quaternion")
    m = deploy.load(write(tmp_path / "m.npz", model, params, masks, spec))
    x = images(spec, 4)
    np.testing.assert_array_equal(m.predict(x[..., 0]), m.predict(x))
    assert m.predict(x[:0]).shape == (0, 10)
    with pytest.raises(ValueError, match=r"\(N, \(28, 28, 1\)\)"):
        m.predict(np.zeros((2, 32, 32, 3), np.uint8))


@pytest.mark.parametrize("algebra", ["real", "quat"])
@pytest.mark.parametrize("kernels", ["auto", "bsr"])
def test_dense_first_models_normalise_raw_images_as_the_first_layers_columns(
    tmp_path, algebra, kernels
):
    """LeNet-300-100 takes the raw images through its flatten and normalises them as they are
    laid out for its first layer (one pass), or, where numba's kernel computes that layer, folds
    the normalisation into its weights and reads the bytes: the logits equal normalising first,
    for uint8 and for scaled floats, in batches; Conv-2 (a convolution first, RGB) normalises
    first. Every ReLU after a layer runs inside it."""
    model, params, masks, spec, apply = pruned("lenet300_100", algebra, "quaternion")
    m = deploy.load(write(tmp_path / "m.npz", model, params, masks, spec), kernels=kernels)
    assert m._raw_steps == 1
    assert [layer.relu for layer in m.layers] == [True, True, False]
    # at 20 % of the weights auto keeps BLAS for real layers and, for one image, takes
    # quaternions stored whole sparse (under blocks4's one-column break-even, over a few's)
    sparse = deploy.kernels.AVAILABLE and (kernels == "bsr" or algebra == "quat")
    assert m.layers[0].takes_bytes(1) == sparse
    assert m.layers[0].takes_bytes(2) == (kernels == "bsr" and deploy.kernels.AVAILABLE)
    # one image: every layer in one call of numba's kernel (CSR, or numbers stored whole), the
    # small output layer too where auto runs it by BLAS at every batch (over both break-evens)
    out = m.layers[-1]
    assert (out.uses_dense(1) and out.uses_dense(deploy.runtime.MANY_COLUMNS)) == (
        kernels == "auto"
    )
    assert (m._chain is not None) == sparse
    assert ("every layer sparse, in one call" in m.describe()) == sparse
    x = images(spec, 5)
    normalised_first = deploy.runtime._run(m._steps, m.preprocess(x))
    for i in range(2):
        assert_close(m.predict(x[i : i + 1]), normalised_first[i : i + 1], rtol=1e-6)
    white_one = deploy.runtime._run(m._steps, m.preprocess(x, scale=1.0))  # bytes, white = 1
    for n in (1, 5):  # not the folded weights' white
        assert_close(m.predict(x[:n], scale=1.0), white_one[:n], rtol=1e-6)
    assert_close(m.predict(x, batch_size=2), normalised_first, rtol=1e-6)
    assert_close(m.predict(x, batch_size=5), normalised_first, rtol=1e-6)
    assert_close(m.predict(x.astype(np.float32) / 255, scale=1.0), normalised_first, rtol=1e-6)
    assert_close(m.predict(x[..., 0]), normalised_first, rtol=1e-6)
    conv = pruned("conv2", algebra, "quaternion")
    assert deploy.load(write(tmp_path / "c.npz", *conv[:4]))._raw_steps == 0


def test_low_precision_exports_are_smaller_and_close(tmp_path):
    for name, algebra, grouping in [
        ("lenet300_100", "quat", "quaternion"),
        ("conv2", "real", "element"),
    ]:
        model, params, masks, spec, apply = pruned(name, algebra, grouping)
        x = images(spec)
        ref = jax_logits(apply, params, spec, x)
        sizes = {}
        for dtype, rtol in [("float32", 1e-5), ("float16", 3e-3), ("bfloat16", 3e-2)]:
            path = write(tmp_path / f"{name}_{dtype}.npz", model, params, masks, spec, dtype)
            assert_close(deploy.load(path).predict(x), ref, rtol)
            header, _ = deploy.read(path)
            sizes[dtype] = (header["bytes"]["kernels"], path.stat().st_size)
        for dtype in ("float16", "bfloat16"):
            assert sizes[dtype][1] < sizes["float32"][1]
            assert sizes[dtype][0] < 0.7 * sizes["float32"][0]


def test_bfloat16_rounds_to_nearest_even_as_jax():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=1000), [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)]])
    x = x.astype(np.float32)
    bits = deploy.encode_values(x, "bfloat16")
    np.testing.assert_array_equal(bits, np.asarray(jnp.asarray(x, jnp.bfloat16)).view(np.uint16))
    np.testing.assert_array_equal(
        deploy.decode_values(bits, "bfloat16"), np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    )


# -- storage -----------------------------------------------------------------------------------


def test_storage_chooser_takes_the_smallest_and_counts_bytes_exactly():
    rng = np.random.default_rng(0)
    k = rng.normal(size=(300, 100)).astype(np.float32)  # 30,000 positions: uint16 indices
    n = k.size
    for density, want in [(1.0, "dense"), (0.5, "bitmask"), (0.1, "bitmask"), (0.02, "indices")]:
        mask = rng.random(k.shape) < density
        alive = int(mask.sum())
        storage, parts = deploy.encode_kernel(k, mask, False)
        bitmask, indices = 4 * alive + math.ceil(n / 8), 4 * alive + 2 * alive
        assert storage["positions"] == want
        assert storage["bytes"] == sum(a.nbytes for a in parts.values())
        assert storage["bytes"] == min(bitmask, indices, 4 * n)
        positions, values = deploy.decode_kernel(storage, k.shape, parts, "float32")
        np.testing.assert_array_equal(
            deploy.dense_kernel(storage, k.shape, positions, values), np.where(mask, k, 0)
        )


def test_quaternion_storage_blocks_when_whole_quaternions_are_pruned():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(4, 200, 50)).astype(np.float32)
    shared = np.broadcast_to(rng.random((200, 50)) < 0.2, q.shape)
    independent = rng.random(q.shape) < 0.2
    nearly = shared & (rng.random(q.shape) > 0.02)  # a few components of live blocks pruned
    for mask, layout in [(shared, "nblock"), (independent, "element"), (nearly, "nblock")]:
        storage, parts = deploy.encode_kernel(q, mask, True)
        assert storage["layout"] == layout
        candidates = deploy.storage_candidates(mask, True, 4)
        assert storage["bytes"] == min(c["bytes"] for c in candidates)
        assert storage["bytes"] == sum(a.nbytes for a in parts.values())
        positions, values = deploy.decode_kernel(storage, q.shape, parts, "float32")
        np.testing.assert_array_equal(
            deploy.dense_kernel(storage, q.shape, positions, values), np.where(mask, q, 0)
        )
    blocks = int(shared[0].sum())
    storage, _ = deploy.encode_kernel(q, shared, True)
    assert storage["count"] == blocks and storage["bytes"] == 16 * blocks + math.ceil(10_000 / 8)


# -- files ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    model, params, masks, spec, _ = pruned("lenet300_100", "quat", "element")
    return write(tmp_path_factory.mktemp("good") / "m.npz", model, params, masks, spec)


def entry_data_offset(path: Path, name: str) -> tuple[int, int]:
    """(offset, size) of a zip entry's stored bytes, from its local header."""
    info = zipfile.ZipFile(path).getinfo(name)
    raw = path.read_bytes()
    fn_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + fn_len + extra_len, info.compress_size


def damaged(good: Path, tmp_path: Path) -> dict[str, Path]:
    raw = good.read_bytes()
    out = {}

    def put(name, content):
        out[name] = tmp_path / f"{name}.npz"
        out[name].write_bytes(content)

    put("truncated", raw[: len(raw) // 2])
    put("empty", b"")
    put("not_a_zip", b"PK\x03\x04" + bytes(range(256)) * 4)
    start, size = entry_data_offset(good, "QDense_0/values.npy")
    flipped = bytearray(raw)
    flipped[start + size - 3] ^= 0x10  # a weight's bits: the zip's CRC-32 catches it
    put("flipped_byte", bytes(flipped))
    with np.load(good) as f:
        entries = {k: f[k] for k in f.files}
    header = json.loads(entries["header.json"].tobytes())
    tampered = dict(entries, **{"QDense_0/values": entries["QDense_0/values"] * 2})
    np.savez(tmp_path / "tampered.npz", **tampered)  # consistent zip, content not the header's
    out["tampered"] = tmp_path / "tampered.npz"
    newer = dict(
        entries,
        **{"header.json": np.frombuffer(json.dumps({**header, "version": 99}).encode(), np.uint8)},
    )
    np.savez(tmp_path / "newer.npz", **newer)
    out["newer"] = tmp_path / "newer.npz"
    np.savez(tmp_path / "no_header.npz", a=np.zeros(3))
    out["no_header"] = tmp_path / "no_header.npz"
    out["missing"] = tmp_path / "missing.npz"
    return out


MESSAGES = {
    "truncated": "damaged or truncated",
    "empty": "damaged or truncated",
    "not_a_zip": "damaged or truncated",
    "flipped_byte": "damaged",
    "tampered": "fails its SHA-256",
    "newer": "format version 99",
    "no_header": "not a qsparse export file",
    "missing": "does not exist",
}


def test_damaged_files_are_refused_by_name(good_file, tmp_path, capsys):
    deploy.load(good_file)
    for name, path in damaged(good_file, tmp_path).items():
        with pytest.raises(deploy.ExportFileError) as e:
            deploy.load(path)
        assert str(path) in str(e.value) and MESSAGES[name] in str(e.value), (name, e.value)
        assert deploy_main([str(path)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0], err
    assert deploy_main([str(good_file)]) == 0
    assert "QDense_0" in capsys.readouterr().out


def test_save_is_atomic_and_refuses_to_overwrite(good_file, tmp_path):
    path = tmp_path / "m.npz"
    shutil.copy(good_file, path)
    before = path.read_bytes()
    with np.load(good_file) as f:
        entries = {k: f[k] for k in f.files}
    with pytest.raises(FileExistsError):
        deploy.save(path, entries)
    assert path.read_bytes() == before
    assert deploy.save(path, entries, overwrite=True) == path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]  # no temporary file left


# -- the command, on a tiny real run ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(mnist_dir, tmp_path_factory):
    config = Config(
        model="lenet12",
        algebra="quat",
        data_dir=str(mnist_dir),
        rounds=1,
        epochs=1,
        train_subset=600,
        test_subset=200,
        batch_size=60,
    )
    return lottery.run(config, tmp_path_factory.mktemp("work"), log=lambda s: None)


def test_export_reproduces_the_runs_test_accuracy(tiny_run, mnist_dir, tmp_path):
    header = export.export_round(tiny_run, tmp_path / "m.npz")
    prov = header["provenance"]
    assert (prov["replicate"], prov["round"], prov["run"]) == (0, 1, tiny_run.name)
    done = rundir.read_json(tiny_run / "replicate_0" / "round_01" / "done.json")
    assert prov["test_acc"] == done["test_acc"] and header["check"]["max_rel_diff"] < 1e-5
    config = Config.from_json(rundir.read_json(tiny_run / "config.json"))
    ds = data.load(
        "mnist",
        data_dir=mnist_dir,
        seed=config.seed,
        validation_size=config.validation_size,
        train_subset=config.train_subset,
        test_subset=config.test_subset,
    )
    run = rundir.Run(tiny_run)
    _, model, params, _, _ = export.load_round(run, run.replicate(0).round(1))
    ref = np.asarray(
        model.apply({"params": params}, augment.normalize(ds.test_images, ds.mean, ds.std))
    )
    logits = deploy.load(tmp_path / "m.npz").predict(ds.test_images)
    assert_close(logits, ref)
    accuracy = float(np.mean(logits.argmax(1) == ds.test_labels))
    assert abs(accuracy - done["test_acc"]) <= 1 / len(ds.test_labels)  # an exact tie at most
    for dtype in ("float16", "bfloat16"):  # the accuracy change of smaller values, measured
        h = export.export_round(tiny_run, tmp_path / f"{dtype}.npz", dtype=dtype)
        low = deploy.load(tmp_path / f"{dtype}.npz").predict(ds.test_images)
        assert abs(float(np.mean(low.argmax(1) == ds.test_labels)) - accuracy) <= 0.02
        assert h["file_bytes"] < header["file_bytes"]
    h0 = export.export_round(tiny_run, tmp_path / "m.npz", round=0, overwrite=True)
    assert h0["provenance"]["round"] == 0 and h0["provenance"]["density_prunable"] == 1.0


def snapshot(*roots: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for r in roots for p in r.rglob("*")}


BAD = {  # name: (flags, substring of the error line, status)
    "no_finished_round": (["--run_dir={empty}", "--out={tmp}/m.npz"], "has no finished round", 2),
    "round_missing": (["--run_dir={run}", "--round=7", "--out={tmp}/m.npz"], "round 7 of", 2),
    "replicate_missing": (
        ["--run_dir={run}", "--replicate=3", "--out={tmp}/m.npz"],
        "no replicate 3",
        2,
    ),
    "not_a_run": (["--run_dir={tmp}", "--out={tmp}/m.npz"], "is not a run directory", 2),
    "no_run_dir": (["--run_dir={tmp}/nothing", "--out={tmp}/m.npz"], "does not exist", 2),
    "out_exists": (["--run_dir={run}", "--out={tmp}/existing.npz"], "exists; pass --overwrite", 2),
    "out_is_dir": (["--run_dir={run}", "--out={tmp}"], "is a directory", 2),
    "out_under_file": (
        ["--run_dir={run}", "--out={tmp}/existing.npz/m.npz"],
        "is not a directory",
        2,
    ),
    "out_unwritable": (  # refused before writing; root passes that check, and the write fails
        ["--run_dir={run}", "--out=/proc/m.npz"],
        "cannot write /proc/m.npz",
        2 if os.geteuid() else 1,
    ),
    "missing_out": (["--run_dir={run}"], "--out is required", 2),
    "bad_dtype": (["--run_dir={run}", "--out={tmp}/m.npz", "--dtype=int8"], "int8", 2),
    "damaged_run": (["--run_dir={broken}", "--out={tmp}/m.npz"], "fails its checksum", 1),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_one_line_nothing_written(tiny_run, tmp_path, capsys, run_main, name):
    empty = tmp_path / "empty_run"
    (empty / "replicate_0" / "round_00").mkdir(parents=True)
    shutil.copy(tiny_run / "config.json", empty / "config.json")
    (tmp_path / "existing.npz").write_bytes(b"keep me")
    broken = tmp_path / "broken"
    if name == "damaged_run":
        shutil.copytree(tiny_run, broken)
        meta = broken / "replicate_0" / "round_01" / "final" / "qsparse.json"
        meta.write_text(meta.read_text().replace('"sha256": "', '"sha256": "0'))
    before = snapshot(tmp_path, tiny_run)
    args, message, status = BAD[name]
    args = [a.format(run=tiny_run, tmp=tmp_path, empty=empty, broken=broken) for a in args]
    assert run_main(export_cli.main, args) == status
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert out == "" and snapshot(tmp_path, tiny_run) == before


@pytest.mark.subprocess
def test_command_exports_and_the_file_runs_without_jax(tiny_run, tmp_path):
    env = {"JAX_PLATFORMS": "cpu", "PATH": ""}
    out = tmp_path / "m.npz"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.export", f"--run_dir={tiny_run}", f"--out={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and "round 1" in result.stdout
    block = "import sys; sys.modules.update(jax=None, jaxlib=None, flax=None, tensorflow=None); "
    run = "from qsparse import deploy; import numpy as np; "
    run += f"print(deploy.load({str(out)!r}).predict(np.zeros((2, 28, 28), np.uint8)).shape)"
    result = subprocess.run(
        [sys.executable, "-c", block + run], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == "(2, 10)", result.stderr


def test_full_disk_while_exporting_keeps_the_previous_file(
    tiny_run, tmp_path, capsys, run_main, monkeypatch
):
    out = tmp_path / "m.npz"
    out.write_bytes(b"the previous export")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the export's temporary file is complete, then fails
    args = [f"--run_dir={tiny_run}", f"--out={out}", "--overwrite"]
    assert run_main(export_cli.main, args) == 1
    _, err = capsys.readouterr()
    assert err.splitlines() == [
        f"error: cannot write {out}: No space left on device; nothing was written: the previous "
        f"{out}, if any, is intact"
    ]
    assert out.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temporary file left
