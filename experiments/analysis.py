"""What a set of finished runs says: per-experiment intervals, comparisons with verdicts, figures.

Used by `experiments.study` (a study's report) and `experiments.compare` (any runs). The
statistics are `experiments.stats`; this module gets the numbers out of MLflow and lays
them out. What a report shows is its runs' task (`engine.tasks`; a run's task follows from
its param `model.family`), declared once per task in REPORTS: the validation series read
at each evaluation (with the cumulative training time `train_time_s`), the measures
summarised and compared, the end-of-run metrics (the test split) and, for the embedding
task, reference values (the closed-form PCA baseline, one constant per run). A report of
runs of two tasks is refused (ReportError).

Measures (one value per run):
- final: the last evaluation (at train.steps);
- best: the lowest validation loss over the run's evaluations;
- test: the test split's metric, logged once at the end of the run;
- at equal wall-clock (a comparison of a with b, per seed): t = the shorter of the two runs'
  training times (seconds in training steps, evaluation excluded); the faster run's final
  loss against the loss the slower run had reached at t (linear in time between its two
  evaluations around t). A mechanism that costs time must win at the same time to be free.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from engine.config import EMBED_FAMILIES
from engine.tasks import CHAR_LM, EMBED

from . import stats

SERIES = ("val_loss", "val_acc", "val_bpc", "train_time_s")
# (column, label, lower is better) of the per-run values the report summarises and compares
MEASURES = (("val_loss", "final val loss", True), ("best_val_loss", "best val loss", True),
            ("val_acc", "final val acc", False), ("val_bpc", "final val bpc", True))
COMPARED = (("val_loss", "final val loss", True), ("best_val_loss", "best val loss", True),
            ("val_acc", "final val acc", False), ("equal_time_val_loss", "val loss at equal wall-clock", True))
EQUAL_TIME = ("equal_time_val_loss", "val loss at equal wall-clock", True)


class ReportError(ValueError):
    """The runs cannot go into one report (runs of two tasks); the message is one line."""


def _lower(task, name: str) -> bool:
    """Whether lower is better for a task's metric; test_X and best_X go the way of val_X."""
    base = name[len("best_"):] if name.startswith("best_") else \
        "val_" + name[len("test_"):] if name.startswith("test_") else name
    return task.metric(base).direction == "min"


def _measure(task, name: str, label: str) -> tuple:
    return (name, label, _lower(task, name))


@dataclass(frozen=True)
class TaskReport:
    """What a report of one task's runs reads and shows."""
    task: str
    series: tuple        # validation metrics per evaluation (val_loss first), beside step and train_time_s
    measures: tuple      # (column, label, lower is better): the summary table, mean [95 % CI]
    compared: tuple      # (column, label, lower is better): the comparisons
    end: tuple = ()      # (column, label, lower is better): end-of-run metrics, a second table where logged
    references: tuple = ()   # (column, label): constants of the data split (baselines), shown beside `end`
    table: tuple = ()    # the measures the summary table shows (all are in the summary frame)
    curves: tuple = ()   # (metric, axis label): the validation curves figure, one row each
    digits: dict = field(default_factory=dict)   # decimals of a column where 4 hide it (MSE ~ 1e-3)

    @property
    def end_keys(self) -> tuple:
        return tuple(c for c, *_ in self.end) + tuple(c for c, _ in self.references)


REPORTS = {
    "char_lm": TaskReport("char_lm", SERIES[:-1], MEASURES, COMPARED,
                          end=(("test_loss", "test loss", True), ("test_acc", "test acc", False),
                               ("test_f1", "test F1", False)),
                          table=("val_loss", "best_val_loss", "val_acc"), curves=(("val_loss", "validation loss (nats/char)"),)),
    "embed_regression": TaskReport(
        "embed_regression", ("val_loss", "val_cos", "val_mse", "val_r1", "val_r5"),
        (_measure(EMBED, "val_loss", "final val loss"), _measure(EMBED, "best_val_loss", "best val loss"),
         _measure(EMBED, "val_cos", "final val cos"), _measure(EMBED, "val_r1", "final val r@1")),
        (_measure(EMBED, "val_loss", "final val loss"), _measure(EMBED, "val_cos", "final val cos"),
         _measure(EMBED, "test_cos", "test cos"), EQUAL_TIME),
        end=(_measure(EMBED, "test_cos", "test cos"), _measure(EMBED, "test_mse", "test mse"),
             _measure(EMBED, "test_r1", "test r@1")),
        references=(("pca_test_cos", "PCA test cos"), ("pca_test_r1", "PCA test r@1")),
        table=("val_loss", "best_val_loss", "val_cos", "val_r1"),
        curves=(("val_loss", "validation loss (MSE + 1 − cos)"), ("val_cos", "validation cosine")),
        digits={"test_mse": 6}),
}


