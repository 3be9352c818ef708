"""Plain numpy reference of docs/model.md: the ground truth the OpenCL kernels are tested against.

    python -m pytest tests/test_reference.py -q

Written for clarity, not speed. Every function computes in the dtype of its
float inputs (float32 or float64); the only exception is erf, which is
evaluated in float64 (math.erf) and rounded once to the input dtype.
No globals other than constants, no OpenCL.

Key: B batch, S sequence, N = B*S positions (sequence b is rows b*S..b*S+S-1),
     E embedding, H hidden, V vocabulary, T prototypes.
"""
import dataclasses
import math

import numpy as np

from .. import params as params_mod

PAD = -1                                # target id ignored by the loss
NORM_EPS = 1e-6                         # the 1e-6 inside sqrt(|x|^2 + 1e-6) (keys, cosine)
CLIP_EPS = 1e-6                         # the 1e-6 in clip_norm / (gnorm + 1e-6)
# weight decay applies to these, not to biases (from the declarations; sizes do not matter)
DECAYED = tuple(p.name for p in params_mod.char_lm_params(1, 1, 1) if p.decay)

HEBB_MODES = ("off", "shadow", "modulate", "fast_weights")
HEBB_POSTS = ("spikes", "activity")
PROTO_MODES = ("off", "shadow", "feature")
SIMILARITIES = ("cosine", "dot")


# ----------------------------------------------------------------------------- embedding

def embedding_forward(W_emb, x):
    """W_emb (V,E), x int32 (N,) -> e (N,E) = W_emb[x]."""
    return W_emb[x].copy()


def embedding_backward(de, x, V):
    """de (N,E), x int32 (N,) -> dW_emb (V,E), dW_emb[v] = sum_{n: x_n = v} de[n].

    Rows are accumulated in increasing n (np.add.at is unbuffered), so the
    result is deterministic."""
    dW_emb = np.zeros((V, de.shape[1]), dtype=de.dtype)
    np.add.at(dW_emb, x, de)
    return dW_emb


# ----------------------------------------------------------------------------- GELU

def _Phi(a):
    """Standard normal CDF 0.5*(1 + erf(a/sqrt 2)), via math.erf in float64, rounded to a's dtype."""
    a64 = np.asarray(a, dtype=np.float64)
    erf = np.fromiter(map(math.erf, (a64 / math.sqrt(2.0)).ravel().tolist()),
                      dtype=np.float64, count=a64.size).reshape(a64.shape)
    return (0.5 * (1.0 + erf)).astype(a.dtype)


def gelu_forward(a):
    """a (N,H) -> h (N,H) = a*Phi(a), the exact GELU (Hendrycks & Gimpel 2016)."""
    return a * _Phi(a)


def gelu_backward(dh, a):
    """dh, a (N,H) -> da = dh * GELU'(a), GELU'(a) = Phi(a) + a*phi(a)."""
    phi = np.exp(-0.5 * a * a) * a.dtype.type(1.0 / math.sqrt(2.0 * math.pi))
    return dh * (_Phi(a) + a * phi)


# ----------------------------------------------------------------------------- spikes

def spikes_forward(h, theta):
    """h (N,H) -> s (N,H) = 1[h > theta] in h's dtype. No backward: s is a constant for backprop."""
    return (h > theta).astype(h.dtype)


# ----------------------------------------------------------------------------- row normalisation (fast-weight keys)

def row_normalize_forward(h):
    """h (N,H) -> k (N,H) = h / sqrt(|h|^2 + 1e-6), inv_norm (N,) = 1 / sqrt(|h|^2 + 1e-6)."""
    inv_norm = 1.0 / np.sqrt(np.sum(h * h, axis=1) + h.dtype.type(NORM_EPS))
    return h * inv_norm[:, None], inv_norm


def row_normalize_backward(dk, k, inv_norm):
    """dk, k (N,H), inv_norm (N,) -> dh (N,H) = (dk - k (k.dk)) * inv_norm.

    With n = sqrt(|h|^2 + eps): dk/dh = (I - h h^T / n^2) / n = (I - k k^T) / n, symmetric."""
    return (dk - k * np.sum(k * dk, axis=1, keepdims=True)) * inv_norm[:, None]


# ----------------------------------------------------------------------------- fast weights (causal linear attention)

