"""The memory network's PyTorch twin (benchmarks/torch_memnet.py) against the engine: the same
weights give the same loss and every gradient, and five training steps with the memory's write
the same losses and parameters. Skipped only where torch is absent."""
import numpy as np
import pytest
from conftest import B, S, TEXT

from engine.config import Config, apply_overrides
from engine.data import Batches, Vocab
from engine.model import Model, param_specs
from engine.optim import make_optimizer
from engine.params import init_params
from engine.train import train_step

pytestmark = pytest.mark.opencl
torch = pytest.importorskip("torch")
from benchmarks.torch_memnet import TorchMemnet  # noqa: E402

VOCAB = Vocab.from_text(TEXT)
V = VOCAB.size
SIZES = ["model.family=memnet", "memnet.embedding_dim=8", "memnet.memory_dim=8", "memnet.memory_size=10",
         "memnet.hidden_dim=8", "memnet.gru_layers=2", "memnet.dropout=0", f"train.seq_len={S}",
         f"train.batch_size={B}", "optim.lr=0.01", "optim.warmup_steps=2", "train.steps=5"]


@pytest.mark.parametrize("extra", [[], ["memnet.logit_gelu=false", "memnet.memory=false"]])
def test_twin_loss_and_gradients_equal_the_engine(dev, extra):
    cfg = apply_overrides(Config(), SIZES + extra)
    m = Model(dev, cfg, V)
    rng = np.random.default_rng(0)
    params = {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
              for k, v in init_params(param_specs(m.layers), 0).items()}
    m.set_params(params)
    batches = Batches(VOCAB.encode(TEXT), B, S, 0)
    x, y = batches.next_batch()
    ws = m.workspace(B, S)
    ws.x.set(x.ravel())
    ws.y.set(y.ravel())
    m.forward(ws)
    m.backward(ws)
    twin = TorchMemnet(cfg, V, params, threads=1, W_u=m.st["mem.W_u"].get() if "mem.W_u" in m.st else None)
    loss = float(twin.backward(x, y))
    # float32 on both sides, sums in other orders: observed ≤ 1e-6 relative
    assert loss == pytest.approx(float(ws.loss_out.get()[0]), rel=1e-5)
    got, want = twin.grads_as_engine(), m.get_grads()
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6 * max(1.0, np.abs(want[k]).max()), err_msg=k)


@pytest.mark.parametrize("mode", ["mean", "slot"])
def test_twin_trains_like_the_engine_with_the_write(dev, mode):
    cfg = apply_overrides(Config(), SIZES + [f"memnet.write_mode={mode}", "memnet.write_strength=0.3"])
    m = Model(dev, cfg, V)
    params = init_params(param_specs(m.layers), cfg.seed)
    m.set_params(params)
    opt = make_optimizer(dev, cfg, m)
    twin = TorchMemnet(cfg, V, params, threads=1, W_u=m.st["mem.W_u"].get())
    batches = Batches(VOCAB.encode(TEXT), B, S, cfg.seed)
    ws = m.workspace(B, S)
    engine, theirs = [], []
    for step in range(5):
        x, y = batches.next_batch()
        ws.x.set(x.ravel())
        ws.y.set(y.ravel())
        train_step(m, opt, ws)
        m.local_updates(ws)
        engine.append(float(ws.loss_out.get()[0]))
        theirs.append(twin.train_step(x, y, twin.lr_at(step + 1), return_loss=True))
    np.testing.assert_allclose(theirs, engine, rtol=1e-5)   # observed ≤ 1e-6
    got, want = twin.params_as_engine(), m.get_params()
    for k in ("mem.K", "mem.Vals", "gru1.W_h", "head.W"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)
