"""List the OpenCL platforms and devices this machine has; tune their launch sizes.

    python -m engine.devices                                  # the list, with each cached tuning
    python -m engine.devices --tune [--device 0:0] [--force]  # time the candidates, cache the winner

Choose one with the config key `device` ("P:D", or part of its name) or
$PYOPENCL_CTX; without either, the engine takes the first GPU, else the CPU.
--tune runs engine.tune's search (the GPU kernel variant's product tiles and
reduction work-group) and writes its cache; `--variant gpu` tries it on a CPU.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import tune
from .device import Device, DeviceError, device_type_name, list_devices, select_device


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.devices", description=__doc__.splitlines()[0])
    ap.add_argument("--tune", action="store_true", help="time the launch-size candidates and cache the fastest")
    ap.add_argument("--device", help="with --tune: only this device (P:D or part of its name; default all)")
    ap.add_argument("--variant", choices=("cpu", "gpu"), help="with --tune: the kernel variant (default: by type)")
    ap.add_argument("--force", action="store_true", help="with --tune: search again even when cached")
    ap.add_argument("--budget", type=float, default=tune.DEFAULT_BUDGET_S,
                    help=f"with --tune: seconds of search per device (default {tune.DEFAULT_BUDGET_S:g})")
    args = ap.parse_args(argv)
    if not args.tune and (args.device or args.variant or args.force):
        ap.error("--device, --variant and --force go with --tune")
    if args.budget <= 0:
        ap.error("--budget must be > 0 seconds")
    try:
        devices = list_devices()
        if args.tune:
            chosen = [select_device(args.device)] if args.device else [d for *_, d in devices]
            return tune_devices(devices, chosen, args)
        default = select_device("")
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p, d, plat, dev in devices:
        mark = "*" if dev == default else " "
        mem = dev.global_mem_size / 2**30
        print(f"{mark} {p}:{d}  {device_type_name(dev):<4} {dev.name.strip()}  "
              f"[{plat.name.strip()}, {dev.max_compute_units} compute units, {mem:.1f} GiB, {dev.version.strip()}]")
        variant = "cpu" if device_type_name(dev) == "CPU" else "gpu"
        if variant == "gpu":
            cached = tune.lookup(dev, variant)
            print(f"         tuning: {json.dumps(cached, sort_keys=True)}" if cached is not None else
                  "         tuning: not searched yet (defaults until the first run; --tune searches now)")
    print("(* = the default choice)")
    return 0


def tune_devices(devices, chosen, args) -> int:
    for p, d, _, cl_dev in devices:
        if not any(cl_dev == c for c in chosen):
            continue
        dev = Device(f"{p}:{d}", variant=args.variant)
        print(f"{p}:{d} {dev.name} ({dev.variant} kernel variant)")
        if dev.variant != "gpu":
            print("  nothing to tune on the cpu kernel variant (engine/tune.py says why)")
            continue
        cached = None if args.force else tune.lookup(dev.device, dev.variant)
        if cached is not None:
            print(f"  cached: {json.dumps(cached, sort_keys=True)} (--force searches again)")
            continue
        winner, trials = tune.search(dev, args.budget)
        for t in trials:
            print(f"  {t.label:<18} {f'{t.ms:9.3f} ms' if t.ms is not None else t.note}")
        stored = tune.store(dev, winner, trials)
        print(f"  winner: {json.dumps(winner, sort_keys=True)}" + (f" (cached in {tune.cache_path()})" if stored else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
