"""Benchmark the engine against the numpy reference and PyTorch (CPU or GPU), side by side.

    python -m benchmarks.speed                                # reference size, seed and hybrid (~3-4 min)
    python -m benchmarks.speed --sizes reference,gpu_sized    # and hidden 1024, batch 256, one JSON
    python -m benchmarks.speed --wirings all --json           # every preset but smoke, one JSON object
    python -m benchmarks.speed --quick --steps 2 --repeats 1 --set model.hidden_dim=32
    python -m benchmarks.speed --wirings attention_baseline --sizes batch12,batch64 --quick   # the transformer

One run measures, at each size of --sizes (reference: the config, defaults E=128, H=384,
T=72, B=64, S=64, V from the corpus; gpu_sized: the same with H=1024, B=256, which fills
a GPU):

- training throughput of each wiring (experiments/presets.py) on the engine and,
  when torch imports, on its PyTorch twin (benchmarks/torch_model.py's TorchHybrid; the
  transformer family's: benchmarks/torch_transformer.py), from the same initial
  parameters (the hybrid's engine.reference.init_params, any other family's declared
  draws, engine.params.init_params): fixed pre-drawn
  batches, 3 warm-up steps, then `--repeats` timings of `--steps` steps each; the
  engine's clock stops after `dev.finish()`, torch's on a GPU after
  `torch.cuda.synchronize()`. torch runs on the GPU (CUDA, or ROCm, which reports
  through torch.cuda) when the engine's device is a GPU and torch.cuda.is_available(),
  else on the CPU (--torch-device). Repeats are interleaved across wirings and
  implementations so that the machine's drift hits them alike;
- per-kernel device time of one step (a separate profiled pass, seed and hybrid), and
  each kernel's work from its launches (benchmarks/costs.py): GFLOP/s of the products,
  GB/s of the rest, and the share of the device's nominal FP32 peak or of its measured
  memory bandwidth (benchmarks/peak.py; both once per run);
- the numpy reference (engine/reference.py) on the same batches, a few steps (first size;
  the seed and hybrid wirings);
- each matrix product shape of the hybrid model: engine `ops.gemm` (with the transpose
  it does for trans_b) against `np.matmul` on the same float32 layout, GFLOP/s (first size;
  hybrid family only; --quick times each once, not --repeats times);
- generation latency of 200 characters (engine/generate.py; first size);
- warm start: a fresh `python -c` that imports the engine, builds a Trainer of the
  headline wiring (hybrid if measured, else the first) at this size with the program cache
  warm and runs the first step (--quick skips it, and the numpy reference).

The transformer family: `--wirings attention_baseline --sizes batch12,batch64` measures the
baseline's size (batch 12) and batch 64 in one run, engine and torch alternating.

Every timing starts after a 0.2 s pause and 0.15 s of untimed work (Pace; --smoke, for the tests,
drops both and shortens the gemm timings to 2 ms): numpy's OpenBLAS and torch's OpenMP
threads spin for ~0.1 s after their last call, and on two cores that spinning
slowed whatever was timed next (the engine's matrix products by up to 2x);
and after the pause this VM ran the engine at half speed for 50-100 ms, which
a training loop, never idle, does not see: the untimed work wakes it again.
The machine may be shared and noisy: every number is the median of the repeats,
with min and max beside it. Progress goes to standard error; the report (or,
with --json, one JSON object) to standard output. The JSON holds every size under
"sizes" and, for readers of one size (benchmarks/versus.py), the first size's figures at
its top level too. torch is optional.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from engine import ops
from engine import reference as ref
from engine.config import ConfigError, apply_overrides
from engine.data import Batches, DataError, Vocab, load_text, split_text
from engine.device import Device, DeviceError
from engine.model import Model
from engine.optim import make_optimizer
from engine.train import train_step

from . import costs, peak

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WIRINGS = ("seed", "hybrid")
# each size's overrides, applied over --set (a size decides its own keys)
SIZES = {"reference": (), "gpu_sized": ("model.hidden_dim=1024", "train.batch_size=256"),
         "batch12": ("train.batch_size=12",), "batch64": ("train.batch_size=64",)}
PROFILED = ("seed", "hybrid")
WARMUP_STEPS = 3
N_BATCHES = 8             # distinct pre-drawn batches, cycled
GEN_LENGTH, GEN_PROMPT = 200, "The "


@dataclasses.dataclass(frozen=True)
class Pace:
    """The pauses around every timing, and the least wall time of one gemm timing (seconds)."""
    settle_s: float = 0.2     # pause before every timing: OpenBLAS (numpy) and OpenMP (torch) worker
                              # threads keep spinning ~0.1 s after their last call, and on 2 cores that
                              # spinning, billed to whatever runs next, halved the engine's GFLOP/s
    warm_s: float = 0.15      # then this much untimed work: after 0.2 s idle this VM ran the engine
                              # at half speed for ~50-100 ms (a training loop never idles)
    gemm_min_s: float = 0.05  # each gemm timing covers at least this much wall time


PACE = Pace()
# --smoke (the tests): no pauses, one untimed call before each clock, 2 ms gemm timings. The same
# code runs and every figure is still measured, but the 2-core noise the pauses keep out is back in
SMOKE = Pace(settle_s=0.0, warm_s=0.0, gemm_min_s=0.002)


def settle(fn, finish=lambda: None, pace: Pace = PACE):
    """Before a clock starts: let the previous timing's worker threads (any library's) go idle,
    then run `fn` untimed for pace.warm_s (at least once) so that this library's threads and cores
    are awake again."""
    if pace.settle_s:
        time.sleep(pace.settle_s)
    t = time.perf_counter()
    while True:
        fn()
        finish()
        if time.perf_counter() - t >= pace.warm_s:
            return


def log(msg: str):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def summary(values) -> dict:
    """Median, min, max (and the relative spread (max − min)/median) of a list of numbers."""
    v = [float(x) for x in values]
    med = statistics.median(v)
    return {"median": med, "min": min(v), "max": max(v), "n": len(v),
            "spread": (max(v) - min(v)) / med if med else 0.0}


def wiring_of(cfg) -> ref.Wiring:
    h, p = cfg.hebb, cfg.proto
    return ref.Wiring(hebb_mode=h.mode, hebb_lr=h.lr, hebb_decay=h.decay, hebb_strength=h.strength,
                      hebb_post=h.post, proto_mode=p.mode, proto_lr=p.lr, proto_strength=p.strength,
                      proto_similarity=p.similarity, proto_usage_decay=p.usage_decay,
                      proto_reseed_threshold=p.reseed_threshold, spike_threshold=cfg.model.spike_threshold)


def try_torch():
    """(benchmarks.torch_model module, None) or (None, why torch is unusable)."""
    try:
        from . import torch_model
    except Exception as exc:  # ImportError, or a broken install (OSError from a missing .so)
        return None, f"torch not installed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    return torch_model, None


def initial_params(cfg, V, layers) -> dict:
    """The parameters both sides start from: the hybrid's engine.reference.init_params (as the
    benchmark always did), any other family's declared draws (engine.params.init_params)."""
    if cfg.model.family == "hybrid":
        return ref.init_params(V, cfg.model.embedding_dim, cfg.model.hidden_dim, cfg.seed)
    from engine.model import param_specs
    from engine.params import init_params
    return init_params(param_specs(layers), cfg.seed)


