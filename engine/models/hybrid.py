"""The hybrid bio-inspired character model (docs/model.md):

    EmbedGelu → BioAssociative → [ResidualGelu → BioAssociative] × (num_layers − 1)

and the task's head after it (character LM: CharHead).

With model.num_layers = 1 (the default) this is the model the engine has always trained,
with the same parameter, state and telemetry names. Layer l ≥ 1 has its own fast-weight
memory, spikes and prototypes; its parameters and state are named `bio<l>.*` and its
telemetry `bio<l>/*`. One Hebbian and one prototype rate serve every layer (hebb.*, proto.*).
"""
from __future__ import annotations

from . import LayerDecl


def layers(cfg, V: int) -> list[LayerDecl]:
    m = cfg.model
    E, H, T = m.embedding_dim, m.hidden_dim, m.num_prototypes
    out = [LayerDecl("embed_gelu", "embed", "", dict(V=V, E=E, H=H, init=m.init))]
    for i in range(m.num_layers):
        prefix = f"bio{i}." if i else ""
        if i:
            out.append(LayerDecl("residual_gelu", f"res{i}", prefix, dict(H=H, init=m.init)))
        # the first layer draws its k-means++ with the run's seed, as the engine always did
        out.append(LayerDecl("bio", f"bio{i}", prefix, dict(H=H, T=T, hebb=cfg.hebb, proto=cfg.proto,
                                                         spike_threshold=m.spike_threshold,
                                                         seed=(cfg.seed + 1000003 * i) % 2**32,
                                                         tprefix=f"bio{i}/" if i else "")))
    return out


def head_args(cfg) -> dict:
    """The head reads h (N, model.hidden_dim), its weight W2 drawn by model.init."""
    return {"H": cfg.model.hidden_dim, "init": cfg.model.init}
