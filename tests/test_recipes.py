"""Each model's training recipe (optimizer, schedule, pruning), the ResNets' classifier and batch
norm as config fields, and an IMP run of a residual network with batch norm."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsparse import experiment, lottery, models, resnets, train
from qsparse.config import MODEL_DEFAULTS, Config, ConfigError


def resolved(**kw):
    return experiment.resolve(Config(**kw))


def test_the_paper_models_resolve_as_before():
    c = resolved(model="conv4", algebra="quat")
    assert {k: getattr(c, k) for k in MODEL_DEFAULTS} == MODEL_DEFAULTS
    # a run name hashes only what differs from those values: an explicit default changes nothing
    explicit = resolved(model="conv4", algebra="quat", optimizer="adam", prune_fraction=0.2)
    assert explicit.run_name() == c.run_name()
    assert resolved(model="conv4", algebra="quat", optimizer="sgd").run_name() != c.run_name()


def test_resnet_recipes():
    c = resolved(model="resnet18", algebra="quat")
    assert (c.dataset, c.epochs, c.batch_size, c.lr) == ("cifar100", 100, 100, 0.1)
    assert (c.optimizer, c.momentum, c.nesterov, c.weight_decay) == ("sgd", 0.9, True, 1e-4)
    assert (c.schedule, c.warmup_epochs) == ("warmup_cosine", 10)
    assert (c.pruning, c.prune_fraction, c.rewind) == ("layerwise", 0.3, "init")
    assert (c.output_layer, c.bn_form) == ("hyper", "split")  # 100 classes: 25 quaternions
    r = resolved(model="resnet20", algebra="real")
    assert (r.dataset, r.epochs, r.batch_size, r.schedule) == ("cifar10", 160, 128, "step")
    assert (r.prune_output, r.rewind, r.pruning, r.prune_fraction) == (False, "1ep", "global", 0.2)
    # a flag given wins over the recipe; another optimizer does not inherit sgd's momentum
    own = resolved(model="resnet18", optimizer="adam", lr=1e-3, epochs=30)
    assert (own.optimizer, own.nesterov, own.lr, own.epochs) == ("adam", False, 1e-3, 30)
    assert own.warmup_epochs == 3  # the recipe's warm-up keeps its tenth of the epochs


def test_resnet_classifier_follows_the_class_count():
    assert resolved(model="resnet20", algebra="quat").output_layer == "real"  # 10 classes
    assert resolved(model="resnet20", algebra="complex").output_layer == "hyper"  # 5 numbers
    with pytest.raises(ConfigError, match=r"output 'hyper' needs a class count divisible by n=4"):
        resolved(model="resnet20", algebra="quat", output_layer="hyper")
    m = experiment.create_model(resolved(model="resnet18", algebra="quat"), 100)
    params = jax.eval_shape(lambda: models.init_params(m, jax.random.key(0), (32, 32, 3)))
    assert params["output"]["qkernel"].shape == (4, 128, 25)  # 512 real features, 25 outputs


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(model="lenet12", output_layer="hyper"), "applies to the ResNets only"),
        (dict(model="conv4", bn_form="split"), "applies to the ResNets only"),
        (dict(model="resnet20", algebra="hashed4", bn_form="shared"), "does not apply"),
        (dict(model="resnet20", bn_form="batch"), "bn_form"),
        (dict(model="resnet20", schedule="linear"), "schedule"),
        (dict(model="lenet12", optimizer="adam", nesterov=True), "nesterov needs optimizer='sgd'"),
        (dict(model="lenet12", warmup_epochs=20), "warmup_epochs=20 must be in"),
        (dict(model="resnet18", hidden=(64,)), "does not apply to resnet18"),
    ],
)
def test_bad_recipe_fields_are_refused_in_one_line(kw, message):
    with pytest.raises(ConfigError, match=message) as e:
        resolved(**kw)
    assert "\n" not in str(e.value)


def test_default_optimizer_state_is_what_qsparse_always_built():
    params = {"w": jnp.ones(3)}
    for name, base in (("adam", optax.adam(1e-3)), ("sgd", optax.sgd(1e-3, momentum=0.9))):
        old = optax.chain(base, train.zero_pruned()).init(params)
        new = train.make_optimizer(name, 1e-3).init(params)
        assert jax.tree.structure(new) == jax.tree.structure(old)


def test_schedules():
    lr, total = 0.1, 400
    cos = train.learning_rate(lr, "warmup_cosine", 40, total)
    assert float(cos(0)) == 0.0 and float(cos(20)) == pytest.approx(lr / 2)
    assert float(cos(40)) == pytest.approx(lr) and float(cos(total)) == pytest.approx(0.0)
    assert float(cos(220)) == pytest.approx(lr / 2)  # half-way down the cosine
    step = train.learning_rate(lr, "step", total_steps=total)
    got = [float(step(s)) for s in (0, 199, 200, 299, 300, 399)]
    np.testing.assert_allclose(got, [lr, lr, lr / 10, lr / 10, lr / 100, lr / 100], rtol=1e-6)
    assert train.learning_rate(lr, "constant") == lr


def test_weight_decay_is_added_to_the_gradient_and_spares_pruned_weights():
    params = {"w": jnp.array([2.0, 0.0, -1.0])}
    masks = {"w": jnp.array([True, False, True])}
    tx = train.make_optimizer("sgd", 0.5, momentum=0.0, weight_decay=0.1)
    grads = {"w": jnp.array([0.0, 0.0, 1.0])}
    updates, _ = tx.update(grads, tx.init(params), params, masks=masks)
    # d = g + wd * w, a step of -lr * d; the pruned weight's update is exactly zero
    np.testing.assert_allclose(updates["w"], [-0.5 * 0.2, 0.0, -0.5 * (1.0 - 0.1)], rtol=1e-6)


@pytest.fixture
def mini_resnet(monkeypatch):
    layout = {"block": "basic", "stage_sizes": (1, 1), "widths": (8, 16), "stem": 8}
    recipe = dict(resnets.RECIPES["resnet20"][4])
    spec = models.Spec(resnets.ResNet, layout, "mnist", 1, 60, 0.05, recipe)
    monkeypatch.setitem(models.REGISTRY, "mini_resnet", spec)
    return "mini_resnet"


def test_imp_of_a_resnet_keeps_batch_norm_out_of_pruning(mini_resnet, mnist_dir, tmp_path):
    config = Config(
        model=mini_resnet,
        algebra="quat",
        data_dir=str(mnist_dir),
        rounds=2,
        train_subset=240,
        test_subset=120,
        rewind="1it",
    )
    run_dir = lottery.run(config, tmp_path, log=lambda s: None)
    stored = json.loads((run_dir / "config.json").read_text())
    assert (stored["output_layer"], stored["bn_form"], stored["schedule"]) == (
        "real",
        "split",
        "step",
    )
    masks = np.load(run_dir / "replicate_0" / "round_02" / "masks.npz")
    bn = [k for k in masks.files if "BatchNorm" in k or "bn" in k.lower()]
    kernels = [k for k in masks.files if k.endswith("kernel") and not k.startswith("output")]
    output = [k for k in masks.files if k.startswith("output") and k.endswith("kernel")]
    assert output and all(masks[k].all() for k in output)  # the recipe keeps the output layer
    assert bn and kernels, masks.files
    assert all(masks[k].all() for k in bn)  # batch norm's scale and bias: never pruned
    alive = sum(int(masks[k].sum()) for k in kernels) / sum(masks[k].size for k in kernels)
    assert alive == pytest.approx(0.8**2, abs=0.02)
    rows = json.loads((run_dir / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["ok"] * 3
    # evaluated in eval mode from the round's trained statistics: finite, a real accuracy
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