def _fast_weight_decay(S, eta, lam, dtype):
    """C (S,S): C[t,tau] = eta * lam^(t-1-tau) for tau < t, else 0 (strictly causal).

    Computed in float64 and rounded once to dtype (a constant of the recurrence)."""
    t = np.arange(S)[:, None]
    tau = np.arange(S)[None, :]
    C = np.where(tau < t, eta * np.power(float(lam), np.maximum(t - 1 - tau, 0)), 0.0)
    return C.astype(dtype)


def fast_weights_forward(k, post, B, S, eta, lam):
    """k, post (N,H) -> m (N,H); per sequence m_t = A_{t-1} k_t with
    A_t = lam A_{t-1} + eta post_t k_t^T, A_{-1} = 0 (memory reset for every sequence).

    Unrolled (docs/model.md): G = K K^T, Gm = C * G, M = Gm Post."""
    C = _fast_weight_decay(S, eta, lam, k.dtype)                     # (S,S)
    m = np.zeros_like(k)
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        K, Post = k[rows], post[rows]                                 # (S,H) each
        Gm = C * (K @ K.T)                                            # (S,S)
        m[rows] = Gm @ Post                                           # (S,H)
    return m


def fast_weights_backward(dm, k, post, B, S, eta, lam):
    """dm, k, post (N,H) -> dk (N,H); post is a constant for backprop.

    dGm = dM Post^T, dG = C * dGm, and G = K K^T gives dK = dG K + dG^T K."""
    C = _fast_weight_decay(S, eta, lam, k.dtype)
    dk = np.zeros_like(k)
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        K, Post = k[rows], post[rows]
        dG = C * (dm[rows] @ Post.T)                                  # (S,S)
        dk[rows] = dG @ K + dG.T @ K
    return dk


def fast_weights_delta_forward(k, post, B, S, eta, lam):
    """The delta rule (Schlag et al. 2021; issue 11's hebb.rule=delta), same interface as
    fast_weights_forward: per sequence m_t = A_{t-1} k_t with
    A_t = lam A_{t-1} + eta (post_t - A_{t-1} k_t) k_t^T, A_{-1} = 0: a write replaces what the
    key already retrieves instead of adding to it. Sequential in t (not a causal product)."""
    H = k.shape[1]
    m = np.zeros_like(k)
    for b in range(B):
        A = np.zeros((H, H), k.dtype)
        for t in range(b * S, (b + 1) * S):
            r = A @ k[t]
            m[t] = r
            A = lam * A + eta * np.outer(post[t] - r, k[t])
    return m


def fast_weights_delta_backward(dm, k, post, B, S, eta, lam):
    """dm, k, post (N,H) -> dk (N,H) of fast_weights_delta_forward (post constant), by
    back-propagation through time: with G = dL/dA_t from the steps after t,
    dA_{t-1} = lam G - eta G k_t k_t^T + dm_t k_t^T and
    dk_t = A_{t-1}^T dm_t + eta G^T (post_t - A_{t-1} k_t) - eta A_{t-1}^T G k_t."""
    H = k.shape[1]
    dk = np.zeros_like(k)
    for b in range(B):
        rows = range(b * S, (b + 1) * S)
        As, A = [], np.zeros((H, H), k.dtype)
        for t in rows:                      # the states A_{t-1} each step read
            As.append(A)
            A = lam * A + eta * np.outer(post[t] - A @ k[t], k[t])
        G = np.zeros((H, H), k.dtype)
        for i, t in reversed(list(enumerate(rows))):
            A, kt = As[i], k[t]
            r = A @ kt
            dk[t] = A.T @ dm[t] + eta * (G.T @ (post[t] - r)) - eta * (A.T @ (G @ kt))
            G = lam * G - eta * np.outer(G @ kt, kt) + np.outer(dm[t], kt)
    return dk


def fast_weights_state_norm(k, post, B, S, eta, lam):
    """Mean over sequences of |A_{S-1}|_F, A_{S-1} = eta sum_tau lam^(S-1-tau) post_tau k_tau^T (H,H).

    Telemetry only (the Hebbian matrix norm of the fast_weights mode)."""
    c = (eta * np.power(float(lam), np.arange(S - 1, -1, -1))).astype(k.dtype)   # (S,)
    norms = []
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        A = (post[rows] * c[:, None]).T @ k[rows]                     # (H,H) = sum c post k^T
        norms.append(np.sqrt(np.sum(A * A)))
    return float(np.mean(norms))