def torch_twin(tm, cfg, V, params, device):
    """cfg's family in PyTorch: TorchHybrid (tm, benchmarks.torch_model), TorchTransformer or TorchMemnet."""
    if cfg.model.family == "transformer":
        from .torch_transformer import TorchTransformer
        return TorchTransformer(cfg, V, params, device=device)
    if cfg.model.family == "memnet":   # the write rule runs in each step on both sides
        from .torch_memnet import TorchMemnet
        return TorchMemnet(cfg, V, params, device=device)
    return tm.TorchHybrid(cfg, V, params, device=device)


def torch_device(torch, engine_kind: str, choice: str = "auto") -> tuple[str, str, object]:
    """(torch device, its description, the function that waits for it). auto: the GPU when the
    engine's device is a GPU and torch.cuda.is_available() (ROCm builds answer there too), else
    the CPU, so that each side of the ratio runs on the same kind of hardware."""
    cuda = bool(torch.cuda.is_available())
    if choice == "cuda" and not cuda:
        raise ValueError("--torch-device cuda: torch.cuda.is_available() is False")
    if choice == "cuda" or (choice == "auto" and cuda and engine_kind != "CPU"):
        hip = getattr(torch.version, "hip", None)
        backend = f"ROCm {hip}" if hip else f"CUDA {torch.version.cuda}"
        return "cuda", f"cuda:0 {torch.cuda.get_device_name(0)} ({backend})", torch.cuda.synchronize
    return "cpu", f"cpu ({torch.get_num_threads()} threads)", lambda: None


# -- training-step runners ------------------------------------------------------------------------------
class EngineRunner:
    """The Trainer's step (forward, backward, AdamW, local rules) on fixed host batches."""

    def __init__(self, dev, cfg, V, batches, pace: Pace = PACE):
        self.dev, self.cfg, self.pace = dev, cfg, pace
        self.model = Model(dev, cfg, V)
        self.params = initial_params(cfg, V, self.model.layers)
        self.model.set_params(self.params)
        self.opt = make_optimizer(dev, cfg, self.model)
        self.ws = self.model.workspace(cfg.train.batch_size, cfg.train.seq_len)
        self.batches = [(np.ascontiguousarray(x.ravel(), np.int32), np.ascontiguousarray(y.ravel(), np.int32))
                        for x, y in batches]
        self.i = 0

    def step(self):
        m, ws = self.model, self.ws
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        ws.x.set(x)
        ws.y.set(y)
        train_step(m, self.opt, ws)
        m.local_updates(ws)

    def run(self, n: int) -> float:
        """Seconds for n steps, the device drained before the clock stops."""
        self.dev.finish()
        settle(self.step, self.dev.finish, self.pace)
        t = time.perf_counter()
        for _ in range(n):
            self.step()
        self.dev.finish()
        return time.perf_counter() - t

    def loss(self) -> float:
        return float(self.ws.loss_out.get()[0])


