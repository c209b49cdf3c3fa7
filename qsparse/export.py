"""Export a trained round as one file that numpy alone can run (format: docs/deployment.md).

The file holds each layer's surviving weights and their positions (a bitmask or indices,
whichever is smaller; component kernels as blocks of ``n`` values when whole numbers are
pruned), the biases, what the layers' algebras need (a table's structure constants, PHM layers'
learned rules, the hashed layers' seed), the architecture as a list of ops, the input
preprocessing and where it came from (run, replicate, round, density, test accuracy). Before
writing, the exporter runs the file's model and the JAX model on a few random images and records
the largest logit difference in the header (``check``); a float32 export that differs by more
than 1e-4 (relative) is refused. The command line is ``experiments/export.py``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import numpy as np

from qsparse import algebras, augment, deploy, experiment, files, models, ops, rundir, train
from qsparse import checkpoints as ckpt
from qsparse import masks as qmasks
from qsparse.config import Config
from qsparse.data import DATASETS
from qsparse.deploy import onnx as qonnx

CHECK_IMAGES = 16  # random images the exported model is compared with the JAX model on
FLOAT32_TOLERANCE = 1e-4  # largest relative logit difference a float32 export may have


class ExportError(ValueError):
    """Bad input to the exporter: the message names it."""


class CheckError(RuntimeError):
    """The file's model does not compute what the JAX model computes (a bug, never bad input)."""


# -- a model and its params -> the file's entries --------------------------------------------------


def architecture(model, input_shape: tuple[int, ...]) -> list[dict]:
    """The header's ops of a model: its ``deploy_ops`` (:mod:`qsparse.ops`, stated beside its
    forward pass by :mod:`qsparse.models`' LeNet and ConvNet), without kernel shapes."""
    if not hasattr(model, "deploy_ops"):
        raise ValueError(
            f"cannot export a {type(model).__name__}: it states no deploy_ops (qsparse.models' "
            "LeNet and ConvNet do)"
        )
    return [ops.to_json(op) for op in model.deploy_ops(input_shape)]


def export_entries(
    model,
    params,
    masks,
    *,
    input_shape: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    dtype: str = "float32",
    provenance: dict | None = None,
    check_images: int = CHECK_IMAGES,
) -> dict[str, np.ndarray]:
    """The file's entries (:func:`qsparse.deploy.pack`) for a model, its params and masks.

    With ``check_images``, the packed model is run (numpy) beside ``model`` (JAX) on that many
    random images; the largest differences go into the header's ``check``.
    """
    if dtype not in deploy.DTYPES:
        raise ValueError(f"dtype={dtype!r} is not valid; choose one of {list(deploy.DTYPES)}")
    steps = architecture(model, input_shape)
    layers = [op for op in steps if "name" in op]
    arrays = layer_arrays(layers, params, masks, dtype)
    header = {
        "dtype": dtype,
        "input": {
            "shape": list(input_shape),
            "dtype": "uint8",
            "scale": 255.0,
            "mean": list(mean),
            "std": list(std),
        },
        "num_classes": int(model.num_classes),
        "ops": steps,
        "algebras": {
            k: deploy.algebra_entry(algebras.get(k))
            for k in {op["kind"] for op in layers} - {"real"}
        },
        "bytes": {
            "kernels": sum(op["storage"]["bytes"] for op in layers),
            "biases": sum(a.nbytes for k, a in arrays.items() if k.endswith("/bias")),
            "rules": sum(a.nbytes for k, a in arrays.items() if k.endswith("/phm_rules")),
        },
        "provenance": provenance or {},
    }
    if check_images:
        header["check"] = check(model, params, header, arrays, check_images)
        if dtype == "float32" and header["check"]["max_rel_diff"] > FLOAT32_TOLERANCE:
            raise CheckError(f"the exported model differs from the JAX model: {header['check']}")
    return deploy.pack(header, arrays)


