import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qsparse import compare, results


def _rows(algebra, xs, accs, ratio=1.0, **config):
    """Tidy rows of one run: ``accs[replicate][round]`` (fractions) at x_real ``xs[round]``,
    x_own ``xs[round] / ratio`` (``ratio``: the model's parameters over the real model's)."""
    return [
        {
            "run": f"{algebra}_{config}",
            "model": "lenet12",
            "dataset": "mnist",
            "algebra": algebra,
            **config,
            "replicate": rep,
            "round": level,
            "weights_remaining_pct": x / ratio,
            "weights_remaining_pct_of_real": x,
            "test_acc": acc,
        }
        for rep, per_round in enumerate(accs)
        for level, (x, acc) in enumerate(zip(xs, per_round))
    ]


def _curve(algebra, xs, accs, ratio=1.0, **config):
    (curve,) = results.aggregate(_rows(algebra, xs, accs, ratio, **config))
    return curve


REAL = _curve("real", [100.0, 80.0, 64.0, 51.2], [[0.9, 0.9, 0.8, 0.7], [0.9, 0.92, 0.8, 0.5]])
QUAT = _curve("quat", [26.0, 20.8, 16.6, 66.0], [[0.9, 0.8, 0.7, 0.6], [0.9, 0.82, 0.72, 0.6]])


def test_each_round_of_b_meets_the_nearest_round_of_a_within_the_ratio():
    far = _curve("quat", [26.0, 61.0, 90.0], [[0.5, 0.6, 0.7]] * 2)
    matches = compare.matched(REAL, far)
    # 26 % has no real round within 1.15x; 61 % meets 64 %, 90 % meets 100 % (ratio 1.11).
    assert [(m.b.round, m.a.round) for m in matches] == [(1, 2), (2, 0)]
    assert [(m.b.round, m.a.round) for m in compare.matched(REAL, far, max_ratio=2.0)] == [
        (0, 3),
        (1, 2),
        (2, 0),
    ]
    with pytest.raises(ValueError, match="max_ratio must be >= 1, got 0.5"):
        compare.matched(REAL, far, max_ratio=0.5)


def test_difference_standard_error_and_verdict_by_hand():
    (match,) = [m for m in compare.matched(REAL, QUAT) if m.b.round == 3]  # 66 % meets 64 %
    assert (match.a.round, match.a.x_real, match.b.x_real) == (2, 64.0, 66.0)
    # a: 80, 80 (std 0); b: 60, 60: the difference is exact and so called.
    assert match.diff == pytest.approx(-20.0)
    assert match.se == 0 and match.verdict == "a"
    mixed = _curve("quat", [51.2], [[0.75], [0.45]])
    (m,) = compare.matched(REAL, mixed)
    s_a, s_b = np.std([70, 50], ddof=1), np.std([75, 45], ddof=1)
    assert m.se == pytest.approx(math.sqrt(s_a**2 / 2 + s_b**2 / 2))
    assert m.diff == pytest.approx(0.0) and m.verdict == "="


def test_more_than_two_standard_errors_is_called_for_either_side():
    a = _curve("real", [10.0], [[0.80], [0.82], [0.81]])
    ahead = _curve("quat", [10.0], [[0.85], [0.86], [0.84]])
    (m,) = compare.matched(a, ahead)
    assert m.diff > 2 * m.se and m.verdict == "b"
    (m,) = compare.matched(ahead, a)
    assert m.verdict == "a"


def test_two_non_real_algebras_pair_by_their_share_of_the_real_weights():
    # A complex LeNet-300-100 holds about half the real weights, a quaternion one a quarter:
    # equal own densities are different weight counts, so rounds pair by x_real, not by round.
    quat = _curve("quat", [25.4, 20.3, 16.3], [[0.9, 0.88, 0.85], [0.9, 0.86, 0.85]], 0.254)
    complex_ = _curve(
        "complex", [50.3, 40.2, 32.2, 25.8, 20.6], [[0.95, 0.94, 0.93, 0.9, 0.8]] * 2, 0.503
    )
    np.testing.assert_allclose(complex_.x_own, np.array([50.3, 40.2, 32.2, 25.8, 20.6]) / 0.503)
    matches = compare.matched(quat, complex_)
    assert [(m.b.round, m.a.round) for m in matches] == [(3, 0), (4, 1)]
    assert [m.diff for m in matches] == pytest.approx([0.0, -7.0])
    label_a, label_b = results.labels([quat, complex_])
    assert (label_a, label_b) == ("Q", "complex")
    table = compare.markdown(matches, label_a, label_b)
    assert table.startswith("| complex: % of R | round | complex acc | Q: % of R | round | Q acc")
    assert "| complex − Q | 2 SE | verdict |" in table
    assert "| 20.60 | 4 | 80.0 ± 0.0 (2) | 20.30 | 1 | 87.0 ± 1.4 (2) | -7.0 | 2.0 | Q ahead |" in (
        table
    )