class TorchRunner:
    """TorchHybrid's step on fixed batches, already on its device; `sync` waits for that device."""

    def __init__(self, tm, cfg, V, batches, device="cpu", sync=lambda: None, params=None, pace: Pace = PACE):
        import torch
        self.pace = pace
        self.model = torch_twin(tm, cfg, V, params, device)
        self.batches = [(torch.from_numpy(x.astype(np.int64)).to(device), torch.from_numpy(y.astype(np.int64)).to(device))
                        for x, y in batches]
        self.sync = sync
        self.i = 0
        self.last = None

    def step(self):
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.last = self.model.train_step(x, y, self.model.lr_at(self.model.step + 1))

    def run(self, n: int) -> float:
        """Seconds for n steps; on a GPU the queue is drained before the clock starts and stops
        (on the CPU every op has finished when it returns: sync does nothing)."""
        settle(self.step, self.sync, self.pace)
        self.sync()
        t = time.perf_counter()
        for _ in range(n):
            self.step()
        self.sync()
        return time.perf_counter() - t

    def loss(self) -> float:
        return float(self.last)


def rate(times, steps, N) -> dict:
    return {"steps_per_s": summary([steps / t for t in times]),
            "tokens_per_s": summary([steps * N / t for t in times]),
            "step_ms": summary([1e3 * t / steps for t in times])}


def bench_training(dev, tm, cfgs, V, batches, steps, repeats, torch_on=("cpu", lambda: None), pace=PACE):
    """{wiring: {"engine": rate, "torch": rate | None}} and the engine runners (for generation).
    torch_on: (torch device, its sync function)."""
    eng, tor = {}, {}
    for name, cfg in cfgs.items():
        log(f"warm-up {name}: engine" + (", torch" if tm else ""))
        eng[name] = EngineRunner(dev, cfg, V, batches, pace)
        eng[name].run(WARMUP_STEPS)
        if tm:
            tor[name] = TorchRunner(tm, cfg, V, batches, *torch_on, params=eng[name].params, pace=pace)
            tor[name].run(WARMUP_STEPS)
    times = {name: {"engine": [], "torch": []} for name in cfgs}
    for r in range(repeats):
        for name in cfgs:
            times[name]["engine"].append(eng[name].run(steps))
            if tm:
                times[name]["torch"].append(tor[name].run(steps))
            log(f"repeat {r + 1}/{repeats} {name}: engine {steps / times[name]['engine'][-1]:.2f} steps/s"
                + (f", torch {steps / times[name]['torch'][-1]:.2f} steps/s" if tm else ""))
    out = {}
    for name, cfg in cfgs.items():
        N = cfg.train.batch_size * cfg.train.seq_len
        e = rate(times[name]["engine"], steps, N)
        e["final_loss"] = eng[name].loss()
        row = {"engine": e, "torch": None, "ratio": None}
        if tm:
            t = rate(times[name]["torch"], steps, N)
            t["final_loss"] = tor[name].loss()
            row["torch"] = t
            # each repeat's engine and torch timings ran back to back: the median of their ratios
            # cancels the machine's drift better than a ratio of medians
            pairs = summary([tt / te for te, tt in zip(times[name]["engine"], times[name]["torch"])])
            row["ratio"], row["ratio_range"] = pairs["median"], [pairs["min"], pairs["max"]]
        out[name] = row
    return out, eng


def bench_kernels(dev, cfgs, V, batches, peak_gflops=None, bandwidth_gb_s=None, steps=5, pace=PACE) -> dict:
    """Per-kernel device time of one step (mean over `steps`) on `dev`, a profiling Device, and
    each kernel's achieved rate from the work of its recorded launches (benchmarks/costs.py)."""
    names = [n for n in PROFILED if n in cfgs] or list(cfgs)[:1]
    out = {}
    with costs.Recorder(dev) as rec:
        for name in names:
            log(f"profiled pass {name}")
            runner = EngineRunner(dev, cfgs[name], V, batches, pace)
            runner.run(WARMUP_STEPS)
            dev.take_timings()
            rec.take()
            t = time.perf_counter()
            for _ in range(steps):
                runner.step()
            dev.finish()
            wall = time.perf_counter() - t
            timings = dev.take_timings()
            rows = costs.kernel_table(timings, rec.take(), steps, peak_gflops, bandwidth_gb_s)
            total = sum(ns for _, ns in timings.values())
            out[name] = {"kernels": rows, "device_ms_per_step": total / 1e6 / steps,
                         "wall_ms_per_step": 1e3 * wall / steps,
                         "launches_per_step": sum(r["calls_per_step"] for r in rows),
                         "no_model": [r["kernel"] for r in rows if r["model"] != "ok"]}
            del runner
    return out


def bench_numpy(cfgs, V, batches, steps) -> dict:
    """The numpy reference step (forward, backward, AdamW, local rules), float32, one warm-up step."""
    out = {}
    for name in [n for n in PROFILED if n in cfgs]:
        cfg = cfgs[name]
        log(f"numpy reference {name}: {steps} steps")
        E, H, T = cfg.model.embedding_dim, cfg.model.hidden_dim, cfg.model.num_prototypes
        o, w = cfg.optim, wiring_of(cfg)
        params, state = ref.init_params(V, E, H, cfg.seed), ref.init_state(H, T)
        m = {k: np.zeros_like(p) for k, p in params.items()}
        v = {k: np.zeros_like(p) for k, p in params.items()}
        mask = {k: k in ref.DECAYED for k in params}
        if w.proto_mode != "off":
            x0, y0 = batches[0]
            _, c0 = ref.model_forward(params, state, x0, y0, dataclasses.replace(w, proto_mode="off"))
            state["P"] = ref.kmeanspp_init(c0["ht"], T, cfg.seed)
        times = []
        for step in range(1, steps + 2):
            x, y = batches[(step - 1) % len(batches)]
            t = time.perf_counter()
            _, cache = ref.model_forward(params, state, x, y, w)
            grads = ref.model_backward(params, state, cache, w)
            ref.adamw_step(params, grads, m, v, step, o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, mask,
                           o.clip_norm, o.clip_value)
            ref.local_updates(state, cache, w, cfg.seed, step)
            if step > 1:                       # step 1 is the warm-up
                times.append(time.perf_counter() - t)
        out[name] = rate(times, 1, cfg.train.batch_size * cfg.train.seq_len)
    return out


