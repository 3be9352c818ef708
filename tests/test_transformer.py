"""The transformer family (engine/models/transformer.py): the attention kernels against numpy
(both kernel variants, bit-identical reruns), the reference model against float64 finite
differences, the device model's loss and every gradient against the reference (tied and
untied, with biases, the hybrids), training steps, determinism, the memory check, telemetry
and the command line.

    python -m pytest tests/test_transformer.py -q

Tiny sizes: C = 16, 2 heads, 2 blocks, block_size = S = 8, B = 5 (tests/conftest.py).
"""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import B, S, TEXT

from engine import ops
from engine.config import Config, ConfigError, apply_overrides
from engine.data import Batches, Vocab
from engine.model import Model, device_buffers, gemm_scratch, model_buffers, model_layers, param_specs, \
    workspace_buffers
from engine.optim import make_optimizer
from engine.params import init_params
from engine.reference import PAD
from engine.reference import attention as ra
from engine.reference.model import RefModel
from engine.train import train_step

VOCAB = Vocab.from_text(TEXT)
V = VOCAB.size
C, NH, L = 16, 2, 2
SIZES = ["model.family=transformer", f"transformer.n_layer={L}", f"transformer.n_head={NH}",
         f"transformer.n_embd={C}", f"transformer.block_size={S}", f"train.seq_len={S}", f"train.batch_size={B}"]
WIRINGS = {"tied": [], "untied_bias": ["transformer.tie_weights=false", "transformer.bias=true"],
           "hebb+proto": ["transformer.hybrid=hebb+proto", "model.num_prototypes=5", "hebb.post=activity"],
           # dropout on the embedding, the probabilities and every branch: the split-heads path on both variants
           "dropout": ["transformer.dropout=0.2", "transformer.bias=true"],
           # the hybrid layers through their own LayerNorm: x + m(LN(x)), spikes as values
           "prenorm": ["transformer.hybrid=hebb+proto", "transformer.branch=prenorm", "model.num_prototypes=5"]}


def config(*extra):
    return apply_overrides(Config(), SIZES + list(extra))


def batch(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (B, S)).astype(np.int32)
    y = rng.integers(0, V, (B, S)).astype(np.int32)
    y[1, 3] = PAD
    return x, y


def perturbed(rm, seed=0):
    """float32-representable parameters away from the initialisation's ones and zeros."""
    params, state = rm.init()
    rng = np.random.default_rng(seed)
    params = {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32).astype(np.float64)
              for k, v in params.items()}
    return params, state


def device_model(dev, cfg, params):
    m = Model(dev, cfg, V)
    m.set_params(params)
    return m


# -- kernels ---------------------------------------------------------------------------------------
@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["dev", "gpu_dev"])
@pytest.mark.parametrize("d", [8, 4])   # d = 8: the float8 copies of the CPU variant; 4: element-wise
def test_heads_split_merge_and_embedding(request, variant, d):
    dev = request.getfixturevalue(variant)
    rng = np.random.default_rng(1)
    nh, Bk, Sk = 3, 2, 5
    N, Ck = Bk * Sk, nh * d
    x = rng.standard_normal((N, 3 * Ck)).astype(np.float32)
    out = dev.empty((3 * N * Ck,))
    ops.heads_split(dev, dev.to_device(x), out, N, Sk, nh, d, parts=3)
    want = ra.heads_split(x, Sk, nh, parts=3)
    np.testing.assert_array_equal(out.get().reshape(want.shape), want)   # copies: exact
    back = dev.empty((N, 3 * Ck))
    ops.heads_merge(dev, out, back, N, Sk, nh, d, parts=3)
    np.testing.assert_array_equal(back.get(), x)
    np.testing.assert_array_equal(ra.heads_merge(want, Sk, nh), x)
    # the token + position embedding: one float32 addition per element, exact
    wte, wpe = rng.standard_normal((7, Ck)).astype(np.float32), rng.standard_normal((Sk + 2, Ck)).astype(np.float32)
    tok = rng.integers(0, 7, N).astype(np.int32)
    e = dev.empty((N, Ck))
    ops.tok_pos_embed_forward(dev, dev.to_device(wte), dev.to_device(tok), dev.to_device(wpe), e, N, Sk, Ck)
    np.testing.assert_array_equal(e.get(), ra.tok_pos_embed_forward(wte, tok, wpe, Sk))


