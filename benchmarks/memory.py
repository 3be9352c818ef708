"""Time of the slot memory read (engine/layers/memory.py) at DRLMemNet's size: forward, backward
and the local write of one step, per write mode, on one device.

    python -m benchmarks.memory                          # B=16, S=100 (N=1600), E=M=128, Ms=512, V=100
    python -m benchmarks.memory --variant gpu --rounds 9 --json mem.json

The layer runs alone between a random input e (N,E) and the character head (whose logits the
value write reads; the head's own time is not counted). Each round enqueues forward, backward
and local_update and waits for the queue; before the rounds one untimed step builds the kernels.
Prints the median and the spread (min–max) per mode, and the forward, backward and write parts
of the median round (timed alone, each waited for).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from engine.config import Config
from engine.device import Device
from engine.layers.head import CharHead
from engine.layers.memory import WRITE_MODES, MemoryRead
from engine.model import Model, param_specs
from engine.params import init_params


def _time(dev, fn) -> float:
    t = time.perf_counter()
    fn()
    dev.finish()
    return time.perf_counter() - t


def bench(dev, mode, B, S, E, M, Ms, V, rounds) -> dict:
    mem, head = MemoryRead("mem", E=E, M=M, Ms=Ms, V=V, write_mode=mode), CharHead("head", V=V, H=M)
    model = Model(dev, Config(), V, layers=[mem, head])
    model.set_params(init_params(param_specs([mem, head]), 0))
    ws = model.workspace(B, S)
    rng = np.random.default_rng(0)
    ws.y.set(rng.integers(0, V, B * S).astype(np.int32))
    e = dev.to_device(rng.standard_normal((B * S, E)).astype(np.float32))
    c, dy = ws.ctx["mem"], dev.to_device(rng.standard_normal((B * S, M)).astype(np.float32) * 1e-3)
    head.forward(ws.ctx["head"], mem.forward(c, e))   # the logits the write reads

    def step():
        mem.forward(c, e)
        mem.backward(c, dy)
        mem.local_update(c)

    _time(dev, step)
    total = sorted(_time(dev, step) for _ in range(rounds))
    parts = {name: float(np.median([_time(dev, f) for _ in range(rounds)])) for name, f in
             (("forward", lambda: mem.forward(c, e)), ("backward", lambda: mem.backward(c, dy)),
              ("write", lambda: mem.local_update(c)))}
    return {"median_s": float(np.median(total)), "min_s": total[0], "max_s": total[-1], **parts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--variant", choices=("cpu", "gpu"), default=None, help="kernel variant (default: the device's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", default="16,100,128,128,512,100", help="B,S,E,M,Ms,V")
    ap.add_argument("--modes", default=",".join(WRITE_MODES))
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    B, S, E, M, Ms, V = (int(v) for v in args.size.split(","))
    dev = Device(args.device or "", variant=args.variant)
    out = {"device": dev.device.name.strip(), "variant": dev.variant, "size": dict(B=B, S=S, E=E, M=M, Ms=Ms, V=V)}
    for mode in args.modes.split(","):
        r = out[mode] = bench(dev, mode, B, S, E, M, Ms, V, args.rounds)
        print(f"{mode:5s} step {r['median_s'] * 1e3:8.2f} ms (min {r['min_s'] * 1e3:.2f}, max {r['max_s'] * 1e3:.2f}); "
              f"forward {r['forward'] * 1e3:.2f}, backward {r['backward'] * 1e3:.2f}, write {r['write'] * 1e3:.2f} ms",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
