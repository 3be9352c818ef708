"""Early stopping on the task's objective (train.patience), with its state for checkpoints.

    python -c "from engine.early_stop import *; from engine.tasks import CHAR_LM; e = EarlyStopping(CHAR_LM.metric('val_loss'), 2); print([e.update(s, v) or e.stop for s, v in [(2, 3.0), (4, 2.0), (6, 2.5), (8, 2.1)]])"

At each evaluation the objective's value is compared with the best so far: strictly better
(Metric.better: lower for val_loss) makes it the new best and resets the count; anything else
(equal included) adds one evaluation without improvement. Training stops once that count
reaches `patience`. The state (best value, its step, the count) goes into every checkpoint's
meta, so a resumed run stops exactly where the uninterrupted one would.
"""
from __future__ import annotations

import math


class EarlyStopping:
    def __init__(self, metric, patience: int):
        """metric: an engine.tasks.Metric (its name and direction); patience >= 1."""
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.metric, self.patience = metric, patience
        self.best: float | None = None      # the best value so far
        self.best_step: int | None = None   # the step of the evaluation that gave it
        self.since = 0                      # evaluations since then without an improvement

    def update(self, step: int, value: float) -> bool:
        """Record an evaluation; True when it is the new best. A non-finite value never is."""
        if math.isfinite(value) and (self.best is None or self.metric.better(value, self.best)):
            self.best, self.best_step, self.since = float(value), int(step), 0
            return True
        self.since += 1
        return False

    @property
    def stop(self) -> bool:
        return self.since >= self.patience

    def message(self, step: int) -> str:
        best = f"{self.best:.4f}" if self.best is not None else "none"
        since = f"step {self.best_step}" if self.best_step is not None else "the start"
        return (f"early stop at step {step}: {self.metric.name} has not improved for {self.since} evaluations "
                f"since {since} (best {best})")

    def state(self) -> dict:
        """What a checkpoint's meta keeps (JSON)."""
        return {"metric": self.metric.name, "best": self.best, "best_step": self.best_step, "since": self.since}

    def set_state(self, state: dict) -> None:
        """Restore from state(); a state of another metric is a ValueError."""
        if state.get("metric") != self.metric.name:
            raise ValueError(f"early-stopping state is for {state.get('metric')!r}, not {self.metric.name!r}")
        self.best = None if state["best"] is None else float(state["best"])
        self.best_step = None if state["best_step"] is None else int(state["best_step"])
        self.since = int(state["since"])