@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["dev", "gpu_dev"])
@pytest.mark.parametrize("Sk", [8, 70])   # 70 > the GPU work-group: rows span several strides
def test_causal_softmax_forward_backward(request, variant, Sk):
    dev = request.getfixturevalue(variant)
    rng = np.random.default_rng(2)
    R, scale = 3 * Sk, 1 / math.sqrt(8)
    s = (3 * rng.standard_normal((R, Sk))).astype(np.float32)
    dp = rng.standard_normal((R, Sk)).astype(np.float32)
    p, ds = dev.empty((R, Sk)), dev.empty((R, Sk))
    s_d, dp_d = dev.to_device(s), dev.to_device(dp)
    ops.causal_softmax(dev, s_d, p, R, Sk, scale)
    want = ra.causal_softmax(s.astype(np.float64).reshape(3, Sk, Sk), Sk, scale).reshape(R, Sk)
    got = p.get()
    # exp_fast (~2e-7 relative) and float32 sums of ≤ 70 terms: observed ≤ 5e-7; a wrong mask or
    # scale is ≥ 1e-2
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    assert (got[np.triu(np.ones((Sk, Sk), bool), 1)[np.arange(R) % Sk]] == 0).all()   # exactly 0 above t
    ops.causal_softmax_backward(dev, p, dp_d, ds, R, Sk, scale)
    want_ds = ra.causal_softmax_backward(want, dp.astype(np.float64), scale)
    np.testing.assert_allclose(ds.get(), want_ds, rtol=1e-5, atol=2e-6 * np.abs(want_ds).max())
    # in place (the layer writes ds over dp) gives the same bits; reruns are bit-identical
    again = dev.to_device(dp)
    ops.causal_softmax_backward(dev, p, again, again, R, Sk, scale)
    assert again.get().tobytes() == ds.get().tobytes()
    p2 = dev.empty((R, Sk))
    ops.causal_softmax(dev, s_d, p2, R, Sk, scale)
    assert p2.get().tobytes() == got.tobytes()


@pytest.mark.opencl
@pytest.mark.parametrize("Sk", [13, 24])   # 24: the softmax sums in blocks of eight keys; 13: one by one
def test_fused_attention_forward_backward(dev, Sk):
    """The CPU variant's fused kernels (d % 8 == 0) against the numpy reference; bit-identical reruns."""
    rng = np.random.default_rng(4)
    Bk, nh, d = 2, 3, 16
    N, Ck, scale = Bk * Sk, nh * d, 1 / math.sqrt(16)
    qkv = rng.standard_normal((N, 3 * Ck)).astype(np.float32)
    dy = rng.standard_normal((N, Ck)).astype(np.float32)
    q_d, dy_d = dev.to_device(qkv), dev.to_device(dy)
    p, y = dev.empty((Bk * nh, Sk, Sk)), dev.empty((N, Ck))
    ds, dqkv = dev.empty((Bk * nh, Sk, Sk)), dev.empty((N, 3 * Ck))
    ops.attention_forward(dev, q_d, p, y, Bk, Sk, nh, d, scale)
    ops.attention_backward(dev, q_d, p, dy_d, ds, dqkv, Bk, Sk, nh, d, scale)
    want_p, want_y = ra.attention_forward(qkv.astype(np.float64), Sk, nh, scale)
    want_d = ra.attention_backward(qkv.astype(np.float64), want_p, dy.astype(np.float64), Sk, nh, scale)
    # float32 dots of 16 terms and sums of ≤ 24 rows: observed ≤ 1e-6 relative to the largest element
    for got, want in ((p, want_p), (y, want_y), (dqkv, want_d)):
        np.testing.assert_allclose(got.get(), want, rtol=1e-5, atol=2e-6 * np.abs(want).max())
    first = [a.get().tobytes() for a in (p, y, dqkv)]
    ops.attention_forward(dev, q_d, p, y, Bk, Sk, nh, d, scale)
    ops.attention_backward(dev, q_d, p, dy_d, ds, dqkv, Bk, Sk, nh, d, scale)
    assert [a.get().tobytes() for a in (p, y, dqkv)] == first


