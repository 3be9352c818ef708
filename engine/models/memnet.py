"""The memory network (the DRLMemNet design): a GRU controller reading a key-value memory that
gradient descent and a local write rule share.

    python -m experiments.run memnet           # the design, faithful (presets: lr 0.01, batch 16, length 100)

    Embedding (V→E) → MemoryRead: q = GELU(e·W_q + b_q), a = softmax(q·Kᵀ) over memory_size slots,
    read = a·Vals (memnet.memory=false: read = q) → GRU × gru_layers (hidden_dim) → Dense hidden_dim →
    hidden_dim + GELU → Dropout → the task's head (logits = GELU(z·W + b) with memnet.logit_gelu,
    as the design; plain otherwise) → cross-entropy

with the sizes of the config section `memnet` (model.* sizes do not apply). Parameter names:
emb.W_emb (V, E), mem.W_q (E, M), mem.b_q, mem.K (slots, M), mem.Vals (slots, M), gru{l}.W_i,
gru{l}.b_i, gru{l}.W_h, gru{l}.b_h, fc.W, fc.b, head.W, head.b. Initialisation as the design:
the embedding N(0, 0.1²), the memory and every linear layer memnet.init (Kaiming by default),
biases 0. The memory's keys and values are Adam parameters (through the read) and are also
written after each optimiser step by the local rule of memnet.write_mode with strength
memnet.write_strength (engine/layers/memory.py): new keys from the queries, new values from a
fixed projection of the output logits (Linear V→M, state mem.W_u). Weight decay on matrices.
"""
from __future__ import annotations

from . import LayerDecl


def layers(cfg, V: int) -> list[LayerDecl]:
    m = cfg.memnet
    out = [LayerDecl("embedding", "emb", "emb.", dict(V=V, E=m.embedding_dim, scale=0.1)),
           LayerDecl("memory_read", "mem", "mem.", dict(E=m.embedding_dim, M=m.memory_dim, Ms=m.memory_size, V=V,
                                                        memory=m.memory, write_mode=m.write_mode,
                                                        write_strength=m.write_strength, init=m.init,
                                                        seed=cfg.seed))]
    width = m.memory_dim
    for l in range(m.gru_layers):
        out.append(LayerDecl("gru", f"gru{l}", f"gru{l}.", dict(I=width, Hd=m.hidden_dim, init=m.init)))
        width = m.hidden_dim
    out.append(LayerDecl("dense", "fc", "fc.", dict(I=width, O=m.hidden_dim, act="gelu", init=m.init)))
    if m.dropout > 0:
        out.append(LayerDecl("dropout", "drop", "", dict(C=m.hidden_dim, p=m.dropout, seed=cfg.seed, index=0)))
    return out


def head_args(cfg) -> dict:
    """The head reads the Dense output (N, hidden_dim); its weight memnet.init, GELU on the logits
    with memnet.logit_gelu."""
    m = cfg.memnet
    return {"H": m.hidden_dim, "prefix": "head.", "names": ("W", "b"), "init": m.init, "gelu": m.logit_gelu}
