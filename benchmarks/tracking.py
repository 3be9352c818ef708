"""Cost of full MLflow tracking: the same training with and without it, side by side.

    python -m benchmarks.tracking [--steps 200] [--repeats 3] [--set key=value ...]

Each repeat trains the same config twice in this process, once with no
callbacks and once with the MLflow logger of a real run in a temporary
SQLite store (metrics, histograms, samples, figures); the two orders
alternate between repeats. Reports the wall time of `Trainer.train()` for
each, median and spread, and the overhead: ratio of medians, best-of, and the
median of the per-repeat (back-to-back) ratios, the figure to quote.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from engine.config import apply_overrides
from engine.train import Trainer

from experiments import presets
from experiments.tracking import MlflowLogger, client, experiment_id


def _timed(cfg, tracked: bool, store: str) -> float:
    trainer = Trainer(cfg, None, [])
    if tracked:
        cl = client(store)
        run_id = cl.create_run(experiment_id(cl, "bench")).info.run_id
        logger = MlflowLogger(cl, run_id)
        trainer.callbacks.append(logger)
    t = time.perf_counter()
    trainer.train()
    if tracked:
        logger.finish()
        cl.set_terminated(run_id, "FINISHED")
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tracking", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="hybrid")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)
    cfg = apply_overrides(presets.get(args.experiment).config({"train.steps": args.steps}), args.set)
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/mlflow.db"
        client(store).search_experiments()  # create the store outside the timing
        _timed(apply_overrides(cfg, ["train.steps=2"]), True, store)  # warm-up: builds, imports
        off, on = [], []
        for r in range(args.repeats):
            for tracked in ((False, True) if r % 2 == 0 else (True, False)):
                (on if tracked else off).append(_timed(cfg, tracked, store))
    res = {"steps": args.steps, "tracking_off_s": off, "tracking_on_s": on,
           "median_off_s": statistics.median(off), "median_on_s": statistics.median(on),
           "overhead": statistics.median(on) / statistics.median(off) - 1.0,
           "overhead_best_of": min(on) / min(off) - 1.0,  # least disturbed runs of each
           # each repeat's two runs are back to back: the median of their ratios cancels the
           # machine's drift between repeats (this VM's speed wanders by ±20 % over minutes)
           "overhead_paired": statistics.median(a / b for a, b in zip(on, off)) - 1.0,
           "overhead_paired_range": [min(a / b for a, b in zip(on, off)) - 1.0,
                                     max(a / b for a, b in zip(on, off)) - 1.0],
           "spread_off_s": max(off) - min(off), "spread_on_s": max(on) - min(on)}
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
