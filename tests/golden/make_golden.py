"""Writes the golden fixture that tests/test_golden.py holds later code to.

    python tests/golden/make_golden.py            # from the repository root

Run once, with the code whose behaviour is to be kept (the commit is recorded in
tests/golden/README.md). It writes

* ``partial_run/``: a tiny quaternion LeNet-12 run killed after round 1's second epoch was trained
  and logged but before its checkpoint was written (round 1 resumes from epoch 1);
* ``expected.json``: for each config in CONFIGS, the summary and every metrics.jsonl (timings
  dropped) of an uninterrupted run, the run directory's file layout, and what the readers of
  ``qsparse.results`` return for ``partial_run/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py

from qsparse import data, lottery, report, results  # noqa: E402
from qsparse.config import Config  # noqa: E402

SMALL = dict(
    model="lenet12",
    rounds=2,
    epochs=2,
    train_subset=120,
    test_subset=60,
    validation_size=20,
    batch_size=20,
)
CONFIGS = {
    # lottery protocol, late rewinding, quaternion, one replicate: the resumed fixture
    "quat_rewind": dict(SMALL, algebra="quat", hidden=(4,), rewind="1it", seed=3),
    # the paper's protocol, two replicates trained together, a carried optimizer
    "real_paper": dict(
        SMALL,
        algebra="real",
        hidden=(8,),
        protocol="paper",
        replicates=2,
        optimizer_state="carry",
        seed=1,
    ),
    # controls and groupings: shuffled masks, whole quaternions, output kept, sparse evaluation
    "quat_shuffle": dict(
        SMALL,
        algebra="quat",
        hidden=(8,),
        control="shuffle",
        grouping="quaternion",
        prune_output=False,
        eval_every=2,
        seed=2,
    ),
}
PARTIAL = "quat_rewind"
FAULT = "epoch_end:4"  # round 0: epochs 1, 2; round 1: epoch 1, then killed after epoch 2's log
TIMINGS = ("seconds", "images_per_sec")
EVENTS = "events.out.tfevents."


def layout(run_dir: Path) -> list[str]:
    """Relative paths of a run's files; a checkpoint folder (Orbax's files inside) counts as one.

    TensorBoard event files (qsparse.summaries, added after the fixture was made: their names
    hold a time and a pid) are left out, so the layout compared is the one the fixture has.
    """
    out = []
    for root, dirs, files in os.walk(run_dir):
        rel = Path(root).relative_to(run_dir)
        if "qsparse.json" in files:
            out.append(f"{rel}/")
            dirs.clear()
            continue
        dirs.sort()
        out += [str(rel / f) for f in sorted(files) if f != ".lock" and not f.startswith(EVENTS)]
    return sorted(out)


def metrics(run_dir: Path) -> dict[str, list[dict]]:
    """Every metrics.jsonl of a run without its wall-clock fields."""
    return {
        str(p.relative_to(run_dir)): [
            {k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in p.read_text().splitlines()
        ]
        for p in sorted(run_dir.rglob("metrics.jsonl"))
    }


def reads(run_dir: Path) -> dict:
    """What the results readers return for a run directory, as JSON."""
    rows = [{**r, "run": None} for r in results.read_rows(run_dir)]
    for r in rows:
        r.pop("data_dir")
    density = results.layer_density(run_dir)
    return {
        "rows": rows,
        "layer_density": {
            "rounds": density.rounds,
            **{
                key: {k: v.tolist() for k, v in getattr(density, f).items()}
                # the fixture's keys predate other algebras: quat_* read number_*
                for key, f in (
                    ("density", "density"),
                    ("quat_full", "number_full"),
                    ("quat_alive", "number_alive"),
                )
            },
        },
        "mask_rounds": results.mask_rounds(run_dir),
        "masks": {
            str(level): {
                k: v.astype(int).sum(axis=tuple(range(1, v.ndim))).tolist()
                for k, v in results.load_masks(run_dir, 0, level).items()
            }
            for level in results.mask_rounds(run_dir)
        },
        "quaternion_summary": results.quaternion_summary(run_dir),
        "markdown_report": report.markdown_report(
            results.aggregate(results.read_rows(run_dir))
        ).replace(str(run_dir), "RUN"),
    }


def flags(config: dict) -> list[str]:
    def show(v):
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

    return [f"--{k}={show(v)}" for k, v in config.items()]


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    tfds_dir = tmp / "tfds"
    data.load("mnist", data_dir=tfds_dir)
    expected = {"jax": jax.__version__, "runs": {}}
    for name, fields in CONFIGS.items():
        config = Config(**fields, data_dir=str(tfds_dir))
        run_dir = lottery.run(config, tmp / "work", log=lambda s: None)
        expected["runs"][name] = {
            "run_name": run_dir.name,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
            "summary": json.loads((run_dir / "summary.json").read_text()),
            "metrics": metrics(run_dir),
            "layout": layout(run_dir),
        }
    partial = HERE / "partial_run"
    shutil.rmtree(partial, ignore_errors=True)
    env = {
        **os.environ,
        "QSPARSE_FAULT": FAULT,
        "JAX_PLATFORMS": "cpu",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
    }
    cmd = [
        sys.executable,
        "-m",
        "experiments.imp",
        *flags(CONFIGS[PARTIAL]),
        f"--data_dir={tfds_dir}",
        f"--run_dir={partial}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (partial / ".lock").unlink()
    expected["partial_reads"] = reads(partial)
    expected["partial_layout"] = layout(partial)
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
