"""The PyTorch baseline (benchmarks/torch_model.py) against the engine and the numpy
reference, and the benchmark command line (benchmarks/speed.py).

    python -m pytest tests/test_bench.py -q

torch is optional: only the tests that need it skip without it. Small sizes
(E=16, H=24, T=5, B=5, S=8) so the file runs in seconds on PoCL.
"""
import dataclasses
import json
from functools import partial
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import B, E, H, S, T, TEXT, wiring_of  # shared tiny sizes and text

from engine import reference as ref
from engine.data import Batches, Vocab
from engine.model import Model
from engine.optim import lr_at, make_optimizer
from experiments import presets

pytestmark = pytest.mark.opencl

REPO = Path(__file__).resolve().parent.parent

STEPS = 5
SIZES = {"model.embedding_dim": E, "model.hidden_dim": H, "model.num_prototypes": T,
         "train.batch_size": B, "train.seq_len": S, "train.steps": 20, "optim.warmup_steps": 2}


def setup(name, **extra):
    cfg = presets.get(name).config({**SIZES, **extra})
    vocab = Vocab.from_text(TEXT)
    draw = Batches(vocab.encode(TEXT), B, S, cfg.seed)
    return cfg, vocab.size, [draw.next_batch() for _ in range(STEPS)]


def engine_losses(dev, cfg, V, batches):
    """Per-step losses of the engine driven like the Trainer (k-means++ on the first batch)."""
    model = Model(dev, cfg, V)
    model.set_params(ref.init_params(V, E, H, cfg.seed))
    opt = make_optimizer(dev, cfg, model)
    ws = model.workspace(B, S)
    losses = []
    for x, y in batches:
        ws.x.set(x.ravel())
        ws.y.set(y.ravel())
        if not model.proto_ready:
            model.init_prototypes(ws)
        lr = opt.lr_at(model.step + 1)
        model.forward(ws)
        losses.append(float(ws.loss_out.get()[0]))
        model.backward(ws)
        opt.step(model, lr)
        model.local_updates(ws)
    return model, losses


def torch_losses(tm, cfg, V, batches, lr_at):
    model = tm.TorchHybrid(cfg, V)
    return model, [model.train_step(x, y, lr_at(step), return_loss=True) for step, (x, y) in enumerate(batches, 1)]


def reference_first_loss(cfg, V, batches):
    """The float64 numpy reference's first-step loss (k-means++ P from the same batch)."""
    params = {k: v.astype(np.float64) for k, v in ref.init_params(V, E, H, cfg.seed).items()}
    state = ref.init_state(H, T, np.float64)
    w = wiring_of(cfg)
    x, y = batches[0]
    if w.proto_mode != "off":
        _, c0 = ref.model_forward(params, state, x, y, dataclasses.replace(w, proto_mode="off"))
        state["P"] = ref.kmeanspp_init(c0["ht"], T, cfg.seed)
    loss, _ = ref.model_forward(params, state, x, y, w)
    return float(loss)


