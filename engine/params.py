"""Parameter declarations: what a model's flat buffers, weight-decay mask, per-parameter
gradient norms, checkpoints and initialisation are built from (device code and the numpy
reference read the same declarations, so they cannot drift).

A ParamSpec names one learned tensor: its shape as seen (checkpoints, get_params), its
shape as stored on the device (e.g. the output layer's columns padded to a multiple of 8,
the padding zero and kept zero), how it is initialised, and whether weight decay applies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INITS = ("normal", "fan_in", "zeros")   # N(0, scale²); N(0, 1/shape[0]) (LeCun); zeros


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple                  # as seen: checkpoints, get_params, the reference
    stored: tuple = ()            # as stored on the device (default: shape)
    init: str = "fan_in"
    scale: float = 1.0            # for init = normal
    decay: bool = True            # weight decay applies (weights yes, biases no)

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"{self.name}: init must be one of {INITS}, got {self.init!r}")
        if not self.stored:
            object.__setattr__(self, "stored", tuple(self.shape))

    def draw(self, rng) -> np.ndarray | None:
        """The initial value in float64 (None for zeros: no draw, the generator does not move)."""
        if self.init == "zeros":
            return None
        if self.init == "normal":
            return rng.standard_normal(self.shape) * self.scale
        return rng.standard_normal(self.shape) / math.sqrt(self.shape[0])   # divided, as before: same bits


def padded(V: int) -> int:
    return -(-V // 8) * 8


def char_lm_params(V: int, E: int, H: int) -> list[ParamSpec]:
    """The hybrid character model's parameters, in buffer and draw order (docs/model.md)."""
    Vp = padded(V)
    return [ParamSpec("W_emb", (V, E), init="normal", scale=1.0),
            ParamSpec("W1", (E, H)),
            ParamSpec("b1", (H,), init="zeros", decay=False),
            ParamSpec("W2", (H, V), (H, Vp)),
            ParamSpec("b2", (V,), (Vp,), init="zeros", decay=False)]


def init_params(specs: list[ParamSpec], seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Every parameter drawn in float64 in declaration order from one generator, then cast."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        a = s.draw(rng)
        out[s.name] = np.zeros(s.shape, dtype) if a is None else a.astype(dtype)
    return out
