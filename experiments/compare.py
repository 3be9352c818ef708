"""Compare tracked runs: one row per run, then per experiment intervals, and verdicts.

    python -m experiments.compare [--experiment-name hybrid-lm] [--runs ID ...] [--baseline hybrid] [--csv FILE]

Per run: the experiment name, seed, status, the params that differ between
the runs shown, and the final value of each headline metric of its task (the
character task: loss, accuracy, bpc, with the transformer family's attention
entropy per block, attn_entropy/h0, h1, ...; the embedding task: loss, cosine,
MSE, retrieval@1, the test split's and the PCA baseline's cosine). Then the
finished runs (reproductions and study parents left out) grouped by experiment
(and by config, where runs of one experiment name differ in more than the seed):
mean, std and 95 % interval of the task's measures; and each group against the
baseline, paired by seed, with the difference's 95 % interval, the test, a
verdict ("better", "worse", "no difference detectable with N seeds") and the
seeds that would be needed (`experiments.stats`, `experiments.analysis`: the
same report as `experiments.study`). Runs of two tasks get a report each (the
baseline: the named one in its task, else each task's first group).
`--report-csv FILE` writes the comparisons as CSV.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from . import analysis
from .run import DEFAULT_EXPERIMENT
from .tracking import TrackingError, check_store, client, resolve_tracking_uri

FINAL_METRICS = ("val_loss", "val_acc", "val_bpc", "train_loss", "proto_perplexity", "proto_dead", "hebb_norm")
# the embedding task's (engine/tasks/embed_regression.py; pca_*: the closed-form baseline on the run's split)
EMBED_FINAL_METRICS = ("val_loss", "val_cos", "val_mse", "val_r1", "test_cos", "test_mse", "test_r1",
                       "pca_test_cos", "train_loss")
# per-layer headline metrics, a column each where a run has them (the transformer family's blocks)
LAYER_METRIC = re.compile(r"^attn_entropy/h(\d+)$")
HIDDEN_PARAMS = {"overrides"}
# params that do not change a run's numbers: runs differing only in them belong to one group
NOT_GROUPING = {"seed", "experiment", "overrides", "train.profile", "train.log_every", "train.checkpoint_every"}


def fetch_runs(cl, experiment_name: str | None, run_ids: list[str] | None) -> list:
    if run_ids:
        runs = []
        for rid in run_ids:
            try:
                runs.append(cl.get_run(rid))
            except Exception:
                raise TrackingError(f"unknown run id {rid!r}") from None
    else:
        exp = cl.get_experiment_by_name(experiment_name)
        if exp is None:
            raise TrackingError(f"no MLflow experiment named {experiment_name!r}")
        runs = cl.search_runs([exp.experiment_id], max_results=5000)
    return [r for r in runs if r.data.tags.get("study_role") != "parent"]


def runs_frame(cl, experiment_name: str | None, run_ids: list[str] | None, runs=None):
    import pandas as pd
    if runs is None:
        runs = fetch_runs(cl, experiment_name, run_ids)
    layer_cols = layer_metrics(runs)
    final = final_metrics(runs)
    rows = []
    for r in runs:
        row = {"run_id": r.info.run_id, "experiment": r.data.params.get("experiment", "?"),
               "seed": r.data.params.get("seed", "?"), "status": r.info.status,
               "reproduces": r.data.tags.get("reproduces", "")}
        row.update({f"param:{k}": v for k, v in r.data.params.items() if k not in HIDDEN_PARAMS})
        row.update({m: r.data.metrics.get(m) for m in (*final, *layer_cols)})
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    pcols = [c for c in df.columns if c.startswith("param:")]
    varying = [c for c in pcols if df[c].astype(str).nunique() > 1 and c not in ("param:experiment", "param:seed")]
    df = df[["run_id", "experiment", "seed", "status", "reproduces", *varying, *final, *layer_cols]]
    df = df.rename(columns={c: c[len("param:"):] for c in varying})
    order = pd.to_numeric(df["seed"], errors="coerce")
    return df.assign(_o=order).sort_values(["experiment", "_o"]).drop(columns="_o").reset_index(drop=True)


def final_metrics(runs) -> list[str]:
    """The headline columns of the runs' tasks: the character task's, then the embedding task's
    that it lacks (runs without a param model.family: the character task)."""
    tasks = {analysis.task_of_params(r.data.params) for r in runs} or {"char_lm"}
    cols = list(FINAL_METRICS) if "char_lm" in tasks else []
    if "embed_regression" in tasks:
        cols += [m for m in EMBED_FINAL_METRICS if m not in cols]
    return cols


def layer_metrics(runs) -> list[str]:
    """The per-layer headline metrics any of the runs logged (attn_entropy/h0, h1, ...), by layer."""
    keys = {k for r in runs for k in r.data.metrics if LAYER_METRIC.match(k)}
    return sorted(keys, key=lambda k: int(LAYER_METRIC.match(k).group(1)))


def group_labels(runs) -> dict[str, str]:
    """{run id: group}: the experiment name, and where runs of one name differ in a param that
    changes the numbers (not the seed), the differing params: `hybrid (train.steps=500)`."""
    sig = {r.info.run_id: {k: v for k, v in r.data.params.items() if k not in NOT_GROUPING} for r in runs}
    by_name: dict[str, list] = {}
    for r in runs:
        by_name.setdefault(r.data.params.get("experiment", "?"), []).append(r.info.run_id)
    labels = {}
    for name, ids in by_name.items():
        keys = sorted({k for i in ids for k in sig[i]})
        varying = [k for k in keys if len({sig[i].get(k) for i in ids}) > 1]
        for i in ids:
            labels[i] = name if not varying else f"{name} ({', '.join(f'{k}={sig[i].get(k)}' for k in varying)})"
    return labels


def statistics(cl, runs, baseline: str | None):
    """(records, summary, comparisons, baseline) over the finished runs that are not
    reproductions (a reproduction is not a new seed); the runs are of one task
    (analysis.ReportError otherwise: see by_task)."""
    done = [r for r in runs if r.info.status == "FINISHED" and not r.data.tags.get("reproduces")]
    labels = group_labels(done)
    records = analysis.fetch_records(cl, done, label=lambda r: labels[r.info.run_id])
    groups = sorted(analysis.by_experiment(records))
    if baseline is None:
        baseline = "hybrid" if "hybrid" in groups else (groups[0] if groups else None)
    elif baseline not in groups:
        raise TrackingError(f"--baseline {baseline!r} is not among the finished runs' groups: "
                            + ", ".join(repr(g) for g in groups))
    order = [baseline] + [g for g in groups if g != baseline] if baseline else groups
    summary = analysis.summary_frame(records, order, baseline)
    comps = analysis.comparison_frame(records, [(f"{g} vs {baseline}", g, baseline) for g in order[1:]])
    return records, summary, comps, baseline


def by_task(runs, baseline: str | None) -> list[tuple[str, list, str | None]]:
    """(task, its runs, its baseline) per task of the runs (one report each): the named baseline
    for the task whose runs have that experiment, the default for the others."""
    tasks: dict[str, list] = {}
    for r in runs:
        tasks.setdefault(analysis.task_of_params(r.data.params), []).append(r)
    if len(tasks) < 2:
        return [(next(iter(tasks), "char_lm"), runs, baseline)]
    labels = group_labels([r for r in runs if r.info.status == "FINISHED" and not r.data.tags.get("reproduces")])
    owner = {labels[r.info.run_id]: t for t, rs in tasks.items() for r in rs if r.info.run_id in labels}
    if baseline is not None and baseline not in owner:
        raise TrackingError(f"--baseline {baseline!r} is not among the finished runs' groups: "
                            + ", ".join(repr(g) for g in sorted(owner)))
    return [(t, rs, baseline if owner.get(baseline) == t else None) for t, rs in sorted(tasks.items())]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment-name", default=DEFAULT_EXPERIMENT)
    ap.add_argument("--runs", nargs="+", metavar="RUN_ID")
    ap.add_argument("--baseline", help="the group the others are compared with (default: hybrid, if present)")
    ap.add_argument("--csv", metavar="FILE", help="also write the per-run table as CSV")
    ap.add_argument("--report-csv", metavar="FILE", help="also write the comparisons (intervals, tests, verdicts) as CSV")
    ap.add_argument("--tracking-uri")
    args = ap.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    for flag, path in (("--csv", args.csv), ("--report-csv", args.report_csv)):
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder) or os.path.isdir(path):
            print(f"error: {flag} {path}: " + (f"folder {folder} does not exist" if not os.path.isdir(folder)
                                               else "is a folder"), file=sys.stderr)
            return 2
    try:
        check_store(uri, create=False)
        cl = client(uri)
        runs = fetch_runs(cl, args.experiment_name, args.runs)
        df = runs_frame(cl, args.experiment_name, args.runs, runs)
        parts = by_task(runs, args.baseline) if not df.empty else []
        reports = [(task, statistics(cl, rs, base)) for task, rs, base in parts]
    except (TrackingError, analysis.ReportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if df.empty:
        print("error: no runs to compare", file=sys.stderr)
        return 2
    import pandas as pd
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200,
                           "display.float_format", "{:.4f}".format):
        print(df.to_string(index=False))
    for task, (records, summary, comps, baseline) in reports:
        if not len(summary):
            continue
        n = sum(len(v) for v in analysis.by_experiment(records).values())
        dup = analysis.duplicates(records)
        title = (f"{n} finished runs in {len(summary)} groups, baseline {baseline}"
                 + (f", task {task}" if len(reports) > 1 or task != "char_lm" else "")
                 + (f" ({dup} older runs of the same group and seed left out)" if dup else ""))
        print()
        print(analysis.render(summary, comps, title), end="")
    comps = reports[0][1][2] if len(reports) == 1 else \
        pd.concat([c for _, (_, _, c, _) in reports if len(c)] or [pd.DataFrame()], ignore_index=True)
    for flag, path, frame in (("--csv", args.csv, df), ("--report-csv", args.report_csv, comps)):
        if not path:
            continue
        try:
            write_csv_atomically(frame, path)
        except OSError as exc:
            print(f"error: {flag} {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0


def write_csv_atomically(df, path: str) -> None:
    """A temp file beside `path`, renamed over it: a reader never sees half a table."""
    import tempfile
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".compare-", suffix=".csv")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            df.to_csv(f, index=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


if __name__ == "__main__":
    sys.exit(main())
