"""engine.tune: the per-device search of launch sizes, its cache, and what a choice may change.

    python -m pytest tests/test_tune.py -q

The search runs on this device with the GPU kernel variant forced (Device(variant="gpu"), as
PoCL has no GPU), at small sizes so that the whole file stays within seconds. The product tiles
must give the same bytes for every candidate; the reduction work-groups change bits but stay
within float64 tolerance and rerun bit for bit; a fixed cache gives bit-identical training.
"""
import json
import time

import numpy as np
import pytest

from engine import ops, tune
from engine import reference as ref
from engine.config import Config, ConfigError, apply_overrides

from conftest import TEXT, _device  # the shared text; the device maker (skip or fail without OpenCL)

pytestmark = pytest.mark.opencl

f32, f64, i32 = np.float32, np.float64, np.int32
SMALL = {"rows": 256, "hidden": 64, "embedding": 32, "vocab": 20, "params": 4096}
FIXED = {"gemm_tile": 32, "gemm_block": 4, "red_wg": 128}   # a non-default tuning


@pytest.fixture(scope="module")
def gdev():
    """A profiled device building the GPU kernel variant, with no explicit tile (unlike gpu_dev)."""
    return _device(variant="gpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache file and no tuning remembered by this process."""
    path = tmp_path / "tune.json"
    monkeypatch.setenv("HYBRID_TUNE_CACHE", str(path))
    monkeypatch.setattr(tune, "_MEMO", {})
    monkeypatch.setattr(tune, "_WARNED", set())
    return path


@pytest.fixture
def searches(monkeypatch):
    """Replace the timed search by a counter returning FIXED."""
    calls = []

    def fake(dev, budget_s=tune.DEFAULT_BUDGET_S, sizes=None):
        calls.append(dev)
        return dict(FIXED), [tune.Trial("gemm", (32, 4), 1.0), tune.Trial("red_wg", 128, 2.0)]
    monkeypatch.setattr(tune, "search", fake)
    return calls


def test_search_is_bounded_picks_a_candidate_and_apply_caches_it(gdev, cache):
    gdev.take_timings()
    start = time.perf_counter()
    winner, trials = tune.search(gdev, budget_s=1.5, sizes=SMALL)
    # past the budget only the work already started finishes: one build and one call (cold PoCL
    # builds take ~1 s on a busy machine)
    assert time.perf_counter() - start < 1.5 + 4
    assert (winner["gemm_tile"], winner["gemm_block"]) in tune.GEMM_CANDIDATES
    assert winner["red_wg"] in tune.RED_WG_CANDIDATES
    assert [t.value for t in trials] == [*tune.GEMM_CANDIDATES, *tune.RED_WG_CANDIDATES]
    assert all(t.ms > 0 if t.ms is not None else t.note for t in trials)
    assert "tuning" not in gdev.__dict__ and gdev.take_timings() == {}   # no trace in telemetry
    assert tune.apply(gdev, "auto", budget_s=0.5, sizes=SMALL) == gdev.tuning
    entry = json.loads(cache.read_text())["entries"][tune.cache_key(gdev.device, "gpu")]
    assert entry["tuning"] == gdev.tuning and tune._valid(gdev.tuning)


def test_the_winner_is_the_fastest_finished_candidate_unless_within_the_margin_of_the_default():
    def trials(*ms):
        return [tune.Trial("red_wg", wg, t) for wg, t in zip(tune.RED_WG_CANDIDATES, ms)]
    assert tune._best(trials(10.0, 8.0, 9.0)) == 128
    assert tune._best(trials(10.0, 9.7, None)) == 64          # 3 % faster: noise, the default stays
    assert tune._best(trials(None, 9.0, 7.0)) == 256          # the default unfinished: the fastest
    assert tune._best(trials(None, None, None)) == 64         # nothing finished: the default


def test_a_second_apply_hits_the_cache_and_force_searches_again(gdev, cache, searches):
    assert tune.apply(gdev, "auto") == FIXED and len(searches) == 1
    tune._MEMO.clear()   # only the file can answer now
    assert tune.apply(gdev, "auto") == FIXED and len(searches) == 1
    assert tune.apply(gdev, "force") == FIXED and len(searches) == 2
    assert tune.apply(gdev, "off") == {} and gdev.tuning == {} and len(searches) == 2
    with pytest.raises(ValueError, match="tune mode must be one of auto, off, force"):
        tune.apply(gdev, "fast")


def test_the_cpu_variant_tunes_nothing_and_touches_no_cache(dev, cache, searches):
    assert dev.variant == "cpu" or pytest.skip("the session device builds the gpu variant")
    assert tune.apply(dev, "force") == {} and searches == [] and not cache.exists()


def test_a_changed_kernel_source_hash_misses(gdev, cache, searches, monkeypatch):
    tune.store(gdev, {"gemm_tile": 8, "gemm_block": 1, "red_wg": 256})
    tune._MEMO.clear()
    assert tune.lookup(gdev.device, "gpu") == {"gemm_tile": 8, "gemm_block": 1, "red_wg": 256}
    monkeypatch.setattr(tune, "kernel_source_hash", lambda: "another kernel version")
    assert tune.lookup(gdev.device, "gpu") is None
    assert tune.apply(gdev, "auto") == FIXED and len(searches) == 1
    assert len(json.loads(cache.read_text())["entries"]) == 2   # both versions' entries are kept


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"entries": 3}', ""])
def test_a_corrupt_cache_is_warned_about_and_replaced(gdev, cache, searches, capsys, text):
    cache.write_text(text)
    assert tune.apply(gdev, "auto") == FIXED and len(searches) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(err) == 1 and "corrupt" in err[0] and str(cache) in err[0]
    assert json.loads(cache.read_text())["entries"][tune.cache_key(gdev.device, "gpu")]["tuning"] == FIXED


