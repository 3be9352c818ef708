"""Train the hybrid model on one OpenCL device, without any tracking.

    python -m engine.train --set train.steps=200 --out runs/demo

Prints one JSON object per evaluation on standard output (step, train_loss,
val_loss, val_acc, val_bpc); a progress bar on standard error when it is a
terminal. Checkpoints go to OUT/checkpoint.npz (atomic; the last good one is
kept). Telemetry goes to callbacks (`Callback`), which is how the MLflow
runner listens: the engine itself knows nothing of MLflow.
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

from . import ops
from .checkpoint import CheckpointError, check_compatible, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, apply_overrides
from .data import Batches, DataError, Vocab, load_text, split_text, text_digest, val_batches
from .device import Device, DeviceError, kernel_source_hash
from .model import PARAM_NAMES, Model
from .reference import init_params

CHECKPOINT_FORMAT = 1
LN2 = math.log(2.0)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite value); the message is one line."""


class Callback:
    """Override what you need; every record is a dict of plain Python values."""

    def on_start(self, trainer): ...
    def on_log(self, record: dict): ...          # step, train_loss, lr, grad norms, proto, kernels
    def on_eval(self, record: dict): ...         # step, val_loss, val_acc, val_bpc, proto histogram
    def on_checkpoint(self, path: str, step: int): ...
    def on_end(self, summary: dict): ...


class Trainer:
    """Everything one run needs: data, device, model, batches, schedule."""

    def __init__(self, cfg: Config, out_dir: str | None = None, callbacks=(), resume: str | None = None,
                 device: Device | None = None):
        self.cfg, self.out_dir, self.callbacks = cfg, out_dir, list(callbacks)
        text = load_text(cfg.data.path)
        train_text, val_text = split_text(text, cfg.data.val_fraction)
        ckpt = load_checkpoint(resume) if resume else None
        self.vocab = Vocab.from_json(ckpt[1]["vocab"]) if ckpt else Vocab.from_text(train_text)
        self.train_ids = self.vocab.encode(train_text)
        self.val_ids = self.vocab.encode(val_text)
        self.n_chars = len(text)
        self.data_sha256 = text_digest(cfg.data.path, text)
        B, S = cfg.train.batch_size, cfg.train.seq_len
        self.batches = Batches(self.train_ids, B, S, cfg.seed)
        self.val = val_batches(self.val_ids, B, S, cfg.train.eval_batches)
        self.dev = device or Device(cfg.device, profile=cfg.train.profile)
        self.model = Model(self.dev, cfg, self.vocab.size)
        self.ws = self.model.workspace(B, S)
        self.ids_dev = self.dev.to_device(self.train_ids)
        self.step_acc = self.dev.zeros((3,))  # loss sum, clipped steps, steps since the last log
        self.last_assign = None
        self.history: list[dict] = []
        self._stop = False
        if ckpt:
            self._restore(resume, *ckpt)
        else:
            E, H = cfg.model.embedding_dim, cfg.model.hidden_dim
            self.model.set_params(init_params(self.vocab.size, E, H, cfg.seed))

    # -- checkpoints ----------------------------------------------------------------
    def checkpoint_path(self) -> str | None:
        return os.path.join(self.out_dir, "checkpoint.npz") if self.out_dir else None

    def save(self) -> str | None:
        path = self.checkpoint_path()
        if path is None:
            return None
        arrays = self.model.state_arrays()
        if self.last_assign is not None:
            arrays["state.last_assign"] = self.last_assign
        arrays["state.step_acc"] = self.step_acc.get()
        meta = {"format": CHECKPOINT_FORMAT, "step": self.model.step, "config": self.cfg.to_dict(),
                "vocab": self.vocab.to_json(), "batches": self.batches.state(),
                "proto_ready": self.model.proto_ready, "kernel_hash": kernel_source_hash(),
                "device": self.dev.name, "history": self.history}
        save_checkpoint(path, arrays, meta)
        for cb in self.callbacks:
            cb.on_checkpoint(path, self.model.step)
        return path

    def _restore(self, path, arrays, meta):
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint {path}: unknown format {meta.get('format')!r}")
        want = self.cfg.to_dict()
        check_compatible(meta["config"], {"model": want["model"], "data": want["data"],
                                          "hebb": {"mode": want["hebb"]["mode"]},
                                          "proto": {"mode": want["proto"]["mode"]}}, path)
        try:
            self.model.load_state_arrays(arrays)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: arrays do not fit this model ({exc})") from exc
        self.model.step = int(meta["step"])
        self.model.proto_ready = bool(meta.get("proto_ready", True))
        self.batches.set_state(meta["batches"])
        self.last_assign = arrays.get("state.last_assign")
        if "state.step_acc" in arrays:
            self.step_acc.set(np.ascontiguousarray(arrays["state.step_acc"], np.float32))
        self.history = list(meta.get("history", []))

    # -- the loop -----------------------------------------------------------------------
    def request_stop(self, reason: str = "killed"):
        """Ask the loop to stop after the current step (signal handlers call this;
        a sweep's pruner passes reason="pruned"). The summary's status is the reason."""
        self._stop = reason

    def train(self, progress=None) -> dict:
        cfg, m, ws, dev = self.cfg, self.model, self.ws, self.dev
        tc = cfg.train
        for cb in self.callbacks:
            cb.on_start(self)
        status = "finished"
        t_log, steps_timed = time.perf_counter(), 0
        dev.take_timings()
        while m.step < tc.steps:
            if self._stop:
                status = self._stop
                break
            offsets = self.batches.next_offsets()
            ws.offsets.set(offsets)
            ops.gather_windows(dev, self.ids_dev, ws.offsets, ws.S, ws.x, ws.y)
            lr = m.gradient_step(ws)
            ops.accumulate_step_stats(dev, ws.loss_out, m.gnorm, cfg.optim.clip_norm, self.step_acc)
            step = m.step
            steps_timed += 1
            is_eval = step % tc.eval_every == 0 or step == tc.steps
            is_ckpt = step == tc.steps or (tc.checkpoint_every and step % tc.checkpoint_every == 0)
            rec = None
            if step % tc.log_every == 0 or is_eval or is_ckpt:
                rec = self._log_record(step, lr, steps_timed, time.perf_counter() - t_log)
            m.local_updates(ws)
            if rec is not None:
                for cb in self.callbacks:
                    cb.on_log(rec)
                if progress is not None:
                    progress(rec)
                t_log, steps_timed = time.perf_counter(), 0
            if is_eval:
                self.history.append(self.evaluate(step, rec))
                dev.take_timings()  # evaluation (and its callbacks) is not training-step time
                t_log = time.perf_counter()
            if is_ckpt:
                self.save()
        if status != "finished" and self.checkpoint_path():
            self.save()
        summary = {"status": status, "step": m.step, "history": self.history,
                   "final": self.history[-1] if self.history else None,
                   "checkpoint": self.checkpoint_path()}
        for cb in self.callbacks:
            cb.on_end(summary)
        return summary

    def _log_record(self, step, lr, n_timed, seconds) -> dict:
        """Telemetry at a logging point: averages over the steps since the last one."""
        m, ws = self.model, self.ws
        acc = self.step_acc.get().astype(np.float64)
        self.dev.cl.enqueue_fill_buffer(self.dev.queue, self.step_acc.data, np.zeros(1, np.float32), 0, 12)
        n_steps = max(acc[2], 1.0)
        rec = {"step": step, "train_loss": acc[0] / n_steps, "clipped_frac": acc[1] / n_steps, "lr": lr}
        rec.update(m.telemetry(ws))
        self._check_finite(step, rec)
        rec["tokens_per_s"] = n_timed * ws.N / seconds if seconds > 0 and n_timed else 0.0
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
        """Validation loss (nats), accuracy and bits per character over the split."""
        m, ws, dev = self.model, self.ws, self.dev
        total, hits, count = 0.0, 0.0, 0.0
        first_assign = None
        for x, y in self.val:
            ws.x.set(np.ascontiguousarray(x.ravel(), np.int32))
            ws.y.set(np.ascontiguousarray(y.ravel(), np.int32))
            m.forward(ws)
            out = ws.loss_out.get().astype(np.float64)
            total, hits, count = total + out[3], hits + out[1], count + out[2]
            if first_assign is None and self.cfg.proto.mode != "off":
                first_assign = ws.assign.get()
        val_loss = total / max(count, 1.0)
        rec = {"step": step, "train_loss": log_rec["train_loss"] if log_rec else float("nan"),
               "val_loss": val_loss, "val_acc": hits / max(count, 1.0), "val_bpc": val_loss / LN2}
        if first_assign is not None:
            if self.last_assign is not None:
                rec["proto_changed"] = float(np.mean(first_assign != self.last_assign))
            self.last_assign = first_assign
            if log_rec and "proto_counts" in log_rec:
                rec["proto_counts"] = log_rec["proto_counts"]
        for cb in self.callbacks:
            cb.on_eval(rec)
        return rec


