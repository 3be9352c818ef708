"""The transformer's generation with a key-value cache (engine.generate.KVCacheGenerator,
kernels/gpt_generate.cl): after every token, the logits equal the float64 reference model's
(engine.reference.model.RefModel) and the device's training forward over the cached window
(KVCacheGenerator.history), before and after the cache refills; on both kernel variants, at a
size that takes the CPU variant's float8 path and one that takes its scalar path; bit-identical
reruns; the CLI on a transformer checkpoint."""
import numpy as np
import pytest

from engine.config import Config, apply_overrides
from engine.data import Vocab
from engine.generate import Generator, GenerateError, KVCacheGenerator, kv_cache_supported, make_generator
from engine.model import Model, param_specs
from engine.params import init_params
from engine.reference.model import RefModel

pytestmark = pytest.mark.opencl

TEXT = "the quick brown fox jumps over the lazy dog. " * 4
VOCAB = Vocab.from_text(TEXT)
# (n_embd, n_head): 32 wide, d = 16: the CPU variant's float8 path (C % 32 == 0, d % 8 == 0);
# 12 wide, d = 4: its scalar path. Both with and without biases / tying.
SIZES = {"vec8_tied": (32, 2, []), "scalar_untied_bias": (12, 3, ["transformer.tie_weights=false",
                                                                  "transformer.bias=true"]),
         "vec8_d8_untied_bias": (32, 4, ["transformer.tie_weights=false", "transformer.bias=true"])}


def _model(dev, size, T=8, L=2):
    C, nh, extra = SIZES[size]
    cfg = apply_overrides(Config(), ["model.family=transformer", f"transformer.n_layer={L}",
                                     f"transformer.n_head={nh}", f"transformer.n_embd={C}",
                                     f"transformer.block_size={T}", f"train.seq_len={T}"] + extra)
    m = Model(dev, cfg, VOCAB.size)
    rng = np.random.default_rng(7)   # away from the initialisation's ones and zeros
    params = {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
              for k, v in init_params(param_specs(m.layers), 0).items()}
    m.set_params(params)
    return m, cfg, params


def _window_logits(m, history):
    ws = m.workspace(1, len(history))
    ws.x.set(np.array(history, np.int32))
    m.forward(ws, loss=False, training=False)
    return ws.logits.get()[-1, :m.V]


def _reference_logits(rm, params, state, history):
    h = np.array(history)[None]
    _, caches = rm.forward(params, state, h, h)
    return caches[-1]["logits"][-1, :VOCAB.size]


# PoCL builds a kernel once per work-group size, and the training forward's depend on S: each
# case keeps the prefill lengths to the prompt's (4) and keep, the device forward to S = 8
# vec8_d8_untied_bias: d = 8, where PoCL 3 miscompiled an earlier many-item form of the kernel
CASES = [("dev", "vec8_tied", 4), ("dev", "vec8_tied", 7), ("dev", "vec8_tied", 0),
         ("dev", "scalar_untied_bias", 4), ("dev", "vec8_d8_untied_bias", 4), ("gpu_dev", "scalar_untied_bias", 4)]


