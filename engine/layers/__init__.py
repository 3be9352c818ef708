"""Layers: the units every model family is built from (docs/layers.md).

A layer declares what it owns and the model lays it out:
  params()          learned tensors (engine.params.ParamSpec), in the model's flat buffers
  state()           non-learned tensors (StateSpec): checkpointed unless scratch (Hebbian
                    matrix, prototypes and their usage, running statistics)
  buffers(B, S)     activations and their gradients at batch shape (B,S)
  products(B, S)    the matrix products it runs (the memory check sizes ops.gemm's scratch)
and runs on a Ctx (its views of those, see engine.model.Workspace):
  forward(c, x) -> y        backward(c, dy) -> dx (accumulating into its gradient views)
  local_update(c)           optional: Hebbian, prototype, memory writes, plasticity
  local_reads(c)            the batch-sized buffers local_update reads (for data parallelism)
  warm_start(c)             optional: data-dependent initialisation (k-means++), after forward
  telemetry(c) -> dict      optional, at logging points only (reads the device)

Every layer's kernels are in kernels/ and its numpy reference in engine/reference/layers.py (or
a module it imports: attention.py, gru.py) under the same class name; tests/test_layer_contract.py
holds every layer to both.
Letters: B batch, S sequence, N = B·S, E embedding, H hidden, V vocab, T prototypes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class StateSpec:
    name: str
    shape: tuple
    dtype: type = np.float32
    fill: float = 0.0             # initial value of every element
    checkpoint: bool = True       # False: scratch kept with the model (recomputed each use)
    init: object = field(default=None, compare=False)   # () -> array: a drawn initial value
                                                        # (a fixed random matrix); None: fill

    def initial(self, dtype=None) -> np.ndarray:
        """The initial value (the device model and the reference start from it)."""
        dtype = dtype or self.dtype
        if self.init is None:
            return np.full(self.shape, self.fill, dtype)
        return np.asarray(self.init(), dtype).reshape(self.shape)


class Layer:
    """Base: a layer with nothing to learn, keep or record. `name` is unique in the model
    (its buffers and telemetry); `prefix` is put before its parameter and state names
    ("" keeps the names checkpoints have always had for the first layers)."""
    kind = "layer"

    def __init__(self, name: str, prefix: str = ""):
        self.name, self.prefix = name, prefix

    def params(self) -> list:
        return []

    def state(self) -> list[StateSpec]:
        return []

    def buffers(self, B: int, S: int) -> dict:
        return {}

    def products(self, B: int, S: int) -> tuple[list, list]:
        """([(M, N, K, batch) of trans_b products], [(M, N, K) of trans_a products])."""
        return [], []

    def shared(self) -> dict:
        """{local name: full name} of parameters another layer declares and this one reads and
        adds its gradient to (the tied head reads the token embedding). The owner runs earlier
        in the forward pass, so this layer's gradient is written first and the owner's added."""
        return {}

    group = None   # a name for this layer's parameters together: grad_norm/<group> (a transformer block)
    variant = "cpu"   # the kernel variant of the device it runs on (engine.model sets it)

    def forward(self, c, x):
        return x

    def backward(self, c, dy):
        return dy

    def local_update(self, c):
        pass

    writes_params = False   # True: local_update also writes parameters (the memory's slots), so data
                            # parallelism sends the parameters to the replicas after the rules

    def local_reads(self, c) -> list:
        """The batch-sized buffers local_update reads (of this forward pass): data parallelism
        (engine/parallel.py) gathers their rows from every device before running the rules over
        the whole batch. [] = no local rule acts."""
        return []

    needs_warm_start = False

    def warm_start(self, c):
        pass

    def telemetry(self, c) -> dict:
        return {}


f32, i32 = np.float32, np.int32


def build(decl):
    """The device layer of a declaration (engine.models.LayerDecl)."""
    from . import bio, dense, embed, embed_head, gru, head, lattice, memory, norm, residual, transformer
    classes = {c.kind: c for c in (embed.EmbedGelu, bio.BioAssociative, head.CharHead, residual.ResidualGelu,
                                   norm.LayerNorm, norm.BatchNorm, norm.Dropout, transformer.TokPosEmbed,
                                   transformer.AttnBlock, transformer.MlpBlock, dense.Embedding, dense.Dense,
                                   memory.MemoryRead, gru.GRU, lattice.Lattice, embed_head.EmbedHead)}
    return classes[decl.kind](decl.name, prefix=decl.prefix, **decl.args)
