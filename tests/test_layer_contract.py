"""The layer contract: every layer (engine/layers) against its numpy reference
(engine/reference/layers.py, the same class name), forward and backward; the reference's
backward against float64 finite differences; two device runs bit-identical; both kernel
variants. A new layer joins by adding a case to CASES.

    python -m pytest tests/test_layer_contract.py -q

Each case runs the layer alone on random inputs: x (N,C) floats (token ids for the
embeddings), an upstream gradient R (N, n_out) of the scalar sum(y·R) (the head's own
loss); n_in, n_out: the layer's widths where they are not its C (widths()). The heads (HEADS)
compute their loss from targets: character ids, or for embed_head float vectors (N, D) put in ws.y.
"""
import numpy as np
import pytest

from engine.config import Config, apply_overrides
from engine.layers import build as build_device
from engine.model import Model
from engine.models import LayerDecl
from engine.params import init_params
from engine.reference.layers import build as build_ref

B, S, H, T, V = 3, 6, 16, 5, 13
N = B * S


def _bio(name, *overrides, **extra):
    cfg = apply_overrides(Config(), ["model.hidden_dim=16", "model.num_prototypes=5", *overrides])
    return (name, LayerDecl("bio", "bio0", "", dict(H=H, T=T, hebb=cfg.hebb, proto=cfg.proto, spike_threshold=0.5,
                                                     seed=7, **extra)), "float")