# Every wiring test: the fast decay and high threshold make the re-seeding rule act within
# five steps, so the host-side hash of TorchHybrid is exercised too.
CASES = {"hybrid": {}, "seed": {}, "control_modulate": {},
         "reseed": {"proto.usage_decay": 0.6, "proto.reseed_threshold": 0.7}}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_matches_engine_and_reference(dev, case):
    tm = pytest.importorskip("benchmarks.torch_model", reason="torch is optional")
    name = "hybrid" if case == "reseed" else case
    cfg, V, batches = setup(name, **CASES[case])
    model, eng = engine_losses(dev, cfg, V, batches)
    tmodel, tor = torch_losses(tm, cfg, V, batches, partial(lr_at, cfg.optim, cfg.train.steps))
    want = reference_first_loss(cfg, V, batches)
    # first step: the same parameters, P from the same k-means++ draw; float32 sums in different
    # orders (GEMM blocking, erf in float32 vs rounded float64): observed ≤ 1e-6 on losses ≈ 3-5
    assert abs(eng[0] - want) < 1e-4 and abs(tor[0] - want) < 1e-4, (eng[0], tor[0], want)
    # five steps of AdamW, clipping and the local rules: the trajectories differ only by float32
    # rounding, which Adam's m/sqrt(v) can enlarge to ~lr·1e-3 per step on near-zero gradients
    # (observed ≤ 2e-6 over 20 steps at these sizes); 1e-4 leaves room for that and for other
    # BLAS builds, while leaving out the prototype rule or clipping moves some loss by > 2e-4
    # (test below)
    np.testing.assert_allclose(tor, eng, rtol=0, atol=1e-4)
    assert eng[-1] != eng[0]                                        # it trained
    np.testing.assert_allclose(tmodel.P.numpy(), model.P.get(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tmodel.usage.numpy(), model.usage.get(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tmodel.W_hebb.numpy(), model.W_hebb.get(), rtol=1e-4, atol=1e-5)
    if case == "reseed":
        assert np.isclose(tmodel.usage.numpy(), 1.0 / T).any()      # a prototype was re-seeded


def test_five_step_tolerance_is_discriminating(dev):
    """Backs the 1e-4 above: dropping one rule of the torch step moves some loss by more than 2e-4."""
    tm = pytest.importorskip("benchmarks.torch_model", reason="torch is optional")
    cfg, V, batches = setup("hybrid")
    model, eng = engine_losses(dev, cfg, V, batches)
    variants = {"no prototype rule": lambda m: setattr(m, "local_updates", lambda cache: None),
                "no clipping": lambda m: setattr(m, "cfg", dataclasses.replace(
                    m.cfg, optim=dataclasses.replace(m.cfg.optim, clip_norm=0.0)))}
    for label, mutate in variants.items():
        tmodel = tm.TorchHybrid(cfg, V)
        mutate(tmodel)
        tor = [tmodel.train_step(x, y, lr_at(cfg.optim, cfg.train.steps, s), return_loss=True)
               for s, (x, y) in enumerate(batches, 1)]
        # Adam is nearly invariant to a uniform rescaling, so leaving out the global-norm clip
        # moves these losses by only 2.6e-4 (the prototype rule by more): still > 2x the 1e-4
        assert np.abs(np.array(tor) - np.array(eng)).max() > 2e-4, label


QUICK = ["--json", "--steps", "2", "--repeats", "1", "--set", "model.hidden_dim=32", "--set", "model.embedding_dim=16",
         "--set", "train.batch_size=4", "--set", "train.seq_len=8", "--set", "model.num_prototypes=4",
         "--wirings", "seed,hybrid", "--quick", "--smoke"]      # --smoke: no settle pauses, 2 ms gemm timings


def test_bench_quick_json_two_sizes(dev, monkeypatch, capsys):
    """One run at two sizes (gpu_sized shrunk to H=40, B=6 here): both results under their names,
    the first also at the top level, the peak, the measured bandwidth and the per-kernel rates."""
    from benchmarks import speed
    monkeypatch.setitem(speed.SIZES, "gpu_sized", ("model.hidden_dim=40", "train.batch_size=6"))
    assert speed.main([*QUICK, "--sizes", "reference,gpu_sized"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert list(res["sizes"]) == ["reference", "gpu_sized"]
    ref_size, gpu = res["sizes"]["reference"], res["sizes"]["gpu_sized"]
    assert (ref_size["config"]["H"], ref_size["config"]["B"]) == (32, 4) and (gpu["config"]["H"], gpu["config"]["B"]) == (40, 6)
    assert res["wirings"] == ref_size["wirings"] and res["tokens_per_s"] == ref_size["tokens_per_s"] > 0
    assert res["headline_wiring"] == "hybrid" and res["generation_s"] > 0
    assert gpu["gemm"] == gpu["generation"] == "first size only" and res["gemm"]
    assert all(g["engine_gflops"]["median"] > 0 and g["numpy_gflops"]["median"] > 0 for g in res["gemm"])
    assert ref_size["config"]["pace"] == dataclasses.asdict(speed.SMOKE) != dataclasses.asdict(speed.PACE)
    p = res["device_peak"]
    assert p["gflops"] > 0 and p["gflops"] == pytest.approx(p["compute_units"] * p["clock_mhz"] * p["lanes_per_unit"] * 2 / 1e3)
    assert res["bandwidth"]["gb_s"] > 0 and res["bandwidth"]["min"] <= res["bandwidth"]["gb_s"] <= res["bandwidth"]["max"]
    for size in (ref_size, gpu):
        assert set(size["wirings"]) == set(size["kernels"]) == {"seed", "hybrid"}
        for name, k in size["kernels"].items():
            assert k["device_ms_per_step"] > 0 and size["wirings"][name]["engine"]["tokens_per_s"]["median"] > 0
            rows = {r["kernel"]: r for r in k["kernels"]}
            g = rows["gemm_nn"]
            assert g["model"] == "ok" and g["bound"] == "compute" and g["gflops"] > 0
            assert g["pct_peak"] == pytest.approx(100 * g["gflops"] / p["gflops"])
            assert g["us_per_call"] == pytest.approx(1e3 * g["total_ms"] / g["calls"])
            a = rows["adamw"]
            assert a["bound"] == "memory" and a["gflops"] is None
            assert a["pct_peak"] == pytest.approx(100 * a["gb_s"] / res["bandwidth"]["gb_s"])
    assert res["machine"]["opencl_device"] and res["machine"]["cpu_count"] >= 1
    if res["torch"] == "ok":
        assert res["torch_tokens_per_s"] > 0 and res["ratio"] > 0 and res["torch_device"]
    else:
        assert res["torch_tokens_per_s"] is None and res["torch"].startswith("torch not installed")


def test_bench_without_torch(dev):
    """torch missing (or broken): the engine is still measured and the JSON says why torch is not."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from benchmarks.speed import main\n"
            f"sys.exit(main({QUICK!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["tokens_per_s"] > 0 and res["torch_tokens_per_s"] is None and res["ratio"] is None
    assert res["torch"].startswith("torch not installed")


def test_bench_rejects_unknown_wiring():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--wirings", "hybrd", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "did you mean 'hybrid'" in proc.stderr, proc.stderr


def test_bench_does_not_import_torch():
    """torch stays optional: importing the benchmark module must not import it."""
    code = "import sys, benchmarks.speed; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True).returncode == 0


def test_versus_runs_both_trees_and_reports_paired_ratios():
    """benchmarks.versus against this very commit: both sides run the same code, so each
    round's ratio is a real measurement of two runs, and the JSON carries both sides."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.versus", head, "--rounds", "1", "--steps", "2",
                           "--repeats", "1", "--wirings", "seed", "--json", "--smoke", "--set", "model.hidden_dim=32",
                           "--set", "model.embedding_dim=16", "--set", "model.num_prototypes=8",
                           "--set", "train.batch_size=4", "--set", "train.seq_len=8"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout)["wirings"]["seed"]
    assert res["new_tokens_per_s"] > 0 and res["old_tokens_per_s"] > 0
    assert res["ratio_min"] <= res["ratio_median"] <= res["ratio_max"]
    assert proc.stderr.count("round 1/1: seed ") == 1



# -- per-kernel work, peak, torch's device -----------------------------------------------------------
def gemm_launch(kernel, M, N, K, gsize, beta=0.0, extra=()):
    """A Launch of a GEMM-signature kernel (kernels/gemm.cl argument order; buffers as byte sizes)."""
    from benchmarks.costs import Launch
    return Launch(kernel, gsize, None, (M, N, K, 1.0, beta, 4 * M * K, 0, M * K, 4 * K * N, 0, K * N,
                                        4 * M * N, 0, M * N, *extra))


def test_gemm_cost_of_known_shapes():
    from benchmarks.costs import Launch, launch_cost
    c, why = launch_cost(gemm_launch("gemm_nn", 64, 32, 48, (2, 16, 1)))          # 16 row tiles of TM = 4
    assert why == "" and c.bound == "compute"
    assert c.flops == 2 * 64 * 32 * 48 == 196_608
    assert c.bytes == 4 * (64 * 48 + 48 * 32 + 64 * 32) == 26_624                  # A, B read; C written
    c, _ = launch_cost(gemm_launch("gemm_nn", 66, 32, 48, (2, 16, 1)))            # rows 64, 65: the edge kernel's
    assert c.flops == 2 * 64 * 32 * 48
    c, _ = launch_cost(gemm_launch("gemm_nn_edge", 66, 32, 48, (2, 1, 1), extra=(64,)))
    assert c.flops == 2 * 2 * 32 * 48
    c, _ = launch_cost(gemm_launch("gemm_tn_local", 64, 32, 48, (32, 64, 3), beta=1.0))   # batch 3, C read too
    assert c.flops == 3 * 196_608 and c.bytes == 3 * 4 * (64 * 48 + 48 * 32 + 2 * 64 * 32)
    split = Launch("gemm_tn_split", (16, 2, 4), None, (64, 32, 512, 2048, 4 * 64 * 2048, 4 * 2048 * 32, 0, 4 * 4 * 64 * 32))
    assert launch_cost(split)[0].flops == 2 * 64 * 32 * 2048
    assert launch_cost(Launch("gemm_nn", (2, 16, 1), None, (64, 32)))[1].startswith("no model (model expects 14")
    assert launch_cost(Launch("a_new_kernel", (8,), None, ()))[1] == "no model"


def test_recorder_sees_every_launch_of_a_step(dev):
    """One tiny seed step: every kernel the profile timed is in the table with as many recorded
    launches, and the products' flops are those of the model's matrix products (speed.gemm_shapes)."""
    from benchmarks import costs
    from benchmarks.speed import EngineRunner, gemm_shapes
    cfg, V, batches = setup("seed")
    runner = EngineRunner(dev, cfg, V, batches)
    with costs.Recorder(dev) as rec:
        runner.step()                                    # the prototypes' k-means++ start: not counted
        dev.finish()
        dev.take_timings()
        rec.take()
        runner.step()
        timings = dev.take_timings()
        launches = rec.take()
    assert "launch" not in vars(dev)                     # the Device's own method again
    rows = costs.kernel_table(timings, launches, 1, peak_gflops=100.0, bandwidth_gb_s=10.0)
    assert [r["kernel"] for r in rows] and {r["kernel"] for r in rows} == set(timings)
    assert sum(r["calls"] for r in rows) == len(launches) == sum(c for c, _ in timings.values())
    for r in rows:
        assert r["calls"] == sum(1 for l in launches if l.kernel == r["kernel"])
        assert r["total_ms"] == pytest.approx(timings[r["kernel"]][1] / 1e6)
    products = [r for r in rows if r["bound"] == "compute"]
    assert products and all(r["model"] == "ok" and r["gflops"] > 0 for r in products)
    counted = sum(costs.launch_cost(l)[0].flops for l in launches
                  if l.kernel.startswith("gemm_") and l.kernel != "gemm_reduce")
    # seed: fold (N > V), output layer, prototype scores, Hebbian update; no fast weights, no
    # modulation. The output layer's rows are V rounded up to 8 floats (float8 rows): its three
    # products do 2·N·H·V8 each (the model at the reference size has V = 104 = V8)
    V8 = -(-V // 8) * 8
    want = sum(2 * M * N * K * b * (V8 / V if "W2" in label else 1) for label, M, N, K, b, _, _ in gemm_shapes(cfg, V)
               if not label.startswith(("fw ", "modulate")))
    assert V8 != V and counted == want


def test_nominal_peak_formula():
    from types import SimpleNamespace as NS
    from benchmarks.peak import nominal_peak
    h200 = NS(name="NVIDIA H200", vendor="NVIDIA Corporation", max_compute_units=132, max_clock_frequency=1980,
              native_vector_width_float=1)
    p = nominal_peak(h200, kind="GPU")
    assert p["gflops"] == pytest.approx(132 * 1980 * 128 * 2 / 1e3)                 # 66.9 TFLOP/s
    assert p["lanes_per_unit"] == 128 and "Hopper" in p["assumption"]
    a100 = NS(name="NVIDIA A100-SXM4-80GB", vendor="NVIDIA Corporation", max_compute_units=108,
              max_clock_frequency=1410, native_vector_width_float=1)
    assert nominal_peak(a100, kind="GPU")["gflops"] == pytest.approx(108 * 1410 * 64 * 2 / 1e3)   # NVIDIA: 19.5 TFLOPS
    mi = NS(name="gfx942", vendor="Advanced Micro Devices, Inc.", max_compute_units=304, max_clock_frequency=2100,
            native_vector_width_float=1)
    assert nominal_peak(mi, kind="GPU")["lanes_per_unit"] == 64
    cpu = NS(name="pthread-AMD EPYC", vendor="AuthenticAMD", max_compute_units=4, max_clock_frequency=3000,
             native_vector_width_float=8)
    p = nominal_peak(cpu, kind="CPU")
    assert p["gflops"] == pytest.approx(4 * 3000 * 8 * 2 / 1e3) and "lower bound" in p["assumption"]


def fake_torch(cuda: bool, hip=None):
    from types import SimpleNamespace as NS
    calls = []
    return NS(cuda=NS(is_available=lambda: cuda, get_device_name=lambda i: "Fake GPU",
                      synchronize=lambda: calls.append(1)),
              version=NS(cuda="12.8", hip=hip), get_num_threads=lambda: 2), calls


def test_torch_runs_on_the_gpu_when_the_engine_does():
    """The choice of torch's device, on a fake torch module (no GPU here): not run on a real GPU."""
    from benchmarks.speed import torch_device
    torch, calls = fake_torch(cuda=True)
    where, label, sync = torch_device(torch, "GPU")
    assert where == "cuda" and label == "cuda:0 Fake GPU (CUDA 12.8)"
    sync()
    assert calls == [1]
    assert torch_device(fake_torch(cuda=True, hip="6.2")[0], "GPU")[1] == "cuda:0 Fake GPU (ROCm 6.2)"
    assert torch_device(torch, "CPU")[0] == "cpu"                  # an engine on the CPU: torch on the CPU
    assert torch_device(torch, "CPU", "cuda")[0] == "cuda"
    assert torch_device(fake_torch(cuda=False)[0], "GPU")[0] == "cpu"
    with pytest.raises(ValueError, match="torch.cuda.is_available"):
        torch_device(fake_torch(cuda=False)[0], "GPU", "cuda")


def test_torch_timing_waits_for_its_device():
    """TorchRunner calls its device's sync before the clock starts and before it stops (on a GPU:
    torch.cuda.synchronize); checked with a counting sync on the CPU."""
    tm = pytest.importorskip("benchmarks.torch_model", reason="torch is optional")
    from benchmarks.speed import TorchRunner
    cfg, V, batches = setup("hybrid")
    calls = []
    runner = TorchRunner(tm, cfg, V, batches, "cpu", sync=lambda: calls.append(runner.i))
    runner.run(2)
    steps_done = runner.i
    assert calls[-1] == steps_done and calls[-2] == steps_done - 2     # around the 2 timed steps


def test_bench_transformer_against_its_twin(dev, capsys):
    """The transformer family in the benchmark: engine and its PyTorch twin (from the same
    declared initial draws) at two batch sizes in one run; the hybrid-only tables say so."""
    from benchmarks import speed
    args = ["--json", "--steps", "2", "--repeats", "1", "--quick", "--smoke", "--wirings", "hybrid", "--sizes", "batch12,batch64",
            "--set", "model.family=transformer", "--set", "transformer.n_layer=1", "--set", "transformer.n_embd=16",
            "--set", "transformer.n_head=2", "--set", "transformer.block_size=8", "--set", "train.seq_len=8"]
    assert speed.main(args) == 0
    res = json.loads(capsys.readouterr().out)
    for label, B in (("batch12", 12), ("batch64", 64)):
        size = res["sizes"][label]
        assert size["config"]["B"] == B and size["tokens_per_s"] > 0
        assert size["kernels"]["hybrid"]["device_ms_per_step"] > 0
        if res["torch"] == "ok":
            assert size["torch_tokens_per_s"] > 0 and size["ratio"] > 0
    assert res["gemm"] == "hybrid family only" and res["generation_s"] > 0
