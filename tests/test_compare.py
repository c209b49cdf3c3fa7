import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from qsparse import compare, results, stats
from qsparse.replicates import Replicates, band_means, replicates, with_stopped


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


def _reps(algebra, xs, accs, ratio=1.0, **config):
    return Replicates.from_rows(_rows(algebra, xs, accs, ratio, **config))


REAL = _reps("real", [100.0, 80.0, 64.0, 51.2], [[0.9, 0.9, 0.8, 0.7], [0.9, 0.92, 0.8, 0.5]])
QUAT = _reps("quat", [26.0, 20.8, 16.6, 66.0], [[0.9, 0.8, 0.7, 0.6], [0.9, 0.82, 0.72, 0.6]])


def test_each_round_of_b_meets_the_nearest_round_of_a_within_the_ratio():
    far = _reps("quat", [26.0, 61.0, 90.0], [[0.5, 0.6, 0.7]] * 2)
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
    with pytest.raises(ValueError, match="x='density': valid axes: real, own"):
        compare.matched(REAL, far, x="density")


def test_replicates_agree_with_the_curve_mean_std_and_n():
    rows = _rows("quat", [26.0, 20.8, 16.6], [[0.9, 0.8, 0.7], [0.92, 0.81], [0.88]], 0.26)
    (curve,) = results.aggregate(rows)
    reps = Replicates.from_rows(rows)
    got = [(p.round, p.sample.mean, p.sample.std, p.n) for p in compare.points(reps)]
    want = zip(curve.rounds, curve.acc_mean, curve.acc_std, curve.n)
    assert got == [(r, pytest.approx(m), pytest.approx(s, nan_ok=True), n) for r, m, s, n in want]
    np.testing.assert_allclose(reps.x_own, curve.x_own)
    np.testing.assert_allclose(reps.x_real, curve.x_real)


def test_welch_p_and_interval_from_the_formula_and_from_scipys_own_test():
    a, b = [80.0, 82.0, 81.0], [85.0, 86.0, 84.0, 88.0]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    diff, se = np.mean(b) - np.mean(a), math.sqrt(va + vb)
    got = stats.welch(stats.Sample.of(a), stats.Sample.of(b))
    assert (got.value, got.se, got.df) == pytest.approx((diff, se, df))
    assert got.p == pytest.approx(2 * (1 - scipy_stats.t.cdf(diff / se, df)))
    half = scipy_stats.t.ppf(0.975, df) * se
    assert (got.lo, got.hi) == pytest.approx((diff - half, diff + half))
    reference = scipy_stats.ttest_ind(b, a, equal_var=False)
    assert got.p == pytest.approx(reference.pvalue)
    assert (got.lo, got.hi) == pytest.approx(tuple(reference.confidence_interval(0.95)))
    with pytest.raises(ValueError, match="at least 2 replicates, got n = \\[1\\]"):
        stats.welch(stats.Sample.of([80.0]), stats.Sample.of(b))


def test_holm_by_hand():
    # sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> 0.06 (monotone)
    got = stats.holm([0.01, 0.04, math.nan, 0.03, 0.005])
    np.testing.assert_allclose(got, [0.03, 0.06, math.nan, 0.06, 0.02])
    np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1
    assert stats.holm([]).size == 0


def test_difference_of_differences_interval_by_hand():
    q_ticket, q_control = stats.Sample(86.0, 0.6, 3), stats.Sample(76.0, 1.2, 3)
    r_ticket, r_control = stats.Sample(87.7, 0.3, 3), stats.Sample(65.1, 2.7, 4)
    got = stats.difference_of_differences(q_ticket, q_control, r_ticket, r_control)
    v = [0.6**2 / 3, 1.2**2 / 3, 0.3**2 / 3, 2.7**2 / 4]
    se = math.sqrt(sum(v))
    df = se**4 / (v[0] ** 2 / 2 + v[1] ** 2 / 2 + v[2] ** 2 / 2 + v[3] ** 2 / 3)
    value = (86.0 - 76.0) - (87.7 - 65.1)
    half = scipy_stats.t.ppf(0.975, df) * se
    assert (got.value, got.se, got.df) == pytest.approx((value, se, df))
    assert (got.lo, got.hi) == pytest.approx((value - half, value + half))
    assert got.p == pytest.approx(2 * scipy_stats.t.sf(abs(value) / se, df))
    # from two matched points (a: control, b: ticket): (Q ticket − Q control) − (R ...)
    q_control, q_ticket = (
        _reps("quat", [3.0], [[0.8], [0.9]]),
        _reps("quat", [3.0], [[0.85], [0.86]]),
    )
    r_control, r_ticket = _reps("real", [3.0], [[0.7], [0.8]]), _reps("real", [3.0], [[0.9], [0.9]])
    (q,), (r,) = compare.matched(q_control, q_ticket), compare.matched(r_control, r_ticket)
    d = compare.decomposition(q, r)
    se = math.sqrt(np.var([85, 86], ddof=1) / 2 + np.var([80, 90], ddof=1) / 2 + 50 / 2 + 0)
    assert (d.value, d.se) == pytest.approx(((85.5 - 85.0) - (90.0 - 75.0), se))
    # one group: the one-sample t with n - 1 df
    m = stats.mean_interval([1.0, 2.0, 4.0])
    assert m.df == pytest.approx(2) and m.se == pytest.approx(np.std([1, 2, 4], ddof=1) / 3**0.5)