# -- matrix products --------------------------------------------------------------------------------------
def gemm_shapes(cfg, V):
    """(label, M, N, K, batch, trans_a, trans_b) of every product the model's step does."""
    m, t = cfg.model, cfg.train
    E, H, T, B, S = m.embedding_dim, m.hidden_dim, m.num_prototypes, t.batch_size, t.seq_len
    N = B * S
    first = ([("fwd EW = W_emb·W1 (fold)", V, H, E, 1, False, False),      # engine.model.Workspace.fold
              ("bwd dW1 = W_embᵀ·D (fold)", E, H, V, 1, True, False),
              ("bwd dW_emb = D·W1ᵀ (fold)", V, E, H, 1, False, True)] if V < N else
             [("fwd a = e·W1", N, H, E, 1, False, False),
              ("bwd dW1 = eᵀ·da", E, H, N, 1, True, False),
              ("bwd de = da·W1ᵀ", N, E, H, 1, False, True)])
    return first + [
        ("fwd logits = z·W2", N, V, H, 1, False, False),
        ("bwd dW2 = zᵀ·dlogits", H, V, N, 1, True, False),
        ("bwd dz = dlogits·W2ᵀ", N, H, V, 1, False, True),
        # K·Kᵀ and dM·postᵀ: training steps fold them into causal_dots_decay (kernels/layers.cl,
        # lower triangle only); as full products they remain for telemetry and odd sizes
        ("fw G = K·Kᵀ (per seq; log points)", S, S, H, B, False, True),
        ("fw M = Gm·post (per seq)", S, H, S, B, False, False),
        ("fw bwd dM·postᵀ (odd sizes)", S, S, H, B, False, True),
        ("fw bwd dK = dGᵀ·K", S, H, S, B, True, False),
        ("proto scores = h̃·Pᵀ", N, T, H, 1, False, True),
        ("hebb W += hᵀ·post", H, H, N, 1, True, False),
        ("modulate h·W_hebb", N, H, H, 1, False, False),
        ("modulate bwd dz·W_hebbᵀ", N, H, H, 1, False, True),
    ]


def _calibrate(fn, finish, min_s) -> int:
    """Calls per timing so that one timing covers at least min_s."""
    fn()
    finish()
    t = time.perf_counter()
    fn()
    finish()
    one = max(time.perf_counter() - t, 1e-6)
    return max(1, min(2000, math.ceil(min_s / one)))


def _time_calls(fn, finish, reps, pace: Pace) -> float:
    """Seconds per call over `reps` calls, cut short after 4·pace.gemm_min_s (a load burst
    elsewhere on the machine must not stretch the whole benchmark)."""
    finish()
    settle(fn, finish, pace)
    t = time.perf_counter()
    for i in range(reps):
        fn()
        if i + 1 < reps and (i & 63) == 63:
            finish()
            if time.perf_counter() - t > 4 * pace.gemm_min_s:
                return (time.perf_counter() - t) / (i + 1)
    finish()
    return (time.perf_counter() - t) / reps