@pytest.mark.parametrize("variant, size, keep", CASES)   # keep: T // 2 (the default), T − 1 (nanoGPT's crop), 0
def test_cached_logits_equal_the_forward_over_the_window(request, variant, size, keep):
    dev = request.getfixturevalue(variant)
    m, cfg, params = _model(dev, size)
    g = KVCacheGenerator(m, VOCAB, keep=keep)
    assert (g.fused, g._kernel.function_name) == (True, "gpt_step_wg" if variant == "gpu_dev" else "gpt_step")
    assert 0 <= g.checked < 1e-5   # the self-check at construction
    rm = RefModel(cfg, VOCAB.size)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    _, state = rm.init()
    ids = [int(t) for t in np.random.default_rng(1).integers(0, VOCAB.size, 30)]
    windows = []
    logits = g.prime(ids[:4])   # a prompt: the training forward fills the cache
    for i, t in enumerate(ids[4:]):
        h = list(g.history)
        windows.append(len(h))
        # float32 kernels against float64 through 2 blocks: observed ≤ 3e-7 of the largest logit;
        # a wrong position, head or cache row is ≥ 1e-2
        scale = max(1.0, float(np.abs(logits).max()))
        np.testing.assert_allclose(logits, _reference_logits(rm, p64, state, h), rtol=0, atol=1e-5 * scale,
                                   err_msg=f"token {i}")
        if len(h) == 8:
            np.testing.assert_allclose(logits, _window_logits(m, h), rtol=0, atol=1e-5 * scale, err_msg=f"token {i}")
        assert h == ids[4 + i - len(h):4 + i]   # the window is the last len(h) tokens fed
        logits = g.feed(t)
    # the window grows to block_size, then restarts at keep + 1 (keep = T − 1: it stays at T)
    assert max(windows) == 8 and min(windows[5:]) == keep + 1
    g.reset()   # a rerun: the same bits
    assert np.array_equal(_replay(g, ids), logits)


def _replay(g, ids):
    g.prime(ids[:4])
    for t in ids[4:]:
        out = g.feed(t)
    return out


def test_a_prompt_longer_than_the_block_and_bit_identical_reruns(dev):
    m, _, _ = _model(dev, "vec8_tied")
    g = KVCacheGenerator(m, VOCAB)
    ids = [int(t) for t in np.random.default_rng(2).integers(0, VOCAB.size, 20)]   # 8 + refills of 4
    first = g.prime(ids).copy()
    assert g.history == ids[-8:]   # 8, then 4 + 4, then 4 + 4
    np.testing.assert_allclose(first, _window_logits(m, g.history), atol=1e-5 * max(1, np.abs(first).max()))
    text = g.sample("the ", 40, temperature=0.8, seed=3)
    g.reset()
    assert np.array_equal(g.prime(ids), first)   # the same bits
    assert g.sample("the ", 40, temperature=0.8, seed=3) == text
    assert g.sample("the ", 40, temperature=0.8, seed=4) != text


def test_sampled_text_equals_the_window_path(dev):
    """Sampling (one seed) with the cache and with the generic window path (Generator: the training
    forward over the last block_size tokens, keep = T − 1 equals it): the same text (the logits
    agree to ~1e-6, a draw on the boundary between two characters is that unlikely). The prompt
    fills the block, so that every window forward is at S = 8 (one build of its kernels)."""
    m, _, _ = _model(dev, "vec8_tied")
    kv = KVCacheGenerator(m, VOCAB, keep=7)
    window = Generator(m, VOCAB, fused=False)
    assert not window.carried and window.window == 8
    text = kv.sample("the quic", 30, temperature=1.0, seed=5)
    assert text == window.sample("the quic", 30, temperature=1.0, seed=5) and len(set(text)) > 5


def test_which_models_take_the_cache(dev):
    m, cfg, _ = _model(dev, "vec8_tied")
    assert kv_cache_supported(cfg) and isinstance(make_generator(m, VOCAB), KVCacheGenerator)
    assert type(make_generator(m, VOCAB, cache=False)) is Generator
    hybrid = apply_overrides(cfg, ["transformer.hybrid=hebb"])
    assert not kv_cache_supported(hybrid)   # local rules in the blocks: the window path
    assert not kv_cache_supported(Config())
    with pytest.raises(ValueError, match=r"keep must be in \[0, block_size\) = \[0, 8\)"):
        KVCacheGenerator(m, VOCAB, keep=8)


def test_the_self_check_refuses_a_wrong_kernel(dev, monkeypatch):
    """A kernel that disagrees with the training forward (here: the logits of one token early,
    as a miscompiled kernel might give) is refused at construction, in one line."""
    m, _, _ = _model(dev, "vec8_tied")
    step = KVCacheGenerator._step
    monkeypatch.setattr(KVCacheGenerator, "_step", lambda self, chunk: step(self, chunk[:-1]))
    with pytest.raises(GenerateError, match=r"disagrees with the training forward .* --no-cache"):
        KVCacheGenerator(m, VOCAB)