def test_verdict_is_holm_adjusted_welch_not_two_standard_errors():
    a = _reps("real", [10.0, 5.0], [[0.80, 0.70], [0.81, 0.71], [0.82, 0.72]])
    b = _reps("quat", [10.0, 5.0], [[0.82, 0.90], [0.83, 0.91], [0.84, 0.92]])
    near, far = compare.matched(a, b)
    # 10 %: +2.0 with SE 0.816: beyond 2 SE, but Welch p (df 4) is 0.07: not called.
    assert near.diff == pytest.approx(2.0) and abs(near.diff) > 2 * near.test.se
    assert near.test.p == pytest.approx(2 * scipy_stats.t.sf(2.0 / math.sqrt(2 / 3), 4))
    assert 0.05 < near.test.p < 0.1
    # Holm over two tests: far (p ~ 0) is doubled; near, the larger, keeps its own p.
    p_near, p_far = near.test.p, far.test.p
    assert p_far < p_near
    want = [max(p_near, 2 * p_far), 2 * p_far]
    np.testing.assert_allclose(compare.holm([near, far]), want)
    assert compare.verdicts([near, far], "R", "Q") == ["within error", "Q ahead"]
    assert compare.verdicts([far], "Q", "R") == ["R ahead"]
    one = _reps("quat", [10.0], [[0.99]])
    (m,) = compare.matched(a, one)
    assert m.test is None and compare.verdicts([m], "R", "Q") == ["no test (n < 2)"]
    table = compare.markdown([near, far, m], "R", "Q")
    assert "| no test (n < 2) |" in table and "| within error |" in table


def test_two_non_real_algebras_pair_by_their_share_of_the_real_weights_or_by_own_density():
    # A complex LeNet-300-100 holds about half the real weights, a quaternion one a quarter:
    # equal own densities are different weight counts, so rounds pair by x_real, not by round.
    quat = _reps("quat", [25.4, 20.3, 16.3], [[0.9, 0.88, 0.85], [0.9, 0.86, 0.85]], 0.254)
    complex_ = _reps(
        "complex", [50.3, 40.2, 32.2, 25.8, 20.6], [[0.95, 0.94, 0.93, 0.9, 0.8]] * 2, 0.503
    )
    np.testing.assert_allclose(complex_.x_own, np.array([50.3, 40.2, 32.2, 25.8, 20.6]) / 0.503)
    matches = compare.matched(quat, complex_)
    assert [(m.b.round, m.a.round) for m in matches] == [(3, 0), (4, 1)]
    assert [m.diff for m in matches] == pytest.approx([0.0, -7.0])
    own = compare.matched(quat, complex_, x="own")  # equal own density: the same rounds
    assert [(m.b.round, m.a.round) for m in own] == [(0, 0), (1, 1), (2, 2)]
    table = compare.markdown(matches, "Q", "complex")
    assert table.startswith("| complex: % of R | round | complex acc | Q: % of R | round | Q acc")
    assert "| complex − Q | 95 % CI | df | p | p Holm | verdict |" in table
    assert "| 20.60 | 4 | 80.0 ± 0.0 (2) | 20.30 | 1 | 87.0 ± 1.4 (2) | -7.0 |" in table
    assert compare.markdown(own, "Q", "complex", x="own").startswith("| complex: % own | round")


