"""Export a trained round as one file that numpy alone can run (format: docs/deployment.md).

The file holds each layer's surviving weights and their positions (a bitmask or indices,
whichever is smaller; component kernels as blocks of ``n`` values when whole numbers are
pruned), the biases, what the layers' algebras need (a table's structure constants, PHM layers'
learned rules, the hashed layers' seed), the architecture as a list of ops, the input
preprocessing and where it came from (run, replicate, round, density, test accuracy). A batch norm
(the ResNets') is written as the affine map its running statistics give in eval mode, folded into
the convolution before it where that keeps the kernel's structure
(:mod:`qsparse.deploy.batchnorm`). Before
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

from qsparse import algebras, augment, deploy, epoch, experiment, files, models, ops, rundir, train
from qsparse import checkpoints as ckpt
from qsparse import masks as qmasks
from qsparse.batchnorm import HyperBatchNorm
from qsparse.config import Config
from qsparse.data import DATASETS
from qsparse.deploy import batchnorm as dbn
from qsparse.deploy import onnx as qonnx

EPSILON = HyperBatchNorm.epsilon  # the ResNets' batch norms keep the layer's default
CHECK_IMAGES = 16  # random images the exported model is compared with the JAX model on
FLOAT32_TOLERANCE = 1e-4  # largest relative logit difference a float32 export may have


BN_ARRAYS = ("/scale", "/shift")  # a batch norm op's arrays


class ExportError(ValueError):
    """Bad input to the exporter: the message names it."""


class CheckError(RuntimeError):
    """The file's model does not compute what the JAX model computes (a bug, never bad input)."""


# -- a model and its params -> the file's entries --------------------------------------------------


def architecture(model, input_shape: tuple[int, ...]) -> list[dict]:
    """The header's ops of a model: its ``deploy_ops`` (:mod:`qsparse.ops`, stated beside its
    forward pass by :mod:`qsparse.models`' LeNet and ConvNet and :mod:`qsparse.resnets`' ResNet),
    every batch norm its own op, without kernel shapes."""
    if not hasattr(model, "deploy_ops"):
        raise ValueError(
            f"cannot export a {type(model).__name__}: it states no deploy_ops (qsparse.models' "
            "LeNet and ConvNet and qsparse.resnets' ResNet do)"
        )
    return [ops.to_json(op) for op in model.deploy_ops(input_shape)]


def fold_batchnorm(steps: list[dict]) -> list[dict]:
    """``steps`` with every bias-free convolution followed by a :func:`~qsparse.deploy.batchnorm.
    foldable` batch norm made one convolution (``bias`` true, ``folded`` naming the norm), in a
    residual's branches too."""
    out: list[dict] = []
    for entry in steps:
        entry = dict(entry)
        for branch in ops.BRANCHES if entry["op"] == ops.Residual.op else ():
            entry[branch] = fold_batchnorm(entry[branch])
        prev = out[-1] if out else {}
        fits = prev.get("op") == ops.Conv.op and not prev.get("bias", True)
        if entry["op"] == ops.BatchNorm.op and fits and dbn.foldable(entry["form"], entry["n"]):
            prev.update(bias=True, folded=entry["name"])
            continue
        out.append(entry)
    return out


