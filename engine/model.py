"""A model on an OpenCL device, built from the layers its family declares (engine/models/):
flat parameters, gradients and optimiser state laid out from the layers' declarations, the
forward pass through the layers in order, the backward pass in reverse, then the local rules
(docs/layers.md). Every step is entirely in kernels; the trainer runs the optimiser
(engine.optim) on the model's flat buffers.

    python -m engine.train --set train.steps=50     # trains the default (hybrid) model

Letters: B batch, S sequence, N = B·S, E embedding, H hidden, V vocab, T prototypes.
Parameters live in one flat buffer (and so do gradients and the optimiser's moments) in which
every tensor starts at a multiple of CHUNK elements: AdamW, the global norm and clipping are
then one launch each over the whole model, and per-tensor norms come from per-chunk partial sums.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from . import ops, optim
from .config import Config
from .layers import build as build_layer
from .models import layers_of
from .params import char_lm_params, padded

CHUNK = 1024
PARAM_NAMES = tuple(p.name for p in char_lm_params(1, 1, 1))
DECAYED = {p.name for p in char_lm_params(1, 1, 1) if p.decay}  # weight decay: weights only, not biases


@dataclass(frozen=True)
class Layout:
    """Where each declared parameter (engine.params.ParamSpec) sits in the flat buffers
    (element offsets; every tensor starts at a multiple of CHUNK)."""
    specs: tuple
    shapes: dict      # as stored
    offsets: dict
    total: int

    @classmethod
    def build(cls, V: int, E: int, H: int) -> Layout:
        """The one-layer hybrid model's layout (engine.params.char_lm_params)."""
        return cls.of(char_lm_params(V, E, H))

    @classmethod
    def of(cls, specs) -> Layout:
        shapes, offsets, pos = {}, {}, 0
        for p in specs:
            if p.name in shapes:
                raise ValueError(f"parameter {p.name!r} is declared twice")
            shapes[p.name], offsets[p.name] = tuple(p.stored), pos
            pos += -(-int(np.prod(p.stored)) // CHUNK) * CHUNK
        return cls(tuple(specs), shapes, offsets, pos)

    @property
    def names(self) -> tuple:
        return tuple(p.name for p in self.specs)

    def size(self, name) -> int:
        return int(np.prod(self.shapes[name]))

    def chunk_owner(self) -> list[str]:
        """Parameter name of each CHUNK-sized piece of the flat buffer."""
        owner = []
        for name in self.names:
            owner += [name] * (-(-self.size(name) // CHUNK))
        return owner

    def decay_mask(self) -> np.ndarray:
        """1 for each chunk of a parameter that weight decay applies to, else 0."""
        decayed = {p.name for p in self.specs if p.decay}
        return np.array([name in decayed for name in self.chunk_owner()], np.float32)

    def lr_mask(self) -> np.ndarray:
        """Each chunk's learning-rate scale: its parameter's ParamSpec.lr_scale (1.0 by default)."""
        scale = {p.name: p.lr_scale for p in self.specs}
        return np.array([scale[name] for name in self.chunk_owner()], np.float32)


# -- what a model of cfg puts on the device (the memory check sizes exactly this) ----------------
def model_layers(cfg: Config, V: int, variant: str = "cpu") -> list:
    """The device layers of cfg's family (nothing allocated), for a device of kernel `variant`
    (Layer.variant: a layer's buffers may depend on the kernels it runs)."""
    layers = [build_layer(d) for d in layers_of(cfg, V)]
    for layer in layers:
        layer.variant = variant
    return layers


def param_specs(layers) -> list:
    return [p for layer in layers for p in layer.params()]


def task_buffers(B, S, cfg: Config | None = None) -> dict:
    """The batch buffers of cfg's task (engine.tasks: the character tasks' ids and window offsets,
    the embedding task's vectors and sentence indices)."""
    if cfg is not None:
        from .tasks import task_of
        return task_of(cfg).batch_buffers(B, S)
    N = B * S
    return {"x": ((N,), np.int32), "y": ((N,), np.int32), "offsets": ((B,), np.int32)}


def workspace_buffers(cfg: Config, V: int, B: int, S: int, layers=None, variant: str = "cpu") \
        -> dict[str, tuple[tuple, type]]:
    """{name: (shape, dtype)} of every buffer a (B,S) Workspace allocates: the batch (x, y,
    window offsets), then each layer's buffers as `<layer>.<buffer>`."""
    out = dict(task_buffers(B, S, cfg))
    for layer in layers or model_layers(cfg, V, variant):
        out.update({f"{layer.name}.{k}": v for k, v in layer.buffers(B, S).items()})
    return out


def model_buffers(cfg: Config, V: int, layers=None) -> dict[str, tuple[tuple, type]]:
    """{name: (shape, dtype)} of every buffer a Model allocates: flat parameters and gradients,
    each layer's state."""
    layers = layers or model_layers(cfg, V)
    n = Layout.of(param_specs(layers)).total
    out = {"theta": ((n,), np.float32), "grad": ((n,), np.float32)}
    for layer in layers:
        out.update({s.name: (tuple(s.shape), s.dtype) for s in layer.state()})
    return out


def gemm_scratch(cfg: Config, V: int, B: int, S: int, variant: str = "cpu", layers=None) -> dict[str, tuple[tuple, type]]:
    """The scratch buffers ops.gemm allocates (and keeps) for this model's products at (B,S):
    B transposed for trans_b products, K-split partials and packed A panels of trans_a ones,
    from the products each layer declares (forward, backward, local rules, telemetry)."""
    tn, tk = [], []
    for layer in layers or model_layers(cfg, V, variant):
        a, b = layer.products(B, S)
        tn += a
        tk += b
    bt = max(b * k * n for _, n, k, b in tn)
    partial = pack = 0
    for m, n, k in tk:
        kc = ops._k_chunk(k)
        if ops._packs(variant, m, n, k):   # the unsplit packed path (ops.gemm)
            pack = max(pack, k * m)
        if kc:
            partial = max(partial, k // kc * m * n)
            if variant != "gpu" and n >= m and m % 4 == 0 and n % 8 == 0 and k % 8 == 0:
                pack = max(pack, k * m)
    out = {"gemm_bt": ((bt,), np.float32)}
    out.update({"gemm_partial": ((partial,), np.float32)} if partial else {})
    out.update({"gemm_apack": ((pack,), np.float32)} if pack else {})
    return out


def device_buffers(cfg: Config, V: int, B: int, S: int, variant: str = "cpu") -> dict[str, tuple[tuple, type]]:
    """{name: (shape, dtype)} of everything a Model of cfg, its optimiser and its (B,S) Workspace
    put on the device (model.*, optim.*, workspace.*, ops.* scratch): for Device.check_memory."""
    layers = model_layers(cfg, V, variant)
    out = {f"model.{k}": v for k, v in model_buffers(cfg, V, layers).items()}
    n = Layout.of(param_specs(layers)).total
    out.update({f"optim.{k}": v for k, v in optim.optimizer_class(cfg.optim.name).buffers(n, CHUNK).items()})
    out.update({f"workspace.{k}": v for k, v in workspace_buffers(cfg, V, B, S, layers).items()})
    out.update({f"ops.{k}": v for k, v in gemm_scratch(cfg, V, B, S, variant, layers).items()})
    return out


def state_shapes(cfg: Config, V: int) -> dict[str, tuple[tuple, type]]:
    """{name: (shape, dtype)} of what Model.state_arrays() returns (checkpoint sizes)."""
    layers = model_layers(cfg, V)
    prefixes = ("param", *optim.optimizer_class(cfg.optim.name).STATE)
    out = {f"{prefix}.{p.name}": (tuple(p.shape), np.float32) for prefix in prefixes for p in param_specs(layers)}
    for layer in layers:
        out.update({f"state.{s.name}": (tuple(s.shape), s.dtype) for s in layer.state() if s.checkpoint})
    return out


class Ctx(SimpleNamespace):
    """What one layer's forward/backward sees for one workspace: dev, its parameter and
    gradient views (p, g) and state (st) under its own names, its buffers (b), the batch
    shape (B, S, N), the workspace (ws: x, y), the model (step), fw_state (generation), row0 (the
    first row's index in the global batch: 0 but on a data-parallel replica, engine/parallel.py)."""


class Workspace:
    """Per-(B,S) activations and gradients of every layer, allocated once per shape
    (workspace_buffers): `ws.x`, `ws.y`, `ws.offsets` (the batch), `ws.buf[layer]` (a layer's)."""

    def __init__(self, model, B, S):
        dev = model.dev
        self.B, self.S, self.N = B, S, B * S
        for name, (shape, dtype) in task_buffers(B, S, model.cfg).items():
            setattr(self, name, dev.empty(shape, dtype))
        self.buf, self.ctx = {}, {}
        for layer in model.layers:
            zeroed = getattr(layer, "zeroed", ())
            self.buf[layer.name] = SimpleNamespace(**{
                k: (dev.zeros if k in zeroed else dev.empty)(shape, dtype)
                for k, (shape, dtype) in layer.buffers(B, S).items()})
            n, shared = len(layer.prefix), layer.shared()
            self.ctx[layer.name] = Ctx(
                dev=dev, model=model, ws=self, b=self.buf[layer.name], B=B, S=S, N=B * S, fw_state=None, row0=0,
                decay_ready=False, training=True,
                p={**{s.name[n:]: model.p[s.name] for s in layer.params()},
                   **{k: model.p[full] for k, full in shared.items()}},
                g={**{s.name[n:]: model.g[s.name] for s in layer.params()},
                   **{k: model.g[full] for k, full in shared.items()}},
                st={s.name[n:]: model.st[s.name] for s in layer.state()})
        self.head = model.layers[-1].name

    @property
    def loss_out(self):
        """[mean loss over valid targets, correct predictions, valid targets, summed loss]."""
        return self.buf[self.head].loss_out

    @property
    def logits(self):
        return self.buf[self.head].logits

    @property
    def fold(self) -> bool:   # the first layer multiplies the folded embedding (EmbedGelu)
        return "EW" in vars(self.buf["embed"])


class Model:
    """Parameters, optimiser state and local state of one model on one device."""

    def __init__(self, dev, cfg: Config, vocab_size: int, layers=None):
        """layers: the device layers to run (default: cfg's family; the layer contract test
        passes single layers)."""
        self.dev, self.cfg = dev, cfg
        m = cfg.model
        self.V, self.E, self.H, self.T = vocab_size, m.embedding_dim, m.hidden_dim, m.num_prototypes
        self.Vp = padded(self.V)
        self.layers = list(layers) if layers is not None else model_layers(cfg, self.V, dev.variant)
        for layer in self.layers:
            layer.variant = dev.variant
        self.layout = Layout.of(param_specs(self.layers))
        buf = model_buffers(cfg, self.V, self.layers)   # what the memory check sized
        self.theta, self.grad = dev.zeros(*buf["theta"]), dev.zeros(*buf["grad"])
        self.p = {name: self._view(self.theta, name) for name in self.layout.names}
        self.g = {name: self._view(self.grad, name) for name in self.layout.names}
        self.state_specs = [s for layer in self.layers for s in layer.state()]
        self.st = {s.name: (dev.to_device(s.initial()) if s.fill or s.init else dev.zeros(s.shape, s.dtype))
                   for s in self.state_specs}
        self.proto_ready = not any(layer.needs_warm_start and cfg.proto.mode != "off" for layer in self.layers)
        self.step = 0  # optimiser steps taken
        self._ws = {}

    # the first bio layer's state under the names it has always had
    W_hebb = property(lambda self: self.st["W_hebb"])
    P = property(lambda self: self.st["P"])
    usage = property(lambda self: self.st["usage"])

    def layer(self, name):
        return next(layer for layer in self.layers if layer.name == name)

    # -- buffers -----------------------------------------------------------------
    def _view(self, flat, name):
        import pyopencl.array as cla
        off, size = self.layout.offsets[name], self.layout.size(name)
        sub = flat.data.get_sub_region(off * 4, size * 4)
        return cla.Array(self.dev.queue, self.layout.shapes[name], np.float32, data=sub)

    def workspace(self, B, S) -> Workspace:
        ws = self._ws.get((B, S))
        if ws is None:
            ws = self._ws[(B, S)] = Workspace(self, B, S)
        return ws

    # -- host <-> device -------------------------------------------------------------
    def set_params(self, params: dict):
        flat = np.zeros(self.layout.total, np.float32)
        self._pack(flat, params)
        self.theta.set(flat)

    def _pack(self, flat, arrays):
        for name in self.layout.names:
            o = self.layout.offsets[name]
            stored = np.zeros(self.layout.shapes[name], np.float32)
            a = np.asarray(arrays[name], np.float32)
            stored[tuple(slice(0, n) for n in a.shape)] = a  # W2, b2: zero padding columns
            flat[o:o + self.layout.size(name)] = stored.ravel()

    def _unpack(self, flat) -> dict:
        out = {}
        for p in self.layout.specs:   # the stored array, cut to the shape as seen (W2, b2: padding)
            o = self.layout.offsets[p.name]
            a = flat[o:o + self.layout.size(p.name)].reshape(p.stored)
            out[p.name] = a[tuple(slice(0, n) for n in p.shape)].copy()
        return out

    def get_params(self) -> dict:
        return self._unpack(self.theta.get())

    def get_grads(self) -> dict:
        return self._unpack(self.grad.get())

    def get_state(self) -> dict:
        """Every layer's checkpointed state, as named host arrays."""
        return {s.name: self.st[s.name].get() for s in self.state_specs if s.checkpoint}

    def state_arrays(self, opt=None) -> dict:
        """Everything a checkpoint needs from the device, as named host arrays: parameters,
        the optimiser's state in the same layout (adam_m.*, adam_v.* or sgd_velocity.*), state.*."""
        out = {f"param.{k}": v for k, v in self.get_params().items()}
        for name, buf in (opt.state.items() if opt else ()):
            out.update({f"{name}.{k}": v for k, v in self._unpack(buf.get()).items()})
        out.update({f"state.{k}": v for k, v in self.get_state().items()})
        return out

    def load_state_arrays(self, arrays: dict, opt=None):
        for prefix, flat_dev in (("param", self.theta), *(opt.state.items() if opt else ())):
            flat = np.zeros(self.layout.total, np.float32)
            self._pack(flat, {k: arrays[f"{prefix}.{k}"] for k in self.layout.names})
            flat_dev.set(flat)
        for s in self.state_specs:
            if s.checkpoint:
                a = np.ascontiguousarray(arrays[f"state.{s.name}"], s.dtype)
                if a.shape != tuple(s.shape):
                    raise ValueError(f"state.{s.name} has shape {a.shape}, the model {tuple(s.shape)}")
                self.st[s.name].set(a)
        self.proto_ready = True

    # -- forward and backward ------------------------------------------------------------
    def forward(self, ws: Workspace, fw_state=None, loss: bool = True, warm_start: bool = False,
                training: bool = True):
        """Enqueue the forward pass on ws.x / ws.y; the loss summary lands in ws.loss_out.
        fw_state: for generation (S = 1), the carried fast-weight matrix Aᵀ (H,H) of a
        one-layer model. loss=False stops at the logits. warm_start: each layer that needs
        one (k-means++) is initialised from its own forward, in order, before the next reads it.
        training=False: evaluation (dropout off, BatchNorm on its running statistics)."""
        x = ws.x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            c = ws.ctx[layer.name]
            c.fw_state, c.training = fw_state, training
            if i == last:
                return layer.forward(c, x, loss=loss)
            y = layer.forward(c, x)
            if warm_start and layer.needs_warm_start:
                layer.warm_start(c)
                y = layer.forward(c, x)
            x = y

    def backward(self, ws: Workspace):
        """Enqueue gradients of the mean loss into the flat gradient buffer."""
        dy = None
        for layer in reversed(self.layers):
            dy = layer.backward(ws.ctx[layer.name], dy)

    def init_prototypes(self, ws: Workspace):
        """P from the data of the batch in ws (each layer's warm start), with the current parameters."""
        self.forward(ws, warm_start=True)
        self.proto_ready = True

    # -- updates ------------------------------------------------------------------------------
    def local_updates(self, ws: Workspace):
        """Every layer's local rules on this step's forward pass (after the optimiser step)."""
        for layer in self.layers:
            layer.local_update(ws.ctx[layer.name])

    def predict(self, ws: Workspace):
        """The head's predictions of the last forward pass, (N,) int32 on the device (its predict)."""
        return self.layers[-1].predict(ws.ctx[ws.head])

    def assignments(self, ws: Workspace):
        """The first bio layer's prototype assignments of the last forward pass (N,) int32, or None
        (the first bio layer that assigns: a transformer's hebb layers do not)."""
        for layer in self.layers:
            b = ws.buf[layer.name]
            if layer.kind == "bio" and hasattr(b, "assign"):
                return b.assign
        return None

    # -- telemetry (logging points only: these read the device) ------------------------------------
    def param_groups(self) -> dict:
        """{group: [parameter names]} of the layers that name one (Layer.group: a transformer
        block's attention and MLP together), for the optimiser's grad_norm/<group>."""
        out = {}
        for layer in self.layers:
            if layer.group:
                out.setdefault(layer.group, []).extend(p.name for p in layer.params())
        return out

    def telemetry(self, ws: Workspace) -> dict:
        """Every layer's telemetry of the last forward pass (the gradient norms are the optimiser's)."""
        out = {}
        for layer in self.layers:
            out.update(layer.telemetry(ws.ctx[layer.name]))
        return out
