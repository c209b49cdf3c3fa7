"""qsparse.masks on tiny hand-made pytrees: paths and the prune rule, all-True masks, applying
masks, the subset check, and counts and density reports checked against numpy counts."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import masks as M
from qsparse import train


def tiny_params():
    """A quaternion layer (components on axis 0), a real layer and an output layer, with biases."""
    rng = np.random.default_rng(0)
    return {
        "QDense_0": {
            "qkernel": rng.normal(size=(4, 5, 3)).astype(np.float32),
            "bias": rng.normal(size=(12,)).astype(np.float32),
        },
        "Dense_1": {
            "kernel": rng.normal(size=(12, 6)).astype(np.float32),
            "bias": rng.normal(size=(6,)).astype(np.float32),
        },
        "output": {
            "kernel": rng.normal(size=(6, 3)).astype(np.float32),
            "bias": rng.normal(size=(3,)).astype(np.float32),
        },
    }


def random_masks(params, seed, p_alive=0.6):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.random(np.shape(x)) < p_alive, params)


def flat(tree):
    return {M.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_path_str_and_is_quaternion_for_names_and_key_paths():
    assert M.path_str(("QDense_0", "qkernel")) == "QDense_0/qkernel"
    # dict keys (DictKey.key) and dataclass fields (GetAttrKey.name) read the same way
    state = train.TrainState(
        step=0,
        apply_fn=None,
        params={"Dense_0": {"kernel": 1.0}},
        tx=None,
        opt_state=(),
        masks=None,
    )
    assert list(flat(state)) == ["step", "params/Dense_0/kernel"]
    assert list(flat({"a": {"b": 1}})) == ["a/b"]
    tree = {"b": {"kernel": jnp.array([[1.0, 0.0]])}, "a": {"bias": jnp.array(2)}}
    arrays = M.by_path(tree, bool)  # numpy arrays, cast, named and ordered as path_str names them
    assert list(arrays) == list(flat(tree)) == ["a/bias", "b/kernel"]
    assert all(type(v) is np.ndarray and v.dtype == bool for v in arrays.values())
    assert arrays["b/kernel"].tolist() == [[True, False]] and M.by_path(tree)["a/bias"] == 2
    assert M.is_quaternion(("QDense_0", "qkernel"))
    assert M.is_quaternion(("masks", "QConv_2", "qkernel"))
    for path in [("Dense_0", "kernel"), ("qkernel", "bias"), ("QDense_0", "my_qkernel")]:
        assert not M.is_quaternion(path), path


@pytest.mark.parametrize(
    "path,default,exempt",
    [
        (("Dense_0", "kernel"), True, True),
        (("QConv_1", "qkernel"), True, True),
        (("Dense_0", "bias"), False, False),
        (("QDense_0", "bias"), False, False),
        (("output", "kernel"), True, False),
        (("output", "bias"), False, False),
        (("output", "Dense_0", "kernel"), True, False),  # any enclosing module named output
        (("params", "output", "kernel"), True, False),  # as in a TrainState's params or masks
        (("outputs", "kernel"), True, True),  # names match whole, not as substrings
        (("kernel", "scale"), False, False),  # the leaf name decides, not an enclosing one
        (("output",), False, False),
    ],
)
def test_prune_rule_by_path(path, default, exempt):
    assert M.PruneRule()(path) is default
    assert M.PruneRule(prune_output=False)(path) is exempt
    renamed = M.PruneRule(prune_output=False, output_name="head")
    assert renamed(path) is default
    assert renamed(tuple("head" if n == "output" else n for n in path)) is exempt


def test_prunable_tree_applies_the_rule_leaf_by_leaf():
    params = tiny_params()
    for rule in (M.PruneRule(), M.PruneRule(prune_output=False)):
        tree = M.prunable(params, rule)
        assert jax.tree.structure(tree) == jax.tree.structure(params)
        assert flat(tree) == {
            "QDense_0/qkernel": True,
            "QDense_0/bias": False,
            "Dense_1/kernel": True,
            "Dense_1/bias": False,
            "output/kernel": rule.prune_output,
            "output/bias": False,
        }


def test_ones_has_the_params_structure_and_shapes():
    params = {**tiny_params(), "scalar": jnp.float32(2.0), "list": [jnp.zeros((2, 0)), np.ones(3)]}
    ones = M.ones(params)
    assert jax.tree.structure(ones) == jax.tree.structure(params)
    for (name, m), x in zip(flat(ones).items(), jax.tree.leaves(params)):
        assert m.dtype == jnp.bool_ and m.shape == np.shape(x) and bool(jnp.all(m)), name


@pytest.mark.parametrize("dtype", [np.float32, np.float16, jnp.bfloat16, np.int32])
def test_apply_zeroes_exactly_the_pruned_entries(dtype):
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(7, 9)) * 10).astype(dtype)
    if np.issubdtype(np.dtype(dtype), np.floating) or dtype == jnp.bfloat16:
        w[0, :3] = [np.nan, np.inf, -np.inf]  # non-finite pruned weights must still become 0
        w[1, :3] = [np.nan, np.inf, -np.inf]
    m = rng.random((7, 9)) < 0.5
    m[0, :3], m[1, :3] = False, True
    out = M.apply({"a": {"w": w}}, {"a": {"w": m}})["a"]["w"]
    assert out.dtype == w.dtype and out.shape == w.shape
    out = np.asarray(out)
    ref = np.where(m, w, np.zeros_like(w))
    assert out.tobytes() == ref.tobytes()  # bit for bit: NaN kept where alive, +0 where pruned
    assert np.all(out[~m] == 0) and not np.any(np.signbit(out[~m].astype(np.float32)))
    kept = out[m].view(np.uint8 if out.itemsize == 1 else f"u{out.itemsize}")
    assert np.array_equal(kept, w[m].view(kept.dtype))


def test_apply_with_ones_is_identity_and_apply_is_idempotent():
    params = tiny_params()
    same = M.apply(params, M.ones(params))
    assert all(
        np.array_equal(np.asarray(a), b)
        for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(params))
    )
    masks = random_masks(params, 2)
    once = M.apply(params, masks)
    twice = M.apply(once, masks)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice)))
    zeros = sum(int(np.sum(np.asarray(x) == 0)) for x in jax.tree.leaves(once))
    assert zeros == sum(int(np.sum(~m)) for m in jax.tree.leaves(masks))


def test_is_subset():
    params = tiny_params()
    old = random_masks(params, 3)
    rng = np.random.default_rng(4)
    new = jax.tree.map(lambda m: m & (rng.random(m.shape) < 0.5), old)
    assert M.is_subset(new, old) and M.is_subset(old, old)
    assert M.is_subset(old, M.ones(params))
    assert not M.is_subset(old, new)  # new lost weights, so old is not inside it
    revived = jax.tree.map(np.copy, new)
    i = np.argwhere(~old["Dense_1"]["kernel"])[0]
    revived["Dense_1"]["kernel"][tuple(i)] = True  # one weight pruned in old comes back
    assert not M.is_subset(revived, old)


@pytest.mark.parametrize("seed", [5, 6])
def test_count_matches_numpy(seed):
    params = tiny_params()
    masks = random_masks(params, seed)
    n = {k: (int(np.count_nonzero(m)), m.size) for k, m in flat(masks).items()}

    def total(names):
        return tuple(sum(n[k][i] for k in names) for i in (0, 1))

    kernels = ["QDense_0/qkernel", "Dense_1/kernel", "output/kernel"]
    assert M.count(masks) == total(kernels)
    assert M.count(masks, M.PruneRule(prune_output=False)) == total(kernels[:2])
    assert M.count(masks, prunable_only=False) == total(n)
    assert M.count(M.ones(params)) == (60 + 72 + 18,) * 2
    assert M.count(jax.tree.map(np.logical_not, M.ones(params))) == (0, 150)


def hand_report(masks, rule):
    """The density report rebuilt with explicit loops over the entries."""
    leaves, t = (
        {},
        dict.fromkeys(
            [
                "prunable_alive",
                "prunable_total",
                "all_alive",
                "all_total",
                "number_alive",
                "number_full",
                "number_total",
            ],
            0,
        ),
    )
    for name, m in flat(masks).items():
        m = np.asarray(m)
        alive = sum(bool(v) for v in m.ravel())
        e = dict(
            shape=list(m.shape),
            prunable=rule(name.split("/")),
            alive=alive,
            total=m.size,
            density=alive / m.size,
        )
        if name.endswith("/qkernel"):
            quats = [
                [bool(m[(c,) + idx]) for c in range(4)]
                for idx in itertools.product(*map(range, m.shape[1:]))
            ]
            e.update(
                number_alive=sum(any(q) for q in quats),
                number_full=sum(all(q) for q in quats),
                number_total=len(quats),
            )
            for k in ("number_alive", "number_full", "number_total"):
                t[k] += e[k]
        leaves[name] = e
        t["all_alive"] += alive
        t["all_total"] += m.size
        if e["prunable"]:
            t["prunable_alive"] += alive
            t["prunable_total"] += m.size
    t["density_prunable"] = t["prunable_alive"] / t["prunable_total"]
    t["density_all"] = t["all_alive"] / t["all_total"]
    return {"leaves": leaves, "total": t}


@pytest.mark.parametrize("kind", ["random", "ones", "kernels_pruned"])
@pytest.mark.parametrize("prune_output", [True, False])
def test_density_report_matches_counts_by_hand(kind, prune_output):
    params = tiny_params()
    rule = M.PruneRule(prune_output=prune_output)
    masks = {
        "random": random_masks(params, 7),
        "ones": M.ones(params),
        "kernels_pruned": jax.tree_util.tree_map_with_path(
            lambda p, x: np.full(x.shape, not rule(p)), params
        ),
    }[kind]
    report = M.density_report(masks, rule)
    assert report == hand_report(masks, rule)
    q = report["leaves"]["QDense_0/qkernel"]
    assert q["number_total"] == 15 and report["total"]["all_total"] == 60 + 12 + 72 + 6 + 18 + 3
    if kind == "random":  # element-wise random: some quaternions are only partly alive
        assert 0 < q["number_full"] < q["number_alive"] < q["number_total"]
        assert 4 * q["number_full"] < q["alive"] < 4 * q["number_alive"]
    if kind == "ones":
        assert report["total"]["density_prunable"] == report["total"]["density_all"] == 1.0
        assert q["number_full"] == q["number_alive"] == 15
    if kind == "kernels_pruned":
        assert report["total"]["prunable_alive"] == 0 and report["total"]["density_prunable"] == 0
        assert report["total"]["all_alive"] == 12 + 6 + 3 + (0 if prune_output else 18)
