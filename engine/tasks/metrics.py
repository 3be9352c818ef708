"""Classification counts and macro F1 from per-position predictions (evaluation only, host side).

    python -c "from engine.tasks.metrics import *; c = ClassCounts(4); c.add([1, 2, 2], [1, 2, 3]); print(c.macro_f1())"

Definition (the one reported as val_f1 / test_f1): over the classes c that occur at least once
among the evaluated split's targets (PAD = -1 excluded; UNK, id 0, is a class like any other),
    P_c = TP_c / #{predicted c},  R_c = TP_c / #{target c},
    F1_c = 2·P_c·R_c / (P_c + R_c), and F1_c = 0 when P_c + R_c = 0 (also when c is never predicted),
    macro F1 = mean of F1_c over those classes.
Predictions of a class that never occurs as a target count against the recall of the target,
not as a class of their own. Equal to sklearn.metrics.f1_score(y, pred, average="macro",
labels=<the classes present in y>) (tests/test_metrics.py). Letters: N positions, V classes.
"""
from __future__ import annotations

import numpy as np

from ..data import PAD


class ClassCounts:
    """Per-class true positives, predictions and targets, summed over evaluation batches."""

    def __init__(self, V: int):
        self.V = V
        self.tp = np.zeros(V, np.int64)
        self.n_pred = np.zeros(V, np.int64)
        self.n_true = np.zeros(V, np.int64)

    def add(self, pred, y):
        """pred, y (N,) int: predictions and targets of one batch; PAD targets are skipped."""
        pred, y = np.asarray(pred).reshape(-1), np.asarray(y).reshape(-1)
        valid = y != PAD
        p, t = pred[valid].astype(np.int64), y[valid].astype(np.int64)
        self.tp += np.bincount(t[p == t], minlength=self.V)
        self.n_pred += np.bincount(p, minlength=self.V)
        self.n_true += np.bincount(t, minlength=self.V)

    @property
    def correct(self) -> int:
        return int(self.tp.sum())

    def macro_f1(self) -> float:
        """The module's definition; 0.0 when no valid target was added."""
        present = self.n_true > 0
        if not present.any():
            return 0.0
        tp, n_pred, n_true = (a[present].astype(np.float64) for a in (self.tp, self.n_pred, self.n_true))
        precision = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred > 0)
        recall = tp / n_true
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
        return float(f1.mean())
