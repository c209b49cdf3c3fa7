"""Accounting for every round of a run (experiments.deployment, benchmarks.deployment,
qsparse.accounting) and its table and figures (experiments.report / experiments.plot).

On tiny real runs (LeNet-12 on 600 MNIST images, 1 epoch, rounds 0-2; real, and quaternion with
each grouping): one row per finished round; bytes are the files on disk; weights alive are the
masks' counts; dense FLOPs are the model's jaxpr count and sparse FLOPs a hand count from the
masks (convolutions too, on a small Conv-2); latencies are positive finite numbers (no claim
about their values); the report and plot commands write the table and figures; bad input is one
line, status 2, nothing written.
"""

import contextlib
import io
import json
import math
import shutil
import statistics
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import deployment
from benchmarks.flops import forward_flops
from experiments import deployment as command
from qsparse import accounting, deploy, export, lottery, models, plots, pruning, results, rundir
from qsparse import masks as M
from qsparse.config import Config
from qsparse.data import DATASETS

RUNS = [("real", "element"), ("quat", "element"), ("quat", "quaternion")]
REPEATS = 2


@pytest.fixture(scope="module")
def tiny_runs(mnist_dir, tmp_path_factory) -> tuple[Path, dict[tuple[str, str], Path]]:
    work = tmp_path_factory.mktemp("runs")
    runs = {}
    for algebra, grouping in RUNS:
        config = Config(
            model="lenet12",
            algebra=algebra,
            grouping=grouping,
            data_dir=str(mnist_dir),
            rounds=2,
            epochs=1,
            train_subset=600,
            test_subset=200,
            batch_size=60,
        )
        runs[algebra, grouping] = lottery.run(config, work, log=lambda s: None)
    return work, runs


@pytest.fixture(scope="module")
def accounted(tiny_runs, tmp_path_factory, run_main) -> tuple[Path, str]:
    """(output folder, printed table) of the command over every tiny run."""
    work, _ = tiny_runs
    out = tmp_path_factory.mktemp("deployment")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = run_main(command.main, [f"--runs={work}", f"--out={out}", f"--repeats={REPEATS}"])
    assert status == 0
    return out, printed.getvalue()


def record(out: Path, run: Path) -> dict:
    return json.loads((out / run.name / "replicate_0" / accounting.FILE).read_text())


def finished(run: Path) -> list[rundir.Round]:
    return [rd for rd in rundir.Run(run).replicate(0).rounds() if rd.done.exists()]


def test_one_row_per_finished_round_with_the_rounds_accuracy(tiny_runs, accounted):
    _, runs = tiny_runs
    out, _ = accounted
    for (algebra, grouping), run in runs.items():
        rec = record(out, run)
        assert (rec["run"], rec["replicate"], rec["repeats"]) == (run.name, 0, REPEATS)
        assert (rec["config"]["algebra"], rec["config"]["grouping"]) == (algebra, grouping)
        rounds = finished(run)
        assert [r["round"] for r in rec["rounds"]] == [rd.level for rd in rounds] == [0, 1, 2]
        for row, rd in zip(rec["rounds"], rounds):
            done = rundir.read_json(rd.done)
            for k in ("test_acc", "status", "density_prunable", "weights_remaining_pct"):
                assert row[k] == done[k], k
            assert set(accounting.ROUND_FIELDS) <= set(row)


def test_bytes_are_the_files_on_disk(tiny_runs, accounted, tmp_path):
    _, runs = tiny_runs
    out, _ = accounted
    for run in runs.values():
        folder = out / run.name / "replicate_0"
        rows = record(out, run)["rounds"]
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [accounting.FILE, accounting.TABLE] + [r["file"] for r in rows]
        )
        for row in rows:
            path = folder / row["file"]
            header, _ = deploy.read(path)
            assert row["file_bytes"] == path.stat().st_size
            assert row["kernel_bytes"] == header["bytes"]["kernels"]
            assert header["provenance"]["round"] == row["round"]
            assert 4 * row["params_total"] < row["dense_file_bytes"]
            if row["round"]:
                assert row["file_bytes"] < row["dense_file_bytes"]
        # the dense file, made again: the same export of the last round with every weight kept
        row, rd = rows[-1], finished(run)[-1]
        _, model, params, _, _ = export.load_round(rundir.Run(run), rd)
        header, _ = deploy.read(folder / row["file"])
        spec = DATASETS["mnist"]
        inputs = {"input_shape": spec.image_shape, "mean": spec.mean, "std": spec.std}
        inputs.update(provenance=header["provenance"], check_images=0)
        entries = export.export_entries(model, params, M.ones(params), **inputs)
        assert deploy.save(tmp_path / f"{run.name}.npz", entries) == row["dense_file_bytes"]