def bench_gemm(dev, cfg, V, repeats, pace=PACE) -> list:
    """Engine vs numpy per product shape; the repeats sweep over all shapes in turn, so a burst
    of load from elsewhere on the machine lands on one repeat of several shapes, not on every
    repeat of one."""
    rng = np.random.default_rng(0)
    cases = []
    for label, M, N, K, batch, ta, tb in gemm_shapes(cfg, V):
        a = rng.standard_normal((batch, K, M) if ta else (batch, M, K)).astype(np.float32)
        b = rng.standard_normal((batch, N, K) if tb else (batch, K, N)).astype(np.float32)
        c = np.zeros((batch, M, N), np.float32)
        da, db, dc = dev.to_device(a), dev.to_device(b), dev.to_device(c)
        opa = np.swapaxes(a, 1, 2) if ta else a
        opb = np.swapaxes(b, 1, 2) if tb else b
        if batch == 1:                         # a plain 2-D product, as the model would write it
            opa, opb, c = opa[0], opb[0], c[0]

        def eng(da=da, db=db, dc=dc, M=M, N=N, K=K, ta=ta, tb=tb, batch=batch):
            ops.gemm(dev, da, db, dc, M, N, K, trans_a=ta, trans_b=tb, batch=batch)

        def npy(opa=opa, opb=opb, c=c):
            np.matmul(opa, opb, out=c)

        eng()
        np.testing.assert_allclose(dc.get().reshape(c.shape), np.matmul(opa, opb), rtol=1e-3,
                                   atol=1e-3 * math.sqrt(K), err_msg=label)
        cases.append({"label": label, "shape": (M, N, K, batch, ta, tb), "eng": eng, "npy": npy,
                      "reps": (_calibrate(eng, dev.finish, pace.gemm_min_s),
                               _calibrate(npy, lambda: None, pace.gemm_min_s)), "te": [], "tn": []})
    for _ in range(repeats):
        for cs in cases:
            cs["te"].append(_time_calls(cs["eng"], dev.finish, cs["reps"][0], pace))
            cs["tn"].append(_time_calls(cs["npy"], lambda: None, cs["reps"][1], pace))
    rows = []
    for cs in cases:
        M, N, K, batch, ta, tb = cs["shape"]
        flop = 2.0 * M * N * K * batch
        ge, gn = [flop / t / 1e9 for t in cs["te"]], [flop / t / 1e9 for t in cs["tn"]]
        rows.append({"product": cs["label"], "M": M, "N": N, "K": K, "batch": batch, "trans_a": ta, "trans_b": tb,
                     "mflop": flop / 1e6, "engine_gflops": summary(ge), "numpy_gflops": summary(gn),
                     "engine_us": 1e6 * statistics.median(cs["te"]), "numpy_us": 1e6 * statistics.median(cs["tn"]),
                     "ratio": statistics.median(a / b for a, b in zip(ge, gn)),   # paired, as for training
                     "ratio_range": [min(a / b for a, b in zip(ge, gn)), max(a / b for a, b in zip(ge, gn))]})
    return rows


# -- generation and warm start ------------------------------------------------------------------------------
def bench_generation(model, vocab, repeats, pace=PACE) -> dict:
    from engine.generate import make_generator   # the family's: carried state, the key-value cache
    gen = make_generator(model, vocab)
    gen.sample(GEN_PROMPT, GEN_LENGTH, 1.0, 0, 0)          # warm-up: builds the B = S = 1 kernels
    times = []
    for r in range(repeats):
        settle(lambda: gen.sample(GEN_PROMPT, 20, 1.0, 0, 0), pace=pace)
        t = time.perf_counter()
        gen.sample(GEN_PROMPT, GEN_LENGTH, 1.0, 0, r)
        times.append(time.perf_counter() - t)
    family = model.cfg.model.family
    wiring = model.cfg.hebb.mode + "/" + model.cfg.proto.mode if family == "hybrid" else family
    return {"seconds": summary(times), "ms_per_char": 1e3 * statistics.median(times) / GEN_LENGTH,
            "length": GEN_LENGTH, "wiring": wiring, "generator": type(gen).__name__}


WARM_START_CODE = r"""
import json, sys, time
t0 = time.perf_counter()
from engine import ops
from engine.config import Config
from engine.train import Trainer
t1 = time.perf_counter()
tr = Trainer(Config.from_json(sys.argv[1]))
t2 = time.perf_counter()
m, ws, dev = tr.model, tr.ws, tr.dev
ws.offsets.set(tr.batches.next_offsets())
ops.gather_windows(dev, tr.ids_dev, ws.offsets, ws.S, ws.x, ws.y)
if not m.proto_ready:
    m.init_prototypes(ws)
lr = tr.opt.lr_at(m.step + 1)
m.forward(ws); m.backward(ws); tr.opt.step(m, lr); m.local_updates(ws)
loss = float(ws.loss_out.get()[0])
dev.finish()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "trainer_s": t2 - t1, "first_step_s": t3 - t2, "loss": loss}))
"""


def bench_warm_start(cfg, runs=3) -> dict:
    """Wall time of a fresh process: imports, Trainer(cfg) at this size, first training step."""
    cmd = [sys.executable, "-c", WARM_START_CODE, cfg.to_json()]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    walls, parts = [], []
    for i in range(runs + 1):                 # run 0 warms the program caches; not timed
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"warm-start process failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        log(f"warm start run {i}{' (warm-up)' if i == 0 else ''}: {wall:.2f} s")
        if i:
            walls.append(wall)
            parts.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"seconds": summary(walls),
            "breakdown_median_s": {k: statistics.median(p[k] for p in parts)
                                   for k in ("import_s", "trainer_s", "first_step_s")}}


# -- machine --------------------------------------------------------------------------------------------------
def machine_info(dev, torch_why) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu_model = names[0] if names else ""
    except OSError:
        cpu_model = ""
    info = {"processor": cpu, "cpu_model": cpu_model, "machine": platform.machine(),
            "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "opencl_device": dev.name, "opencl_platform": dev.platform_name, "opencl_driver": dev.driver_version,
            "opencl_compute_units": int(dev.device.max_compute_units), "numpy": np.__version__}
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads", "architecture",
                                               "threading_layer", "filepath")} for p in threadpool_info()]
    except Exception:  # threadpoolctl is optional
        info["blas"] = None
    if torch_why is None:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    else:
        info["torch"] = torch_why
    return info


# -- report -------------------------------------------------------------------------------------------------
def _mm(s: dict, fmt="{:.0f}") -> str:
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}-{fmt.format(s['max'])}]"


