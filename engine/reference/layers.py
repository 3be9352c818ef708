"""numpy references of the device layers (engine/layers/), one class per layer with the
device layer's kind and constructor: forward(p, st, x, c) -> (y, cache) and
backward(p, st, cache, dy) -> (dx, grads), local_update(st, cache, step), warm-start
inputs. p and st hold the layer's parameters and state under its own names (no prefix);
grads has p's keys. c: dict(B=, S=, y=) of the batch.
"""
from __future__ import annotations

import numpy as np

from . import (batchnorm_backward, batchnorm_eval, batchnorm_forward, batchnorm_running, dropout_forward,
               dropout_key, embedding_backward, embedding_forward, fast_weights_backward, fast_weights_delta_backward,
               fast_weights_delta_forward, fast_weights_forward, gelu_backward, gelu_forward, hebbian_update,
               kmeanspp_init, layernorm_backward, layernorm_forward, modulate_backward, modulate_forward,
               proto_assign, proto_feature_forward, proto_update, row_normalize_backward, row_normalize_forward,
               softmax_xent_forward, spikes_forward)


class EmbedGelu:
    kind = "embed_gelu"

    def __init__(self, name, prefix="", V=1, E=1, H=1, init="lecun"):
        self.name, self.V = name, V

    def forward(self, p, st, x, c):
        e = embedding_forward(p["W_emb"], x)
        a = e @ p["W1"] + p["b1"]
        return gelu_forward(a), dict(x=x, e=e, a=a)

    def backward(self, p, st, cache, dh):
        da = gelu_backward(dh, cache["a"])
        de = da @ p["W1"].T
        return None, {"W_emb": embedding_backward(de, cache["x"], self.V), "W1": cache["e"].T @ da,
                      "b1": da.sum(axis=0)}


class ResidualGelu:
    kind = "residual_gelu"

    def __init__(self, name, prefix="", H=1, init="lecun"):
        self.name = name

    def forward(self, p, st, x, c):
        a = x @ p["W"] + p["b"]
        return x + gelu_forward(a), dict(x=x, a=a)

    def backward(self, p, st, cache, dh):
        da = gelu_backward(dh, cache["a"])
        return dh + da @ p["W"].T, {"W": cache["x"].T @ da, "b": da.sum(axis=0)}


class CharHead:
    """tie: the weight is p["tied"], (V, H) as the tied embedding is seen: logits = z·Wᵀ."""
    kind = "char_head"

    def __init__(self, name, prefix="", V=1, H=1, init="lecun", scale=1.0, names=("W2", "b2"), bias=True, tie="",
                 gelu=False):
        self.name, self.w, self.b, self.bias, self.tie, self.gelu = name, names[0], names[1], bias, tie, gelu

    def forward(self, p, st, z, c):
        pre = z @ (p["tied"].T if self.tie else p[self.w]) + (p[self.b] if self.bias else 0.0)
        logits = gelu_forward(pre) if self.gelu else pre
        loss, loss_rows, dlogits, n_valid = softmax_xent_forward(logits, c["y"])
        return loss, dict(z=z, pre=pre, logits=logits, loss_rows=loss_rows, dlogits=dlogits, n_valid=n_valid)

    def backward(self, p, st, cache, dy=None):
        d = cache["dlogits"]
        if self.gelu:
            d = gelu_backward(d, cache["pre"])
        if self.tie:
            grads, dz = {"tied": d.T @ cache["z"]}, d @ p["tied"]
        else:
            grads, dz = {self.w: cache["z"].T @ d}, d @ p[self.w].T
        if self.bias:
            grads[self.b] = d.sum(axis=0)
        return dz, grads


