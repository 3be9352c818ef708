"""Compare tracked runs: one row per run, then per experiment intervals, and verdicts.

    python -m experiments.compare [--experiment-name hybrid-lm] [--runs ID ...] [--baseline hybrid] [--csv FILE]

Per run: the experiment name, seed, status, the params that differ between
the runs shown, and the final value of each headline metric (with the transformer
family's attention entropy per block, attn_entropy/h0, h1, ...). Then the finished
runs (reproductions and study parents left out) grouped by experiment (and by
config, where runs of one experiment name differ in more than the seed):
mean, std and 95 % interval of the final and best validation loss and of the
accuracy; and each group against the baseline, paired by seed, with the
difference's 95 % interval, the test, a verdict ("better", "worse", "no
difference detectable with N seeds") and the seeds that would be needed
(`experiments.stats`, `experiments.analysis`: the same report as
`experiments.study`). `--report-csv FILE` writes the comparisons as CSV.
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
    rows = []
    for r in runs:
        row = {"run_id": r.info.run_id, "experiment": r.data.params.get("experiment", "?"),
               "seed": r.data.params.get("seed", "?"), "status": r.info.status,
               "reproduces": r.data.tags.get("reproduces", "")}
        row.update({f"param:{k}": v for k, v in r.data.params.items() if k not in HIDDEN_PARAMS})
        row.update({m: r.data.metrics.get(m) for m in (*FINAL_METRICS, *layer_cols)})
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    pcols = [c for c in df.columns if c.startswith("param:")]
    varying = [c for c in pcols if df[c].astype(str).nunique() > 1 and c not in ("param:experiment", "param:seed")]
    df = df[["run_id", "experiment", "seed", "status", "reproduces", *varying, *FINAL_METRICS, *layer_cols]]
    df = df.rename(columns={c: c[len("param:"):] for c in varying})
    order = pd.to_numeric(df["seed"], errors="coerce")
    return df.assign(_o=order).sort_values(["experiment", "_o"]).drop(columns="_o").reset_index(drop=True)


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
    reproductions (a reproduction is not a new seed)."""
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
        stats_ = statistics(cl, runs, args.baseline) if not df.empty else None
    except TrackingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if df.empty:
        print("error: no runs to compare", file=sys.stderr)
        return 2
    import pandas as pd
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200,
                           "display.float_format", "{:.4f}".format):
        print(df.to_string(index=False))
    records, summary, comps, baseline = stats_
    if len(summary):
        n = sum(len(v) for v in analysis.by_experiment(records).values())
        dup = analysis.duplicates(records)
        title = (f"{n} finished runs in {len(summary)} groups, baseline {baseline}"
                 + (f" ({dup} older runs of the same group and seed left out)" if dup else ""))
        print()
        print(analysis.render(summary, comps, title), end="")
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
