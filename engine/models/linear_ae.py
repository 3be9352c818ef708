"""The linear autoencoder baseline of the lattice (engine/models/lattice.py): the teacher's
embedding through n² values and back, both maps learned by the engine on the same loss.

    python -m experiments.run linear_ae

    t (384) → face: u = t·W_in + b_in (n² = lattice.n², the lattice's bottleneck) → y = u·W_out + b_out (384)

The lattice is worth something only where it beats this and PCA to n² dimensions (the closed-form
linear optimum of the MSE, logged by every run of the task: engine/tasks/embed_regression.py).
Parameter names as the lattice's face maps: face_in.W, face_in.b, face_out.W, face_out.b.
"""
from __future__ import annotations

from . import LayerDecl
from .lattice import TEACHER_DIM


def layers(cfg, V: int) -> list[LayerDecl]:
    F = cfg.lattice.n * cfg.lattice.n
    return [LayerDecl("dense", "face_in", "face_in.", dict(I=V, O=F, act="none", init="lecun")),
            LayerDecl("dense", "face_out", "face_out.", dict(I=F, O=V, act="none", init="lecun"))]


def head_args(cfg) -> dict:
    return {"H": TEACHER_DIM}