# ----------------------------------------------------------------------------- modulate (persistent W_hebb)

def modulate_forward(h, W_hebb, alpha):
    """h (N,H), W_hebb (H,H) -> ht (N,H) = h + alpha h W_hebb."""
    return h + alpha * (h @ W_hebb)


def modulate_backward(dht, W_hebb, alpha):
    """dht (N,H) -> dh (N,H) = dht + alpha dht W_hebb^T; W_hebb is constant for backprop."""
    return dht + alpha * (dht @ W_hebb.T)


# ----------------------------------------------------------------------------- prototypes

def proto_similarity(v, P, similarity):
    """v (N,H), P (T,H) -> sim (N,T); 'cosine' with sqrt(|.|^2 + 1e-6) norms, or 'dot'."""
    sim = v @ P.T
    if similarity == "dot":
        return sim
    if similarity != "cosine":
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    eps = v.dtype.type(NORM_EPS)
    nv = np.sqrt(np.sum(v * v, axis=1) + eps)                        # (N,)
    nP = np.sqrt(np.sum(P * P, axis=1) + eps)                        # (T,)
    return sim / (nv[:, None] * nP[None, :])


def proto_assign(v, P, similarity):
    """v (N,H), P (T,H) -> k int32 (N,) = argmax_t sim(v_n, P_t), lowest t on ties."""
    return np.argmax(proto_similarity(v, P, similarity), axis=1).astype(np.int32)


def proto_feature_forward(ht, P, k, beta):
    """ht (N,H), P (T,H), k int32 (N,) -> z (N,H) = ht + beta P[k]; P, k constant for backprop."""
    return ht + beta * P[k]


# ----------------------------------------------------------------------------- loss

def softmax_xent_forward(logits, y):
    """logits (N,V), y int32 (N,) with PAD = -1 -> (loss_mean, loss_rows (N,), dlogits (N,V), n_valid).

    loss_mean = (1/Nv) sum over valid rows of -log softmax(logits)[n, y_n] (0 if Nv = 0);
    dlogits = (p - onehot(y)) / Nv on valid rows, 0 on PAD rows (the backward of loss_mean)."""
    dtype = logits.dtype
    valid = y != PAD                                                  # (N,)
    n_valid = int(np.count_nonzero(valid))
    z = logits - np.max(logits, axis=1, keepdims=True)                # max-subtracted
    sumexp = np.sum(np.exp(z), axis=1, keepdims=True)
    logp = z - np.log(sumexp)
    rows = np.arange(logits.shape[0])
    y_safe = np.where(valid, y, 0)
    loss_rows = np.where(valid, -logp[rows, y_safe], 0).astype(dtype)
    dlogits = np.zeros_like(logits)
    if n_valid == 0:
        return dtype.type(0), loss_rows, dlogits, 0
    p = np.exp(z) / sumexp
    p[rows, y_safe] -= 1
    dlogits[valid] = p[valid] / dtype.type(n_valid)
    loss_mean = np.sum(loss_rows) / dtype.type(n_valid)
    return dtype.type(loss_mean), loss_rows, dlogits, n_valid


def argmax_rows(logits, V=None):
    """logits (N,ld) -> pred int32 (N,): the first index of each row's maximum over columns 0..V-1
    (np.argmax's tie rule), the prediction the loss kernels count as a hit."""
    V = logits.shape[1] if V is None else V
    return np.argmax(logits[:, :V], axis=1).astype(np.int32)


# ----------------------------------------------------------------------------- LayerNorm

def layernorm_forward(x, gamma, beta, eps=1e-5):
    """x (N,C) -> (y, cache): y = (x − μ)·r·γ + β per row, r = 1/sqrt(var + eps) (biased variance)."""
    mean = x.mean(axis=1, keepdims=True)
    d = x - mean
    rstd = 1.0 / np.sqrt((d * d).mean(axis=1, keepdims=True) + x.dtype.type(eps))
    xhat = d * rstd
    return xhat * gamma + beta, {"xhat": xhat, "rstd": rstd, "gamma": gamma}



