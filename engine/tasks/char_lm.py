"""Character language modelling: the task the hybrid model is trained and judged on.

The task owns the data (the corpus, its train/validation/test split, the vocabulary), the
batches (random windows of the training ids gathered on the device, the validation and test
splits in fixed windows), the loss head (engine.layers.head.CharHead: softmax cross-entropy on
the next character), the evaluation (loss in nats, accuracy, bits per character and macro F1,
engine.tasks.metrics) and sampling (engine.generate). The trainer (engine.train) only calls these.
Letters: B batch, S sequence length, V vocabulary, H the body's output width.
"""
from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..data import Batches, Vocab, load_text, split_corpus, text_digest, val_batches
from ..models import LayerDecl, head_args
from .metrics import ClassCounts

LN2 = math.log(2.0)


def batch_buffers(B: int, S: int) -> dict:
    """x, y: (B·S,) int32 character ids (the inputs, the next characters); offsets: (B,) window starts."""
    N = B * S
    return {"x": ((N,), np.int32), "y": ((N,), np.int32), "offsets": ((B,), np.int32)}


def head_layers(cfg, V: int) -> list:
    """The loss head after the family's body (its width and the head's options from the family:
    engine.models.head_args; the hybrid's: (N, model.hidden_dim), W2 and b2)."""
    args = dict(head_args(cfg))
    prefix = args.pop("prefix", "")
    return [LayerDecl("char_head", "head", prefix, dict(V=V, **args))]


class CharLM:
    """The data, batches and evaluation of one run (nothing on the device until to_device)."""

    def __init__(self, cfg, vocab_json: str | None = None):
        self.cfg = cfg
        text = load_text(cfg.data.path)
        train_text, val_text, test_text = split_corpus(text, cfg.data.val_fraction, cfg.data.test_fraction)
        self.vocab = Vocab.from_json(vocab_json) if vocab_json else Vocab.from_text(train_text)
        self.train_ids = self.vocab.encode(train_text)
        self.val_ids = self.vocab.encode(val_text)
        self.test_ids = self.vocab.encode(test_text) if cfg.data.test_fraction else None
        self.n_chars = len(text)
        self.data_sha256 = text_digest(cfg.data.path, text)
        B, S = cfg.train.batch_size, cfg.train.seq_len
        self.batches = Batches(self.train_ids, B, S, cfg.seed)
        self.val = self.test = self.ids_dev = None   # to_device: after the memory check (a huge batch is refused first)

    @property
    def output_size(self) -> int:   # V: what the model's embedding and head are sized by
        return self.vocab.size

    def device_buffers(self) -> dict:
        return {"train.ids": ((len(self.train_ids),), np.int32)}

    def to_device(self, dev):
        cfg = self.cfg
        self.val = val_batches(self.val_ids, cfg.train.batch_size, cfg.train.seq_len, cfg.train.eval_batches)
        if self.test_ids is not None:   # evaluated once, whole (train.eval_batches is for the frequent passes)
            self.test = val_batches(self.test_ids, cfg.train.batch_size, cfg.train.seq_len)
        self.ids_dev = dev.to_device(self.train_ids)

    # -- batches ----------------------------------------------------------------------
    def next_batch(self, dev, ws):
        """The next training batch into ws.x, ws.y (window starts from the seeded generator)."""
        ws.offsets.set(self.batches.next_offsets())
        ops.gather_windows(dev, self.ids_dev, ws.offsets, ws.S, ws.x, ws.y)

    def state(self) -> dict:
        """What a checkpoint keeps of the task: the vocabulary and the batch generator."""
        return {"vocab": self.vocab.to_json(), "batches": self.batches.state()}

    def set_state(self, meta: dict):
        self.batches.set_state(meta["batches"])

    # -- evaluation ----------------------------------------------------------------------
    @property
    def has_test(self) -> bool:
        return self.test_ids is not None

    def evaluate(self, model, ws, split: str = "val") -> tuple[dict, np.ndarray | None]:
        """({<split>_loss, _acc, _bpc, _f1}, the first batch's prototype assignments or None):
        the summed loss over every valid target of the split ("val" or "test"), in evaluation
        mode; accuracy from the loss kernel's hits, macro F1 (engine.tasks.metrics) from the
        predictions read back once per batch."""
        total, hits, count = 0.0, 0.0, 0.0
        counts = ClassCounts(model.V)
        first_assign = None
        for x, y in self.val if split == "val" else self.test:
            ws.x.set(np.ascontiguousarray(x.ravel(), np.int32))
            ws.y.set(np.ascontiguousarray(y.ravel(), np.int32))
            model.forward(ws, training=False)
            pred = model.predict(ws)
            out = ws.loss_out.get().astype(np.float64)
            total, hits, count = total + out[3], hits + out[1], count + out[2]
            counts.add(pred.get(), y)
            assign = model.assignments(ws) if first_assign is None and self.cfg.proto.mode != "off" else None
            if assign is not None:   # None: no bio layer assigns (e.g. a plain transformer)
                first_assign = assign.get()
        loss = total / max(count, 1.0)
        return {f"{split}_loss": loss, f"{split}_acc": hits / max(count, 1.0), f"{split}_bpc": loss / LN2,
                f"{split}_f1": counts.macro_f1()}, first_assign

    # -- sampling --------------------------------------------------------------------------
    def generator(self, model):
        from ..generate import make_generator
        return make_generator(model, self.vocab)
