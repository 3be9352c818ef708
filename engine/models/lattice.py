"""The 3D cellular lattice, a student of a frozen teacher's sentence embeddings (docs/lattice.md).

    python -m experiments.run lattice          # 8×8×8, the local expert, K = 8 steps

    teacher embedding t (384) → face_in: u = t·W_in + b_in (n² values, one per front-face cell) →
    lattice (engine/layers/lattice.py): s_0[front cell i] = u_i·a + b (C channels), K steps
    s_{k+1} = s_k + Δ(s_k) of the shared cell update (the local stencil expert; with more experts a
    per-cell gate mixes local, functional and distant), v_i = s_K[back cell i]·r → face_out:
    y = v·W_out + b_out (384) → the task's head (engine/layers/embed_head.py: MSE + (1 − cos))

with the sizes of the config section `lattice` (model.* sizes do not apply). Parameter names:
face_in.W (384, n²), face_in.b, lat.* (the lattice's: face coupling and each expert's cell
network), face_out.W (n², 384), face_out.b. Each expert's parameters learn at its own rate
(lattice.lr_<expert>, as a ratio to optim.lr: ParamSpec.lr_scale); the face maps at optim.lr.
With lattice.steps = 0 the back face is the front face: the face maps alone (a linear
autoencoder through n² values, trained on this loss).
"""
from __future__ import annotations

from . import LayerDecl

TEACHER_DIM = 384   # all-MiniLM-L6-v2's sentence embedding


def experts(cfg) -> tuple:
    return tuple(cfg.lattice.experts.split("+"))


def rates(cfg) -> dict:
    """Each expert's (and the gate's) learning rate as a ratio to optim.lr (ParamSpec.lr_scale)."""
    lc, lr = cfg.lattice, cfg.optim.lr
    return {name: getattr(lc, f"lr_{name}") / lr for name in ("local", "functional", "distant", "gate")}


def layers(cfg, V: int) -> list[LayerDecl]:
    lc = cfg.lattice
    F = lc.n * lc.n
    return [LayerDecl("dense", "face_in", "face_in.", dict(I=V, O=F, act="none", init="lecun")),
            LayerDecl("lattice", "lat", "lat.", dict(n=lc.n, D=lc.depth or lc.n, C=lc.channels, Hc=lc.hidden,
                                                      K=lc.steps, neighbours=lc.neighbours, experts=experts(cfg),
                                                      R=lc.links, dk=lc.attn_dim, rates=rates(cfg), seed=cfg.seed,
                                                      w2_scale=lc.update_scale)),
            LayerDecl("dense", "face_out", "face_out.", dict(I=F, O=V, act="none", init="lecun"))]


def head_args(cfg) -> dict:
    """The embedding head reads the face_out map's output (N, 384)."""
    return {"H": TEACHER_DIM}
