"""The paper's models in every algebra: parameter counts against counts written out here, one
masked training step per algebra, pruning by whole numbers, PHM's rules never pruned, and a run
that records the hashed tying's seed."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsparse import epoch, lottery, models, pruning, train
from qsparse import masks as M
from qsparse.config import Config

# Each built-in algebra's dimension, and whether its layers learn PHM rules (n^3 per layer).
DIMENSION = {
    "real": 1,
    "complex": 2,
    "quat": 4,
    "tessarine": 4,
    "klein4": 4,
    "phm2": 2,
    "phm4": 4,
    "hashed4": 4,
}
PHM = {"phm2", "phm4"}

# The issue's own numbers for LeNet-300-100 with 10 classes.
LENET300_100 = {
    "real": 266_610,
    "quat": 67_710,
    "tessarine": 67_710,
    "klein4": 67_710,
    "hashed4": 67_710,
    "complex": 134_010,
    "phm4": 67_838,
}


def expected_count(name: str, algebra: str, classes: int = 10) -> int:
    """Weights + biases, counted from the architecture: hidden layers hold 1/n of a real layer's
    kernel (plus n^3 rules for PHM), the output layer is real. LeNets read the 784-pixel MNIST
    image; conv nets a 32x32 RGB image, which hypercomplex models see as 4 channels (+ gray)."""
    n, kwargs = DIMENSION[algebra], models.spec(name).kwargs

    def hidden(fan_in: int, width: int, area: int = 1) -> int:
        return area * fan_in * width // n + width + (n**3 if algebra in PHM else 0)

    if "features" in kwargs:
        widths = [784, *kwargs["features"]]
        total = 0
    else:
        channels, total = (3 if n == 1 else 4), 0
        for stage in kwargs["stages"]:
            for width in stage:
                total += hidden(channels, width, 9)
                channels = width
        side = 32 // 2 ** len(kwargs["stages"])
        widths = [side * side * channels, 256, 256]  # the paper's Conv-2/4/6 dense layers
    total += sum(hidden(a, b) for a, b in zip(widths, widths[1:]))
    return total + widths[-1] * classes + classes


def param_shapes(name: str, algebra: str, input_shape=None):
    model = models.create(name, algebra)
    if input_shape is None:
        input_shape = (28, 28, 1) if models.spec(name).dataset == "mnist" else (32, 32, 3)
    return jax.eval_shape(lambda k: models.init_params(model, k, input_shape), jax.random.key(0))


def test_the_reference_counts_are_the_issues():
    for algebra, count in LENET300_100.items():
        assert expected_count("lenet300_100", algebra) == count, algebra
    assert set(DIMENSION) <= set(models.algebra_names())


def test_the_docs_table_gives_the_counted_parameters():
    """docs/layers.md's model x algebra table, cell by cell."""
    text = (Path(__file__).parents[1] / "docs" / "layers.md").read_text()
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()]
    (header,) = [row for row in table if row and row[0] == "model (10 classes)"]
    names = {"LeNet-300-100": "lenet300_100", "LeNet-12": "lenet12"}
    names.update({f"Conv-{k}": f"conv{k}" for k in (2, 4, 6)})
    rows = {names[row[0]]: row[1:] for row in table if row and row[0] in names}
    assert sorted(rows) == sorted(models.PAPER_MODELS) and header[1:] == list(DIMENSION)
    for name, cells in rows.items():
        assert [int(c.replace(",", "")) for c in cells] == [
            expected_count(name, a) for a in DIMENSION
        ], name


@pytest.mark.parametrize("name", models.PAPER_MODELS)
def test_every_model_in_every_algebra_has_the_counted_parameters(name):
    for algebra in DIMENSION:
        params = param_shapes(name, algebra)
        assert models.count_params(params) == expected_count(name, algebra), algebra
        assert set(params["output"]) == {"kernel", "bias"}  # the output layer stays real


def tiny(algebra: str):
    return models.create("lenet12", algebra, features=(8,)), (4, 4, 1)


@jax.jit
def masked_step(state: train.TrainState, x, y):
    """One masked Adam step, as the trainer's epoch takes it."""
    (loss, _), grads = jax.value_and_grad(epoch._loss, has_aux=True)(
        state.params, None, state.apply_fn, x, y
    )
    grads = M.apply(grads, state.masks)
    updates, opt = state.tx.update(grads, state.opt_state, state.params, masks=state.masks)
    params = M.apply(optax.apply_updates(state.params, updates), state.masks)
    return state.replace(params=params, opt_state=opt), loss


