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

# N(0, scale²); LeCun N(0, 1/fan_in); Glorot/Xavier N(0, 2/(fan_in + fan_out)); He/Kaiming N(0, 2/fan_in);
# zeros; ones; U(−scale, scale) (PyTorch's nn.GRU/nn.LSTM: scale = 1/√hidden for weights and biases).
# fan_in = shape[0], fan_out = shape[1] (weights are stored (in, out): y = x·W).
INITS = ("normal", "lecun", "xavier", "kaiming", "zeros", "ones", "uniform")
WEIGHT_INITS = ("lecun", "xavier", "kaiming")   # what model.init may choose for the linear layers


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple                  # as seen: checkpoints, get_params, the reference
    stored: tuple = ()            # as stored on the device (default: shape)
    init: str = "lecun"
    scale: float = 1.0            # for init = normal (std) and uniform (half-width)
    decay: bool = True            # weight decay applies (weights yes, biases no)
    lr_scale: float = 1.0         # this tensor's learning rate = lr_scale × the optimiser's (a lattice
                                  # expert's own rate); the optimiser's per-chunk lr mask

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"{self.name}: init must be one of {INITS}, got {self.init!r}")
        if not self.stored:
            object.__setattr__(self, "stored", tuple(self.shape))

    def draw(self, rng) -> np.ndarray | None:
        """The initial value in float64 (None for zeros; zeros and ones do not move the generator)."""
        if self.init == "zeros":
            return None
        if self.init == "ones":
            return np.ones(self.shape)
        if self.init == "uniform":
            return rng.uniform(-self.scale, self.scale, self.shape)
        z = rng.standard_normal(self.shape)
        fan_in, fan_out = self.shape[0], (self.shape[1] if len(self.shape) > 1 else 1)
        if self.init == "normal":
            return z * self.scale
        if self.init == "xavier":
            return z * math.sqrt(2.0 / (fan_in + fan_out))
        if self.init == "kaiming":
            return z * math.sqrt(2.0 / fan_in)
        return z / math.sqrt(fan_in)   # lecun: divided, as the engine always did (the same bits)


def padded(V: int) -> int:
    return -(-V // 8) * 8


def char_lm_params(V: int, E: int, H: int, init: str = "lecun") -> list[ParamSpec]:
    """The hybrid character model's parameters, in buffer and draw order (docs/model.md);
    `init` (model.init) for the two linear layers, the embedding N(0, 1)."""
    Vp = padded(V)
    return [ParamSpec("W_emb", (V, E), init="normal", scale=1.0),
            ParamSpec("W1", (E, H), init=init),
            ParamSpec("b1", (H,), init="zeros", decay=False),
            ParamSpec("W2", (H, V), (H, Vp), init=init),
            ParamSpec("b2", (V,), (Vp,), init="zeros", decay=False)]


def init_params(specs: list[ParamSpec], seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Every parameter drawn in float64 in declaration order from one generator, then cast."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        a = s.draw(rng)
        out[s.name] = np.zeros(s.shape, dtype) if a is None else a.astype(dtype)
    return out