def _load(avg) -> str:
    return "/".join(f"{x:.1f}" for x in avg) if avg else "?"


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def _num(x) -> str:
    return "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def _table(header, rows) -> str:
    cols = [header] + rows
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def kernel_rows(rows) -> list[list]:
    """The per-kernel table's cells (benchmarks.costs.kernel_table rows)."""
    out = []
    for r in rows:
        pct = "-" if r["pct_peak"] is None else f"{r['pct_peak']:.0f}% " + ("FP32" if r["bound"] == "compute" else "BW")
        out.append([r["kernel"], f"{r['calls_per_step']:.0f}", f"{r['ms']:.3f}", _num(r["us_per_call"]),
                    f"{100 * r['share']:.1f}%", _num(r["gflops"]), _num(r["gb_s"]), pct,
                    "" if r["model"] == "ok" else r["model"]])
    return out


KERNEL_HEADER = ["kernel", "calls", "ms/step", "us/call", "share", "GFLOP/s", "GB/s", "% of peak", ""]


def _size_report(label, res: dict) -> list[str]:
    c = res["config"]
    out = [f"== size {label}: E={c['E']} H={c['H']} T={c['T']} B={c['B']} S={c['S']} V={c['V']}  "
           f"(N={c['N']} tokens/step) ==", ""]
    if "error" in res:
        return out + [f"failed: {res['error']}", ""]
    rows = []
    for name, r in res["wirings"].items():
        e, t = r["engine"], r["torch"]
        rows.append([name, _mm(e["tokens_per_s"]), _ms(e['step_ms']['median']),
                     _mm(t["tokens_per_s"]) if t else res["torch"], _ms(t['step_ms']['median']) if t else "-",
                     f"{r['ratio']:.2f} [{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}]" if r["ratio"] else "-"])
    out += [f"training throughput (tokens/s; torch on {res['torch_device'] or '-'})",
            _table(["wiring", "engine tok/s", "ms/step", "torch tok/s", "ms/step", "engine/torch (paired)"], rows), ""]
    if isinstance(res["numpy_reference"], dict):
        rows = []
        for name, r in res["numpy_reference"].items():
            eng = res["wirings"][name]["engine"]["tokens_per_s"]["median"]
            rows.append([name, _mm(r["tokens_per_s"]), _ms(r['step_ms']['median']),
                         f"{eng / r['tokens_per_s']['median']:.1f}"])
        out += ["numpy reference (float32)", _table(["wiring", "tok/s", "ms/step", "engine/numpy"], rows), ""]
    else:
        out += [f"numpy reference: {res['numpy_reference']}", ""]
    if isinstance(res["gemm"], list):
        rows = [[g["product"], f"({g['M']},{g['K']})x({g['K']},{g['N']})" + (f" x{g['batch']}" if g["batch"] > 1 else ""),
                 f"{g['mflop']:.1f}", _mm(g["engine_gflops"], "{:.1f}"), _mm(g["numpy_gflops"], "{:.1f}"),
                 f"{g['ratio']:.2f} [{g['ratio_range'][0]:.2f}-{g['ratio_range'][1]:.2f}]"] for g in res["gemm"]]
        out += ["matrix products (GFLOP/s; engine = ops.gemm incl. its transpose, numpy = np.matmul)",
                _table(["product", "shape", "MFLOP", "engine", "numpy", "engine/numpy (paired)"], rows), ""]
    else:
        out += [f"matrix products: {res['gemm']}", ""]
    for name, k in res["kernels"].items():
        out += [f"kernels per step, {name}: device {k['device_ms_per_step']:.2f} ms, wall (profiled) "
                f"{k['wall_ms_per_step']:.2f} ms, {k['launches_per_step']:.0f} launches",
                _table(KERNEL_HEADER, kernel_rows(k["kernels"])), ""]
    g = res["generation"]
    if isinstance(g, dict):
        out.append(f"generation ({g['wiring']}): {g['length']} characters in {_mm(g['seconds'], '{:.3f}')} s "
                   f"({g['ms_per_char']:.2f} ms/char)")
    w = res["warm_start"]
    if isinstance(w, dict):
        b = w["breakdown_median_s"]
        out.append(f"warm start (new process, program cache warm, first step done): {_mm(w['seconds'], '{:.2f}')} s "
                   f"(imports {b['import_s']:.2f}, Trainer {b['trainer_s']:.2f}, first step {b['first_step_s']:.2f})")
    elif g == w:
        out.append(f"generation and warm start: {w}")
    else:
        out.append(f"warm start: {w}")
    return out + [""]


