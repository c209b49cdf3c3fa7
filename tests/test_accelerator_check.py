"""experiments.accelerator_check on the CPU, tiny sizes: the report it writes on a GPU or TPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = (
    pytest.mark.subprocess
)  # starts Python processes: skipped by a quick run (-m "not subprocess")

REPO = Path(__file__).resolve().parents[1]


def test_imp_part_writes_its_table(tmp_path):
    out = tmp_path / "report.md"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.accelerator_check",
            "--parts=imp",
            "--rounds=1",
            "--epochs=1",
            "--images=120",
            f"--out={out}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        line.split("|")[1:-1]
        for line in out.read_text().splitlines()
        if line.startswith("| real") or line.startswith("| quat")
    ]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        ("real", "0"),
        ("real", "1"),
        ("quat", "0"),
        ("quat", "1"),
    ]
    assert [r[2].strip() for r in rows][1] == "80.0"  # one round of 20 % global pruning
    assert all(
        r[-2].strip() == "1" and r[-1].strip() == "yes" for r in rows
    )  # traced once; repeatable


def test_unknown_part_is_refused():
    result = subprocess.run(
        [sys.executable, "-m", "experiments.accelerator_check", "--parts=imp,gpu"],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --parts=imp,gpu: unknown ['gpu']; valid: ['tests', 'bench', 'imp']"
    )
