"""The runtime's sparse kernels (qsparse.deploy.kernels, matrices) and its dispatch.

Every product equals the dense one computed another way (float64 numpy from the definition:
the real matrix of a component kernel built from its algebra's table), for random sparse
kernels at several densities, batch 1, a few and more than a tile of columns, by numba's kernels
and by the scipy fallback (numba hidden); the sparse convolution equals a dense convolution over
sliding windows; ``kernels="auto"`` picks dense BLAS at full density and the sparse kernel at low
density for a large batch, and ``describe()`` says which and why; ``threads`` is taken and bad
values are refused; without numba the runtime gives the same logits.
"""

import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import sparse_runtime
from qsparse import algebras, deploy, ops
from qsparse.deploy import kernels, matrices, planes, runtime

REPO = Path(__file__).resolve().parents[1]
ENGINES = ["numba", "scipy"]
DENSITIES = [1.0, 0.3, 0.03, 0.0]
BATCHES = [1, 5, 259]  # a matrix-vector product, a few columns, more than a few vector widths
TABLES = ["quat", "tessarine", "klein4", "complex"]  # tables of single signed components
# A user's algebra of another dimension, unregistered: the group algebra of Z/3 (e_i e_j = e_(i+j))
Z3 = algebras.Algebra(
    "z3", ("1", "g", "g2"), np.eye(3, dtype=np.float32)[(np.arange(3)[:, None] + np.arange(3)) % 3]
)


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    """Products built by numba's kernels (where numba is installed) or by scipy's."""
    if request.param == "numba" and not kernels.AVAILABLE:
        pytest.skip("numba is not installed (pip install qsparse-jax[fast])")
    monkeypatch.setattr(kernels, "AVAILABLE", request.param == "numba")
    return request.param


def assert_close(out, ref):
    """float32 against a float64 reference: within 1e-5 of the largest value."""
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max()))


def sparse_kernel(shape, density, rng, whole_numbers=False):
    """A random kernel, its mask (shared by a number's components when ``whole_numbers``)."""
    kernel = rng.standard_normal(shape).astype(np.float32)
    grid = shape[1:] if whole_numbers else shape
    mask = np.broadcast_to(rng.random(grid) < density, shape)
    return np.where(mask, kernel, np.float32(0)), mask


def stored(kernel, mask, hypercomplex):
    """(storage, positions, values) as an export file holds and the runtime decodes them."""
    storage, parts = deploy.encode_kernel(kernel, mask, hypercomplex)
    positions, values = deploy.decode_kernel(storage, kernel.shape, parts, "float32")
    return storage, positions, values


def real_matrix(algebra, kernel):
    """The real kernel ``(..., n q_in, n q_out)`` of a component kernel, from the definition:
    block (input component b, output component a) is ``sum_c A[c, b, a] w_c``."""
    n, *lead, q_in, q_out = kernel.shape
    real = np.einsum("cba,c...io->...biao", algebra.table.astype(np.float64), kernel)
    return real.reshape(*lead, n * q_in, n * q_out)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("batch", BATCHES)
def test_csr_product_equals_the_dense_one(engine, density, batch):
    rng = np.random.default_rng(int(density * 100) + batch)
    kernel, mask = sparse_kernel((37, 23), density, rng)
    bias = rng.standard_normal(23).astype(np.float32)
    x = rng.standard_normal((37, batch)).astype(np.float32)
    storage, positions, values = stored(kernel, mask, False)
    positions, values = matrices.element_positions(storage, kernel.shape, positions, values)
    product, macs = matrices.csr_product(None, kernel.shape, positions, values, bias)
    assert macs == np.count_nonzero(mask)
    ref = kernel.T.astype(np.float64) @ x + bias[:, None]
    assert_close(product(x), ref)
    assert_close(product(x, relu=True), np.maximum(ref, 0))
    u = rng.integers(0, 256, x.shape, dtype=np.uint8)  # raw pixels, read as they are
    assert_close(product(u), kernel.T.astype(np.float64) @ u + bias[:, None])