def report(res: dict) -> str:
    mi, p, bw = res["machine"], res["device_peak"], res["bandwidth"]
    c = res["config"]
    out = [f"engine benchmark  ({c['steps']} steps x {c['repeats']} repeats after {WARMUP_STEPS} warm-up; "
           f"median [min-max])",
           f"machine: {mi['cpu_model'] or mi['processor']} ({mi['cpus_usable']} CPUs, load average "
           f"{_load(mi['loadavg'])} at start, {_load(mi['loadavg_end'])} at end), "
           f"\n         "
           f"OpenCL: {mi['opencl_device']} [{mi['opencl_platform']}], numpy {mi['numpy']}, torch: {mi['torch']}"
           + (f" on {res['torch_device']}" if res["torch_device"] else ""),
           f"device peak (nominal FP32): {p['formula']}",
           f"         assumption: {p['assumption']}",
           "memory bandwidth (measured): " + (f"{bw['gb_s']:.1f} GB/s [{bw['min']:.1f}-{bw['max']:.1f}], {bw['method']}"
                                              if bw.get("gb_s") else bw["method"]),
           "kernel tables: GFLOP/s and GB/s from each launch's work (benchmarks/costs.py) over its device time; "
           "% of peak: FP32 = of the nominal peak (products), BW = of the measured bandwidth (the rest; above "
           "100 % where the data stayed in cache)",
           ""]
    for label, r in res["sizes"].items():
        out += _size_report(label, r)
    rows = []
    for label, r in res["sizes"].items():
        for name, w in (r.get("wirings") or {}).items():
            rows.append([label, name, f"{w['engine']['tokens_per_s']['median']:,.0f}",
                         f"{w['torch']['tokens_per_s']['median']:,.0f}" if w["torch"] else "-",
                         f"{w['ratio']:.2f}" if w["ratio"] else "-",
                         f"{r['kernels'][name]['device_ms_per_step']:.2f}" if name in r["kernels"] else "-"])
    out += [f"summary (median tokens/s; torch: {res['torch_device'] or res['torch']})",
            _table(["size", "wiring", "engine", "torch", "engine/torch", "device ms/step"], rows),
            f"bench took {res['elapsed_s']:.0f} s: " + ", ".join(f"{k} {v:.0f}" for k, v in res["section_s"].items())]
    return "\n".join(out)


# -- main ---------------------------------------------------------------------------------------------------------
def parse_wirings(text: str) -> list[str]:
    from experiments import presets
    if text == "all":
        return [n for n in presets.EXPERIMENTS if n != "smoke"]
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        presets.get(n)                 # raises UnknownExperiment with a suggestion
    return names


def parse_sizes(text: str) -> list[str]:
    labels = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in labels if s not in SIZES]
    if not labels or bad or len(set(labels)) != len(labels):
        raise ValueError(f"--sizes takes distinct names from {', '.join(SIZES)}; got {text!r}")
    return labels


def size_configs(names, overrides, label) -> dict:
    """{wiring: Config} at one size: the preset, then --set, then the size's own keys."""
    from experiments import presets
    cfgs = {n: apply_overrides(presets.get(n).config(), [*overrides, *SIZES[label]]) for n in names}
    sizes = {(c.model.embedding_dim, c.model.hidden_dim, c.model.num_prototypes, c.train.batch_size,
              c.train.seq_len, c.data.path, c.seed) for c in cfgs.values()}
    if len(sizes) != 1:
        raise ConfigError("the wirings must share sizes, data and seed (same --set for all)")
    return cfgs


