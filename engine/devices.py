"""List the OpenCL platforms and devices this machine has.

    python -m engine.devices

Choose one with the config key `device` ("P:D", or part of its name) or
$PYOPENCL_CTX; without either, the engine takes the first GPU, else the CPU.
"""
from __future__ import annotations

import argparse
import sys

from .device import DeviceError, device_type_name, list_devices, select_device


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m engine.devices", description=__doc__.splitlines()[0]).parse_args(argv)
    try:
        devices = list_devices()
        default = select_device("")
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p, d, plat, dev in devices:
        mark = "*" if dev == default else " "
        mem = dev.global_mem_size / 2**30
        print(f"{mark} {p}:{d}  {device_type_name(dev):<4} {dev.name.strip()}  "
              f"[{plat.name.strip()}, {dev.max_compute_units} compute units, {mem:.1f} GiB, {dev.version.strip()}]")
    print("(* = the default choice)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