@pytest.mark.parametrize("shape", [(1, 784), (8, 16), (5, 30), (259, 784), (16, 13)])
def test_byte_columns_are_the_images_transposed(shape):
    """The 8x8-block byte transpose (shapes padded to multiples of 8 inside) against numpy's."""
    if not kernels.AVAILABLE:
        pytest.skip("numba is not installed (pip install qsparse-jax[fast])")
    images = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
    out = kernels.byte_columns(images)
    assert out.flags.c_contiguous and out.dtype == (np.float32 if shape[0] == 1 else np.uint8)
    np.testing.assert_array_equal(out, images.T)


def products(engine, algebra, kernel, mask, whole_numbers, bias):
    """Every sparse product of the runtime for this component kernel: CSR of its real matrix,
    and by its stored numbers (``nblock``) or components (numba)."""
    structure = matrices.Structure(algebra.n, algebra)
    storage, positions, values = stored(kernel, mask, True)
    blocks = storage["layout"] == "nblock"
    assert blocks == (whole_numbers and not mask.all())  # all alive: stored dense, as elements
    out = {}
    if blocks:
        out["bsr"] = matrices.bsr_product(structure, kernel.shape, positions, values, bias)
    positions, values = matrices.element_positions(storage, kernel.shape, positions, values)
    out["csr"] = matrices.csr_product(structure, kernel.shape, positions, values, bias)
    if engine == "numba" and not blocks:
        args = structure, kernel.shape, positions, values, bias
        out["components"] = matrices.component_product(*args)
    return out


@pytest.mark.parametrize("name", TABLES)
@pytest.mark.parametrize("whole_numbers", [True, False])
@pytest.mark.parametrize("batch", BATCHES)
def test_hypercomplex_products_equal_the_real_matrix(engine, name, whole_numbers, batch):
    algebra = algebras.get(name)
    n, q_in, q_out = algebra.n, 9, 6
    rng = np.random.default_rng(batch + n)
    for density in (1.0, 0.25, 0.05):
        kernel, mask = sparse_kernel((n, q_in, q_out), density, rng, whole_numbers)
        blocks = whole_numbers and density < 1
        bias = rng.standard_normal(n * q_out).astype(np.float32)
        x = rng.standard_normal((n * q_in, batch)).astype(np.float32)
        ref = real_matrix(algebra, kernel).T @ x + bias[:, None]
        built = products(engine, algebra, kernel, mask, whole_numbers, bias)
        assert set(built) >= {"csr"} and len(built) == 2 - (engine == "scipy" and not blocks)
        for product, macs in built.values():
            assert_close(product(x), ref)
            assert_close(product(x, relu=True), np.maximum(ref, 0))
            assert macs == np.count_nonzero(mask) * n  # each stored value feeds n outputs


@pytest.mark.parametrize("name", [*TABLES, "random"])
def test_block_matvec_equals_the_real_matrix(name):
    """One column through numbers stored whole, block by block (the unrolled n = 4 path and
    the general one), with and without ReLU; ``random``: a table of no signed structure."""
    if not kernels.AVAILABLE:
        pytest.skip("numba is not installed (pip install qsparse-jax[fast])")
    rng = np.random.default_rng(len(name))
    if name == "random":
        table = rng.standard_normal((4, 4, 4)).astype(np.float32)
        algebra = algebras.Algebra("random", ("a", "b", "c", "d"), table)
    else:
        algebra = algebras.get(name)
    n, q_in, q_out = algebra.n, 9, 6
    kernel, mask = sparse_kernel((n, q_in, q_out), 0.3, rng, whole_numbers=True)
    bias = rng.standard_normal(n * q_out).astype(np.float32)
    x = rng.standard_normal((n * q_in, 1)).astype(np.float32)
    ref = real_matrix(algebra, kernel).T @ x + bias[:, None]
    storage, positions, values = stored(kernel, mask, True)
    assert storage["layout"] == "nblock"
    structure = matrices.Structure(n, algebra)
    product = matrices.block_product(structure, kernel.shape, positions, values, bias)
    assert_close(product(x), ref)
    assert_close(product(x, relu=True), np.maximum(ref, 0))


