"""Train the hybrid model on one OpenCL device, without any tracking.

    python -m engine.train --set train.steps=200 --out runs/demo

Prints one JSON object per evaluation on standard output (step, train_loss,
val_loss, val_acc, val_bpc) and, with early stopping (train.patience) or a test
split (data.test_fraction), one more at the end (END_KEYS: the best evaluation,
the test metrics); on standard error a progress bar on a terminal, else a plain
progress line every few seconds, the early-stop line if training stopped early,
and one summary line at the end. Bad input (config, data, checkpoint, an output
folder that cannot take the checkpoints, a model too large for the device) is a
one-line error before training (exit 2). Checkpoints go to OUT/checkpoint.npz (atomic; the
last good one is kept), with early stopping the best evaluation's to OUT/best.npz. Telemetry
goes to callbacks (`Callback`), which is how the MLflow runner listens: the engine itself
knows nothing of MLflow.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time

import numpy as np

from . import ops, tune
from .checkpoint import CheckpointError, check_compatible, check_out_dir, checkpoint_size, load_checkpoint, \
    save_checkpoint
from .config import Config, ConfigError, apply_overrides
from .tasks import task_of
from .data import DataError
from .device import Device, DeviceError, kernel_source_hash
from .early_stop import EarlyStopping
from .model import Layout, Model, device_buffers, model_layers, param_specs, state_shapes, workspace_buffers
from .parallel import Replicas, check_parallel, device_specs, split_batch
from .optim import make_optimizer
from .params import init_params

CHECKPOINT_FORMAT = 1


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite value); the message is one line."""


def fixed_on_resume(cfg: Config) -> dict:
    """The part of cfg a resumed run must share with its checkpoint: the model and data (the
    arrays and vocabulary), the wirings that decide which state exists, and the batch shape
    (the validation batches and the saved prototype assignments are per (B,S))."""
    d = cfg.to_dict()
    return {"model": d["model"], "transformer": d["transformer"], "data": d["data"], "hebb": {k: d["hebb"][k] for k in ("mode", "norm", "rule")},
            "proto": {"mode": d["proto"]["mode"]}, "optim": {"name": d["optim"]["name"]},
            "train": {"batch_size": d["train"]["batch_size"], "seq_len": d["train"]["seq_len"]}}


def check_resume_steps(steps: int, ckpt_step: int, path: str, allow_equal: bool = False) -> None:
    """CheckpointError unless train.steps is above the checkpoint's step. allow_equal: a
    checkpoint already at train.steps is accepted (train() then only returns its summary),
    which a runner finishing an interrupted run needs; engine.train's CLI refuses it."""
    if steps > ckpt_step or (allow_equal and steps == ckpt_step):
        return
    above = "at or above" if allow_equal else "above"
    raise CheckpointError(f"checkpoint {path!r} is at step {ckpt_step}; train.steps must be {above} "
                          f"it to resume (got train.steps={steps})")


def train_step(model, opt, ws) -> float:
    """Forward, backward and the optimiser on the batch in ws (every layer's warm start from
    it first, if not done); returns the learning rate used. The local rules follow with
    model.local_updates(ws), after any telemetry read."""
    if not model.proto_ready:
        model.init_prototypes(ws)
    lr = opt.lr_at(model.step + 1)
    model.forward(ws)
    model.backward(ws)
    opt.step(model, lr)
    return lr


class Callback:
    """Override what you need; every record is a dict of plain Python values."""

    def on_start(self, trainer): ...
    def on_log(self, record: dict): ...          # step, train_loss, lr, grad norms, proto, kernels
    def on_eval(self, record: dict): ...         # step, val_loss, val_acc, val_bpc, proto histogram
    def before_checkpoint(self, step: int): ...  # the checkpoint of `step` is about to be written
    def on_checkpoint(self, path: str, step: int): ...
    def on_end(self, summary: dict): ...         # status, step, history, final, best, early_stop, test


