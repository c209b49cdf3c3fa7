import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import masks as M
from qsparse import models, pruning


@pytest.fixture(scope="module")
def quat_params():
    model = models.create("lenet300_100", "quat")
    return models.init_params(model, jax.random.key(0), (28, 28, 1))


def alive_units(masks, grouping):
    """Alive pruning units over prunable leaves, counted independently of the library."""
    total = 0
    for name, m in M.by_path(masks).items():
        if not name.endswith("kernel"):
            continue
        total += (
            int(m.any(axis=0).sum())
            if (grouping == "quaternion" and name.endswith("qkernel"))
            or (grouping == "number" and name.endswith(("qkernel", "hkernel")))
            else int(m.sum())
        )
    return total


def test_rule_and_ones(quat_params):
    prunable = {
        M.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(M.prunable(quat_params))
    }
    assert prunable == {
        "QDense_0/bias": False,
        "QDense_0/qkernel": True,
        "QDense_1/bias": False,
        "QDense_1/qkernel": True,
        "output/bias": False,
        "output/kernel": True,
    }
    assert M.prunable(quat_params, M.PruneRule(prune_output=False))["output"]["kernel"] is False
    ones = M.ones(quat_params)
    assert all(m.dtype == bool and m.all() for m in M.by_path(ones).values())
    assert jax.tree.structure(ones) == jax.tree.structure(quat_params)


@pytest.mark.parametrize("method", pruning.METHODS)
@pytest.mark.parametrize("grouping", pruning.GROUPINGS)
def test_exact_counts_monotone_masks_biases_kept(quat_params, method, grouping):
    masks = M.ones(quat_params)
    params = quat_params
    for _ in range(6):
        before = alive_units(masks, grouping)
        new = pruning.prune(params, masks, 0.2, method=method, grouping=grouping)
        after = alive_units(new, grouping)
        if method == "global":
            assert before - after == round(0.2 * before)
        else:
            per_leaf = [
                round(
                    0.2
                    * (
                        int(m.any(0).sum())
                        if grouping != "element" and n.endswith("qkernel")
                        else int(m.sum())
                    )
                )
                for n, m in M.by_path(masks).items()
                if n.endswith("kernel")
            ]
            assert before - after == sum(per_leaf)
        assert M.is_subset(new, masks)
        for name, m in M.by_path(new).items():
            if name.endswith("bias"):
                assert m.all()
        masks, params = new, M.apply(params, new)


def test_quaternion_grouping_never_leaves_partial_quaternions(quat_params):
    masks = M.ones(quat_params)
    for _ in range(5):
        masks = pruning.prune(M.apply(quat_params, masks), masks, 0.3, grouping="quaternion")
    for name, m in M.by_path(masks).items():
        if name.endswith("qkernel"):
            assert np.array_equal(m.any(axis=0), m.all(axis=0))
            assert not m.all()


def test_element_grouping_prunes_smallest_magnitudes_globally():
    params = {
        "a": {"kernel": jnp.array([[0.5, -0.1], [3.0, 0.2]])},
        "b": {"kernel": jnp.array([[-0.05, 1.0]]), "bias": jnp.zeros(2)},
    }
    new = pruning.prune(params, M.ones(params), 0.5)
    np.testing.assert_array_equal(new["a"]["kernel"], [[True, False], [True, False]])
    np.testing.assert_array_equal(new["b"]["kernel"], [[False, True]])
    assert new["b"]["bias"].all()


def test_ties_broken_by_position_deterministically():
    params = {"a": {"kernel": jnp.ones((2, 3))}, "b": {"kernel": jnp.ones((4,))}}
    new = pruning.prune(params, M.ones(params), 0.5)
    # round(0.5 * 10) = 5 equal scores go: the first five positions in leaf order
    np.testing.assert_array_equal(new["a"]["kernel"], [[False, False, False], [False, False, True]])
    np.testing.assert_array_equal(new["b"]["kernel"], [True, True, True, True])


def test_quaternion_scores_by_norm():
    q = (
        jnp.zeros((4, 3, 1))
        .at[:, 0, 0]
        .set(jnp.array([1.0, 1.0, 1.0, 1.0]))
        .at[:, 1, 0]
        .set(jnp.array([1.9, 0, 0, 0]))
    )
    q = q.at[:, 2, 0].set(jnp.array([0, 0, 0, 0.1]))
    params = {"l": {"qkernel": q}}
    new = pruning.prune(params, M.ones(params), 0.34, grouping="quaternion")  # removes 1 of 3
    np.testing.assert_array_equal(new["l"]["qkernel"][0, :, 0], [True, True, False])
    new = pruning.prune(
        params, M.ones(params), 0.67, grouping="quaternion"
    )  # removes 2: |q|=2 beats 1.9
    np.testing.assert_array_equal(new["l"]["qkernel"][0, :, 0], [True, False, False])


def test_never_revives_and_pruned_score_is_ignored():
    params = {"l": {"kernel": jnp.array([10.0, 1.0, 2.0, 3.0])}}
    masks = {
        "l": {"kernel": jnp.array([False, True, True, True])}
    }  # the large weight is already pruned
    new = pruning.prune(params, masks, 0.34)  # round(0.34 * 3) = 1 more
    np.testing.assert_array_equal(new["l"]["kernel"], [False, False, True, True])