def layernorm_backward(dy, cache):
    """-> (dx, dγ, dβ): dx = r·(dŷ − mean dŷ − x̂·mean(dŷ·x̂)) with dŷ = dy·γ."""
    xhat, rstd, gamma = cache["xhat"], cache["rstd"], cache["gamma"]
    dxh = dy * gamma
    dx = rstd * (dxh - dxh.mean(axis=1, keepdims=True) - xhat * (dxh * xhat).mean(axis=1, keepdims=True))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Training mode, x (N,C) -> (y, cache): per column y = (x − μ)·r·γ + β, r = 1/sqrt(var + eps)
    with the batch's biased variance; cache["mean"], cache["var"] feed batchnorm_running."""
    mean = x.mean(axis=0)
    d = x - mean
    var = (d * d).mean(axis=0)
    rstd = 1.0 / np.sqrt(var + x.dtype.type(eps))
    xhat = d * rstd
    return xhat * gamma + beta, {"xhat": xhat, "rstd": rstd, "gamma": gamma, "mean": mean, "var": var}


def batchnorm_running(run_mean, run_var, cache, n, momentum):
    """In place: rμ ← (1−m)·rμ + m·μ, rv ← (1−m)·rv + m·var·n/(n−1) (the unbiased variance, as torch)."""
    run_mean[...] = (1 - momentum) * run_mean + momentum * cache["mean"]
    run_var[...] = (1 - momentum) * run_var + momentum * cache["var"] * (n / max(n - 1, 1))


def batchnorm_eval(x, gamma, beta, run_mean, run_var, eps=1e-5):
    return (x - run_mean) / np.sqrt(run_var + x.dtype.type(eps)) * gamma + beta


def batchnorm_backward(dy, cache):
    """-> (dx, dγ, dβ) of training mode: dx = γ·r·(dy − mean dy − x̂·mean(dy·x̂)) per column."""
    xhat, rstd, gamma = cache["xhat"], cache["rstd"], cache["gamma"]
    dx = gamma * rstd * (dy - dy.mean(axis=0) - xhat * (dy * xhat).mean(axis=0))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


# ----------------------------------------------------------------------------- optimiser

def clip_grads(params, grads, clip_norm, clip_value):
    """(gnorm, clipped grads): the global norm before any clipping, then element-wise clamp
    (clip_value > 0), then scaling by min(1, clip_norm/(gnorm+1e-6)) (clip_norm > 0)."""
    gnorm = np.sqrt(sum(np.sum(grads[name] * grads[name]) for name in params))
    out = {}
    for name, p in params.items():
        f, g = p.dtype.type, grads[name]
        if clip_value > 0:
            g = np.clip(g, -f(clip_value), f(clip_value))
        if clip_norm > 0:
            g = g * min(f(1), f(clip_norm) / (f(gnorm) + f(CLIP_EPS)))
        out[name] = g
    return gnorm, out


def adamw_step(params, grads, m, v, t, lr, beta1, beta2, eps, weight_decay, decay_mask,
               clip_norm, clip_value, lr_scale=None):
    """AdamW (Loshchilov & Hutter 2019) step t (1-based) on dicts of arrays; params, m, v in place.

    Clipping as docs/model.md: the global norm is taken before any clipping, then
    element-wise clamp (clip_value > 0), then scaling by min(1, clip_norm/(gnorm+1e-6))
    (clip_norm > 0). Weight decay is decoupled and scaled by lr. lr_scale: {name: scale} (absent
    names 1.0), each tensor's rate lr·scale (ParamSpec.lr_scale; the kernel's lr_mask). Returns gnorm."""
    gnorm, clipped = clip_grads(params, grads, clip_norm, clip_value)
    for name, p in params.items():
        f, g = p.dtype.type, clipped[name]
        lr_eff = f(lr) * f((lr_scale or {}).get(name, 1.0))
        wd = f(weight_decay) if decay_mask[name] else f(0)
        m[name][...] = f(beta1) * m[name] + f(1 - beta1) * g
        v[name][...] = f(beta2) * v[name] + f(1 - beta2) * g * g
        m_hat = m[name] / f(1 - beta1 ** t)
        v_hat = v[name] / f(1 - beta2 ** t)
        p[...] = p - lr_eff * (m_hat / (np.sqrt(v_hat) + f(eps)) + wd * p)
    return float(gnorm)


