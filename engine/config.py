"""Run configuration: typed, frozen, nested dataclasses, validated on construction.

    python -c "from engine.config import *; print(apply_overrides(Config(), ['hebb.lr=0.5']).to_json())"

All defaults live in the section classes below, one commented line per field
(units, meaning). A config is rebuilt exactly from its JSON (`to_json` /
`from_json`); dotted overrides (`hebb.lr=0.5`) are parsed by the field's
type. Every problem is a `ConfigError` with one line naming the dotted key;
an unknown key suggests the closest valid one. The maths behind the model,
Hebbian and prototype fields is in docs/model.md.
"""
from __future__ import annotations

import difflib
import json
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, get_type_hints


class ConfigError(ValueError):
    """An invalid config key or value; the message is one line naming the key."""


def _f(default, *, ge=None, gt=None, le=None, lt=None, choices=None):
    """A field with its default and the bounds `__post_init__` enforces."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt,
                                            "choices": choices})


class _Section:
    """Mixin: coerce and validate every field after construction."""
    SECTION: ClassVar[str] = ""  # dotted prefix of this section's keys ("" = root)

    def __post_init__(self):
        hints = get_type_hints(type(self))
        for f in fields(self):
            key = f"{self.SECTION}.{f.name}" if self.SECTION else f.name
            value = _check(key, hints[f.name], f.metadata, getattr(self, f.name))
            object.__setattr__(self, f.name, value)  # frozen: coerce int -> float once


@dataclass(frozen=True)
class DataConfig(_Section):
    """The text corpus and its train/validation/test split (engine/data.py)."""
    SECTION: ClassVar[str] = "data"
    path: str = ""                         # UTF-8 text file; "" = embedded default corpus (pydoc topics)
    val_fraction: float = _f(0.1, gt=0, lt=1)  # fraction of characters, from the END of the text, held out
    # fraction of characters held out for one test evaluation at the end of training: the last
    # test_fraction of the text, the validation split just before it (0 = no test split)
    test_fraction: float = _f(0.0, ge=0, lt=1)

    def __post_init__(self):
        super().__post_init__()
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"config keys 'data.val_fraction' + 'data.test_fraction' must be < 1 (the rest is "
                              f"the training split), got {self.val_fraction} + {self.test_fraction}")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Layer sizes and the spike threshold (docs/model.md, Forward)."""
    SECTION: ClassVar[str] = "model"
    embedding_dim: int = _f(128, ge=1)     # E: width of the character embedding
    hidden_dim: int = _f(384, ge=1)        # H: width of the GELU hidden layer (= W_hebb side, P rows)
    num_prototypes: int = _f(72, ge=1)     # T: number of prototype vectors P
    spike_threshold: float = 0.5           # θ: s = 1[h > θ], in units of the GELU activation
    # initialisation of W1 and W2 (engine/params.py): lecun N(0,1/fan_in) (the engine's always),
    # xavier N(0,2/(fan_in+fan_out)), kaiming N(0,2/fan_in); the embedding is N(0,1)
    init: str = _f("lecun", choices=("lecun", "xavier", "kaiming"))
    # the model family (engine/models/): character models (hybrid, transformer, memnet) or
    # sentence-embedding students (lattice, linear_ae: the task engine/tasks/embed_regression.py)
    family: str = _f("hybrid", choices=("hybrid", "transformer", "memnet", "lattice", "linear_ae"))
    # bio-associative layers (hybrid family): each after the first reads the previous one
    # through h = x + GELU(x·W + b) and has its own memory, spikes and prototypes
    num_layers: int = _f(1, ge=1)