def test_an_invalid_entry_is_a_miss(gdev, cache, searches):
    key = tune.cache_key(gdev.device, "gpu")
    cache.write_text(json.dumps({"format": 1, "entries": {key: {"tuning": {"gemm_tile": 7}}}}))
    assert tune.apply(gdev, "auto") == FIXED and len(searches) == 1


def test_an_unwritable_cache_warns_once_and_training_goes_on(gdev, tmp_path, monkeypatch, searches, capsys):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("HYBRID_TUNE_CACHE", str(tmp_path / "a_file" / "tune.json"))
    monkeypatch.setattr(tune, "_MEMO", {})
    monkeypatch.setattr(tune, "_WARNED", set())
    assert tune.apply(gdev, "auto") == FIXED and tune.apply(gdev, "force") == FIXED
    assert tune.apply(gdev, "auto") == FIXED and len(searches) == 2   # remembered in this process
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(err) == 1 and "cannot write the tuning cache" in err[0]
    assert list(tmp_path.glob("**/*.tmp")) == []


def _gemm_cases(dev, rng):
    """(name, fn -> host array, float64 reference) of products with edge tiles in M, N and K."""
    M, N, K, B = 70, 45, 100, 2
    a, b, c0 = (rng.standard_normal(s).astype(f32) for s in ((B, M, K), (B, K, N), (B, M, N)))
    at = np.ascontiguousarray(a.transpose(0, 2, 1))
    bt = np.ascontiguousarray(b.transpose(0, 2, 1))
    want = np.einsum("bmk,bkn->bmn", a.astype(f64), b.astype(f64))

    def run(x, y, **kw):
        def fn():
            c = dev.to_device(c0)
            ops.gemm(dev, dev.to_device(x), dev.to_device(y), c, M, N, K, alpha=0.7, beta=-1.3, batch=B, **kw)
            return c.get()
        return fn
    ref64 = 0.7 * want - 1.3 * c0
    g1, g2 = rng.standard_normal((2048, 24)).astype(f32), rng.standard_normal((2048, 40)).astype(f32)

    def ksplit():   # a long K: per-chunk products, then the ordered chunk sum (weight gradients)
        out = dev.empty((24, 40))
        ops.gemm(dev, dev.to_device(g1), dev.to_device(g2), out, 24, 40, 2048, trans_a=True)
        return out.get()
    return [("nn", run(a, b), ref64), ("tn", run(at, b, trans_a=True), ref64),
            ("nt", run(a, bt, trans_b=True), ref64), ("ksplit", ksplit, g1.astype(f64).T @ g2)]


def test_every_gemm_candidate_gives_the_same_bytes(gdev):
    """The tile choice cannot change results: every (TS, WPT) sums k ascending from 0."""
    rng = np.random.default_rng(5)
    cases = _gemm_cases(gdev, rng)
    results = {}
    try:
        for ts, wpt in tune.GEMM_CANDIDATES:
            if tune.gemm_fits(gdev, ts, wpt):
                continue
            gdev.tuning = {"gemm_tile": ts, "gemm_block": wpt}
            results[ts, wpt] = [fn() for _, fn, _ in cases]
    finally:
        del gdev.tuning
    assert len(results) >= 4
    first = results[tune.GEMM_CANDIDATES[0]]
    for (name, _, want), got in zip(cases, first):
        # float32 sums of <= 2048 terms of N(0,1) products, k ascending: |err| < 1e-3 at K = 2048
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3 if name == "ksplit" else 1e-4, err_msg=name)
    for cand, outs in results.items():
        for (name, *_), got, base in zip(cases, outs, first):
            assert got.tobytes() == base.tobytes(), (cand, name)