def test_layerwise_overrides():
    params = {"h": {"kernel": jnp.arange(1.0, 11.0)}, "output": {"kernel": jnp.arange(1.0, 11.0)}}
    new = pruning.prune(
        params, M.ones(params), 0.2, method="layerwise", layer_fractions={"output/*": 0.5}
    )
    assert int(new["h"]["kernel"].sum()) == 8 and int(new["output"]["kernel"].sum()) == 5


def test_global_pruning_with_an_override_prunes_that_leaf_on_its_own():
    """The output at half rate: its leaf leaves the global pool; the pool's threshold is set by
    the other leaves alone (their smallest weights go, wherever they are)."""
    params = {
        "a": {"kernel": jnp.arange(1.0, 11.0)},
        "b": {"kernel": jnp.arange(101.0, 111.0)},
        "output": {"kernel": jnp.arange(0.1, 1.05, 0.1)},  # the smallest of all
    }
    new = pruning.prune(params, M.ones(params), 0.2, layer_fractions={"output/*": 0.1})
    np.testing.assert_array_equal(new["a"]["kernel"], np.arange(10) >= 4)  # 4 of 20 pooled
    assert new["b"]["kernel"].all()
    np.testing.assert_array_equal(new["output"]["kernel"], np.arange(10) >= 1)  # 1 of 10


def test_layer_collapse_is_an_error_unless_allowed():
    params = {"big": {"kernel": jnp.arange(10.0, 20.0)}, "small": {"kernel": jnp.array([0.01])}}
    with pytest.raises(pruning.LayerCollapseError, match="small/kernel"):
        pruning.prune(params, M.ones(params), 0.2)
    new = pruning.prune(params, M.ones(params), 0.2, allow_empty=True)
    assert not new["small"]["kernel"].any()


def test_random_score_is_seeded():
    params = {"l": {"kernel": jnp.arange(100.0)}}
    a = pruning.prune(params, M.ones(params), 0.5, score="random", key=jax.random.key(0))
    b = pruning.prune(params, M.ones(params), 0.5, score="random", key=jax.random.key(0))
    c = pruning.prune(params, M.ones(params), 0.5, score="random", key=jax.random.key(1))
    np.testing.assert_array_equal(a["l"]["kernel"], b["l"]["kernel"])
    assert int(a["l"]["kernel"].sum()) == 50 and not np.array_equal(
        a["l"]["kernel"], c["l"]["kernel"]
    )
    assert not np.array_equal(a["l"]["kernel"], np.arange(100) >= 50)


@pytest.mark.parametrize("grouping", pruning.GROUPINGS)
def test_shuffle_keeps_per_layer_counts(quat_params, grouping):
    masks = M.ones(quat_params)
    for _ in range(3):
        masks = pruning.prune(M.apply(quat_params, masks), masks, 0.4, grouping=grouping)
    shuffled = pruning.shuffle(jax.random.key(0), masks, grouping=grouping)
    for (name, m), s in zip(M.by_path(masks).items(), M.by_path(shuffled).values()):
        assert m.sum() == s.sum(), name
        if name.endswith("kernel"):
            assert not np.array_equal(m, s)
        if grouping == "quaternion" and name.endswith("qkernel"):
            assert np.array_equal(s.any(axis=0), s.all(axis=0))


def test_shuffle_within_keeps_masks_nested(quat_params):
    old = pruning.prune(quat_params, M.ones(quat_params), 0.5)
    new = pruning.prune(M.apply(quat_params, old), old, 0.5)
    rand = pruning.shuffle(jax.random.key(1), new, within=old)
    assert M.is_subset(rand, old)
    for (name, n), r in zip(M.by_path(new).items(), M.by_path(rand).values()):
        assert n.sum() == r.sum(), name


def test_density_report_units(quat_params):
    masks = pruning.prune(quat_params, M.ones(quat_params), 0.5, grouping="quaternion")
    report = M.density_report(masks)
    total = report["total"]
    assert total["prunable_total"] == 67_300 and total["all_total"] == 67_710
    assert total["prunable_alive"] + 410 == total["all_alive"]
    q0 = report["leaves"]["QDense_0/qkernel"]
    assert (
        q0["number_total"] == 196 * 75
        and q0["alive"] == 4 * q0["number_alive"] == 4 * q0["number_full"]
    )
    assert total["number_total"] == 196 * 75 + 75 * 25
    np.testing.assert_allclose(total["density_all"], total["all_alive"] / 67_710)


def test_bad_arguments(quat_params):
    ones = M.ones(quat_params)
    for kwargs, match in [
        (dict(fraction=1.0), r"\[0, 1\)"),
        (dict(fraction=-0.1), r"\[0, 1\)"),
        (
            dict(fraction=0.2, method="local"),
            "unknown pruning method 'local'.*'global', 'layerwise'",
        ),
        (
            dict(fraction=0.2, grouping="channel"),
            "unknown grouping 'channel'.*'element', 'quaternion'",
        ),
        (dict(fraction=0.2, score="random"), "needs a PRNG key"),
    ]:
        with pytest.raises(ValueError, match=match):
            pruning.prune(quat_params, ones, **kwargs)