def run_size(label, cfgs, V, vocab, ids, devs, tm, torch_on, limits, args, first: bool) -> dict:
    """Every measurement at one size; the host-side comparisons (numpy, gemm against numpy,
    generation, warm start) only at the first size."""
    dev, pdev = devs
    base = next(iter(cfgs.values()))
    names = list(cfgs)
    B, S = base.train.batch_size, base.train.seq_len
    draw = Batches(ids, B, S, base.seed)
    batches = [draw.next_batch() for _ in range(N_BATCHES)]
    log(f"size {label}: E={base.model.embedding_dim} H={base.model.hidden_dim} T={base.model.num_prototypes} "
        f"B={B} S={S} V={V}")
    sections = {}

    def timed(section, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        sections[section] = time.perf_counter() - t
        return out

    pace = SMOKE if args.smoke else PACE
    training, runners = timed("training", bench_training, dev, tm, cfgs, V, batches, args.steps, args.repeats,
                              torch_on, pace)
    kernels = timed("kernels", bench_kernels, pdev, cfgs, V, batches, *limits, pace=pace)
    gemm = generation = numpy_ref = warm = "first size only"
    if first:
        log("matrix products")
        gemm = "hybrid family only"
        if base.model.family == "hybrid":
            gemm = timed("gemm", bench_gemm, dev, base, V, 1 if args.quick else args.repeats, pace)
        gen_name = "hybrid" if "hybrid" in runners else names[0]
        log(f"generation ({gen_name})")
        generation = timed("generation", bench_generation, runners[gen_name].model, vocab, args.repeats, pace)
        numpy_ref = warm = "skipped (--quick)"
        if not args.quick:
            numpy_ref = "seed and hybrid wirings only"
            if any(n in PROFILED for n in cfgs):
                numpy_ref = timed("numpy_reference", bench_numpy, cfgs, V, batches, args.numpy_steps)
            log("warm start")
            warm = timed("warm_start", bench_warm_start, cfgs["hybrid" if "hybrid" in cfgs else names[0]])
    head = "hybrid" if "hybrid" in training else names[0]
    hr = training[head]
    return {
        "size": label,
        "headline_wiring": head,
        "tokens_per_s": hr["engine"]["tokens_per_s"]["median"],
        "torch_tokens_per_s": hr["torch"]["tokens_per_s"]["median"] if hr["torch"] else None,
        "ratio": hr["ratio"],
        "wirings": training,
        "numpy_reference": numpy_ref,
        "gemm": gemm,
        "kernels": kernels,
        "generation": generation,
        "generation_s": generation["seconds"]["median"] if isinstance(generation, dict) else None,
        "warm_start": warm,
        "warm_start_s": warm["seconds"]["median"] if isinstance(warm, dict) else None,
        "config": {"E": base.model.embedding_dim, "H": base.model.hidden_dim, "T": base.model.num_prototypes,
                   "B": B, "S": S, "V": V, "N": B * S, "steps": args.steps, "repeats": args.repeats,
                   "warmup_steps": WARMUP_STEPS, "pace": dataclasses.asdict(pace), "wirings": names,
                   "overrides": [*args.set, *SIZES[label]],
                   "numpy_steps": None if args.quick or not first else args.numpy_steps},
        "section_s": sections,
    }


def run(args) -> dict:
    t_start = time.perf_counter()
    names = parse_wirings(args.wirings)
    labels = parse_sizes(args.sizes)
    by_size = {label: size_configs(names, args.set, label) for label in labels}
    base = next(iter(by_size[labels[0]].values()))
    text = load_text(base.data.path)
    train_text, _ = split_text(text, base.data.val_fraction)
    vocab = Vocab.from_text(train_text)
    ids = vocab.encode(train_text)
    tm, torch_why = try_torch()
    if tm is None:
        log(torch_why)
    dev = Device(base.device, profile=False)
    pdev = Device(base.device, profile=True)       # the per-kernel pass and the bandwidth copies
    machine = machine_info(dev, torch_why)
    torch_on, torch_label = ("cpu", lambda: None), None
    if tm:
        import torch
        where, torch_label, sync = torch_device(torch, dev.kind, args.torch_device)
        torch_on = (where, sync)
    machine["torch_device"] = torch_label
    log(f"device {dev.name}; wirings {', '.join(names)}; sizes {', '.join(labels)}; torch on {torch_label or '-'}")
    sections = {}
    nominal = peak.nominal_peak(dev.device, dev.kind)
    t = time.perf_counter()
    bandwidth = peak.measure_bandwidth(pdev)
    sections["bandwidth"] = time.perf_counter() - t
    log(f"nominal peak {nominal['gflops']:,.1f} GFLOP/s; measured bandwidth "
        + (f"{bandwidth['gb_s']:.1f} GB/s" if bandwidth.get("gb_s") else "?"))
    limits = (nominal["gflops"], bandwidth.get("gb_s"))
    sizes = {}
    for i, label in enumerate(labels):
        t = time.perf_counter()
        try:
            sizes[label] = run_size(label, by_size[label], vocab.size, vocab, ids, (dev, pdev), tm, torch_on,
                                    limits, args, first=i == 0)
        except (DeviceError, dev.cl.Error, MemoryError) as exc:
            if i == 0:
                raise
            c = next(iter(by_size[label].values()))
            log(f"size {label} failed: {exc}")
            sizes[label] = {"size": label, "error": f"{type(exc).__name__}: {exc}".splitlines()[0],
                            "config": {"E": c.model.embedding_dim, "H": c.model.hidden_dim,
                                       "T": c.model.num_prototypes, "B": c.train.batch_size, "S": c.train.seq_len,
                                       "V": vocab.size, "N": c.train.batch_size * c.train.seq_len}}
        sections[label] = time.perf_counter() - t
    res = dict(sizes[labels[0]])        # the first size at the top level: what one-size readers take
    res.update({
        "sizes": sizes,
        "torch": "ok" if tm else torch_why,
        "torch_device": torch_label,
        "device_peak": nominal,
        "bandwidth": bandwidth,
        "machine": machine,
    })
    for r in sizes.values():
        r["torch"], r["torch_device"] = res["torch"], torch_label
    res["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    res["elapsed_s"] = time.perf_counter() - t_start
    res["section_s"] = sections
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied to every wiring (repeatable)")
    ap.add_argument("--sizes", default="reference",
                    help="comma-separated sizes, each measured in turn: " + "; ".join(
                        f"{k}: {' '.join(v) or 'the config'}" for k, v in SIZES.items())
                    + " (a size's keys win over --set)")
    ap.add_argument("--repeats", type=int, default=5, help="timings per measurement (median, min, max)")
    ap.add_argument("--steps", type=int, default=20, help="training steps per timing")
    ap.add_argument("--wirings", default=",".join(DEFAULT_WIRINGS),
                    help="comma-separated presets (experiments/presets.py), or 'all' (every one but smoke)")
    ap.add_argument("--numpy-steps", type=int, default=2, help="timed numpy-reference steps per wiring")
    ap.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where torch runs: auto = the GPU (torch.cuda: CUDA or ROCm) when the engine's device "
                         "is a GPU and torch.cuda.is_available(), else the CPU")
    ap.add_argument("--quick", action="store_true",
                    help="skip the numpy reference and the warm start, and time each matrix product once")
    ap.add_argument("--smoke", action="store_true",
                    help="for tests: no pauses before the timings and 2 ms gemm timings (every figure still "
                         "measured, but noisier)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.numpy_steps < 1:
        print("error: --repeats, --steps and --numpy-steps must be >= 1", file=sys.stderr)
        return 2
    try:
        res = run(args)
    except (ConfigError, DataError, DeviceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1) if args.json else report(res))
    failed = [label for label, r in res["sizes"].items() if "error" in r]
    if failed:
        print(f"error: size {', '.join(failed)} failed (see the report)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
