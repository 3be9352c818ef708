"""Re-run a logged run from its logged config alone and compare every metric.

    python -m experiments.reproduce RUN_ID [--tracking-uri URI]

The config comes from the run's config.json artifact (not from today's
presets). The new run is tagged reproduces=RUN_ID. Every logged metric
series, except timings (tokens/s, kernel times), is compared step by step.
On the same OpenCL device (name, platform and driver) and launch tuning
(tag opencl.tuning, engine/tune.py: a reduction work-group changes the
order of sums) the series must be bit-identical; otherwise each value must
be within rtol = 1e-3 (--rtol) of the original, since kernels may sum in
another order there. Exit 0 only if everything matches.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from engine import tune
from engine.device import kernel_source_hash

from . import run as runner
from .tracking import TIMING_PREFIXES, check_store, client, git_state, resolve_tracking_uri

OTHER_DEVICE_RTOL = 1e-3


def logged_tuning(tags: dict) -> dict:
    """The run's launch tuning (tag opencl.tuning); {} (the defaults) for runs logged before it."""
    try:
        value = json.loads(tags.get("opencl.tuning") or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def metric_series(cl, run_id: str, key: str) -> list[tuple[int, float]]:
    hist = cl.get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(hist, key=lambda m: (m.step, m.timestamp))]


def compare_runs(cl, a: str, b: str, rtol: float) -> list[dict]:
    """One row per metric key of either run: steps compared, max |diff|, first bad step."""
    ka = {k for k in cl.get_run(a).data.metrics if not k.startswith(TIMING_PREFIXES)}
    kb = {k for k in cl.get_run(b).data.metrics if not k.startswith(TIMING_PREFIXES)}
    rows = []
    for key in sorted(ka | kb):
        sa = metric_series(cl, a, key) if key in ka else []
        sb = metric_series(cl, b, key) if key in kb else []
        row = {"metric": key, "steps": len(sa), "max_abs_diff": 0.0, "first_diff_step": None, "match": True}
        if [s for s, _ in sa] != [s for s, _ in sb]:
            row.update(match=False, max_abs_diff=float("nan"),
                       first_diff_step=next((x[0] for x, y in zip(sa, sb) if x[0] != y[0]), min(len(sa), len(sb))))
        else:
            va, vb = np.array([v for _, v in sa]), np.array([v for _, v in sb])
            diff = np.abs(va - vb)
            bad = diff > rtol * np.abs(va) if rtol > 0 else va != vb
            row["max_abs_diff"] = float(diff.max()) if diff.size else 0.0
            if bad.any():
                row.update(match=False, first_diff_step=int(sa[int(np.argmax(bad))][0]))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("run_id")
    ap.add_argument("--tracking-uri")
    ap.add_argument("--rtol", type=float, default=None,
                    help=f"tolerance when the device differs (default {OTHER_DEVICE_RTOL}; same device: exact)")
    ap.add_argument("--out", default="runs", help="checkpoint directory root")
    args = ap.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        check_store(uri, create=False)
        cl = client(uri)
        orig = runner.get_run(cl, args.run_id)
        cfg = runner.logged_config(cl, args.run_id)
        tags = orig.data.tags
        commit, dirty = git_state()
        if tags.get("git_commit") != commit or tags.get("git_dirty") == "true" or dirty:
            print(f"note: code version differs: run {tags.get('git_commit', '?')[:12]}"
                  f"{' (dirty)' if tags.get('git_dirty') == 'true' else ''}, now {commit[:12]}{' (dirty)' if dirty else ''}")
        if tags.get("resume_overrides"):
            print(f"note: the run was resumed with overrides {tags['resume_overrides']}; this reproduces its "
                  "logged config without them (train.steps moves the learning-rate schedule)")
        if tags.get("kernel_hash") != kernel_source_hash():
            print("note: the kernel sources differ from the run's (kernel_hash)")
        exp_name = cl.get_experiment(orig.info.experiment_id).name
        name = orig.data.params.get("experiment", tags.get("experiment", "reproduce"))
        new_id, summary = runner.launch(cfg, name, [], uri, exp_name, args.out,
                                        tags={"reproduces": args.run_id}, progress=True)
    except runner.USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before the reproduction started", file=sys.stderr)
        return 130
    if summary["status"] != "finished":
        print(f"error: the reproduction run {new_id} ended {summary['status']}", file=sys.stderr)
        print(new_id)
        return 1
    new = cl.get_run(new_id).data.tags
    same_device = all(new.get(k) == tags.get(k) for k in ("opencl.device", "opencl.platform", "opencl.driver"))
    same_tuning = tune.same_bits(logged_tuning(tags), logged_tuning(new))
    if same_device and not same_tuning:
        print(f"note: the device's tuning differs from the run's ({tags.get('opencl.tuning')}, now "
              f"{new.get('opencl.tuning')}): its reductions sum in another order, so values are compared within rtol")
    exact = same_device and same_tuning
    rtol = 0.0 if exact else (args.rtol if args.rtol is not None else OTHER_DEVICE_RTOL)
    rows = compare_runs(cl, args.run_id, new_id, rtol)
    import pandas as pd
    table = pd.DataFrame(rows)
    with pd.option_context("display.max_rows", None, "display.width", 160):
        print(table.to_string(index=False))
    ok = bool(table["match"].all()) if len(table) else False
    how = "bit-identical (same device)" if exact else \
        f"within rtol={rtol} ({'other tuning' if same_device else 'other device'})"
    print(f"{'MATCH' if ok else 'MISMATCH'}: {sum(r['match'] for r in rows)}/{len(rows)} metric series {how}; "
          f"new run {new_id}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