def test_stopped_replicates_are_flagged_when_dropped_or_counted_at_chance():
    xs = [100.0, 50.0, 25.0, 12.5]
    rows = _rows("real", xs, [[0.9, 0.8, 0.6, 0.5], [0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7]])
    dropped = Replicates.from_rows(rows)
    last = compare.points(dropped)[-1]
    assert (last.n, last.sample.mean) == (2, pytest.approx(55.0))
    assert last.cell() == "55.0 ± 7.1 (2 of 3)" and compare.points(dropped)[0].cell().endswith(
        "(3)"
    )
    chance = with_stopped(dropped, "chance", 10.0)
    last = compare.points(chance)[-1]
    assert (last.n, last.filled, last.sample.mean) == (3, 1, pytest.approx(40.0))
    assert last.cell().endswith("(3, 1 at chance)")
    assert chance.filled.sum() == 1 and with_stopped(dropped, "drop") is dropped
    with pytest.raises(ValueError, match="stopped='keep': valid rules: drop, chance"):
        with_stopped(dropped, "keep")
    # The band: under drop it is cut to 25 %, the lowest x every replicate reached.
    other = Replicates.from_rows(_rows("real", xs, [[0.9, 0.8, 0.6, 0.5]] * 3))
    cut = compare.band(other, dropped, 10.0, 60.0)
    assert (cut.lo, cut.hi, cut.asked) == (25.0, 60.0, (10.0, 60.0))
    assert "over 25.00-60.00 % of R's weights (of 10-60: what every replicate reached)" in (
        compare.band_text(cut, "R", "R'")
    )
    whole = compare.band(other, chance, 10.0, 60.0)
    assert (whole.lo, whole.hi) == (12.5, 60.0) and whole.estimate.value < cut.estimate.value
    with pytest.raises(ValueError, match="no part of the band \\[1, 5\\] is reached"):
        compare.band(other, dropped, 1.0, 5.0)


def test_band_mean_of_a_known_difference_with_its_t_interval():
    # Accuracy linear in log x, so interpolation is exact and b - a is d_r at every x;
    # b's rounds sit at other x than a's.
    def reps(xs, offsets):
        accs = [[(50 + 10 * math.log(x) + d) / 100 for x in xs] for d in offsets]
        return Replicates.from_rows(_rows("real", xs, accs))

    a = reps([8.0, 4.0, 2.0, 1.0], [0.0, 1.0, -1.0])
    b = reps([9.0, 5.0, 3.0, 1.5, 0.8], [2.0, 4.0, 0.0])  # d_r = 2, 3, 1
    means = band_means(a, 1.5, 3.5)
    log_mid = (math.log(1.5) + math.log(3.5)) / 2
    np.testing.assert_allclose(means, 50 + 10 * log_mid + np.array([0.0, 1.0, -1.0]))
    got = compare.band(a, b, 1.5, 3.5)
    half = scipy_stats.t.ppf(0.975, 2) * np.std([2, 3, 1], ddof=1) / math.sqrt(3)
    assert got.paired and (got.lo, got.hi) == (1.5, 3.5) and got.bootstrap is None
    e = got.estimate
    assert (e.value, e.df, e.lo, e.hi) == pytest.approx((2.0, 2, 2 - half, 2 + half))
    assert "+2.00 pp, 95 % CI" in compare.band_text(got, "R", "Q")
    assert "no bootstrap (n < 5)" in compare.band_text(got, "R", "Q")
    # Five replicates: the percentile bootstrap as well; unequal counts: Welch, unpaired.
    five = compare.band(
        reps([4.0, 2.0, 1.0], [0] * 5), reps([4.0, 2.0, 1.0], [1, 2, 3, 4, 5]), 1, 4
    )
    assert five.estimate.value == pytest.approx(3.0)
    assert five.bootstrap[0] < 3.0 < five.bootstrap[1] and five.estimate.lo < five.bootstrap[0]
    unpaired = compare.band(a, reps([4.0, 2.0, 1.0], [2.0, 4.0]), 1.5, 3.5)
    assert not unpaired.paired and unpaired.estimate.value == pytest.approx(3.0)
    with pytest.raises(ValueError, match="n >= 5 per side, got n = \\[3\\]"):
        stats.bootstrap_interval([1.0, 2.0, 3.0])


