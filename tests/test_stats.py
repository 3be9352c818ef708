"""experiments.stats and the tables of experiments.analysis, against known values (numpy only).

Reference values: scipy.stats' own tests (ttest_rel, ttest_ind with equal_var=False, t.interval)
on fixed samples, written out here so that a change of method (not only of scipy) shows;
sample sizes from G*Power's tables (matched pairs and two independent means, α = 0.05
two-sided, power 0.8). Tolerances: 1e-9 relative for closed forms, exact for counts.
"""
import math

import numpy as np
import pytest
from scipy import stats as sps

from experiments import analysis, stats

A = [2.1086, 2.0981, 2.1190]          # three seeds of one experiment
B = [2.1608, 2.1479, 2.1737]          # the same seeds of another


def test_summary_is_the_student_t_interval():
    s = stats.summarize(A)
    assert s.n == 3 and s.mean == pytest.approx(np.mean(A), rel=1e-12)
    assert s.std == pytest.approx(np.std(A, ddof=1), rel=1e-12)
    half = 4.302652729911275 * s.std / math.sqrt(3)   # t(0.975, 2), a table value
    assert (s.lo, s.hi) == pytest.approx((s.mean - half, s.mean + half), rel=1e-9)
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean(A), scale=sps.sem(A))
    assert (s.lo, s.hi) == pytest.approx((lo, hi), rel=1e-9)


def test_summary_of_too_few_values_has_no_interval():
    one = stats.summarize([2.0, float("nan")])
    assert one.n == 1 and one.mean == 2.0 and math.isnan(one.std) and math.isnan(one.lo)
    assert stats.summarize([]).n == 0


def test_paired_t_test_matches_scipy_and_a_hand_computation():
    c = stats.paired(B, A)
    d = np.subtract(B, A)
    ref = sps.ttest_rel(B, A)
    assert c.test == "paired t-test" and c.n == 3
    assert c.diff == pytest.approx(d.mean(), rel=1e-12)
    assert c.p == pytest.approx(ref.pvalue, rel=1e-9)
    se = d.std(ddof=1) / math.sqrt(3)
    assert (c.lo, c.hi) == pytest.approx((d.mean() - 4.302652729911275 * se, d.mean() + 4.302652729911275 * se), rel=1e-9)
    assert c.verdict == "worse"   # B's loss is higher in every seed, far beyond the spread of the differences


def test_paired_t_on_a_textbook_sample():
    # differences 1, 2, 3, 4, 5 → mean 3, sd √2.5, t = 3/(√2.5/√5) = 4.2426, df 4
    c = stats.paired([2, 4, 6, 8, 10], [1, 2, 3, 4, 5], lower_is_better=True)
    assert c.diff == 3.0 and c.sd == pytest.approx(math.sqrt(2.5), rel=1e-12)
    assert c.p == pytest.approx(2 * sps.t.sf(3 / math.sqrt(0.5), 4), rel=1e-12)
    assert c.p == pytest.approx(0.013236, abs=2e-6)
    assert c.p_permutation == pytest.approx(2 / 32)   # all positive: only the observed pattern and its mirror
    assert c.verdict == "worse"


def test_welch_matches_scipy():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.5, 3.1, 4.8, 5.0, 6.2]
    c = stats.welch(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert c.test == "Welch t-test" and c.n == 4
    assert c.diff == pytest.approx(np.mean(a) - np.mean(b), rel=1e-12)
    assert c.p == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (c.lo, c.hi) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_identical_runs_are_no_difference():
    c = stats.paired(A, list(A))
    assert c.verdict == "no difference" and c.identical and c.diff == 0.0 and c.p == 1.0
    assert c.seeds_needed is None and c.seeds_needed_text() == "-"
    assert c.verdict_text() == "no difference (identical in all 3 seeds)"


def test_a_shifted_copy_is_better_or_worse_by_direction():
    shifted = [x - 0.05 for x in A]
    c = stats.paired(shifted, A)            # lower loss in every seed by exactly 0.05
    assert c.verdict == "better" and not c.identical
    assert c.diff == pytest.approx(-0.05) and c.lo == c.hi == pytest.approx(-0.05) and c.p == 0.0
    assert c.seeds_needed == 2
    assert stats.paired(shifted, A, lower_is_better=False).verdict == "worse"   # e.g. accuracy
    assert stats.paired(A, shifted).verdict == "worse"


def test_a_difference_inside_the_noise_is_not_detected_and_says_how_many_seeds():
    rng = np.random.default_rng(0)
    base = 2.1 + 0.02 * rng.standard_normal(3)
    other = base + 0.002 + 0.02 * rng.standard_normal(3)
    c = stats.paired(other, base)
    assert c.verdict == "no difference" and c.lo < 0 < c.hi
    assert c.verdict_text() == "no difference detectable with 3 seeds"
    assert c.seeds_needed is not None and c.seeds_needed > 3
    # the estimate is what the power function says: enough at n, not at n - 1
    effect = abs(c.diff) / c.sd
    n = c.seeds_needed
    if n <= stats.MAX_SEEDS:
        assert stats.power(n, effect) >= stats.POWER > stats.power(n - 1, effect)


@pytest.mark.parametrize("effect, paired, n", [(0.5, True, 34), (0.8, True, 15), (1.0, True, 10),
                                               (0.5, False, 64), (0.8, False, 26), (1.0, False, 17)])
def test_seeds_needed_matches_gpower(effect, paired, n):
    assert stats.seeds_needed(effect, 1.0, paired=paired) == n


def test_power_agrees_with_a_simulation():
    rng = np.random.default_rng(1)
    d = 1.0 + rng.standard_normal((20000, 10))   # effect 1 sd, 10 pairs
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(10))
    simulated = np.mean(np.abs(t) > sps.t.ppf(0.975, 9))
    assert stats.power(10, 1.0) == pytest.approx(simulated, abs=0.015)