class Trainer:
    """Everything one run needs: data, device, model, batches, schedule."""

    def __init__(self, cfg: Config, out_dir: str | None = None, callbacks=(), resume: str | None = None,
                 device: Device | None = None):
        """Everything that can be refused is checked before the device allocates anything: the
        checkpoint against cfg, the data, the output folder (check_out_dir), the memory."""
        self.cfg, self.out_dir, self.callbacks = cfg, out_dir, list(callbacks)
        self.task = task_of(cfg)   # its metrics name the evaluation record's values
        # early stopping on the task's objective; best_arrays: the best evaluation's parameters
        # and layer state (param.*, state.*), on the host, carried in every checkpoint as best.*
        self.early = EarlyStopping(self.task.metric(self.task.objective), cfg.train.patience) \
            if cfg.train.patience else None
        self.best_arrays: dict | None = None
        self._best_source = None   # a resumed run's best.npz, beside its checkpoint (copied to OUT by save)
        ckpt = load_checkpoint(resume) if resume else None
        if ckpt:
            self._check_resumable(resume, ckpt[1])
        self.data = self.task.make(cfg, vocab_json=ckpt[1]["vocab"] if ckpt else None)
        self.checkpoint_nbytes = checkpoint_size(self._checkpoint_arrays(), self._meta_bytes())
        if out_dir:
            self.check_out_dir(out_dir)
        specs = [cfg.device] if device is not None else device_specs(cfg.device)
        check_parallel(cfg, len(specs))
        self.dev = device or Device(specs[0], profile=cfg.train.profile)
        if device is None:   # a device handed in keeps its tuning (its owner applied one, or none)
            tune.apply(self.dev, cfg.tune)
        extra = [Device(s) for s in specs[1:]]   # data parallel (engine/parallel.py)
        for d in extra:
            tune.apply(d, cfg.tune)
        self.dev.check_memory(self.device_buffers(self.dev.variant, len(specs)))
        for k, d in enumerate(extra, 1):
            d.check_memory(self.replica_buffers(k, len(specs), d.variant))
        self.model = Model(self.dev, cfg, self.data.output_size)
        self.opt = make_optimizer(self.dev, cfg, self.model)
        self.ws = self.model.workspace(cfg.train.batch_size, cfg.train.seq_len)
        self.data.to_device(self.dev)
        self.replicas = (Replicas([self.dev, *extra], self.model, cfg.train.batch_size, cfg.train.seq_len,
                                  self.data.train_ids) if extra else None)
        self.step_acc = self.dev.zeros((3,))  # loss sum, clipped steps, steps since the last log
        self.last_assign = None
        self.history: list[dict] = []
        self.train_time_s = 0.0   # wall seconds spent in training steps (not evaluation), over resumes
        self._stop = False
        if ckpt:
            self._restore(resume, *ckpt)
        else:
            self.model.set_params(init_params(param_specs(self.model.layers), cfg.seed))
        if self.replicas:
            self.replicas.broadcast()

    # the task's data, under the names the harness has always read
    vocab = property(lambda self: self.data.vocab)
    train_ids = property(lambda self: self.data.train_ids)
    val_ids = property(lambda self: self.data.val_ids)
    n_chars = property(lambda self: self.data.n_chars)
    data_sha256 = property(lambda self: self.data.data_sha256)
    batches = property(lambda self: self.data.batches)
    val = property(lambda self: self.data.val)
    ids_dev = property(lambda self: self.data.ids_dev)

    @property
    def remaining_steps(self) -> int:
        """Steps train() will run: train.steps minus the steps already taken (0 when a resumed
        checkpoint is at train.steps; engine.train's CLI refuses that, see check_resume_steps)."""
        return self.cfg.train.steps - self.model.step

    # -- what must hold before anything is allocated ------------------------------------
    def _check_resumable(self, path, meta):
        """The checkpoint's format, the config keys that cannot change on resume, its step."""
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint {path!r}: unknown format {meta.get('format')!r}")
        if not all(isinstance(meta.get(k), t) for k, t in (("config", dict), ("step", int), ("batches", dict),
                                                             ("vocab", str))):
            raise CheckpointError(f"checkpoint {path!r}: its meta lacks the config, step, vocabulary "
                                  f"or batch state (not written by engine.train)")
        try:   # keys added since the checkpoint was written take their defaults (the behaviour then)
            saved = Config.from_dict(meta["config"]).to_dict()
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint {path!r}: its config is not valid here ({exc})") from None
        check_compatible(saved, fixed_on_resume(self.cfg), path, note="it cannot change on resume")
        check_resume_steps(self.cfg.train.steps, meta["step"], path, allow_equal=True)

    def _checkpoint_arrays(self) -> dict:
        """{name: (shape, dtype)} of the arrays save() writes."""
        cfg = self.cfg
        out = state_shapes(cfg, self.data.output_size)
        if cfg.proto.mode != "off":   # the first validation batch's assignments
            out["state.last_assign"] = ((cfg.train.batch_size * cfg.train.seq_len,), np.int32)
        out["state.step_acc"] = ((3,), np.float32)
        if cfg.train.patience:   # the best evaluation's parameters and layer state
            out.update({f"best.{k}": v for k, v in state_shapes(cfg, self.data.output_size).items()
                        if k.startswith(("param.", "state."))})
        return out

    def _meta_bytes(self) -> int:
        """An upper estimate of save()'s meta JSON: config, vocabulary, generator state, and
        one history record per evaluation (~40 bytes per number, prototype counts included)."""
        tc = self.cfg.train
        evals = tc.steps // tc.eval_every + 1
        record = 40 * (9 + self.cfg.model.num_prototypes)
        return len(self.cfg.to_json()) + 8 * self.vocab.size + 4096 + 256 + evals * record

    @property
    def checkpoint_files(self) -> int:
        """Checkpoint-sized files the output folder must have room for: the last, a save's temp
        file, and with early stopping the best."""
        return 3 if self.early else 2

    def check_out_dir(self, out_dir: str):
        """CheckpointError unless out_dir can take this run's checkpoints (engine.checkpoint.check_out_dir)."""
        check_out_dir(out_dir, self.checkpoint_nbytes, self.checkpoint_files)
        for name in ("checkpoint.npz", "best.npz") if self.early else ("checkpoint.npz",):
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                raise CheckpointError(f"checkpoint {path!r} is a directory")

    def device_buffers(self, variant: str = "cpu", n_devices: int = 1) -> dict:
        """{name: (shape, dtype)} of every buffer this run puts on its (first) device; with
        n_devices > 1 also the first slice's workspace and the replicas' combination buffers."""
        cfg = self.cfg
        V, B, S = self.data.output_size, cfg.train.batch_size, cfg.train.seq_len
        out = device_buffers(cfg, V, B, S, variant)
        out.update(self.data.device_buffers())
        out["train.step_acc"] = ((3,), np.float32)
        if n_devices > 1:
            n0 = split_batch(B, n_devices)[0][1]
            out.update({f"replica.{k}": v for k, v in workspace_buffers(cfg, V, n0, S, variant=variant).items()})
            n = Layout.of(param_specs(model_layers(cfg, V))).total
            out.update(Replicas.buffers(n, n_devices))
        return out

    def replica_buffers(self, k: int, n_devices: int, variant: str = "cpu") -> dict:
        """What replica k (> 0) of a data-parallel run puts on its device: the model and its
        slice's workspace and products (no optimiser)."""
        cfg = self.cfg
        V, S = self.data.output_size, cfg.train.seq_len
        nk = split_batch(cfg.train.batch_size, n_devices)[k][1]
        out = {k2: v for k2, v in device_buffers(cfg, V, nk, S, variant).items() if not k2.startswith("optim.")}
        out.update(self.data.device_buffers())
        return out

    # -- checkpoints ----------------------------------------------------------------
    def checkpoint_path(self) -> str | None:
        return os.path.join(self.out_dir, "checkpoint.npz") if self.out_dir else None

    def best_path(self) -> str | None:
        """OUT/best.npz: the checkpoint of the best evaluation (with early stopping only)."""
        return os.path.join(self.out_dir, "best.npz") if self.out_dir and self.early else None

    def _contents(self, arrays: dict | None = None) -> tuple[dict, dict]:
        """(arrays, meta) of a checkpoint of the current step; `arrays`: the model's state_arrays
        if already read."""
        arrays = dict(self.model.state_arrays(self.opt) if arrays is None else arrays)
        if self.last_assign is not None:
            arrays["state.last_assign"] = self.last_assign
        arrays["state.step_acc"] = self.step_acc.get()
        if self.best_arrays is not None:
            arrays.update({f"best.{k}": v for k, v in self.best_arrays.items()})
        meta = {"format": CHECKPOINT_FORMAT, "step": self.model.step, "config": self.cfg.to_dict(),
                **self.data.state(),
                "proto_ready": self.model.proto_ready, "kernel_hash": kernel_source_hash(),
                "device": self.dev.name, "history": self.history, "train_time_s": self.train_time_s}
        if self.early:
            meta["early_stopping"] = self.early.state()
        return arrays, meta

    def _write(self, path: str, arrays: dict, meta: dict):
        try:
            save_checkpoint(path, arrays, meta)
        except OSError as exc:  # e.g. the disk filled up during the run: the temp file is gone
            kept = "the last good checkpoint is kept" if os.path.exists(path) else "no checkpoint was written"
            raise TrainingError(f"cannot write checkpoint {path!r} at step {self.model.step} "
                                f"({exc.strerror or exc}); {kept}") from None

    def save(self) -> str | None:
        path = self.checkpoint_path()
        if path is None:
            return None
        arrays, meta = self._contents()
        for cb in self.callbacks:   # e.g. the tracker makes what it logged so far durable first
            cb.before_checkpoint(self.model.step)
        self._carry_best()
        self._write(path, arrays, meta)
        for cb in self.callbacks:
            cb.on_checkpoint(path, self.model.step)
        return path

    def _carry_best(self):
        """A run resumed into another folder: its best.npz (the checkpoint of the best step
        recorded in the resumed checkpoint) is copied beside the new checkpoints, once (unless a
        new best came first)."""
        src, dst, self._best_source = self._best_source, self.best_path(), None
        if not src or not dst or os.path.abspath(src) == os.path.abspath(dst):
            return
        try:
            arrays, meta = load_checkpoint(src)
        except CheckpointError as exc:
            print(f"note: {exc}; {dst} is written at the next best evaluation", file=sys.stderr)
            return
        if meta.get("step") == self.early.best_step:
            self._write(dst, arrays, meta)

    def _new_best(self):
        """The evaluation just made is the best: keep its parameters and layer state, and write
        its checkpoint (what save() would write now) to best.npz."""
        arrays = self.model.state_arrays(self.opt)
        self.best_arrays = {k: v for k, v in arrays.items() if k.startswith(("param.", "state."))}
        self._best_source = None   # superseded: nothing to carry over from a resumed run's folder
        path = self.best_path()
        if path is not None:
            self._write(path, *self._contents(arrays))

    def _restore(self, path, arrays, meta):
        try:
            self.model.load_state_arrays(arrays, self.opt)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: arrays do not fit this model ({exc})") from exc
        self.model.step = int(meta["step"])
        self.model.proto_ready = bool(meta.get("proto_ready", True))
        self.data.set_state(meta)
        self.last_assign = arrays.get("state.last_assign")
        if "state.step_acc" in arrays:
            self.step_acc.set(np.ascontiguousarray(arrays["state.step_acc"], np.float32))
        self.history = list(meta.get("history", []))
        self.train_time_s = float(meta.get("train_time_s", 0.0))
        if self.early and meta.get("early_stopping"):   # a checkpoint without: tracking starts here
            try:
                self.early.set_state(meta["early_stopping"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"checkpoint {path}: its early-stopping state is unusable ({exc})") from None
            best = {k[len("best."):]: v for k, v in arrays.items() if k.startswith("best.")}
            self.best_arrays = best or None
            source = os.path.join(os.path.dirname(os.path.abspath(path)), "best.npz")
            self._best_source = source if best and os.path.exists(source) else None
            if self.early.best_step is not None and not best:
                raise CheckpointError(f"checkpoint {path}: records a best evaluation at step "
                                      f"{self.early.best_step} but not its parameters")

    # -- the loop -----------------------------------------------------------------------
    def request_stop(self, reason: str = "killed"):
        """Ask the loop to stop after the current step (signal handlers call this;
        a sweep's pruner passes reason="pruned"). The summary's status is the reason."""
        self._stop = reason

    def train(self, progress=None) -> dict:
        """Train to train.steps (or an early stop, or a stop request); then, if the run ended
        (not stopped), evaluate the test split once. Returns the summary: status, step,
        history, final (the last evaluation), checkpoint; with early stopping best (step, the
        objective's value, best.npz) and early_stop (None if it did not stop early); with a
        test split test (the step of the parameters evaluated and the test metrics)."""
        cfg, m, ws, dev = self.cfg, self.model, self.ws, self.dev
        tc = cfg.train
        for cb in self.callbacks:
            cb.on_start(self)
        status = "finished"
        stopped_early = self.early is not None and self.early.stop   # a checkpoint of a stopped run
        t_log, steps_timed = time.perf_counter(), 0
        dev.take_timings()
        while m.step < tc.steps and not stopped_early:
            if self._stop:
                status = self._stop
                break
            if self.replicas:
                self.replicas.next_batch(self.data, self.data.ids_dev)
                lr = self.replicas.train_step(self.opt, self.data.ids_dev)
            else:
                self.data.next_batch(dev, ws)
                lr = train_step(m, self.opt, ws)
            ops.accumulate_step_stats(dev, ws.loss_out, self.opt.gnorm, cfg.optim.clip_norm, self.step_acc)
            step = m.step
            steps_timed += 1
            is_eval = step % tc.eval_every == 0 or step == tc.steps
            is_ckpt = step == tc.steps or (tc.checkpoint_every and step % tc.checkpoint_every == 0)
            rec = None
            if step % tc.log_every == 0 or is_eval or is_ckpt:
                rec = self._log_record(step, lr, steps_timed, time.perf_counter() - t_log)
            if self.replicas:
                self.replicas.local_updates()
            else:
                m.local_updates(ws)
            if rec is not None:
                for cb in self.callbacks:
                    cb.on_log(rec)
                if progress is not None:
                    progress(rec)
                t_log, steps_timed = time.perf_counter(), 0
            if is_eval:
                self.history.append(self.evaluate(step, rec))
                if self.early is not None:
                    if self.early.update(step, self.history[-1][self.early.metric.name]):
                        self._new_best()
                    stopped_early = self.early.stop
                dev.take_timings()  # evaluation (and its callbacks) is not training-step time
                t_log = time.perf_counter()
            if is_ckpt or stopped_early:
                self.save()
        if status != "finished" and self.checkpoint_path():
            self.save()
        summary = {"status": status, "step": m.step, "history": self.history,
                   "final": self.history[-1] if self.history else None,
                   "checkpoint": self.checkpoint_path()}
        if self.early is not None:
            summary["best"] = {"step": self.early.best_step, self.early.metric.name: self.early.best,
                               "checkpoint": self.best_path() if self.best_arrays is not None else None}
            summary["early_stop"] = ({"step": m.step, "best_step": self.early.best_step, "best": self.early.best,
                                      "metric": self.early.metric.name, "patience": self.early.patience,
                                      "message": self.early.message(m.step)} if stopped_early else None)
        if status == "finished" and self.data.has_test:
            summary["test"] = self.evaluate_test()
        for cb in self.callbacks:
            cb.on_end(summary)
        return summary

    def evaluate_test(self) -> dict:
        """The task's metrics over the test split, once: with the best evaluation's parameters
        and layer state when early stopping kept them, else the current ones (restored after).
        {"step": the step of the parameters evaluated, test_loss, test_acc, test_bpc, test_f1}."""
        m = self.model
        use_best = self.best_arrays is not None and self.early.best_step != m.step
        step = self.early.best_step if use_best else m.step
        if use_best:
            last, ready = m.state_arrays(), m.proto_ready
            m.load_state_arrays(self.best_arrays)
        try:
            metrics, _ = self.data.evaluate(m, self.ws, "test")
        finally:
            if use_best:
                m.load_state_arrays(last)
                m.proto_ready = ready
            self.dev.take_timings()
        return {"step": step, **metrics}

    def _log_record(self, step, lr, n_timed, seconds) -> dict:
        """Telemetry at a logging point: averages over the steps since the last one."""
        m, ws = self.model, self.ws
        acc = self.step_acc.get().astype(np.float64)
        self.dev.cl.enqueue_fill_buffer(self.dev.queue, self.step_acc.data, np.zeros(1, np.float32), 0, 12)
        n_steps = max(acc[2], 1.0)
        rec = {"step": step, "train_loss": acc[0] / n_steps, "clipped_frac": acc[1] / n_steps, "lr": lr}
        rec.update(self.opt.telemetry())
        if self.replicas:
            self.replicas.gather_all()
        rec.update(m.telemetry(ws))
        self._check_finite(step, rec)
        rec["tokens_per_s"] = n_timed * ws.N / seconds if seconds > 0 and n_timed else 0.0
        self.train_time_s += seconds
        rec["train_time_s"] = self.train_time_s
        timings = self.dev.take_timings()
        rec["kernel_ms"] = {k: ns / 1e6 for k, (calls, ns) in timings.items()}
        rec["kernel_ms_per_step"] = {k: ns / 1e6 / max(n_timed, 1) for k, (calls, ns) in timings.items()}
        rec["kernel_calls"] = {k: calls for k, (calls, ns) in timings.items()}
        return rec

    def _check_finite(self, step, rec):
        if math.isfinite(rec["train_loss"]) and math.isfinite(rec["grad_norm"]):
            return
        bad = "loss" if not math.isfinite(rec["train_loss"]) else None
        for name, arr in [(f"grad {k}", v) for k, v in self.model.get_grads().items()] + \
                         [(f"param {k}", v) for k, v in self.model.get_params().items()]:
            if not np.isfinite(arr).all():
                bad = bad or name
                break
        path = self.checkpoint_path()
        kept = f"; last good checkpoint kept at {path}" if path and os.path.exists(path) else "; no checkpoint yet"
        raise TrainingError(f"non-finite value at step {step} in {bad or 'gradient norm'}{kept}")

    def evaluate(self, step: int, log_rec: dict | None = None) -> dict:
        """The task's metrics over the validation split (character LM: loss in nats, accuracy,
        bits per character), the prototype assignments' change since the last evaluation."""
        metrics, first_assign = self.data.evaluate(self.model, self.ws)
        rec = {"step": step, "train_loss": log_rec["train_loss"] if log_rec else float("nan"), **metrics,
               "train_time_s": self.train_time_s}
        if first_assign is not None:
            if self.last_assign is not None:
                rec["proto_changed"] = float(np.mean(first_assign != self.last_assign))
            self.last_assign = first_assign
            if log_rec and "proto_counts" in log_rec:
                rec["proto_counts"] = log_rec["proto_counts"]
        for k in (k for k in (log_rec or {}) if k.endswith("mem_usage_counts")):   # memnet's slot usage
            rec[k] = log_rec[k]
        for cb in self.callbacks:
            cb.on_eval(rec)
        return rec


# -- command line ---------------------------------------------------------------------------
EVAL_KEYS = ("step", "train_loss", "val_loss", "val_acc", "val_bpc")   # the character tasks'


def eval_keys(task) -> tuple:
    """What engine.train prints of each evaluation: the step, the training loss and the task's
    first metrics (the character tasks: EVAL_KEYS; the embedding task: loss, cosine, MSE, retrieval@1)."""
    if task.name == "char_lm":
        return EVAL_KEYS
    return ("step", "train_loss", *(m.name for m in task.metrics[:4]))
# the last object, with early stopping or a test split (only the keys that apply): no "step", so
# that it is not read as an evaluation
END_KEYS = ("final_step", "stopped_early", "best_step", "best_val_loss", "test_step", "test_loss", "test_acc",
            "test_bpc", "test_f1")


def end_record(summary: dict) -> dict | None:
    """The final object engine.train prints (END_KEYS), or None without early stopping and test split."""
    best, test = summary.get("best"), summary.get("test")
    if best is None and test is None:
        return None
    out = {"final_step": summary["step"]}
    if best is not None:
        metric = next(k for k in best if k not in ("step", "checkpoint"))
        out.update(stopped_early=summary.get("early_stop") is not None, best_step=best["step"])
        out[f"best_{metric}"] = best[metric]
    if test is not None:
        out.update({"test_step": test["step"], **{k: v for k, v in test.items() if k != "step"}})
    return out


class _PrintEval(Callback):
    def on_start(self, trainer):
        self.keys = eval_keys(trainer.task)

    def on_eval(self, record):
        print(json.dumps({k: record[k] for k in self.keys}), flush=True)

    def on_end(self, summary):
        end = end_record(summary)
        if end is not None:
            print(json.dumps(end), flush=True)


def make_progress(total: int, initial: int = 0, interval: float = 5.0, unit: str = "tok"):
    """(update, bar): update(log record) shows progress on standard error. On a terminal a
    tqdm bar (the caller closes `bar` at the end); elsewhere (nohup, CI, a pipe) bar is None
    and update prints a plain line at the first record, then at most every `interval` seconds:
    `step 400/2000  loss 2.412  41,200 tok/s  elapsed 0:12  remaining 0:48`."""
    if not sys.stderr.isatty():
        return _plain_progress(total, initial, interval, unit), None
    from tqdm import tqdm
    bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(rec):
        bar.n = rec["step"]
        bar.set_postfix({"loss": f"{rec['train_loss']:.3f}", f"{unit}_s": f"{rec['tokens_per_s']:.0f}"})
        bar.refresh()
    return update, bar


def _plain_progress(total: int, initial: int, interval: float, unit: str = "tok"):
    start = time.monotonic()
    last = [None]  # the first record prints at once: the run is seen to be alive from its first log point

    def update(rec):
        now = time.monotonic()
        if last[0] is not None and now - last[0] < interval:
            return
        last[0] = now
        step, elapsed = rec["step"], now - start
        done = step - initial
        remaining = format_duration(elapsed * (total - step) / done) if done > 0 else "?"
        print(f"step {step}/{total}  loss {rec['train_loss']:.3f}  {rec.get('tokens_per_s', 0.0):,.0f} {unit}/s  "
              f"elapsed {format_duration(elapsed)}  remaining {remaining}", file=sys.stderr, flush=True)
    return update


def progress_unit(task) -> str:
    """What a batch row is, for the progress line: characters (tok) or sentences (sent). The
    records' tokens_per_s counts rows (B·S) a second in both."""
    return "tok" if task.name == "char_lm" else "sent"


def format_duration(seconds: float) -> str:
    """0:07, 12:34, 1:02:03."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def summary_line(summary: dict, total: int, seconds: float) -> str:
    """One line for the end of a run: how it ended, its steps, the last validation, the checkpoint."""
    final, path = summary.get("final"), summary.get("checkpoint")
    second = "val_bpc" if final and "val_bpc" in final else "val_cos"
    val = (f"val_loss {final['val_loss']:.4f}  {second} {final[second]:.4f}" if final
           else "no evaluation yet")
    test = summary.get("test")
    if test:
        second = "test_f1" if "test_f1" in test else "test_cos"
        val += f"  test_loss {test['test_loss']:.4f}  {second} {test[second]:.4f} (step {test['step']})"
    where = f"checkpoint {path}" if path else "no checkpoint written (no --out given)"
    head = ("stopped early" if summary.get("early_stop") else "finished") if summary["status"] == "finished" \
        else "stopped"
    return f"{head} at step {summary['step']}/{total} in {format_duration(seconds)}  {val}  {where}"


def load_config(args) -> Config:
    cfg = Config()
    if args.config:
        with open(args.config) as f:
            cfg = Config.from_json(f.read())
    return apply_overrides(cfg, args.set or [])


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    ap.add_argument("--config", help="a resolved config JSON to start from")
    ap.add_argument("--out", help="directory for checkpoints (checked before training: must be writable, "
                                  "with room for two checkpoints)")
    ap.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (its config, plus --set; "
                                                     "train.steps must be above its step)")
    args = ap.parse_args(argv)
    # until the loop runs, SIGTERM is a Ctrl+C: both stop the setup with one line (SIGINT set here too:
    # a process started with SIGINT ignored, as a test suite's child can be, would not stop otherwise;
    # the loop below takes both signals over as well)
    term = signal.signal(signal.SIGTERM, _raise_interrupt)
    intr = signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        if args.resume:
            _, meta = load_checkpoint(args.resume)
            try:
                cfg = apply_overrides(Config.from_dict(meta["config"]), args.set or [])
                ckpt_step = int(meta["step"])
            except (KeyError, TypeError) as exc:
                raise CheckpointError(f"checkpoint {args.resume!r} has no config or step "
                                      f"(not written by engine.train)") from exc
            check_resume_steps(cfg.train.steps, ckpt_step, args.resume)
        else:
            cfg = load_config(args)
        trainer = Trainer(cfg, args.out, [_PrintEval()], resume=args.resume)
    except KeyboardInterrupt:
        print("interrupted before training started; nothing written", file=sys.stderr)
        return 130
    except (ConfigError, DataError, CheckpointError, DeviceError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, term)
        signal.signal(signal.SIGINT, intr)
    previous = {s: signal.signal(s, lambda *_: trainer.request_stop()) for s in (signal.SIGINT, signal.SIGTERM)}
    progress, bar = make_progress(cfg.train.steps, trainer.model.step, unit=progress_unit(trainer.task))
    t0 = time.perf_counter()
    try:
        summary = trainer.train(progress)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()
    if summary.get("early_stop"):
        print(summary["early_stop"]["message"], file=sys.stderr)
    print(summary_line(summary, cfg.train.steps, time.perf_counter() - t0), file=sys.stderr)
    return 130 if summary["status"] == "killed" else 0


if __name__ == "__main__":
    sys.exit(main())
