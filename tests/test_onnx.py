"""ONNX export of pruned models (qsparse.deploy.onnx, experiments.export --format=onnx).

Every model in an algebra of every kind, and LeNet-12 in every algebra (at the small widths of
tests/test_deploy.py, random weights pruned by element and by whole numbers): the ONNX graph,
run by onnxruntime on raw uint8 images, gives the JAX model's logits and the numpy runtime's
(within 1e-5 of the largest logit), passes onnx.checker, takes any batch size, and holds the
pruned weights as zeros (as many nonzero real weights as the masks leave, times the copies each
algebra makes). The command exports a tiny real run's round as a checked graph; bad input is one
line, status 2 (a graph that fails its check: 1) and nothing written; without onnx the converter
names the extra to install, and it runs without jax.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_deploy import (
    MNIST,
    SMALL,
    assert_close,
    images,
    jax_logits,
    pruned,
    snapshot,
    tiny_run,
    write,
)

from experiments import export as export_cli
from qsparse import algebras, deploy, models
from qsparse.deploy import onnx as qonnx

__all__ = ["tiny_run"]  # the fixture, shared with tests/test_deploy.py

REPO = Path(__file__).resolve().parents[1]


def nonzero_weights(proto) -> dict[str, int]:
    """Nonzero entries of each layer's kernel in the graph."""
    return {
        t.name.removesuffix("/kernel"): int(np.count_nonzero(onnx.numpy_helper.to_array(t)))
        for t in proto.graph.initializer
        if t.name.endswith("/kernel")
    }


def copies(algebra: str) -> int | None:
    """How many real weights each stored weight becomes: 1 (real), ``n`` (a table whose blocks
    are single signed components: each component once per block row; the hashed tying: ``n``
    reads), None where sums of the PHM rules may mix components."""
    if algebra == "real":
        return 1
    alg = algebras.get(algebra)
    if alg.kind == "hashed" or (alg.kind == "table" and alg.signed_blocks):
        return alg.n
    return None


KINDS = ["real", "quat", "complex", "klein4", "phm4", "hashed4"]  # every kind of algebra
CASES = [(n, a) for n in SMALL for a in KINDS]
CASES += [("lenet12", a) for a in models.algebra_names() if a not in KINDS]  # and every algebra


@pytest.mark.parametrize("name,algebra", CASES)
def test_onnx_graph_gives_the_jax_models_logits(tmp_path, name, algebra):
    for grouping in ("element", "number"):
        model, params, masks, spec, apply = pruned(name, algebra, grouping)
        path = write(tmp_path / f"{grouping}.npz", model, params, masks, spec)
        proto = qonnx.to_onnx(path, tmp_path / f"{grouping}.onnx")
        onnx.checker.check_model(str(tmp_path / f"{grouping}.onnx"), full_check=True)
        x = images(spec)
        ref = jax_logits(apply, params, spec, x)
        logits = qonnx.run(proto, x)
        assert_close(logits, ref)
        assert_close(logits, deploy.load(path).predict(x))
        assert_close(qonnx.run(proto, x[:3]), ref[:3])  # any batch size
        (inp,), (out,) = proto.graph.input, proto.graph.output
        dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert dims == ["N", *spec.image_shape] and out.name == "logits"
        assert [(o.domain, o.version) for o in proto.opset_import] == [("", qonnx.OPSET)]
        header, _ = deploy.read(path)
        layers = [op for op in header["ops"] if "storage" in op]
        nonzero = nonzero_weights(proto)
        assert list(nonzero) == [op["name"] for op in layers]
        for op in layers:
            n = copies(op["kind"])
            if n is not None:  # every pruned weight a zero, every alive one a nonzero
                assert nonzero[op["name"]] == n * op["storage"]["alive"], op["name"]