def test_chain_matvec_equals_its_layers_one_after_another():
    """One call through a chain that mixes layers: CSR of a real matrix, quaternions and
    tessarines stored whole (the unrolled n = 4 path), complex numbers (n = 2, unrolled too),
    a user's 3-D algebra (the general path), with ReLUs between some; against float64 products
    of the real matrices. Its one-column products alone give the same."""
    if not kernels.AVAILABLE:
        pytest.skip("numba is not installed (pip install qsparse-jax[fast])")
    rng = np.random.default_rng(7)
    # (algebra, input numbers, output numbers): real features 24 -> 20 -> 20 -> 12 -> 12 -> 9 -> 9
    plan = [
        ("quat", 6, 5),
        (None, 20, 20),
        ("complex", 10, 6),
        ("tessarine", 3, 3),
        (Z3, 4, 3),
        (None, 9, 9),
    ]
    relu = [True, False, True, True, False, False]
    x = rng.standard_normal(24).astype(np.float32)
    ref, products = x.astype(np.float64), []
    for (name, q_in, q_out), r in zip(plan, relu):
        bias_size = q_out * (1 if name is None else algebras.get(name).n)
        bias = rng.standard_normal(bias_size).astype(np.float32)
        if name is None:
            kernel, mask = sparse_kernel((q_in, q_out), 0.4, rng)
            _, positions, values = stored(kernel, mask, False)
            products.append(matrices.csr_product(None, kernel.shape, positions, values, bias)[0])
            real = kernel.astype(np.float64)
        else:
            algebra = algebras.get(name)
            kernel, mask = sparse_kernel((algebra.n, q_in, q_out), 0.4, rng, whole_numbers=True)
            _, positions, values = stored(kernel, mask, True)
            structure = matrices.Structure(algebra.n, algebra)
            product = matrices.block_product(structure, kernel.shape, positions, values, bias)
            products.append(product)
            real = real_matrix(algebra, kernel)
        ref = real.T @ ref + bias
        ref = np.maximum(ref, 0) if r else ref
    args = matrices.chain_arguments(products, relu)
    assert_close(kernels.chain_matvec(x, *args), ref.astype(np.float64))
    y = x[:, None]
    for product, r in zip(products, relu):
        y = product(y, relu=r)
    assert_close(y[:, 0], ref)
    assert matrices.chain_arguments([*products, lambda x, relu=False: x], relu + [False]) is None


def conv_reference(x, real):
    """SAME, stride-1 convolution of NHWC ``x`` by the HWIO ``real`` kernel, over windows."""
    kh, kw = real.shape[:2]
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    xp = np.pad(x.astype(np.float64), ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))
    return np.einsum("nhwcyx,yxco->nhwo", windows, real)


@pytest.mark.parametrize("name", ["real", "quat", "klein4"])
@pytest.mark.parametrize("density", [1.0, 0.2, 0.02])
def test_sparse_convolution_equals_the_dense_one(engine, name, density):
    rng = np.random.default_rng(int(100 * density))
    x = rng.standard_normal((3, 5, 6, 8)).astype(np.float32)
    if name == "real":
        kernel, mask = sparse_kernel((3, 3, 8, 5), density, rng)
        structure, real = None, kernel.astype(np.float64)
    else:
        algebra = algebras.get(name)
        kernel, mask = sparse_kernel((4, 3, 3, 2, 3), density, rng, whole_numbers=True)
        structure, real = matrices.Structure(4, algebra), real_matrix(algebra, kernel)
    bias = rng.standard_normal(real.shape[-1]).astype(np.float32)
    storage, positions, values = stored(kernel, mask, name != "real")
    built = []
    if storage["layout"] == "nblock":  # numbers stored whole: blocks
        built.append(matrices.bsr_product(structure, kernel.shape, positions, values, bias))
    positions, values = matrices.element_positions(storage, kernel.shape, positions, values)
    built.append(matrices.csr_product(structure, kernel.shape, positions, values, bias))
    assert len(built) == 1 + (name != "real" and density < 1)
    patches = kernels.im2col(x, 3, 3)
    assert patches.shape == (9 * 8, 3 * 5 * 6)
    ref = conv_reference(x, real) + bias
    for product, _ in built:
        y = product(patches).reshape(-1, 3, 5, 6).transpose(1, 2, 3, 0)
        assert_close(np.ascontiguousarray(y), ref)