def _reductions(dev, rng):
    N, n_chunks, chunk, nb = 1000, 7, 1024, 23
    y = rng.integers(0, nb, N).astype(i32)
    y[rng.permutation(N)[:137]] = ref.PAD
    keys = np.where(y < 0, 0, y).astype(i32)
    rows, hits = np.abs(rng.standard_normal(N)).astype(f32), (rng.random(N) < 0.3).astype(f32)
    rows[y == ref.PAD] = 0
    g = (0.5 * rng.standard_normal(n_chunks * chunk)).astype(f32)

    def run():
        nv, out, partial, gnorm = dev.empty((1,), i32), dev.empty((4,)), dev.empty((n_chunks,)), dev.empty((1,))
        starts, perm = dev.empty((nb + 1,), i32), dev.empty((N,), i32)
        ops.count_valid(dev, dev.to_device(y), N, nv)
        ops.loss_reduce(dev, dev.to_device(rows), dev.to_device(hits), nv, out, N)
        ops.sumsq_chunks(dev, dev.to_device(g), partial, n_chunks, chunk)
        ops.global_norm(dev, partial, n_chunks, gnorm)
        ops.bucket_sort(dev, dev.to_device(keys), N, nb, starts, perm)
        return [a.get() for a in (nv, out, partial, gnorm, starts, perm)]
    valid = int((y != ref.PAD).sum())
    sq = (g.astype(f64) ** 2).reshape(n_chunks, chunk).sum(axis=1)
    want = [valid, [rows.astype(f64).sum() / valid, hits.sum(), valid, rows.astype(f64).sum()], sq, np.sqrt(sq.sum())]
    return run, want, np.argsort(keys, kind="stable")


def test_every_red_wg_matches_float64_and_reruns_bit_for_bit(gdev):
    run, want, order = _reductions(gdev, np.random.default_rng(8))
    got = {}
    try:
        for wg in tune.RED_WG_CANDIDATES:
            gdev.tuning = {"red_wg": wg}
            got[wg] = run()
            nv, out, partial, gnorm, starts, perm = got[wg]
            assert nv[0] == want[0]
            # float32 tree sums of <= 1024 terms: relative error <= log2(n)·2⁻²⁴·Σ|x|/|Σx| < 1e-5 here
            np.testing.assert_allclose(out, want[1], rtol=1e-5)
            np.testing.assert_allclose(partial, want[2], rtol=1e-5)
            np.testing.assert_allclose(gnorm[0], want[3], rtol=1e-5)
            np.testing.assert_array_equal(perm, order)                 # integers: exact for every wg
            assert all(a.tobytes() == b.tobytes() for a, b in zip(run(), got[wg])), wg
    finally:
        del gdev.tuning
    # the claim of engine/tune.py: a work-group size changes the tree, hence bits (same on any device:
    # the order of the float32 additions is fixed by WG alone)
    assert any(got[64][2] != got[256][2])


def test_same_bits_compares_only_what_changes_results():
    assert tune.same_bits({}, {"red_wg": ops.RED_WG, "gemm_tile": 64, "gemm_block": 8})
    assert not tune.same_bits({}, {"red_wg": 256})


def test_devices_tune_prints_the_candidates_and_the_winner(gdev, cache, capsys):
    from engine.devices import main
    args = ["--tune", "--device", gdev.name, "--variant", "gpu", "--budget", "0.3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "gemm TS=16 WPT=1" in out and "red_wg=256" in out
    winner = json.loads(next(ln for ln in out.splitlines() if "winner:" in ln).split("winner:")[1].split(" (")[0])
    assert tune._valid(winner) and f"cached in {cache}" in out
    assert main(args) == 0 and "cached: " + json.dumps(winner, sort_keys=True) in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--force"])   # --force without --tune: an argparse error


def test_config_key_tune():
    assert Config().tune == "auto" and apply_overrides(Config(), ["tune=off"]).tune == "off"
    with pytest.raises(ConfigError) as exc:
        Config.from_dict({"tune": "fast"})
    assert str(exc.value) == "config key 'tune' must be one of auto, off, force; got 'fast'"


def test_training_with_a_fixed_cache_is_bit_identical(gdev, cache, tmp_path, monkeypatch):
    """The trainer applies the cached tuning to the device it makes (forced to the GPU variant
    here); two runs with the cache fixed give the same bits."""
    import engine.train as train
    tune.store(gdev, FIXED)
    real = train.Device
    monkeypatch.setattr(train, "Device", lambda spec, profile=False: real(spec, profile=profile, variant="gpu"))
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT * 4)
    cfg = apply_overrides(Config(), [f"data.path={corpus}", "model.embedding_dim=16", "model.hidden_dim=24",
                                     "model.num_prototypes=5", "train.batch_size=4", "train.seq_len=16",
                                     "train.steps=6", "train.eval_every=3", "train.eval_batches=1",
                                     "train.log_every=3", "optim.warmup_steps=2"])

    def run():
        trainer = train.Trainer(cfg)
        assert trainer.dev.tuning == FIXED and trainer.dev.variant == "gpu"
        trainer.train()
        return [{k: v for k, v in r.items() if k != "train_time_s"} for r in trainer.history]
    first = run()
    assert len(first) == 2 and first == run()   # evaluations at steps 3 and 6