def sgd_step(params, grads, vel, lr, momentum, weight_decay, decay_mask, clip_norm, clip_value, lr_scale=None):
    """SGD with momentum (heavy ball, no dampening, as torch.optim.SGD) on dicts of arrays;
    params and vel in place. The same clipping as adamw_step, then L2 weight decay added to
    the clipped gradient (coupled, masked): v ← μ·v + g + wd·θ; θ ← θ − lr·scale·v (lr_scale as
    adamw_step's). Returns gnorm."""
    gnorm, clipped = clip_grads(params, grads, clip_norm, clip_value)
    for name, p in params.items():
        f, g = p.dtype.type, clipped[name]
        if decay_mask[name]:
            g = g + f(weight_decay) * p
        vel[name][...] = f(momentum) * vel[name] + g
        p[...] = p - f(lr) * f((lr_scale or {}).get(name, 1.0)) * vel[name]
    return float(gnorm)


# ----------------------------------------------------------------------------- local rules

def combine_replicas(grads, summaries):
    """(gradient, loss summary) of a data-parallel step from D replicas (kernels/parallel.cl):
    grads (D,n), summaries (D,4) = [mean, hits, valid, sum] each; the gradient of the mean over
    every valid target is Σ_k (nv_k/nv)·g_k, the summary [Σ sum/nv, Σ hits, nv, Σ sum]."""
    grads, summaries = np.asarray(grads), np.asarray(summaries)
    nv = summaries[:, 2].sum()
    w = summaries[:, 2] / nv if nv > 0 else np.zeros(len(summaries))
    total = summaries[:, 3].sum()
    return (w[:, None] * grads).sum(0), np.array([total / nv if nv > 0 else 0.0, summaries[:, 1].sum(), nv, total])


def hebbian_update(W_hebb, h, post, lr, decay):
    """W_hebb (H,H) in place: W <- (1 - decay) W + lr (1/N) h^T post (h, post (N,H)); Hebb's rule with decay."""
    N = h.shape[0]
    f = W_hebb.dtype.type
    W_hebb[...] = f(1 - decay) * W_hebb + f(lr) * (h.T @ post) / f(N)


def hash_u32(seed, step, t):
    """Counter-based uint32 hash of docs/model.md (murmur3-style finaliser), same bits on every device.
    Python ints, or t a numpy uint64 array (the sums wrap modulo 2⁶⁴, which keeps them modulo 2³²)."""
    M = 0xFFFFFFFF
    h = (seed * 0x9E3779B1 + step * 0x85EBCA77 + t * 0xC2B2AE3D + 0x27D4EB2F) & M
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M
    h ^= h >> 16
    return h


def dropout_key(seed, layer):
    """One stream of dropout masks per layer: hash_u32(seed, layer, 0x5BD1E995)."""
    return hash_u32(seed, layer, 0x5BD1E995)


def dropout_threshold(p):
    """keep = hash ≥ ⌊p·2³²⌋: exactly a fraction p of the 2³² hash values is dropped (p < 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(int(p * 2 ** 32), 2 ** 32 - 1)


def dropout_mask(n, p, key, step):
    """keep (n,) bool of dropout.cl: hash_u32 over the indices as a uint64 array (wraps modulo
    2³² after the masks, like the device)."""
    return hash_u32(key, step, np.arange(n, dtype=np.uint64)) >= np.uint64(dropout_threshold(p))


def dropout_forward(x, p, key, step):
    """Inverted dropout: x·keep/(1−p); its backward is the same function of the gradient."""
    keep = dropout_mask(x.size, p, key, step).reshape(x.shape)
    return np.where(keep, x * x.dtype.type(1.0 / (1.0 - p)), x.dtype.type(0))


def proto_update(P, usage, v, k, lr, usage_decay, reseed_threshold, seed, step):
    """Online k-means step on P (T,H) and usage EMA (T,), in place; v (N,H) are h~, k int32 (N,) assignments.

    P_t moves towards the mean of its members (unchanged if it has none), usage_t is an
    EMA of the assignment share; a prototype whose usage fell below reseed_threshold/T is
    re-seeded to v[hash(seed, step, t) mod N] with usage 1/T (after the k-means step)."""
    T, N = P.shape[0], v.shape[0]
    f = P.dtype.type
    counts = np.bincount(k, minlength=T)                              # (T,) c_t over all N positions
    for t in range(T):
        if counts[t] > 0:
            mu = np.sum(v[k == t], axis=0) / f(counts[t])
            P[t] = P[t] + f(lr) * (mu - P[t])
        usage[t] = f(usage_decay) * usage[t] + f(1 - usage_decay) * f(counts[t]) / f(N)
    if reseed_threshold > 0:
        for t in range(T):
            if usage[t] < f(reseed_threshold) / f(T):
                P[t] = v[hash_u32(seed, step, t) % N]
                usage[t] = f(1) / f(T)


def kmeanspp_init(v, T, seed):
    """k-means++ seeding (Arthur & Vassilvitskii 2007) of T prototypes from v (N,H) -> P (T,H).

    rng = default_rng([seed, 2]); first centre uniform; each next centre drawn with
    probability D(x)^2 / sum D^2 (squared Euclidean to the nearest chosen centre), uniform
    if all D are 0. Computed in float64, returned in v's dtype."""
    rng = np.random.default_rng([seed, 2])
    X = np.asarray(v, dtype=np.float64)
    N = X.shape[0]
    idx = [int(rng.integers(N))]
    d2 = np.sum((X - X[idx[0]]) ** 2, axis=1)                         # (N,)
    for _ in range(1, T):
        total = d2.sum()
        j = int(rng.integers(N)) if total == 0 else int(rng.choice(N, p=d2 / total))
        idx.append(j)
        d2 = np.minimum(d2, np.sum((X - X[j]) ** 2, axis=1))
    return X[idx].astype(v.dtype)