needs_numba = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")


@needs_numba
@pytest.mark.parametrize("name", ["real", "quat"])
@pytest.mark.parametrize("density", [1.0, 0.2, 0.02])
@pytest.mark.parametrize("size", [(3, 5, 6), (2, 33, 31), (1, 1, 1)])
def test_convolution_on_planes_equals_the_dense_one(name, density, size):
    """Planes (a ring of zeros per image, every tap one shifted multiply-add, several tiles for
    the larger size) against sliding windows, 3x3 and 1x1 kernels, with and without ReLU; the
    result's rings and margins stay zero, so it feeds the next convolution as it is."""
    rng = np.random.default_rng(int(100 * density) + size[1])
    n, h, w = size
    x = rng.standard_normal((n, h, w, 8)).astype(np.float32)
    for k in (3, 1):
        if name == "real":
            kernel, mask = sparse_kernel((k, k, 8, 5), density, rng)
            structure, real = None, kernel.astype(np.float64)
        else:
            kernel, mask = sparse_kernel((4, k, k, 2, 3), density, rng, whole_numbers=True)
            structure = matrices.Structure(4, algebras.get(name))
            real = real_matrix(algebras.get(name), kernel)
        bias = rng.standard_normal(real.shape[-1]).astype(np.float32)
        storage, positions, values = stored(kernel, mask, name != "real")
        positions, values = matrices.element_positions(storage, kernel.shape, positions, values)
        entries = matrices.real_entries(structure, kernel.shape, positions, values)
        taps = planes.taps(*entries, kernel.shape, w, 8, real.shape[-1])
        p = planes.to_planes(x)
        assert p.data.shape == (8, 2 * planes.margin(w) + planes.length(n, h, w))
        np.testing.assert_array_equal(planes.from_planes(p), x)
        ref = conv_reference(x, real) + bias
        for relu in (False, True):
            y = planes.conv(taps, bias, p, relu)
            assert_close(planes.from_planes(y), np.maximum(ref, 0) if relu else ref)
            ring = y.data.copy()
            ring[:, y.margin : y.margin + y.length] *= 1 - planes.interior(n, h, w)
            assert not ring.any()


@needs_numba
def test_planes_are_reused_without_aliasing_and_kept_bounded():
    """A convolution never writes the planes it reads (two arrays alternate along a chain of
    one shape), later calls reuse the arrays, and a thread keeps at most KEPT of them."""
    rng = np.random.default_rng(3)
    kernel, mask = sparse_kernel((3, 3, 4, 4), 0.5, rng)
    bias = np.zeros(4, np.float32)
    storage, positions, values = stored(kernel, mask, False)
    positions, values = matrices.element_positions(storage, kernel.shape, positions, values)
    taps = planes.taps(
        *matrices.real_entries(None, kernel.shape, positions, values), kernel.shape, 6, 4, 4
    )
    x = rng.standard_normal((2, 5, 6, 4)).astype(np.float32)
    p0 = planes.to_planes(x)
    p1 = planes.conv(taps, bias, p0, False)
    p2 = planes.conv(taps, bias, p1, False)
    p3 = planes.conv(taps, bias, p2, False)
    assert p1.data is not p2.data and p3.data is p1.data  # two arrays, alternating
    ref = conv_reference(conv_reference(x, kernel.astype(np.float64)), kernel.astype(np.float64))
    assert_close(planes.from_planes(p2), ref)
    assert planes.to_planes(x).data is p0.data  # the next call's input: the same array
    for n in range(1, planes.KEPT + 5):  # many shapes (models, batch sizes): bounded
        planes.to_planes(np.zeros((n, 30, 30, 1), np.float32))
    assert len(planes._LOCAL.pool) == planes.KEPT