@pytest.mark.opencl
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.5, 0.75)])
def test_medium_k_packed_product_is_gemm_tn_bit_for_bit(dev, alpha, beta):
    """Aᵀ·B with K_PACK_MIN ≤ K < K_SPLIT_MIN (the weight gradients at batch·seq of 256..2047) packs
    A and takes gemm_tn_split: exactly the bits of the plain gemm_tn (k ascending in both)."""
    if dev.variant == "gpu":
        pytest.skip("the packed path is the CPU variant's")
    rng = np.random.default_rng(5)
    M, N, K = 12, 24, 264
    assert ops._packs(dev.variant, M, N, K) and not ops._k_chunk(K)
    a = dev.to_device(rng.standard_normal((K, M)).astype(np.float32))
    b = dev.to_device(rng.standard_normal((K, N)).astype(np.float32))
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    got, want = dev.to_device(c0), dev.to_device(c0)
    ops.gemm(dev, a, b, got, M, N, K, alpha=alpha, beta=beta, trans_a=True)
    ops._gemm_raw(dev, True, M, N, K, alpha, a.data, 0, M * K, b.data, 0, K * N, beta, want.data, 0, M * N, 1)
    assert got.get().tobytes() == want.get().tobytes()
    np.testing.assert_allclose(got.get(), alpha * a.get().T.astype(np.float64) @ b.get() + beta * c0, rtol=1e-5,
                               atol=1e-4)


@pytest.mark.opencl
@pytest.mark.parametrize("residual", [False, True])
def test_layernorm_float8_rows(dev, residual):
    """The float8 row kernels (vec=True, the transformer's) against the reference; their float8
    column sums of dγ, dβ give exactly the serial kernel's bits."""
    if dev.variant == "gpu":
        pytest.skip("the float8 row kernels are the CPU variant's")
    from engine.reference import layernorm_backward, layernorm_forward
    rng = np.random.default_rng(6)
    N, Ck = 37, 24
    x, dy, dres = (rng.standard_normal((N, Ck)).astype(np.float32) for _ in range(3))
    g, beta = (1 + 0.3 * rng.standard_normal(Ck)).astype(np.float32), rng.standard_normal(Ck).astype(np.float32)
    d = {k: dev.to_device(v) for k, v in dict(x=x, dy=dy, dres=dres, g=g, beta=beta).items()}
    y, mean, rstd, dx = dev.empty((N, Ck)), dev.empty((N,)), dev.empty((N,)), dev.empty((N, Ck))
    dg, db, dg1, db1, dx1 = dev.empty((Ck,)), dev.empty((Ck,)), dev.empty((Ck,)), dev.empty((Ck,)), dev.empty((N, Ck))
    ops.layernorm_forward(dev, d["x"], d["g"], d["beta"], y, mean, rstd, N, Ck, vec=True)
    ops.layernorm_backward(dev, d["dy"], d["x"], d["g"], mean, rstd, dx, dg, db, N, Ck, vec=True,
                           dres=d["dres"] if residual else None)
    want_y, cache = layernorm_forward(x.astype(np.float64), g.astype(np.float64), beta.astype(np.float64))
    want_dx, want_dg, want_db = layernorm_backward(dy.astype(np.float64), cache)
    want_dx = want_dx + (dres if residual else 0)
    # float32 sums of 24 terms: observed ≤ 1e-6 relative to the largest element
    np.testing.assert_allclose(y.get(), want_y, rtol=1e-5, atol=2e-6 * np.abs(want_y).max())
    np.testing.assert_allclose(dx.get(), want_dx, rtol=1e-5, atol=2e-6 * np.abs(want_dx).max())
    np.testing.assert_allclose(dg.get(), want_dg, rtol=1e-5, atol=1e-5)
    serial = dev.kernel("norm.cl", "layernorm_param_grads")
    dev.launch(serial, (Ck,), None, d["dy"].data, d["x"].data, mean.data, rstd.data, np.int32(N), np.int32(Ck),
               dg1.data, db1.data)
    assert dg1.get().tobytes() == dg.get().tobytes() and db1.get().tobytes() == db.get().tobytes()
    ops.layernorm_backward(dev, d["dy"], d["x"], d["g"], mean, rstd, dx1, dg1, db1, N, Ck, vec=True,
                           dres=d["dres"] if residual else None)
    assert dx1.get().tobytes() == dx.get().tobytes()