CASES = [
    ("embed_gelu (folded: V < N)", LayerDecl("embed_gelu", "embed", "", dict(V=V, E=8, H=H)), "ids"),
    ("embed_gelu (gathered: V > N)", LayerDecl("embed_gelu", "embed", "", dict(V=40, E=8, H=H)), "ids"),
    ("residual_gelu", LayerDecl("residual_gelu", "res1", "", dict(H=H)), "float"),
    ("char_head", LayerDecl("char_head", "head", "", dict(V=V, H=H)), "float"),
    ("layernorm", LayerDecl("layernorm", "ln", "", dict(C=H)), "float"),
    ("batchnorm", LayerDecl("batchnorm", "bn", "", dict(C=H, momentum=0.2)), "float"),
    ("dropout", LayerDecl("dropout", "drop", "", dict(C=H, p=0.3, seed=5, index=2)), "float"),
    ("char_head (lm_head, no bias)", LayerDecl("char_head", "head", "", dict(
        V=V, H=H, names=("W", "b"), bias=False, init="normal", scale=0.02)), "float"),
    ("layernorm (no beta, float8 rows)", LayerDecl("layernorm", "ln", "", dict(C=H, bias=False, vec=True)), "float"),
    ("tok_pos_embed", LayerDecl("tok_pos_embed", "tok_pos", "", dict(V=V, C=H, block_size=S + 2)), "ids"),
    ("tok_pos_embed (dropout)", LayerDecl("tok_pos_embed", "tok_pos", "", dict(V=V, C=H, block_size=S, dropout=0.3,
                                                                               seed=5, index=0)), "ids"),
    ("attn_block (2 heads)", LayerDecl("attn_block", "attn0", "", dict(C=H, n_head=2)), "float"),
    ("attn_block (4 heads: d = 4, bias)", LayerDecl("attn_block", "attn2", "", dict(C=H, n_head=4, bias=True)), "float"),
    ("attn_block (4 heads, bias, dropout)", LayerDecl("attn_block", "attn1", "", dict(
        C=H, n_head=4, bias=True, dropout=0.25, proj_scale=0.01, seed=5, index=1)), "float"),
    ("mlp_block", LayerDecl("mlp_block", "mlp0", "", dict(C=H)), "float"),
    ("mlp_block (bias, dropout)", LayerDecl("mlp_block", "mlp1", "", dict(C=H, bias=True, dropout=0.25, seed=5,
                                                                             index=3)), "float"),
    ("embedding", LayerDecl("embedding", "emb", "", dict(V=V, E=H)), "ids"),
    ("dense (gelu)", LayerDecl("dense", "fc", "", dict(I=H, O=12)), "float"),
    ("dense (none, lecun)", LayerDecl("dense", "fc", "", dict(I=H, O=H, act="none", init="lecun")), "float"),
    ("char_head (GELU on the logits)", LayerDecl("char_head", "head", "", dict(V=V, H=H, gelu=True)), "float"),
    ("char_head (GELU on the logits, no bias)", LayerDecl("char_head", "head", "", dict(V=V, H=H, gelu=True,
                                                                                     bias=False)), "float"),
    _bio("bio off/off", "hebb.mode=off", "proto.mode=off"),
    _bio("bio shadow/shadow dot", "hebb.mode=shadow", "proto.mode=shadow", "proto.similarity=dot"),
    _bio("bio modulate/feature", "hebb.mode=modulate", "proto.mode=feature"),
    _bio("bio fast_weights/feature", "hebb.mode=fast_weights", "proto.mode=feature"),
    _bio("bio fast_weights activity/token", "hebb.post=activity", "proto.mode=token"),
    _bio("bio fast_weights layernorm/key", "hebb.norm=layernorm", "proto.mode=key"),
    _bio("bio delta layernorm/token", "hebb.rule=delta", "hebb.norm=layernorm", "proto.mode=token"),
    # a transformer's in-block hybrids with transformer.branch = prenorm: x + (z − h), h = LN(x)
    _bio("bio prenorm fast_weights/off", "proto.mode=off", prenorm=True),
    _bio("bio prenorm off/feature (bias)", "hebb.mode=off", "proto.mode=feature", prenorm=True, bias=True),
    _bio("bio prenorm fast_weights activity/token", "hebb.post=activity", "proto.mode=token", prenorm=True),
    # DRLMemNet's slot memory: E ≠ M (the widths from n_in, n_out); Ms = 70 > the GPU row group of 64
    ("memory_read", LayerDecl("memory_read", "mem", "", dict(E=6, M=H, Ms=70, V=V)), "float"),
    ("memory_read (no memory)", LayerDecl("memory_read", "mem", "", dict(E=6, M=H, memory=False)), "float"),
    # x (N, I) -> h (N, Hd): the input width is the layer's I (Case), BPTT over S = 6
    ("gru (I=12, Hd=16)", LayerDecl("gru", "gru0", "", dict(I=12, Hd=H)), "float"),
    ("gru (torch init, I=16, Hd=8)", LayerDecl("gru", "gru1", "", dict(I=H, Hd=8, init="torch")), "float"),
    # a 3×3×3 lattice: x (N, n²) written on the front face, y (N, n²) read on the back (n_in = n_out = 9)
    ("lattice (local, 6 neighbours)", LayerDecl("lattice", "lat0", "", dict(n=3, D=3, C=2, Hc=4, K=3)), "float"),
    ("lattice (local+distant+gate)", LayerDecl("lattice", "lat1", "", dict(n=3, D=3, C=2, Hc=4, K=3, neighbours=26,
                                                                           experts=("local", "distant"), R=3)), "float"),
    ("lattice (K=0)", LayerDecl("lattice", "lat2", "", dict(n=3, D=3, C=2, Hc=4, K=0)), "float"),
    # the embedding-regression head: float targets (N, D); the diversity term off, then on
    ("embed_head", LayerDecl("embed_head", "head", "", dict(D=H)), "float"),
    ("embed_head (diversity, other weights)", LayerDecl("embed_head", "head", "", dict(D=H, w_mse=0.7, w_cos=1.3,
                                                                                       w_div=0.4)), "float"),
]
HEADS = ("char_head", "embed_head")   # the layers whose forward is a loss (their own objective)
IDS = [c[0] for c in CASES]


def widths(layer) -> tuple[int, int]:
    """(input, output) width of a layer: n_in / n_out where they differ (the memory read: E -> M),
    else its C or H for both."""
    C = getattr(layer, "n_in", None) or getattr(layer, "C", None) or getattr(layer, "H", None)
    return C, getattr(layer, "n_out", None) or C


def targets(decl, rng, D):
    """The batch's targets: (N, D) float vectors for embed_head (float32-representable), else
    character ids."""
    if decl.kind == "embed_head":
        return rng.standard_normal((N, D)).astype(np.float32).astype(np.float64)
    return rng.integers(0, V, N).astype(np.int32)