# ----------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def transformer_checkpoint(dev, tmp_path_factory):
    """A 3-step checkpoint of a tiny transformer (block 8) on conftest.TEXT."""
    from conftest import TEXT as CORPUS
    from engine.train import Trainer
    root = tmp_path_factory.mktemp("genkv")
    (root / "text.txt").write_text(CORPUS, encoding="utf-8")
    cfg = apply_overrides(Config(), [f"data.path={root / 'text.txt'}", "model.family=transformer",
                                     "transformer.n_layer=1", "transformer.n_head=2", "transformer.n_embd=32",
                                     "transformer.block_size=8", "train.seq_len=8", "train.batch_size=4",
                                     "train.steps=3", "train.eval_batches=1"])
    return Trainer(cfg, str(root / "out"), device=dev).train()["checkpoint"]


def _cli(capsys, *args):
    from engine.generate import main
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, [ln for ln in out.err.splitlines() if ln.strip()]


def test_generate_cli_on_a_transformer(transformer_checkpoint, capsys):
    ck = transformer_checkpoint
    rc, out, err = _cli(capsys, "--checkpoint", ck, "--prompt", "the ", "--length", "30", "--seed", "2", "--timing")
    assert rc == 0 and out.startswith("the ") and len(out) == len("the ") + 30 + 1
    assert len(err) == 1 and err[0].startswith("30 characters in ") and "KVCacheGenerator" in err[0]
    # keep = block_size − 1 is the window path's context exactly: the same text from the same seed
    exact = _cli(capsys, "--checkpoint", ck, "--prompt", "the ", "--length", "30", "--seed", "2", "--keep", "7")
    window = _cli(capsys, "--checkpoint", ck, "--prompt", "the ", "--length", "30", "--seed", "2", "--no-cache")
    assert exact[0] == window[0] == 0 and exact[1] == window[1]
    for keep, message in [("8", "--keep must be in [0, block_size) = [0, 8), got 8"),
                          ("-1", "--keep must be in [0, block_size) = [0, 8), got -1")]:
        assert _cli(capsys, "--checkpoint", ck, "--keep", keep) == (2, "", [f"error: {message}"])


def test_generate_cli_keep_on_a_hybrid_is_refused(checkpoint_hybrid, capsys):
    rc, out, err = _cli(capsys, "--checkpoint", checkpoint_hybrid, "--keep", "3")
    assert (rc, out) == (2, "") and err == ["error: --keep applies to the transformer family's key-value cache "
                                            "(transformer.hybrid none); this checkpoint is 'hybrid'"]


@pytest.fixture(scope="module")
def checkpoint_hybrid(dev, tmp_path_factory):
    from conftest import TEXT as CORPUS
    from engine.train import Trainer
    root = tmp_path_factory.mktemp("genhy")
    (root / "text.txt").write_text(CORPUS, encoding="utf-8")
    cfg = apply_overrides(Config(), [f"data.path={root / 'text.txt'}", "model.embedding_dim=16", "model.hidden_dim=24",
                                     "model.num_prototypes=5", "train.batch_size=4", "train.seq_len=8",
                                     "train.steps=1", "train.eval_batches=1"])
    return Trainer(cfg, str(root / "out"), device=dev).train()["checkpoint"]


def test_generation_benchmark(transformer_checkpoint, tmp_path):
    """benchmarks.generate on a checkpoint: every path timed each round, and the exact cache
    (keep = block_size − 1) draws the window path's text."""
    import json
    from benchmarks.generate import main
    out = tmp_path / "gen.json"
    assert main(["--checkpoint", transformer_checkpoint, "--length", "12", "--rounds", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["paths"]) == {"kv_cache", "kv_cache_keep7", "window"} and res["exact_equals_window"] is True
    for p in res["paths"].values():
        assert len(p["all_s"]) == 2 and 0 < p["min_s"] <= p["median_s"] <= p["max_s"]
    assert len(res["sample"]) == 12