@pytest.mark.opencl
@pytest.mark.parametrize("clip_value", [0.0, 0.05])
def test_adamw_eight_per_item_is_the_scalar_kernel_bit_for_bit(dev, clip_value):
    """ops.adamw on the CPU variant takes eight elements per work-item (VEC8): exactly the scalar
    kernel's θ, m and v."""
    if dev.variant == "gpu":
        pytest.skip("VEC8 is the CPU variant's")
    rng = np.random.default_rng(7)
    n, chunk = 4 * 64, 64
    g, th, m, v = (rng.standard_normal(n).astype(np.float32) for _ in range(4))
    v = np.abs(v) * 1e-3
    mask = dev.to_device(np.array([1, 0, 1, 1], np.float32))
    lr_mask = dev.to_device(np.array([1, 0.5, 2, 0], np.float32))
    gnorm = dev.to_device(np.array([3.0], np.float32))
    args = (1e-2, 0.9, 0.99, 1e-8, 0.1, 0.5, 0.2, 1.0, clip_value)
    a = [dev.to_device(x) for x in (th, m, v)]
    b = [dev.to_device(x) for x in (th, m, v)]
    gd = dev.to_device(g)
    ops.adamw(dev, a[0], gd, a[1], a[2], mask, lr_mask, gnorm, n, *args, chunk)
    scalar = dev.kernel("optim.cl", "adamw", (("CHUNK", chunk),))
    dev.launch(scalar, (n,), None, b[0].data, gd.data, b[1].data, b[2].data, mask.data, lr_mask.data, gnorm.data,
               *(np.float32(x) for x in args))
    assert all(x.get().tobytes() == y.get().tobytes() for x, y in zip(a, b))
    assert not np.array_equal(a[0].get(), th)


@pytest.mark.opencl
def test_gelu_eight_per_item_is_the_scalar_kernels_bit_for_bit(dev):
    """gelu_forward8 / gelu_backward8 (the MLP without bias, CPU variant) give exactly the values of
    bias_gelu_forward at bias 0 and of gelu_backward; and the reference's within the erf fit."""
    from engine.reference import gelu_backward, gelu_forward
    rng = np.random.default_rng(8)
    N, H = 16, 40
    a0 = (3 * rng.standard_normal((N, H))).astype(np.float32)
    dh0 = rng.standard_normal((N, H)).astype(np.float32)
    a, dh = dev.to_device(a0), dev.to_device(dh0)
    h1, h2, d1, d2 = (dev.empty((N, H)) for _ in range(4))
    ops.bias_gelu_forward(dev, dev.to_device(a0), dev.zeros((H,)), h1, N, H)
    ops.gelu_forward8(dev, a, h2, N * H)
    ops.gelu_backward(dev, dh, a, d1, N, H)
    ops.gelu_backward8(dev, dh, a, d2, N * H)
    assert h1.get().tobytes() == h2.get().tobytes() and d1.get().tobytes() == d2.get().tobytes()
    # A&S 7.1.26 (|error| ≤ 1.5e-7 in erf) and exp_fast: observed ≤ 5e-7 absolute
    np.testing.assert_allclose(h2.get(), gelu_forward(a0.astype(np.float64)), rtol=0, atol=2e-6)
    np.testing.assert_allclose(d2.get(), gelu_backward(dh0.astype(np.float64), a0.astype(np.float64)), rtol=0,
                               atol=2e-6)


# -- the reference model ---------------------------------------------------------------------------
@pytest.mark.parametrize("wiring", ["tied", "untied_bias", "dropout"])
def test_reference_model_matches_finite_differences(wiring):
    """The whole reference model (tied: both gradients of wte added) against central differences
    in float64 of its loss, on sampled elements of every parameter. Observed ≤ 1e-8 relative."""
    cfg = config(*WIRINGS[wiring])
    rm = RefModel(cfg, V)
    params, state = perturbed(rm)
    x, y = batch()
    _, caches = rm.forward(params, state, x, y)
    grads = rm.backward(params, state, caches)
    assert set(grads) == set(params)
    rng = np.random.default_rng(3)
    eps = 1e-6
    for name, a in params.items():
        for _ in range(3):
            i = tuple(rng.integers(0, n) for n in a.shape)
            if name == "wpe" or name == "wte":   # rows a batch uses (the others' gradient is 0)
                i = (int(x.ravel()[rng.integers(0, x.size)]) if name == "wte" else i[0] % S,) + i[1:]
            old = a[i]
            a[i] = old + eps
            lp = rm.forward(params, state, x, y)[0]
            a[i] = old - eps
            lm = rm.forward(params, state, x, y)[0]
            a[i] = old
            fd = (lp - lm) / (2 * eps)
            assert abs(fd - grads[name][i]) <= 1e-6 * max(1.0, abs(fd)), (name, i, fd, grads[name][i])