class Case:
    """One layer on the device (a Model of that layer alone) and in the reference."""

    def __init__(self, dev, decl, inputs, seed=0):
        self.decl, self.inputs = decl, inputs
        self.layer = build_device(decl)
        self.ref = build_ref(decl)
        rng = np.random.default_rng(seed)
        self.params = {k: v.astype(np.float64) for k, v in init_params(self.layer.params(), 3).items()}
        for k in self.params:   # away from ones/zeros initialisations, float32-representable
            self.params[k] = (self.params[k] + 0.3 * rng.standard_normal(self.params[k].shape)).astype(np.float32) \
                .astype(np.float64)
        self.state = {}
        for s in (s for s in self.layer.state() if s.checkpoint):   # scratch (inv_p, psums) is recomputed
            a = np.full(s.shape, s.fill, np.float64)
            if s.name in ("P", "W_hebb", "run_mean"):
                a = (0.3 if s.name == "W_hebb" else 1.0) * rng.standard_normal(s.shape)
            self.state[s.name] = a.astype(np.float32).astype(np.float64)
        C, C_out = widths(self.layer)
        n_in = self.layer.V if inputs == "ids" else None
        self.x = rng.integers(0, n_in, N).astype(np.int32) if inputs == "ids" else \
            rng.standard_normal((N, C)).astype(np.float32).astype(np.float64)
        self.y = targets(decl, rng, C_out)
        self.R = rng.standard_normal((N, C_out)).astype(np.float32).astype(np.float64)
        self.is_head = decl.kind in HEADS
        self.dev = dev
        cfg = Config()
        self.model = Model(dev, cfg, V, layers=[self.layer])
        self.model.step = 4   # dropout's mask stream
        if self.params:
            self.model.set_params(self.params)
        for k, v in self.state.items():
            self.model.st[k].set(v.astype(self.model.st[k].dtype))
        self.ws = self.model.workspace(B, S)
        if self.y.dtype == np.int32:
            self.ws.y.set(self.y)
        else:   # the embedding head's (N, D) float32 targets (its task provides ws.y so)
            self.ws.y = dev.to_device(self.y.astype(np.float32))

    def c(self, **kw):
        return dict(B=B, S=S, y=self.y, step=4, training=True) | kw

    def device(self, training=True):
        """(y, dx, grads, state) of one forward and backward on the device."""
        c = self.ws.ctx[self.layer.name]
        c.training = training
        if self.inputs == "ids":
            self.ws.x.set(self.x)
            x = self.ws.x
        else:
            x = self.dev.to_device(self.x.astype(np.float32))
        for k, v in self.state.items():   # the forward may update state (BatchNorm's running statistics)
            self.model.st[k].set(v.astype(self.model.st[k].dtype))
        if self.is_head:
            self.layer.forward(c, x)
            y = self.ws.loss_out.get()[:1].astype(np.float64)
            dx = self.layer.backward(c, None)
        else:
            y = self.layer.forward(c, x).get().astype(np.float64)
            if not training:
                return y, None, None, None
            dx = self.layer.backward(c, self.dev.to_device(self.R.astype(np.float32)))
        dx = None if dx is None else dx.get().astype(np.float64)
        state = {k: self.model.st[k].get() for k in self.state}
        return y, dx, self.model.get_grads(), state

    def reference(self, params=None, x=None, training=True, frozen_post=None):
        """(scalar objective, y, cache, state after) in float64."""
        st = {k: v.copy() for k, v in self.state.items()}
        kw = {"frozen_post": frozen_post} if frozen_post is not None else {}
        y, cache = self.ref.forward(params or self.params, st, self.x if x is None else x, self.c(training=training), **kw)
        y = np.atleast_1d(np.asarray(y, np.float64))
        obj = y[0] if self.is_head else float(np.sum(y * self.R))
        return obj, y, cache, st

    def reference_backward(self, cache):
        return self.ref.backward(self.params, self.state, cache, None if self.is_head else self.R)