def test_near_reads_the_matched_round_nearest_the_target_in_log_x():
    a = _reps("real", [8.0, 4.0, 2.0, 1.0], [[0.9, 0.9, 0.8, 0.6], [0.92, 0.88, 0.82, 0.5]])
    b = _reps("quat", [8.5, 4.2, 2.1, 1.05], [[0.9, 0.9, 0.9, 0.8], [0.9, 0.92, 0.86, 0.7]])
    matches = compare.matched(a, b)
    assert [m.b.x_real for m in matches] == [8.5, 4.2, 2.1, 1.05]
    assert compare.nearest(matches, 2.0) == 2 and compare.nearest(matches, 1.0) == 3
    # 3 % lies between 4.2 (1.40x) and 2.1 (1.43x): the nearer, only if within max_ratio.
    assert compare.nearest(matches, 3.0) is None
    assert compare.nearest(matches, 3.0, max_ratio=1.5) == 1
    assert compare.nearest([], 3.0) is None
    m, t = matches[2], matches[2].test
    line = compare.near_text(matches, 2.0, "R", "Q")
    holm = compare.holm(matches)[2]
    assert line == (
        f"Near 2 (% of R's weights): Q − R {m.diff:+.1f} pp {t.interval()} at 2.10 % "
        f"(against 2.00 %), p {t.p:.3f}, Holm {holm:.3f}"
    )
    assert m.diff == pytest.approx(7.0) and holm >= t.p  # Holm within all four matches
    assert compare.near_text(matches, 3.0, "R", "Q").endswith(
        ": no matched round within 1.15x of 3"
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


def test_select_by_config_and_markdown_rows():
    curves = results.aggregate(
        _rows("quat", [10.0], [[0.5], [0.6]], prune_output=True)
        + _rows("quat", [10.0], [[0.7], [0.8]], prune_output=False)
    )
    (kept,) = compare.select(curves, {"algebra": "quat", "prune_output": "False"})
    assert kept.acc_mean[0] == pytest.approx(75.0)
    assert compare.select(curves, {"algebra": "real"}) == []
    narrow = results.aggregate(_rows("real", [10.0], [[0.5]], hidden=[3, 9]))
    for text in ("3,9", "[3, 9]"):  # as the flag spells it, and as config_text does
        assert compare.select(narrow, {"algebra": "real", "hidden": text}) == narrow
    assert compare.select(narrow, {"hidden": "3"}) == []
    half = results.aggregate(_rows("real", [10.0], [[0.5]], layer_fractions=[["output/*", 0.1]]))
    assert compare.select(half + narrow, {"layer_fractions": "output/*=0.1"}) == half
    assert compare.select(half + narrow, {"layer_fractions": ""}) == narrow
    assert compare.select(half, {"layer_fractions": "output/*=0.2"}) == []
    table = compare.markdown(compare.matched(REAL, QUAT), "R", "Q").splitlines()
    assert table[0].startswith("| Q: % of R | round | Q acc | R: % of R |")
    assert len(table) == 2 + len(compare.matched(REAL, QUAT))
    # a: 80, 80; b: 60, 60: no spread, so the difference is exact (df = 1 + 1) and called.
    (row,) = [line for line in table if line.startswith("| 66.00 |")]
    assert row.startswith("| 66.00 | 3 | 60.0 ± 0.0 (2) | 64.00 | 2 | 80.0 ± 0.0 (2) | -20.0 |")
    assert row.endswith("| [-20.0, -20.0] | 2.0 | <0.001 | <0.001 | R ahead |")


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


def _aa_runs(tmp_path: Path) -> None:
    """Two folders, one and two, each with a real and a quaternion run of one config: 21 rounds
    of 3 replicates around one truth."""
    rng = np.random.default_rng(7)
    xs = 100 * 0.8 ** np.arange(21)
    truth = 0.98 - 0.002 * np.arange(21)
    for folder in ("one", "two"):
        for algebra in ("real", "quat"):
            run = tmp_path / folder / algebra
            (run / "replicate_0").mkdir(parents=True)
            config = {"model": "lenet12", "dataset": "mnist", "algebra": algebra}
            (run / "config.json").write_text(json.dumps(config))
            rows = [
                {"replicate": r, "round": k, "test_acc": truth[k] + rng.normal(0, 0.002)}
                | {"weights_remaining_pct": x, "weights_remaining_pct_of_real": x}
                for r in range(3)
                for k, x in enumerate(xs)
            ]
            (run / "summary.json").write_text(json.dumps(rows))


def test_aa_two_runs_of_one_config_make_no_call_after_holm(cli):
    tmp_path = cli.aa_root
    pairs, alone = compare.aa_pairs(tmp_path / "one", tmp_path / "two")
    assert alone == [] and [(a.algebra, b.algebra) for a, b in pairs] == [
        ("real",) * 2,
        ("quat",) * 2,
    ]
    for a, b in pairs:
        counts = compare.calls(compare.matched(replicates(a), replicates(b)))
        assert counts["matched"] == counts["tested"] == 21
        assert counts["Holm p < 0.05"] == 0 <= counts["p < 0.05"]
    done = cli.aa
    assert done.returncode == 0, done.stderr
    floor = done.stdout.split("## Noise floor (% of R's weights)")[1]
    assert "| all | 42 | 42 |" in floor and floor.count("|") > 20
    assert done.stdout.count("Mean two − one over 1.50-3.50 % of R's weights") == 2


REPO = Path(__file__).resolve().parents[1]
PAPER = ["--runs=results/paper_mnist", "--a=algebra=real", "--b=algebra=quat"]
PROTOCOL = ["--runs=results/paper_protocol", "--a=algebra=real", "--b=algebra=quat"]
BAD_INPUT = [
    (["--a=algebra", "--b=algebra=quat"], "--a=algebra: expected key=value pairs"),
    (["--a=algebra=real", "--b=algebra=octonion"], "no model under"),
    (["--a=dataset=mnist", "--b=algebra=quat"], "--a matches 2 curves of lenet12/mnist"),
    (["--a=algebra=real", "--b=algebra=quat", "--max_ratio=0.9"], "--max_ratio=0.9"),
    (["--a=algebra=real", "--b=algebra=quat", "--x=density"], "--x=density"),
    (["--a=algebra=real", "--b=algebra=quat", "--band=3.5,1.5"], "--band=3.5,1.5: expected"),
    (["--a=algebra=real", "--b=algebra=quat", "--band=1.5"], "--band=1.5: expected LO,HI"),
    (["--a=algebra=real", "--b=algebra=quat", "--band=a,b"], "--band=a,b: expected LO,HI"),
    (["--a=algebra=real", "--b=algebra=quat", "--stopped=keep"], "--stopped=keep"),
    (["--aa=results/paper_mnist"], "--aa=results/paper_mnist: expected two run folders"),
    (["--a=algebra=real", "--b=algebra=quat", "--near=3,0"], "--near=3,0: expected positive"),
]


@pytest.fixture(scope="module")
def cli(modules, tmp_path_factory) -> types.SimpleNamespace:
    """Every ``python -m experiments.compare`` these tests check, run in one process (the
    command's imports cost more than its work): each run's status, stdout and stderr."""
    tmp = tmp_path_factory.mktemp("compare_cli")
    _aa_runs(tmp / "aa")
    runs = {
        "aa": [f"--aa={tmp / 'aa' / 'one'},{tmp / 'aa' / 'two'}", "--band=1.5,3.5"],
        "tables": [*PAPER, "--label_a=R", f"--out={tmp / 'cmp.md'}"],
        "plain": [*PROTOCOL, "--layer=output/kernel"],
        "drawn": [*PROTOCOL, "--layer=output/kernel", f"--figure={tmp}/fig/pp"],
        "own": [*PAPER, "--x=own", "--model=lenet300_100", "--band=1,4", "--stopped=chance"]
        + ["--near=2,0.01"],
    }
    bad = [
        args if args[0].startswith("--aa") else ["--runs=results/paper_mnist", *args]
        for args, _ in BAD_INPUT
    ]
    done = modules.batch("experiments.compare", *runs.values(), *bad)
    return types.SimpleNamespace(
        **dict(zip(runs, done)), bad=done[len(runs) :], aa_root=tmp / "aa", tmp=tmp
    )


@pytest.mark.subprocess
def test_cli_tables_the_committed_paper_runs(cli):
    out = cli.tmp / "cmp.md"
    done = cli.tables
    assert done.returncode == 0, done.stderr
    assert out.read_text() == done.stdout
    curves = {(c.model, c.algebra): c for c in results.load([REPO / "results/paper_mnist"])}
    for model in ("lenet12", "lenet300_100"):
        want = compare.matched(replicates(curves[model, "real"]), replicates(curves[model, "quat"]))
        # b unnamed: its own label, Q
        heading = f"## {model} / mnist: Q vs R, x = % of R's weights"
        section = done.stdout.split(heading)[1].split("##")[0]
        assert "| Q: % of R | round | Q acc | R: % of R |" in section
        rows = [
            line for line in section.splitlines() if line.startswith("| ") and "round" not in line
        ]
        assert len(rows) == len(want) > 10
        assert rows[-1].startswith(f"| {want[-1].b.x_real:.2f} | {want[-1].b.round} |")


@pytest.mark.subprocess
def test_cli_bad_input_is_one_line_exit_2(cli):
    for (args, message), done in zip(BAD_INPUT, cli.bad, strict=True):
        assert done.returncode == 2 and done.stdout == "", args
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
        compare.matched(replicates(curve), replicates(curve)), "a", "b", ("output/kernel", got, got)
    ).splitlines()
    assert table[0].split(" | ")[3] == "b: output/kernel alive"
    assert table[2].split(" | ")[3] == table[2].split(" | ")[7] == "120"


