"""The numpy reference of any model family, built from the same layer declarations as the
device model (engine.models.layers_of): the parameters and state named, shaped and drawn as
the device model's, each layer's maths from engine.reference.layers.

    m = RefModel(cfg, V); params, state = m.init(); losses = m.train_steps(params, state, batches, steps)
"""
from __future__ import annotations

import numpy as np

from .. import params as params_mod
from ..layers import build as build_device_layer
from ..models import layers_of
from . import adamw_step, sgd_step
from .layers import build as build_ref_layer


class RefModel:
    def __init__(self, cfg, V: int):
        self.cfg, self.V = cfg, V
        decls = layers_of(cfg, V)
        self.decl = [build_device_layer(d) for d in decls]     # declarations only: nothing allocated
        self.layers = [build_ref_layer(d) for d in decls]
        self.specs = [p for layer in self.decl for p in layer.params()]

    def init(self, dtype=np.float64):
        """(params, state) as the device model starts: parameters drawn in declaration order,
        every checkpointed state at its initial value (StateSpec.initial, drawn in the device's dtype)."""
        params = {k: v.astype(dtype) for k, v in params_mod.init_params(self.specs, self.cfg.seed).items()}
        state = {s.name: s.initial().astype(dtype) for layer in self.decl for s in layer.state() if s.checkpoint}
        return params, state

    def _views(self, i, d):
        n = len(self.decl[i].prefix)
        names = [s.name for s in self.decl[i].params()] if d == "p" else \
            [s.name for s in self.decl[i].state() if s.checkpoint]
        return names, n

    def _local(self, i, params, state):
        pn, n = self._views(i, "p")
        sn, _ = self._views(i, "s")
        shared = {k: params[full] for k, full in self.decl[i].shared().items()}
        return {**{k[n:]: params[k] for k in pn}, **shared}, {k[n:]: state[k] for k in sn}

    def forward(self, params, state, x, y, warm_start=False, frozen_post=None, step=0):
        """x, y int (B,S) -> (loss, caches). warm_start: each bio layer's k-means++ from its own
        forward (as Model.init_prototypes). frozen_post: {layer name: post (N,H)} held fixed.
        step: the optimiser steps taken before this forward (Model.step), the dropout masks' counter."""
        B, S = x.shape
        c = dict(B=B, S=S, y=y.reshape(-1), step=step)
        v, caches = x.reshape(-1), []
        for i, layer in enumerate(self.layers):
            p, st = self._local(i, params, state)
            kw = {"frozen_post": frozen_post[layer.name]} if frozen_post and layer.name in frozen_post else {}
            out, cache = layer.forward(p, st, v, c, **kw)
            if warm_start and getattr(layer, "needs_warm_start", False):
                layer.warm_start(st, cache)
                out, cache = layer.forward(p, st, v, c, **kw)
            caches.append(cache)
            v = out
        return v, caches

    def backward(self, params, state, caches) -> dict:
        grads, dy = {}, None
        for i in reversed(range(len(self.layers))):
            p, st = self._local(i, params, state)
            dy, g = self.layers[i].backward(p, st, caches[i], dy)
            prefix, shared = self.decl[i].prefix, self.decl[i].shared()
            for k, v in g.items():   # a shared parameter (a tied head): the later layer's gradient is added
                name = shared.get(k, prefix + k)
                grads[name] = grads[name] + v if name in grads else v
        return grads

    def local_updates(self, params, state, caches, step):
        """A layer that writes parameters (Layer.writes_params: the memory's slots) gets its
        parameters and the head's logits of this forward too."""
        for i, layer in enumerate(self.layers):
            if hasattr(layer, "local_update"):
                p, st = self._local(i, params, state)
                kw = dict(p=p, logits=caches[-1]["logits"]) if self.decl[i].writes_params else {}
                layer.local_update(st, caches[i], step, **kw)

    def train_steps(self, params, state, batches, steps, lr):
        """Steps 1..steps on batches (cycled), params and state in place, as the Trainer runs
        them: warm start on the first batch if prototypes are on, forward, backward, the
        optimiser (cfg.optim; lr: step -> rate), the local rules. -> per-step losses."""
        o = self.cfg.optim
        if self.cfg.proto.mode != "off":
            self.forward(params, state, *batches[0], warm_start=True)
        m = {k: np.zeros_like(v) for k, v in params.items()}
        v = {k: np.zeros_like(a) for k, a in params.items()}
        decay_mask = {s.name: s.decay for s in self.specs}
        lr_scale = {s.name: s.lr_scale for s in self.specs}
        losses = []
        for step in range(1, steps + 1):
            x, y = batches[(step - 1) % len(batches)]
            loss, caches = self.forward(params, state, x, y, step=step - 1)
            grads = self.backward(params, state, caches)
            if o.name == "sgd":
                sgd_step(params, grads, m, lr(step), o.momentum, o.weight_decay, decay_mask, o.clip_norm, o.clip_value,
                         lr_scale)
            else:
                adamw_step(params, grads, m, v, step, lr(step), o.beta1, o.beta2, o.eps, o.weight_decay,
                           decay_mask, o.clip_norm, o.clip_value, lr_scale)
            self.local_updates(params, state, caches, step)
            losses.append(float(loss))
        return losses