@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
@pytest.mark.parametrize("name,decl,inputs", CASES, ids=IDS)
def test_layer_matches_reference(dev, gpu_dev, variant, name, decl, inputs):
    case = Case(dev if variant == "cpu" else gpu_dev, decl, inputs)
    y, dx, grads, state = case.device()
    _, want_y, cache, want_state = case.reference()
    if decl.kind == "bio":   # the discontinuities must agree before the values are compared
        np.testing.assert_array_equal(case.ws.buf["bio0"].s.get(), cache["s"])
        if cache["assign"] is not None:
            np.testing.assert_array_equal(case.ws.buf["bio0"].assign.get(), cache["assign"])
    want_dx, want_g = case.reference_backward(cache)
    # float32 against float64 over sums of ≤ N·H = 288 terms: observed ≤ 3e-7 relative to the
    # largest element; a wrong term is ≥ 1e-3 of it
    scale = max(1.0, np.abs(want_y).max())
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=2e-6 * scale, err_msg="forward")
    if want_dx is not None:
        np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=2e-6 * max(1.0, np.abs(want_dx).max()), err_msg="dx")
    assert set(want_g) == set(case.params)
    for k, g in want_g.items():
        np.testing.assert_allclose(grads[k], g, rtol=1e-4, atol=2e-6 * max(1.0, np.abs(g).max()), err_msg=k)
    for k, v in want_state.items():   # state a forward pass changes (BatchNorm's running statistics)
        np.testing.assert_allclose(state[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    # two runs: the same bits
    y2, dx2, grads2, _ = case.device()
    assert y2.tobytes() == y.tobytes() and (dx is None or dx2.tobytes() == dx.tobytes())
    assert all(grads2[k].tobytes() == grads[k].tobytes() for k in grads)


@pytest.mark.parametrize("name,decl,inputs", CASES, ids=IDS)
def test_reference_backward_matches_finite_differences(name, decl, inputs):
    """Central differences in float64 of sum(y·R) (the head: its loss) over sampled elements of
    the input and of every parameter; post and the assignments held (constants of backward).
    Observed relative error ≤ 1e-8; a wrong term is ≥ 1e-2."""
    case = reference_case(decl, inputs)
    obj, _, cache, _ = case.reference()
    frozen = cache.get("post") if isinstance(cache, dict) else None
    dx, grads = case.reference_backward(cache)
    rng = np.random.default_rng(2)
    eps = 1e-6
    targets = [(k, case.params[k], grads[k]) for k in case.params]
    if inputs == "float":
        targets.append(("x", case.x, dx))
    assert targets, "a layer with nothing to check"
    for name_, arr, g in targets:
        for _ in range(6):
            i = tuple(rng.integers(0, n) for n in arr.shape)
            old = arr[i]
            arr[i] = old + eps
            lp = case.reference(frozen_post=frozen)[0]
            arr[i] = old - eps
            lm = case.reference(frozen_post=frozen)[0]
            arr[i] = old
            fd = (lp - lm) / (2 * eps)
            assert abs(fd - g[i]) <= 1e-6 * max(1.0, abs(fd)), (name_, i, fd, g[i])


def reference_case(decl, inputs):
    """A Case without a device (the finite-difference test is numpy only)."""
    case = Case.__new__(Case)
    case.decl, case.inputs = decl, inputs
    case.layer, case.ref = build_device(decl), build_ref(decl)
    rng = np.random.default_rng(0)
    case.params = {k: v.astype(np.float64) + 0.3 * rng.standard_normal(v.shape)
                   for k, v in init_params(case.layer.params(), 3).items()}
    case.state = {s.name: ((0.3 if s.name == "W_hebb" else 1.0) * rng.standard_normal(s.shape)
                           if s.name in ("P", "W_hebb", "run_mean") else np.full(s.shape, s.fill, np.float64))
                  for s in case.layer.state() if s.checkpoint}
    C, C_out = widths(case.layer)
    case.x = rng.integers(0, case.layer.V, N).astype(np.int32) if inputs == "ids" else rng.standard_normal((N, C))
    case.y = targets(decl, rng, C_out)
    case.R = rng.standard_normal((N, C_out))
    case.is_head = decl.kind in HEADS
    return case


@pytest.mark.opencl
@pytest.mark.parametrize("kind", ["batchnorm", "dropout"])
def test_evaluation_behaviour(dev, kind):
    """BatchNorm evaluates on its running statistics (and leaves them alone); dropout is the
    identity at evaluation and drops about p of the elements in training."""
    decl = next(d for _, d, _ in CASES if d.kind == kind)
    case = Case(dev, decl, "float")
    y, *_ = case.device(training=False)
    _, want, _, st = case.reference(training=False)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    if kind == "dropout":
        np.testing.assert_array_equal(y, case.x)
        y_train, *_ = case.device()
        dropped = np.mean(y_train == 0)
        assert 0.15 < dropped < 0.45     # p = 0.3 over 288 elements
    else:
        for k, v in st.items():
            np.testing.assert_array_equal(v, case.state[k])


def test_every_layer_kind_has_a_case():
    from engine.layers import bio, dense, embed, embed_head, gru, head, lattice, memory, norm, residual, transformer
    from engine.layers import Layer
    kinds = {c.kind for m in (bio, dense, embed, embed_head, gru, head, lattice, memory, norm, residual,
                              transformer)
             for c in vars(m).values()
             if isinstance(c, type) and issubclass(c, Layer) and c is not Layer and "kind" in vars(c)}
    assert kinds == {d.kind for _, d, _ in CASES}
