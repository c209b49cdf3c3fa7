import dataclasses
import json
import math
import statistics
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from qsparse import experiment, masks, models, paper, plots, report, results, rundir
from qsparse.config import Config

ROOT = Path(__file__).parents[1]


def write_run(root: Path, name: str, rows: list[dict], **config) -> Path:
    """A synthetic run directory: config.json and one done.json per (replicate, round)."""
    run = root / name
    run.mkdir(parents=True)
    cfg = experiment.resolve(Config(model="lenet300_100", **config))
    (run / "config.json").write_text(json.dumps(cfg.to_json()))
    for row in rows:
        rd = run / f"replicate_{row['replicate']}" / f"round_{row['round']:02d}"
        rd.mkdir(parents=True)
        done = {
            "status": "ok",
            "density_prunable": 1.0,
            "val_acc": math.nan,
            "train_acc": 0.5,
            "train_loss": 1.0,
            "epochs": 3,
            **{k: v for k, v in row.items() if k not in ("replicate", "round")},
        }
        (rd / "done.json").write_text(json.dumps(done))
    return run


def rows_for(accs: list[list[float]], xs: list[float], ratio: float = 1.0) -> list[dict]:
    """accs[replicate][round] → done rows; x_real = x_own · ratio."""
    return [
        {
            "replicate": r,
            "round": n,
            "test_acc": a,
            "weights_remaining_pct": xs[n],
            "weights_remaining_pct_of_real": xs[n] * ratio,
        }
        for r, per_round in enumerate(accs)
        for n, a in enumerate(per_round)
    ]


def test_aggregate_mean_std_and_x_conventions(tmp_path):
    accs = [[0.91, 0.92, 0.80], [0.93, 0.95, math.nan], [0.90, 0.97, 0.70]]
    xs = [100.0, 80.12, 64.22]
    write_run(tmp_path, "quat", rows_for(accs, xs, ratio=0.254), algebra="quat", replicates=3)
    (curve,) = results.load([tmp_path])
    assert curve.algebra == "quat" and curve.rounds.tolist() == [0, 1, 2]
    for n in range(3):
        finite = [100 * a[n] for a in accs if not math.isnan(a[n])]
        assert curve.n[n] == len(finite)
        assert curve.acc_mean[n] == pytest.approx(statistics.mean(finite))
        assert curve.acc_std[n] == pytest.approx(statistics.stdev(finite))
    np.testing.assert_allclose(curve.x_own, xs)
    np.testing.assert_allclose(curve.x_real, np.array(xs) * 0.254)
    rows = results.load_rows([tmp_path])
    assert (
        rows[0]["epochs_run"] == 3
        and rows[0]["epochs"] == experiment.resolve(Config(model="lenet300_100")).epochs
    )


def test_runs_pool_by_config_and_split_by_grouping(tmp_path):
    xs = [100.0, 80.0]
    write_run(tmp_path / "work", "a", rows_for([[0.5, 0.6]], xs), algebra="quat", seed=0)
    write_run(tmp_path / "work", "b", rows_for([[0.7, 0.8]], xs), algebra="quat", seed=1)
    write_run(
        tmp_path / "other", "c", rows_for([[0.1, 0.2]], xs), algebra="quat", grouping="quaternion"
    )
    write_run(tmp_path / "other", "d", rows_for([[0.9, 0.9]], xs), algebra="real")
    curves = results.load([tmp_path / "work", tmp_path / "other"])
    assert [c.algebra for c in curves] == ["real", "quat", "quat"]
    pooled = next(c for c in curves if c.config["grouping"] == "element" and c.algebra == "quat")
    assert pooled.n.tolist() == [2, 2] and len(pooled.runs) == 2
    np.testing.assert_allclose(pooled.acc_mean, [60.0, 70.0])
    np.testing.assert_allclose(pooled.acc_std, [statistics.stdev([50, 70])] * 2)
    assert results.labels(curves) == [
        "R (grouping=element)",
        "Q (grouping=element)",
        "Q (grouping=quaternion)",
    ]
    assert np.isnan(curves[-1].acc_std).all()  # one replicate: no spread


# LeNet-300-100's parameters (10 classes) per algebra as a fraction of the real model's.
R = 266_610
RATIO = dict(phm4=67_838 / R, tessarine=67_710 / R, real=1.0, quat=67_710 / R, complex=134_010 / R)
XS = [100.0, 80.0, 64.0]


def algebra_accs(i: int) -> list[list[float]]:
    """Two replicates over three rounds, the ``i``-th algebra a point lower."""
    return [[0.9 - 0.01 * i - 0.02 * n + 0.01 * r for n in range(3)] for r in range(2)]


