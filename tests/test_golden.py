"""Behaviour kept across refactors: runs written by an earlier qsparse (tests/golden/, made by
``make_golden.py`` at the commit named in its README) are resumed and read back by this code, and
fresh runs of the same configs compute the same numbers, bit for bit, into the same layout.

Bit equality is a statement about the code only under the same compiler for the same CPU: the
runs train in a process at XLA's default optimisations, as the fixture's were (the other tests
compile without them, see conftest.py), and with another jax version than the fixture's, or on a
CPU without the fixture's AVX-512 (XLA vectorises its reductions for the host, and their sums
round differently: 1e-7 relative on an AVX2 EPYC), numbers are compared to float tolerance
instead (layouts, counts and statuses still exactly).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from qsparse.deploy.kernels import host_features

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
import make_golden  # noqa: E402

EXPECTED = json.loads((GOLDEN / "expected.json").read_text())
FIXTURE_CPU = "avx512f"  # the fixture's numbers are those of an AVX-512 Xeon, bit for bit


SAME_COMPILER = jax.__version__ == EXPECTED["jax"] and bool(host_features().get(FIXTURE_CPU))


def assert_same(actual, expected, where=""):
    """Equal JSON values; floats bit for bit under the fixture's jax and CPU, else to rtol 1e-5."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), where
        for k in expected:
            assert_same(actual[k], expected[k], f"{where}/{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and not SAME_COMPILER:
        np.testing.assert_allclose(actual, expected, rtol=1e-5, err_msg=where)
    else:
        assert actual == expected or (actual != actual and expected != expected), (
            f"{where}: {actual!r} != {expected!r}"
        )


_RUN = """
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
from qsparse import lottery
from qsparse.config import Config
fields, workdir, run_dir = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] or None
config = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
print(lottery.run(config, workdir, run_dir=run_dir, log=lambda s: None))
"""


def run_optimized(modules, name: str, data_dir, workdir: Path, run_dir: Path | None = None) -> Path:
    """``lottery.run`` of the golden config ``name`` in a process compiling as the fixture's did."""
    fields = {**EXPECTED["runs"][name]["config"], "data_dir": str(data_dir)}
    done = subprocess.run(
        [sys.executable, "-c", _RUN, json.dumps(fields), str(workdir), str(run_dir or "")],
        env=modules.env(optimized=True),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def assert_run_matches(run_dir: Path, name: str) -> None:
    golden = EXPECTED["runs"][name]
    assert make_golden.layout(run_dir) == golden["layout"]
    assert_same(json.loads((run_dir / "summary.json").read_text()), golden["summary"], "summary")
    assert_same(make_golden.metrics(run_dir), golden["metrics"], "metrics")


def test_old_run_directory_reads_back_the_same():
    assert make_golden.layout(GOLDEN / "partial_run") == EXPECTED["partial_layout"]
    assert_same(make_golden.reads(GOLDEN / "partial_run"), EXPECTED["partial_reads"], "reads")


@pytest.mark.subprocess
def test_old_run_directory_resumes_to_the_uninterrupted_numbers(modules, mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(GOLDEN / "partial_run", run_dir)
    run_optimized(modules, make_golden.PARTIAL, mnist_dir, tmp_path, run_dir)
    assert_run_matches(run_dir, make_golden.PARTIAL)
    assert (
        len((run_dir / "runs.jsonl").read_text().splitlines()) == 2
    )  # the old invocation, and this one


@pytest.mark.subprocess
@pytest.mark.parametrize("name", sorted(EXPECTED["runs"]))
def test_fresh_run_computes_the_golden_numbers(modules, mnist_dir, tmp_path, name):
    run_dir = run_optimized(modules, name, mnist_dir, tmp_path)
    assert run_dir.name == EXPECTED["runs"][name]["run_name"]
    assert_run_matches(run_dir, name)