def test_weights_alive_are_the_masks(tiny_runs, accounted):
    _, runs = tiny_runs
    out, _ = accounted
    for run in runs.values():
        for row, rd in zip(record(out, run)["rounds"], finished(run)):
            with np.load(rd.masks) as f:
                masks = {k: f[k] for k in f.files}
            kernels = [m for k, m in masks.items() if k.endswith("kernel")]
            assert row["weights_alive"] == sum(int(m.sum()) for m in kernels)
            assert row["weights_total"] == sum(m.size for m in kernels)
            assert row["params_alive"] == sum(int(m.sum()) for m in masks.values())
            assert row["params_total"] == sum(m.size for m in masks.values())


def test_flops_dense_from_the_jaxpr_sparse_from_the_masks(tiny_runs, accounted):
    _, runs = tiny_runs
    out, _ = accounted
    shape = DATASETS["mnist"].image_shape
    for (algebra, _), run in runs.items():
        model = models.create("lenet12", algebra, 10)
        params = jax.eval_shape(lambda m=model: models.init_params(m, jax.random.key(0), shape))
        dense = forward_flops(model, params, shape)
        rows = record(out, run)["rounds"]
        for row, rd in zip(rows, finished(run)):
            with np.load(rd.masks) as f:  # dense layers only: one position each
                hand = sum(
                    2 * (4 if k.endswith("qkernel") else 1) * int(f[k].sum())
                    for k in f.files
                    if k.endswith("kernel")
                )
            assert (row["flops_dense"], row["flops_sparse"]) == (dense, hand)
        sparse = [r["flops_sparse"] for r in rows]
        assert sparse[0] == dense and all(a > b for a, b in zip(sparse, sparse[1:]))


@pytest.mark.parametrize("algebra", models.PAPER_ALGEBRAS)
def test_flops_of_convolutions_count_their_output_positions(algebra):
    model = models.create("conv2", algebra, 10, stages=((8, 8),), dense_features=(16, 16))
    spec = DATASETS["cifar10"]
    shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), spec.image_shape))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    masks = pruning.prune(params, M.ones(params), 0.7, method="layerwise", grouping="element")
    entries = export.export_entries(
        model,
        params,
        masks,
        input_shape=spec.image_shape,
        mean=spec.mean,
        std=spec.std,
        check_images=0,
    )
    flops = accounting.header_flops(json.loads(entries[deploy.HEADER].tobytes()))
    assert flops["dense"] == forward_flops(model, shapes, spec.image_shape)
    hand = 0
    for path, m in jax.tree_util.tree_leaves_with_path(masks):
        name = M.path_str(path)
        if name.endswith("kernel"):  # SAME convolutions at 32 x 32, before the pooling
            positions = 32 * 32 if "Conv" in name else 1
            hand += 2 * positions * (4 if M.is_quaternion(path) else 1) * int(np.sum(m))
    assert flops["sparse"] == hand < flops["dense"]
    assert [layer["positions"] for layer in flops["layers"]] == [1024, 1024, 1, 1, 1]


def test_latencies_are_positive_and_finite(tiny_runs, accounted):
    _, runs = tiny_runs
    out, _ = accounted
    for run in runs.values():
        rec = record(out, run)
        assert rec["batches"] == [1, 256] and rec["machine"]["device"] == "cpu"
        for row in rec["rounds"]:
            for impl in accounting.IMPLEMENTATIONS:
                for b in rec["batches"]:
                    key = accounting.latency_field(impl, b)
                    times = row["timings_s"][key]
                    assert len(times) == REPEATS and all(math.isfinite(t) and t > 0 for t in times)
                    assert row[key] == statistics.median(times)


