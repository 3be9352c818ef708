"""numpy reference of the GRU layer (engine/layers/gru.py): the kernels of kernels/gru.cl (same
names, inputs in the same order, outputs returned) and the layer `GRU` (same kind and constructor
as the device layer; the protocol of engine/reference/layers.py: forward(p, st, x, c) -> (y, cache),
backward(p, st, cache, dy) -> (dx, grads)). float64-capable.

Letters: B batch, S sequence, N = B·S rows in (b, t) order, I input width, Hd hidden.

    PyTorch nn.GRU (Cho et al. 2014), gates [r | z | n], weights stored (in, out):
      r = σ(x·W_ir + b_ir + h·W_hr + b_hr);  z = σ(x·W_iz + b_iz + h·W_hz + b_hz)
      n = tanh(x·W_in + b_in + r ⊙ (h·W_hn + b_hn));  h' = (1 − z) ⊙ n + z ⊙ h
    backward through time (dh = ∂L/∂h_t: dy_t plus what step t+1 sends back):
      da_n = dh(1 − z)(1 − n²);  da_z = dh(h − n)z(1 − z);  da_r = da_n·hn·r(1 − r)
      ∂(x·W_i + b_i) = [da_r | da_z | da_n];  ∂(h·W_h + b_h) = [da_r | da_z | da_n·r]
      ∂L/∂h_{t−1} = dh·z + ∂(h·W_h + b_h)·W_hᵀ
"""
from __future__ import annotations

import numpy as np


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


# -- kernels --------------------------------------------------------------------------------------
def gru_gates_forward(gx, gh, b_i, b_h, h_prev):
    """One step for the B sequences: gx (B,3Hd) = x_t·W_i, gh (B,3Hd) = h_{t−1}·W_h, h_prev (B,Hd)
    -> (h_t (B,Hd), gates (B,4Hd) = [r | z | n | hn])."""
    Hd = h_prev.shape[1]
    a, ah = gx + b_i, gh + b_h
    r = sigmoid(a[:, :Hd] + ah[:, :Hd])
    z = sigmoid(a[:, Hd:2 * Hd] + ah[:, Hd:2 * Hd])
    hn = ah[:, 2 * Hd:]
    n = np.tanh(a[:, 2 * Hd:] + r * hn)
    return (1.0 - z) * n + z * h_prev, np.concatenate([r, z, n, hn], axis=1)


def gru_gates_backward(dh, gates, h_prev):
    """The backward of gru_gates_forward from dh (B,Hd) = ∂L/∂h_t (all of it) -> (dgx (B,3Hd) = ∂ of
    x_t·W_i + b_i, dgh (B,3Hd) = ∂ of h_{t−1}·W_h + b_h, dh·z (B,Hd): ∂L/∂h_{t−1} but through W_h)."""
    r, z, n, hn = np.split(gates, 4, axis=1)
    dan = dh * (1.0 - z) * (1.0 - n * n)
    daz = dh * (h_prev - n) * z * (1.0 - z)
    dar = dan * hn * r * (1.0 - r)
    return np.concatenate([dar, daz, dan], axis=1), np.concatenate([dar, daz, dan * r], axis=1), dh * z


# -- the layer ------------------------------------------------------------------------------------
class GRU:
    """One GRU layer over S positions of B independent sequences. c["fw_state"] (B,Hd), if
    given, is h_{−1} (else zeros); cache["last"] is h_{S−1} (B,Hd), the state to carry on. The
    gradient stops at h_{−1} (it is a constant of the backward)."""
    kind = "gru"

    def __init__(self, name, prefix="", I=1, Hd=1, init="kaiming"):
        self.name, self.I, self.Hd = name, I, Hd

    def forward(self, p, st, x, c):
        B, S, Hd = c["B"], c["S"], self.Hd
        gx = (x @ p["W_i"]).reshape(B, S, 3 * Hd)
        h0 = c.get("fw_state")
        hs = [np.zeros((B, Hd), gx.dtype) if h0 is None else np.asarray(h0, gx.dtype)]
        gates = []
        for t in range(S):
            h, g = gru_gates_forward(gx[:, t], hs[-1] @ p["W_h"], p["b_i"], p["b_h"], hs[-1])
            hs.append(h)
            gates.append(g)
        y = np.stack(hs[1:], axis=1).reshape(B * S, Hd)
        return y, dict(x=x, hs=hs, gates=gates, B=B, S=S, last=hs[-1])

    def backward(self, p, st, cache, dy):
        B, S, Hd, hs, gates = cache["B"], cache["S"], self.Hd, cache["hs"], cache["gates"]
        dy = dy.reshape(B, S, Hd)
        dgx = np.zeros((B, S, 3 * Hd), dy.dtype)
        dgh = [None] * S
        carry = np.zeros((B, Hd), dy.dtype)
        for t in reversed(range(S)):
            dgx[:, t], dgh[t], direct = gru_gates_backward(dy[:, t] + carry, gates[t], hs[t])
            carry = direct + dgh[t] @ p["W_h"].T
        dgx = dgx.reshape(B * S, 3 * Hd)
        H_prev, DGH = np.concatenate(hs[:S]), np.concatenate(dgh)   # time-major (S·B, ·)
        grads = {"W_i": cache["x"].T @ dgx, "b_i": dgx.sum(axis=0), "W_h": H_prev.T @ DGH, "b_h": DGH.sum(axis=0)}
        return dgx @ p["W_i"].T, grads