@dataclass(frozen=True)
class HebbConfig(_Section):
    """The Hebbian wiring (docs/model.md, Hebbian wiring)."""
    SECTION: ClassVar[str] = "hebb"
    # how the Hebbian memory enters the forward pass (off / shadow: not at all)
    mode: str = _f("fast_weights", choices=("off", "shadow", "modulate", "fast_weights"))
    lr: float = _f(1.0, ge=0)              # η: Hebbian learning rate (0 = memory never written)
    # fast_weights: fraction forgotten per position (λ = 1 − decay);
    # shadow / modulate: fraction of W_hebb forgotten per training step
    decay: float = _f(0.5, ge=0, le=1)
    strength: float = 1.0                  # α: gain of h·W_hebb added to h (modulate only)
    # post-synaptic signal: s (spikes) or h (activity: the ablation without spikes)
    post: str = _f("spikes", choices=("spikes", "activity"))
    # fast_weights: the write rule. sum: A_t = λA_{t−1} + η·post_t k_tᵀ; delta (Schlag et al.
    # 2021): A_t = λA_{t−1} + η(post_t − A_{t−1}k_t)k_tᵀ, a write replaces what k retrieves
    rule: str = _f("sum", choices=("sum", "delta"))
    # h̃ = LayerNorm(h + memory) (γ, β learned), or none
    norm: str = _f("none", choices=("none", "layernorm"))


@dataclass(frozen=True)
class ProtoConfig(_Section):
    """The prototype wiring and its online k-means rule (docs/model.md, Prototype wiring)."""
    SECTION: ClassVar[str] = "proto"
    # shadow: P updated, never read; feature: z = h̃ + β·P_k; token: z = h̃ + U_k with U a
    # learned embedding of the assigned prototype's index; key: the fast-weight memory is
    # addressed by the assigned prototype (k = P_k/|P_k|, assigned on h), needs fast_weights
    mode: str = _f("feature", choices=("off", "shadow", "feature", "token", "key"))
    lr: float = _f(0.05, ge=0, le=1)       # fraction of the way P_t moves to its members' mean, per step
    strength: float = 1.0                  # β: gain of the assigned prototype added to h̃ (feature only)
    # assignment score; dot is the seed's (it favours large-norm prototypes)
    similarity: str = _f("cosine", choices=("cosine", "dot"))
    usage_decay: float = _f(0.99, ge=0, lt=1)  # ρ: per-step EMA factor of each assignment share
    reseed_threshold: float = _f(0.1, ge=0)    # re-seed when usage < this × 1/T (0 = never)
    # initial P: k-means++ on the first batch's h̃ (docs/model.md), or random
    init: str = _f("kmeans++", choices=("kmeans++", "random"))


