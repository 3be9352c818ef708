"""A GRU layer (issue 14: the controller of the memory network), PyTorch nn.GRU's maths and gate
order, so that a torch twin copies its weights (weight_ih_l0 = W_iᵀ, weight_hh_l0 = W_hᵀ,
bias_ih_l0 = b_i, bias_hh_l0 = b_h):

  r = σ(x·W_ir + b_ir + h·W_hr + b_hr)          z = σ(x·W_iz + b_iz + h·W_hz + b_hz)
  n = tanh(x·W_in + b_in + r ⊙ (h·W_hn + b_hn))  h' = (1 − z) ⊙ n + z ⊙ h

Letters: B batch, S sequence, N = B·S, I input width, Hd hidden. x (N, I) rows in (b, t) order,
B independent sequences of S positions -> y (N, Hd), the hidden state at every position.
Parameters (in, out), columns [r | z | n]: W_i (I, 3Hd), b_i (3Hd), W_h (Hd, 3Hd), b_h (3Hd).
init="kaiming" (default): W ~ N(0, 2/fan_in), biases 0; init="torch": every parameter
U(−1/√Hd, 1/√Hd) (nn.GRU's reset_parameters).

Forward: gx = x·W_i for all positions (one ops.gemm), then per step t: gh = h_{t−1}·W_h (B rows,
one ops.gemm) and gru_gates_forward (kernels/gru.cl: the gates, h_t, biases added there).
The hidden states are kept time-major, hs ((S+1)·B, Hd): block t (rows t·B..t·B+B−1) is h_{t−1},
block 0 the initial state, so h_{t−1} is a contiguous (B, Hd) operand of the step's product.
Backward through time (t = S−1 … 0), dh = dy_t + carry:
  da_n = dh(1 − z)(1 − n²),  da_z = dh(h_{t−1} − n)z(1 − z),  da_r = da_n·hn·r(1 − r)
  (hn = h_{t−1}·W_hn + b_hn, kept by the forward with r, z, n in c.b.gates)
  dgx_t = [da_r | da_z | da_n],  dgh_t = [da_r | da_z | da_n·r]
  carry = dh·z + dgh_t·W_hᵀ   (gru_gates_backward, then one ops.gemm with β = 1; W_hᵀ transposed once)
then dW_i = xᵀ·dgx, db_i = Σ dgx, dW_h = hs[0:S·B]ᵀ·dgh, db_h = Σ dgh, dx = dgx·W_iᵀ.
All sums are gemm's or colsum's (fixed order): a rerun gives the same bits.
Speed (python -m benchmarks.gru: B=16, S=100, I=128, Hd=256, PoCL on 2 shared cores): forward ~20 ms,
forward + backward 54-80 ms median of 5 (min ~51). Device time: the 199 step products ~50 %, the two
weight gradients ~33 %, the gate kernels ~7 %; launches overlap with the queue. Not fused over the
sequence: a step needs all of h_{t−1}, so one launch could only hold one work-group per sequence,
reading all of W_h (0.8 MB) per step and sequence instead of once per step for the batch.

Carried state (generation): c.fw_state, a (B, Hd) device array, or a dict {layer name: array}
(a stack's generator carries one per layer), is h_{−1}; None (training) starts every sequence
at 0. After forward the last hidden state of each sequence is GRU.last_state(c): rows S·B.. of
c.b.hs, a (B, Hd) view, valid until the next forward; pass it (or a copy) as the next fw_state.
The gradient is not propagated into a carried state (it is a constant of the backward).
Reference: engine.reference.gru.GRU.
"""
from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..params import ParamSpec
from . import Layer, f32

INITS = ("kaiming", "torch")


