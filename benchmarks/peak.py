"""The device's nominal FP32 peak (from what OpenCL reports) and its measured memory bandwidth.

    python -m benchmarks.peak            # this machine's default OpenCL device

Peak = compute units × max clock (MHz) × FP32 lanes per compute unit × 2 (a fused
multiply-add is two flops). OpenCL reports the first two (CL_DEVICE_MAX_COMPUTE_UNITS,
CL_DEVICE_MAX_CLOCK_FREQUENCY) but not the lanes, so they come from:

- a GPU: a small vendor table (NVIDIA SMs: 128 FP32 lanes from Ampere GA10x, Ada, Hopper
  (H100, H200) and Blackwell, 64 on GA100 (A100, A30), Volta, Turing and unknown names;
  AMD CUs (GCN, CDNA, RDNA): 64; Intel EUs: 8);
- a CPU: CL_DEVICE_NATIVE_VECTOR_WIDTH_FLOAT with one FMA port per core: a lower bound on
  cores with two FMA ports of that width (Intel since Haswell for AVX2, Xeons with two
  AVX-512 units), and the reported clock is the base clock (turbo runs above it).

Memory bandwidth is not in OpenCL: it is measured, a device-to-device enqueue_copy of a
large buffer timed by profiling events (read + write bytes over the event's time), the
median of a few copies after one untimed copy.
"""
from __future__ import annotations

import re
import statistics
import sys

# (pattern on the lower-case device name, FP32 lanes per SM, architecture): first match wins
NVIDIA_LANES = [
    (r"\b(a100|a30|a800)\b", 64, "Ampere GA100"),
    (r"\b(h100|h200|h800|h20|gh200)\b", 128, "Hopper"),
    (r"\b(b100|b200|gb200|b300|gb300)\b|rtx (pro )?50\d0|rtx 50\d\d|blackwell", 128, "Blackwell"),
    (r"\b(l4|l40s?|l20)\b|rtx 40\d\d|rtx \d000 ada|\bada\b", 128, "Ada"),
    (r"rtx 30\d\d|rtx a\d{4}|\b(a10|a10g|a16|a2|a40)\b", 128, "Ampere GA10x"),
    (r"\b(v100|titan v)\b|\bt4\b|rtx 20\d\d|gtx 16\d\d|quadro rtx|titan rtx", 64, "Volta/Turing"),
]
NVIDIA_DEFAULT = 64
AMD_LANES, INTEL_LANES = 64, 8


def lanes_per_unit(name: str, vendor: str, kind: str, native_float_width: int) -> tuple[int, str]:
    """(FP32 lanes per compute unit, the assumption behind it, in words)."""
    low, ven = name.lower(), vendor.lower()
    if kind == "CPU":
        return max(1, native_float_width), (
            f"CPU: native float vector width {native_float_width} × 1 FMA port per compute unit (a lower bound: "
            f"cores with 2 FMA ports of this width do twice this; the clock is the reported max, turbo may exceed it; "
            f"compute units are logical CPUs)")
    if "nvidia" in ven or "nvidia" in low:
        for pattern, lanes, arch in NVIDIA_LANES:
            if re.search(pattern, low):
                return lanes, f"NVIDIA {arch}: {lanes} FP32 lanes per SM (vendor table, benchmarks/peak.py)"
        return NVIDIA_DEFAULT, (f"NVIDIA, name not in the table: {NVIDIA_DEFAULT} FP32 lanes per SM assumed "
                                f"(Ampere GA10x, Ada, Hopper and later have 128: then a lower bound)")
    if "advanced micro devices" in ven or "amd" in ven or low.startswith("gfx"):
        return AMD_LANES, (f"AMD: {AMD_LANES} FP32 lanes per CU (GCN, CDNA, RDNA; RDNA3's dual issue and "
                           f"CDNA's packed FP32 can double it)")
    if "intel" in ven:
        return INTEL_LANES, f"Intel GPU: {INTEL_LANES} FP32 lanes per EU (one compute unit per EU)"
    return max(1, native_float_width), (f"unknown vendor {vendor!r}: native float vector width "
                                        f"{native_float_width} per compute unit assumed")