class BioAssociative:
    """engine/layers/bio.py's maths; post and the assignments are constants for backprop."""
    kind = "bio"
    needs_warm_start = True

    def __init__(self, name, prefix="", H=1, T=1, hebb=None, proto=None, spike_threshold=0.5, seed=0, tprefix="",
                 prenorm=False, bias=False):
        self.name, self.H, self.T, self.hebb, self.proto = name, H, T, hebb, proto
        self.theta, self.seed, self.prenorm, self.pre_bias = spike_threshold, seed, prenorm, bias

    def forward(self, p, st, x, c, frozen_post=None):
        """prenorm: h = LN(x) (γ, β with bias), the maths on h, out = x + (z − h)."""
        if not self.prenorm:
            return self._forward(p, st, x, c, frozen_post)
        h, ln = layernorm_forward(x, p["pre_ln.gamma"], p["pre_ln.beta"] if self.pre_bias else 0.0)
        z, cache = self._forward(p, st, h, c, frozen_post)
        cache["pre_ln"] = ln
        return x + (z - h), cache

    def backward(self, p, st, cache, dout):
        if not self.prenorm:
            return self._backward(p, st, cache, dout)
        dh, grads = self._backward(p, st, cache, dout)
        dx, grads["pre_ln.gamma"], dbeta = layernorm_backward(dh - dout, cache["pre_ln"])
        if self.pre_bias:
            grads["pre_ln.beta"] = dbeta
        return dout + dx, grads

    def _forward(self, p, st, h, c, frozen_post=None):
        hc, pc, B, S = self.hebb, self.proto, c["B"], c["S"]
        s = spikes_forward(h, self.theta)
        post = s if hc.post == "spikes" else h.copy()
        if frozen_post is not None:
            post = frozen_post
        cache = dict(h=h, s=s, post=post, assign=None, k=None, B=B, S=S)
        if pc.mode == "key":
            cache["assign"] = proto_assign(h, st["P"], pc.similarity)
        if hc.mode == "modulate":
            u = modulate_forward(h, st["W_hebb"], hc.strength)
        elif hc.mode == "fast_weights":
            keys = st["P"][cache["assign"]] if pc.mode == "key" else h
            k, inv = row_normalize_forward(keys)
            fw = fast_weights_delta_forward if hc.rule == "delta" else fast_weights_forward
            u = h + fw(k, post, B, S, hc.lr, 1 - hc.decay)
            cache.update(k=k, inv=inv)
        else:
            u = h
        ht = u
        if hc.norm == "layernorm":
            ht, cache["ln"] = layernorm_forward(u, p["hebb_ln.gamma"], p["hebb_ln.beta"])
        cache["ht"] = ht
        z = ht
        if pc.mode not in ("off", "key"):
            cache["assign"] = proto_assign(ht, st["P"], pc.similarity)
            if pc.mode == "feature":
                z = proto_feature_forward(ht, st["P"], cache["assign"], pc.strength)
            elif pc.mode == "token":
                z = ht + p["proto_emb"][cache["assign"]]
        return z, cache

    def assigned_to(self, cache):
        return cache["h"] if self.proto.mode == "key" else cache["ht"]

    def _backward(self, p, st, cache, dz):
        hc, pc = self.hebb, self.proto
        grads = {}
        if pc.mode == "token":
            grads["proto_emb"] = embedding_backward(dz, cache["assign"], self.T)
        dht = dz
        if hc.norm == "layernorm":
            dht, grads["hebb_ln.gamma"], grads["hebb_ln.beta"] = layernorm_backward(dht, cache["ln"])
        if hc.mode == "modulate":
            return modulate_backward(dht, st["W_hebb"], hc.strength), grads
        if hc.mode != "fast_weights":
            return dht, grads
        B, S = cache["B"], cache["S"]
        bw = fast_weights_delta_backward if hc.rule == "delta" else fast_weights_backward
        dk = bw(dht, cache["k"], cache["post"], B, S, hc.lr, 1 - hc.decay)
        if pc.mode == "key":
            return dht, grads
        return dht + row_normalize_backward(dk, cache["k"], cache["inv"]), grads

    def local_update(self, st, cache, step):
        hc, pc = self.hebb, self.proto
        if hc.mode in ("shadow", "modulate"):
            hebbian_update(st["W_hebb"], cache["h"], cache["post"], hc.lr, hc.decay)
        if pc.mode != "off":
            proto_update(st["P"], st["usage"], self.assigned_to(cache), cache["assign"], pc.lr, pc.usage_decay,
                         pc.reseed_threshold, self.seed, step)

    def warm_start(self, st, cache):
        if self.proto.mode == "off":
            return
        v = self.assigned_to(cache)
        if self.proto.init == "kmeans++":
            st["P"][...] = kmeanspp_init(v, self.T, self.seed)
        else:
            rng = np.random.default_rng([self.seed, 2])
            st["P"][...] = v[rng.choice(v.shape[0], size=self.T, replace=v.shape[0] < self.T)]


