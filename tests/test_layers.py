"""Models built from layers (engine/layers, engine/models): the layered numpy reference
against the hand-written one, stacked bio layers and the new wirings (hebb.norm, proto.mode
token and key) on the device against the layered reference, finite differences, training
steps, generation.

    python -m pytest tests/test_layers.py -q

Small sizes (tests/conftest.py). References in float64 on the same float32 parameters.
"""
import itertools

import numpy as np
import pytest
from conftest import B, E, H, S, T, TEXT, wiring_of

from engine import reference as ref
from engine.config import Config, apply_overrides
from engine.data import Batches, Vocab
from engine.generate import Generator
from engine.model import Model, param_specs
from engine.optim import make_optimizer
from engine.train import train_step
from engine.params import init_params
from engine.reference.model import RefModel

SIZES = [f"model.embedding_dim={E}", f"model.hidden_dim={H}", f"model.num_prototypes={T}",
         f"train.batch_size={B}", f"train.seq_len={S}"]
VOCAB = Vocab.from_text(TEXT)
V = VOCAB.size

# the new model shapes and wirings; each changes the loss (test_variants_are_not_the_same)
VARIANTS = {
    "stack2": ["model.num_layers=2"],
    "stack3_modulate": ["model.num_layers=3", "hebb.mode=modulate", "proto.mode=shadow"],
    "layernorm": ["hebb.norm=layernorm"],
    "token": ["proto.mode=token"],
    "key": ["proto.mode=key"],
    "stack2_ln_token_activity": ["model.num_layers=2", "hebb.norm=layernorm", "proto.mode=token",
                                 "hebb.post=activity"],
    "modulate_ln_token": ["hebb.mode=modulate", "hebb.norm=layernorm", "proto.mode=token"],
    "delta": ["hebb.rule=delta"],
    "stack2_delta_ln_key": ["model.num_layers=2", "hebb.rule=delta", "hebb.norm=layernorm", "proto.mode=key"],
}


def config(*extra):
    return apply_overrides(Config(), SIZES + list(extra))


def batch(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (B, S)).astype(np.int32)
    y = rng.integers(0, V, (B, S)).astype(np.int32)
    y[0, 2] = y[B - 1, 7] = ref.PAD
    return x, y


def random_state(rm, seed=0):
    """float32-representable parameters and non-zero state (modulate reads W_hebb, P random)."""
    rng = np.random.default_rng(seed)
    params, state = rm.init()
    for k in state:
        if k.endswith("P"):
            state[k][...] = rng.standard_normal(state[k].shape)
        elif k.endswith("W_hebb"):
            state[k][...] = 0.1 * rng.standard_normal(state[k].shape)
    for k in params:
        if k.endswith("gamma") or k.endswith("beta") or k.endswith("proto_emb"):   # away from their init
            params[k] = params[k] + 0.3 * rng.standard_normal(params[k].shape)
    f32 = lambda d: {k: v.astype(np.float32) for k, v in d.items()}   # noqa: E731
    return {k: v.astype(np.float64) for k, v in f32(params).items()}, \
        {k: v.astype(np.float64) for k, v in f32(state).items()}


# ----------------------------------------------------------------------------- numpy only

@pytest.mark.parametrize("hebb_mode,proto_mode,post", [
    (hm, pm, "spikes") for hm, pm in itertools.product(["off", "shadow", "modulate", "fast_weights"],
                                                       ["off", "shadow", "feature"])] + [
    ("fast_weights", "feature", "activity")])
def test_layered_reference_is_the_hand_written_one(hebb_mode, proto_mode, post):
    """RefModel, built from the family's declarations, computes what engine.reference.model_forward
    and model_backward (written by hand before the layers existed) compute: same float64 ops in
    the same order, so equal to rounding (observed exactly equal)."""
    cfg = config(f"hebb.mode={hebb_mode}", f"proto.mode={proto_mode}", f"hebb.post={post}")
    rm = RefModel(cfg, V)
    params, state = random_state(rm)
    x, y = batch()
    loss, caches = rm.forward(params, state, x, y)
    grads = rm.backward(params, state, caches)
    st = {"W_hebb": state["W_hebb"], "P": state["P"], "usage": state["usage"]}
    want_loss, cache = ref.model_forward(params, st, x, y, wiring_of(cfg))
    want = ref.model_backward(params, st, cache, wiring_of(cfg))
    assert set(grads) == set(want)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-14)
    for k in want:
        np.testing.assert_allclose(grads[k], want[k], rtol=1e-12, atol=1e-15, err_msg=k)


