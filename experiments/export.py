r"""Export a trained round of a run directory as one file that numpy alone can run, or as ONNX.

    python -m experiments.export --run_dir=runs/lenet300_100_quat_mnist_0a1b2c3d --out=lenet.npz
    python -m experiments.export --run_dir=R --replicate=1 --round=5 --dtype=bfloat16 --out=F
    python -m experiments.export --run_dir=R --format=onnx --out=lenet.onnx

The file (format: :mod:`qsparse.deploy`) holds each layer's surviving weights and their positions
(a bitmask or indices, whichever is smaller; quaternion kernels as quaternion blocks when whole
quaternions are pruned), the biases, the architecture as a list of ops, the input preprocessing
and where it came from (run, replicate, round, density, test accuracy). ``qsparse.deploy.load``
runs it with numpy and scipy. Before writing, the exporter runs the file's model and the JAX
model on a few random images and records the largest logit difference in the header
(``check``); a float32 export that differs by more than 1e-4 (relative) is refused.

Default round: the replicate's last finished one (its done.json written). Bad input (a run
directory without finished rounds, a round that does not exist, an output that exists without
--overwrite or cannot be written) exits with status 2 and one ``error:`` line naming it, before
anything is written; a damaged run file, or a write that fails (a full disk; the previous file,
if any, is left intact), exits with status 1.

``--format=onnx`` exports the round as above (into a temporary file), converts it with
:func:`qsparse.deploy.onnx.to_onnx` (a standard ONNX graph taking the same uint8 images, pruned
weights as zeros) and, where onnxruntime is installed, runs the graph beside the JAX model and
the numpy runtime on the same random images; a graph that differs from either by more than the
exporter's tolerance (from JAX: float32 exports only) is refused with status 1, nothing written.
"""

from __future__ import annotations

from absl import flags, logging

from experiments.cli import fail, require, run
from qsparse import deploy, rundir
from qsparse.deploy import onnx as qonnx
from qsparse.export import CheckError, ExportError, export_onnx, export_round
from qsparse.files import WriteError

flags.DEFINE_string("run_dir", None, "the run directory to export from")
flags.DEFINE_integer("replicate", 0, "the replicate to export")
flags.DEFINE_integer("round", None, "the round to export (default: the last finished one)")
flags.DEFINE_string("out", None, "the file to write (one .npz, or one .onnx)")
flags.DEFINE_enum("format", "qsparse", ["qsparse", "onnx"], "qsparse's file, or an ONNX graph")
flags.DEFINE_enum("dtype", "float32", list(deploy.DTYPES), "how the weights are stored")
flags.DEFINE_bool("overwrite", False, "replace --out if it exists")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    require(argv, "run_dir", "out")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
    export = export_round
    if FLAGS.format == "onnx":
        try:
            qonnx.require()
        except ImportError as e:
            fail(str(e))
        export = export_onnx
    try:
        header = export(
            FLAGS.run_dir,
            FLAGS.out,
            replicate=FLAGS.replicate,
            round=FLAGS.round,
            dtype=FLAGS.dtype,
            overwrite=FLAGS.overwrite,
        )
    except ExportError as e:
        fail(str(e))
    except (rundir.CorruptFileError, CheckError) as e:
        fail(str(e), status=1)
    except WriteError as e:
        fail(f"{e}; nothing was written: the previous {FLAGS.out}, if any, is intact", status=1)
    prov, chk = header["provenance"], header["check"]
    if FLAGS.format == "onnx":
        what = (
            f"ONNX opset {qonnx.OPSET}, {header['dtype']} values as dense float32 kernels, "
            "pruned weights as zeros"
        )
        by = "onnxruntime "
    else:
        what, by = f"{header['bytes']['kernels']} of kernels, {header['dtype']}", ""
    against = (
        f"{by}vs JAX on {chk['images']} random images: max |logit diff| {chk['max_abs_diff']:.3g} "
        f"(relative {chk['max_rel_diff']:.3g}), argmax agrees {chk['argmax_agree']:.0%}"
        if chk
        else "not checked: onnxruntime is not installed"
    )
    print(
        f"wrote {FLAGS.out}: {header['file_bytes']} bytes ({what}), replicate "
        f"{prov['replicate']} round {prov['round']}, {prov['weights_remaining_pct']:.2f}% of "
        f"weights, test_acc {prov['test_acc']:.4f}; {against}"
    )


if __name__ == "__main__":
    run(main)