CLASSES = {c.kind: c for c in (EmbedGelu, ResidualGelu, BioAssociative, CharHead)}


def build(decl):
    return CLASSES[decl.kind](decl.name, prefix=decl.prefix, **decl.args)


class LayerNorm:
    kind = "layernorm"

    def __init__(self, name, prefix="", C=1, eps=1e-5, bias=True, vec=False):
        self.name, self.eps, self.bias = name, eps, bias

    def forward(self, p, st, x, c):
        return layernorm_forward(x, p["gamma"], p["beta"] if self.bias else 0.0, self.eps)

    def backward(self, p, st, cache, dy):
        dx, dg, db = layernorm_backward(dy, cache)
        return dx, ({"gamma": dg, "beta": db} if self.bias else {"gamma": dg})


class BatchNorm:
    kind = "batchnorm"

    def __init__(self, name, prefix="", C=1, eps=1e-5, momentum=0.1):
        self.name, self.eps, self.momentum = name, eps, momentum

    def forward(self, p, st, x, c):
        if not c.get("training", True):
            return batchnorm_eval(x, p["gamma"], p["beta"], st["run_mean"], st["run_var"], self.eps), None
        y, cache = batchnorm_forward(x, p["gamma"], p["beta"], self.eps)
        batchnorm_running(st["run_mean"], st["run_var"], cache, x.shape[0], self.momentum)
        return y, cache

    def backward(self, p, st, cache, dy):
        dx, dg, db = batchnorm_backward(dy, cache)
        return dx, {"gamma": dg, "beta": db}


class Dropout:
    kind = "dropout"

    def __init__(self, name, prefix="", C=1, p=0.1, seed=0, index=0):
        self.name, self.p, self.key = name, p, dropout_key(seed, index)

    def forward(self, p, st, x, c):
        if not c.get("training", True) or self.p == 0:
            return x, None
        return dropout_forward(x, self.p, self.key, c["step"]), c["step"]

    def backward(self, p, st, step, dy):
        if step is None:
            return dy, {}
        return dropout_forward(dy, self.p, self.key, step), {}


CLASSES.update({c.kind: c for c in (LayerNorm, BatchNorm, Dropout)})

from .attention import AttnBlock, MlpBlock, TokPosEmbed  # noqa: E402  (the transformer family's)

CLASSES.update({c.kind: c for c in (TokPosEmbed, AttnBlock, MlpBlock)})


class Embedding:
    """e = W[x] (engine/layers/dense.py)."""
    kind = "embedding"

    def __init__(self, name, prefix="", V=1, E=1, scale=0.1):
        self.name, self.V = name, V

    def forward(self, p, st, x, c):
        x = np.asarray(x).reshape(-1)
        return p["W_emb"][x], x

    def backward(self, p, st, x, de):
        return None, {"W_emb": embedding_backward(de, x, self.V)}


class Dense:
    """y = act(x·W + b), act GELU (exact) or none (engine/layers/dense.py)."""
    kind = "dense"

    def __init__(self, name, prefix="", I=1, O=1, act="gelu", init="kaiming"):
        self.name, self.act = name, act

    def forward(self, p, st, x, c):
        a = x @ p["W"] + p["b"]
        return (gelu_forward(a) if self.act == "gelu" else a), (x, a)

    def backward(self, p, st, cache, dy):
        x, a = cache
        da = gelu_backward(dy, a) if self.act == "gelu" else dy
        return da @ p["W"].T, {"W": x.T @ da, "b": da.sum(axis=0)}


CLASSES.update({c.kind: c for c in (Embedding, Dense)})

from .memory import MemoryRead  # noqa: E402  (DRLMemNet's slot memory, engine/layers/memory.py)

CLASSES[MemoryRead.kind] = MemoryRead

from .gru import GRU  # noqa: E402  (the memory network's controller)

CLASSES[GRU.kind] = GRU

from .lattice import Lattice  # noqa: E402  (the lattice of residual experts, engine/layers/lattice.py)

CLASSES[Lattice.kind] = Lattice

from .embed_head import EmbedHead  # noqa: E402  (the embedding-regression head, engine/layers/embed_head.py)

CLASSES[EmbedHead.kind] = EmbedHead
