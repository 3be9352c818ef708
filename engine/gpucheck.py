"""Check this machine's GPU with the engine: platforms, the OpenCL tests on the GPU, the benchmark.

    python -m engine.gpucheck [--out gpucheck.json] [--skip-tests] [--skip-bench] [--device P:D]
                              [--sizes reference,gpu_sized] [--bench-set KEY=VALUE ...]

1. Lists every OpenCL platform and device. With no GPU device, it says what is missing and exits 1:
   - NVIDIA: the driver ships libnvidia-opencl.so.1, but the ICD loader finds it only through a file
     /etc/OpenCL/vendors/nvidia.icd whose one line is `libnvidia-opencl.so.1`;
   - AMD: ROCm's OpenCL runtime (rocm-opencl-runtime, which installs amdocl64.icd).
2. Runs the OpenCL test subset (the kernels, the layer contract, the models, the golden output, the
   delta rule, generation) with PYOPENCL_CTX set to the GPU. In those tests the `dev` fixture is the
   GPU with its own (GPU) kernel variant.
3. Runs the speed benchmark on the GPU at the reference size and at a GPU-filling size (hidden 1024,
   batch 256), through `python -m benchmarks.speed` in a subprocess. The engine never imports the
   benchmarks.
4. Writes one JSON summary (--out): platforms, the chosen device, the test outcome and the benchmark
   figures.

Exit status: 0 when a GPU was found and every step that ran passed; 1 when there is no GPU or a step
failed; 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .device import DeviceError, device_type_name, list_devices

REPO = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_kernels.py", "tests/test_delta.py", "tests/test_layer_contract.py", "tests/test_layers.py",
         "tests/test_model.py", "tests/test_golden.py", "tests/test_generate.py"]
SIZES = {"reference": [], "gpu_sized": ["model.hidden_dim=1024", "train.batch_size=256"]}
ICD_DIR = "/etc/OpenCL/vendors"


def platforms() -> tuple[list[dict], str | None]:
    """([{index, platform, vendor, name, type, compute_units, global_mem_gib, version}], error)."""
    try:
        devices = list_devices()
    except DeviceError as exc:
        return [], str(exc)
    out = []
    for p, d, plat, dev in devices:
        out.append({"index": f"{p}:{d}", "platform": plat.name.strip(), "vendor": plat.vendor.strip(),
                    "name": dev.name.strip(), "type": device_type_name(dev), "compute_units": dev.max_compute_units,
                    "clock_mhz": dev.max_clock_frequency, "global_mem_gib": round(dev.global_mem_size / 2**30, 2),
                    "version": dev.version.strip(), "driver": dev.driver_version.strip()})
    return out, None


def missing_gpu_hint() -> str:
    """What to install or write so that a GPU shows up as an OpenCL device."""
    icds = sorted(os.listdir(ICD_DIR)) if os.path.isdir(ICD_DIR) else []
    lines = [f"no OpenCL GPU device. ICD files in {ICD_DIR}: {', '.join(icds) or 'none'}."]
    nvidia = any(Path(p, "libnvidia-opencl.so.1").exists()
                 for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/nvidia/lib64"))
    if nvidia or Path("/proc/driver/nvidia").exists():
        lines.append(f"NVIDIA driver present: write the ICD file with "
                     f"`mkdir -p {ICD_DIR} && echo libnvidia-opencl.so.1 > {ICD_DIR}/nvidia.icd`.")
    else:
        lines.append(f"NVIDIA: install the driver (it ships libnvidia-opencl.so.1), then "
                     f"`echo libnvidia-opencl.so.1 > {ICD_DIR}/nvidia.icd`.")
    lines.append("AMD: install ROCm's OpenCL runtime (rocm-opencl-runtime; it writes amdocl64.icd).")
    lines.append("pyopencl itself comes from wheels: pip install pyopencl.")
    return " ".join(lines)


def run_tests(index: str, timeout: int) -> dict:
    env = dict(os.environ, PYOPENCL_CTX=index)
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=timeout)
        tail = (r.stdout + r.stderr).strip().splitlines()
        return {"passed": r.returncode == 0, "returncode": r.returncode, "summary": tail[-1] if tail else "",
                "seconds": round(time.perf_counter() - t0, 1), "failures": [l for l in tail if l.startswith("FAILED")][:20]}
    except subprocess.TimeoutExpired:
        return {"passed": False, "returncode": None, "summary": f"timed out after {timeout} s",
                "seconds": round(time.perf_counter() - t0, 1), "failures": []}


def run_bench(index: str, extra: list[str], timeout: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.speed", "--json", "--quick", "--repeats", "3", "--steps", "10",
           "--wirings", "seed,hybrid", "--set", f"device={index}", *[a for kv in extra for a in ("--set", kv)]]
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    if r.returncode != 0:
        return {"ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    data = json.loads(r.stdout)
    out = {"ok": True, "config": data.get("config")}
    for name, w in data.get("wirings", {}).items():
        out[name] = {"engine_tokens_per_s": w["engine"]["tokens_per_s"]["median"],
                     "torch_tokens_per_s": (w.get("torch") or {}).get("tokens_per_s", {}).get("median")
                     if isinstance(w.get("torch"), dict) else None}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.gpucheck", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpucheck.json", help="the JSON summary (default gpucheck.json)")
    ap.add_argument("--device", help="the GPU to check as P:D (default: the first GPU)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"benchmark sizes, from {', '.join(SIZES)}")
    ap.add_argument("--bench-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every benchmark size (repeatable)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per step (tests, each benchmark)")
    args = ap.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    if not sizes or any(s not in SIZES for s in sizes):
        print(f"error: --sizes takes a comma-separated subset of {', '.join(SIZES)}; got {args.sizes!r}",
              file=sys.stderr)
        return 2
    out_dir = Path(args.out).resolve().parent
    if not out_dir.is_dir() or not os.access(out_dir, os.W_OK):
        print(f"error: cannot write the summary into {str(out_dir)!r}", file=sys.stderr)
        return 2
    found, error = platforms()
    for d in found:
        print(f"{d['index']}  {d['type']:<4} {d['name']}  [{d['platform']}, {d['compute_units']} CUs, "
              f"{d['global_mem_gib']} GiB, {d['version']}]", file=sys.stderr)
    gpus = [d for d in found if d["type"] == "GPU"]
    if args.device:
        gpus = [d for d in found if d["index"] == args.device]
        if not gpus:
            print(f"error: no OpenCL device {args.device!r}; see python -m engine.devices", file=sys.stderr)
            return 2
    summary = {"platforms": found, "error": error, "device": gpus[0] if gpus else None, "tests": None, "bench": {}}
    status = 0
    if not gpus:
        summary["missing"] = missing_gpu_hint()
        print(f"gpucheck: {summary['missing']}", file=sys.stderr)
        status = 1
    else:
        index = gpus[0]["index"]
        print(f"gpucheck: checking {gpus[0]['name']} ({index})", file=sys.stderr)
        if not args.skip_tests:
            summary["tests"] = run_tests(index, args.timeout)
            print(f"gpucheck: tests {summary['tests']['summary']}", file=sys.stderr)
            status |= 0 if summary["tests"]["passed"] else 1
        if not args.skip_bench:
            for label in sizes:
                summary["bench"][label] = run_bench(index, SIZES[label] + args.bench_set, args.timeout)
                b = summary["bench"][label]
                line = ", ".join(f"{k} {v['engine_tokens_per_s']:,.0f} tok/s" for k, v in b.items()
                                 if isinstance(v, dict) and "engine_tokens_per_s" in v) or b.get("error", "")
                print(f"gpucheck: bench {label}: {line}", file=sys.stderr)
                status |= 0 if b["ok"] else 1
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"gpucheck: summary in {args.out}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