def test_parameters_are_declared_by_the_layers():
    """One layer = the engine's names and draws; a stack adds bio<l>.W, bio<l>.b between the
    first layer and the head; the variants add their own (decay on matrices only)."""
    assert [p.name for p in RefModel(config(), V).specs] == ["W_emb", "W1", "b1", "W2", "b2"]
    names = [p.name for p in RefModel(config("model.num_layers=3", "hebb.norm=layernorm", "proto.mode=token"), V).specs]
    assert names == ["W_emb", "W1", "b1", "hebb_ln.gamma", "hebb_ln.beta", "proto_emb",
                     "bio1.W", "bio1.b", "bio1.hebb_ln.gamma", "bio1.hebb_ln.beta", "bio1.proto_emb",
                     "bio2.W", "bio2.b", "bio2.hebb_ln.gamma", "bio2.hebb_ln.beta", "bio2.proto_emb", "W2", "b2"]
    decay = {p.name for p in RefModel(config("model.num_layers=2", "hebb.norm=layernorm"), V).specs if p.decay}
    assert decay == {"W_emb", "W1", "bio1.W", "W2"}
    # the one-layer draws are the engine's (engine.reference.init_params, the same generator order)
    a = init_params(RefModel(config(), V).specs, 3)
    b = ref.init_params(V, E, H, 3)
    for k in b:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_reference_backward_matches_finite_differences(name):
    """Central differences in float64 of the loss over sampled elements of every parameter,
    with post and the assignments held (they are constants of the backward pass; an eps of
    1e-6 flips none here). Observed relative error ≤ 1e-7; a wrong term is ≥ 1e-2."""
    cfg = config(*VARIANTS[name])
    rm = RefModel(cfg, V)
    params, state = random_state(rm)
    x, y = batch()
    _, caches = rm.forward(params, state, x, y)
    frozen = {layer.name: c["post"] for layer, c in zip(rm.layers, caches) if "post" in c}
    grads = rm.backward(params, state, caches)
    rng = np.random.default_rng(1)
    eps = 1e-6
    for k, p in params.items():
        idx = [tuple(rng.integers(0, n) for n in p.shape) for _ in range(6)]
        for i in idx:
            old = p[i]
            p[i] = old + eps
            lp, cp = rm.forward(params, state, x, y, frozen_post=frozen)
            p[i] = old - eps
            lm, cm = rm.forward(params, state, x, y, frozen_post=frozen)
            p[i] = old
            for a, b in zip(cp + cm, caches + caches):
                if b.get("assign") is not None:
                    np.testing.assert_array_equal(a["assign"], b["assign"])
            fd = (lp - lm) / (2 * eps)
            assert abs(fd - grads[k][i]) <= 1e-6 * max(1.0, abs(fd)), (k, i, fd, grads[k][i])


# ----------------------------------------------------------------------------- on the device

def device_model(dev, cfg, params, state):
    m = Model(dev, cfg, V)
    m.set_params({k: v.astype(np.float32) for k, v in params.items()})
    for k, v in state.items():
        m.st[k].set(v.astype(np.float32))
    return m


@pytest.mark.opencl
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_loss_and_gradients_match_reference(dev, name):
    check_gradients(dev, config(*VARIANTS[name]))


@pytest.mark.opencl
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_gpu_kernels_match_reference(gpu_dev, name):
    check_gradients(gpu_dev, config(*VARIANTS[name]))