def test_parameter_names_init_and_decay():
    """The names the PyTorch twin reads, nanoGPT's initialisation and weight decay on matrices only."""
    specs = {p.name: p for p in param_specs(model_layers(config(), V))}
    assert list(specs)[:8] == ["wte", "wpe", "h0.ln_1.gamma", "h0.attn.W_qkv", "h0.attn.W_proj", "h0.ln_2.gamma",
                               "h0.mlp.W_fc", "h0.mlp.W_proj"]
    assert list(specs)[-1] == "ln_f.gamma" and len(specs) == 2 + 6 * L + 1     # tied, no bias: no lm_head.*
    assert specs["wte"].shape == (V, C) and specs["wte"].stored == (-(-V // 8) * 8, C)
    assert specs["h1.attn.W_qkv"].shape == (C, 3 * C) and specs["h1.mlp.W_proj"].shape == (4 * C, C)
    assert specs["h0.attn.W_proj"].scale == pytest.approx(0.02 / math.sqrt(2 * L))
    assert specs["h0.mlp.W_fc"].scale == 0.02 and specs["wpe"].scale == 0.02
    assert {n for n, p in specs.items() if p.decay} == {n for n, p in specs.items() if len(p.shape) == 2}
    full = {p.name for p in param_specs(model_layers(config(*WIRINGS["untied_bias"]), V))}
    assert {"lm_head.W", "lm_head.b", "ln_f.beta", "h1.ln_2.beta", "h0.attn.b_qkv", "h0.mlp.b_proj"} <= full
    assert len(full) == 2 + 12 * L + 2 + 2


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="transformer.n_head.*divide"):
        apply_overrides(Config(), ["transformer.n_head=3"])
    with pytest.raises(ConfigError, match="train.seq_len.*block_size=8"):
        config("train.seq_len=9")
    assert apply_overrides(Config(), ["train.seq_len=128"]).train.seq_len == 128   # the hybrid: no limit


# -- the device model against the reference ----------------------------------------------------------
@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["dev", "gpu_dev"])
@pytest.mark.parametrize("wiring", list(WIRINGS))
def test_model_loss_and_gradients_match_reference(request, variant, wiring):
    dev = request.getfixturevalue(variant)
    cfg = config(*WIRINGS[wiring])
    rm = RefModel(cfg, V)
    params, state = perturbed(rm)
    x, y = batch()
    if "proto" in cfg.transformer.hybrid:   # prototypes from the data, as the trainer's warm start
        rm.forward(params, state, x, y, warm_start=True)
    m = device_model(dev, cfg, params)
    for k, v in state.items():
        m.st[k].set(v.astype(np.float32))
    ws = m.workspace(B, S)
    ws.x.set(x.ravel())
    ws.y.set(y.ravel())
    m.forward(ws)
    m.backward(ws)
    loss, caches = rm.forward(params, state, x, y)
    grads = rm.backward(params, state, caches)
    # float32 against float64 through 2 blocks: observed ≤ 1e-6 relative; a wrong term is ≥ 1e-3
    assert float(ws.loss_out.get()[0]) == pytest.approx(loss, rel=1e-5)
    got = m.get_grads()
    assert set(got) == set(grads)
    for k, g in grads.items():
        np.testing.assert_allclose(got[k], g, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(g).max()), err_msg=k)
    if cfg.transformer.tie_weights:   # the padding rows of the tied wte: zero gradient
        full = m.grad.get()[m.layout.offsets["wte"]:][:m.layout.size("wte")].reshape(m.layout.shapes["wte"])
        assert not full[V:].any()


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
    return m, opt, losses


