r"""Latency of the numpy runtime's paths (dense BLAS, scipy, numba, auto) on pruned models.

    python -m experiments.bench_deploy                          # LeNet-300-100, Conv-4; R, Q
    python -m experiments.bench_deploy --files=lenet.npz --models= --threads=1,2 \
        --json=results/bench_deploy.json --markdown=results/bench_deploy.md
    python -m experiments.bench_deploy --small --repeats=1 --batches=1,4   # a check that it runs
    python -m experiments.bench_deploy --models=conv4 --densities=0.1 --layers   # and per layer

Synthetic models (random weights pruned layer by layer to each of ``--densities``) and any
export files, timed at each batch and thread count, against the limit of the machine's float32
matmul peak and copy bandwidth (:mod:`benchmarks.sparse_runtime`); with ``--layers`` every layer
alone too. Time on an otherwise idle machine. Bad flag values
exit with status 2 and one line naming the value and the valid choices.
"""

from __future__ import annotations

import json

from absl import flags, logging

from benchmarks.sparse_runtime import Options, run, table
from experiments.cli import fail, require
from experiments.cli import run as run_command
from qsparse import files

_D = Options()
flags.DEFINE_list("models", list(_D.models), "synthetic models (none: --models=)")
flags.DEFINE_list("algebras", list(_D.algebras), "their algebras")
flags.DEFINE_list("densities", [str(d) for d in _D.densities], "fractions of weights kept")
flags.DEFINE_list("batches", [str(b) for b in _D.batches], "images per predict call")
flags.DEFINE_list("threads", ["all"], "numba threads per run: counts, or all (every core)")
flags.DEFINE_integer("repeats", _D.repeats, "timed calls per measurement (median)")
flags.DEFINE_integer("peak_size", _D.peak_size, "n of the n x n float32 matmul peak")
flags.DEFINE_list("files", [], "export files to time as they are")
flags.DEFINE_bool("small", False, "tiny widths: a check that the benchmark runs, not a measurement")
flags.DEFINE_bool("layers", False, "also time every layer alone, by each path")
flags.DEFINE_integer("bandwidth_mib", _D.bandwidth_mib, "MiB copied to measure memory bandwidth")
flags.DEFINE_string("json", None, "write the result as JSON here")
flags.DEFINE_string("markdown", None, "write the Markdown table here")
FLAGS = flags.FLAGS


def options_from_flags() -> Options:
    """The flags as :class:`Options`; ValueError naming a value that is no number."""

    def numbers(flag: str, kind, what: str) -> tuple:
        try:
            return tuple(kind(v) for v in FLAGS[flag].value if v)
        except ValueError:
            value = ",".join(FLAGS[flag].value)
            raise ValueError(f"--{flag}={value} is not valid; give {what}") from None

    return Options(
        models=tuple(m for m in FLAGS.models if m),
        algebras=tuple(a for a in FLAGS.algebras if a),
        densities=numbers("densities", float, "fractions in (0, 1]"),
        batches=numbers("batches", int, "whole numbers"),
        threads=numbers("threads", lambda t: None if t == "all" else int(t), "counts or all"),
        repeats=FLAGS.repeats,
        peak_size=FLAGS.peak_size,
        files=tuple(f for f in FLAGS.files if f),
        small=FLAGS.small,
        layers=FLAGS.layers,
        bandwidth_mib=FLAGS.bandwidth_mib,
    )


def main(argv: list[str]) -> None:
    require(argv)
    logging.set_verbosity(logging.WARNING)
    try:
        options = options_from_flags()
        options.check()
    except ValueError as e:
        fail(str(e))
    result = run(options)
    text = table(result)
    if FLAGS.json:
        files.write_text(FLAGS.json, json.dumps(result, indent=1) + "\n")
    if FLAGS.markdown:
        files.write_text(FLAGS.markdown, text + "\n")
    print(text)


if __name__ == "__main__":
    run_command(main)