def check_gradients(dev, cfg):
    rm = RefModel(cfg, V)
    params, state = random_state(rm)
    x, y = batch()
    m = device_model(dev, cfg, params, state)
    ws = m.workspace(B, S)
    ws.x.set(x.ravel())
    ws.y.set(y.ravel())
    m.forward(ws)
    m.backward(ws)
    loss, grads = ws.loss_out.get(), m.get_grads()
    want_loss, caches = rm.forward(params, state, x, y)
    want = rm.backward(params, state, caches)
    # discontinuities first: no spike or assignment may flip between float32 and float64
    for layer, c in zip(rm.layers, caches):
        if layer.kind == "bio":
            np.testing.assert_array_equal(ws.buf[layer.name].s.get(), c["s"])
            if c["assign"] is not None:
                np.testing.assert_array_equal(ws.buf[layer.name].assign.get(), c["assign"])
    # as tests/test_model.py: a mean of N log-sum-exps in float32, observed 3e-7 relative
    np.testing.assert_allclose(loss[0], want_loss, rtol=1e-5)
    assert set(grads) == set(want)
    for k in want:
        # float32 chains through ≤ 3 layers of ≤ 30-term sums: observed ≤ 5e-7 relative to the
        # largest element; a wrong backward term is ≥ 1e-3
        scale = np.abs(want[k]).max()
        np.testing.assert_allclose(grads[k], want[k], rtol=1e-4, atol=2e-6 * max(1.0, scale), err_msg=k)


@pytest.mark.opencl
def test_variants_are_not_the_same(dev):
    """Guards the tests above: every variant changes the loss of the same batch."""
    x, y = batch()
    losses = {}
    for name, extra in {"base": [], **VARIANTS}.items():
        cfg = config(*extra)
        rm = RefModel(cfg, V)
        params, state = random_state(rm)
        m = device_model(dev, cfg, params, state)
        ws = m.workspace(B, S)
        ws.x.set(x.ravel())
        ws.y.set(y.ravel())
        m.forward(ws)
        losses[name] = round(float(ws.loss_out.get()[0]), 4)
    assert len(set(losses.values())) == len(losses), losses


TRAIN = {"stack2": ["model.num_layers=2"],
         "stack2_ln_token": ["model.num_layers=2", "hebb.norm=layernorm", "proto.mode=token"],
         "delta_stack2": ["model.num_layers=2", "hebb.rule=delta"],
         "key_reseed": ["proto.mode=key", "proto.usage_decay=0.6", "proto.reseed_threshold=0.5"],
         "stack3_modulate_sgd": ["model.num_layers=3", "hebb.mode=modulate", "proto.mode=shadow", "optim.name=sgd",
                                 "optim.lr=0.3", "optim.clip_value=0.05"]}
STEPS = 8


def engine_steps(dev, cfg, data):
    """(model, optimiser, per-step losses) of a fresh model trained on data as the Trainer does."""
    m = Model(dev, cfg, V)
    m.set_params(init_params(param_specs(m.layers), cfg.seed))
    opt = make_optimizer(dev, cfg, m)
    ws = m.workspace(B, S)
    losses = []
    for x, y in data:
        ws.x.set(x.ravel())
        ws.y.set(y.ravel())
        train_step(m, opt, ws)
        losses.append(float(ws.loss_out.get()[0]))
        m.local_updates(ws)
    return m, opt, losses


@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["dev", "gpu_dev"])   # the device's kernel family, and the GPU one
@pytest.mark.parametrize("name", list(TRAIN))
def test_training_steps_match_reference(request, variant, name):
    """STEPS steps as the Trainer runs them (k-means++ warm start of every bio layer on the
    first batch, the optimiser, the Hebbian and prototype rules of every layer) against
    RefModel.train_steps in float64."""
    dev = request.getfixturevalue(variant)
    cfg = config(*TRAIN[name], f"train.steps={STEPS}", "optim.warmup_steps=3")
    batches = Batches(VOCAB.encode(TEXT), B, S, cfg.seed)
    data = [batches.next_batch() for _ in range(STEPS)]
    m, opt, losses = engine_steps(dev, cfg, data)
    rm = RefModel(cfg, V)
    params, state = rm.init()
    want = rm.train_steps(params, state, data, STEPS, opt.lr_at)
    # float32 vs float64 trajectories with no spike or assignment flip: observed ≤ 2e-6 relative
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    got = m.get_params()
    for k in params:
        np.testing.assert_allclose(got[k], params[k], rtol=1e-5, atol=1e-4, err_msg=k)
    for k, v in m.get_state().items():
        np.testing.assert_allclose(v, state[k], rtol=1e-5, atol=1e-5, err_msg=k)
    if name == "key_reseed":
        assert not np.allclose(state["usage"], 1.0 / T)     # the prototype rule ran
    # two runs of the same config are bit-identical
    _, _, again = engine_steps(dev, cfg, data)
    assert again == losses


