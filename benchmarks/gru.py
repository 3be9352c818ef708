"""Forward + backward time of one GRU layer (engine/layers/gru.py) alone on the device, at the
memory network's size by default (B=16, S=100, I=128, Hd=256).

    python -m benchmarks.gru                               # median of 5 after one untimed run
    python -m benchmarks.gru --B 16 --S 100 --I 128 --Hd 256 --rounds 5 --variant gpu --profile

Each round: forward and backward enqueued, then Device.finish (wall time). --profile prints the
device time per kernel of the last round (Device.take_timings).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--S", type=int, default=100)
    ap.add_argument("--I", type=int, default=128)
    ap.add_argument("--Hd", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="", help="an OpenCL device spec (engine.device.select_device)")
    ap.add_argument("--variant", choices=("cpu", "gpu"), default=None, help="kernel family (default: the device's)")
    ap.add_argument("--profile", action="store_true", help="per-kernel device time of the last round")
    args = ap.parse_args(argv)

    from engine.config import Config
    from engine.device import Device
    from engine.layers.gru import GRU
    from engine.model import Model
    from engine.params import init_params

    dev = Device(args.device, profile=args.profile, variant=args.variant)
    layer = GRU("gru", I=args.I, Hd=args.Hd)
    model = Model(dev, Config(), 1, layers=[layer])
    model.set_params(init_params(layer.params(), 0))
    ws = model.workspace(args.B, args.S)
    c = ws.ctx[layer.name]
    rng = np.random.default_rng(0)
    N = args.B * args.S
    x = dev.to_device(rng.standard_normal((N, args.I)).astype(np.float32))
    dy = dev.to_device(rng.standard_normal((N, args.Hd)).astype(np.float32))
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
    print(f"gru B={args.B} S={args.S} I={args.I} Hd={args.Hd} on {dev.name} ({dev.variant} variant): "
          f"forward+backward median {statistics.median(times) * 1e3:.1f} ms over {args.rounds} "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}); forward alone {statistics.median(forward) * 1e3:.1f} ms")
    if args.profile:
        for name, (calls, ns) in sorted(dev.take_timings().items(), key=lambda kv: -kv[1][1]):
            print(f"  {name:28s} {calls:5d} calls {ns / 1e6:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