@needs_numba
@pytest.mark.parametrize("size", [(2, 6, 8), (3, 7, 5), (1, 1, 3)])
def test_max_pool_on_planes_equals_the_ops_one(size):
    x = np.random.default_rng(size[1]).standard_normal((*size, 4)).astype(np.float32)
    pooled = planes.max_pool(planes.to_planes(x))
    np.testing.assert_array_equal(planes.from_planes(pooled), ops.max_pool_2x2(x))
    inside = pooled.data[:, pooled.margin : pooled.margin + pooled.length]
    assert not (inside * (1 - planes.interior(pooled.n, pooled.h, pooled.w))).any()


# -- the runtime: dispatch, describe, threads, the fallback ------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small synthetic exports: (model, algebra, density) -> file."""
    folder = tmp_path_factory.mktemp("synthetic")
    out = {}
    for key in [
        ("lenet300_100", "real", 1.0),
        ("lenet300_100", "real", 0.02),
        ("lenet300_100", "quat", 0.05),
        ("conv4", "quat", 0.05),
        ("conv4", "real", 0.2),
    ]:
        path = folder / ("_".join(map(str, key)) + ".npz")
        out[key] = sparse_runtime.synthetic_file(path, *key, small=True)
    return out


def test_the_cost_rule_takes_dense_when_full_and_sparse_when_sparse_by_band_of_columns():
    assert [runtime.band(c) for c in (1, 2, 15, runtime.MANY_COLUMNS, 4096)] == [0, 1, 1, 2, 2]
    for rule, rates in runtime.BREAK_EVEN.items():
        for columns in (1, 2, 15, runtime.MANY_COLUMNS, 4096):
            assert not runtime.sparse_wins(1.0, columns, rule)
            assert runtime.sparse_wins(0.01, columns, rule)
            rate = rates[runtime.band(columns)]
            assert runtime.sparse_wins(0.99 * rate, columns, rule)
            assert not runtime.sparse_wins(rate, columns, rule)
        one, few, many = rates
        # measured: the many-column kernels' start-up costs a few columns what many repay, and
        # what one column's one-core kernels do not pay
        assert few <= many and few <= one, rule


def test_quaternions_stored_whole_run_sparse_for_one_image_and_many_but_not_a_few(tmp_path):
    """At 30 % of the weights (blocks4's break-evens: under one column's and many columns',
    over a few columns'), auto runs the quaternion layers sparse for one image and from
    MANY_COLUMNS images, by BLAS between, says so, and gives the dense path's logits."""
    if not kernels.AVAILABLE:
        pytest.skip("numba is not installed (pip install qsparse-jax[fast])")
    one, few, many = runtime.BREAK_EVEN["blocks4"]
    path = sparse_runtime.synthetic_file(tmp_path / "m.npz", "lenet300_100", "quat", 0.3)
    model = deploy.load(path)
    first = model.layers[0]
    assert first.rule == "blocks4" and few < first.density < min(one, many)
    assert [first.uses_dense(b) for b in (1, 2, 15, 16, 300)] == [False, True, True, False, False]
    described = "numba at batch 1, blas at batches 2-15, numba from batch 16"
    assert first.why().endswith(described)
    dense = deploy.load(path, kernels="dense")
    for batch in (1, 5, 20):
        x = np.random.default_rng(batch).integers(0, 256, (batch, 28, 28), np.uint8)
        assert_close(model.predict(x), dense.predict(x).astype(np.float64))


def test_a_small_layer_runs_by_blas_where_the_others_do(tmp_path):
    """The complex LeNet-300-100 at 3.5 % of its weights: for 2-15 images its complex layers run
    by BLAS (over that band's break-even), and its small output layer, sparse by its own
    density, follows them rather than mix engines; for one image and from MANY_COLUMNS all run
    sparse. The logits are the dense path's."""
    if not kernels.AVAILABLE:
        pytest.skip("numba is not installed (pip install qsparse-jax[fast])")
    path = sparse_runtime.synthetic_file(tmp_path / "m.npz", "lenet300_100", "complex", 0.035)
    model = deploy.load(path)
    output = model.layers[-1]
    assert output.small and runtime.sparse_wins(output.density, 2, output.rule)
    for batch, dense in ((1, False), (2, True), (15, True), (16, False)):
        assert all(layer.uses_dense(batch) == dense for layer in model.layers), batch
    assert not model.mixes_engines(2) and model._chain is not None
    x = np.random.default_rng(2).integers(0, 256, (2, 28, 28), np.uint8)
    assert_close(model.predict(x), deploy.load(path, kernels="dense").predict(x).astype(np.float64))


