"""The memory network (engine/models/memnet.py): the whole device model's loss and every
gradient against the float64 reference model built from the same declarations (faithful GELU on
the logits and plain, the GRU alone, dropout), training steps with each write mode against
RefModel.train_steps, determinism, engine.train end to end.

    python -m pytest tests/test_memnet.py -q

Tiny sizes: E = 8, M = 8, 10 slots, GRU 2 × 8, B = 5, S = 8 (tests/conftest.py).
"""
import numpy as np
import pytest
from conftest import B, S, TEXT

from engine.config import Config, apply_overrides
from engine.data import Batches, Vocab
from engine.model import Model, param_specs
from engine.optim import make_optimizer
from engine.params import init_params
from engine.reference import PAD
from engine.reference.model import RefModel
from engine.train import train_step

pytestmark = pytest.mark.opencl

VOCAB = Vocab.from_text(TEXT)
V = VOCAB.size
SIZES = ["model.family=memnet", "memnet.embedding_dim=8", "memnet.memory_dim=8", "memnet.memory_size=10",
         "memnet.hidden_dim=8", "memnet.gru_layers=2", "memnet.dropout=0", f"train.seq_len={S}",
         f"train.batch_size={B}"]
WIRINGS = {"faithful": [], "plain_logits": ["memnet.logit_gelu=false"], "no_memory": ["memnet.memory=false"],
           "dropout": ["memnet.dropout=0.3"]}


def config(*extra):
    return apply_overrides(Config(), SIZES + list(extra))


def batch(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (B, S)).astype(np.int32)
    y = rng.integers(0, V, (B, S)).astype(np.int32)
    y[1, 3] = PAD
    return x, y


@pytest.mark.parametrize("variant", ["dev", "gpu_dev"])
@pytest.mark.parametrize("wiring", list(WIRINGS))
def test_model_loss_and_gradients_match_reference(request, variant, wiring):
    dev = request.getfixturevalue(variant)
    cfg = config(*WIRINGS[wiring])
    rm = RefModel(cfg, V)
    params, state = rm.init()
    rng = np.random.default_rng(0)
    params = {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32).astype(np.float64)
              for k, v in params.items()}
    m = Model(dev, cfg, V)
    m.set_params(params)
    for k, v in state.items():
        m.st[k].set(v.astype(m.st[k].dtype))
    x, y = batch()
    ws = m.workspace(B, S)
    ws.x.set(x.ravel())
    ws.y.set(y.ravel())
    m.forward(ws)
    m.backward(ws)
    loss, caches = rm.forward(params, state, x, y)
    grads = rm.backward(params, state, caches)
    # float32 against float64 through the read, 2 GRU layers over 8 steps and the head: observed
    # ≤ 1e-6 relative; a wrong term is ≥ 1e-3
    assert float(ws.loss_out.get()[0]) == pytest.approx(loss, rel=1e-5)
    got = m.get_grads()
    assert set(got) == set(grads)
    for k, g in grads.items():
        np.testing.assert_allclose(got[k], g, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(g).max()), err_msg=k)


def engine_steps(dev, cfg, data):
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
    return m, losses


@pytest.mark.parametrize("variant", ["dev", "gpu_dev"])
@pytest.mark.parametrize("mode", ["mean", "slot"])
def test_training_steps_with_the_write_match_reference(request, variant, mode):
    """Five Adam steps, each followed by the memory's write (mem.K, mem.Vals move by both), against
    RefModel.train_steps in float64; a rerun gives the same bits."""
    dev = request.getfixturevalue(variant)
    steps = 5
    cfg = config(f"memnet.write_mode={mode}", "memnet.write_strength=0.3", f"train.steps={steps}",
                 "optim.warmup_steps=2", "optim.lr=0.01")
    batches = Batches(VOCAB.encode(TEXT), B, S, cfg.seed)
    data = [batches.next_batch() for _ in range(steps)]
    m, losses = engine_steps(dev, cfg, data)
    rm = RefModel(cfg, V)
    params, state = rm.init()
    want = rm.train_steps(params, state, data, steps, make_optimizer(dev, cfg, m).lr_at)
    np.testing.assert_allclose(losses, want, rtol=1e-5)   # observed ≤ 1e-6
    got = m.get_params()
    for k in params:
        np.testing.assert_allclose(got[k], params[k], rtol=1e-4, atol=1e-5, err_msg=k)
    _, again = engine_steps(dev, cfg, data)
    assert again == losses


