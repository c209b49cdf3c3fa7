r"""Check qsparse on a GPU or TPU machine, and write one report.

    python -m experiments.accelerator_check --out=results/bench_gpu.md

Three parts, each in a fresh process on the machine's default backend:

1. the test suite (``pytest``) with ``JAX_PLATFORMS`` set to that backend;
2. the benchmark (``experiments.bench``): LeNet-300-100 and Conv-2/4/6, real and quaternion, and
   R = 1 against R = ``--replicates`` replicates in one compiled epoch, replicates sharing a device
   run both unrolled and vmapped (the faster one should be the backend's default);
3. a Conv-4 lottery-ticket run of ``--rounds`` pruning rounds on synthetic CIFAR-shaped data
   through the library (``Trainer``, ``pruning``), timed per epoch, with the compiled epoch traced
   once and round 0's first epoch computed twice to check that it is bit-for-bit repeatable.

On GPU, XLA's determinism flag (``--xla_gpu_deterministic_ops``) is set for every part:
qsparse promises identical results when a run resumes. The report (Markdown) holds the pytest
summary, the benchmark tables and the IMP table; ``--parts`` picks a subset.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

DETERMINISM = "--xla_gpu_deterministic_ops=true"
PARTS = ("tests", "bench", "imp")

flags.DEFINE_string("out", None, "the report (Markdown); default results/accelerator_<platform>.md")
flags.DEFINE_list("parts", list(PARTS), "which parts to run: tests, bench, imp")
flags.DEFINE_integer("replicates", 8, "R for the replicates-at-once benchmark")
flags.DEFINE_integer("windows", 5, "timed windows per benchmark measurement")
flags.DEFINE_integer("rounds", 3, "pruning rounds of the Conv-4 run (after the dense round 0)")
flags.DEFINE_integer("epochs", 2, "epochs per round of the Conv-4 run")
flags.DEFINE_integer("images", 50_000, "synthetic CIFAR-shaped training images of the Conv-4 run")
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
        "--models=lenet300_100,conv2,conv4,conv6",
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


def imp_table(rounds: int, epochs: int, n_images: int) -> str:
    """A Conv-4 IMP (prune 20 % globally per round, rewind to θ₀) on synthetic 32x32x3 data."""
    import jax
    import numpy as np

    from qsparse import masks as qmasks
    from qsparse import models, pruning, train

    spec = models.spec("conv4")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n_images).astype(np.int32)
    seen = (images[:1000], labels[:1000])
    epoch = train.EpochSpec(
        spec.batch_size, n_images // spec.batch_size, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), True
    )
    rows = []
    for algebra in ("real", "quat"):
        model = models.create("conv4", algebra)
        theta0 = models.init_params(model, jax.random.key(0), (32, 32, 3))
        trainer = train.Trainer(epoch)
        data = trainer.put_data(images, labels)
        tx = train.make_optimizer("adam", spec.lr)
        masks = qmasks.ones(theta0)
        for level in range(rounds + 1):
            state = train.stack([train.create_train_state(model, theta0, masks, tx)])
            key = train.stack([jax.random.key(0)])
            if level == 0:  # the same epoch twice: bit-for-bit the same
                twice = [
                    trainer.fetch(trainer.train_epoch(state, *data, key)[0].params)
                    for _ in range(2)
                ]
                repeatable = all(np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, twice)))
            seconds = []
            for e in range(epochs):
                t = time.perf_counter()
                key = train.stack([jax.random.fold_in(jax.random.key(level), e)])
                state, metrics = trainer.train_epoch(state, *data, key)
                seconds.append(time.perf_counter() - t)
            acc = trainer.evaluate(state, *seen)["acc"][0]
            density = qmasks.density_report(masks)["total"]["density_prunable"]
            rows.append(
                (
                    algebra,
                    level,
                    f"{100 * density:.1f}",
                    f"{min(seconds):.2f}",
                    f"{n_images / min(seconds):,.0f}",
                    f"{metrics['train_loss'][0]:.3f}",
                    f"{acc:.3f}",
                    trainer.trace_count,
                    "yes" if repeatable else "**no**",
                )
            )
            masks = pruning.prune(train.slot(trainer.fetch(state.params), 0), masks, 0.2)
    from qsparse.report import markdown_table

    header = (
        "algebra",
        "round",
        "density (%)",
        "fastest epoch (s)",
        "images/s",
        "train loss",
        "acc, 1,000 train images",
        "epoch traces",
        "epoch repeatable",
    )
    return (
        f"Conv-4 IMP on {n_images:,} synthetic CIFAR-shaped images, {epochs} epochs per round "
        f"(accuracy is chance: the labels are random):\n\n" + markdown_table(header, rows)
    )


def main(argv: list[str]) -> None:
    del argv
    bad = sorted(set(FLAGS.parts) - set(PARTS))
    if bad:
        sys.stderr.write(
            f"error: --parts={','.join(FLAGS.parts)}: unknown {bad}; valid: {list(PARTS)}\n"
        )
        sys.exit(2)
    import jax

    platform = jax.default_backend()
    if platform == "gpu" and DETERMINISM not in os.environ.get("XLA_FLAGS", ""):
        # this process's own runs (the IMP part) need the flag before the backend starts: rerun
        os.execve(
            sys.executable,
            [sys.executable, "-m", "experiments.accelerator_check", *sys.argv[1:]],
            _env(platform),
        )
    out = Path(FLAGS.out or REPO / "results" / f"accelerator_{platform}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
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
    if "imp" in FLAGS.parts:
        print("Conv-4 IMP ...", flush=True)
        parts += ["## Conv-4 IMP\n", imp_table(FLAGS.rounds, FLAGS.epochs, FLAGS.images) + "\n"]
    out.write_text("\n".join(parts))
    print(out.read_text())


if __name__ == "__main__":
    app.run(main)