def batchnorm_maps(steps: list[dict], params, batch_stats) -> dict[str, tuple]:
    """``{name: (form, scale, shift)}``: each batch norm op's eval-mode map
    (:func:`qsparse.deploy.batchnorm.affine`) from its params and running statistics."""
    norms = [e for e in ops.walk(steps) if e["op"] == ops.BatchNorm.op]
    if norms and batch_stats is None:
        raise ValueError(f"a model with batch norm ({norms[0]['name']}, ...) needs batch_stats")
    maps = {}
    for e in norms:
        path = e["name"].split("/")
        p, s = params, batch_stats
        for key in path:
            p, s = p[key], s[key]
        p = {k: np.asarray(v) for k, v in p.items()}
        s = {k: np.asarray(v) for k, v in s.items()}
        maps[e["name"]] = (e["form"], *dbn.affine(e["form"], e["n"], p, s, EPSILON))
    return maps


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
    batch_stats=None,
    fold: bool = True,
) -> dict[str, np.ndarray]:
    """The file's entries (:func:`qsparse.deploy.pack`) for a model, its params and masks (and
    running ``batch_stats`` for a model with batch norm; with ``fold``, those that can are
    folded into their convolutions: :func:`fold_batchnorm`).

    With ``check_images``, the packed model is run (numpy) beside ``model`` (JAX) on that many
    random images; the largest differences go into the header's ``check``.
    """
    if dtype not in deploy.DTYPES:
        raise ValueError(f"dtype={dtype!r} is not valid; choose one of {list(deploy.DTYPES)}")
    steps = architecture(model, input_shape)
    norms = batchnorm_maps(steps, params, batch_stats)
    steps = fold_batchnorm(steps) if fold else steps
    layers = [op for op in ops.walk(steps) if op["op"] in (ops.Conv.op, ops.Dense.op)]
    arrays = layer_arrays(layers, params, masks, dtype, norms)
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
            "batchnorm": sum(a.nbytes for k, a in arrays.items() if k.endswith(BN_ARRAYS)),
        },
        "provenance": provenance or {},
    }
    if check_images:
        header["check"] = check(model, params, header, arrays, check_images, batch_stats)
        if dtype == "float32" and header["check"]["max_rel_diff"] > FLOAT32_TOLERANCE:
            raise CheckError(f"the exported model differs from the JAX model: {header['check']}")
    return deploy.pack(header, arrays)


def layer_arrays(
    layers: list[dict], params, masks, dtype: str, norms: dict | None = None
) -> dict[str, np.ndarray]:
    """The file's arrays of the layer ops ``layers`` (each completed with its ``kernel_shape``
    and ``storage``): each kernel's surviving values and positions, biases and PHM rules; and
    of the batch norms ``norms`` (:func:`batchnorm_maps`): a folded one's map scales its
    convolution's kernel (positions from the mask, unchanged) and is its bias, another's is
    stored as ``<name>/scale`` and ``<name>/shift``."""
    norms = dict(norms or {})
    flat_params = qmasks.by_path(params)
    flat_masks = qmasks.by_path(masks, bool)
    expected = {f"{op['name']}/{k}" for op in layers for k in param_names(op["kind"], op)}
    expected |= {f"{k}/{p}" for k, (form, *_) in norms.items() for p in dbn.param_names(form)}
    if expected != set(flat_params) or set(flat_masks) != set(flat_params):
        raise ValueError(
            f"params {sorted(flat_params)} (masks {sorted(flat_masks)}) do not fit the "
            f"architecture's {sorted(expected)}"
        )
    arrays = {}
    for op in layers:
        key, *extra = (f"{op['name']}/{k}" for k in param_names(op["kind"], op))
        kernel, mask = flat_params[key], flat_masks[key]
        if op.get("folded"):
            form, scale, shift = norms.pop(op["folded"])
            kernel = dbn.fold(kernel, form, scale)
            arrays[f"{op['name']}/bias"] = shift.astype("<f4")
        storage, parts = deploy.encode_kernel(kernel, mask, op["kind"] != "real", dtype)
        op.update(kernel_shape=list(kernel.shape), storage=storage)
        arrays.update({f"{op['name']}/{k}": v for k, v in parts.items()})
        arrays.update({k: flat_params[k].astype("<f4") for k in extra})  # bias, PHM rules
    for name, (_, scale, shift) in norms.items():  # the batch norms left as ops
        arrays.update({f"{name}/scale": scale.astype("<f4"), f"{name}/shift": shift.astype("<f4")})
    return arrays


def param_names(kind: str, op: dict | None = None) -> tuple[str, ...]:
    """A layer's params in an algebra (:mod:`qsparse.ops`), its kernel first: ``kernel`` (real),
    ``qkernel`` (quat) or ``hkernel``, then the bias (unless the op has none: a convolution
    before batch norm), and the PHM kinds' ``phm_rules``."""
    rules = ("phm_rules",) if algebras.get(kind).kind == "phm" else ()
    bias = ("bias",) if (op or {}).get("bias", True) and not (op or {}).get("folded") else ()
    return (ops.kernel_name(kind), *bias, *rules)