# ----------------------------------------------------------------------------- model

@dataclasses.dataclass(frozen=True)
class Wiring:
    """Which Hebbian / prototype variant the model uses (docs/model.md, 'wiring')."""
    hebb_mode: str = "off"              # off | shadow | modulate | fast_weights
    hebb_lr: float = 0.01               # Hebbian rate; eta in fast_weights
    hebb_decay: float = 0.01            # W_hebb decay; lambda = 1 - decay in fast_weights
    hebb_strength: float = 0.1          # alpha in modulate
    hebb_post: str = "spikes"           # spikes | activity: post-synaptic signal
    proto_mode: str = "off"             # off | shadow | feature
    proto_lr: float = 0.05              # k-means step size
    proto_strength: float = 0.1         # beta in feature
    proto_similarity: str = "cosine"    # cosine | dot
    proto_usage_decay: float = 0.99     # rho of the usage EMA
    proto_reseed_threshold: float = 0.0  # re-seed if usage < threshold/T; 0 disables
    spike_threshold: float = 0.5        # theta of the spikes s = 1[h > theta]

    def __post_init__(self):
        for field, allowed in (("hebb_mode", HEBB_MODES), ("hebb_post", HEBB_POSTS),
                               ("proto_mode", PROTO_MODES), ("proto_similarity", SIMILARITIES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")


def init_params(V, E, H, seed, dtype=np.float32, init="lecun"):
    """Parameters as in docs/model.md: drawn in float64 in the order W_emb, W1, W2, then cast
    (engine.params.char_lm_params: the declarations the device model is built from)."""
    return params_mod.init_params(params_mod.char_lm_params(V, E, H, init), seed, dtype)


def init_state(H, T, dtype=np.float32):
    """Local-rule state: W_hebb = 0 (H,H), P = None (set by k-means++ on the first batch), usage = 1/T (T,)."""
    return {"W_hebb": np.zeros((H, H), dtype), "P": None, "usage": np.full(T, 1.0 / T, dtype)}


def model_forward(params, state, x, y, wiring, frozen_post=None):
    """x, y int32 (B,S) -> (loss, cache). frozen_post (N,H), if given, replaces post
    (it is a constant for backprop; the finite-difference tests hold it fixed)."""
    B, S = x.shape
    x, y = x.reshape(-1), y.reshape(-1)                               # (N,)
    e = embedding_forward(params["W_emb"], x)                         # (N,E)
    a = e @ params["W1"] + params["b1"]                               # (N,H)
    h = gelu_forward(a)                                               # (N,H)
    s = spikes_forward(h, wiring.spike_threshold)                     # (N,H)
    post = s if wiring.hebb_post == "spikes" else h.copy()
    if frozen_post is not None:
        post = frozen_post
    k = inv_norm = m = None
    if wiring.hebb_mode == "modulate":
        ht = modulate_forward(h, state["W_hebb"], wiring.hebb_strength)
    elif wiring.hebb_mode == "fast_weights":
        k, inv_norm = row_normalize_forward(h)
        m = fast_weights_forward(k, post, B, S, wiring.hebb_lr, 1 - wiring.hebb_decay)
        ht = h + m
    else:                                                             # off, shadow
        ht = h
    assign = None
    if wiring.proto_mode != "off":
        assign = proto_assign(ht, state["P"], wiring.proto_similarity)
    z = proto_feature_forward(ht, state["P"], assign, wiring.proto_strength) \
        if wiring.proto_mode == "feature" else ht
    logits = z @ params["W2"] + params["b2"]                          # (N,V)
    loss, loss_rows, dlogits, n_valid = softmax_xent_forward(logits, y)
    cache = dict(B=B, S=S, x=x, y=y, e=e, a=a, h=h, s=s, post=post, k=k, inv_norm=inv_norm,
                 m=m, ht=ht, assign=assign, z=z, logits=logits, loss_rows=loss_rows,
                 dlogits=dlogits, n_valid=n_valid)
    return loss, cache


def model_backward(params, state, cache, wiring):
    """-> grads of loss_mean, same keys as params (docs/model.md 'Backward')."""
    dlogits = cache["dlogits"]                                        # (N,V), already / Nv
    dW2 = cache["z"].T @ dlogits
    db2 = np.sum(dlogits, axis=0)
    dht = dlogits @ params["W2"].T                                    # (N,H); prototype term is constant
    if wiring.hebb_mode == "modulate":
        dh = modulate_backward(dht, state["W_hebb"], wiring.hebb_strength)
    elif wiring.hebb_mode == "fast_weights":
        dk = fast_weights_backward(dht, cache["k"], cache["post"], cache["B"], cache["S"],
                                   wiring.hebb_lr, 1 - wiring.hebb_decay)
        dh = dht + row_normalize_backward(dk, cache["k"], cache["inv_norm"])
    else:
        dh = dht
    da = gelu_backward(dh, cache["a"])                                # (N,H)
    db1 = np.sum(da, axis=0)
    dW1 = cache["e"].T @ da
    de = da @ params["W1"].T                                          # (N,E)
    dW_emb = embedding_backward(de, cache["x"], params["W_emb"].shape[0])
    return {"W_emb": dW_emb, "W1": dW1, "b1": db1, "W2": dW2, "b2": db2}


def local_updates(state, cache, wiring, seed, step):
    """Apply the Hebbian (shadow, modulate) and prototype (shadow, feature) rules in place, after the Adam step."""
    if wiring.hebb_mode in ("shadow", "modulate"):
        hebbian_update(state["W_hebb"], cache["h"], cache["post"], wiring.hebb_lr, wiring.hebb_decay)
    if wiring.proto_mode != "off":
        proto_update(state["P"], state["usage"], cache["ht"], cache["assign"], wiring.proto_lr,
                     wiring.proto_usage_decay, wiring.proto_reseed_threshold, seed, step)


def train_steps(params, state, batches, wiring, optim, seed, steps):
    """Run steps 1..steps on batches (a sequence of (x, y), cycled); params and state in place.

    optim: dict lr (float, or callable step -> lr), beta1, beta2, eps, weight_decay,
    clip_norm, clip_value; name "sgd" (with momentum) instead of the default AdamW. Adam
    moments (SGD's velocity) start at zero. Returns the per-step losses."""
    if wiring.proto_mode != "off" and state["P"] is None:
        x0, y0 = batches[0]
        _, cache0 = model_forward(params, state, x0, y0, dataclasses.replace(wiring, proto_mode="off"))
        state["P"] = kmeanspp_init(cache0["ht"], state["usage"].shape[0], seed)
    m = {name: np.zeros_like(p) for name, p in params.items()}   # Adam's moments, or SGD's velocity (m)
    v = {name: np.zeros_like(p) for name, p in params.items()}
    decay_mask = {name: name in DECAYED for name in params}
    losses = []
    for step in range(1, steps + 1):
        x, y = batches[(step - 1) % len(batches)]
        loss, cache = model_forward(params, state, x, y, wiring)
        grads = model_backward(params, state, cache, wiring)
        lr = optim["lr"](step) if callable(optim["lr"]) else optim["lr"]
        if optim.get("name", "adamw") == "sgd":
            sgd_step(params, grads, m, lr, optim["momentum"], optim["weight_decay"], decay_mask,
                     optim["clip_norm"], optim["clip_value"])
        else:
            adamw_step(params, grads, m, v, step, lr, optim["beta1"], optim["beta2"], optim["eps"],
                       optim["weight_decay"], decay_mask, optim["clip_norm"], optim["clip_value"])
        local_updates(state, cache, wiring, seed, step)
        losses.append(float(loss))
    return losses
