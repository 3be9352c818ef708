"""engine.tasks: a task's declared metrics are what its evaluation records carry, and what the
logger and the sweeps read (nothing lists them by hand)."""
import numpy as np
import pytest

from engine.tasks import CHAR_LM, Metric, Task, task_of
from experiments.tracking import MlflowLogger


def test_metric_directions_pick_the_better_and_the_best():
    lo, hi = Metric("loss", "min", ""), Metric("acc", "max", "")
    assert lo.better(1.0, 2.0) and not hi.better(1.0, 2.0)
    assert lo.best([3, 1, 2]) == 1 and hi.best([3, 1, 2]) == 3
    assert CHAR_LM.optuna_direction == "minimize"
    assert Task("t", (hi,), "acc").optuna_direction == "maximize"


def test_the_logger_logs_every_number_of_a_record_under_its_own_name():
    rec = {"step": 10, "val_loss": 2.0, "new_telemetry": np.float32(0.5), "grad_norm/W1": 1.5, "n": 3,
           "proto_counts": [1, 2], "kernel_ms": {"k": 1.0}, "flag": True}
    assert MlflowLogger._scalars(rec) == {"val_loss": 2.0, "new_telemetry": 0.5, "grad_norm.W1": 1.5, "n": 3.0}


@pytest.mark.opencl
def test_the_evaluation_record_carries_every_metric_the_task_declares(dev):
    from engine.config import Config, apply_overrides
    from engine.train import Trainer
    cfg = apply_overrides(Config(), ["model.embedding_dim=16", "model.hidden_dim=32", "model.num_prototypes=8",
                                     "train.batch_size=4", "train.seq_len=8", "train.eval_batches=1",
                                     "train.steps=4", "train.eval_every=2", "optim.warmup_steps=1"])
    trainer = Trainer(cfg, device=dev)
    assert trainer.task is task_of(cfg) is CHAR_LM
    history = trainer.train()["history"]
    for rec in history:
        assert {m.name for m in CHAR_LM.metrics} <= set(rec)
        assert rec["val_bpc"] == pytest.approx(rec["val_loss"] / np.log(2))
    assert CHAR_LM.metric(CHAR_LM.objective).best(r["val_loss"] for r in history) == min(r["val_loss"] for r in history)
