"""The engine's Model and Trainer against the numpy reference, and the training CLI.

    python -m pytest tests/test_model.py -q

Small sizes throughout (E=16, H=24, T=5, B=5, S=8) so the whole file runs in seconds on
PoCL. References run in float64 on the same float32 parameters; each tolerance states
what float32 rounding it covers.
Key: B batch, S sequence, N = B*S, E embedding, H hidden, V vocabulary, T prototypes.
"""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import B, E, H, S, T, TEXT, wiring_of  # shared tiny sizes and text

from engine import reference as ref
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.config import Config, apply_overrides
from engine.data import Batches, Vocab
from engine.model import Model
from engine.optim import make_optimizer
from engine.train import EVAL_KEYS, Trainer, TrainingError

pytestmark = pytest.mark.opencl

REPO = Path(__file__).resolve().parent.parent

STEPS = 10
SIZES = [f"model.embedding_dim={E}", f"model.hidden_dim={H}", f"model.num_prototypes={T}",
         f"train.batch_size={B}", f"train.seq_len={S}"]


def small_config(*overrides):
    return apply_overrides(Config(), SIZES + list(overrides))


def as64(d):
    return {k: np.asarray(v, np.float64) for k, v in d.items()}


def optim_of(cfg, lr):
    o = cfg.optim
    return dict(lr=lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay,
                clip_norm=o.clip_norm, clip_value=o.clip_value, name=o.name, momentum=o.momentum)


# ----------------------------------------------------------------------------- one step: loss and gradients

WIRINGS = [(hm, pm, "spikes") for hm, pm in itertools.product(
    ["off", "shadow", "modulate", "fast_weights"], ["off", "shadow", "feature"])]
WIRINGS.append(("fast_weights", "feature", "activity"))


@pytest.mark.parametrize("hebb_mode,proto_mode,post", WIRINGS)
def test_loss_and_gradients_match_reference(dev, hebb_mode, proto_mode, post):
    check_loss_and_gradients(dev, hebb_mode, proto_mode, post)


@pytest.mark.parametrize("hebb_mode,proto_mode,post", [("fast_weights", "feature", "spikes"),
                                                       ("shadow", "shadow", "spikes"), ("modulate", "off", "activity")])
def test_unfolded_embedding_matches_reference(dev, hebb_mode, proto_mode, post):
    """N = 16 < V = 31: the embedding is gathered and multiplied per position (no fold)."""
    check_loss_and_gradients(dev, hebb_mode, proto_mode, post, batch=2)


@pytest.mark.parametrize("hebb_mode,proto_mode,post", WIRINGS)
def test_gpu_kernel_variant_matches_reference(gpu_dev, hebb_mode, proto_mode, post):
    """The whole model built with the GPU kernel variant, checked here on PoCL, every wiring."""
    check_loss_and_gradients(gpu_dev, hebb_mode, proto_mode, post)


def test_gpu_kernel_variant_unfolded_embedding_matches_reference(gpu_dev):
    """N = 16 < V: the GPU variant's gathered embedding and its gradient (bucket_sums_wg)."""
    check_loss_and_gradients(gpu_dev, "fast_weights", "feature", "spikes", batch=2)