@pytest.mark.parametrize("algebra", sorted(DIMENSION))
def test_a_pruned_model_of_every_algebra_trains(algebra):
    """Masked Adam steps on a fixed batch: the loss falls, pruned weights stay exactly zero,
    PHM's rules are learned and never masked; whole numbers are pruned together. A LeNet: the
    conv layer's gradients, for a fixed table and a learned one, are test_hyper's."""
    model, shape = tiny(algebra)
    params = models.init_params(model, jax.random.key(1), shape)
    masks = pruning.prune(params, M.ones(params), 0.5, grouping="number")
    state = train.create_train_state(model, params, masks, train.make_optimizer("adam", 1e-2))
    x = jax.random.normal(jax.random.key(2), (8, *shape))
    y = jnp.arange(8) % 10
    losses = []
    for _ in range(3):
        state, loss = masked_step(state, x, y)
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    trained = M.by_path(state.params)
    for path, mask in M.by_path(masks).items():
        assert np.all(trained[path][~mask] == 0) and np.all(np.isfinite(trained[path]))
        if path.endswith("hkernel") or path.endswith("qkernel"):
            assert np.all(mask == mask[:1]), path  # whole numbers kept or pruned
        if path.endswith("phm_rules"):
            assert mask.all()
            initial = np.asarray(params[path.split("/")[0]]["phm_rules"])
            assert not np.array_equal(trained[path], initial)


def test_number_grouping_is_the_quaternion_grouping_on_quaternion_models():
    model, shape = tiny("quat")
    params = models.init_params(model, jax.random.key(3), shape)
    by = {
        g: pruning.prune(params, M.ones(params), 0.6, grouping=g, allow_empty=True)
        for g in ("quaternion", "number")
    }
    for a, b in zip(jax.tree.leaves(by["quaternion"]), jax.tree.leaves(by["number"])):
        np.testing.assert_array_equal(a, b)


def test_density_report_counts_numbers_of_every_algebra():
    model, shape = tiny("complex")
    params = models.init_params(model, jax.random.key(4), shape)
    masks = pruning.prune(params, M.ones(params), 0.5)  # element: numbers can be half alive
    report = M.density_report(masks)
    for name, leaf in report["leaves"].items():
        if name.endswith("hkernel"):
            m = np.asarray(masks[name.split("/")[0]]["hkernel"])
            assert leaf["number_total"] == m[0].size
            assert leaf["number_alive"] == int(np.sum(m[0] | m[1]))
            assert leaf["number_full"] == int(np.sum(m[0] & m[1]))
        else:
            assert "number_total" not in leaf
    assert report["total"]["number_total"] == sum(
        leaf.get("number_total", 0) for leaf in report["leaves"].values()
    )


@pytest.mark.parametrize("algebra", ["phm4", "hashed4"])
def test_a_run_of_a_learned_or_hashed_algebra(mnist_dir, tmp_path, algebra):
    """End to end through the experiment: the run records the tying seed in its config, PHM's
    rules stay unpruned, masks prune whole numbers, the densities count stored weights."""
    config = Config(
        model="lenet12",
        algebra=algebra,
        grouping="number",
        hash_seed=7,
        data_dir=str(mnist_dir),
        rounds=1,
        epochs=1,
        train_subset=300,
        test_subset=100,
        batch_size=60,
    )
    run_dir = lottery.run(config, tmp_path, log=lambda s: None)
    assert json.loads((run_dir / "config.json").read_text())["hash_seed"] == 7
    rd = run_dir / "replicate_0" / "round_01"
    with np.load(rd / "masks.npz") as f:
        masks = {k: f[k] for k in f.files}
    assert np.all(masks["HyperDense_0/hkernel"] == masks["HyperDense_0/hkernel"][:1])
    alive = sum(int(m.sum()) for m in masks.values())
    if algebra == "phm4":
        assert masks["HyperDense_0/phm_rules"].all()
    done = json.loads((rd / "done.json").read_text())
    real = expected_count("lenet12", "real")
    assert done["weights_remaining_pct_of_real"] == pytest.approx(100 * alive / real)
    assert done["weights_remaining_pct"] == pytest.approx(
        100 * alive / expected_count("lenet12", algebra)
    )
