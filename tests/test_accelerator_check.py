"""experiments.accelerator_check on the CPU, tiny sizes: the report it writes on a GPU or TPU."""

import pytest

from qsparse import models

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
        "--model=lenet12",  # the same IMP code as the GPU report's conv4, faster
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
        # both printed rounded: seconds to 0.01, images/s to 1
        assert 120 / (seconds + 0.005) - 0.5 <= images_per_s <= 120 / (seconds - 0.005) + 0.5
        assert 0.0 <= float(r[6]) <= 1.0
        assert r[-2] == "1" and r[-1] == "yes"  # traced once per run; round 0 repeatable


def test_unknown_part_algebra_or_model_is_refused(modules):
    result = modules.run("experiments.accelerator_check", "--parts=imp,gpu")
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --parts=imp,gpu: unknown ['gpu']; valid: ['tests', 'bench', 'imp']"
    )
    result = modules.run("experiments.accelerator_check", "--algebras=quat,octonion")
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --algebras=quat,octonion: unknown ['octonion']; valid: "
        "['real', 'complex', 'quat', 'tessarine', 'klein4', 'phm2', 'phm4', 'hashed4']"
    )
    result = modules.run("experiments.accelerator_check", "--model=resnet19")
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: --model=resnet19: unknown; valid: {sorted(models.REGISTRY)}"
    )
