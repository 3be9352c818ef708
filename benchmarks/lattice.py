"""Forward + backward time of one lattice layer (engine/layers/lattice.py) alone on the device.

    python -m benchmarks.lattice                                  # n=8, C=8, Hc=32, K=8, batch 32
    python -m benchmarks.lattice --n 37 --K 37 --batch 1 --rounds 2
    python -m benchmarks.lattice --experts local distant functional --variant gpu --profile

Each round: forward and backward enqueued, then Device.finish (wall time), after one untimed run.
Prints the layer's bytes per sample (its buffers at one row). --profile: the device time per
kernel of the last round (Device.take_timings).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--D", type=int, default=None, help="depth (default n)")
    ap.add_argument("--C", type=int, default=8)
    ap.add_argument("--Hc", type=int, default=32)
    ap.add_argument("--K", type=int, default=None, help="steps (default n)")
    ap.add_argument("--neighbours", type=int, default=6)
    ap.add_argument("--experts", nargs="+", default=["local"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="", help="an OpenCL device spec (engine.device.select_device)")
    ap.add_argument("--variant", choices=("cpu", "gpu"), default=None, help="kernel family (default: the device's)")
    ap.add_argument("--profile", action="store_true", help="per-kernel device time of the last round")
    args = ap.parse_args(argv)

    from engine.config import Config
    from engine.device import Device
    from engine.layers.lattice import Lattice
    from engine.model import Model
    from engine.params import init_params

    dev = Device(args.device, profile=args.profile, variant=args.variant)
    layer = Lattice("lattice", n=args.n, D=args.D, C=args.C, Hc=args.Hc, K=args.K, neighbours=args.neighbours,
                    experts=tuple(args.experts))
    model = Model(dev, Config(), 1, layers=[layer])
    model.set_params(init_params(layer.params(), 0))
    c = model.workspace(args.batch, 1).ctx[layer.name]
    rng = np.random.default_rng(0)
    x = dev.to_device(rng.standard_normal((args.batch, layer.n2)).astype(np.float32))
    dy = dev.to_device(rng.standard_normal((args.batch, layer.n2)).astype(np.float32))
    times, forward = [], []
    for r in range(args.rounds + 1):
        dev.take_timings()
        t0 = time.perf_counter()
        layer.forward(c, x)
        dev.finish()
        t1 = time.perf_counter()
        layer.backward(c, dy)
        dev.finish()
        if r:
            times.append(time.perf_counter() - t0)
            forward.append(t1 - t0)
    print(f"lattice n={layer.n} D={layer.D} C={layer.C} Hc={layer.Hc} K={layer.K} P={args.neighbours} "
          f"experts={','.join(layer.experts)} batch={args.batch} on {dev.name} ({dev.variant} variant): "
          f"forward+backward median {statistics.median(times) * 1e3:.1f} ms over {args.rounds} "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}); forward alone "
          f"{statistics.median(forward) * 1e3:.1f} ms; {layer.bytes_per_sample() / 1e6:.1f} MB per sample")
    if args.profile:
        for name, (calls, ns) in sorted(dev.take_timings().items(), key=lambda kv: -kv[1][1]):
            print(f"  {name:28s} {calls:5d} calls {ns / 1e6:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