@pytest.mark.opencl
@pytest.mark.parametrize("extra", [["model.num_layers=2", "hebb.norm=layernorm", "proto.mode=token"], []])
def test_generic_generation_is_the_causal_forward(dev, extra):
    """The generic step-wise path (any character model) gives, at each position of a prompt
    shorter than seq_len, the logits the whole sequence's forward pass gives there: the models
    are causal. For the one-layer hybrid it also equals the carried-state path."""
    cfg = config(*extra)
    rm = RefModel(cfg, V)
    params, state = random_state(rm)
    m = device_model(dev, cfg, params, state)
    ids = VOCAB.encode(TEXT[:S])
    ws = m.workspace(1, S)
    ws.x.set(ids)
    m.forward(ws, loss=False)
    whole = ws.logits.get()[:, :V]
    gen = Generator(m, VOCAB, fused=False)
    gen.carried = False      # force the generic path
    steps = np.stack([gen.feed(int(t)).copy() for t in ids])
    # the same kernels on (1,t) and (1,S) shapes; the sums differ only by product tiling: observed 1e-6
    np.testing.assert_allclose(steps, whole, rtol=1e-4, atol=1e-5)
    if not extra:
        carried = Generator(m, VOCAB, fused=False)
        assert carried.carried
        np.testing.assert_allclose(np.stack([carried.feed(int(t)).copy() for t in ids]), whole, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the trainer on a stack

STACK = ["model.num_layers=2", "hebb.rule=delta", "hebb.norm=layernorm", "proto.mode=token"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT * 4, encoding="utf-8")
    return str(path)


def stack_config(text_file, *extra):
    return apply_overrides(Config(), [f"data.path={text_file}", *SIZES, "train.batch_size=4", "train.seq_len=16",
                                      "train.steps=12", "train.eval_every=6", "train.eval_batches=2",
                                      "train.checkpoint_every=6", "optim.warmup_steps=3", "train.log_every=3",
                                      *STACK, *extra])


@pytest.mark.opencl
def test_stacked_trainer_resumes_bit_for_bit(text_file, dev, tmp_path):
    """A stacked model's checkpoint holds every layer's parameters, optimiser moments and state
    (bio1.*); resumed from step 7 it prints the same numbers as the uninterrupted run, and its
    per-layer telemetry is logged under bio1/."""
    from engine.checkpoint import CheckpointError, load_checkpoint
    from engine.train import Callback, Trainer
    cfg = stack_config(text_file)

    class Logs(Callback):
        def __init__(self):
            self.records = []

        def on_log(self, rec):
            self.records.append(rec)

    logs = Logs()
    full = Trainer(cfg, device=dev, callbacks=[logs]).train()
    assert {"bio1/spike_rate", "bio1/hebb_norm", "bio1/proto_perplexity", "grad_norm/bio1.W",
            "grad_norm/bio1.proto_emb"} <= set(logs.records[-1])
    assert logs.records[-1]["bio1/hebb_norm"] > 0      # the second layer's memory was written
    t = Trainer(cfg, str(tmp_path), device=dev)
    updates = t.model.local_updates

    def then_stop(ws):
        updates(ws)
        if t.model.step == 7:
            t.request_stop()
    t.model.local_updates = then_stop
    stopped = t.train()
    arrays, _ = load_checkpoint(stopped["checkpoint"])
    assert {"param.bio1.W", "adam_m.bio1.hebb_ln.gamma", "state.bio1.P", "state.bio1.usage",
            "state.bio1.W_hebb", "param.proto_emb"} <= set(arrays)
    resumed = Trainer(cfg, str(tmp_path), resume=stopped["checkpoint"], device=dev).train()
    strip = lambda h: [{k: v for k, v in r.items() if k != "train_time_s"} for r in h]   # noqa: E731
    assert strip(resumed["history"]) == strip(full["history"])
    # a checkpoint of another stack is one clear error before anything is allocated
    with pytest.raises(CheckpointError, match=r"'model.num_layers' is 2 in the checkpoint but 3 in this run"):
        Trainer(stack_config(text_file, "model.num_layers=3"), str(tmp_path), resume=stopped["checkpoint"], device=dev)
    with pytest.raises(CheckpointError, match=r"'hebb.norm' is 'layernorm' in the checkpoint but 'none'"):
        Trainer(stack_config(text_file, "hebb.norm=none"), str(tmp_path), resume=stopped["checkpoint"], device=dev)