def check_loss_and_gradients(dev, hebb_mode, proto_mode, post, batch=B):
    B = batch  # noqa: N806 (the shared name, for this call)
    cfg = small_config(f"hebb.mode={hebb_mode}", f"proto.mode={proto_mode}", f"hebb.post={post}")
    vocab = Vocab.from_text(TEXT)
    V = vocab.size
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, (B, S)).astype(np.int32)
    y = rng.integers(0, V, (B, S)).astype(np.int32)
    y[0, 2] = y[B - 1, 7] = ref.PAD
    params = ref.init_params(V, E, H, seed=1)
    P = rng.standard_normal((T, H)).astype(np.float32)
    W_hebb = (0.1 * rng.standard_normal((H, H))).astype(np.float32)   # non-zero: modulate reads it

    model = Model(dev, cfg, V)
    model.set_params(params)
    model.P.set(P)
    model.W_hebb.set(W_hebb)
    ws = model.workspace(B, S)
    assert ws.fold == (V < B * S)                 # which first-layer path this call checks
    ws.x.set(x.ravel())
    ws.y.set(y.ravel())
    model.forward(ws)
    model.backward(ws)
    loss, grads = ws.loss_out.get(), model.get_grads()

    wiring = wiring_of(cfg)
    state = {"W_hebb": W_hebb.astype(np.float64), "P": P.astype(np.float64), "usage": None}
    p64 = as64(params)
    # post = h for activity: the reference already holds it constant in backward (frozen_post=None)
    want_loss, cache = ref.model_forward(p64, state, x, y, wiring)
    want = ref.model_backward(p64, state, cache, wiring)

    # discontinuities first: the spikes and the assignments must not flip between float32 and
    # float64, or the comparison below would be meaningless (and flaky)
    np.testing.assert_array_equal(ws.buf["bio0"].s.get(), cache["s"])
    if proto_mode != "off":
        np.testing.assert_array_equal(ws.buf["bio0"].assign.get(), cache["assign"])
    # mean of N = 24 log-sum-exps over V ~ 25 logits in float32: observed 3e-7 relative
    np.testing.assert_allclose(loss[0], want_loss, rtol=1e-5)
    assert loss[2] == cache["n_valid"] == B * S - 2
    for name, g in grads.items():
        # float32 chains of ≤ 3 products over N, H, V ≤ 30 terms: observed |error| ≤ 3e-7 on
        # gradients of size 0.05-0.4; a wrong term in any backward rule is ≥ 1e-3
        np.testing.assert_allclose(g, want[name], rtol=1e-4, atol=2e-6, err_msg=name)


def test_wirings_are_not_all_the_same(dev):
    """Guards the test above: the wirings differ in loss, so a mode silently ignored would show."""
    vocab = Vocab.from_text(TEXT)
    x = np.arange(B * S, dtype=np.int32) % vocab.size
    losses = {}
    for hm, pm in [("off", "off"), ("modulate", "off"), ("fast_weights", "off"), ("off", "feature")]:
        model = Model(dev, small_config(f"hebb.mode={hm}", f"proto.mode={pm}"), vocab.size)
        model.set_params(ref.init_params(vocab.size, E, H, seed=1))
        model.P.set(np.random.default_rng(0).standard_normal((T, H)).astype(np.float32))
        model.W_hebb.set(np.full((H, H), 0.05, np.float32))
        ws = model.workspace(B, S)
        ws.x.set(x)
        ws.y.set(np.roll(x, -1))
        model.forward(ws)
        losses[(hm, pm)] = float(ws.loss_out.get()[0])
    assert len({round(v, 4) for v in losses.values()}) == len(losses), losses


# ----------------------------------------------------------------------------- ten training steps

TRAIN_CONFIGS = {
    "hybrid": ["hebb.mode=fast_weights", "proto.mode=feature"],
    "seed": ["hebb.mode=shadow", "proto.mode=shadow", "proto.similarity=dot"],
    # fast usage decay and a high threshold: dead prototypes are re-seeded within ten steps
    "modulate": ["hebb.mode=modulate", "proto.mode=shadow", "proto.usage_decay=0.6",
                 "proto.reseed_threshold=0.5"],
    # the other optimiser (engine.optim.SGD): momentum, coupled weight decay, clipping by value too
    "hybrid_sgd": ["hebb.mode=fast_weights", "proto.mode=feature", "optim.name=sgd", "optim.lr=0.3",
                   "optim.momentum=0.9", "optim.weight_decay=0.05", "optim.clip_value=0.05"],
}


def train_config(name):
    return small_config(*TRAIN_CONFIGS[name], f"train.steps={STEPS}", "optim.warmup_steps=3")


def fixed_batches(cfg):
    vocab = Vocab.from_text(TEXT)
    batches = Batches(vocab.encode(TEXT), B, S, cfg.seed)
    return vocab.size, [batches.next_batch() for _ in range(STEPS)]


