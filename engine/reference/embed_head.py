"""numpy reference of the embedding-regression head (engine/layers/embed_head.py, kernels/embed_head.cl),
float64-capable: the loss and its gradient in closed form, cos(a, b) = a·b / max(|a||b|, 1e-8)
differentiated as written (a constant denominator where |a||b| ≤ 1e-8).

    loss_n = w_mse·mean_d (z_n − y_n)² + w_cos·(1 − cos(z_n, y_n))
    batch loss = mean_n loss_n + w_div·Div,  Div = 1/(N(N−1)) Σ_{n≠m} cos(z_n, z_m)²
"""
from __future__ import annotations

import numpy as np

COS_EPS = 1e-8


def _cos_parts(zz, yy, zy):
    """(cos, 1/den, [|z||y| > eps]) of rows (or pairs) from their squared norms and dot products."""
    a = np.sqrt(zz) * np.sqrt(yy)
    den = np.maximum(a, COS_EPS)
    return zy / den, 1.0 / den, a > COS_EPS


def embed_head_forward(z, y, w_mse, w_cos, w_div):
    """(batch loss, cache) for z, y (N,D); cache: rows_mse, rows_cos, loss_rows (N,), div, and what
    the backward needs."""
    N, D = z.shape
    zz, yy, zy = (z * z).sum(1), (y * y).sum(1), (z * y).sum(1)
    rows_mse = ((z - y) ** 2).sum(1) / D
    rows_cos, inv_den, live = _cos_parts(zz, yy, zy)
    loss_rows = w_mse * rows_mse + w_cos * (1.0 - rows_cos)
    div, pairs = 0.0, None
    if w_div and N > 1:
        G = z @ z.T
        C, inv_dp, live_p = _cos_parts(zz[:, None], zz[None, :], G)
        off = ~np.eye(N, dtype=bool)
        div = float((C ** 2)[off].sum() / (N * (N - 1)))
        pairs = (C * off, inv_dp, live_p & off)
    loss = loss_rows.mean() + w_div * div
    return loss, dict(z=z, y=y, zz=zz, rows_mse=rows_mse, rows_cos=rows_cos, loss_rows=loss_rows, div=div,
                      inv_den=inv_den, live=live, pairs=pairs, w=(w_mse, w_cos, w_div))


def embed_head_backward(cache):
    """dz (N,D) = ∂(batch loss)/∂z."""
    z, y, zz = cache["z"], cache["y"], cache["zz"]
    w_mse, w_cos, w_div = cache["w"]
    N, D = z.shape
    safe_zz = np.where(zz > 0, zz, 1.0)
    coef = np.where(cache["live"], cache["rows_cos"] / safe_zz, 0.0)
    dcos = y * cache["inv_den"][:, None] - coef[:, None] * z
    dz = (w_mse * 2.0 / D * (z - y) - w_cos * dcos) / N
    if cache["pairs"] is not None:
        C, inv_dp, live_p = cache["pairs"]
        # ∂c_nm/∂z_n = z_m/den − [live]·(c_nm/|z_n|²)·z_n; both orders of a pair hold z_n: factor 2·2
        q = np.where(live_p, C ** 2, 0.0).sum(1) / safe_zz
        dz = dz + 4.0 * w_div / (N * (N - 1)) * ((C * inv_dp) @ z - q[:, None] * z)
    return dz


class EmbedHead:
    kind = "embed_head"

    def __init__(self, name, prefix="", D=384, w_mse=1.0, w_cos=0.5, w_div=0.0):
        self.name, self.D, self.w = name, D, (w_mse, w_cos, w_div)

    def forward(self, p, st, z, c):
        """c["y"]: the (N,D) float targets."""
        return embed_head_forward(z, np.asarray(c["y"], z.dtype), *self.w)

    def backward(self, p, st, cache, dy=None):
        return embed_head_backward(cache), {}