def layer_arrays(layers: list[dict], params, masks, dtype: str) -> dict[str, np.ndarray]:
    """The file's arrays of the layer ops ``layers`` (each completed with its ``kernel_shape``
    and ``storage``): each kernel's surviving values and positions, biases and PHM rules."""
    flat_params = {qmasks.path_str(p): np.asarray(x) for p, x in _leaves(params)}
    flat_masks = {qmasks.path_str(p): np.asarray(m, bool) for p, m in _leaves(masks)}
    expected = {f"{op['name']}/{name}" for op in layers for name in param_names(op["kind"])}
    if expected != set(flat_params) or set(flat_masks) != set(flat_params):
        raise ValueError(
            f"params {sorted(flat_params)} (masks {sorted(flat_masks)}) do not fit the "
            f"architecture's {sorted(expected)}"
        )
    arrays = {}
    for op in layers:
        key, *extra = (f"{op['name']}/{name}" for name in param_names(op["kind"]))
        kernel, mask = flat_params[key], flat_masks[key]
        storage, parts = deploy.encode_kernel(kernel, mask, op["kind"] != "real", dtype)
        op.update(kernel_shape=list(kernel.shape), storage=storage)
        arrays.update({f"{op['name']}/{k}": v for k, v in parts.items()})
        arrays.update({k: flat_params[k].astype("<f4") for k in extra})  # bias, PHM rules
    return arrays


def param_names(kind: str) -> tuple[str, ...]:
    """A layer's params in an algebra (:mod:`qsparse.ops`), its kernel first: ``kernel`` (real),
    ``qkernel`` (quat) or ``hkernel``, then the bias, and the PHM kinds' ``phm_rules``."""
    rules = ("phm_rules",) if algebras.get(kind).kind == "phm" else ()
    return (ops.kernel_name(kind), "bias", *rules)


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def check(model, params, header: dict, arrays: dict, n: int, seed: int = 0) -> dict:
    """The file's model (numpy) against the JAX model on ``n`` random uint8 images: the largest
    logit difference, absolute and relative to the largest logit, and argmax agreement."""
    images = _random_images(header, n, seed)
    ours = deploy.Model(header, arrays).predict(images)
    return _compare(ours, _jax_logits(model, params, header, images))


def _random_images(header: dict, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *header["input"]["shape"]), np.uint8)


def _jax_logits(model, params, header: dict, images: np.ndarray) -> np.ndarray:
    x = augment.normalize(images, header["input"]["mean"], header["input"]["std"])
    return np.asarray(jax.jit(model.apply)({"params": params}, x))


def _compare(ours: np.ndarray, theirs: np.ndarray) -> dict:
    diff = float(np.max(np.abs(ours - theirs)))
    return {
        "images": len(ours),
        "max_abs_diff": diff,
        "max_rel_diff": diff / max(float(np.max(np.abs(theirs))), 1e-30),
        "argmax_agree": float(np.mean(ours.argmax(1) == theirs.argmax(1))),
    }


# -- a run directory's round -> a file ---------------------------------------------------------


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output that exists (without ``overwrite``) or cannot be written."""
    if out.is_dir():
        raise ExportError(f"--out={out} is a directory")
    if out.exists() and not overwrite:
        raise ExportError(f"--out={out} exists; pass --overwrite to replace it")
    files.check_writable(out, ExportError, str(out))


def find_round(run: rundir.Run, replicate: int, level: int | None) -> rundir.Round:
    """The round to export: ``level``, or the replicate's last finished one."""
    if not run.path.is_dir():
        raise ExportError(f"run directory {run.path} does not exist")
    if not run.config.exists():
        raise ExportError(f"{run.path} is not a run directory (it has no config.json)")
    rep = run.replicate(replicate)
    if not rep.path.is_dir():
        have = [r.index for r in run.replicates()]
        raise ExportError(f"{run.path} has no replicate {replicate} (replicates: {have})")
    finished = [rd.level for rd in rep.rounds() if rd.done.exists()]
    if not finished:
        raise ExportError(f"{rep.path} has no finished round (no done.json)")
    if level is None:
        level = finished[-1]
    if level not in finished:
        state = "is not finished" if rep.round(level).path.exists() else "does not exist"
        raise ExportError(f"round {level} of {rep.path} {state}; finished rounds: {finished}")
    return rep.round(level)


def load_round(run: rundir.Run, rd: rundir.Round):
    """(config, model, trained params, masks, done.json) of a finished round."""
    try:
        config = experiment.model_defaults(Config.from_json(rundir.read_json(run.config)))
    except (TypeError, ValueError) as e:
        raise rundir.CorruptFileError(f"{run.config} does not hold a config: {e}") from None
    spec = DATASETS[config.dataset]
    model = experiment.create_model(config, spec.num_classes)
    if models.init_batch_stats(model, spec.image_shape) is not None:
        raise ExportError(
            f"{config.model} has batch norm, which export and the numpy runtime do not run yet; "
            "exportable: the paper's models (lenet300_100, lenet12, conv2, conv4, conv6)"
        )
    shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), spec.image_shape))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)  # what is restored into
    masks = ckpt.load_masks(rd.masks, qmasks.ones(params))
    like = train.create_train_state(model, params, masks, experiment.make_tx(config, 1))
    final = ckpt.load_tree(rd.final, like)
    return config, model, final.params, masks, rundir.read_done(rd)