def run_engine(dev, cfg, V, batches):
    """STEPS steps as the Trainer does them; -> (model, per-step losses, spikes, assignments, gnorms,
    optimiser)."""
    model = Model(dev, cfg, V)
    model.set_params(ref.init_params(V, E, H, cfg.seed))
    opt = make_optimizer(dev, cfg, model)
    ws = model.workspace(B, S)
    losses, spikes, assigns, gnorms = [], [], [], []
    for x, y in batches:
        ws.x.set(x.ravel())
        ws.y.set(y.ravel())
        if not model.proto_ready:
            model.init_prototypes(ws)                  # k-means++ on the first batch
        lr = opt.lr_at(model.step + 1)
        model.forward(ws)
        losses.append(ws.loss_out.get()[0])
        spikes.append(ws.buf["bio0"].s.get())
        assigns.append(ws.buf["bio0"].assign.get() if cfg.proto.mode != "off" else None)
        model.backward(ws)
        opt.step(model, lr)
        gnorms.append(float(opt.gnorm.get()[0]))
        model.local_updates(ws)
    return model, losses, spikes, assigns, gnorms, opt


@pytest.mark.parametrize("variant", ["dev", "gpu_dev"])   # the device's kernel family, and the GPU one
@pytest.mark.parametrize("name", list(TRAIN_CONFIGS))
def test_ten_steps_match_reference_train_steps(request, variant, name, monkeypatch):
    dev = request.getfixturevalue(variant)
    cfg = train_config(name)
    V, batches = fixed_batches(cfg)
    model, losses, spikes, assigns, gnorms, opt = run_engine(dev, cfg, V, batches)

    caches, reseeds = [], []                           # spy on the reference's forward passes and re-seeds
    forward, hash_u32 = ref.model_forward, ref.hash_u32

    def recording_forward(*args, **kwargs):
        loss, cache = forward(*args, **kwargs)
        caches.append(cache)
        return loss, cache

    monkeypatch.setattr(ref, "model_forward", recording_forward)
    monkeypatch.setattr(ref, "hash_u32", lambda *a: reseeds.append(a) or hash_u32(*a))
    params = as64(ref.init_params(V, E, H, cfg.seed))
    state = ref.init_state(H, T, np.float64)
    want = ref.train_steps(params, state, batches, wiring_of(cfg), optim_of(cfg, opt.lr_at), cfg.seed, STEPS)
    step_caches = caches[-STEPS:]                      # the first call is the k-means++ forward

    # spikes and argmax are discontinuous: this config and seed have no flip in any step
    # between the float32 engine and the float64 reference (checked exactly), so the
    # trajectories stay within float32 rounding of each other
    for step, (s, a, c) in enumerate(zip(spikes, assigns, step_caches), 1):
        np.testing.assert_array_equal(s, c["s"], err_msg=f"spike flip at step {step}")
        np.testing.assert_array_equal(a, c["assign"], err_msg=f"assignment flip at step {step}")
    # float32 vs float64 losses: observed 5e-7 relative after ten steps
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    if name != "seed":
        assert max(gnorms) > cfg.optim.clip_norm       # norm clipping acted in some step
    if name == "modulate":
        assert reseeds, "no prototype was re-seeded: the config no longer exercises it"
    got = model.get_params()
    for k in got:
        # Adam turns small gradient differences into update differences of up to lr·1e-3:
        # observed ≤ 1e-5 on parameters of size 0.02-4; one wrong update is ≥ lr ≈ 1e-3
        np.testing.assert_allclose(got[k], params[k], rtol=1e-5, atol=1e-4, err_msg=k)
    # Hebbian and prototype states: sums of ≤ 24 float32 terms per step, observed ≤ 1e-6
    np.testing.assert_allclose(model.W_hebb.get(), state["W_hebb"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.P.get(), state["P"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.usage.get(), state["usage"], rtol=1e-5, atol=1e-7)
    if not name.startswith("hybrid"):
        assert np.abs(state["W_hebb"]).max() > 0.1                 # the Hebbian rule ran


def test_vocabulary_padding_stays_zero_and_is_hidden(dev):
    """W2/b2 are stored with V rounded up to 8 columns; the padding must stay
    exactly zero through training (its gradient is zero) and never show."""
    cfg = train_config("hybrid")
    V, batches = fixed_batches(cfg)
    assert V % 8 != 0, "pick a text whose vocabulary is not a multiple of 8"
    model, *_ = run_engine(dev, cfg, V, batches)
    flat = model.theta.get()
    o = model.layout.offsets
    W2 = flat[o["W2"]:o["W2"] + model.layout.size("W2")].reshape(H, model.Vp)
    b2 = flat[o["b2"]:o["b2"] + model.Vp]
    assert model.Vp % 8 == 0 and model.Vp > V
    assert not W2[:, V:].any() and not b2[V:].any()          # exactly zero after STEPS AdamW steps
    assert np.abs(W2[:, :V]).max() > 0                       # while the real columns trained
    p = model.get_params()
    assert p["W2"].shape == (H, V) and p["b2"].shape == (V,)


def test_ten_steps_are_bit_reproducible(dev):
    cfg = train_config("hybrid")
    V, batches = fixed_batches(cfg)
    a, losses_a, *_, opt_a = run_engine(dev, cfg, V, batches)
    b, losses_b, *_, opt_b = run_engine(dev, cfg, V, batches)
    assert [float(v) for v in losses_a] == [float(v) for v in losses_b]
    for k, v in a.state_arrays(opt_a).items():
        np.testing.assert_array_equal(b.state_arrays(opt_b)[k], v, err_msg=k)   # bit-identical


# ----------------------------------------------------------------------------- Trainer

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which "
         "this be or had not but all they one have their been has when who will more no if out "
         "so said what up its about into than them can only other new some time could these two "
         "may then do first any my now such like our over man me even most made after also did "
         "many before must through back years where much your way well down should because each "
         "river house garden letter window morning evening little great old young light dark").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~20 kB of English-like text, the same bytes every time."""
    rng = np.random.default_rng(1234)
    sentences, size = [], 0
    while size < 20_000:
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(4, 13))]
        s = " ".join(words).capitalize() + rng.choice([".", ".", ",", "?", ";"]) + " "
        sentences.append(s)
        size += len(s)
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("".join(sentences), encoding="utf-8")
    return path


TRAINER_OVERRIDES = ["model.embedding_dim=16", "model.hidden_dim=24", "model.num_prototypes=5",
                     "train.batch_size=4", "train.seq_len=16", "train.steps=12", "train.eval_every=6",
                     "train.eval_batches=2", "train.checkpoint_every=6", "optim.warmup_steps=3",
                     "train.log_every=100"]   # logs only at evaluations: train_loss spans 6 steps


def trainer_config(corpus, *extra):
    return apply_overrides(Config(), [f"data.path={corpus}", *TRAINER_OVERRIDES, *extra])


def stop_after(trainer, step):
    """Request a stop once `step` has run, as a SIGTERM arriving during that step would."""
    local_updates = trainer.model.local_updates

    def updates_then_stop(ws):
        local_updates(ws)
        if trainer.model.step == step:
            trainer.request_stop()

    trainer.model.local_updates = updates_then_stop
    return trainer


@pytest.fixture(scope="module")
def full_run(corpus, dev):
    trainer = Trainer(trainer_config(corpus), device=dev)
    return trainer, trainer.train()


def maths(history):
    """Evaluation records without the wall-clock field (train_time_s): what must be bit-identical."""
    return [{k: v for k, v in r.items() if k != "train_time_s"} for r in history]


def test_trainer_runs_are_identical(corpus, dev, full_run):
    trainer, first = full_run
    second = Trainer(trainer_config(corpus), device=dev).train()
    assert [r["step"] for r in first["history"]] == [6, 12]
    assert first["status"] == "finished"
    assert maths(first["history"]) == maths(second["history"])    # every float bit-identical
    assert all(r["train_time_s"] > 0 for r in first["history"])  # wall time: measured, not compared
    assert first["history"][1]["val_loss"] < first["history"][0]["val_loss"] + 1.0   # finite, sane


@pytest.mark.parametrize("stop", [6, 7])   # at the step-6 checkpoint; killed between checkpoints
def test_trainer_resume_equals_uninterrupted(corpus, dev, full_run, tmp_path, stop):
    cfg = trainer_config(corpus)
    stopped = stop_after(Trainer(cfg, str(tmp_path), device=dev), stop).train()
    assert stopped["status"] == "killed" and stopped["step"] == stop
    resumed = Trainer(cfg, str(tmp_path), resume=stopped["checkpoint"], device=dev)
    assert resumed.model.step == stop
    summary = resumed.train()
    trainer, full = full_run
    # bit-identical, step 12 included; its train_loss averages steps 7-12, so after the stop
    # at 7 it also needs the step statistics carried through the checkpoint
    assert maths(summary["history"]) == maths(full["history"])
    assert summary["history"][-1]["train_time_s"] > summary["history"][0]["train_time_s"]  # carried on
    for k, v in trainer.model.state_arrays(trainer.opt).items():
        np.testing.assert_array_equal(resumed.model.state_arrays(resumed.opt)[k], v, err_msg=k)


SGD = ("optim.name=sgd", "optim.lr=0.3", "optim.momentum=0.9")


def test_sgd_training_is_deterministic_and_resumes_bit_for_bit(corpus, dev, tmp_path):
    cfg = trainer_config(corpus, *SGD)
    full = Trainer(cfg, device=dev).train()
    again = Trainer(cfg, device=dev).train()
    assert maths(full["history"]) == maths(again["history"])
    stopped = stop_after(Trainer(cfg, str(tmp_path), device=dev), 7).train()
    resumed = Trainer(cfg, str(tmp_path), resume=stopped["checkpoint"], device=dev)
    assert set(load_checkpoint(stopped["checkpoint"])[0]) >= {f"sgd_velocity.{k}" for k in ("W_emb", "W1", "b1", "W2", "b2")}
    assert maths(resumed.train()["history"]) == maths(full["history"])   # the velocity is checkpointed
    adam = Trainer(trainer_config(corpus), device=dev).train()
    assert maths(adam["history"]) != maths(full["history"])               # it is another optimiser


def test_resume_with_another_optimiser_is_one_clear_error(corpus, dev, tmp_path):
    stopped = stop_after(Trainer(trainer_config(corpus), str(tmp_path), device=dev), 6).train()
    with pytest.raises(CheckpointError, match=r"is incompatible: 'optim.name' is 'adamw' in the checkpoint but 'sgd' "
                                              r"in this run; it cannot change on resume"):
        Trainer(trainer_config(corpus, *SGD), str(tmp_path), resume=stopped["checkpoint"], device=dev)


def test_non_finite_training_raises(corpus, dev):
    # lr = 1e30 and no warm-up: step 1 is finite, its update makes every weight ~1e30, and the
    # pre-activations of step 2 overflow float32
    cfg = trainer_config(corpus, "optim.lr=1e30", "optim.warmup_steps=0", "train.log_every=1")
    with pytest.raises(TrainingError, match=r"non-finite value at step 2\b"):
        Trainer(cfg, device=dev).train()


def test_corrupt_checkpoint_is_refused(corpus, dev, tmp_path):
    cfg = trainer_config(corpus, "train.steps=6")
    path = Path(Trainer(cfg, str(tmp_path), device=dev).train()["checkpoint"])
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 8):              # flip 8 bytes mid-file
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        Trainer(cfg, str(tmp_path), resume=str(path), device=dev)


# ----------------------------------------------------------------------------- command line

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "engine.train", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_is_deterministic_and_prints_json(corpus, dev):   # dev: skip/fail like the others without OpenCL
    args = [a for o in TRAINER_OVERRIDES + [f"data.path={corpus}"] for a in ("--set", o)]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    lines = first.stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [6, 12]
    for r in records:
        assert set(r) == set(EVAL_KEYS) == {"step", "train_loss", "val_loss", "val_acc", "val_bpc"}
        assert r["val_bpc"] == pytest.approx(r["val_loss"] / np.log(2), rel=1e-12)


def test_cli_unknown_key_suggests(corpus):
    result = run_cli("--set", "optim.lrr=1")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean 'optim.lr'" in lines[0], result.stderr


def test_cli_missing_data_file(tmp_path):
    missing = tmp_path / "nope.txt"
    result = run_cli("--set", f"data.path={missing}")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0], result.stderr
