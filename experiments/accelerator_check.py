r"""Check qsparse on a GPU or TPU machine, and write one report.

    python -m experiments.accelerator_check --out=results/bench_gpu.md

Three parts, each in a fresh process on the machine's default backend:

1. the test suite (``pytest``) with ``JAX_PLATFORMS`` set to that backend;
2. the benchmark (``experiments.bench``): LeNet-300-100, Conv-2/4/6 and ResNet-20/18, real and
   quaternion, and
   R = 1 against R = ``--replicates`` replicates in one compiled epoch, replicates sharing a device
   run both unrolled and vmapped (the faster one should be the backend's default);
3. lottery-ticket runs of Conv-4 and the CIFAR-100 ResNet-18 (``--models``), each with its own
   recipe, ``--rounds`` pruning rounds on synthetic data of the model's dataset shape through the
   library's IMP (:mod:`benchmarks.accelerator`), timed per epoch, with the compiled epoch traced
   once and round 0 trained twice to check that it is bit-for-bit repeatable.

On GPU, XLA's determinism flag (``--xla_gpu_deterministic_ops``) is set for every part:
qsparse promises identical results when a run resumes. The report (Markdown) holds the pytest
summary, the benchmark tables and the IMP table; ``--parts`` picks a subset.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from absl import flags

from experiments.cli import fail, require, run

DETERMINISM = "--xla_gpu_deterministic_ops=true"
PARTS = ("tests", "bench", "imp")

flags.DEFINE_string("out", None, "the report (Markdown); default results/accelerator_<platform>.md")
flags.DEFINE_list("parts", list(PARTS), "which parts to run: tests, bench, imp")
flags.DEFINE_integer("replicates", 8, "R for the replicates-at-once benchmark")
flags.DEFINE_integer("windows", 5, "timed windows per benchmark measurement")
flags.DEFINE_integer("rounds", 3, "pruning rounds of the IMP run (after the dense round 0)")
flags.DEFINE_integer("epochs", 2, "epochs per round of the IMP run")
flags.DEFINE_integer("images", 50_000, "synthetic CIFAR-shaped training images of the IMP run")
flags.DEFINE_list("algebras", ["real", "quat"], "the IMP run's algebras")
flags.DEFINE_list(
    "models",
    ["conv4", "resnet18"],
    "the IMP part's models (on a CPU, a tiny one such as lenet12)",
)
flags.DEFINE_string("pytest_args", "-q -x", "arguments for the test-suite part")
FLAGS = flags.FLAGS

REPO = Path(__file__).resolve().parents[1]


def _env(platform: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": platform}
    if platform == "gpu" and DETERMINISM not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {DETERMINISM}".strip()
    return env


def run_tests(platform: str) -> str:
    """The suite on ``platform``; its closing summary line (pass/fail counts)."""
    cmd = [sys.executable, "-m", "pytest", *FLAGS.pytest_args.split(), "tests"]
    result = subprocess.run(cmd, cwd=REPO, env=_env(platform), capture_output=True, text=True)
    lines = [line for line in result.stdout.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else result.stderr[-500:]
    return f"`{' '.join(cmd[2:])}` exited {result.returncode}: {last}"


def run_bench(platform: str, json_path: Path) -> str:
    """``experiments.bench`` on ``platform``; its Markdown tables."""
    md = json_path.with_suffix(".md")
    cmd = [
        sys.executable,
        "-m",
        "experiments.bench",
        "--models=lenet300_100,conv2,conv4,conv6,resnet20,resnet18",
        f"--windows={FLAGS.windows}",
        "--epochs=0",
        f"--replicates={FLAGS.replicates}",
        "--replicate_models=lenet300_100,conv4",
        "--replicate_modes=unroll,vmap",
        "--no_references",
        "--no_xla_conv",
        f"--json={json_path}",
        f"--markdown={md}",
    ]
    result = subprocess.run(cmd, cwd=REPO, env=_env(platform), capture_output=True, text=True)
    if result.returncode:
        command, stderr = " ".join(cmd[2:]), result.stderr[-3000:]
        return f"`{command}` failed (exit {result.returncode}):\n\n```\n{stderr}\n```\n"
    return md.read_text()


def main(argv: list[str]) -> None:
    require(argv)
    from qsparse.models import REGISTRY, algebra_names

    for name, valid in (("parts", PARTS), ("algebras", algebra_names())):
        bad = sorted(set(FLAGS[name].value) - set(valid))
        if bad:
            fail(f"--{name}={','.join(FLAGS[name].value)}: unknown {bad}; valid: {list(valid)}")
    bad = sorted(set(FLAGS.models) - set(REGISTRY))
    if bad:
        fail(f"--models={','.join(FLAGS.models)}: unknown {bad}; valid: {sorted(REGISTRY)}")
    import jax

    from benchmarks.accelerator import imp_table
    from qsparse import files
    from qsparse.config import ConfigError

    platform = jax.default_backend()
    if platform == "gpu" and DETERMINISM not in os.environ.get("XLA_FLAGS", ""):
        # this process's own runs (the IMP part) need the flag before the backend starts: rerun
        os.execve(
            sys.executable,
            [sys.executable, "-m", "experiments.accelerator_check", *sys.argv[1:]],
            _env(platform),
        )
    out = Path(FLAGS.out or REPO / "results" / f"accelerator_{platform}.md")
    out.parent.mkdir(parents=True, exist_ok=True)  # the benchmark's JSON goes beside it
    devices = jax.devices()
    parts = [
        f"# qsparse on {devices[0].device_kind} ({len(devices)} x {platform})\n",
        f"jax {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"`python -m experiments.accelerator_check {' '.join(sys.argv[1:])}`\n",
    ]
    if "tests" in FLAGS.parts:
        print("tests ...", flush=True)
        parts += ["## Tests\n", run_tests(platform) + "\n"]
    if "bench" in FLAGS.parts:
        print("benchmark ...", flush=True)
        parts += ["## Benchmark\n", run_bench(platform, out.with_name(out.stem + "_bench.json"))]
    for model in FLAGS.models if "imp" in FLAGS.parts else ():
        print(f"{model} IMP ...", flush=True)
        try:
            table = imp_table(
                FLAGS.rounds, FLAGS.epochs, FLAGS.images, tuple(FLAGS.algebras), model
            )
        except ConfigError as e:  # e.g. a recipe's rewind point past --epochs
            fail(f"--models={model} with --epochs={FLAGS.epochs}, --images={FLAGS.images}: {e}")
        parts += [f"## {model} IMP\n", table + "\n"]
    report = "\n".join(parts)
    try:
        files.write_text(out, report)
    except files.WriteError as e:
        fail(str(e), status=1)
    print(report)


if __name__ == "__main__":
    run(main)
