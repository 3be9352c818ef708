"""OpenCL device, program cache and kernel launches.

    python -m engine.devices          # list platforms and devices

Four small pieces, after tinygrad's ops_cl.py: choosing a device, building
`kernels/*.cl` once per context (with defines), creating each `cl.Kernel`
once, and launching with optional profiling so per-kernel device time can
be reported by kernel name.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"

INSTALL_HINT = ("no OpenCL runtime found: install one with "
                "`pip install pocl-binary-distribution` (CPU) or your GPU vendor's driver")


class DeviceError(RuntimeError):
    """A device could not be found, chosen or used; the message is one line."""


def _cl():
    try:
        import pyopencl as cl
    except ImportError as exc:  # pragma: no cover - pyopencl is a hard dependency
        raise DeviceError(f"pyopencl is not installed ({exc}); pip install pyopencl") from exc
    return cl


def list_devices() -> list[tuple[int, int, object, object]]:
    """[(platform index, device index, platform, device)] for every OpenCL device."""
    cl = _cl()
    try:
        platforms = cl.get_platforms()
    except cl.Error as exc:
        raise DeviceError(INSTALL_HINT) from exc
    out = []
    for p, plat in enumerate(platforms):
        try:
            devs = plat.get_devices()
        except cl.Error:
            continue
        for d, dev in enumerate(devs):
            out.append((p, d, plat, dev))
    if not out:
        raise DeviceError(INSTALL_HINT)
    return out


def device_type_name(dev) -> str:
    cl = _cl()
    t = dev.type
    if t & cl.device_type.GPU:
        return "GPU"
    if t & cl.device_type.CPU:
        return "CPU"
    if t & cl.device_type.ACCELERATOR:
        return "ACCELERATOR"
    return "OTHER"


def select_device(spec: str = ""):
    """Pick a device: `spec` ("P:D", "P", or part of the device name), else
    $PYOPENCL_CTX (same forms), else the first GPU, else the first CPU.
    Never prompts."""
    devices = list_devices()
    spec = spec or os.environ.get("PYOPENCL_CTX", "")
    if spec:
        parts = spec.split(":")
        if all(x.strip().isdigit() for x in parts if x.strip()) and parts[0].strip():
            p = int(parts[0])
            d = int(parts[1]) if len(parts) > 1 and parts[1].strip() else 0
            for pi, di, _, dev in devices:
                if (pi, di) == (p, d):
                    return dev
            raise DeviceError(f"no OpenCL device '{spec}'; available: {_describe(devices)}")
        low = spec.lower()
        for _, _, plat, dev in devices:
            if low in dev.name.lower() or low in plat.name.lower():
                return dev
        raise DeviceError(f"no OpenCL device matches '{spec}'; available: {_describe(devices)}")
    for _, _, _, dev in devices:
        if device_type_name(dev) == "GPU":
            return dev
    return devices[0][3]


def _describe(devices) -> str:
    return "; ".join(f"{p}:{d} {dev.name.strip()} ({device_type_name(dev)})" for p, d, _, dev in devices)


def kernel_source_hash() -> str:
    """sha256 over every kernels/*.cl file (name and bytes), in name order."""
    h = hashlib.sha256()
    for path in sorted(KERNEL_DIR.glob("*.cl")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class Device:
    """One OpenCL context + in-order queue, with a program and kernel cache.

    `profile=True` records an event per launch; `take_timings()` returns
    {kernel name: (calls, total device ns)} and clears the record."""

    VARIANTS = ("cpu", "gpu")

    def __init__(self, spec: str = "", profile: bool = False, variant: str | None = None):
        """variant: which kernel family to build ("cpu": register tiles, "gpu":
        local-memory tiles); default by device type. Forcing "gpu" on a CPU is
        how the tests check the GPU kernels on PoCL."""
        cl = _cl()
        self.cl = cl
        self.device = select_device(spec)
        self.kind = device_type_name(self.device)
        self.is_cpu = self.kind == "CPU"
        if variant not in (None, *self.VARIANTS):
            raise DeviceError(f"unknown kernel variant {variant!r}: cpu or gpu")
        self.variant = variant or ("cpu" if self.is_cpu else "gpu")
        self.ctx = cl.Context([self.device])
        props = cl.command_queue_properties.PROFILING_ENABLE if profile else 0
        self.queue = cl.CommandQueue(self.ctx, properties=props)
        self.profile = profile
        self._programs: dict = {}
        self._kernels: dict = {}
        self._arg_dtypes: dict = {}   # kernel -> scalar dtypes it was told (launch)
        self._events: list = []

    @property
    def name(self) -> str:
        return self.device.name.strip()

    @property
    def platform_name(self) -> str:
        return self.device.platform.name.strip()

    @property
    def driver_version(self) -> str:
        return self.device.driver_version.strip()

    # -- programs and kernels -------------------------------------------------
    def program(self, filename: str, defines: tuple = ()):
        key = (filename, tuple(defines))
        prg = self._programs.get(key)
        if prg is None:
            src = (KERNEL_DIR / filename).read_text()
            opts = ["-cl-std=CL1.2", f"-I{KERNEL_DIR}"] + [f"-D{k}={v}" for k, v in defines]
            opts.append(f"-DDEVICE_{self.variant.upper()}=1")
            try:
                prg = self.cl.Program(self.ctx, src).build(options=opts)
            except self.cl.Error as exc:
                log = str(exc)   # the build log (exc.what is an error record, not a string)
                raise DeviceError(f"building kernels/{filename} failed: {_first_error_lines(str(log))}") from exc
            self._programs[key] = prg
        return prg

    def kernel(self, filename: str, name: str, defines: tuple = ()):
        key = (filename, name, tuple(defines))
        k = self._kernels.get(key)
        if k is None:
            k = self.cl.Kernel(self.program(filename, defines), name)
            self._kernels[key] = k
        return k

    def launch(self, kernel, gsize, lsize, *args):
        """Set args and enqueue; scalars must already be numpy scalars.
        Each kernel object is told its scalar dtypes once (set_scalar_arg_dtypes): pyopencl
        then packs the scalars itself, ~1 µs per launch instead of ~5 µs per numpy scalar
        (70 µs for a GEMM's 14 arguments: host time that competes with PoCL's workers)."""
        dtypes = tuple(getattr(a, "dtype", None) for a in args)   # None: a buffer
        if self._arg_dtypes.get(kernel) != dtypes:
            kernel.set_scalar_arg_dtypes(list(dtypes))
            self._arg_dtypes[kernel] = dtypes
        try:
            kernel.set_args(*args)
            ev = self.cl.enqueue_nd_range_kernel(self.queue, kernel, gsize, lsize)
        except self.cl.Error as exc:
            raise DeviceError(f"kernel {kernel.function_name} failed: {exc.code} {exc}") from exc
        if self.profile:
            self._events.append((kernel.function_name, ev))
        return ev

    def take_timings(self) -> dict[str, tuple[int, int]]:
        """{kernel name: (calls, total ns)} since the last call; waits for the queue."""
        if not self._events:
            return {}
        self.queue.finish()
        out: dict = defaultdict(lambda: [0, 0])
        for name, ev in self._events:
            rec = out[name]
            rec[0] += 1
            rec[1] += ev.profile.end - ev.profile.start
        self._events.clear()
        return {k: (v[0], v[1]) for k, v in out.items()}

    # -- memory ----------------------------------------------------------------
    def empty(self, shape, dtype=np.float32):
        import pyopencl.array as cla
        return cla.empty(self.queue, shape, dtype)

    def zeros(self, shape, dtype=np.float32):
        a = self.empty(shape, dtype)
        if a.nbytes:
            self.cl.enqueue_fill_buffer(self.queue, a.data, np.zeros(1, a.dtype), 0, a.nbytes)
        return a

    def to_device(self, host: np.ndarray):
        import pyopencl.array as cla
        return cla.to_device(self.queue, np.ascontiguousarray(host))

    def finish(self):
        self.queue.finish()

    def check_memory(self, buffers: dict) -> None:
        """Raise DeviceError (one line) unless buffers {name: (shape, dtype)} fit this device:
        each within CL_DEVICE_MAX_MEM_ALLOC_SIZE and below 2^31 elements (the kernels index
        with 32-bit ints), all together within CL_DEVICE_GLOBAL_MEM_SIZE. Allocates nothing."""
        if not buffers:
            return
        sizes = {name: (math.prod(shape), math.prod(shape) * np.dtype(dtype).itemsize)
                 for name, (shape, dtype) in buffers.items()}
        name = max(sizes, key=lambda k: sizes[k][1])
        count, nbytes = sizes[name]
        what = f"buffer {name!r} {tuple(buffers[name][0])} needs {format_bytes(nbytes)}"
        limit = self.device.max_mem_alloc_size
        if nbytes > limit:
            raise DeviceError(f"{what}, more than one buffer may hold on {self.name} "
                              f"(CL_DEVICE_MAX_MEM_ALLOC_SIZE {format_bytes(limit)})")
        big = max(sizes, key=lambda k: sizes[k][0])
        if sizes[big][0] >= 2**31:
            raise DeviceError(f"buffer {big!r} {tuple(buffers[big][0])} has {sizes[big][0]:,} elements; "
                              f"the kernels index with 32-bit ints (at most {2**31 - 1:,})")
        total, memory = sum(b for _, b in sizes.values()), self.device.global_mem_size
        if total > memory:
            raise DeviceError(f"the model needs {format_bytes(total)} of device memory (largest: {what}), "
                              f"more than {self.name} has (CL_DEVICE_GLOBAL_MEM_SIZE {format_bytes(memory)})")


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _first_error_lines(log: str, limit: int = 3) -> str:
    lines = [ln.strip() for ln in log.splitlines() if "error" in ln.lower()]
    return " | ".join(lines[:limit]) or log.strip().replace("\n", " | ")[:500]
