"""Named experiments: each is the `hybrid` default plus the overrides its name says.

    python -m experiments.run --list

Adding one is a few lines: a name, a one-line description, the dotted
overrides that differ from `hybrid` (engine/config.py holds every default).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from engine.config import Config, with_overrides


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    overrides: dict = field(default_factory=dict)

    def config(self, extra: dict | None = None) -> Config:
        """The resolved config: defaults, then this experiment, then `extra`."""
        return with_overrides(with_overrides(Config(), self.overrides), extra or {})


# The seed design: Hebbian matrix and prototypes learned but never read, raw
# dot-product assignment, no Hebbian decay; the seed's sizes are the defaults.
_SEED = {"hebb.mode": "shadow", "proto.mode": "shadow", "proto.similarity": "dot", "hebb.decay": 0.0}

# nanoGPT's train_shakespeare_char with its README's CPU overrides (block 64, batch 12, 4 layers, 4 heads,
# 128 wide, 2000 iterations, lr decay over 2000, dropout 0); lr, warm-up, min lr, β2, decay, clip as there
_MEMNET = {"model.family": "memnet", "train.batch_size": 16, "train.seq_len": 100, "optim.lr": 0.01,
           "data.val_fraction": 0.1, "data.test_fraction": 0.1, "train.patience": 3}
_ATTN = {"model.family": "transformer", "transformer.n_layer": 4, "transformer.n_head": 4, "transformer.n_embd": 128,
         "transformer.block_size": 64, "transformer.dropout": 0.0, "transformer.bias": False,
         "transformer.tie_weights": True, "train.batch_size": 12, "train.seq_len": 64, "train.steps": 2000,
         "train.eval_every": 200, "optim.lr": 1e-3, "optim.warmup_steps": 100, "optim.schedule": "cosine",
         "optim.min_lr_ratio": 0.1, "optim.beta1": 0.9, "optim.beta2": 0.99, "optim.weight_decay": 0.1,
         "optim.clip_norm": 1.0}

# the lattice (issue 15): a student of all-MiniLM-L6-v2's sentence embeddings, 80/10/10 split of
# the sentences (the same split for every seed: lattice.split_seed), batch 32 sentences, 2000 steps
_LATTICE = {"model.family": "lattice", "train.seq_len": 1, "train.batch_size": 32, "train.steps": 2000,
            "train.eval_every": 200, "train.log_every": 20, "data.val_fraction": 0.1, "data.test_fraction": 0.1,
            "hebb.mode": "off", "proto.mode": "off", "optim.lr": 3e-3, "optim.weight_decay": 0.0}

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in [
    Experiment("hybrid", "the default: fast-weight Hebbian memory + prototype features on its state"),
    Experiment("seed", "the seed design: Hebbian and prototype rules in shadow (updated, never read)", _SEED),
    Experiment("ablation_no_hebb", "hybrid without the Hebbian memory (prototypes on h)", {"hebb.mode": "off"}),
    Experiment("ablation_no_proto", "hybrid without prototypes", {"proto.mode": "off"}),
    Experiment("ablation_no_spikes", "hybrid with the hidden activity h as post-synaptic signal instead of spikes",
               {"hebb.post": "activity"}),
    Experiment("gradient_only", "no local rules at all: embedding, GELU layer and output trained by Adam",
               {"hebb.mode": "off", "proto.mode": "off"}),
    Experiment("control_modulate", "negative control: persistent Hebbian modulation h + a·h·W_hebb (no context)",
               {"hebb.mode": "modulate", "hebb.lr": 0.1, "hebb.decay": 0.01}),
    # the composable layers (issue 11): stacks and the new wirings, each against hybrid
    Experiment("stack2", "two bio-associative layers, each with its own memory, spikes and prototypes",
               {"model.num_layers": 2}),
    Experiment("stack3", "three bio-associative layers", {"model.num_layers": 3}),
    Experiment("stack2_no_hebb", "stack2 without the Hebbian memory in either layer",
               {"model.num_layers": 2, "hebb.mode": "off"}),
    Experiment("stack2_no_proto", "stack2 without prototypes in either layer",
               {"model.num_layers": 2, "proto.mode": "off"}),
    Experiment("hebb_layernorm", "hybrid with h̃ = LayerNorm(h + A·k)", {"hebb.norm": "layernorm"}),
    Experiment("hebb_delta", "hybrid with the delta rule: A_t = λA + η(post − A·k)kᵀ (Schlag et al. 2021)",
               {"hebb.rule": "delta"}),
    Experiment("proto_token", "hybrid with the assigned prototype's index as a learned embedding: z = h̃ + U_k",
               {"proto.mode": "token"}),
    Experiment("proto_key", "hybrid with the memory addressed by the assigned prototype (k = P_k/|P_k|)",
               {"proto.mode": "key"}),
    # the transformer family (issue 13): nanoGPT's CPU "baby" Shakespeare configuration and the
    # hybrids with the local rules inside its blocks; the bio models at the same schedule
    Experiment("attention_baseline", "nanoGPT's baby GPT: 4 layers, 4 heads, 128 wide, block 64, batch 12, "
               "2000 iterations, AdamW 1e-3 (100 warm-up, cosine to 1e-4), wd 0.1", _ATTN),
    Experiment("transformer_hebb", "attention_baseline + the fast-weight Hebbian memory (spikes as values) as a "
               "residual branch after each block's attention", {**_ATTN, "transformer.hybrid": "hebb"}),
    Experiment("transformer_hebb_activity", "transformer_hebb with the activity x as the memory's values "
               "instead of spikes", {**_ATTN, "transformer.hybrid": "hebb", "hebb.post": "activity"}),
    Experiment("transformer_proto", "attention_baseline + prototype features on the residual stream after "
               "each block", {**_ATTN, "transformer.hybrid": "proto"}),
    Experiment("transformer_hebb_proto", "attention_baseline + both: the Hebbian branch and the prototype "
               "features in every block", {**_ATTN, "transformer.hybrid": "hebb+proto"}),
    # η = 0.2 for the pre-normalised memory: at 300 steps on the default corpus (seed 0) η = 1
    # gave 2.804, 0.2 gave 2.151, 0.02 gave 2.161 (attention_baseline 2.182, transformer_hebb 2.161)
    Experiment("transformer_hebb_prenorm", "transformer_hebb with the memory reading LN(x) through its own "
               "LayerNorm and adding m to x (transformer.branch=prenorm, η = 0.2): spikes of a unit-scale row",
               {**_ATTN, "transformer.hybrid": "hebb", "transformer.branch": "prenorm", "hebb.lr": 0.2}),
    Experiment("transformer_proto_prenorm", "transformer_proto with the prototypes assigned on LN(x) and β·P_a "
               "added to x (transformer.branch=prenorm)",
               {**_ATTN, "transformer.hybrid": "proto", "transformer.branch": "prenorm"}),
    Experiment("transformer_hebb_proto_prenorm", "transformer_hebb_proto with both branches through their own "
               "LayerNorms (transformer.branch=prenorm, η = 0.2)",
               {**_ATTN, "transformer.hybrid": "hebb+proto", "transformer.branch": "prenorm", "hebb.lr": 0.2}),
    Experiment("hybrid_b12", "the 1-layer bio model (hybrid) at attention_baseline's schedule",
               {k: v for k, v in _ATTN.items() if not k.startswith(("model.family", "transformer."))}),
    Experiment("stack3_b12", "the best stacked bio model (stack3) at attention_baseline's schedule",
               {**{k: v for k, v in _ATTN.items() if not k.startswith(("model.family", "transformer."))},
                "model.num_layers": 3}),
    # the memory network (issue 14): the DRLMemNet design's sizes and training (lr 0.01, batch 16,
    # length 100), its write rules and ablations
    Experiment("memnet", "the DRLMemNet design, faithful: a GRU 2 × 256 reading a 512-slot key-value memory, "
               "the mean write (every slot towards the batch's mean), GELU on the logits", _MEMNET),
    Experiment("memnet_slot_write", "memnet with the write on the addressed (arg-max) slots only",
               {**_MEMNET, "memnet.write_mode": "slot"}),
    Experiment("memnet_no_write", "memnet without the local rule: the memory by gradient only",
               {**_MEMNET, "memnet.write_mode": "none"}),
    Experiment("memnet_no_memory", "memnet with the read replaced by the query: the GRU alone",
               {**_MEMNET, "memnet.memory": False}),
    Experiment("lattice", "the 3D cellular lattice 8×8×8 (8 channels a cell), 8 steps of the local stencil "
               "expert, student of all-MiniLM-L6-v2's sentence embeddings through its 64-cell faces", _LATTICE),
    Experiment("lattice_moe", "lattice with all three connection experts (local stencil, functional attention over "
               "a layer's cells, 4 distant links a cell) mixed by a per-cell gate, each at its own rate",
               {**_LATTICE, "lattice.experts": "local+functional+distant"}),
    Experiment("lattice_no_steps", "lattice with K = 0: the face maps alone (the back face is the front face)",
               {**_LATTICE, "lattice.steps": 0}),
    Experiment("lattice_37", "the large setting: 37×37×37 cells, 37 steps (the front face reaches the back), "
               "faces of 1369 ≥ 384 values", {**_LATTICE, "lattice.n": 37, "lattice.steps": 37,
                                               "train.batch_size": 4, "train.steps": 100, "train.eval_every": 50,
                                               "train.log_every": 5, "train.checkpoint_every": 50}),
    Experiment("linear_ae", "the linear autoencoder baseline: 384 → 64 → 384, both maps learned on the lattice's loss",
               {**_LATTICE, "model.family": "linear_ae"}),
    Experiment("lattice_smoke", "lattice at tiny sizes for tests: 4×4×4, 4 channels, 4 steps, 30 steps",
               {**_LATTICE, "lattice.n": 4, "lattice.channels": 4, "lattice.hidden": 8, "lattice.steps": 4,
                "train.batch_size": 8, "train.steps": 30, "train.eval_every": 10, "train.log_every": 5,
                "train.checkpoint_every": 10, "optim.warmup_steps": 5}),
    Experiment("smoke", "hybrid at tiny sizes for tests: finishes in seconds",
               {"model.embedding_dim": 16, "model.hidden_dim": 32, "model.num_prototypes": 8,
                "train.batch_size": 8, "train.seq_len": 16, "train.steps": 30, "train.eval_every": 10,
                "train.log_every": 5, "train.checkpoint_every": 10, "train.eval_batches": 2,
                "optim.warmup_steps": 5}),
]}


class UnknownExperiment(ValueError):
    pass


def did_you_mean(name: str, choices) -> str:
    """' (did you mean 'a' or 'b'?)' for the closest choices, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def get(name: str) -> Experiment:
    if name in EXPERIMENTS:
        return EXPERIMENTS[name]
    raise UnknownExperiment(f"unknown experiment {name!r}{did_you_mean(name, EXPERIMENTS)}; see --list")
