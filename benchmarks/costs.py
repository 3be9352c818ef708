"""The work of each kernel launch (flops, bytes moved) and the achieved rate of each kernel.

    python -m benchmarks.speed          # prints the per-kernel table this module computes

`Recorder(dev)` wraps one Device instance's `launch` (the engine is not changed): it keeps
each launch's kernel name, global and local size and arguments (scalars as numbers, buffers
as their size in bytes). `launch_cost(launch)` gives its work from a cost model per kernel
name; `kernel_table` joins that work with the profiled device time of each kernel
(Device.take_timings) into calls, time per call, GFLOP/s, GB/s and the share of the device's
peak. A kernel without a model keeps its times and says "no model".

Conventions. Flops: 2 per multiply-add of a product, 1 per add of a sum; element-wise
kernels count no flops (they are memory-bound: GB/s is their figure). Bytes: the minimum
traffic, every input element read once and every output element written once (4 bytes per
float32 or int32); a kernel that re-reads from cache moves no more bytes by this count.
Letters: M, N, K a product's sizes, B batch (sequences), S sequence, N rows, H, C columns.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from engine.ops import TM

F = 4          # bytes per float32 / int32 element
COMPUTE, MEMORY = "compute", "memory"


@dataclass(frozen=True)
class Launch:
    kernel: str
    gsize: tuple
    lsize: tuple | None
    args: tuple          # scalars as Python numbers, buffers as their size in bytes

    @property
    def groups(self) -> int:
        """Work-groups along dimension 0 (the rows of a one-group-per-row `_wg` kernel)."""
        return self.gsize[0] // self.lsize[0] if self.lsize else self.gsize[0]

    def dim(self, i: int) -> int:
        return self.gsize[i] if i < len(self.gsize) else 1


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float
    bound: str           # COMPUTE: judged by GFLOP/s against the FP32 peak; MEMORY: by GB/s


def _arg(a):
    if hasattr(a, "dtype"):
        return a.item()
    return getattr(a, "size", None)    # pyopencl Buffer: its size in bytes


class Recorder:
    """Records every launch of one Device (its `launch` replaced on the instance only).

        rec = Recorder(dev); ...; launches = rec.take(); rec.close()
    """

    def __init__(self, dev):
        self.dev = dev
        self._raw: list = []
        original = dev.launch

        def launch(kernel, gsize, lsize, *args):
            ev = original(kernel, gsize, lsize, *args)
            self._raw.append((kernel.function_name, gsize, lsize, args))   # converted in take()
            return ev

        dev.launch = launch

    def take(self) -> list[Launch]:
        """The launches since the last take(), oldest first."""
        out = [Launch(name, tuple(int(g) for g in gs), tuple(int(x) for x in ls) if ls else None,
                      tuple(_arg(a) for a in args)) for name, gs, ls, args in self._raw]
        self._raw.clear()
        return out

    def close(self):
        self.dev.__dict__.pop("launch", None)     # the class's method again

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- cost models: kernel name -> (argument names or None, function(args by name, launch) -> Cost) -------
MODELS: dict = {}


def model(names: str, args: str | None = None):
    """Register a cost model for the kernels `names`; `args` names their arguments in order
    (None: the model reads only the launch sizes). A launch whose argument count differs from
    `args` gets no cost (its signature changed since the model was written)."""
    def deco(fn):
        for n in names.split():
            MODELS[n] = (tuple(args.split()) if args else None, fn)
        return fn
    return deco


def launch_cost(launch: Launch) -> tuple[Cost | None, str]:
    """(cost, "") or (None, why there is none)."""
    entry = MODELS.get(launch.kernel)
    if entry is None:
        return None, "no model"
    names, fn = entry
    a = {}
    if names is not None:
        if len(names) != len(launch.args):
            return None, f"no model (model expects {len(names)} arguments, launch had {len(launch.args)})"
        a = dict(zip(names, launch.args))
    return fn(a, launch), ""


GEMM = "M N K alpha beta A offA strideA B offB strideB C offC strideC"


def _product(rows, N, K, batch, beta):
    """C (rows,N) = A (rows,K)·B (K,N), `batch` times: A, B read once, C written (and read if β ≠ 0)."""
    c = rows * N * (2 if beta else 1)
    return Cost(2.0 * rows * N * K * batch, F * batch * (rows * K + K * N + c), COMPUTE)


@model("gemm_nn gemm_tn", GEMM)
def _gemm_vector(a, L):          # the CPU kernel covers the first ⌊M/TM⌋·TM rows (engine.ops._gemm_raw)
    return _product(min(a["M"], L.dim(1) * TM), a["N"], a["K"], L.dim(2), a["beta"])


@model("gemm_nn_edge gemm_tn_edge", GEMM + " m_begin")
def _gemm_edge(a, L):
    return _product(a["M"] - a["m_begin"], a["N"], a["K"], L.dim(2), a["beta"])


@model("gemm_nn_local gemm_tn_local gemm_nn_block gemm_tn_block", GEMM)
def _gemm_gpu(a, L):
    return _product(a["M"], a["N"], a["K"], L.dim(2), a["beta"])


@model("gemm_tn_split", "M N kc K Ap B offB P")
def _gemm_split(a, L):          # partial products per K chunk: every chunk's (M,N) partial written
    M, N, K, chunks = a["M"], a["N"], a["K"], L.dim(2)
    return Cost(2.0 * M * N * a["kc"] * chunks, F * (M * K + K * N + chunks * M * N), COMPUTE)


@model("gemm_tn_packed", "M N K alpha beta Ap B offB C offC")
def _gemm_packed(a, L):          # Aᵀ·B from pack_a4's panels over the whole K
    return _product(a["M"], a["N"], a["K"], 1, a["beta"])


@model("gemm_reduce", "MN chunks alpha beta partial C offC")
def _gemm_reduce(a, L):
    MN, ch = a["MN"], a["chunks"]
    return Cost(float(ch * MN), F * (ch * MN + MN * (2 if a["beta"] else 1)), MEMORY)


@model("pack_a4", "K M A offA Ap")
def _pack(a, L):
    return Cost(0.0, 2.0 * F * a["K"] * a["M"], MEMORY)


@model("transpose transpose8 transpose_wg", "R C in offIn strideIn out offOut strideOut")
def _transpose(a, L):
    return Cost(0.0, 2.0 * F * a["R"] * a["C"] * L.dim(2), MEMORY)


@model("causal_dots_decay", "X Y w S H out")
def _causal_dots(a, L):         # the τ < t half of each sequence's S×S dot products, rows of H
    S, H, B = a["S"], a["H"], L.dim(2)
    return Cost(float(B * S * (S - 1) * H), F * (2 * B * S * H + B * S * S + S), COMPUTE)


@model("causal_decay_mask", "G w S Gm")
def _decay_mask(a, L):
    S, B = a["S"], L.dim(2)
    return Cost(float(B * S * S), F * (2 * B * S * S + S), MEMORY)


@model("fw_state_norm fw_state_norm_wg", "G Q w S out")
def _fw_norm(a, L):
    S, B = a["S"], L.groups
    return Cost(3.0 * B * S * S, F * (2 * B * S * S + S + B), MEMORY)


@model("fast_weights_delta_forward fast_weights_delta_forward8 fast_weights_delta_forward_wg", "gm post S H m u")
def _delta_fwd(a, L):           # forward substitution per column: S(S−1)/2 multiply-adds
    S, H, B = a["S"], a["H"], L.dim(1)
    return Cost(float(B * H * S * (S - 1)), F * (B * S * S + 3 * B * S * H), COMPUTE)


@model("fast_weights_delta_backward fast_weights_delta_backward8 fast_weights_delta_backward_wg", "gm dm S H v")
def _delta_bwd(a, L):
    S, H, B = a["S"], a["H"], L.dim(1)
    return Cost(float(B * H * S * (S - 1)), F * (B * S * S + 2 * B * S * H), COMPUTE)


# element-wise and row kernels: (N rows) x (C columns) from the launch, bytes of reads + writes
def _mem(nbytes) -> Cost:
    return Cost(0.0, float(nbytes), MEMORY)


@model("gather_windows", "ids offsets S x y")
def _gather(a, L):
    n = a["S"] * L.dim(1)
    return _mem(F * (2 * n + L.dim(1) + 2 * n))


@model("bucket_sort bucket_sort_wg", "keys N nb starts perm")
def _bucket_sort(a, L):
    return _mem(F * (2 * a["N"] + a["nb"] + 1))


@model("bucket_sums bucket_sums8 bucket_sums_wg", "X perm starts C out")
def _bucket_sums(a, L):         # every sorted row of X once (perm holds N rows), out (nb, C)
    N = a["perm"] // F
    nb = a["starts"] // F - 1
    return _mem(F * (N * a["C"] + N + nb + 1 + nb * a["C"]))


@model("embedding_forward", "W_emb x E e")
def _embedding(a, L):
    N, E = L.dim(1), a["E"]
    return _mem(F * (2 * N * E + N))


@model("embed_bias_gelu", "EW x bias H a h")
def _embed_gelu(a, L):
    N, H = L.dim(1), a["H"]
    return _mem(F * (3 * N * H + N + H))


@model("bias_gelu_forward", "a bias H h")
def _bias_gelu(a, L):
    N, H = L.dim(1), a["H"]
    return _mem(F * (3 * N * H + H))


@model("gelu_backward", "dh a H da")
def _gelu_bwd(a, L):
    return _mem(F * 3 * L.dim(0))


@model("add_bias", "X bias C")
def _add_bias(a, L):
    N, C = L.dim(1), a["C"]
    return _mem(F * (2 * N * C + C))


@model("add_inplace", "x y")
def _add_inplace(a, L):
    return _mem(F * 3 * L.dim(0))


@model("colsum colsum8 colsum_wg", "X N C out")
def _colsum(a, L):
    return _mem(F * (a["N"] * a["C"] + a["C"]))


@model("spikes_forward", "h theta H s")
def _spikes(a, L):
    return _mem(F * 2 * L.dim(1) * a["H"])


@model("row_normalize_forward row_normalize_forward8 row_normalize_forward_wg", "h H k inv_norm")
def _rownorm_fwd(a, L):
    N, H = L.groups, a["H"]
    return _mem(F * (2 * N * H + N))


@model("row_normalize_backward row_normalize_backward8 row_normalize_backward_wg", "dk k inv_norm H dh")
def _rownorm_bwd(a, L):         # dh is accumulated: read and written
    N, H = L.groups, a["H"]
    return _mem(F * (4 * N * H + N))


@model("count_valid count_valid_wg", "y N nv")
def _count_valid(a, L):
    return _mem(F * (a["N"] + 1))


@model("softmax_xent softmax_xent8 softmax_xent_wg", "logits y nv V ld loss_rows hits dlogits")
def _softmax(a, L):
    N, V = L.groups, a["V"]
    return _mem(F * (2 * N * V + 3 * N + 1))


@model("argmax_rows argmax_rows_wg", "logits V ld pred")
def _argmax_rows(a, L):
    return _mem(F * (L.groups * a["V"] + L.groups))


@model("loss_reduce loss_reduce_wg", "loss_rows hits nv N out")
def _loss_reduce(a, L):
    return _mem(F * (2 * a["N"] + 1 + 4))


@model("sumsq_chunks sumsq_chunks_wg", "g partial")
def _sumsq(a, L):
    n_chunks = L.groups
    return Cost(float(a["g"] // F) * 2, float(a["g"] + F * n_chunks), MEMORY)


@model("global_norm global_norm_wg", "partial n_chunks out")
def _global_norm(a, L):
    return _mem(F * (a["n_chunks"] + 1))


@model("adamw", "theta grad m v wd_mask lr_mask gnorm lr beta1 beta2 eps weight_decay bc1 bc2 clip_norm clip_value")
def _adamw(a, L):               # reads θ, g, m, v, the decay mask; writes θ, m, v (n from θ: VEC8 launches n/8)
    return _mem(8.0 * a["theta"])


@model("sgd_momentum")
def _sgd(a, L):                 # reads θ, g, velocity, the decay mask; writes θ, velocity
    return _mem(F * 6 * L.dim(0))


@model("row_inv_norm row_inv_norm8 row_inv_norm_wg", "X C inv")
def _row_inv_norm(a, L):
    R = L.groups
    return _mem(F * (R * a["C"] + R))


@model("proto_argmax proto_argmax_wg", "scores inv_v inv_p T cosine k")
def _argmax(a, L):
    N, T = L.groups, a["T"]
    return _mem(F * (N * T + 2 * N + T))


@model("proto_feature_forward", "ht P k beta H z")
def _proto_feature(a, L):
    N, H = L.dim(1), a["H"]
    return _mem(F * (2 * N * H + N) + a["P"])


@model("proto_update", "P sums starts usage v lr rho threshold seed step N T H")
def _proto_update(a, L):
    T, H = a["T"], a["H"]
    return _mem(F * (3 * T * H + 2 * T + 1))


@model("proto_usage_update", "usage starts rho threshold N T")
def _usage_update(a, L):
    T = a["T"]
    return _mem(F * (3 * T + 1))


@model("proto_qerr_rows proto_qerr_rows_wg", "v P k H q")
def _qerr(a, L):
    N, H = L.groups, a["H"]
    return _mem(F * (N * H + 2 * N) + a["P"])


@model("layernorm_forward_rows layernorm_forward_rows8 layernorm_forward_wg", "x gamma beta C eps y mean rstd")
def _ln_fwd(a, L):
    N, C = L.groups, a["C"]
    return _mem(F * (2 * N * C + 2 * C + 2 * N))


@model("layernorm_backward_rows layernorm_backward_wg", "dy x gamma mean rstd C dx")
def _ln_bwd(a, L):
    N, C = L.groups, a["C"]
    return _mem(F * (3 * N * C + C + 2 * N))


@model("layernorm_backward_rows8", "dy x gamma mean rstd C dres dx")
def _ln_bwd8(a, L):             # dres read too (it is dy again when no residual is added)
    N, C = L.groups, a["C"]
    return _mem(F * (4 * N * C + C + 2 * N))


@model("layernorm_param_grads layernorm_param_grads8 layernorm_param_grads_wg", "dy x mean rstd N C dgamma dbeta")
def _ln_params(a, L):
    N, C = a["N"], a["C"]
    return _mem(F * (2 * N * C + 2 * N + 2 * C))


@model("batchnorm_stats_cols batchnorm_stats_wg", "x N C eps momentum mean rstd run_mean run_var")
def _bn_stats(a, L):
    return _mem(F * (a["N"] * a["C"] + 6 * a["C"]))


@model("batchnorm_apply", "x mean rstd gamma beta y")
def _bn_apply(a, L):
    C, N = L.dim(0), L.dim(1)
    return _mem(F * (2 * N * C + 4 * C))


@model("batchnorm_backward_cols batchnorm_backward_wg", "dy x gamma mean rstd N C dx dgamma dbeta")
def _bn_bwd(a, L):
    return _mem(F * (3 * a["N"] * a["C"] + 5 * a["C"]))


@model("dropout")
def _dropout(a, L):
    return _mem(F * 2 * L.dim(0))


# -- the transformer family (kernels/attention.cl) ----------------------------------------------------
@model("tok_pos_embed_forward", "wte tok wpe S C x")
def _tok_pos(a, L):
    return _mem(F * 3 * L.dim(0) * L.dim(1) + a["tok"])


@model("gelu_forward8", "a h")
def _gelu8(a, L):
    return _mem(2.0 * a["h"])


@model("gelu_backward8", "dh a da")
def _gelu_bwd8(a, L):
    return _mem(3.0 * a["da"])


@model("heads_split heads_merge heads_split8 heads_merge8", "x S nh d out")
def _heads(a, L):
    return _mem(2.0 * a["out"])


@model("causal_softmax causal_softmax_wg", "s S scale p")
def _causal_softmax(a, L):
    return _mem(2.0 * a["p"])


@model("causal_softmax_backward causal_softmax_backward_wg", "p dp S scale ds")
def _causal_softmax_bwd(a, L):
    return _mem(3.0 * a["ds"])


def _attention(a, L, products, bytes_):
    """`products` causal (S,S,d) products per head: S(S+1)/2 dots of d each; d from qkv (N, 3C)."""
    BH, S = L.dim(1), a["S"]
    d = a["qkv"] / (F * 3 * BH * S)
    return Cost(products * d * S * (S + 1) * BH, bytes_, COMPUTE)


@model("attention_forward8", "qkv S nh scale p y")
def _attention_fwd(a, L):       # s = q·kᵀ and y = p·v over τ ≤ t
    return _attention(a, L, 2, a["qkv"] + a["p"] + a["y"])


@model("attention_backward_rows8", "qkv p dy S nh scale ds dqkv")
def _attention_bwd_rows(a, L):  # dp = dy·vᵀ and dq = ds·k over τ ≤ t
    return _attention(a, L, 2, a["qkv"] * 2 / 3 + a["p"] + a["dy"] + a["ds"] + a["dqkv"] / 3)


@model("attention_backward_cols8", "qkv p ds dy S nh dqkv")
def _attention_bwd_cols(a, L):  # dk = dsᵀ·q and dv = pᵀ·dy over t ≥ τ
    return _attention(a, L, 2, a["qkv"] / 3 + a["p"] + a["ds"] + a["dy"] + a["dqkv"] * 2 / 3)


# -- the table ---------------------------------------------------------------------------------------
def kernel_table(timings: dict, launches: list[Launch], steps: int, peak_gflops: float | None,
                 bandwidth_gb_s: float | None) -> list[dict]:
    """One row per kernel the profile timed (Device.take_timings: {name: (calls, ns)}), slowest
    first: calls, device time (per step, per call), its share, GFLOP/s and GB/s where the
    launches of that kernel all have a cost, and the percentage of the peak that bounds it
    (FP32 peak for products, the measured bandwidth for the rest)."""
    work = defaultdict(lambda: {"launches": 0, "flops": 0.0, "bytes": 0.0, "bound": None, "why": ""})
    for launch in launches:
        w = work[launch.kernel]
        w["launches"] += 1
        cost, why = launch_cost(launch)
        if cost is None:
            w["why"] = w["why"] or why
            continue
        w["flops"] += cost.flops
        w["bytes"] += cost.bytes
        w["bound"] = cost.bound
    total_ns = sum(ns for _, ns in timings.values())
    rows = []
    for name, (calls, ns) in timings.items():
        w = work.get(name)
        why = "not recorded" if w is None else w["why"]
        if not why and w["launches"] != calls:
            why = f"{w['launches']} launches recorded for {calls} timed"
        s = ns * 1e-9
        row = {"kernel": name, "calls_per_step": calls / steps, "ms": ns / 1e6 / steps,
               "share": ns / total_ns if total_ns else 0.0, "calls": calls, "total_ms": ns / 1e6,
               "us_per_call": ns / 1e3 / calls if calls else 0.0, "model": why or "ok", "bound": None,
               "gflop_per_step": None, "mb_per_step": None, "gflops": None, "gb_s": None,
               "pct_peak": None, "peak_of": None}
        if not why and s > 0:
            row.update(bound=w["bound"], gflop_per_step=w["flops"] / 1e9 / steps, mb_per_step=w["bytes"] / 1e6 / steps,
                       gflops=w["flops"] / s / 1e9 if w["flops"] else None, gb_s=w["bytes"] / s / 1e9)
            if w["bound"] == COMPUTE and peak_gflops and row["gflops"]:
                row.update(pct_peak=100.0 * row["gflops"] / peak_gflops, peak_of="FP32 peak (nominal)")
            elif w["bound"] == MEMORY and bandwidth_gb_s:
                row.update(pct_peak=100.0 * row["gb_s"] / bandwidth_gb_s, peak_of="bandwidth (measured)")
        rows.append(row)
    return sorted(rows, key=lambda r: -r["ms"])
