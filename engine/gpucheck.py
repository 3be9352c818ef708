"""Check this machine's GPU with the engine: platforms, the OpenCL tests on the GPU, the benchmark.

    python -m engine.gpucheck [--out gpucheck.json] [--skip-tests] [--skip-bench] [--device P:D]
                              [--sizes reference,gpu_sized] [--bench-set KEY=VALUE ...]

0. Without pyopencl it says how to install it (`pip install pyopencl`: wheels for Linux x86_64
   bundle the ICD loader) in one line and exits 1.
1. Lists every OpenCL platform and device. With no GPU device, it says what is missing and exits 1:
   - NVIDIA: the driver ships libnvidia-opencl.so.1, but the ICD loader finds it only through a file
     /etc/OpenCL/vendors/nvidia.icd whose one line is `libnvidia-opencl.so.1`. When the library is
     on the library path and no ICD file names it, it prints the commands that write one, as root
     or (without root) into a directory named by OCL_ICD_VENDORS;
   - AMD: ROCm's OpenCL runtime (rocm-opencl-runtime, which installs amdocl64.icd).
2. Runs the OpenCL test subset (the kernels, the layer contract, the models, the golden output, the
   delta rule, generation) with PYOPENCL_CTX set to the GPU. In those tests the `dev` fixture is the
   GPU with its own (GPU) kernel variant.
3. Runs the speed benchmark on the GPU at the reference size and at a GPU-filling size (hidden 1024,
   batch 256) in one `python -m benchmarks.speed --sizes ...` subprocess (the engine never imports
   the benchmarks): tokens/s of the engine and, when torch is installed with CUDA or ROCm, of the
   same model in PyTorch on the same GPU, their ratio, the per-kernel table (time, GFLOP/s, GB/s,
   share of the peak), the nominal FP32 peak and the measured memory bandwidth.
   With two or more GPUs (and no --device) it also measures data-parallel scaling over all of them
   (`python -m benchmarks.parallel --devices ...`: tokens/s of one GPU against the batch split).
4. Writes one JSON summary (--out): platforms, the chosen device, the test outcome and the benchmark
   figures; prints a human summary at the end (standard output).

Exit status: 0 when a GPU was found and every step that ran passed; 1 when pyopencl is missing, there
is no GPU or a step failed; 2 on bad arguments.
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
         "tests/test_model.py", "tests/test_golden.py", "tests/test_generate.py", "tests/test_parallel.py",
         "tests/test_tune.py", "tests/test_generate_kv.py", "tests/test_gru.py", "tests/test_memory.py",
         "tests/test_lattice.py", "tests/test_embed_head.py", "tests/test_optim_lr_scale.py",
         "tests/test_embed_task.py"]
SIZES = ("reference", "gpu_sized")        # defined in benchmarks/speed.py (SIZES)
ICD_DIR = "/etc/OpenCL/vendors"
NVIDIA_LIB = "libnvidia-opencl.so.1"
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/nvidia/lib64",
            "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu/nvidia/current")
USER_ICD_DIR = "~/.local/etc/OpenCL/vendors"
PYOPENCL_HINT = ("pip install pyopencl (wheels for Linux x86_64 include the ICD loader; "
                 "pip install pocl-binary-distribution adds a CPU device)")


def pyopencl_missing() -> str | None:
    """Why pyopencl cannot be imported, or None."""
    try:
        import pyopencl  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


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


def library_dirs() -> list[str]:
    """Where the dynamic loader looks: $LD_LIBRARY_PATH first, then the usual directories."""
    env = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    return env + [d for d in LIB_DIRS if d not in env]


def _ldconfig(name: str) -> str | None:
    """The path `ldconfig -p` lists for `name` (the loader's cache), or None."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.strip().startswith(name + " ") and "=>" in line:
            return line.split("=>", 1)[1].strip()
    return None


def find_library(name: str) -> str | None:
    for d in library_dirs():
        if Path(d, name).exists():
            return str(Path(d, name))
    return _ldconfig(name)


def icd_files() -> tuple[str, dict[str, str]]:
    """(where the ICD loader looks, {.icd file: its first line}). $OCL_ICD_VENDORS, when set,
    replaces /etc/OpenCL/vendors: a directory of .icd files, or one .icd file."""
    where = os.environ.get("OCL_ICD_VENDORS") or ICD_DIR
    path = Path(where)
    files = sorted(path.glob("*.icd")) if path.is_dir() else [path] if path.suffix == ".icd" and path.is_file() else []
    out = {}
    for f in files:
        try:
            out[f.name] = (f.read_text().splitlines() or [""])[0].strip()
        except OSError:
            out[f.name] = "?"
    return where, out


def missing_gpu_hint() -> str:
    """What to install or write so that a GPU shows up as an OpenCL device (lines)."""
    where, icds = icd_files()
    lines = [f"no OpenCL GPU device. ICD files in {where}: {', '.join(icds) or 'none'}."]
    lib = find_library(NVIDIA_LIB)
    named = any(Path(line).name == NVIDIA_LIB for line in icds.values())
    write = f"mkdir -p {ICD_DIR} && echo {NVIDIA_LIB} > {ICD_DIR}/nvidia.icd"
    if lib and not named:
        lines += [f"NVIDIA: the driver's {lib} is there, but no ICD file names it. Write one (as root):",
                  f"    {write}",
                  f"  or, without root, in a directory of your own named by OCL_ICD_VENDORS (it then replaces "
                  f"{ICD_DIR}: put any other .icd file you need there too):",
                  f"    mkdir -p {USER_ICD_DIR} && echo {lib} > {USER_ICD_DIR}/nvidia.icd && "
                  f"export OCL_ICD_VENDORS={USER_ICD_DIR}"]
    elif lib:
        lines.append(f"NVIDIA: {lib} and an ICD file naming it exist, yet no NVIDIA platform loaded: check that "
                     f"`nvidia-smi` sees the GPU (in a container: --gpus all, NVIDIA_DRIVER_CAPABILITIES with "
                     f"compute), and `OCL_ICD_DEBUG=7 python -m engine.devices` for the loader's reason.")
    elif Path("/proc/driver/nvidia").exists():
        lines.append(f"NVIDIA: the kernel driver is loaded but {NVIDIA_LIB} is not on the library path "
                     f"($LD_LIBRARY_PATH, {', '.join(LIB_DIRS)}, ldconfig): install the driver's OpenCL part "
                     f"(Ubuntu: libnvidia-compute-<driver version>; a container: NVIDIA_DRIVER_CAPABILITIES="
                     f"compute,utility), then `{write}`.")
    else:
        lines.append(f"NVIDIA: install the driver (it ships {NVIDIA_LIB}), then `{write}`.")
    lines.append("AMD: install ROCm's OpenCL runtime (rocm-opencl-runtime; it writes amdocl64.icd).")
    lines.append(f"pyopencl itself comes from wheels: {PYOPENCL_HINT}.")
    return "\n".join(lines)


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


def run_bench(index: str, sizes: list[str], extra: list[str], timeout: int) -> dict:
    """benchmarks.speed on device `index` at every size in one run: its figures, condensed."""
    cmd = [sys.executable, "-m", "benchmarks.speed", "--json", "--quick", "--repeats", "3", "--steps", "10",
           "--wirings", "seed,hybrid", "--sizes", ",".join(sizes), "--set", f"device={index}",
           *[a for kv in extra for a in ("--set", kv)]]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout * len(sizes))
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout * len(sizes)} s", "sizes": {}}
    try:
        data = json.loads(r.stdout)
    except ValueError:
        return {"ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1], "sizes": {}}
    out = {"ok": r.returncode == 0, "seconds": round(time.perf_counter() - t0, 1), "command": cmd[1:],
           "device_peak": data["device_peak"], "bandwidth": data["bandwidth"],
           "torch": {"status": data["torch"], "device": data["torch_device"]}, "sizes": {}}
    for label, res in data["sizes"].items():
        if "error" in res:
            out["sizes"][label] = {"ok": False, "error": res["error"], "config": res["config"]}
            continue
        wirings = {}
        for name, w in res["wirings"].items():
            wirings[name] = {"engine_tokens_per_s": w["engine"]["tokens_per_s"]["median"],
                             "torch_tokens_per_s": w["torch"]["tokens_per_s"]["median"] if w["torch"] else None,
                             "engine_over_torch": w["ratio"],
                             "device_ms_per_step": (res["kernels"].get(name) or {}).get("device_ms_per_step")}
        out["sizes"][label] = {"ok": True, "config": res["config"], "headline_wiring": res["headline_wiring"],
                               "wirings": wirings,
                               "kernels": {name: k["kernels"] for name, k in res["kernels"].items()}}
    return out


def run_scaling(indices: list[str], timeout: int) -> dict:
    """benchmarks.parallel over the GPUs `indices` (two or more): tokens/s of one against all."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scaling.json")
        cmd = [sys.executable, "-m", "benchmarks.parallel", "--devices", ",".join(indices), "--rounds", "3",
               "--steps", "5", "--json", path]
        try:
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout} s"}
        if r.returncode != 0 or not os.path.exists(path):
            return {"ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
        with open(path) as f:
            return {"ok": True, "command": cmd[1:-2], **json.load(f)}


def _num(x) -> str:
    return "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def human_summary(summary: dict, top: int = 8) -> str:
    """The end of the check in words and small tables (the JSON has every figure)."""
    d = summary["device"]
    lines = ["", "gpucheck summary",
             f"  device     {d['index']} {d['name']} [{d['platform']}, {d['compute_units']} CUs, "
             f"{d['clock_mhz']} MHz, {d['global_mem_gib']} GiB, {d['version']}]"]
    t = summary["tests"]
    lines.append(f"  tests      {'skipped' if t is None else t['summary']}")
    b = summary["bench"]
    if not b:
        lines.append("  benchmark  skipped")
        return "\n".join(lines)
    if "device_peak" not in b:
        lines.append(f"  benchmark  failed: {b.get('error')}")
        return "\n".join(lines)
    p, bw, tor = b["device_peak"], b["bandwidth"], b["torch"]
    lines += [f"  peak       {p['formula']} (nominal)", f"             {p['assumption']}",
              "  bandwidth  " + (f"{bw['gb_s']:,.1f} GB/s measured ({bw['method']})" if bw.get("gb_s") else bw["method"]),
              f"  torch      {tor['device'] or tor['status']}", "",
              f"  {'size':<10} {'wiring':<8} {'engine tok/s':>14} {'torch tok/s':>14} {'engine/torch':>12} {'device ms/step':>15}"]
    for label, s in b["sizes"].items():
        if not s["ok"]:
            lines.append(f"  {label:<10} failed: {s['error']}")
            continue
        for name, w in s["wirings"].items():
            lines.append(f"  {label:<10} {name:<8} {_num(w['engine_tokens_per_s']):>14} "
                         f"{_num(w['torch_tokens_per_s']):>14} {_num(w['engine_over_torch']):>12} "
                         f"{_num(w['device_ms_per_step']):>15}")
    for label, s in b["sizes"].items():
        if not s["ok"]:
            continue
        head = s["headline_wiring"]
        c = s["config"]
        lines += ["", f"  slowest kernels, {head} at {label} (H={c['H']}, B={c['B']}, S={c['S']}):",
                  f"  {'kernel':<26} {'calls':>5} {'ms/step':>9} {'us/call':>9} {'GFLOP/s':>9} {'GB/s':>8} {'% of peak':>10}"]
        for r in s["kernels"][head][:top]:
            pct = "-" if r["pct_peak"] is None else f"{r['pct_peak']:.0f}% " + ("FP32" if r["bound"] == "compute" else "BW")
            lines.append(f"  {r['kernel']:<26} {r['calls_per_step']:>5.0f} {r['ms']:>9.3f} {_num(r['us_per_call']):>9} "
                         f"{_num(r['gflops']):>9} {_num(r['gb_s']):>8} {pct:>10}"
                         + ("" if r["model"] == "ok" else f"  ({r['model']})"))
    return "\n".join(lines)


def _write(path: str, summary: dict):
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.gpucheck", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpucheck.json", help="the JSON summary (default gpucheck.json)")
    ap.add_argument("--device", help="the GPU to check as P:D (default: the first GPU)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"benchmark sizes, from {', '.join(SIZES)}")
    ap.add_argument("--bench-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every benchmark size (repeatable; a size's own keys win)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per step (the tests, each benchmark size)")
    args = ap.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    if not sizes or any(s not in SIZES for s in sizes) or len(set(sizes)) != len(sizes):
        print(f"error: --sizes takes a comma-separated subset of {', '.join(SIZES)}; got {args.sizes!r}",
              file=sys.stderr)
        return 2
    out_dir = Path(args.out).resolve().parent
    if not out_dir.is_dir() or not os.access(out_dir, os.W_OK):
        print(f"error: cannot write the summary into {str(out_dir)!r}", file=sys.stderr)
        return 2
    why = pyopencl_missing()
    if why:
        _write(args.out, {"platforms": [], "error": f"pyopencl is not importable ({why})", "device": None,
                          "tests": None, "bench": {}, "missing": PYOPENCL_HINT})
        print(f"gpucheck: pyopencl is not importable ({why}): {PYOPENCL_HINT}; summary in {args.out}",
              file=sys.stderr)
        return 1
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
        lines = summary["missing"].splitlines()
        print(f"gpucheck: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(f"  {line}", file=sys.stderr)
        status = 1
    else:
        index = gpus[0]["index"]
        print(f"gpucheck: checking {gpus[0]['name']} ({index})", file=sys.stderr)
        if not args.skip_tests:
            summary["tests"] = run_tests(index, args.timeout)
            print(f"gpucheck: tests {summary['tests']['summary']}", file=sys.stderr)
            status |= 0 if summary["tests"]["passed"] else 1
        if not args.skip_bench:
            print(f"gpucheck: benchmark at {', '.join(sizes)}", file=sys.stderr)
            summary["bench"] = b = run_bench(index, sizes, args.bench_set, args.timeout)
            if not b["ok"]:
                print(f"gpucheck: benchmark failed: {b.get('error') or 'a size failed'}", file=sys.stderr)
            status |= 0 if b["ok"] else 1
            if len(gpus) > 1 and not args.device:   # data parallel over every GPU (engine/parallel.py)
                print(f"gpucheck: data-parallel scaling over {len(gpus)} GPUs", file=sys.stderr)
                summary["scaling"] = sc = run_scaling([g["index"] for g in gpus], args.timeout)
                print(f"gpucheck: scaling {sc['scaling']['median']:.2f} of one GPU" if sc["ok"]
                      else f"gpucheck: scaling failed: {sc['error']}", file=sys.stderr)
                status |= 0 if sc["ok"] else 1
        print(human_summary(summary))
    _write(args.out, summary)
    print(f"gpucheck: summary in {args.out}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
