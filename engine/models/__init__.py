"""Model families: each declares its layers from the config (`model.family`).

A family is a function cfg, V -> [LayerDecl]: the device model (engine.model.Model) and the
numpy reference model (engine.reference.model.RefModel) are both built from that one list,
so they cannot drift. The list order is the order of the forward pass and of the flat
parameter buffer (and so of the global gradient norm's sum).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerDecl:
    kind: str                      # engine.layers kind: embed_gelu, bio, residual_gelu, char_head
    name: str                      # unique in the model: buffers, telemetry
    prefix: str = ""               # before its parameter and state names
    args: dict = field(default_factory=dict)


def _modules() -> dict:
    from . import hybrid, lattice, linear_ae, memnet, transformer
    return {"hybrid": hybrid, "transformer": transformer, "memnet": memnet, "lattice": lattice,
            "linear_ae": linear_ae}


def families() -> dict:
    return {name: m.layers for name, m in _modules().items()}


def head_args(cfg) -> dict:
    """What the family asks of the task's head: its input width H (the body's output width),
    and where it differs from the task's defaults its prefix, parameter names, bias, tying
    and initialisation (each family module's head_args(cfg))."""
    return _modules()[cfg.model.family].head_args(cfg)


def out_width(cfg) -> int:
    """The width of the family's output (the head's input)."""
    return head_args(cfg)["H"]


def layers_of(cfg, V: int) -> list[LayerDecl]:
    """The family's body, then the task's head (engine.tasks: the loss it is trained on)."""
    from ..tasks import task_of
    return families()[cfg.model.family](cfg, V) + task_of(cfg).head_layers(cfg, V)
