"""Tasks: what a model is trained and judged on. A task declares its evaluation metrics (name,
direction, meaning) and the objective a sweep or a study optimises; the trainer's evaluation
records carry those names, and the MLflow logger, the sweeps and the studies read them from
here instead of listing them by hand.

A task is its declaration here (Task: metrics, objective) and its runtime class, which owns
the data, the batches, the loss head (the layers after the family's body), the evaluation and
sampling: engine/tasks/char_lm.py is character language modelling, the one task today.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    direction: str       # "min" or "max": which way is better
    meaning: str

    def better(self, a: float, b: float) -> bool:
        return a < b if self.direction == "min" else a > b

    def best(self, values):
        return min(values) if self.direction == "min" else max(values)


@dataclass(frozen=True)
class Task:
    name: str
    metrics: tuple       # Metric, in the order reports show them
    objective: str       # the metric a sweep optimises
    module: str = ""     # engine.tasks.<module>: head_layers(cfg, V) and the runtime class
    runtime: str = ""

    def batch_buffers(self, B: int, S: int) -> dict:
        """{name: (shape, dtype)} of the batch a workspace holds (x, y and what fills them)."""
        return self._module().batch_buffers(B, S)

    def head_layers(self, cfg, V: int) -> list:
        return self._module().head_layers(cfg, V)

    def make(self, cfg, **kwargs):
        """The runtime task of a run: its data, batches and evaluation."""
        return getattr(self._module(), self.runtime)(cfg, **kwargs)

    def _module(self):
        import importlib
        return importlib.import_module(f"{__name__}.{self.module}")

    def metric(self, name: str) -> Metric:
        return next(m for m in self.metrics if m.name == name)

    @property
    def optuna_direction(self) -> str:
        return "minimize" if self.metric(self.objective).direction == "min" else "maximize"


CHAR_LM = Task("char_lm", (Metric("val_loss", "min", "validation cross-entropy, nats per character"),
                           Metric("val_acc", "max", "validation next-character accuracy"),
                           Metric("val_bpc", "min", "validation bits per character"),
                           Metric("val_f1", "max", "validation macro F1 over the characters present in the "
                                                   "targets (engine/tasks/metrics.py)")), objective="val_loss",
               module="char_lm", runtime="CharLM")
EMBED = Task("embed_regression",
             (Metric("val_loss", "min", "validation loss: the head's weighted MSE + (1 − cosine), mean over sentences"),
              Metric("val_cos", "max", "mean cosine between the student's output and the teacher's embedding"),
              Metric("val_mse", "min", "mean squared error per dimension (mean over sentences and the 384 "
                                       "dimensions of unit-norm teacher vectors)"),
              Metric("val_r1", "max", "retrieval@1: the student's output is nearest (cosine) to its own "
                                      "sentence's teacher embedding among all the split's sentences"),
              Metric("val_r5", "max", "retrieval@5: its own sentence among the 5 nearest")),
             objective="val_loss", module="embed_regression", runtime="EmbedRegression")
TASKS = {t.name: t for t in (CHAR_LM, EMBED)}


def task_of(cfg) -> Task:
    """The task a config trains: sentence-embedding regression for the lattice families, else
    character language modelling."""
    from ..config import EMBED_FAMILIES
    return EMBED if cfg.model.family in EMBED_FAMILIES else CHAR_LM
