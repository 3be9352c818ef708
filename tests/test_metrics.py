"""Accuracy and macro F1 of an evaluation (engine/tasks/metrics.py, engine/tasks/char_lm.py):
against sklearn (or, without it, a numpy implementation written here from the definition) on
constructed predictions, and end to end on a tiny run, where every evaluation's val_acc and
val_f1 must equal those recomputed from the logits read back.

    python -m pytest tests/test_metrics.py -q
"""
import numpy as np
import pytest
from conftest import B, E, H, S, T, TEXT

from engine.data import PAD
from engine.tasks.metrics import ClassCounts

try:
    from sklearn.metrics import f1_score
except ImportError:   # pragma: no cover - the dev environment has scikit-learn
    f1_score = None


def independent_macro_f1(y, pred):
    """Macro F1 over the labels present in y (PAD dropped), from a confusion matrix: what
    sklearn.metrics.f1_score(y, pred, average="macro", labels=present) computes."""
    keep = y != PAD
    y, pred = y[keep], pred[keep]
    labels = np.unique(y)
    scores = []
    for c in labels:
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn)
        scores.append(2 * p * r / (p + r) if p + r else 0.0)
    return float(np.mean(scores))


def reference_f1(y, pred):
    if f1_score is None:
        return independent_macro_f1(y, pred)
    keep = y != PAD
    return float(f1_score(y[keep], pred[keep], average="macro", labels=np.unique(y[keep]), zero_division=0))


def counts_of(batches, V):
    c = ClassCounts(V)
    for pred, y in batches:
        c.add(pred, y)
    return c


@pytest.mark.parametrize("seed", range(6))
def test_macro_f1_equals_sklearn_on_constructed_predictions(seed):
    """Several batches, PAD targets, classes never predicted, predictions of classes that are
    never targets (they lower recall only), UNK (id 0) as a class."""
    rng = np.random.default_rng(seed)
    V, n = 12, 300
    y = rng.integers(0, 8, n).astype(np.int32)              # targets use classes 0..7 only
    pred = np.where(rng.random(n) < 0.5, y, rng.integers(0, V, n)).astype(np.int32)
    pred[y == 3] = 5                                        # class 3: never predicted, F1 0
    y[rng.permutation(n)[:40]] = PAD
    batches = [(pred[i:i + 64], y[i:i + 64]) for i in range(0, n, 64)]
    c = counts_of(batches, V)
    want = reference_f1(y, pred)
    assert c.macro_f1() == pytest.approx(want, rel=1e-12)
    assert c.macro_f1() == pytest.approx(independent_macro_f1(y, pred), rel=1e-12)
    assert c.correct == int(np.sum((y != PAD) & (pred == y)))
    assert 0.0 < want < 1.0


def test_macro_f1_hand_computed_cases():
    # targets a a b c, predictions a b b d: F1 a = 2/3 (P 1, R 1/2), b = 2/3 (P 1/2, R 1), c = 0;
    # d is never a target and is not a class of the average
    c = counts_of([(np.array([1, 2, 2, 4]), np.array([1, 1, 2, 3]))], 5)
    assert c.macro_f1() == pytest.approx((2 / 3 + 2 / 3 + 0) / 3, rel=1e-15)
    assert counts_of([(np.array([1, 2, 3]), np.array([1, 2, 3]))], 4).macro_f1() == 1.0
    assert counts_of([(np.array([2, 1]), np.array([1, 2]))], 4).macro_f1() == 0.0
    assert counts_of([(np.array([1, 2]), np.array([PAD, PAD]))], 4).macro_f1() == 0.0   # no target
    assert counts_of([], 4).macro_f1() == 0.0


@pytest.mark.opencl
def test_every_evaluation_reports_the_f1_and_accuracy_of_its_predictions(dev, tmp_path):
    """A tiny run with a test split: val_f1 and val_acc of the last evaluation, and test_f1 /
    test_acc, equal the values recomputed here from the logits read back (np.argmax) and
    sklearn, with the final parameters (no early stopping: the test uses the last ones)."""
    from engine.config import Config, apply_overrides
    from engine.train import Trainer
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    cfg = apply_overrides(Config(), [f"data.path={path}", f"model.embedding_dim={E}", f"model.hidden_dim={H}",
                                     f"model.num_prototypes={T}", f"train.batch_size={B}", f"train.seq_len={S}",
                                     "train.steps=8", "train.eval_every=4", "optim.warmup_steps=2",
                                     "optim.lr=0.03", "data.val_fraction=0.15", "data.test_fraction=0.1"])
    trainer = Trainer(cfg, device=dev)
    summary = trainer.train()
    m, ws = trainer.model, trainer.ws
    for split, batches, rec in (("val", trainer.data.val, summary["final"]), ("test", trainer.data.test, summary["test"])):
        preds, ys = [], []
        for x, y in batches:
            ws.x.set(x.ravel().astype(np.int32))
            ws.y.set(y.ravel().astype(np.int32))
            m.forward(ws, training=False)
            preds.append(np.argmax(ws.logits.get()[:, :m.V], axis=1))
            ys.append(y.ravel())
        pred, y = np.concatenate(preds), np.concatenate(ys)
        valid = y != PAD
        assert valid.sum() == (len(trainer.data.val_ids if split == "val" else trainer.data.test_ids) - 1)
        assert rec[f"{split}_acc"] == np.sum(pred[valid] == y[valid]) / valid.sum()   # counts: exact
        assert rec[f"{split}_f1"] == pytest.approx(reference_f1(y, pred), rel=1e-12)
        assert 0.0 < rec[f"{split}_f1"] < rec[f"{split}_acc"]    # a young model: frequent characters only
    assert summary["test"]["step"] == 8 and set(summary["test"]) == {"step", "test_loss", "test_acc", "test_bpc",
                                                                     "test_f1"}
    assert all("val_f1" in r for r in summary["history"])
