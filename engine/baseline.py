"""Count-based character n-gram baselines: the validation loss a model must beat.

    python -m engine.baseline [--data PATH] [--val-fraction 0.1] [--order 1|2|3|all] [--alpha 0.01]

Fits unigram, bigram and trigram count models on the TRAINING split, exactly as
the engine sees it (`load_text`, `split_text`, `Vocab.from_text(train)`, ids from
`vocab.encode`, UNK = 0 for characters unseen in training), and prints one JSON
object per order with the validation cross-entropy in nats and bits per character.

Model (order n, context h = the previous n-1 ids, target c, V = vocab.size):

    p(c | h) = (C(h, c) + alpha) / (C(h) + alpha * V)        if C(h) > 0
    p(c | h) = p_{n-1}(c | h without its oldest id)          otherwise (backoff)
    p_1(c)   = (C(c) + alpha) / (N_train + alpha * V)

C counts n-grams of the training ids and C(h) = sum_c C(h, c), so every
prediction is a proper distribution over all V ids (UNK included; training
never contains UNK, so it only gets the alpha share). A context never seen in
training (e.g. one containing UNK) backs off to the next lower order rather than
predicting uniformly; the count of such targets is reported as backoff_targets.

Validation matches `engine.data.val_batches`: the len(val_ids) - 1 targets
val_ids[1:], target i + 1 predicted from val_ids[..i] only (no history from the
training split). The trigram has a single id of history for the first target and
uses the bigram there.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from engine.data import DataError, Vocab, load_text, split_text

NAMES = {1: "unigram", 2: "bigram", 3: "trigram"}


def _keys(cols: list[np.ndarray], V: int) -> np.ndarray:
    """Mixed-radix int64 key of id columns (oldest first)."""
    k = np.zeros(len(cols[0]) if cols else 0, dtype=np.int64)
    for c in cols:
        k = k * V + c.astype(np.int64)
    return k


def _lookup(keys: np.ndarray, counts: np.ndarray, q: np.ndarray) -> np.ndarray:
    """counts of the query keys q (0 where absent); keys sorted unique."""
    if len(keys) == 0:
        return np.zeros(len(q), dtype=np.int64)
    idx = np.searchsorted(keys, q)
    idx_c = np.minimum(idx, len(keys) - 1)
    return np.where(keys[idx_c] == q, counts[idx_c], 0)


class NGramModel:
    """Add-alpha character n-gram model of one order, with backoff for unseen contexts."""

    def __init__(self, train_ids, V: int, order: int, alpha: float = 0.01):
        ids = np.asarray(train_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or len(ids) < 1:
            raise DataError("train ids must be a non-empty 1-D integer array")
        if order not in NAMES:
            raise DataError(f"order must be 1, 2 or 3, got {order!r}")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise DataError(f"alpha must be a finite number > 0, got {alpha!r}")
        if V < 1 or ids.min() < 0 or ids.max() >= V:
            raise DataError(f"train ids must be in [0, {V})")
        if V ** order >= 2 ** 62:
            raise DataError(f"V={V} is too large for order {order}")
        self.V, self.order, self.alpha = int(V), order, float(alpha)
        self.n_train = len(ids)
        ids = ids.astype(np.int64)
        # level n -> (sorted n-gram keys, counts, sorted context keys, context counts)
        self._levels = {}
        for n in range(1, order + 1):
            m = len(ids) - n + 1
            if m <= 0:
                empty = np.zeros(0, dtype=np.int64)
                self._levels[n] = (empty, empty, empty, empty)
                continue
            cols = [ids[j:j + m] for j in range(n)]
            gk, gc = np.unique(_keys(cols, V), return_counts=True)
            ck, cc = np.unique(_keys(cols[:-1], V), return_counts=True)
            self._levels[n] = (gk, gc.astype(np.int64), ck, cc.astype(np.int64))

    def prob(self, history, targets) -> tuple[np.ndarray, np.ndarray]:
        """(p, level): p(targets[i] | history[i]) and the order that predicted it.

        history is (n, order-1) ids, oldest first, -1 = no id there (start of text);
        only the trailing non-negative ids are used.
        """
        t = np.asarray(targets, dtype=np.int64).reshape(-1)
        h = np.asarray(history, dtype=np.int64).reshape(len(t), self.order - 1)
        V, a = self.V, self.alpha
        # unigram
        gk, gc, _, _ = self._levels[1]
        p = (_lookup(gk, gc, t) + a) / (self.n_train + a * V)
        level = np.ones(len(t), dtype=np.int64)
        for n in range(2, self.order + 1):
            ctx = [h[:, self.order - n + j] for j in range(n - 1)]   # last n-1 history ids
            have = np.all(np.stack(ctx) >= 0, axis=0)
            ctx = [np.maximum(c, 0) for c in ctx]
            gk, gc, ck, cc = self._levels[n]
            cnt_h = _lookup(ck, cc, _keys(ctx, V))
            use = have & (cnt_h > 0)
            cnt_hc = _lookup(gk, gc, _keys(ctx + [t], V))
            p = np.where(use, (cnt_hc + a) / (cnt_h + a * V), p)
            level = np.where(use, n, level)
        return p, level

    def distribution(self, history) -> np.ndarray:
        """(V,) p(. | history) for one history (sequence of up to order-1 ids, oldest first)."""
        hist = [int(x) for x in history][-(self.order - 1):] if self.order > 1 else []
        hist = [-1] * (self.order - 1 - len(hist)) + hist
        h = np.tile(np.array(hist, dtype=np.int64), (self.V, 1))
        return self.prob(h, np.arange(self.V))[0]

    def val_stats(self, val_ids) -> dict:
        """Cross-entropy over targets val_ids[1:], each predicted from the val ids before it."""
        v = np.asarray(val_ids, dtype=np.int64).reshape(-1)
        if len(v) < 2:
            raise DataError(f"validation split needs at least 2 ids, got {len(v)}")
        if v.min() < 0 or v.max() >= self.V:
            raise DataError(f"validation ids must be in [0, {self.V})")
        T = len(v) - 1
        k = self.order - 1
        h = np.full((T, k), -1, dtype=np.int64)
        for j in range(k):              # target v[i+1]: column j holds v[i - lag], if i >= lag
            lag = k - 1 - j
            if lag < T:
                h[lag:, j] = v[:T - lag]
        p, level = self.prob(h, v[1:])
        nll = -np.log(p)
        return {"loss": float(nll.mean()), "targets": T,
                "backoff_targets": int((level < self.order).sum())}


def ngram_val_loss(train_ids, val_ids, V: int, order: int, alpha: float = 0.01) -> float:
    """Mean validation cross-entropy in nats per character of the order-`order` model."""
    return NGramModel(train_ids, V, order, alpha).val_stats(val_ids)["loss"]


def run(path: str, val_fraction: float, orders: list[int], alpha: float) -> list[dict]:
    text = load_text(path)
    train, val = split_text(text, val_fraction)
    vocab = Vocab.from_text(train)
    train_ids, val_ids = vocab.encode(train), vocab.encode(val)
    out = []
    for order in orders:
        s = NGramModel(train_ids, vocab.size, order, alpha).val_stats(val_ids)
        out.append({"model": NAMES[order], "order": order, "alpha": alpha,
                    "data": path or "<default corpus>", "val_fraction": val_fraction,
                    "V": vocab.size, "train_chars": len(train_ids),
                    "val_targets": s["targets"],
                    "val_unk_targets": int((val_ids[1:] == 0).sum()),
                    "backoff_targets": s["backoff_targets"],
                    "val_loss_nats": round(s["loss"], 6),
                    "val_bits_per_char": round(s["loss"] / math.log(2), 6),
                    "val_perplexity": round(math.exp(s["loss"]), 4)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.baseline",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="", help='UTF-8 text file; "" = the default corpus')
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--order", choices=["1", "2", "3", "all"], default="all")
    ap.add_argument("--alpha", type=float, default=0.01)
    args = ap.parse_args(argv)
    orders = [1, 2, 3] if args.order == "all" else [int(args.order)]
    try:
        results = run(args.data, args.val_fraction, orders, args.alpha)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
