"""Search spaces: which config keys a sweep varies, over which ranges.

    python -m sweeps.run --list

A space names its base experiment (whose defaults are enqueued as the first
trial, so every study is compared against them) and a list of parameters.
Adding a space is a few lines.
"""
from __future__ import annotations

from dataclasses import dataclass

from experiments import presets


@dataclass(frozen=True)
class LogUniform:
    key: str          # dotted config key
    low: float
    high: float
    why: str          # what the ends of the range mean

    def suggest(self, trial):
        return trial.suggest_float(self.key, self.low, self.high, log=True)


@dataclass(frozen=True)
class IntLogUniform:
    key: str
    low: int
    high: int
    why: str

    def suggest(self, trial):
        return trial.suggest_int(self.key, self.low, self.high, log=True)


@dataclass(frozen=True)
class Space:
    name: str
    description: str
    base: str                     # named experiment the trials start from
    params: tuple
    objective: str = ""           # the metric trials are scored on ("" = the task's: val_loss)

    def suggest(self, trial) -> dict:
        return {p.key: p.suggest(trial) for p in self.params}

    def defaults(self) -> dict:
        """The base experiment's values of the searched keys (the first trial)."""
        flat = presets.get(self.base).config().flat()
        return {p.key: flat[p.key] for p in self.params}


SPACES = {s.name: s for s in [
    Space("lr_balance", "balance of the Adam, Hebbian and prototype learning rates on `hybrid`", "hybrid", (
        LogUniform("optim.lr", 1e-4, 3e-2,
                   "1e-4: Adam barely moves in a short run; 3e-2: at the edge of divergence for this model"),
        LogUniform("hebb.lr", 1e-3, 10.0,
                   "η = 1e-3: the fast-weight term is ~1e-3 of h (the memory barely acts); "
                   "η = 10: it is several times larger than h (the memory dominates the state)"),
        LogUniform("proto.lr", 1e-3, 1.0,
                   "1e-3: prototypes stay near their k-means++ start; 1: each step moves a prototype "
                   "all the way to its members' mean (the largest step the rule allows)"),
    )),
    # the ends measured on the default corpus, 300 steps (--set train.steps=300), seed 0, one rate
    # moved at a time from the base's 1e-3 / 1 / 0.05 (val 2.858); transformer_hebb and
    # transformer_proto alone in brackets (seeds 0 and 1; attention_baseline: 2.182, 2.186)
    Space("transformer_balance", "balance of the Adam, Hebbian and prototype learning rates on "
          "`transformer_hebb_proto` (the local rules inside every block of nanoGPT's baby GPT)",
          "transformer_hebb_proto", (
              LogUniform("optim.lr", 1e-4, 3e-2,
                         "1e-4: Adam barely moves in a short run (val 2.955 at 300 steps); 3e-2: attention "
                         "collapses onto one key (block 0's entropy 0.02 nats) and val is 3.016"),
              LogUniform("hebb.lr", 1e-3, 10.0,
                         "η = 1e-3: the memory branch is ~1e-3 of its size at η = 1 (val 2.521; "
                         "transformer_hebb 2.182, 2.186: the baseline's to 1e-4); η = 10: the memory "
                         "dominates the residual stream (val 2.955; transformer_hebb 2.690, 2.719)"),
              LogUniform("proto.lr", 1e-3, 1.0,
                         "1e-3: prototypes stay near their k-means++ start (val 2.442; transformer_proto "
                         "2.332, 2.330); 1: each step moves a prototype to its members' mean, the rule's "
                         "largest step (val 2.504; transformer_proto 2.389, 2.411)"),
          )),
    # the baseline tuned on the same budget as the hybrids it is compared with (same measurement)
    Space("attention_lr", "the Adam learning rate of `attention_baseline` (it has no local rules)",
          "attention_baseline", (
              LogUniform("optim.lr", 1e-4, 3e-2,
                         "1e-4: Adam barely moves in a short run (val 2.675 at 300 steps, 2.182 at the "
                         "base's 1e-3); 3e-2: attention collapses onto one key (block 0's entropy 0.01 "
                         "nats) and val is 2.614"),
          )),
    Space("memnet_balance", "the Adam rate against the memory's local write strength and its size on `memnet`",
          "memnet", (
              LogUniform("optim.lr", 1e-4, 3e-2, "a decade below the design's 0.01 to three times it (the ends "
                                                 "not yet measured on memnet)"),
              LogUniform("memnet.write_strength", 1e-3, 1.0,
                         "1e-3: the write barely moves a slot (a thousand steps to go the way); 1: each step "
                         "overwrites the slots with the new normalised mean"),
              IntLogUniform("memnet.memory_size", 16, 1024, "16: fewer slots than characters; 1024: twice the "
                                                           "design's 512"),
          )),
    Space("lattice_rates", "each connection expert's own Adam rate, the gate's, and the number of cell updates K "
          "on `lattice_moe` (the face maps stay at optim.lr 3e-3)",
          "lattice_moe", (
              LogUniform("lattice.lr_local", 3e-4, 3e-2, "a decade below the face maps' 3e-3 to a decade above; "
                                                        "measured on `lattice` at 300 steps (seed 0): 3e-4 gave "
                                                        "val cos 0.405 (the mean vector's: nothing learned), "
                                                        "3e-3 0.640, 3e-2 0.824"),
              LogUniform("lattice.lr_functional", 3e-4, 3e-2, "as lr_local, for the attention over a layer's cells"),
              LogUniform("lattice.lr_distant", 3e-4, 3e-2, "as lr_local, for the fixed long-range links"),
              LogUniform("lattice.lr_gate", 3e-4, 3e-2, "as lr_local, for the per-cell gate over the three"),
              IntLogUniform("lattice.steps", 7, 16, "7: the fewest steps in which the front face reaches the back "
                                                    "of an 8-deep lattice (one cell a step); 16: twice that; on "
                                                    "`lattice` at 300 steps: K 7 val cos 0.683, 8 0.640, 16 0.836"),
          )),
]}


class UnknownSpace(ValueError):
    pass


def get(name: str) -> Space:
    if name in SPACES:
        return SPACES[name]
    raise UnknownSpace(f"unknown search space {name!r}{presets.did_you_mean(name, SPACES)}; see --list")