@dataclass(frozen=True)
class OptimConfig(_Section):
    """The optimiser (AdamW or SGD with momentum), clipping and the learning-rate schedule
    (docs/model.md, Optimiser; engine/optim.py)."""
    SECTION: ClassVar[str] = "optim"
    lr: float = _f(3e-3, gt=0)             # peak Adam learning rate (reached at the end of warm-up)
    beta1: float = _f(0.9, ge=0, lt=1)     # Adam first-moment EMA factor
    beta2: float = _f(0.99, ge=0, lt=1)    # Adam second-moment EMA factor
    eps: float = _f(1e-8, gt=0)            # Adam denominator epsilon (added to sqrt(v̂))
    weight_decay: float = _f(0.01, ge=0)   # decoupled (AdamW) decay per unit lr; W_emb, W1, W2 only
    clip_norm: float = _f(1.0, ge=0)       # max global L2 norm of the gradient (0 = off)
    clip_value: float = _f(0.0, ge=0)      # max |g| per element, applied before clip_norm (0 = off)
    warmup_steps: int = _f(100, ge=0)      # steps of linear warm-up from lr/warmup_steps (0 = none)
    # lr after warm-up: cosine decay to min_lr_ratio·lr at train.steps, or constant
    schedule: str = _f("cosine", choices=("cosine", "constant"))
    min_lr_ratio: float = _f(0.1, ge=0, le=1)  # final lr as a fraction of optim.lr (cosine only)
    name: str = _f("adamw", choices=("adamw", "sgd"))  # adamw (decoupled decay) or sgd (momentum, L2 decay)
    momentum: float = _f(0.9, ge=0, lt=1)  # SGD only: velocity v ← momentum·v + g


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Batch shape, run length and the cadence of logging, evaluation and checkpoints."""
    SECTION: ClassVar[str] = "train"
    batch_size: int = _f(64, ge=1)         # B: sequences per batch
    # S: characters per sequence (>= 2 so the memory has a past); 1 for the sentence-embedding
    # families (lattice, linear_ae: one sentence per row)
    seq_len: int = _f(64, ge=1)
    steps: int = _f(2000, ge=1)            # optimiser steps in the run
    eval_every: int = _f(200, ge=1)        # steps between validation passes (may exceed train.steps)
    log_every: int = _f(10, ge=1)          # steps between telemetry read-backs from the device
    checkpoint_every: int = _f(500, ge=0)  # steps between checkpoints (0 = only at the end)
    eval_batches: int = _f(0, ge=0)        # max validation batches per evaluation (0 = whole split)
    # early stopping: stop once the task's objective (val_loss) has not improved on its best for
    # this many consecutive evaluations; the best evaluation's checkpoint is kept (0 = off)
    patience: int = _f(0, ge=0)
    profile: bool = True                   # per-kernel device times from OpenCL profiling events


@dataclass(frozen=True)
class TransformerConfig(_Section):
    """The transformer family (engine/models/transformer.py; nanoGPT's GPT): token and learned
    positional embeddings, n_layer pre-LayerNorm blocks (causal self-attention, MLP of 4·n_embd
    with GELU), a final LayerNorm and the task's head. model.* sizes do not apply to it."""
    SECTION: ClassVar[str] = "transformer"
    n_layer: int = _f(4, ge=1)             # blocks
    n_head: int = _f(4, ge=1)              # attention heads per block (head width n_embd / n_head)
    n_embd: int = _f(128, ge=1)            # C: width of the residual stream
    block_size: int = _f(64, ge=1)         # rows of the positional embedding: the longest train.seq_len
    dropout: float = _f(0.0, ge=0, lt=1)   # on the embeddings, attention probabilities and residual branches
    bias: bool = False                     # biases in the linear layers and LayerNorm β (nanoGPT's bias)
    tie_weights: bool = True               # the head's weight is the token embedding (logits = x·wteᵀ)
    # local rules inside the blocks (bio layers, engine/layers/bio.py, width n_embd): "hebb" adds the
    # fast-weight memory as a residual branch after each block's attention (cfg.hebb, its values
    # spikes or activity as hebb.post), "proto" adds prototype features to the residual stream
    # after each block (cfg.proto); "none" is the plain transformer
    hybrid: str = _f("none", choices=("none", "hebb", "proto", "hebb+proto"))
    # how a hybrid layer meets the stream: "stream" reads the residual stream x itself and returns
    # its output in its place (spikes at model.spike_threshold of x's scale); "prenorm" reads LN(x)
    # through its own LayerNorm and adds its term to x, as a pre-LayerNorm block's branch
    branch: str = _f("stream", choices=("stream", "prenorm"))

    def __post_init__(self):
        super().__post_init__()
        if self.n_embd % self.n_head:
            raise ConfigError(f"config key 'transformer.n_head' must divide transformer.n_embd="
                              f"{self.n_embd}, got {self.n_head}")


@dataclass(frozen=True)
class MemnetConfig(_Section):
    """The memory network (engine/models/memnet.py; the DRLMemNet design): an embedding, a
    query read from a key-value memory by softmax attention, a GRU controller over the read
    vectors, Linear + GELU, dropout, the head (GELU on the logits in the design). The memory's
    keys and values are Adam parameters and are also written by a local rule after each step.
    model.* sizes do not apply to it."""
    SECTION: ClassVar[str] = "memnet"
    embedding_dim: int = _f(128, ge=1)      # E: the token embedding (N(0, 0.1²) init)
    memory_size: int = _f(512, ge=1)        # slots of the key-value memory
    memory_dim: int = _f(128, ge=1)         # M: width of a key, a value, the query and the read
    hidden_dim: int = _f(256, ge=1)         # the GRU's width and the Linear + GELU after it
    gru_layers: int = _f(2, ge=1)           # stacked GRU layers
    dropout: float = _f(0.3, ge=0, lt=1)    # after the Linear + GELU (training only)
    write_strength: float = _f(0.1, ge=0, le=1)   # w: K ← normalise((1−w)·K + w·normalise(new keys))
    # "mean": the design's write (the batch averaged into one key and one value, every slot
    # pulled towards them: it collapses the slots); "slot": each addressed slot towards the mean
    # of the rows that addressed it; "none": no local rule (gradient only)
    write_mode: str = _f("mean", choices=("mean", "slot", "none"))
    memory: bool = True                     # False: the read is replaced by the query (the GRU alone)
    logit_gelu: bool = True                 # GELU on the logits before the softmax, as the design
    init: str = _f("kaiming", choices=("kaiming", "lecun", "xavier"))   # the memory and the linear layers


@dataclass(frozen=True)
class LatticeConfig(_Section):
    """The 3D cellular lattice (engine/models/lattice.py, docs/lattice.md), trained as a student
    on the sentence embeddings of a frozen teacher (all-MiniLM-L6-v2, engine/teacher.py): a linear
    map of the 384-d embedding onto the n×n front face, K steps of the shared cell update, the
    n×n back face read, a linear map back to 384-d. Also the sizes of the linear autoencoder
    baseline (model.family=linear_ae: face n² wide) and the loss of both."""
    SECTION: ClassVar[str] = "lattice"
    n: int = _f(8, ge=1)                   # face side: n×n cells per layer (the bottleneck is n² values)
    depth: int = _f(0, ge=0)               # D: layers from the front face to the back (0 = n: a cube)
    channels: int = _f(8, ge=1)            # C: state values per cell
    hidden: int = _f(32, ge=1)             # Hc: the cell network's hidden width
    steps: int = _f(8, ge=0)               # K: cell updates (0 = the face maps alone: the back face is the front)
    neighbours: int = _f(6, choices=(6, 26))   # the local stencil: face neighbours, or the 3×3×3 cube
    # the connection experts: "local" (the stencil), "functional" (attention over the cells of
    # a layer), "distant" (a fixed sparse set of long-range links); with more than one, a per-cell
    # gate mixes them
    experts: str = _f("local", choices=("local", "local+distant", "local+functional", "local+functional+distant"))
    links: int = _f(4, ge=1)               # R: long-range links per cell (distant expert)
    attn_dim: int = _f(8, ge=1)            # dk: query/key width of the functional expert
    # each expert's (and the gate's) Adam learning rate, absolute at the schedule's peak (its
    # ratio to optim.lr scales the schedule); the face maps learn at optim.lr
    lr_local: float = _f(0.003, ge=0)
    lr_functional: float = _f(0.003, ge=0)
    lr_distant: float = _f(0.003, ge=0)
    lr_gate: float = _f(0.003, ge=0)
    update_scale: float = _f(0.1, gt=0)    # the cell network's output weights start N(0, (scale/√Hc)²)
    loss_mse: float = _f(1.0, ge=0)        # weight of the reconstruction MSE (mean over the 384 dimensions)
    loss_cos: float = _f(0.5, ge=0)        # weight of 1 − cosine(student, teacher)
    loss_div: float = _f(0.0, ge=0)        # weight of the batch diversity term (mean squared cosine between rows)
    split_seed: int = _f(0, ge=0, lt=2**32)   # the sentence split's permutation (fixed across run seeds)
    cache_mb: int = _f(256, ge=0)          # cap of the on-disk teacher embedding cache (0 = do not store)

    def __post_init__(self):
        super().__post_init__()
        if self.loss_mse + self.loss_cos == 0:
            raise ConfigError("config keys 'lattice.loss_mse' and 'lattice.loss_cos' are both 0: nothing to learn")


EMBED_FAMILIES = ("lattice", "linear_ae")   # trained on sentence embeddings (one sentence per row)


@dataclass(frozen=True)
class Config(_Section):
    """The whole run. `Config()` is the default run; see `from_dict`, `apply_overrides`."""
    seed: int = _f(0, ge=0, lt=2**32)      # seeds init, batches, re-seeding (uint32: enters the hash)
    # OpenCL device: "" = PYOPENCL_CTX env, else the first GPU, else a CPU;
    # "P:D" = platform and device indices; anything else = a substring of the device name;
    # "all" (every GPU, else every device) or a comma-separated list: data parallel (engine/parallel.py)
    device: str = ""
    # launch sizes of the GPU kernel variant (engine/tune.py): "auto" = the per-device cache, a
    # search of a few seconds on a miss; "force" = search again; "off" = the built-in defaults
    tune: str = _f("auto", choices=("auto", "off", "force"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    hebb: HebbConfig = field(default_factory=HebbConfig)
    proto: ProtoConfig = field(default_factory=ProtoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    memnet: MemnetConfig = field(default_factory=MemnetConfig)
    lattice: LatticeConfig = field(default_factory=LatticeConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.model.family in EMBED_FAMILIES and self.train.seq_len != 1:
            raise ConfigError(f"config key 'train.seq_len' must be 1 for model.family={self.model.family!r} "
                              f"(one sentence embedding per row), got {self.train.seq_len}")
        if self.model.family not in EMBED_FAMILIES and self.train.seq_len < 2:
            raise ConfigError(f"config key 'train.seq_len' must be >= 2 for model.family={self.model.family!r} "
                              f"(the memory needs a past), got {self.train.seq_len}")
        if self.model.family == "transformer" and self.train.seq_len > self.transformer.block_size:
            raise ConfigError(f"config key 'train.seq_len' must be <= transformer.block_size="
                              f"{self.transformer.block_size} (the positional embedding's rows), "
                              f"got {self.train.seq_len}")
        if self.proto.mode == "key" and self.hebb.mode != "fast_weights":
            raise ConfigError(f"proto.mode='key' addresses the fast-weight memory: it needs "
                              f"hebb.mode='fast_weights', got hebb.mode={self.hebb.mode!r}")

    @classmethod
    def from_dict(cls, d: Mapping) -> Config:
        """Build from a nested dict (e.g. parsed JSON); missing keys keep their defaults."""
        return _build(cls, d, "")

    def to_dict(self) -> dict:
        """Nested dict of plain JSON types."""
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_json(cls, s: str) -> Config:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config JSON is invalid: {exc}") from None
        return cls.from_dict(d)

    def flat(self) -> dict[str, Any]:
        """{"seed": 0, ..., "optim.lr": 0.003, ...}: dotted keys, e.g. for MLflow params."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if is_dataclass(value):
                out.update({f"{f.name}.{g.name}": getattr(value, g.name) for g in fields(value)})
            else:
                out[f.name] = value
        return out


# ---- validation ----------------------------------------------------------------------

_TYPE_NAMES = {int: "an int", float: "a float", bool: "a bool", str: "a string"}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _check(key: str, typ: type, meta: Mapping, value: Any) -> Any:
    """`value` coerced to `typ` (int -> float, numpy scalars -> Python) or ConfigError."""
    if is_dataclass(typ):
        if not isinstance(value, typ):
            raise ConfigError(f"config key {key!r} expects a {typ.__name__} section, got {value!r}")
        return value
    value = _coerce(key, typ, value)
    if typ is float and not math.isfinite(value):
        raise ConfigError(f"config key {key!r} must be finite, got {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(map(str, choices))}; got {value!r}")
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    lo_ok = (ge is None or value >= ge) and (gt is None or value > gt)
    hi_ok = (le is None or value <= le) and (lt is None or value < lt)
    if not (lo_ok and hi_ok):
        raise ConfigError(f"config key {key!r} must be {_describe(ge, gt, le, lt)}, got {value!r}")
    return value


def _coerce(key: str, typ: type, value: Any) -> Any:
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, numbers.Integral) and not isinstance(value, bool),
          float: isinstance(value, numbers.Real) and not isinstance(value, bool),
          str: isinstance(value, str)}[typ]
    if not ok:
        raise ConfigError(f"config key {key!r} expects {_TYPE_NAMES[typ]}, got {value!r}")
    return typ(value)


def _describe(ge, gt, le, lt) -> str:
    lo = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    hi = f"{le}]" if le is not None else f"{lt})" if lt is not None else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return f">= {ge}" if ge is not None else f"> {gt}"
    return f"<= {le}" if le is not None else f"< {lt}"


def _build(cls: type, d: Any, prefix: str):
    if not isinstance(d, Mapping):
        where = f"config section {prefix[:-1]!r}" if prefix else "config"
        raise ConfigError(f"{where} expects a dict, got {d!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(_unknown(key))
        kwargs[k] = _build(hints[k], v, key + ".") if is_dataclass(hints[k]) else v
    return cls(**kwargs)


def dotted_keys() -> list[str]:
    """Every settable key, in declaration order: seed, device, data.path, ..."""
    return list(Config().flat())


def _unknown(key: str) -> str:
    keys = dotted_keys() + [k for k, t in get_type_hints(Config).items() if is_dataclass(t)]
    close = difflib.get_close_matches(str(key), keys, n=1, cutoff=0.6)
    if not close:  # "lr" is far from "optim.lr" by ratio: suggest by the last component
        close = [k for k in keys if k.rsplit(".", 1)[-1] == str(key).rsplit(".", 1)[-1]]
    hint = f" (did you mean {' or '.join(repr(k) for k in close)}?)" if close else ""
    return f"unknown config key {key!r}{hint}"


def _field_type(key: str) -> type:
    """The type of dotted `key`, or ConfigError if it is unknown or names a section."""
    hints, typ = get_type_hints(Config), None
    parts = key.split(".")
    for i, part in enumerate(parts):
        if hints is None or part not in hints:
            raise ConfigError(_unknown(key))
        typ = hints[part]
        hints = get_type_hints(typ) if is_dataclass(typ) and i + 1 < len(parts) else None
    if is_dataclass(typ):
        example = f"{key}.{fields(typ)[0].name}"
        raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. {example!r}")
    return typ


# ---- overrides -----------------------------------------------------------------------

def parse_override(text: str) -> tuple[str, str]:
    """'optim.lr=3e-4' -> ('optim.lr', '3e-4'); the value is kept verbatim (split at the first '=')."""
    key, sep, value = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. 'optim.lr=3e-4')")
    return key, value


def _parse_value(key: str, typ: type, text: str) -> Any:
    if typ is str:
        return text
    s = text.strip()
    if typ is bool and s.lower() in _BOOLS:
        return _BOOLS[s.lower()]
    if typ is int and re.fullmatch(r"[+-]?\d+", s):
        return int(s)
    if typ is float:
        try:
            return float(s)
        except ValueError:
            pass
    raise ConfigError(f"config key {key!r} expects {_TYPE_NAMES[typ]}, got {text!r}")


def with_overrides(cfg: Config, updates: Mapping[str, Any]) -> Config:
    """A new config with {dotted key: typed value} applied, validated like `from_dict`."""
    d = cfg.to_dict()
    for key, value in updates.items():
        _field_type(key)
        *sections, name = key.split(".")
        target = d
        for s in sections:
            target = target[s]
        target[name] = value
    return Config.from_dict(d)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A new config with ["hebb.lr=0.5", "train.steps=10", ...] applied in order (the last wins)."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}")
    updates = {}
    for text in overrides:
        key, raw = parse_override(text)
        updates[key] = _parse_value(key, _field_type(key), raw)
    return with_overrides(cfg, updates)
