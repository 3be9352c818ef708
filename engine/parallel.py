"""Data-parallel training over several OpenCL devices: config `device=all` or a list "0:0,1:0".

Each batch of B sequences is split into contiguous slices, one per device (the first B % D
devices take one more). Every device holds a replica of the model (parameters and local state)
and runs the forward and backward pass on its slice. The first device is the master: its Model,
optimiser and full-batch Workspace are what the trainer sees. Per step:

  1. gradients: every replica's gradient and loss summary is copied to the master, which sums
     them in device order weighted by each replica's share of the valid targets,
     g = Σ_k (nv_k/nv)·g_k (kernels/parallel.cl): the gradient of the mean loss over the global
     batch, as one device computes it up to the order of the sums; the loss summary likewise;
  2. the optimiser step runs once, on the master, and its parameters are copied to every replica;
  3. local rules: the rows that each layer's rules read (Layer.local_reads: the Hebbian rule's h
     and post, the prototypes' vectors and assignments) are gathered from the replicas into the
     master's full-batch workspace in batch order, and the rules run there over the whole batch,
     exactly as on one device (the same N; the Hebbian outer-product sum, the prototype sums and
     counts over every row; re-seeding rows drawn from the whole batch); the new state is copied
     to every replica (and the parameters, when a rule writes them: Layer.writes_params, the
     memory's slot write). The local rules thus see the statistics one device would see.

Telemetry (at log points: every batch-sized buffer is gathered first) and the prototypes' warm
start (a forward of the whole first batch) also run on the master; evaluation runs on the master
alone. Copies between devices go through host memory (two OpenCL contexts share no buffers).
The replicas are bit-identical to the master after every step (they receive its bytes); against
one device with the same global batch the losses agree up to the order of the gradient sums
(tests/test_parallel.py states the tolerance); run to run they are bit-identical.

BatchNorm is refused with several devices: its batch statistics would be per slice.
"""
from __future__ import annotations

import numpy as np

from . import ops
from .config import ConfigError
from .device import Device, DeviceError, device_type_name, list_devices


def device_specs(spec: str) -> list[str]:
    """The device specs of config `device`: "all" = every GPU (every device when there is none),
    "a,b,..." = those devices in that order (one spec may repeat: two contexts on one device),
    anything else = that one spec."""
    spec = (spec or "").strip()
    if spec.lower() == "all":
        devices = list_devices()
        gpus = [f"{p}:{d}" for p, d, _, dev in devices if device_type_name(dev) == "GPU"]
        return gpus or [f"{p}:{d}" for p, d, _, _ in devices]
    if "," in spec:
        parts = [s.strip() for s in spec.split(",")]
        if not all(parts):
            raise DeviceError(f"device list {spec!r} has an empty entry")
        return parts
    return [spec]