class GRU(Layer):
    kind = "gru"

    def __init__(self, name, prefix="", I=1, Hd=1, init="kaiming"):
        super().__init__(name, prefix)
        if I < 1 or Hd < 1:
            raise ValueError(f"{name}: GRU sizes must be positive, got I={I}, Hd={Hd}")
        if init not in INITS:
            raise ValueError(f"{name}: GRU init must be one of {INITS}, got {init!r}")
        self.I, self.Hd, self.init = I, Hd, init
        self.H = Hd   # the output width (the layer contract sizes R, the upstream gradient, by it)
        self.n_in, self.n_out = I, Hd   # tests/test_layer_contract.py: widths

    def params(self):
        p, I, Hd = self.prefix, self.I, self.Hd
        if self.init == "torch":
            w = b = dict(init="uniform", scale=1.0 / math.sqrt(Hd))
        else:
            w, b = dict(init="kaiming"), dict(init="zeros")
        return [ParamSpec(p + "W_i", (I, 3 * Hd), **w), ParamSpec(p + "b_i", (3 * Hd,), decay=False, **b),
                ParamSpec(p + "W_h", (Hd, 3 * Hd), **w), ParamSpec(p + "b_h", (3 * Hd,), decay=False, **b)]

    def buffers(self, B, S):
        N, I, Hd = B * S, self.I, self.Hd
        return {"gx": ((N, 3 * Hd), f32), "gh": ((B, 3 * Hd), f32), "hs": (((S + 1) * B, Hd), f32),
                "gates": ((S * B, 4 * Hd), f32), "y": ((N, Hd), f32),
                "WhT": ((3 * Hd, Hd), f32), "carry": ((B, Hd), f32), "dgx": ((N, 3 * Hd), f32),
                "dgh": ((S * B, 3 * Hd), f32), "dx": ((N, I), f32)}

    def products(self, B, S):
        N, I, Hd = B * S, self.I, self.Hd
        return [(N, I, 3 * Hd, 1)], [(I, 3 * Hd, N), (Hd, 3 * Hd, N)]

    def last_state(self, c):
        """h_{S−1} of each sequence of the last forward: a (B, Hd) view of c.b.hs."""
        return c.b.hs[c.S * c.B:]

    def _initial_state(self, c):
        """hs block 0 = the carried state (c.fw_state) or zeros."""
        dev, hs, n = c.dev, c.b.hs, c.B * self.Hd * 4
        h0 = c.fw_state.get(self.name) if isinstance(c.fw_state, dict) else c.fw_state
        if h0 is None:
            dev.cl.enqueue_fill_buffer(dev.queue, hs.base_data, np.zeros(1, f32), hs.offset, n)
            return
        if tuple(h0.shape) != (c.B, self.Hd):
            raise ValueError(f"{self.name}: the carried state must be (B, Hd) = {(c.B, self.Hd)}, got {h0.shape}")
        dev.cl.enqueue_copy(dev.queue, hs.base_data, h0.base_data, byte_count=n, src_offset=h0.offset,
                            dst_offset=hs.offset)

    def forward(self, c, x):
        dev, p, b, B, S, Hd = c.dev, c.p, c.b, c.B, c.S, self.Hd
        c.x_in = x
        self._initial_state(c)
        ops.gemm(dev, x, p["W_i"], b.gx, c.N, 3 * Hd, self.I)
        for t in range(S):
            ops.gemm(dev, b.hs[t * B:(t + 1) * B], p["W_h"], b.gh, B, 3 * Hd, Hd)
            ops.gru_gates_forward(dev, b.gx, b.gh, p["b_i"], p["b_h"], b.hs, b.gates, b.y, t, B, S, Hd)
        return b.y

    def backward(self, c, dy):
        dev, p, g, b, B, S, N, Hd = c.dev, c.p, c.g, c.b, c.B, c.S, c.N, self.Hd
        ops.transpose(dev, p["W_h"], b.WhT, Hd, 3 * Hd)
        for t in reversed(range(S)):
            ops.gru_gates_backward(dev, dy, b.gates, b.hs, b.carry, b.dgx, b.dgh, t, B, S, Hd)
            if t:   # ∂L/∂h_{t−1} += dgh_t·W_hᵀ (h_{−1} gets none: a constant)
                ops.gemm(dev, b.dgh[t * B:(t + 1) * B], b.WhT, b.carry, B, Hd, 3 * Hd, beta=1.0)
        ops.gemm(dev, c.x_in, b.dgx, g["W_i"], self.I, 3 * Hd, N, trans_a=True)
        ops.colsum(dev, b.dgx, g["b_i"], N, 3 * Hd)
        ops.gemm(dev, b.hs, b.dgh, g["W_h"], Hd, 3 * Hd, S * B, trans_a=True)   # hs rows 0..S·B−1: h_{t−1}
        ops.colsum(dev, b.dgh, g["b_h"], S * B, 3 * Hd)
        ops.gemm(dev, b.dgx, p["W_i"], b.dx, N, self.I, 3 * Hd, trans_b=True)
        return b.dx