def test_one_image_chains_a_small_layer_auto_runs_by_blas_but_not_a_large_one(
    tmp_path, monkeypatch
):
    """At 12 % of the weights a quaternion LeNet-300-100's blocks are sparse at one column and
    its real output layer is not (over numba's one-column break-even): the output layer joins
    the one-image chain while its dense product is under CHAIN_DENSE_MAX multiply-adds, and
    with the limit at its size there is no chain. The logits are the dense path's either
    way."""
    if not kernels.AVAILABLE:
        pytest.skip("numba is not installed (pip install qsparse-jax[fast])")
    path = sparse_runtime.synthetic_file(tmp_path / "m.npz", "lenet300_100", "quat", 0.12)
    chained = deploy.load(path)
    output = chained.layers[-1]
    assert output.uses_dense(1) and not output.uses_dense(runtime.MANY_COLUMNS)
    assert output.kernel.size < runtime.CHAIN_DENSE_MAX and chained._chain is not None
    x = np.random.default_rng(3).integers(0, 256, (1, 28, 28), np.uint8)
    ref = deploy.load(path, kernels="dense").predict(x).astype(np.float64)
    assert_close(chained.predict(x), ref)
    monkeypatch.setattr(runtime, "CHAIN_DENSE_MAX", output.kernel.size)
    unchained = deploy.load(path)
    assert unchained._chain is None and "in one call" not in unchained.describe()
    assert_close(unchained.predict(x), ref)


def test_auto_picks_dense_at_full_density_and_sparse_when_pruned(files, engine):
    full = deploy.load(files["lenet300_100", "real", 1.0])
    pruned = deploy.load(files["lenet300_100", "real", 0.02])
    first_full, first_pruned = full.layers[0], pruned.layers[0]
    assert first_full.path == "dense" and first_full.uses_dense(1) and first_full.uses_dense(256)
    assert first_pruned.path == "csr" and not first_pruned.uses_dense(256)
    described = {line.split()[0]: line for line in pruned.describe().splitlines()[2:-1]}
    for layer in pruned.layers:
        line = described[layer.name]
        assert line.endswith(f", {layer.path}") and "auto: " in line, line
    rates = runtime.BREAK_EVEN[engine]  # 2 %: sparse at any batch, full: dense at any
    assert f"under {min(rates):.0%}: {engine}, csr" in described[first_pruned.name]
    assert full.describe().splitlines()[2].endswith(f"over {max(rates):.0%}: blas, dense")
    x = np.random.default_rng(0).integers(0, 256, (300, 28, 28), np.uint8)
    for density in (1.0, 0.02):
        path = files["lenet300_100", "real", density]
        dense = deploy.load(path, kernels="dense").predict(x).astype(np.float64)
        assert_close(deploy.load(path).predict(x), dense)


def test_convolutions_take_the_sparse_kernel_when_pruned(files, engine):
    model = deploy.load(files["conv4", "quat", 0.05], kernels="bsr")
    convs = [layer for layer in model.layers if layer.conv]
    assert len(convs) == 4 and all(layer.path == "bsr" for layer in convs)
    auto = deploy.load(files["conv4", "quat", 0.05]).layers  # auto: on planes, with numba
    direct = "direct" if engine == "numba" else "dense"
    assert [layer.path for layer in auto if layer.conv] == [direct] * 4
    x = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), np.uint8)
    dense = deploy.load(files["conv4", "quat", 0.05], kernels="dense")
    ref = dense.predict(x).astype(np.float64)
    for choice in ("bsr", "csr", "auto"):
        assert_close(deploy.load(files["conv4", "quat", 0.05], kernels=choice).predict(x), ref)