def test_pick_sides_by_algebra_among_several():
    curves = results.aggregate(
        [
            *_rows("real", [100.0], [[0.5]]),
            *_rows("tessarine", [25.4], [[0.6]], 0.254),
            *_rows("quat", [25.4], [[0.7]], 0.254),
            *_rows("phm4", [25.4], [[0.8]], 0.254),
        ]
    )
    assert [c.algebra for c in curves] == ["real", "quat", "tessarine", "phm4"]
    (chosen,) = compare.pick(
        curves, {"a": {"algebra": "tessarine"}, "b": {"algebra": "phm4"}}
    ).values()
    assert [(c.algebra, c.acc_mean[0]) for c in chosen.values()] == [
        ("tessarine", pytest.approx(60.0)),
        ("phm4", pytest.approx(80.0)),
    ]
    (m,) = compare.matched(chosen["a"], chosen["b"])
    assert m.diff == pytest.approx(20.0) and m.verdict == "?"


def test_single_replicates_are_never_called():
    one = _curve("quat", [10.0], [[0.99]])
    (m,) = compare.matched(_curve("real", [10.0], [[0.10], [0.12]]), one)
    assert math.isnan(m.se) and m.verdict == "?"
    assert "n < 2" in compare.markdown([m], "R", "Q")


def test_select_by_config_and_markdown_rows():
    curves = results.aggregate(
        _rows("quat", [10.0], [[0.5], [0.6]], prune_output=True)
        + _rows("quat", [10.0], [[0.7], [0.8]], prune_output=False)
    )
    (kept,) = compare.select(curves, {"algebra": "quat", "prune_output": "False"})
    assert kept.acc_mean[0] == pytest.approx(75.0)
    assert compare.select(curves, {"algebra": "real"}) == []
    table = compare.markdown(compare.matched(REAL, QUAT), "R", "Q").splitlines()
    assert table[0].startswith("| Q: % of R | round | Q acc | R: % of R |")
    assert len(table) == 2 + len(compare.matched(REAL, QUAT))
    assert "| 66.00 | 3 | 60.0 ± 0.0 (2) | 64.00 | 2 | 80.0 ± 0.0 (2) | -20.0 | 0.0 |" in (
        "\n".join(table)
    )


def test_pick_takes_one_curve_per_side_for_each_model_that_has_both():
    def rows(model, algebra, accs, **config):
        return [
            {**row, "model": model, "run": f"{model}_{row['run']}"}
            for row in _rows(algebra, [100.0], accs, **config)
        ]

    curves = results.aggregate(
        rows("lenet12", "real", [[0.5]])
        + rows("lenet12", "quat", [[0.6]], prune_output=True)
        + rows("lenet12", "quat", [[0.7]], prune_output=False)
        + rows("conv2", "real", [[0.8]])  # no quaternion curve: left out
    )
    sides = {"R": {"algebra": "real"}, "Q": {"algebra": "quat", "prune_output": "False"}}
    picked = compare.pick(curves, sides)
    assert list(picked) == [("lenet12", "mnist")]
    (chosen,) = picked.values()
    assert list(chosen) == ["R", "Q"]
    assert (chosen["R"].algebra, chosen["R"].acc_mean[0]) == ("real", pytest.approx(50.0))
    assert (chosen["Q"].algebra, chosen["Q"].acc_mean[0]) == ("quat", pytest.approx(70.0))
    assert chosen["Q"] in compare.select(curves, sides["Q"])
    assert compare.pick(curves, sides, models=["conv2"]) == {}
    with pytest.raises(ValueError, match=r"^Q matches 2 curves of lenet12/mnist: \[.*pick one$"):
        compare.pick(curves, {"R": {"algebra": "real"}, "Q": {"algebra": "quat"}})


