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

import tempfile
from pathlib import Path

import jax
import numpy as np
from absl import flags, logging

from experiments.cli import fail, require, run
from qsparse import augment, deploy, rundir
from qsparse.deploy import onnx as qonnx
from qsparse.export import (
    CHECK_IMAGES,
    FLOAT32_TOLERANCE,
    CheckError,
    ExportError,
    check_out,
    export_round,
    load_round,
)
from qsparse.files import WriteError

flags.DEFINE_string("run_dir", None, "the run directory to export from")
flags.DEFINE_integer("replicate", 0, "the replicate to export")
flags.DEFINE_integer("round", None, "the round to export (default: the last finished one)")
flags.DEFINE_string("out", None, "the file to write (one .npz, or one .onnx)")
flags.DEFINE_enum("format", "qsparse", ["qsparse", "onnx"], "qsparse's file, or an ONNX graph")
flags.DEFINE_enum("dtype", "float32", list(deploy.DTYPES), "how the weights are stored")
flags.DEFINE_bool("overwrite", False, "replace --out if it exists")
FLAGS = flags.FLAGS


def check_onnx(model, header: dict, arrays: dict, jax_model, params) -> dict:
    """The ONNX graph by onnxruntime against the JAX model and the numpy runtime on random uint8
    images (as :func:`qsparse.export.check`): the largest logit differences, argmax agreement;
    CheckError where it differs by more than the tolerance."""
    shape = header["input"]["shape"]
    images = np.random.default_rng(0).integers(0, 256, (CHECK_IMAGES, *shape), np.uint8)
    ours = qonnx.run(model, images)
    x = augment.normalize(images, header["input"]["mean"], header["input"]["std"])
    theirs = np.asarray(jax.jit(jax_model.apply)({"params": params}, x))
    scale = max(float(np.max(np.abs(theirs))), 1e-30)
    runtime = float(np.max(np.abs(ours - deploy.Model(header, arrays).predict(images)))) / scale
    diff = float(np.max(np.abs(ours - theirs)))
    result = {
        "images": CHECK_IMAGES,
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale,
        "max_rel_diff_runtime": runtime,
        "argmax_agree": float(np.mean(ours.argmax(1) == theirs.argmax(1))),
    }
    jax_off = header["dtype"] == "float32" and result["max_rel_diff"] > FLOAT32_TOLERANCE
    if jax_off or runtime > FLOAT32_TOLERANCE:
        raise CheckError(f"the ONNX graph differs from the JAX model or the runtime: {result}")
    return result


def export_onnx(run_dir, out, *, replicate: int, round: int | None, dtype: str, overwrite: bool):
    """Export a round as an ONNX graph at ``out``, checked (where onnxruntime is installed)
    before it is written; returns the round's header with ``file_bytes`` and the ``check``."""
    out = Path(out)
    check_out(out, overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        export_round(
            run_dir, Path(tmp) / "round.npz", replicate=replicate, round=round, dtype=dtype
        )
        header, arrays = deploy.read(Path(tmp) / "round.npz")
    model = qonnx.to_onnx((header, arrays))
    try:
        qonnx.require("onnxruntime")
    except ImportError:
        chk = None
    else:
        source = rundir.Run(Path(run_dir))
        rd = source.replicate(replicate).round(header["provenance"]["round"])
        _, jax_model, params, _, _ = load_round(source, rd)
        chk = check_onnx(model, header, arrays, jax_model, params)
    try:
        size = qonnx.save(model, out, overwrite=overwrite)
    except FileExistsError as e:
        raise ExportError(f"--out={out} exists; pass --overwrite to replace it") from e
    return {**header, "file_bytes": size, "check": chk}


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