def test_threads_are_an_argument_and_bad_counts_are_refused(files):
    path = files["lenet300_100", "quat", 0.05]
    x = np.zeros((2, 28, 28), np.uint8)
    ref = deploy.load(path, threads=1).predict(x)
    assert kernels.set_threads(1) == 1
    cores = kernels.set_threads(None)
    assert cores >= 1
    np.testing.assert_array_equal(deploy.load(path, threads=cores).predict(x), ref)
    for bad in (0, cores + 1, 1.5, "2", True):
        with pytest.raises(ValueError, match=rf"threads={bad!r} is not valid; choose 1 to {cores}"):
            deploy.load(path, threads=bad)
    with pytest.raises(ValueError, match=r"kernels='numba' is not valid; choose one of \['auto'"):
        deploy.load(path, kernels="numba")


def test_float_images_need_their_scale(files):
    model = deploy.load(files["lenet300_100", "quat", 0.05])
    x = np.random.default_rng(3).integers(0, 256, (4, 28, 28, 1), np.uint8)
    ref = model.predict(x)
    for images in (x / 255.0, x.astype(np.float32)):
        with pytest.raises(TypeError, match=f"images are {images.dtype}; give raw uint8 pixels"):
            model.predict(images)
    assert_close(model.predict(x / 255.0, scale=1.0), ref.astype(np.float64))
    assert_close(model.predict(x.astype(np.float32), scale=255), ref.astype(np.float64))


@pytest.mark.skipif(not kernels.AVAILABLE, reason="compares numba's logits with the fallback's")
def test_without_numba_the_fallback_gives_the_same_logits(files, monkeypatch):
    rng = np.random.default_rng(2)
    for key in [("conv4", "quat", 0.05), ("conv4", "real", 0.2), ("lenet300_100", "quat", 0.05)]:
        shape = deploy.load(files[key]).input_shape
        x = rng.integers(0, 256, (5, *shape), np.uint8)
        fast = {c: deploy.load(files[key], kernels=c) for c in deploy.KERNELS}
        with monkeypatch.context() as m:
            m.setattr(kernels, "AVAILABLE", False)
            slow = {c: deploy.load(files[key], kernels=c) for c in deploy.KERNELS}
        assert fast["csr"].engine.startswith("numba on") and slow["csr"].engine.startswith("scipy")
        for model, engine in [(fast["csr"], "numba"), (slow["csr"], "scipy")]:
            described = model.describe()
            assert described.endswith(model.engine)
            assert described.count(f", {engine}, csr\n") == len(model.layers)
        ref = fast["dense"].predict(x).astype(np.float64)
        for choice in deploy.KERNELS:
            assert_close(fast[choice].predict(x), ref)
            assert_close(slow[choice].predict(x), ref)