def algebra_runs(root: Path) -> None:
    for i, (algebra, ratio) in enumerate(RATIO.items()):
        rows = rows_for(algebra_accs(i), XS, ratio)
        write_run(root, algebra, rows, algebra=algebra, replicates=2)


def test_curves_of_several_algebras_aggregate_side_by_side(tmp_path):
    algebra_runs(tmp_path)
    curves = results.load([tmp_path])
    # real first, then as the algebras are registered; not as the runs are named
    assert [c.algebra for c in curves] == ["real", "complex", "quat", "tessarine", "phm4"]
    assert results.labels(curves) == ["R", "complex", "Q", "tessarine", "phm4"]
    assert list(results.by_pair(curves)) == [("lenet300_100", "mnist")]
    for c in curves:
        accs = algebra_accs(list(RATIO).index(c.algebra))
        np.testing.assert_allclose(c.x_own, XS)
        np.testing.assert_allclose(c.x_real, np.array(XS) * RATIO[c.algebra])
        np.testing.assert_allclose(c.acc_mean, [100 * statistics.mean(a) for a in zip(*accs)])
        assert c.n.tolist() == [2, 2, 2] and len(c.runs) == 1


def test_a_run_older_than_a_config_field_pools_as_its_default(tmp_path):
    write_run(tmp_path, "new", rows_for([[0.5]], [100.0]), algebra="quat", seed=1)
    old = write_run(tmp_path, "old", rows_for([[0.7]], [100.0]), algebra="quat", seed=2)
    config = json.loads((old / "config.json").read_text())
    assert config.pop("phm_init") == "zhang" and config.pop("hash_seed") == 0
    (old / "config.json").write_text(json.dumps(config))
    write_run(tmp_path, "hashed", rows_for([[0.9]], [100.0]), algebra="quat", hash_seed=5)
    pooled, other = results.load([tmp_path])
    assert pooled.n.tolist() == [2] and pooled.acc_mean.tolist() == [pytest.approx(60.0)]
    assert results.labels([pooled, other]) == ["Q (hash_seed=0)", "Q (hash_seed=5)"]


def test_curve_fields_exclude_only_config_fields():
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(results.NOT_CURVE_FIELDS) <= fields
    assert {"model", "dataset", "algebra", "grouping", "protocol"} <= fields - set(
        results.NOT_CURVE_FIELDS
    )
    assert set(rundir.SUMMARY_FIELDS) - {"epochs"} <= results.ROW_FIELDS


def test_summary_fallback_and_find_runs(tmp_path):
    run = tmp_path / "deep" / "copied"
    run.mkdir(parents=True)
    (run / "config.json").write_text(
        json.dumps(experiment.resolve(Config(model="lenet12")).to_json())
    )
    rows = [
        {
            "replicate": 0,
            "round": 0,
            "status": "ok",
            "test_acc": 0.5,
            "weights_remaining_pct": 100.0,
            "weights_remaining_pct_of_real": 100.0,
            "epochs": 2,
        }
    ]
    (run / "summary.json").write_text(json.dumps(rows))
    assert results.find_runs([tmp_path]) == [run]
    (curve,) = results.load([tmp_path])
    assert curve.model == "lenet12" and curve.acc_mean.tolist() == [50.0]
    with pytest.raises(FileNotFoundError):
        results.find_runs([tmp_path / "deep" / "copied" / "nothing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        results.find_runs([tmp_path / "empty"])


def test_masks_statistics(tmp_path):
    q = np.ones((4, 2, 3), bool)
    q[:, 0, 0] = False  # one quaternion fully pruned
    q[0, 0, 1] = q[1, 1, 1] = q[2, 1, 1] = False  # two partly alive; pruned: r 2, i 2, j 2, k 1
    assert results.number_states(q) == pytest.approx(
        {"full": 3 / 6, "partial": 2 / 6, "pruned": 1 / 6}
    )
    assert results.pruned_by_component(q).tolist() == [2, 2, 2, 1]
    (tmp_path / "config.json").write_text(json.dumps({"algebra": "quat"}))
    rd = tmp_path / "replicate_0"
    for level, mask in ((0, np.ones_like(q)), (1, q)):
        (rd / f"round_{level:02d}").mkdir(parents=True)
        np.savez(
            rd / f"round_{level:02d}" / "masks.npz",
            **{"QDense_0/qkernel": mask, "output/kernel": np.ones((6, 2), bool)},
        )
    assert results.mask_rounds(tmp_path) == [0, 1]
    summary = results.quaternion_summary(tmp_path)
    assert [summary[1][f"share_{c}"] for c in results.COMPONENTS] == pytest.approx(
        [2 / 7, 2 / 7, 2 / 7, 1 / 7]
    )
    assert math.isnan(summary[0]["share_r"]) and summary[0]["full"] == 1.0


def write_masks(run: Path, algebra: str, per_round: list[dict[str, np.ndarray]]) -> None:
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"algebra": algebra}))
    for level, found in enumerate(per_round):
        rd = run / "replicate_0" / f"round_{level:02d}"
        rd.mkdir(parents=True)
        np.savez(rd / "masks.npz", **found)


