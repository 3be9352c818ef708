"""Statistics for comparing training runs over a few seeds: intervals, tests, verdicts.

At 3-10 seeds the choices matter, so each one is stated here and in the report:

- a mean's interval is Student's t interval, mean ± t(0.975, n−1)·s/√n (s with n−1);
- two experiments trained on the same seeds are compared **paired by seed** (the seed fixes
  the initialisation and the batches of both, so the pair shares its luck): the differences
  dᵢ = aᵢ − bᵢ get a t interval and a two-sided **paired t-test** (H0: mean d = 0, which
  assumes the differences are roughly normal);
- beside it, the exact **sign-flip permutation test** of the same mean difference (no
  normality assumed). It is reported, not used for the verdict: with n seeds its smallest
  possible p is 2/2ⁿ (0.25 at 3 seeds), so at these n it cannot detect anything;
- runs without common seeds are compared with **Welch's t-test** (unequal variances);
- the verdict is "better" or "worse" when the 95 % interval of the difference excludes 0
  (the t-test's p < 0.05), else "no difference": "no difference detectable with N seeds";
- **seeds needed**: the smallest n at which the same test would detect the observed
  difference, taking the observed mean and spread as the truth, with 80 % power at α = 0.05
  (noncentral t). It is an estimate for planning the next study, not a result;
- several comparisons at once: Holm's step-down adjustment of the p-values is reported
  beside them (the verdicts are per comparison at 95 %).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
ALPHA = 1.0 - CONFIDENCE
POWER = 0.8
MAX_SEEDS = 10_000       # "seeds needed" above this is reported as more than it
EXACT_PERMUTATION_N = 16  # up to 2^16 sign patterns enumerated; above, 20,000 random ones (seeded)


def _t():
    from scipy import stats
    return stats.t


def _finite(values) -> np.ndarray:
    x = np.asarray(list(values), dtype=np.float64)
    return x[np.isfinite(x)]


@dataclass(frozen=True)
class Summary:
    """A sample's mean with its spread and 95 % t interval (nan where n is too small)."""
    n: int
    mean: float
    std: float
    lo: float
    hi: float

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def summarize(values) -> Summary:
    x = _finite(values)
    n = int(x.size)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(_t().ppf(1 - ALPHA / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Comparison:
    """a − b: the difference, its 95 % interval, the test, the verdict for the metric's direction."""
    test: str            # "paired t-test" or "Welch t-test"
    n: int               # pairs (paired) or the smaller group (Welch)
    diff: float          # mean of aᵢ − bᵢ (paired) or mean(a) − mean(b)
    sd: float            # sd of the differences (paired) or the pooled sd (Welch)
    lo: float
    hi: float
    p: float
    p_permutation: float  # sign-flip (paired) or nan
    seeds_needed: int | None   # None: no difference observed, nothing to detect
    verdict: str         # "better", "worse", "no difference" (a against b), or "too few seeds"
    identical: bool      # every pair exactly equal

    def verdict_text(self) -> str:
        if self.verdict == "too few seeds":
            return f"too few seeds with a value ({self.n}; an interval needs 2)"
        if self.verdict != "no difference":
            return self.verdict
        if self.identical:
            return f"no difference (identical in all {self.n} seeds)"
        return f"no difference detectable with {self.n} seeds"

    def seeds_needed_text(self) -> str:
        if self.seeds_needed is None:
            return "-" if self.identical or self.verdict == "too few seeds" else "∞"
        return f">{MAX_SEEDS}" if self.seeds_needed > MAX_SEEDS else str(self.seeds_needed)


def _verdict(lo: float, hi: float, diff: float, lower_is_better: bool) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "too few seeds"
    if lo > 0 or hi < 0:
        return "better" if (diff < 0) == lower_is_better else "worse"
    return "no difference"


def paired(a, b, lower_is_better: bool = True) -> Comparison:
    """a and b: one value per seed, in the same seed order (pairs with a non-finite value dropped)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length ({a.size} and {b.size})")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = int(d.size)
    identical = n > 0 and bool(np.all(a[keep] == b[keep]))
    if n < 2:
        diff = float(d.mean()) if n else math.nan
        return Comparison("paired t-test", n, diff, math.nan, math.nan, math.nan, math.nan, math.nan,
                          None, "too few seeds", identical)
    diff, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:   # every pair differs by the same amount: the interval is that amount
        lo = hi = diff
        p = 1.0 if diff == 0.0 else 0.0
    else:
        se = sd / math.sqrt(n)
        tq = float(_t().ppf(1 - ALPHA / 2, n - 1))
        lo, hi = diff - tq * se, diff + tq * se
        p = float(2 * _t().sf(abs(diff) / se, n - 1))
    return Comparison("paired t-test", n, diff, sd, lo, hi, p, sign_flip_p(d),
                      seeds_needed(diff, sd, paired=True), _verdict(lo, hi, diff, lower_is_better), identical)


def welch(a, b, lower_is_better: bool = True) -> Comparison:
    """Two independent samples (no common seeds): Welch's t interval and test of mean(a) − mean(b)."""
    a, b = _finite(a), _finite(b)
    na, nb = int(a.size), int(b.size)
    identical = na > 0 and na == nb and bool(np.all(np.sort(a) == np.sort(b)))
    if na < 2 or nb < 2:
        diff = float(a.mean() - b.mean()) if na and nb else math.nan
        return Comparison("Welch t-test", min(na, nb), diff, math.nan, math.nan, math.nan, math.nan, math.nan,
                          None, "too few seeds", identical)
    va, vb = float(a.var(ddof=1)), float(b.var(ddof=1))
    diff = float(a.mean() - b.mean())
    se2 = va / na + vb / nb
    pooled = math.sqrt((va + vb) / 2)
    if se2 == 0.0:
        lo = hi = diff
        p = 1.0 if diff == 0.0 else 0.0
    else:
        df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
        se = math.sqrt(se2)
        tq = float(_t().ppf(1 - ALPHA / 2, df))
        lo, hi = diff - tq * se, diff + tq * se
        p = float(2 * _t().sf(abs(diff) / se, df))
    return Comparison("Welch t-test", min(na, nb), diff, pooled, lo, hi, p, math.nan,
                      seeds_needed(diff, pooled, paired=False), _verdict(lo, hi, diff, lower_is_better), identical)


def sign_flip_p(d) -> float:
    """Two-sided exact permutation p of mean(d) = 0: the share of the 2ⁿ sign patterns whose
    |mean| is at least the observed one (the observed pattern counts, so p ≥ 2/2ⁿ)."""
    d = _finite(d)
    n = d.size
    if n == 0:
        return math.nan
    obs = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if n <= EXACT_PERMUTATION_N:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    else:
        signs = np.random.default_rng(0).choice((1.0, -1.0), size=(20_000, n))
    means = np.abs(signs @ d) / n
    return float(np.mean(means >= obs - tol))


def power(n: int, effect: float, paired: bool = True) -> float:
    """Power of the two-sided t-test at α with n seeds (per group for Welch's, tested as a
    pooled two-sample test), when the true difference is `effect` standard deviations."""
    from scipy import stats
    if n < 2:
        return 0.0
    df = n - 1 if paired else 2 * n - 2
    nc = effect * math.sqrt(n) if paired else effect * math.sqrt(n / 2)
    tc = float(stats.t.ppf(1 - ALPHA / 2, df))
    return float(stats.nct.sf(tc, df, nc) + stats.nct.cdf(-tc, df, nc))


def seeds_needed(diff: float, sd: float, paired: bool = True) -> int | None:
    """The smallest n with `power` ≥ 0.8 for the observed difference and spread; None when no
    difference was observed; MAX_SEEDS + 1 when even that many would not do."""
    if not math.isfinite(diff) or diff == 0.0:
        return None
    if not math.isfinite(sd):
        return None
    if sd == 0.0:
        return 2
    effect = abs(diff) / sd
    lo, hi = 2, 2
    while power(hi, effect, paired) < POWER:   # doubling, then bisection: power grows with n
        if hi > MAX_SEEDS:
            return MAX_SEEDS + 1
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if power(mid, effect, paired) >= POWER:
            hi = mid
        else:
            lo = mid + 1
    return hi


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given; nan stays nan)."""
    p = np.asarray(list(pvalues), np.float64)
    out = np.full(p.shape, np.nan)
    idx = [i for i in np.argsort(p, kind="stable") if np.isfinite(p[i])]
    m, running = len(idx), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()
