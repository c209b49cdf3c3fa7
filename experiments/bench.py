r"""Training-throughput benchmark of qsparse's masked train step on this machine.

    python -m experiments.bench                        # everything
    python -m experiments.bench --models=lenet300_100,conv4 \
        --json=results/bench_cpu.json --markdown=results/bench_cpu.md
    python -m experiments.bench --models=conv4,lenet300_100 --algebras=quat,tessarine,phm4 \
        --epochs=0 --replicates=0 --no_references --no_xla_conv   # algebras against quat

Measures, in one process: the machine's float32 matmul peak; each model's masked train step
(the Trainer's compiled epoch on synthetic data of the model's dataset shape, at its batch size
with its optimizer, the algebras' windows interleaved; median window) in images/s and GFLOP/s,
with each algebra's step time against the quaternion one when ``quat`` is among them; whole
LeNet-300-100 MNIST epochs; R replicates at once against one; optionally plain Flax / PyTorch
yardsticks and Conv-4's convolutions one by one. Prints a table; writes JSON / Markdown when
asked. The code is the ``benchmarks`` package; this is its command line. Bad flag values exit
with status 2 and one line on stderr naming the value and the valid choices.
"""

from __future__ import annotations

from absl import app, flags, logging

from benchmarks import OptionError, Options, run, save
from benchmarks.references import TorchReferenceError
from experiments.cli import fail, parse

_D = Options()
flags.DEFINE_list(
    "models",
    list(_D.models),
    "models whose masked train step is timed, of lenet300_100, lenet12, conv2, "
    "conv4, conv6, resnet20 (none: --models=)",
)
flags.DEFINE_list(
    "algebras",
    list(_D.algebras),
    "algebras to time, any registered one of dimension 1, 2 or 4 (real, complex, quat, "
    "tessarine, klein4, phm2, phm4, hashed4, ...); with quat, each other's step time / quat's",
)
flags.DEFINE_integer("windows", _D.windows, "timed windows per model and algebra (median)")
flags.DEFINE_integer("window_steps", _D.window_steps, "steps per window (default: per model)")
flags.DEFINE_integer("peak_size", _D.peak_size, "n of the n x n float32 matmul peak")
flags.DEFINE_integer("epochs", _D.epochs, "timed whole MNIST epochs per algebra (0: skip)")
flags.DEFINE_integer("train_subset", _D.train_subset, "MNIST training images (default: all 60,000)")
flags.DEFINE_string("data_dir", _D.data_dir, "tfds data directory for MNIST")
flags.DEFINE_bool(
    "synthetic_epochs", _D.synthetic_epochs, "random MNIST-shaped data instead of MNIST"
)
flags.DEFINE_integer("replicates", _D.replicates, "R for the replicate benchmark (0: skip)")
flags.DEFINE_list(
    "replicate_models", list(_D.replicate_models), "models for the replicate benchmark"
)
flags.DEFINE_list(
    "replicate_modes",
    list(_D.replicate_modes),
    "how replicates sharing a device run: auto | unroll | vmap (several to compare)",
)
flags.DEFINE_bool(
    "no_references", not _D.references, "skip the plain Flax Conv-4 / bare MLP yardsticks"
)
flags.DEFINE_string(
    "torch_python",
    _D.torch_python,
    "a Python interpreter with torch: also time PyTorch eager Conv-4, LeNet-300-100 and "
    "ResNet-20 (those of --models), their windows interleaved with qsparse's",
)
flags.DEFINE_bool("layers", _D.layers, "time each Conv-4 convolution, oneDNN vs XLA")
flags.DEFINE_bool(
    "no_xla_conv",
    not _D.xla_conv,
    "with oneDNN, skip timing the models with XLA's convolutions too",
)
flags.DEFINE_string("json", None, "write the result as JSON here")
flags.DEFINE_string("markdown", None, "write the Markdown tables here")
FLAGS = flags.FLAGS


def options_from_flags() -> Options:
    """The flags as :class:`benchmarks.Options`; empty list items are dropped (``--models=``)."""

    def names(flag: str) -> tuple[str, ...]:
        return tuple(v for v in FLAGS[flag].value if v)

    return Options(
        models=names("models"),
        algebras=names("algebras"),
        windows=FLAGS.windows,
        window_steps=FLAGS.window_steps,
        peak_size=FLAGS.peak_size,
        epochs=FLAGS.epochs,
        train_subset=FLAGS.train_subset,
        data_dir=FLAGS.data_dir,
        synthetic_epochs=FLAGS.synthetic_epochs,
        replicates=FLAGS.replicates,
        replicate_models=names("replicate_models"),
        replicate_modes=names("replicate_modes"),
        references=not FLAGS.no_references,
        torch_python=FLAGS.torch_python,
        layers=FLAGS.layers,
        xla_conv=not FLAGS.no_xla_conv,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --help)")
    logging.set_verbosity(logging.WARNING)  # JAX logs its backend search at INFO
    try:
        options = options_from_flags()
    except OptionError as e:
        fail(f"--{e}")
    try:
        result = run(options, log=lambda s: print(s, flush=True))
    except TorchReferenceError as e:
        fail(f"--torch_python={e}", status=1)
    table = save(result, FLAGS.json, FLAGS.markdown)
    print("\n" + table)


if __name__ == "__main__":
    app.run(main, flags_parser=parse)