def split_batch(B: int, D: int) -> list[tuple[int, int]]:
    """[(first sequence, count)] of D contiguous slices of B sequences."""
    if D > B:
        raise ConfigError(f"train.batch_size={B} is smaller than the {D} devices it is split across")
    sizes = [B // D + (k < B % D) for k in range(D)]
    starts = np.cumsum([0] + sizes[:-1])
    return [(int(s), n) for s, n in zip(starts, sizes)]


def check_parallel(cfg, D: int) -> None:
    """ConfigError for what data parallelism cannot run as one device would."""
    if D < 2:
        return
    from .config import EMBED_FAMILIES
    if cfg.model.family in EMBED_FAMILIES:
        raise ConfigError(f"device={cfg.device!r}: model.family={cfg.model.family!r} runs on one device "
                          f"(data parallelism splits character windows); name one device")
    from .models import layers_of
    kinds = {d.kind for d in layers_of(cfg, 2)}
    if "batchnorm" in kinds:
        raise ConfigError(f"device={cfg.device!r}: BatchNorm layers are not supported on several devices "
                          f"(their batch statistics would be per device); use one device or layernorm")
    split_batch(cfg.train.batch_size, D)


def _key(a) -> tuple:
    return int(a.base_data.int_ptr), int(a.offset), int(a.nbytes)


class Replicas:
    """The replicas of `master` (a Model on devices[0]) on devices[1:], the slices of the batch,
    and the copies between them (see the module docstring)."""

    def __init__(self, devices: list[Device], master, B: int, S: int, train_ids: np.ndarray):
        from .model import Model
        self.devs, self.master, self.B, self.S = devices, master, B, S
        self.D = len(devices)
        self.slices = split_batch(B, self.D)
        self.models = [master] + [Model(d, master.cfg, master.V) for d in devices[1:]]
        self.ws = [m.workspace(n, S) for m, (_, n) in zip(self.models, self.slices)]
        self.wsg = master.workspace(B, S)   # the whole batch: local rules, telemetry, warm start, evaluation
        for ws, (b0, _) in zip(self.ws, self.slices):
            for c in ws.ctx.values():
                c.row0 = b0 * S   # the first global row of the slice (dropout masks)
        self.ids = [None] + [d.to_device(np.ascontiguousarray(train_ids, np.int32)) for d in devices[1:]]
        n = master.layout.total
        self.G = master.dev.empty((self.D * n,), np.float32)
        self.L = master.dev.empty((self.D * 4,), np.float32)
        self._host_g = [np.empty(n, np.float32) for _ in range(self.D)]
        self._host_l = [np.empty(4, np.float32) for _ in range(self.D)]
        self._names = [self._buffer_names(ws) for ws in self.ws]

    @staticmethod
    def buffers(master_layout_total: int, D: int) -> dict:
        """What the master allocates for the combination (the memory check)."""
        return {"parallel.G": ((D * master_layout_total,), np.float32), "parallel.L": ((D * 4,), np.float32)}

    # -- batches --------------------------------------------------------------------------------
    def next_batch(self, data, ids_master) -> None:
        """The next batch's window starts from the task's generator, split across the replicas."""
        offsets = data.batches.next_offsets()
        self.offsets = offsets
        for k, (dev, ws, (b0, n)) in enumerate(zip(self.devs, self.ws, self.slices)):
            ws.offsets.set(np.ascontiguousarray(offsets[b0:b0 + n]))
            ops.gather_windows(dev, ids_master if k == 0 else self.ids[k], ws.offsets, self.S, ws.x, ws.y)

    def load_full_batch(self, ids_master) -> None:
        """The whole current batch into the master's full-batch workspace (warm start)."""
        self.wsg.offsets.set(self.offsets)
        ops.gather_windows(self.master.dev, ids_master, self.wsg.offsets, self.S, self.wsg.x, self.wsg.y)

    # -- the step -----------------------------------------------------------------------------------
    def train_step(self, opt, ids_master) -> float:
        """Forward and backward on every replica, the combined gradient, the optimiser on the
        master, its parameters to the replicas; returns the learning rate."""
        m = self.master
        if not m.proto_ready:   # k-means++ from the whole first batch, as on one device
            self.load_full_batch(ids_master)
            m.init_prototypes(self.wsg)
            self.broadcast(params=False, state=True)
        lr = opt.lr_at(m.step + 1)
        for model, ws in zip(self.models, self.ws):   # enqueued on every device before any waits
            model.forward(ws)
            model.backward(ws)
        self._combine()
        opt.step(m, lr)
        for model in self.models[1:]:
            model.step = m.step
        self.broadcast(params=True, state=False)
        return lr

    def _combine(self):
        m, dev0, n = self.master, self.master.dev, self.master.layout.total
        cl, q0 = dev0.cl, dev0.queue
        events = []
        for k, (model, ws) in enumerate(zip(self.models, self.ws)):
            if k == 0:
                cl.enqueue_copy(q0, self.G.data, m.grad.data, byte_count=n * 4)
                cl.enqueue_copy(q0, self.L.data, ws.loss_out.data, byte_count=16)
            else:
                q = self.devs[k].queue
                events.append((k, cl.enqueue_copy(q, self._host_g[k], model.grad.data, is_blocking=False),
                               cl.enqueue_copy(q, self._host_l[k], ws.loss_out.data, is_blocking=False)))
        for k, eg, el in events:
            eg.wait()
            el.wait()
            cl.enqueue_copy(q0, self.G.data, self._host_g[k], dst_offset=k * n * 4)
            cl.enqueue_copy(q0, self.L.data, self._host_l[k], dst_offset=k * 16)
        dev0.launch(dev0.kernel("parallel.cl", "combine_grads"), (n,), None, self.G.data, self.L.data,
                    np.int32(self.D), np.int32(n), m.grad.data)
        dev0.launch(dev0.kernel("parallel.cl", "combine_loss"), (1,), None, self.L.data, np.int32(self.D),
                    self.wsg.loss_out.data)

    def broadcast(self, params: bool = True, state: bool = True, layers=None) -> None:
        """The master's parameters and/or state (of `layers`, default all) to every replica."""
        if self.D < 2:
            return
        m = self.master
        host = []
        if params:
            host.append(("theta", None, m.theta.get()))
        if state:
            names = [s.name for layer in (layers or m.layers) for s in layer.state()]
            host += [("st", name, m.st[name].get()) for name in names]
        for model in self.models[1:]:
            for kind, name, arr in host:
                dst = model.theta if kind == "theta" else model.st[name]
                model.dev.cl.enqueue_copy(model.dev.queue, dst.data, arr, is_blocking=False)
            model.proto_ready = m.proto_ready
        for model in self.models[1:]:
            model.dev.finish()   # the host copies must outlive the writes

    # -- local rules and telemetry --------------------------------------------------------------------
    def _buffer_names(self, ws) -> dict:
        """{buffer key: (owner, name)} of every buffer of a workspace (owner: a layer or "task")."""
        out = {_key(getattr(ws, k)): ("task", k) for k in ("x", "y", "offsets")}
        for layer, ns in ws.buf.items():
            for k, a in vars(ns).items():
                out.setdefault(_key(a), (layer, k))
        return out

    def _full(self, owner, name):
        return getattr(self.wsg, name) if owner == "task" else getattr(self.wsg.buf[owner], name)

    def gather(self, arrays_of_replica) -> None:
        """Copy, for each replica, the rows of the arrays `arrays_of_replica(k)` names (batch-sized
        buffers of replica k's workspace) into the same buffers of the master's full-batch
        workspace, at the slice's rows; then point the master's layer contexts at the full
        buffers for every context attribute that names a replica-0 buffer."""
        dev0 = self.master.dev
        cl, q0 = dev0.cl, dev0.queue
        pending = []
        for k, ws in enumerate(self.ws):
            b0, nk = self.slices[k]
            for a in arrays_of_replica(k):
                owner, name = self._names[k][_key(a)]
                full = self._full(owner, name)
                if full.shape[0] != self.B * (a.shape[0] // nk) or a.shape[0] % nk:
                    raise ValueError(f"{owner}.{name} {a.shape} is not batch-sized")   # pragma: no cover
                row = a.nbytes // nk   # bytes per sequence
                dst = full.offset + b0 * row
                if k == 0:
                    cl.enqueue_copy(q0, full.base_data, a.base_data, byte_count=a.nbytes, src_offset=a.offset,
                                    dst_offset=dst)
                else:
                    host = np.empty(a.shape, a.dtype)
                    ev = cl.enqueue_copy(self.devs[k].queue, host, a.base_data, src_offset=a.offset, is_blocking=False)
                    pending.append((ev, host, full, dst))
        for ev, host, full, dst in pending:
            ev.wait()
            cl.enqueue_copy(q0, full.base_data, host, dst_offset=dst)
        q0.finish()   # the host copies must outlive the writes
        for layer, c0 in self.ws[0].ctx.items():
            cg = self.wsg.ctx[layer]
            for attr, v in vars(c0).items():
                if attr not in ("b", "p", "g", "st", "ws") and hasattr(v, "base_data") and _key(v) in self._names[0]:
                    setattr(cg, attr, self._full(*self._names[0][_key(v)]))

    def _batch_sized(self, k):
        """Every buffer of replica k's workspace whose first dimension is its slice's sequences or rows."""
        ws, nk = self.ws[k], self.slices[k][1]
        out = [ws.x, ws.y]
        for layer, ns in ws.buf.items():
            for name, a in vars(ns).items():
                full = getattr(self.wsg.buf[layer], name)
                if a.ndim and a.shape[0] != full.shape[0] and a.shape[0] % nk == 0 \
                        and full.shape[0] == self.B * (a.shape[0] // nk) and a.shape[1:] == full.shape[1:]:
                    out.append(a)
        return out

    def local_updates(self) -> None:
        """The local rules of every layer over the whole batch, on the master; the new state to the replicas."""
        m = self.master
        active = [layer for layer in m.layers if layer.local_reads(self.ws[0].ctx[layer.name])]
        if not active:
            return
        self.gather(lambda k: [a for layer in active for a in layer.local_reads(self.ws[k].ctx[layer.name])])
        for layer in active:
            layer.local_update(self.wsg.ctx[layer.name])
        self.broadcast(params=any(layer.writes_params for layer in active), state=True, layers=active)

    def gather_all(self) -> None:
        """Every batch-sized buffer to the master's full workspace (before telemetry)."""
        self.gather(self._batch_sized)