def test_engine_train_runs_the_family(dev, tmp_path):
    from engine.train import Trainer
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    cfg = config(f"data.path={tmp_path / 'text.txt'}", "train.steps=12", "train.eval_every=6", "train.eval_batches=1",
                 "optim.lr=0.01")
    out = Trainer(cfg, str(tmp_path / "out"), device=dev).train()
    first, last = out["history"][0], out["history"][-1]
    assert last["val_loss"] < first["train_loss"] and np.isfinite(last["val_loss"])


@pytest.mark.parametrize("variant", ["dev", "gpu_dev"])
def test_generation_carries_the_gru_state(request, variant):
    """Character by character with the GRU states carried (RecurrentGenerator) equals the training
    forward over the whole sequence at every position; sampling is seeded."""
    from engine.generate import RecurrentGenerator, make_generator
    dev = request.getfixturevalue(variant)
    cfg = config()
    m = Model(dev, cfg, V)
    rng = np.random.default_rng(1)
    m.set_params({k: (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
                  for k, v in init_params(param_specs(m.layers), 0).items()})
    g = make_generator(m, VOCAB)
    assert isinstance(g, RecurrentGenerator) and set(g.state) == {"gru0", "gru1"}
    ids = VOCAB.encode(TEXT[:12])
    step = np.stack([g.feed(int(t)).copy() for t in ids])
    ws = m.workspace(1, len(ids))
    ws.x.set(ids)
    m.forward(ws, loss=False, training=False)
    want = ws.logits.get()[:, :V]
    # the same kernels at S = 1 and S = 12: observed ≤ 1e-6 of the largest logit
    np.testing.assert_allclose(step, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))
    text = g.sample("the ", 20, temperature=0.8, seed=3)
    assert g.sample("the ", 20, temperature=0.8, seed=3) == text and len(text) == 20


def test_tracked_run_logs_the_memory_and_the_design_figure(tmp_path, capsys):
    """experiments.run memnet (tiny): the slot usage per evaluation (mem_hist: cumulative arg-max
    counts, B·S per step), the memory telemetry, test metrics and training_figure.png in MLflow."""
    import json

    import mlflow

    from experiments.run import main
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    rc = main(["memnet", "--tracking-uri", uri, "--out", str(tmp_path / "runs"),
               "--set", f"data.path={tmp_path / 'text.txt'}", "--set", "memnet.memory_size=12",
               "--set", "memnet.hidden_dim=8", "--set", "memnet.embedding_dim=8", "--set", "memnet.memory_dim=8",
               "--set", "train.steps=8", "--set", "train.eval_every=4", "--set", "train.log_every=4",
               "--set", "train.seq_len=8", "--set", "train.batch_size=4", "--set", "train.eval_batches=1",
               "--set", "data.val_fraction=0.2", "--set", "data.test_fraction=0.2"])
    assert rc == 0
    rid = capsys.readouterr().out.strip().splitlines()[-1]
    c = mlflow.tracking.MlflowClient(uri)
    run = c.get_run(rid)
    m = run.data.metrics
    assert 0 <= m["test_f1"] <= 1 and 0 <= m["test_acc"] <= 1 and 0 < m["mem/mem_key_cosine"] <= 1
    assert 1 <= m["mem/mem_usage_perplexity"] <= 12 and m["mem/mem_never_used"] + m["mem/mem_batch_used"] <= 12 + 12
    arts = {a.path for a in c.list_artifacts(rid)}
    assert {"training_figure.png", "mem_hist"} <= arts
    got = json.loads(open(c.download_artifacts(rid, "mem_hist/step_0000004.json", str(tmp_path))).read())
    # the telemetry of step 4 is read before that step's local rules: the counts of steps 1-3, B·S each
    assert got["step"] == 4 and sum(got["counts"]) == 3 * 4 * 8 and len(got["counts"]) == 12
