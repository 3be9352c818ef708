"""EmbedHead: the embedding-regression head. Targets are vectors, not characters: z (N,D), the
student's output, against y (N,D) float32 targets read from the workspace (c.ws.y).

    loss_n = w_mse·mean_d (z_n − y_n)² + w_cos·(1 − cos(z_n, y_n)),  cos(a, b) = a·b / max(|a||b|, 1e-8)
    batch loss = (1/N)·Σ_n loss_n + w_div·Div(z),  Div = 1/(N(N−1)) Σ_{n≠m} cos(z_n, z_m)²

Div, the diversity term (off at w_div = 0), is the mean squared cosine between different rows of
the batch: it is 1 for a collapsed student whose outputs all point one way (or its opposite) and
small for spread outputs, so w_div > 0 penalises collapse. The cosine's 1e-8 floor keeps a zero row
defined (cos = 0); the gradient differentiates that expression as written (where |a||b| ≤ 1e-8 the
denominator is a constant), in the kernels and the reference alike.

No parameters (the Dense layer before it maps back to D). Forward writes b.loss_out (4,) =
[batch loss, Σ_n cos(z_n, y_n), N, N × batch loss] (the char head's four slots: slot 1 is the
'hits' the trainer sums, here the summed cosine), b.rows_cos and b.rows_mse (N,) for evaluation,
and dz = ∂(batch loss)/∂z, which backward returns. Div needs the Gram matrix z·zᵀ (N,N buffers,
allocated only when w_div > 0). Kernels: kernels/embed_head.cl. Reference:
engine.reference.embed_head.EmbedHead.
"""
from __future__ import annotations

from .. import ops
from . import Layer, f32


class EmbedHead(Layer):
    kind = "embed_head"

    def __init__(self, name, prefix="", D=384, w_mse=1.0, w_cos=0.5, w_div=0.0):
        super().__init__(name, prefix)
        if min(w_mse, w_cos, w_div) < 0:
            raise ValueError(f"embed_head weights must be ≥ 0, got w_mse={w_mse}, w_cos={w_cos}, w_div={w_div}")
        self.D, self.w_mse, self.w_cos, self.w_div = D, w_mse, w_cos, w_div
        self.n_in = self.n_out = D   # tests/test_layer_contract.py: widths

    def buffers(self, B, S):
        N, D = B * S, self.D
        out = {"rows_mse": ((N,), f32), "rows_cos": ((N,), f32), "loss_rows": ((N,), f32), "zz": ((N,), f32),
               "loss_out": ((4,), f32), "dz": ((N, D), f32)}
        if self.w_div:   # the Gram matrix, the pair weights, ∂Div's two parts
            out.update(G=((N, N), f32), Wd=((N, N), f32), div_rows=((N,), f32), q=((N,), f32), dzd=((N, D), f32))
        return out

    def products(self, B, S):
        N = B * S
        return ([(N, N, self.D, 1)] if self.w_div else []), []   # G = z·zᵀ; dzd = Wd·z needs no scratch

    def forward(self, c, z, loss=True):
        c.x_in = z
        if not loss:
            return z
        dev, b, N, D = c.dev, c.b, c.N, self.D
        ops.embed_head_rows(dev, z, c.ws.y, D, self.w_mse, self.w_cos, 1.0 / N, b.rows_mse, b.rows_cos,
                            b.loss_rows, b.zz, b.dz, N)
        use_div = bool(self.w_div) and N > 1
        inv_pairs = 1.0 / (N * (N - 1)) if N > 1 else 0.0
        if use_div:
            ops.gemm(dev, z, z, b.G, N, N, D, trans_b=True)
            ops.embed_head_div(dev, b.G, b.zz, N, b.Wd, b.div_rows, b.q)
            ops.gemm(dev, b.Wd, z, b.dzd, N, D, N)
            ops.embed_head_div_grad(dev, b.dzd, b.q, z, D, 4.0 * self.w_div * inv_pairs, b.dz, N)
        ops.embed_head_reduce(dev, b.loss_rows, b.rows_cos, b.div_rows if use_div else b.loss_rows, N, use_div,
                              self.w_div, inv_pairs, b.loss_out)
        return b.loss_out

    def outputs(self, c):
        """The last forward's z (N,D) as the device array (the prediction, for evaluation)."""
        return c.x_in

    def backward(self, c, dy=None):
        return c.b.dz
