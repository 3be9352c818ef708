"""Generation carries the fast-weight memory: step-wise logits equal the
whole-sequence forward pass, for every Hebbian wiring."""
import subprocess
import sys

import numpy as np
import pytest

from engine.config import Config, apply_overrides
from engine.data import Vocab
from engine.generate import Generator, pick
from engine.model import Model
from engine.reference import init_params, kmeanspp_init

pytestmark = pytest.mark.opencl

TEXT = "the quick brown fox jumps over the lazy dog. " * 4


def _model(dev, hebb_mode, proto_mode="feature", H=24, post="spikes", similarity="cosine"):
    cfg = apply_overrides(Config(), [f"hebb.mode={hebb_mode}", f"proto.mode={proto_mode}", f"hebb.post={post}",
                                     f"proto.similarity={similarity}",
                                     "model.embedding_dim=16", f"model.hidden_dim={H}",
                                     "model.num_prototypes=5", "hebb.decay=0.3", "hebb.lr=0.7"])
    vocab = Vocab.from_text(TEXT)
    m = Model(dev, cfg, vocab.size)
    m.set_params(init_params(vocab.size, 16, H, seed=3))
    rng = np.random.default_rng(5)
    m.P.set(rng.standard_normal((5, H)).astype(np.float32))
    m.W_hebb.set((0.1 * rng.standard_normal((H, H))).astype(np.float32))
    m.proto_ready = True
    return m, vocab


@pytest.mark.parametrize("hebb_mode", ["fast_weights", "modulate", "off"])
def test_stepwise_logits_equal_sequence_forward(dev, hebb_mode):
    m, vocab = _model(dev, hebb_mode)
    ids = vocab.encode(TEXT[:20])
    S = len(ids)
    ws = m.workspace(1, S)
    ws.x.set(ids)
    ws.y.set(np.full(S, -1, np.int32))
    m.forward(ws)
    full = ws.logits.get().reshape(S, -1)[:, :m.V]  # stored with V padded to 8
    gen = Generator(m, vocab, fused=False)
    gen.reset()
    step = np.stack([gen.feed(int(t)).copy() for t in ids])
    # float32: the recurrent and the all-at-once sums add the same terms in another order
    np.testing.assert_allclose(step, full, rtol=1e-4, atol=1e-4)
    if hebb_mode == "fast_weights":  # the memory matters: without it the logits differ
        gen.reset()
        fresh = [gen.feed(int(t)).copy() for t in ids[:1]]
        assert np.abs(full[5] - step[5]).max() < 1e-3 and np.abs(full[5] - full[0]).max() > 1e-2


# H = 24: float8 column loops (VEC8); H = 20: the scalar loops
@pytest.mark.parametrize("hebb_mode,proto_mode,post,H", [
    ("fast_weights", "feature", "spikes", 24), ("fast_weights", "shadow", "activity", 24),
    ("modulate", "feature", "spikes", 24), ("off", "off", "spikes", 24), ("shadow", "feature", "spikes", 24),
    ("fast_weights", "feature", "spikes", 20), ("modulate", "feature", "activity", 20)])
def test_fused_generation_kernel_equals_the_unfused_path(dev, hebb_mode, proto_mode, post, H):
    """kernels/generate.cl (one launch per character) against the training kernels
    chained step by step, through 40 characters of carried state."""
    m, vocab = _model(dev, hebb_mode, proto_mode, H, post)
    ids = vocab.encode(TEXT[:40])
    fused, plain = Generator(m, vocab, fused=True), Generator(m, vocab, fused=False)
    a = np.stack([fused.feed(int(t)).copy() for t in ids])
    b = np.stack([plain.feed(int(t)).copy() for t in ids])
    # the same sums in the same order: observed bit-identical here; 1e-5 allows another compiler
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if fused.fast:  # and the carried memory matrices agree
        np.testing.assert_allclose(fused.At.get(), plain.At.get(), rtol=1e-5, atol=1e-6)
    assert fused.sample("the ", 50, 0.8, seed=3) == plain.sample("the ", 50, 0.8, seed=3)


# The GPU variant (generate_step_wg: 256 items, tree sums): H = 300 > 256 items (strided, not a
# multiple), H = 20 < them; cosine and dot prototype scores, both Hebbian memories
@pytest.mark.parametrize("hebb_mode,proto_mode,post,H,similarity", [
    ("fast_weights", "feature", "spikes", 300, "cosine"), ("fast_weights", "feature", "activity", 20, "dot"),
    ("modulate", "feature", "spikes", 20, "cosine"), ("off", "off", "spikes", 24, "cosine")])
def test_fused_generation_gpu_variant_equals_the_unfused_path(gpu_dev, hebb_mode, proto_mode, post, H, similarity):
    """generate_step_wg against the GPU variant's training kernels chained step by step (which
    test_stepwise_logits_equal_sequence_forward ties to the whole-sequence forward), through 40
    characters of carried state; a second run gives the same bits."""
    m, vocab = _model(gpu_dev, hebb_mode, proto_mode, H, post, similarity)
    ids = vocab.encode(TEXT[:40])

    def run():
        fused = Generator(m, vocab, fused=True)
        gpu_dev.take_timings()
        a = np.stack([fused.feed(int(t)).copy() for t in ids])
        assert "generate_step_wg" in gpu_dev.take_timings()
        return fused, a

    fused, a = run()
    plain = Generator(m, vocab, fused=False)
    b = np.stack([plain.feed(int(t)).copy() for t in ids])
    # the same terms summed in other orders (tree sums here, tiled products there) through 40
    # steps of carried state: observed ≤ 5e-7 on logits ≤ 5 (Aᵀ: ≤ 6e-8); as the test above
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if fused.fast:
        np.testing.assert_allclose(fused.At.get(), plain.At.get(), rtol=1e-5, atol=1e-6)
    assert run()[1].tobytes() == a.tobytes()


