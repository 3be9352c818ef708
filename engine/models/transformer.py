"""The transformer family: nanoGPT's GPT (Karpathy, model.py) on the engine's layers.

    python -m engine.train --set model.family=transformer --set train.steps=200

    TokPosEmbed → [AttnBlock → MlpBlock] × n_layer → LayerNorm (ln_f) → the task's head

with the sizes of the config section `transformer` (model.* sizes do not apply). Parameter
names (y = x·W, W stored (in, out)): wte (V, C), wpe (block_size, C); per block l
h{l}.ln_1.gamma, h{l}.attn.W_qkv (C, 3C: columns [q | k | v], head h at h·d:(h+1)·d of each),
h{l}.attn.W_proj (C, C), h{l}.ln_2.gamma, h{l}.mlp.W_fc (C, 4C), h{l}.mlp.W_proj (4C, C);
ln_f.gamma; lm_head.W (C, V) only without tie_weights. With transformer.bias also
h{l}.ln_1.beta, h{l}.attn.b_qkv, h{l}.attn.b_proj, h{l}.ln_2.beta, h{l}.mlp.b_fc, h{l}.mlp.b_proj,
ln_f.beta and lm_head.b (LayerNorm β only with bias, as nanoGPT's LayerNorm(bias=False)).
Initialisation as nanoGPT's _init_weights: N(0, 0.02²) for every weight and both embeddings, the
residual projections (attn.W_proj, mlp.W_proj) N(0, (0.02/√(2·n_layer))²), biases 0, γ 1; drawn
in declaration order from one generator seeded by `seed` (engine.params.init_params). Weight
decay on the matrices and embeddings only (nanoGPT's configure_optimizers: dim ≥ 2). Tied
(the default): the head's weight is wte, one parameter with both gradients added (the head's
first, then the embedding's).

transformer.hybrid puts the local rules inside the blocks, as bio layers of width C
(engine/layers/bio.py; their rates hebb.lr, proto.lr; seeds seed + 1000003·(2l+1), (2l+2)):
  hebb   after each block's attention, x ← x + m with m_t = A_{t−1}·k_t the fast-weight memory
         of cfg.hebb (k = x/|x|, values post = spikes 1[x > model.spike_threshold] or the
         activity x, hebb.post): an extra residual branch with no learned parameters (hebb.norm
         none keeps the residual stream un-normalised); prototypes off in it
  proto  after each block, x ← x + β·P_a (proto.mode feature: the assigned prototype of the
         residual stream, by cfg.proto's k-means rule) or x + U_a (token); the memory off in it
  hebb+proto  both. Names: h{l}.hebb.*, h{l}.proto.* (state), telemetry h{l}/hebb/*, h{l}/proto/*.
transformer.branch = prenorm: each of those layers reads LN(x) through its own LayerNorm
(h{l}.hebb.pre_ln.gamma, …; β only with bias) and adds its term to x: x ← x + m(LN(x)) and
x ← x + β·P_a(LN(x) + m) — spikes at model.spike_threshold of a unit-scale row instead of the raw
stream's (whose values start near 0.02, below any useful threshold).
"""
from __future__ import annotations

import math
from dataclasses import replace

from . import LayerDecl


def layers(cfg, V: int) -> list[LayerDecl]:
    t = cfg.transformer
    C, L = t.n_embd, t.n_layer
    block = dict(C=C, bias=t.bias, dropout=t.dropout, proj_scale=0.02 / math.sqrt(2 * L), seed=cfg.seed)
    out = [LayerDecl("tok_pos_embed", "tok_pos", "", dict(V=V, C=C, block_size=t.block_size, dropout=t.dropout,
                                                           seed=cfg.seed, index=0, tied=t.tie_weights))]
    for l in range(L):
        pre = f"h{l}."
        out.append(LayerDecl("attn_block", f"attn{l}", pre, dict(n_head=t.n_head, index=1 + 3 * l, **block)))
        if "hebb" in t.hybrid:
            out.append(_bio(cfg, f"hebb{l}", pre + "hebb.", f"h{l}/hebb/", 2 * l + 1,
                            hebb=cfg.hebb, proto=replace(cfg.proto, mode="off")))
        out.append(LayerDecl("mlp_block", f"mlp{l}", pre, dict(index=3 + 3 * l, **block)))
        if "proto" in t.hybrid:
            out.append(_bio(cfg, f"proto{l}", pre + "proto.", f"h{l}/proto/", 2 * l + 2,
                            hebb=replace(cfg.hebb, mode="off"), proto=cfg.proto))
    out.append(LayerDecl("layernorm", "ln_f", "ln_f.", dict(C=C, bias=t.bias, vec=True)))
    return out


def _bio(cfg, name, prefix, tprefix, k, hebb, proto) -> LayerDecl:
    t = cfg.transformer
    extra = dict(prenorm=True, bias=t.bias) if t.branch == "prenorm" else {}
    return LayerDecl("bio", name, prefix, dict(H=t.n_embd, T=cfg.model.num_prototypes, hebb=hebb,
                                               proto=proto, spike_threshold=cfg.model.spike_threshold,
                                               seed=(cfg.seed + 1000003 * k) % 2**32, tprefix=tprefix, **extra))


def head_args(cfg) -> dict:
    """lm_head: width n_embd; tied to wte (no weight of its own) or lm_head.W ~ N(0, 0.02²); a
    bias lm_head.b only with transformer.bias."""
    t = cfg.transformer
    return {"H": t.n_embd, "prefix": "lm_head.", "names": ("W", "b"), "bias": t.bias,
            "tie": "wte" if t.tie_weights else "", "init": "normal", "scale": 0.02}
