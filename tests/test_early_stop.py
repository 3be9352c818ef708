"""Early stopping (train.patience), the best checkpoint and the test split at the end of training.

    python -m pytest tests/test_early_stop.py -q

The rule on constructed sequences (numpy only); then tiny runs whose validation loss is a
constructed function of the step (the real evaluation runs, its val_loss is replaced), so the
stop step is known in advance: the run stops there, best.npz holds the parameters of the best
step, the test metrics are those of a separate evaluation of best.npz, a run resumed between
evaluations stops where the uninterrupted one does, bit for bit (MLflow: tests/test_experiments.py).
Key: B batch, S sequence, E embedding, H hidden, T prototypes (tiny sizes from conftest).
"""
import json
import os

import numpy as np
import pytest
from conftest import B, E, H, S, T, TEXT

from engine.checkpoint import load_checkpoint
from engine.config import Config, apply_overrides
from engine.early_stop import EarlyStopping
from engine.tasks import CHAR_LM, Metric
from engine.tasks.char_lm import CharLM

VAL_LOSS = CHAR_LM.metric("val_loss")


def run_rule(values, patience, metric=VAL_LOSS, every=2):
    """(the step at which the rule stops or None, the rule) on values at steps every, 2·every, ..."""
    e = EarlyStopping(metric, patience)
    for i, v in enumerate(values, 1):
        e.update(every * i, v)
        if e.stop:
            return every * i, e
    return None, e


def test_stops_after_patience_evaluations_without_a_strict_improvement():
    #          2    4    6    8 (equal: no)  10   12   14   16
    values = [3.0, 2.0, 2.5, 2.0, 1.9, 2.2, 2.3, 2.4, 1.0]
    step, e = run_rule(values, 3)
    assert step == 16 and (e.best, e.best_step, e.since) == (1.9, 10, 3)
    assert e.message(16) == "early stop at step 16: val_loss has not improved for 3 evaluations since step 10 (best 1.9000)"
    assert run_rule(values, 2)[0] == 8               # 6 and 8 do not improve on step 4's 2.0
    assert run_rule(values, 4)[0] is None            # 12, 14, 16 and then 18 improves
    assert run_rule(values, 1)[0] == 6


def test_a_larger_is_better_metric_and_non_finite_values():
    acc = Metric("val_acc", "max", "")
    step, e = run_rule([0.1, 0.3, 0.2, 0.3, 0.25], 3, acc)
    assert step == 10 and (e.best, e.best_step) == (0.3, 4)
    step, e = run_rule([float("nan"), 2.0, float("nan"), float("inf")], 2)
    assert step == 8 and (e.best, e.best_step) == (2.0, 4)


def test_state_round_trips_through_json():
    _, e = run_rule([3.0, 2.123456789012345, 2.5], 5)
    again = EarlyStopping(VAL_LOSS, 5)
    again.set_state(json.loads(json.dumps(e.state())))
    assert again.state() == e.state() == {"metric": "val_loss", "best": 2.123456789012345, "best_step": 4, "since": 1}
    with pytest.raises(ValueError, match="early-stopping state is for 'val_acc', not 'val_loss'"):
        again.set_state({**e.state(), "metric": "val_acc"})