def test_number_summary_of_other_algebras_names_their_components(tmp_path):
    c = np.ones((2, 3, 2), bool)  # complex: six numbers (r, i) in a dense layer
    c[:, 0, 0] = False  # one pruned whole
    c[1, 2, 1] = False  # one partly (its i)
    c_conv = np.ones((2, 3, 3, 1, 1), bool)  # and nine in a conv layer
    c_conv[0, 0, 0] = False  # one partly (its r); pruned in all: r 2, i 2
    found = {"HyperDense_0/hkernel": c, "HyperConv_0/hkernel": c_conv, "output/kernel": c[0]}
    want = {"round": 0, "full": 12 / 15, "partial": 2 / 15, "pruned": 1 / 15}
    write_masks(tmp_path / "complex", "complex", [found])
    assert results.number_summary(tmp_path / "complex") == [
        pytest.approx({**want, "share_r": 0.5, "share_i": 0.5})
    ]
    write_masks(tmp_path / "dual", "dual", [found])  # an algebra not registered here
    assert results.number_summary(tmp_path / "dual") == [
        pytest.approx({**want, "share_e0": 0.5, "share_e1": 0.5})
    ]
    k = np.ones((4, 1, 2), bool)
    k[3] = False  # the c component of both numbers pruned
    write_masks(tmp_path / "klein", "klein4", [{"HyperDense_0/hkernel": k}])
    (summary,) = results.number_summary(tmp_path / "klein")
    assert [summary[f"share_{u}"] for u in "rabc"] == [0.0, 0.0, 0.0, 1.0]
    assert summary["partial"] == 1.0
    write_masks(tmp_path / "real", "real", [{"Dense_0/kernel": k[0]}])
    assert results.number_summary(tmp_path / "real") == []


def test_layer_density_from_sparsity_reports(tmp_path):
    """Densities read back from sparsity.json files written by qsparse.masks.density_report."""
    q = np.ones((4, 5, 2), bool)
    q[0, :3, 0] = False  # three quaternions partly alive
    q[:, 4, :] = False  # two fully pruned
    out = np.ones((8, 10), bool)
    out[:2] = False
    for level, (qm, om) in enumerate([(np.ones_like(q), np.ones_like(out)), (q, out)]):
        tree = {
            "QDense_0": {"qkernel": qm, "bias": np.ones(8, bool)},
            "output": {"kernel": om, "bias": np.ones(10, bool)},
        }
        rd = tmp_path / "replicate_0" / f"round_{level:02d}"
        rd.mkdir(parents=True)
        (rd / "sparsity.json").write_text(json.dumps(masks.density_report(tree)))
    density = results.layer_density(tmp_path)
    assert density.rounds == [0, 1] and list(density.density) == [
        "QDense_0/qkernel",
        "output/kernel",
    ]
    np.testing.assert_allclose(density.density["QDense_0/qkernel"], [1.0, q.mean()])
    np.testing.assert_allclose(density.density["output/kernel"], [1.0, 0.75])
    np.testing.assert_allclose(density.number_full["QDense_0/qkernel"], [1.0, 5 / 10])
    np.testing.assert_allclose(density.number_alive["QDense_0/qkernel"], [1.0, 8 / 10])
    assert list(density.number_full) == ["QDense_0/qkernel"]


# -- the paper's tables -----------------------------------------------------------------------


@pytest.mark.parametrize("key", [*paper.PAPER, "fig6"])
def test_paper_table_sanity(key):
    p = paper.PAPER_EARLY_STOPPING[("conv2", "cifar10")] if key == "fig6" else paper.PAPER[key]
    n = len(p.rounds)
    assert p.rounds == tuple(range(n))
    assert all(len(col) == n for col in (p.r_x, p.r_acc, p.q_x_of_real, p.q_x_own, p.q_acc))
    for col in (p.r_x, p.q_x_of_real, p.q_x_own):
        assert all(a > b for a, b in zip(col, col[1:])), col
    assert p.r_x[0] == p.q_x_own[0] == 100.0
    for r in range(
        n
    ):  # 20 % of the remaining weights per round; unpruned biases keep x a little above 0.8^n
        assert 100 * 0.8**r <= p.r_x[r] < 100 * 0.8**r + 0.2
        assert 100 * 0.8**r <= p.q_x_own[r] < 100 * 0.8**r + 0.7
        assert p.q_x_of_real[r] == pytest.approx(p.q_x_own[r] * p.qr_ratio, abs=0.011)
    assert all(a is None or 30 < a < 100 for a in (*p.r_acc, *p.q_acc))
    assert p.r_acc[0] is not None and p.q_acc[0] is not None


