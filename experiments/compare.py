"""Compare tracked runs: one row per run, then each experiment's mean and spread.

    python -m experiments.compare [--experiment-name hybrid-lm] [--runs ID ...] [--csv FILE]

Per run: the experiment name, seed, status, the params that differ between
the runs shown, and the final value of each headline metric. Then, grouped
by experiment: final validation loss mean, spread (std over seeds) and
count, and for ablations the difference of the mean from `hybrid`.
"""
from __future__ import annotations

import argparse
import os
import sys

from .run import DEFAULT_EXPERIMENT
from .tracking import TrackingError, check_store, client, resolve_tracking_uri

FINAL_METRICS = ("val_loss", "val_acc", "val_bpc", "train_loss", "proto_perplexity", "proto_dead", "hebb_norm")
HIDDEN_PARAMS = {"overrides"}


def runs_frame(cl, experiment_name: str | None, run_ids: list[str] | None):
    import pandas as pd
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
    rows = []
    for r in runs:
        row = {"run_id": r.info.run_id, "experiment": r.data.params.get("experiment", "?"),
               "seed": r.data.params.get("seed", "?"), "status": r.info.status,
               "reproduces": r.data.tags.get("reproduces", "")}
        row.update({f"param:{k}": v for k, v in r.data.params.items() if k not in HIDDEN_PARAMS})
        row.update({m: r.data.metrics.get(m) for m in FINAL_METRICS})
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    pcols = [c for c in df.columns if c.startswith("param:")]
    varying = [c for c in pcols if df[c].astype(str).nunique() > 1 and c not in ("param:experiment", "param:seed")]
    df = df[["run_id", "experiment", "seed", "status", "reproduces", *varying, *FINAL_METRICS]]
    df = df.rename(columns={c: c[len("param:"):] for c in varying})
    order = pd.to_numeric(df["seed"], errors="coerce")
    return df.assign(_o=order).sort_values(["experiment", "_o"]).drop(columns="_o").reset_index(drop=True)


def ablation_table(df):
    """Mean, std and count of the final val_loss per experiment; difference from hybrid."""
    import pandas as pd
    done = df[(df["status"] == "FINISHED") & (df["reproduces"] == "")]  # a reproduction is not a new seed
    if done.empty:
        return pd.DataFrame()
    g = done.groupby("experiment")["val_loss"].agg(["mean", "std", "count"]).reset_index()
    g = g.rename(columns={"mean": "val_loss_mean", "std": "val_loss_std", "count": "runs"})
    base = g.loc[g["experiment"] == "hybrid", "val_loss_mean"]
    g["vs_hybrid"] = g["val_loss_mean"] - float(base.iloc[0]) if len(base) else float("nan")
    return g.sort_values("val_loss_mean").reset_index(drop=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment-name", default=DEFAULT_EXPERIMENT)
    ap.add_argument("--runs", nargs="+", metavar="RUN_ID")
    ap.add_argument("--csv", metavar="FILE", help="also write the per-run table as CSV")
    ap.add_argument("--tracking-uri")
    args = ap.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    if args.csv:
        folder = os.path.dirname(os.path.abspath(args.csv))
        if not os.path.isdir(folder) or os.path.isdir(args.csv):
            print(f"error: --csv {args.csv}: " + (f"folder {folder} does not exist" if not os.path.isdir(folder)
                                                   else "is a folder"), file=sys.stderr)
            return 2
    try:
        check_store(uri, create=False)
        df = runs_frame(client(uri), args.experiment_name, args.runs)
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
        abl = ablation_table(df)
        if not abl.empty:
            print()
            print(abl.to_string(index=False))
    if args.csv:
        try:
            write_csv_atomically(df, args.csv)
        except OSError as exc:
            print(f"error: --csv {args.csv}: {exc.strerror or exc}", file=sys.stderr)
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
