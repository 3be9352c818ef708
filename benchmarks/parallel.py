"""Data-parallel scaling: training tokens/s on one device against the same global batch split
across several (engine/parallel.py), measured side by side in one process, rounds alternating.

    python -m benchmarks.parallel                            # two contexts on the default device
    python -m benchmarks.parallel --devices 0:0,1:0 --rounds 5 --steps 10 --set model.hidden_dim=1024

On a machine with one OpenCL device the list repeats it (two contexts on one device): that measures
the overhead of the split and the copies, not a speed-up (both contexts share the same cores).
Prints one table and, with --json, writes the figures (median and spread per configuration).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from engine.config import Config, apply_overrides
from engine.train import Trainer, train_step


def _steps(tr: Trainer, n: int) -> float:
    """Wall seconds of n training steps (batch, forward, backward, optimiser, local rules)."""
    tr.dev.finish()
    t0 = time.perf_counter()
    for _ in range(n):
        if tr.replicas:
            tr.replicas.next_batch(tr.data, tr.data.ids_dev)
            tr.replicas.train_step(tr.opt, tr.data.ids_dev)
            tr.replicas.local_updates()
        else:
            tr.data.next_batch(tr.dev, tr.ws)
            train_step(tr.model, tr.opt, tr.ws)
            tr.model.local_updates(tr.ws)
    for d in (tr.replicas.devs if tr.replicas else [tr.dev]):
        d.finish()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.parallel", description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="", help='the list to split across (default: the default device twice)')
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round and configuration")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    base = apply_overrides(Config(), args.set + ["train.profile=false"])
    one = Trainer(base)
    if args.devices:
        many = args.devices
    else:
        from engine.device import list_devices
        spec = next(f"{p}:{d}" for p, d, _, x in list_devices() if x == one.dev.device)
        many = f"{spec},{spec}"
    par = Trainer(apply_overrides(base, [f"device={many}"]))
    N = base.train.batch_size * base.train.seq_len
    runs = {"1 device": one, f"{par.replicas.D} devices ({many})": par}
    for tr in runs.values():   # warm-up: builds, first-step warm start
        _steps(tr, 2)
    rates = {k: [] for k in runs}
    for r in range(args.rounds):
        order = list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]
        for name, tr in order:
            rates[name].append(args.steps * N / _steps(tr, args.steps))
    out = {"devices": many, "batch": base.train.batch_size, "seq_len": base.train.seq_len,
           "hidden": base.model.hidden_dim, "rounds": args.rounds, "steps": args.steps, "tokens_per_s": {}}
    names = list(runs)
    print(f"B={base.train.batch_size} S={base.train.seq_len} H={base.model.hidden_dim}, "
          f"{args.rounds} rounds x {args.steps} steps, alternating")
    print(f"{'configuration':<40} {'tok/s median':>14} {'min':>10} {'max':>10}")
    for name in names:
        v = np.array(rates[name])
        out["tokens_per_s"][name] = {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}
        print(f"{name:<40} {np.median(v):>14,.0f} {v.min():>10,.0f} {v.max():>10,.0f}")
    ratio = np.array(rates[names[1]]) / np.array(rates[names[0]])
    out["scaling"] = {"median": float(np.median(ratio)), "min": float(ratio.min()), "max": float(ratio.max())}
    print(f"scaling (split / one, per round): median {np.median(ratio):.2f}  [{ratio.min():.2f}, {ratio.max():.2f}]")
    if args.json:
        import os
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