def test_figure_draws_both_curves_and_the_layer_survivors_at_their_weight_counts():
    from qsparse import plots

    real = _curve("real", [100.0, 80.0, 64.0, 51.2], [[0.9, 0.9, 0.8, 0.7], [0.9, 0.92, 0.8, 0.5]])
    quat = _curve("quat", [26.0, 20.8, 16.6, 66.0], [[0.9, 0.8, 0.7, 0.6], [0.9, 0.82, 0.72, 0.6]])
    alive_a, alive_b = {0: 120.0, 1: 90.0, 9: 1.0}, {0: 120.0, 3: 40.0}  # round 9: not in real
    fig = plots.comparison_figure(real, quat, ("R", "Q"), ("output/kernel", alive_a, alive_b))
    accuracy, survivors = fig.axes
    drawn = [line.get_xydata().tolist() for line in accuracy.lines if line.get_marker() in "os"]
    assert drawn == [np.c_[c.x_real, c.acc_mean].tolist() for c in (real, quat)]
    assert [line.get_xydata().tolist() for line in survivors.lines] == [
        [[100.0, 120.0], [80.0, 90.0]],
        [[26.0, 120.0], [66.0, 40.0]],
    ]
    assert accuracy.xaxis_inverted() and survivors.get_yscale() == "log"
    assert len(plots.comparison_figure(real, quat).axes) == 1