def test_bad_files_and_images_are_refused_by_name(tmp_path):
    """A header whose ops do not end in the logits (the last layer dropped) is one error, as is
    a layer whose values are missing; images must be uint8 pixels."""
    model, params, masks, spec, _ = pruned("lenet12", "quat", "number")
    path = write(tmp_path / "m.npz", model, params, masks, spec)
    header, arrays = deploy.read(path)
    with pytest.raises(deploy.ExportFileError, match="not 10 logits"):
        qonnx.to_onnx(({**header, "ops": header["ops"][:-1]}, arrays))
    del arrays["QDense_0/values"]
    with pytest.raises(deploy.ExportFileError, match="layer QDense_0: 'values' is missing"):
        qonnx.to_onnx((header, arrays))
    with pytest.raises(ValueError, match="dtype float32; the ONNX model takes uint8"):
        qonnx.run(qonnx.to_onnx(path), images(spec).astype(np.float32))


def test_without_onnx_the_error_names_the_extra(tmp_path, monkeypatch):
    model, params, masks, spec, _ = pruned("lenet12", "real", "element")
    path = write(tmp_path / "m.npz", model, params, masks, spec)
    monkeypatch.setitem(sys.modules, "onnx", None)  # an import of onnx fails
    with pytest.raises(
        ImportError, match=r"needs the onnx package: pip install 'qsparse-jax\[onnx\]'"
    ):
        qonnx.to_onnx(path)
    assert not list(tmp_path.glob("*.onnx"))


def test_conversion_and_onnxruntime_run_without_jax(tmp_path):
    model, params, masks, spec, apply = pruned("conv2", "phm4", "number")
    path = write(tmp_path / "m.npz", model, params, masks, spec)
    x = images(spec, n=2)
    np.save(tmp_path / "x.npy", x)
    block = "import sys; sys.modules.update(jax=None, jaxlib=None, flax=None, tensorflow=None); "
    script = block + (
        "import numpy as np; from qsparse.deploy import onnx as q; "
        f"m = q.to_onnx({str(path)!r}, {str(tmp_path / 'm.onnx')!r}); "
        f"np.save({str(tmp_path / 'y.npy')!r}, q.run(m, np.load({str(tmp_path / 'x.npy')!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert_close(np.load(tmp_path / "y.npy"), jax_logits(apply, params, spec, x))


# -- the command, on a tiny real run ---------------------------------------------------------------


def test_command_writes_a_checked_graph(tiny_run, tmp_path, capsys, run_main):
    out, npz = tmp_path / "m.onnx", tmp_path / "m.npz"
    assert (
        run_main(export_cli.main, [f"--run_dir={tiny_run}", "--format=onnx", f"--out={out}"]) == 0
    )
    printed = capsys.readouterr().out
    assert f"wrote {out}: {out.stat().st_size} bytes" in printed and "round 1" in printed
    assert "onnxruntime vs JAX on 16 random images" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left
    assert run_main(export_cli.main, [f"--run_dir={tiny_run}", f"--out={npz}"]) == 0  # the default
    x = images(MNIST, n=4)
    assert_close(qonnx.run(onnx.load(out), x), deploy.load(npz).predict(x))


def off_by_one(run):
    return lambda model, x: run(model, x) + np.float32(1)


BAD = {  # name: (flags, substring of the error line, status, what is changed)
    "bad_format": (["--format=tflite"], "tflite", 2, None),
    "out_exists": (
        ["--format=onnx", "--out={tmp}/existing.onnx"],
        "exists; pass --overwrite",
        2,
        None,
    ),
    "no_onnx": (
        ["--format=onnx"],
        "needs the onnx package: pip install 'qsparse-jax[onnx]'",
        2,
        "onnx",
    ),
    "check_fails": (["--format=onnx"], "the ONNX graph differs from the JAX model", 1, "run"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_one_line_nothing_written(
    tiny_run, tmp_path, capsys, run_main, monkeypatch, name
):
    args, message, status, change = BAD[name]
    (tmp_path / "existing.onnx").write_bytes(b"keep me")
    if change == "onnx":
        monkeypatch.setitem(sys.modules, "onnx", None)
    elif change == "run":
        monkeypatch.setattr(qonnx, "run", off_by_one(qonnx.run))
    before = snapshot(tmp_path, tiny_run)
    args = [
        f"--run_dir={tiny_run}",
        f"--out={tmp_path}/m.onnx",
        *(a.format(tmp=tmp_path) for a in args),
    ]
    assert run_main(export_cli.main, args) == status
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert out == "" and snapshot(tmp_path, tiny_run) == before
