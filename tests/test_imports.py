"""qsparse's three import tiers, each importable without the tier above it, over numpy leaves.

* leaves (the algebras' tables, the deploy ops and their array code, atomic file writes, the
  config schema): numpy or the standard library only, and no other qsparse module; every tier
  may import them;
* core (layers, models, pruning, training): jax, flax, optax and numpy only;
* run (config, data, checkpoints, run directory, summaries, loop, experiment setup, lottery,
  deployment runtime and export): the core plus orbax, tensorflow-datasets and tensorboardX;
* analysis (results, paper figures, report, plots, deployment accounting, statistics,
  comparisons): numpy, scipy and matplotlib, no jax; it shares the run tier's jax-free modules:
  the run-directory vocabulary and the numpy deployment runtime.

Each tier is imported in a fresh interpreter in which importing anything outside it fails.
"""

import subprocess
import sys

import pytest

LEAVES = ["algebras", "ops", "files", "config"]
CORE = [
    "quaternion",
    "initializers",
    "layers",
    "models",
    "masks",
    "pruning",
    "augment",
    "epoch",
    "train",
    "cpu",
    "nnx",
    "hyper",
    "batchnorm",
    "resnets",
]
RUN = [
    "data",
    "datasets",
    "checkpoints",
    "rundir",
    "summaries",
    "loop",
    "progress",
    "experiment",
    "lottery",
    "distributed",
    "deploy",
    "export",
]
ANALYSIS = ["results", "paper", "report", "plots", "accounting", "stats", "replicates", "compare"]
JAX_FREE = ["rundir", "deploy"]  # run-tier modules that are numpy only
TIERS = {
    "leaves": (
        LEAVES,
        [
            "jax",
            "jaxlib",
            "flax",
            "optax",
            "orbax",
            "scipy",
            "tensorflow",
            "matplotlib",
            *(f"qsparse.{m}" for m in CORE + RUN + ANALYSIS),
        ],
    ),
    "core": (
        CORE,
        [
            "tensorflow",
            "tensorflow_datasets",
            "orbax",
            "matplotlib",
            "tensorboardX",
            *(f"qsparse.{m}" for m in RUN + ANALYSIS),
        ],
    ),
    "run": (CORE + RUN, ["matplotlib", *(f"qsparse.{m}" for m in ANALYSIS)]),
    "analysis": (
        ANALYSIS + JAX_FREE,
        [
            "jax",
            "jaxlib",
            "flax",
            "optax",
            "orbax",
            "tensorflow",
            "tensorflow_datasets",
            *(f"qsparse.{m}" for m in CORE + RUN if m not in JAX_FREE),
        ],
    ),
}

SCRIPT = """
import builtins, importlib, sys
forbidden = {forbidden!r}
real_import = builtins.__import__

def blocked(name):
    return any(name == f or name.startswith(f + ".") for f in forbidden)

def guarded(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and blocked(name):
        raise ImportError(f"imported {{name}}")
    for item in fromlist or ():
        if level == 0 and blocked(f"{{name}}.{{item}}"):
            raise ImportError(f"imported {{name}}.{{item}}")
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = guarded
for module in {modules!r}:
    importlib.import_module("qsparse." + module)
print(sorted(m for m in sys.modules if blocked(m)))
"""


@pytest.mark.parametrize("tier", sorted(TIERS))
def test_tier_imports_without_the_tiers_above(tier):
    modules, forbidden = TIERS[tier]
    script = SCRIPT.format(modules=modules, forbidden=forbidden)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "", "MPLBACKEND": "Agg"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_every_module_belongs_to_a_tier():
    from pathlib import Path

    import qsparse

    found = {p.stem for p in Path(qsparse.__file__).parent.glob("*.py") if p.stem != "__init__"}
    found |= {
        p.name for p in Path(qsparse.__file__).parent.iterdir() if (p / "__init__.py").exists()
    }
    assert found == set(LEAVES + CORE + RUN + ANALYSIS)