def task_of_params(params: dict) -> str:
    """A run's task from its logged params (engine.tasks.task_of on the config it ran)."""
    return EMBED.name if params.get("model.family") in EMBED_FAMILIES else CHAR_LM.name


def report_of(records) -> TaskReport:
    """The task report of a set of runs: their one task (char_lm without runs)."""
    tasks: dict[str, set] = {}
    for r in records:
        tasks.setdefault(r.task, set()).add(r.experiment)
    if len(tasks) > 1:
        raise ReportError("runs of different tasks cannot share a report: " + "; ".join(
            f"{t} ({', '.join(sorted(e))})" for t, e in sorted(tasks.items())) + "; report each task's runs apart")
    return REPORTS[next(iter(tasks), CHAR_LM.name)]


@dataclass
class RunRecord:
    run_id: str
    experiment: str              # the group label
    seed: int | None
    status: str
    start_time: int = 0
    evals: list = field(default_factory=list)   # (step, train_time_s, *REPORTS[task].series)
    error: str = ""
    task: str = "char_lm"
    end: dict = field(default_factory=dict)     # end-of-run metrics and references that the run logged

    @property
    def series(self) -> tuple:
        return REPORTS[self.task].series

    def _col(self, i):
        return [e[i] for e in self.evals]

    @property
    def final(self) -> dict:
        if not self.evals:
            return {**{k: math.nan for k in self.series}, "step": None}
        last = self.evals[-1]
        return {**dict(zip(self.series, last[2:])), "step": last[0]}

    @property
    def best_val_loss(self) -> float:
        vals = [v for v in self._col(2) if math.isfinite(v)]
        return min(vals) if vals else math.nan

    @property
    def train_time_s(self) -> float:
        return self.evals[-1][1] if self.evals else math.nan

    def loss_at_time(self, t: float) -> float:
        """The validation loss this run had reached after t seconds of training: its final loss
        if it trained no longer than t, else linear in time between the evaluations around t
        (nan before its first evaluation, or without training times)."""
        times, losses = self._col(1), self._col(2)
        if not times or not all(math.isfinite(x) for x in times) or not math.isfinite(t):
            return math.nan
        if t >= times[-1]:
            return losses[-1]
        if t < times[0]:
            return math.nan
        return float(np.interp(t, times, losses))

    def values(self) -> dict:
        """The run's per-run values: final series (val_loss, best_val_loss, the others), the
        training time, the final step, then the end metrics it logged."""
        f = self.final
        first, *rest = self.series
        return {first: f[first], "best_val_loss": self.best_val_loss, **{k: f[k] for k in rest},
                "train_time_s": self.train_time_s, "final_step": f["step"], **self.end}

    def value(self, col: str) -> float:
        v = self.values().get(col, math.nan)
        return math.nan if v is None else v