def test_command_prints_the_table_and_writes_one_per_run(tiny_runs, accounted):
    _, runs = tiny_runs
    out, printed = accounted
    assert printed.count("## lenet12 / mnist") == 1
    for label in ("R (grouping=element)", "Q (grouping=element)", "Q (grouping=quaternion)"):
        assert sum(line.startswith(f"| {label} | ") for line in printed.splitlines()) == 3, label
    for run in runs.values():
        table = (out / run.name / "replicate_0" / accounting.TABLE).read_text()
        assert "| curve | round | % left | test acc |" in table and "| sparse b256 ms |" in table
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary left


@pytest.mark.subprocess
def test_report_and_plot_commands_take_the_records(tiny_runs, accounted, tmp_path, modules):
    work, _ = tiny_runs
    out, printed = accounted
    proc = modules.run("experiments.report", f"--deployment={out}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == printed[printed.index("# Deployment") :]
    both = tmp_path / "report.md"
    proc = modules.run(
        "experiments.report", f"--runs={work}", f"--deployment={out}", f"--out={both}"
    )
    assert proc.returncode == 0, proc.stderr
    text = both.read_text()
    assert text.index("# Accuracy vs weights remaining") < text.index("# Deployment")
    figures = tmp_path / "figures"
    proc = modules.run("experiments.plot", f"--deployment={out}", f"--out={figures}")
    assert proc.returncode == 0, proc.stderr
    stems = ["deployment_bytes_lenet12_mnist", "deployment_latency_lenet12_mnist"]
    assert {p.name for p in figures.iterdir()} == {
        f"{s}.{e}" for s in stems for e in ("png", "svg")
    }
    for stem in stems:
        assert (figures / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        svg = (figures / f"{stem}.svg").read_text()
        assert "Q (grouping=quaternion)" in svg and "R (grouping=element)" in svg
    broken = tmp_path / "broken" / accounting.FILE
    broken.parent.mkdir()
    broken.write_text("{")
    for script, where, message in [
        ("experiments.report", tmp_path / "nothing", "is not a directory"),
        ("experiments.plot", figures, f"no {accounting.FILE} under"),
        ("experiments.report", broken.parent, f"cannot read {broken}"),
    ]:
        before = sorted(tmp_path.rglob("*"))
        proc = modules.run(script, f"--deployment={where}", f"--out={tmp_path / 'x'}")
        lines = proc.stderr.splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
        assert sorted(tmp_path.rglob("*")) == before


def snapshot(*roots: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for r in roots for p in r.rglob("*")}


BAD = {  # name: (flags, substring of the error line)
    "no_runs_flag": (["--out={tmp}/o"], "--runs is required"),
    "no_out_flag": (["--runs={work}"], "--out is required"),
    "runs_missing": (["--runs={tmp}/nothing", "--out={tmp}/o"], "is not a directory"),
    "no_run_found": (["--runs={tmp}/bare", "--out={tmp}/o"], "no run directory"),
    "no_finished_round": (["--runs={empty}", "--out={tmp}/o"], "has no finished round"),
    "replicate_missing": (["--runs={work}", "--replicate=3", "--out={tmp}/o"], "no replicate 3"),
    "repeats_zero": (["--runs={work}", "--repeats=0", "--out={tmp}/o"], "--repeats=0"),
    "batches_zero": (["--runs={work}", "--batches=1,0", "--out={tmp}/o"], "--batches=1,0"),
    "batches_word": (["--runs={work}", "--batches=big", "--out={tmp}/o"], "--batches=big"),
    "out_exists": (["--runs={work}", "--out={out}", "--repeats=1"], "exists; pass --overwrite"),
    "out_under_a_file": (["--runs={work}", "--out={tmp}/file"], "is not a directory"),
    "arguments": (["--runs={work}", "--out={tmp}/o", "extra"], "unexpected arguments"),
    "bad_flag": (["--runs={work}", "--out={tmp}/o", "--repeats=many"], "repeats"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_one_line_nothing_written(tiny_runs, accounted, tmp_path, capsys, run_main, name):
    work, _ = tiny_runs
    out, _ = accounted
    empty = tmp_path / "empty" / "lenet12_quat_mnist_0"
    (empty / "replicate_0" / "round_00").mkdir(parents=True)
    shutil.copy(next(work.glob("*/config.json")), empty / "config.json")
    (tmp_path / "file").write_bytes(b"keep me")
    (tmp_path / "bare").mkdir()
    before = snapshot(tmp_path, work, out)
    args, message = BAD[name]
    assert (
        run_main(
            command.main, [a.format(work=work, tmp=tmp_path, empty=empty, out=out) for a in args]
        )
        == 2
    )
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert captured.out == "" and snapshot(tmp_path, work, out) == before


def test_overwrite_replaces_a_record(tiny_runs, accounted, tmp_path, capsys, run_main):
    _, runs = tiny_runs
    out = tmp_path / "out"
    shutil.copytree(accounted[0], out)
    run = runs["quat", "quaternion"]
    folder = out / run.name / "replicate_0"
    other = snapshot(*(out / r.name for r in runs.values() if r != run))
    before = record(out, run)
    args = [f"--runs={run}", f"--out={out}", "--repeats=1", "--batches=1,3", "--overwrite"]
    assert run_main(command.main, args) == 0
    assert "| Q | 2 |" in capsys.readouterr().out  # one curve alone: its label is Q
    after = record(out, run)
    assert (after["repeats"], before["repeats"]) == (1, REPEATS)
    assert (after["batches"], before["batches"]) == ([1, 3], [1, 256])
    assert all(accounting.latency_field("sparse", 3) in row for row in after["rounds"])
    for a, b in zip(after["rounds"], before["rounds"]):
        assert {k: a[k] for k in accounting.ROUND_FIELDS} == {
            k: b[k] for k in accounting.ROUND_FIELDS
        }
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [accounting.FILE, accounting.TABLE, "round_00.npz", "round_01.npz", "round_02.npz"]
    )
    assert snapshot(*(out / r.name for r in runs.values() if r != run)) == other
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


@pytest.mark.subprocess
def test_the_command_refuses_an_existing_record(tiny_runs, accounted, modules):
    work, _ = tiny_runs
    out, _ = accounted
    proc = modules.run("experiments.deployment", f"--runs={work}", f"--out={out}")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "exists; pass --overwrite" in lines[0]


def test_rounds_that_did_not_end_ok_are_skipped(tiny_runs, tmp_path):
    _, runs = tiny_runs
    run = tmp_path / "runs" / runs["real", "element"].name
    shutil.copytree(runs["real", "element"], run)
    done = run / "replicate_0" / "round_02" / "done.json"
    done.write_text(done.read_text().replace('"status": "ok"', '"status": "nonfinite"'))
    lines = []
    rec = deployment.account_run(run, tmp_path / "out", repeats=1, batches=(3,), log=lines.append)
    assert [r["round"] for r in rec["rounds"]] == [0, 1]
    assert rec["skipped"] == [{"round": 2, "status": "nonfinite"}] and "skipped" in lines[-1]
    assert rec["batches"] == [3] and all(len(r["timings_s"]) == 3 for r in rec["rounds"])
    table = (tmp_path / "out" / run.name / "replicate_0" / accounting.TABLE).read_text()
    assert "not exported: round 2 (status nonfinite)" in table
    assert "| JAX b3 ms | numpy b3 ms | sparse b3 ms |" in table


def test_best_within_pools_replicates_and_picks_the_smallest_and_fastest():
    def deployment(replicate, rows, algebra="real"):
        record = {"run": "r", "replicate": replicate, "rounds": rows, "batches": [1]}
        config = {"model": "lenet12", "dataset": "mnist", "algebra": algebra}
        return accounting.Deployment(path=Path("x"), record=record, config=config)

    def row(level, acc, size, ms):
        return {
            "round": level,
            "test_acc": acc,
            "weights_remaining_pct_of_real": 100 * 0.8**level,
            "file_bytes": size,
            "dense_file_bytes": 1000,
            "latency_sparse_b1_s": ms / 1e3,
            "latency_jax_b1_s": 0.5e-3,
        }

    # accuracies in %, means over two replicates: 98, 97.5, 96, 90; sizes fall; round 1 fastest
    a = deployment(
        0,
        [row(0, 0.98, 1000, 2), row(1, 0.975, 800, 1), row(2, 0.96, 600, 3), row(3, 0.90, 400, 4)],
    )
    b = deployment(1, [row(0, 0.98, 1000, 2), row(1, 0.975, 800, 1), row(2, 0.96, 640, 3)])
    (one, five) = accounting.best_within([a, b], points=(1.0, 5.0))
    assert one["replicates"] == 2 and one["dense"]["test_acc"] == pytest.approx(98.0)
    assert one["smallest"]["round"] == 1 and one["fastest"]["round"] == 1  # round 2: -2 pp
    assert five["smallest"]["round"] == 2 and five["smallest"]["file_bytes"] == 620  # mean
    assert five["fastest"]["round"] == 1  # round 3 is not in every replicate
    text = accounting.best_within_markdown([one, five])
    assert "| R (lenet12, n=2) | 5 pp | 98.00 | 2 |" in text and "1.6 |" in text
    # the best dense path: JAX's 0.5 ms in records without the numpy column; where every
    # replicate timed numpy too, the faster of the two (means over the replicates)
    assert one["best_dense_latency_s"] == 0.5e-3 and text.rstrip().endswith("| 0.5 |")
    a.rows[0]["latency_numpy_b1_s"], b.rows[0]["latency_numpy_b1_s"] = 0.2e-3, 0.4e-3
    assert accounting.best_within([a, b])[0]["best_dense_latency_s"] == pytest.approx(0.3e-3)
    del b.rows[0]["latency_numpy_b1_s"]  # one replicate without it: JAX's, as for old records
    assert accounting.best_within([a, b])[0]["best_dense_latency_s"] == 0.5e-3


def _deployment(algebra: str, replicate: int, accs: list[float]) -> accounting.Deployment:
    """A deployment record of ``len(accs)`` rounds, bytes falling 10x per round."""
    rows = [
        {"round": r, "test_acc": a, "file_bytes": 1e6 / 10**r + replicate}
        for r, a in enumerate(accs)
    ]
    record = {"run": f"run_{algebra}", "replicate": replicate, "rounds": rows}
    config = results.curve_config({"model": "lenet12", "dataset": "mnist", "algebra": algebra})
    return accounting.Deployment(Path("deployment.json"), record, config)


def test_figures_pool_replicates_over_the_rounds_all_of_them_finished():
    """One curve per configuration: the mean of its replicates at the rounds every replicate
    reached (one stopped a round early), shaded over their range; one replicate: no shade."""
    real = [_deployment("real", 0, [0.9, 0.8, 0.5, 0.2]), _deployment("real", 1, [0.7, 0.6, 0.3])]
    quat = [_deployment("quat", 0, [0.95, 0.9, 0.85, 0.8])]
    pooled = {c.label: c for c in accounting.pool(real + quat, "file_bytes")}
    assert set(pooled) == {"R", "Q"} and (pooled["R"].replicates, pooled["Q"].replicates) == (2, 1)
    r = pooled["R"]
    np.testing.assert_allclose(r.acc, [80, 70, 40])
    np.testing.assert_allclose(r.low, [70, 60, 30])
    np.testing.assert_allclose(r.high, [90, 80, 50])
    np.testing.assert_allclose(r.x, [1e6 + 0.5, 1e5 + 0.5, 1e4 + 0.5])
    np.testing.assert_allclose(pooled["Q"].acc, [95, 90, 85, 80])
    ax = plots.deployment_figure(real + quat, "bytes").axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["R (mean of 2, range shaded)", "Q"]
    assert len(ax.collections) == 1  # R's range only