REPO = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.compare", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.subprocess
def test_cli_tables_the_committed_paper_runs(tmp_path):
    out = tmp_path / "cmp.md"
    run = "--runs=results/paper_mnist"
    done = _cli(run, "--a=algebra=real", "--b=algebra=quat", "--label_a=R", f"--out={out}")
    assert done.returncode == 0, done.stderr
    assert out.read_text() == done.stdout
    curves = {(c.model, c.algebra): c for c in results.load([REPO / "results/paper_mnist"])}
    for model in ("lenet12", "lenet300_100"):
        want = compare.matched(curves[model, "real"], curves[model, "quat"])
        # b unnamed: its own label, Q
        section = done.stdout.split(f"## {model} / mnist: Q vs R")[1].split("##")[0]
        assert "| Q: % of R | round | Q acc | R: % of R |" in section
        rows = [
            line for line in section.splitlines() if line.startswith("| ") and "round" not in line
        ]
        assert len(rows) == len(want) > 10
        assert rows[-1].startswith(f"| {want[-1].b.x_real:.2f} | {want[-1].b.round} |")


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "args, message",
    [
        (["--a=algebra", "--b=algebra=quat"], "--a=algebra: expected key=value pairs"),
        (["--a=algebra=real", "--b=algebra=octonion"], "no model under"),
        (["--a=dataset=mnist", "--b=algebra=quat"], "--a matches 2 curves of lenet12/mnist"),
        (["--a=algebra=real", "--b=algebra=quat", "--max_ratio=0.9"], "--max_ratio=0.9"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, message):
    done = _cli("--runs=results/paper_mnist", *args)
    assert done.returncode == 2 and done.stdout == ""
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_alive_is_the_replicate_mean_of_each_rounds_sparsity_json():
    (curve,) = [c for c in results.load([REPO / "results/paper_mnist"]) if c.model == "lenet12"][
        1:
    ]  # the quaternion curve
    got = compare.alive(curve, "output/kernel")
    files = sorted(Path(curve.runs[0]).glob("replicate_*/round_*/sparsity.json"))
    by_round: dict[int, list[int]] = {}
    for f in files:
        alive = json.loads(f.read_text())["leaves"]["output/kernel"]["alive"]
        by_round.setdefault(int(f.parent.name.split("_")[1]), []).append(alive)
    assert got == {r: pytest.approx(np.mean(v)) for r, v in by_round.items()}
    assert got[0] == 120  # dense: 12 x 10
    with pytest.raises(KeyError, match="no layer 'nope'"):
        compare.alive(curve, "nope")
    table = compare.markdown(
        compare.matched(curve, curve), "a", "b", ("output/kernel", got, got)
    ).splitlines()
    assert table[0].split(" | ")[3] == "b: output/kernel alive"
    assert table[2].split(" | ")[3] == table[2].split(" | ")[7] == "120"


def test_figure_draws_both_curves_and_the_layer_survivors_at_their_weight_counts():
    from qsparse import plots

    alive_a, alive_b = {0: 120.0, 1: 90.0, 9: 1.0}, {0: 120.0, 3: 40.0}  # round 9: not in REAL
    fig = plots.comparison_figure(REAL, QUAT, ("R", "Q"), ("output/kernel", alive_a, alive_b))
    accuracy, survivors = fig.axes
    drawn = [line.get_xydata().tolist() for line in accuracy.lines if line.get_marker() in "os"]
    assert drawn == [np.c_[c.x_real, c.acc_mean].tolist() for c in (REAL, QUAT)]
    assert [line.get_xydata().tolist() for line in survivors.lines] == [
        [[100.0, 120.0], [80.0, 90.0]],
        [[26.0, 120.0], [66.0, 40.0]],
    ]
    assert accuracy.xaxis_inverted() and survivors.get_yscale() == "log"
    assert len(plots.comparison_figure(REAL, QUAT).axes) == 1


@pytest.mark.subprocess
def test_cli_figure_is_written_beside_an_unchanged_table(tmp_path):
    args = [
        "--runs=results/paper_protocol",
        "--a=algebra=real",
        "--b=algebra=quat",
        "--layer=output/kernel",
    ]
    plain = _cli(*args)
    drawn = _cli(*args, f"--figure={tmp_path}/fig/pp")
    assert drawn.returncode == 0, drawn.stderr
    stem = tmp_path / "fig" / "pp_lenet300_100_mnist"
    written = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    assert drawn.stderr.split() == [w for p in written for w in ("wrote", str(p))]
    assert all(p.stat().st_size > 10_000 for p in written)
    assert drawn.stdout == plain.stdout and "| +29.0 |" in drawn.stdout  # the table, unchanged