def fetch_records(cl, runs, label=lambda run: run.data.params.get("experiment", "?")) -> list[RunRecord]:
    """One RunRecord per MLflow run: its task's validation series by step (the last value of a
    step), and the end-of-run metrics it logged (their last value)."""
    out = []
    for run in runs:
        task = task_of_params(run.data.params)
        rep = REPORTS[task]
        series = {}
        for key in (*rep.series, "train_time_s"):
            hist = sorted(cl.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
            series[key] = {m.step: m.value for m in hist}
        steps = sorted(series["val_loss"])
        evals = [(s, series["train_time_s"].get(s, math.nan), series["val_loss"][s],
                  *(series[k].get(s, math.nan) for k in rep.series[1:])) for s in steps]
        end = {k: run.data.metrics[k] for k in rep.end_keys if k in run.data.metrics}
        seed = run.data.params.get("seed", run.data.tags.get("seed"))
        try:
            seed = int(seed)
        except (TypeError, ValueError):
            seed = None
        out.append(RunRecord(run.info.run_id, label(run), seed, run.info.status, run.info.start_time or 0,
                             evals, run.data.tags.get("error", ""), task, end))
    return out


def by_experiment(records) -> dict[str, dict[int, RunRecord]]:
    """{experiment: {seed: record}} over FINISHED runs with a validation loss; of several runs of
    one experiment and seed, the latest. (Runs without a seed get negative keys.)"""
    groups: dict[str, dict[int, RunRecord]] = {}
    for i, r in enumerate(sorted(records, key=lambda r: r.start_time)):
        if r.status != "FINISHED" or not r.evals:
            continue
        groups.setdefault(r.experiment, {})[r.seed if r.seed is not None else -1 - i] = r
    return groups


def duplicates(records) -> int:
    """How many finished runs a later run of the same experiment and seed replaced in the report."""
    seen, dup = set(), 0
    for r in records:
        if r.status == "FINISHED" and r.evals and r.seed is not None:
            dup += (r.experiment, r.seed) in seen
            seen.add((r.experiment, r.seed))
    return dup


# -- tables ------------------------------------------------------------------------------------------
def summary_frame(records, order=(), baseline: str | None = None):
    """Per experiment: seeds, and for each of the task's measures the mean, std and 95 % interval;
    the mean training time and its ratio to the baseline's; then the same for each end-of-run
    metric and reference that the runs logged. `frame.attrs["task"]`: the runs' task."""
    import pandas as pd
    rep = report_of(records)
    groups = by_experiment(records)
    names = [n for n in order if n in groups] + sorted(n for n in groups if n not in order)
    logged = [c for c in rep.end_keys if any(c in r.end for g in groups.values() for r in g.values())]
    base_time = None
    if baseline in groups:
        base_time = stats.summarize(r.train_time_s for r in groups[baseline].values()).mean
    rows = []
    for name in names:
        recs = list(groups[name].values())
        row = {"experiment": name, "seeds": len(recs)}
        for col in [c for c, _, _ in rep.measures] + ["train_time_s"] + logged:
            if col == "train_time_s":
                t = stats.summarize(r.train_time_s for r in recs)
                row["train_time_s_mean"] = t.mean
                row["time_vs_baseline"] = t.mean / base_time if base_time else math.nan
                continue
            s = stats.summarize(r.value(col) for r in recs)
            row.update({f"{col}_mean": s.mean, f"{col}_std": s.std, f"{col}_lo": s.lo, f"{col}_hi": s.hi})
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["task"] = rep.task
    return frame


def compare_pair(a: dict, b: dict, col: str, lower_is_better: bool) -> stats.Comparison:
    """a and b: {seed: record}. Paired on their common seeds when there are two or more, else Welch."""
    common = sorted(set(a) & set(b))
    if col == "equal_time_val_loss":
        if len(common) < 2:
            return stats.paired([], [], lower_is_better)
        va, vb = [], []
        for s in common:
            t = min(a[s].train_time_s, b[s].train_time_s)
            va.append(a[s].loss_at_time(t))
            vb.append(b[s].loss_at_time(t))
        return stats.paired(va, vb, lower_is_better)
    if len(common) >= 2:
        return stats.paired([a[s].value(col) for s in common], [b[s].value(col) for s in common], lower_is_better)
    return stats.welch([r.value(col) for r in a.values()], [r.value(col) for r in b.values()], lower_is_better)


def comparison_frame(records, comparisons):
    """One row per (comparison, measure of the runs' task): a − b with interval, test, p (and
    Holm's over the comparisons of that measure), the verdict of a against b and the seeds
    needed. `comparisons`: (label, a, b) with a and b experiment names."""
    import pandas as pd
    rep = report_of(records)
    groups = by_experiment(records)
    rows = []
    for col, label, lower in rep.compared:
        block = []
        for name, a, b in comparisons:
            if a not in groups or b not in groups:
                continue
            c = compare_pair(groups[a], groups[b], col, lower)
            block.append({"comparison": name, "experiment": a, "reference": b, "measure": label,
                          "metric": col, "test": c.test, "n": c.n, "diff": c.diff, "ci_lo": c.lo, "ci_hi": c.hi,
                          "p": c.p, "p_permutation": c.p_permutation, "sd": c.sd,
                          "verdict": c.verdict, "verdict_text": c.verdict_text(),
                          "seeds_needed": c.seeds_needed_text(), "identical": c.identical})
        for row, ph in zip(block, stats.holm([r["p"] for r in block])):
            row["p_holm"] = ph
        rows.extend(block)
    frame = pd.DataFrame(rows)
    frame.attrs["task"] = rep.task
    return frame


# -- text ----------------------------------------------------------------------------------------------
def _num(x, fmt="{:.4f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _interval(mean, lo, hi, digits=4) -> str:
    if not math.isfinite(mean):
        return "-"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _signed(mean, lo, hi) -> str:
    if not math.isfinite(mean):
        return "-"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:+.4f}"
    return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _p(p) -> str:
    if not math.isfinite(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _report(frame) -> TaskReport:
    return REPORTS[frame.attrs.get("task", CHAR_LM.name)]


def _ci(r, col, digits) -> str:
    return _interval(r[f"{col}_mean"], r[f"{col}_lo"], r[f"{col}_hi"], digits.get(col, 4))


def summary_rows(summary) -> tuple[list[str], list[list[str]]]:
    """The summary table: the task's table columns (mean [95 % CI]; the std of the first), the time."""
    rep = _report(summary)
    cols = [(c, lab) for c, lab, _ in rep.measures if c in rep.table]
    head = ["experiment", "seeds", f"{cols[0][1]} [95 % CI]", "± std",
            *(f"{lab} [95 % CI]" for _, lab in cols[1:]), "train time (s)", "× baseline"]
    rows = []
    for _, r in summary.iterrows():
        first = cols[0][0]
        rows.append([r["experiment"], str(r["seeds"]), _ci(r, first, rep.digits), _num(r[f"{first}_std"]),
                     *(_ci(r, c, rep.digits) for c, _ in cols[1:]),
                     _num(r["train_time_s_mean"], "{:.1f}"), _num(r["time_vs_baseline"], "{:.2f}")])
    return head, rows


def end_rows(summary) -> tuple[list[str], list[list[str]]] | None:
    """The end-of-run table (test split: mean [95 % CI]; references: their mean), or None when
    the runs logged none of them."""
    rep = _report(summary)
    end = [(c, lab) for c, lab, _ in rep.end if f"{c}_mean" in summary]
    refs = [(c, lab) for c, lab in rep.references if f"{c}_mean" in summary]
    if not end and not refs:
        return None
    head = ["experiment", "seeds", *(f"{lab} [95 % CI]" for _, lab in end), *(lab for _, lab in refs)]
    rows = [[r["experiment"], str(r["seeds"]), *(_ci(r, c, rep.digits) for c, _ in end),
             *(_num(r[f"{c}_mean"], f"{{:.{rep.digits.get(c, 4)}f}}") for c, _ in refs)]
            for _, r in summary.iterrows()]
    return head, rows


def comparison_rows(comps, measures=None) -> tuple[list[str], list[list[str]]]:
    head = ["comparison", "measure", "n", "difference [95 % CI]", "p (t)", "p (Holm)", "p (sign-flip)",
            "verdict", "seeds needed"]
    rows = []
    for _, r in comps.iterrows():
        if measures and r["metric"] not in measures:
            continue
        rows.append([r["comparison"], r["measure"], str(r["n"]), _signed(r["diff"], r["ci_lo"], r["ci_hi"]),
                     _p(r["p"]), _p(r["p_holm"]), _p(r["p_permutation"]), r["verdict_text"], r["seeds_needed"]])
    return head, rows


def text_table(head, rows) -> str:
    width = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, width)).rstrip() for line in [head, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in width), *lines[1:]])