def check(
    model, params, header: dict, arrays: dict, n: int, batch_stats=None, seed: int = 0
) -> dict:
    """The file's model (numpy) against the JAX model (in eval mode, with ``batch_stats``) on
    ``n`` random uint8 images: the largest logit difference, absolute and relative to the
    largest logit, and argmax agreement."""
    images = _random_images(header, n, seed)
    ours = deploy.Model(header, arrays).predict(images)
    return _compare(ours, _jax_logits(model, params, header, images, batch_stats))


def _random_images(header: dict, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *header["input"]["shape"]), np.uint8)


def _jax_logits(model, params, header: dict, images: np.ndarray, batch_stats=None) -> np.ndarray:
    """The JAX model's logits; a model with batch norm in eval mode (its default)."""
    x = augment.normalize(images, header["input"]["mean"], header["input"]["std"])
    return np.asarray(jax.jit(model.apply)(epoch.variables(params, batch_stats), x))


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
    """(config, model, trained params, masks, done.json) of a finished round
    (:func:`load_state` has the batch statistics too)."""
    config, model, final, masks, done = load_state(run, rd)
    return config, model, final.params, masks, done


def load_state(run: rundir.Run, rd: rundir.Round):
    """(config, model, final train state, masks, done.json) of a finished round; the state of a
    model with batch norm holds its running statistics (:func:`qsparse.train.batch_stats`)."""
    try:
        config = experiment.model_defaults(Config.from_json(rundir.read_json(run.config)))
    except (TypeError, ValueError) as e:
        raise rundir.CorruptFileError(f"{run.config} does not hold a config: {e}") from None
    spec = DATASETS[config.dataset]
    model = experiment.create_model(config, spec.num_classes)
    stats = models.init_batch_stats(model, spec.image_shape)  # None: no batch norm
    shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), spec.image_shape))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)  # what is restored into
    masks = ckpt.load_masks(rd.masks, qmasks.ones(params))
    tx = experiment.make_tx(config, 1)
    like = train.create_train_state(model, params, masks, tx, batch_stats=stats)
    return config, model, ckpt.load_tree(rd.final, like), masks, rundir.read_done(rd)


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
    *_, entries = round_entries(run_dir, replicate, round, dtype)
    return _save(out, entries, overwrite)


def _save(out: Path, entries: dict, overwrite: bool) -> dict:
    try:
        size = deploy.save(out, entries, overwrite=overwrite)
    except FileExistsError as e:
        raise ExportError(f"--out={out} exists; pass --overwrite to replace it") from e
    header, _ = deploy.read(out)
    return {**header, "file_bytes": size}


def round_entries(run_dir, replicate: int, round: int | None, dtype: str) -> tuple:
    """(JAX model, trained params, batch statistics (None without batch norm), the export file's
    entries) of a round, checked against the JAX model (:func:`export_entries`); ExportError for
    bad input."""
    if dtype not in deploy.DTYPES:
        raise ExportError(f"dtype={dtype!r} is not valid; choose one of {list(deploy.DTYPES)}")
    run = rundir.Run(Path(run_dir))
    rd = find_round(run, replicate, round)
    config, model, final, masks, done = load_state(run, rd)
    params, stats = final.params, train.batch_stats(final)
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
        batch_stats=stats,
    )
    return model, params, stats, entries


def check_onnx(graph, header: dict, arrays: dict, jax_model, params, batch_stats=None) -> dict:
    """The ONNX graph by onnxruntime against the JAX model and the numpy runtime on random uint8
    images (as :func:`check`): the largest logit differences, argmax agreement; CheckError where
    it differs by more than the tolerance."""
    images = _random_images(header, CHECK_IMAGES)
    ours = qonnx.run(graph, images)
    result = _compare(ours, _jax_logits(jax_model, params, header, images, batch_stats))
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
    model, params, stats, entries = round_entries(run_dir, replicate, round, dtype)
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
        chk = check_onnx(graph, header, arrays, model, params, stats)
    try:
        size = qonnx.save(graph, out, overwrite=overwrite)
    except FileExistsError as e:
        raise ExportError(f"--out={out} exists; pass --overwrite to replace it") from e
    return {**header, "file_bytes": size, "check": chk}