@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["dev", "gpu_dev"])
@pytest.mark.parametrize("wiring", ["tied", "hebb+proto", "dropout", "prenorm"])   # dropout: new masks every step
def test_training_steps_match_reference_and_are_deterministic(request, variant, wiring):
    """Six steps as the Trainer runs them (AdamW with weight decay on the matrices, clipping, the
    warm-up; the local rules of the hybrid) against RefModel.train_steps in float64; a second
    run of the same config gives the same bits."""
    dev = request.getfixturevalue(variant)
    steps = 6
    cfg = config(*WIRINGS[wiring], f"train.steps={steps}", "optim.warmup_steps=2", "optim.lr=0.01",
                 "optim.weight_decay=0.1")
    batches = Batches(VOCAB.encode(TEXT), B, S, cfg.seed)
    data = [batches.next_batch() for _ in range(steps)]
    m, opt, losses = engine_steps(dev, cfg, data)
    rm = RefModel(cfg, V)
    params, state = rm.init()
    want = rm.train_steps(params, state, data, steps, opt.lr_at)
    # float32 vs float64 trajectories: observed ≤ 1e-6 relative
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    assert losses[-1] < losses[0]
    got = m.get_params()
    for k in params:
        np.testing.assert_allclose(got[k], params[k], rtol=1e-4, atol=1e-5, err_msg=k)
    _, _, again = engine_steps(dev, cfg, data)
    assert again == losses


@pytest.mark.opencl
def test_telemetry_attention_entropy_and_block_norms(dev):
    cfg = config()
    m = Model(dev, cfg, V)
    m.set_params(init_params(param_specs(m.layers), 0))
    opt = make_optimizer(dev, cfg, m)
    ws = m.workspace(B, S)
    x, y = batch()
    ws.x.set(x.ravel())
    ws.y.set(y.ravel())
    train_step(m, opt, ws)
    tel = {**opt.telemetry(), **m.telemetry(ws)}
    p = ws.buf["attn1"].p.get().astype(np.float64)
    assert tel["attn_entropy/h1"] == pytest.approx(ra.attention_entropy(p), rel=1e-12)
    # nearly uniform attention at initialisation: the mean over rows of log(t+1), within 5 %
    assert tel["attn_entropy/h0"] == pytest.approx(np.mean(np.log(np.arange(1, S + 1))), rel=0.05)
    members = [n for n in m.layout.names if n.startswith("h0.")]
    assert len(members) == 6
    assert tel["grad_norm/h0"] == pytest.approx(math.sqrt(sum(tel[f"grad_norm/{n}"] ** 2 for n in members)),
                                                rel=1e-6)
    assert "grad_norm/h2" not in tel and "attn_entropy/h2" not in tel


def declared(d):
    return {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in d.items()}


def allocated(obj):
    return {k: (tuple(a.shape), a.dtype) for k, a in obj.items()}


@pytest.mark.opencl
@pytest.mark.parametrize("extra,batch_size", [(["transformer.dropout=0.1", "transformer.bias=true"], B),
                                              ([], 40),
                                              (["transformer.hybrid=hebb+proto", "model.num_prototypes=5"], 256)])
def test_declared_buffers_are_what_a_step_allocates(dev, extra, batch_size):
    """The memory check (device_buffers) sizes exactly what a step, telemetry and an evaluation
    allocate; batch 40 (N = 320) takes the packed weight gradients, batch 256 (N = 2048) the
    K-split ones."""
    cfg = config(*extra, f"train.batch_size={batch_size}")
    saved = dev.__dict__.pop("_workspace", None)
    try:
        m = Model(dev, cfg, V)
        m.set_params(init_params(param_specs(m.layers), 0))
        ws = m.workspace(batch_size, S)
        ids = np.resize(VOCAB.encode(TEXT), batch_size * S + 1)
        ws.x.set(ids[:-1])
        ws.y.set(ids[1:])
        opt = make_optimizer(dev, cfg, m)
        train_step(m, opt, ws)
        m.telemetry(ws)
        m.local_updates(ws)
        m.forward(ws, training=False)
        dev.finish()
        scratch = {k: ((a.size,), a.dtype) for k, a in dev.__dict__.get("_workspace", {}).items()}
    finally:
        dev.__dict__.pop("_workspace", None)
        if saved is not None:
            dev._workspace = saved
    assert allocated(m.st) | {"theta": ((m.layout.total,), np.dtype(np.float32)),
                              "grad": ((m.layout.total,), np.dtype(np.float32))} == declared(model_buffers(cfg, V))
    ws_arrays = {"x": ws.x, "y": ws.y, "offsets": ws.offsets}
    ws_arrays.update({f"{name}.{k}": a for name, b in ws.buf.items() for k, a in vars(b).items()})
    assert allocated(ws_arrays) == declared(workspace_buffers(cfg, V, batch_size, S))
    assert scratch == declared(gemm_scratch(cfg, V, batch_size, S, dev.variant))
    assert ("gemm_partial" in scratch) == (batch_size == 256)
    assert ("gemm_apack" in scratch) == (batch_size > B and dev.variant != "gpu")
    assert set(device_buffers(cfg, V, batch_size, S)) >= {f"workspace.{k}" for k in ws_arrays}


