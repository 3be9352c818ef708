"""Self-tuning of the GPU kernel variant's launch sizes, per device, cached on disk.

    python -m engine.devices --tune                      # every device: times, winner, cache
    python -m engine.devices --tune --device 0 --variant gpu --force --budget 10

What is tuned, on the GPU kernel variant only (Device.variant == "gpu"):
- the matrix products (kernels/gemm_gpu.cl): the tile side TS of a work-group and WPT, the
  outputs per work-item along each side (1: gemm_*_local, one output each; 2, 4, 8: the
  register-blocked gemm_*_block), from GEMM_CANDIDATES. Every candidate sums k ascending from 0
  with the same `acc += a·b`, so the choice does NOT change bits (tests/test_tune.py compares
  every candidate's products byte for byte);
- "red_wg", the work-group of the tree reductions (kernels/reduce.cl: gradient norm, loss
  summary, valid count, bucket sort, and every `_wg` kernel of engine.ops that reads it), from
  RED_WG_CANDIDATES. A work-group size decides the order of the tree sums, so this choice DOES
  change bits (each result stays within its float64 tolerance). A non-default candidate must be
  MARGIN faster than the default to be chosen, so noise on a busy machine rarely moves it.
Runs with the same cache entry are bit-identical; the choice is the run tag `opencl.tuning`
(experiments/tracking.py), and experiments.reproduce compares exactly only when it is the same.

The CPU variant tunes nothing: its only launch size that cannot change bits is the local size
of the product launches (ops._small_grid_local), and on PoCL (2 cores, 4096×384×128) NULL, (24,1,1),
(24,4,1) and (24,16,1) ran 4.3, 4.1, 4.5 and 4.5 ms: noise. apply() is instant there.

The search (search()) times each candidate through engine.ops at the reference model's sizes
(rows B·S = 64·64, hidden 384, embedding 128, vocabulary 104, 104,448 parameters): products
E→H, H→V and the transposed weight gradient Eᵀ·dA (K-split), then the reductions of a step.
Each is run once to build and warm up, then timed by wall clock around queue.finish (enough calls
per repetition to last ~2 ms), median of REPS. The whole search stops starting work when
budget_s is spent (3/4 for the products, the rest for the reductions; defaults first, so they
are always measured unless the budget is tiny); an unfinished candidate is not chosen.

The cache: JSON at $HYBRID_TUNE_CACHE, default ~/.cache/hybrid-engine/tune.json, one entry per
device name | platform | driver version | variant | kernel_source_hash (any kernels/*.cl change
re-tunes). Written atomically (a temporary file, then os.replace: several processes may write,
the last one wins, a reader never sees a torn file). An unreadable or corrupt cache is ignored
with a one-line warning and rewritten; an unwritable one costs a warning (once per process) and
the tuning is kept in memory for this process only: training goes on.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ops
from .device import DeviceError, kernel_source_hash

MODES = ("auto", "off", "force")
BIT_KEYS = {"red_wg": ops.RED_WG}   # tuning keys whose value changes results, with their defaults
GEMM_CANDIDATES = ((16, 1), (64, 4), (32, 4), (64, 8), (32, 2), (32, 1), (8, 1))   # (TS, WPT), default first
RED_WG_CANDIDATES = (64, 128, 256)                                                 # default first
DEFAULT_BUDGET_S = 4.0
GEMM_SHARE = 0.75     # of the budget, for the products; the reductions get the rest
REPS = 3
MARGIN = 0.05         # a non-default candidate must be this much faster than the default
SIZES = {"rows": 64 * 64, "hidden": 384, "embedding": 128, "vocab": 104, "params": 104448}
CACHE_FORMAT = 1

_MEMO: dict = {}      # cache key -> tuning found in this process (the file may be unwritable)
_WARNED: set = set()  # cache paths (unwritable) and file states (corrupt) already warned about


@dataclass
class Trial:
    """One candidate's measurement: ms is None when it was not finished (note says why)."""
    family: str        # "gemm" or "red_wg"
    value: tuple | int
    ms: float | None
    note: str = ""

    @property
    def label(self) -> str:
        if self.family == "gemm":
            ts, wpt = self.value
            return f"gemm TS={ts} WPT={wpt}"
        return f"red_wg={self.value}"