def nominal_peak(dev, kind: str | None = None) -> dict:
    """The FP32 peak of a pyopencl Device (or any object with its attribute names): GFLOP/s,
    the inputs, the formula and the assumption. kind: "CPU", "GPU", ... (default: from dev.type)."""
    if kind is None:
        from engine.device import device_type_name
        kind = device_type_name(dev)
    cus, mhz = int(dev.max_compute_units), int(dev.max_clock_frequency)
    width = int(getattr(dev, "native_vector_width_float", 0) or getattr(dev, "preferred_vector_width_float", 1) or 1)
    name, vendor = dev.name.strip(), dev.vendor.strip()
    lanes, assumption = lanes_per_unit(name, vendor, kind, width)
    gflops = cus * mhz * lanes * 2 / 1e3
    return {"gflops": gflops, "compute_units": cus, "clock_mhz": mhz, "lanes_per_unit": lanes, "fma_flops": 2,
            "kind": kind, "device": name, "vendor": vendor,
            "formula": f"{cus} compute units × {mhz} MHz × {lanes} FP32 lanes × 2 (FMA) = {gflops:,.1f} GFLOP/s",
            "assumption": assumption,
            "source": "CL_DEVICE_MAX_COMPUTE_UNITS, CL_DEVICE_MAX_CLOCK_FREQUENCY; lanes as in 'assumption'"}


COPY_BYTES = 256 * 2**20


def measure_bandwidth(dev, nbytes: int | None = None, repeats: int = 5) -> dict:
    """Device-to-device copy bandwidth of an engine Device, GB/s (10⁹ bytes/s, read + write
    counted): median, min, max of `repeats` copies of `nbytes` (default 256 MiB, less where
    CL_DEVICE_MAX_MEM_ALLOC_SIZE or an eighth of the global memory is smaller)."""
    cl = dev.cl
    d = dev.device
    n = nbytes or min(COPY_BYTES, d.max_mem_alloc_size // 2, d.global_mem_size // 8)
    n -= n % 64
    queue = dev.queue if dev.profile else cl.CommandQueue(
        dev.ctx, properties=cl.command_queue_properties.PROFILING_ENABLE)
    mf = cl.mem_flags
    src, dst = cl.Buffer(dev.ctx, mf.READ_WRITE, n), cl.Buffer(dev.ctx, mf.READ_WRITE, n)
    try:
        import numpy as np
        cl.enqueue_fill_buffer(queue, src, np.ones(1, np.float32), 0, n)
        cl.enqueue_fill_buffer(queue, dst, np.zeros(1, np.float32), 0, n)
        cl.enqueue_copy(queue, dst, src, byte_count=n).wait()       # untimed: first touch of the pages
        rates = []
        for _ in range(repeats):
            ev = cl.enqueue_copy(queue, dst, src, byte_count=n)
            ev.wait()
            s = (ev.profile.end - ev.profile.start) * 1e-9
            if s > 0:
                rates.append(2 * n / s / 1e9)
    finally:
        src.release()
        dst.release()
    if not rates:
        return {"gb_s": None, "bytes": n, "method": "copy events reported no time"}
    return {"gb_s": statistics.median(rates), "min": min(rates), "max": max(rates), "n": len(rates), "bytes": n,
            "method": f"device-to-device enqueue_copy of {n / 2**20:.0f} MiB timed by profiling events, "
                      f"read + write bytes, median of {len(rates)}"}


def main(argv=None) -> int:
    import argparse
    from engine.device import Device, DeviceError
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peak", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="", help="P:D or part of a device name (default: as the engine picks)")
    args = ap.parse_args(argv)
    try:
        dev = Device(args.device, profile=True)
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    p, bw = nominal_peak(dev.device), measure_bandwidth(dev)
    print(f"{dev.name}: peak {p['formula']}\n  ({p['assumption']})")
    print(f"memory bandwidth (measured): {bw['gb_s']:.1f} GB/s [{bw['min']:.1f}-{bw['max']:.1f}], {bw['method']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