def markdown_table(head, rows) -> str:
    esc = lambda x: str(x).replace("|", "\\|")
    out = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(out)


METHOD = ("Intervals: Student t, 95 %. Comparisons: a − b paired by seed (paired t-test; exact sign-flip "
          "permutation p beside it, whose floor is 2/2^n), Welch's t-test when the runs share no seeds; "
          "verdict \"better\"/\"worse\" when the 95 % interval excludes 0; Holm-adjusted p over the "
          "comparisons of each measure; seeds needed: smallest n for 80 % power at α = 0.05 if the "
          "observed difference and spread were the truth. Equal wall-clock: both runs at the shorter "
          "training time (evaluation excluded).")
END_METHOD = " Test split: evaluated once, at the end of each run (the best checkpoint where early stopping is on)."
REFERENCE_METHOD = (" PCA: the closed-form baseline on the same split, reconstructed through the bottleneck's "
                    "n² dimensions (fitted on the training sentences); a constant of the split, its mean over "
                    "the runs, not compared.")
COMPARISON_NOTE = {"char_lm": "comparisons (a − b; negative loss difference = a better)",
                   "embed_regression": "comparisons (a − b; negative loss, positive cosine difference = a better)"}


def render(summary, comps, title: str, markdown: bool = False) -> str:
    table = markdown_table if markdown else text_table
    rep = _report(summary)
    parts = [f"## {title}" if markdown else title, ""]
    parts += [table(*summary_rows(summary)), ""]
    method = METHOD
    end = end_rows(summary)
    if end is not None:
        parts += [("### " if markdown else "") + "test split (end of run)"
                  + ("; PCA: the closed-form reference" if rep.references else ""), "", table(*end), ""]
        method += END_METHOD + (REFERENCE_METHOD if rep.references else "")
    if len(comps):
        parts += [("### " if markdown else "") + COMPARISON_NOTE[rep.task], ""]
        parts += [table(*comparison_rows(comps)), ""]
    if markdown:
        parts.append(method)
    else:
        import textwrap
        parts.append(textwrap.fill(method, 110))
    return "\n".join(parts) + "\n"


