"""The CIFAR ResNets: parameter counts against a formula and the authors' CIFAR-100 counts,
forward passes in train and eval mode, refusals."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import resnets

# (block, blocks per stage, widths, stem), from the architectures' descriptions
ARCHITECTURES = {
    "resnet20": ("basic", (3, 3, 3), (16, 32, 64), 16),
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512), 64),
    "resnet34": ("basic", (3, 4, 6, 3), (64, 128, 256, 512), 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), (64, 128, 256, 512), 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), (64, 128, 256, 512), 64),
}


def expected_count(name: str, n: int, classes: int = 100, hyper_output: bool = True) -> tuple:
    """(parameters, batch-norm parameters): bias-free convolutions (1/n of the real weights),
    split batch norm (a scale and a bias per real channel), a classifier with a bias per class
    (1/n of the real weights if hypercomplex); four input channels."""
    block, stages, widths, stem = ARCHITECTURES[name]
    expansion = 4 if block == "bottleneck" else 1
    conv, bn, channels = 9 * 4 * stem, 2 * stem, stem
    for stage, (blocks, width) in enumerate(zip(stages, widths, strict=True)):
        for index in range(blocks):
            out = expansion * width
            if block == "basic":
                conv += 9 * channels * width + 9 * width * out
                bn += 2 * (width + out)
            else:
                conv += channels * width + 9 * width * width + width * out
                bn += 2 * (2 * width + out)
            if (stage > 0 and index == 0) or channels != out:  # projection shortcut
                conv += channels * out
                bn += 2 * out
            channels = out
    classifier = channels * classes // (n if hyper_output else 1)
    return conv // n + bn + classifier + classes, bn


def count(model, image=(32, 32, 3)) -> tuple[int, int]:
    """(parameters, running statistics), traced without running."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image))))
    sizes = {k: sum(math.prod(a.shape) for a in jax.tree.leaves(v)) for k, v in variables.items()}
    return sizes["params"], sizes["batch_stats"]


def test_resnet18_and_34_have_the_authors_cifar100_counts():
    assert count(resnets.create("resnet18", "real"))[0] == 11_220_708
    assert count(resnets.create("resnet18", "quat"))[0] == 2_812_452
    assert round(count(resnets.create("resnet34", "real"))[0] / 1e6, 2) == 21.33
    assert round(count(resnets.create("resnet34", "quat"))[0] / 1e6, 2) == 5.35


def phm_rules(name: str) -> int:
    """PHM's n^3 = 64 learned rules per hypercomplex layer: every convolution and the
    classifier."""
    block, stages, widths, stem = ARCHITECTURES[name]
    expansion = 4 if block == "bottleneck" else 1
    per_block = 2 if block == "basic" else 3
    shortcuts = sum(1 for s in range(len(stages)) if s > 0 or expansion * widths[0] != stem)
    return 64 * (1 + per_block * sum(stages) + shortcuts + 1)


# the deep bottleneck nets differ from resnet50 in block counts only, which the formula counts;
# tracing them costs more than it checks
@pytest.mark.parametrize("name", ["resnet20", "resnet18", "resnet34", "resnet50"])
def test_every_resnet_counts_as_the_formula(name):
    for algebra, n in (("real", 1), ("quat", 4), ("complex", 2)):
        params, stats = count(resnets.create(name, algebra))
        expected, bn = expected_count(name, n)
        assert params == expected
        assert stats == bn  # a mean and a variance per real channel, kept out of the params
    params, _ = count(resnets.create(name, "quat", output="real"))
    assert params == expected_count(name, 4, hyper_output=False)[0]
    assert count(resnets.create(name, "phm4"))[0] == expected_count(name, 4)[0] + phm_rules(name)


def test_a_resnet_trains_and_evaluates():
    # resnet20's code with one block a stage (its compilation is most of the test's time)
    layout = {**resnets.LAYOUTS["resnet20"], "stage_sizes": (1, 1, 1)}
    model = resnets.ResNet(algebra="quat", num_classes=10, output="real", **layout)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    evaluate = jax.jit(model.apply)  # one program each: op by op would compile every op
    logits, updates = train(variables, x)
    assert logits.shape == (4, 10) and bool(jnp.all(jnp.isfinite(logits)))
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), updates["batch_stats"], variables["batch_stats"]
    )
    assert all(jax.tree.leaves(moved))  # every batch norm's statistics moved
    trained = {**variables, **updates}
    evaluated = evaluate(trained, x)  # eval mode: the running statistics, nothing updated
    assert evaluated.shape == (4, 10) and not np.allclose(evaluated, logits)
    assert np.allclose(evaluate(trained, x[:1]), evaluated[:1], atol=1e-5)


def test_bottlenecks_and_a_hypercomplex_classifier_run():
    model = resnets.ResNet(
        algebra="complex", block="bottleneck", stage_sizes=(1, 2), widths=(4, 8), stem=8
    )
    x = jnp.ones((2, 8, 8, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert variables["params"]["output"]["hkernel"].shape == (2, 16, 50)  # 32 -> 100, n = 2
    assert "shortcut" in variables["params"]["stage1_block1"]  # 8 -> 16 channels
    assert "shortcut" not in variables["params"]["stage2_block2"]
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    assert train(variables, x)[0].shape == (2, 100)


def test_refusals_name_the_bad_value_and_the_choices():
    with pytest.raises(ValueError, match=r"^output 'hyper' needs a class count divisible by n=4"):
        resnets.create("resnet20", "quat", 10, output="hyper")
    assert resnets.output_kind("quat", 10, "auto") == "real"
    assert resnets.output_kind("quat", 100, "auto") == "hyper"
    with pytest.raises(ValueError, match=r"unknown output 'linear'; valid: \['auto'"):
        resnets.create("resnet18", "quat", output="linear")
    with pytest.raises(ValueError, match=r"unknown model 'resnet19'; valid: \['resnet101'"):
        resnets.create("resnet19")
    with pytest.raises(ValueError, match=r"form 'shared' does not apply to algebra hashed4"):
        resnets.create("resnet20", "hashed4", bn_form="shared")


def test_the_docs_table_gives_the_counted_parameters():
    """docs/resnets.md's model x algebra table, cell by cell: the formula (which the models
    match, above) for every cell, and resnet20's cells against the models of every algebra."""
    text = (Path(__file__).parents[1] / "docs" / "resnets.md").read_text()
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()]
    (header,) = [row for row in table if row and row[0] == "model (100 classes)"]
    columns = [[a.strip() for a in cell.split(",")] for cell in header[1:]]
    assert columns == [["real"], ["complex"], ["quat", "tessarine", "klein4", "hashed4"], ["phm4"]]
    rows = {f"resnet{row[0][7:]}": row[1:] for row in table if row and row[0].startswith("ResNet-")}
    assert sorted(rows) == sorted(ARCHITECTURES)
    for name, cells in rows.items():
        quat = expected_count(name, 4)[0]
        formula = [expected_count(name, 1)[0], expected_count(name, 2)[0], quat]
        formula.append(quat + phm_rules(name))
        assert [int(c.replace(",", "")) for c in cells] == formula, name
    for algebras, cell in zip(columns, rows["resnet20"], strict=True):
        for algebra in algebras:
            assert count(resnets.create("resnet20", algebra))[0] == int(cell.replace(",", ""))
