"""experiments.accelerator_check on the CPU, tiny sizes: the report it writes on a GPU or TPU."""

import numpy as np
import pytest

from benchmarks import accelerator
from qsparse import data, models

pytestmark = (
    pytest.mark.subprocess
)  # starts Python processes: skipped by a quick run (-m "not subprocess")


def test_imp_part_writes_its_table(tmp_path, modules):
    out = tmp_path / "report.md"
    result = modules.run(
        "experiments.accelerator_check",
        "--parts=imp",
        "--rounds=1",
        "--epochs=1",
        "--images=120",
        "--algebras=real",  # both run the same code (real compiles faster); the GPU report has both
        "--models=lenet12",  # the same IMP code as the GPU report's models, faster
        f"--out={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith(out.read_text().strip())
    rows = [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in out.read_text().splitlines()
        if line.startswith("| real") or line.startswith("| quat")
    ]
    assert [(r[0], r[1]) for r in rows] == [("real", "0"), ("real", "1")]
    assert [r[2] for r in rows] == ["100.0", "80.0"]  # one round of 20 % global pruning
    assert "acc, 120 train images" in out.read_text()
    assert (
        "## lenet12 IMP\n" in out.read_text() and "lenet12 IMP on 120 synthetic" in out.read_text()
    )
    for r in rows:
        seconds, images_per_s = float(r[3]), float(r[4].replace(",", ""))
        # both printed rounded: seconds to 0.01 (0.00 for an epoch under 5 ms), images/s to 1
        assert abs(120 / images_per_s - seconds) <= 0.005 + 120 / images_per_s**2
        assert 0.0 <= float(r[6]) <= 1.0
        assert r[-2] == "1" and r[-1] == "yes"  # traced once per run; round 0 repeatable


def test_unknown_part_algebra_or_model_is_refused(modules):
    results = modules.batch(
        "experiments.accelerator_check",
        ["--parts=imp,gpu"],
        ["--algebras=quat,octonion"],
        ["--parts=imp", "--models=resnet20", "--epochs=1"],
        ["--models=conv4,resnet19"],
    )
    expected = [
        "error: --parts=imp,gpu: unknown ['gpu']; valid: ['tests', 'bench', 'imp']",
        "error: --algebras=quat,octonion: unknown ['octonion']; valid: "
        "['real', 'complex', 'quat', 'tessarine', 'klein4', 'phm2', 'phm4', 'hashed4']",
        # ResNet-20's recipe rewinds to the end of epoch 1: a one-epoch round cannot, in one line
        "error: --models=resnet20 with --epochs=1, --images=50000: rewind=1ep is step 390, not "
        "before the end of training (390 steps)",
        f"error: --models=conv4,resnet19: unknown ['resnet19']; valid: {sorted(models.REGISTRY)}",
    ]
    for result, line in zip(results, expected, strict=True):
        assert result.returncode == 2 and result.stderr.strip() == line, result.stderr


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_synthetic_data_is_what_the_models_dataset_loads_as(name, tmp_path):
    """The IMP part's stand-in data load as the model's dataset: its shape and class count, the
    test split the first training images."""
    accelerator.synthetic_cifar(tmp_path, name, 50, 10)
    ds = data.load(name, data_dir=tmp_path)
    spec = data.DATASETS[name]
    assert ds.train_images.shape == (50, *spec.image_shape) and ds.num_classes == spec.num_classes
    assert ds.train_labels.max() < spec.num_classes and len(set(ds.train_labels)) > 10 * (
        name == "cifar100"
    )
    np.testing.assert_array_equal(ds.test_images, ds.train_images[:10])