@pytest.mark.subprocess
def test_cli_figure_is_written_beside_an_unchanged_table(cli):
    plain, drawn = cli.plain, cli.drawn
    assert drawn.returncode == 0, drawn.stderr
    stem = cli.tmp / "fig" / "pp_lenet300_100_mnist"
    written = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    assert drawn.stderr.split() == [w for p in written for w in ("wrote", str(p))]
    assert all(p.stat().st_size > 10_000 for p in written)
    assert drawn.stdout == plain.stdout and "| +29.0 |" in drawn.stdout  # the table, unchanged


@pytest.mark.subprocess
def test_cli_own_density_axis_band_and_near_lines(cli):
    done = cli.own
    assert done.returncode == 0, done.stderr
    assert "## lenet300_100 / mnist: Q vs R, x = own density %" in done.stdout
    assert "| Q: % own | round | Q acc | R: % own | round |" in done.stdout
    assert "stopped replicates: counted at chance, 10 %" in done.stdout
    # Q's own density ends at 1.75 %: the band is cut there and says so.
    assert "Mean Q − R over 1.75-4.00 own density % (of 1-4: what every" in done.stdout
    # --near=2: the table's row nearest 2 % own density, its numbers and Holm p, in one line.
    rows = [r.split(" | ") for r in done.stdout.splitlines() if r.startswith("| ") and "%" not in r]
    rows = [r for r in rows if r[0][2:].replace(".", "").isdigit()]
    row = min(rows, key=lambda r: abs(math.log(float(r[0][2:]) / 2)))
    diff, ci, p, holm = row[6], row[7], row[9], row[10]
    assert (
        f"Near 2 (own density %): Q − R {diff} pp {ci} at {row[0][2:]} % (against {row[3]} %)"
        f", p {p}, Holm {holm}\n" in done.stdout
    )
    assert "Near 0.01 (own density %): Q − R: no matched round within 1.15x of 0.01" in done.stdout


def test_a_list_value_reads_as_its_flag_does():
    pairs = compare.parse_where(["algebra=real", "hidden=3", "9"])
    assert pairs == {"algebra": "real", "hidden": "3,9"}
    assert compare.parse_where(["model=lenet12"]) == {"model": "lenet12"}
    for bad in ([], ["algebra"], ["3", "algebra=real"]):
        with pytest.raises(ValueError, match="expected key=value pairs"):
            compare.parse_where(bad)