def test_sampling_is_seeded_and_greedy_is_argmax(dev):
    m, vocab = _model(dev, "fast_weights")
    gen = Generator(m, vocab)
    a = gen.sample("the ", 30, temperature=1.0, seed=7)
    b = gen.sample("the ", 30, temperature=1.0, seed=7)
    c = gen.sample("the ", 30, temperature=1.0, seed=8)
    assert a == b and len(a) == 30 and a != c
    logits = np.array([0.1, 3.0, -1.0, 2.9])
    assert pick(logits, 0.0, 0, np.random.default_rng(0)) == 1
    draws = {pick(logits, 1.0, 2, np.random.default_rng(s)) for s in range(50)}
    assert draws == {1, 3}  # top-2 keeps exactly the two largest logits


def test_generate_cli_errors():
    r = subprocess.run([sys.executable, "-m", "engine.generate", "--checkpoint", "/nonexistent/ck.npz"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


# ----------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def checkpoint(dev, tmp_path_factory):
    """A 3-step checkpoint of a tiny model (its vocabulary: the characters of conftest.TEXT)."""
    from conftest import TEXT as CORPUS
    from engine.train import Trainer
    root = tmp_path_factory.mktemp("gen")
    (root / "text.txt").write_text(CORPUS, encoding="utf-8")
    cfg = apply_overrides(Config(), [f"data.path={root / 'text.txt'}", "model.embedding_dim=16",
                                     "model.hidden_dim=24", "model.num_prototypes=5", "train.batch_size=4",
                                     "train.seq_len=8", "train.steps=3", "train.eval_batches=1"])
    return Trainer(cfg, str(root / "out"), device=dev).train()["checkpoint"]


def generate(capsys, *args):
    from engine.generate import main
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, [ln for ln in out.err.splitlines() if ln.strip()]


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
    (["--temperature", "-0.5"], "--temperature must be a finite number >= 0, got -0.5"),
    (["--length", "-1", "--top-k", "-3"], "--length must be >= 0, got -1; --top-k must be >= 0, got -3")])
def test_generate_cli_rejects_bad_values_in_one_line(checkpoint, capsys, args, message):
    rc, out, err = generate(capsys, "--checkpoint", checkpoint, *args)
    assert (rc, out, err) == (2, "", [f"error: {message}"])


def test_tiny_temperature_is_greedy_without_overflow(dev, checkpoint, capsys):
    import warnings
    logits = np.array([0.1, 3.0, -1.0, 2.9, -np.inf])
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # no overflow / invalid-value warnings either
        for t in (1e-308, 5e-324, 1e-30):
            assert {pick(logits, t, 0, np.random.default_rng(s)) for s in range(20)} == {1}
            assert pick(logits, t, 2, np.random.default_rng(0)) == 1
        tied = np.array([2.0, 5.0, 5.0, 1.0])      # exact ties share the probability
        assert {pick(tied, 1e-308, 0, np.random.default_rng(s)) for s in range(40)} == {1, 2}
    greedy = generate(capsys, "--checkpoint", checkpoint, "--temperature", "0", "--length", "40")
    tiny = generate(capsys, "--checkpoint", checkpoint, "--temperature", "1e-308", "--length", "40")
    assert greedy[0] == tiny[0] == 0 and tiny[1] == greedy[1] and len(tiny[1]) == len("The ") + 40 + 1


def test_generate_cli_extremes(checkpoint, capsys):
    assert generate(capsys, "--checkpoint", checkpoint, "--length", "0", "--prompt", "the ") == (0, "the \n", [])
    every = generate(capsys, "--checkpoint", checkpoint, "--top-k", "0", "--seed", "5", "--prompt", "the ")
    huge_k = generate(capsys, "--checkpoint", checkpoint, "--top-k", str(10**30), "--seed", "5", "--prompt", "the ")
    assert every == huge_k and every[0] == 0 and every[2] == []          # k >= V: every character
    big_seed = generate(capsys, "--checkpoint", checkpoint, "--seed", str(2**100), "--length", "5")
    assert big_seed[0] == 0
    rc, out, err = generate(capsys, "--checkpoint", checkpoint, "--prompt", "Zé☃ the", "--length", "10")
    assert rc == 0 and out.startswith("Zé☃ the") and len(out) == len("Zé☃ the") + 10 + 1
    assert err == ["note: prompt characters not in the checkpoint's vocabulary are read as unknown: 'Zé☃'"]


def test_generate_cli_missing_or_corrupt_checkpoint(checkpoint, tmp_path, capsys):
    rc, out, err = generate(capsys, "--checkpoint", str(tmp_path / "nope.npz"))
    assert (rc, out) == (2, "") and err == [f"error: checkpoint {str(tmp_path / 'nope.npz')!r} does not exist"]
    raw = bytearray(open(checkpoint, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    rc, out, err = generate(capsys, "--checkpoint", str(bad))
    assert (rc, out) == (2, "") and len(err) == 1 and err[0].startswith(f"error: checkpoint {str(bad)!r} is corrupt (")