def test_paper_ratios_are_the_models_parameter_ratios():
    shapes = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}

    def count(model, algebra, dataset):
        m = models.create(model, algebra, 10)
        return models.count_params(
            jax.eval_shape(lambda: models.init_params(m, jax.random.key(0), shapes[dataset]))
        )

    for (model, dataset), p in paper.PAPER.items():
        data = "cifar10" if dataset == "cifar100" else dataset  # Fig. 4e/f used the 10-class ratios
        assert count(model, "quat", data) / count(model, "real", data) == pytest.approx(
            p.qr_ratio, abs=5e-5
        )
    assert ("lenet12", "mnist") not in paper.PAPER  # Fig. 5b is withheld on purpose
    assert paper.PAPER[("lenet300_100", "mnist")].qr_ratio == 0.2540


def test_paper_nearest():
    p = paper.PAPER[("lenet300_100", "mnist")]
    assert p.nearest("real", 80.0) == (1, 98.1)
    assert p.nearest("quat", 6.1) == (13, None)
    assert p.nearest("quat", 11.0) == (10, 85.4)


# -- report and scripts -----------------------------------------------------------------------


def paper_like_runs(root: Path) -> None:
    """Lenet-300-100 runs at the paper's x positions of rounds 0-2 (real) and 0-1 (quat)."""
    p = paper.PAPER[("lenet300_100", "mnist")]
    write_run(
        root,
        "real",
        rows_for([[0.981, 0.975, 0.97], [0.979, 0.977, 0.96]], list(p.r_x[:3])),
        replicates=2,
    )
    write_run(
        root,
        "quat",
        rows_for([[0.95, 0.94]], list(p.q_x_own[:2]), ratio=p.qr_ratio),
        algebra="quat",
    )


def table_rows(report: str) -> dict[int, list[str]]:
    return {
        int(cells[0]): cells[1:]
        for line in report.splitlines()
        if line.startswith("| ")
        and (cells := [c.strip() for c in line.strip("|").split("|")])[0].isdigit()
    }


def test_report_puts_paper_values_beside_ours(tmp_path):
    paper_like_runs(tmp_path)
    text = report.markdown_report(results.load([tmp_path]))
    assert "## lenet300_100 / mnist" in text and "Fig. 4a" in text
    assert "| round | R: % left | R acc | paper | Q: % own | Q: % of R | Q acc | paper |" in text
    rows = table_rows(text)
    assert rows[0] == ["100.00", "98.0 ± 0.1", "98.1", "100.00", "25.40", "95.0", "97.7"]
    assert rows[1] == ["80.03", "97.6 ± 0.1", "98.1", "80.12", "20.35", "94.0", "97.8"]
    assert rows[2][:3] == ["64.06", "96.5 ± 0.7", "98.2"] and rows[2][3:] == [""] * 4


def test_report_tables_every_algebra_with_both_x_and_paper_values_for_r_and_q_only(tmp_path):
    paper_like_runs(tmp_path)
    p = paper.PAPER[("lenet300_100", "mnist")]
    for algebra, accs in (("tessarine", [[0.96, 0.93]]), ("phm4", [[0.92, 0.91], [0.94, 0.9]])):
        rows = rows_for(accs, list(p.q_x_own[:2]), ratio=RATIO[algebra])
        write_run(tmp_path, algebra, rows, algebra=algebra, replicates=len(accs))
    text = report.markdown_report(results.load([tmp_path]))
    assert (
        "| round | R: % left | R acc | paper | Q: % own | Q: % of R | Q acc | paper "
        "| tessarine: % own | tessarine: % of R | tessarine acc "
        "| phm4: % own | phm4: % of R | phm4 acc |"
    ) in text
    assert "- **tessarine**: " in text and "- **phm4**: " in text
    assert "Likewise for phm4, tessarine: '% own' is the model's own density" in text
    rows = table_rows(text)
    assert rows[0][7:] == ["100.00", "25.40", "96.0", "100.00", "25.44", "93.0 ± 1.4"]
    assert rows[1][7:] == ["80.12", "20.35", "93.0", "80.12", "20.39", "90.5 ± 0.7"]
    assert rows[2][7:] == [""] * 6