# ------------------------------------------------------------------ tiny runs on the device
# evaluations every 2 steps; patience 2: best at 4, no improvement at 6 and 8 -> stop at 8.
# 10 would improve (a run that lost its counter or its best would go on past 8)
TABLE = {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.4, 10: 1.5, 12: 1.4, 14: 1.3, 16: 1.2, 18: 1.1, 20: 1.0}
SIZES = [f"model.embedding_dim={E}", f"model.hidden_dim={H}", f"model.num_prototypes={T}",
         f"train.batch_size={B}", f"train.seq_len={S}", "train.steps=20", "train.eval_every=2",
         "train.checkpoint_every=10", "optim.warmup_steps=2", "optim.lr=0.03", "train.log_every=2",
         "data.val_fraction=0.15", "data.test_fraction=0.1", "train.patience=2"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def config(text_file, *extra):
    return apply_overrides(Config(), [f"data.path={text_file}", *SIZES, *extra])


@pytest.fixture
def constructed(monkeypatch):
    """CharLM's validation loss replaced by TABLE[step]; everything else is the real evaluation."""
    real = CharLM.evaluate

    def evaluate(self, model, ws, split="val"):
        metrics, assign = real(self, model, ws, split)
        if split == "val":
            metrics["val_loss"] = TABLE[model.step]
        return metrics, assign
    monkeypatch.setattr(CharLM, "evaluate", evaluate)


class Params:
    """engine.train.Callback: the parameters at every evaluation."""

    def __init__(self, trainer=None):
        self.at, self.trainer = {}, trainer

    def on_start(self, trainer):
        self.trainer = trainer

    def on_eval(self, rec):
        self.at[rec["step"]] = self.trainer.model.get_params()

    def on_log(self, rec): ...
    def before_checkpoint(self, step): ...
    def on_checkpoint(self, path, step): ...
    def on_end(self, summary): ...


def maths(history):
    return [{k: v for k, v in r.items() if k != "train_time_s"} for r in history]


@pytest.fixture
def full_run(text_file, dev, tmp_path, constructed):
    from engine.train import Trainer
    out = tmp_path / "full"
    params = Params()
    trainer = Trainer(config(text_file), str(out), [params], device=dev)
    return trainer, trainer.train(), params, out


@pytest.mark.opencl
def test_the_run_stops_at_the_expected_step_and_keeps_the_best(full_run, text_file, dev):
    from engine.train import Trainer, end_record
    trainer, summary, params, out = full_run
    assert summary["status"] == "finished" and summary["step"] == 8
    assert [r["step"] for r in summary["history"]] == [2, 4, 6, 8]
    assert summary["early_stop"] == {"step": 8, "best_step": 4, "best": 2.0, "metric": "val_loss", "patience": 2,
                                     "message": "early stop at step 8: val_loss has not improved for 2 evaluations "
                                                "since step 4 (best 2.0000)"}
    assert summary["best"] == {"step": 4, "val_loss": 2.0, "checkpoint": str(out / "best.npz")}
    assert sorted(os.listdir(out)) == ["best.npz", "checkpoint.npz"]
    for name in ("best.npz", "checkpoint.npz"):              # the out-folder check's estimate bounds both
        size = os.path.getsize(out / name)
        assert size <= trainer.checkpoint_nbytes <= size + 64 * 1024, (name, size, trainer.checkpoint_nbytes)
    arrays, meta = load_checkpoint(out / "best.npz")
    assert meta["step"] == 4 and [r["step"] for r in meta["history"]] == [2, 4]
    for k, v in params.at[4].items():                        # best.npz: the parameters of step 4
        np.testing.assert_array_equal(arrays[f"param.{k}"], v, err_msg=k)
        np.testing.assert_array_equal(arrays[f"best.param.{k}"], v, err_msg=k)
    last, last_meta = load_checkpoint(out / "checkpoint.npz")   # the last: step 8, carrying step 4's as best.*
    assert last_meta["step"] == 8 and last_meta["early_stopping"] == {"metric": "val_loss", "best": 2.0,
                                                                      "best_step": 4, "since": 2}
    for k, v in params.at[8].items():
        np.testing.assert_array_equal(last[f"param.{k}"], v, err_msg=k)
        np.testing.assert_array_equal(last[f"best.param.{k}"], params.at[4][k], err_msg=k)
        np.testing.assert_array_equal(trainer.model.get_params()[k], v, err_msg=k)   # restored after the test
    assert not np.array_equal(params.at[4]["W1"], params.at[8]["W1"])
    # the test metrics: a separate evaluation of best.npz, bit for bit
    again = Trainer(config(text_file), resume=str(out / "best.npz"), device=dev)
    metrics, _ = again.data.evaluate(again.model, again.ws, "test")
    assert summary["test"] == {"step": 4, **metrics}
    assert set(metrics) == {"test_loss", "test_acc", "test_bpc", "test_f1"}
    assert end_record(summary) == {"final_step": 8, "stopped_early": True, "best_step": 4, "best_val_loss": 2.0,
                                   "test_step": 4, **metrics}


@pytest.mark.opencl
@pytest.mark.parametrize("same_folder", [True, False])
def test_a_run_resumed_between_evaluations_stops_where_the_uninterrupted_one_does(
        full_run, text_file, dev, tmp_path, same_folder):
    """Stopped at step 7 (one evaluation without improvement counted), resumed: stops at 8 with
    the same history, test metrics, best and last checkpoints and final state, bit for bit; a
    resume into another folder carries best.npz over."""
    from engine.train import Trainer
    trainer, full, _, full_out = full_run
    out = tmp_path / "part"
    part = Trainer(config(text_file), str(out), device=dev)
    updates = part.model.local_updates

    def then_stop(ws):
        updates(ws)
        if part.model.step == 7:
            part.request_stop()
    part.model.local_updates = then_stop
    stopped = part.train()
    assert stopped["status"] == "killed" and stopped["step"] == 7 and "test" not in stopped
    assert load_checkpoint(out / "checkpoint.npz")[1]["early_stopping"]["since"] == 1
    dest = out if same_folder else tmp_path / "moved"
    resumed = Trainer(config(text_file), str(dest), resume=str(out / "checkpoint.npz"), device=dev)
    summary = resumed.train()
    assert summary["step"] == 8 and summary["early_stop"] == full["early_stop"]
    assert maths(summary["history"]) == maths(full["history"])
    assert summary["test"] == full["test"]
    assert sorted(os.listdir(dest)) == ["best.npz", "checkpoint.npz"]
    for name in ("best.npz", "checkpoint.npz"):
        want, want_meta = load_checkpoint(full_out / name)
        got, got_meta = load_checkpoint(dest / name)
        assert set(got) == set(want) and got_meta["step"] == want_meta["step"]
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
    for k, v in trainer.model.state_arrays(trainer.opt).items():
        np.testing.assert_array_equal(resumed.model.state_arrays(resumed.opt)[k], v, err_msg=k)
    # resuming the stopped run's last checkpoint trains nothing more: it has stopped
    done = Trainer(config(text_file), resume=str(dest / "checkpoint.npz"), device=dev).train()
    assert done["step"] == 8 and done["early_stop"] == full["early_stop"] and done["test"] == full["test"]


@pytest.mark.opencl
def test_cli_prints_the_stop_line_and_the_final_object(text_file, dev, tmp_path, capsys, constructed):
    from engine.train import END_KEYS, main
    args = [a for o in [f"data.path={text_file}", *SIZES] for a in ("--set", o)]
    assert main(args + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [r.get("step") for r in lines] == [2, 4, 6, 8, None]
    end = lines[-1]
    assert list(end) == list(END_KEYS) and end["final_step"] == 8 and end["best_step"] == end["test_step"] == 4
    err = out.err.strip().splitlines()
    assert err[-2] == ("early stop at step 8: val_loss has not improved for 2 evaluations since step 4 "
                       "(best 2.0000)")
    assert err[-1].startswith("stopped early at step 8/20 in ") and f"test_f1 {end['test_f1']:.4f} (step 4)" in err[-1]


@pytest.mark.opencl
def test_defaults_print_and_write_what_they_always_did(text_file, dev, tmp_path, capsys):
    from engine.train import EVAL_KEYS, main
    sizes = [o for o in SIZES if not o.startswith(("data.test_fraction", "train.patience"))]
    args = [a for o in [f"data.path={text_file}", *sizes, "train.steps=4"] for a in ("--set", o)]
    assert main(args + ["--out", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [list(r) for r in lines] == [list(EVAL_KEYS)] * 2
    arrays, meta = load_checkpoint(tmp_path / "checkpoint.npz")
    assert os.listdir(tmp_path) == ["checkpoint.npz"] and "early_stopping" not in meta
    assert not any(k.startswith("best.") for k in arrays)