def same_bits(a: dict, b: dict) -> bool:
    """Whether two tunings give the same bits: equal in every BIT_KEYS value (defaults filled in)."""
    return all(a.get(k, d) == b.get(k, d) for k, d in BIT_KEYS.items())


# -- the cache -----------------------------------------------------------------------
def cache_path() -> Path:
    env = os.environ.get("HYBRID_TUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hybrid-engine" / "tune.json"


def cache_key(cl_device, variant: str) -> str:
    """name | platform | driver | variant | kernel source hash of a pyopencl device."""
    return " | ".join([cl_device.name.strip(), cl_device.platform.name.strip(), cl_device.driver_version.strip(),
                       variant, kernel_source_hash()])


def _read(path: Path) -> dict:
    """{key: entry} of the cache file; {} (with a one-line warning) when it is unreadable."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):   # not written yet (or cannot be: store() says so)
        return {}
    except OSError as exc:
        if ("read", str(path)) not in _WARNED:
            _WARNED.add(("read", str(path)))
            _warn(f"tuning cache {path} is unreadable ({exc.strerror or exc}); it is ignored")
        return {}
    try:
        data = json.loads(text)
        if not (isinstance(data, dict) and isinstance(data.get("entries"), dict)):
            raise ValueError("not a tuning cache")
    except ValueError as exc:
        st = path.stat()
        seen = (str(path), st.st_mtime_ns, st.st_size)   # warn once per state of the file, not per read
        if seen not in _WARNED:
            _WARNED.add(seen)
            _warn(f"tuning cache {path} is corrupt ({str(exc).splitlines()[0][:80]}); it is ignored and rewritten")
        return {}
    return data["entries"]


def _valid(tuning) -> bool:
    return (isinstance(tuning, dict) and set(tuning) == {"gemm_tile", "gemm_block", "red_wg"}
            and (tuning["gemm_tile"], tuning["gemm_block"]) in GEMM_CANDIDATES
            and tuning["red_wg"] in RED_WG_CANDIDATES)


def lookup(cl_device, variant: str) -> dict | None:
    """The cached tuning of this device and variant (the file, then this process's memory), or None."""
    key = cache_key(cl_device, variant)
    entry = _read(cache_path()).get(key)
    tuning = entry.get("tuning") if isinstance(entry, dict) else None
    if _valid(tuning):
        return dict(tuning)
    return _MEMO.get(key)


def store(dev, tuning: dict, trials=()) -> bool:
    """Write dev's tuning into the cache (atomically); False, with a warning once, if it cannot."""
    key = cache_key(dev.device, dev.variant)
    _MEMO[key] = dict(tuning)
    path = cache_path()
    entries = _read(path)
    entries[key] = {"tuning": tuning, "times_ms": {t.label: t.ms for t in trials},
                    "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=1, sort_keys=True))
        os.replace(tmp, path)
        return True
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if str(path) not in _WARNED:
            _WARNED.add(str(path))
            _warn(f"cannot write the tuning cache {path} ({exc.strerror or exc}); the tuning is kept for "
                  f"this process only (set HYBRID_TUNE_CACHE to a writable file)")
        return False


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# -- the search ----------------------------------------------------------------------
def gemm_fits(dev, ts: int, wpt: int) -> str:
    """"" if (TS, WPT) can launch on dev (work-group and local memory limits), else why not."""
    d, r = dev.device, ts // wpt
    if ts % wpt:
        return "WPT does not divide TS"
    if r * r > d.max_work_group_size or r > min(d.max_work_item_sizes[:2]):
        return f"{r}×{r} work-items > the device's {d.max_work_group_size}"
    if 2 * ts * (ts + 1) * 4 > d.local_mem_size:
        return f"{2 * ts * (ts + 1) * 4} B of local memory > the device's {d.local_mem_size}"
    return ""


def red_fits(dev, wg: int) -> str:
    d = dev.device
    return "" if wg <= min(d.max_work_group_size, d.max_work_item_sizes[0]) else \
        f"{wg} work-items > the device's {d.max_work_group_size}"


def search(dev, budget_s: float = DEFAULT_BUDGET_S, sizes: dict | None = None) -> tuple[dict, list[Trial]]:
    """Time every candidate that fits dev (GPU variant) within about budget_s seconds; returns the
    winning tuning {"gemm_tile", "gemm_block", "red_wg"} and one Trial per candidate."""
    if dev.variant != "gpu":
        raise DeviceError(f"engine.tune tunes the gpu kernel variant; {dev.name} builds the {dev.variant} one")
    z = {**SIZES, **(sizes or {})}
    start = time.perf_counter()
    gemm_end, red_end = start + GEMM_SHARE * budget_s, start + budget_s
    rng = np.random.default_rng(0)
    trials = []
    with _trying(dev):
        gemm_cases = _gemm_cases(dev, rng, z)
        for ts, wpt in GEMM_CANDIDATES:
            trials.append(_trial(dev, "gemm", (ts, wpt), gemm_fits(dev, ts, wpt), gemm_cases, gemm_end,
                                 {"gemm_tile": ts, "gemm_block": wpt}))
        red_cases = _red_cases(dev, rng, z)
        for wg in RED_WG_CANDIDATES:
            trials.append(_trial(dev, "red_wg", wg, red_fits(dev, wg), red_cases, red_end, {"red_wg": wg}))
    ts, wpt = _best([t for t in trials if t.family == "gemm"])
    return {"gemm_tile": ts, "gemm_block": wpt, "red_wg": _best([t for t in trials if t.family == "red_wg"])}, trials


def _best(trials: list[Trial]):
    """The fastest finished candidate; the default (the first) unless another beats it by MARGIN."""
    default = trials[0]
    done = [t for t in trials if t.ms is not None]
    if not done:
        return default.value
    best = min(done, key=lambda t: t.ms)
    if default.ms is not None and best.ms > (1 - MARGIN) * default.ms:
        return default.value
    return best.value


def _trial(dev, family, value, unfit: str, cases, deadline: float, tuning: dict) -> Trial:
    if unfit:
        return Trial(family, value, None, f"does not fit: {unfit}")
    if time.perf_counter() >= deadline:
        return Trial(family, value, None, "not timed: budget spent")
    dev.tuning = tuning
    total = 0.0
    try:
        for fn in cases:
            ms = _time(dev, fn, deadline)
            if ms is None:
                return Trial(family, value, None, "not finished: budget spent")
            total += ms
    except (DeviceError, dev.cl.Error) as exc:   # e.g. the compiled kernel allows fewer work-items
        return Trial(family, value, None, f"failed: {str(exc).splitlines()[0][:100]}")
    return Trial(family, value, total)


def _time(dev, fn, deadline: float) -> float | None:
    """Median ms of one fn() over REPS repetitions, after a warm-up call (it builds the kernels);
    a call too short for the wall clock (< 1 ms) is repeated ~2 ms' worth per repetition. None if
    the deadline passes first."""
    fn()
    dev.finish()
    reps, calls = [], 1
    while len(reps) < REPS:
        if time.perf_counter() >= deadline:
            return None
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        dev.finish()
        elapsed = time.perf_counter() - t
        if calls == 1 and elapsed < 1e-3:
            calls = min(100, max(2, int(2e-3 / max(elapsed, 1e-7))))
            continue
        reps.append(elapsed / calls)
    return 1e3 * statistics.median(reps)


def _gemm_cases(dev, rng, z) -> list:
    """The reference model's products: e·W1 (rows×E → H), h·W2 (H → V), and the weight
    gradient eᵀ·dA (E×H over the rows, transposed A, K-split as in training)."""
    N, H, E, V = z["rows"], z["hidden"], z["embedding"], z["vocab"]

    def data(*shape):
        return dev.to_device(rng.standard_normal(shape).astype(np.float32))

    e, W1, h, W2, dA = data(N, E), data(E, H), data(N, H), data(H, V), data(N, H)
    a, logits, dW1 = dev.empty((N, H)), dev.empty((N, V)), dev.empty((E, H))
    return [lambda: ops.gemm(dev, e, W1, a, N, H, E),
            lambda: ops.gemm(dev, h, W2, logits, N, V, H),
            lambda: ops.gemm(dev, e, dA, dW1, E, H, N, trans_a=True)]


def _red_cases(dev, rng, z) -> list:
    """The reductions of one training step through engine.ops: the loss (softmax rows, valid
    count, summary), the bucket sort of the batch's characters, row norms, the gradient norm."""
    N, H, V, n = z["rows"], z["hidden"], z["vocab"], z["params"]
    chunk = 1024
    n_chunks = -(-n // chunk)
    y = dev.to_device(rng.integers(0, V, N).astype(np.int32))
    logits = dev.to_device(rng.standard_normal((N, V)).astype(np.float32))
    h = dev.to_device(rng.standard_normal((N, H)).astype(np.float32))
    g = dev.to_device(rng.standard_normal(n_chunks * chunk).astype(np.float32))
    nv, out, rows, hits, dl = dev.empty((1,), np.int32), dev.empty((4,)), dev.empty((N,)), dev.empty((N,)), \
        dev.empty((N, V))
    starts, perm, k, inv = dev.empty((V + 1,), np.int32), dev.empty((N,), np.int32), dev.empty((N, H)), \
        dev.empty((N,))
    partial, gnorm = dev.empty((n_chunks,)), dev.empty((1,))

    def step():
        ops.count_valid(dev, y, N, nv)
        ops.softmax_xent(dev, logits, y, nv, rows, hits, dl, N, V)
        ops.loss_reduce(dev, rows, hits, nv, out, N)
        ops.bucket_sort(dev, y, N, V, starts, perm)
        ops.row_normalize_forward(dev, h, k, inv, N, H)
        ops.sumsq_chunks(dev, g, partial, n_chunks, chunk)
        ops.global_norm(dev, partial, n_chunks, gnorm)
    return [step]


@contextmanager
def _trying(dev):
    """Lend dev to the search: its tuning, explicit gemm tile (tests), profiling record and
    workspace come back as they were, so the search leaves no trace in telemetry or memory."""
    saved = {k: dev.__dict__[k] for k in ("tuning", "gemm_tile", "gemm_block") if k in dev.__dict__}
    for k in saved:
        del dev.__dict__[k]
    profile, workspace = dev.profile, dict(dev.__dict__.get("_workspace", {}))
    dev.profile = False
    try:
        yield
    finally:
        dev.finish()
        dev.profile = profile
        dev.__dict__.pop("tuning", None)
        dev.__dict__.update(saved)
        dev.__dict__["_workspace"] = workspace


# -- entry points ----------------------------------------------------------------------
def tune(dev, budget_s: float = DEFAULT_BUDGET_S, force: bool = False, sizes: dict | None = None) -> dict:
    """dev's tuning: the cached one, else (or with force) a search, then cached. {} on the CPU
    variant (nothing is tuned there). Does not set dev.tuning (apply() does). sizes: the search's
    problem sizes (SIZES, the reference model's, by default; the tests use small ones)."""
    if dev.variant != "gpu":
        return {}
    if not force:
        cached = lookup(dev.device, dev.variant)
        if cached is not None:
            return cached
    print(f"note: tuning the gpu kernels' launch sizes for {dev.name} (at most ~{budget_s:g} s, once per device "
          f"and kernel version; cached in {cache_path()})", file=sys.stderr)
    winner, trials = search(dev, budget_s, sizes)
    store(dev, winner, trials)
    return winner


def apply(dev, mode: str = "auto", budget_s: float = DEFAULT_BUDGET_S, sizes: dict | None = None) -> dict:
    """Set dev.tuning by the config key `tune`: "auto" (the cache; a search on a miss), "force"
    (search again), "off" (the defaults, {}). Returns dev.tuning."""
    if mode not in MODES:
        raise ValueError(f"tune mode must be one of {', '.join(MODES)}, got {mode!r}")
    dev.tuning = {} if mode == "off" else tune(dev, budget_s, force=mode == "force", sizes=sizes)
    return dev.tuning