def test_report_notes_paper_round_when_x_differs(tmp_path):
    write_run(tmp_path, "halving", rows_for([[0.9, 0.8]], [100.0, 51.3]), prune_fraction=0.5)
    rows = table_rows(report.markdown_report(results.load([tmp_path])))
    assert rows[1] == ["51.30", "80.0", "98.1 (r3)"]


@pytest.fixture(scope="module")
def plot_runs(modules, tmp_path_factory) -> types.SimpleNamespace:
    """The plot command on paper-like runs and on a missing folder, in one process (its imports
    cost more than its work): each run's status, stdout and stderr, and the figures' folder."""
    tmp = tmp_path_factory.mktemp("plot")
    paper_like_runs(tmp / "runs")
    out = tmp / "figures"
    written, missing = modules.batch(
        "experiments.plot",
        [f"--runs={tmp / 'runs'}", f"--out={out}"],
        [f"--runs={tmp / 'nope'}", f"--out={tmp / 'f'}"],
    )
    return types.SimpleNamespace(written=written, missing=missing, out=out)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_plot_script_writes_png_and_svg(plot_runs):
    proc, out = plot_runs.written, plot_runs.out
    assert proc.returncode == 0, proc.stderr
    stems = ["accuracy_lenet300_100_mnist_own", "accuracy_lenet300_100_mnist_real"]
    assert {p.name for p in out.iterdir()} == {
        f"{s}.{ext}" for s in stems for ext in ("png", "svg")
    }
    for stem in stems:
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        svg = (out / f"{stem}.svg").read_text()
        assert "<svg" in svg and "paper Q (Fig. 4a)" in svg


@pytest.mark.parametrize("x", ["own", "real"])
def test_accuracy_figure_draws_one_labelled_curve_per_algebra(tmp_path, x):
    algebra_runs(tmp_path)
    curves = results.load([tmp_path])
    ax = plots.accuracy_figure(curves, x).axes[0]
    handles, names = ax.get_legend_handles_labels()
    assert names == ["R", "complex", "Q", "tessarine", "phm4"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == names
    lines = [h.lines[0] for h in handles]  # an errorbar's data line
    for line, c in zip(lines, curves, strict=True):
        scale = RATIO[c.algebra] if x == "real" else 1.0
        np.testing.assert_allclose(line.get_xydata(), np.c_[np.array(XS) * scale, c.acc_mean])
    assert len({line.get_marker() for line in lines}) == len(lines)
    assert (lines[0].get_marker(), lines[2].get_marker()) == ("o", "s")  # the paper's R and Q


def test_plot_script_rejects_missing_runs(plot_runs):
    proc = plot_runs.missing
    assert proc.returncode == 2 and "not a directory" in proc.stderr


def test_report_script_prints_and_writes(tmp_path):
    paper_like_runs(tmp_path / "runs")
    out = tmp_path / "report" / "report.md"
    proc = run_script("experiments.report", f"--runs={tmp_path / 'runs'}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == out.read_text() and "| 98.1 |" in proc.stdout


@pytest.mark.subprocess
def test_compare_script_names_two_non_real_algebras_by_their_own_labels(tmp_path):
    algebra_runs(tmp_path)
    proc = run_script(
        "experiments.compare", f"--runs={tmp_path}", "--a=algebra=tessarine", "--b=algebra=phm4"
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert out.startswith("## lenet300_100 / mnist: phm4 vs tessarine, x = % of R's weights\n")
    assert f"- tessarine: {tmp_path / 'tessarine'}\n- phm4: {tmp_path / 'phm4'}" in out
    assert "| phm4: % of R | round | phm4 acc | tessarine: % of R | round | tessarine acc |" in out
    # 25.44 % (phm4) meets 25.40 % (tessarine); phm4 (first in RATIO) a point up; SE = √½, df 2,
    # t = √2: p = 0.293, CI ±4.303·√½; Holm over the table's three equal p: 3 × 0.293
    row = "| 25.44 | 0 | 90.5 ± 0.7 (2) | 25.40 | 0 | 89.5 ± 0.7 (2) | +1.0 | [-2.0, +4.0] | 2.0 |"
    assert f"{row} 0.293 | 0.879 | within error |" in out


@pytest.mark.subprocess
def test_results_needs_neither_jax_nor_matplotlib():
    code = "import sys, qsparse.results; print('jax' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    ).stdout
    assert out.split() == ["False", "False"]