def export_round(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    replicate: int = 0,
    round: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict:
    """Export round ``round`` (default: the last finished) of a replicate to ``out``; returns
    the header written. Raises ExportError for bad input (before writing anything),
    :class:`qsparse.rundir.CorruptFileError` for a damaged run file and
    :class:`qsparse.files.WriteError` when the file cannot be written (a previous one is kept)."""
    out = Path(out)
    check_out(out, overwrite)
    _, _, entries = round_entries(run_dir, replicate, round, dtype)
    return _save(out, entries, overwrite)


def _save(out: Path, entries: dict, overwrite: bool) -> dict:
    try:
        size = deploy.save(out, entries, overwrite=overwrite)
    except FileExistsError as e:
        raise ExportError(f"--out={out} exists; pass --overwrite to replace it") from e
    header, _ = deploy.read(out)
    return {**header, "file_bytes": size}


def round_entries(run_dir, replicate: int, round: int | None, dtype: str) -> tuple:
    """(JAX model, trained params, the export file's entries) of a round, checked against the
    JAX model (:func:`export_entries`); ExportError for bad input."""
    if dtype not in deploy.DTYPES:
        raise ExportError(f"dtype={dtype!r} is not valid; choose one of {list(deploy.DTYPES)}")
    run = rundir.Run(Path(run_dir))
    rd = find_round(run, replicate, round)
    config, model, params, masks, done = load_round(run, rd)
    spec = DATASETS[config.dataset]
    provenance = {
        "run": run.path.name,
        "replicate": replicate,
        "round": rd.level,
        "model": config.model,
        "algebra": config.algebra,
        "dataset": config.dataset,
        "grouping": config.grouping,
        "density_prunable": done["density_prunable"],
        "weights_remaining_pct": done["weights_remaining_pct"],
        "weights_remaining_pct_of_real": done["weights_remaining_pct_of_real"],
        "test_acc": done["test_acc"],
        "test_subset": config.test_subset,
        "seed": config.seed,
        "status": done["status"],
        "config": config.to_json(),
        "qsparse_commit": rundir.provenance()["git_commit"],
    }
    entries = export_entries(
        model,
        params,
        masks,
        input_shape=spec.image_shape,
        mean=spec.mean,
        std=spec.std,
        dtype=dtype,
        provenance=provenance,
    )
    return model, params, entries


def check_onnx(graph, header: dict, arrays: dict, jax_model, params) -> dict:
    """The ONNX graph by onnxruntime against the JAX model and the numpy runtime on random uint8
    images (as :func:`check`): the largest logit differences, argmax agreement; CheckError where
    it differs by more than the tolerance."""
    images = _random_images(header, CHECK_IMAGES)
    ours = qonnx.run(graph, images)
    result = _compare(ours, _jax_logits(jax_model, params, header, images))
    runtime = _compare(ours, deploy.Model(header, arrays).predict(images))["max_rel_diff"]
    result["max_rel_diff_runtime"] = runtime
    jax_off = header["dtype"] == "float32" and result["max_rel_diff"] > FLOAT32_TOLERANCE
    if jax_off or runtime > FLOAT32_TOLERANCE:
        raise CheckError(f"the ONNX graph differs from the JAX model or the runtime: {result}")
    return result


def export_onnx(run_dir, out, *, replicate: int, round: int | None, dtype: str, overwrite: bool):
    """Export a round as an ONNX graph at ``out``, checked (where onnxruntime is installed)
    before it is written; returns the round's header with ``file_bytes`` and the ``check``."""
    out = Path(out)
    check_out(out, overwrite)
    model, params, entries = round_entries(run_dir, replicate, round, dtype)
    with tempfile.TemporaryDirectory() as tmp:  # the file as the runtime reads it
        path = Path(tmp) / "round.npz"
        deploy.save(path, entries)
        header, arrays = deploy.read(path)
    graph = qonnx.to_onnx((header, arrays))
    try:
        qonnx.require("onnxruntime")
    except ImportError:
        chk = None
    else:
        chk = check_onnx(graph, header, arrays, model, params)
    try:
        size = qonnx.save(graph, out, overwrite=overwrite)
    except FileExistsError as e:
        raise ExportError(f"--out={out} exists; pass --overwrite to replace it") from e
    return {**header, "file_bytes": size, "check": chk}