# -- the command line ------------------------------------------------------------------------------
@pytest.mark.opencl
def test_engine_train_runs_the_family_and_its_loss_falls(tmp_path):
    """python -m engine.train --set model.family=transformer --set train.steps=20 (the baseline's
    batch of 12 and two short evaluations, to stay quick): it runs, and the loss falls."""
    cmd = [sys.executable, "-m", "engine.train", "--set", "model.family=transformer", "--set", "train.steps=20",
           "--set", "train.batch_size=12", "--set", "train.eval_every=10", "--set", "train.eval_batches=2",
           "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    recs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["step"] for r in recs] == [10, 20]
    assert recs[1]["val_loss"] < recs[0]["val_loss"] < math.log(200)
    assert recs[1]["train_loss"] < recs[0]["train_loss"]
    assert (tmp_path / "checkpoint.npz").exists()


def test_hybrid_wirings_change_the_prediction():
    """Each transformer.hybrid puts a local rule on the residual stream: the same parameters give
    four different losses (the bio layers have no parameters of their own here)."""
    x, y = batch()
    losses = {}
    for hybrid in ("none", "hebb", "proto", "hebb+proto"):
        rm = RefModel(config(f"transformer.hybrid={hybrid}", "model.num_prototypes=5", "hebb.post=activity"), V)
        params, state = perturbed(rm)
        rm.forward(params, state, x, y, warm_start=True)
        losses[hybrid] = round(float(rm.forward(params, state, x, y)[0]), 6)
    assert len(set(losses.values())) == 4, losses


@pytest.mark.opencl
def test_trainer_resumes_bit_for_bit_with_telemetry(dev, tmp_path):
    """The Trainer on the hebb+proto hybrid: telemetry per block (attention entropy, block norms,
    the bio layers' own), and a run stopped at step 5 and resumed prints the numbers of the
    uninterrupted one; a checkpoint of other transformer sizes is refused before allocation."""
    from engine.checkpoint import CheckpointError
    from engine.train import Callback, Trainer
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 4, encoding="utf-8")
    cfg = config(*WIRINGS["hebb+proto"], f"data.path={text}", "train.steps=8", "train.eval_every=4",
                 "train.eval_batches=2", "train.checkpoint_every=4", "train.log_every=2", "optim.warmup_steps=2")

    class Logs(Callback):
        records = []

        def on_log(self, rec):
            self.records.append(rec)

    full = Trainer(cfg, device=dev, callbacks=[Logs()]).train()
    rec = Logs.records[-1]
    assert {"attn_entropy/h0", "attn_entropy/h1", "grad_norm/h0", "grad_norm/h1", "h1/hebb/hebb_norm",
            "h0/proto/proto_perplexity", "grad_norm/wte"} <= set(rec)
    assert rec["h0/hebb/hebb_norm"] > 0 and 0 < rec["attn_entropy/h1"] < math.log(S)
    t = Trainer(cfg, str(tmp_path / "run"), device=dev)
    updates = t.model.local_updates

    def then_stop(ws):
        updates(ws)
        if t.model.step == 5:
            t.request_stop()
    t.model.local_updates = then_stop
    stopped = t.train()
    resumed = Trainer(cfg, str(tmp_path / "run"), resume=stopped["checkpoint"], device=dev).train()
    strip = lambda h: [{k: v for k, v in r.items() if k != "train_time_s"} for r in h]   # noqa: E731
    assert strip(resumed["history"]) == strip(full["history"])
    with pytest.raises(CheckpointError, match="transformer.n_layer"):
        Trainer(apply_overrides(cfg, ["transformer.n_layer=3"]), str(tmp_path / "run"),
                resume=stopped["checkpoint"], device=dev)