# -- figures -----------------------------------------------------------------------------------------
def figures(records, comps, folder: str, order=()) -> list[str]:
    """validation_curves.png (the task's curves, a row each: mean over seeds, band = min-max,
    against step and against training time) and differences.png (each comparison's difference
    with its 95 % interval)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rep = report_of(records)
    groups = by_experiment(records)
    names = [n for n in order if n in groups] + sorted(n for n in groups if n not in order)
    paths = []
    if names:
        fig, axes = plt.subplots(len(rep.curves), 2, figsize=(12, 4.5 * len(rep.curves)), squeeze=False)
        for row, (metric, ylabel) in zip(axes, rep.curves):
            col = 2 + rep.series.index(metric)   # its place in an evaluation tuple
            for name in names:
                recs = list(groups[name].values())
                steps = sorted(set.intersection(*[{e[0] for e in r.evals} for r in recs]))
                if not steps:
                    continue
                vals = np.array([[dict((e[0], e[col]) for e in r.evals)[s] for s in steps] for r in recs])
                tt = np.array([[dict((e[0], e[1]) for e in r.evals)[s] for s in steps] for r in recs])
                mean = vals.mean(axis=0)
                (line,) = row[0].plot(steps, mean, label=f"{name} ({len(recs)} seeds)")
                row[0].fill_between(steps, vals.min(axis=0), vals.max(axis=0), color=line.get_color(), alpha=0.2)
                if np.isfinite(tt).all():
                    row[1].plot(tt.mean(axis=0), mean, color=line.get_color())
                    row[1].fill_between(tt.mean(axis=0), vals.min(axis=0), vals.max(axis=0),
                                        color=line.get_color(), alpha=0.2)
            row[0].set(xlabel="step", ylabel=ylabel, title="mean over seeds, band = min–max")
            row[1].set(xlabel="training time (s, mean over seeds)", ylabel=ylabel, title="against wall-clock")
            for ax in row:
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(_save(fig, folder, "validation_curves.png"))
        plt.close(fig)
    metrics = [m for m, _, _ in rep.compared if len(comps) and m in set(comps["metric"])]
    if metrics:
        cols = 2 if len(metrics) > 1 else 1
        nrows = (len(metrics) + cols - 1) // cols
        height = 0.45 * comps["comparison"].nunique() + 1.3
        fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, height * nrows), squeeze=False)
        for k, metric in enumerate(metrics):
            ax = axes[k // cols][k % cols]
            sub = comps[comps["metric"] == metric].reset_index(drop=True)
            y = np.arange(len(sub))[::-1]
            colors = ["tab:green" if v == "better" else "tab:red" if v == "worse" else "tab:gray" for v in sub["verdict"]]
            lo = (sub["diff"] - sub["ci_lo"]).fillna(0).clip(lower=0)
            hi = (sub["ci_hi"] - sub["diff"]).fillna(0).clip(lower=0)
            for yi, d, l, h, c in zip(y, sub["diff"], lo, hi, colors):
                ax.errorbar([d], [yi], xerr=[[l], [h]], fmt="none", ecolor=c, capsize=3)
            ax.scatter(sub["diff"], y, c=colors, zorder=3)
            if not sub["diff"].notna().any():
                ax.text(0.5, 0.5, "no pairs with a value", transform=ax.transAxes, ha="center", va="center")
            ax.axvline(0, color="black", lw=0.8)
            ax.set_yticks(y, sub["comparison"] if k % cols == 0 else [""] * len(sub), fontsize=8)
            ax.set_ylim(-0.6, len(sub) - 0.4)
            ax.set_title(dict((m, lab) for m, lab, _ in rep.compared)[metric], fontsize=9)
            ax.grid(alpha=0.3, axis="x")
        for k in range(len(metrics), nrows * cols):
            axes[k // cols][k % cols].axis("off")
        fig.suptitle("a − b with 95 % interval (green: a better, red: a worse, grey: no difference detectable)",
                     fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, folder, "differences.png"))
        plt.close(fig)
    return paths


def _save(fig, folder, name) -> str:
    path = os.path.join(folder, name)
    fig.savefig(path, dpi=110)
    return path


def records_frame(records):
    import pandas as pd
    rows = []
    for r in records:
        v = r.values()
        rows.append({"run_id": r.run_id, "experiment": r.experiment, "seed": r.seed, "status": r.status,
                     **v, "evaluations": json.dumps([list(e) for e in r.evals]), "error": r.error})
    return pd.DataFrame(rows)