def test_too_few_seeds_has_no_verdict():
    c = stats.paired([2.0], [2.1])
    assert c.verdict == "too few seeds" and c.n == 1
    assert stats.paired([2.0, float("nan")], [2.1, 2.2]).n == 1   # a pair without a value is dropped


def test_sign_flip_floor_and_holm():
    assert stats.sign_flip_p([0.1, 0.2, 0.3]) == pytest.approx(0.25)     # 2/2^3: at 3 seeds nothing is < 0.05
    assert stats.sign_flip_p([0.1, -0.1]) == 1.0
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, float("nan")])[0] == 0.5 and math.isnan(stats.holm([0.5, float("nan")])[1])


# -- analysis: constructed runs --------------------------------------------------------------------
def record(name, seed, losses, times, accs=None, status="FINISHED"):
    accs = accs or [0.5] * len(losses)
    evals = [(100 * (i + 1), t, l, a, l / math.log(2)) for i, (l, t, a) in enumerate(zip(losses, times, accs))]
    return analysis.RunRecord(f"{name}-{seed}", name, seed, status, seed, evals)


def test_loss_at_time_interpolates_between_evaluations():
    r = record("x", 0, [3.0, 2.5, 2.0], [10.0, 20.0, 30.0])
    assert r.loss_at_time(20.0) == 2.5
    assert r.loss_at_time(25.0) == pytest.approx(2.25)
    assert r.loss_at_time(40.0) == 2.0          # trained no longer than t: its final loss
    assert math.isnan(r.loss_at_time(5.0))      # before its first evaluation
    assert r.best_val_loss == 2.0 and r.train_time_s == 30.0


def test_equal_wall_clock_compares_the_slow_run_at_the_fast_runs_end():
    # slow: better per step but twice the time; at the fast run's end (15 s) it is at 2.75
    slow = [record("slow", s, [3.0 + o, 2.5 + o, 2.0 + o], [10.0, 20.0, 30.0]) for s, o in ((0, 0.0), (1, 0.01), (2, -0.01))]
    fast = [record("fast", s, [2.8 + o, 2.6 + o, 2.4 + o], [5.0, 10.0, 15.0]) for s, o in ((0, 0.0), (1, 0.01), (2, -0.01))]
    comps = analysis.comparison_frame(slow + fast, [("slow vs fast", "slow", "fast")])
    row = {r["metric"]: r for _, r in comps.iterrows()}
    assert row["val_loss"]["verdict"] == "better" and row["val_loss"]["diff"] == pytest.approx(-0.4)
    assert row["equal_time_val_loss"]["verdict"] == "worse"
    assert row["equal_time_val_loss"]["diff"] == pytest.approx(2.75 - 2.4)
    assert row["val_acc"]["verdict"] == "no difference" and row["val_acc"]["identical"]


def test_summary_frame_and_duplicates():
    recs = [record("a", s, [2.0 + 0.1 * s], [1.0]) for s in range(3)]
    recs.append(analysis.RunRecord("a-0-old", "a", 0, "FINISHED", -1, [(100, 1.0, 9.0, 0.1, 9.0)]))   # older, replaced
    recs.append(record("a", 7, [5.0], [1.0], status="FAILED"))                                     # not finished: out
    df = analysis.summary_frame(recs, ["a"], "a")
    row = df.iloc[0]
    assert row["seeds"] == 3 and row["val_loss_mean"] == pytest.approx(2.1)
    assert row["val_loss_std"] == pytest.approx(0.1) and row["time_vs_baseline"] == 1.0
    assert analysis.duplicates(recs) == 1


def test_comparisons_without_common_seeds_use_welch():
    recs = [record("a", s, [2.0 + 0.01 * s], [1.0]) for s in range(3)] + \
           [record("b", s, [2.5 + 0.01 * s], [1.0]) for s in range(10, 13)]
    comps = analysis.comparison_frame(recs, [("a vs b", "a", "b")])
    final = comps[comps["metric"] == "val_loss"].iloc[0]
    assert final["test"] == "Welch t-test" and final["verdict"] == "better"
    eq = comps[comps["metric"] == "equal_time_val_loss"].iloc[0]
    assert eq["verdict"] == "too few seeds"   # equal wall-clock needs pairs


def test_rendered_tables_carry_the_numbers():
    recs = [record("a", s, [2.0 + 0.1 * s], [1.0]) for s in range(3)] + \
           [record("b", s, [2.2 + 0.1 * s], [2.0]) for s in range(3)]
    summary = analysis.summary_frame(recs, ["a", "b"], "a")
    comps = analysis.comparison_frame(recs, [("b vs a", "b", "a")])
    text = analysis.render(summary, comps, "t")
    assert "2.1000 [1.8516, 2.3484]" in text          # mean ± t(0.975,2)·0.1/√3
    assert "+0.2000 [+0.2000, +0.2000]" in text and "worse" in text
    md = analysis.render(summary, comps, "t", markdown=True)
    assert md.count("\n| a ") == 1 and "| b vs a | final val loss | 3 | +0.2000" in md