# -- command line ---------------------------------------------------------------------------
EVAL_KEYS = ("step", "train_loss", "val_loss", "val_acc", "val_bpc")


class _PrintEval(Callback):
    def on_eval(self, record):
        print(json.dumps({k: record[k] for k in EVAL_KEYS}), flush=True)


def make_progress(total: int, initial: int = 0):
    """A tqdm bar on a terminal (stderr), else None."""
    if not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm
    bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(rec):
        bar.n = rec["step"]
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        bar.refresh()
    return update, bar


def load_config(args) -> Config:
    cfg = Config()
    if args.config:
        with open(args.config) as f:
            cfg = Config.from_json(f.read())
    return apply_overrides(cfg, args.set or [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    ap.add_argument("--config", help="a resolved config JSON to start from")
    ap.add_argument("--out", help="directory for checkpoints")
    ap.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (its config, plus --set)")
    args = ap.parse_args(argv)
    try:
        if args.resume:
            _, meta = load_checkpoint(args.resume)
            cfg = apply_overrides(Config.from_dict(meta["config"]), args.set or [])
        else:
            cfg = load_config(args)
        trainer = Trainer(cfg, args.out, [_PrintEval()], resume=args.resume)
    except (ConfigError, DataError, CheckpointError, DeviceError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress, bar = make_progress(cfg.train.steps, trainer.model.step)
    previous = {s: signal.signal(s, lambda *_: trainer.request_stop()) for s in (signal.SIGINT, signal.SIGTERM)}
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
    if summary["status"] == "killed":
        print(f"stopped at step {summary['step']}; checkpoint {summary['checkpoint']}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