@pytest.mark.subprocess
def test_the_runtime_runs_where_numba_cannot_be_imported(files):
    path = files["lenet300_100", "quat", 0.05]
    code = (
        "import sys; sys.modules.update(numba=None, jax=None, jaxlib=None); "
        "import numpy as np; from qsparse import deploy; from qsparse.deploy import kernels; "
        f"m = deploy.load({str(path)!r}); "
        "print(kernels.AVAILABLE, m.predict(np.zeros((3, 28, 28), np.uint8)).shape)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "(3,", "10)"]


@pytest.mark.subprocess
def test_numba_gets_wide_vectors_only_where_nobody_chose():
    """On an AVX-512 host, numba imported after the kernels vectorises at 512 bits; numba
    imported first, or CPU settings of the user's, are left as they are."""
    code = (
        "import sys, llvmlite.binding as llvm; first = sys.argv[1] == 'numba_first'; "
        "first and __import__('numba'); from qsparse.deploy import kernels; import numba; "
        "print(bool(llvm.get_host_cpu_features().get('avx512f')), numba.config.CPU_FEATURES)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}

    def features(order: str, **extra: str) -> tuple[bool, str]:
        done = subprocess.run(
            [sys.executable, "-c", code, order],
            cwd=REPO,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        avx512, chosen = done.stdout.split()
        return avx512 == "True", chosen

    avx512, chosen = features("kernels_first")
    assert chosen.endswith(kernels.WIDE) if avx512 else chosen == "None"
    assert features("numba_first")[1] == "None"
    assert features("kernels_first", NUMBA_CPU_FEATURES="+avx2")[1] == "+avx2"


@pytest.mark.subprocess
@pytest.mark.skipif(platform.machine() != "x86_64", reason="reads x86 machine code")
def test_one_image_through_quaternions_is_packed_into_vectors_unless_the_user_said_no(tmp_path):
    """The chain's quaternion block compiles to packed (SIMD) arithmetic with the kernels'
    setting, numba imported before them too; a user's ``NUMBA_SLP_VECTORIZE=0`` is kept."""
    code = (
        "import sys, re, numpy as np; sys.argv[1] == 'numba_first' and __import__('numba'); "
        "from qsparse.deploy import kernels; import os; "
        "layers = np.array([[0, 1, 4, 2, 0, 0]], np.int64); "
        "kernels.chain_matvec(np.ones(8, np.float32), np.array([0, 2], np.int64), "
        "np.array([0, 1], np.uint32), np.ones(32, np.float32), np.zeros(4, np.float32), layers, "
        "np.array([False])); asm = '\\n'.join(kernels.chain_matvec.inspect_asm().values()); "
        "print(os.environ['NUMBA_SLP_VECTORIZE'], "
        "len(re.findall(r'\\tv(fn?madd|fn?msub|mul|add)\\w*ps', asm)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_SLP_VECTORIZE"}

    def packed(order: str, **extra: str) -> tuple[str, int]:
        done = subprocess.run(
            [sys.executable, "-c", code, order],
            cwd=REPO,
            env={**env, "NUMBA_CACHE_DIR": str(tmp_path / order / str(extra)), **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        setting, count = done.stdout.split()
        return setting, int(count)

    setting, count = packed("kernels_first")  # each once: machine code read from the cache
    assert setting == "1" and count > 0  # has no text to inspect
    assert packed("numba_first")[1] > 0
    assert packed("kernels_first", NUMBA_SLP_VECTORIZE="0") == ("0", 0)


def test_the_benchmark_runs_and_tabulates(tmp_path):
    """The benchmark on tiny models (its numbers are no measurement here): a row per path and
    batch, and per layer and path; each row's limit the longer of its multiply-adds at the peak
    and its bytes at the bandwidth; the tables print best dense over auto."""
    options = sparse_runtime.Options(
        models=("conv4",),
        algebras=("quat",),
        densities=(0.05,),
        batches=(1, 9),  # dense convolutions, then planes
        repeats=1,
        peak_size=32,
        bandwidth_mib=1,
        small=True,
        layers=True,
    )
    result = sparse_runtime.run(options)
    models_ = [r for r in result["rows"] if "layer" not in r]
    impls = {row["impl"] for row in models_}
    assert impls == set(sparse_runtime.IMPLS) - (set() if kernels.AVAILABLE else {"numba"})
    assert len(models_) == 2 * len(impls)
    limits = {"gflops": result["peak_gflops"], "gbs": result["bandwidth_gbs"]}
    for row in result["rows"]:
        assert row["ms"] > 0 and row["macs"] > 0 and row["bytes"] > 0
        seconds = max(
            2 * row["macs"] * row["batch"] / 1e9 / limits["gflops"],
            row["bytes"] / 1e9 / limits["gbs"],
        )
        assert math.isclose(row["limit_ms"], 1e3 * seconds)
        assert math.isclose(row["of_limit"], row["limit_ms"] / row["ms"])
    assert all(0 < r["macs"] < r["dense_macs"] for r in models_)
    layers = [r for r in result["rows"] if "layer" in r]
    names = {r["layer"] for r in layers}
    assert names == {"QConv_0", "QConv_1", "QConv_2", "QConv_3", "QDense_0", "QDense_1", "output"}
    assert len(layers) == 2 * len(names) * (len(impls) - 1)  # every path but jax
    text = sparse_runtime.table(result)
    first, second = text.split("\n\n")[1:]
    assert len(first.splitlines()) == 2 + 2 and len(second.splitlines()) == 2 + 2 * len(names)
    for line, batch in zip(first.splitlines()[-2:], (1, 9), strict=True):  # as printed
        rows = {r["impl"]: r["ms"] for r in models_ if r["batch"] == batch}
        ratio = min(rows["dense"], rows["jax"]) / rows["auto"]
        assert line.endswith(f"| {ratio:.2f}x |")
