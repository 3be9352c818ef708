"""Attach a study's results to its parent MLflow run.

    python -m sweeps.report lr_balance [--storage URL] [--tracking-uri URI]

Artifacts on the parent run: trials.csv (Optuna's trials table, one row per
trial with its state, value, parameters and MLflow run id), best_params.json,
and figures under figures/: optimisation history, parameter importances,
the contour of each pair of searched parameters, parallel coordinates.
Runs at the end of every sweep; run it any time to refresh.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile

import optuna


def report(study, cl, parent_id: str) -> list[str]:
    """Write the artifacts; returns their relative paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import warnings
    from optuna.visualization import matplotlib as ovm
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        df = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs",
                                           "datetime_start", "datetime_complete", "duration"))
        df.to_csv(os.path.join(tmp, "trials.csv"), index=False)
        cl.log_artifact(parent_id, os.path.join(tmp, "trials.csv"))
        written.append("trials.csv")
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if complete:
            best = study.best_trial
            with open(os.path.join(tmp, "best_params.json"), "w") as f:
                json.dump({"trial": best.number, "value": best.value, "params": best.params,
                           "mlflow_run_id": best.user_attrs.get("mlflow_run_id")}, f, indent=1)
            cl.log_artifact(parent_id, os.path.join(tmp, "best_params.json"))
            written.append("best_params.json")
            cl.log_metric(parent_id, "best_value", best.value)
        names = sorted({k for t in complete for k in t.params})
        figures = [("optimization_history", lambda: ovm.plot_optimization_history(study)),
                   ("param_importances", lambda: ovm.plot_param_importances(study)),
                   ("parallel_coordinate", lambda: ovm.plot_parallel_coordinate(study))]
        figures += [(f"contour_{a}__{b}", lambda a=a, b=b: ovm.plot_contour(study, params=[a, b]))
                    for a, b in itertools.combinations(names, 2)]
        os.makedirs(os.path.join(tmp, "figures"))
        for name, make in figures:
            if len(complete) < 2:
                break  # nothing to draw yet
            try:
                ax = make()
            except (ValueError, RuntimeError) as exc:  # e.g. importances of a constant value
                print(f"note: figure {name} skipped ({exc})", file=sys.stderr)
                continue
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            path = os.path.join(tmp, "figures", f"{name}.png")
            fig.savefig(path, dpi=80, bbox_inches="tight")
            plt.close(fig)
            cl.log_artifact(parent_id, path, "figures")
            written.append(f"figures/{name}.png")
    return written


def default_storage_url() -> str:
    """The storage a sweep in this folder made: optuna.db (one worker) or the journal (--workers)."""
    from .study import default_storage
    one, many = default_storage(1), default_storage(2)
    if not os.path.exists(one[len("sqlite:///"):]) and os.path.exists(many[len("journal:"):]):
        return many
    return one


def main(argv=None) -> int:
    from experiments.tracking import TrackingError, check_store, client, resolve_tracking_uri
    from .study import SweepError, check_storage_url, make_storage, redact, storage_exists
    ap = argparse.ArgumentParser(prog="python -m sweeps.report", description=__doc__.splitlines()[0])
    ap.add_argument("study")
    ap.add_argument("--storage", help="default: sqlite:///optuna.db, else journal:optuna-journal.log if that exists")
    ap.add_argument("--tracking-uri")
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    uri = resolve_tracking_uri(args.tracking_uri)
    url = args.storage or default_storage_url()
    try:
        # a report only reads: neither store may be created by it
        check_storage_url(url)
        if not storage_exists(url):
            raise SweepError(f"no Optuna storage at {url} (give the sweep's --storage)")
        check_store(uri, create=False)
        storage = make_storage(url, uri)
        try:
            study = optuna.load_study(study_name=args.study, storage=storage)
        except KeyError:
            names = sorted(optuna.get_all_study_names(storage))
            there = f"studies there: {', '.join(names)}" if names else "it holds no study"
            raise SweepError(f"no study named {args.study!r} in {redact(url)} ({there})") from None
        parent = study.user_attrs.get("mlflow_parent_run_id")
        if not parent:
            raise SweepError(f"study {args.study!r} has no MLflow parent run")
        cl = client(uri)
        try:
            cl.get_run(parent)
        except Exception:
            raise SweepError(f"the parent run {parent} of study {args.study!r} is not in the tracking store "
                             f"{redact(uri)} (give the sweep's --tracking-uri)") from None
        written = report(study, cl, parent)
    except (SweepError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
